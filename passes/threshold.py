"""Learnable width thresholds (WDPruning): per-group saliency scores and a learned keep ratio.

Every prunable group gets learnable scores (one per unit; ``[heads, dims]`` for per-head ``qk``/``v``
groups) and a scalar threshold ``theta``; the keep ratio is ``r = sigmoid(theta)``, initialised so
that every unit is kept.  A top-k binarizer keeps ``ceil(r * N)`` units (optionally rounded up to a
multiple of ``round_to``); its binary mask gates the group's parameter slices during training
(``w * mask`` along each ``(param, dim)`` of ``group.params``, through ``torch.func.functional_call``
on the analysed GraphModule), so it works for any analysed model.  Gradients pass straight through
the binarizer to the scores and to ``r``.

The budget ``s`` (remaining fraction of parameters or FLOPs) generalises WDPruning's per-block
formula: a parameter keeps ``numel * prod_d f_d`` elements, ``f_d`` the kept fraction of its dim
``d`` (the mean over positions of the product of the keep ratios of the groups laid out there), and
an op keeps its FLOPs times the kept fractions of its output and of its contracted input dim.  The
penalty ``lambda1 (s - t) + lambda2 (s - t)^2`` applies while ``s > t`` (WDPruning,
``penalty="above"``) or on both sides (``penalty="both"``, the default, which settles at the
target whatever the data); ``lambda1``/``lambda2`` follow gradient ascent (augmented Lagrangian).
"""
from __future__ import annotations

import copy
import itertools
import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Callable, Iterable, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn
from torch.func import functional_call

from vitgraph.analysis.context import META_KEY, TensorDims
from vitgraph.errors import PlanError
from vitgraph.deploy.flops import FlopCounter
from vitgraph.passes.scoring_common import cycle, default_loss, split_batch
from vitgraph.planning.plan import Plan
from vitgraph.analysis.selection import layout_coords

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup

log = logging.getLogger(__name__)

DEFAULT_KINDS = ("head", "qk", "v", "ffn")
_ALL_KINDS = ("residual", "head", "qk", "v", "ffn", "other")
_SDPA = {F.scaled_dot_product_attention, getattr(torch._C._nn, "scaled_dot_product_attention", None)}
_CONV = (nn.Conv1d, nn.Conv2d, nn.Conv3d)
_CONV_FN = {F.conv1d, F.conv2d, F.conv3d}


# ---------------------------------------------------------------------------------------------
# results


@dataclass
class ThresholdResult:
    """Learned saliency scores, kept counts and the budget they reach.

    ``scores`` maps group ids to the learned saliency (``[size]`` or ``[heads, size]``, the format
    :meth:`vitgraph.Plan.from_scores` takes); ``keep`` maps group ids to the learned kept count (per
    head for per-head groups); ``budget`` is the remaining parameter or FLOPs fraction those counts
    give, ``kind`` which; ``ratios`` the final soft keep ratios ``sigmoid(theta)``; ``history`` one
    dict per logged step; ``weights`` the trained model weights (parameter name -> tensor) when
    ``train_weights`` was set, else empty.
    """

    scores: dict[str, torch.Tensor]
    keep: dict[str, int]
    budget: float
    kind: str
    target: float
    ratios: dict[str, float] = field(default_factory=dict)
    history: list[dict[str, float]] = field(default_factory=list)
    weights: dict[str, torch.Tensor] = field(default_factory=dict, repr=False)

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

    @property
    def units(self) -> int:
        return int(np.prod(self.shape))

    def count(self, r: torch.Tensor) -> int:
        """Kept units (per row) for keep ratio ``r``: ``ceil(r * N)`` rounded up to ``step``."""
        k = math.ceil(float(r.detach()) * self.n - 1e-6)
        if self.step > 1:
            k = math.ceil(k / self.step) * self.step
        return int(min(self.n, max(1, k)))


class _Index:
    """Per-dim index arrays: position along a dim -> flat unit of a gate (``-1``: not laid out)."""

    def __init__(self, analysis: "Analysis", gates: Sequence[_Gate]) -> None:
        self.an = analysis
        self.gates = gates
        self.by_axis = {g.group.axis: i for i, g in enumerate(gates)}
        self.heads = {i: analysis.group(g.group.head_group).axis for i, g in enumerate(gates) if len(g.shape) == 2}
        self._cache: dict[Any, list[tuple[int, torch.Tensor]]] = {}

    def of(self, layout: Any, uniform: bool = False) -> list[tuple[int, torch.Tensor]]:
        """``[(gate, index)]`` for every gate laid out on a dim with this layout.

        ``uniform``: the gate values will be the same for every unit (keep ratios), so a per-head
        gate on a dim without its heads (an activation's head dim lives elsewhere) is allowed.
        """
        if layout is None:
            return []
        hit = self._cache.get((layout, uniform))
        if hit is not None:
            return hit
        _, coords = layout_coords(self.an.store, layout)
        out = []
        for axis, c in coords.items():
            i = self.by_axis.get(axis)
            if i is None:
                continue
            g = self.gates[i]
            if i in self.heads:
                h = coords.get(self.heads[i])
                if h is None and not uniform:
                    raise PlanError(f"group {g.group.id!r}: per-head scores on a dim without its heads")
                idx = np.where(c >= 0, c, -1) if h is None else np.where((c >= 0) & (h >= 0), h * g.n + c, -1)
            else:
                idx = np.where(c >= 0, c, -1)
            if (idx >= 0).any():
                out.append((i, torch.from_numpy(idx)))
        self._cache[layout, uniform] = out
        return out


def _per_head_ok(analysis: "Analysis", g: "ChannelGroup") -> bool:
    if not g.per_head or g.head_group is None:
        return False
    head_axis = analysis.group(g.head_group).axis
    for name, dim in g.params:
        _, coords = layout_coords(analysis.store, analysis.params[name].dims[dim])
        if g.axis in coords and head_axis not in coords:
            return False
    return True


def _dim_values(entries: list[tuple[int, torch.Tensor]], flat: Sequence[torch.Tensor], length: int) -> torch.Tensor:
    """Per position along a dim: the product of the gate values laid out there (1 elsewhere)."""
    out = None
    for i, idx in entries:
        padded = torch.cat([flat[i], flat[i].new_ones(1)])
        idx = idx.to(padded.device)
        v = padded[torch.where(idx >= 0, idx, padded.numel() - 1)]
        out = v if out is None else out * v
    return out if out is not None else flat[0].new_ones(length)


# ---------------------------------------------------------------------------------------------
# budget


class _Budget:
    """Differentiable remaining fraction of parameters or FLOPs as a function of keep ratios."""

    # terms: (full count, [(layout, length) of every dim whose kept fraction scales it])
    def __init__(self, analysis: "Analysis", index: _Index, kind: str, gm: fx.GraphModule,
                 example: Sequence[torch.Tensor]) -> None:
        self.index = index
        self.kind = kind
        if kind == "params":
            self.terms = self._param_terms(analysis, gm)
        else:
            self.terms = self._flop_terms(gm, example)
        self.total = float(sum(t[0] for t in self.terms))
        if self.total <= 0:
            raise PlanError(f"the model has no {kind} to budget")

    def _param_terms(self, analysis: "Analysis", gm: fx.GraphModule) -> list:
        seen: set[int] = set()
        terms = []
        for name, p in gm.named_parameters():
            if id(p) in seen:
                continue
            seen.add(id(p))
            td = analysis.params.get(name)
            dims = [] if td is None else [(lay, p.shape[d]) for d, lay in enumerate(td.dims) if lay is not None]
            terms.append((float(p.numel()), dims))
        return terms

    def _flop_terms(self, gm: fx.GraphModule, example: Sequence[torch.Tensor]) -> list:
        flops = _node_flops(gm, example)
        terms = []
        for node in gm.graph.nodes:
            f = flops.get(node.name, 0)
            if not f:
                continue
            out = _tensor_dims(node)
            if node.op == "call_function" and node.target in _SDPA and len(node.args) >= 3:
                q, v = _tensor_dims(node.args[0]), _tensor_dims(node.args[2])
                dq = q.shape[-1] if q is not None else 1
                dv = v.shape[-1] if v is not None else 1
                terms.append((f * dq / (dq + dv), _all_dims(q)))
                terms.append((f * dv / (dq + dv), _all_dims(out)))
                continue
            first = next((a for a in node.all_input_nodes if isinstance(_tensor_dims(a), TensorDims)), None)
            contracted = []
            src = _tensor_dims(first) if first is not None else None
            if src is not None and src.dims:
                d = 1 if _is_conv(gm, node) else len(src.dims) - 1
                if d < len(src.dims) and src.dims[d] is not None:
                    contracted = [(src.dims[d], src.shape[d])]
            terms.append((float(f), _all_dims(out) + contracted))
        return terms

    def __call__(self, ratios: Sequence[torch.Tensor]) -> torch.Tensor:
        """Remaining fraction for per-gate keep ratios (scalars, broadcast over each gate's units)."""
        flat = [r.reshape(1).expand(g.units) for r, g in zip(ratios, self.index.gates)]
        kept = ratios[0].new_zeros(())
        for numel, dims in self.terms:
            frac = ratios[0].new_ones(())
            for lay, length in dims:
                entries = self.index.of(lay, uniform=True)
                if entries:
                    frac = frac * _dim_values(entries, flat, length).mean()
            kept = kept + numel * frac
        return kept / self.total


def _tensor_dims(node: Any) -> Optional[TensorDims]:
    td = node.meta.get(META_KEY) if isinstance(node, fx.Node) else None
    return td if isinstance(td, TensorDims) else None


def _all_dims(td: Optional[TensorDims]) -> list:
    if td is None:
        return []
    return [(lay, n) for lay, n in zip(td.dims, td.shape) if lay is not None]


def _is_conv(gm: fx.GraphModule, node: fx.Node) -> bool:
    if node.op == "call_module":
        return isinstance(gm.get_submodule(node.target), _CONV)
    return node.op == "call_function" and node.target in _CONV_FN


def _node_flops(gm: fx.GraphModule, example: Sequence[torch.Tensor]) -> dict[str, int]:
    """FLOPs of every node on ``example`` (vitgraph's convention: 2 per multiply-add)."""
    out: dict[str, int] = {}

    class Counter(fx.Interpreter):
        def run_node(self, n: fx.Node) -> Any:
            with FlopCounter() as counter:
                res = super().run_node(n)
            out[n.name] = counter.total
            return res

    was = gm.training
    gm.eval()
    try:
        with torch.no_grad():
            Counter(gm).run(*example)
    finally:
        gm.train(was)
    return out


# ---------------------------------------------------------------------------------------------
# training


def _mask(gate: _Gate, r: torch.Tensor) -> torch.Tensor:
    """Binary top-k mask with straight-through gradients to the scores and the keep ratio."""
    k = gate.count(r)
    s = gate.scores
    hard = torch.zeros_like(s)
    hard.scatter_(-1, torch.topk(s.detach(), k, dim=-1).indices, 1.0)
    return hard + (s - s.detach()) + (r - r.detach())








def _make_gates(analysis: "Analysis", kinds: Sequence[str], round_to: int, init: str) -> list[_Gate]:
    bad = [k for k in kinds if k not in _ALL_KINDS]
    if bad:
        raise PlanError(f"unknown group kinds {bad}; expected some of {list(_ALL_KINDS)}")
    groups = [g for g in analysis.groups if g.kind in kinds and g.size > 1]
    if not groups:
        raise PlanError(f"the model has no prunable groups of kinds {list(kinds)}")
    sizes = [g.size for g in groups]
    # one shared start for every threshold: every group keeps all its units, and all thresholds
    # move together until the task loss tells them apart
    r0 = 1.0 - 0.5 / max(sizes)
    theta0 = math.log(r0 / (1.0 - r0))
    mags = None
    if init == "magnitude":
        from vitgraph.planning.magnitude import magnitude_scores

        mags = magnitude_scores(analysis, [g.id for g in groups])
    elif init != "uniform":
        raise ValueError(f"init must be 'magnitude' or 'uniform', got {init!r}")
    gates = []
    for g in groups:
        heads = analysis.group(g.head_group).size if g.head_group and _per_head_ok(analysis, g) else None
        shape = (heads, g.size) if heads else (g.size,)
        if mags is not None:
            s = mags[g.id].float()
            s = s.reshape(shape) if s.numel() == int(np.prod(shape)) else s.reshape(-1, g.size).mean(0)
            s = s / s.mean().clamp_min(1e-12)
        else:
            s = torch.ones(shape)
        step = 1 if g.kind == "head" else max(1, int(round_to))
        gates.append(_Gate(g, shape, step, nn.Parameter(s.clone()), nn.Parameter(torch.tensor(float(theta0)))))
    return gates


def learn_thresholds(
    model: nn.Module,
    analysis: "Analysis",
    data: Iterable,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    target: float = 0.5,
    budget: str = "params",
    kinds: Sequence[str] = DEFAULT_KINDS,
    steps: Optional[int] = 300,
    lr: float = 0.05,
    lambda_lr: float = 1.0,
    penalty: str = "both",
    round_to: int = 1,
    train_weights: bool = False,
    weight_lr: float = 1e-4,
    init: str = "magnitude",
    device: Optional[torch.device | str] = None,
    log_every: int = 50,
    callback: Optional[Callable[[dict[str, float]], None]] = None,
) -> ThresholdResult:
    """Learn per-group keep counts and saliency scores that meet a parameter or FLOPs budget.

    ``data`` yields ``(inputs, targets)`` batches (re-iterated until ``steps``; ``steps=None``: one
    pass); ``loss_fn(output, targets)`` defaults to cross-entropy.  ``target`` is the remaining
    fraction of parameters (``budget="params"``) or FLOPs (``"flops"``).  The model is not changed;
    with ``train_weights`` its weights are trained too and returned in ``ThresholdResult.weights``.
    ``callback`` gets the log record (step, loss, budget, lambda1, lambda2) every ``log_every`` steps.

    ``penalty="both"`` (default) applies ``lambda1 (s - t) + lambda2 (s - t)^2`` on both sides of the
    target, ``lambda1`` free to turn negative, so the budget settles at ``t`` whatever the data;
    ``"above"`` is WDPruning's one-sided form (only while ``s > t``), which relies on the task loss
    to hold the budget up and may end below ``t``.  The budget the penalty sees is computed from
    the hard kept counts, so it is the budget of the compressed model.
    """
    if analysis.model is not model:
        raise ValueError("analysis was made for another model (call vitgraph.analyze(model, x) first)")
    if not 0.0 < target <= 1.0:
        raise ValueError(f"target must be a remaining fraction in (0, 1], got {target}")
    if budget not in ("params", "flops"):
        raise ValueError(f"budget must be 'params' or 'flops', got {budget!r}")
    if penalty not in ("above", "both"):
        raise ValueError(f"penalty must be 'above' (only while over budget) or 'both', got {penalty!r}")
    if steps is not None and steps < 0:
        raise ValueError(f"steps must be >= 0, got {steps}")
    loss_fn = loss_fn or default_loss
    dev = torch.device(device) if device is not None else next(model.parameters()).device
    gm = copy.deepcopy(analysis.graph_module).to(dev)
    gates = _make_gates(analysis, kinds, round_to, init)
    for g in gates:
        g.scores.data = g.scores.data.to(dev)
        g.theta.data = g.theta.data.to(dev)
    index = _Index(analysis, gates)
    example = [torch.zeros(s, dtype=getattr(torch, d), device=dev)
               for s, d in zip(analysis.input_shapes, analysis.input_dtypes)]
    cost = _Budget(analysis, index, budget, gm, example)
    slots = _param_slots(analysis, gm, index)

    params = dict(gm.named_parameters())
    for p in params.values():
        p.requires_grad_(train_weights)
    # no momentum on the thresholds: once the budget is met they stop instead of overshooting
    groups = [{"params": [g.scores for g in gates], "lr": lr},
              {"params": [g.theta for g in gates], "lr": lr, "betas": (0.0, 0.99)}]
    if train_weights:
        groups.append({"params": list(params.values()), "lr": weight_lr})
    opt = torch.optim.Adam(groups)
    lam1 = lam2 = 0.0
    history: list[dict[str, float]] = []
    gm.train()
    batches = cycle(data, once=steps is None)
    it = range(steps) if steps is not None else itertools.count()
    step = -1
    for step in it:
        batch = next(batches, None)
        if batch is None:
            if steps is not None:
                log.warning("data ran out after %d of %d steps", step, steps)
            break
        x, y = split_batch(batch)
        x = tuple(t.to(dev) if isinstance(t, torch.Tensor) else t for t in x)
        y = y.to(dev) if isinstance(y, torch.Tensor) else y
        ratios = [torch.sigmoid(g.theta) for g in gates]
        masks = [_mask(g, r).reshape(-1) for g, r in zip(gates, ratios)]
        gated = _gated_params(params, slots, masks)
        task = loss_fn(functional_call(gm, gated, x), y)
        hard = [(torch.tensor(g.count(r) / g.n, device=dev) + r - r.detach()) for g, r in zip(gates, ratios)]
        s = cost(hard)
        gap = s - target
        over = float(gap.detach()) > 0
        active = over or penalty == "both"
        loss = task + (lam1 * gap + lam2 * gap * gap if active else 0.0)
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()
        if active:  # gradient ascent on the multipliers (lambda1 may turn negative under "both")
            lam1 += lambda_lr * float(gap.detach())
            lam2 += lambda_lr * float(gap.detach()) ** 2
        if log_every and (step % log_every == 0 or (steps is not None and step == steps - 1)):
            rec = {"step": step, "loss": float(task.detach()), "budget": float(s.detach()), "lambda1": lam1, "lambda2": lam2}
            history.append(rec)
            log.info("step %d: loss %.4f, %s budget %.4f (target %.4f), lambda1 %.3g, lambda2 %.3g",
                     step, rec["loss"], budget, rec["budget"], target, lam1, lam2)
            if callback is not None:
                callback(rec)
    with torch.no_grad():
        ratios = [torch.sigmoid(g.theta) for g in gates]
        keep = {g.group.id: g.count(r) for g, r in zip(gates, ratios)}
        final = float(cost([torch.tensor(keep[g.group.id] / g.n, device=dev) for g in gates]))
    log.info("learned thresholds after %d steps: %s budget %.4f (target %.4f)", step + 1, budget, final, target)
    weights = {n: p.detach().clone() for n, p in params.items()} if train_weights else {}
    return ThresholdResult(
        scores={g.group.id: g.scores.detach().cpu().clone() for g in gates},
        keep=keep, budget=final, kind=budget, target=target,
        ratios={g.group.id: float(r) for g, r in zip(gates, ratios)}, history=history, weights=weights,
    )


def budget_of(analysis: "Analysis", keep: Mapping[str, int], budget: str = "params") -> float:
    """Remaining parameter or FLOPs fraction when each group in ``keep`` keeps that many units."""
    if budget not in ("params", "flops"):
        raise ValueError(f"budget must be 'params' or 'flops', got {budget!r}")
    gates = []
    for gid, k in keep.items():
        g = analysis.group(gid)
        if not 1 <= k <= g.size:
            raise PlanError(f"group {gid!r}: kept count {k} is outside 1..{g.size}")
        gates.append(_Gate(g, (g.size,), 1, nn.Parameter(torch.zeros(g.size)), nn.Parameter(torch.zeros(()))))
    index = _Index(analysis, gates)
    example = [torch.zeros(s, dtype=getattr(torch, d)) for s, d in zip(analysis.input_shapes, analysis.input_dtypes)]
    cost = _Budget(analysis, index, budget, analysis.graph_module, example)
    with torch.no_grad():
        return float(cost([torch.tensor(keep[g.group.id] / g.n) for g in gates]))


def _param_slots(analysis: "Analysis", gm: fx.GraphModule, index: _Index) -> dict[str, list]:
    """Per gated parameter: ``[(dim, length, [(gate, index)])]``."""
    names = dict(gm.named_parameters())
    gated = {name for g in index.gates for name, _ in g.group.params if name in names}
    out = {}
    for name in gated:
        td = analysis.params[name]
        dims = []
        for d, lay in enumerate(td.dims):
            entries = index.of(lay)
            if entries:
                dims.append((d, td.shape[d], entries))
        if dims:
            out[name] = dims
    return out


def _gated_params(params: dict[str, torch.Tensor], slots: dict[str, list], masks: Sequence[torch.Tensor]) -> dict:
    out = {}
    for name, dims in slots.items():
        w = params[name]
        for d, length, entries in dims:
            m = _dim_values(entries, masks, length).to(w.dtype)
            shape = [1] * w.dim()
            shape[d] = length
            w = w * m.reshape(shape)
        out[name] = w
    return out
