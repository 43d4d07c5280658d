"""Mask pass: the dense model with the channels a plan removes set to zero."""
from __future__ import annotations

import copy
from typing import Any, Optional

import torch
from torch import nn

from vitgraph.analysis.selection import Selection


def kept_elements(shape: torch.Size, dims: Any, sel: Selection) -> Optional[torch.Tensor]:
    """Boolean mask over a tensor of ``shape`` laid out as ``dims``: True where the plan keeps it.

    ``None`` when the plan keeps every element.
    """
    keep = None
    for d, lay in enumerate(dims):
        kept = sel.kept(lay)
        if kept is None or len(kept) == shape[d]:
            continue
        along = torch.zeros(shape[d], dtype=torch.bool)
        along[torch.as_tensor(kept, dtype=torch.long)] = True
        view = [1] * len(shape)
        view[d] = -1
        along = along.reshape(view)
        keep = along if keep is None else keep & along
    return None if keep is None else keep.expand(shape)


def apply_mask(model: nn.Module, analysis: Any, sel: Selection) -> nn.Module:
    """A copy of ``model`` whose parameters are zero wherever the plan removes a channel."""
    out = copy.deepcopy(model)
    tensors = dict(out.named_parameters())
    tensors.update(dict(out.named_buffers()))
    with torch.no_grad():
        for name, td in analysis.params.items():
            t = tensors.get(name)
            keep = kept_elements(t.shape, td.dims, sel) if t is not None else None
            if keep is not None:
                t.masked_fill_(~keep.to(t.device), 0)
    return out
