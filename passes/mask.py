"""Mask pass: the dense model with the channels a plan removes set to zero."""
from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn

from vitgraph.selection import Selection


def apply_mask(model: nn.Module, analysis: Any, sel: Selection) -> nn.Module:
    """A copy of ``model`` whose parameters are zero wherever the plan removes a channel."""
    out = copy.deepcopy(model)
    tensors = dict(out.named_parameters())
    tensors.update(dict(out.named_buffers()))
    with torch.no_grad():
        for name, td in analysis.params.items():
            t = tensors.get(name)
            if t is None:
                continue
            for d, lay in enumerate(td.dims):
                kept = sel.kept(lay)
                if kept is None or len(kept) == t.shape[d]:
                    continue
                drop = torch.ones(t.shape[d], dtype=torch.bool)
                drop[torch.as_tensor(kept, dtype=torch.long)] = False
                idx = [slice(None)] * t.dim()
                idx[d] = drop
                t[tuple(idx)] = 0
    return out
