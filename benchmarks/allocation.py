"""Allocation benchmark: accuracy at a FLOPs budget, before and after recovery, against Torch-Pruning.

    pip install -e ".[bench]"            # torch-pruning 1.6 (the peer), scikit-learn (digits)
    apt-get install -y dataset-fashion-mnist
    python benchmarks/allocation.py      # --datasets/--seeds/--fractions/--rows reduce it

For each dataset, seed and fraction of FLOPs removed, on the same trained dense model:

* ``vg-default``: ``vitgraph.prune`` at its defaults (kl scores on 16 batches of 32 images,
  allocation chosen by held-out loss after reconstruction, reconstruction), ``finetune_epochs=0``;
* ``vg-kl-norecon``: the same with ``reconstruct=False`` (the global kl plan, nothing refitted);
* ``vg-magnitude``: ``method="magnitude"`` with reconstruction;
* ``tp-{magnitude,taylor,hessian}-{global,uniform}``: Torch-Pruning 1.6 ``MetaPruner`` with that
  group importance, ``global_pruning`` True or False, head dims pruned, FLOPs matched by bisection
  (the models and the peer's setup of ``benchmarks/criteria.py``).

Top-1 before fine-tuning, after the short fine-tune (``--ft-steps`` steps of batch 64, CE + 0.2
KL from the dense model, the same for every pruned model) and, for ``--long-fractions``, after the
long one (``--long-ft-steps``, NViT's loss).  Mean and spread over seeds.  Writes
benchmarks/results/allocation.md; rows are kept under ``--cache`` so a rerun resumes.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import logging
import platform
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
import criteria as C  # noqa: E402  (the datasets, dense models, the peer and the fine-tunes)

import vitgraph  # noqa: E402

# name: (dataset, width, depth, heads, patch, epochs)
MODELS = {
    "fashion_mnist": ("fashion_mnist", 96, 4, 3, 4, 2),
    "digits": ("digits", 96, 4, 3, 2, 40),
    "fashion_mnist_192x8": ("fashion_mnist", 192, 8, 3, 7, 8),
}
# models trained once (to convergence, which takes too long to repeat per seed on a CPU): the seed
# then varies the calibration images and the fine-tunes' batch order, not the dense weights
ONE_DENSE = {"fashion_mnist_192x8"}
VG = ("vg-default", "vg-kl-norecon", "vg-magnitude")
TP = tuple(f"tp-{imp}-{mode}" for imp in ("magnitude", "taylor", "hessian") for mode in ("global", "uniform"))


def build(name: str) -> torch.nn.Module:
    import timm

    ds, width, depth, heads, patch, _ = MODELS[name]
    img = C.DATASETS[ds][0]
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=patch, in_chans=1, num_classes=10, embed_dim=width, depth=depth,
        num_heads=heads, mlp_ratio=4.0, drop_path_rate=0.0)


def dense_model(name: str, seed: int, x, y, cache: Path) -> torch.nn.Module:
    """The trained dense model (criteria.py's recipe at this model's shape), cached."""
    ds, width, depth, heads, patch, epochs = MODELS[name]
    seed = 0 if name in ONE_DENSE else seed
    if (width, depth, heads, patch, epochs) == (C.WIDTH, C.DEPTH, C.HEADS, *C.DATASETS[ds][1:3]):
        return C.dense_model(ds, seed, x, y, cache)  # criteria.py's own models (and cache)
    key = json.dumps([name, seed, MODELS[name], C.DATASETS[ds], len(x)])
    path = cache / f"alloc_{name}_s{seed}_{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt"
    model = build(name)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    saved = (C.build_model, C.DATASETS[ds])
    C.build_model = lambda _ds: build(name)  # criteria's training loop at this shape
    C.DATASETS[ds] = (*C.DATASETS[ds][:2], epochs, *C.DATASETS[ds][3:])
    try:
        model = C.train_dense(ds, seed, x, y)
    finally:
        C.build_model, C.DATASETS[ds] = saved
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


class VitgraphRows:
    """The vitgraph rows of one dense model: ``vitgraph.prune``'s steps at its defaults, the scores
    taken once (kl on 512 images in 16 batches of 32) and planned at every fraction.

    ``vitgraph.prune(..., finetune_epochs=0)`` runs the same functions with the same arguments
    (``score``, ``choose_plan`` or ``plan_to_target``, ``compress``, ``refit``); ``--check-prune``
    compares one cell against it.
    """

    def __init__(self, dense, xtr, ytr, order, x1) -> None:
        idx = order[:512]
        self.dense, self.x1 = dense, x1
        self.batches = [(xtr[idx[i:i + 32]], ytr[idx[i:i + 32]]) for i in range(0, len(idx), 32)]
        self.an = vitgraph.analyze(dense, x1)
        self.scores: dict = {}

    def model(self, row: str, fraction: float):
        from vitgraph.allocation import choose_plan
        from vitgraph.passes.reconstruct import refit

        method = "magnitude" if row == "vg-magnitude" else "kl"
        t0 = time.perf_counter()
        if method not in self.scores:
            self.scores[method] = vitgraph.score(self.dense, self.an, method,
                                                 data=None if method == "magnitude" else self.batches)
        opts = dict(round_to=8, normalize=method == "magnitude")
        if row == "vg-kl-norecon":
            plan = vitgraph.plan_to_target(self.an, self.scores[method], target="flops", fraction=1 - fraction, **opts)
        else:
            plan = choose_plan(self.dense, self.an, self.scores[method], "flops", 1 - fraction, self.batches, self.x1,
                               plan_options=opts)[0]
        slim = vitgraph.compress(self.dense, plan, self.an).eval()
        if row != "vg-kl-norecon":
            refit(slim, self.an, plan.selection(self.an), self.batches, progress=False)
        return slim, time.perf_counter() - t0

    def via_prune(self, fraction: float):
        """The same model from ``vitgraph.prune`` itself (for ``--check-prune``)."""
        r = vitgraph.prune(self.dense, self.batches, self.batches[:1], target=f"flops:{1 - fraction}",
                           finetune_epochs=0, measure=False, progress=False)
        return r.model.eval()


def run(name: str, seed: int, a, store: C.Store) -> None:
    from vitgraph.deploy.measure import count_flops

    ds = MODELS[name][0]
    xtr, ytr, xte, yte = C.load(ds)
    xte, yte = xte[:a.test_limit], yte[:a.test_limit]
    dense = dense_model(name, seed, xtr, ytr, a.cache)
    x1 = xte[:1]
    dense_flops = count_flops(dense, (x1,))
    base = dict(dataset=name, seed=seed, proxy=512)
    if not store.has(protocol="dense", fraction=0.0, criterion="dense", **base):
        acc = C.accuracy(dense, xte, yte)
        # the fine-tunes applied to the dense model itself: how much they move a model at its optimum
        after = C.accuracy(C.finetune_copy(dense, dense, xtr, ytr, a, seed), xte, yte) if a.ft_steps else None
        store.add(protocol="dense", fraction=0.0, criterion="dense", before=acc, after=after, long=None, flops=1.0,
                  score_s=0.0, **base)
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(100 + seed))
    px, py = xtr[order[:512]], ytr[order[:512]]
    peers: dict[str, C.TorchPruning] = {}
    vg = VitgraphRows(dense, xtr, ytr, order, x1)
    if a.check_prune and not store.has(protocol="check-prune", fraction=a.fractions[0], criterion="vg-default", **base):
        mine, theirs = vg.model("vg-default", a.fractions[0])[0], vg.via_prune(a.fractions[0])
        with torch.no_grad():
            diff = float((mine(xte[:256]) - theirs(xte[:256])).abs().max())
        store.add(protocol="check-prune", fraction=a.fractions[0], criterion="vg-default", before=C.accuracy(theirs, xte, yte),
                  after=None, long=None, flops=diff, score_s=0.0, **base)
    for fraction in a.fractions:
        for row in a.rows:
            if store.has(protocol="allocation", fraction=fraction, criterion=row, **base):
                continue
            t0 = time.perf_counter()
            if row in TP:
                _, imp, mode = row.split("-")
                if imp not in peers:
                    peers[imp] = C.TorchPruning(dense, imp, px, py, x1)
                peers[imp].global_pruning = mode == "global"
                slim = peers[imp].at_flops(1 - fraction, dense_flops)[0]
                seconds = time.perf_counter() - t0
            else:
                slim, seconds = vg.model(row, fraction)
            before = C.accuracy(slim, xte, yte)
            after = C.accuracy(C.finetune_copy(slim, dense, xtr, ytr, a, seed), xte, yte) if a.ft_steps else None
            long = (C.accuracy(C.finetune_copy(slim, dense, xtr, ytr, a, seed, long=True), xte, yte)
                    if fraction in a.long_fractions else None)
            store.add(protocol="allocation", fraction=fraction, criterion=row, before=before, after=after, long=long,
                      flops=count_flops(slim, (x1,)) / dense_flops, score_s=seconds, **base)


def _stat(vals: list) -> str:
    vals = [100 * v for v in vals if v is not None]
    if not vals:
        return "-"
    if len(vals) == 1:
        return f"{vals[0]:.1f} (n=1)"
    return f"{statistics.mean(vals):.1f} ± {statistics.stdev(vals):.1f} (n={len(vals)})"


def report(rows: list[dict], a, command: str) -> str:
    import onnxruntime
    import timm

    try:
        import torch_pruning as tp
        tpv = getattr(tp, "__version__", None) or __import__("importlib.metadata").metadata.version("torch-pruning")
    except ImportError:
        tpv = "absent"
    lines = [
        "# Allocation at a FLOPs budget: vitgraph prune's defaults vs Torch-Pruning",
        "",
        f"Date {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}; machine {platform.machine()}, "
        f"{torch.get_num_threads()} threads; python {platform.python_version()}, torch {torch.__version__}, "
        f"timm {timm.__version__}, onnxruntime {onnxruntime.__version__}, torch-pruning {tpv}; vitgraph at "
        f"{_commit()}.",
        "",
        f"Command: `{command}`",
        "",
        "Models (timm VisionTransformer, trained from scratch per seed unless marked once, cached): "
        + "; ".join(f"{n}: width {w}, depth {d}, {h} heads, patch {p}, {e} epochs"
                    + (" (trained once: the seed varies the calibration images and the fine-tunes)"
                       if n in ONE_DENSE else "")
                    for n, (_, w, d, h, p, e) in MODELS.items() if any(r["dataset"] == n for r in rows)) + ".",
        f"Test top-1 on the first {a.test_limit} test images; short fine-tune {a.ft_steps} steps of batch 64 "
        f"(lr {a.ft_lr}, CE + 0.2 KL from the dense model); "
        + (f"long fine-tune {a.long_ft_steps} steps (lr {a.long_ft_lr}, NViT's loss) at "
           f"{', '.join(f'{f:.0%}' for f in a.long_fractions)} removed. " if a.long_fractions
           else "long fine-tune: not run (--long-fractions). ") +
        "Every pruned model is fine-tuned the same way. `vg-default` is `vitgraph.prune(..., finetune_epochs=0)` at "
        "its defaults (kl on 512 images, allocation by held-out loss after reconstruction, reconstruction on); "
        "`vg-kl-norecon` turns reconstruction (and with it the allocation search) off; Torch-Pruning rows are "
        "MetaPruner with the group importance named, global or uniform (global_pruning=False), head dims pruned, "
        "FLOPs matched by bisection.",
        "",
    ]
    for name in dict.fromkeys(r["dataset"] for r in rows):
        dense = [r for r in rows if r["dataset"] == name and r["protocol"] == "dense"]
        tuned = [r["after"] for r in dense if r["after"] != r["before"]]  # (rows of older runs repeat before)
        lines += [f"## {name} (dense {_stat([r['before'] for r in dense])}"
                  + (f"; the dense model after the short fine-tune: {_stat(tuned)}" if tuned else "") + ")", "",
                  "| removed | method | FLOPs kept | before fine-tune | short fine-tune | long fine-tune |",
                  "|---|---|---:|---:|---:|---:|"]
        for f in sorted({r["fraction"] for r in rows if r["dataset"] == name and r["protocol"] != "dense"}):
            for crit in a.rows:
                sel = [r for r in rows if r["dataset"] == name and r["fraction"] == f and r["criterion"] == crit
                       and r["protocol"] == "allocation"]
                if not sel:
                    continue
                fl = statistics.mean(r["flops"] for r in sel)
                lines.append(f"| {f:.0%} | {crit} | {fl:.3f} | {_stat([r['before'] for r in sel])} | "
                             f"{_stat([r['after'] for r in sel])} | {_stat([r.get('long') for r in sel])} |")
        lines.append("")
    lines += ["## Checks (means over seeds)", ""] + checks(rows) + [""]
    same = [r for r in rows if r["protocol"] == "check-prune"]
    if same:
        lines += ["`vitgraph.prune(..., finetune_epochs=0)` itself against the `vg-default` row's steps (max |logit "
                  "difference| on 256 test images): " + "; ".join(f"{r['dataset']} s{r['seed']} {r['fraction']:.0%} "
                  f"removed {r['flops']:.2g} (top-1 {100 * r['before']:.1f})" for r in same), ""]
    return "\n".join(lines)


def checks(rows: list[dict]) -> list[str]:
    """vg-default against the best Torch-Pruning row, per model, fraction and stage."""
    out = []
    for name in dict.fromkeys(r["dataset"] for r in rows):
        for f in sorted({r["fraction"] for r in rows if r["dataset"] == name and r["protocol"] != "dense"}):
            for stage in ("before", "after", "long"):
                def mean(crit):
                    v = [r[stage] for r in rows if r["dataset"] == name and r["fraction"] == f
                         and r["criterion"] == crit and r.get(stage) is not None]
                    return statistics.mean(v) if v else None
                vg = mean("vg-default")
                if stage == "before" and vg is not None:
                    seeds = {r["seed"] for r in rows if r["dataset"] == name and r["fraction"] == f
                             and r["criterion"] == "vg-default"}
                    dense = statistics.mean(r["before"] for r in rows if r["dataset"] == name
                                            and r["protocol"] == "dense" and r["seed"] in seeds)
                    out.append(f"- {name}, {f:.0%} removed, no fine-tuning: vg-default {100 * vg:.1f} vs dense "
                               f"{100 * dense:.1f} (same seeds), cost {100 * (dense - vg):.1f} points: "
                               f"{'PASS' if dense - vg <= 0.02 else 'FAIL'} (<= 2)")
                peers = {c: mean(c) for c in TP}
                peers = {c: v for c, v in peers.items() if v is not None}
                if vg is None or not peers:
                    continue
                best = max(peers, key=peers.get)
                ok = vg > peers[best] if stage == "before" else vg >= peers[best]
                out.append(f"- {name}, {f:.0%} removed, {stage}: vg-default {100 * vg:.1f} vs best peer {best} "
                           f"{100 * peers[best]:.1f}: {'PASS' if ok else 'FAIL'}")
    return out


def _commit() -> str:
    import subprocess

    try:
        return subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True, text=True,
                              check=True).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--datasets", default="fashion_mnist,digits,fashion_mnist_192x8", help=",".join(MODELS))
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--fractions", default="0.3,0.5,0.7", help="fractions of FLOPs removed")
    ap.add_argument("--rows", default=",".join(VG + TP))
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--long-ft-steps", type=int, default=400)
    ap.add_argument("--long-ft-lr", type=float, default=1e-4)
    ap.add_argument("--long-fractions", default="", help="fractions removed that also get the long fine-tune")
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--cache", type=Path, default=Path("/tmp/vitgraph_criteria"))
    ap.add_argument("--tag", default="run")
    ap.add_argument("--name", default="allocation")
    ap.add_argument("--report-only", action="store_true")
    ap.add_argument("--check-prune", action="store_true",
                    help="also run vitgraph.prune itself at the first fraction and record its max output difference")
    a = ap.parse_args(argv)
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.fractions = [float(f) for f in a.fractions.split(",")]
    a.long_fractions = [float(f) for f in a.long_fractions.split(",") if f]
    a.rows = a.rows.split(",")
    warnings.filterwarnings("ignore")
    logging.getLogger("vitgraph").setLevel(logging.WARNING)
    a.cache.mkdir(parents=True, exist_ok=True)
    store = C.Store(a.cache / f"{a.name}_{a.tag}.jsonl")
    if not a.report_only:
        for name in a.datasets.split(","):
            for seed in a.seeds:
                run(name, seed, a, store)
    command = "python benchmarks/allocation.py " + " ".join(argv if argv is not None else sys.argv[1:])
    text = report(store.rows, a, command)
    out = HERE / "results" / f"{a.name}.md"
    out.write_text(text)
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
