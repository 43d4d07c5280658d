"""HuggingFace transformers vision models, small configs with random weights (no downloads).

The whole list is ``benchmarks/hf_models.txt`` (``python benchmarks/coverage.py --list
benchmarks/hf_models.txt``); these run a subset in CI.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import vitgraph
from vitgraph.check import check_model
from vitgraph.models import load_model_and_source, parse_model_args

transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")

VIT = ("hf:ViTForImageClassification hidden_size=64 num_hidden_layers=2 num_attention_heads=4 "
       "intermediate_size=128 image_size=32 patch_size=8 num_labels=5")
SWIN = ("hf:SwinForImageClassification image_size=32 patch_size=2 embed_dim=32 depths=[1,1,2,1] "
        "num_heads=[2,2,4,4] window_size=2 num_labels=5")
CLIP = ("hf:CLIPVisionModelWithProjection hidden_size=64 num_hidden_layers=2 num_attention_heads=4 "
        "intermediate_size=128 image_size=32 patch_size=8 projection_dim=16")


def _load(line: str, batch: int = 2):
    spec, *args = line.split()
    return load_model_and_source(spec, batch=batch, model_args=parse_model_args(args))


@pytest.mark.parametrize("line", [VIT, SWIN], ids=["vit", "swin"])
def test_coverage_checks(line):
    model, x, _ = _load(line)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = check_model(model, x, onnx=line is VIT)
    assert rep.error is None, rep.error
    assert all(rep.groups.get(k, 0) >= 1 for k in ("residual", "head", "qk", "v", "ffn")), rep.groups
    assert rep.masked_rel_err <= 1e-5 and rep.shape_ok
    assert rep.params[1] < rep.params[0] and rep.flops[1] < rep.flops[0]
    assert [p.plan for p in rep.ragged] == ["qk-only", "v-only"]
    assert all(p.error is None and p.masked_rel_err <= 1e-5 for p in rep.ragged), rep.ragged


def test_model_output_type_keys_and_shapes_are_kept():
    model, x, _ = _load(CLIP)
    an = vitgraph.analyze(model, x)
    assert an.front_end.startswith("meta-value proxies")
    slim = vitgraph.compress(model, vitgraph.Plan.from_scores(an, ratio=0.5), an)
    with torch.no_grad():
        ref, out = model(x), slim(x)
    assert type(out) is type(ref) and list(out.keys()) == list(ref.keys())
    assert [v.shape for v in out.values()] == [v.shape for v in ref.values()]  # every output protected


def test_local_directory_compresses_reloads_and_exports(tmp_path):
    model, _, _ = _load(VIT)
    model.save_pretrained(tmp_path / "vit")
    loaded, x, source = load_model_and_source(f"hf:{tmp_path / 'vit'}", batch=2)
    assert source.kind == "transformers" and source.name == "ViTForImageClassification"
    with torch.no_grad():
        assert torch.equal(loaded(x).logits, model(x).logits)  # the directory's weights, not random ones
    an = vitgraph.analyze(loaded, x)
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)
    slim = vitgraph.compress(loaded, plan, an)
    vitgraph.save(tmp_path / "out", slim, plan, source)
    back = vitgraph.load(tmp_path / "out")
    with torch.no_grad():
        assert torch.equal(back(x).logits, slim(x).logits)
    report = vitgraph.export_onnx(back, tmp_path / "m.onnx", (x,))  # parity checked at two batch sizes
    assert report is not None


def test_backbone_keeps_every_feature_map():
    model = transformers.Dinov2Backbone(transformers.Dinov2Config(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, intermediate_size=128, image_size=32,
        patch_size=8, out_features=["stage1", "stage2"])).eval()
    x = torch.randn(2, 3, 32, 32)
    an = vitgraph.analyze(model, x)
    slim = vitgraph.compress(model, vitgraph.Plan.from_scores(an, ratio=0.5), an)
    with torch.no_grad():
        ref, out = model(x), slim(x)
    assert type(out) is type(ref)
    assert [t.shape for t in out.feature_maps] == [t.shape for t in ref.feature_maps]


def _offlist(cls: str) -> str:
    """The line of ``benchmarks/hf_offlist_models.txt`` (families off issue 12's list) for ``cls``."""
    from pathlib import Path

    path = Path(__file__).resolve().parents[1] / "benchmarks" / "hf_offlist_models.txt"
    return next(line.strip() for line in path.read_text().splitlines() if line.startswith(f"hf:{cls} "))


@pytest.mark.parametrize("cls, kinds", [
    ("PvtV2ForImageClassification", ("residual", "qk", "v", "ffn")),  # heads split by a computed shape
    ("HieraForImageClassification", ("residual", "head", "qk", "v", "ffn")),  # query pooling by max().values
    ("CvtForImageClassification", ("residual", "head", "qk", "v", "ffn")),  # attention as einsums
    ("YolosForObjectDetection", ("head", "qk", "v", "ffn")),  # .to(hidden_states.device)
    ("VitDetBackbone", ("head", "qk", "v", "ffn")),  # a BackboneOutput of feature maps
])
def test_offlist_families(cls, kinds):
    model, x, _ = _load(_offlist(cls))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = check_model(model, x, onnx=False)
    assert rep.ok, rep.failures()
    assert all(rep.groups.get(k, 0) >= 1 for k in kinds), rep.groups
