"""Helpers shared by the tests (plain functions, classes and constants; the fixtures are in conftest.py).

Every test file imports these with ``from helpers import ...``: pytest puts ``tests/`` on ``sys.path``
when it loads ``tests/conftest.py`` (no ``__init__.py``, the default ``prepend`` import mode), which
covers ``tests/ops/`` too; the torchrun worker scripts put their own folder on ``sys.path``.
"""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import nn

import vitgraph
from vitgraph.deploy.measure import count_params


# ---------------------------------------------------------------------------------------------
# tiny timm ViTs, random plans, comparisons, fresh interpreters


def tiny_vit(**kw: Any) -> torch.nn.Module:
    """A small timm VisionTransformer (random weights, eval mode)."""
    cfg = dict(img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3, mlp_ratio=2.0, num_classes=10)
    cfg.update(kw)
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(**cfg).eval()


def random_plan(an: vitgraph.Analysis, kinds: tuple[str, ...], seed: int = 0, per_head: bool = True) -> vitgraph.Plan:
    """Keep a random half of every group of the given kinds (random per-head sets where allowed)."""
    rng = random.Random(seed)
    plan = vitgraph.Plan.keep_all(an)
    for g in an.groups:
        if g.kind not in kinds:
            continue
        k = max(1, g.size // 2)
        if g.per_head and per_head:
            heads = an.group(g.head_group).size
            plan.keep(g.id, [sorted(rng.sample(range(g.size), k)) for _ in range(heads)])
        else:
            plan.keep(g.id, sorted(rng.sample(range(g.size), k)))
    return plan


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b|."""
    a, b = a.detach(), b.detach()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12))


# the lines that make a fresh interpreter refuse every way to unpickle (a result must reload as data)
NO_UNPICKLING = textwrap.dedent("""
    import pickle
    import torch

    class Forbidden(pickle.Unpickler):
        def __init__(self, *a, **k):
            raise RuntimeError("unpickling is forbidden here")

    def forbidden(*a, **k):
        raise RuntimeError("unpickling is forbidden here")

    pickle.Unpickler, pickle.load, pickle.loads = Forbidden, forbidden, forbidden
    torch.load = torch.serialization.load = forbidden
""")


def run_fresh(script: str, *args: str, timeout: int = 120) -> dict:
    """Run ``script`` (Python source) in a fresh interpreter with ``args``; the JSON its last line prints."""
    env = dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path))
    res = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                         timeout=timeout)
    assert res.returncode == 0, res.stderr[-2000:]
    return json.loads(res.stdout.strip().splitlines()[-1])


def write_image_folder(root, n: int, seed: int) -> None:
    """Two classes of noisy 20x20 RGB PNGs, dark and bright, in ImageFolder layout (root/<class>/<i>.png)."""
    import numpy as np
    from PIL import Image

    rng = np.random.default_rng(seed)
    for c, level in enumerate((60, 190)):
        (root / str(c)).mkdir(parents=True, exist_ok=True)
        for i in range(n):
            img = np.clip(rng.normal(level, 40, (20, 20, 3)), 0, 255).astype(np.uint8)
            Image.fromarray(img).save(root / str(c) / f"{i}.png")


def score_setup(batches: int = 4, bs: int = 8):
    """A tiny ViT, its analysis and a fixed list of labelled batches (same on every process)."""
    model = tiny_vit(depth=2, embed_dim=24, num_heads=2, mlp_ratio=2.0)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(batches * bs, 3, 32, 32, generator=g)
    y = torch.randint(0, 10, (batches * bs,), generator=g)
    an = vitgraph.analyze(model, x[:1])
    data = [(x[i:i + bs], y[i:i + bs]) for i in range(0, len(x), bs)]
    return model, an, data


class FlopTable(vitgraph.LatencyTable):
    """A latency table whose 'measurements' are a FLOP formula (deterministic, instant).

    No cache file unless ``cache_dir`` is given (then the file ``LatencyTable`` would use there).
    """

    def __init__(self, batch: int = 1, cache_dir=False) -> None:
        super().__init__("torch-cpu", batch=batch, cache_dir=cache_dir)

    def _measure(self, family, dims):
        if family == "linear":
            m, k, n = dims
            return 1e-6 * m * k * n + 0.01
        if family == "bmm":
            b, m, k, n = dims
            return 1e-6 * b * m * k * n + 0.01
        if family == "sdpa":
            b, lq, s, e, ev = dims
            return 1e-6 * b * lq * s * (e + ev) + 0.01
        return 1e-7 * dims[0]


# ---------------------------------------------------------------------------------------------
# small synthetic models for the op rules (tests/test_op_rules.py, tests/ops/)
#
# every model maps tokens ``[B, N, CIN]`` through ``embed`` to a residual stream, runs one block
# that uses the pattern under test, and ends in a ``head`` Linear


B, N, CIN, C, H, NCLS = 2, 9, 8, 32, 4, 5
D = C // H  # head dim
INNER = ("qk", "v", "head", "ffn")


class Net(nn.Module):
    """``embed -> block -> mean over tokens -> head``."""

    def __init__(self, block: nn.Module) -> None:
        super().__init__()
        self.embed = nn.Linear(CIN, C)
        self.block = block
        self.head = nn.Linear(C, NCLS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.block(self.embed(x)).mean(1))


def build(block_cls: type, *args, **kw) -> nn.Module:
    """A seeded ``Net`` around ``block_cls(*args, **kw)``; parameters are all random."""
    torch.manual_seed(0)
    net = Net(block_cls(*args, **kw))
    with torch.no_grad():  # zero-initialised parameters (biases, scales) become random too
        for p in net.parameters():
            if p.abs().max() == 0 or (p == 1).all():
                p.copy_(torch.randn_like(p) * 0.5)
    return net.eval()


def inputs(batch: int = B) -> torch.Tensor:
    """Seeded tokens ``[batch, N, CIN]``."""
    torch.manual_seed(1)
    return torch.randn(batch, N, CIN)


def kinds_and_sizes(an: vitgraph.Analysis) -> list[tuple[str, int]]:
    """Sorted (kind, size) of every group."""
    return sorted((g.kind, g.size) for g in an.groups)


def only(an: vitgraph.Analysis, kind: str) -> vitgraph.ChannelGroup:
    """The one group of ``kind`` (fails if there are none or several)."""
    gs = [g for g in an.groups if g.kind == kind]
    assert len(gs) == 1, f"expected one {kind} group, got {[str(g) for g in gs]}\n{an}"
    return gs[0]


def assert_exact(m: nn.Module, an: vitgraph.Analysis, seeds=range(4)) -> None:
    """Identity plan exact; random keep-sets of the inner, non-normalised groups: compress == mask."""
    x = inputs()
    with torch.no_grad():
        ref = m(x)
        ident = vitgraph.compress(m, vitgraph.Plan.keep_all(an), an)(x)
    assert ident.shape == ref.shape
    assert rel_err(ident, ref) <= 1e-6
    ids = [g.id for g in an.groups if g.kind in INNER and not g.normalized]
    assert ids, f"no prunable inner groups\n{an}"
    for seed in seeds:
        plan = vitgraph.Plan.random(an, 0.5, kinds=INNER, seed=seed)
        plan.kept = {gid: k for gid, k in plan.kept.items() if gid in ids}
        slim, masked = vitgraph.compress(m, plan, an), vitgraph.mask(m, plan, an)
        with torch.no_grad():
            out, want = slim(x), masked(x)
        assert out.shape == ref.shape
        assert rel_err(out, want) <= 1e-5, f"seed {seed}: plan {plan.kept}"
        assert count_params(slim) < count_params(m)


def split_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, N, C] -> [B, H, N, D]``."""
    b, n, _ = t.shape
    return t.reshape(b, n, H, D).transpose(1, 2)


def merge_heads(t: torch.Tensor) -> torch.Tensor:
    """``[B, H, N, Dv] -> [B, N, H * Dv]``."""
    b, h, n, d = t.shape
    return t.transpose(1, 2).reshape(b, n, h * d)


def rotate_pairs(x: torch.Tensor) -> torch.Tensor:
    """Rotate channel pairs (2i, 2i+1) by 90 degrees."""
    return torch.stack([-x[..., 1::2], x[..., ::2]], -1).reshape(x.shape)


class SeparateQKV(nn.Module):
    """``softmax(q @ k^T * scale) @ v`` with three Linear projections.

    ``heads`` x ``dim`` q/k channels, ``heads`` x ``dim_v`` v channels; ``kt`` picks how k is
    transposed: ``"transpose"`` (``k.transpose(-2, -1)``) or ``"mT"`` (``k.mT``).
    """

    def __init__(self, heads: int = H, dim: int = D, dim_v: int = D, kt: str = "transpose") -> None:
        super().__init__()
        self.heads, self.dim, self.dim_v, self.kt = heads, dim, dim_v, kt
        self.q, self.k = nn.Linear(C, heads * dim), nn.Linear(C, heads * dim)
        self.v = nn.Linear(C, heads * dim_v)
        self.proj = nn.Linear(heads * dim_v, C)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, n, _ = x.shape
        q = self.q(x).reshape(b, n, self.heads, self.dim).transpose(1, 2)
        k = self.k(x).reshape(b, n, self.heads, self.dim).transpose(1, 2)
        v = self.v(x).reshape(b, n, self.heads, self.dim_v).transpose(1, 2)
        attn = (q @ (k.mT if self.kt == "mT" else k.transpose(-2, -1))) * self.dim ** -0.5
        return x + self.proj(merge_heads(attn.softmax(dim=-1) @ v))


# ---------------------------------------------------------------------------------------------
# training and scoring setups


def examples(n: int = 16):
    """``n`` seeded 32x32 RGB images and labels of 10 classes."""
    g = torch.Generator().manual_seed(2)
    return torch.randn(n, 3, 32, 32, generator=g), torch.randint(0, 10, (n,), generator=g)


def train_all(batch_size: int) -> dict:
    """Fine-tune (masked), learn thresholds (with weights) and train exits for two steps each.

    One process with ``batch_size=8`` and two ranks with ``batch_size=4`` see the same examples
    in every step, so data parallelism must give the same weights.
    """
    from torch.utils.data import DataLoader, TensorDataset

    from vitgraph.passes.depth import add_exits, train_exits
    from vitgraph.passes.recovery import MaskKeeper, finetune
    from vitgraph.passes.threshold import learn_thresholds

    # no q/k/v bias: the key bias has no effect on the output, so its gradient is rounding noise
    # that Adam scales up to a full step, differently in every summation order
    model = tiny_vit(depth=2, embed_dim=24, num_heads=2, mlp_ratio=2.0, qkv_bias=False)
    x, y = examples()
    an = vitgraph.analyze(model, x[:1])
    batches = [(x[i:i + batch_size], y[i:i + batch_size]) for i in range(0, len(x), batch_size)]
    out = {}
    plan = vitgraph.Plan.random(an, 0.5, kinds=("ffn", "qk", "v", "head"), seed=3)
    student = vitgraph.mask(model, plan, an)
    log = finetune(student, batches, teacher=model, loss="upvit", lr=1e-3, keeper=MaskKeeper(student, an, plan),
                   log_every=0)
    out["finetune"] = {k: v.detach().clone() for k, v in student.state_dict().items()}
    out["finetune_steps"] = log.steps
    res = learn_thresholds(model, an, batches, target=0.6, steps=2, lr=0.05, train_weights=True, weight_lr=1e-3,
                           log_every=0)
    out["thresholds"] = {**{f"scores.{k}": v for k, v in res.scores.items()}, **res.weights}
    out["thresholds_keep"] = res.keep
    torch.manual_seed(5)
    em = add_exits(model, an, ["blocks.0"], num_classes=10)
    loader = DataLoader(TensorDataset(x, y), batch_size=batch_size)  # examples shared out, not batches
    out["exits_steps"] = len(train_exits(em, loader, steps=2, lr=1e-2, log_every=0))
    out["exits"] = {k: v.detach().clone() for k, v in em.heads[0].state_dict().items()}
    return out


def trained_tiny(steps: int = 150):
    """A tiny ViT trained to fit a small labelled set (gradients near zero at the end)."""
    torch.manual_seed(0)
    model = tiny_vit(depth=2, embed_dim=24, num_heads=2, mlp_ratio=4.0, img_size=16, patch_size=4).train()
    g = torch.Generator().manual_seed(3)
    proto = torch.randn(10, 3, 16, 16, generator=g)
    y = torch.randint(0, 10, (256,), generator=g)
    x = proto[y] + 0.8 * torch.randn(256, 3, 16, 16, generator=g)
    opt = torch.optim.Adam(model.parameters(), 3e-3)
    for step in range(steps):
        i = torch.arange(step * 32, step * 32 + 32) % 256
        loss = F.cross_entropy(model(x[i]), y[i])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval(), x, y


def floats(rows) -> torch.Tensor:
    """Hand-written numbers as a float32 tensor."""
    return torch.tensor(rows, dtype=torch.float32)


def fill_params(m: torch.nn.Module, **values) -> torch.nn.Module:
    """Copy hand-written values into ``m``'s parameters (``fc1__weight`` names ``fc1.weight``),
    reshaped to each parameter's shape; ``m`` in eval mode."""
    params = dict(m.named_parameters())
    with torch.no_grad():
        for name, v in values.items():
            p = params[name.replace("__", ".")]
            p.copy_(floats(v).reshape(p.shape))
    return m.eval()
