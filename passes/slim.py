"""Slim rewrite pass: slice parameters and rewrite every shape constant a plan changes.

The pass copies the analysed GraphModule, slices each parameter along the dims whose channels the
plan removes, updates leaf modules (``in_features``, ``normalized_shape``, ...) and rewrites the
arguments of shape-carrying ops (``reshape(B, N, C)``, split sizes, slices, layer-norm shapes).
When the head dimension of ``q``/``k`` shrinks, attention keeps the original scale.
"""
from __future__ import annotations

import copy
import copyreg
import operator
from collections import OrderedDict
from typing import Any, Optional

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.context import META_KEY, TensorDims, _get_tensor
from vitgraph.errors import PlanError
from vitgraph.analysis.ops.registry import lookup_op
from vitgraph.analysis.selection import RaggedSectionsError, Selection
from vitgraph.analysis.ops.rewriting import RewriteContext, scaled_sizes, slice_kept


def slim(analysis: Any, sel: Selection) -> fx.GraphModule:
    """A new GraphModule with the plan applied; the analysed model is not touched."""
    gm = analysis.graph_module
    memo: dict[int, Any] = {}
    for name, td in analysis.params.items():
        t = _get_tensor(gm, name)
        new = slice_kept(t, [sel.kept(lay) if lay is not None else None for lay in td.dims])
        if new is not None:
            memo[id(t)] = new
    root = _copy_state(gm, memo)
    graph = fx.Graph()
    out = graph.graph_copy(gm.graph, {})
    graph.output(out)
    graph._codegen = copy.deepcopy(gm.graph._codegen)  # (outputs rebuilt as the model returns them)
    rc = RewriteContext(sel, root)
    split_ragged_sections(rc, graph, analysis.store)
    for node in list(graph.nodes):
        spec = lookup_op(root, node)
        fn = spec.rewrite if spec is not None else None
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


# ---------------------------------------------------------------------------------------------
# shape constants


# ---------------------------------------------------------------------------------------------
# leaf modules


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
    if len(spos) == 1 and len(cdim) > 1:  # other dims carry channels too (tokens folded from a conv's
        # channels): the fused projection's dim is the one made of as many sections as the reshape has
        cdim = [k for k in cdim if len(store.expand(x.dims[k])) == td.shape[spos[0]]]
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
    args = scaled_sizes(rc, graph, where, shape_args, td.shape, new, dims)
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
