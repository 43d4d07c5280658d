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
    out = {}
    for g in analysis.groups:
        if g.id in ids:
            out[g.id] = torch.from_numpy(_group_sq_norms(analysis, g, tensors)).sqrt()
    return out


def _group_sq_norms(analysis: "Analysis", g: "ChannelGroup", tensors: dict) -> np.ndarray:
    store = analysis.store
    head = analysis.group(g.head_group) if g.per_head else None
    acc = np.zeros((head.size, g.size) if head else g.size)
    for name, dim in g.params:
        t = tensors[name].detach().float()
        lay = analysis.params[name].dims[dim]
        # squared norm of each slice along ``dim``
        other = [d for d in range(t.dim()) if d != dim]
        sq = (t.pow(2).sum(other) if other else t.pow(2)).numpy().astype(np.float64)
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
