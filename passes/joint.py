"""Joint second-order saliency: the Fisher quadratic form over the *set* of removed units.

The diagonal saliency ``I_u = sum_n c_{n,u}^2`` (``c_{n,u} = dL_n / dg_u``, one gate per unit)
prices every unit as if it were the only one removed.  Removing a set ``R`` of a group moves the
gates by ``delta = -1`` on ``R``, and the second-order change of the loss is
``1/2 delta^T F delta = 1/2 sum_{u, v in R} G_uv`` with ``G = sum_n c_n c_n^T`` the group's
(empirical or output) Fisher block.  Units whose per-example gradients point the same way
(redundant channels) compound; opposed ones cancel.  The diagonal form drops these cross terms,
which is what made it rank below the weight norm on a converged model
(benchmarks/results/criteria.md).

:class:`FisherBlocks` accumulates ``G`` per group (one ``[dims, dims]`` block per head for per-head
q/k and v groups, whose planner removes the same dims' count from every head).  :func:`greedy_scores`
turns a block into scores: units are removed greedily, each time the one whose removal adds least
to the quadratic form given the ones removed before,

    gain(u | R) = G_uu + 2 sum_{v in R} G_uv,

and a unit's score is that marginal gain, made non-decreasing along the greedy order (a running
maximum, ties broken in that order), so ``Plan.from_scores`` and the planner, which remove the
lowest scores first, remove units in the greedy order and sum marginal costs across groups.
Only the kinds whose units are removed inside one block take the joint form (``JOINT_KINDS``:
q/k, v and FFN).  Residual channels keep the diagonal: every LayerNorm they feed is invariant to
scaling all of its input channels, so their gate gradients nearly sum to zero and the quadratic
form has a near-null direction along "remove every channel", which prices large residual cuts far
below their cost (a pruned ViT lost a third of its residual width to it).  Heads keep it too.
Memory is ``sum_group units^2`` floats (ViT-B: about 0.45 GB, mostly the twelve 3072-wide FFN
blocks); the greedy pass is ``O(units^2)`` per group.
"""
from __future__ import annotations

from typing import TYPE_CHECKING, Mapping, Optional

import torch

if TYPE_CHECKING:
    from vitgraph.passes.gates import GateSet


JOINT_KINDS = ("qk", "v", "ffn")


class FisherBlocks:
    """Per-group Fisher blocks ``G = sum_n w_n c_n c_n^T`` of gate gradients ``c_n``, accumulated
    for the groups of ``kinds`` (the others are left to the diagonal)."""

    def __init__(self, gates: "GateSet", device: Optional[torch.device] = None,
                 kinds: tuple[str, ...] = JOINT_KINDS) -> None:
        self.gates = gates
        self.blocks: dict[str, torch.Tensor] = {}
        for gid, shape in gates.shapes.items():
            if gates.analysis.group(gid).kind not in kinds:
                continue
            if len(shape) == 2:  # per head: one block per head
                h, d = shape
                self.blocks[gid] = torch.zeros(h, d, d, dtype=torch.float32, device=device)
            else:
                u = shape[0]
                self.blocks[gid] = torch.zeros(u, u, dtype=torch.float32, device=device)

    def add(self, grads: Mapping[str, torch.Tensor], weights: Optional[torch.Tensor] = None) -> None:
        """Add per-example flat gate gradients ``grads[gid]`` (``[n, units]``), optionally weighted."""
        for gid, c in grads.items():
            if gid not in self.blocks:
                continue
            c = c.float()
            cw = c if weights is None else c * weights.to(c)[:, None]
            blk = self.blocks[gid]
            if blk.dim() == 3:
                h, d, _ = blk.shape
                cw3, c3 = cw.reshape(-1, h, d), c.reshape(-1, h, d)
                blk += torch.einsum("nhi,nhj->hij", cw3, c3)
            else:
                blk += cw.T @ c

    def scores(self) -> dict[str, torch.Tensor]:
        """Greedy joint scores of every blocked group, shaped as ``GateSet.unflatten`` shapes them."""
        out = {}
        for gid, blk in self.blocks.items():
            if blk.dim() == 3:
                out[gid] = torch.stack([greedy_scores(b) for b in blk])
            else:
                out[gid] = greedy_scores(blk)
        return out


def greedy_scores(gram: torch.Tensor) -> torch.Tensor:
    """Scores (float64) of a block's units from the greedy removal order of its quadratic form."""
    g = gram.double().cpu()
    g = 0.5 * (g + g.T)  # accumulated in float32: make it exactly symmetric
    u = g.shape[0]
    cross = torch.zeros(u, dtype=torch.float64)  # sum over removed v of G_uv
    diag = g.diagonal().clone()
    left = torch.ones(u, dtype=torch.bool)
    scores = torch.empty(u, dtype=torch.float64)
    inf = torch.tensor(float("inf"), dtype=torch.float64)
    running = 0.0
    for k in range(u):
        gain = torch.where(left, diag + 2.0 * cross, inf)
        i = int(gain.argmin())
        running = max(running, float(gain[i]))
        # the running maximum keeps the order; the relative nudge keeps it among equal maxima
        scores[i] = running * (1.0 + 1e-9 * k)
        left[i] = False
        cross += g[i]
    return scores
