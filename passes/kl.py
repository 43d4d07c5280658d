"""KL importance (UP-ViT): how far the output distribution moves when one unit is removed.

``s_u = sum_x KL(q(x) || p_u(x))`` over a proxy set, ``q`` the original model's softmax output
and ``p_u`` the output with unit ``u`` zeroed (every weight linked to it gated to 0, see
``passes.gates``).  Two modes:

* ``"exact"``: the definition, by batched masking: ``torch.func.vmap`` runs ``chunk`` masked
  copies of the weights in one forward pass, so a group of ``N`` units costs ``N / chunk`` passes
  per batch instead of one model per unit.
* ``"approx"``: the second-order expansion.  ``KL`` is zero with zero gradient at ``g = 1``, so
  ``KL(q || p_u) ~= 1/2 F_uu``, ``F`` the Fisher information of the output distribution in the
  gates: ``F_uu = E_x E_{y ~ q(x)} (d log p_y(x) / d g_u)^2``.  Per-example gradients come from
  ``vmap(grad)``; the expectation over ``y`` is exact for up to ``max_exact_classes`` classes and
  sampled (``samples`` draws) above that.  Its cost is ``classes`` (or ``samples``) backward passes
  over the proxy set, independent of the number of units.  With ``joint`` (the default) the
  whole Fisher block of each q/k, v and FFN group is kept and units are ranked by the greedy removal order of
  ``1/2 delta^T F delta`` (``passes.joint``): removing a set costs more than the sum of its
  units' KLs when they carry the same signal.

A model without class logits (a backbone, an embedding model: ``objective="features"``) has a
Gaussian output distribution instead: each floating output tensor centred on the model's value,
with a variance proportional to its mean squared norm over the batch, so the KL of removing a unit is the
feature-distillation error it causes (normalised MSE of the outputs, averaged over them),
and ``"approx"`` estimates the Fisher from ``samples`` Gaussian probes per example.

Residual channels are zeroed, not removed: LayerNorm statistics still count them, so their scores
measure a slightly different change than slicing does (UP-ViT's code masks the same way).
"""
from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch.func import functional_call, grad, vmap

from vitgraph.distributed import all_reduce_sum
from vitgraph.passes.gates import PRUNABLE, GateSet, model_tensors
from vitgraph.passes.joint import FisherBlocks
from vitgraph.passes.scoring_common import (OBJECTIVES, feature_errors, log, logits_of, output_kind, output_tensors,
                                            scoring_batches, scoring_graph)
from vitgraph.errors import ScoreError

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis

MODES = ("exact", "approx")


def kl_scores(
    analysis: "Analysis",
    data: Iterable[Any],
    mode: str = "approx",
    kinds: Iterable[str] = PRUNABLE,
    chunk: int = 16,
    samples: int = 4,
    max_exact_classes: int = 16,
    temperature: float = 1.0,
    max_batches: Optional[int] = None,
    device: Optional[torch.device] = None,
    seed: int = 0,
    log_every: int = 10,
    joint: bool = True,
    objective: Optional[str] = None,
) -> dict[str, torch.Tensor]:
    """Per-unit KL importance of every group of ``kinds`` (shapes as ``Plan.from_scores`` takes).

    ``data`` yields input batches or ``(inputs, targets)`` (targets are ignored: the original
    model is the reference).  Under torch.distributed the batches are sharded and sums reduced.
    ``objective`` (default: :func:`~vitgraph.passes.scoring_common.output_kind` of the output) is
    ``"logits"``, the categorical distribution of the class logits, or ``"features"``: every floating
    output tensor as a Gaussian whose variance scales with its mean squared norm, so the KL is
    the feature-distillation error (:func:`~vitgraph.passes.scoring_common.feature_errors`) the unit's
    removal causes, and the approximation draws ``samples`` Gaussian probes per example.
    """
    _check(mode, chunk, samples, objective)
    gates = GateSet(analysis, kinds=kinds)
    if not gates.groups:
        raise ScoreError(f"the analysis has no groups of kinds {tuple(kinds)} to score")
    src = analysis.graph_module
    was_training = src.training
    if device is not None:
        src.to(device)
    gm = scoring_graph(src).eval()
    base = model_tensors(gm)
    acc = {gid: torch.zeros(gates.numel(gid), dtype=torch.float64, device=device) for gid in gates.shapes}
    blocks = FisherBlocks(gates, device) if joint and mode == "approx" else None
    gen = torch.Generator(device="cpu").manual_seed(seed)
    n, t0 = 0, time.perf_counter()
    try:
        for inputs, _ in scoring_batches(data, max_batches, device):
            with torch.no_grad():
                ref = gm(*inputs)
            objective = objective or output_kind(ref, analysis.model)
            opts = (chunk, samples, max_exact_classes, temperature)
            _score_batch(gm, gates, base, inputs, ref, objective, mode, opts, gen, acc, blocks)
            n += 1
            if log_every and n % log_every == 0:
                log.info("kl (%s): %d batches, %.1f s", mode, n, time.perf_counter() - t0)
    finally:
        src.train(was_training)
    total = all_reduce_sum(acc)
    out = {gid: gates.unflatten(gid, v.float().cpu()) for gid, v in total.items()}
    if blocks is not None:  # q/k, v and FFN groups: the joint ranking (the others keep the diagonal)
        blocks.blocks = all_reduce_sum(blocks.blocks)
        out.update({gid: gates.unflatten(gid, v) for gid, v in blocks.scores().items()})
    return out


def _check(mode: str, chunk: int, samples: int, objective: Optional[str]) -> None:
    if mode not in MODES:
        raise ScoreError(f"kl mode must be one of {MODES}, got {mode!r}")
    if objective is not None and objective not in OBJECTIVES:
        raise ScoreError(f"objective must be one of {OBJECTIVES} (or None: from the output), got {objective!r}")
    if chunk < 1 or samples < 1:
        raise ScoreError(f"chunk and samples must be >= 1, got {chunk} and {samples}")


def _score_batch(gm, gates: GateSet, base, inputs, ref, objective: str, mode: str, opts: tuple, gen, acc,
                 blocks: Optional[FisherBlocks]) -> None:
    """Add one batch's divergences to ``acc``; ``opts`` is (chunk, samples, max_exact_classes, temperature)."""
    chunk, samples, max_exact, temperature = opts
    if objective == "features" and mode == "exact":
        _exact_batch(gm, gates, base, inputs, _features_distance(ref), chunk, acc)
    elif objective == "features":
        _approx_features_batch(gm, gates, base, inputs, ref, chunk, samples, gen, acc, blocks)
    elif mode == "exact":
        _exact_batch(gm, gates, base, inputs, _kl_distance(ref, temperature), chunk, acc)
    else:
        logq = F.log_softmax(logits_of(ref).double() / temperature, -1)
        _approx_batch(gm, gates, base, inputs, logq, temperature, chunk, samples, max_exact, gen, acc, blocks)


def _kl_distance(ref: Any, temperature: float) -> tuple[Any, Any]:
    """What ``_exact_batch`` keeps of each masked output (the logits) and its summed KL from ``ref``'s."""
    logq = F.log_softmax(logits_of(ref).double() / temperature, -1)

    def distance(logits: torch.Tensor) -> torch.Tensor:
        logp = F.log_softmax(logits.double() / temperature, -1)
        return (logq.exp() * (logq - logp)).sum(dim=(-1, -2))

    return logits_of, distance


def _features_distance(ref: Any) -> tuple[Any, Any]:
    """What ``_exact_batch`` keeps of each masked output (its floating tensors) and its summed feature error."""
    return (lambda out: tuple(output_tensors(out))), (lambda outs: feature_errors(outs, ref).double().sum(-1))


def _exact_batch(gm, gates: GateSet, base, inputs, measure: tuple[Any, Any], chunk, acc) -> None:
    """Every unit's divergence by masking it: ``measure`` is (what to keep of an output, its distance
    from the reference summed over the batch, for a leading axis of ``chunk`` masked copies)."""
    pick, distance = measure
    for gid in gates.shapes:
        n = gates.numel(gid)

        def run(gv: torch.Tensor) -> Any:
            return pick(functional_call(gm, gates.apply(base, {gid: gv}), inputs))

        for start in range(0, n, chunk):
            k = min(chunk, n - start)
            masks = torch.ones(k, n, device=inputs[0].device)
            masks[torch.arange(k), start + torch.arange(k)] = 0.0  # row j removes unit start + j
            with torch.no_grad():
                acc[gid][start:start + k] += distance(vmap(run)(masks))


def _accumulate(grads: dict[str, torch.Tensor], w: torch.Tensor, acc, blocks: Optional[FisherBlocks]) -> None:
    """Add weighted per-example gate gradients: ``KL ~ 1/2 F_uu``, ``F = E[g g^T]`` (and the joint blocks)."""
    for gid, gr in grads.items():
        acc[gid] += 0.5 * (w[:, None].to(torch.float64) * gr.double() ** 2).sum(0)
    if blocks is not None:
        blocks.add(grads, weights=0.5 * w)


def _approx_features_batch(gm, gates: GateSet, base, inputs, ref, chunk, samples, gen, acc,
                           blocks: Optional[FisherBlocks] = None) -> None:
    """The Gaussian output distribution's Fisher from ``samples`` probes per example.

    Output tensor ``t_k`` of ``K`` is ``N(t_k, sigma_k^2)`` with ``sigma_k^2 = K m_k / 2``, ``m_k`` its
    mean squared norm over the batch, so ``KL = 1/K sum_k ||t_k - s_k||^2 / m_k`` (the feature error)
    and its Fisher is ``E_z g g^T`` with ``g`` the gate gradient of ``sum_k <z_k, s_k> / sigma_k``,
    ``z ~ N(0, I)``.
    """
    refs = output_tensors(ref)
    b = refs[0].shape[0]
    idx = torch.arange(b, device=refs[0].device).repeat_interleave(samples)
    probes = []
    for t in refs:
        inv_sigma = (2.0 / (len(refs) * t.reshape(b, -1).float().pow(2).sum(-1).mean().clamp_min(1e-12))) ** 0.5
        z = torch.randn((b * samples, *t.shape[1:]), generator=gen).to(device=t.device, dtype=torch.float32)
        probes.append(z * float(inv_sigma))

    def project(g: dict[str, torch.Tensor], one: tuple[torch.Tensor, ...], z: tuple[torch.Tensor, ...]) -> torch.Tensor:
        outs = output_tensors(functional_call(gm, gates.apply(base, g), tuple(t.unsqueeze(0) for t in one)))
        return sum((o[0].float() * zk).sum() for o, zk in zip(outs, z))

    per_example = vmap(grad(project), in_dims=(None, 0, 0))
    ones = gates.ones(device=refs[0].device)
    for start in range(0, len(idx), chunk):
        sl = slice(start, start + chunk)
        grads = per_example(ones, tuple(t[idx[sl]] for t in inputs), tuple(z[sl] for z in probes))
        _accumulate(grads, torch.full((len(idx[sl]),), 1.0 / samples, device=refs[0].device), acc, blocks)


def _approx_batch(gm, gates: GateSet, base, inputs, logq, temperature, chunk, samples, max_exact, gen, acc,
                  blocks: Optional[FisherBlocks] = None) -> None:
    q = logq.exp()
    b, classes = q.shape
    if classes <= max_exact:  # every class, weighted by q
        ys = torch.arange(classes, device=q.device).repeat(b)
        xs_idx = torch.arange(b, device=q.device).repeat_interleave(classes)
        weights = q.reshape(-1)
    else:  # y ~ q, each draw weighted 1 / samples
        ys = torch.multinomial(q.float().cpu(), samples, replacement=True, generator=gen).to(q.device).reshape(-1)
        xs_idx = torch.arange(b, device=q.device).repeat_interleave(samples)
        weights = torch.full((b * samples,), 1.0 / samples, dtype=q.dtype, device=q.device)

    def logp_y(g: dict[str, torch.Tensor], one: tuple[torch.Tensor, ...], y_hot: torch.Tensor) -> torch.Tensor:
        out = logits_of(functional_call(gm, gates.apply(base, g), tuple(t.unsqueeze(0) for t in one)))
        return (F.log_softmax(out / temperature, -1)[0] * y_hot).sum()

    per_example = vmap(grad(logp_y), in_dims=(None, 0, 0))
    ones = gates.ones(device=q.device)
    for start in range(0, len(ys), chunk):
        sl = slice(start, start + chunk)
        sel = xs_idx[sl]
        y_hot = F.one_hot(ys[sl], classes).to(next(iter(ones.values())).dtype)
        grads = per_example(ones, tuple(t[sel] for t in inputs), y_hot)
        _accumulate(grads, weights[sl], acc, blocks)  # F_uu = sum_y q_y (d log p_y / d g_u)^2
