"""Reductions over dims, and the scalar reads (size, dim, numel) that carry no channels."""
from __future__ import annotations

import builtins
import math
from typing import Any

import torch
import torch.fx as fx

from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, no_rule, norm_dim
from vitgraph.analysis.ops.registry import ELTWISE, FREE


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


_RETURN_FIELDS = {"values": 0, "indices": 1}  # torch.return_types of max/min/sort/topk/median/mode/kthvalue


def scalar_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Shape queries and scalar arithmetic carry no channels."""
    if node.target is builtins.getattr and node.args[1] not in ("shape", "dtype", "device", "ndim", "is_cuda"):
        td = ctx.dims(node.args[0])
        if isinstance(td, tuple) and node.args[1] in _RETURN_FIELDS:
            # ``x.max(dim).values``: a field of torch's (values, indices) return type
            return td[_RETURN_FIELDS[node.args[1]]] if len(td) == 2 else no_rule(ctx, node)
        if isinstance(td, TensorDims) and node.args[1] == "T":
            return td.with_dims(td.dims[::-1], td.shape[::-1])
        if isinstance(td, TensorDims) and node.args[1] in ("mT", "mH") and len(td.shape) >= 2:
            perm = list(range(len(td.shape) - 2)) + [len(td.shape) - 1, len(td.shape) - 2]
            return td.with_dims([td.dims[i] for i in perm], [td.shape[i] for i in perm])
        return no_rule(ctx, node)
    return None


# ---------------------------------------------------------------------------------------------
# declarations

declare("mean", torch.mean, "sum", torch.sum, "amax", torch.amax, "amin", "std", "var", "norm", "logsumexp", "max", "min", torch.max, torch.min, rule=reduce_rule, cost=ELTWISE)
declare(builtins.getattr, "size", "dim", "numel", builtins.len, math.sqrt, int, float, rule=scalar_rule, cost=FREE)
