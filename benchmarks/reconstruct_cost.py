"""Cost of the reconstruction pass: wall time and peak memory for one model and calibration set.

    python benchmarks/reconstruct_cost.py                       # ViT-B/16, 512 images, flops:0.5
    python benchmarks/reconstruct_cost.py --model deit_tiny_patch16_224 --images 128

Random weights and random images (the cost does not depend on them).  The plan is magnitude's to
the FLOPs target (global, ``round_to=8``).  Times, in one run: a dense forward over the set, a
slim forward over the set, and ``refit`` (which runs both graphs once over the set, node by node,
plus one solve per consumer), so the pass's cost reads as a multiple of the two forwards.  Peak
resident memory is read from the process (``ru_maxrss``) before and after the pass.  Writes
benchmarks/results/reconstruct_cost.md.
"""
from __future__ import annotations

import argparse
import platform
import resource
import sys
import time
from pathlib import Path

import torch

import vitgraph
from vitgraph.passes.reconstruct import refit

HERE = Path(__file__).resolve().parent


def _rss_gb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20


@torch.no_grad()
def _forward(model, batches) -> float:
    t0 = time.perf_counter()
    for x, _ in batches:
        model(x)
    return time.perf_counter() - t0


def main(argv: list[str] | None = None) -> int:
    import timm

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", default="vit_base_patch16_224")
    ap.add_argument("--images", type=int, default=512)
    ap.add_argument("--batch", type=int, default=32)
    ap.add_argument("--fraction", type=float, default=0.5, help="FLOPs kept")
    a = ap.parse_args(argv)
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False).eval()
    size = model.pretrained_cfg.get("input_size", (3, 224, 224))
    x = torch.randn(1, *size)
    an = vitgraph.analyze(model, x)
    plan = vitgraph.plan_to_target(an, None, target="flops", fraction=a.fraction, round_to=8)
    slim = vitgraph.compress(model, plan, an).eval()
    batches = [(torch.randn(a.batch, *size), None) for _ in range(a.images // a.batch)]
    dense_s = _forward(model, batches)
    slim_s = _forward(slim, batches)
    rss0 = _rss_gb()
    t0 = time.perf_counter()
    fits = refit(slim, an, plan.selection(an), batches)
    refit_s = time.perf_counter() - t0
    rss1 = _rss_gb()
    grew = sum(f.error_after > f.error_before for f in fits)
    rows = [("model", a.model), ("calibration images", f"{a.images} (batch {a.batch})"),
            ("plan", f"magnitude, flops:{a.fraction}"), ("consumers refitted", f"{sum(f.applied for f in fits)} of {len(fits)}"),
            ("layers whose error grew", str(grew)),
            ("dense forward over the set", f"{dense_s:.1f} s"), ("slim forward over the set", f"{slim_s:.1f} s"),
            ("reconstruction (refit)", f"{refit_s:.1f} s = {refit_s / (dense_s + slim_s):.2f}x (dense + slim forward)"),
            ("peak RSS before / after the pass", f"{rss0:.2f} / {rss1:.2f} GiB")]
    table = "\n".join(["| | |", "|---|---|"] + [f"| {k} | {v} |" for k, v in rows])
    text = (f"# Reconstruction cost\n\nDate {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine "
            f"{platform.machine()}, {torch.get_num_threads()} threads (shared, noisy); torch {torch.__version__}, "
            f"timm {timm.__version__}.\n\nCommand: `python benchmarks/reconstruct_cost.py "
            f"{' '.join(argv if argv is not None else sys.argv[1:])}`\n\n{table}\n")
    (HERE / "results" / "reconstruct_cost.md").write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
