"""Shared helpers: tiny timm ViTs with random weights and random keep-sets."""
from __future__ import annotations

import json
import os
import random
import subprocess
import sys
import textwrap
from typing import Any

import pytest
import timm
import torch

import vitgraph


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


@pytest.fixture
def x32() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


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


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny two-class image folders: (train with 8 images a class, val with 4)."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", 8, 0)
    write_image_folder(root / "val", 4, 1)
    return root / "train", root / "val"


class FlopTable(vitgraph.LatencyTable):
    """A latency table whose 'measurements' are a FLOP formula (deterministic, instant)."""

    def __init__(self, batch: int = 1) -> None:
        super().__init__("torch-cpu", batch=batch, cache_dir=False)
        self.path = None

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
