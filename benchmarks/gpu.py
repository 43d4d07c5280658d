"""GPU benchmark: dense against compressed ViTs (50% FLOPs, global and kernel-aligned plans) on CUDA.

    python benchmarks/gpu.py                      # on a CUDA machine: measure, write benchmarks/results/gpu.md
    python benchmarks/gpu.py --dry-run            # anywhere: build models and plans, list the cells, exit 0
    python benchmarks/gpu.py --models deit_tiny_patch16_224 --budget-s 120

One prepared run for a lent GPU (H100/H200, no internet), under 8 minutes.  For each model (random
weights, ``timm.create_model(name, pretrained=False)``) three variants: ``dense``, ``global``
(``plan_to_target(an, None, target="flops", fraction=0.5, round_to=8)``) and ``aligned`` (the same
with ``align="kernels"``).  Sections, in the order they run (cheap and most wanted first):

- ``eager``: torch eager, the three variants timed interleaved per (batch, dtype);
- ``sdpa``: which SDPA backends each variant's attention accepts (``sdpa_kernel`` with one backend
  enabled at a time), the q/k/v head dims it feeds, and the attention kernels the profiler sees
  under the default dispatch;
- ``ort-cuda``: onnxruntime's CUDA execution provider (IO binding on device buffers; fp32 ONNX from
  ``vitgraph.export_onnx``, fp16 ONNX exported from the half model on CUDA);
- ``compile``: ``torch.compile`` (default mode, ``dynamic=False``); the first call's time is
  reported as the compile time;
- ``sparse24``: ``vitgraph.sparsify_24`` then ``to_sparse_semi_structured`` on the eligible Linear
  weights (fp16), against the same model with the masked weights kept dense, and per Linear shape;
- ``lut``: ``LatencyTable(runtime, batch)`` prediction (``CostModel.latency``) against latency
  measured as ``vitgraph.targets.measure_many`` measures it, for ``torch-cuda`` and ``ort-cuda``;
- ``ort-trt``: onnxruntime's TensorRT provider when it is available (else a note).

Latencies are medians over interleaved rounds (``vitgraph.deploy.measure.measure_latency``; each
call is synchronised with ``torch.cuda.synchronize``).  Every cell is guarded: a failure is
recorded with its reason and the run goes on.  ``--budget-s`` bounds the whole run: once spent,
the remaining cells are skipped with a note (expensive cells also need their estimate left).
The results file is rewritten after every section, so a run cut short still leaves its figures.
The dry run writes nothing.
"""
from __future__ import annotations

import argparse
import copy
import datetime as _dt
import sys
import tempfile
import time
import traceback
import warnings
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Optional

import numpy as np
import torch
from torch import nn

import vitgraph
from vitgraph.deploy.measure import _markdown_table, format_table, machine_info, measure_latency, torch_runner
from vitgraph.planning.align import attention_pairs, kernel_violations
from vitgraph.planning.latency import LatencyTable
from vitgraph.planning.planner import CostModel

sys.path.insert(0, str(Path(__file__).resolve().parent))
from align_kernels import SDPAShapes, span as _span, widths as _widths  # noqa: E402  (shared with the CPU check)

DEFAULT_MODELS = ["deit_small_patch16_224", "vit_base_patch16_224"]
VARIANTS = ("dense", "global", "aligned")
DTYPES = {"fp16": torch.float16, "bf16": torch.bfloat16, "fp32": torch.float32}
SDPA_BACKENDS = ("FLASH_ATTENTION", "EFFICIENT_ATTENTION", "CUDNN_ATTENTION", "MATH")
OUT_DEFAULT = Path(__file__).resolve().parent / "results" / "gpu.md"


# ----------------------------------------------------------------------------- models and plans


@dataclass
class Built:
    name: str
    input_shape: tuple[int, ...]
    models: dict[str, nn.Module]           # variant -> CPU fp32 module (eval)
    widths: dict[str, dict[str, int]]      # variant -> group widths
    info: dict[str, dict[str, Any]]        # variant -> plan summary
    analysis: Any
    cost: CostModel
    _dev: dict = field(default_factory=dict)

    def on(self, variant: str, dtype: str) -> nn.Module:
        """The variant on CUDA in ``dtype`` (cached)."""
        key = (variant, dtype)
        if key not in self._dev:
            self._dev[key] = copy.deepcopy(self.models[variant]).to("cuda", DTYPES[dtype]).eval()
        return self._dev[key]

    def drop_device_copies(self) -> None:
        self._dev.clear()


def build(name: str, round_to: int) -> Built:
    """Model, analysis, the two plans and their compressed models (CPU, fp32)."""
    import timm

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = timm.create_model(name, pretrained=False).eval()
        x = torch.randn(1, *model.default_cfg["input_size"])
        an = vitgraph.analyze(model, x)
        cm = CostModel(an)
        dense_flops = cm.flops({})
        models: dict[str, nn.Module] = {"dense": model}
        widths: dict[str, dict[str, int]] = {"dense": {}}
        info: dict[str, dict[str, Any]] = {"dense": {"flops": 1.0, "violations": "-"}}
        pairs = attention_pairs(an)
        for variant, align in (("global", None), ("aligned", "kernels")):
            plan = vitgraph.plan_to_target(an, None, target="flops", fraction=0.5, round_to=round_to, align=align)
            w = _widths(an, plan)
            models[variant] = vitgraph.compress(model, plan, an).eval()
            widths[variant] = w
            info[variant] = {
                "flops": round(cm.flops(w) / dense_flops, 4),
                "violations": len(kernel_violations(an, plan)),
                "qk dims": _span(w[qk.id] for qk, v in pairs.values() if qk is not None),
                "v dims": _span(w[v.id] for qk, v in pairs.values() if v is not None),
                "ffn": _span(w[g.id] for g in an.groups if g.kind == "ffn"),
                "residual": _span(w[g.id] for g in an.groups if g.kind == "residual"),
            }
    return Built(name, tuple(x.shape), models, widths, info, an, cm)


# ----------------------------------------------------------------------------- cells


@dataclass
class Cell:
    section: str
    model: str
    dtype: str = "-"
    batch: int | str = "-"
    what: str = ""
    est_s: float = 5.0          # rough cost; a cell needs this much budget left to start
    fn: Optional[Callable[[], list[dict]]] = None

    def label(self) -> str:
        return f"{self.section:9s} {self.model:26s} {self.dtype:5s} batch={str(self.batch):4s} {self.what}"


def plan_cells(built: list[Built], a: argparse.Namespace, ctx: "Ctx") -> list[Cell]:
    """Every cell, in the order they run."""
    cells: list[Cell] = []
    names = [b.name for b in built]
    by = {b.name: b for b in built}
    batches = a.batches

    def add(section, model, dtype="-", batch="-", what="", est=5.0, fn=None):
        cells.append(Cell(section, model, dtype, batch, what, est, fn))

    for m in names:
        for dt in a.dtypes:
            for bs in batches:
                add("eager", m, dt, bs, "dense/global/aligned interleaved", 4 + bs / 32,
                    lambda b=by[m], dt=dt, bs=bs: ctx.eager(b, dt, bs))
    for m in names:
        for dt in a.dtypes:
            add("sdpa", m, dt, a.sdpa_batch, "backends " + "/".join(SDPA_BACKENDS) + " per variant + profiler kernels", 4,
                lambda b=by[m], dt=dt: ctx.sdpa(b, dt, a.sdpa_batch))
    for m in names:
        for dt in ("fp32", "fp16"):  # bf16 ONNX is not run on onnxruntime (noted in the results)
            if dt not in a.dtypes:
                continue
            add("ort-cuda", m, dt, ",".join(map(str, batches)), "export 3 variants, CUDA EP, IO binding",
                45 if "vit_base" in m else 25, lambda b=by[m], dt=dt: ctx.ort(b, dt, batches, trt=False))
    def compile_cells(dtypes):
        for dt in dtypes:
            if dt not in a.dtypes:
                continue
            for m in names:
                for bs in batches:
                    add("compile", m, dt, bs, "torch.compile dense/global/aligned", 60 if bs == batches[0] else 35,
                        lambda b=by[m], dt=dt, bs=bs: ctx.compiled(b, dt, bs))

    compile_cells(["fp16"])
    for m in names:
        add("sparse24", m, "fp16", ",".join(map(str, batches)),
            "to_sparse_semi_structured vs dense 2:4-masked, model + per Linear shape",
            20, lambda b=by[m]: ctx.sparse24(b, batches))
    for m in names:
        for rt in ("torch-cuda", "ort-cuda"):
            for bs in a.lut_batches:
                add("lut", m, "fp32", bs,
                    f"LatencyTable({rt!r}) prediction vs measure_many (~{ctx.lut_points(by[m], rt, bs)} points)",
                    30 if rt == "ort-cuda" else 15, lambda b=by[m], rt=rt, bs=bs: ctx.lut(b, rt, bs))
    compile_cells(["fp32"])
    for m in names:
        for dt in ("fp16", "fp32"):
            add("ort-trt", m, dt, ",".join(map(str, a.trt_batches)), "TensorRT EP (engine build per shape)", 90,
                lambda b=by[m], dt=dt: ctx.ort(b, dt, a.trt_batches, trt=True))
    compile_cells(["bf16"])
    return cells


# ----------------------------------------------------------------------------- measuring


def _err(e: BaseException) -> str:
    msg = " ".join(str(e).split())
    return f"{type(e).__name__}: {msg[:160]}"


def _sync() -> None:
    torch.cuda.synchronize()


class Ctx:
    """What the cells share: options, timing settings, the ONNX files and the result rows."""

    def __init__(self, a: argparse.Namespace) -> None:
        self.a = a
        self.tmp = Path(tempfile.mkdtemp(prefix="vitgraph-gpu-"))
        self.onnx: dict[tuple[str, str, str], Path] = {}
        self.eager_ms: dict[tuple[str, str, int, str], float] = {}

    # timing ---------------------------------------------------------------------------------
    def timed(self, fns: dict[str, Callable[[], Any]]) -> dict[str, Any]:
        """Interleaved medians; calls per round sized so a cell takes about ``--cell-s`` seconds."""
        slowest = 0.0
        for fn in fns.values():  # warm-up and sizing
            for _ in range(2):
                fn()
            t0 = time.perf_counter()
            fn()
            slowest += time.perf_counter() - t0
        rounds = self.a.rounds
        reps = max(2, min(self.a.reps, int(self.a.cell_s / rounds / max(slowest, 1e-6))))
        return measure_latency(fns, warmup=1, reps=reps, rounds=rounds)

    @staticmethod
    def rows_from(stats: dict, base: dict, extra: Optional[dict] = None) -> list[dict]:
        rows = []
        dense = stats.get("dense")
        for k, s in stats.items():
            row = dict(base, variant=k, ms=round(s.median_ms, 4), p10=round(s.p10_ms, 4), p90=round(s.p90_ms, 4), n=s.n)
            if dense is not None:
                row["speedup vs dense"] = round(dense.median_ms / s.median_ms, 3)
            row.update((extra or {}).get(k, {}))
            rows.append(row)
        return rows

    def inputs(self, b: Built, dtype: str, batch: int) -> torch.Tensor:
        g = torch.Generator().manual_seed(0)
        return torch.randn(batch, *b.input_shape[1:], generator=g).to("cuda", DTYPES[dtype])

    # sections -------------------------------------------------------------------------------
    def eager(self, b: Built, dtype: str, batch: int) -> list[dict]:
        x = self.inputs(b, dtype, batch)
        fns = {v: torch_runner(b.on(v, dtype), x) for v in VARIANTS}
        stats = self.timed(fns)
        for v, s in stats.items():
            self.eager_ms[(b.name, dtype, batch, v)] = s.median_ms
        return self.rows_from(stats, {})

    def sdpa(self, b: Built, dtype: str, batch: int) -> list[dict]:
        from torch.nn.attention import SDPBackend, sdpa_kernel

        x = self.inputs(b, dtype, batch)
        rows = []
        for v in VARIANTS:
            m = b.on(v, dtype)
            row: dict[str, Any] = {"variant": v}
            rec = SDPAShapes()
            try:
                with torch.inference_mode(), rec:
                    m(x)
                _sync()
                row["sdpa q/k/v dims"] = " ".join("/".join(map(str, d)) for d in sorted(rec.dims)) or "no sdpa call"
            except Exception as e:  # noqa: BLE001
                row["sdpa q/k/v dims"] = _err(e)
            for name in SDPA_BACKENDS:
                backend = getattr(SDPBackend, name, None)
                if backend is None:
                    row[name] = "not in this torch"
                    continue
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    try:
                        with torch.inference_mode(), sdpa_kernel([backend]):
                            m(x)
                        _sync()
                        row[name] = "ok"
                    except Exception as e:  # noqa: BLE001
                        # torch says why a backend refused in a warning; the error itself is generic
                        why = [" ".join(str(w.message).split()) for w in caught]
                        row[name] = "no: " + (why[0][:120] if why else _err(e)[:120])
            row["default kernels (profiler)"] = self._attention_kernels(m, x)
            rows.append(row)
        return rows

    @staticmethod
    def _attention_kernels(m: nn.Module, x: torch.Tensor) -> str:
        from torch.profiler import ProfilerActivity, profile

        try:
            with torch.inference_mode():
                m(x)
                _sync()
                with profile(activities=[ProfilerActivity.CUDA]) as prof:
                    m(x)
                    _sync()
            keys = ("flash", "fmha", "attention", "attn", "cudnn", "sdpa", "softmax", "efficient")
            names = sorted({ev.key for ev in prof.key_averages() if any(k in ev.key.lower() for k in keys)})
            short = [n[:60] for n in names[:4]]
            kind = ("flash" if any("flash" in n.lower() for n in names) else
                    "efficient" if any("fmha" in n.lower() or "efficient" in n.lower() for n in names) else
                    "cudnn" if any("cudnn" in n.lower() for n in names) else
                    "math (softmax + GEMMs)" if any("softmax" in n.lower() for n in names) else "unknown")
            return f"{kind}: " + "; ".join(short)
        except Exception as e:  # noqa: BLE001
            return "profiler failed: " + _err(e)

    def _export(self, b: Built, variant: str, dtype: str) -> Path:
        key = (b.name, variant, dtype)
        if key not in self.onnx:
            path = self.tmp / f"{b.name}-{variant}-{dtype}.onnx"
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                if dtype == "fp32":
                    x = torch.randn(*b.input_shape)
                    vitgraph.export_onnx(b.models[variant], path, (x,), check=False)
                else:  # the half model on CUDA, fp16 input and output
                    x = torch.randn(*b.input_shape, device="cuda", dtype=DTYPES[dtype])
                    vitgraph.export_onnx(b.on(variant, dtype), path, (x,), check=False)
            self.onnx[key] = path
        return self.onnx[key]

    def _ort_session(self, path: Path, trt: bool, fp16: bool):
        import onnxruntime as ort

        if trt:
            cache = self.tmp / "trt-cache"
            cache.mkdir(exist_ok=True)
            providers: list[Any] = [("TensorrtExecutionProvider", {"trt_fp16_enable": fp16, "trt_engine_cache_enable": True,
                                                                    "trt_engine_cache_path": str(cache)}),
                                    "CUDAExecutionProvider"]
        else:
            providers = ["CUDAExecutionProvider"]
        sess = ort.InferenceSession(str(path), providers=providers)
        used = sess.get_providers()
        want = "TensorrtExecutionProvider" if trt else "CUDAExecutionProvider"
        if want not in used:
            raise RuntimeError(f"{want} not active (session providers: {used})")
        return sess

    @staticmethod
    def _bound_runner(sess, x: torch.Tensor) -> Callable[[], Any]:
        """``sess`` run on a CUDA tensor through IO binding (output left on the device)."""
        binding = sess.io_binding()
        meta = sess.get_inputs()[0]
        np_type = {torch.float32: np.float32, torch.float16: np.float16}[x.dtype]
        binding.bind_input(name=meta.name, device_type="cuda", device_id=x.device.index or 0, element_type=np_type,
                           shape=tuple(x.shape), buffer_ptr=x.data_ptr())
        for out in sess.get_outputs():
            binding.bind_output(out.name, "cuda")

        def run() -> Any:
            sess.run_with_iobinding(binding)
            torch.cuda.synchronize()

        return run

    def ort(self, b: Built, dtype: str, batches: list[int], trt: bool) -> list[dict]:
        import onnxruntime as ort

        avail = ort.get_available_providers()
        want = "TensorrtExecutionProvider" if trt else "CUDAExecutionProvider"
        if want not in avail:
            return [{"note": f"skipped: {want} not available (onnxruntime {ort.__version__} providers: {avail})"}]
        rows: list[dict] = []
        sessions: dict[str, Any] = {}
        for v in VARIANTS:
            try:
                # TensorRT takes the fp32 file and builds fp16 engines with trt_fp16_enable
                path = self._export(b, v, "fp32" if trt else dtype)
                sessions[v] = self._ort_session(path, trt, fp16=dtype == "fp16")
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": v, "note": "export/session failed: " + _err(e)})
        for bs in batches:
            if self.over_budget(90 if trt else 5):
                rows.append({"batch": bs, "note": "skipped: budget"})
                continue
            try:
                in_dtype = "fp32" if trt else dtype
                x = self.inputs(b, in_dtype, bs)
                t0 = time.perf_counter()
                fns = {v: self._bound_runner(s, x) for v, s in sessions.items()}
                for fn in fns.values():
                    fn()  # TensorRT builds its engine for this shape here
                build_s = time.perf_counter() - t0
                stats = self.timed(fns)
                extra = {v: {"first call s (all variants)": round(build_s, 1)} for v in stats} if trt else None
                rows += [dict(r, batch=bs) for r in self.rows_from(stats, {}, extra)]
            except Exception as e:  # noqa: BLE001
                rows.append({"batch": bs, "note": "failed: " + _err(e)})
        return rows

    def compiled(self, b: Built, dtype: str, batch: int) -> list[dict]:
        x = self.inputs(b, dtype, batch)
        fns, extra, rows = {}, {}, []
        for v in VARIANTS:
            try:
                key = ("compiled", v, dtype)
                if key not in b._dev:
                    b._dev[key] = torch.compile(b.on(v, dtype), dynamic=False)
                fn = torch_runner(b._dev[key], x)
                t0 = time.perf_counter()
                fn()
                extra[v] = {"first call s": round(time.perf_counter() - t0, 1)}
                fns[v] = fn
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": v, "note": "compile failed: " + _err(e)})
        if fns:
            stats = self.timed(fns)
            out = self.rows_from(stats, {}, extra)
            for r in out:
                e = self.eager_ms.get((b.name, dtype, batch, r["variant"]))
                if e:
                    r["speedup vs eager"] = round(e / r["ms"], 3)
            rows = out + rows
        return rows

    def sparse24(self, b: Built, batches: list[int]) -> list[dict]:
        from torch.sparse import to_sparse_semi_structured

        from vitgraph.passes.sparsity24 import to_semi_structured

        rows: list[dict] = []
        shapes: set[tuple[int, int]] = set()
        for v in ("global", "aligned", "dense"):
            try:
                masked = vitgraph.sparsify_24(b.models[v]).to("cuda").eval()
                rep = masked.vitgraph_24_report
                sparse, st = to_semi_structured(masked)  # fp16 copy, eligible weights semi-structured
                if not st.applied:
                    rows.append({"variant": v, "note": st.message})
                    continue
                dense16 = copy.deepcopy(masked).half().eval()
                for name in st.converted:
                    w = dense16.get_submodule(name).weight
                    shapes.add((int(w.shape[0]), int(w.shape[1])))
                for bs in batches:
                    if self.over_budget(3):
                        rows.append({"variant": v, "batch": bs, "note": "skipped: budget"})
                        continue
                    try:
                        x = self.inputs(b, "fp16", bs)
                        with torch.inference_mode():
                            diff = float((sparse(x).float() - dense16(x).float()).abs().max())
                        stats = self.timed({"2:4 masked, dense kernels": torch_runner(dense16, x),
                                            "semi-structured": torch_runner(sparse, x)})
                        d, s = stats["2:4 masked, dense kernels"], stats["semi-structured"]
                        rows.append({"variant": v, "batch": bs,
                                     "Linear converted": f"{len(st.converted)} (skipped {len(rep.skipped)})",
                                     "dense-kernel ms": round(d.median_ms, 4), "semi-structured ms": round(s.median_ms, 4),
                                     "speedup": round(d.median_ms / s.median_ms, 3), "max abs diff": f"{diff:.1e}"})
                    except Exception as e:  # noqa: BLE001
                        rows.append({"variant": v, "batch": bs, "note": "failed: " + _err(e)})
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": v, "note": "failed: " + _err(e)})
        n_tok = self._tokens(b)
        bs = 64 if 64 in batches else batches[-1]
        for out_f, in_f in sorted(shapes):
            if self.over_budget(2):
                rows.append({"variant": f"Linear {out_f}x{in_f}", "note": "skipped: budget"})
                continue
            try:
                g = torch.Generator().manual_seed(0)
                w = vitgraph.sparsify_24(nn.Linear(in_f, out_f)).weight.detach().to("cuda", torch.float16)
                bias = torch.zeros(out_f, device="cuda", dtype=torch.float16)
                ws = to_sparse_semi_structured(w)
                xin = torch.randn(bs * n_tok, in_f, generator=g).to("cuda", torch.float16)
                lin = lambda w_=w: torch.nn.functional.linear(xin, w_, bias)  # noqa: E731

                def mk(fn):
                    def run():
                        with torch.inference_mode():
                            fn()
                        _sync()
                    return run
                stats = self.timed({"dense": mk(lin), "semi-structured": mk(lambda: torch.nn.functional.linear(xin, ws, bias))})
                d, s = stats["dense"], stats["semi-structured"]
                rows.append({"variant": f"Linear {out_f}x{in_f}", "batch": f"{bs}x{n_tok} rows",
                             "dense-kernel ms": round(d.median_ms, 4), "semi-structured ms": round(s.median_ms, 4),
                             "speedup": round(d.median_ms / s.median_ms, 3)})
            except Exception as e:  # noqa: BLE001
                rows.append({"variant": f"Linear {out_f}x{in_f}", "note": "failed: " + _err(e)})
        return rows

    @staticmethod
    def _tokens(b: Built) -> int:
        m = b.models["dense"]
        pe = getattr(m, "patch_embed", None)
        n = getattr(pe, "num_patches", 196)
        return int(n) + int(getattr(m, "num_prefix_tokens", 1))

    def lut_points(self, b: Built, runtime: str, batch: int) -> int:
        """How many table points the prediction for the three variants needs (counted, not measured)."""
        class Counting(LatencyTable):
            def _measure(self, family, dims):  # noqa: ANN001
                return 1.0
        t = Counting(runtime, batch=batch, cache_dir=False)
        for v in VARIANTS:
            b.cost.latency(b.widths[v], t)
        return len(t.entries)

    def lut(self, b: Built, runtime: str, batch: int) -> list[dict]:
        from vitgraph.targets import measure_many

        table = LatencyTable(runtime, batch=batch)
        t0 = time.perf_counter()
        pred = {v: b.cost.latency(b.widths[v], table) for v in VARIANTS}
        table.save()
        fill_s = time.perf_counter() - t0
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            stats = measure_many(b.models["dense"], {"global": b.models["global"], "aligned": b.models["aligned"]},
                                 table, b.input_shape, reps=5, rounds=5)
        rows = []
        for v in VARIANTS:
            ms = stats[v].median_ms
            rows.append({"runtime": runtime, "batch": batch, "variant": v,
                         "predicted ms": round(pred[v], 4), "measured ms": round(ms, 4),
                         "predicted/measured": round(pred[v] / ms, 3),
                         "predicted fraction": round(pred[v] / pred["dense"], 4),
                         "measured fraction": round(ms / stats["dense"].median_ms, 4),
                         "table points (measured now)": f"{len(table.entries)} ({table.n_measured}, {fill_s:.0f} s)"})
        return rows

    # budget -----------------------------------------------------------------------------------
    start = time.perf_counter()

    def over_budget(self, need_s: float = 0.0) -> bool:
        return time.perf_counter() - self.start + need_s > self.a.budget_s


# ----------------------------------------------------------------------------- report


def environment() -> dict[str, Any]:
    info = machine_info()
    try:
        import onnxruntime as ort
        info["onnxruntime providers"] = ", ".join(ort.get_available_providers())
    except Exception as e:  # noqa: BLE001
        info["onnxruntime providers"] = _err(e)
    if torch.cuda.is_available():
        p = torch.cuda.get_device_properties(0)
        info["gpu"] = f"{p.name} (sm {p.major}.{p.minor}, {p.total_memory / 2**30:.0f} GiB)"
        info["cuda"] = torch.version.cuda
        info["cudnn"] = torch.backends.cudnn.version()
        info["driver/nvidia-smi"] = _nvidia_smi()
    return info


def _nvidia_smi() -> str:
    import subprocess

    try:
        out = subprocess.run(["nvidia-smi", "--query-gpu=name,driver_version,clocks.max.sm,power.limit", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=20)
        return out.stdout.strip() or out.stderr.strip()[:120]
    except Exception as e:  # noqa: BLE001
        return _err(e)


SECTION_TITLES = {
    "plans": "Plans (cost model on the analysed graph; 50% FLOPs target)",
    "eager": "torch eager (ms, median of interleaved rounds)",
    "sdpa": "SDPA backends accepted (one backend enabled at a time) and the default dispatch's kernels",
    "ort-cuda": "onnxruntime CUDA execution provider (IO binding, ms)",
    "compile": "torch.compile (default mode, dynamic=False; ms)",
    "sparse24": "2:4 sparsity: to_sparse_semi_structured against dense kernels on the same 2:4-masked weights (fp16)",
    "lut": "Latency table prediction against measure_many (fp32)",
    "ort-trt": "onnxruntime TensorRT execution provider (ms)",
}


def write_md(path: Path, env: dict, sections: dict[str, list[dict]], notes: list[str], argv: list[str]) -> None:
    lines = ["# GPU benchmark: dense against compressed (50% FLOPs, global and kernel-aligned plans)", ""]
    lines += [f"- **{k}**: {v}" for k, v in env.items()]
    lines += ["", f"Command: `python benchmarks/gpu.py {' '.join(argv)}`. Random weights (timm, pretrained=False); "
              "global = `plan_to_target(an, None, target=\"flops\", fraction=0.5, round_to=8)`, aligned = the same with "
              "`align=\"kernels\"`. Latencies: medians over interleaved rounds, each call synchronised "
              "(`torch.cuda.synchronize`); `speedup vs dense` = dense median / variant median at the same batch and dtype.", ""]
    for sec, title in SECTION_TITLES.items():
        rows = sections.get(sec)
        if not rows:
            continue
        lines += [f"## {title}", "", _markdown_table(rows), ""]
    if notes:
        lines += ["## Notes", ""] + [f"- {n}" for n in notes] + [""]
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines), encoding="utf-8")


# ----------------------------------------------------------------------------- main


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dry-run", action="store_true",
                    help="build models and plans, list the cells, measure nothing, write nothing")
    ap.add_argument("--models", nargs="+", default=DEFAULT_MODELS)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 64, 256])
    ap.add_argument("--dtypes", nargs="+", default=["fp16", "bf16", "fp32"], choices=list(DTYPES))
    ap.add_argument("--sdpa-batch", type=int, default=64)
    ap.add_argument("--lut-batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--trt-batches", type=int, nargs="+", default=[1, 64])
    ap.add_argument("--round-to", type=int, default=8)
    ap.add_argument("--budget-s", type=float, default=420.0, help="whole-run budget; later cells are skipped with a note")
    ap.add_argument("--cell-s", type=float, default=2.0, help="about how long one timed cell runs")
    ap.add_argument("--reps", type=int, default=20, help="most calls per round")
    ap.add_argument("--rounds", type=int, default=5)
    ap.add_argument("--sections", nargs="+", default=None, help="run only these sections")
    ap.add_argument("--out", type=Path, default=OUT_DEFAULT)
    a = ap.parse_args(argv)
    torch.set_num_threads(1 if a.dry_run else torch.get_num_threads())
    ctx = Ctx(a)
    Ctx.start = time.perf_counter()

    built: list[Built] = []
    plan_rows: list[dict] = []
    ok = True
    for name in a.models:
        t0 = time.perf_counter()
        try:
            b = build(name, a.round_to)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            plan_rows.append({"model": name, "variant": "-", "note": "build failed: " + _err(e)})
            ok = False
            continue
        built.append(b)
        for v in VARIANTS:
            plan_rows.append({"model": name, "variant": v, **b.info[v]})
        if b.info["aligned"]["violations"]:
            ok = False
        print(f"built {name} in {time.perf_counter() - t0:.1f} s", flush=True)
    print(format_table(plan_rows), flush=True)
    cells = plan_cells(built, a, ctx)
    if a.sections:
        cells = [c for c in cells if c.section in a.sections]

    if a.dry_run:
        print(f"\nwould measure {len(cells)} cells (budget {a.budget_s:.0f} s; nothing measured, nothing written):")
        for i, c in enumerate(cells, 1):
            print(f"  [{i:3d}] {c.label()}")
        counts: dict[str, int] = {}
        for c in cells:
            counts[c.section] = counts.get(c.section, 0) + 1
        print("cells per section: " + ", ".join(f"{k}={v}" for k, v in counts.items()))
        print("aligned plans obey kernel rules: " + ("yes" if ok else "NO"))
        print(f"dry run done in {time.perf_counter() - Ctx.start:.1f} s")
        return 0 if ok else 1

    if not torch.cuda.is_available():
        print("no CUDA device: run with --dry-run, or on a GPU machine", file=sys.stderr)
        return 2
    torch.backends.cuda.matmul.allow_tf32 = False  # fp32 means fp32
    torch.backends.cudnn.allow_tf32 = False
    env = environment()
    sections: dict[str, list[dict]] = {"plans": plan_rows}
    notes: list[str] = ["onnxruntime runs fp32 and fp16 ONNX files only (bf16 is not measured there); the TensorRT "
                        "provider takes the fp32 file, with trt_fp16_enable for fp16."]
    section_now = None
    for i, c in enumerate(cells, 1):
        if section_now is not None and c.section != section_now:
            write_md(a.out, env, sections, notes, argv)
            for b in built:  # free device copies between sections
                b.drop_device_copies()
            torch.cuda.empty_cache()
        section_now = c.section
        base = {"model": c.model, "dtype": c.dtype, "batch": c.batch}
        elapsed = time.perf_counter() - Ctx.start
        if ctx.over_budget(c.est_s if c.est_s >= 30 else 0):
            sections.setdefault(c.section, []).append(
                dict(base, note=f"skipped: budget ({elapsed:.0f} s of {a.budget_s:.0f} s spent)"))
            notes.append(f"skipped ({c.section}, budget): {c.label().strip()}")
            print(f"[{i}/{len(cells)}] SKIP (budget) {c.label()}", flush=True)
            continue
        print(f"[{i}/{len(cells)}] {elapsed:5.0f}s {c.label()}", flush=True)
        t0 = time.perf_counter()
        try:
            rows = c.fn()
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            rows = [{"note": "failed: " + _err(e)}]
            try:
                torch.cuda.synchronize()
            except Exception:  # noqa: BLE001
                pass
        took = time.perf_counter() - t0
        for r in rows:
            row = dict(base)
            row.update(r)
            row["cell s"] = round(took, 1)
            sections.setdefault(c.section, []).append(row)
        print(format_table([dict(base, **r) for r in rows]), flush=True)
    notes.append(f"total {time.perf_counter() - Ctx.start:.0f} s; budget {a.budget_s:.0f} s; date "
                 f"{_dt.datetime.now(_dt.timezone.utc):%Y-%m-%d %H:%M} UTC")
    write_md(a.out, env, sections, notes, argv)
    print(f"wrote {a.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
