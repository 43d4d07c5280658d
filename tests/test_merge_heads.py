"""UP-ViT head merging: consecutive heads become one, then each merged head keeps its best dims."""
from __future__ import annotations

import copy

import pytest
import torch

import vitgraph

from helpers import rel_err, tiny_vit


def _reference(model: torch.nn.Module, heads: int, head_dim: int, scale_dim: int) -> torch.nn.Module:
    """The same weights computed with fewer, wider heads by timm's own (unfused) attention."""
    ref = copy.deepcopy(model)
    for b in ref.blocks:
        b.attn.num_heads, b.attn.head_dim = heads, head_dim
        b.attn.scale, b.attn.fused_attn = scale_dim ** -0.5, False
    return ref


def test_merged_heads_compute_wider_heads_with_the_original_scale():
    model = tiny_vit(num_heads=4, embed_dim=48)
    x = torch.randn(2, 3, 32, 32)
    an = vitgraph.analyze(model, x[:1])
    merged = vitgraph.merge_heads(an, 2)
    ref = _reference(model, 2, 24, 12)
    assert rel_err(merged(x), ref(x)) < 1e-5
    assert rel_err(model(x), ref(x)) > 1e-4  # merging really changes the function
    assert sum(p.numel() for p in merged.parameters()) == sum(p.numel() for p in model.parameters())


def test_head_merge_plan_keeps_best_dims_per_merged_head():
    model = tiny_vit(num_heads=4, embed_dim=48)
    x = torch.randn(2, 3, 32, 32)
    merged = vitgraph.merge_heads(vitgraph.analyze(model, x[:1]), 2)
    an = vitgraph.analyze(merged, x[:1])
    heads = [g for g in an.groups if g.kind == "head"]
    assert [g.size for g in heads] == [2, 2]
    qk = an.group("blocks.0.attn:qk")
    assert qk.size == 24 and qk.per_head
    plan = vitgraph.head_merge_plan(an, 12)
    slim = vitgraph.compress(merged, plan, an)
    assert slim(x).shape == (2, 10)
    qkv = dict(slim.named_parameters())["blocks.0.attn.qkv.weight"]
    assert qkv.shape == (3 * 2 * 12, 48)
    masked = vitgraph.mask(merged, plan, an)
    assert rel_err(slim(x), masked(x)) < 1e-5


def test_merge_heads_errors():
    model = tiny_vit(num_heads=4, embed_dim=48)
    an = vitgraph.analyze(model, torch.randn(1, 3, 32, 32))
    with pytest.raises(vitgraph.PlanError, match="3 heads do not divide its 4 heads"):
        vitgraph.merge_heads(an, 3)
    with pytest.raises(vitgraph.PlanError, match="not a head group"):
        vitgraph.merge_heads(an, {"blocks.0.mlp:ffn": 2})
