"""Latency of dense vs compressed ViTs at given FLOPs fractions, and vs a dense model built at the same widths.

For each model (random weights) and FLOPs fraction: a uniform plan (one ratio for every
residual/head/ffn group, magnitude scores, kept widths rounded to hardware-friendly multiples)
reaching the FLOPs target is built with ``vitgraph.plan_to_target``; the dense model, the compressed
model and (where timm can build one) a dense timm model of the same widths are timed in interleaved
rounds (medians) with torch eager and onnxruntime, at each batch size.  For onnxruntime the dense and
compressed models are written by ``export_onnx``'s default form and the same-width dense model in
every plain export form (``--same-forms``); the fastest of those is the reference.  Reported per
row: FLOPs ratio, speedup, fraction of ideal speedup (speedup x FLOPs ratio) and compressed /
fastest same-width-dense latency (wall time, and with ``--cpu-rounds`` one thread's CPU time).

    python benchmarks/latency.py                           # CPU: DeiT-S, ViT-B, Swin-T, batch 1 and 8
    python benchmarks/latency.py --models deit_small_patch16_224 vit_base_patch16_224 --fractions 0.5 0.25 \\
        --batches 8 --runtimes ort --threads 2 --cpu-rounds 5 --name latency_b8_ort
    python benchmarks/latency.py --device cuda             # torch CUDA + onnxruntime-gpu, batch 64 and 256

Writes benchmarks/results/latency.md (or --name).
"""
from __future__ import annotations

import argparse
import collections
import statistics
import sys
import tempfile
import time
import warnings
from pathlib import Path

import timm
import torch

import vitgraph
from vitgraph.deploy.export import onnx_op_types
from vitgraph.deploy.measure import (count_flops, count_params, format_table, measure_latency, ort_runner,
                              torch_runner, write_results_md)
from vitgraph.planning.planner import CostModel

MODELS = ["deit_small_patch16_224", "vit_base_patch16_224", "swin_tiny_patch4_window7_224"]
# the plain forms the same-width dense model is written in (graph optimisations: see export_forms.py)
SAME_FORMS = ["torchscript-17", "torchscript-20", "dynamo-17", "dynamo-18", "dynamo-20", "dynamo-23"]
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


def thread_cpu_ms(paths: dict[str, Path], x: torch.Tensor, rounds: int) -> dict[str, float]:
    """Lowest CPU time (ms) of the calling thread per onnxruntime run at one intra-op thread (spinning off),
    candidates interleaved: unlike wall time it does not carry the waits for other jobs on a shared machine,
    and those jobs can only add to it (cache and core sharing), so the lowest of a few runs is the estimate."""
    import onnxruntime as ort

    xn = x.numpy()
    sessions = {}
    for k, p in paths.items():
        so = ort.SessionOptions()
        so.intra_op_num_threads = so.inter_op_num_threads = 1
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        sessions[k] = s = ort.InferenceSession(str(p), so, providers=["CPUExecutionProvider"])
        s.run(None, {s.get_inputs()[0].name: xn})
    names = list(sessions)
    samples: dict[str, list[float]] = {k: [] for k in names}
    for r in range(rounds):
        for k in names[r % len(names):] + names[:r % len(names)]:
            s = sessions[k]
            feed = {s.get_inputs()[0].name: xn}
            start = time.thread_time()
            s.run(None, feed)
            samples[k].append(1e3 * (time.thread_time() - start))
    return {k: min(v) for k, v in samples.items()}


def _executed_graph(path: Path, d: Path) -> list[tuple]:
    """The graph onnxruntime runs for ``path`` (after its optimisation at load): per node, in order, the op
    type, its attributes and the shapes of its weight inputs."""
    import onnx
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.optimized_model_filepath = str(d / "_executed.onnx")
    so.log_severity_level = 3
    ort.InferenceSession(str(path), so, providers=["CPUExecutionProvider"])
    graph = onnx.load(so.optimized_model_filepath, load_external_data=False).graph
    weights = {i.name: tuple(i.dims) for i in graph.initializer}
    return [(n.op_type, tuple(sorted((a.name, str(onnx.helper.get_attribute_value(a))) for a in n.attribute)),
             tuple(weights.get(i) for i in n.input)) for n in graph.node]


def _export_same_forms(same: torch.nn.Module, x1: torch.Tensor, d: Path, forms: list[str], tag: str) -> dict[str, Path]:
    """The same-width dense model written in each requested form (``exporter-opset``), keyed by the form written."""
    paths = {}
    for f in forms:
        exporter, opset = f.rsplit("-", 1)
        p = d / f"{tag}-same-{f}.onnx"
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            rep = vitgraph.export_onnx(same, p, (x1,), exporter=exporter, opset=int(opset), check=False)
        paths.setdefault(rep.form, p)
    return paths


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=MODELS)
    ap.add_argument("--fractions", type=float, nargs="+", default=[0.5], help="FLOPs targets (fractions of dense)")
    ap.add_argument("--round-to", type=int, default=64)
    ap.add_argument("--batches", type=int, nargs="+", default=None)
    ap.add_argument("--runtimes", nargs="+", default=["torch", "ort"], choices=["torch", "ort"])
    ap.add_argument("--device", default="cpu", choices=["cpu", "cuda"])
    ap.add_argument("--threads", type=int, default=1, help="torch and onnxruntime intra-op threads (CPU)")
    ap.add_argument("--rounds", type=int, default=7)
    ap.add_argument("--reps", type=int, default=1)
    ap.add_argument("--same-forms", nargs="+", default=SAME_FORMS,
                    help="ONNX forms the same-width dense model is written in; the fastest is the reference")
    ap.add_argument("--cpu-rounds", type=int, default=0,
                    help="also time onnxruntime (CPU) by the calling thread's CPU time at 1 thread, this many rounds")
    ap.add_argument("--confirm-rounds", type=int, default=0,
                    help="onnxruntime (CPU): time the compressed model against the fastest same-width form again, "
                         "the two alone, this many paired rounds")
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
        with tempfile.TemporaryDirectory() as d:
            dense_path = Path(d) / "dense.onnx"
            if "ort" in args.runtimes:
                vitgraph.export_onnx(model, dense_path, (x1,), check=False)
            for fraction in args.fractions:
                plan = vitgraph.plan_to_target(an, None, target="flops", fraction=fraction, mode="uniform",
                                               kinds=("residual", "head", "ffn"), round_to=rt)
                slim = vitgraph.compress(model, plan, an)
                flops_ratio = count_flops(slim, x1) / count_flops(model, x1)
                assert CostModel(an).flops(widths_of(plan)) == count_flops(slim, x1)
                same, why = same_width_model(name, an, plan, slim, x1)
                notes.append(f"- {name} at {fraction:.0%}: round_to={rt}; kept {_widths_text(an, plan)}; same-width dense: "
                             f"{'timm ' + why if same is not None else 'none (' + why + ')'}")
                cands = {"dense": model, "slim": slim} | ({"same": same} if same is not None else {})
                paths: dict[str, Path] = {}
                slim_form = ""
                if "ort" in args.runtimes:
                    tag = f"f{fraction}"
                    paths["dense"] = dense_path
                    paths["slim"] = Path(d) / f"{tag}-slim.onnx"
                    rep = vitgraph.export_onnx(slim, paths["slim"], (x1,))
                    slim_form = rep.form
                    if same is not None:
                        same_paths = _export_same_forms(same, x1, Path(d), args.same_forms, tag)
                        paths |= {f"same:{f}": p for f, p in same_paths.items()}
                        if slim_form in same_paths:
                            extra = onnx_op_types(paths["slim"]) - onnx_op_types(same_paths[slim_form])
                            run_slim = _executed_graph(paths["slim"], Path(d))
                            run_same = _executed_graph(same_paths[slim_form], Path(d))
                            diff = collections.Counter(op for op, _, _ in run_slim)
                            diff.subtract(op for op, _, _ in run_same)
                            notes.append(f"  - ONNX op types in the compressed graph but not the same-width dense one "
                                         f"({slim_form}): {sorted(extra) or 'none'}; the graphs onnxruntime runs "
                                         f"(after its optimisation at load) are "
                                         + ("identical (op sequence, attributes, weight shapes)" if run_slim == run_same
                                            else f"different: op count differences {({k: v for k, v in diff.items() if v})}"))
                for b in batches:
                    x = torch.randn(b, 3, 224, 224)
                    for runtime in args.runtimes:
                        if runtime == "torch":
                            dev = args.device
                            fns = {k: torch_runner(m.to(dev), x.to(dev)) for k, m in cands.items()}
                        else:
                            prov = (["CUDAExecutionProvider", "CPUExecutionProvider"] if args.device == "cuda"
                                    else ["CPUExecutionProvider"])
                            fns = {k: ort_runner(p, x, providers=prov, threads=args.threads if args.device == "cpu" else None)
                                   for k, p in paths.items()}
                        st = {k: v.median_ms
                              for k, v in measure_latency(fns, warmup=1, reps=args.reps, rounds=args.rounds).items()}
                        del fns
                        row = _row(name, f"{runtime}-{args.device}", b, flops_ratio, st, slim_form if runtime == "ort" else "")
                        if runtime == "ort" and args.device == "cpu" and args.cpu_rounds:
                            cpu = thread_cpu_ms({k: p for k, p in paths.items() if k != "dense"}, x, args.cpu_rounds)
                            same_cpu = {k: v for k, v in cpu.items() if k.startswith("same")}
                            best = min(same_cpu, key=same_cpu.get) if same_cpu else None
                            row |= {"slim_cpu_ms": cpu["slim"], "same_cpu_ms": same_cpu[best] if best else None,
                                    "same_cpu_form": best.split(":", 1)[1] if best else None,
                                    "slim_vs_same_cpu": cpu["slim"] / same_cpu[best] if best else None,
                                    "slim_vs_same_form_cpu": cpu["slim"] / cpu[f"same:{slim_form}"]
                                    if f"same:{slim_form}" in cpu else None}
                        if runtime == "ort" and args.device == "cpu" and args.confirm_rounds and row["same_form"]:
                            # the fastest of several noisy candidates is biased low: time it again, alone
                            # with the compressed model, pairing the two calls of each round
                            pair = {"slim": paths["slim"], "same": paths[f"same:{row['same_form']}"]}
                            fns = {k: ort_runner(p, x, threads=args.threads) for k, p in pair.items()}
                            ratios = []
                            for r in range(args.confirm_rounds):
                                order = ["slim", "same"] if r % 2 == 0 else ["same", "slim"]
                                st2 = measure_latency({k: fns[k] for k in order}, warmup=0 if r else 1, reps=1, rounds=1)
                                ratios.append(st2["slim"].median_ms / st2["same"].median_ms)
                            del fns
                            row["confirm_wall"] = statistics.median(ratios)
                            if args.cpu_rounds:
                                cpu2 = thread_cpu_ms(pair, x, args.confirm_rounds)
                                row["confirm_cpu"] = cpu2["slim"] / cpu2["same"]
                        rows.append(row)
                        print(format_table([row]), flush=True)
                for m in cands.values():
                    m.to("cpu")
        print(f"{name}: {time.time() - t0:.0f}s", file=sys.stderr, flush=True)
    print(format_table(rows))
    gpu_note = ("" if args.device == "cuda" else
                "GPU figures were not measured (no GPU on this machine); `--device cuda` runs torch CUDA and "
                "onnxruntime-gpu (CUDAExecutionProvider) at batch 64 and 256.\n")
    cpu_note = (f" slim_cpu_ms / same_cpu_ms: lowest CPU time of the calling thread per onnxruntime run at 1 intra-op "
                f"thread (spinning off) over {args.cpu_rounds} interleaved rounds; it carries no waits for the other jobs "
                "and they can only add to it, so it resolves differences of a few percent that wall time on this shared "
                "machine does not; same_cpu_ms is the fastest same-width form by this measure; "
                "slim_vs_same_form_cpu compares with the same-width dense model written in the compressed model's form."
                if args.cpu_rounds else "")
    if args.confirm_rounds:
        cpu_note += (f" confirm_wall / confirm_cpu: the fastest same-width form is picked from several noisy timings, "
                     f"which favours it; so the compressed model and that form are timed again, the two alone, "
                     f"{args.confirm_rounds} rounds: confirm_wall is the median of the per-round ratios of wall time "
                     f"(the two calls of a round back to back, order alternating), confirm_cpu the ratio of the lowest "
                     "CPU times.")
    fractions = ", ".join(f"{f:g}" for f in args.fractions)
    text = (f"Command: `python benchmarks/latency.py {' '.join(sys.argv[1:])}`. Random weights; plans: "
            f"`plan_to_target(target='flops', fraction={fractions}, mode='uniform', kinds=residual/head/ffn)` with "
            f"magnitude scores. Latencies are medians of {args.rounds} interleaved rounds x {args.reps} calls; "
            f"{args.threads} intra-op thread(s) for torch and onnxruntime (the machine is shared, other jobs were "
            "running). frac_ideal = speedup x flops_ratio (1.0 = latency falls as fast as FLOPs). The dense and "
            "compressed models are written by `export_onnx`'s default (slim_form: the form it chose); the dense timm "
            f"model built at the compressed widths is written in each of {', '.join(args.same_forms)} and the fastest "
            "is the reference: same_ms / same_form, slim_vs_same = compressed / fastest same-width dense." + cpu_note
            + "\n\n" + "\n".join(notes) + "\n\n" + gpu_note)
    path = write_results_md(args.name, "Latency: dense vs compressed ViTs", rows, text)
    print(f"wrote {path}")


def _row(name: str, runtime: str, batch: int, flops_ratio: float, st: dict[str, float], slim_form: str) -> dict:
    """One result row from the median latencies of dense, slim and the same-width dense model(s)."""
    same = {k: v for k, v in st.items() if k.startswith("same")}
    best = min(same, key=same.get) if same else None
    speed = st["dense"] / st["slim"]
    return {"model": name, "runtime": runtime, "batch": batch, "flops_ratio": round(flops_ratio, 4),
            "dense_ms": st["dense"], "slim_ms": st["slim"], "speedup": speed, "frac_ideal": speed * flops_ratio,
            "slim_form": slim_form or None, "same_ms": same[best] if best else None,
            "same_form": (best.split(":", 1)[1] if ":" in best else None) if best else None,
            "slim_vs_same": st["slim"] / same[best] if best else None}


def _widths_text(an: vitgraph.Analysis, plan: vitgraph.Plan) -> str:
    w = widths_of(plan)
    parts = {}
    for g in an.groups:
        if g.id in w:
            parts.setdefault(g.kind, set()).add(f"{w[g.id]}/{g.size}")
    return "; ".join(f"{k} {', '.join(sorted(v))}" for k, v in parts.items())


if __name__ == "__main__":
    main()
