"""Invariants of analyze / Plan / compress / mask on timm ViTs (see DESIGN.md)."""
from __future__ import annotations

import copy

import pytest
import timm
import torch

import vitgraph
from vitgraph.deploy.measure import count_flops, count_params

from helpers import random_plan, rel_err, tiny_vit


def test_groups_of_a_vit(x32):
    an = vitgraph.analyze(tiny_vit(), x32[:1])
    kinds = sorted(g.kind for g in an.groups)
    assert kinds == sorted(["residual"] + ["head", "qk", "v", "ffn"] * 2)
    assert an.group("blocks.1.attn:qk").size == 16 and an.group("blocks.1.attn:qk").per_head
    assert an.group("blocks.0.attn:head").size == 3
    assert an.group("blocks.0.mlp:ffn").size == 96
    assert an.group("residual").size == 48
    params = {p for p, _ in an.group("residual").params}
    assert {"cls_token", "pos_embed", "patch_embed.proj.weight", "norm.weight", "head.weight"} <= params
    assert any("head.weight" in f.where for f in an.frozen)  # model output is frozen
    assert "blocks.0.attn:qk" in str(an)
    assert "tied by" in an.explain("blocks.0.attn:v")


@pytest.mark.parametrize("kw", [{}, {"class_token": False, "global_pool": "avg"}, {"init_values": 1e-2, "qkv_bias": False}])
def test_identity_plan(kw, x32):
    m = tiny_vit(**kw)
    an = vitgraph.analyze(m, x32[:1])
    out = vitgraph.compress(m, vitgraph.Plan.keep_all(an))
    torch.testing.assert_close(out(x32), m(x32), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kinds", [("qk",), ("v",), ("head",), ("ffn",), ("qk", "v", "head", "ffn")])
def test_masked_equivalence(kinds, x32):
    m = tiny_vit()
    an = vitgraph.analyze(m, x32[:1])
    plan = random_plan(an, kinds, seed=len(kinds))
    slim, masked = vitgraph.compress(m, plan), vitgraph.mask(m, plan)
    assert rel_err(slim(x32), masked(x32)) <= 1e-5
    assert slim(x32).shape == m(x32).shape
    assert count_params(slim) < count_params(m)


def test_qk_and_v_end_at_different_sizes(x32):
    m = tiny_vit()
    an = vitgraph.analyze(m, x32[:1])
    plan = vitgraph.Plan.keep_all(an)
    plan.keep("blocks.0.attn:qk", [[0, 5, 9]] * 3).keep("blocks.0.attn:v", list(range(11)))
    slim = vitgraph.compress(m, plan)
    assert rel_err(slim(x32), vitgraph.mask(m, plan)(x32)) <= 1e-5
    w = dict(slim.named_parameters())["blocks.0.attn.qkv.weight"]
    assert w.shape == (3 * 3 + 3 * 3 + 3 * 11, 48)
    assert dict(slim.named_parameters())["blocks.0.attn.proj.weight"].shape == (48, 33)


def test_shrinking_qk_keeps_the_attention_scale(x32):
    m = tiny_vit()
    an = vitgraph.analyze(m, x32[:1])
    plan = vitgraph.Plan.keep_all(an).keep("blocks.0.attn:qk", list(range(8)))
    slim = vitgraph.compress(m, plan)
    ref = copy.deepcopy(m)
    with torch.no_grad():  # zero the removed q/k rows by hand: the dot products then match
        w, b = ref.blocks[0].attn.qkv.weight, ref.blocks[0].attn.qkv.bias
        for sec in (0, 1):
            for h in range(3):
                rows = slice(sec * 48 + h * 16 + 8, sec * 48 + h * 16 + 16)
                w[rows] = 0
                b[rows] = 0
    assert rel_err(slim(x32), ref(x32)) <= 1e-5


def _slice_vit_state(sd: dict, R: list[int], D: list[int], F: list[int], C: int, H: int) -> dict:
    """Slice a timm ViT state dict by hand: residual R, per-head dims D (q, k and v), hidden F."""
    hd = C // H
    attn = [h * hd + d for h in range(H) for d in D]
    qkv = [s * C + a for s in range(3) for a in attn]
    out = {}
    for k, v in sd.items():
        if k.endswith("qkv.weight"):
            v = v[qkv][:, R]
        elif k.endswith("qkv.bias"):
            v = v[qkv]
        elif k.endswith("proj.weight") and "attn" in k:
            v = v[R][:, attn]
        elif k.endswith("fc1.weight"):
            v = v[F][:, R]
        elif k.endswith("fc1.bias"):
            v = v[F]
        elif k.endswith("fc2.weight"):
            v = v[R][:, F]
        elif k == "head.weight":
            v = v[:, R]
        elif k == "patch_embed.proj.weight":
            v = v[R]
        elif v.shape[-1] == C and k != "head.bias":
            v = v[..., R]
        out[k] = v
    return out


def test_residual_pruning_matches_a_narrower_vit(x32):
    m = tiny_vit(init_values=0.1)
    an = vitgraph.analyze(m, x32[:1])
    R, D, F = list(range(0, 48, 2)), [0, 2, 4, 6, 8, 10, 12, 14], list(range(0, 96, 2))
    plan = vitgraph.Plan.keep_all(an).keep("residual", R)
    for b in range(2):
        plan.keep(f"blocks.{b}.attn:qk", D).keep(f"blocks.{b}.attn:v", D).keep(f"blocks.{b}.mlp:ffn", F)
    slim = vitgraph.compress(m, plan)
    narrow = tiny_vit(init_values=0.1, embed_dim=24)
    narrow.load_state_dict(_slice_vit_state(m.state_dict(), R, D, F, 48, 3))
    for blk in narrow.blocks:  # vitgraph keeps the original attention scale
        blk.attn.fused_attn, blk.attn.scale = False, 16 ** -0.5
    assert rel_err(slim(x32), narrow(x32)) <= 1e-5
    assert count_params(slim) == count_params(narrow)


def test_params_and_flops_drop_as_planned(x32):
    m = tiny_vit()
    an = vitgraph.analyze(m, x32[:1])
    plan = vitgraph.Plan.keep_all(an)
    for b in range(2):
        plan.keep(f"blocks.{b}.mlp:ffn", list(range(40)))  # remove 56 of 96 hidden units
    slim = vitgraph.compress(m, plan)
    removed, C, N = 56, 48, 17  # 16 patches + class token
    assert count_params(m) - count_params(slim) == 2 * removed * (2 * C + 1)
    assert count_flops(m, (x32[:1],)) - count_flops(slim, (x32[:1],)) == 2 * 4 * N * C * removed


def test_from_scores_ratio_and_rounding(x32):
    an = vitgraph.analyze(tiny_vit(), x32[:1])
    plan = vitgraph.Plan.from_scores(an, ratio=0.5, kinds=["ffn", "qk"], round_to=8)
    assert len(plan.kept["blocks.0.mlp:ffn"]) == 48
    assert all(len(r) == 8 for r in plan.kept["blocks.0.attn:qk"])
    assert "residual" not in plan.kept
    scores = {"blocks.0.mlp:ffn": torch.arange(96.0)}
    plan = vitgraph.Plan.from_scores(an, scores, ratio=0.25, kinds=["ffn"])
    assert plan.kept["blocks.0.mlp:ffn"] == list(range(24, 96))


def test_plan_json_round_trip_on_a_fresh_model(x32):
    m = tiny_vit()
    an = vitgraph.analyze(m, x32[:1])
    first = vitgraph.Plan.from_scores(an, ratio=0.5)
    other = tiny_vit()  # same architecture and seed, new object: the plan is re-validated against it
    plan = vitgraph.Plan.from_json(first.to_json())
    assert plan.kept == first.kept
    slim = vitgraph.compress(other, plan)
    torch.testing.assert_close(slim(x32), vitgraph.compress(m, first)(x32), rtol=0, atol=0)
    assert slim(x32).shape == (2, 10)


def test_input_model_is_not_mutated(x32):
    m = tiny_vit()
    before = {k: v.clone() for k, v in m.state_dict().items()}
    y = m(x32)
    an = vitgraph.analyze(m, x32[:1])
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)
    vitgraph.compress(m, plan)
    vitgraph.mask(m, plan)
    assert all(torch.equal(before[k], v) for k, v in m.state_dict().items())
    torch.testing.assert_close(m(x32), y, rtol=0, atol=0)


def test_onnx_export_of_a_compressed_model(x32, tmp_path):
    from vitgraph.deploy.export import export_onnx

    m = tiny_vit()
    an = vitgraph.analyze(m, x32[:1])
    slim = vitgraph.compress(m, random_plan(an, ("residual", "head", "qk", "v", "ffn")))
    rep = export_onnx(slim, tmp_path / "m.onnx", (x32[:1],))
    assert rep.max_abs_diff < 1e-4 and (tmp_path / "m.onnx").exists()
    assert not {"Gather", "ScatterND", "Pad"} & set(rep.op_types) - set(export_onnx(m, tmp_path / "d.onnx", (x32[:1],)).op_types)


def test_distilled_deit(x32):
    m = timm.create_model("deit_tiny_distilled_patch16_224", pretrained=False, img_size=32, depth=1, embed_dim=48,
                          num_heads=3).eval()
    an = vitgraph.analyze(m, x32[:1])
    assert "dist_token" in {p for p, _ in an.group("residual").params}
    plan = random_plan(an, ("qk", "v", "head", "ffn"))
    assert rel_err(vitgraph.compress(m, plan)(x32), vitgraph.mask(m, plan)(x32)) <= 1e-5


def test_feature_output_protected_unless_prune_outputs(x32):
    """A feature extractor (no classifier) returns the residual stream: frozen by default, prunable
    with prune_outputs=True, and then equal to the narrower feature extractor; the flag survives JSON."""
    m = tiny_vit(num_classes=0)
    assert "residual" not in {g.kind for g in vitgraph.analyze(m, x32[:1]).groups}
    an = vitgraph.analyze(m, x32[:1], prune_outputs=True)
    R, D, F = list(range(1, 48, 2)), list(range(0, 16, 2)), list(range(0, 96, 2))
    plan = vitgraph.Plan.keep_all(an).keep("residual", R)
    for b in range(2):
        plan.keep(f"blocks.{b}.attn:qk", D).keep(f"blocks.{b}.attn:v", D).keep(f"blocks.{b}.mlp:ffn", F)
    plan = vitgraph.Plan.from_json(plan.to_json())
    assert plan.prune_outputs
    slim = vitgraph.compress(m, plan)
    narrow = tiny_vit(num_classes=0, embed_dim=24)
    narrow.load_state_dict(_slice_vit_state(m.state_dict(), R, D, F, 48, 3))
    for blk in narrow.blocks:  # vitgraph keeps the original attention scale
        blk.attn.fused_attn, blk.attn.scale = False, 16 ** -0.5
    assert slim(x32).shape == (x32.shape[0], 24)
    assert rel_err(slim(x32), narrow(x32)) <= 1e-5
    with pytest.raises(vitgraph.PlanError, match="prune_outputs"):
        vitgraph.Plan.from_json(plan.to_json().replace("true", '"yes"'))
