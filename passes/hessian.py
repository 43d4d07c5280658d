"""Hessian-aware saliency (NViT): second-order importance of every unit, one global ranking.

Each unit ``S`` (a residual channel, a head, a per-head q/k or v dim, an FFN channel) has a gate
``g_S`` scaling every weight linked to it (``passes.gates``).  Two estimates of the unit's
second-order saliency are offered:

* ``"fisher"`` (NViT's code): per batch ``c_S = dL/dg_S = sum_{w in S} w * dL/dw``, divided by
  the group kind's factor, squared and summed over batches.  One forward and backward per batch.
* ``"hvp"`` (NViT's paper): ``E_z || (grad_g L(g + h z) - grad_g L(g)) / h ||^2_S`` with
  ``z ~ N(0, 1)``: the squared ``S`` entry of a finite-difference Hessian-vector product,
  averaged over ``probes`` draws.  ``1 + probes`` backward passes per batch.

Kind factors make one ranking compare units of different kinds: a residual channel touches
every block, a head many dims.  NViT divides DeiT-B's ``c_S`` by 12 (residual), 6 (heads) and 2
(q/k, v); the defaults generalise this to ``n`` blocks: ``n``, ``n / 2``, 2, 2 and 1 (FFN).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional

import torch
from torch.func import functional_call

from vitgraph.distributed import all_reduce_sum
from vitgraph.passes.gates import PRUNABLE, GateSet, model_tensors
from vitgraph.passes.scoring_common import LossFn, default_loss, log, scoring_batches

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis

MODES = ("fisher", "hvp")


def default_kind_factors(analysis: "Analysis") -> dict[str, float]:
    """NViT's per-kind divisors generalised to the number of blocks (attention or MLP groups)."""
    blocks = max(sum(g.kind == "head" for g in analysis.groups), sum(g.kind == "ffn" for g in analysis.groups), 1)
    return {"residual": float(blocks), "head": max(blocks / 2.0, 1.0), "qk": 2.0, "v": 2.0, "ffn": 1.0, "other": 1.0}


def hessian_scores(
    analysis: "Analysis",
    data: Iterable[Any],
    loss_fn: Optional[LossFn] = None,
    mode: str = "fisher",
    kinds: Iterable[str] = PRUNABLE,
    kind_factors: Optional[Mapping[str, float]] = None,
    h: float = 1e-3,
    probes: int = 1,
    max_batches: Optional[int] = None,
    device: Optional[torch.device] = None,
    seed: int = 0,
    log_every: int = 10,
) -> dict[str, torch.Tensor]:
    """Per-unit Hessian-aware saliency of every group of ``kinds`` (shapes as ``Plan.from_scores``).

    ``data`` yields ``(inputs, targets)``; ``loss_fn(output, targets)`` defaults to
    cross-entropy.  Under torch.distributed each rank scores its share of the batches and the
    sums are reduced, so the result does not depend on the number of processes.
    """
    if mode not in MODES:
        raise ValueError(f"hessian mode must be one of {MODES}, got {mode!r}")
    if probes < 1:
        raise ValueError(f"probes must be >= 1, got {probes}")
    loss_fn = loss_fn or default_loss
    gates = GateSet(analysis, kinds=kinds)
    if not gates.groups:
        raise ValueError(f"the analysis has no groups of kinds {tuple(kinds)} to score")
    factors = dict(default_kind_factors(analysis))
    factors.update(kind_factors or {})
    gm = analysis.graph_module
    was_training = gm.training
    gm.eval()
    if device is not None:
        gm.to(device)
    base = model_tensors(gm)
    acc = {gid: torch.zeros(gates.numel(gid), dtype=torch.float64, device=device) for gid in gates.shapes}
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n = 0
    t0 = time.perf_counter()
    try:
        for inputs, targets in scoring_batches(data, max_batches, device):

            def gate_grads(g: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
                g = {k: v.detach().requires_grad_(True) for k, v in g.items()}
                out = functional_call(gm, gates.apply(base, g), inputs)
                grads = torch.autograd.grad(loss_fn(out, targets), list(g.values()), allow_unused=True)
                return {k: (gr if gr is not None else torch.zeros_like(g[k])).detach() for k, gr in zip(g, grads)}

            ones = gates.ones(device=device)
            g0 = gate_grads(ones)
            if mode == "fisher":
                for gid, c in g0.items():
                    acc[gid] += (c.double() / factors[_kind(gates, gid)]) ** 2
            else:
                for _ in range(probes):
                    z = {k: torch.randn(v.shape, generator=gen).to(v) for k, v in ones.items()}
                    g1 = gate_grads({k: ones[k] + h * z[k] for k in ones})
                    for gid in acc:
                        hz = (g1[gid].double() - g0[gid].double()) / h
                        acc[gid] += (hz / factors[_kind(gates, gid)]) ** 2 / probes
            n += 1
            if log_every and n % log_every == 0:
                log.info("hessian (%s): %d batches, %.1f s", mode, n, time.perf_counter() - t0)
    finally:
        gm.train(was_training)
    total = all_reduce_sum(acc)
    return {gid: gates.unflatten(gid, v.float().cpu()) for gid, v in total.items()}


def _kind(gates: GateSet, gid: str) -> str:
    return gates.analysis.group(gid).kind
