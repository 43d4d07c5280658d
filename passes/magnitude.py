"""Magnitude score pass: importance of a unit = L2 norm of every weight that belongs to it."""
from __future__ import annotations

from typing import TYPE_CHECKING, Iterable, Optional

import numpy as np
import torch

from vitgraph.selection import layout_coords

if TYPE_CHECKING:
    from vitgraph.analysis import Analysis, ChannelGroup


def magnitude_scores(analysis: "Analysis", group_ids: Optional[Iterable[str]] = None) -> dict[str, torch.Tensor]:
    """Per-unit L2 norms for the given groups (all groups by default).

    ``qk``/``v`` groups that may differ per head get ``[heads, dims]`` scores.
    """
    ids = set(group_ids) if group_ids is not None else {g.id for g in analysis.groups}
    tensors = dict(analysis.graph_module.named_parameters())
    tensors.update(dict(analysis.graph_module.named_buffers()))
    sq_cache: dict[tuple[str, int], np.ndarray] = {}
    out = {}
    for g in analysis.groups:
        if g.id in ids:
            out[g.id] = torch.from_numpy(_group_sq_norms(analysis, g, tensors, sq_cache)).sqrt()
    return out


def slice_sq_norms(t: torch.Tensor, dim: int) -> np.ndarray:
    """Squared L2 norm of every slice of ``t`` along ``dim``."""
    a = t.detach().float().cpu().numpy()
    other = tuple(d for d in range(a.ndim) if d != dim)
    return np.square(a, dtype=np.float64).sum(axis=other) if other else np.square(a, dtype=np.float64)


def _group_sq_norms(analysis: "Analysis", g: "ChannelGroup", tensors: dict, cache: dict) -> np.ndarray:
    store = analysis.store
    head = analysis.group(g.head_group) if g.per_head else None
    acc = np.zeros((head.size, g.size) if head else g.size)
    for name, dim in g.params:
        if (name, dim) not in cache:
            cache[name, dim] = slice_sq_norms(tensors[name], dim)
        sq = cache[name, dim]
        lay = analysis.params[name].dims[dim]
        _, coords = layout_coords(store, lay)
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
