"""Magnitude score pass: importance of a unit = L2 norm of every weight that belongs to it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import torch

from vitgraph.analysis.selection import layout_coords

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup


def magnitude_scores(analysis: "Analysis", group_ids: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Per-unit L2 norms for the given groups (all groups by default).

    ``qk``/``v`` groups that may differ per head get ``[heads, dims]`` scores.
    """
    ids = set(group_ids) if group_ids is not None else {g.id for g in analysis.groups}
    tensors = dict(analysis.graph_module.named_parameters())
    tensors.update(dict(analysis.graph_module.named_buffers()))
    wanted: dict[str, set[int]] = {}  # every dim of each tensor some group scores
    for g in analysis.groups:
        if g.id in ids:
            for name, dim in g.params:
                wanted.setdefault(name, set()).add(dim)
    sq_cache: _SqCache = _SqCache(tensors, wanted)
    coords_of: dict = {}
    out = {}
    for g in analysis.groups:
        if g.id in ids:
            out[g.id] = torch.from_numpy(_group_sq_norms(analysis, g, tensors, sq_cache, coords_of)).sqrt()
    return out


class _SqCache(dict):
    """``(name, dim) -> slice_sq_norms(tensors[name], dim)``, every wanted dim of a tensor made in
    one pass over it."""

    def __init__(self, tensors: dict, wanted: dict[str, set[int]]) -> None:
        super().__init__()
        self.tensors, self.wanted = tensors, wanted

    def __missing__(self, key: tuple[str, int]) -> np.ndarray:
        name, dim = key
        for d, v in _sq_norms_of_dims(self.tensors[name], self.wanted.get(name, set()) | {dim}).items():
            self[name, d] = v
        return self[key]


def slice_sq_norms(t: torch.Tensor, dim: int) -> np.ndarray:
    """Squared L2 norm of every slice of ``t`` along ``dim``."""
    a = t.detach().float().cpu().numpy()
    other = tuple(d for d in range(a.ndim) if d != dim)
    return np.square(a, dtype=np.float64).sum(axis=other) if other else np.square(a, dtype=np.float64)


_CHUNK = 1 << 15  # elements of float64 squares made at a time (they stay in cache)


def _sq_norms_of_dims(t: torch.Tensor, dims: set[int]) -> dict[int, np.ndarray]:
    """``{d: slice_sq_norms(t, d)}`` for each ``d`` in ``dims``, equal to the last bit.

    A C-contiguous matrix is squared a block of rows at a time, in cache, instead of as one
    float64 copy the size of the weight: the sums along rows are taken per row, as numpy sums a
    row of the whole matrix (pairwise over the row), and the sums down columns carry the running
    total as the first row of the next block, so each column is added in row order, as numpy
    adds down axis 0 of the whole matrix (with rows of 16 or more: a narrower matrix numpy may sum
    otherwise).
    """
    a = t.detach().float().cpu().numpy()
    if a.ndim != 2 or a.shape[1] < 16 or not a.flags.c_contiguous or a.size <= _CHUNK or not dims <= {0, 1}:
        return {d: slice_sq_norms(t, d) for d in dims}
    n, m = a.shape
    rows = max(1, _CHUNK // m)
    buf = np.empty((rows + 1, m))
    row_sums = np.empty(n) if 0 in dims else None
    col = None
    for i in range(0, n, rows):
        blk = a[i:i + rows]
        k = len(blk)
        sq = buf[1:k + 1]
        np.square(blk, out=sq, dtype=np.float64)
        if row_sums is not None:
            sq.sum(axis=1, out=row_sums[i:i + k])
        if 1 in dims:
            if col is None:
                col = sq.sum(axis=0)
            else:
                buf[0] = col
                col = buf[:k + 1].sum(axis=0)
    out = {}
    if row_sums is not None:
        out[0] = row_sums
    if col is not None:
        out[1] = col
    return out


def _group_sq_norms(analysis: "Analysis", g: "ChannelGroup", tensors: dict, cache: dict,
                    coords_of: Optional[dict] = None) -> np.ndarray:
    store = analysis.store
    coords_of = {} if coords_of is None else coords_of  # layout -> its coordinates (many params share one)
    head = analysis.group(g.head_group) if g.per_head else None
    acc = np.zeros((head.size, g.size) if head else g.size)
    for name, dim in g.params:
        sq = cache[name, dim]
        lay = analysis.params[name].dims[dim]
        coords = coords_of.get(lay)
        if coords is None:
            coords = coords_of[lay] = layout_coords(store, lay)[1]
        c = coords[g.axis]
        valid = c >= 0
        if head is not None and head.axis in coords:
            h = coords[head.axis]
            both = valid & (h >= 0)
            np.add.at(acc, (h[both], c[both]), sq[both])
        elif head is not None:
            acc += np.bincount(c[valid], weights=sq[valid], minlength=g.size)[None, :] / head.size
        else:
            np.add.at(acc, c[valid], sq[valid])
    return acc
