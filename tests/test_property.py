"""Property tests: ViT configurations drawn by hypothesis hold the invariants."""
from __future__ import annotations

import timm
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import vitgraph

from helpers import random_plan, rel_err


@st.composite
def vit_configs(draw):
    heads = draw(st.integers(1, 4))
    cfg = dict(
        img_size=16, patch_size=8, num_classes=5,
        depth=draw(st.integers(1, 3)),
        num_heads=heads,
        embed_dim=heads * draw(st.sampled_from([4, 8, 12])),
        mlp_ratio=draw(st.sampled_from([1.0, 2.0, 4.0])),
        qkv_bias=draw(st.booleans()),
        init_values=draw(st.sampled_from([None, 0.1])),
    )
    distilled = draw(st.booleans())
    if not distilled and draw(st.booleans()):
        cfg.update(class_token=False, global_pool="avg")
    return cfg, distilled, draw(st.integers(0, 2**16))


def build(cfg: dict, distilled: bool) -> torch.nn.Module:
    torch.manual_seed(0)
    cls = timm.models.deit.VisionTransformerDistilled if distilled else timm.models.vision_transformer.VisionTransformer
    return cls(**cfg).eval()


@settings(max_examples=12, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(vit_configs())
def test_identity_and_masked_equivalence(drawn):
    cfg, distilled, seed = drawn
    m = build(cfg, distilled)
    x = torch.randn(2, 3, 16, 16)
    an = vitgraph.analyze(m, x[:1])
    kinds = sorted(g.kind for g in an.groups)
    assert kinds.count("residual") == 1 and kinds.count("ffn") == cfg["depth"]
    assert kinds.count("qk") == kinds.count("v") == cfg["depth"]
    ref = m(x)
    ident = vitgraph.compress(m, vitgraph.Plan.keep_all(an))
    assert rel_err(ident(x), ref) <= 1e-6
    plan = random_plan(an, ("qk", "v", "head", "ffn"), seed=seed)
    slim, masked = vitgraph.compress(m, plan), vitgraph.mask(m, plan)
    out = slim(x)
    assert out.shape == ref.shape
    assert rel_err(out, masked(x)) <= 1e-5
    assert rel_err(m(x), ref) == 0  # the input model is untouched
