"""Gates: one multiplicative variable per prunable unit, applied to every weight linked to it.

A gate ``g_u`` scales every parameter slice that belongs to unit ``u`` of a channel group (for a
Linear producing channel ``u``: its row and bias entry; for the consumer: its column; LayerNorm
weights of a residual channel; the per-head slices of a head).  At ``g = 1`` the model is
unchanged and ``dL/dg_u = sum_{w in u} w * dL/dw``, the quantity NViT's saliency is built from;
``g_u = 0`` zeroes the unit.  Works for any analysed model: the parameter slices come from the
analysis' layouts, not from module types.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Iterable, Mapping, Optional

import torch

from vitgraph.analysis.selection import layout_coords

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup

PRUNABLE = ("residual", "head", "qk", "v", "ffn")


@dataclass(frozen=True)
class _Site:
    """One (parameter dim, group) incidence: gate index per position along ``dim`` (-1: none)."""

    dim: int
    gid: str
    index: torch.Tensor  # long, len = param.shape[dim]; flat index into the group's gate vector
    head_mean: bool  # per-head group seen without its head axis: use the mean over heads


class GateSet:
    """Gate vectors for the chosen groups of an analysis and the parameter slices they scale."""

    def __init__(self, analysis: "Analysis", group_ids: Optional[Iterable[str]] = None,
                 kinds: Iterable[str] = PRUNABLE) -> None:
        wanted = set(group_ids) if group_ids is not None else None
        kinds = tuple(kinds)
        self.analysis = analysis
        self.groups: list["ChannelGroup"] = [
            g for g in analysis.groups if (g.id in wanted if wanted is not None else g.kind in kinds)
        ]
        self.shapes: dict[str, tuple[int, ...]] = {}
        for g in self.groups:
            self.shapes[g.id] = (analysis.group(g.head_group).size, g.size) if g.per_head else (g.size,)
        self.sites: dict[str, list[_Site]] = {}
        store = analysis.store
        for g in self.groups:
            head = analysis.group(g.head_group) if g.per_head else None
            for name, dim in g.params:
                _, coords = layout_coords(store, analysis.params[name].dims[dim])
                c = torch.as_tensor(coords[g.axis])
                head_mean = False
                if head is not None and head.axis in coords:
                    h = torch.as_tensor(coords[head.axis])
                    c = torch.where((c >= 0) & (h >= 0), h * g.size + c, torch.full_like(c, -1))
                elif head is not None:
                    head_mean = True
                self.sites.setdefault(name, []).append(_Site(dim, g.id, c.long(), head_mean))

    def numel(self, gid: str) -> int:
        """Number of gates (units) of a group: heads x dims for per-head groups."""
        n = 1
        for s in self.shapes[gid]:
            n *= s
        return n

    def ones(self, dtype: torch.dtype = torch.float32, device: Optional[torch.device] = None,
             requires_grad: bool = False) -> dict[str, torch.Tensor]:
        """Flat all-ones gate vectors (the unpruned model)."""
        return {gid: torch.ones(self.numel(gid), dtype=dtype, device=device, requires_grad=requires_grad)
                for gid in self.shapes}

    def unflatten(self, gid: str, flat: torch.Tensor) -> torch.Tensor:
        """A flat per-unit vector in the shape ``Plan.from_scores`` takes for this group."""
        return flat.reshape(self.shapes[gid])

    def apply(self, params: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters with every slice multiplied by its units' gates (missing gates count as 1)."""
        out = dict(params)
        for name, sites in self.sites.items():
            w = out.get(name)
            if w is None:
                continue
            for s in sites:
                g = gates.get(s.gid)
                if g is None:
                    continue
                if s.head_mean:
                    g = g.reshape(self.shapes[s.gid]).mean(0)
                idx = s.index.to(g.device)
                # positions outside the group keep factor 1: index a padded gate vector
                padded = torch.cat([g, g.new_ones(1)])
                factor = padded[torch.where(idx >= 0, idx, torch.full_like(idx, g.numel()))]
                shape = [1] * w.dim()
                shape[s.dim] = -1
                w = w * factor.reshape(shape).to(w.dtype)
            out[name] = w
        return out


def model_tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameters and buffers of ``gm`` by name (the base for gated calls)."""
    out = {k: v.detach() for k, v in gm.named_parameters()}
    out.update({k: v for k, v in gm.named_buffers()})
    return out
