"""The compressed model keeps the input model's API: its tensor methods (each exact against the
masked model), its plain attributes, an HF config with the changed widths marked, and
``reset_classifier`` through save and load."""
from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import vitgraph
from vitgraph.artifact import Source
from vitgraph.passes.keep_api import public_tensor_methods

from helpers import random_plan, rel_err, tiny_vit

BLOCK_KINDS = ("qk", "v", "head", "ffn")  # masking is exact for these


def _setup(kinds, **kw):
    model = tiny_vit(**kw)
    x = torch.randn(1, 3, 32, 32)
    an = vitgraph.analyze(model, x)
    plan = random_plan(an, kinds, seed=3)
    return model, an, plan


def test_discovery_takes_tensor_methods_only():
    names = public_tensor_methods(tiny_vit())
    assert {"forward_features", "forward_head", "forward_intermediates"} <= set(names)
    # methods that take no tensor, or change the model, are never captured
    assert not {"reset_classifier", "init_weights", "set_input_size", "no_weight_decay"} & set(names)


def test_timm_methods_exact_against_masked_model(x32):
    model, an, plan = _setup(BLOCK_KINDS)
    slim, masked = vitgraph.compress(model, plan, an), vitgraph.mask(model, plan, an)
    with torch.no_grad():
        f, fm = slim.forward_features(x32), masked.forward_features(x32)
        assert f.shape == fm.shape and rel_err(f, fm) < 1e-5
        assert rel_err(slim.forward_head(f), masked.forward_head(fm)) < 1e-5
        assert rel_err(slim.forward_head(f, pre_logits=False), masked.forward_head(fm)) < 1e-5
        with pytest.raises(vitgraph.VitgraphError, match="runs with its captured options.*pre_logits=False"):
            slim.forward_head(f, pre_logits=True)
        last, inter = slim.forward_intermediates(x32)
        last_m, inter_m = masked.forward_intermediates(x32)
        assert rel_err(last, last_m) < 1e-5
        assert len(inter) == len(inter_m) and all(rel_err(a, b) < 1e-5 for a, b in zip(inter, inter_m))


def test_residual_pruned_methods_compose_to_forward(x32):
    model, an, plan = _setup(BLOCK_KINDS + ("residual",))
    slim = vitgraph.compress(model, plan, an)
    kept = len(plan.kept["residual"])
    with torch.no_grad():
        f = slim.forward_features(x32)
        assert f.shape[-1] == kept < model.embed_dim  # the features are the kept residual channels
        assert torch.allclose(slim.forward_head(f), slim(x32), atol=1e-6)
    assert slim.vitgraph_widths["embed_dim"] == f"residual: {model.embed_dim} -> {kept}"
    assert slim.embed_dim == model.embed_dim  # marked, not rewritten


def test_attributes_and_deepcopy(x32):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    an = vitgraph.analyze(model, x32[:1])
    plan = random_plan(an, BLOCK_KINDS, seed=2)
    slim = vitgraph.compress(model, plan, an)
    assert slim.num_classes == 10 and slim.pretrained_cfg == model.pretrained_cfg
    assert slim.pretrained_cfg is not model.pretrained_cfg  # a copy: the dense model's stays its own
    twin = copy.deepcopy(slim)
    with torch.no_grad():
        assert torch.equal(twin.forward_features(x32), slim.forward_features(x32))
    plain = vitgraph.compress(model, plan, an, keep_api=False)
    assert not hasattr(plain, "forward_features") and not hasattr(plain, "num_classes")


def test_reset_classifier_saves_and_reloads(tmp_path, x32):
    import timm

    model = timm.create_model("vit_tiny_patch16_224", img_size=32, patch_size=8, depth=2, num_classes=10).eval()
    an = vitgraph.analyze(model, x32[:1])
    plan = random_plan(an, BLOCK_KINDS + ("residual",), seed=1)
    slim = vitgraph.compress(model, plan, an)
    slim.reset_classifier(4)
    with torch.no_grad():
        out = slim(x32)
        assert out.shape == (2, 4) and slim.num_classes == 4
        feats = slim.forward_head(slim.forward_features(x32))  # the methods read the new head
        assert torch.allclose(feats, out, atol=1e-6)
    source = Source("timm", "vit_tiny_patch16_224", {"img_size": 32, "patch_size": 8, "depth": 2, "num_classes": 10},
                    (3, 32, 32))
    vitgraph.save(tmp_path / "r", slim, plan, source)
    back = vitgraph.load(tmp_path / "r")
    with torch.no_grad():
        assert torch.equal(back(x32), out)
        assert torch.allclose(back.forward_head(back.forward_features(x32)), out, atol=1e-6)  # methods reload too
    assert back.num_classes == 4
    slim.reset_classifier(0)
    with torch.no_grad():
        assert slim(x32).shape == (2, len(plan.kept["residual"]))  # pre-logits features
    with pytest.raises(vitgraph.VitgraphError, match="num_classes must be an integer"):
        slim.reset_classifier(-1)


def test_hf_config_kept_with_changed_widths_marked():
    transformers = pytest.importorskip("transformers")
    cfg = transformers.ViTConfig(hidden_size=48, num_hidden_layers=2, num_attention_heads=3, intermediate_size=96,
                                 image_size=32, patch_size=8, num_labels=3, id2label={0: "a", 1: "b", 2: "c"})
    model = transformers.ViTForImageClassification(cfg).eval()
    x = torch.randn(1, 3, 32, 32)
    an = vitgraph.analyze(model, x)
    plan = random_plan(an, ("ffn",), seed=0)
    slim = vitgraph.compress(model, plan, an)
    assert slim.config.id2label == {0: "a", 1: "b", 2: "c"}
    assert slim.config.vitgraph_widths == {"intermediate_size": "ffn: 96 -> 48"}
    assert model.config.to_dict().get("vitgraph_widths") is None  # the dense model's config is untouched
    assert type(slim(x)).__name__ == "ImageClassifierOutput"


class _Toy(nn.Module):
    """A model with one tensor method that works and one that cannot be captured."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(8, 16), nn.Linear(16, 8)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.hidden(x))

    def hidden(self, x: torch.Tensor) -> torch.Tensor:
        return torch.relu(self.fc1(x))

    def data_dependent(self, x: torch.Tensor) -> torch.Tensor:
        return x if float(x.sum()) > 0 else -x  # python control flow on a value: no graph

    def scale(self, k: int) -> int:
        return 2 * k


def test_methods_that_cannot_be_kept_are_left_out():
    model = _Toy().eval()
    x = torch.randn(2, 8)
    an = vitgraph.analyze(model, x[:1])
    plan = random_plan(an, ("ffn", "other"), seed=0)
    slim = vitgraph.compress(model, plan, an)
    assert hasattr(slim, "hidden") and not hasattr(slim, "data_dependent") and not hasattr(slim, "scale")
    masked = vitgraph.mask(model, plan, an)
    kept = [g for g in an.groups if g.id in plan.kept][0]
    idx = torch.as_tensor(plan.kept[kept.id])
    with torch.no_grad():
        assert torch.allclose(slim.hidden(x), masked.hidden(x)[:, idx], atol=1e-6)
