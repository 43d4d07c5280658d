"""Does WDPruning's learned allocation (``threshold``) hold up against kl at 50% of the FLOPs removed?

    python benchmarks/threshold_check.py                      # Fashion-MNIST and digits, seeds 0 and 1
    python benchmarks/threshold_check.py --datasets digits --seeds 0

The allocation protocol of ``benchmarks/criteria.py`` (its small ViTs, width 96, depth 4, trained and
cached under ``--cache``; its proxy sets; its short fine-tune), restricted to the question of issue 20
item 4:

* ``kl``: ``vitgraph.score(model, an, "kl", data=proxy)`` + ``vitgraph.plan_to_target(an, s,
  target="flops", fraction=1 - f, mode="global", normalize=False, unit=criteria.UNIT)`` (criteria.md's
  allocation plan; kl scores compare across kinds, so they are not normalised per group);
* ``tp-magnitude``: Torch-Pruning 1.6's group magnitude at the same FLOPs, as criteria.py runs it (the
  best criterion after the short fine-tune at 50% on Fashion-MNIST in criteria.md);
* ``threshold``: ``vitgraph.score(model, an, "threshold", data=proxy, target=1 - f, budget="flops")``
  + ``Plan.from_scores(an, s, ratio=None)`` (the learned widths), the model's weights untouched;
* ``threshold-weights``: the same with ``train_weights=True`` (WDPruning trains the weights with the
  masks); the slim model takes the trained weights, so its before-fine-tune accuracy includes them;
* ``threshold-depth``: WDPruning's depth side, then its width side: a shallow classifier (LayerNorm +
  Linear on the class token) after block ``--exit-block`` trained ``--exit-steps`` steps on the proxy
  set (backbone frozen), the model truncated there (later blocks dropped), then thresholds toward the
  FLOPs left to reach 1 - f of the dense model's;
* ``old-threshold-widths`` / ``old-threshold-p2t``: the pass as it was at commit 9fd7be7 (read from
  git) with the settings criteria.md used (100 steps): its learned widths, and
  ``plan_to_target(mode="global")`` on its scores (criteria.md's ``threshold`` row).

Accuracy before and after the same short fine-tune (``criteria.finetune_copy``: 40 steps of batch 64,
CE + 0.2 KL from the dense model).  Writes benchmarks/results/threshold_check.md.
"""
from __future__ import annotations

import argparse
import copy
import importlib.util
import json
import statistics
import subprocess
import sys
import time
import warnings
from pathlib import Path

import torch

import vitgraph
from vitgraph.data import EpochLoader, batches

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import criteria as C  # noqa: E402

OLD_COMMIT = "9fd7be7"
CRITERIA = ("kl", "tp-magnitude", "threshold", "threshold-weights", "threshold-depth",
            "old-threshold-widths", "old-threshold-p2t")


def old_threshold_module():
    """``passes/threshold.py`` as it was at ``OLD_COMMIT``, imported under another name."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:passes/threshold.py"], cwd=HERE.parent, check=True,
                         capture_output=True, text=True).stdout
    path = Path("/tmp") / f"vitgraph_threshold_{OLD_COMMIT}.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location(f"vitgraph_threshold_{OLD_COMMIT}", path)
    mod = importlib.util.module_from_spec(spec)
    sys.modules[spec.name] = mod  # (dataclasses look their module up)
    spec.loader.exec_module(mod)
    return mod


def slim_models(method: str, dense, an, px, py, fraction: float, a, seed: int) -> dict:
    """criterion -> (slim model, scoring seconds, extra info)."""
    t0 = time.perf_counter()
    if method == "kl":
        s = vitgraph.score(dense, an, "kl", data=batches(px, None, 64), mode="approx", chunk=64)
        plan = C.allocation_plan(an, s, fraction, False)  # criteria.md's: global, normalize=False, its units
        return {"kl": (vitgraph.compress(dense, plan, an), time.perf_counter() - t0, {})}
    if method in ("threshold", "threshold-weights"):
        train = method == "threshold-weights"
        s = vitgraph.score(dense, an, "threshold", data=EpochLoader(px, py, 64, seed=seed), target=1 - fraction,
                           budget="flops", steps=a.threshold_steps, log_every=0, train_weights=train)
        res = s.info["result"]
        sec = time.perf_counter() - t0
        plan = vitgraph.Plan.from_scores(an, s, ratio=None)
        model = dense
        if train:
            model = copy.deepcopy(dense)
            missing, unexpected = model.load_state_dict(res.weights, strict=False)
            if unexpected or [k for k in missing if k in dict(model.named_parameters())]:
                raise RuntimeError(f"trained weights do not match the model: {missing} {unexpected}")
            an = vitgraph.analyze(model, px[:1])
        return {method: (vitgraph.compress(model, plan, an), sec,
                         {"learned_budget": res.learned_budget, "budget": res.budget})}
    if method == "tp-magnitude":  # the peer, as criteria.py runs it: MetaPruner, FLOPs matched by bisection
        from vitgraph.deploy.measure import count_flops

        x1 = px[:1]
        slim, _ = C.TorchPruning(dense, "magnitude", px, py, x1).at_flops(1 - fraction, count_flops(dense, (x1,)))
        return {method: (slim, time.perf_counter() - t0, {})}
    if method == "threshold-depth":
        from vitgraph.deploy.measure import count_flops
        from vitgraph.passes.depth import add_exits, train_exits, truncate

        x1 = px[:1]
        em = add_exits(dense, an, [a.exit_block], num_classes=10)
        train_exits(em, EpochLoader(px, py, 64, seed=seed), steps=a.exit_steps, lr=1e-3, log_every=0)
        short = truncate(em.eval(), a.exit_block)
        kept = count_flops(short, (x1,)) / count_flops(dense, (x1,))
        an2 = vitgraph.analyze(short, x1)
        s = vitgraph.score(short, an2, "threshold", data=EpochLoader(px, py, 64, seed=seed),
                           target=min(1.0, (1 - fraction) / kept), budget="flops", steps=a.threshold_steps, log_every=0)
        plan = vitgraph.Plan.from_scores(an2, s, ratio=None)
        return {method: (vitgraph.compress(short, plan, an2), time.perf_counter() - t0, {"exit_flops": kept})}
    if method == "old":
        old = a.old_module
        res = old.learn_thresholds(dense, an, EpochLoader(px, py, 64, seed=seed), target=1 - fraction,
                                   budget="flops", steps=100, log_every=0)
        sec = time.perf_counter() - t0
        from vitgraph.scoring import Scores

        s = Scores(dict(res.scores), "threshold", keep=dict(res.keep))
        widths = vitgraph.Plan.from_scores(an, s, ratio=None)
        p2t = C.allocation_plan(an, s, fraction, False)
        return {"old-threshold-widths": (vitgraph.compress(dense, widths, an), sec, {"budget": res.budget}),
                "old-threshold-p2t": (vitgraph.compress(dense, p2t, an), sec, {})}
    raise ValueError(method)


def run(name: str, seed: int, a, store: list, path: Path) -> None:
    from vitgraph.deploy.measure import count_flops

    xtr, ytr, xte, yte = C.load(name)
    xte, yte = xte[:a.test_limit], yte[:a.test_limit]
    dense = C.dense_model(name, seed, xtr, ytr, a.cache)
    x1 = xte[:1]
    an = vitgraph.analyze(dense, x1)
    dense_flops = count_flops(dense, (x1,))
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(100 + seed))
    n = min(a.proxy, len(xtr))
    px, py = xtr[order[:n]], ytr[order[:n]]
    have = {(r["dataset"], r["seed"], r["criterion"]) for r in store}
    if (name, seed, "dense") not in have:
        add(store, path, dict(dataset=name, seed=seed, criterion="dense", before=C.accuracy(dense, xte, yte),
                              after=None, flops=1.0, score_s=0.0))
    methods = []
    for c in a.criteria:
        m = "old" if c.startswith("old-") else c
        if m not in methods:
            methods.append(m)
    for m in methods:
        wanted = [c for c in a.criteria if (c.startswith("old-") if m == "old" else c == m)]
        if all((name, seed, c) in have for c in wanted):
            continue
        for crit, (slim, sec, info) in slim_models(m, dense, an, px, py, a.fraction, a, seed).items():
            if crit not in wanted:
                continue
            before = C.accuracy(slim, xte, yte)
            after = C.accuracy(C.finetune_copy(slim, dense, xtr, ytr, a, seed), xte, yte) if a.ft_steps else None
            add(store, path, dict(dataset=name, seed=seed, criterion=crit, before=before, after=after,
                                  flops=count_flops(slim, (x1,)) / dense_flops, score_s=sec, **info))


def add(store: list, path: Path, row: dict) -> None:
    row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
    store.append(row)
    with path.open("a") as f:
        f.write(json.dumps(row) + "\n")
    after = "-" if row["after"] is None else f"{row['after']:.4f}"
    print(f"  {row['dataset']} s{row['seed']} {row['criterion']:<22} before {row['before']:.4f} after {after} "
          f"flops {row['flops']:.3f} ({row['score_s']:.1f} s)", flush=True)


def _stat(vals: list) -> str:
    vals = [v for v in vals if v is not None]
    if not vals:
        return "-"
    m = 100 * statistics.mean(vals)
    return f"{m:.1f}" if len(vals) == 1 else f"{m:.1f} ± {100 * statistics.stdev(vals):.1f}"


def report(store: list, a, command: str, seconds: float) -> Path:
    from vitgraph.deploy.measure import write_results_md

    rows, checks = [], []
    for name in a.datasets:
        sel = [r for r in store if r["dataset"] == name and r["seed"] in a.seeds]
        if not sel:
            continue
        seeds = sorted({r["seed"] for r in sel})
        for crit in ("dense",) + tuple(c for c in CRITERIA if c in a.criteria):
            rs = [r for r in sel if r["criterion"] == crit]
            if not rs:
                continue
            per_seed = ", ".join(f"s{r['seed']}: {100 * r['before']:.1f}/"
                                 + ("-" if r["after"] is None else f"{100 * r['after']:.1f}") for r in rs)
            rows.append({"dataset": name, "criterion": crit, "seeds": len(rs), "before FT": _stat([r["before"] for r in rs]),
                         "after FT": _stat([r["after"] for r in rs]) if crit != "dense" else "-",
                         "FLOPs kept": f"{min(r['flops'] for r in rs):.3f}-{max(r['flops'] for r in rs):.3f}",
                         "score s": f"{statistics.median(r['score_s'] for r in rs):.0f}" if crit != "dense" else "-",
                         "before calibration": (f"{min(r['learned_budget'] for r in rs):.3f}-"
                                                f"{max(r['learned_budget'] for r in rs):.3f}")
                         if all(r.get("learned_budget") is not None for r in rs) else "-",
                         "per seed (before/after)": per_seed})
        mean = lambda crit, k: statistics.mean(r[k] for r in sel if r["criterion"] == crit)  # noqa: E731
        done = {c for c in a.criteria if sum(r["criterion"] == c for r in sel) == len(seeds)}
        rivals = [c for c in done if c in ("kl", "tp-magnitude")]
        for c in ("threshold", "threshold-weights"):
            if c in done and rivals and a.ft_steps:
                best = max(rivals, key=lambda r: mean(r, "after"))
                gap = 100 * (mean(c, "after") - mean(best, "after"))
                checks.append(f"- {name}, seeds {seeds}: {c} after the fine-tune {100 * mean(c, 'after'):.1f} vs "
                              f"{best} {100 * mean(best, 'after'):.1f} ({gap:+.1f} points): "
                              + ("within 1 point" if gap >= -1.0 else "NOT within 1 point")
                              + f"; before the fine-tune {100 * mean(c, 'before'):.1f} vs {100 * mean(best, 'before'):.1f}")
    notes = ((f"{a.note}\n\n" if a.note else
              f"Command: `{command}` ({seconds / 60:.0f} min for what this invocation ran, 1 thread on a shared 2-core "
              f"machine; rows accumulate in {a.store} across invocations).\n\n")
             + f"{int(100 * a.fraction)}% of the FLOPs removed. Cells: test accuracy in percent (the first {a.test_limit} "
             "test images; digits has 500), mean ± sample std over seeds; 'per seed' gives before/after. Proxy set: the first "
             f"{a.proxy} images of the seed's shuffle of the training set (criteria.py's), batches of 64. "
             f"threshold: {a.threshold_steps} steps (library defaults otherwise: distillation weight 1, theta_lr 0.01, "
             "lambda_lr 0.1, cubic target schedule over half the steps, calibration on). "
             f"old-*: the pass at commit {OLD_COMMIT} with criteria.md's settings (100 steps, lr 0.05, lambda_lr 1, "
             "sigmoid thresholds, no distillation); old-threshold-p2t = `plan_to_target(mode='global', "
             "normalize=False)` on its scores, criteria.md's `threshold` row. Fine-tune: criteria.finetune_copy, "
             f"{a.ft_steps} steps of batch 64, AdamW lr {a.ft_lr}, cosine, CE + 0.2 KL from the dense model. "
             "tp-magnitude: criteria.TorchPruning (MetaPruner, global, head dims, FLOPs bisected to <= the target). "
             "kl: `plan_to_target(target='flops', fraction=1-f, mode='global', normalize=False, unit=criteria.UNIT)`. "
             f"threshold-depth: exit after block {a.exit_block}, {a.exit_steps} exit steps (AdamW lr 1e-3, CE), then "
             "the thresholds on the truncated model (its own unmasked output as the distillation teacher). "
             "'before calibration': the FLOPs the learned thresholds gave before the final common shift. "
             "'score s': wall seconds to score (medians; the machine was shared, so only rough).\n\n"
             "## Done-when check (computed from the rows)\n\n" + ("\n".join(checks) or "- (incomplete)") + "\n")
    return write_results_md(a.name, "WDPruning thresholds vs kl at 50% of the FLOPs removed", rows, notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="fashion_mnist,digits")
    ap.add_argument("--seeds", default="0,1")
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--fraction", type=float, default=0.5, help="fraction of the FLOPs removed")
    ap.add_argument("--proxy", type=int, default=2048)
    ap.add_argument("--threshold-steps", type=int, default=200)
    ap.add_argument("--exit-block", type=int, default=-2, help="threshold-depth: the block the exit follows")
    ap.add_argument("--exit-steps", type=int, default=200, help="threshold-depth: steps training the exit head")
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--test-limit", type=int, default=1000)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/vitgraph_criteria"))
    ap.add_argument("--store", type=Path, default=None, help="jsonl of rows (default: under --cache)")
    ap.add_argument("--name", default="threshold_check")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--note", default="", help="how the rows were made, in place of the command line")
    a = ap.parse_args(argv)
    a.datasets = a.datasets.split(",")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.criteria = a.criteria.split(",")
    a.long_ft_lr, a.long_ft_steps = 1e-4, 0  # (finetune_copy reads them; the long fine-tune is not run here)
    a.store = a.store or a.cache / f"{a.name}.jsonl"
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    a.cache.mkdir(parents=True, exist_ok=True)
    store = [json.loads(line) for line in a.store.read_text().splitlines() if line.strip()] if a.store.exists() else []
    if any(c.startswith("old-") for c in a.criteria):
        a.old_module = old_threshold_module()
    t0 = time.perf_counter()
    if not a.report_only:
        for name in a.datasets:
            for seed in a.seeds:
                print(f"{name} seed {seed}", flush=True)
                run(name, seed, a, store, a.store)
    command = "python benchmarks/threshold_check.py " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"wrote {report(store, a, command.strip(), time.perf_counter() - t0)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
