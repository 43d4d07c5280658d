"""2:4 semi-structured sparsity of a DeiT-S, dense and compressed, through ONNX.

    python benchmarks/sparsity24.py [--model deit_small_patch16_224]

For the dense model and a compressed one (50% FLOPs, widths rounded to 64 so every pruned
Linear still fits the sparse kernels' shape multiples): ``vitgraph.sparsify_24`` (magnitude),
ONNX export with onnxruntime parity, ``vitgraph check-24`` on the file, and an exact count of the
groups of 4 weights along the input dimension holding exactly 2 non-zeros.  On CUDA (compute
capability 8.0+) the eligible layers are also converted with ``to_sparse_semi_structured`` and
timed; on CPU the report says only the pattern is applied.  Writes benchmarks/results/sparsity24.md.
"""
from __future__ import annotations

import argparse
import subprocess
import sys
import tempfile
import warnings
from pathlib import Path

import numpy as np
import onnx
import timm
import torch
from onnx import numpy_helper

import vitgraph
from vitgraph.deploy.measure import count_flops, format_table, write_results_md
from vitgraph.deploy.onnx24 import check_24
from vitgraph.passes.sparsity24 import to_semi_structured


def exact_two_of_four(path: Path, axes: dict[str, int]) -> tuple[int, int, int]:
    """(weights, groups with exactly 2 non-zeros, groups) over the initializers in ``axes``.

    ``axes`` maps an initializer name to its input (reduction) axis, as check-24 resolved it.
    """
    proto = onnx.load(str(path))
    layers = exact = total = 0
    for init in proto.graph.initializer:
        if init.name not in axes:
            continue
        layers += 1
        groups = np.moveaxis(numpy_helper.to_array(init), axes[init.name], -1).reshape(-1, 4)
        nz = (groups != 0).sum(1)
        exact += int((nz == 2).sum())
        total += len(nz)
    return layers, exact, total


def run_one(label: str, model: torch.nn.Module, x: torch.Tensor, out_dir: Path) -> dict:
    sparse = vitgraph.sparsify_24(model)
    rep = sparse.vitgraph_24_report
    path = out_dir / f"{label}.onnx"
    ex = vitgraph.export_onnx(sparse, path, (x,))
    chk = check_24(path)
    axes = {r.name: r.input_axis for r in chk.initializers if r.eligible}
    layers, exact, total = exact_two_of_four(path, axes)
    cli = subprocess.run([sys.executable, "-m", "vitgraph.cli", "check-24", str(path)], capture_output=True, text=True)
    _, st = to_semi_structured(sparse)
    return {"model": label, "Linear sparsified": len(rep.sparsified), "skipped": len(rep.skipped),
            "ONNX weights checked": layers, "groups with exactly 2 of 4": f"{exact}/{total}",
            "check-24 exit": cli.returncode, "ORT max abs diff": f"{ex.max_abs_diff:.1e}",
            "kept |w|": round(rep.kept_magnitude_fraction, 3), "semi-structured": st.message.split(".")[0]}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False).eval()
    x = torch.randn(1, *model.default_cfg["input_size"])
    an = vitgraph.analyze(model, x)
    plan = vitgraph.plan_to_target(an, None, target="flops", fraction=0.5, round_to=64, mode="uniform",
                                   kinds=["residual", "head", "qk", "v", "ffn"])
    slim = vitgraph.compress(model, plan, an)
    widths = sorted({tuple(m.weight.shape) for m in slim.modules() if isinstance(m, torch.nn.Linear)})
    rows = []
    with tempfile.TemporaryDirectory() as d:
        rows.append(run_one(a.model, model, x, Path(d)))
        rows.append(run_one(f"{a.model} at 50% FLOPs", slim, x, Path(d)))
        print(format_table(rows), flush=True)
    flops = count_flops(slim, (x,)) / count_flops(model, (x,))
    notes = (f"Command: `python benchmarks/sparsity24.py --model {a.model}`. Random weights; magnitude masks. "
             f"The compressed model keeps {flops:.3f} of the FLOPs (uniform magnitude plan, widths rounded to 64); "
             f"its Linear weight shapes: {widths}. 'groups with exactly 2 of 4' counts groups of 4 consecutive "
             "weights along each eligible ONNX initializer's input axis with exactly two non-zeros. "
             "No GPU in this run: the CUDA conversion (`to_sparse_semi_structured`) and its speedup were not measured.")
    path = write_results_md("sparsity24", f"2:4 sparsity through ONNX ({a.model})", rows, notes)
    print(f"wrote {path}")
    ok = all(r["check-24 exit"] == 0
             and r["groups with exactly 2 of 4"].split("/")[0] == r["groups with exactly 2 of 4"].split("/")[1]
             for r in rows)
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
