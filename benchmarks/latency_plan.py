"""Latency-aware planning: target vs achieved latency fraction, LUT only and with closed-loop calibration.

For each model, runtime and target fraction: a latency table is measured on the runtime (cached in
~/.cache/vitgraph), ``plan_to_target(target="latency", mode="global")`` plans from the table alone
and with ``calibrate=True`` (compress, measure, secant-correct the planning fraction); then every
plan is compressed and timed against the dense model in fresh interleaved rounds (medians), and
the achieved fraction slim/dense is reported with its error relative to the target.

    python benchmarks/latency_plan.py
    python benchmarks/latency_plan.py --models deit_tiny_patch16_224 --runtimes ort-cpu --fractions 0.6

Writes benchmarks/results/latency_plan.md (or --name).
"""
from __future__ import annotations

import argparse
import sys
import time

import timm
import torch

import vitgraph
from vitgraph.deploy.measure import count_flops, format_table, write_results_md
from vitgraph.planning.planner import CostModel
from vitgraph.targets import measure_fraction


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["deit_tiny_patch16_224", "deit_small_patch16_224"])
    ap.add_argument("--runtimes", nargs="+", default=["torch-cpu", "ort-cpu"])
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5])
    ap.add_argument("--batch", type=int, default=1)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--round-to", type=int, default=16)
    ap.add_argument("--eta", type=float, default=5e-4)
    ap.add_argument("--name", default="latency_plan")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    rows = []
    for name in args.models:
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, 3, 224, 224)
        an = vitgraph.analyze(model, x)
        cm = CostModel(an)
        for runtime in args.runtimes:
            table = vitgraph.LatencyTable(runtime, batch=args.batch, threads=args.threads)
            for frac in args.fractions:
                for calibrate in (False, True):
                    t0 = time.time()
                    hist: list = []
                    plan = vitgraph.plan_to_target(
                        an, None, target="latency", fraction=frac, eta=args.eta, latency_table=table,
                        round_to=args.round_to, mode="global", calibrate=calibrate, history=hist)
                    plan_s = time.time() - t0
                    slim = vitgraph.compress(model, plan, an)
                    widths = {g: (len(k[0]) if isinstance(k[0], list) else len(k)) for g, k in plan.kept.items()}
                    achieved, dense_ms, slim_ms = measure_fraction(model, slim, table, an.input_shapes[0], reps=3, rounds=7)
                    row = {"model": name, "runtime": runtime, "batch": args.batch, "target": frac,
                           "calibrate": calibrate, "rounds": len(hist),
                           "lut_pred": cm.latency(widths, table) / cm.latency({}, table),
                           "achieved": achieved, "rel_err": achieved / frac - 1.0,
                           "flops_ratio": count_flops(slim, x) / count_flops(model, x),
                           "dense_ms": dense_ms, "slim_ms": slim_ms, "plan_s": plan_s}
                    rows.append(row)
                    print(format_table([row]), flush=True)
                    _write(args, rows)
                    if calibrate:
                        print("  calibration rounds: " + "; ".join(
                            f"planned {h['planned_fraction']:.3f} -> measured {h['achieved']:.3f}" for h in hist), flush=True)
    print(format_table(rows))
    print(f"wrote {_write(args, rows)}")


def _write(args: argparse.Namespace, rows: list) -> object:
    text = (f"Command: `python benchmarks/latency_plan.py {' '.join(sys.argv[1:])}`. Random weights, magnitude scores, "
            f"global (NViT-style) latency-aware planning over residual/head/qk/v/ffn, round_to={args.round_to}, "
            f"eta={args.eta}; {args.threads} intra-op thread(s). lut_pred: latency fraction the lookup table predicts; "
            "achieved: compressed / dense latency measured afterwards in fresh interleaved rounds (medians of 7 x 3 "
            "calls); rel_err = achieved / target - 1; rounds: planning rounds (each calibrated round compresses and "
            "measures once). plan_s includes measuring missing table points and the calibration runs. The machine is "
            "shared (2 cores, other jobs running), so measured fractions carry a few % of noise.\n")
    return write_results_md(args.name, "Latency-aware planning: target vs achieved latency fraction", rows, text)


if __name__ == "__main__":
    main()
