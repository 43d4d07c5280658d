"""Latency lookup table: op latencies measured on a target runtime over a grid of shapes, interpolated.

A table answers "how long does this op take on this runtime" for four op families:

- ``linear``  ``(M, K, N)``: ``x[M, K] @ w[K, N] + b`` (Linear, F.linear, addmm, ungrouped conv as GEMM);
- ``bmm``     ``(B, M, K, N)``: batched ``a[B, M, K] @ b[B, K, N]`` (explicit attention matmuls);
- ``sdpa``    ``(B, L, S, E, Ev)``: softmax(q k^T / sqrt(E)) v with ``B`` = batch x heads;
- ``eltwise`` ``(n,)``: an element-wise op over ``n`` elements (norms, activations, adds, copies).

Dims that vary while planning (channel widths, heads) are interpolated multilinearly between
points of a fixed ladder (:func:`ladder_points`); dims that do not vary (tokens) are measured at
their exact value.  Points are measured lazily, the first time a query needs them, and cached on
disk under ``~/.cache/vitgraph`` (or ``$VITGRAPH_CACHE``) in one JSON file per runtime, machine,
thread count and batch size.  Runtimes: ``torch-cpu``, ``ort-cpu`` (onnxruntime CPU),
``torch-cuda``, ``ort-cuda`` (onnxruntime CUDAExecutionProvider).
"""
from __future__ import annotations

import hashlib
import itertools
import json
import math
import os
import platform
import time
import timeit
from pathlib import Path
from typing import Callable, Optional, Sequence

import numpy as np
import torch

from vitgraph.atomic import write_atomic
from vitgraph.errors import ArgumentError, UnknownGroupError

RUNTIMES = ("torch-cpu", "ort-cpu", "torch-cuda", "ort-cuda")
FAMILIES = {"linear": 3, "bmm": 4, "sdpa": 5, "eltwise": 1}


def ladder_points(v: float) -> tuple[int, int]:
    """The grid points bracketing ``v``: equal when ``v`` is on the grid.

    The grid holds every integer to 16, then steps of 8 to 128, 16 to 256, 32 to 512, 64 to
    1024, 128 to 2048, 256 to 4096 and 12.5% of the power of two above (so hardware-friendly
    widths such as 192, 384, 768, 1536 and 3072 are grid points).
    """
    if v <= 16:
        lo = max(1, math.floor(v))
        return lo, max(lo, math.ceil(v))
    p = 2 ** math.ceil(math.log2(v))  # v in (p/2, p]
    step = max(8, p // 16) if p <= 128 else p // 16
    lo = math.floor(v / step) * step
    hi = math.ceil(v / step) * step
    return int(lo), int(hi)


def _eltwise_points(n: float) -> tuple[int, int]:
    """Element counts are bracketed on a geometric grid (powers of 2 and 1.5 x powers of 2)."""
    if n <= 1024:
        return 1024, 1024
    e = math.floor(math.log2(n))
    grid = [2 ** e, 3 * 2 ** (e - 1), 2 ** (e + 1)]
    for a, b in zip(grid, grid[1:]):
        if a <= n <= b:
            return (a, a) if n == a else (b, b) if n == b else (a, b)
    return 2 ** e, 2 ** (e + 1)


def machine_key(runtime: str, threads: Optional[int]) -> str:
    """Short hash naming the machine, runtime and library versions a table was measured on."""
    from vitgraph.deploy.measure import machine_info

    info = machine_info()
    parts = [runtime, str(info["cpu"]), str(info["usable_cores"]), str(info["torch"]), str(info["onnxruntime"]),
             str(info["gpu"]), platform.machine(), str(threads)]
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:12]


class LatencyTable:
    """Measured op latencies (milliseconds) of one runtime, batch size and thread count.

    ``lookup(family, dims, vary)`` interpolates over the dims flagged in ``vary`` and measures
    missing grid points on demand (``measure=False`` makes a missing point an error, for tables
    filled by hand).  ``save()`` writes the cache file; it is also written after measuring.
    """

    def __init__(
        self,
        runtime: str = "torch-cpu",
        batch: int = 1,
        threads: Optional[int] = None,
        cache_dir: Optional[str | Path] = None,
        measure: bool = True,
        reps: int = 7,
        min_time_ms: float = 20.0,
        entries: Optional[dict[str, float]] = None,
    ) -> None:
        if runtime not in RUNTIMES:
            raise ArgumentError(f"runtime must be one of {RUNTIMES}, got {runtime!r}")
        if batch < 1:
            raise ArgumentError(f"batch must be >= 1, got {batch}")
        self.runtime = runtime
        self.batch = int(batch)
        self.threads = threads
        self.measure = measure
        self.reps = reps
        self.min_time_ms = min_time_ms
        self.entries: dict[str, float] = dict(entries or {})
        self.n_measured = 0
        self.fresh: set[str] = set()  # points measured once in this session, not yet refined
        self.path: Optional[Path] = None
        if cache_dir is not False and entries is None:
            root = Path(cache_dir or os.environ.get("VITGRAPH_CACHE") or Path.home() / ".cache" / "vitgraph")
            self.path = root / f"latency-{runtime}-{machine_key(runtime, threads)}-b{batch}.json"
            if self.path.exists():
                try:
                    self.entries.update(json.loads(self.path.read_text())["entries"])
                except (OSError, ValueError, KeyError):
                    pass
        self._dirty = False
        self._bench: Optional[Callable[[str, tuple[int, ...]], float]] = None

    def __repr__(self) -> str:
        return f"<LatencyTable {self.runtime} batch={self.batch} threads={self.threads} {len(self.entries)} points>"

    # -- queries --------------------------------------------------------------------------------
    def lookup(self, family: str, dims: Sequence[float], vary: Optional[Sequence[bool]] = None) -> float:
        """Latency in ms of one op, multilinear in the ``vary`` dims between grid points."""
        if family not in FAMILIES or len(dims) != FAMILIES[family]:
            raise ArgumentError(f"unknown op family {family!r} or wrong dims {tuple(dims)}")
        vary = tuple(vary) if vary is not None else (True,) * len(dims)
        brackets = []
        for d, v in zip(dims, vary):
            if v:
                lo, hi = _eltwise_points(d) if family == "eltwise" else ladder_points(d)
            else:
                lo = hi = int(round(d))
            w = 0.0 if hi == lo else (d - lo) / (hi - lo)
            brackets.append(((lo, 1.0 - w), (hi, w)) if hi != lo else ((lo, 1.0),))
        total = 0.0
        for corner in itertools.product(*brackets):
            weight = math.prod(w for _, w in corner)
            if weight == 0.0:
                continue
            total += weight * self.point(family, tuple(p for p, _ in corner))
        return total

    def point(self, family: str, dims: tuple[int, ...]) -> float:
        """Latency of one grid point (measured now if missing)."""
        key = f"{family}:{','.join(map(str, dims))}"
        hit = self.entries.get(key)
        if hit is not None:
            return hit
        if not self.measure:
            raise UnknownGroupError(f"latency table has no point {key} and measuring is off")
        ms = self._measure(family, dims)
        self.entries[key] = ms
        self.fresh.add(key)
        self.n_measured += 1
        self._dirty = True
        if self.n_measured % 50 == 0:
            self.save()
        return ms

    def refine(self, rounds: int = 2) -> int:
        """Measure this session's new points again, interleaved, keeping each point's minimum.

        One measurement can land in a burst of load from other processes; repeating every new
        point in shuffled rounds and keeping the minimum makes the table robust to that.
        Returns the number of points refined.
        """
        keys = sorted(self.fresh)
        rng = np.random.default_rng(len(keys))
        for _ in range(rounds):
            for i in rng.permutation(len(keys)):
                fam, _, rest = keys[i].partition(":")
                ms = self._measure(fam, tuple(int(v) for v in rest.split(",")))
                self.entries[keys[i]] = min(self.entries[keys[i]], ms)
        self.fresh.clear()
        if keys:
            self._dirty = True
            self.save()
        return len(keys)

    def save(self) -> Optional[Path]:
        """Write the cache file (atomically); returns its path."""
        if self.path is None or not self._dirty:
            return self.path
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = {"runtime": self.runtime, "batch": self.batch, "threads": self.threads, "entries": self.entries}
        write_atomic(self.path, json.dumps(data))
        self._dirty = False
        return self.path

    # -- measuring --------------------------------------------------------------------------------
    def _measure(self, family: str, dims: tuple[int, ...]) -> float:
        if self.runtime.startswith("torch"):
            fn = _torch_op(family, dims, "cuda" if self.runtime == "torch-cuda" else "cpu", self.threads)
        else:
            fn = _ort_op(family, dims, self.runtime, self.threads)
        return _time(fn, self.reps, self.min_time_ms)


def _time(fn: Callable[[], None], reps: int, min_time_ms: float) -> float:
    """Fastest per-call ms over ``reps`` samples, each long enough to be timed (>= min_time_ms / reps).

    The minimum, not the median: on a shared machine load only ever adds time, and a table point
    should hold the op's own cost.  One warm-up call, one timed call to size the samples, then
    ``timeit.Timer.repeat(reps, number=inner)`` (the standard library's timer, garbage collector
    paused while timing).  ``torch.utils.benchmark.Timer`` is that ``timeit.Timer`` plus what
    does not fit here: ``timeit(n)`` adds ``max(n // 100, 2)`` warm-up calls to each sample,
    which triples the cost of the slow ops a table is mostly made of (one call per sample);
    ``blocked_autorange`` sizes blocks for timer overhead and stops on elapsed time, leaving one
    or two samples of a 20 ms budget for the minimum; and its defaults pin torch to one thread.
    """
    fn()
    timer = timeit.Timer(fn, timer=time.perf_counter)
    one = max(timer.timeit(number=1) * 1e3, 1e-4)
    inner = max(1, int(min_time_ms / reps / one))
    return min(timer.repeat(repeat=reps, number=inner)) * 1e3 / inner


def _torch_op(family: str, dims: tuple[int, ...], device: str, threads: Optional[int]) -> Callable[[], None]:
    import torch.nn.functional as F

    if threads is not None:
        torch.set_num_threads(threads)
    g = torch.Generator().manual_seed(0)

    def r(*shape: int) -> torch.Tensor:
        return torch.randn(*shape, generator=g).to(device)

    if family == "linear":
        m, k, n = dims
        x, w, b = r(m, k), r(n, k), r(n)
        op = lambda: F.linear(x, w, b)  # noqa: E731
    elif family == "bmm":
        bt, m, k, n = dims
        a, c = r(bt, m, k), r(bt, k, n)
        op = lambda: torch.matmul(a, c)  # noqa: E731
    elif family == "sdpa":
        bt, lq, s, e, ev = dims
        q, kk, v = r(1, bt, lq, e), r(1, bt, s, e), r(1, bt, s, ev)
        op = lambda: F.scaled_dot_product_attention(q, kk, v)  # noqa: E731
    else:
        x = r(dims[0])
        op = lambda: F.gelu(x)  # noqa: E731
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)

    def run() -> None:
        with torch.inference_mode():
            op()
        sync()

    return run


def _ort_op(family: str, dims: tuple[int, ...], runtime: str, threads: Optional[int]) -> Callable[[], None]:
    import onnxruntime as ort
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    f32 = TensorProto.FLOAT

    def inp(name: str, shape: Sequence[int]) -> tuple:
        return helper.make_tensor_value_info(name, f32, list(shape)), rng.standard_normal(shape).astype(np.float32)

    inits = []
    if family == "linear":
        m, k, n = dims
        (xi, xv) = inp("x", (m, k))
        inits = [numpy_helper.from_array(rng.standard_normal((k, n)).astype(np.float32), "w"),
                 numpy_helper.from_array(rng.standard_normal(n).astype(np.float32), "b")]
        nodes = [helper.make_node("MatMul", ["x", "w"], ["t"]), helper.make_node("Add", ["t", "b"], ["y"])]
        ins, feed = [xi], {"x": xv}
    elif family == "bmm":
        bt, m, k, n = dims
        (ai, av), (ci, cv) = inp("a", (bt, m, k)), inp("c", (bt, k, n))
        nodes = [helper.make_node("MatMul", ["a", "c"], ["y"])]
        ins, feed = [ai, ci], {"a": av, "c": cv}
    elif family == "sdpa":
        bt, lq, s, e, ev = dims
        (qi, qv), (ki, kv), (vi, vv) = inp("q", (1, bt, lq, e)), inp("k", (1, bt, s, e)), inp("v", (1, bt, s, ev))
        inits = [numpy_helper.from_array(np.array(1.0 / math.sqrt(e), dtype=np.float32), "scale")]
        nodes = [
            helper.make_node("Transpose", ["k"], ["kt"], perm=[0, 1, 3, 2]),
            helper.make_node("MatMul", ["q", "kt"], ["s"]),
            helper.make_node("Mul", ["s", "scale"], ["ss"]),
            helper.make_node("Softmax", ["ss"], ["p"], axis=-1),
            helper.make_node("MatMul", ["p", "v"], ["y"]),
        ]
        ins, feed = [qi, ki, vi], {"q": qv, "k": kv, "v": vv}
    else:
        (xi, xv) = inp("x", (dims[0],))
        nodes = [helper.make_node("Mul", ["x", "x"], ["t"]), helper.make_node("Add", ["t", "x"], ["y"])]
        ins, feed = [xi], {"x": xv}
    out = helper.make_tensor_value_info("y", f32, None)
    model = helper.make_model(helper.make_graph(nodes, "op", ins, [out], inits),
                              opset_imports=[helper.make_opsetid("", 17)])
    model.ir_version = 8
    opts = ort.SessionOptions()
    if threads is not None:
        opts.intra_op_num_threads = threads
    providers = ["CUDAExecutionProvider", "CPUExecutionProvider"] if runtime == "ort-cuda" else ["CPUExecutionProvider"]
    sess = ort.InferenceSession(model.SerializeToString(), sess_options=opts, providers=providers)

    def run() -> None:
        sess.run(None, feed)

    return run
