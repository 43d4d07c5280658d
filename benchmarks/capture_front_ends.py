"""Which capture front end for models symbolic tracing cannot follow: meta-value proxies at the
root (what vitgraph uses) against ``torch.export`` (non-strict, dynamic batch), measured.

    python benchmarks/capture_front_ends.py [--list benchmarks/hf_models.txt] [--reps 3]

For every model of the list (``hf:<class> KEY=VALUE ...`` lines, as ``coverage.py`` reads them):

* meta-value proxies: ``vitgraph.analyze`` end to end (capture, lowering, shape propagation and
  the whole analysis), its front end, and how many of the graph's call nodes have a declaration
  in vitgraph's op registry (unknown ops freeze channels);
* ``torch.export``: the capture alone (``torch.export.export(model, (x,), strict=False)`` with the
  batch dim dynamic), whether it succeeds, and how many of its ATen call nodes the op registry
  knows: those are the ops a second copy of the rules would have to declare before this graph
  could be analysed at all.

Times are medians of ``--reps`` runs after one warm-up, on random weights at batch 2.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

import vitgraph  # noqa: E402
from coverage import read_list  # noqa: E402
from vitgraph.analysis.ops import lookup_op  # noqa: E402
from vitgraph.deploy.measure import format_table, write_results_md  # noqa: E402
from vitgraph.models import load_model, parse_model_args  # noqa: E402


def _median_time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _known(gm: torch.fx.GraphModule) -> tuple[int, int]:
    calls = [n for n in gm.graph.nodes if n.op in ("call_function", "call_method", "call_module")]
    return sum(lookup_op(gm, n) is not None for n in calls), len(calls)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--list", default=str(Path(__file__).resolve().parent / "hf_models.txt"))
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    rows = []
    for line in read_list(a.list):
        spec, *args = line.split()
        model, x = load_model(spec, batch=2, model_args=parse_model_args(args))
        row = {"model": spec.removeprefix("hf:")}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            an = vitgraph.analyze(model, x)
            known, calls = _known(an.graph_module)
            row["meta-proxy analyze s"] = f"{_median_time(lambda: vitgraph.analyze(model, x), a.reps):.2f}"
            row["front end"] = an.front_end
            row["ops known"] = f"{known}/{calls}"
            row["groups"] = len(an.groups)
            batch = torch.export.Dim("batch", min=1, max=1024)
            try:
                ep = torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False)
                seconds = _median_time(lambda: torch.export.export(model, (x,), dynamic_shapes=({0: batch},), strict=False),
                                       a.reps)
                row["torch.export capture s"] = f"{seconds:.2f}"
                known, calls = _known(ep.graph_module)
                row["ATen ops known"] = f"{known}/{calls}"
            except Exception as e:  # noqa: BLE001 - a failed capture is a result
                row["torch.export capture s"] = f"fails: {type(e).__name__}"
                row["ATen ops known"] = "-"
        print("  ".join(f"{k}={v}" for k, v in row.items()), flush=True)
        rows.append(row)
    print()
    print(format_table(rows))
    notes = (
        "meta-proxy analyze s: the whole `vitgraph.analyze` (capture + analysis); torch.export capture s: "
        "the capture alone. ops known: call nodes with a declaration in vitgraph's op registry. An ATen graph "
        "from torch.export would need every one of its ops declared again (a second copy of the rules) before "
        "it could be analysed, while the meta-value proxies give graphs of the torch-level ops the registry "
        "already declares; so vitgraph captures with meta-value proxies and keeps torch.export out of the "
        "analysis.\n\nCommand: `python benchmarks/capture_front_ends.py "
        + " ".join(argv if argv is not None else sys.argv[1:]) + "`"
    )
    print("wrote", write_results_md("capture_front_ends", "Capture front ends for transformers models", rows, notes))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
