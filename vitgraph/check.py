"""``check_model``: the end-to-end self-check behind the coverage benchmark and zoo tests.

For one model and example input it runs: analyze -> random plan over every prunable group at
``ratio`` -> compress -> run (output shape) -> params/FLOPs -> masked equivalence of the
qk/v/head/ffn groups (compressed vs zero-masked dense model) -> ONNX export with onnxruntime parity.
Each step's outcome lands in a :class:`CheckReport`; the first failure is recorded with its reason.
"""
from __future__ import annotations

import tempfile
import time
import traceback
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .analysis import analyze
from .api import compress, mask
from .plan import Plan

INNER_KINDS = ("qk", "v", "head", "ffn")


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

    @property
    def ok(self) -> bool:
        """Every check passed: shape kept, params and FLOPs dropped, masked and ONNX parity."""
        return (
            self.error is None and self.shape_ok and self.params[1] < self.params[0] and self.flops[1] < self.flops[0]
            and self.masked_rel_err <= 1e-5 and self.onnx_rel_err <= 1e-4
        )

    def row(self) -> dict[str, object]:
        """One table row (see ``benchmarks/coverage.py``)."""
        g = self.groups
        return {
            "model": self.name,
            "groups r/h/qk/v/ffn/o": "/".join(str(g.get(k, 0)) for k in ("residual", "head", "qk", "v", "ffn", "other")),
            "frozen ch": self.frozen_channels,
            "params M": f"{self.params[0] / 1e6:.2f} -> {self.params[1] / 1e6:.2f}" if self.params[0] else "-",
            "GFLOPs": f"{self.flops[0] / 1e9:.2f} -> {self.flops[1] / 1e9:.2f}" if self.flops[0] else "-",
            "masked err": f"{self.masked_rel_err:.1e}",
            "ONNX err": f"{self.onnx_rel_err:.1e}",
            "analyze s": f"{self.analysis_s:.2f}",
            "result": "ok" if self.ok else f"FAIL: {self.error or self._why()}",
        }

    def _why(self) -> str:
        if not self.shape_ok:
            return "output shape changed"
        if not self.params[1] < self.params[0]:
            return "parameters did not drop"
        if not self.flops[1] < self.flops[0]:
            return "FLOPs did not drop"
        if not self.masked_rel_err <= 1e-5:
            return f"masked equivalence error {self.masked_rel_err:.1e} > 1e-5"
        return f"ONNX parity error {self.onnx_rel_err:.1e} > 1e-4"


def _rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


def _first(out: object) -> torch.Tensor:
    while isinstance(out, (tuple, list)):
        out = out[0]
    if isinstance(out, dict):
        out = next(iter(out.values()))
    assert isinstance(out, torch.Tensor)
    return out


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
    :func:`_randomize_constant_params`), so the model is modified in place.
    """
    from .export import export_onnx
    from .measure import count_flops, count_params

    rep = CheckReport(name)
    step = "analyze"
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
        slim = compress(model, plan, an)
        step = "run"
        with torch.no_grad():
            ref, out = _first(model(x)), _first(slim(x))
        rep.shape_ok = out.shape == ref.shape
        step = "count"
        rep.params = (count_params(model), count_params(slim))
        if flops:
            rep.flops = (count_flops(model, (x1,)), count_flops(slim, (x1,)))
        step = "masked equivalence"
        inner = Plan.random(an, ratio, kinds=INNER_KINDS, seed=seed + 1)
        for g in an.groups:  # zeroing normalised channels changes the statistics: not comparable
            if g.normalized:
                inner.kept.pop(g.id, None)
        with torch.no_grad():
            rep.masked_rel_err = _rel(_first(compress(model, inner, an)(x)), _first(mask(model, inner, an)(x)))
        if onnx:
            step = "ONNX export"
            with tempfile.TemporaryDirectory() as d:
                er = export_onnx(slim, Path(d) / "m.onnx", (x,), atol=1e-3, rtol=1e-3)
                rep.onnx_opset = er.opset
                rep.onnx_rel_err = er.max_abs_diff / max(float(out.abs().max()), 1e-12)
        else:
            rep.onnx_rel_err = 0.0
    except Exception as e:  # noqa: BLE001 - a report records any failure with its step
        tb = traceback.extract_tb(e.__traceback__)
        where = next((f"{Path(f.filename).name}:{f.lineno}" for f in reversed(tb) if "vitgraph" in f.filename or "passes" in f.filename), "")
        msg = str(e).strip().splitlines()[0][:200] if str(e).strip() else ""
        rep.error = f"{step}: {type(e).__name__}: {msg} [{where}]"
    return rep
