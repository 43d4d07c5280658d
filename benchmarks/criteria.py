"""Criteria benchmark: does a criterion pick better channels, measured apart from width allocation?

    pip install -e ".[bench]"           # torch-pruning 1.6 (the peer), scikit-learn (digits)
    python benchmarks/criteria.py        # the full protocol; --seeds/--proxy/--fractions/--datasets reduce it

Two protocols on small ViTs (width 96, depth 4) trained from scratch on each dataset and seed:

* ranking: the same fraction removed from every q/k, v and FFN group (``Plan.from_scores``), so
  only the ranking inside each group differs between criteria;
* allocation: global plans at equal FLOPs (``plan_to_target(mode="global")``, every criterion
  planned the same way), next to Torch-Pruning 1.6's ``MetaPruner`` with its group magnitude,
  Taylor and Hessian importances at the same FLOPs on the same trained models.

Accuracy before and after a fixed short fine-tune (CE + 0.2 KL from the dense model), mean and
spread over seeds.  Dense models are cached under ``--cache`` (default /tmp/vitgraph_criteria).
Writes benchmarks/results/criteria.md.
"""
from __future__ import annotations

import argparse
import copy
import json
import logging
import statistics
import sys
import time
import warnings
from pathlib import Path

import torch
import torch.nn.functional as F

import vitgraph
from vitgraph.data import batches

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
WIDTH, DEPTH, HEADS = 96, 4, 3
DATASETS = {
    # name: (image size, patch size, train epochs, batch, lr)
    "fashion_mnist": (28, 4, 2, 128, 1e-3),
    "digits": (8, 2, 40, 64, 1e-3),
}


def load(name: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_train, y_train, x_test, y_test) of a dataset that needs no download at run time."""
    if name == "fashion_mnist":
        from vitgraph.data import load_fashion_mnist

        xtr, ytr = load_fashion_mnist("train")
        xte, yte = load_fashion_mnist("test")
        return xtr, ytr, xte, yte
    if name == "digits":  # scikit-learn's bundled UCI digits: 1797 8x8 images, 16 grey levels
        from sklearn.datasets import load_digits

        d = load_digits()
        x = torch.tensor(d.images, dtype=torch.float32).unsqueeze(1) / 16.0
        y = torch.tensor(d.target, dtype=torch.long)
        perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(0))
        tr, te = perm[:1297], perm[1297:]
        return x[tr], y[tr], x[te], y[te]
    raise ValueError(f"unknown dataset {name!r}")


def build_model(name: str) -> torch.nn.Module:
    import timm

    img, patch = DATASETS[name][:2]
    return timm.models.vision_transformer.VisionTransformer(
        img_size=img, patch_size=patch, in_chans=1, num_classes=10, embed_dim=WIDTH, depth=DEPTH,
        num_heads=HEADS, mlp_ratio=4.0, drop_path_rate=0.0)


def train_dense(name: str, seed: int, x: torch.Tensor, y: torch.Tensor) -> torch.nn.Module:
    """Train from scratch (AdamW, one-cycle, no augmentation); ``seed`` sets init and batch order."""
    _, _, epochs, bs, lr = DATASETS[name]
    torch.manual_seed(seed)
    model = build_model(name)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(x) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    model.train()
    t0 = time.perf_counter()
    for ep in range(epochs):
        for xb, yb in batches(x, y, bs, shuffle=True, seed=1000 * seed + ep):
            loss = F.cross_entropy(model(xb), yb)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    print(f"  trained {name} seed {seed}: {epochs} epochs, loss {loss.item():.3f}, "
          f"{time.perf_counter() - t0:.0f} s", flush=True)
    return model.eval()


def dense_model(name: str, seed: int, x, y, cache: Path) -> torch.nn.Module:
    """The trained dense model of (dataset, seed), from ``cache`` when present."""
    key = json.dumps([name, seed, WIDTH, DEPTH, HEADS, DATASETS[name], len(x)])
    import hashlib

    path = cache / f"{name}_s{seed}_{hashlib.sha256(key.encode()).hexdigest()[:10]}.pt"
    model = build_model(name)
    if path.exists():
        model.load_state_dict(torch.load(path))
        return model.eval()
    model = train_dense(name, seed, x, y)
    cache.mkdir(parents=True, exist_ok=True)
    torch.save(model.state_dict(), path)
    return model


@torch.no_grad()
def accuracy(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor, bs: int = 500) -> float:
    """Top-1 accuracy (fraction)."""
    model.eval()
    hits = sum((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum().item() for i in range(0, len(x), bs))
    return hits / len(x)


# -- criteria -------------------------------------------------------------------------------------
RANK_KINDS = ("qk", "v", "ffn")
UNIT = {"residual": 8, "head": 1, "qk": 4, "v": 4, "ffn": 16}
VG = ("magnitude", "random", "hessian-fisher", "hessian-diag", "hessian-hvp", "hessian-batch", "kl-approx", "kl-diag",
      "kl-exact", "threshold")
TP = ("tp-magnitude", "tp-taylor", "tp-hessian")
ITER = ("hessian-fisher-iter4", "kl-approx-iter4")  # ranking only, largest proxy: re-scored in 4 rounds
NO_DATA = ("magnitude", "random", "tp-magnitude")


def vg_scores(method: str, model, an, px, py, fraction: float, a, seed: int):
    """vitgraph scores of ``method`` on the proxy set (threshold: trained toward 1 - fraction of FLOPs)."""
    data = batches(px, py, 64)
    if method == "magnitude":
        return vitgraph.score(model, an, "magnitude")
    if method == "random":
        g = torch.Generator().manual_seed(10_000 + seed)
        return {k: torch.rand(v.shape, generator=g) for k, v in vitgraph.score(model, an, "magnitude").items()}
    if method == "hessian-diag":  # the per-example Fisher's diagonal alone (the default before joint ranking)
        return vitgraph.score(model, an, "hessian", data=data, mode="fisher", joint=False)
    if method.startswith("hessian-"):
        return vitgraph.score(model, an, "hessian", data=data, mode=method.split("-")[1])
    if method == "kl-approx":  # the library's defaults: every class's term, joint ranking
        return vitgraph.score(model, an, "kl", data=batches(px, None, 64), mode="approx", chunk=64)
    if method == "kl-diag":  # the diagonal alone, a.kl_samples label draws per image (the form before joint ranking)
        return vitgraph.score(model, an, "kl", data=batches(px, None, 64), mode="approx", chunk=64,
                              samples=a.kl_samples, max_exact_classes=0, joint=False)
    if method == "kl-exact":
        return vitgraph.score(model, an, "kl", data=batches(px, None, 64), mode="exact", chunk=64)
    if method == "threshold":
        from vitgraph.data import EpochLoader

        return vitgraph.score(model, an, "threshold", data=EpochLoader(px, py, 64, seed=seed), target=1 - fraction,
                              budget="flops", steps=a.threshold_steps, log_every=0)
    raise ValueError(method)


def iterative_ranking_plan(method: str, dense, an, px, py, fraction: float, a, seed: int, rounds: int = 4) -> vitgraph.Plan:
    """NViT's progressive schedule without training: round k removes ``fraction * k / rounds`` of
    every q/k, v and FFN group by scores of the model with the earlier rounds' units zeroed
    (``vitgraph.mask``); removed units score 0, so they stay removed."""
    plan = vitgraph.Plan.keep_all(an)
    base = method.rsplit("-", 1)[0]
    for k in range(1, rounds + 1):
        m = dense if k == 1 else vitgraph.mask(dense, plan, an)
        an_k = an if k == 1 else vitgraph.analyze(m, px[:1])
        s = vg_scores(base, m, an_k, px, py, fraction, a, seed)
        plan = vitgraph.Plan.from_scores(an, dict(s), ratio=fraction * k / rounds, kinds=RANK_KINDS)
    return plan


def ranking_plan(an, scores, method: str, fraction: float, seed: int) -> vitgraph.Plan:
    """The same fraction removed from every q/k, v and FFN group; only the in-group ranking differs."""
    if method == "random":
        return vitgraph.Plan.random(an, fraction, kinds=RANK_KINDS, seed=seed)
    return vitgraph.Plan.from_scores(an, scores, ratio=fraction, kinds=RANK_KINDS)


def allocation_plan(an, scores, fraction: float, normalize: bool) -> vitgraph.Plan:
    """A global plan at 1 - fraction of the dense FLOPs, every criterion planned the same way."""
    return vitgraph.plan_to_target(an, scores, target="flops", fraction=1 - fraction, mode="global", unit=UNIT,
                                   normalize=normalize)


# -- the peer: Torch-Pruning 1.6 ------------------------------------------------------------------
def _tp_attention_forward(self, x, attn_mask=None, is_causal=False):
    """timm Attention.forward with reshape(B, N, -1) (Torch-Pruning's documented patch for timm ViTs)."""
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4)
    q, k, v = qkv.unbind(0)
    q, k = self.q_norm(q), self.k_norm(k)
    x = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask, is_causal=is_causal)
    x = self.norm(x.transpose(1, 2).reshape(B, N, -1))  # timm: reshape(B, N, self.attn_dim)
    return self.proj_drop(self.proj(x))


class TorchPruning:
    """MetaPruner (global pruning, head dims) with one importance, FLOPs matched by bisection;
    ``global_pruning = False`` prunes every layer by the same ratio (Torch-Pruning's uniform mode)."""

    global_pruning = True

    def __init__(self, dense, kind: str, px, py, x1) -> None:
        import torch_pruning as tp

        self.tp, self.dense, self.kind, self.x1 = tp, dense, kind, x1
        self.grads: dict[str, torch.Tensor] = {}
        ref = self._patched(copy.deepcopy(dense))
        if kind == "taylor":  # the documented use: gradients of the mean loss, accumulated over batches
            ref.zero_grad()
            for xb, yb in batches(px, py, 64):
                F.cross_entropy(ref(xb), yb).backward()
            self.grads = {n: p.grad.clone() for n, p in ref.named_parameters() if p.grad is not None}
        elif kind == "hessian":  # the documented use: accumulate_grad after every example's backward
            imp = tp.importance.GroupHessianImportance()
            imp.zero_grad()
            # 1.6.0's accumulate_grad keeps only the last example's squared gradient (it tests a name
            # against a dict keyed by parameters), so looping over the last batch alone gives the same
            # importance as looping over the whole proxy set, for a fraction of the time
            xb, yb = batches(px, py, 64)[-1]
            for loss in F.cross_entropy(ref(xb), yb, reduction="none"):
                ref.zero_grad()
                loss.backward(retain_graph=True)
                imp.accumulate_grad(ref)
            names = {id(p): n for n, p in ref.named_parameters()}
            self.accu = {names[id(p)]: g for p, g in imp._accu_grad.items()}
            self.count = {names[id(p)]: c for p, c in imp._counter.items()}

    @staticmethod
    def _patched(m):
        from timm.models.vision_transformer import Attention

        for mod in m.modules():
            if isinstance(mod, Attention):
                mod.forward = _tp_attention_forward.__get__(mod, Attention)
        return m

    def prune(self, ratio: float):
        tp = self.tp
        m = self._patched(copy.deepcopy(self.dense)).eval()
        from timm.models.vision_transformer import Attention

        attn = [mod for mod in m.modules() if isinstance(mod, Attention)]
        params = dict(m.named_parameters())
        if self.kind == "magnitude":
            imp = tp.importance.GroupMagnitudeImportance(p=2)
        elif self.kind == "taylor":
            imp = tp.importance.GroupTaylorImportance()
            for n, g in self.grads.items():
                params[n].grad = g.clone()
        else:
            imp = tp.importance.GroupHessianImportance()
            imp._accu_grad = {params[n]: g.clone() for n, g in self.accu.items()}
            for n in self.accu:  # the documented loop leaves the last example's gradients in .grad
                params[n].grad = torch.zeros_like(params[n])
            imp._counter = {params[n]: c for n, c in self.count.items()}
        pruner = tp.pruner.MetaPruner(
            m, self.x1, importance=imp, global_pruning=self.global_pruning, pruning_ratio=ratio, max_pruning_ratio=0.9,
            ignored_layers=[m.head], num_heads={mod.qkv: mod.num_heads for mod in attn},
            prune_head_dims=True, prune_num_heads=False)
        for group in pruner.step(interactive=True):
            group.prune()
        for mod in attn:
            mod.num_heads = pruner.num_heads[mod.qkv]
            mod.head_dim = mod.qkv.out_features // (3 * mod.num_heads)
        m.zero_grad(set_to_none=True)
        return m.eval()

    def at_flops(self, target: float, dense_flops: int, iters: int = 9):
        """The pruned model with the most FLOPs not above ``target`` of the dense FLOPs."""
        from vitgraph.deploy.measure import count_flops

        lo, hi, best = 0.0, 0.9, None
        for _ in range(iters):
            mid = (lo + hi) / 2
            m = self.prune(mid)
            f = count_flops(m, (self.x1,)) / dense_flops
            if f <= target:
                best, hi = (m, f), mid
            else:
                lo = mid
        if best is None:
            m = self.prune(hi)
            best = (m, count_flops(m, (self.x1,)) / dense_flops)
        return best


# -- the protocol ---------------------------------------------------------------------------------
def finetune_copy(slim, dense, xtr, ytr, a, seed: int, long: bool = False):
    """A fine-tuned copy: ``a.ft_steps`` steps of batch 64, CE + 0.2 KL from the dense model (UP-ViT);
    ``long``: ``a.long_ft_steps`` steps at lr ``a.long_ft_lr`` with NViT's loss (CE + KL distillation at tau 20)."""
    from vitgraph.data import EpochLoader
    from vitgraph.passes.recovery import finetune

    m = copy.deepcopy(slim)
    torch.manual_seed(seed)
    finetune(m, EpochLoader(xtr, ytr, 64, seed=7 + seed), teacher=dense, loss="nvit" if long else "upvit", alpha=0.2,
             lr=a.long_ft_lr if long else a.ft_lr, max_steps=a.long_ft_steps if long else a.ft_steps, log_every=0)
    return m.eval()


def run_dataset_seed(name: str, seed: int, a, store: "Store") -> None:
    from vitgraph.deploy.measure import count_flops

    xtr, ytr, xte, yte = load(name)
    xte, yte = xte[:a.test_limit], yte[:a.test_limit]
    dense = dense_model(name, seed, xtr, ytr, a.cache)
    x1 = xte[:1]
    an = vitgraph.analyze(dense, x1)
    dense_flops = count_flops(dense, (x1,))
    base = dict(dataset=name, seed=seed)
    if not store.has(protocol="dense", **base):
        acc = accuracy(dense, xte, yte)
        store.add(protocol="dense", fraction=0.0, proxy=0, criterion="dense", before=acc, after=acc, flops=1.0,
                  score_s=0.0, **base)
    order = torch.randperm(len(xtr), generator=torch.Generator().manual_seed(100 + seed))
    proxies = sorted(a.proxy)
    ft_proxy = max(proxies) if a.ft_proxy is None else a.ft_proxy
    for proxy in proxies:
        n = min(proxy, len(xtr))
        px, py = xtr[order[:n]], ytr[order[:n]]
        for method in a.criteria:
            if method in NO_DATA and proxy != proxies[0]:
                continue  # needs no data: once
            if method == "kl-exact" and proxy > a.exact_max_proxy:
                continue
            if method in ITER and proxy != proxies[-1]:
                continue
            protocols = [p for p in a.protocols if not (method in TP and p == "ranking")
                         and not (method in ITER and p == "allocation")
                         and not (method == "hessian-batch" and p == "allocation")]
            if method in a.long_ft_criteria and "allocation" in protocols:
                protocols.append("allocation-long-ft")
            cache_scores = None
            tp_pruner = None
            for fraction in a.fractions:
                todo = [p for p in protocols if not store.has(protocol=p, fraction=fraction, proxy=n,
                                                              criterion=method, **base)
                        and not (p == "allocation-long-ft"
                                 and (fraction != 0.5 or (proxy != ft_proxy and method not in NO_DATA)))]
                if not todo:
                    continue
                t0 = time.perf_counter()
                if method in TP:
                    if tp_pruner is None:
                        tp_pruner = TorchPruning(dense, method.split("-")[1], px, py, x1)
                    scores = None
                elif method in ITER:
                    scores = None
                elif method == "threshold" or cache_scores is None:
                    scores = cache_scores = vg_scores(method, dense, an, px, py, fraction, a, seed)
                else:
                    scores = cache_scores
                score_s = time.perf_counter() - t0
                for protocol in todo:
                    models = {}
                    if method in TP:
                        models[method] = tp_pruner.at_flops(1 - fraction, dense_flops)[0]
                    elif method in ITER:
                        t1 = time.perf_counter()
                        models[method] = vitgraph.compress(
                            dense, iterative_ranking_plan(method, dense, an, px, py, fraction, a, seed), an)
                        score_s = time.perf_counter() - t1
                    elif protocol == "ranking":
                        models[method] = vitgraph.compress(dense, ranking_plan(an, scores, method, fraction, seed), an)
                    elif method == "threshold":  # its allocation is the widths it learned toward the target
                        models[method] = vitgraph.compress(dense, vitgraph.Plan.from_scores(an, scores, ratio=None), an)
                    else:
                        models[method] = vitgraph.compress(dense, allocation_plan(an, scores, fraction, a.normalize), an)
                    for crit, slim in models.items():
                        if store.has(protocol=protocol, fraction=fraction, proxy=n, criterion=crit, **base):
                            continue
                        before = accuracy(slim, xte, yte)
                        after = None
                        tune = protocol == "allocation" or fraction in a.ft_ranking_fractions
                        if protocol == "allocation-long-ft":
                            after = accuracy(finetune_copy(slim, dense, xtr, ytr, a, seed, long=True), xte, yte)
                        elif a.ft_steps and tune and (proxy == ft_proxy or method in NO_DATA):
                            after = accuracy(finetune_copy(slim, dense, xtr, ytr, a, seed), xte, yte)
                        store.add(protocol=protocol, fraction=fraction, proxy=0 if method in NO_DATA else n,
                                  criterion=crit, before=before, after=after,
                                  flops=count_flops(slim, (x1,)) / dense_flops, score_s=score_s, **base)


class Store:
    """Results, one JSON line each, appended as they come (a rerun skips what is there)."""

    KEY = ("dataset", "seed", "protocol", "fraction", "proxy", "criterion")

    def __init__(self, path: Path) -> None:
        self.path = path
        self.rows = [json.loads(line) for line in path.read_text().splitlines() if line.strip()] if path.exists() else []
        self.keys = {tuple(r[k] for k in self.KEY) for r in self.rows}

    def has(self, **kw) -> bool:
        if kw["protocol"] == "dense":
            return any(r["protocol"] == "dense" and r["dataset"] == kw["dataset"] and r["seed"] == kw["seed"]
                       for r in self.rows)
        proxy = 0 if kw["criterion"] in NO_DATA else kw["proxy"]
        return (kw["dataset"], kw["seed"], kw["protocol"], kw["fraction"], proxy, kw["criterion"]) in self.keys

    def add(self, **row) -> None:
        row = {k: (round(v, 5) if isinstance(v, float) else v) for k, v in row.items()}
        self.rows.append(row)
        self.keys.add(tuple(row[k] for k in self.KEY))
        with self.path.open("a") as f:
            f.write(json.dumps(row) + "\n")
        after = "-" if row["after"] is None else f"{row['after']:.4f}"
        print(f"  {row['dataset']} s{row['seed']} {row['protocol']:<10} {row['fraction']:.1f} proxy {row['proxy']:>4} "
              f"{row['criterion']:<16} before {row['before']:.4f} after {after} flops {row['flops']:.3f} "
              f"(score {row['score_s']:.1f} s)", flush=True)


# -- report ---------------------------------------------------------------------------------------
def _stat(vals: list[float]) -> str:
    """mean ± sample std (min) in percent; one value: just the value."""
    if not vals:
        return "-"
    m = 100 * statistics.mean(vals)
    if len(vals) == 1:
        return f"{m:.1f}"
    return f"{m:.1f} ± {100 * statistics.stdev(vals):.1f} ({100 * min(vals):.1f})"


def _md(rows: list[dict]) -> str:
    cols = list(dict.fromkeys(k for r in rows for k in r))
    out = ["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |"]
    out += ["| " + " | ".join(str(r.get(c, "")) for c in cols) + " |" for r in rows]
    return "\n".join(out)


def tables(rows: list[dict], datasets, fractions) -> dict[tuple[str, str], list[dict]]:
    """(dataset, protocol) -> table rows: criterion x proxy, then before/after per fraction."""
    out = {}
    for name in datasets:
        mine = [r for r in rows if r["dataset"] == name]
        dense = [r["before"] for r in mine if r["protocol"] == "dense"]
        for protocol in ("ranking", "allocation", "allocation-long-ft"):
            sel = [r for r in mine if r["protocol"] == protocol]
            if not sel:
                continue
            table = [{"criterion": "dense", "proxy": "-", **{f"{int(f * 100)}% {w}": _stat(dense)
                                                             for f in fractions for w in ("before", "after")}}]
            order = {c: i for i, c in enumerate(VG + ITER + ("threshold-widths",) + TP)}
            combos = sorted({(r["criterion"], r["proxy"]) for r in sel}, key=lambda c: (order.get(c[0], 99), c[1]))
            for crit, proxy in combos:
                row = {"criterion": crit, "proxy": proxy or "-"}
                for f in fractions:
                    cell = [r for r in sel if r["criterion"] == crit and r["proxy"] == proxy and r["fraction"] == f]
                    row[f"{int(f * 100)}% before"] = _stat([r["before"] for r in cell])
                    row[f"{int(f * 100)}% after"] = _stat([r["after"] for r in cell if r["after"] is not None])
                if protocol == "allocation":
                    fl = [r["flops"] for r in sel if r["criterion"] == crit and r["proxy"] == proxy]
                    row["FLOPs kept"] = f"{min(fl):.3f}-{max(fl):.3f}"
                sec = [r["score_s"] for r in sel if r["criterion"] == crit and r["proxy"] == proxy and r["score_s"] > 0]
                row["score s"] = f"{statistics.median(sec):.1f}" if sec else "0.0"
                table.append(row)
            out[name, protocol] = table
    return out


def checks(rows: list[dict], datasets) -> list[str]:
    """The issue's done-when items, computed from the rows (no figure is written by hand)."""
    lines = []

    def cell(name, protocol, crit, f, proxy=None, field="before"):
        sel = [r for r in rows if r["dataset"] == name and r["protocol"] == protocol and r["criterion"] == crit
               and r["fraction"] == f and (proxy is None or r["proxy"] == proxy) and r[field] is not None]
        return sel

    for name in datasets:
        proxies = sorted({r["proxy"] for r in rows if r["dataset"] == name and r["proxy"]})
        for f in (0.5, 0.7):
            mag = cell(name, "ranking", "magnitude", f)
            rnd = {r["seed"]: r["before"] for r in cell(name, "ranking", "random", f)}
            if not mag:
                continue
            m = statistics.mean(r["before"] for r in mag)
            for crit in ("hessian-fisher", "hessian-diag", "hessian-hvp", "hessian-batch", "kl-approx", "kl-diag",
                         "kl-exact") + ITER:
                for proxy in proxies:
                    sel = cell(name, "ranking", crit, f, proxy)
                    if not sel:
                        continue
                    c = statistics.mean(r["before"] for r in sel)
                    below = [r["seed"] for r in sel if r["seed"] in rnd and r["before"] < rnd[r["seed"]]]
                    lines.append(f"- {name}, ranking, {int(f * 100)}% removed, proxy {proxy}: {crit} {100 * c:.1f} vs "
                                 f"magnitude {100 * m:.1f}: {'>=' if c >= m else '<'} magnitude; "
                                 + (f"below random on seeds {below}" if below else "never below random"))
        sel = [r for r in rows if r["dataset"] == name and r["protocol"] == "allocation" and r["fraction"] == 0.5]
        if not sel:
            continue
        by = {}
        for r in sel:
            by.setdefault((r["criterion"], r["proxy"]), []).append(r)
        mean = lambda rs, k="before": statistics.mean(r[k] for r in rs)  # noqa: E731
        vg = {c: rs for c, rs in by.items() if c[0] not in TP and c[0] != "random"}
        tp = {c: rs for c, rs in by.items() if c[0] in TP}
        if vg and tp:
            best = max(vg, key=lambda c: mean(vg[c]))
            best_tp = max(tp, key=lambda c: mean(tp[c]))
            lines.append(f"- {name}, allocation, 50% FLOPs: best vitgraph {best[0]} (proxy {best[1] or '-'}) "
                         f"{100 * mean(vg[best]):.1f} before FT vs best Torch-Pruning {best_tp[0]} (proxy "
                         f"{best_tp[1] or '-'}) {100 * mean(tp[best_tp]):.1f}: "
                         + ("beats every Torch-Pruning importance" if mean(vg[best]) > mean(tp[best_tp]) else "does NOT beat it"))
            dense = statistics.mean(r["before"] for r in rows if r["dataset"] == name and r["protocol"] == "dense")
            ft = [r for r in vg[best] if r["after"] is not None]
            if ft:
                lines.append(f"  after the fine-tune: {100 * mean(ft, 'after'):.1f} vs dense {100 * dense:.1f} "
                             f"({100 * (mean(ft, 'after') - dense):+.1f} points)")
            ftd = {c: rs for c, rs in vg.items() if all(r["after"] is not None for r in rs)}
            if ftd:
                best_ft = max(ftd, key=lambda c: mean(ftd[c], "after"))
                lines.append(f"  best vitgraph criterion after the fine-tune: {best_ft[0]} (proxy {best_ft[1] or '-'}) "
                             f"{100 * mean(ftd[best_ft], 'after'):.1f} "
                             f"({100 * (mean(ftd[best_ft], 'after') - dense):+.1f} points)")
            longft = [r for r in rows if r["dataset"] == name and r["protocol"] == "allocation-long-ft"]
            for crit in sorted({r["criterion"] for r in longft}):
                rs = [r for r in longft if r["criterion"] == crit]
                lines.append(f"  after the longer fine-tune: {crit} {100 * mean(rs, 'after'):.1f} vs dense {100 * dense:.1f} "
                             f"({100 * (mean(rs, 'after') - dense):+.1f} points, seeds {sorted(r['seed'] for r in rs)})")
    return lines


def write_report(rows: list[dict], a, seconds: float, command: str) -> Path:
    from vitgraph.deploy.measure import write_results_md

    datasets = [d for d in a.datasets if any(r["dataset"] == d for r in rows)]
    tabs = tables(rows, datasets, a.fractions)
    seeds = sorted({r["seed"] for r in rows})
    parts = []
    for (name, protocol), t in tabs.items():
        parts.append(f"## {name}: {protocol} protocol\n\n{_md(t)}\n")
    first_key = next(iter(tabs))
    notes = (
        (f"{a.note}\n\n" if a.note else
         f"Command: `{command}` ({seconds / 60:.0f} min on this machine, 1 thread; dense models from the cache "
         f"{a.cache} when present).\n\n")
        + f"Cells: test accuracy in percent, mean ± sample std over seeds {seeds} (min over seeds in brackets), "
        "before and after the fine-tune. Test sets: "
        + ", ".join(f"{d}: first {min(a.test_limit, len(load(d)[3]))} test images" for d in datasets) + ". "
        f"Proxy sets: the first N images of a seed-dependent shuffle of the training set (nested); digits has "
        f"{len(load('digits')[0]) if 'digits' in datasets else 0} training images, so its largest proxy is all of them. "
        "Ranking protocol: `Plan.from_scores(ratio=f, kinds=(qk, v, ffn))`, the same fraction f removed from every "
        "q/k, v and FFN group (per head for q/k and v), residual and heads kept; random = `Plan.random` with the "
        "seed. Allocation protocol: `plan_to_target(target='flops', fraction=1-f, mode='global', "
        f"normalize={a.normalize}, unit={UNIT})` for every vitgraph criterion (random: uniform random scores, "
        "planned the same way) except threshold, whose allocation is the widths WDPruning's thresholds learned "
        "toward the same FLOPs (`Plan.from_scores(ratio=None)`; its scores rank units within a group only; rows "
        "named threshold-widths in older stores are the same plans, the threshold rows of those stores came from "
        "`plan_to_target` on its scores). Torch-Pruning 1.6.0: `MetaPruner(global_pruning=True, "
        "num_heads=..., prune_head_dims=True, ignored_layers=[head])` with timm Attention's forward patched to "
        "`reshape(B, N, -1)` (its documented ViT recipe), pruning ratio bisected to the largest FLOPs not above "
        "the target (FLOPs counted by vitgraph's counter for both); Taylor: gradients of the mean loss summed over "
        "the proxy batches; Hessian: `accumulate_grad` after every example's backward, as its docstring shows "
        "(note: 1.6.0's `accumulate_grad` tests `name not in self._accu_grad` on a dict keyed by parameters, so "
        "it keeps only the last example's squared gradient; used as shipped).\n\n"
        "Scores: hessian-fisher = per-example empirical Fisher ranked jointly (the default: each group's Fisher block "
        "sum_i c_i c_i^T, units in the greedy removal order of the quadratic form, passes/joint.py), hessian-diag = "
        "the same Fisher's diagonal (each unit as if removed alone; the default before), hessian-batch = squared "
        "batch-mean gradient (NViT's code), hessian-hvp = finite-difference HVP, 1 probe per batch of 64; kl-approx = "
        "second-order KL at the library's defaults (every class's term weighted by q, ranked jointly); kl-diag = its "
        f"diagonal with {a.kl_samples} label draws y ~ q per image (the form before); kl-exact = one "
        f"masked forward per unit (proxy sets up to {a.exact_max_proxy} only: its cost is units x images); "
        f"threshold: {a.threshold_steps} steps of mask training toward 1-f of the FLOPs (its before-FT accuracy "
        "includes that training). Fine-tune: "
        f"{a.ft_steps} steps of batch 64 (AdamW lr {a.ft_lr}, cosine), CE + 0.2 KL from the dense model, run for "
        "the largest proxy set and the criteria that take no data, on every allocation plan and on the ranking "
        f"plans at {a.ft_ranking_fractions} removed; the longer fine-tune (allocation-long-ft: the 50%-FLOPs plans of "
        f"{', '.join(a.long_ft_criteria)}) is {a.long_ft_steps} steps of batch 64 at lr {a.long_ft_lr} with NViT's "
        "loss (CE + KL distillation at tau 20). 'score s': wall seconds to score, median over the runs that scored "
        "(Torch-Pruning: gradient accumulation; its Hessian loops over the last proxy batch only, which gives 1.6.0's "
        "importance exactly, see above).\n\n"
        "## Done-when checks (computed from the rows)\n\n" + "\n".join(checks(rows, datasets)) + "\n\n"
        + "\n".join(parts[1:])
    )
    name, protocol = first_key
    return write_results_md(a.name, "Criteria: ranking and allocation, vitgraph vs Torch-Pruning",
                            tabs[first_key], f"(table above: {name}, {protocol} protocol)\n\n" + notes)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--datasets", default="fashion_mnist,digits")
    ap.add_argument("--seeds", default="0,1,2")
    ap.add_argument("--proxy", default="128,512,2048")
    ap.add_argument("--fractions", default="0.3,0.5,0.7", help="fractions removed")
    ap.add_argument("--criteria", default=",".join(VG + TP),
                    help=f"comma list of {VG + TP + ITER} (the last two: ranking only, re-scored in 4 rounds)")
    ap.add_argument("--protocols", default="ranking,allocation")
    ap.add_argument("--exact-max-proxy", type=int, default=128, help="largest proxy set kl-exact runs on")
    ap.add_argument("--threshold-steps", type=int, default=200)
    ap.add_argument("--kl-samples", type=int, default=2, help="label draws per image for kl-approx")
    ap.add_argument("--ft-steps", type=int, default=40)
    ap.add_argument("--ft-ranking-fractions", default="0.5",
                    help="fractions whose ranking-protocol models are fine-tuned too (allocation: all)")
    ap.add_argument("--ft-lr", type=float, default=5e-4)
    ap.add_argument("--long-ft-steps", type=int, default=400,
                    help="steps of the longer fine-tune (NViT's loss) of the 50%%-FLOPs allocation plans")
    ap.add_argument("--long-ft-lr", type=float, default=1e-4, help="its learning rate (finetune's default)")
    ap.add_argument("--long-ft-criteria", default="kl-approx,hessian-fisher,tp-magnitude",
                    help="criteria whose 50%%-FLOPs allocation plan gets the longer fine-tune too")
    ap.add_argument("--ft-proxy", type=int, help="proxy size whose plans are fine-tuned (default: the largest)")
    ap.add_argument("--test-limit", type=int, default=2000)
    ap.add_argument("--normalize", type=int, default=0, help="plan_to_target's normalize for the allocation plans")
    ap.add_argument("--cache", type=Path, default=Path("/tmp/vitgraph_criteria"))
    ap.add_argument("--tag", default="run", help="results store under the cache (a rerun with the tag resumes)")
    ap.add_argument("--name", default="criteria")
    ap.add_argument("--report-only", action="store_true", help="write the report from the store, run nothing")
    ap.add_argument("--note", default="", help="text for the report in place of the command line (how it was run)")
    a = ap.parse_args(argv)
    a.datasets = a.datasets.split(",")
    a.seeds = [int(s) for s in a.seeds.split(",")]
    a.proxy = [int(s) for s in a.proxy.split(",")]
    a.fractions = [float(s) for s in a.fractions.split(",")]
    a.criteria = a.criteria.split(",")
    a.protocols = a.protocols.split(",")
    a.ft_ranking_fractions = [float(f) for f in a.ft_ranking_fractions.split(",") if f]
    a.long_ft_criteria = [c for c in a.long_ft_criteria.split(",") if c]
    a.normalize = bool(a.normalize)
    torch.set_num_threads(1)
    warnings.simplefilter("ignore")
    logging.basicConfig(level=logging.WARNING)
    a.cache.mkdir(parents=True, exist_ok=True)
    store = Store(a.cache / f"results_{a.tag}.jsonl")
    t0 = time.perf_counter()
    if not a.report_only:
        for name in a.datasets:
            for seed in a.seeds:
                print(f"{name} seed {seed}", flush=True)
                run_dataset_seed(name, seed, a, store)
    rows = [r for r in store.rows if r["dataset"] in a.datasets and r["seed"] in a.seeds
            and (r["protocol"] == "dense"
                 or (r["fraction"] in a.fractions and r["criterion"] in a.criteria + ["threshold-widths"]))]
    command = "python benchmarks/criteria.py " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_report(rows, a, time.perf_counter() - t0, command.strip())
    print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
