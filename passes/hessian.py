"""Hessian-aware saliency (NViT): second-order importance of every unit, one global ranking.

Each unit ``S`` (a residual channel, a head, a per-head q/k or v dim, an FFN channel) has a gate
``g_S`` scaling every weight linked to it (``passes.gates``).  Three estimates of the unit's
second-order saliency are offered:

* ``"fisher"`` (the default): the empirical Fisher diagonal, per example ``i``
  ``c_{S,i} = dL_i/dg_S = sum_{w in S} w * dL_i/dw``, divided by the group kind's factor, squared
  and summed over examples: ``I_S = sum_i c_{S,i}^2``.  Per-example gradients come from
  ``torch.func.vmap(grad)`` over ``chunk`` examples at a time (one batched forward and backward).
  With ``joint`` (the default) q/k, v and FFN units are ranked by their group's whole Fisher
  block ``G = sum_i c_i c_i^T``, not its diagonal: a set of units removed together costs
  ``sum_{u,v} G_uv``, and units go in the greedy removal order of that form (``passes.joint``;
  residual channels and heads keep the diagonal).  The diagonal ignores that redundant units
  compound; on a converged model (scikit-learn's digits) it ranked below the weight norm and the
  joint form above it (benchmarks/results/criteria.md).
* ``"batch"`` (NViT's code): the same with ``c_S`` the gradient of the *batch-mean* loss, squared
  per batch.  Near convergence the batch-mean gradient is a small mean plus noise, so its square
  over a few dozen batches is a noisy, mean-dominated estimate of the per-example second moment
  that ``"fisher"`` averages over every example (benchmarks/results/criteria.md compares the two).
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
from torch.func import functional_call, grad, vmap

from vitgraph.distributed import all_reduce_sum
from vitgraph.passes.gates import PRUNABLE, GateSet, model_tensors
from vitgraph.passes.joint import FisherBlocks
from vitgraph.passes.scoring_common import LossFn, default_loss, log, scoring_batches, scoring_graph
from vitgraph.errors import ScoreError

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis

MODES = ("fisher", "batch", "hvp")


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
    chunk: int = 8,
    joint: bool = True,
) -> dict[str, torch.Tensor]:
    """Per-unit Hessian-aware saliency of every group of ``kinds`` (shapes as ``Plan.from_scores``).

    ``data`` yields ``(inputs, targets)``; ``loss_fn(output, targets)`` defaults to
    cross-entropy; in ``"fisher"`` mode it is called on one example at a time (output and
    targets with a batch of 1, under ``vmap``), and ``joint`` ranks q/k, v and FFN groups by their
    Fisher block instead of its diagonal (``mode="fisher"`` only); ``chunk`` examples per batched backward (each
    holds ``chunk`` per-example weight gradients: on DeiT-S at batch 16, chunk 8 took 1.0-1.3x a
    training step and chunk 16 2.5-3.8x, the larger copies falling out of cache).  Under
    torch.distributed each rank scores its share of the batches and the sums are reduced, so the
    result does not depend on the number of processes.
    """
    if mode not in MODES:
        raise ScoreError(f"hessian mode must be one of {MODES}, got {mode!r}")
    if probes < 1 or chunk < 1:
        raise ScoreError(f"probes and chunk must be >= 1, got {probes} and {chunk}")
    loss_fn = loss_fn or default_loss
    gates = GateSet(analysis, kinds=kinds)
    if not gates.groups:
        raise ScoreError(f"the analysis has no groups of kinds {tuple(kinds)} to score")
    factors = dict(default_kind_factors(analysis))
    factors.update(kind_factors or {})
    gm = analysis.graph_module
    was_training = gm.training
    gm.eval()
    if device is not None:
        gm.to(device)
    base = model_tensors(gm)
    vgm = scoring_graph(gm).eval() if mode == "fisher" else None
    acc = {gid: torch.zeros(gates.numel(gid), dtype=torch.float64, device=device) for gid in gates.shapes}
    blocks = FisherBlocks(gates, device) if joint and mode == "fisher" else None
    scale = {gid: 1.0 / factors[_kind(gates, gid)] for gid in gates.shapes}
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
            if mode == "fisher":
                for gid, c2 in _per_example_sq(vgm, gates, base, inputs, targets, loss_fn, ones, chunk, blocks,
                                               scale).items():
                    acc[gid] += c2 * scale[gid] ** 2
            elif mode == "batch":
                for gid, c in gate_grads(ones).items():
                    acc[gid] += (c.double() / factors[_kind(gates, gid)]) ** 2
            else:
                g0 = gate_grads(ones)
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
    out = {gid: gates.unflatten(gid, v.float().cpu()) for gid, v in total.items()}
    if blocks is not None:  # q/k, v and FFN groups: the joint ranking (the others keep the diagonal)
        blocks.blocks = all_reduce_sum(blocks.blocks)
        out.update({gid: gates.unflatten(gid, v) for gid, v in blocks.scores().items()})
    return out


def _per_example_sq(gm, gates: GateSet, base, inputs, targets, loss_fn, ones, chunk: int,
                    blocks: Optional[FisherBlocks] = None, scale: Optional[Mapping[str, float]] = None,
                    ) -> dict[str, torch.Tensor]:
    """``sum_i (dL_i / dg)^2`` over the examples of one batch, ``L_i`` the loss of example ``i`` alone;
    ``blocks`` also receives every ``dL_i / dg`` (times ``scale[gid]``)."""
    if targets is not None and not isinstance(targets, torch.Tensor):
        raise ScoreError("hessian mode 'fisher' needs tensor targets (one per example) to take per-example "
                         f"gradients, got {type(targets).__name__}; use mode='batch' for other targets")

    def loss_one(g: dict[str, torch.Tensor], one: tuple[torch.Tensor, ...], t: Optional[torch.Tensor]) -> torch.Tensor:
        out = functional_call(gm, gates.apply(base, g), tuple(x.unsqueeze(0) for x in one))
        return loss_fn(out, None if t is None else t.unsqueeze(0))

    per_example = vmap(grad(loss_one), in_dims=(None, 0, None if targets is None else 0))
    b = inputs[0].shape[0]
    out = {gid: torch.zeros_like(v, dtype=torch.float64) for gid, v in ones.items()}
    for start in range(0, b, chunk):
        sl = slice(start, start + chunk)
        grads = per_example(ones, tuple(x[sl] for x in inputs), None if targets is None else targets[sl])
        for gid, gr in grads.items():
            out[gid] += (gr.double() ** 2).sum(0)
        if blocks is not None:
            blocks.add({gid: gr * scale[gid] for gid, gr in grads.items()})
    return out


def _kind(gates: GateSet, gid: str) -> str:
    return gates.analysis.group(gid).kind
