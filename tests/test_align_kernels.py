"""align="kernels": widths fused GPU attention and GEMM kernels run fast, on several families, with
FLOPs/params targets still landing within 2%; the compressed model's fused attention gets equal
q/k/v head dims."""
from __future__ import annotations

import json

import pytest
import timm
import torch
from torch.overrides import TorchFunctionMode

import vitgraph
from vitgraph import CostModel, PlanError, plan_to_target
from vitgraph.planning.align import attention_pairs, kernel_violations

from helpers import FlopTable

TOL = 0.02


def kept(plan: vitgraph.Plan, g) -> int:
    k = plan.kept.get(g.id)
    return g.size if k is None else (len(k[0]) if isinstance(k[0], list) else len(k))


def assert_kernel_widths(an: vitgraph.Analysis, plan: vitgraph.Plan) -> None:
    """The rules written out: equal q/k and v per attention, multiple of 8 and >= 16 (or a dense head
    dim below 16 kept whole); FFN and residual multiples of 64 or full."""
    pairs = attention_pairs(an)
    assert pairs, "no attention found"
    for qk, v in pairs.values():
        assert qk is not None and v is not None
        nq, nv = kept(plan, qk), kept(plan, v)
        assert nq == nv, (qk.id, nq, v.id, nv)
        if qk.size < 16:
            assert nq == qk.size
        elif nq != qk.size:
            assert nq % 8 == 0 and nq >= 16, (qk.id, nq)
    for g in an.groups:
        n = kept(plan, g)
        if g.kind in ("ffn", "residual") and n != g.size:
            assert n % 64 == 0, (g.id, n)
    assert kernel_violations(an, plan) == []


def achieved(an: vitgraph.Analysis, plan: vitgraph.Plan, target: str) -> float:
    cm = CostModel(an)
    return cm.cost(target, {g.id: kept(plan, g) for g in an.groups}) / cm.cost(target, {})


def _deit_tiny():
    return timm.create_model("deit_tiny_patch16_224", img_size=64, num_classes=10).eval(), torch.randn(1, 3, 64, 64)


def _swin():
    m = timm.models.swin_transformer.SwinTransformer(img_size=56, patch_size=4, window_size=7, embed_dim=96,
                                                     depths=(2, 2), num_heads=(3, 6), num_classes=10)
    return m.eval(), torch.randn(1, 3, 56, 56)


def _torchvision_vit():
    from torchvision.models.vision_transformer import VisionTransformer

    m = VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=128, mlp_dim=512,
                          num_classes=10)
    return m.eval(), torch.randn(1, 3, 32, 32)


def _hf_vit():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=128, num_hidden_layers=2, num_attention_heads=4, intermediate_size=512,
                                 image_size=32, patch_size=8, num_labels=5)
    return transformers.ViTForImageClassification(cfg).eval(), torch.randn(1, 3, 32, 32)


FAMILIES = {"timm-deit_tiny": _deit_tiny, "timm-swin": _swin, "torchvision-vit": _torchvision_vit, "hf-vit": _hf_vit}


@pytest.mark.parametrize("family", list(FAMILIES))
def test_kernel_aligned_plans_hit_targets(family):
    torch.manual_seed(0)
    model, x = FAMILIES[family]()
    an = vitgraph.analyze(model, x)
    fractions = (0.3, 0.5, 0.7) if family == "timm-deit_tiny" else (0.5,)
    for target in ("flops", "params"):
        for fraction in fractions:
            plan = plan_to_target(an, target=target, fraction=fraction, round_to=8, align="kernels")
            assert plan.kept, "the plan removes nothing"
            assert_kernel_widths(an, plan)
            got = achieved(an, plan, target)
            assert fraction * (1 - TOL) <= got <= fraction * (1 + 1e-9), (target, fraction, got)
    out = vitgraph.compress(model, plan, an)(x)
    ref = model(x)
    ref = getattr(ref, "logits", ref)
    assert getattr(out, "logits", out).shape == ref.shape


def test_kernel_alignment_in_uniform_mode_and_from_scores():
    model, x = _deit_tiny()
    an = vitgraph.analyze(model, x)
    plan = plan_to_target(an, target="flops", fraction=0.5, mode="uniform", align="kernels")
    assert_kernel_widths(an, plan)
    assert achieved(an, plan, "flops") <= 0.5
    for ratio in (0.3, 0.5, 0.7):
        assert_kernel_widths(an, vitgraph.Plan.from_scores(an, ratio=ratio, round_to=8, align="kernels"))
    with pytest.raises(PlanError, match="align"):
        plan_to_target(an, fraction=0.5, align="tensor-cores")


def test_unpaired_attention_groups_stay_dense():
    """Without v in the planned kinds, q/k cannot be matched to it, so it keeps its full width."""
    model, x = _deit_tiny()
    an = vitgraph.analyze(model, x)
    plan = plan_to_target(an, target="flops", fraction=0.6, kinds=("residual", "qk", "ffn"), align="kernels")
    assert all(an.group(gid).kind != "qk" for gid in plan.kept)
    assert_kernel_widths(an, plan)


class SDPARecorder(TorchFunctionMode):
    """Records the q, k, v shapes of every F.scaled_dot_product_attention call."""

    def __init__(self):
        super().__init__()
        self.calls = []

    def __torch_function__(self, func, types, args=(), kwargs=None):
        if getattr(func, "__name__", "") == "scaled_dot_product_attention":
            self.calls.append(tuple(tuple(a.shape) for a in args[:3]))
        return func(*args, **(kwargs or {}))


def test_compressed_model_runs_fused_attention_with_equal_head_dims():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=32, patch_size=8, embed_dim=192, depth=2,
                                                             num_heads=3, num_classes=10).eval()
    assert all(b.attn.fused_attn for b in model.blocks), "timm's fused attention is off (TIMM_FUSED_ATTN?)"
    x = torch.randn(2, 3, 32, 32)
    an = vitgraph.analyze(model, x[:1])
    g = torch.Generator().manual_seed(3)
    scores = {grp.id: torch.rand((an.group(grp.head_group).size, grp.size) if grp.kind in ("qk", "v") else (grp.size,),
                                 generator=g) for grp in an.groups}
    plan = plan_to_target(an, scores, target="flops", fraction=0.4, round_to=8, align="kernels")
    assert any(an.group(gid).kind in ("qk", "v") for gid in plan.kept), "the plan keeps every head dim"
    slim = vitgraph.compress(model, plan, an)
    rec = SDPARecorder()
    with torch.no_grad(), rec:
        slim(x)
    assert len(rec.calls) == 2, rec.calls
    for q, k, v in rec.calls:
        assert q[-1] == k[-1] == v[-1], (q, k, v)
        assert q[-1] % 8 == 0 and q[-1] >= 16, q


def test_cli_score_plan_and_compress_align(tmp_path):
    from vitgraph.cli import main

    margs = ["--model-arg", "img_size=32", "--model-arg", "patch_size=8", "--model-arg", "embed_dim=128",
             "--model-arg", "depth=2", "--model-arg", "num_heads=2", "--model-arg", "num_classes=10"]
    plan_file = tmp_path / "plan.json"
    assert main(["score", "vit_tiny_patch16_224", *margs, "--method", "magnitude", "--out", str(tmp_path / "s.pt"),
                 "--plan", str(plan_file), "--target", "flops:0.5", "--align", "kernels"]) == 0
    model, x, _ = vitgraph.models.load_model_and_source("vit_tiny_patch16_224", model_args={
        "img_size": 32, "patch_size": 8, "embed_dim": 128, "depth": 2, "num_heads": 2, "num_classes": 10})
    an = vitgraph.analyze(model, x)
    plan = vitgraph.Plan.from_json(plan_file.read_text())
    plan.validate(an)
    assert_kernel_widths(an, plan)
    assert 0.49 <= achieved(an, plan, "flops") <= 0.5
    out = tmp_path / "c"
    assert main(["compress", "vit_tiny_patch16_224", *margs, "--ratio", "0.5", "--align", "kernels", "--reps", "1",
                 "--out", str(out)]) == 0
    assert_kernel_widths(an, vitgraph.Plan.from_json((out / "plan.json").read_text()))
    assert main(["compress", "vit_tiny_patch16_224", *margs, "--plan", str(plan_file), "--align", "kernels",
                 "--out", str(tmp_path / "d")]) == 2


def test_prune_align_kernels():
    torch.manual_seed(0)
    model = timm.models.vision_transformer.VisionTransformer(img_size=28, patch_size=4, in_chans=1, num_classes=10,
                                                             embed_dim=192, depth=4, num_heads=3).eval()
    g = torch.Generator().manual_seed(0)
    data = [(torch.randn(8, 1, 28, 28, generator=g), torch.randint(0, 10, (8,), generator=g)) for _ in range(2)]
    r = vitgraph.prune(model, data, method="magnitude", target="flops:0.5", finetune_epochs=0, measure=False,
                       score_batches=2, align="kernels")
    an = vitgraph.analyze(model, data[0][0][:1])
    assert_kernel_widths(an, r.plan)
    got = r.stages["fine-tuned"].flops / r.stages["dense"].flops
    assert 0.5 * (1 - TOL) <= got <= 0.5, got
    json.dumps(r.plan.kept)


@pytest.mark.parametrize("align", [None, "kernels"])
def test_predicted_latency_target_lands_within_2pct(align):
    model, x = _deit_tiny()
    an = vitgraph.analyze(model, x)
    table, cm = FlopTable(), CostModel(an)
    dense = cm.latency({}, table)
    for fraction in (0.3, 0.5, 0.7):
        plan = plan_to_target(an, target="latency", fraction=fraction, round_to=8, latency_table=table, align=align)
        got = cm.latency({g.id: kept(plan, g) for g in an.groups}, table) / dense
        assert fraction * (1 - TOL) <= got <= fraction * (1 + 1e-9), (fraction, got)
        if align:
            assert_kernel_widths(an, plan)
