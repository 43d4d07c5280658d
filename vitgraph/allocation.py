"""Allocation by loss after reconstruction: which widths to keep at a FLOPs or params target.

One criterion's scores admit many plans at the same cost.  A global ranking compares units across
groups by scores measured on the dense model, so it cannot know which removals the reconstruction
pass (:mod:`vitgraph.passes.reconstruct`) will repair: a removed FFN unit or v dim is largely
re-expressed through the kept ones, while a removed head or q/k dim changes the attention pattern
itself, which no refit of a consumer recovers.  :func:`choose_plan` therefore plans several
candidate allocations to the same target from the same scores (global and uniform, over all
prunable kinds and over subsets that leave the kinds reconstruction cannot repair whole), compresses
and reconstructs each on the first part of the calibration batches, and keeps the one whose output
is closest to the dense model's on the held-out rest (KL of the class distributions; for a model
without class logits the feature-distillation error, the normalised MSE of every output tensor
against the dense one's).  The candidates' costs are counted on the compressed
models, and one that misses the target by more than ``tol`` is not considered.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any, Iterable, Optional, Sequence

import torch
from torch import nn

from vitgraph.analysis.kinds import PRUNABLE_KINDS
from vitgraph.errors import PlanError

log = logging.getLogger("vitgraph.allocation")

# kinds left whole by the candidates beside "all": attention patterns (heads, q/k) and the stream
KIND_SUBSETS: tuple[tuple[str, ...], ...] = ((), ("head",), ("head", "qk"), ("head", "residual"))
MODES = ("global", "uniform")


@dataclass(frozen=True)
class Candidate:
    """One allocation tried: how it was planned, its cost fraction and held-out divergence."""

    mode: str
    kept_whole: tuple[str, ...]
    fraction: float
    loss: float

    @property
    def label(self) -> str:
        whole = f", {'+'.join(self.kept_whole)} whole" if self.kept_whole else ""
        return f"{self.mode}{whole}"


def divergence(dense_out: Any, slim_out: Any, objective: Optional[str] = None) -> float:
    """How far ``slim_out`` is from ``dense_out``, summed over the batch: KL(dense || slim) of the class
    distributions for ``"logits"``, the feature-distillation error for ``"features"`` (default: the
    kind of ``dense_out``, :func:`~vitgraph.passes.scoring_common.output_kind`)."""
    from vitgraph.passes.scoring_common import output_divergence, output_kind, output_tensors

    kind = objective or output_kind(dense_out)
    batch = output_tensors(dense_out)[0].shape[0]
    return float(output_divergence(slim_out, dense_out, kind)) * batch


def _cost(model: nn.Module, x: torch.Tensor, target: str) -> float:
    from vitgraph.deploy.measure import count_flops, count_params

    return float(count_flops(model, (x,)) if target == "flops" else count_params(model))


@torch.no_grad()
def choose_plan(model: nn.Module, analysis: Any, scores: Any, target: str, fraction: float,
                data: Sequence[Any], x: torch.Tensor, plan_options: Optional[dict] = None,
                kinds: Optional[Iterable[str]] = None, tol: float = 0.02,
                reconstruct_options: Optional[dict] = None, objective: Optional[str] = None,
                ) -> tuple[Any, list[Candidate]]:
    """The candidate plan of ``scores`` to ``target``/``fraction`` whose reconstruction is closest
    to ``model`` on held-out calibration batches, and every candidate tried (best first).

    ``data`` is a list of ``(inputs, targets)`` batches (the last quarter, at least one batch, is
    held out); ``plan_options`` go to :func:`vitgraph.plan_to_target` (``round_to``, ``align``,
    ``normalize``); ``objective`` picks the :func:`divergence` (default: from the model's output).
    """
    from vitgraph.api import compress
    from vitgraph.passes.reconstruct import refit
    from vitgraph.passes.scoring_common import output_kind, split_batch
    from vitgraph.targets import plan_to_target

    if target not in ("flops", "params"):
        raise PlanError(f"allocation candidates are compared at a flops or params target, got {target!r}")
    data = list(data)
    if len(data) < 2:
        raise PlanError("choosing an allocation needs at least 2 calibration batches (one is held out)")
    n_out = max(1, len(data) // 4)
    fit, held = data[:-n_out], [split_batch(b)[0] for b in data[-n_out:]]
    dense_cost = _cost(model, x, target)
    dense_out = [model(*inp) for inp in held]
    objective = objective or output_kind(dense_out[0], model)
    present = {g.kind for g in analysis.groups}
    base = [k for k in (kinds or PRUNABLE_KINDS) if k in present]
    tried: list[tuple[Candidate, Any]] = []
    seen: set[str] = set()
    for whole in KIND_SUBSETS:
        if whole and not set(whole) & set(base):
            continue
        use = [k for k in base if k not in whole]
        if not use:
            continue
        for mode in MODES:
            try:
                plan = plan_to_target(analysis, scores, target=target, fraction=fraction, kinds=use, mode=mode,
                                      **(plan_options or {}))
            except PlanError as e:
                log.info("candidate %s without %s: %s", mode, whole, e)
                continue
            key = plan.to_json(indent=None)
            if key in seen:
                continue
            seen.add(key)
            slim = compress(model, plan, analysis, keep_api=False).eval()
            got = _cost(slim, x, target) / dense_cost
            if got > fraction * (1 + tol) or got < fraction * (1 - tol):
                log.info("candidate %s without %s lands at %.3f of a %.3f target: skipped", mode, whole, got, fraction)
                continue
            refit(slim, analysis, plan.selection(analysis), fit, progress=False, **(reconstruct_options or {}))
            loss = sum(divergence(d, slim(*inp), objective) for d, inp in zip(dense_out, held))
            tried.append((Candidate(mode, tuple(k for k in whole if k in present), got, loss), plan))
            log.info("candidate %s: %s %.3f, held-out divergence %.4g", tried[-1][0].label, target, got, loss)
    if not tried:
        raise PlanError(f"no candidate allocation lands within {tol:.0%} of {target}:{fraction}")
    tried.sort(key=lambda t: t[0].loss)
    return tried[0][1], [c for c, _ in tried]
