"""Coverage of the model zoo: analyze, compress at 0.5 with random keep-sets, check, export.

    python benchmarks/coverage.py MODEL [MODEL ...]
    python benchmarks/coverage.py --list ../shared/models.txt

MODEL is a timm name or ``torchvision:<name>`` (random weights).  One row per model: groups found
by kind (residual/head/qk/v/ffn/other), frozen channels, params and FLOPs before -> after,
masked-equivalence error (qk/v/head/ffn groups), ONNX parity error (onnxruntime vs torch),
the masked and ONNX errors of a qk-only and of a v-only plan (q/k and v end at different sizes),
analysis time, and the reason for any failure, naming the plan that failed.  Writes benchmarks/results/coverage.md
(``--name`` to change the stem).  Exit status 1 if any model fails.
"""
from __future__ import annotations

import argparse
import sys
import warnings
from pathlib import Path

import torch

from vitgraph.check import check_model
from vitgraph.deploy.measure import format_table, write_results_md
from vitgraph.models import load_model, parse_model_args


def read_list(path: str) -> list[str]:
    """Model specs from a file: one per line (a name, then any ``KEY=VALUE`` model arguments,
    space-separated), ``#`` comments and blank lines ignored."""
    names = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            names.append(line)
    return names


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--list", help="file with one model name per line")
    ap.add_argument("--ratio", type=float, default=0.5)
    ap.add_argument("--no-onnx", action="store_true", help="skip ONNX export and parity")
    ap.add_argument("--name", default="coverage", help="results file stem (benchmarks/results/NAME.md)")
    a = ap.parse_args(argv)
    names = list(a.models) + (read_list(a.list) if a.list else [])
    if not names:
        ap.error("give model names or --list FILE")
    torch.set_num_threads(max(1, torch.get_num_threads()))
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            spec, *model_args = name.split()
            model, x = load_model(spec, batch=2, model_args=parse_model_args(model_args))
            rep = check_model(model, x, name=name, ratio=a.ratio, onnx=not a.no_onnx)
        row = rep.row()
        print("    " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "model"), flush=True)
        if rep.unruled:
            print(f"    ops without a rule: {', '.join(rep.unruled)}")
        rows.append(row)
    print()
    print(format_table(rows))
    passed = sum(r["result"] == "ok" for r in rows)
    notes = (
        f"{passed}/{len(rows)} models pass. Random weights, batch 2 at the model's default input size, "
        f"random keep-sets removing {a.ratio:.0%} of every prunable group (per-head sets for qk/v). "
        "masked err: max |compressed - masked| / max |masked| with only qk/v/head/ffn groups pruned "
        "(must be <= 1e-5). ONNX err: max |onnxruntime - torch| / max |torch| of the compressed model "
        "at batch 2 and 3 (dynamic batch). qk-only / v-only masked/ONNX: the same two errors for a plan "
        f"that removes {a.ratio:.0%} of only the qk groups, or only the v groups, so q/k and v of every "
        "attention end at different head dims ('-': the model has no such groups; groups with a "
        "normalisation over them are compressed and exported but left out of the masked comparison). "
        "A model passes when all three plans pass. analyze s: analysis at batch 1, one run.\n\n"
        f"Command: `python benchmarks/coverage.py {' '.join(argv if argv is not None else sys.argv[1:])}`"
    )
    path = write_results_md(a.name, "Model coverage", rows, notes=notes)
    print(f"\n{passed}/{len(rows)} pass; wrote {path}")
    return 0 if passed == len(rows) else 1


if __name__ == "__main__":
    sys.exit(main())
