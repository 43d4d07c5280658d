"""Element-wise ops (activations, arithmetic, comparisons, casts), softmax and the *_like constructors."""
from __future__ import annotations

import operator
from typing import Any

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, broadcast, no_rule, norm_dim, tensor_args
from vitgraph.analysis.ops.registry import ELTWISE, FREE, lookup_op


_ADDS = [operator.add, operator.iadd, torch.add, "add", "add_", "__add__", "__radd__"]  # residual adds when both sides are live


_FREE_POINTWISE = ["float", "to", "contiguous", nn.Identity, nn.Dropout]  # casts and no-ops the runtimes fold away


_POINTWISE_FUNCS = [
    operator.sub, operator.mul, operator.truediv, operator.neg, operator.floordiv,
    operator.pow, operator.imul,
    torch.sub, torch.mul, torch.div, torch.neg, torch.exp, torch.log, torch.sigmoid,
    torch.tanh, torch.relu, torch.sqrt, torch.rsqrt, torch.abs, torch.clamp, torch.where,
    torch.sin, torch.cos, torch.pow, torch.erf, torch.maximum, torch.minimum,
    F.gelu, F.silu, F.relu, F.relu6, F.hardswish, F.hardsigmoid, F.sigmoid, F.tanh, F.mish,
    F.elu, F.leaky_relu, F.dropout, F.softplus, F.hardtanh, F.selu, F.celu, F.softsign,
    operator.eq, operator.ne, operator.lt, operator.le, operator.gt, operator.ge,
    torch.eq, torch.ne, torch.lt, torch.le, torch.gt, torch.ge,
    torch.square, torch.addcmul, torch.addcdiv, torch.lerp, torch.reciprocal, torch.sign,
    torch.log1p, torch.expm1,
]


_POINTWISE_METHODS = [
    "sub", "mul", "div", "mul_", "sub_", "div_", "neg", "exp", "log", "sigmoid",
    "tanh", "relu", "sqrt", "rsqrt", "abs", "clamp", "pow", "sin", "cos",
    "half", "bfloat16", "double", "type", "clone",
    "detach", "masked_fill", "masked_fill_", "erf", "sign", "reciprocal", "square", "clamp_min",
    "clamp_max", "__mul__", "__rmul__", "sigmoid_", "gelu", "silu",
    "eq", "ne", "lt", "le", "gt", "ge",
]


_POINTWISE_MODULES = [
    nn.GELU, nn.SiLU, nn.ReLU, nn.ReLU6, nn.Tanh, nn.Sigmoid,
    nn.Hardswish, nn.Hardsigmoid, nn.Mish, nn.ELU, nn.LeakyReLU, nn.Dropout2d,
    nn.Dropout1d, nn.Softplus, nn.Hardtanh, nn.AlphaDropout, nn.SELU, nn.CELU, nn.Softsign, nn.Tanhshrink,
]


def pointwise(ctx: RuleContext, node: fx.Node) -> Any:
    """Elementwise ops (with broadcasting) tie the channels of their operands."""
    ops = tensor_args(ctx, node)
    shp = ctx.out_shape()
    if not ops or shp is None or (shp and isinstance(shp[0], tuple)):
        return None if not ops else no_rule(ctx, node)
    live = [td for td in ops if td.live]
    joined = _joined_dims(ctx, live, len(shp)) if lookup_op(ctx.gm, node).residual_add and len(live) >= 2 else set()
    td = broadcast(ctx, ops, shp, "elementwise")
    for i in joined:
        ctx.role(td.dims[i], "add")
    return td


def _joined_dims(ctx: RuleContext, live: list[TensorDims], nd: int) -> set[int]:
    """Output dims where an add joins two streams: its live operands' channels there were not yet
    tied.  ``h + g(h)`` with ``g`` element-wise (a channel norm's skip inside an MLP) adds the same
    channels to themselves and starts no residual stream."""
    out = set()
    for i in range(nd):
        seen = set()
        for td in live:
            j = i - (nd - len(td.shape))
            if j >= 0 and td.dims[j] is not None:
                seen.add(ctx.store.expand(td.dims[j]))
        if len(seen) >= 2:
            out.add(i)
    return out


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


def type_as_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """``a.type_as(b)`` casts ``a``; ``b`` only lends its dtype."""
    return ctx.dims(node.args[0])


# ---------------------------------------------------------------------------------------------
# declarations

declare(*_POINTWISE_FUNCS, *_POINTWISE_METHODS, *_POINTWISE_MODULES, rule=pointwise, pointwise=True, cost=ELTWISE)
declare(*_ADDS, rule=pointwise, pointwise=True, residual_add=True, cost=ELTWISE)
declare(*_FREE_POINTWISE, rule=pointwise, pointwise=True, cost=FREE)
declare(nn.Hardshrink, F.hardshrink, rule=pointwise, pointwise=True, cost=ELTWISE)
declare(F.softmax, F.log_softmax, "softmax", "log_softmax", nn.Softmax, nn.LogSoftmax, rule=softmax_rule, cost=ELTWISE)
declare(torch.zeros_like, torch.ones_like, torch.empty_like, torch.full_like, torch.rand_like, torch.randn_like,
        "new_zeros", "new_ones", rule=like_rule, cost=ELTWISE)
declare("type_as", rule=type_as_rule, cost=FREE)
# in place, to a constant: ``qkv_bias[n:2 * n].zero_()`` (Swin V2's key bias) ties and mixes nothing
declare("zero_", "fill_", rule=pointwise, pointwise=True, cost=ELTWISE)
