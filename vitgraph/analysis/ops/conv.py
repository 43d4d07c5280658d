"""Convolutions, pooling and the other sliding-window ops (unfold, fold)."""
from __future__ import annotations

from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.analysis.axes import single
from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, no_rule, norm_dim
from vitgraph.analysis.ops.rewriting import RewriteContext
from vitgraph.analysis.ops.shape import reshape_dims
from vitgraph.analysis.ops.registry import Cost, ELTWISE


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


def conv_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.Conv*d."""
    mod = ctx.gm.get_submodule(node.target)
    b = ctx.param(f"{node.target}.bias") if mod.bias is not None else None
    return conv_dims(ctx, ctx.dims(node.args[0]), ctx.param(f"{node.target}.weight"), b, mod.groups,
                     mod.stride, mod.padding)


def conv_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.conv*d(x, weight, bias, stride, padding, dilation, groups)."""
    b = arg(node, 2, "bias")
    groups = arg(node, 6, "groups", 1)
    return conv_dims(ctx, ctx.dims(node.args[0]), ctx.dims(arg(node, 1, "weight")), ctx.dims(b) if b is not None else None,
                     groups, arg(node, 3, "stride", 1), arg(node, 4, "padding", 0))


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


def unfold_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """im2col ``(B, C, *spatial) -> (B, C * window, L)``: channels are the outer factor of dim 1,
    the window positions (no channels, frozen) the inner one."""
    x, shp = ctx.dims(node.args[0]), ctx.out_shape()
    if not isinstance(x, TensorDims) or shp is None or len(shp) != 3 or shp[1] % x.shape[1]:
        return no_rule(ctx, node)
    window = shp[1] // x.shape[1]
    im2col = TensorDims((x.shape[0], x.shape[1], window, shp[2]), (x.dims[0], x.dims[1], None, None), x.live)
    return reshape_dims(ctx, im2col, shp, "unfold")


def fold_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """col2im ``(B, C * window, L) -> (B, C, *spatial)``: the inverse of unfold; the window
    positions are summed away."""
    x, shp = ctx.dims(node.args[0]), ctx.out_shape()
    if not isinstance(x, TensorDims) or shp is None or len(x.shape) != 3 or x.shape[1] % shp[1]:
        return no_rule(ctx, node)
    cols = reshape_dims(ctx, x, (x.shape[0], shp[1], x.shape[1] // shp[1], x.shape[2]), "fold")
    ctx.freeze(cols.dims[2], "fold", "window positions")
    return TensorDims(shp, (cols.dims[0], cols.dims[1]) + (None,) * (len(shp) - 2), x.live)


def rewrite_conv(rc: RewriteContext, node: fx.Node) -> None:
    """Conv channel counts (and depthwise groups) follow the weight."""
    m = rc.root.get_submodule(node.target)
    cin = rc.new_shape(rc.dims(node.args[0]))[1]
    if m.groups > 1:  # whole groups are removed: the (sliced) weight holds in-channels per group
        m.groups = cin // m.weight.shape[1]
    m.in_channels, m.out_channels = cin, m.weight.shape[0]


# ---------------------------------------------------------------------------------------------
# declarations

def _conv_module_inputs(node: fx.Node, module: Optional[nn.Module]) -> tuple[tuple, tuple]:
    return (f"{node.target}.weight",), (module.groups,)


def _conv_function_inputs(node: fx.Node, module: Optional[nn.Module]) -> Optional[tuple[tuple, tuple]]:
    if len(node.args) < 2:
        return None
    groups = node.args[6] if len(node.args) > 6 else node.kwargs.get("groups", 1)
    return (node.args[1],), (int(groups),)


declare(nn.Conv1d, nn.Conv2d, nn.Conv3d, rule=conv_module, rewrite=rewrite_conv, convolution=True,
        cost=Cost("conv", _conv_module_inputs))
declare(F.conv1d, F.conv2d, F.conv3d, rule=conv_function, convolution=True, cost=Cost("conv", _conv_function_inputs))
declare(nn.AvgPool1d, nn.AvgPool2d, nn.MaxPool2d, nn.AdaptiveAvgPool1d, nn.AdaptiveAvgPool2d, F.avg_pool2d,
        F.adaptive_avg_pool2d, F.max_pool2d, F.adaptive_avg_pool1d, F.avg_pool1d, F.interpolate, nn.Upsample, F.pad,
        torch.roll, "roll", rule=spatial_rule, cost=ELTWISE)
declare(nn.Unfold, F.unfold, rule=unfold_rule, cost=ELTWISE)
declare(nn.Fold, F.fold, rule=fold_rule, cost=ELTWISE)
