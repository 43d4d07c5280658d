"""Kernel-aligned plans over the model zoo: targets hit, width rules kept, fused attention fed equal head dims.

    python benchmarks/align_kernels.py --list ../shared/models.txt
    python benchmarks/align_kernels.py deit_tiny_patch16_224 torchvision:vit_b_16

For every model (random weights): ``plan_to_target`` with magnitude scores at ``--round-to``
(default 8), FLOPs and parameter targets at ``--fraction`` (default 0.5), without and with
``align="kernels"``.  Columns: the achieved fraction of each plan (the cost model's count), the
FLOPs of the compressed aligned model as ``count_flops`` measures it over the dense model's
``count_flops`` and over the plan's predicted FLOPs (``count/plan``, 1 when they agree), the
aligned plan's rule violations (``vitgraph.planning.align.kernel_violations``), the kept q/k (=v)
head dims and FFN and residual widths, and the head dims that ``F.scaled_dot_product_attention``
received in one forward of the compressed model ("-" where the model has no fused attention).
Writes benchmarks/results/align_kernels.md (``--name`` to change the stem).  Exit status 1 if a
model fails, misses a target by more than 2% or breaks a rule.
"""
from __future__ import annotations

import argparse
import sys
import time
import traceback
import warnings
from pathlib import Path

import torch
from torch.overrides import TorchFunctionMode

import vitgraph
from vitgraph import CostModel, plan_to_target
from vitgraph.deploy.measure import count_flops, format_table, write_results_md
from vitgraph.models import load_model, parse_model_args
from vitgraph.planning.align import attention_pairs, kernel_violations

TOL = 0.02


class SDPAShapes(TorchFunctionMode):
    """The (q, k, v) last dims of every F.scaled_dot_product_attention call."""

    def __init__(self) -> None:
        super().__init__()
        self.dims: set[tuple[int, int, int]] = set()

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            self.dims.add(tuple(int(a.shape[-1]) for a in args[:3]))
        return func(*args, **(kwargs or {}))


def read_list(path: str) -> list[str]:
    out = []
    for line in Path(path).read_text().splitlines():
        line = line.split("#", 1)[0].strip()
        if line:
            out.append(line)
    return out


def widths(an: vitgraph.Analysis, plan: vitgraph.Plan) -> dict[str, int]:
    def n(g):
        k = plan.kept.get(g.id)
        return g.size if k is None else (len(k[0]) if isinstance(k[0], list) else len(k))
    return {g.id: n(g) for g in an.groups}


def span(values) -> str:
    values = sorted(set(values))
    if not values:
        return "-"
    return str(values[0]) if len(values) == 1 else f"{values[0]}..{values[-1]}"


def one(name: str, fraction: float, round_to: int) -> dict:
    spec, *margs = name.split()
    t0 = time.perf_counter()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model, x = load_model(spec, batch=1, model_args=parse_model_args(margs))
        an = vitgraph.analyze(model, x)
    cm = CostModel(an)
    row: dict = {"model": name}
    ok = True
    plan = None
    for target in ("flops", "params"):
        dense = cm.cost(target, {})
        for align in (None, "kernels"):
            p = plan_to_target(an, target=target, fraction=fraction, round_to=round_to, align=align)
            got = cm.cost(target, widths(an, p)) / dense
            row[f"{target} {'aligned' if align else 'plain'}"] = round(got, 4)
            if not fraction * (1 - TOL) <= got <= fraction * (1 + 1e-9):
                ok = False
            if align and target == "flops":
                plan = p
    w = widths(an, plan)
    bad = kernel_violations(an, plan)
    pairs = attention_pairs(an)
    row["violations"] = len(bad)
    row["qk=v dims"] = span(w[qk.id] for qk, v in pairs.values() if qk is not None)
    row["ffn"] = span(w[g.id] for g in an.groups if g.kind == "ffn")
    row["residual"] = span(w[g.id] for g in an.groups if g.kind == "residual")
    slim = vitgraph.compress(model, plan, an).eval()
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        measured = count_flops(slim, (x,))
        row["flops aligned (count_flops)"] = round(measured / count_flops(model, (x,)), 4)
        row["count/plan"] = round(measured / cm.flops(w), 4)
        rec = SDPAShapes()
        with torch.no_grad(), rec:
            slim(x)
    row["sdpa q/k/v dims"] = " ".join("/".join(map(str, d)) for d in sorted(rec.dims)) or "-"
    if any(len(set(d)) != 1 for d in rec.dims) or bad:
        ok = False
    row["s"] = round(time.perf_counter() - t0, 1)
    row["result"] = "ok" if ok else ("rule broken: " + "; ".join(bad[:2]) if bad else "target missed or unequal sdpa")
    return row


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--list", help="file with one model spec per line")
    ap.add_argument("--fraction", type=float, default=0.5)
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--name", default="align_kernels", help="results file stem (benchmarks/results/NAME.md)")
    a = ap.parse_args(argv)
    names = list(a.models) + (read_list(a.list) if a.list else [])
    if not names:
        ap.error("give model names or --list FILE")
    torch.set_num_threads(a.threads)
    rows = []
    for i, name in enumerate(names, 1):
        print(f"[{i}/{len(names)}] {name} ...", flush=True)
        try:
            row = one(name, a.fraction, a.round_to)
        except Exception as e:  # noqa: BLE001 - a benchmark row records the failure
            traceback.print_exc()
            row = {"model": name, "result": f"error: {type(e).__name__}: {str(e)[:120]}"}
        print("    " + "  ".join(f"{k}={v}" for k, v in row.items() if k != "model"), flush=True)
        rows.append(row)
    print(format_table(rows))
    notes = (f"`plan_to_target(an, target=T, fraction={a.fraction}, round_to={a.round_to}, align=None | \"kernels\")` "
             "with magnitude scores on random weights; fractions are the cost model's (the aligned FLOPs plan is "
             "also compressed and measured with count_flops: `count/plan` is its count over the plan's predicted "
             "FLOPs; where `flops aligned (count_flops)` differs from `flops aligned`, count_flops disagrees with "
             "the cost model on the dense model, e.g. torchvision's nn.MultiheadAttention). A row passes when both "
             "targets land within 2% under the fraction, the aligned FLOPs plan breaks no rule and every fused "
             "attention call of the compressed model gets equal q/k/v head dims. Command: "
             "`python benchmarks/align_kernels.py "
             + " ".join(sys.argv[1:] if argv is None else argv) + "`")
    path = write_results_md(a.name, "Kernel-aligned plans (align=\"kernels\")", rows, notes)
    print(f"wrote {path}")
    return 0 if all(r["result"] == "ok" for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
