"""Analyze + plan + compress time for ViT-S at depth 12/24/48 and ViT-B/16 (batch 1, CPU).

    python benchmarks/analysis_speed.py [--reps 5]

Each configuration is timed ``reps`` times (interleaved across configurations); the table
reports medians and writes benchmarks/results/analysis_speed.md.
"""
from __future__ import annotations

import argparse
import statistics
import time

import timm
import torch

import vitgraph
from vitgraph.measure import format_table, write_results_md

CONFIGS = [
    ("ViT-S depth 12", "vit_small_patch16_224", {"depth": 12}),
    ("ViT-S depth 24", "vit_small_patch16_224", {"depth": 24}),
    ("ViT-S depth 48", "vit_small_patch16_224", {"depth": 48}),
    ("ViT-B/16", "vit_base_patch16_224", {}),
]


def time_once(model: torch.nn.Module, x: torch.Tensor) -> tuple[float, float, float]:
    """Seconds for analyze, plan (magnitude, ratio 0.5) and compress."""
    t0 = time.perf_counter()
    an = vitgraph.analyze(model, x)
    t1 = time.perf_counter()
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)
    t2 = time.perf_counter()
    vitgraph.compress(model, plan)
    t3 = time.perf_counter()
    return t1 - t0, t2 - t1, t3 - t2


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__)
    ap.add_argument("--reps", type=int, default=5)
    args = ap.parse_args()
    x = torch.randn(1, 3, 224, 224)
    models = {label: timm.create_model(name, pretrained=False, **kw).eval() for label, name, kw in CONFIGS}
    for m in models.values():  # warm-up: first-call costs (imports, kernel setup) are not measured
        time_once(m, x)
    times: dict[str, list[tuple[float, float, float]]] = {k: [] for k in models}
    for _ in range(args.reps):
        for label, m in models.items():
            times[label].append(time_once(m, x))
    rows = []
    for label, ts in times.items():
        a, p, c = (statistics.median(t[i] for t in ts) for i in range(3))
        tot = statistics.median(sum(t) for t in ts)
        rows.append({"model": label, "analyze s": f"{a:.3f}", "plan s": f"{p:.3f}", "compress s": f"{c:.3f}", "total s": f"{tot:.3f}"})
    base = statistics.median(sum(t) for t in times["ViT-S depth 12"])
    deep = statistics.median(sum(t) for t in times["ViT-S depth 48"])
    notes = (f"Median of {args.reps} interleaved repetitions, batch 1, 224x224, magnitude plan at ratio 0.5 of every "
             f"residual/head/qk/v/ffn group.\n\nDepth 48 / depth 12 total time: {deep / base:.2f}x "
             "(target <= 4.5x). ViT-B/16 target: <= 1.0 s.")
    print(format_table(rows))
    print(notes)
    print("wrote", write_results_md("analysis_speed", "Analysis speed", rows, notes))


if __name__ == "__main__":
    main()
