"""Model measurements: parameter count, FLOPs, interleaved latency, and benchmark result files."""

from __future__ import annotations

import datetime as _dt
import os
import platform
import re
import time
import timeit
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from vitgraph.deploy.flops import FlopCounter
from vitgraph.errors import ArgumentError

__all__ = [
    "LatencyStats",
    "count_flops",
    "count_params",
    "format_table",
    "machine_info",
    "measure_latency",
    "ort_runner",
    "torch_runner",
    "write_results_md",
]

REPO_ROOT = Path(__file__).resolve().parents[2]  # (this file is vitgraph/deploy/measure.py)
DEFAULT_RESULTS_DIR = REPO_ROOT / "benchmarks" / "results"
_RESULT_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]*$")


# ----------------------------------------------------------------------------- size and FLOPs


def count_params(module: nn.Module) -> int:
    """Number of parameter elements (trainable and frozen), each shared tensor counted once."""
    unique = {id(p): p for p in module.parameters()}
    return sum(p.numel() for p in unique.values())


def count_flops(module: nn.Module, example_inputs: tuple[Any, ...] | torch.Tensor) -> int:
    """FLOPs of one forward pass at ``example_inputs`` by vitgraph's convention (``vitgraph.deploy.flops``).

    One multiply-add is 2 FLOPs, so FLOPs = 2 * MACs: a Linear(i, o) on a (n, i) input is 2*n*i*o.
    Counted ops are matmuls, convolutions and attention (q@k^T and attn@v, 2*B*H*N*N*d each, fused
    or not); element-wise ops, softmax and normalisation are not counted. The count is the same on
    every supported torch release.
    """
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    with torch.no_grad(), FlopCounter() as counter:
        module(*inputs)
    return counter.total


# ----------------------------------------------------------------------------- latency


@dataclass(frozen=True)
class LatencyStats:
    """Latency summary of one candidate in milliseconds over all timed calls."""

    median_ms: float
    p10_ms: float
    p90_ms: float
    mean_ms: float
    n: int


def measure_latency(
    fns: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 3,
    reps: int = 20,
    rounds: int = 5,
) -> dict[str, LatencyStats]:
    """Time each zero-argument callable, interleaving candidates round-robin across rounds.

    Every round runs ``reps`` timed calls of each candidate in turn, and the candidate order is
    rotated each round, so slow drifts of the machine (thermal, other load) hit all alike.

    Each call is one sample, timed by the standard library's ``timeit.Timer`` (``repeat(reps,
    number=1)``: ``time.perf_counter``, the garbage collector paused while a call is timed).
    ``torch.utils.benchmark.Timer`` runs that same ``timeit.Timer`` but cannot keep this
    function's contract: its ``timeit(n)`` adds ``max(n // 100, 2)`` untimed warm-up calls to
    every measurement and returns one mean (so ``warmup=0`` and one-call pairings, as
    ``benchmarks/latency.py`` times, are impossible and a one-call round costs three calls);
    ``blocked_autorange`` chooses how many calls to time by elapsed time rather than ``reps``;
    and it pins torch to one thread and synchronises the accelerator unless told otherwise.
    The callables synchronise themselves where they need to (:func:`torch_runner` does).
    """
    if not fns:
        raise ArgumentError("measure_latency needs at least one callable")
    if warmup < 0 or reps < 1 or rounds < 1:
        raise ArgumentError(f"need warmup >= 0, reps >= 1, rounds >= 1; got {warmup}, {reps}, {rounds}")
    names = list(fns)
    for name in names:
        for _ in range(warmup):
            fns[name]()
    timers = {name: timeit.Timer(fns[name], timer=time.perf_counter) for name in names}
    samples: dict[str, list[float]] = {name: [] for name in names}
    for r in range(rounds):
        shift = r % len(names)
        for name in names[shift:] + names[:shift]:
            samples[name].extend(s * 1e3 for s in timers[name].repeat(repeat=reps, number=1))
    return {name: _summarise(samples[name]) for name in names}


def _summarise(samples_ms: Sequence[float]) -> LatencyStats:
    """Median, 10th/90th percentile and mean of latency samples."""
    arr = np.asarray(samples_ms, dtype=np.float64)
    p10, median, p90 = np.percentile(arr, [10, 50, 90])
    return LatencyStats(float(median), float(p10), float(p90), float(arr.mean()), int(arr.size))


def torch_runner(module: nn.Module, inputs: tuple[torch.Tensor, ...] | torch.Tensor) -> Callable[[], Any]:
    """Zero-arg callable running ``module(*inputs)`` under inference_mode (CUDA-synchronised).

    The module's train/eval mode is left as the caller set it; benchmark in eval mode.
    """
    args = (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)
    on_cuda = any(isinstance(x, torch.Tensor) and x.is_cuda for x in args)

    def run() -> Any:
        with torch.inference_mode():
            out = module(*args)
        if on_cuda:
            # Kernels launch asynchronously; wait so the wall time covers the computation.
            torch.cuda.synchronize()
        return out

    return run


def ort_runner(
    path: str | Path,
    inputs: tuple[Any, ...] | torch.Tensor | np.ndarray,
    providers: Sequence[str] | None = None,
    threads: int | None = None,
) -> Callable[[], Any]:
    """Zero-arg callable running the ONNX model at ``path`` with onnxruntime on fixed inputs."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    if threads is not None:
        if threads < 1:
            raise ArgumentError(f"threads must be >= 1, got {threads}")
        options.intra_op_num_threads = threads
    session = ort.InferenceSession(
        str(path), sess_options=options, providers=list(providers or ["CPUExecutionProvider"])
    )
    args = (inputs,) if isinstance(inputs, (torch.Tensor, np.ndarray)) else tuple(inputs)
    metas = session.get_inputs()
    if len(metas) != len(args):
        raise ArgumentError(f"{path} expects {len(metas)} inputs, got {len(args)}")
    feed = {meta.name: _to_numpy(x) for meta, x in zip(metas, args)}

    def run() -> Any:
        return session.run(None, feed)

    return run


def _to_numpy(x: Any) -> np.ndarray:
    """Array view of a tensor or array-like input."""
    if isinstance(x, torch.Tensor):
        return x.detach().cpu().numpy()
    return np.asarray(x)


# ----------------------------------------------------------------------------- reporting


def machine_info() -> dict[str, Any]:
    """Date, CPU model, core counts, library versions and GPU name (no hostname)."""
    return {
        "date": _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d %H:%M UTC"),
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "usable_cores": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "torch": torch.__version__,
        "timm": _version("timm"),
        "onnx": _version("onnx"),
        "onnxruntime": _version("onnxruntime") or _version("onnxruntime-gpu"),
        "gpu": torch.cuda.get_device_name(0) if torch.cuda.is_available() else None,
    }


def _cpu_model() -> str:
    """CPU model name from /proc/cpuinfo, else platform's description."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


def _version(package: str) -> str | None:
    """Installed version of ``package``, or None when absent."""
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:
        return None


def write_results_md(
    name: str,
    title: str,
    table_rows: Sequence[Mapping[str, Any]],
    notes: str = "",
    results_dir: str | Path | None = None,
) -> Path:
    """Write ``<results_dir>/<name>.md`` with a machine/version header and a Markdown table."""
    if not _RESULT_NAME.match(name):
        raise ArgumentError(f"result name {name!r} must be a plain file stem (letters, digits, _ . -)")
    directory = Path(results_dir) if results_dir is not None else DEFAULT_RESULTS_DIR
    directory.mkdir(parents=True, exist_ok=True)
    info = machine_info()
    lines = [f"# {title}", ""]
    lines += [f"- **{key}**: {value}" for key, value in info.items()]
    lines += ["", _markdown_table(table_rows), ""]
    if notes:
        lines += [notes.rstrip(), ""]
    path = directory / f"{name}.md"
    path.write_text("\n".join(lines), encoding="utf-8")
    return path


def _columns(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    """Union of row keys in first-seen order."""
    cols: dict[str, None] = {}
    for row in rows:
        cols.update(dict.fromkeys(row))
    return list(cols)


def _cell(value: Any) -> str:
    """Compact text for one table cell (floats to 4 significant digits)."""
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return str(value)


def _markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """GitHub-flavoured Markdown table of ``rows``."""
    if not rows:
        return "_(no rows)_"
    cols = _columns(rows)

    def line(cells: Sequence[str]) -> str:
        return "| " + " | ".join(c.replace("|", "\\|") for c in cells) + " |"

    body = [line([_cell(row.get(c)) for c in cols]) for row in rows]
    return "\n".join([line(cols), line(["---"] * len(cols)), *body])


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """Plain-text table with aligned columns (numbers right-aligned) for printing."""
    if not rows:
        return "(no rows)"
    cols = _columns(rows)
    cells = [[_cell(row.get(c)) for c in cols] for row in rows]
    widths = [max(len(c), *(len(r[i]) for r in cells)) for i, c in enumerate(cols)]
    numeric = [all(isinstance(row.get(c), (int, float)) for row in rows if row.get(c) is not None) for c in cols]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if num else v.ljust(w) for v, w, num in zip(values, widths, numeric)).rstrip()

    return "\n".join([line(cols), "  ".join("-" * w for w in widths), *(line(r) for r in cells)])
