"""Timing helpers: interleaved per-call samples (measure_latency) and table points (latency._time)."""
from __future__ import annotations

import time

from vitgraph.deploy.measure import measure_latency
from vitgraph.planning.latency import _time


def _sleeper(ms: float, log: list, name: str):
    def run() -> None:
        log.append(name)
        time.sleep(ms / 1e3)
    return run


def test_measure_latency_interleaves_one_sample_per_call():
    log: list = []
    fns = {k: _sleeper(0.0, log, k) for k in "abc"}
    stats = measure_latency(fns, warmup=1, reps=2, rounds=3)
    assert log == list("abc") + list("aabbcc") + list("bbccaa") + list("ccaabb")
    assert all(s.n == 6 for s in stats.values())


def test_measure_latency_medians_follow_cost():
    log: list = []
    stats = measure_latency({"short": _sleeper(2.0, log, "s"), "long": _sleeper(8.0, log, "l")},
                            warmup=1, reps=3, rounds=3)
    short, long = stats["short"], stats["long"]
    assert 2.0 <= short.p10_ms <= short.median_ms <= short.p90_ms
    assert 8.0 <= long.p10_ms <= long.median_ms <= long.p90_ms
    assert long.median_ms > short.median_ms


def test_table_time_is_per_call_minimum():
    log: list = []
    ms = _time(_sleeper(2.0, log, "x"), reps=3, min_time_ms=12.0)
    assert len(log) == 2 + 3  # warm-up, sizing call, 3 samples of one call (a call takes over half of 12 / 3 ms)
    assert ms >= 2.0
    fast = _time(_sleeper(1.0, [], "f"), reps=3, min_time_ms=6.0)
    slow = _time(_sleeper(5.0, [], "s"), reps=3, min_time_ms=6.0)
    assert 1.0 <= fast < slow and slow >= 5.0
