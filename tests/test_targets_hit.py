"""FLOPs and parameter targets land within 2% of the requested fraction (and not above it):
plan_to_target on small timm ViTs, and vitgraph.prune's one-shot and iterative rounds."""
from __future__ import annotations

import pytest
import timm
import torch

import vitgraph
from vitgraph import CostModel, plan_to_target

SHAPES = [(96, 4), (192, 4), (96, 6), (192, 8)]  # (embed_dim, depth): wide shallow to narrow deep
TOL = 0.02


def small_vit(embed_dim: int, depth: int) -> torch.nn.Module:
    """The benchmarks' Fashion-MNIST ViT shape (28x28, patch 4, 3 heads), random weights."""
    torch.manual_seed(0)
    return timm.models.vision_transformer.VisionTransformer(
        img_size=28, patch_size=4, in_chans=1, num_classes=10, embed_dim=embed_dim, depth=depth, num_heads=3).eval()


@pytest.fixture(scope="module")
def analyses():
    cache = {}

    def get(shape):
        if shape not in cache:
            cache[shape] = vitgraph.analyze(small_vit(*shape), torch.randn(1, 1, 28, 28))
        return cache[shape]
    return get


def cheap_residual_scores(an: vitgraph.Analysis, seed: int = 0) -> dict:
    """Random scores with the residual stream priced low (as second-order scores of LayerNorm'd
    channels come out): the greedy removes residual units first, the coarsest there are."""
    g = torch.Generator().manual_seed(seed)
    out = {}
    for grp in an.groups:
        shape = (an.group(grp.head_group).size, grp.size) if grp.kind in ("qk", "v") else (grp.size,)
        out[grp.id] = torch.rand(shape, generator=g) * (0.01 if grp.kind == "residual" else 1.0)
    return out


def achieved(an: vitgraph.Analysis, plan: vitgraph.Plan, target: str) -> float:
    cm = CostModel(an)
    w = {gid: len(k[0]) if isinstance(k[0], list) else len(k) for gid, k in plan.kept.items()}
    return cm.cost(target, w) / cm.cost(target, {})


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}x{s[1]}")
@pytest.mark.parametrize("target", ["flops", "params"])
@pytest.mark.parametrize("scores", ["magnitude", "cheap-residual"])
def test_plan_to_target_lands_within_2pct(analyses, shape, target, scores):
    an = analyses(shape)
    s = None if scores == "magnitude" else cheap_residual_scores(an)
    for fraction in (0.3, 0.5, 0.7):
        got = achieved(an, plan_to_target(an, s, target=target, fraction=fraction, normalize=s is None), target)
        assert got <= fraction * (1 + 1e-9), (fraction, got)
        assert got >= fraction * (1 - TOL), (fraction, got)


@pytest.mark.parametrize("round_to", [8, 16])
def test_rounded_plans_land_within_2pct(analyses, round_to):
    an = analyses((96, 4))
    s = cheap_residual_scores(an, seed=1)
    for target in ("flops", "params"):
        for fraction in (0.3, 0.5, 0.7):
            plan = plan_to_target(an, s, target=target, fraction=fraction, round_to=round_to, normalize=False)
            for gid, k in plan.kept.items():
                g = an.group(gid)
                n = len(k[0]) if isinstance(k[0], list) else len(k)
                assert g.kind == "head" or n % round_to == 0 or n == g.size, (gid, n)
            got = achieved(an, plan, target)
            assert fraction * (1 - TOL) <= got <= fraction, (target, fraction, got)


def _batches(n: int = 2, bs: int = 8) -> list:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(bs, 1, 28, 28, generator=g), torch.randint(0, 10, (bs,), generator=g)) for _ in range(n)]


@pytest.mark.parametrize("schedule,steps", [("oneshot", 1), ("iterative", 2)])
@pytest.mark.parametrize("target", ["flops:0.5", "params:0.3"])
def test_prune_lands_within_2pct(schedule, steps, target):
    """vitgraph.prune measures its result with count_flops/count_params: the figure users see."""
    kind, fraction = target.split(":")
    fraction = float(fraction)
    r = vitgraph.prune(small_vit(192, 4), _batches(), method="magnitude", target=target, finetune_epochs=0,
                       measure=False, schedule=schedule, steps=steps, score_batches=2)
    st = r.stages
    got = (st["fine-tuned"].flops / st["dense"].flops) if kind == "flops" else (st["fine-tuned"].params / st["dense"].params)
    assert fraction * (1 - TOL) <= got <= fraction * (1 + 1e-9), got
    assert len(r.rounds) == steps
