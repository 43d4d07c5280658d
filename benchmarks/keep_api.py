"""Which of each model's own methods its compressed model keeps, and what keeping them costs.

    python benchmarks/keep_api.py --list ../shared/models.txt
    python benchmarks/keep_api.py vit_small_patch16_224 hf:ViTForImageClassification

For every model (random weights): compress at a random plan keeping half of every qk/v/head/ffn
group and of the residual stream, and list the public tensor methods found, those kept, and for
each one left out the reason.  Every kept method is checked again here, on a second random input:
against the masked model under the block-kinds groups of the plan that are not normalised (whose
masking is exact), and
``forward_head(forward_features(x))`` against ``forward(x)`` where both exist.  Also the time of
``compress`` with and without ``keep_api``.  Writes benchmarks/results/keep_api.md.
"""
from __future__ import annotations

import argparse
import logging
import random
import sys
import time
import warnings

import torch

import vitgraph
from vitgraph.deploy.measure import format_table, write_results_md
from vitgraph.models import load_model, parse_model_args
from vitgraph.passes.exactness import exact_plan
from vitgraph.passes.keep_api import public_tensor_methods

sys.path.insert(0, str(__import__("pathlib").Path(__file__).resolve().parent))
from coverage import read_list  # noqa: E402

EXACT = ("qk", "v", "head", "ffn")


class _Reasons(logging.Handler):
    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.seen: dict[str, str] = {}

    def emit(self, record: logging.LogRecord) -> None:
        name, kind, msg = record.args[0], record.args[1], str(record.args[2])
        self.seen.setdefault(name, f"{kind}: {msg[:160]}")  # the first try's reason: on the forward's inputs


def _plan(an, kinds, seed: int):
    rng = random.Random(seed)
    plan = vitgraph.Plan.keep_all(an)
    for g in an.groups:
        if g.kind in kinds and g.size > 1:
            k = max(1, g.size // 2)
            if g.per_head:
                plan.keep(g.id, [sorted(rng.sample(range(g.size), k)) for _ in range(an.group(g.head_group).size)])
            else:
                plan.keep(g.id, sorted(rng.sample(range(g.size), k)))
    return plan


def _err(a, b) -> float:
    if isinstance(a, torch.Tensor):
        return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if a.shape == b.shape else float("inf")
    if isinstance(a, (tuple, list)):
        return max((_err(x, y) for x, y in zip(a, b)), default=0.0) if len(a) == len(b) else float("inf")
    if hasattr(a, "values"):
        return _err(list(a.values()), list(b.values()))
    return 0.0


def row(spec: str) -> dict:
    name, *model_args = spec.split()
    model, x = load_model(name, batch=1, model_args=parse_model_args(model_args))
    torch.manual_seed(1)
    x2 = torch.randn_like(x)
    an = vitgraph.analyze(model, x)
    found = public_tensor_methods(model)
    reasons = _Reasons()
    log = logging.getLogger("vitgraph.api")
    log.addHandler(reasons)
    log.setLevel(logging.DEBUG)
    # the block kinds' groups whose masking is exact (normalised widths are not)
    plan = exact_plan(an, _plan(an, EXACT, 0))
    try:
        t0 = time.perf_counter()
        exact = vitgraph.compress(model, plan, an)
        t_api = time.perf_counter() - t0
        t0 = time.perf_counter()
        vitgraph.compress(model, plan, an, keep_api=False)
        t_plain = time.perf_counter() - t0
        full = vitgraph.compress(model, _plan(an, EXACT + ("residual",), 0), an)
    finally:
        log.removeHandler(reasons)
    kept = [m for m in found if callable(getattr(exact, m, None))]
    masked = vitgraph.mask(model, plan, an)
    worst = 0.0
    with torch.no_grad():
        for m in kept:
            try:
                worst = max(worst, _err(getattr(exact, m)(x2), getattr(masked, m)(x2)))
            except Exception as e:  # noqa: BLE001 - a chained method reads features, not images
                if "forward_features" in kept and m == "forward_head":
                    worst = max(worst, _err(exact.forward_head(exact.forward_features(x2)),
                                            masked.forward_head(masked.forward_features(x2))))
                else:
                    reasons.seen.setdefault(m, f"(check skipped: {type(e).__name__})")
        compose = "-"
        if callable(getattr(full, "forward_features", None)) and callable(getattr(full, "forward_head", None)):
            compose = f"{_err(full.forward_head(full.forward_features(x2)), full(x2)):.1e}"
    left = {m: reasons.seen.get(m, "?") for m in found if m not in kept}
    return {"model": spec, "methods": len(found), "kept": ", ".join(kept) or "-",
            "masked err": f"{worst:.1e}", "head(features) vs forward": compose,
            "compress s (api / plain)": f"{t_api:.1f} / {t_plain:.1f}",
            "left out (reason)": "; ".join(f"{m} ({r})" for m, r in left.items()) or "-",
            "attrs": ", ".join(k for k in ("num_classes", "pretrained_cfg", "config") if hasattr(exact, k)) or "-"}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("models", nargs="*")
    ap.add_argument("--list")
    ap.add_argument("--name", default="keep_api")
    a = ap.parse_args(argv)
    specs = list(a.models) + (read_list(a.list) if a.list else [])
    warnings.filterwarnings("ignore")
    rows, bad = [], 0
    for spec in specs:
        try:
            r = row(spec)
        except Exception as e:  # noqa: BLE001 - one row per model, failures reported
            r = {"model": spec, "kept": f"FAILED: {type(e).__name__}: {str(e)[:120]}"}
            bad += 1
        else:
            bad += float(r["masked err"]) > 1e-4
        rows.append(r)
        print(r, flush=True)
    cmd = "python benchmarks/keep_api.py " + " ".join(argv if argv is not None else sys.argv[1:])
    write_results_md(a.name, "The model's own API on its compressed model", rows,
                     notes=f"Command: `{cmd}`\n\n{len(rows) - bad}/{len(rows)} models without a failure or a "
                           "masked error over 1e-4.  Methods are captured at their default options.")
    print(format_table(rows))
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
