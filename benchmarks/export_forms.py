"""Which ONNX form of a ViT runs fastest on onnxruntime CPU: exporter x opset x graph optimisation.

For a dense ViT-S-like timm model and a compressed ViT-B (a vitgraph GraphModule, uniform plan at
25% of the dense FLOPs), every candidate form is written, checked (``onnx.checker`` full check,
onnxruntime parity at batch 1 and 2) and timed on onnxruntime CPU at batch 8:

- ``wall_ms``: median wall time at ``--threads`` intra-op threads (2), candidates interleaved
  round-robin by ``vitgraph.deploy.measure.measure_latency``;
- ``cpu_ms``: lowest CPU time of the calling thread over interleaved runs with one intra-op thread
  (spinning off).  On a shared machine wall time carries the waits for other jobs; one thread's CPU
  time does not, and the others can only add to it, so this is the figure that separates forms a
  few percent apart.

``executes_as`` groups forms whose graph *after onnxruntime's own optimisation at load* (what
onnxruntime runs) has the same ops (as a multiset): such forms cost the same, and their measured
difference is the noise floor.  ``ort_ops`` lists the op types onnxruntime runs (contrib ops
prefixed ``ms:``).

    python benchmarks/export_forms.py                       # both models, writes results/export_forms.md
    python benchmarks/export_forms.py --models dense --rounds 4 --cpu-rounds 3

Candidates: TorchScript exporter at opset 17 / 20; dynamo exporter at opset 17 / 18 / 20 / 23
(its onnxscript optimisation on, as torch.onnx does by default); and on top of those: onnxruntime's
offline optimisation written back (``SessionOptions.optimized_model_filepath`` at BASIC and
EXTENDED), onnxscript's optimizer, onnxscript's onnxruntime fusions (SkipLayerNormalization,
BiasGelu, MultiHeadAttention: ``onnxscript.rewriter.ort_fusions.optimize_for_ort``) and
onnxruntime's transformer optimizer (``onnxruntime.transformers.optimizer``, model_type "vit").
"""
from __future__ import annotations

import argparse
import collections
import sys
import tempfile
import time
import warnings
from pathlib import Path

import numpy as np
import onnx
import timm
import torch

import vitgraph
from vitgraph.deploy import export as vexport
from vitgraph.deploy.export import DEFAULT_FORMS, ExportForm
from vitgraph.deploy.measure import count_flops, format_table, measure_latency, ort_runner, write_results_md

# name -> (base form, post-processing step or None)
CANDIDATES: dict[str, tuple[ExportForm, str | None]] = {
    "torchscript-17": (ExportForm("torchscript", 17), None),
    "torchscript-20": (ExportForm("torchscript", 20), None),
    "dynamo-17": (ExportForm("dynamo", 17), None),
    "dynamo-18": (ExportForm("dynamo", 18), None),
    "dynamo-20": (ExportForm("dynamo", 20), None),
    "dynamo-23": (ExportForm("dynamo", 23), None),
    "torchscript-17+ort-basic": (ExportForm("torchscript", 17), "ort-basic"),
    "torchscript-17+ort-extended": (ExportForm("torchscript", 17), "ort-extended"),
    "torchscript-17+onnxscript": (ExportForm("torchscript", 17), "onnxscript"),
    "torchscript-17+ort-transformers": (ExportForm("torchscript", 17), "ort-transformers"),
    "dynamo-18+ort-fusions": (ExportForm("dynamo", 18), "ort-fusions"),
}


def _post(step: str, src: Path, dst: Path, heads: int, width: int) -> None:
    """Apply one graph-optimisation step to the file at ``src``, writing ``dst``."""
    if step in ("ort-basic", "ort-extended"):
        import onnxruntime as ort

        so = ort.SessionOptions()
        so.graph_optimization_level = (ort.GraphOptimizationLevel.ORT_ENABLE_BASIC if step == "ort-basic"
                                       else ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED)
        so.optimized_model_filepath = str(dst)
        ort.InferenceSession(str(src), so, providers=["CPUExecutionProvider"])
    elif step == "onnxscript":
        import onnx_ir as ir
        from onnxscript.optimizer import optimize

        model = ir.load(str(src))
        optimize(model)
        ir.save(model, str(dst))
    elif step == "ort-fusions":
        import onnx_ir as ir
        from onnxscript.rewriter.ort_fusions import optimize_for_ort

        model, _ = optimize_for_ort(ir.load(str(src)))
        ir.save(model, str(dst))
    elif step == "ort-transformers":
        from onnxruntime.transformers.optimizer import optimize_model

        optimize_model(str(src), model_type="vit", num_heads=heads, hidden_size=width,
                       opt_level=0).save_model_to_file(str(dst))
    else:
        raise ValueError(step)


def write_candidate(name: str, module: torch.nn.Module, x: torch.Tensor, d: Path, heads: int, width: int,
                    base_seconds: dict[str, float]) -> tuple[Path, float]:
    """Write candidate ``name``; returns its path and the seconds it took (base export included)."""
    form, step = CANDIDATES[name]
    base = d / f"{form.name}.onnx"
    if form.name not in base_seconds:
        t0 = time.perf_counter()
        vexport._write_form(form, module, base, (x,), ["input"], ["output"], True)
        base_seconds[form.name] = time.perf_counter() - t0
    if step is None:
        return base, base_seconds[form.name]
    out = d / f"{name}.onnx"
    t0 = time.perf_counter()
    _post(step, base, out, heads, width)
    return out, base_seconds[form.name] + time.perf_counter() - t0


def check(path: Path, module: torch.nn.Module, x: torch.Tensor) -> tuple[str, float]:
    """(checker verdict, max abs parity error over batch 1 and 2) of the file at ``path``."""
    try:
        vexport._run_checker(path)
        verdict = "ok"
    except Exception as e:  # noqa: BLE001
        verdict = f"fails: {vexport._first_line(e)[:60]}"
    grown = vexport._grow_batch((x,))
    cases = [((x,), vexport._torch_outputs(module, (x,))), (grown, vexport._torch_outputs(module, grown))]
    try:
        err, _ = vexport._check_parity(path, cases, 1e-4, 1e-4)
    except Exception as e:  # noqa: BLE001
        return verdict, float("nan") if "differs" not in str(e) else float("inf")
    return verdict, err


def executed_ops(path: Path, d: Path) -> list[str]:
    """Op sequence onnxruntime runs for ``path`` (its graph after optimisation at load, level ALL)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(d / "_executed.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    return [("ms:" if n.domain == "com.microsoft" else "") + n.op_type
            for n in onnx.load(so.optimized_model_filepath, load_external_data=False).graph.node]


def thread_cpu_ms(paths: dict[str, Path], x: np.ndarray, rounds: int) -> dict[str, float]:
    """Lowest CPU time (ms) of the calling thread per run over interleaved rounds, one intra-op thread.

    Other jobs can only add to a run's CPU time (cache and core sharing), so the lowest of a few
    interleaved runs estimates the undisturbed cost.
    """
    import onnxruntime as ort

    sessions = {}
    for name, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = 1
        so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[name] = s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        s.run(None, {s.get_inputs()[0].name: x})
    names = list(sessions)
    samples: dict[str, list[float]] = {n: [] for n in names}
    for r in range(rounds):
        for n in names[r % len(names):] + names[:r % len(names)]:
            s = sessions[n]
            feed = {s.get_inputs()[0].name: x}
            start = time.thread_time()
            s.run(None, feed)
            samples[n].append(1e3 * (time.thread_time() - start))
    return {n: min(v) for n, v in samples.items()}


def build_models(which: list[str]) -> list[tuple[str, torch.nn.Module, int, int]]:
    """(label, module, heads, width) of the measured models."""
    out = []
    x = torch.randn(1, 3, 224, 224)
    if "dense" in which:
        torch.manual_seed(0)
        m = timm.create_model("vit_small_patch16_224", pretrained=False).eval()
        out.append(("dense vit_small (384, 6 heads)", m, 6, 384))
    if "compressed" in which:
        torch.manual_seed(0)
        base = timm.create_model("vit_base_patch16_224", pretrained=False).eval()
        an = vitgraph.analyze(base, x)
        plan = vitgraph.plan_to_target(an, None, target="flops", fraction=0.25, mode="uniform",
                                       kinds=("residual", "head", "ffn"), round_to=64)
        slim = vitgraph.compress(base, plan, an).eval()
        kept = {gid: (len(k[0]) if isinstance(k[0], list) else len(k)) for gid, k in plan.kept.items()}
        width = kept[next(g.id for g in an.groups if g.kind == "residual")]
        heads = {kept[g.id] for g in an.groups if g.kind == "head"}.pop()
        ratio = count_flops(slim, x) / count_flops(base, x)
        out.append((f"compressed vit_base at {ratio:.1%} FLOPs ({width}, {heads} heads)", slim, heads, width))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["dense", "compressed"], choices=["dense", "compressed"])
    ap.add_argument("--forms", nargs="+", default=list(CANDIDATES), choices=list(CANDIDATES))
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--rounds", type=int, default=8, help="interleaved rounds of wall-time calls")
    ap.add_argument("--cpu-rounds", type=int, default=5, help="interleaved rounds of 1-thread CPU-time calls")
    ap.add_argument("--name", default="export_forms")
    args = ap.parse_args()
    warnings.simplefilter("ignore")
    rows, notes = [], []
    xb = torch.randn(args.batch, 3, 224, 224)
    for label, module, heads, width in build_models(args.models):
        x1 = torch.randn(1, 3, 224, 224)
        with tempfile.TemporaryDirectory() as tmp:
            d = Path(tmp)
            paths, info, base_seconds = {}, {}, {}
            for name in args.forms:
                try:
                    paths[name], seconds = write_candidate(name, module, x1, d, heads, width, base_seconds)
                except Exception as e:  # noqa: BLE001
                    notes.append(f"- {label}: {name} failed: {type(e).__name__}: {vexport._first_line(e)[:150]}")
                    continue
                verdict, err = check(paths[name], module, x1)
                ops = executed_ops(paths[name], d)
                info[name] = dict(export_s=seconds, checker=verdict, parity=err,
                                  nodes=len(onnx.load(str(paths[name]), load_external_data=False).graph.node), ops=ops)
                print(f"{label} {name}: {seconds:.1f}s, checker {verdict}, parity {err:.1e}, "
                      f"{len(ops)} nodes run", file=sys.stderr, flush=True)
            fns = {n: ort_runner(p, xb, threads=args.threads) for n, p in paths.items()}
            wall = measure_latency(fns, warmup=1, reps=1, rounds=args.rounds)
            del fns
            cpu = thread_cpu_ms(paths, xb.numpy(), args.cpu_rounds)
        groups: dict[tuple[str, ...], str] = {}
        best_wall = min(s.median_ms for s in wall.values())
        best_cpu = min(cpu.values())
        for name in paths:
            key = tuple(sorted(info[name]["ops"]))
            same = groups.setdefault(key, name)
            counts = collections.Counter(info[name]["ops"])
            rows.append({
                "model": label, "form": name + (" (default)" if name == DEFAULT_FORMS[0].name else ""),
                "export_s": round(info[name]["export_s"], 2), "checker": info[name]["checker"],
                "parity": info[name]["parity"], "nodes": info[name]["nodes"], "nodes_run": len(key),
                "executes_as": same, "wall_ms": wall[name].median_ms, "wall_ratio": wall[name].median_ms / best_wall,
                "cpu_ms": cpu[name], "cpu_ratio": cpu[name] / best_cpu,
                "ort_ops": " ".join(f"{k}:{v}" for k, v in sorted(counts.items(), key=lambda kv: -kv[1])
                                    if k not in ("Reshape", "Shape", "Squeeze", "Unsqueeze", "Concat", "Slice",
                                                 "Gather", "Cast", "Expand", "Equal", "Where", "Constant",
                                                 "ConstantOfShape", "Identity", "Conv", "Gemm")),
            })
        print(format_table([r for r in rows if r["model"] == label]), flush=True)
        spread = {"wall": [], "cpu": []}
        for _key, first in groups.items():
            members = [r for r in rows if r["model"] == label and r["executes_as"] == first]
            if len(members) > 1:
                for m, col in (("wall", "wall_ratio"), ("cpu", "cpu_ratio")):
                    spread[m].append(max(r[col] for r in members) / min(r[col] for r in members) - 1)
        if spread["wall"]:
            notes.append(f"- {label}: noise floor: forms that run the same graph differ by up to "
                         f"{max(spread['wall']):.1%} in wall_ms and {max(spread['cpu']):.1%} in cpu_ms in this run.")
    text = (
        f"Command: `python benchmarks/export_forms.py {' '.join(sys.argv[1:])}`. Random weights; batch {args.batch}; "
        f"onnxruntime CPUExecutionProvider at its default optimisation level (ALL). wall_ms: median of {args.rounds} "
        f"interleaved rounds at {args.threads} intra-op threads (the machine is shared: other jobs were running, "
        f"so wall time moves by several percent between identical graphs). cpu_ms: lowest CPU time of the calling "
        f"thread over {args.cpu_rounds} interleaved rounds at 1 intra-op thread, spinning off (no waits for the "
        "other jobs; they can only add to it). Ratios are to the best form of the same model. export_s: wall time to "
        "write the form (the dynamo exporter's capture, decomposition and onnxscript optimisation; post-processing included). "
        "checker: onnx.checker.check_model(full_check=True); parity: max abs difference from torch at batch 1 and 2. "
        "executes_as: the first form whose graph after onnxruntime's own optimisation has the same ops "
        "(same kernels on the same tensors, so the same cost). ort_ops: op types onnxruntime runs (shape plumbing, "
        "Conv and Gemm left out; ms: = com.microsoft contrib op).\n\n" + "\n".join(notes)
    )
    path = write_results_md(args.name, "ONNX export forms on onnxruntime CPU", rows, text)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
