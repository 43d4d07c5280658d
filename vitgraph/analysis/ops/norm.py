"""Normalisation: LayerNorm / RMSNorm, F.normalize, BatchNorm, GroupNorm."""
from __future__ import annotations

from typing import Any, Optional

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, norm_dim
from vitgraph.analysis.ops.rewriting import RewriteContext
from vitgraph.analysis.ops.registry import ELTWISE


def norm_dims(ctx: RuleContext, x: TensorDims, k: int, params: list[Optional[TensorDims]]) -> TensorDims:
    """Normalisation over the last ``k`` dims: its affine parameters are tied to them."""
    for p in params:
        if p is None:
            continue
        for xd, pd in zip(x.dims[-k:], p.dims[-k:]):
            ctx.tie(xd, pd, "norm")
    for xd in x.dims[-k:]:
        ctx.role(xd, "norm")
    return x


def layer_norm_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.LayerNorm / nn.RMSNorm."""
    mod = ctx.gm.get_submodule(node.target)
    ps = [ctx.param(f"{node.target}.{n}") for n in ("weight", "bias") if getattr(mod, n, None) is not None]
    return norm_dims(ctx, ctx.dims(node.args[0]), len(mod.normalized_shape), ps)


def layer_norm_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.layer_norm(x, normalized_shape, weight, bias) / F.rms_norm(x, shape, weight)."""
    shape = arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    ps = [ctx.dims(arg(node, 2, "weight"))]
    if node.target is F.layer_norm:
        ps.append(ctx.dims(arg(node, 3, "bias")))
    return norm_dims(ctx, ctx.dims(node.args[0]), k, [p for p in ps if isinstance(p, TensorDims)])


def normalize_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.normalize(x, p, dim): shape kept; channels normalised over ``dim`` get the norm role."""
    x = ctx.dims(node.args[0])
    dim = norm_dim(int(arg(node, 2, "dim", 1)), len(x.shape))
    ctx.role(x.dims[dim], "norm")
    return x


def channel_norm(ctx: RuleContext, x: TensorDims, params: list[Optional[TensorDims]]) -> TensorDims:
    """Per-channel normalisation on dim 1 (batch norm, one-group or per-channel group norm)."""
    for p in params:
        if p is not None:
            ctx.tie(x.dims[1], p.dims[0], "channel norm")
    return x


def batch_norm_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.BatchNorm*d: weight, bias and running statistics follow the channel dim."""
    mod = ctx.gm.get_submodule(node.target)
    names = ("weight", "bias", "running_mean", "running_var")
    ps = [ctx.param(f"{node.target}.{n}") for n in names if getattr(mod, n, None) is not None]
    return channel_norm(ctx, ctx.dims(node.args[0]), ps)


def batch_norm_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.batch_norm(x, running_mean, running_var, weight, bias, ...): all follow the channel dim."""
    names = ("running_mean", "running_var", "weight", "bias")
    ps = [ctx.dims(arg(node, i, n)) for i, n in enumerate(names, 1)]
    return channel_norm(ctx, ctx.dims(node.args[0]), [p for p in ps if isinstance(p, TensorDims)])


def group_norm(ctx: RuleContext, x: TensorDims, groups: int, ps: list) -> TensorDims:
    """Group norm: prunable with one group (statistics over every channel, so the channels are
    normalised together: role ``norm``) or one channel per group (per-channel statistics)."""
    if groups == 1:
        ctx.role(x.dims[1], "norm")
    elif groups != x.shape[1]:
        ctx.freeze(x.dims[1], "group norm", f"{groups} groups fix the channel count per group")
    return channel_norm(ctx, x, ps)


def group_norm_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.GroupNorm."""
    mod = ctx.gm.get_submodule(node.target)
    ps = [ctx.param(f"{node.target}.{n}") for n in ("weight", "bias") if getattr(mod, n, None) is not None]
    return group_norm(ctx, ctx.dims(node.args[0]), mod.num_groups, ps)


def group_norm_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.group_norm(x, num_groups, weight, bias, eps)."""
    ps = [ctx.dims(arg(node, i, n)) for i, n in ((2, "weight"), (3, "bias"))]
    return group_norm(ctx, ctx.dims(node.args[0]), int(arg(node, 1, "num_groups")),
                      [p for p in ps if isinstance(p, TensorDims)])


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


def rewrite_norm_module(rc: RewriteContext, node: fx.Node) -> None:
    """normalized_shape follows the new width."""
    m = rc.root.get_submodule(node.target)
    k = len(m.normalized_shape)
    m.normalized_shape = tuple(rc.new_shape(rc.dims(node.args[0]))[-k:])


def rewrite_batch_norm(rc: RewriteContext, node: fx.Node) -> None:
    """num_features follows the new width."""
    m = rc.root.get_submodule(node.target)
    m.num_features = rc.new_shape(rc.dims(node.args[0]))[1]


def rewrite_group_norm(rc: RewriteContext, node: fx.Node) -> None:
    """num_channels (and per-channel groups) follow the new width."""
    m = rc.root.get_submodule(node.target)
    c = rc.new_shape(rc.dims(node.args[0]))[1]
    if m.num_groups == m.num_channels:
        m.num_groups = c
    m.num_channels = c


def rewrite_group_norm_function(rc: RewriteContext, node: fx.Node) -> None:
    """A per-channel num_groups follows the new width."""
    td = rc.dims(node.args[0])
    c_old, c_new = td.shape[1], rc.new_shape(td)[1]
    if len(node.args) > 1 and node.args[1] == c_old:
        node.args = (node.args[0], c_new, *node.args[2:])
    elif node.kwargs.get("num_groups") == c_old:
        node.kwargs = {**node.kwargs, "num_groups": c_new}


# ---------------------------------------------------------------------------------------------
# declarations

declare(nn.LayerNorm, nn.RMSNorm, rule=layer_norm_module, rewrite=rewrite_norm_module, cost=ELTWISE)
declare(F.layer_norm, F.rms_norm, rule=layer_norm_function, rewrite=rewrite_layer_norm, cost=ELTWISE)
declare(F.normalize, rule=normalize_function, cost=ELTWISE)
declare(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, rule=batch_norm_module, rewrite=rewrite_batch_norm, cost=ELTWISE)
declare(F.batch_norm, rule=batch_norm_function, cost=ELTWISE)
declare(nn.GroupNorm, rule=group_norm_module, rewrite=rewrite_group_norm, cost=ELTWISE)
declare(F.group_norm, rule=group_norm_function, rewrite=rewrite_group_norm_function, cost=ELTWISE)
