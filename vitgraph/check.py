"""``check_model``: the end-to-end self-check behind the coverage benchmark and zoo tests.

For one model and example input it runs: analyze -> random plan over every prunable group at
``ratio`` -> compress -> run (output shape) -> params/FLOPs -> masked equivalence of the
qk/v/head/ffn groups (compressed vs zero-masked dense model) -> ONNX export with onnxruntime parity.
Then the same shape, masked-equivalence and ONNX checks for a plan that prunes only the ``qk``
groups and one that prunes only the ``v`` groups (q/k and v of every attention then end at
different sizes, the ragged case). Each step's outcome lands in a :class:`CheckReport`; the first
failure of each plan is recorded with its reason.
"""
from __future__ import annotations

import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import TYPE_CHECKING, Optional

import torch
from torch import nn

from vitgraph.analysis.kinds import ALL_KINDS, BLOCK_KINDS
from vitgraph.analysis.engine import analyze
from vitgraph.api import compress, mask
from vitgraph.passes.exactness import output_leaves, rel_err
from vitgraph.planning.plan import Plan
from vitgraph.errors import ArgumentTypeError

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis

RAGGED_PLANS = {"qk-only": ("qk",), "v-only": ("v",)}  # plan name -> the only kinds it prunes
MASKED_TOL, ONNX_TOL = 1e-5, 1e-4


@dataclass
class PlanCheck:
    """Shape, masked equivalence and ONNX parity of one plan that prunes only some kinds."""

    plan: str
    groups: int = 0
    shape_ok: bool = False
    masked_rel_err: float = float("nan")
    onnx_rel_err: float = float("nan")
    error: Optional[str] = None

    @property
    def ok(self) -> bool:
        """Nothing to prune, or shape kept with masked and ONNX parity."""
        if self.error is None and self.groups == 0:
            return True
        return (self.error is None and self.shape_ok and self.masked_rel_err <= MASKED_TOL
                and self.onnx_rel_err <= ONNX_TOL)

    def cell(self) -> str:
        """``masked/ONNX`` errors for a table cell; ``-`` when the model has no such groups."""
        if self.groups == 0 and self.error is None:
            return "-"
        return f"{self.masked_rel_err:.1e}/{self.onnx_rel_err:.1e}"

    def why(self) -> str:
        """The first failed check."""
        return self.error or _first_failure(self.shape_ok, self.masked_rel_err, self.onnx_rel_err)


def _first_failure(shape_ok: bool, masked: float, onnx: float) -> str:
    if not shape_ok:
        return "output shape changed"
    if not masked <= MASKED_TOL:
        return f"masked equivalence error {masked:.1e} > {MASKED_TOL:.0e}"
    return f"ONNX parity error {onnx:.1e} > {ONNX_TOL:.0e}"


@dataclass
class CheckReport:
    """What :func:`check_model` measured; ``error`` names the first failing step and why."""

    name: str
    groups: dict[str, int] = field(default_factory=dict)
    frozen_channels: int = 0
    unruled: list[str] = field(default_factory=list)
    analysis_s: float = float("nan")
    params: tuple[int, int] = (0, 0)
    flops: tuple[int, int] = (0, 0)
    masked_rel_err: float = float("nan")
    onnx_rel_err: float = float("nan")
    onnx_opset: int = 0
    shape_ok: bool = False
    error: Optional[str] = None
    ragged: list[PlanCheck] = field(default_factory=list)  # the qk-only and v-only plans

    @property
    def all_ok(self) -> bool:
        """The all-kinds plan passed: shape kept, params and FLOPs dropped, masked and ONNX parity."""
        return (
            self.error is None and self.shape_ok and self.params[1] < self.params[0] and self.flops[1] < self.flops[0]
            and self.masked_rel_err <= MASKED_TOL and self.onnx_rel_err <= ONNX_TOL
        )

    @property
    def ok(self) -> bool:
        """Every plan passed: the all-kinds plan and each of the qk-only and v-only plans."""
        return self.all_ok and len(self.ragged) == len(RAGGED_PLANS) and all(r.ok for r in self.ragged)

    def failures(self) -> list[str]:
        """``"<plan>: <reason>"`` for each plan that failed."""
        out = [] if self.all_ok else [f"all kinds: {self.error or self._why()}"]
        out += [f"{r.plan}: {r.why()}" for r in self.ragged if not r.ok]
        if self.all_ok and len(self.ragged) < len(RAGGED_PLANS):
            out.append("qk-only/v-only plans not run")
        return out

    def row(self) -> dict[str, object]:
        """One table row (see ``benchmarks/coverage.py``)."""
        g = self.groups
        return {
            "model": self.name,
            "groups r/h/qk/v/ffn/o": "/".join(str(g.get(k, 0)) for k in ALL_KINDS),
            "frozen ch": self.frozen_channels,
            "params M": f"{self.params[0] / 1e6:.2f} -> {self.params[1] / 1e6:.2f}" if self.params[0] else "-",
            "GFLOPs": f"{self.flops[0] / 1e9:.2f} -> {self.flops[1] / 1e9:.2f}" if self.flops[0] else "-",
            "masked err": f"{self.masked_rel_err:.1e}",
            "ONNX err": f"{self.onnx_rel_err:.1e}",
            **{f"{name} masked/ONNX": self._ragged_cell(name) for name in RAGGED_PLANS},
            "analyze s": f"{self.analysis_s:.2f}",
            "result": "ok" if self.ok else "FAIL: " + "; ".join(self.failures()),
        }

    def _ragged_cell(self, name: str) -> str:
        r = next((r for r in self.ragged if r.plan == name), None)
        return "not run" if r is None else r.cell() if r.ok else "FAIL"

    def _why(self) -> str:
        if not self.shape_ok:
            return "output shape changed"
        if not self.params[1] < self.params[0]:
            return "parameters did not drop"
        if not self.flops[1] < self.flops[0]:
            return "FLOPs did not drop"
        return _first_failure(True, self.masked_rel_err, self.onnx_rel_err)


def _first(out: object) -> torch.Tensor:
    """The first tensor of a model output (what the equivalence checks compare)."""
    leaves = output_leaves(out)
    if not leaves:
        raise ArgumentTypeError(f"the model output ({type(out).__name__}) holds no tensor")
    return leaves[0]


def _same_shapes(ref: object, out: object) -> bool:
    """Every output tensor keeps its shape (outputs are protected)."""
    a, b = output_leaves(ref), output_leaves(out)
    return len(a) == len(b) and all(x.shape == y.shape for x, y in zip(a, b))


def _randomize_constant_params(model: nn.Module, seed: int) -> None:
    """Add small random values to parameters initialised to a constant.

    Zero-initialised classifiers make every output 0, and layer-scale factors of 1e-5 make the
    output blind to the blocks, which would make every comparison vacuous; the check needs
    outputs that depend on every channel.  Norm weights of 1 and zero biases get noise too.
    """
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            flat = p.detach().reshape(-1)
            if p.numel() > 1 and bool((flat == flat[0]).all()):
                p.add_(torch.randn(p.shape, generator=gen, dtype=p.dtype) * 0.02)


def check_model(
    model: nn.Module, x: torch.Tensor, name: str = "model", ratio: float = 0.5, seed: int = 0,
    onnx: bool = True, flops: bool = True,
) -> CheckReport:
    """Run every coverage check on ``model`` with example input ``x`` (batch >= 1).

    Constant-initialised parameters of ``model`` first get small random values (see
    :func:`_randomize_constant_params`), so the model is modified in place.  After the all-kinds
    plan, a qk-only and a v-only plan (``RAGGED_PLANS``) are checked, each on its own.
    """
    from vitgraph.deploy.measure import count_flops, count_params

    rep = CheckReport(name)
    step, an = "analyze", None
    try:
        model.eval()
        _randomize_constant_params(model, seed)
        x1 = x[:1]
        t0 = time.perf_counter()
        an = analyze(model, x1)
        rep.analysis_s = time.perf_counter() - t0
        rep.groups = dict(Counter(g.kind for g in an.groups))
        rep.frozen_channels = sum(f.size for f in an.frozen)
        rep.unruled = sorted({w for _, w in an.unruled})
        step = "compress"
        plan = Plan.random(an, ratio, seed=seed)
        slim = compress(model, plan, an, keep_api=False)
        step = "run"
        with torch.no_grad():
            full_ref, full_out = model(x), slim(x)
        out = _first(full_out)
        rep.shape_ok = _same_shapes(full_ref, full_out)
        step = "count"
        rep.params = (count_params(model), count_params(slim))
        if flops:
            rep.flops = (count_flops(model, (x1,)), count_flops(slim, (x1,)))
        step = "masked equivalence"
        inner = _comparable(an, Plan.random(an, ratio, kinds=BLOCK_KINDS, seed=seed + 1))
        with torch.no_grad():
            rep.masked_rel_err = rel_err(_first(compress(model, inner, an, keep_api=False)(x)), _first(mask(model, inner, an)(x)))
        if onnx:
            step = "ONNX export"
            rep.onnx_opset, rep.onnx_rel_err = _onnx_parity(slim, x, out)
        else:
            rep.onnx_rel_err = 0.0
    except Exception as e:  # noqa: BLE001 - a report records any failure with its step
        rep.error = _describe(step, e)
        if an is None:
            return rep
    for k, (plan_name, kinds) in enumerate(RAGGED_PLANS.items()):
        ragged = Plan.random(an, ratio, kinds=kinds, seed=seed + 2 + k)
        rep.ragged.append(_check_plan(model, an, x, plan_name, ragged, onnx))
    return rep


def _comparable(an: "Analysis", plan: Plan) -> Plan:
    """``plan`` without its normalised groups: zeroing normalised channels changes the statistics,
    so the masked model is not comparable there."""
    for g in an.groups:
        if g.normalized:
            plan.kept.pop(g.id, None)
    return plan


def _check_plan(model: nn.Module, an: "Analysis", x: torch.Tensor, name: str, plan: Plan, onnx: bool) -> PlanCheck:
    """Compress with ``plan``: output shape, ONNX parity, and masked equivalence of its comparable
    groups (see :func:`_comparable`)."""
    res = PlanCheck(name, groups=len(plan.kept))
    if not plan.kept:
        return res
    step = "compress"
    try:
        slim = compress(model, plan, an, keep_api=False)
        step = "run"
        with torch.no_grad():
            full_ref, full_out = model(x), slim(x)
        out = _first(full_out)
        res.shape_ok = _same_shapes(full_ref, full_out)
        step = "masked equivalence"
        inner = _comparable(an, replace(plan, kept=dict(plan.kept)))
        with torch.no_grad():
            got = out if inner.kept == plan.kept else _first(compress(model, inner, an, keep_api=False)(x))
            res.masked_rel_err = rel_err(got, _first(mask(model, inner, an)(x)))
        if onnx:
            step = "ONNX export"
            res.onnx_rel_err = _onnx_parity(slim, x, out)[1]
        else:
            res.onnx_rel_err = 0.0
    except Exception as e:  # noqa: BLE001 - a report records any failure with its step
        res.error = _describe(step, e)
    return res


def _onnx_parity(slim: nn.Module, x: torch.Tensor, out: torch.Tensor) -> tuple[int, float]:
    """Export ``slim`` to ONNX; its opset and max |onnxruntime - torch| / max |torch|.

    The export's own element-wise check gets an absolute tolerance of ``ONNX_TOL`` times the
    output's magnitude (never below 1e-3): with logits in the hundreds, float32 rounding alone
    differs by more than 1e-3 on an element near zero.  ``ONNX_TOL`` then judges the result.
    """
    from vitgraph.deploy.export import export_onnx

    scale = max(float(out.abs().max()), 1e-12)
    with tempfile.TemporaryDirectory() as d:
        er = export_onnx(slim, Path(d) / "m.onnx", (x,), atol=max(1e-3, ONNX_TOL * scale), rtol=1e-3)
    return er.opset, er.max_abs_diff / scale


def _describe(step: str, e: BaseException) -> str:
    """``"<step>: <Error>: <first line> [file:line]"``, naming the innermost vitgraph frame."""
    tb = traceback.extract_tb(e.__traceback__)
    where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb)
                  if "vitgraph" in f.filename or "passes" in f.filename), "")
    msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
    return f"{step}: {type(e).__name__}: {msg} [{where}]"
