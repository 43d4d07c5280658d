"""Op rules for layers: linear maps, normalisation, convolution and attention."""
from __future__ import annotations

import operator
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from .axes import Layout, single
from .context import RuleContext, TensorDims
from .rules import arg, broadcast, no_rule, norm_dim, register_rule, reshape_dims


def linear_dims(ctx: RuleContext, x: TensorDims, w: TensorDims, b: Optional[TensorDims]) -> TensorDims:
    """``x @ w.T + b``: the input dim is tied to the weight's columns, the output is its rows."""
    ctx.tie(x.dims[-1], w.dims[1], "linear")
    ctx.role(w.dims[1], "linear_in")
    ctx.role(w.dims[0], "linear_out")
    if b is not None:
        ctx.tie(w.dims[0], b.dims[0], "linear bias")
    shape = x.shape[:-1] + (w.shape[0],)
    return TensorDims(shape, x.dims[:-1] + (w.dims[0],), x.live)


@register_rule(nn.Linear)
def linear_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.Linear."""
    mod = ctx.gm.get_submodule(node.target)
    b = ctx.param(f"{node.target}.bias") if mod.bias is not None else None
    return linear_dims(ctx, ctx.dims(node.args[0]), ctx.param(f"{node.target}.weight"), b)


@register_rule(F.linear)
def linear_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.linear(x, weight, bias)."""
    b = arg(node, 2, "bias")
    return linear_dims(ctx, ctx.dims(node.args[0]), ctx.dims(arg(node, 1, "weight")), ctx.dims(b) if b is not None else None)


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


@register_rule(nn.LayerNorm, nn.RMSNorm)
def layer_norm_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.LayerNorm / nn.RMSNorm."""
    mod = ctx.gm.get_submodule(node.target)
    ps = [ctx.param(f"{node.target}.{n}") for n in ("weight", "bias") if getattr(mod, n, None) is not None]
    return norm_dims(ctx, ctx.dims(node.args[0]), len(mod.normalized_shape), ps)


@register_rule(F.layer_norm, F.rms_norm)
def layer_norm_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.layer_norm(x, normalized_shape, weight, bias) / F.rms_norm(x, shape, weight)."""
    shape = arg(node, 1, "normalized_shape")
    k = len(shape) if isinstance(shape, (list, tuple)) else 1
    ps = [ctx.dims(arg(node, 2, "weight"))]
    if node.target is F.layer_norm:
        ps.append(ctx.dims(arg(node, 3, "bias")))
    return norm_dims(ctx, ctx.dims(node.args[0]), k, [p for p in ps if isinstance(p, TensorDims)])


@register_rule(F.normalize)
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


@register_rule(nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d)
def batch_norm_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.BatchNorm*d: weight, bias and running statistics follow the channel dim."""
    mod = ctx.gm.get_submodule(node.target)
    names = ("weight", "bias", "running_mean", "running_var")
    ps = [ctx.param(f"{node.target}.{n}") for n in names if getattr(mod, n, None) is not None]
    return channel_norm(ctx, ctx.dims(node.args[0]), ps)


@register_rule(F.batch_norm)
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


@register_rule(nn.GroupNorm)
def group_norm_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.GroupNorm."""
    mod = ctx.gm.get_submodule(node.target)
    ps = [ctx.param(f"{node.target}.{n}") for n in ("weight", "bias") if getattr(mod, n, None) is not None]
    return group_norm(ctx, ctx.dims(node.args[0]), mod.num_groups, ps)


@register_rule(F.group_norm)
def group_norm_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.group_norm(x, num_groups, weight, bias, eps)."""
    ps = [ctx.dims(arg(node, i, n)) for i, n in ((2, "weight"), (3, "bias"))]
    return group_norm(ctx, ctx.dims(node.args[0]), int(arg(node, 1, "num_groups")),
                      [p for p in ps if isinstance(p, TensorDims)])


def _per_dim(v: Any, n: int) -> tuple:
    """A conv/pool size argument (int, tuple or padding string) as one value per window dim."""
    if isinstance(v, (list, tuple)):
        return tuple(v) if len(v) == n else tuple(v[:1]) * n
    return (v,) * n


def window_dims(ctx: RuleContext, x: TensorDims, kernel: Any, stride: Any, padding: Any, what: str) -> tuple:
    """Layouts of the window (spatial) output dims of a conv or pool over ``x``'s trailing dims.

    A window dim that carries channels (e.g. a conv applied across the stacked tokens of a
    ``(B, n, C)`` tensor, so the residual channels are its length) passes them through only when
    the window is the identity there: kernel 1, stride 1, no padding.  Otherwise neighbouring
    channels are mixed and the channels are frozen.
    """
    n = len(ctx.out_shape()) - 2
    ks, ss, ps = _per_dim(kernel, n), _per_dim(stride, n), _per_dim(padding, n)
    out = []
    for k in range(n):
        lay = x.dims[2 + k] if 2 + k < len(x.dims) else None
        if lay is not None:
            identity = ks[k] == 1 and ss[k] in (1, None) and ps[k] in (0, "valid", "same")
            if not identity:
                ctx.freeze(lay, what, "a kernel window mixes the channels of a window dim")
                lay = None
        out.append(lay)
    return tuple(out)


def conv_dims(ctx: RuleContext, x: TensorDims, w: TensorDims, b: Optional[TensorDims], groups: int,
              stride: Any = 1, padding: Any = 0) -> TensorDims:
    """Convolution: channels on dim 1; window dims keep channels only through 1-wide windows."""
    shp = ctx.out_shape()
    cin = x.shape[1]
    if groups == 1:
        ctx.tie(x.dims[1], w.dims[1], "conv")
        ctx.role(w.dims[1], "linear_in")
        ctx.role(w.dims[0], "linear_out")
    elif groups == cin and w.shape[0] == cin and w.shape[1] == 1:
        ctx.tie(x.dims[1], w.dims[0], "depthwise conv")
    else:
        # groups x (in per group) channels in, groups x (out per group) out: whole groups can go,
        # and the same in/out positions of every group
        st = ctx.store
        g = st.new(groups, "conv groups")
        ci = st.new(cin // groups, "input channels per conv group")
        co = st.new(w.shape[0] // groups, "output channels per conv group")
        ctx.tie(x.dims[1], ((g, ci),), "grouped conv")
        ctx.tie(w.dims[1], ((ci,),), "grouped conv")
        ctx.tie(w.dims[0], ((g, co),), "grouped conv")
        if cin // groups > 1 or w.shape[0] // groups > 1:
            ctx.role(single(co), "linear_out")
            ctx.role(single(ci), "linear_in")
    for kd in w.dims[2:]:
        ctx.freeze(kd, "conv", "kernel window")
    if b is not None:
        ctx.tie(w.dims[0], b.dims[0], "conv bias")
    dims = (x.dims[0], w.dims[0]) + window_dims(ctx, x, tuple(w.shape[2:]), stride, padding, "conv")
    return TensorDims(shp, dims, x.live)


@register_rule(nn.Conv1d, nn.Conv2d, nn.Conv3d)
def conv_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.Conv*d."""
    mod = ctx.gm.get_submodule(node.target)
    b = ctx.param(f"{node.target}.bias") if mod.bias is not None else None
    return conv_dims(ctx, ctx.dims(node.args[0]), ctx.param(f"{node.target}.weight"), b, mod.groups,
                     mod.stride, mod.padding)


@register_rule(F.conv1d, F.conv2d, F.conv3d)
def conv_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.conv*d(x, weight, bias, stride, padding, dilation, groups)."""
    b = arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    return conv_dims(ctx, ctx.dims(node.args[0]), ctx.dims(arg(node, 1, "weight")), ctx.dims(b) if b is not None else None,
                     groups, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0))


@register_rule(nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d,
               F.avg_pool2d, F.adaptive_avg_pool2d, F.max_pool2d, F.adaptive_avg_pool1d, F.avg_pool1d,
               F.interpolate, nn.Upsample, F.pad, torch.roll, "roll")
def spatial_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Pooling, resampling, padding and rolling act on dims without channels only."""
    x = ctx.dims(node.args[0])
    shp = ctx.out_shape()
    dims = []
    for k, s in enumerate(shp):
        lay = x.dims[k] if k < len(x.dims) else None
        if lay is not None and x.shape[k] != s:
            ctx.freeze(lay, "spatial op", "the op changes the size of a channel dim")
            lay = None
        dims.append(lay)
    window = _pool_window(ctx, node)
    if window is not None:  # a sliding window keeps channels only where it is 1 wide
        n = len(shp) - 2
        dims[2:] = window_dims(ctx, TensorDims(x.shape, tuple(dims), x.live), *window, "pooling")[:n]
    if node.target in (torch.roll, "roll"):
        shifts_dims = arg(node, 2, "dims")
        rolled = shifts_dims if isinstance(shifts_dims, (list, tuple)) else [shifts_dims]
        for d in rolled:
            if d is not None:
                ctx.freeze(x.dims[norm_dim(int(d), len(x.shape))], "roll", "channels rolled")
    return TensorDims(shp, tuple(dims), x.live)


def _pool_window(ctx: RuleContext, node: fx.Node) -> Optional[tuple]:
    """(kernel, stride, padding) of a sliding-window pool, None for other spatial ops."""
    if node.op == "call_module":
        mod = ctx.gm.get_submodule(node.target)
        if isinstance(mod, (nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool2d)):
            return mod.kernel_size, mod.stride or mod.kernel_size, mod.padding
        return None
    if node.target in (F.avg_pool1d, F.avg_pool2d, F.max_pool2d):
        kernel = arg(node, 1, "kernel_size")
        return kernel, arg(node, 2, "stride", None) or kernel, arg(node, 3, "padding", 0)
    return None


@register_rule(nn.Unfold, F.unfold)
def unfold_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """im2col ``(B, C, *spatial) -> (B, C * window, L)``: channels are the outer factor of dim 1,
    the window positions (no channels, frozen) the inner one."""
    x, shp = ctx.dims(node.args[0]), ctx.out_shape()
    if not isinstance(x, TensorDims) or shp is None or len(shp) != 3 or shp[1] % x.shape[1]:
        return no_rule(ctx, node)
    window = shp[1] // x.shape[1]
    im2col = TensorDims((x.shape[0], x.shape[1], window, shp[2]), (x.dims[0], x.dims[1], None, None), x.live)
    return reshape_dims(ctx, im2col, shp, "unfold")


@register_rule(nn.Fold, F.fold)
def fold_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """col2im ``(B, C * window, L) -> (B, C, *spatial)``: the inverse of unfold; the window
    positions are summed away."""
    x, shp = ctx.dims(node.args[0]), ctx.out_shape()
    if not isinstance(x, TensorDims) or shp is None or len(x.shape) != 3 or x.shape[1] % shp[1]:
        return no_rule(ctx, node)
    cols = reshape_dims(ctx, x, (x.shape[0], shp[1], x.shape[1] // shp[1], x.shape[2]), "fold")
    ctx.freeze(cols.dims[2], "fold", "window positions")
    return TensorDims(shp, (cols.dims[0], cols.dims[1]) + (None,) * (len(shp) - 2), x.live)


# ---------------------------------------------------------------------------------------------
# matrix products and attention


@register_rule(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__")
def matmul_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """``a @ b``: contraction dims tied; between two activations they are attention dims."""
    a, b = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    if not isinstance(a, TensorDims) or not isinstance(b, TensorDims) or len(a.shape) < 2 or len(b.shape) < 2:
        return no_rule(ctx, node)
    shp = ctx.out_shape()
    ctx.tie(a.dims[-1], b.dims[-2], "matmul")
    both_live = a.live and b.live
    batch = broadcast(ctx, [TensorDims(a.shape[:-2], a.dims[:-2], a.live), TensorDims(b.shape[:-2], b.dims[:-2], b.live)], shp[:-2], "matmul batch")
    if both_live:
        ctx.role(a.dims[-1], "qk")
        ctx.role(b.dims[-1], "v")
        for lay in batch.dims:
            ctx.role(lay, "head")
    elif a.live and not b.live:
        ctx.role(b.dims[-2], "linear_in")
        ctx.role(b.dims[-1], "linear_out")
    return TensorDims(shp, batch.dims + (a.dims[-2], b.dims[-1]), a.live or b.live)


@register_rule(F.scaled_dot_product_attention)
def sdpa_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """softmax(q k^T * scale + mask) v: q/k dims tied (qk), v's dim is the output (v)."""
    q, k, v = (ctx.dims(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    shp = ctx.out_shape()
    ctx.tie(q.dims[-1], k.dims[-1], "attention qk")
    ctx.role(q.dims[-1], "qk")
    ctx.role(v.dims[-1], "v")
    parts = [TensorDims(t.shape[:-2], t.dims[:-2], t.live) for t in (q, k, v)]
    mask = ctx.dims(arg(node, 3, "attn_mask"))
    if isinstance(mask, TensorDims) and len(mask.shape) > 2:
        parts.append(TensorDims(mask.shape[:-2], mask.dims[:-2], mask.live))
    batch = broadcast(ctx, parts, shp[:-2], "attention heads")
    for lay in batch.dims:
        ctx.role(lay, "head")
    return TensorDims(shp, batch.dims + (q.dims[-2], v.dims[-1]), True)


@register_rule(torch.einsum)
def einsum_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Einsum: equal letters are tied; a letter summed between two activations is a qk dim."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    tds = [ctx.dims(o) for o in ops]
    if "..." in eq or "->" not in eq or not all(isinstance(t, TensorDims) for t in tds):
        return no_rule(ctx, node)
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    shp = ctx.out_shape()
    seen: dict[str, tuple[Optional[Layout], int, bool]] = {}
    for term, td in zip(terms, tds):
        for ch, lay, s in zip(term, td.dims, td.shape):
            if ch in seen:
                prev, ps, plive = seen[ch]
                if s == ps and s != 1:
                    ctx.tie(prev, lay, "einsum")
                    if ch not in out and plive and td.live:
                        ctx.role(lay, "qk")
            else:
                seen[ch] = (lay, s, td.live)
    dims = tuple(seen[ch][0] if seen[ch][1] == s else None for ch, s in zip(out, shp))
    return TensorDims(shp, dims, any(t.live for t in tds))
