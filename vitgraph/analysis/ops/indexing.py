"""Ops that take parts of dims or join them: unbind, split / chunk, getitem / setitem, cat, stack."""
from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.analysis.axes import Layout, single
from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, broadcast, no_rule, norm_dim, tensor_args
from vitgraph.analysis.ops.rewriting import RewriteContext
from vitgraph.analysis.ops.registry import ELTWISE, FREE
from vitgraph.capture.tracer import VALUE_KEY


def _static_slice(x: slice) -> Optional[slice]:
    """``x`` with bounds the trace computed from sizes (``numel() // 3``) replaced by the values
    they had; ``None`` when a bound is unknown."""
    vals = []
    for v in (x.start, x.stop, x.step):
        if isinstance(v, fx.Node):
            v = v.meta.get(VALUE_KEY)
        if not isinstance(v, (int, type(None))) or isinstance(v, bool):
            return None
        vals.append(v)
    return slice(*vals)


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
    for i in range(n):
        m = {}
        for x in rest:
            y = ctx.new_axis(store.size[x], f"section {i} of axis {x}")
            if store.roles.get(x) or x in store.defs or store.count.get(x, 1) > 1:
                ctx.union(y, x, "section")  # the shared axis is already used elsewhere: keep it tied
            m[x] = y
        maps.append(m)
    ctx.into_sections(p, s, rest, maps)
    ctx.section_cache[key] = maps
    return maps


def _concat_sections(ctx: RuleContext, s: int) -> list[dict[int, int]]:
    """Sections of a concatenation viewed as (parts, ...): each part gets its own copy of the
    inner axes, tied to the part's own axis."""
    store = ctx.store
    key = (-1, s)
    if key in ctx.section_cache:
        return ctx.section_cache[key]
    y, parts = store.concat_parts[s]
    rest = [store.find(x) for x in store.expand(single(y))[0]]
    maps: list[dict[int, int]] = []
    for part in parts:
        m = {x: ctx.new_axis(store.size[x], f"section of axis {x}") for x in rest}
        ctx.tie(single(part), (tuple(m[x] for x in rest),), "section")
        maps.append(m)
    ctx.mark_stale(s, rest, maps)
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


def unbind_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Unbind along a dim: one output per index (sections of a fused projection)."""
    td = ctx.dims(node.args[0])
    dim = norm_dim(int(arg(node, 1, "dim", 0)), len(td.shape))
    n = td.shape[dim]
    return tuple(_select(ctx, td, dim, i, n) for i in range(n))


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
            parts = [ctx.new_axis(s, f"part of axis {r}") for s in sizes]
            ctx.define(r, tuple((p,) for p in parts), rule)
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


def setitem_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """In-place ``x[idx] = v``: fine on tensors without channels (masks built from sizes);
    channels written in place are frozen."""
    for td in tensor_args(ctx, node):
        for lay in td.dims:
            ctx.freeze(lay, "in-place write", "channels written through an index")
    return None


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
            # bounds computed from sizes are read at their traced values where channels are sliced
            # (channel counts are static; slimming writes the new bounds as constants)
            sx = _static_slice(x) if lay is not None else x
            start, stop, step = (sx.indices(size) if sx is not None
                                 and all(isinstance(v, (int, type(None))) for v in (sx.start, sx.stop, sx.step))
                                 else (None, None, None))
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
                dims = [None if lay is None else tuple(tuple(maps[i].get(ctx.store.find(a), a) for a in b) for b in lay)
                        for lay in dims]
    if out_shape is None or len(out_shape) != len(dims):
        return no_rule(ctx, node)
    dims = [d if s != 1 else None for d, s in zip(dims, out_shape)]
    return TensorDims(tuple(out_shape), tuple(dims), td.live)


def _strided(ctx: RuleContext, lay: Layout, size: int, start: Optional[int], stop: Optional[int],
             step: Optional[int]) -> Optional[Layout]:
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
        g, k = ctx.new_axis(size // step, f"groups of axis {r}"), ctx.new_axis(step, f"members of axis {r}")
        ctx.define(r, ((g, k),), "slice", f"strided by {step}")
        ctx.freeze(single(k), "slice", f"position inside groups of {step} channels")
        return single(g)
    blk = store.expand(d)
    if len(blk) == 1 and store.block_size(blk[0][-1:]) == step:
        return (blk[0][:-1],)
    ctx.freeze(lay, "slice", "strided slice does not follow the channel layout")
    return None


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
                    lay = single(ctx.new_axis(t.shape[k], "dimension without channels concatenated with channels"))
                    ctx.freeze(lay, "cat", "concatenated with a dimension without channels")
                blocks.extend(lay)
            dims.append(tuple(blocks))
        else:
            sized = [(t, lay) for t, lay in zip(tensors, lays) if t.shape[k] == shp[k] and shp[k] != 1]
            sub = (broadcast(ctx, [TensorDims((t.shape[k],), (lay,), t.live) for t, lay in sized], (shp[k],), "cat")
                   if sized else None)
            dims.append(sub.dims[0] if sub else None)
    return TensorDims(shp, tuple(dims), any(t.live for t in tensors))


def stack_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Stack: a new dim without channels, inputs tied."""
    tensors = [ctx.dims(t) for t in arg(node, 0, "tensors")]
    shp = ctx.out_shape()
    dim = norm_dim(int(arg(node, 1, "dim", 0)), len(shp))
    base = broadcast(ctx, tensors, tensors[0].shape, "stack")
    dims = list(base.dims)
    dims.insert(dim, None)
    return TensorDims(shp, tuple(dims), base.live)


def rewrite_split(rc: RewriteContext, node: fx.Node) -> None:
    """split/chunk along a pruned dim become a split with the new part sizes."""
    parts = rc.dims(node)
    x = rc.dims(node.args[0])
    dim = node.args[2] if len(node.args) > 2 else node.kwargs.get("dim", 0)
    dim = dim + len(x.shape) if dim < 0 else dim
    sizes = [rc.new_shape(p)[dim] for p in parts]
    if sizes == [p.shape[dim] for p in parts]:
        return
    node.op, node.target = "call_function", torch.split
    node.args, node.kwargs = (node.args[0], sizes, dim), {}


def rewrite_getitem(rc: RewriteContext, node: fx.Node) -> None:
    """Slices of a pruned channel dim get new bounds."""
    x = rc.dims(node.args[0])
    idx = node.args[1]
    if not isinstance(x, TensorDims):
        return
    items = list(idx) if isinstance(idx, tuple) else [idx]
    n_real = sum(1 for i in items if i is not None and i is not Ellipsis)
    dim, changed, out = 0, False, []
    for it in items:
        if it is Ellipsis:
            out.append(it)
            dim += len(x.shape) - n_real
            continue
        if it is None:
            out.append(it)
            continue
        lay = x.dims[dim]
        if isinstance(it, slice) and lay is not None and _static_slice(it) is not None:
            kept = rc.sel.kept(lay)
            if len(kept) != x.shape[dim]:
                it = _static_slice(it)  # bounds from sizes become constants of the new widths
                start, stop, step = it.indices(x.shape[dim])
                if step == 1:  # an open end stays open: the dim may also hold the (dynamic) batch
                    it = slice(int(np.searchsorted(kept, start)) if start > 0 else it.start,
                               int(np.searchsorted(kept, stop)) if stop < x.shape[dim] else None, it.step)
                else:  # one member of every group of ``step`` channels; groups are kept whole
                    it = slice(start, None, step)
                changed = True
        out.append(it)
        dim += 1
    if changed:
        node.args = (node.args[0], tuple(out) if isinstance(idx, tuple) else out[0])


def embedding_dims(ctx: RuleContext, ids: Any, weight: TensorDims) -> Any:
    """A lookup ``weight[ids]``: the index dims carry no channels; the last dim is the table's rows' width."""
    shp = ctx.out_shape()
    if not isinstance(weight, TensorDims) or len(weight.dims) != 2 or shp is None or not shp:
        return None
    live = isinstance(ids, TensorDims) and ids.live
    return TensorDims(tuple(shp), (None,) * (len(shp) - 1) + (weight.dims[1],), live=live)


def embedding_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.Embedding (position or token tables looked up by integer ids)."""
    return embedding_dims(ctx, ctx.dims(node.args[0]), ctx.param(f"{node.target}.weight"))


def embedding_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.embedding(ids, weight, ...)."""
    return embedding_dims(ctx, ctx.dims(node.args[0]), ctx.dims(arg(node, 1, "weight")))


def rewrite_embedding(rc: RewriteContext, node: fx.Node) -> None:
    """The table's width follows its (sliced) weight."""
    m = rc.root.get_submodule(node.target)
    m.num_embeddings, m.embedding_dim = m.weight.shape


# ---------------------------------------------------------------------------------------------
# declarations

declare("unbind", torch.unbind, rule=unbind_rule, cost=FREE)
declare("split", torch.split, "chunk", torch.chunk, rule=split_rule, rewrite=rewrite_split, cost=FREE)
declare("tensor_split", rule=split_rule, cost=FREE)
declare(operator.setitem, rule=setitem_rule, cost=ELTWISE)
declare(operator.getitem, rule=getitem_rule, rewrite=rewrite_getitem, cost=FREE)
declare(torch.cat, torch.concat, torch.concatenate, rule=cat_rule, cost=ELTWISE)
declare(torch.stack, rule=stack_rule, cost=ELTWISE)
declare(nn.Embedding, rule=embedding_module, rewrite=rewrite_embedding, cost=ELTWISE)
declare(F.embedding, rule=embedding_function, cost=ELTWISE)
