"""Ops that move or regroup dims: permute, transpose, squeeze, expand, repeat, reshape / view / flatten."""
from __future__ import annotations

import operator
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.axes import Layout, single
from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, no_rule, norm_dim
from vitgraph.analysis.ops.rewriting import RewriteContext, replace_sizes, scaled_sizes
from vitgraph.analysis.ops.common import STAND_IN
from vitgraph.analysis.ops.registry import ELTWISE, FREE


def permute_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Reorder dims."""
    td = ctx.dims(node.args[0])
    order = node.args[1:] if node.target == "permute" else (arg(node, 1, "dims"),)
    if len(order) == 1 and isinstance(order[0], (list, tuple)):
        order = order[0]
    n = len(td.shape)
    order = [norm_dim(int(d), n) for d in order]
    return td.with_dims([td.dims[d] for d in order], [td.shape[d] for d in order])


def transpose_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Swap two dims."""
    td = ctx.dims(node.args[0])
    n = len(td.shape)
    a, b = norm_dim(int(arg(node, 1, "dim0")), n), norm_dim(int(arg(node, 2, "dim1")), n)
    dims, shape = list(td.dims), list(td.shape)
    dims[a], dims[b] = dims[b], dims[a]
    shape[a], shape[b] = shape[b], shape[a]
    return td.with_dims(dims, shape)


def t_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Transpose a 2-D tensor."""
    td = ctx.dims(node.args[0])
    return td.with_dims(td.dims[::-1], td.shape[::-1])


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


def expand_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Broadcast size-1 dims (new dims carry no channels)."""
    td = ctx.dims(node.args[0])
    shp = ctx.out_shape()
    off = len(shp) - len(td.shape)
    dims = [None] * off + [d if s == o else None for s, d, o in zip(td.shape, td.dims, shp[off:])]
    return td.with_dims(dims, shp)


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


def repeat_interleave_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Repeat each element along ``dim``.  Along a channel dim, ``r`` repeats of each channel make
    the row-major product (channels, r): a rotary table's per-frequency values repeated for both
    channels of a pair follow the pairs; the position inside the repeats is frozen."""
    td, shp = ctx.dims(node.args[0]), ctx.out_shape()
    dim = arg(node, 2, "dim")
    if not isinstance(td, TensorDims) or dim is None or shp is None or len(shp) != len(td.shape):
        return no_rule(ctx, node)
    d = norm_dim(int(dim), len(td.shape))
    dims = list(td.dims)
    reps = arg(node, 1, "repeats")
    if dims[d] is not None and td.shape[d] != shp[d]:
        if isinstance(reps, int) and reps > 1 and shp[d] == td.shape[d] * reps:
            lay = dims[d]
            if len(lay) == 1:
                factors = list(lay[0])
            else:  # a concatenation: one axis defined as it
                z = ctx.new_axis(td.shape[d], "concatenation inside a product")
                ctx.define(z, lay, "repeat")
                factors = [z]
            member = ctx.new_axis(reps, "position inside repeated channels")
            ctx.freeze(single(member), "repeat", f"position inside {reps} repeats of a channel")
            dims[d] = (tuple(factors) + (member,),)
        else:
            ctx.freeze(dims[d], "repeat", "channels repeated")
            dims[d] = None
    return td.with_dims(dims, shp)


# origin of the axes reshape_dims makes for a dim without channels (batch, tokens) merged into a
# channel dim; the slim pass finds them by it to keep such sizes dynamic


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
                f = ctx.new_axis(s, STAND_IN)
                spatial.add(f)
                factors.append(f)
            elif len(lay) == 1:
                factors.extend(lay[0])
            else:
                z = ctx.new_axis(sum(store.block_size(bk) for bk in lay), "concatenation inside a product")
                ctx.define(z, lay, rule)
                factors.append(z)
        for f in spatial:
            ctx.freeze(single(f), rule, STAND_IN)
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
                o = ctx.new_axis(sum(store.size[a] for a in outer), f"outer parts of axis {r}")
                ctx.define(o, tuple((a,) for a in outer), rule, "common inner factors")
                fs = [o, *common] + fs
                continue
            if d is not None and acc == 1 and len(d) == first and _equal_single_blocks(store, d):
                # a concatenation of ``first`` equal parts (q, k and v biases concatenated) viewed
                # as (first, rest): the outer dim indexes the parts; its inner axis stands for
                # each part in turn and is resolved to the part when the dim is unbound
                x, y = ctx.part_index(r, tuple(blk[0] for blk in d))
                fs = [y] + fs
                g.append(x)
                acc *= first
                continue
            if d is not None:
                break
            x, y = ctx.split_off(r, first, rule)
            fs = [y] + fs
            g.append(x)
            acc *= first
        if acc != s:
            lay = (tuple(factors),)
            ctx.freeze(lay, rule, "reshape does not factor the channel layout")
            return [None] * len(sizes)
        out.append(tuple(g))
    return out


def _common_suffix(store: Any, lay: Layout) -> Optional[tuple[int, ...]]:
    """The inner factors every block of ``lay`` shares after one outer axis, if any."""
    blocks = [tuple(store.find(a) for a in b) for b in store.expand(lay)]
    if len(blocks) < 2 or any(len(b) < 2 for b in blocks):
        return None
    tail = blocks[0][1:]
    return tail if all(b[1:] == tail for b in blocks) else None


def _equal_single_blocks(store: Any, lay: Layout) -> bool:
    return all(len(b) == 1 for b in lay) and len({store.block_size(b) for b in lay}) == 1


def _shape_elements(graph: fx.Graph, node: fx.Node, shape: list, rank: int) -> list:
    """A target shape given as one value the graph computes (``x.size()[:-1] + (heads, d)``,
    as symbolic tracing records it) becomes its ``rank`` elements, one ``getitem`` each, so
    every element can be rewritten on its own."""
    if rank < 2 or len(shape) != 1 or not isinstance(shape[0], fx.Node):
        return shape
    with graph.inserting_before(node):
        return [graph.call_function(operator.getitem, (shape[0], i)) for i in range(rank)]


def rewrite_reshape(rc: RewriteContext, node: fx.Node) -> None:
    """reshape/view/expand: the target shape follows the new channel counts."""
    td = rc.dims(node)
    new = rc.new_shape(td)
    if node.op == "call_method":
        rest = list(node.args[1:])
        rest = _shape_elements(node.graph, node, rest, len(new)) if new != td.shape else rest
        packed = len(rest) == 1 and isinstance(rest[0], (list, tuple))
        shape = list(rest[0]) if packed else rest
        if len(shape) != len(new):
            return
        shape = scaled_sizes(rc, node.graph, node, shape, td.shape, new, td.dims)
        node.args = (node.args[0], tuple(shape)) if packed else (node.args[0], *shape)
    else:
        key = 1 if len(node.args) > 1 else None
        given = node.args[1] if key else node.kwargs["shape"]
        if isinstance(given, fx.Node):
            shape = _shape_elements(node.graph, node, [given], len(new)) if new != td.shape else [given]
        else:
            shape = list(given)
        if len(shape) != len(new):
            return
        shape = scaled_sizes(rc, node.graph, node, shape, td.shape, new, td.dims)
        if key:
            node.args = (node.args[0], tuple(shape))
        else:
            node.kwargs = {**node.kwargs, "shape": tuple(shape)}


def rewrite_unflatten(rc: RewriteContext, node: fx.Node) -> None:
    """unflatten(dim, sizes): sizes follow the new channel counts."""
    td = rc.dims(node)
    new = rc.new_shape(td)
    if new == td.shape:
        return
    dim, sizes = node.args[1], list(node.args[2])
    dim = dim + len(rc.dims(node.args[0]).shape) if dim < 0 else dim
    sizes = replace_sizes(sizes, td.shape[dim:dim + len(sizes)], new[dim:dim + len(sizes)])
    node.args = (node.args[0], dim, tuple(sizes))


# ---------------------------------------------------------------------------------------------
# declarations

declare("permute", torch.permute, rule=permute_rule, cost=FREE)  # views: no data moved
declare("narrow", torch.narrow, cost=FREE)  # (no rule yet: frozen)
declare("transpose", torch.transpose, "swapaxes", rule=transpose_rule, cost=FREE)
declare("t", rule=t_rule, cost=FREE)
declare("unsqueeze", torch.unsqueeze, "squeeze", torch.squeeze, rule=squeeze_rule, cost=FREE)
declare("expand", rule=expand_rule, rewrite=rewrite_reshape, cost=FREE)
declare("expand_as", "broadcast_to", torch.broadcast_to, rule=expand_rule, cost=FREE)
declare("repeat", "tile", torch.tile, rule=repeat_rule, cost=ELTWISE)
declare("repeat_interleave", torch.repeat_interleave, rule=repeat_interleave_rule, cost=ELTWISE)
declare("reshape", "view", torch.reshape, rule=reshape_rule, rewrite=rewrite_reshape, cost=FREE)
declare("flatten", torch.flatten, nn.Flatten, nn.Unflatten, "reshape_as", "view_as", rule=reshape_rule, cost=FREE)
declare("unflatten", torch.unflatten, rule=reshape_rule, rewrite=rewrite_unflatten, cost=FREE)
