"""Op rules: how each op relates the channel layouts of its inputs and outputs.

A rule is a small function ``rule(ctx, node) -> dims`` registered for an op target (a function,
a tensor method name, or a leaf module type) with :func:`register_rule`.  It ties, splits,
concatenates or creates axes and returns the dims of the node's output.  An op with no rule
freezes every channel it touches (see :func:`no_rule`).
"""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any, Callable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .axes import Layout, single
from .context import RuleContext, TensorDims

Rule = Callable[[RuleContext, fx.Node], Any]
Target = Union[Callable, str, type]

RULES: dict[Target, Rule] = {}


def register_rule(*targets: Target) -> Callable[[Rule], Rule]:
    """Decorator: use the rule for these op targets (functions, method names, module types)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            RULES[t] = fn
        return fn

    return deco


def lookup(table: dict, root: nn.Module, node: fx.Node) -> Optional[Callable]:
    """The entry of ``table`` for a node: by function, method name or module type (most derived first)."""
    if node.op == "call_module":
        mod = root.get_submodule(node.target)
        for cls in type(mod).__mro__:
            if cls in table:
                return table[cls]
        return None
    if node.op in ("call_function", "call_method"):
        return table.get(node.target)
    return None


def lookup_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Rule]:
    """The analysis rule for a node."""
    return lookup(RULES, gm, node)


# ---------------------------------------------------------------------------------------------
# helpers


def arg(node: fx.Node, i: int, name: str, default: Any = None) -> Any:
    """Positional-or-keyword argument of a call node."""
    if i < len(node.args):
        return node.args[i]
    return node.kwargs.get(name, default)


def tensor_args(ctx: RuleContext, node: fx.Node) -> list[TensorDims]:
    """Dims of every tensor argument, flattened through lists and tuples."""
    out: list[TensorDims] = []

    def visit(a: Any) -> None:
        if isinstance(a, (list, tuple)):
            for x in a:
                visit(x)
        elif isinstance(a, dict):
            for x in a.values():
                visit(x)
        else:
            d = ctx.dims(a)
            if isinstance(d, TensorDims):
                out.append(d)

    visit(node.args)
    visit(node.kwargs)
    return out


def norm_dim(d: int, n: int) -> int:
    """Non-negative dimension index."""
    return d + n if d < 0 else d


def no_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Freeze every channel an op without a rule touches; its outputs carry no channels."""
    what = _target_name(ctx, node)
    ins = tensor_args(ctx, node)
    for td in ins:
        for lay in td.dims:
            ctx.freeze(lay, "no rule", f"no rule for {what}")
    if ins:
        ctx.unruled.append((node.name, what))
    live = any(td.live for td in ins)
    shp = ctx.out_shape()
    if shp is None:
        return None
    if shp and isinstance(shp[0], tuple):
        return tuple(TensorDims(s, (None,) * len(s), live) if s is not None else None for s in shp)
    return TensorDims(shp, (None,) * len(shp), live)


def _target_name(ctx: RuleContext, node: fx.Node) -> str:
    if node.op == "call_module":
        return f"module {type(ctx.gm.get_submodule(node.target)).__name__} ({node.target})"
    if node.op == "call_method":
        return f"method .{node.target}()"
    t = node.target
    return f"function {getattr(t, '__module__', '')}.{getattr(t, '__name__', str(t))}"


def broadcast(ctx: RuleContext, operands: Sequence[TensorDims], out_shape: Sequence[int], rule: str) -> TensorDims:
    """Tie operands dimension by dimension under broadcasting; output carries their channels."""
    nd = len(out_shape)
    dims: list[Optional[Layout]] = []
    for i in range(nd):
        cands = []
        for td in operands:
            j = i - (nd - len(td.shape))
            if j >= 0 and td.shape[j] == out_shape[i] and out_shape[i] != 1:
                cands.append(td.dims[j])
        if not cands:
            dims.append(None)
            continue
        if any(c is None for c in cands):
            for c in cands:
                ctx.freeze(c, rule, "channels meet a dimension without channels (tokens, space, batch)")
            dims.append(None)
            continue
        for c in cands[1:]:
            ctx.tie(cands[0], c, rule)
        dims.append(cands[0])
    live = any(td.live for td in operands)
    return TensorDims(tuple(out_shape), tuple(dims), live)


# ---------------------------------------------------------------------------------------------
# graph boundary


def placeholder_dims(ctx: RuleContext, node: fx.Node) -> Any:
    """Model inputs carry no prunable channels."""
    shp = ctx.out_shape()
    if shp is None:
        return None
    return TensorDims(shp, (None,) * len(shp), True)


def get_attr_dims(ctx: RuleContext, node: fx.Node) -> Any:
    """Parameters and buffers: one fresh axis per dimension."""
    shp = ctx.out_shape()
    if shp is None:
        return None
    return ctx.param(node.target)


def output_dims(ctx: RuleContext, node: fx.Node) -> None:
    """Model outputs are never pruned, unless the analysis was asked to (``prune_outputs``)."""
    if not ctx.protect_outputs:
        return
    for td in tensor_args(ctx, node):
        for lay in td.dims:
            ctx.freeze(lay, "output", "model output")


# ---------------------------------------------------------------------------------------------
# pointwise


_POINTWISE_FUNCS = [
    operator.add, operator.sub, operator.mul, operator.truediv, operator.neg, operator.floordiv,
    operator.pow, operator.iadd, operator.imul,
    torch.add, torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.log, torch.sigmoid,
    torch.tanh, torch.relu, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.where,
    torch.sin, torch.cos, torch.pow, torch.erf, torch.maximum, torch.minimum,
    F.gelu, F.silu, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.mish,
    F.elu, F.leaky_relu, F.dropout, F.softplus, F.hardtanh,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
    torch.square, torch.addcmul, torch.addcdiv, torch.lerp, torch.reciprocal, torch.sign,
    torch.log1p, torch.expm1,
]
_POINTWISE_METHODS = [
    "add", "sub", "mul", "div", "add_", "mul_", "sub_", "div_", "neg", "exp", "log", "sigmoid",
    "tanh", "relu", "sqrt", "rsqrt", "abs", "clamp", "pow", "sin", "cos",
    "float", "half", "bfloat16", "double", "to", "type", "contiguous", "clone",
    "detach", "masked_fill", "masked_fill_", "erf", "sign", "reciprocal", "square", "clamp_min",
    "clamp_max", "__add__", "__mul__", "__rmul__", "__radd__", "sigmoid_", "gelu", "silu",
    "eq", "ne", "lt", "le", "gt", "ge",
]
_POINTWISE_MODULES = [
    nn.Dropout, nn.Identity, nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Dropout2d,
    nn.Dropout1d, nn.Softplus, nn.Hardtanh,
]


@register_rule(*_POINTWISE_FUNCS, *_POINTWISE_METHODS, *_POINTWISE_MODULES)
def pointwise(ctx: RuleContext, node: fx.Node) -> Any:
    """Elementwise ops (with broadcasting) tie the channels of their operands."""
    ops = tensor_args(ctx, node)
    shp = ctx.out_shape()
    if not ops or shp is None or (shp and isinstance(shp[0], tuple)):
        return None if not ops else no_rule(ctx, node)
    live = [td for td in ops if td.live]
    td = broadcast(ctx, ops, shp, "elementwise")
    if node.target in (operator.add, torch.add, "add", "add_", operator.iadd, "__add__", "__radd__") and len(live) >= 2:
        for lay in td.dims:
            ctx.role(lay, "add")
    return td


@register_rule(F.softmax, F.log_softmax, "softmax", "log_softmax", nn.Softmax, nn.LogSoftmax)
def softmax_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Softmax keeps dims; channels it normalises over (channel attention) get the norm role."""
    x = ctx.dims(node.args[0])
    if node.op == "call_module":
        dim = getattr(ctx.gm.get_submodule(node.target), "dim", None)
    else:
        dim = arg(node, 1, "dim")
    if dim is None or not isinstance(x, TensorDims):
        return no_rule(ctx, node)
    ctx.role(x.dims[norm_dim(int(dim), len(x.shape))], "norm")
    return x


@register_rule(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like,
               torch.randn_like, "new_zeros", "new_ones")
def like_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """``zeros_like(x)`` and friends: a constant whose shape follows ``x`` at run time, so its
    channels stay tied to ``x``'s (for ``new_zeros``, only when the shape is ``x``'s)."""
    x = ctx.dims(node.args[0])
    if not isinstance(x, TensorDims):
        return no_rule(ctx, node)
    if isinstance(node.target, str) and node.target.startswith("new_"):
        size = node.args[1:] if len(node.args) > 1 else (node.kwargs.get("size"),)
        flat = list(size[0]) if len(size) == 1 and isinstance(size[0], (list, tuple)) else list(size)
        shp = ctx.out_shape()
        if shp is not None and flat and all(isinstance(v, int) for v in flat):
            return TensorDims(shp, (None,) * len(shp), False)  # a constant shape: no channels
        return no_rule(ctx, node)
    return TensorDims(x.shape, x.dims, False)


@register_rule("type_as")
def type_as_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """``a.type_as(b)`` casts ``a``; ``b`` only lends its dtype."""
    return ctx.dims(node.args[0])


# ---------------------------------------------------------------------------------------------
# shape movement


@register_rule("permute", torch.permute)
def permute_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Reorder dims."""
    td = ctx.dims(node.args[0])
    order = node.args[1:] if node.target == "permute" else (arg(node, 1, "dims"),)
    if len(order) == 1 and isinstance(order[0], (list, tuple)):
        order = order[0]
    n = len(td.shape)
    order = [norm_dim(int(d), n) for d in order]
    return td.with_dims([td.dims[d] for d in order], [td.shape[d] for d in order])


@register_rule("transpose", torch.transpose, "swapaxes")
def transpose_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Swap two dims."""
    td = ctx.dims(node.args[0])
    n = len(td.shape)
    a, b = norm_dim(int(arg(node, 1, "dim0")), n), norm_dim(int(arg(node, 2, "dim1")), n)
    dims, shape = list(td.dims), list(td.shape)
    dims[a], dims[b] = dims[b], dims[a]
    shape[a], shape[b] = shape[b], shape[a]
    return td.with_dims(dims, shape)


@register_rule("t")
def t_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Transpose a 2-D tensor."""
    td = ctx.dims(node.args[0])
    return td.with_dims(td.dims[::-1], td.shape[::-1])


@register_rule("unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze)
def squeeze_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Insert or remove size-1 dims (which carry no channels)."""
    td = ctx.dims(node.args[0])
    shp = ctx.out_shape()
    kept = [(s, d) for s, d in zip(td.shape, td.dims) if s != 1]
    dims, it = [], iter(kept)
    for s in shp:
        if s == 1:
            dims.append(None)
        else:
            _, d = next(it)
            dims.append(d)
    return td.with_dims(dims, shp)


@register_rule("expand", "expand_as", "broadcast_to", torch.broadcast_to)
def expand_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Broadcast size-1 dims (new dims carry no channels)."""
    td = ctx.dims(node.args[0])
    shp = ctx.out_shape()
    off = len(shp) - len(td.shape)
    dims = [None] * off + [d if s == o else None for s, d, o in zip(td.shape, td.dims, shp[off:])]
    return td.with_dims(dims, shp)


@register_rule("repeat", "tile", torch.tile)
def repeat_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Repeat copies; repeating along a channel dim freezes it."""
    td = ctx.dims(node.args[0])
    shp = ctx.out_shape()
    off = len(shp) - len(td.shape)
    dims: list[Optional[Layout]] = [None] * off
    for s, d, o in zip(td.shape, td.dims, shp[off:]):
        if s == o:
            dims.append(d)
        else:
            ctx.freeze(d, "repeat", "channels repeated")
            dims.append(None)
    return td.with_dims(dims, shp)


@register_rule("repeat_interleave", torch.repeat_interleave)
def repeat_interleave_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Repeat each element along ``dim``; repeating along a channel dim freezes it."""
    td, shp = ctx.dims(node.args[0]), ctx.out_shape()
    dim = arg(node, 2, "dim")
    if not isinstance(td, TensorDims) or dim is None or shp is None or len(shp) != len(td.shape):
        return no_rule(ctx, node)
    d = norm_dim(int(dim), len(td.shape))
    dims = list(td.dims)
    if dims[d] is not None and td.shape[d] != shp[d]:
        ctx.freeze(dims[d], "repeat", "channels repeated")
        dims[d] = None
    return td.with_dims(dims, shp)


# origin of the axes reshape_dims makes for a dim without channels (batch, tokens) merged into a
# channel dim; the slim pass finds them by it to keep such sizes dynamic
STAND_IN = "dimension without channels merged into channels"


@register_rule("reshape", "view", torch.reshape, "flatten", torch.flatten, "unflatten", torch.unflatten, nn.Flatten, nn.Unflatten,
               "reshape_as", "view_as")
def reshape_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Merge and split dims: merged channels become products, split ones are refined."""
    td = ctx.dims(node.args[0])
    return reshape_dims(ctx, td, ctx.out_shape(), "reshape")


def reshape_dims(ctx: RuleContext, td: TensorDims, out_shape: Sequence[int], rule: str) -> TensorDims:
    """Dims of ``td`` viewed as ``out_shape`` (row-major)."""
    store = ctx.store
    ins = [(s, d) for s, d in zip(td.shape, td.dims) if s != 1]
    outs = [i for i, s in enumerate(out_shape) if s != 1]
    dims: list[Optional[Layout]] = [None] * len(out_shape)
    i = j = 0
    while i < len(ins) and j < len(outs):
        a, b = [i], [j]
        pa, pb = ins[i][0], out_shape[outs[j]]
        while pa != pb:
            if pa < pb:
                i += 1
                a.append(i)
                pa *= ins[i][0]
            else:
                j += 1
                b.append(j)
                pb *= out_shape[outs[j]]
        i += 1
        j += 1
        in_lays = [ins[k][1] for k in a]
        sizes = [out_shape[outs[k]] for k in b]
        if all(lay is None for lay in in_lays):
            continue
        if len(a) == 1 and len(b) == 1:
            dims[outs[b[0]]] = in_lays[0]
            continue
        factors, spatial = [], set()
        for (s, _), lay in zip((ins[k] for k in a), in_lays):
            if lay is None:
                f = store.new(s, STAND_IN)
                spatial.add(f)
                factors.append(f)
            elif len(lay) == 1:
                factors.extend(lay[0])
            else:
                z = store.new(sum(store.block_size(bk) for bk in lay), "concatenation inside a product")
                store.define(z, lay, ctx.why(rule))
                factors.append(z)
        for f in spatial:
            store.freeze(single(f), ctx.why(rule, STAND_IN))
        groups = split_factors(ctx, factors, sizes, rule)
        for k, g in zip(b, groups):
            if g is None or all(f in spatial for f in g):
                dims[outs[k]] = None
            else:
                dims[outs[k]] = (tuple(g),)
    return td.with_dims(dims, out_shape)


def split_factors(ctx: RuleContext, factors: list[int], sizes: list[int], rule: str) -> list[Optional[tuple[int, ...]]]:
    """Group a row-major product of axes into consecutive dims of ``sizes``, refining axes."""
    store = ctx.store
    if len(sizes) == 1:
        return [tuple(factors)]
    fs = [f for f in factors if store.size[f] != 1]
    out: list[Optional[tuple[int, ...]]] = []
    for s in sizes:
        g: list[int] = []
        acc = 1
        while acc < s and fs:
            f = fs.pop(0)
            sf = store.size[f]
            if acc * sf <= s and s % (acc * sf) == 0:
                g.append(f)
                acc *= sf
                continue
            # f spans this dim and the next ones: refine it into (s // acc) x rest
            r = store.find(f)
            first = s // acc
            if sf % first != 0:
                break
            d = store.defs.get(r)
            if d is not None and len(d) == 1 and len(d[0]) > 1:
                fs = list(d[0]) + fs
                continue
            common = _common_suffix(store, d) if d is not None and len(d) > 1 else None
            if common is not None and store.block_size(common) > 1:
                # parts that share their inner factors ((h1, D), (h2, D)): the product of the
                # concatenated outer parts and the shared inner factors
                outer = [b[0] for b in store.expand(d)]
                o = store.new(sum(store.size[a] for a in outer), f"outer parts of axis {r}")
                store.define(o, tuple((a,) for a in outer), ctx.why(rule, "common inner factors"))
                fs = [o, *common] + fs
                continue
            if d is not None and acc == 1 and len(d) == first and _equal_single_blocks(store, d):
                # a concatenation of ``first`` equal parts (q, k and v biases concatenated) viewed
                # as (first, rest): the outer dim indexes the parts; its inner axis stands for
                # each part in turn and is resolved to the part when the dim is unbound
                x = store.new(first, f"part index of axis {r}")
                y = store.new(sf // first, f"part of axis {r}")
                store.outer_of[x] = r
                store.concat_parts[x] = (y, tuple(blk[0] for blk in d))
                fs = [y] + fs
                g.append(x)
                acc *= first
                continue
            if d is not None:
                break
            x = store.new(first, f"factor of axis {r}")
            y = store.new(sf // first, f"factor of axis {r}")
            store.define(r, ((x, y),), ctx.why(rule, "split"))
            store.outer_of[x] = r
            fs = [y] + fs
            g.append(x)
            acc *= first
        if acc != s:
            lay = (tuple(factors),)
            ctx.freeze(lay, rule, "reshape does not factor the channel layout")
            return [None] * len(sizes)
        out.append(tuple(g))
    return out


# ---------------------------------------------------------------------------------------------
# sections: unbind / select / split / chunk along channel dims


def sections(ctx: RuleContext, lay: Layout, n: int) -> Optional[list[dict[int, int]]]:
    """Split the outer factor of a refined axis into ``n`` independent sections.

    A fused projection reshaped to ``(3, H, D)`` and unbound gives q, k and v; each gets its own
    copy of the inner axes, so q/k and v can be pruned apart (the ties between them come only
    from how they are used).  Returns one axis substitution per section, or ``None``.
    """
    store = ctx.store
    if len(lay) != 1 or len(lay[0]) != 1:
        return None
    s = store.find(lay[0][0])
    if store.size[s] != n or s in store.defs:
        return None
    if s in store.concat_parts:
        return _concat_sections(ctx, s)
    parent = store.outer_of.get(s)
    if parent is None:
        return None
    p = store.find(parent)
    d = store.defs.get(p)
    key = (p, s)
    if key in ctx.section_cache:
        return ctx.section_cache[key]
    if d is None or len(d) != 1 or store.find(d[0][0]) != s:
        return None
    rest = [store.find(x) for x in store.expand(d)[0][1:]]
    maps: list[dict[int, int]] = []
    why = ctx.why("section")
    for i in range(n):
        m = {}
        for x in rest:
            y = store.new(store.size[x], f"section {i} of axis {x}")
            if store.roles.get(x) or x in store.defs or store.count.get(x, 1) > 1:
                store.union(y, x, why)  # the shared axis is already used elsewhere: keep it tied
            m[x] = y
        maps.append(m)
    for x in rest:
        store.stale[x] = [m[x] for m in maps]
    store.stale[s] = []
    store.defs[p] = tuple(tuple(m[x] for x in rest) for m in maps)
    store.graph.add_edges_from(((p, y) for m in maps for y in m.values()), why=why, kind="refines")
    ctx.section_cache[key] = maps
    return maps


def _common_suffix(store: Any, lay: Layout) -> Optional[tuple[int, ...]]:
    """The inner factors every block of ``lay`` shares after one outer axis, if any."""
    blocks = [tuple(store.find(a) for a in b) for b in store.expand(lay)]
    if len(blocks) < 2 or any(len(b) < 2 for b in blocks):
        return None
    tail = blocks[0][1:]
    return tail if all(b[1:] == tail for b in blocks) else None


def _equal_single_blocks(store: Any, lay: Layout) -> bool:
    return all(len(b) == 1 for b in lay) and len({store.block_size(b) for b in lay}) == 1


def _concat_sections(ctx: RuleContext, s: int) -> list[dict[int, int]]:
    """Sections of a concatenation viewed as (parts, ...): each part gets its own copy of the
    inner axes, tied to the part's own axis."""
    store = ctx.store
    key = (-1, s)
    if key in ctx.section_cache:
        return ctx.section_cache[key]
    y, parts = store.concat_parts[s]
    rest = [store.find(x) for x in store.expand(single(y))[0]]
    why = ctx.why("section")
    maps: list[dict[int, int]] = []
    for part in parts:
        m = {x: store.new(store.size[x], f"section of axis {x}") for x in rest}
        store.tie(single(part), (tuple(m[x] for x in rest),), why)
        maps.append(m)
    for x in rest:
        store.stale[x] = [m[x] for m in maps]
    store.stale[s] = []
    ctx.section_cache[key] = maps
    return maps


def substitute(ctx: RuleContext, td: TensorDims, m: dict[int, int], drop: Optional[int]) -> TensorDims:
    """Dims with axes replaced by their section copies, optionally dropping one dim."""
    f = ctx.store.find
    dims, shape = [], []
    for k, (s, lay) in enumerate(zip(td.shape, td.dims)):
        if k == drop:
            continue
        shape.append(s)
        dims.append(None if lay is None else tuple(tuple(m.get(f(a), a) for a in blk) for blk in lay))
    return td.with_dims(dims, shape)


def _select(ctx: RuleContext, td: TensorDims, dim: int, index: int, n: int) -> TensorDims:
    """Dims after picking one index along ``dim`` (removing it)."""
    lay = td.dims[dim]
    if lay is None:
        return substitute(ctx, td, {}, dim)
    maps = sections(ctx, lay, n)
    if maps is None:
        ctx.freeze(lay, "select", "a single channel is selected")
        return substitute(ctx, td, {}, dim)
    return substitute(ctx, td, maps[index], dim)


@register_rule("unbind", torch.unbind)
def unbind_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Unbind along a dim: one output per index (sections of a fused projection)."""
    td = ctx.dims(node.args[0])
    dim = norm_dim(int(arg(node, 1, "dim", 0)), len(td.shape))
    n = td.shape[dim]
    return tuple(_select(ctx, td, dim, i, n) for i in range(n))


@register_rule("split", torch.split, "chunk", torch.chunk, "tensor_split")
def split_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Split along a dim: channel dims are refined into concatenated parts."""
    td = ctx.dims(node.args[0])
    shapes = ctx.out_shape()
    dim = arg(node, 2, "dim", 0)
    dim = norm_dim(int(dim), len(td.shape))
    sizes = [s[dim] for s in shapes]
    lay = td.dims[dim]
    parts = split_layout(ctx, lay, sizes, "split")
    outs = []
    for s, part in zip(shapes, parts):
        dims = list(td.dims)
        dims[dim] = part
        outs.append(td.with_dims(dims, s))
    return tuple(outs)


def split_layout(ctx: RuleContext, lay: Optional[Layout], sizes: list[int], rule: str) -> list[Any]:
    """Layouts of consecutive parts of ``sizes`` channels of a dim laid out as ``lay``."""
    store = ctx.store
    if lay is None:
        return [None] * len(sizes)
    # a single refined axis whose outer factor has one index per part: sections
    if len(lay) == 1 and len(lay[0]) == 1:
        r = store.find(lay[0][0])
        d = store.defs.get(r)
        if d is None:
            parts = [store.new(s, f"part of axis {r}") for s in sizes]
            store.define(r, tuple((p,) for p in parts), ctx.why(rule))
            return [single(p) for p in parts]
        lay = d
    blocks = list(store.expand(lay)) if len(lay) == 1 and len(lay[0]) > 1 else list(lay)
    if len(blocks) == 1 and len(blocks[0]) > 1 and store.size[blocks[0][0]] == len(sizes) and len(set(sizes)) == 1:
        maps = sections(ctx, (blocks[0][:1],), len(sizes))
        if maps is not None:
            return [(tuple(m[store.find(x)] for x in blocks[0][1:]),) for m in maps]
    if len(blocks) == 1 and len(blocks[0]) > 1 and sum(sizes) == store.block_size(blocks[0]):
        parts = _split_outer(ctx, blocks[0], sizes, rule)
        if parts is not None:
            return parts
    out, cur, acc, k = [], [], 0, 0
    for blk in blocks:
        cur.append(blk)
        acc += store.block_size(blk)
        if k < len(sizes) and acc == sizes[k]:
            out.append(tuple(cur))
            cur, acc, k = [], 0, k + 1
        elif k < len(sizes) and acc > sizes[k]:
            ctx.freeze(lay, rule, "split does not follow the channel layout")
            return [None] * len(sizes)
    if len(out) != len(sizes):
        ctx.freeze(lay, rule, "split does not follow the channel layout")
        return [None] * len(sizes)
    return out


def _split_outer(ctx: RuleContext, blk: tuple[int, ...], sizes: list[int], rule: str) -> Optional[list[Any]]:
    """Split a product ``(o, rest...)`` at multiples of ``rest`` (a head-major dim split between
    whole heads): the outer axis ``o`` is split instead, each part keeping the inner axes."""
    store = ctx.store
    inner = store.block_size(blk[1:])
    if any(sz % inner for sz in sizes):
        return None
    counts = [sz // inner for sz in sizes]
    outer = split_layout(ctx, single(blk[0]), counts, rule)
    if any(p is None for p in outer):
        return None
    return [tuple(b + blk[1:] for b in p) for p in outer]


@register_rule(operator.setitem)
def setitem_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """In-place ``x[idx] = v``: fine on tensors without channels (masks built from sizes);
    channels written in place are frozen."""
    for td in tensor_args(ctx, node):
        for lay in td.dims:
            ctx.freeze(lay, "in-place write", "channels written through an index")
    return None


@register_rule(operator.getitem)
def getitem_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Indexing: tuple elements, basic slicing, selection, and gathers by index tensors."""
    src, idx = node.args[0], node.args[1]
    td = ctx.dims(src)
    if isinstance(td, tuple):
        return td[idx] if isinstance(idx, int) else None
    if not isinstance(td, TensorDims):
        return None
    if not isinstance(idx, tuple):
        idx = (idx,)
    n = len(td.shape)
    n_real = sum(1 for x in idx if x is not None and x is not Ellipsis)
    expanded: list[Any] = []
    for x in idx:
        if x is Ellipsis:
            expanded.extend([slice(None)] * (n - n_real))
        else:
            expanded.append(x)
    dim = 0
    out_shape = ctx.out_shape()
    dims: list[Optional[Layout]] = []
    pending_select: list[tuple[int, int]] = []
    for x in expanded:
        if x is None:
            dims.append(None)
            continue
        lay, size = td.dims[dim], td.shape[dim]
        if isinstance(x, int):
            pending_select.append((dim, x))
        elif isinstance(x, slice):
            start, stop, step = x.indices(size) if all(isinstance(v, (int, type(None))) for v in (x.start, x.stop, x.step)) else (None, None, None)
            if start == 0 and stop == size and step == 1:
                dims.append(lay)
            elif lay is None:
                dims.append(None)
            elif step == 1 and start is not None:
                parts = split_layout(ctx, lay, [s for s in (start, stop - start, size - stop) if s > 0], "slice")
                dims.append(parts[1 if start > 0 else 0])
            else:
                dims.append(_strided(ctx, lay, size, start, stop, step))
        elif isinstance(x, fx.Node) and isinstance(ctx.dims(x), TensorDims):
            ctx.freeze(lay, "gather", "channels indexed by a tensor")
            it = ctx.dims(x)
            dims.extend([None] * len(it.shape))
        else:
            ctx.freeze(lay, "index", "channels indexed by a value the analysis cannot see")
            dims.append(None)
        dim += 1
    dims.extend(td.dims[dim:])
    for d, i in pending_select:
        lay = td.dims[d]
        if lay is not None:
            maps = sections(ctx, lay, td.shape[d])
            if maps is None:
                ctx.freeze(lay, "select", "a single channel is selected")
            else:
                dims = [None if l is None else tuple(tuple(maps[i].get(ctx.store.find(a), a) for a in b) for b in l) for l in dims]
    if out_shape is None or len(out_shape) != len(dims):
        return no_rule(ctx, node)
    dims = [d if s != 1 else None for d, s in zip(dims, out_shape)]
    return TensorDims(tuple(out_shape), tuple(dims), td.live)


def _strided(ctx: RuleContext, lay: Layout, size: int, start: Optional[int], stop: Optional[int], step: Optional[int]) -> Optional[Layout]:
    """``x[..., start::step]`` over channels: the dim is (groups, step) row-major and the slice
    keeps one member of every group (rotary embeddings pair channels 2i and 2i+1), so the output
    is indexed by the group axis; the ``step`` factor itself is frozen."""
    store = ctx.store
    whole = step is not None and step > 1 and size % step == 0 and start is not None and start < step
    if not whole or len(range(start, stop, step)) != size // step or len(lay) != 1 or len(lay[0]) != 1:
        ctx.freeze(lay, "slice", "strided or dynamic slice of channels")
        return None
    r = store.find(lay[0][0])
    d = store.defs.get(r)
    if d is None:
        g, k = store.new(size // step, f"groups of axis {r}"), store.new(step, f"members of axis {r}")
        store.define(r, ((g, k),), ctx.why("slice", f"strided by {step}"))
        store.freeze(single(k), ctx.why("slice", f"position inside groups of {step} channels"))
        return single(g)
    blk = store.expand(d)
    if len(blk) == 1 and store.block_size(blk[0][-1:]) == step:
        return (blk[0][:-1],)
    ctx.freeze(lay, "slice", "strided slice does not follow the channel layout")
    return None


@register_rule(torch.cat, torch.concat, torch.concatenate)
def cat_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Concatenate: the cat dim becomes a concatenation of layouts, other dims are tied."""
    tensors = [ctx.dims(t) for t in arg(node, 0, "tensors")]
    shp = ctx.out_shape()
    dim = norm_dim(int(arg(node, 1, "dim", 0)), len(shp))
    dims: list[Optional[Layout]] = []
    for k in range(len(shp)):
        lays = [t.dims[k] for t in tensors]
        if k == dim:
            if all(lay is None for lay in lays):
                dims.append(None)
                continue
            if any(t.live and lay is None for t, lay in zip(tensors, lays)):
                # an activation's dim without channels (tokens): parameter rows concatenated to
                # it (class, register tokens) are tokens too
                for lay in lays:
                    ctx.freeze(lay, "cat", "concatenated with a dimension without channels (tokens)")
                dims.append(None)
                continue
            blocks: list = []
            for t, lay in zip(tensors, lays):
                if lay is None:
                    # a placeholder axis (even of size 1) keeps the positions of the other parts
                    lay = single(ctx.store.new(t.shape[k], "dimension without channels concatenated with channels"))
                    ctx.freeze(lay, "cat", "concatenated with a dimension without channels")
                blocks.extend(lay)
            dims.append(tuple(blocks))
        else:
            sized = [(t, lay) for t, lay in zip(tensors, lays) if t.shape[k] == shp[k] and shp[k] != 1]
            sub = broadcast(ctx, [TensorDims((t.shape[k],), (lay,), t.live) for t, lay in sized], (shp[k],), "cat") if sized else None
            dims.append(sub.dims[0] if sub else None)
    return TensorDims(shp, tuple(dims), any(t.live for t in tensors))


@register_rule(torch.stack)
def stack_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Stack: a new dim without channels, inputs tied."""
    tensors = [ctx.dims(t) for t in arg(node, 0, "tensors")]
    shp = ctx.out_shape()
    dim = norm_dim(int(arg(node, 1, "dim", 0)), len(shp))
    base = broadcast(ctx, tensors, tensors[0].shape, "stack")
    dims = list(base.dims)
    dims.insert(dim, None)
    return TensorDims(shp, tuple(dims), base.live)


# ---------------------------------------------------------------------------------------------
# reductions


@register_rule("mean", torch.mean, "sum", torch.sum, "amax", torch.amax, "amin", "std", "var", "norm", "logsumexp", "max", "min", torch.max, torch.min)
def reduce_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Reductions remove (or keep as size 1) the reduced dims; channels reduced over are fine."""
    td = ctx.dims(node.args[0])
    shp = ctx.out_shape()
    if shp is None:
        return None
    if shp and isinstance(shp[0], tuple):  # (values, indices)
        shp0 = shp[0]
        red = _reduced(td, shp0, node)
        return (red, red)
    return _reduced(td, shp, node)


def _reduced(td: TensorDims, shp: tuple, node: fx.Node) -> TensorDims:
    dim = arg(node, 1, "dim", None)
    n = len(td.shape)
    if dim is None or not isinstance(dim, (int, list, tuple)):
        red = set(range(n)) if len(shp) < n or dim is None else set()
    else:
        red = {norm_dim(int(d), n) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}
    keep = len(shp) == n
    dims = [None if k in red else td.dims[k] for k in range(n)] if keep else [td.dims[k] for k in range(n) if k not in red]
    if len(dims) != len(shp):
        dims = [None] * len(shp)
    return TensorDims(tuple(shp), tuple(dims), td.live)


# ---------------------------------------------------------------------------------------------
# non-tensor plumbing


@register_rule(builtins.getattr, "size", "dim", "numel", builtins.len, math.sqrt, int, float)
def scalar_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Shape queries and scalar arithmetic carry no channels."""
    if node.target is builtins.getattr and node.args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
        td = ctx.dims(node.args[0])
        if isinstance(td, TensorDims) and node.args[1] == "T":
            return td.with_dims(td.dims[::-1], td.shape[::-1])
        if isinstance(td, TensorDims) and node.args[1] in ("mT", "mH") and len(td.shape) >= 2:
            perm = list(range(len(td.shape) - 2)) + [len(td.shape) - 1, len(td.shape) - 2]
            return td.with_dims([td.dims[i] for i in perm], [td.shape[i] for i in perm])
        return no_rule(ctx, node)
    return None
