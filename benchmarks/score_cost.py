"""Cost of the score passes, against a training step and a pass over the proxy set.

    python benchmarks/score_cost.py [--model deit_small_patch16_224] [--batch 16] [--proxy 32]

* Hessian (NViT, Fisher form and finite-difference HVP): seconds per batch / seconds of one
  training step (forward, backward, AdamW step) on the same batch; target <= 3x for the default
  Fisher form.
* Approximate KL (UP-ViT): seconds to score every unit over the proxy set / seconds of one forward
  + backward pass over it ("passes"); target <= 20 for a ViT-S-sized model.
* Rank agreement on a small model: Spearman correlation of approximate vs exact KL scores (target
  >= 0.8) and of the Fisher vs finite-difference Hessian scores.

Medians of interleaved repetitions; writes benchmarks/results/score_cost.md.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time
import warnings

import timm
import torch
import torch.nn.functional as F

import vitgraph
from vitgraph.deploy.measure import format_table, write_results_md
from vitgraph.passes.scoring_common import spearman


def _timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def hessian_vs_train(model, an, batch, reps: int) -> dict[str, float]:
    """Median seconds of a training step and of Hessian scoring (fisher, hvp) on one batch."""
    x, y = batch
    opt = torch.optim.AdamW(model.parameters(), lr=0.0)  # lr 0: the weights stay as analysed

    def train() -> None:
        model.train()
        opt.zero_grad(set_to_none=True)
        F.cross_entropy(model(x), y).backward()
        opt.step()
        model.eval()

    fns = {"train step": train,
           "hessian fisher": lambda: vitgraph.score(model, an, "hessian", data=[batch]),
           "hessian hvp (1 probe)": lambda: vitgraph.score(model, an, "hessian", data=[batch], mode="hvp")}
    times: dict[str, list[float]] = {k: [] for k in fns}
    for f in fns.values():  # warm-up
        f()
    for _ in range(reps):
        for k, f in fns.items():
            times[k].append(_timed(f))
    return {k: statistics.median(v) for k, v in times.items()}


def kl_vs_pass(model, an, proxy, bs: int, samples: int) -> dict[str, float]:
    """Seconds of approximate KL scoring over the proxy set and of one forward+backward pass over it."""
    data = [(proxy[i:i + bs], None) for i in range(0, len(proxy), bs)]

    def one_pass() -> None:
        for xb, _ in data:
            model.zero_grad(set_to_none=True)
            model(xb).logsumexp(-1).sum().backward()
        model.zero_grad(set_to_none=True)

    one_pass()
    t_pass = statistics.median(_timed(one_pass) for _ in range(3))
    t_kl = _timed(lambda: vitgraph.score(model, an, "kl", data=data, mode="approx", samples=samples, chunk=bs))
    return {"pass": t_pass, "kl": t_kl}


def small_model_agreement() -> dict[str, float]:
    """Rank correlations on a small ViT (the setup of tests/test_scores.py, more data)."""
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, mlp_ratio=2.0, num_classes=10).eval()
    g = torch.Generator().manual_seed(1)
    x, y = torch.randn(128, 3, 32, 32, generator=g), torch.randint(0, 10, (128,), generator=g)
    an = vitgraph.analyze(model, x[:1])
    data = [(x[i:i + 16], y[i:i + 16]) for i in range(0, 128, 16)]
    flat = lambda s: torch.cat([s[k].flatten() for k in sorted(s)])  # noqa: E731
    exact = vitgraph.score(model, an, "kl", data=data, mode="exact", chunk=64)
    approx = vitgraph.score(model, an, "kl", data=data, mode="approx")
    fisher = vitgraph.score(model, an, "hessian", data=data)
    hvp = vitgraph.score(model, an, "hessian", data=data, mode="hvp", probes=8)
    return {"kl approx vs exact": spearman(flat(exact), flat(approx)),
            "hessian fisher vs hvp": spearman(flat(fisher), flat(hvp))}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", default="deit_small_patch16_224")
    ap.add_argument("--batch", type=int, default=16)
    ap.add_argument("--proxy", type=int, default=32, help="proxy-set images for the KL pass count")
    ap.add_argument("--samples", type=int, default=4, help="label draws per image for approximate KL")
    ap.add_argument("--reps", type=int, default=3)
    a = ap.parse_args(argv)
    warnings.simplefilter("ignore")
    torch.manual_seed(0)
    model = timm.create_model(a.model, pretrained=False).eval()
    size = model.default_cfg["input_size"]
    x = torch.randn(a.batch, *size)
    y = torch.randint(0, model.num_classes, (a.batch,))
    an = vitgraph.analyze(model, x[:1])
    print(f"{a.model}: {sum(p.numel() for p in model.parameters()) / 1e6:.1f} M params, batch {a.batch}", flush=True)
    h = hessian_vs_train(model, an, (x, y), a.reps)
    print({k: round(v, 3) for k, v in h.items()}, flush=True)
    k = kl_vs_pass(model, an, torch.randn(a.proxy, *size), a.batch, a.samples)
    print({kk: round(v, 3) for kk, v in k.items()}, flush=True)
    agree = small_model_agreement()
    print(agree, flush=True)
    rows = [
        {"measure": "hessian fisher / train step", "value": round(h["hessian fisher"] / h["train step"], 2), "target": "<= 3"},
        {"measure": "hessian hvp (1 probe) / train step",
         "value": round(h["hessian hvp (1 probe)"] / h["train step"], 2), "target": "-"},
        {"measure": f"approx KL, passes over the proxy set ({a.samples} label draws)",
         "value": round(k["kl"] / k["pass"], 2), "target": "<= 20"},
        {"measure": "rank corr. approx vs exact KL (small ViT)",
         "value": round(agree["kl approx vs exact"], 3), "target": ">= 0.8"},
        {"measure": "rank corr. Fisher vs HVP Hessian (small ViT)",
         "value": round(agree["hessian fisher vs hvp"], 3), "target": "-"},
    ]
    print(format_table(rows))
    notes = (f"Command: `python benchmarks/score_cost.py --model {a.model} --batch {a.batch} --proxy {a.proxy} "
             f"--samples {a.samples} --reps {a.reps}`. Random weights. Train step: forward, cross-entropy, backward, "
             f"AdamW step (median {h['train step']:.2f} s). One pass over the proxy set: forward + backward of every "
             f"batch ({k['pass']:.2f} s); approximate KL took {k['kl']:.2f} s. Small ViT: 2 blocks, width 48, 3 heads, "
             "128 random images.")
    path = write_results_md("score_cost", f"Score pass cost ({a.model})", rows, notes)
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
