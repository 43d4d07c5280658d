"""Head merging (UP-ViT): ``h_b`` heads become ``h_t`` heads of ``h_b / h_t`` consecutive heads each.

A head-major q/k/v layout ``(h_b, D)`` holds the same channels in the same order as
``(h_t, (h_b / h_t) * D)``, so merging changes no weight: only the head split constants in the
graph (``reshape(B, N, 3, h_b, D)`` -> ``reshape(B, N, 3, h_t, m * D)``) and the attention
scale, which keeps its original ``1 / sqrt(D)``.  The merged heads' q/k and v dims are then
ordinary per-head groups: analyse the merged model and keep the best ``D_t`` dims of each
(``head_merge_plan``), as UP-ViT takes DeiT-B's 12 x 64 heads to DeiT-T's 3 x 64.

Heads that carry their own parameters beyond the projections (relative position bias tables,
talking-heads mixers) cannot be merged this way; ``merge_heads`` refuses them and names the
parameter.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional, Union

import torch
import torch.fx as fx

from vitgraph.errors import PlanError
from vitgraph.analysis.selection import Selection

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis
    from vitgraph.planning.plan import Plan


class _ResizedSelection(Selection):
    """Keeps every channel but reports new sizes for some axes (a re-factoring, not a pruning)."""

    def __init__(self, store, sizes: Mapping[int, int]) -> None:
        super().__init__(store, {}, {})
        self.sizes = dict(sizes)

    def _axis_size(self, r: int) -> int:
        return self.sizes[r] if r in self.sizes else super()._axis_size(r)


def merge_heads(analysis: "Analysis", heads: Union[int, Mapping[str, int]]) -> fx.GraphModule:
    """The analysed model with each attention's heads merged into ``heads`` heads.

    ``heads`` is the new head count for every head group, or a mapping from head-group ids to
    new counts (groups not listed stay as they are).  Each count must divide the group's heads.
    """
    from vitgraph.passes.slim import slim

    targets = heads if isinstance(heads, Mapping) else {g.id: heads for g in analysis.groups if g.kind == "head"}
    if not targets:
        raise PlanError("the analysis has no head groups to merge")
    sizes: dict[int, int] = {}
    for gid, ht in targets.items():
        h = analysis.group(gid)
        if h.kind != "head":
            raise PlanError(f"group {gid!r} is a {h.kind} group, not a head group")
        if ht < 1 or h.size % ht:
            raise PlanError(f"group {gid!r}: {ht} heads do not divide its {h.size} heads")
        m = h.size // ht
        members = [g for g in analysis.groups if g.head_group == gid]
        if not members:
            raise PlanError(f"group {gid!r}: no per-head q/k or v dims found to merge into")
        _check_mergeable(analysis, h, members)
        sizes[h.axis] = ht
        for g in members:
            sizes[g.axis] = m * g.size
    return slim(analysis, _ResizedSelection(analysis.store, sizes))


def _check_mergeable(analysis: "Analysis", head, members) -> None:
    """Every parameter dim holding the head axis must hold it with a per-head dim (head-major)."""
    store = analysis.store
    inner = {g.axis for g in members}
    for name, td in analysis.params.items():
        for d, lay in enumerate(td.dims):
            if lay is None:
                continue
            for blk in store.expand(lay):
                roots = [store.find(a) for a in blk]
                leaves = [leaf for r in roots for leaf in store.axes_of(((r,),), leaves=True)]
                if head.axis not in leaves:
                    continue
                pos = leaves.index(head.axis)
                if pos + 1 >= len(leaves) or leaves[pos + 1] not in inner:
                    raise PlanError(f"cannot merge the heads of {head.id!r}: parameter {name} (dim {d}) "
                                    "has per-head entries of its own")


def head_merge_plan(merged: "Analysis", head_dim: int, scores: Optional[Mapping[str, torch.Tensor]] = None,
                    v_dim: Optional[int] = None) -> "Plan":
    """Keep the best ``head_dim`` q/k dims (``v_dim`` v dims, default the same) of each merged head.

    ``merged`` is the analysis of a :func:`merge_heads` result; ``scores`` as ``Plan.from_scores``
    takes them (missing: magnitude).  Heads keep their dims independently (per-head groups).
    """
    from vitgraph.planning.plan import Plan

    plan = Plan.keep_all(merged)
    want = {"qk": head_dim, "v": v_dim or head_dim}
    from vitgraph.planning.magnitude import magnitude_scores

    s = dict(scores or {})
    missing = [g.id for g in merged.groups if g.kind in want and s.get(g.id) is None]
    s.update(magnitude_scores(merged, missing))
    for g in merged.groups:
        if g.kind not in want:
            continue
        n = want[g.kind]
        if not 1 <= n <= g.size:
            raise PlanError(f"group {g.id!r}: cannot keep {n} of its {g.size} dims per head")
        t = torch.as_tensor(s[g.id], dtype=torch.float64)
        if t.dim() == 2 and g.per_head:
            plan.keep(g.id, [sorted(torch.topk(row, n).indices.tolist()) for row in t])
        else:
            plan.keep(g.id, sorted(torch.topk(t.reshape(-1, g.size).sum(0), n).indices.tolist()))
    return plan
