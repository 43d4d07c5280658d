"""Reductions over dims, and the scalar reads (size, dim, numel) that carry no channels."""
from __future__ import annotations

import builtins
import math
import operator
from typing import Any

import torch
import torch.fx as fx

from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, no_rule, norm_dim
from vitgraph.analysis.ops.registry import ELTWISE, FREE


# Reductions whose value over a channel dim is the same whether removed channels are zero or
# absent (a sum, a p-norm); every other reduction (mean, max, std, logsumexp, ...) depends on how
# many channels there are or on the zeros themselves, like a LayerNorm's statistics.
_NORMS = ("norm", torch.norm, torch.linalg.vector_norm)  # (x, p, dim, ...): dim is the third argument
_ZERO_EXACT = {"sum", torch.sum, "nansum", *_NORMS}


def reduce_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Reductions remove (or keep as size 1) the reduced dims.

    Channels reduced over stay prunable; unless the reduction is a sum or a norm they get the norm
    role (a mean over channels divides by their number, a max sees the zeros of masked channels),
    and the positions a max/min returns over channels (its indices) freeze them.
    """
    td = ctx.dims(node.args[0])
    shp = ctx.out_shape()
    if shp is None or not isinstance(td, TensorDims):
        return None if shp is None else no_rule(ctx, node)
    if shp and isinstance(shp[0], tuple):  # (values, indices)
        shp0 = shp[0]
        red = _reduced(ctx, td, shp0, node)
        if _reads_indices(node):
            for lay in _reduced_layouts(td, shp0, node):
                ctx.freeze(lay, "reduction", "positions of a max/min over channels change when channels are removed")
        return (red, red)
    return _reduced(ctx, td, shp, node)


def _reads_indices(node: fx.Node) -> bool:
    """Whether a (values, indices) result has a user that reads the indices."""
    return any(u.target is operator.getitem and u.args[1] == 1 or u.target is builtins.getattr and u.args[1] == "indices"
               for u in node.users)


def _reduced_dims(td: TensorDims, shp: tuple, node: fx.Node) -> set[int]:
    dim = arg(node, 2, "dim", None) if node.target in _NORMS else arg(node, 1, "dim", None)
    n = len(td.shape)
    if dim is None or not isinstance(dim, (int, list, tuple)):
        return set(range(n)) if len(shp) < n or dim is None else set()
    return {norm_dim(int(d), n) for d in (dim if isinstance(dim, (list, tuple)) else [dim])}


def _reduced_layouts(td: TensorDims, shp: tuple, node: fx.Node) -> list:
    return [td.dims[k] for k in sorted(_reduced_dims(td, shp, node)) if k < len(td.dims) and td.dims[k] is not None]


def _reduced(ctx: RuleContext, td: TensorDims, shp: tuple, node: fx.Node) -> TensorDims:
    n = len(td.shape)
    red = _reduced_dims(td, shp, node)
    if node.target not in _ZERO_EXACT:
        for lay in _reduced_layouts(td, shp, node):
            ctx.role(lay, "norm")
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

declare("mean", torch.mean, "sum", torch.sum, "amax", torch.amax, "amin", "std", "var", "norm", "logsumexp", "max", "min",
        torch.max, torch.min, torch.norm, torch.linalg.vector_norm, "nansum", rule=reduce_rule, cost=ELTWISE)
declare(builtins.getattr, "size", "dim", "numel", builtins.len, math.sqrt, int, float, rule=scalar_rule, cost=FREE)
