"""Gates: one multiplicative variable per prunable unit, applied to every weight linked to it.

A gate ``g_u`` scales every parameter slice that belongs to unit ``u`` of a channel group (for a
Linear producing channel ``u``: its row and bias entry; for the consumer: its column; LayerNorm
weights of a residual channel; the per-head slices of a head).  At ``g = 1`` the model is
unchanged and ``dL/dg_u = sum_{w in u} w * dL/dw``, the quantity NViT's saliency is built from;
``g_u = 0`` zeroes the unit.  Works for any analysed model: the parameter slices come from the
analysis' layouts, not from module types.

:class:`GateSet` is the one way the score passes gate a model: the Hessian and KL passes call
:meth:`GateSet.apply` with gate values, the learnable thresholds with their top-k masks, and the
threshold budget reads :meth:`GateSet.sites` / :meth:`GateSet.factor` for activation dims.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence

import torch

from vitgraph.analysis.kinds import PRUNABLE_KINDS
from vitgraph.analysis.selection import layout_coords
from vitgraph.errors import ArgumentError

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup

PRUNABLE = PRUNABLE_KINDS
HEADLESS = ("mean", "share")


@dataclass(frozen=True)
class _Site:
    """One group laid out along one tensor dim: flat gate index per position (-1: not the group's)."""

    gid: str
    index: torch.Tensor  # long, one entry per position along the dim
    head_mean: bool  # per-head gates on a dim without the head axis: use their mean over heads


class GateSet:
    """Gate vectors for the chosen groups of an analysis and the parameter slices they scale.

    A per-head group (``qk``, ``v``) has one gate per head and dim.  ``headless`` says what happens
    where one of its parameters lacks the head axis: ``"mean"`` gates that parameter with the mean
    over heads; ``"share"`` gives such a group one gate per dim, shared by every head.
    """

    def __init__(self, analysis: "Analysis", group_ids: Optional[Iterable[str]] = None,
                 kinds: Iterable[str] = PRUNABLE, headless: str = "mean") -> None:
        if headless not in HEADLESS:
            raise ArgumentError(f"headless must be one of {HEADLESS}, got {headless!r}")
        wanted = set(group_ids) if group_ids is not None else None
        kinds = tuple(kinds)
        self.analysis = analysis
        self.groups: list["ChannelGroup"] = [
            g for g in analysis.groups if (g.id in wanted if wanted is not None else g.kind in kinds)
        ]
        self._heads: dict[str, tuple[int, int]] = {}  # per-head gid -> (head axis, head count)
        for g in self.groups:
            if g.per_head and (headless == "mean" or _heads_everywhere(analysis, g)):
                head = analysis.group(g.head_group)
                self._heads[g.id] = (head.axis, head.size)
        self.shapes: dict[str, tuple[int, ...]] = {
            g.id: (self._heads[g.id][1], g.size) if g.id in self._heads else (g.size,) for g in self.groups
        }
        self._by_axis = {g.axis: g for g in self.groups}
        self._cache: dict[Any, list[_Site]] = {}
        # parameter name -> [(dim, site)], in group order, then the group's parameter order
        self.sites_of_params: dict[str, list[tuple[int, _Site]]] = {}
        for g in self.groups:
            for name, dim in g.params:
                site = self._site(g, self.analysis.params[name].dims[dim], uniform=False)
                self.sites_of_params.setdefault(name, []).append((dim, site))

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

    def sites(self, layout: Any, uniform: bool = False) -> list[_Site]:
        """Every group of the set laid out on a dim with this layout (``None``: an unlabelled dim).

        ``uniform``: the gate values will be equal across each group's units (keep ratios), so a
        per-head group on a dim without its head axis reads any head's gate instead of the mean.
        """
        if layout is None:
            return []
        hit = self._cache.get((layout, uniform))
        if hit is None:
            _, coords = layout_coords(self.analysis.store, layout)
            hit = [self._site(self._by_axis[a], layout, uniform, coords) for a in coords if a in self._by_axis]
            hit = [s for s in hit if bool((s.index >= 0).any())]
            self._cache[layout, uniform] = hit
        return hit

    def factor(self, sites: Sequence[_Site], gates: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
        """Per position along a dim: the product of the gates of ``sites`` (``None``: no gate there)."""
        out = None
        for s in sites:
            v = self._values(s, gates)
            if v is not None:
                out = v if out is None else out * v
        return out

    def apply(self, params: Mapping[str, torch.Tensor], gates: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        """Parameters with every slice multiplied by its units' gates (missing gates count as 1)."""
        out = dict(params)
        for name, sites in self.sites_of_params.items():
            w = out.get(name)
            if w is None:
                continue
            for dim, s in sites:
                factor = self._values(s, gates)
                if factor is None:
                    continue
                shape = [1] * w.dim()
                shape[dim] = -1
                w = w * factor.reshape(shape).to(w.dtype)
            out[name] = w
        return out

    def _values(self, s: _Site, gates: Mapping[str, torch.Tensor]) -> Optional[torch.Tensor]:
        g = gates.get(s.gid)
        if g is None:
            return None
        if s.head_mean:
            g = g.reshape(self.shapes[s.gid]).mean(0)
        idx = s.index.to(g.device)
        # positions outside the group keep factor 1: index a padded gate vector
        padded = torch.cat([g, g.new_ones(1)])
        return padded[torch.where(idx >= 0, idx, torch.full_like(idx, g.numel()))]

    def _site(self, g: "ChannelGroup", layout: Any, uniform: bool,
              coords: Optional[Mapping[int, Any]] = None) -> _Site:
        if coords is None:
            _, coords = layout_coords(self.analysis.store, layout)
        c = torch.as_tensor(coords[g.axis])
        head_mean = False
        if g.id in self._heads:
            head_axis, _ = self._heads[g.id]
            if head_axis in coords:
                h = torch.as_tensor(coords[head_axis])
                c = torch.where((c >= 0) & (h >= 0), h * g.size + c, torch.full_like(c, -1))
            else:
                head_mean = not uniform  # equal gates on every head: any head's gate is the mean
        return _Site(g.id, c.long(), head_mean)


def _heads_everywhere(analysis: "Analysis", g: "ChannelGroup") -> bool:
    """Whether every parameter dim that holds the per-head group ``g`` also holds its head axis."""
    if g.head_group is None:
        return False
    head_axis = analysis.group(g.head_group).axis
    for name, dim in g.params:
        _, coords = layout_coords(analysis.store, analysis.params[name].dims[dim])
        if g.axis in coords and head_axis not in coords:
            return False
    return True


def model_tensors(gm: torch.nn.Module) -> dict[str, torch.Tensor]:
    """Detached parameters and buffers of ``gm`` by name (the base for gated calls)."""
    out = {k: v.detach() for k, v in gm.named_parameters()}
    out.update({k: v for k, v in gm.named_buffers()})
    return out
