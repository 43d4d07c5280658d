"""What a slimming rewrite sees (RewriteContext) and the argument-rewriting helpers the op files share."""
from __future__ import annotations

import operator
from typing import Any, Optional

import numpy as np
import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.context import META_KEY, TensorDims
from vitgraph.analysis.ops.common import STAND_IN
from vitgraph.analysis.selection import Selection


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


def slice_kept(t: torch.Tensor, kept: list[Optional[np.ndarray]]) -> Optional[torch.Tensor]:
    cuts = [(d, idx) for d, idx in enumerate(kept) if idx is not None and len(idx) != t.shape[d]]
    if not cuts:
        return None
    out = take_kept(t.detach(), cuts)
    return nn.Parameter(out, requires_grad=t.requires_grad) if isinstance(t, nn.Parameter) else out


def take_kept(t: torch.Tensor, cuts: list[tuple[int, np.ndarray]]) -> torch.Tensor:
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


def replace_sizes(args: list, old: tuple, new: tuple, dims: Optional[tuple] = None) -> list:
    """Shape arguments with every changed channel dim set to its new size (-1 stays -1).

    A channel dim given as a value read from another tensor's shape (``C`` of ``x.shape``) is
    replaced by a constant too: that other tensor may have been pruned differently.
    """
    dims = dims if dims is not None else (None,) * len(args)
    out = []
    for a, o, n, lay in zip(args, old, new, dims):
        if isinstance(a, int) and a == -1:
            out.append(a)
        elif o != n or (lay is not None and isinstance(a, fx.Node)) or read_from_channels(a):
            out.append(n)
        else:
            out.append(a)
    return out


def stand_in_extent(store: Any, lay: Any) -> Optional[int]:
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


def scaled_sizes(rc: "RewriteContext", graph: fx.Graph, node: Optional[fx.Node], args: list, old: tuple,
                  new: tuple, dims: tuple) -> list:
    """``replace_sizes``, keeping sizes computed at run time where that stays right.

    * a size read from a dim with the very same channels is already the new size at run time;
    * a size computed only from non-channel sizes and constants (``B * num_heads``, where the
      batch is merged with the heads) is rescaled at run time, ``a // c_old * c_new``, so the
      batch stays dynamic (a constant would fix it to the example's batch).
    New nodes go before ``node``.
    """
    out = replace_sizes(args, old, new, dims)
    store = rc.sel.store
    for k, (a, o, n, lay) in enumerate(zip(args, old, new, dims)):
        if not isinstance(a, fx.Node) or lay is None:
            continue
        src = source_layout(a)
        if src is not None and same_layout(store, src, lay):
            out[k] = a
            continue
        if not is_structural(a):
            continue
        ext = stand_in_extent(store, lay) or 1
        c_old, c_new = o // ext, n // ext
        if c_old == c_new:
            out[k] = a
            continue
        with graph.inserting_before(node):
            q = graph.call_function(operator.floordiv, (a, c_old)) if c_old != 1 else a
            out[k] = graph.call_function(operator.mul, (q, c_new)) if c_new != 1 else q
    return out


SIZE_ARITH = (operator.mul, operator.floordiv, operator.add, operator.sub)


def is_structural(a: Any) -> bool:
    """``a`` is computed only from constants and sizes of dims without channels."""
    if isinstance(a, int):
        return True
    if not isinstance(a, fx.Node):
        return False
    if shape_read(a) is not None:
        return source_layout(a) is None
    if a.op == "call_function" and a.target in SIZE_ARITH:
        return all(is_structural(x) for x in a.args) and not a.kwargs
    return False


def shape_read(a: Any) -> Optional[tuple[fx.Node, Any]]:
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


def same_layout(store: Any, a: Any, b: Any) -> bool:
    """Two layouts hold the same channels in the same order (compared by axis class)."""
    def roots(lay: Any) -> tuple:
        return tuple(tuple(store.find(x) for x in blk) for blk in store.expand(lay))
    return roots(a) == roots(b)


def read_from_channels(a: Any) -> bool:
    """``a`` is ``x.shape[i]`` / ``x.size(i)`` where dim ``i`` of ``x`` carries channels (which a
    plan may shrink even though the dim ``a`` sizes here keeps all of its channels)."""
    return source_layout(a) is not None


def source_layout(a: Any) -> Any:
    """The channel layout of the dim ``a`` reads when it is ``x.shape[i]`` / ``x.size(i)``."""
    read = shape_read(a)
    if read is None or not isinstance(read[0], fx.Node) or not isinstance(read[1], int):
        return None
    td, dim = read[0].meta.get(META_KEY), read[1]
    if isinstance(td, TensorDims) and -len(td.dims) <= dim < len(td.dims):
        return td.dims[dim]
    return None
