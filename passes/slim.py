"""Slim rewrite pass: slice parameters and rewrite every shape constant a plan changes.

The pass copies the analysed GraphModule, slices each parameter along the dims whose channels the
plan removes, updates leaf modules (``in_features``, ``normalized_shape``, ...) and rewrites the
arguments of shape-carrying ops (``reshape(B, N, C)``, split sizes, slices, layer-norm shapes).
When the head dimension of ``q``/``k`` shrinks, attention keeps the original scale.
"""
from __future__ import annotations

import copy
import copyreg
import math
import operator
from collections import OrderedDict
from typing import Any, Callable, Optional, Union

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.context import META_KEY, TensorDims, _get_tensor
from vitgraph.errors import PlanError
from vitgraph.rules import STAND_IN, lookup
from vitgraph.selection import RaggedSectionsError, Selection

Rewrite = Callable[["RewriteContext", fx.Node], None]
REWRITES: dict[Union[Callable, str, type], Rewrite] = {}


def register_rewrite(*targets: Union[Callable, str, type]) -> Callable[[Rewrite], Rewrite]:
    """Decorator: rewrite nodes of these targets (functions, method names, module types)."""

    def deco(fn: Rewrite) -> Rewrite:
        for t in targets:
            REWRITES[t] = fn
        return fn

    return deco


class RewriteContext:
    """What a rewrite sees: old dims of each node, the plan's selection, the new module."""

    def __init__(self, sel: Selection, root: nn.Module) -> None:
        self.sel = sel
        self.root = root

    def dims(self, a: Any) -> Any:
        """Original dims recorded on a node by the analysis."""
        return a.meta.get(META_KEY) if isinstance(a, fx.Node) else None

    def new_shape(self, td: TensorDims) -> tuple[int, ...]:
        """Shape of a value after the plan."""
        return tuple(self.sel.size(lay, s) for lay, s in zip(td.dims, td.shape))


def slim(analysis: Any, sel: Selection) -> fx.GraphModule:
    """A new GraphModule with the plan applied; the analysed model is not touched."""
    gm = analysis.graph_module
    memo: dict[int, Any] = {}
    for name, td in analysis.params.items():
        t = _get_tensor(gm, name)
        new = _slice(t, [sel.kept(lay) if lay is not None else None for lay in td.dims])
        if new is not None:
            memo[id(t)] = new
    root = _copy_state(gm, memo)
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    rc = RewriteContext(sel, root)
    split_ragged_sections(rc, graph, analysis.store)
    for node in list(graph.nodes):
        fn = lookup(REWRITES, root, node)
        if fn is None or META_KEY not in node.meta or not _inputs_analysed(node) or node.meta.get(_SPLIT_DONE):
            continue
        try:
            fn(rc, node)
        except RaggedSectionsError as e:
            raise PlanError(f"cannot rewrite {node.format_node()}: {e}") from e
    graph.lint()
    new = fx.GraphModule(root, graph, gm.__class__.__name__)
    new.train(gm.training)
    return new


def _inputs_analysed(node: fx.Node) -> bool:
    """Every tensor input has recorded dims (inputs the analysis could not see were frozen)."""
    return all(isinstance(a.meta.get(META_KEY), (TensorDims, tuple)) for a in node.all_input_nodes
               if a.meta.get("tensor_meta") is not None)


def _copy_state(gm: fx.GraphModule, memo: dict[int, Any]) -> nn.Module:
    """A module holding deep copies of ``gm``'s submodules and tensors (no graph, no code)."""
    root = nn.Module()
    for name, mod in gm.named_children():
        setattr(root, name, _deepcopy(mod, memo))
    for name, p in gm._parameters.items():
        root.register_parameter(name, copy.deepcopy(p, memo))
    for name, b in gm._buffers.items():
        root.register_buffer(name, copy.deepcopy(b, memo))
    return root


_ATOMIC = frozenset({type(None), int, float, bool, complex, bytes, str, type, range, type(Ellipsis)})
_MISSING = object()


def _deepcopy(x: Any, memo: dict[int, Any]) -> Any:
    """``copy.deepcopy(x, memo)``, the same objects made the same way, without the generic
    reduce protocol for what a module tree is made of: modules that keep ``nn.Module``'s own
    pickling, and their dicts, lists, sets and tuples.  Anything else goes to ``copy.deepcopy``
    (tensors, whose copies ``memo`` may already hold).  A deep model has thousands of modules,
    each with a dozen hook dicts, and ``copy.deepcopy`` spends most of compress on them."""
    i = id(x)
    y = memo.get(i, _MISSING)
    if y is not _MISSING:
        return y
    cls = type(x)
    if cls in _ATOMIC:
        return x
    if cls is tuple:
        items = [_deepcopy(a, memo) for a in x]
        if i in memo:  # (made while copying its items, as copy.deepcopy checks)
            return memo[i]
        if all(a is b for a, b in zip(x, items)):
            return x
        y = tuple(items)
    elif cls is list:
        y = []
        memo[i] = y
        y.extend(_deepcopy(a, memo) for a in x)
    elif cls is dict or (cls is OrderedDict and not vars(x)):
        y = cls()
        memo[i] = y
        for k, v in x.items():
            y[_deepcopy(k, memo)] = _deepcopy(v, memo)
    elif cls is set and all(type(a) in _ATOMIC for a in x):
        y = set(x)
    elif isinstance(x, nn.Module) and _plain_module(cls):
        y = cls.__new__(cls)
        memo[i] = y
        state = x.__getstate__()
        y.__setstate__({k: _deepcopy(v, memo) for k, v in state.items()})
    else:
        return copy.deepcopy(x, memo)
    memo[i] = y
    memo.setdefault(id(memo), []).append(x)  # (copy.deepcopy keeps the originals alive the same way)
    return y


_plain_classes: dict[type, bool] = {}


def _plain_module(cls: type) -> bool:
    """``cls`` is copied by ``copy.deepcopy`` as ``nn.Module`` is: new object, deep-copied
    ``__getstate__``, ``__setstate__``."""
    hit = _plain_classes.get(cls)
    if hit is None:
        hit = _plain_classes[cls] = (
            getattr(cls, "__deepcopy__", None) is None and cls.__reduce_ex__ is object.__reduce_ex__
            and cls.__reduce__ is object.__reduce__ and cls.__getstate__ is nn.Module.__getstate__
            and cls.__setstate__ is nn.Module.__setstate__ and cls not in copyreg.dispatch_table
            and cls not in copy._deepcopy_dispatch and cls.__new__ is object.__new__
            and "__slots__" not in vars(cls))
    return hit


def _slice(t: torch.Tensor, kept: list[Optional[np.ndarray]]) -> Optional[torch.Tensor]:
    cuts = [(d, idx) for d, idx in enumerate(kept) if idx is not None and len(idx) != t.shape[d]]
    if not cuts:
        return None
    out = _take(t.detach(), cuts)
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def _take(t: torch.Tensor, cuts: list[tuple[int, np.ndarray]]) -> torch.Tensor:
    """A contiguous copy of ``t`` keeping positions ``idx`` of each dim ``d`` in ``cuts``.

    CPU tensors are gathered by numpy into a tensor torch allocated: the same values as
    ``index_select``, but one thread and no intra-op thread pool, whose barriers make each copy
    of a large weight several times slower when the cores are busy.
    """
    a = None
    if t.device.type == "cpu" and t.layout == torch.strided and not (t.is_conj() or t.is_neg()):
        try:
            a = t.numpy()
        except (TypeError, RuntimeError):  # (dtypes numpy lacks: bfloat16, float8, ...)
            a = None
    if a is None:
        out = t
        for d, idx in cuts:
            out = out.index_select(d, torch.as_tensor(idx, dtype=torch.long, device=t.device))
        return out.contiguous()
    for d, idx in cuts[:-1]:
        a = np.take(a, idx, axis=d)
    d, idx = cuts[-1]
    shape = list(a.shape)
    shape[d] = len(idx)
    out = torch.empty(shape, dtype=t.dtype, device="cpu")
    np.take(a, idx, axis=d, out=out.numpy())
    return out


# ---------------------------------------------------------------------------------------------
# shape constants


def _replace_sizes(args: list, old: tuple, new: tuple, dims: Optional[tuple] = None) -> list:
    """Shape arguments with every changed channel dim set to its new size (-1 stays -1).

    A channel dim given as a value read from another tensor's shape (``C`` of ``x.shape``) is
    replaced by a constant too: that other tensor may have been pruned differently.
    """
    dims = dims if dims is not None else (None,) * len(args)
    out = []
    for a, o, n, lay in zip(args, old, new, dims):
        if isinstance(a, int) and a == -1:
            out.append(a)
        elif o != n or (lay is not None and isinstance(a, fx.Node)) or _read_from_channels(a):
            out.append(n)
        else:
            out.append(a)
    return out


def _stand_in_extent(store: Any, lay: Any) -> Optional[int]:
    """Product of the sizes of the non-channel dims (batch, tokens) merged into a channel dim,
    e.g. the ``B`` of a ``B * heads`` dim; None when there are none."""
    if lay is None:
        return None
    ext = None
    for blk in store.expand(lay):
        for f in blk:
            if store.origin[f] == STAND_IN or store.origin[store.find(f)] == STAND_IN:  # set by reshape_dims
                ext = (ext or 1) * store.size[f]
    return ext


def _scaled_sizes(rc: "RewriteContext", graph: fx.Graph, node: Optional[fx.Node], args: list, old: tuple,
                  new: tuple, dims: tuple) -> list:
    """``_replace_sizes``, keeping sizes computed at run time where that stays right.

    * a size read from a dim with the very same channels is already the new size at run time;
    * a size computed only from non-channel sizes and constants (``B * num_heads``, where the
      batch is merged with the heads) is rescaled at run time, ``a // c_old * c_new``, so the
      batch stays dynamic (a constant would fix it to the example's batch).
    New nodes go before ``node``.
    """
    out = _replace_sizes(args, old, new, dims)
    store = rc.sel.store
    for k, (a, o, n, lay) in enumerate(zip(args, old, new, dims)):
        if not isinstance(a, fx.Node) or lay is None:
            continue
        src = _source_layout(a)
        if src is not None and _same_layout(store, src, lay):
            out[k] = a
            continue
        if not _structural(a):
            continue
        ext = _stand_in_extent(store, lay) or 1
        c_old, c_new = o // ext, n // ext
        if c_old == c_new:
            out[k] = a
            continue
        with graph.inserting_before(node):
            q = graph.call_function(operator.floordiv, (a, c_old)) if c_old != 1 else a
            out[k] = graph.call_function(operator.mul, (q, c_new)) if c_new != 1 else q
    return out


_SIZE_ARITH = (operator.mul, operator.floordiv, operator.add, operator.sub)


def _structural(a: Any) -> bool:
    """``a`` is computed only from constants and sizes of dims without channels."""
    if isinstance(a, int):
        return True
    if not isinstance(a, fx.Node):
        return False
    if _shape_read(a) is not None:
        return _source_layout(a) is None
    if a.op == "call_function" and a.target in _SIZE_ARITH:
        return all(_structural(x) for x in a.args) and not a.kwargs
    return False


def _shape_read(a: Any) -> Optional[tuple[fx.Node, Any]]:
    """``(x, i)`` when ``a`` is ``x.shape[i]`` or ``x.size(i)``, else None."""
    if not isinstance(a, fx.Node):
        return None
    if a.op == "call_method" and a.target == "size" and len(a.args) == 2:
        return a.args[0], a.args[1]
    if a.op == "call_function" and a.target is operator.getitem and isinstance(a.args[0], fx.Node):
        s = a.args[0]
        if (s.op == "call_function" and s.target is getattr and s.args[1] == "shape") or (
                s.op == "call_method" and s.target == "size" and len(s.args) == 1):
            return s.args[0], a.args[1]
    return None


def _same_layout(store: Any, a: Any, b: Any) -> bool:
    """Two layouts hold the same channels in the same order (compared by axis class)."""
    def roots(lay: Any) -> tuple:
        return tuple(tuple(store.find(x) for x in blk) for blk in store.expand(lay))
    return roots(a) == roots(b)


def _read_from_channels(a: Any) -> bool:
    """``a`` is ``x.shape[i]`` / ``x.size(i)`` where dim ``i`` of ``x`` carries channels (which a
    plan may shrink even though the dim ``a`` sizes here keeps all of its channels)."""
    return _source_layout(a) is not None


def _source_layout(a: Any) -> Any:
    """The channel layout of the dim ``a`` reads when it is ``x.shape[i]`` / ``x.size(i)``."""
    read = _shape_read(a)
    if read is None or not isinstance(read[0], fx.Node) or not isinstance(read[1], int):
        return None
    td, dim = read[0].meta.get(META_KEY), read[1]
    if isinstance(td, TensorDims) and -len(td.dims) <= dim < len(td.dims):
        return td.dims[dim]
    return None


@register_rewrite("reshape", "view", torch.reshape, "expand")
def rewrite_reshape(rc: RewriteContext, node: fx.Node) -> None:
    """reshape/view/expand: the target shape follows the new channel counts."""
    td = rc.dims(node)
    new = rc.new_shape(td)
    if node.op == "call_method":
        rest = list(node.args[1:])
        packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
        shape = list(rest[0]) if packed else rest
        if len(shape) != len(new):
            return
        shape = _scaled_sizes(rc, node.graph, node, shape, td.shape, new, td.dims)
        node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)
    else:
        key = 1 if len(node.args) > 1 else None
        shape = list(node.args[1] if key else node.kwargs["shape"])
        if len(shape) != len(new):
            return
        shape = _scaled_sizes(rc, node.graph, node, shape, td.shape, new, td.dims)
        if key:
            node.args = (node.args[0], tuple(shape))
        else:
            node.kwargs = {**node.kwargs, "shape": tuple(shape)}


@register_rewrite("unflatten", torch.unflatten)
def rewrite_unflatten(rc: RewriteContext, node: fx.Node) -> None:
    """unflatten(dim, sizes): sizes follow the new channel counts."""
    td = rc.dims(node)
    new = rc.new_shape(td)
    if new == td.shape:
        return
    dim, sizes = node.args[1], list(node.args[2])
    dim = dim + len(rc.dims(node.args[0]).shape) if dim < 0 else dim
    sizes = _replace_sizes(sizes, td.shape[dim:dim + len(sizes)], new[dim:dim + len(sizes)])
    node.args = (node.args[0], dim, tuple(sizes))


@register_rewrite(F.layer_norm, F.rms_norm)
def rewrite_layer_norm(rc: RewriteContext, node: fx.Node) -> None:
    """normalized_shape follows the new width."""
    x = rc.dims(node.args[0])
    shape = node.args[1] if len(node.args) > 1 else node.kwargs["normalized_shape"]
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    new = list(rc.new_shape(x)[-k:])
    if len(node.args) > 1:
        node.args = (node.args[0], new, *node.args[2:])
    else:
        node.kwargs = {**node.kwargs, "normalized_shape": new}


@register_rewrite(F.scaled_dot_product_attention)
def rewrite_sdpa(rc: RewriteContext, node: fx.Node) -> None:
    """Keep the original attention scale when the q/k head dim shrinks."""
    q = rc.dims(node.args[0] if node.args else node.kwargs["query"])
    old, new = q.shape[-1], rc.new_shape(q)[-1]
    if old != new and node.kwargs.get("scale") is None and len(node.args) < 7:
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(old)}


@register_rewrite("split", torch.split, "chunk", torch.chunk)
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


@register_rewrite(operator.getitem)
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
        if isinstance(it, slice) and lay is not None and all(isinstance(v, (int, type(None))) for v in (it.start, it.stop, it.step)):
            kept = rc.sel.kept(lay)
            if len(kept) != x.shape[dim]:
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


# ---------------------------------------------------------------------------------------------
# leaf modules


@register_rewrite(nn.Linear)
def rewrite_linear(rc: RewriteContext, node: fx.Node) -> None:
    """Linear sizes follow its (sliced) weight."""
    m = rc.root.get_submodule(node.target)
    m.out_features, m.in_features = m.weight.shape


@register_rewrite(nn.LayerNorm, nn.RMSNorm)
def rewrite_norm_module(rc: RewriteContext, node: fx.Node) -> None:
    """normalized_shape follows the new width."""
    m = rc.root.get_submodule(node.target)
    k = len(m.normalized_shape)
    m.normalized_shape = tuple(rc.new_shape(rc.dims(node.args[0]))[-k:])


@register_rewrite(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def rewrite_conv(rc: RewriteContext, node: fx.Node) -> None:
    """Conv channel counts (and depthwise groups) follow the weight."""
    m = rc.root.get_submodule(node.target)
    cin = rc.new_shape(rc.dims(node.args[0]))[1]
    if m.groups > 1:  # whole groups are removed: the (sliced) weight holds in-channels per group
        m.groups = cin // m.weight.shape[1]
    m.in_channels, m.out_channels = cin, m.weight.shape[0]


@register_rewrite(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def rewrite_batch_norm(rc: RewriteContext, node: fx.Node) -> None:
    """num_features follows the new width."""
    m = rc.root.get_submodule(node.target)
    m.num_features = rc.new_shape(rc.dims(node.args[0]))[1]


@register_rewrite(nn.GroupNorm)
def rewrite_group_norm(rc: RewriteContext, node: fx.Node) -> None:
    """num_channels (and per-channel groups) follow the new width."""
    m = rc.root.get_submodule(node.target)
    c = rc.new_shape(rc.dims(node.args[0]))[1]
    if m.num_groups == m.num_channels:
        m.num_groups = c
    m.num_channels = c


@register_rewrite(F.group_norm)
def rewrite_group_norm_function(rc: RewriteContext, node: fx.Node) -> None:
    """A per-channel num_groups follows the new width."""
    td = rc.dims(node.args[0])
    c_old, c_new = td.shape[1], rc.new_shape(td)[1]
    if len(node.args) > 1 and node.args[1] == c_old:
        node.args = (node.args[0], c_new, *node.args[2:])
    elif node.kwargs.get("num_groups") == c_old:
        node.kwargs = {**node.kwargs, "num_groups": c_new}


# ---------------------------------------------------------------------------------------------
# fused projections whose sections end at different sizes


_VIEW_CHAIN = ("permute", "transpose", "contiguous", torch.permute, torch.transpose)


def split_ragged_sections(rc: RewriteContext, graph: fx.Graph, store: Any) -> None:
    """Rewrite ``reshape -> permute* -> unbind`` of a fused projection whose sections differ.

    ``qkv.reshape(B, N, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)`` cannot hold q/k and v of
    different head dims, so the projection output is narrowed into its sections and each is
    reshaped and permuted on its own, with the section dim removed.
    """
    for node in list(graph.nodes):
        if node.target not in _RESHAPES or META_KEY not in node.meta or getattr(node, "_erased", False):
            continue  # (a reshape in the view chain of a split one is gone already)
        td = rc.dims(node)
        try:
            rc.new_shape(td)
            continue
        except RaggedSectionsError:
            pass
        _split_one(rc, graph, store, node, td)


def _split_one(rc: RewriteContext, graph: fx.Graph, store: Any, node: fx.Node, td: TensorDims) -> None:
    spos = [k for k, lay in enumerate(td.dims) if _is_section_dim(store, lay)]
    src = node.args[0]
    x = rc.dims(src)
    cdim = [k for k, lay in enumerate(x.dims) if lay is not None]
    if len(spos) != 1 or len(cdim) != 1:
        raise PlanError(f"cannot split the sections of {node.format_node()}")
    s, c = spos[0], cdim[0]
    parent = x.dims[c]
    blocks = store.expand(parent)
    chain = []
    cur = node
    while len(cur.users) == 1 and next(iter(cur.users)).target in _VIEW_CHAIN + _RESHAPES:
        cur = next(iter(cur.users))
        chain.append(cur)
    terminal_users = list(cur.users)
    outs: list[fx.Node] = []
    offset = 0
    shape_args = _shape_args(node)
    subs = _section_subs(store, [td] + [rc.dims(op) for op in chain if op.target in _RESHAPES], len(blocks), node)
    for i, blk in enumerate(blocks):
        n_i = rc.sel.size(((blk),), 0)
        sub = subs[i]
        with graph.inserting_before(terminal_users[0] if terminal_users else None):
            part = graph.call_function(torch.narrow, (src, c, offset, n_i))
            cur_i = _section_reshape(rc, graph, part, shape_args, td, s, sub, terminal_users[0] if terminal_users else None)
            p = s
            for op in chain:
                if op.target in _RESHAPES:
                    p = _section_pos(store, rc.dims(op))
                    cur_i = _section_reshape(rc, graph, cur_i, _shape_args(op), rc.dims(op), p, sub,
                                             terminal_users[0] if terminal_users else None)
                else:
                    cur_i, p = _replay(graph, op, cur_i, p)
            outs.append((cur_i, p))
        offset += n_i
    positions = {p for _, p in outs}
    for u in terminal_users:
        if u.target in ("unbind", torch.unbind):
            dim = u.args[1] if len(u.args) > 1 else u.kwargs.get("dim", 0)
            if positions != {dim % (len(td.shape))}:
                raise PlanError(f"cannot split the sections of {node.format_node()}: unbind over another dim")
            for g in list(u.users):
                _take_meta(outs[g.args[1]][0], g)
                g.replace_all_uses_with(outs[g.args[1]][0])
                graph.erase_node(g)
            graph.erase_node(u)
        elif u.target is operator.getitem and isinstance(u.args[1], int) and positions == {0}:
            _take_meta(outs[u.args[1]][0], u)
            u.replace_all_uses_with(outs[u.args[1]][0])
            graph.erase_node(u)
        else:
            raise PlanError(f"cannot split the sections of {node.format_node()}: used by {u.format_node()}")
    for op in reversed(chain):
        graph.erase_node(op)
    graph.erase_node(node)


_RESHAPES = ("reshape", "view", torch.reshape)
_SPLIT_DONE = "vitgraph.split_section"


def _section_subs(store: Any, tds: list[TensorDims], n: int, node: fx.Node) -> list[dict[int, int]]:
    """Per section, the copy of each axis of ``tds`` the section owns (``AxisStore.stale``).

    Only the axes these reshapes use count: other fused projections of the model may have a
    different number of sections (a fused k/v next to a fused q/k/v).
    """
    f = store.find
    used = {f(a) for td in tds for lay in td.dims if lay is not None for blk in lay for a in blk}
    subs: list[dict[int, int]] = [{} for _ in range(n)]
    for a in used:
        copies = store.stale.get(a)
        if not copies:
            continue
        if len(copies) != n:
            raise PlanError(f"cannot split the sections of {node.format_node()}: "
                            f"axis {a} has {len(copies)} section copies, the projection {n} sections")
        for i, c in enumerate(copies):
            subs[i][a] = c
    return subs


def _is_section_dim(store: Any, lay: Any) -> bool:
    """``lay`` is the section index of a fused projection (q/k/v), one axis whose sections differ."""
    if lay is None or len(lay) != 1 or len(lay[0]) != 1:
        return False
    r = store.find(lay[0][0])
    return r in store.stale and not store.stale[r]


def _section_pos(store: Any, td: TensorDims) -> int:
    pos = [k for k, lay in enumerate(td.dims) if _is_section_dim(store, lay)]
    if len(pos) != 1:
        raise PlanError("cannot split sections through a reshape that merges the section dim")
    return pos[0]


def _shape_args(node: fx.Node) -> list:
    """The target shape of a reshape/view node, as a list."""
    args = list(node.args[1:]) if node.op == "call_method" else list(node.args[1])
    if len(args) == 1 and isinstance(args[0], (list, tuple)):
        args = list(args[0])
    return args


def _section_reshape(rc: "RewriteContext", graph: fx.Graph, x: fx.Node, shape_args: list, td: TensorDims,
                     s: int, sub: dict, where: Optional[fx.Node]) -> fx.Node:
    """Reshape one section ``x`` like the fused reshape with dims ``td``, section dim ``s`` dropped."""
    f = rc.sel.store.find
    dims = tuple(tuple(tuple(sub.get(f(a), a) for a in b) for b in lay) if lay is not None else None for lay in td.dims)
    new = tuple(rc.sel.size(lay, old) for lay, old in zip(dims, td.shape))
    args = _scaled_sizes(rc, graph, where, shape_args, td.shape, new, dims)
    del args[s]
    return graph.call_method("reshape", (x, *args))


def _take_meta(new: fx.Node, old: fx.Node) -> None:
    """A section's new node stands for the old one: later rewrites read its original dims (the
    node itself is already rewritten)."""
    for key in (META_KEY, "tensor_meta"):
        if key in old.meta:
            new.meta[key] = old.meta[key]
    new.meta[_SPLIT_DONE] = True


def _replay(graph: fx.Graph, op: fx.Node, x: fx.Node, s: int) -> tuple[fx.Node, int]:
    """Apply a view op to one section (the section dim ``s`` removed); new section position."""
    if op.target == "contiguous":
        return graph.call_method("contiguous", (x,)), s
    if op.target in ("permute", torch.permute):
        order = list(op.args[1:]) if op.target == "permute" else list(op.args[1])
        if len(order) == 1 and isinstance(order[0], (list, tuple)):
            order = list(order[0])
        n = len(order)
        order = [o % n for o in order]
        new_pos = order.index(s)
        rest = [o - (o > s) for o in order if o != s]
        return graph.call_method("permute", (x, *rest)), new_pos
    a, b = (d for d in op.args[1:3])
    n = 1 + max(abs(a), abs(b)) + 8
    if s in (a, b):
        raise PlanError(f"cannot split sections through {op.format_node()}")
    return graph.call_method("transpose", (x, a - (a > s), b - (b > s))), s
