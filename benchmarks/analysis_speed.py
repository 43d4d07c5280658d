"""Analyze, plan and compress time, stage by stage, for ViT-S at depth 12/48/96 and ViT-B/16
(random weights, batch 1, 224x224, CPU).

    python benchmarks/analysis_speed.py [--reps 11]

The three stages are what a user runs::

    an = vitgraph.analyze(model, x)                   # analyze
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)   # plan: magnitude scores, every residual/head/qk/v/ffn group
    vitgraph.compress(model, plan)                    # compress

Each configuration is warmed up once, then timed ``reps`` times, interleaved across
configurations (the order rotates every repetition).  Before each configuration's run the
garbage left by the runs before it is collected (``gc.collect()``, not timed), so one
configuration does not pay for another's garbage; collection stays enabled while a run is timed,
and the seconds the collector spends inside the timed stages are reported.  The table gives
medians per stage and the median per-run total (wall-clock), with the ratio of each ViT-S depth to
depth 12; two more tables give the same runs with the collector's time taken out of each stage,
run by run, and as CPU time of the main thread (which waiting for a busy core does not inflate).
"""
from __future__ import annotations

import argparse
import gc
import statistics
import time

import timm
import torch

import vitgraph
from vitgraph.deploy.measure import _markdown_table, format_table, write_results_md

STAGES = ("analyze", "plan", "compress")
BASE = "ViT-S depth 12"
CONFIGS = [
    (BASE, "vit_small_patch16_224", {"depth": 12}),
    ("ViT-S depth 48", "vit_small_patch16_224", {"depth": 48}),
    ("ViT-S depth 96", "vit_small_patch16_224", {"depth": 96}),
    ("ViT-B/16", "vit_base_patch16_224", {}),
]
RATIO_TARGETS = {"ViT-S depth 48": 4.2, "ViT-S depth 96": 8.4}  # <= this times depth 12, each stage
VIT_B_TARGET = 0.5  # seconds, analyze + plan + compress


class GcClock:
    """Seconds the cyclic garbage collector has spent so far (via ``gc.callbacks``)."""

    def __init__(self) -> None:
        self.total = 0.0
        self._start = 0.0
        gc.callbacks.append(self._cb)

    def _cb(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._start = time.perf_counter()
        else:
            self.total += time.perf_counter() - self._start


def time_once(model: torch.nn.Module, x: torch.Tensor, clock: GcClock) -> list[tuple[float, float, float]]:
    """(wall seconds, of which garbage collection, main-thread CPU seconds) for analyze, plan and
    compress."""
    out = []

    def stage(fn):  # noqa: ANN001, ANN202
        g, w, c = clock.total, time.perf_counter(), time.thread_time()
        r = fn()
        out.append((time.perf_counter() - w, clock.total - g, time.thread_time() - c))
        return r

    an = stage(lambda: vitgraph.analyze(model, x))
    plan = stage(lambda: vitgraph.Plan.from_scores(an, ratio=0.5))
    stage(lambda: vitgraph.compress(model, plan))
    return out


VIEWS = {  # name -> seconds of one stage from (wall, collector, cpu)
    "wall-clock": lambda w, g, c: w,
    "wall-clock less the collector's time": lambda w, g, c: w - g,
    "main-thread CPU time (collector included)": lambda w, g, c: c,
}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--reps", type=int, default=11)
    args = ap.parse_args()
    x = torch.randn(1, 3, 224, 224)
    models = {label: timm.create_model(name, pretrained=False, **kw).eval() for label, name, kw in CONFIGS}
    clock = GcClock()
    for m in models.values():  # warm-up: first-call costs (imports, kernel setup) are not measured
        time_once(m, x, clock)
    runs: dict[str, list[list[tuple[float, float, float]]]] = {k: [] for k in models}
    labels = list(models)
    for r in range(args.reps):
        for label in labels[r % len(labels):] + labels[:r % len(labels)]:
            gc.collect()
            runs[label].append(time_once(models[label], x, clock))

    def med(label: str, i: int, view: str) -> float:
        """Median seconds of stage i (the per-run total for i == len(STAGES)) in one view."""
        f = VIEWS[view]
        return statistics.median(sum(f(*s) for s in (run if i == len(STAGES) else [run[i]])) for run in runs[label])

    cols = STAGES + ("total",)
    tables, verdicts = {}, []
    for view in VIEWS:
        rows = []
        for label in labels:
            row = {"model": label}
            for i, c in enumerate(cols):
                v = med(label, i, view)
                row[f"{c} s"] = f"{v:.3f}" + (f" ({v / med(BASE, i, view):.2f}x)" if label.startswith("ViT-S") else "")
            if view == "wall-clock":
                row["gc s"] = f"{statistics.median(sum(s[1] for s in run) for run in runs[label]):.3f}"
            rows.append(row)
        tables[view] = rows
        line = []
        for label, lim in RATIO_TARGETS.items():
            r = {c: med(label, i, view) / med(BASE, i, view) for i, c in enumerate(STAGES)}
            worst = max(r, key=r.get)
            line.append(f"{label.removeprefix('ViT-S ')}: worst stage {worst} {r[worst]:.2f}x (target <= {lim}x) "
                        + ("met" if r[worst] <= lim else "NOT met"))
        vb = med("ViT-B/16", len(STAGES), view)
        line.append(f"ViT-B/16 total {vb:.3f} s (target <= {VIT_B_TARGET} s) " + ("met" if vb <= VIT_B_TARGET else "NOT met"))
        verdicts.append(f"{view}: " + "; ".join(line))
    first, *more = VIEWS
    notes = (
        f"Median of {args.reps} interleaved repetitions (order rotated each repetition), batch 1, 224x224, random "
        "weights, torch's default threads; plan = `Plan.from_scores(an, ratio=0.5)` (magnitude scores, every "
        "residual/head/qk/v/ffn group); compress = `vitgraph.compress(model, plan)`. Ratios are to ViT-S depth 12, "
        "stage by stage. Garbage from earlier runs is collected, untimed, before each run; the collector stays on "
        "while a run is timed. `gc s`: median seconds the collector ran inside the timed stages (included in the "
        "times). Each stage holds the objects that existed before it out of the collector (`gc.freeze()`, see "
        "`vitgraph/gc_hold.py`): a full collection would otherwise walk every object of the process (about 0.4 "
        "million, mostly torch's and timm's) inside whichever stage its threshold fell in, which a depth-96 run "
        "crosses once.\n\n"
        + "".join(f"The same runs, {v}:\n\n" + _markdown_table(tables[v]) + "\n\n" for v in more)
        + "The CPU time of the main thread does not count the time the process waits for a core another process "
        "holds (this machine's 2 cores are shared); nearly all the work runs on the main thread.\n\n"
        + "\n\n".join(verdicts))
    for v in VIEWS:
        print(v + ":")
        print(format_table(tables[v]))
    print("\n".join(verdicts))
    print("wrote", write_results_md("analysis_speed", "Analysis speed", tables[first], notes))


if __name__ == "__main__":
    main()
