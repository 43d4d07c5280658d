"""Helpers the op rules share: arguments, tensor operands, broadcasting, the frozen fallback."""
from __future__ import annotations

from typing import Any, Optional, Sequence

import torch.fx as fx

from vitgraph.analysis.axes import Layout
from vitgraph.analysis.context import RuleContext, TensorDims

STAND_IN = "dimension without channels merged into channels"  # origin of the axes reshape makes for dims without channels


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
    ins = tensor_args(ctx, node) + _tuple_parts(ctx, node)
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


def _tuple_parts(ctx: RuleContext, node: fx.Node) -> list[TensorDims]:
    """Dims of the tensors inside tuple-valued arguments (the parts ``chunk`` or ``unbind``
    returns, a ``(values, indices)`` result) passed whole."""
    out: list[TensorDims] = []
    for a in [*node.args, *node.kwargs.values()]:
        for x in (a if isinstance(a, (list, tuple)) else (a,)):
            d = ctx.dims(x)
            if isinstance(d, tuple):
                out.extend(t for t in d if isinstance(t, TensorDims))
    return out


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


def placeholder_dims(ctx: RuleContext, node: fx.Node) -> Any:
    """Model inputs carry no prunable channels, unless the graph reads another graph's activations
    (``ctx.channel_inputs``, a method such as ``forward_head``): then each dim is a fresh axis that
    the ops decide about, as they do for any activation."""
    shp = ctx.out_shape()
    if shp is None:
        return None
    if ctx.channel_inputs:
        return TensorDims(shp, tuple(ctx.fresh(s, f"input {node.name} dim {d}") for d, s in enumerate(shp)), True)
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
