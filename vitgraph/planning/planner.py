"""Plans built to a target: FLOPs, parameters or latency, globally ranked (NViT) or uniform.

:class:`CostModel` prices a set of kept widths (one count per group) without running the model:
FLOPs and parameters follow from the analysis' layouts of every compute node and parameter, and
latency from a :class:`~vitgraph.planning.latency.LatencyTable` (sum over the compute nodes plus an
element-wise part).  :func:`plan_widths` removes units of channels until the cost reaches a
fraction of the dense model's (``vitgraph.targets`` closes the loop on measured latency).
"""
from __future__ import annotations

import heapq
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import numpy as np
import torch
import torch.fx as fx

from vitgraph.analysis.kinds import PRUNABLE_KINDS, unknown_kinds
from vitgraph.analysis.context import META_KEY, TensorDims
from vitgraph.analysis.ops.registry import lookup_op
from vitgraph.errors import PlanError
from vitgraph.planning import align as _align
from vitgraph.planning.plan import Plan

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup
    from vitgraph.planning.latency import LatencyTable

DEFAULT_UNIT = {"residual": 16, "head": 1, "qk": 8, "v": 8, "ffn": 16, "other": 16}
DEFAULT_MIN_WIDTH = {"residual": 64, "head": 1, "qk": 8, "v": 8, "ffn": 64, "other": 16}
TARGETS = ("flops", "params", "latency")



# ---------------------------------------------------------------------------------------------
# cost model


@dataclass(frozen=True)
class _Dim:
    """One dim of a tensor: its layout (``None``: no channels) and original size."""

    layout: Any
    size: int


@dataclass(frozen=True)
class _Op:
    """A priced node: family and the dims its cost reads."""

    name: str
    family: str  # linear, bmm, baddbmm-as-bmm, conv, sdpa, eltwise
    dims: tuple[tuple[_Dim, ...], ...]  # per operand: dims (output first)
    extra: tuple[int, ...] = ()  # conv: kernel product etc.


class CostModel:
    """FLOPs, parameters and (with a table) latency of an analysed model at any kept widths.

    Widths are a mapping group id -> kept count (heads for ``head`` groups, per-head dims for
    ``qk``/``v``, channels otherwise); groups not listed keep everything.  FLOPs follow the
    convention of ``vitgraph.deploy.flops`` (2 per multiply-add of matmuls, linears, convolutions and
    attention; the same on every torch release), as ``measure.count_flops`` counts it, at the
    analysis' input shapes; parameters follow ``measure.count_params``.
    """

    def __init__(self, analysis: "Analysis") -> None:
        self.analysis = analysis
        self.store = analysis.store
        self.full = {g.id: g.size for g in analysis.groups}
        self._axis_group = {g.axis: g.id for g in analysis.groups}
        self.batch = int(analysis.input_shapes[0][0]) if analysis.input_shapes and analysis.input_shapes[0] else 1
        gm = analysis.graph_module
        self.ops: list[_Op] = []
        for node in gm.graph.nodes:
            op = _price(gm, node, analysis)
            if op is not None:
                self.ops.append(op)
        param_names = {n for n, _ in gm.named_parameters()}
        self._params = [(tuple(_Dim(lay, s) for lay, s in zip(td.dims, td.shape)))
                        for name, td in analysis.params.items() if name in param_names]
        seen = sum(math.prod(d.size for d in p) for p in self._params)
        model = analysis.model if analysis.model is not None else gm
        self._param_const = sum(p.numel() for p in {id(p): p for p in model.parameters()}.values()) - seen
        # which ops each group's width changes (for fast latency deltas)
        self._ops_of: dict[str, list[int]] = {g.id: [] for g in analysis.groups}
        for i, op in enumerate(self.ops):
            touched = set()
            for operand in op.dims:
                for d in operand:
                    touched |= self._groups_in(d.layout)
            for gid in touched:
                self._ops_of[gid].append(i)

    # -- sizes ------------------------------------------------------------------------------------
    def _groups_in(self, layout: Any) -> set[str]:
        out: set[str] = set()
        if layout is None:
            return out
        st = self.store
        stack = [a for blk in layout for a in blk]
        seen = set()
        while stack:
            r = st.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            if r in self._axis_group:
                out.add(self._axis_group[r])
            if r in st.stale and st.stale[r]:
                stack.extend(st.stale[r])
            d = st.defs.get(r)
            if d is not None:
                stack.extend(a for blk in d for a in blk)
        return out

    def _sizer(self, widths: Mapping[str, int]) -> "_Sizer":
        by_axis = {}
        for gid, w in widths.items():
            g = self.analysis.group(gid)
            by_axis[g.axis] = int(w)
        return _Sizer(self.store, by_axis)

    # -- costs ------------------------------------------------------------------------------------
    def flops(self, widths: Mapping[str, int] = {}) -> int:  # noqa: B006 - read only
        """FLOPs of one forward pass at the analysis' inputs."""
        sz = self._sizer(widths)
        return int(sum(_op_flops(op, sz) for op in self.ops))

    def params(self, widths: Mapping[str, int] = {}) -> int:  # noqa: B006
        """Parameter elements of the compressed model."""
        sz = self._sizer(widths)
        return int(self._param_const + sum(math.prod(sz.size(d) for d in p) for p in self._params))

    def latency(self, widths: Mapping[str, int], table: "LatencyTable", ops: Optional[Sequence[int]] = None) -> float:
        """Predicted latency in ms on the table's runtime at its batch size (sum over ops)."""
        sz = self._sizer(widths)
        scale = table.batch / self.batch
        idx = range(len(self.ops)) if ops is None else ops
        return float(sum(_op_latency(self.ops[i], sz, table, scale, self) for i in idx))

    def latency_delta(self, widths: Mapping[str, int], gid: str, new: int, table: "LatencyTable") -> float:
        """Lat(widths) - Lat(widths with group ``gid`` at ``new``), over the ops it touches."""
        ops = self._ops_of.get(gid, [])
        after = dict(widths)
        after[gid] = new
        return self.latency(widths, table, ops) - self.latency(after, table, ops)

    def terms(self, target: str) -> list[tuple[float, list[tuple[Any, int]]]]:
        """The dense ``flops`` or ``params`` as terms ``(count, [(layout, size), ...])``: each term
        scales with the kept fraction of every listed dim (dims without channels are left out).

        This is the cost model in a form gradients pass through: the threshold budget multiplies
        each term by its dims' differentiable keep ratios (``fraction``)."""
        memo = self.__dict__.setdefault("_terms_memo", {})
        if target not in memo:
            memo[target] = self._make_terms(target)
        return memo[target]

    def _make_terms(self, target: str) -> list[tuple[float, list[tuple[Any, int]]]]:
        out: list[tuple[float, list[tuple[Any, int]]]] = []
        if target == "flops":
            for op in self.ops:
                for coef, dims in _op_terms(op):
                    out.append((coef * math.prod(d.size for d in dims),
                                [(d.layout, d.size) for d in dims if d.layout is not None]))
            return [t for t in out if t[0]]
        if target == "params":
            out = [(float(math.prod(d.size for d in p)), [(d.layout, d.size) for d in p if d.layout is not None])
                   for p in self._params]
            return out + ([(float(self._param_const), [])] if self._param_const else [])
        raise PlanError(f"terms exist for 'flops' and 'params', got {target!r}")

    def fraction(self, target: str, factor: Any) -> Any:
        """Remaining fraction of the dense ``flops``/``params`` when each dim keeps ``factor(layout,
        size)`` of its channels (a number or a tensor; ``None``: all of them)."""
        terms = self.terms(target)
        total = sum(t[0] for t in terms)
        if total <= 0:
            raise PlanError(f"the model has no {target} to budget")
        kept = 0.0
        for count, dims in terms:
            frac = 1.0
            for lay, size in dims:
                f = factor(lay, size)
                if f is not None:
                    frac = frac * f
            kept = kept + count * frac
        return kept / total

    def cost(self, target: str, widths: Mapping[str, int], table: Optional["LatencyTable"] = None) -> float:
        """``flops``, ``params`` or ``latency`` of ``widths``."""
        if target == "flops":
            return float(self.flops(widths))
        if target == "params":
            return float(self.params(widths))
        if table is None:
            raise PlanError("target='latency' needs a latency_table (vitgraph.LatencyTable)")
        return self.latency(widths, table)

    def varies(self, d: _Dim) -> bool:
        """Whether a dim's size depends on any group's width."""
        return bool(self._groups_in(d.layout))


class _Sizer:
    """Sizes of layouts when each group axis keeps a count (memoised for one set of widths)."""

    def __init__(self, store: Any, counts: dict[int, int]) -> None:
        self.store = store
        self.counts = counts
        self.memo: dict[int, int] = {}

    def size(self, d: _Dim) -> int:
        if d.layout is None:
            return d.size
        return sum(self._block(b) for b in d.layout)

    def _block(self, blk: tuple[int, ...]) -> int:
        n = 1
        for a in blk:
            n *= self._axis(self.store.find(a))
        return n

    def _axis(self, r: int) -> int:
        hit = self.memo.get(r)
        if hit is not None:
            return hit
        st = self.store
        if r in self.counts:
            n = self.counts[r]
        elif r in st.stale and st.stale[r]:
            n = max(self._axis(st.find(c)) for c in st.stale[r])  # ragged sections: the widest
        elif r in st.defs:
            n = sum(self._block(b) for b in st.defs[r])
        else:
            n = st.size[r]
        self.memo[r] = n
        return n


def _dims_of(node: Any) -> Optional[tuple[_Dim, ...]]:
    td = node.meta.get(META_KEY) if isinstance(node, fx.Node) else None
    if not isinstance(td, TensorDims):
        return None
    return tuple(_Dim(lay, s) for lay, s in zip(td.dims, td.shape))


def _param_dims(analysis: "Analysis", name: str) -> Optional[tuple[_Dim, ...]]:
    td = analysis.params.get(name)
    return None if td is None else tuple(_Dim(lay, s) for lay, s in zip(td.dims, td.shape))


def _price(gm: fx.GraphModule, node: fx.Node, analysis: "Analysis") -> Optional[_Op]:
    """The priced op of a node, or None for nodes with no cost (views, constants).

    The op's declared :class:`~vitgraph.analysis.ops.registry.Cost` says its family and the
    inputs that size it; an undeclared op, or a compute op whose inputs do not apply, is priced
    element-wise when it carries channels.
    """
    if node.op not in ("call_module", "call_function", "call_method"):
        return None
    out = _dims_of(node)
    if out is None:
        return None
    spec = lookup_op(gm, node)
    cost = spec.cost if spec is not None else None
    if cost is not None and cost.family == "free":
        return None
    if cost is not None and cost.inputs is not None:
        module = gm.get_submodule(node.target) if node.op == "call_module" else None
        got = cost.inputs(node, module)
        if got is not None:
            operands, extra = got
            dims = tuple(_param_dims(analysis, x) if isinstance(x, str) else _dims_of(x) for x in operands)
            if not any(d is None and isinstance(x, str) for x, d in zip(operands, dims)):
                return _Op(node.name, cost.family, (out, *dims), tuple(extra))
    return _Op(node.name, "eltwise", (out,)) if node.meta.get(META_KEY).live else None


def _op_terms(op: _Op) -> list[tuple[float, tuple[_Dim, ...]]]:
    """An op's FLOPs as a sum of ``coefficient * product of the sizes of dims`` (2 per multiply-add).

    linear / bmm: every output dim and the contracted one; conv: the output and the weight's
    input-channel and kernel dims; attention: ``q @ k^T`` (output rows, key length, q/k dim) plus
    ``attn @ v`` (the output, key length).  Integer widths and the differentiable keep ratios of
    the threshold budget evaluate the same terms.
    """
    out = op.dims[0]
    if op.family in ("linear", "bmm"):
        return [] if op.dims[1] is None else [(2.0, (*out, op.dims[1][-1]))]
    if op.family == "conv":
        return [] if op.dims[1] is None else [(2.0, (*out, *op.dims[1][1:]))]
    if op.family == "sdpa":
        q, k = op.dims[1], op.dims[2]
        if q is None or k is None:
            return []
        return [(2.0, (*out[:-1], k[-2], q[-1])), (2.0, (*out, k[-2]))]
    return []


def _op_flops(op: _Op, sz: _Sizer) -> float:
    return sum(coef * math.prod(sz.size(d) for d in dims) for coef, dims in _op_terms(op))


def _op_latency(op: _Op, sz: _Sizer, table: "LatencyTable", scale: float, cm: CostModel) -> float:
    outd = op.dims[0]
    out = [sz.size(d) for d in outd]
    if op.family == "eltwise":
        return table.lookup("eltwise", (math.prod(out) * scale,), (True,))
    if op.family in ("linear", "bmm") and op.dims[1] is not None:
        k_dim = op.dims[1][-1]
        k = sz.size(k_dim)
        if op.family == "linear":
            m = math.prod(out[:-1]) * scale
            return table.lookup("linear", (m, k, out[-1]), (False, cm.varies(k_dim), cm.varies(outd[-1])))
        b = math.prod(out[:-2]) * scale
        vary_b = any(cm.varies(d) for d in outd[:-2])
        return table.lookup("bmm", (b, out[-2], k, out[-1]),
                            (vary_b, cm.varies(outd[-2]), cm.varies(k_dim), cm.varies(outd[-1])))
    if op.family == "conv" and op.dims[1] is not None:
        w = [sz.size(d) for d in op.dims[1]]
        groups = op.extra[0] if op.extra else 1
        m = math.prod(out) / out[1] * scale
        if groups == 1:
            return table.lookup("linear", (m, math.prod(w[1:]), out[1]),
                                (False, any(cm.varies(d) for d in op.dims[1][1:]), cm.varies(outd[1])))
        # grouped/depthwise convolution: priced as element-wise work over output x kernel
        return table.lookup("eltwise", (math.prod(out) * math.prod(w[1:]) * scale,), (True,))
    if op.family == "sdpa" and op.dims[1] is not None and op.dims[2] is not None:
        q, k = op.dims[1], op.dims[2]
        b = math.prod(out[:-2]) * scale
        dims = (b, out[-2], sz.size(k[-2]), sz.size(q[-1]), out[-1])
        vary = (any(cm.varies(d) for d in outd[:-2]), False, False, cm.varies(q[-1]), cm.varies(outd[-1]))
        return table.lookup("sdpa", dims, vary)
    return 0.0


# ---------------------------------------------------------------------------------------------
# planning


@dataclass
class _GroupState:
    g: "ChannelGroup"
    step: int  # channels (or heads) per unit
    min_w: int
    width: int
    round_to: int  # kept counts are multiples of this (or the full width)
    order: Optional[np.ndarray] = None  # 1-D: channels by ascending score
    head_orders: Optional[np.ndarray] = None  # per-head qk/v: [heads, dims] ascending per head
    scores: Optional[np.ndarray] = None
    tied: Optional[str] = None  # a group that keeps the same width (a v group with its q/k group)
    follows: bool = False  # the width is set by the group that ties it

    def down_width(self) -> Optional[int]:
        """Kept count after removing the finest allowed step (None when at the minimum)."""
        nxt = max(((self.width - 1) // self.round_to) * self.round_to, self.min_w)
        return nxt if nxt < self.width else None

    def up_width(self) -> Optional[int]:
        """Kept count after adding back the finest allowed step (None when full)."""
        if self.width >= self.g.size:
            return None
        return min(self.g.size, (self.width // self.round_to + 1) * self.round_to)

    def next_width(self) -> Optional[int]:
        """Kept count after removing one more unit (None when at the minimum)."""
        if self.width <= self.min_w:
            return None
        r = self.step
        nxt = ((self.width - 1) // r) * r
        nxt = max(nxt, self.min_w)
        return nxt if nxt < self.width else None


def _as_np(t: Any) -> np.ndarray:
    return torch.as_tensor(t, dtype=torch.float64).detach().cpu().numpy()


def plan_widths(
    analysis: "Analysis",
    scores: Optional[Mapping[str, Any]] = None,
    target: str = "flops",
    fraction: float = 0.5,
    eta: float = 5e-4,
    latency_table: Optional["LatencyTable"] = None,
    unit: Optional[Mapping[str, int]] = None,
    min_width: Optional[Mapping[str, int]] = None,
    round_to: int = 1,
    kinds: Optional[Sequence[str]] = None,
    mode: str = "global",
    normalize: bool = True,
    batch_units: int = 8,
    history: Optional[list] = None,
    align: Optional[str] = None,
) -> Plan:
    """A plan whose ``target`` cost (flops, params or latency) is at most ``fraction`` of the dense model's.

    ``mode="global"`` (NViT): units (``unit[kind]`` channels, one head, or per-head dims removed
    from every head alike) are ranked by ``score - eta * (Lat(W) - Lat(W - unit))`` (the latency
    term only with a ``latency_table``) and the lowest ``batch_units`` are removed per round until
    the target is met (the last round stops at the first unit that meets it; a unit that would
    land more than 0.5% under the target is put back and its group left alone while finer units
    remain); then the budget left is filled again, step by step (``round_to`` channels or one
    head), with the step that buys the most score per cost that still fits, so the plan lands
    just under the target.  With ``normalize``
    each group's scores are divided by their mean and all units' scores sum to 1, so kinds compare
    by relative importance and ``eta`` weighs milliseconds against that share.
    ``mode="uniform"``: one removal ratio for every group, the smallest that meets the target
    (bisection); the baseline for magnitude scores.

    ``scores`` maps group ids to 1-D scores (``[heads, dims]`` for per-head qk/v, ``[heads]`` for
    head groups); missing entries mean magnitude.  Kept channel counts are multiples of
    ``round_to`` (heads are not rounded) and at least ``min_width[kind]``.  ``target="latency"``
    needs ``latency_table``.  ``history`` (a list) receives one dict per planning round.
    ``align="kernels"`` keeps widths that fused GPU kernels run fast (:mod:`vitgraph.planning.align`:
    equal q/k and v head dims in multiples of 8, at least 16; FFN and residual widths in multiples
    of 64).  ``vitgraph.plan_to_target`` adds closing the loop on measured latency (``calibrate=True``).
    """
    args = planning_args(analysis, scores, target, fraction, eta, latency_table, unit, min_width, round_to,
                         kinds, mode, normalize, batch_units, align)
    plan, widths, cost, dense = plan_once(fraction=fraction, **args)
    if history is not None:
        history.append({"planned_fraction": fraction, "predicted": cost / dense, "widths": widths})
    return plan


def planning_args(analysis: "Analysis", scores: Optional[Mapping[str, Any]], target: str, fraction: float,
                  eta: float, latency_table: Optional["LatencyTable"], unit: Optional[Mapping[str, int]],
                  min_width: Optional[Mapping[str, int]], round_to: int, kinds: Optional[Sequence[str]], mode: str,
                  normalize: bool, batch_units: int, align: Optional[str] = None) -> dict:
    """The checked arguments of :func:`plan_once` (everything but the fraction) for ``plan_widths``'s options."""
    if target not in TARGETS:
        raise PlanError(f"target must be one of {TARGETS}, got {target!r}")
    if not 0.0 < fraction <= 1.0:
        raise PlanError(f"fraction must be in (0, 1], got {fraction}")
    if mode not in ("global", "uniform"):
        raise PlanError(f"mode must be 'global' or 'uniform', got {mode!r}")
    if round_to < 1:
        raise PlanError(f"round_to must be >= 1, got {round_to}")
    if target == "latency" and latency_table is None:
        raise PlanError("target='latency' needs a latency_table (vitgraph.LatencyTable)")
    _align.check_align(align)
    kinds = tuple(kinds) if kinds is not None else PRUNABLE_KINDS
    bad = unknown_kinds(kinds)
    if bad:
        raise PlanError(f"unknown group kinds {bad}")
    cm = CostModel(analysis)
    scores = _complete_scores(analysis, scores, kinds)
    args = dict(cm=cm, scores=scores, target=target, eta=eta, table=latency_table,
                unit={**DEFAULT_UNIT, **(unit or {})}, min_width={**DEFAULT_MIN_WIDTH, **(min_width or {})},
                round_to=round_to, kinds=kinds, mode=mode, normalize=normalize, batch_units=batch_units,
                align=align)
    return args


def _complete_scores(analysis: "Analysis", scores: Optional[Mapping[str, Any]], kinds: Sequence[str]) -> dict:
    scores = {k: v for k, v in (scores or {}).items() if v is not None}
    missing = [g.id for g in analysis.groups if g.kind in kinds and g.id not in scores]
    if missing:
        from vitgraph.planning.magnitude import magnitude_scores

        scores.update(magnitude_scores(analysis, missing))
    return scores


def _states(cm: CostModel, scores: dict, unit: Mapping[str, int], min_width: Mapping[str, int],
            round_to: int, kinds: Sequence[str], normalize: bool, align: Optional[str] = None) -> dict[str, _GroupState]:
    out = {}
    an = cm.analysis
    for g in an.groups:
        if g.kind not in kinds:
            continue
        s = _as_np(scores[g.id])
        if normalize and s.size and s.mean() > 0:
            s = s / s.mean()
        rt = _align.multiple(g.kind, round_to, align)
        step = math.lcm(max(1, int(unit.get(g.kind, 1 if g.kind == "head" else 16))), rt)
        mw = _align.minimum(g.kind, int(min_width.get(g.kind, 1)), g.size, round_to, align)
        st = _GroupState(g, step, mw, g.size, rt, scores=s)
        if s.ndim == 2 and g.per_head:
            st.head_orders = np.argsort(s, axis=1, kind="stable")
        else:
            flat = s.sum(0) if s.ndim == 2 else s
            st.scores = flat
            st.order = np.argsort(flat, kind="stable")
        out[g.id] = st
    if align == "kernels":
        _tie_attention(cm.analysis, out)
    return out


def _tie_attention(analysis: "Analysis", states: dict[str, _GroupState]) -> None:
    """Each attention's v group follows its q/k group's width (both planned as one unit); a q/k or
    v group whose partner is not planned, or whose dense width differs from it, keeps its full width."""
    for st in states.values():
        if st.g.kind in ("qk", "v") and st.g.head_group is None:  # no attention to match it in
            st.min_w = st.g.size
    for qk, v in _align.attention_pairs(analysis).values():
        a = states.get(qk.id) if qk is not None else None
        b = states.get(v.id) if v is not None else None
        if a is None or b is None:
            for st in (a, b):
                if st is not None:
                    st.min_w = st.g.size
            continue
        if a.g.size != b.g.size:  # designed with unequal head dims (LeViT): left as the dense model has them
            a.min_w, b.min_w = a.g.size, b.g.size
            continue
        a.min_w = b.min_w = max(a.min_w, b.min_w)
        a.step = b.step = max(a.step, b.step)
        a.tied, b.follows = b.g.id, True


def _unit_score(st: _GroupState, nxt: int, states: dict[str, _GroupState]) -> float:
    """Score of the channels (or heads) that go from ``st.width`` down to ``nxt``."""
    drop = st.width - nxt
    if st.head_orders is not None:
        s = st.scores
        heads = range(s.shape[0])
        hs = states.get(st.g.head_group)
        if hs is not None and hs.order is not None:
            heads = hs.order[hs.g.size - hs.width:]  # kept heads
        total = 0.0
        for h in heads:
            # each head keeps its top ``width`` dims; the next unit removes its lowest kept ones
            kept = st.head_orders[h][st.g.size - st.width:]
            total += float(s[h, kept[:drop]].sum())
        return total
    kept = st.order[st.g.size - st.width:]
    return float(st.scores[kept[:drop]].sum())


def plan_once(cm: CostModel, scores: dict, target: str, fraction: float, eta: float, table: Optional["LatencyTable"],
               unit: Mapping[str, int], min_width: Mapping[str, int], round_to: int, kinds: Sequence[str],
               mode: str, normalize: bool, batch_units: int,
               align: Optional[str] = None) -> tuple[Plan, dict[str, int], float, float]:
    states = _states(cm, scores, unit, min_width, round_to, kinds, normalize, align)
    dense = cm.cost(target, {}, table)
    goal = fraction * dense
    floor = cm.cost(target, {gid: st.min_w for gid, st in states.items()}, table)
    if floor > goal * (1 + 1e-9):
        raise PlanError(
            f"cannot reach {target} fraction {fraction:.3f}: with every group of kinds {list(kinds)} at its minimum width "
            f"the {target} is still {floor / dense:.3f} of the dense model's (lower min_width or add kinds)"
        )
    for attempt in range(3):
        for st in states.values():
            st.width = st.g.size
        if mode == "uniform":
            widths = _uniform(cm, states, target, goal, table)
        else:
            widths = _global(cm, states, target, goal, eta, table, normalize, batch_units)
        # points measured while planning are re-measured (noise-robust) and the plan redone
        if table is None or not table.fresh or attempt == 2:
            break
        table.refine()
        dense, goal = cm.cost(target, {}, table), fraction * cm.cost(target, {}, table)
    for gid, w in widths.items():
        states[gid].width = w
    plan = _to_plan(cm.analysis, states)
    if table is not None:
        table.save()
    return plan, widths, cm.cost(target, widths, table), dense


def _uniform_widths(states: dict[str, _GroupState], ratio: float) -> dict[str, int]:
    out = {}
    for gid, st in states.items():
        n = st.g.size * (1.0 - ratio)
        if st.round_to > 1:
            n = round(n / st.round_to) * st.round_to
        out[gid] = int(min(st.g.size, max(st.min_w, round(n))))
    for gid, st in states.items():
        if st.tied is not None:
            out[st.tied] = out[gid]
    return out


def _uniform(cm: CostModel, states: dict, target: str, goal: float, table: Optional["LatencyTable"]) -> dict[str, int]:
    lo, hi = 0.0, 1.0
    if cm.cost(target, _uniform_widths(states, 0.0), table) <= goal:
        return _uniform_widths(states, 0.0)
    for _ in range(40):  # cost(ratio) is a non-increasing step function: find its first step below goal
        mid = 0.5 * (lo + hi)
        if cm.cost(target, _uniform_widths(states, mid), table) <= goal:
            hi = mid
        else:
            lo = mid
    return _uniform_widths(states, hi)


def _global(cm: CostModel, states: dict, target: str, goal: float, eta: float, table: Optional["LatencyTable"],
            normalize: bool, batch_units: int, close: float = 0.005) -> dict[str, int]:
    """NViT's global ranking: remove the lowest-priority units until the cost is within ``goal``.

    A unit that would land more than ``close`` (relative) under ``goal`` is put back and its group
    left alone from then on, so finer units elsewhere finish the job (a residual unit changes every
    block at once); when none is left, the put-back unit that lands closest under ``goal`` is
    taken.  What is left under ``goal`` is then filled again (:func:`_fill`, :func:`_swap_fill`).
    """
    widths = {gid: st.width for gid, st in states.items()}
    scale = 1.0
    if normalize:
        total = 0.0
        for st in states.values():
            total += float(np.abs(st.scores).sum()) if st.scores is not None else 0.0
        scale = 1.0 / total if total > 0 else 1.0
    use_lat = table is not None and eta != 0.0
    cost = cm.cost(target, widths, table)
    blocked: dict[str, int] = {}  # groups whose next unit passed the goal by more than ``close``: gid -> that width
    while cost > goal:
        cands = []
        for gid, st in states.items():
            nxt = st.next_width()
            if nxt is None or st.follows or gid in blocked:
                continue
            pri = sum(_unit_score(states[k], nxt, states) for k in _moved(st)) * scale
            if use_lat:
                pri -= eta * _latency_delta(cm, widths, {k: nxt for k in _moved(st)}, table)
            cands.append((pri, gid, nxt))
        if not cands:
            if not blocked:
                break
            # every unit left passes the goal by far: take the one that lands closest under it
            # (each did land under it when tried, and the cost has only fallen since)
            landings = [(cm.cost(target, {**widths, **{k: nxt for k in _moved(states[gid])}}, table), gid, nxt)
                        for gid, nxt in blocked.items()]
            cost, gid, nxt = max(landings)
            for k in _moved(states[gid]):
                states[k].width = widths[k] = nxt
            break
        removed = 0
        for _pri, gid, nxt in heapq.nsmallest(batch_units, cands):
            st = states[gid]
            if st.next_width() != nxt:
                continue
            before = (cost, {k: widths[k] for k in _moved(st)})
            for k in _moved(st):
                states[k].width = widths[k] = nxt
            removed += 1
            cost = cm.cost(target, widths, table)
            if cost <= goal:
                if cost < goal * (1 - close):  # a coarse unit (residual channels): undo, look for finer ones
                    blocked[gid] = nxt
                    cost = before[0]
                    for k, w in before[1].items():
                        states[k].width = widths[k] = w
                break
        if removed == 0:
            break
    if cost <= goal:
        _fill(cm, states, widths, target, goal, table, scale)
        _swap_fill(cm, states, widths, target, goal, table, scale)
    return widths


def _moved(st: _GroupState) -> tuple[str, ...]:
    """The groups one unit of ``st`` changes: itself and the group tied to it."""
    return (st.g.id,) if st.tied is None else (st.g.id, st.tied)


def _latency_delta(cm: CostModel, widths: Mapping[str, int], changes: Mapping[str, int], table: "LatencyTable") -> float:
    """Lat(widths) - Lat(widths with ``changes``), over the ops the changed groups touch."""
    if len(changes) == 1:
        (gid, new), = changes.items()
        return cm.latency_delta(widths, gid, new, table)
    ops = sorted({i for gid in changes for i in cm._ops_of.get(gid, [])})
    return cm.latency(widths, table, ops) - cm.latency({**widths, **changes}, table, ops)


def _up_score(st: _GroupState, up: int, states: dict[str, _GroupState]) -> float:
    """Score of the channels (or heads) that come back when ``st`` grows from its width to ``up``."""
    lo, hi = st.g.size - up, st.g.size - st.width
    if st.head_orders is not None:
        hs = states.get(st.g.head_group)
        heads = range(st.scores.shape[0]) if hs is None or hs.order is None else hs.order[hs.g.size - hs.width:]
        return float(sum(st.scores[h, st.head_orders[h][lo:hi]].sum() for h in heads))
    return float(st.scores[st.order[lo:hi]].sum())


def _fill(cm: CostModel, states: dict[str, _GroupState], widths: dict[str, int], target: str, goal: float,
          table: Optional["LatencyTable"], scale: float) -> None:
    """Spend what the removal left under ``goal``: grow groups by their finest step (``round_to``
    channels, one head, a tied q/k and v pair together), each time the step with the most score per
    added cost that keeps the cost within ``goal``, until none fits.

    Removal units (16 residual channels, 64 FFN channels when aligned) are coarse on small models;
    without this the last one overshoots the target by several percent."""
    cost = cm.cost(target, widths, table)
    tiny = 1e-12 * max(goal, 1.0)
    while True:
        best = None
        for st in states.values():
            up = st.up_width()
            if up is None or st.follows:
                continue
            new = {k: up for k in _moved(st)}
            c = cm.cost(target, {**widths, **new}, table)
            if c > goal:
                continue
            gain = sum(_up_score(states[k], up, states) for k in new) * scale
            ratio = gain / max(c - cost, tiny)
            if best is None or ratio > best[0]:
                best = (ratio, new, c)
        if best is None:
            return
        for k, w in best[1].items():
            states[k].width = widths[k] = w
        cost = best[2]


def _swap_fill(cm: CostModel, states: dict[str, _GroupState], widths: dict[str, int], target: str, goal: float,
               table: Optional["LatencyTable"], scale: float, close: float = 0.005, rounds: int = 16) -> None:
    """When no single step fits what is left (a residual channel step costs more), trade: grow one
    group by its finest step and shrink another by its finest step, the pair that loses the least
    score among those that raise the cost without passing ``goal``; then fill again.  Stops within
    ``close`` of ``goal`` (relative), or when no trade raises the cost."""
    cost = cm.cost(target, widths, table)
    leaders = [st for st in states.values() if not st.follows]
    for _ in range(rounds):
        if cost >= goal * (1 - close):
            return
        ups = [(st, st.up_width()) for st in leaders]
        downs = [(st, st.down_width()) for st in leaders]
        ups = [(st, w, sum(_up_score(states[k], w, states) for k in _moved(st))) for st, w in ups if w is not None]
        downs = [(st, w, sum(_unit_score(states[k], w, states) for k in _moved(st))) for st, w in downs if w is not None]
        best = None
        for a, wa, gain in ups:
            for b, wb, loss in downs:
                if a is b:
                    continue
                new = {**{k: wa for k in _moved(a)}, **{k: wb for k in _moved(b)}}
                c = cm.cost(target, {**widths, **new}, table)
                if not cost < c <= goal:
                    continue
                net = (gain - loss) * scale
                if best is None or net > best[0]:
                    best = (net, new, c)
        if best is None:
            return
        for k, w in best[1].items():
            states[k].width = widths[k] = w
        _fill(cm, states, widths, target, goal, table, scale)
        cost = cm.cost(target, widths, table)


def _to_plan(analysis: "Analysis", states: dict[str, _GroupState]) -> Plan:
    plan = Plan.keep_all(analysis)
    for gid, st in states.items():
        if st.width >= st.g.size:
            continue
        if st.head_orders is not None:
            plan.kept[gid] = [sorted(row[st.g.size - st.width:].tolist()) for row in st.head_orders]
        else:
            plan.kept[gid] = sorted(int(i) for i in st.order[st.g.size - st.width:])
    return plan
