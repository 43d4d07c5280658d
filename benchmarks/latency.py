"""Latency of dense vs compressed ViTs at 50% FLOPs, and vs a dense model built at the same widths.

For each model (random weights): a uniform plan (one ratio for every residual/head/ffn group,
magnitude scores, kept widths rounded to hardware-friendly multiples) reaching the FLOPs target is
built with ``vitgraph.plan_to_target``; the dense model, the compressed model and (where timm can
build one) a dense timm model of the same widths are timed in interleaved rounds (medians) with
torch eager and onnxruntime, at each batch size.  Reported per row: FLOPs ratio, speedup, fraction of
ideal speedup (speedup x FLOPs ratio) and compressed / same-width-dense latency.

    python benchmarks/latency.py                           # CPU: DeiT-S, ViT-B, Swin-T, batch 1 and 8
    python benchmarks/latency.py --models deit_small_patch16_224 --batches 8 --runtimes ort
    python benchmarks/latency.py --device cuda             # torch CUDA + onnxruntime-gpu, batch 64 and 256

Writes benchmarks/results/latency.md (or --name).
"""
from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import timm
import torch

import vitgraph
from vitgraph.export import onnx_op_types
from vitgraph.measure import (count_flops, count_params, format_table, measure_latency, ort_runner,
                              torch_runner, write_results_md)
from vitgraph.planner import CostModel

MODELS = ["deit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224"]
ROUND_TO = {"swin_tiny_patch4_window7_224": 32}  # Swin widths are multiples of 96: 32 keeps the stages in step


def widths_of(plan: vitgraph.Plan) -> dict[str, int]:
    return {gid: (len(k[0]) if isinstance(k[0], list) else len(k)) for gid, k in plan.kept.items()}


def same_width_model(name: str, an: vitgraph.Analysis, plan: vitgraph.Plan, slim: torch.nn.Module,
                     x: torch.Tensor) -> tuple[torch.nn.Module | None, str]:
    """A dense timm model with the compressed model's widths, when one exists (checked by FLOPs/params)."""
    w = {g.id: g.size for g in an.groups} | widths_of(plan)
    res = sorted((g for g in an.groups if g.kind == "residual"), key=lambda g: g.size)
    heads = [g for g in an.groups if g.kind == "head"]
    qk = {w[g.id] for g in an.groups if g.kind in ("qk", "v")}
    if len(qk) != 1:
        return None, "q/k and v head dims differ"
    d = qk.pop()
    kw: dict = {}
    if len(res) == 1:  # plain ViT: one residual width
        e = w[res[0].id]
        hs = {w[h.id] for h in heads}
        ffn = {w[g.id] for g in an.groups if g.kind == "ffn"}
        if len(hs) != 1 or len(ffn) != 1 or hs.copy().pop() * d != e:
            return None, "widths differ between blocks or heads x head_dim != embed_dim"
        kw = dict(embed_dim=e, num_heads=hs.pop(), mlp_ratio=ffn.pop() / e)
    else:  # hierarchical (Swin): one residual width per stage
        e0 = w[res[0].id]
        if any(w[g.id] != e0 * 2 ** i for i, g in enumerate(res)):
            return None, "stage widths are not embed_dim x 2^i"
        stage_heads = []
        for i in range(len(res)):
            hs = {w[h.id] for h in heads if h.id.startswith(f"layers.{i}.")}
            if len(hs) != 1:
                return None, "head counts differ within a stage"
            stage_heads.append(hs.pop())
        ratios = {w[g.id] / (e0 * 2 ** int(g.id.split(".")[1])) for g in an.groups if g.kind == "ffn"}
        if len(ratios) != 1:
            return None, "MLP ratios differ"
        kw = dict(embed_dim=e0, num_heads=tuple(stage_heads), head_dim=d, mlp_ratio=ratios.pop())
    try:
        dense = timm.create_model(name, pretrained=False, **kw).eval()
    except Exception as e:  # noqa: BLE001
        return None, f"timm cannot build it: {e}"
    if count_flops(dense, x) != count_flops(slim, x) or count_params(dense) != count_params(slim):
        return None, f"timm model with {kw} differs in FLOPs/params"
    return dense, ", ".join(f"{k}={v if not isinstance(v, float) else round(v, 3)}" for k, v in kw.items())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--fraction", type=float, default=0.5, help="FLOPs target (fraction of dense)")
    ap.add_argument("--round-to", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--runtimes", nargs="+", default=["torch", "ort"], choices=["torch", "ort"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (CPU)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--name", default="latency")
    args = ap.parse_args()
    batches = args.batches or ([1, 8] if args.device == "cpu" else [64, 256])
    torch.set_num_threads(args.threads)
    rows, notes = [], []
    for name in args.models:
        t0 = time.time()
        model = timm.create_model(name, pretrained=False).eval()
        x1 = torch.randn(1, 3, 224, 224)
        an = vitgraph.analyze(model, x1)
        rt = ROUND_TO.get(name, args.round_to)
        plan = vitgraph.plan_to_target(an, None, target="flops", fraction=args.fraction, mode="uniform",
                                       kinds=("residual", "head", "ffn"), round_to=rt)
        slim = vitgraph.compress(model, plan, an)
        flops_ratio = count_flops(slim, x1) / count_flops(model, x1)
        assert CostModel(an).flops(widths_of(plan)) == count_flops(slim, x1)
        same, why = same_width_model(name, an, plan, slim, x1)
        notes.append(f"- {name}: round_to={rt}; kept {_widths_text(an, plan)}; same-width dense: "
                     f"{'timm ' + why if same is not None else 'none (' + why + ')'}")
        cands = {"dense": model, "slim": slim} | ({"same": same} if same is not None else {})
        with tempfile.TemporaryDirectory() as d:
            paths = {}
            if "ort" in args.runtimes:
                for k, m in cands.items():
                    paths[k] = Path(d) / f"{k}.onnx"
                    vitgraph.export_onnx(m, paths[k], (x1,), check=(k == "slim"))
                extra = onnx_op_types(paths["slim"]) - onnx_op_types(paths["dense"])
                notes.append(f"  - ONNX op types in the compressed graph but not the dense one: {sorted(extra) or 'none'}")
            for b in batches:
                x = torch.randn(b, 3, 224, 224)
                for runtime in args.runtimes:
                    if runtime == "torch":
                        dev = args.device
                        fns = {k: torch_runner(m.to(dev), x.to(dev)) for k, m in cands.items()}
                    else:
                        prov = ["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda" else ["CPUExecutionProvider"]
                        fns = {k: ort_runner(p, x, providers=prov, threads=args.threads if args.device == "cpu" else None)
                               for k, p in paths.items()}
                    st = measure_latency(fns, warmup=1, reps=args.reps, rounds=args.rounds)
                    speed = st["dense"].median_ms / st["slim"].median_ms
                    row = {"model": name, "runtime": f"{runtime}-{args.device}", "batch": b,
                           "flops_ratio": round(flops_ratio, 4), "dense_ms": st["dense"].median_ms,
                           "slim_ms": st["slim"].median_ms, "speedup": speed,
                           "frac_ideal": speed * flops_ratio,
                           "same_ms": st["same"].median_ms if "same" in st else None,
                           "slim_vs_same": st["slim"].median_ms / st["same"].median_ms if "same" in st else None}
                    rows.append(row)
                    print(format_table([row]), flush=True)
        for m in cands.values():
            m.to("cpu")
        print(f"{name}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    print(format_table(rows))
    gpu_note = ("" if args.device == "cuda" else
                "GPU figures were not measured (no GPU on this machine); `--device cuda` runs torch CUDA and "
                "onnxruntime-gpu (CUDAExecutionProvider) at batch 64 and 256.\n")
    text = (f"Command: `python benchmarks/latency.py {' '.join(sys.argv[1:])}`. Random weights; plans: "
            f"`plan_to_target(target='flops', fraction={args.fraction}, mode='uniform', kinds=residual/head/ffn)` with "
            f"magnitude scores. Latencies are medians of {args.rounds} interleaved rounds x {args.reps} calls; "
            f"{args.threads} intra-op thread(s) for torch and onnxruntime (the machine is shared, other jobs were "
            "running). frac_ideal = speedup x flops_ratio (1.0 = latency falls as fast as FLOPs); slim_vs_same = "
            "compressed / dense timm model built at the same widths.\n\n" + "\n".join(notes) + "\n\n" + gpu_note)
    path = write_results_md(args.name, "Latency: dense vs compressed at 50% FLOPs", rows, text)
    print(f"wrote {path}")


def _widths_text(an: vitgraph.Analysis, plan: vitgraph.Plan) -> str:
    w = widths_of(plan)
    parts = {}
    for g in an.groups:
        if g.id in w:
            parts.setdefault(g.kind, set()).add(f"{w[g.id]}/{g.size}")
    return "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in parts.items())


if __name__ == "__main__":
    main()
