"""Real-data benchmark: prune a small DeiT-style ViT trained on Fashion-MNIST with each criterion.

    apt-get update && apt-get install -y dataset-fashion-mnist    # the data (Debian package)
    pip install -e ".[bench]"                                      # matplotlib, for the width plot
    python benchmarks/fashion_mnist.py

Trains the dense model once (cached in benchmarks/cache/), then for each criterion (magnitude,
hessian, kl, threshold) scores the model, plans to ``--flops`` of its FLOPs, compresses, and
reports test accuracy before and after a fixed short fine-tune (UP-ViT's CE + alpha * KL from the
dense model), params, FLOPs and onnxruntime latency.  Magnitude is planned with one ratio for every
group (its scores do not compare across kinds); hessian and kl are ranked globally (NViT);
threshold learns its widths (WDPruning).  Writes benchmarks/results/fashion_mnist.md and
benchmarks/results/fashion_mnist_widths.png (kept widths per block, per criterion).
"""
from __future__ import annotations

import argparse
import copy
import hashlib
import json
import logging
import sys
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F

import vitgraph
from vitgraph.data import INSTALL_HINT, EpochLoader, batches, load_fashion_mnist
from vitgraph.deploy.measure import count_flops, count_params, format_table, measure_latency, ort_runner, write_results_md
from vitgraph.passes.recovery import finetune
from vitgraph.passes.threshold import learn_thresholds

HERE = Path(__file__).resolve().parent
CACHE = HERE / "cache"
RESULTS = HERE / "results"
MODEL_CFG = dict(img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=64, depth=4, num_heads=4,
                 mlp_ratio=4.0, drop_path_rate=0.0)
CRITERIA = ("magnitude", "hessian", "kl", "threshold")
UNIT = {"residual": 8, "head": 1, "qk": 4, "v": 4, "ffn": 16}


def build_model() -> torch.nn.Module:
    """The DeiT-style ViT of this benchmark (timm VisionTransformer, 7x7 patches of 4x4 pixels)."""
    import timm

    return timm.models.vision_transformer.VisionTransformer(**MODEL_CFG)


def augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and +-2 pixel shift."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(F.pad(x, (2, 2, 2, 2)), (dy, dx), dims=(-2, -1))[..., 2:-2, 2:-2]


def train_dense(x: torch.Tensor, y: torch.Tensor, epochs: int, bs: int = 128, lr: float = 2e-3) -> torch.nn.Module:
    """Train the dense model from scratch (AdamW, warm-up + cosine, flips and shifts)."""
    torch.manual_seed(0)
    model = build_model()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(x) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    model.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        for xb, yb in batches(x, y, bs, shuffle=True, seed=ep):
            loss = F.cross_entropy(model(augment(xb, gen)), yb, label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {ep + 1}/{epochs}: loss {loss.item():.3f} ({time.perf_counter() - t0:.0f} s)", flush=True)
    return model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    """Top-1 accuracy in percent."""
    model.eval()
    hits = sum((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum().item() for i in range(0, len(x), bs))
    return 100.0 * hits / len(x)


def dense_model(x: torch.Tensor, y: torch.Tensor, epochs: int) -> torch.nn.Module:
    """The trained dense model, from the cache when its config, data size and epochs match."""
    key = hashlib.sha256(json.dumps([MODEL_CFG, epochs, len(x), torch.__version__.split("+")[0]]).encode()).hexdigest()[:12]
    path = CACHE / f"fmnist_vit_{key}.pt"
    model = build_model()
    if path.exists():
        model.load_state_dict(torch.load(path))
        print(f"dense model from cache {path}")
        return model.eval()
    print(f"training the dense model ({epochs} epochs); cached as {path}")
    model = train_dense(x, y, epochs)
    CACHE.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


def make_plan(method: str, model, an, proxy, fraction: float, a) -> tuple[vitgraph.Plan, float]:
    """Score with ``method`` and plan to ``fraction`` of the FLOPs; returns the plan and scoring seconds."""
    t0 = time.perf_counter()
    if method == "threshold":
        res = learn_thresholds(model, an, EpochLoader(*proxy, 64), target=fraction, budget="flops",
                               steps=a.threshold_steps, log_every=0)
        seconds = time.perf_counter() - t0
        return res.plan(an), seconds
    data = batches(*proxy, 64)
    if method == "magnitude":
        s = vitgraph.score(model, an, "magnitude")
    elif method == "hessian":
        s = vitgraph.score(model, an, "hessian", data=data)
    else:
        kl_data = batches(proxy[0][:a.kl_proxy], None, 64)
        s = vitgraph.score(model, an, "kl", data=kl_data, mode="approx", chunk=64, samples=a.kl_samples,
                           max_exact_classes=0)
    seconds = time.perf_counter() - t0
    mode = "uniform" if method == "magnitude" else "global"
    plan = vitgraph.plan_to_target(an, s, target="flops", fraction=fraction, mode=mode, unit=UNIT,
                                   normalize=method == "magnitude")
    return plan, seconds


def block_widths(an, plan: vitgraph.Plan) -> dict[str, list[int]]:
    """Kept heads x qk dims, heads x v dims and FFN width per block, in block order."""
    out: dict[str, list[int]] = {"qk": [], "v": [], "ffn": [], "residual": []}
    for g in an.groups:
        keep = plan.kept.get(g.id)
        n = g.size if keep is None else (len(keep[0]) if keep and isinstance(keep[0], list) else len(keep))
        if g.kind in ("qk", "v"):
            h = an.group(g.head_group) if g.head_group else None
            hk = plan.kept.get(h.id) if h else None
            heads = (len(hk) if hk is not None else h.size) if h else 1
            out[g.kind].append(heads * n)
        elif g.kind in ("ffn", "residual"):
            out[g.kind].append(n)
    return out


def plot_widths(widths: dict[str, dict[str, list[int]]], dense: dict[str, list[int]], path: Path) -> bool:
    """Bars of kept widths per block (NViT's parameter-distribution figure); False without matplotlib."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is missing: pip install -e '.[bench]' for the width plot")
        return False
    kinds = ("qk", "v", "ffn")
    fig, axes = plt.subplots(1, len(kinds), figsize=(13, 3.6))
    n = len(dense["ffn"])
    bw = 0.8 / (len(widths) + 1)
    for ax, kind in zip(axes, kinds):
        ax.bar([i - 0.4 + bw / 2 for i in range(n)], dense[kind], bw, label="dense", color="lightgrey")
        for j, (m, w) in enumerate(widths.items(), 1):
            ax.bar([i - 0.4 + bw / 2 + j * bw for i in range(n)], w[kind], bw, label=m)
        ax.set_title(f"{kind} width kept per block")
        ax.set_xlabel("block")
        ax.set_xticks(range(n))
    axes[0].legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return True


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--epochs", type=int, default=15, help="dense training epochs")
    ap.add_argument("--train-limit", type=int, help="use only this many training images (smoke runs)")
    ap.add_argument("--flops", type=float, default=0.5, help="fraction of the dense FLOPs to keep")
    ap.add_argument("--proxy", type=int, default=2048, help="proxy/scoring images from the training set")
    ap.add_argument("--kl-proxy", type=int, default=1024, help="images of the proxy set used by kl")
    ap.add_argument("--kl-samples", type=int, default=2, help="label draws per image for approximate kl")
    ap.add_argument("--ft-epochs", type=float, default=1.0, help="fine-tuning epochs over the training set")
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--threshold-steps", type=int, default=300)
    ap.add_argument("--criteria", default=",".join(CRITERIA))
    ap.add_argument("--threads", type=int, help="torch intra-op threads (default: torch's choice)")
    ap.add_argument("--name", default="fashion_mnist")
    a = ap.parse_args(argv)
    if a.threads:
        torch.set_num_threads(a.threads)
    logging.basicConfig(level=logging.WARNING)
    try:
        xtr, ytr = load_fashion_mnist("train", limit=a.train_limit)
        xte, yte = load_fashion_mnist("test")
    except FileNotFoundError as e:
        print(f"{e}\n(run: {INSTALL_HINT})", file=sys.stderr)
        return 2
    torch.manual_seed(0)
    dense = dense_model(xtr, ytr, a.epochs)
    dense_acc = accuracy(dense, xte, yte)
    x1 = xte[:1]
    an = vitgraph.analyze(dense, x1)
    dense_flops, dense_params = count_flops(dense, (x1,)), count_params(dense)
    print(f"dense: {dense_acc:.2f}% test accuracy, {dense_params / 1e6:.3f} M params, {dense_flops / 1e6:.1f} MFLOPs")
    g = torch.Generator().manual_seed(1)
    pick = torch.randperm(len(xtr), generator=g)[:a.proxy]
    proxy = (xtr[pick], ytr[pick])
    ft_steps = int(a.ft_epochs * -(-len(xtr) // 128))
    xb8 = xte[:8]
    rows, widths, models = [], {}, {"dense": dense}
    rows.append({"criterion": "dense", "score s": "-", "FLOPs": f"{dense_flops / 1e6:.1f}M", "FLOPs ratio": 1.0,
                 "params": f"{dense_params / 1e6:.3f}M", "acc before FT": round(dense_acc, 2),
                 "acc after FT": round(dense_acc, 2)})
    for method in a.criteria.split(","):
        print(f"{method}: scoring and planning ...", flush=True)
        plan, seconds = make_plan(method, dense, an, proxy, a.flops, a)
        slim = vitgraph.compress(dense, plan, an)
        before = accuracy(slim, xte, yte)
        log = finetune(slim, EpochLoader(xtr, ytr, 128, seed=7), teacher=dense, loss="upvit", alpha=0.2,
                       lr=a.ft_lr, max_steps=ft_steps, log_every=0)
        after = accuracy(slim, xte, yte)
        flops, params = count_flops(slim, (x1,)), count_params(slim)
        widths[method] = block_widths(an, plan)
        models[method] = slim
        print(f"  {method}: {flops / dense_flops:.3f} of FLOPs, {before:.2f}% before FT, {after:.2f}% after "
              f"({log.steps} steps, {log.seconds:.0f} s)", flush=True)
        rows.append({"criterion": method, "score s": round(seconds, 1), "FLOPs": f"{flops / 1e6:.1f}M",
                     "FLOPs ratio": round(flops / dense_flops, 3), "params": f"{params / 1e6:.3f}M",
                     "acc before FT": round(before, 2), "acc after FT": round(after, 2)})
    lat = _ort_latency(models, xb8)
    for r in rows:
        r["ORT ms (b8)"] = round(lat[r["criterion"]], 3)
        r["speedup"] = round(lat["dense"] / lat[r["criterion"]], 2)
    print(format_table(rows))
    RESULTS.mkdir(parents=True, exist_ok=True)
    png = RESULTS / f"{a.name}_widths.png"
    plotted = plot_widths(widths, block_widths(an, vitgraph.Plan.keep_all(an)), png)
    notes = (
        f"Command: `python benchmarks/fashion_mnist.py --epochs {a.epochs} --flops {a.flops} --proxy {a.proxy} "
        f"--kl-proxy {a.kl_proxy} --kl-samples {a.kl_samples} --ft-epochs {a.ft_epochs} "
        f"--threshold-steps {a.threshold_steps}" + (f" --threads {a.threads}" if a.threads else "") + "`.\n\n"
        f"Model: timm VisionTransformer {MODEL_CFG}, trained {a.epochs} epochs from scratch (AdamW, one-cycle, "
        "flips and shifts, label smoothing 0.1). Test accuracy on the 10,000 test images. Scores on "
        f"{a.proxy} training images (kl: the first {a.kl_proxy}, {a.kl_samples} label draws each); every criterion "
        f"planned to {a.flops} of the dense FLOPs over residual, head, qk, v "
        f"and ffn groups (units {UNIT}). Fine-tune: {ft_steps} steps of batch 128 (AdamW lr {a.ft_lr}, cosine), "
        "CE + 0.2 KL from the dense model. Latency: onnxruntime CPU, batch 8, median of interleaved runs.\n\n"
        "Caveats: the residual width (64) is at the planner's default minimum, so no criterion prunes it here. "
        f"threshold trains its masks (not the weights) for {a.threshold_steps} steps on the proxy set, so its "
        "'before FT' accuracy already includes that training; the other criteria only score.\n"
        + (f"\nKept widths per block: `{png.name}`.\n" if plotted else "")
        + "\nPer-block kept widths (heads x dims for qk and v):\n\n```\n"
        + "\n".join(f"{m:<10} {json.dumps(w)}" for m, w in widths.items()) + "\n```\n"
    )
    path = write_results_md(a.name, "Fashion-MNIST: pruning a small DeiT-style ViT to 50% FLOPs", rows, notes)
    print(f"wrote {path}")
    return 0


def _ort_latency(models: dict, x: torch.Tensor) -> dict[str, float]:
    """onnxruntime CPU median latency (ms) per model at the batch of ``x``, interleaved."""
    runners = {}
    with tempfile.TemporaryDirectory() as d:
        for name, m in models.items():
            path = Path(d) / f"{name}.onnx"
            vitgraph.export_onnx(copy.deepcopy(m).eval(), path, (x,))
            runners[name] = ort_runner(path, (x,))
        stats = measure_latency(runners, reps=20, rounds=5)
    return {k: v.median_ms for k, v in stats.items()}


if __name__ == "__main__":
    sys.exit(main())
