"""Plans to a target, closed on measured latency when asked: planning, compression and measurement.

:func:`plan_to_target` is :func:`vitgraph.planning.planner.plan_widths` (FLOPs, parameters or
latency predicted by a :class:`~vitgraph.planning.latency.LatencyTable`) plus ``calibrate=True``:
the analysed model is compressed, measured against the dense model on the table's runtime, and
the planning fraction corrected by secant steps.  It lives outside ``vitgraph.planning`` because
it runs the rewrite passes and the exporter.
"""
from __future__ import annotations

import tempfile
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Optional, Sequence

import torch
from torch import nn

from vitgraph.api import compress
from vitgraph.errors import PlanError
from vitgraph.planning import planner
from vitgraph.planning.plan import Plan

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis
    from vitgraph.planning.latency import LatencyTable


def plan_to_target(
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
    calibrate: bool = False,
    calibrate_rounds: int = 4,
    calibrate_tol: float = 0.02,
    history: Optional[list] = None,
    align: Optional[str] = None,
) -> Plan:
    """A plan whose ``target`` cost is at most ``fraction`` of the dense model's.

    The options are :func:`vitgraph.planning.planner.plan_widths`'s.  With ``target="latency"``,
    ``calibrate=True`` compresses the analysed model, measures it against the dense model on the
    table's runtime and corrects the planning fraction by secant steps (at most
    ``calibrate_rounds`` measurements), returning the plan measured closest to the target (within
    ``calibrate_tol`` of it stops early).  ``history`` (a list) receives one dict per round.
    ``align="kernels"`` keeps widths fused GPU kernels run fast (equal q/k and v head dims, multiples
    of 8, at least 16; FFN and residual widths in multiples of 64; :mod:`vitgraph.planning.align`).
    """
    opts = dict(eta=eta, latency_table=latency_table, unit=unit, min_width=min_width, round_to=round_to,
                kinds=kinds, mode=mode, normalize=normalize, batch_units=batch_units, align=align)
    if not (calibrate and target == "latency"):
        return planner.plan_widths(analysis, scores, target, fraction, history=history, **opts)
    args = planner.planning_args(analysis, scores, target, fraction, **opts)
    return _calibrated(analysis, fraction, args, calibrate_rounds, calibrate_tol, history)


# ---------------------------------------------------------------------------------------------
# closed loop on latency


def measure_fraction(
    model: nn.Module, slim: nn.Module, table: "LatencyTable", input_shape: Sequence[int],
    reps: int = 5, rounds: int = 5, cache: Optional[dict] = None, seconds: Optional[float] = None,
) -> tuple[float, float, float]:
    """(slim / dense latency, dense ms, slim ms): medians of interleaved runs on the table's runtime.

    ``cache`` (a dict kept by the caller) holds the dense model's runner between calls.  With
    ``seconds``, each model is timed for about that long in all (at least ``reps`` calls a
    round), so a sub-millisecond model gets as many calls as its median needs.
    """
    stats = measure_many(model, {"slim": slim}, table, input_shape, reps, rounds, cache, seconds)
    return stats["slim"].median_ms / stats["dense"].median_ms, stats["dense"].median_ms, stats["slim"].median_ms


def measure_many(
    model: nn.Module, slims: Mapping[str, nn.Module], table: "LatencyTable", input_shape: Sequence[int],
    reps: int = 5, rounds: int = 5, cache: Optional[dict] = None, seconds: Optional[float] = None,
) -> dict[str, Any]:
    """Latency stats of the dense model (``"dense"``) and every ``slims`` entry, timed interleaved in one
    run on the table's runtime (so their ratios share the machine's state); options as :func:`measure_fraction`."""
    from vitgraph.deploy.measure import measure_latency, ort_runner, torch_runner
    from vitgraph.deploy.export import export_onnx

    cache = {} if cache is None else cache
    x = torch.randn(table.batch, *input_shape[1:])
    cuda = table.runtime.endswith("cuda")
    if table.threads is not None:
        torch.set_num_threads(table.threads)
    if table.runtime.startswith("torch"):
        dev = "cuda" if cuda else "cpu"
        xd = x.to(dev)
        if "dense" not in cache:
            cache["dense"] = torch_runner(model.to(dev).eval(), xd)
        fns = {"dense": cache["dense"], **{k: torch_runner(m.to(dev).eval(), xd) for k, m in slims.items()}}
    else:
        providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if cuda else ["CPUExecutionProvider"]
        with tempfile.TemporaryDirectory() as d:  # a session keeps its model once built
            if "dense" not in cache:
                export_onnx(model, Path(d) / "dense.onnx", (x[:1],), check=False)
                cache["dense"] = ort_runner(Path(d) / "dense.onnx", x, providers=providers, threads=table.threads)
            fns = {"dense": cache["dense"]}
            for k, m in slims.items():
                export_onnx(m, Path(d) / f"{k}.onnx", (x[:1],), check=False)
                fns[k] = ort_runner(Path(d) / f"{k}.onnx", x, providers=providers, threads=table.threads)
    if seconds:
        reps = max(reps, _reps_for(fns, seconds / rounds))
    return measure_latency(fns, warmup=2, reps=reps, rounds=rounds)


def _reps_for(fns: Mapping[str, Any], seconds: float, cap: int = 5000) -> int:
    """Calls per round so that the slowest callable is timed for about ``seconds`` a round."""
    import time

    slowest = 0.0
    for fn in fns.values():
        fn()  # warm
        t0 = time.perf_counter()
        for _ in range(3):
            fn()
        slowest = max(slowest, (time.perf_counter() - t0) / 3)
    return max(1, min(cap, int(seconds / max(slowest, 1e-6))))


def _next_fraction(tried: list, fraction: float) -> float:
    """Next planning fraction: a secant step through the last two (planned, measured) points, or a
    proportional step (measured latency taken as proportional to planned) when the secant's slope
    is implausible (measurement noise)."""
    f, a = tried[-1][0], tried[-1][1]
    step = f * fraction / a if a > 0 else f
    if len(tried) >= 2:
        f0, a0 = tried[-2][0], tried[-2][1]
        if f != f0:
            slope = (a - a0) / (f - f0)
            if 0.3 <= slope <= 3.0:
                step = f + (fraction - a) / slope
    return min(1.0, max(0.02, step))


def _calibrated(analysis: "Analysis", fraction: float, args: dict, rounds: int, tol: float,
                history: Optional[list], seconds: float = 1.0, finalists: int = 3) -> Plan:
    """Secant steps on measured latency, then one referee run over the closest plans.

    Each round times the dense and the compressed model for about ``seconds`` each.  Single
    measurements on a loaded machine carry several percent of noise, so the ``finalists`` plans
    measured closest to the target are timed again together with the dense model, interleaved,
    for twice as long, and the one that measures closest there is returned.
    """
    model = analysis.model
    if model is None:
        raise PlanError("calibrate=True needs the analysed model alive (keep a reference to it)")
    table = args["table"]
    shape = analysis.input_shapes[0]
    tried: list[tuple[float, float, Plan, nn.Module]] = []  # (planning fraction, measured fraction, plan, slim)
    f = fraction
    cache: dict = {}
    for i in range(max(1, rounds)):
        try:
            plan, widths, cost, dense = planner.plan_once(fraction=f, **args)
        except PlanError:
            if not tried:
                raise
            break
        slim = compress(model, plan, analysis, keep_api=False)
        achieved, dense_ms, slim_ms = measure_fraction(model, slim, table, shape, cache=cache, seconds=seconds)
        if history is not None:
            history.append({"round": i, "planned_fraction": f, "predicted": cost / dense, "achieved": achieved,
                            "dense_ms": dense_ms, "slim_ms": slim_ms, "widths": widths})
        tried.append((f, achieved, plan, slim))
        if abs(achieved - fraction) <= tol * fraction:
            break
        f = _next_fraction([t[:2] for t in tried], fraction)
        if any(abs(f - t[0]) < 1e-4 for t in tried):
            break
    close = sorted(tried, key=lambda t: abs(t[1] - fraction))
    unique: list = []
    for t in close:  # distinct plans only (two planning fractions can round to one plan)
        if all(t[2].kept != u[2].kept for u in unique):
            unique.append(t)
    unique = unique[:max(1, finalists)]
    if len(unique) == 1:
        return unique[0][2]
    stats = measure_many(model, {str(j): t[3] for j, t in enumerate(unique)}, table, shape, cache=cache,
                         rounds=7, seconds=2 * seconds * 7 / 5)
    ratios = [stats[str(j)].median_ms / stats["dense"].median_ms for j in range(len(unique))]
    j = min(range(len(unique)), key=lambda k: abs(ratios[k] - fraction))
    if history is not None:
        history.append({"round": "referee", "planned_fraction": unique[j][0], "achieved": ratios[j],
                        "candidates": [{"planned_fraction": t[0], "achieved_before": t[1], "achieved": r}
                                       for t, r in zip(unique, ratios)],
                        "dense_ms": stats["dense"].median_ms})
    return unique[j][2]
