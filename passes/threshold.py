"""Learnable width thresholds (WDPruning): per-group saliency scores and a learned keep ratio.

Every prunable group gets learnable scores (one per unit; ``[heads, dims]`` for per-head ``qk``/``v``
groups) and a scalar threshold ``theta``, its keep ratio ``r`` (``theta`` clamped to [0, 1]),
initialised so that every unit is kept.  A top-k binarizer keeps ``ceil(r * N)`` units (optionally
rounded up to a multiple of ``round_to``); its binary mask gates the group's parameter slices during
training (``w * mask`` along each ``(param, dim)`` of ``group.params``, through
``torch.func.functional_call`` on the analysed GraphModule), so it works for any analysed model.
Gradients pass straight through the binarizer to the scores and to ``r``.  The loss is the task
loss plus distillation from the unmasked model (WDPruning trains with a teacher).

The budget ``s`` (remaining fraction of parameters or FLOPs) generalises WDPruning's per-block
formula: a parameter keeps ``numel * prod_d f_d`` elements, ``f_d`` the kept fraction of its dim
``d`` (the mean over positions of the product of the keep ratios of the groups laid out there), and
an op keeps its FLOPs times the kept fractions of its output and of its contracted input dim.  The
penalty ``lambda1 (s - t) + lambda2 (s - t)^2`` applies while ``s > t`` (WDPruning,
``penalty="above"``) or on both sides (``penalty="both"``, the default); ``lambda1``/``lambda2``
follow gradient ascent (augmented Lagrangian), ``t`` moving from 1 to the target on a cubic
schedule.  At the end one common shift of every threshold puts the learned widths at the largest
budget not above the target (``calibrate``).

Why not WDPruning's ``r = sigmoid(theta)``: the keep-all start sits where the sigmoid is flat
(``r = 1 - 0.5 / N``, ``theta`` about 6.6 for N = 384), so the budget lags for the first ~100
steps while the multipliers wind up, then falls far below the target
(benchmarks/results/threshold_check.md).
A threshold in keep-ratio units follows the scheduled target from the first step.
"""
from __future__ import annotations

import copy
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
from torch import nn
from torch.func import functional_call

from vitgraph.analysis.kinds import ALL_KINDS, BLOCK_KINDS
from vitgraph.errors import PlanError, ScoreError
from vitgraph.planning.planner import CostModel
from vitgraph.passes.gates import GateSet
from vitgraph.passes.scoring_common import OBJECTIVES, default_loss, output_divergence, output_kind
from vitgraph.passes.training import batches_per_epoch, fit, rank_loader
from vitgraph.planning.plan import Plan

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup

log = logging.getLogger(__name__)



# ---------------------------------------------------------------------------------------------
# results


@dataclass
class ThresholdResult:
    """Learned saliency scores, kept counts and the budget they reach.

    ``scores`` maps group ids to the learned saliency (``[size]`` or ``[heads, size]``, the format
    :meth:`vitgraph.Plan.from_scores` takes); ``keep`` maps group ids to the learned kept count (per
    head for per-head groups); ``budget`` is the remaining parameter or FLOPs fraction those counts
    give, ``kind`` which; ``ratios`` the final keep ratios; ``history`` one dict per logged step;
    ``weights`` the trained model weights (parameter name -> tensor) when ``train_weights`` was set,
    else empty; ``learned_budget`` the budget the thresholds reached before calibration.
    """

    scores: dict[str, torch.Tensor]
    keep: dict[str, int]
    budget: float
    kind: str
    target: float
    ratios: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)
    learned_budget: Optional[float] = None

    def plan(self, analysis: "Analysis") -> Plan:
        """A plan keeping the top-``keep`` units of each learned group (per head where allowed)."""
        plan = Plan.keep_all(analysis)
        for gid, k in self.keep.items():
            g = analysis.group(gid)
            s = self.scores[gid].detach().double().cpu()
            if k >= g.size:
                continue
            if s.dim() == 2:
                rows = [sorted(torch.topk(row, k).indices.tolist()) for row in s]
                plan.keep(gid, rows if g.per_head else rows[:1] * len(rows))
            else:
                plan.keep(gid, sorted(torch.topk(s, k).indices.tolist()))
        return plan


# ---------------------------------------------------------------------------------------------
# gates: which unit of which group every parameter position belongs to


@dataclass
class _Gate:
    """One learnable group: scores, threshold and how its units lie along parameter dims."""

    group: "ChannelGroup"
    shape: tuple[int, ...]  # score shape: (size,) or (heads, size)
    step: int  # keep counts are multiples of this (1 for heads)
    scores: nn.Parameter
    theta: nn.Parameter

    @property
    def n(self) -> int:
        return self.shape[-1]

    def count(self, r: torch.Tensor) -> int:
        """Kept units (per row) for keep ratio ``r``: ``ceil(r * N)`` rounded up to ``step``."""
        k = math.ceil(float(r.detach()) * self.n - 1e-6)
        if self.step > 1:
            k = math.ceil(k / self.step) * self.step
        return int(min(self.n, max(1, k)))


# ---------------------------------------------------------------------------------------------
# budget


class _Budget:
    """Differentiable remaining fraction of parameters or FLOPs as a function of keep ratios: the
    planner's cost model (:meth:`CostModel.fraction`) with each dim's kept fraction the mean of
    its gates' keep ratios."""

    def __init__(self, analysis: "Analysis", gates: GateSet, kind: str) -> None:
        self.gates = gates
        self.kind = kind
        self.cost = CostModel(analysis)
        self.terms = self.cost.terms(kind)
        self.total = float(sum(t[0] for t in self.terms))
        if self.total <= 0:
            raise PlanError(f"the model has no {kind} to budget")

    def __call__(self, ratios: Sequence[torch.Tensor]) -> torch.Tensor:
        """Remaining fraction for keep ratios in the gate set's group order (scalars, broadcast over
        each group's units)."""
        flat = {g.id: r.reshape(1).expand(self.gates.numel(g.id)) for r, g in zip(ratios, self.gates.groups)}

        def kept(layout: Any, size: int) -> Optional[torch.Tensor]:
            factor = self.gates.factor(self.gates.sites(layout, uniform=True), flat)
            return None if factor is None else factor.mean()

        out = self.cost.fraction(self.kind, kept)
        return out if isinstance(out, torch.Tensor) else ratios[0].new_tensor(out)


# ---------------------------------------------------------------------------------------------
# training


def _mask(gate: _Gate, r: torch.Tensor) -> torch.Tensor:
    """Binary top-k mask with straight-through gradients to the scores and the keep ratio."""
    k = gate.count(r)
    s = gate.scores
    hard = torch.zeros_like(s)
    hard.scatter_(-1, torch.topk(s.detach(), k, dim=-1).indices, 1.0)
    return hard + (s - s.detach()) + (r - r.detach())








def _ratio(theta: torch.Tensor) -> torch.Tensor:
    """The keep ratio of a threshold: ``theta`` clamped to [0, 1], gradient passed straight through."""
    return theta + (theta.clamp(0.0, 1.0) - theta).detach()


def _make_gates(analysis: "Analysis", kinds: Sequence[str], round_to: int, init: str) -> tuple[list[_Gate], GateSet]:
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise PlanError(f"unknown group kinds {bad}; expected some of {list(ALL_KINDS)}")
    groups = [g for g in analysis.groups if g.kind in kinds and g.size > 1]
    if not groups:
        raise PlanError(f"the model has no prunable groups of kinds {list(kinds)}")
    sizes = [g.size for g in groups]
    # one shared start for every threshold: every group keeps all its units, and all thresholds
    # move together until the task loss tells them apart
    r0 = 1.0 - 0.5 / max(sizes)
    mags = None
    if init == "magnitude":
        from vitgraph.planning.magnitude import magnitude_scores

        mags = magnitude_scores(analysis, [g.id for g in groups])
    elif init != "uniform":
        raise ScoreError(f"init must be 'magnitude' or 'uniform', got {init!r}")
    # per-head scores where every parameter slice of the group has its heads, else one per dim
    gate_set = GateSet(analysis, [g.id for g in groups], headless="share")
    gates = []
    for g in groups:
        shape = gate_set.shapes[g.id]
        if mags is not None:
            s = mags[g.id].float()
            s = s.reshape(shape) if s.numel() == int(np.prod(shape)) else s.reshape(-1, g.size).mean(0)
            s = s / s.mean().clamp_min(1e-12)
        else:
            s = torch.ones(shape)
        step = 1 if g.kind == "head" else max(1, int(round_to))
        gates.append(_Gate(g, shape, step, nn.Parameter(s.clone()), nn.Parameter(torch.tensor(float(r0)))))
    return gates, gate_set


class _Thresholded(nn.Module):
    """The analysed graph with each group's parameter slices multiplied by its top-k mask.

    ``forward`` returns the graph's output and the keep ratios it masked with.
    """

    def __init__(self, gm: fx.GraphModule, gates: Sequence[_Gate], gate_set: GateSet) -> None:
        super().__init__()
        self.gm = gm
        self.scores = nn.ParameterList([g.scores for g in gates])
        self.theta = nn.ParameterList([g.theta for g in gates])
        self._gates = list(gates)
        self._gate_set = gate_set

    def forward(self, *x: Any) -> tuple[Any, list[torch.Tensor]]:
        ratios = [_ratio(g.theta) for g in self._gates]
        masks = {g.group.id: _mask(g, r).reshape(-1) for g, r in zip(self._gates, ratios)}
        params = dict(self.gm.named_parameters())
        return functional_call(self.gm, self._gate_set.apply(params, masks), x), ratios


def learn_thresholds(
    model: nn.Module,
    analysis: "Analysis",
    data: Iterable,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    target: float = 0.5,
    budget: str = "params",
    kinds: Sequence[str] = BLOCK_KINDS,
    steps: Optional[int] = 300,
    lr: float = 0.05,
    theta_lr: float = 0.01,
    lambda_lr: float = 0.1,
    penalty: str = "both",
    round_to: int = 1,
    train_weights: bool = False,
    weight_lr: float = 1e-4,
    init: str = "magnitude",
    distill: float = 1.0,
    warmup: float = 0.5,
    calibrate: bool = True,
    device: Optional[torch.device | str] = None,
    log_every: int = 50,
    callback: Optional[Callable[[dict[str, float]], None]] = None,
    objective: Optional[str] = None,
) -> ThresholdResult:
    """Learn per-group keep counts and saliency scores that meet a parameter or FLOPs budget.

    ``data`` yields ``(inputs, targets)`` batches (re-iterated until ``steps``; ``steps=None``: one
    pass); ``loss_fn(output, targets)`` defaults to cross-entropy.  ``target`` is the remaining
    fraction of parameters (``budget="params"``) or FLOPs (``"flops"``).  The model is not changed;
    with ``train_weights`` its weights are trained too and returned in ``ThresholdResult.weights``.
    ``callback`` gets the log record (step, loss, budget, goal, lambda1, lambda2) every ``log_every``
    steps.

    The loss is the task loss plus ``distill`` times ``KL(teacher || masked model)``, the teacher
    being the unmasked model with its original weights (WDPruning distils from a teacher; on data
    the dense model already fits, the task loss alone says little about which units matter).
    ``objective`` (default: from the output, :func:`~vitgraph.passes.scoring_common.output_kind`) is
    ``"logits"`` or ``"features"``; a model without class logits, or data without targets, learns
    from the distillation alone, which is then the feature-distillation error
    (:func:`~vitgraph.passes.scoring_common.output_divergence`).
    Scores train at ``lr``; the thresholds at their own ``theta_lr``, a step in keep-ratio units
    (Adam without momentum moves each by about ``theta_lr`` per step); the multipliers at ``lambda_lr``.

    The budget the penalty aims at goes from 1 to ``target`` along a cubic schedule over the first
    ``warmup`` fraction of the steps, then stays at ``target``.  ``penalty="both"`` (default)
    applies ``lambda1 (s - t) + lambda2 (s - t)^2`` on both sides of that goal, ``lambda1`` free to
    turn negative; ``"above"`` is WDPruning's one-sided form (only while ``s > t``).  The budget the
    penalty sees is computed from the hard kept counts, so it is the budget of the compressed
    model.  ``calibrate`` (default) finally shifts every threshold by one common amount (in logit
    space, found by bisection) so the learned widths give the largest budget not above ``target``:
    the relative widths are learned, the total is the one asked for, whatever the multipliers did.
    """
    if analysis.model is not model:
        raise ScoreError("analysis was made for another model (call vitgraph.analyze(model, x) first)")
    if not 0.0 < target <= 1.0:
        raise ScoreError(f"target must be a remaining fraction in (0, 1], got {target}")
    if budget not in ("params", "flops"):
        raise ScoreError(f"budget must be 'params' or 'flops', got {budget!r}")
    if penalty not in ("above", "both"):
        raise ScoreError(f"penalty must be 'above' (only while over budget) or 'both', got {penalty!r}")
    if steps is not None and steps < 0:
        raise ScoreError(f"steps must be >= 0, got {steps}")
    if distill < 0:
        raise ScoreError(f"distill must be >= 0, got {distill}")
    if not 0.0 <= warmup <= 1.0:
        raise ScoreError(f"warmup must be a fraction of the steps in [0, 1], got {warmup}")
    if objective is not None and objective not in OBJECTIVES:
        raise ScoreError(f"objective must be one of {OBJECTIVES} (or None: from the output), got {objective!r}")
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    gm = copy.deepcopy(analysis.graph_module).to(dev)
    gates, gate_set = _make_gates(analysis, kinds, round_to, init)
    for g in gates:
        g.scores.data = g.scores.data.to(dev)
        g.theta.data = g.theta.data.to(dev)
    cost = _Budget(analysis, gate_set, budget)

    params = dict(gm.named_parameters())
    for p in params.values():
        p.requires_grad_(train_weights)
    teacher = {n: p.detach().clone() for n, p in params.items()} if train_weights else None
    # no momentum on the thresholds: once the budget is met they stop instead of overshooting
    groups = [{"params": [g.scores for g in gates], "lr": lr},
              {"params": [g.theta for g in gates], "lr": theta_lr, "betas": (0.0, 0.99)}]
    if train_weights:
        groups.append({"params": list(params.values()), "lr": weight_lr})
    opt = torch.optim.Adam(groups)
    lam1 = lam2 = 0.0
    history: list[dict[str, float]] = []
    last: dict[str, Any] = {}  # the step's task loss, budget and gap, for the multipliers and the log
    total = steps if steps is not None else batches_per_epoch(data)
    ramp = max(1, round(warmup * total)) if total and warmup > 0 else 0

    def goal(step: int) -> float:
        """The scheduled budget: cubic from 1 down to ``target`` over the first ``ramp`` steps."""
        if not ramp or step >= ramp:
            return target
        return target + (1.0 - target) * (1.0 - step / ramp) ** 3

    def step_loss(net: nn.Module, x: tuple, y: Any) -> torch.Tensor:
        out, ratios = net(*x)
        task = _task_loss(out, y, lambda: gm(*x) if teacher is None else functional_call(gm, teacher, x), loss_fn,
                          distill, objective or output_kind(out, model))
        hard = [(torch.tensor(g.count(r) / g.n, device=dev) + r - r.detach()) for g, r in zip(gates, ratios)]
        s = cost(hard)
        t = goal(len(history_steps))
        gap = s - t
        active = float(gap.detach()) > 0 or penalty == "both"
        last.update(task=task, budget=s, gap=float(gap.detach()), active=active, goal=t)
        return task + (lam1 * gap + lam2 * gap * gap if active else 0.0)

    history_steps: list[int] = []

    def on_step(step: int, _: torch.Tensor) -> None:
        nonlocal lam1, lam2
        history_steps.append(step)
        if last["active"]:  # gradient ascent on the multipliers (lambda1 may turn negative under "both")
            lam1 += lambda_lr * last["gap"]
            lam2 += lambda_lr * last["gap"] ** 2
        if log_every and (step % log_every == 0 or (steps is not None and step == steps - 1)):
            rec = {"step": step, "loss": float(last["task"].detach()), "budget": float(last["budget"].detach()),
                   "goal": last["goal"], "lambda1": lam1, "lambda2": lam2}
            history.append(rec)
            log.info("step %d: loss %.4f, %s budget %.4f (goal %.4f, target %.4f), lambda1 %.3g, lambda2 %.3g",
                     step, rec["loss"], budget, rec["budget"], rec["goal"], target, lam1, lam2)
            if callback is not None:
                callback(rec)

    done = 0
    if steps != 0:  # (0 steps: the initial scores; data is not read)
        net = _Thresholded(gm, gates, gate_set).train()
        done = len(fit(net, rank_loader(data), step_loss, opt, epochs=None if steps is not None else 1,
                       steps=steps, device=dev, on_step=on_step))
        if steps is not None and done < steps:
            log.warning("data ran out after %d of %d steps", done, steps)
    with torch.no_grad():
        learned = float(cost([torch.tensor(g.count(_ratio(g.theta)) / g.n, device=dev) for g in gates]))
        if calibrate and done:
            _calibrate(gates, cost, target, dev)
        ratios = [_ratio(g.theta) for g in gates]
        keep = {g.group.id: g.count(r) for g, r in zip(gates, ratios)}
        final = float(cost([torch.tensor(keep[g.group.id] / g.n, device=dev) for g in gates]))
    log.info("learned thresholds after %d steps: %s budget %.4f, calibrated %.4f (target %.4f)",
             done, budget, learned, final, target)
    if done and abs(learned - target) > 0.05:
        log.info("the multipliers left the budget at %.4f; calibration moved it to %.4f", learned, final)
    weights = {n: p.detach().clone() for n, p in params.items()} if train_weights else {}
    return ThresholdResult(
        scores={g.group.id: g.scores.detach().cpu().clone() for g in gates},
        keep=keep, budget=final, kind=budget, target=target,
        ratios={g.group.id: float(r) for g, r in zip(gates, ratios)}, history=history, weights=weights,
        learned_budget=learned,
    )


def _task_loss(out: Any, y: Any, reference: Callable[[], Any], loss_fn: Optional[Callable[[Any, Any], torch.Tensor]],
               distill: float, objective: str) -> torch.Tensor:
    """The loss the thresholds learn from besides the budget: ``loss_fn`` (else cross-entropy on
    labelled class logits) plus ``distill`` times the divergence from the unmasked model's output
    ``reference()``; without labels or class logits, the divergence alone."""
    task = None
    if loss_fn is not None or (objective == "logits" and y is not None):
        task = (loss_fn or default_loss)(out, y)
    if distill > 0:
        with torch.no_grad():
            ref = reference()
        d = distill * output_divergence(out, ref, objective)
        task = d if task is None else task + d
    if task is None:
        raise ScoreError("learnable thresholds have nothing to learn from: the data has no targets (or the model no "
                         "class logits) and distill=0; give distill > 0 or a loss_fn")
    return task


def _calibrate(gates: Sequence[_Gate], cost: "_Budget", target: float, dev: torch.device) -> None:
    """Shift every threshold by one common amount so the hard budget is the largest not above ``target``."""
    theta = [g.theta.detach().clone() for g in gates]

    def at(shift: float) -> float:
        return float(cost([torch.tensor(g.count(_ratio(t + shift)) / g.n, device=dev)
                           for g, t in zip(gates, theta)]))

    lo, hi = -1.0, 1.0  # budget(lo): every group at one unit, budget(hi) keeps all
    full = at(hi)
    if full <= target:  # the whole model fits: the smallest shift that keeps it whole
        if at(0.0) >= full:
            return
        lo = 0.0
        for _ in range(50):
            mid = (lo + hi) / 2
            if at(mid) < full:
                lo = mid
            else:
                hi = mid
        shift = hi
    else:
        for _ in range(50):
            mid = (lo + hi) / 2
            if at(mid) <= target:
                lo = mid
            else:
                hi = mid
        shift = lo
    for g, t in zip(gates, theta):
        g.theta.data = t + shift


def budget_of(analysis: "Analysis", keep: Mapping[str, int], budget: str = "params") -> float:
    """Remaining parameter or FLOPs fraction when each group in ``keep`` keeps that many units."""
    if budget not in ("params", "flops"):
        raise ScoreError(f"budget must be 'params' or 'flops', got {budget!r}")
    for gid, k in keep.items():
        g = analysis.group(gid)
        if not 1 <= k <= g.size:
            raise PlanError(f"group {gid!r}: kept count {k} is outside 1..{g.size}")
    gate_set = GateSet(analysis, list(keep), headless="share")
    cost = _Budget(analysis, gate_set, budget)
    with torch.no_grad():
        return float(cost([torch.tensor(keep[g.id] / g.size) for g in gate_set.groups]))
