"""Model zoo: every model of the public coverage list passes ``vitgraph.check.check_model``.

``test_zoo_model`` runs each listed model at full size (random weights, batch 2, default input
size, ONNX export included); these are marked ``slow`` (run them with ``pytest -m slow``).
``test_zoo_ci`` keeps five architectures in the default suite as reduced variants built from
the same timm / torchvision classes (fewer blocks, narrower or smaller input where the class
allows it), so the same forward code and op rules are exercised in a few seconds each.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import timm
import torch

from vitgraph.check import check_model
from vitgraph.models import load_model

MODELS_FILE = Path(__file__).resolve().parents[2] / "shared" / "models.txt"

# Copy of the coverage list, used when ../shared/models.txt is not present.
FALLBACK_MODELS = [
    "deit_tiny_patch16_224",
    "deit_small_distilled_patch16_224",
    "vit_base_patch16_224",
    "deit3_small_patch16_224",
    "vit_small_patch14_dinov2",
    "cait_xxs24_224",
    "beit_base_patch16_224",
    "eva02_tiny_patch14_224",
    "flexivit_small",
    "vit_relpos_small_patch16_224",
    "swin_tiny_patch4_window7_224",
    "swinv2_tiny_window8_256",
    "pvt_v2_b0",
    "twins_svt_small",
    "xcit_tiny_12_p16_224",
    "crossvit_tiny_240",
    "levit_128",
    "coat_lite_tiny",
    "pit_ti_224",
    "mvitv2_tiny",
    "torchvision:vit_b_16",
    "torchvision:swin_t",
]

MAX_ANALYSIS_S = 5.0


def read_models(path: Path = MODELS_FILE) -> list[str]:
    """Model names of the coverage list (``#`` comments and blank lines skipped), or the fallback."""
    if not path.is_file():
        return list(FALLBACK_MODELS)
    names = [line.split("#", 1)[0].strip() for line in path.read_text().splitlines()]
    return [n for n in names if n]


MODELS = read_models()

# The default-suite architectures: reduced variants of the same classes (see module docstring).
# swin: one shifted-window block in stage 1 (window 7 at 56x56, as in swin_tiny) and the
#   un-shifted 7x7 last stage; pvt_v2: every stage with its spatial-reduction attention;
# cait: two self-attention blocks plus the two class-attention blocks; eva02: rotary embeddings
#   and SwiGLU at 8x8 patches; torchvision ViT: the same VisionTransformer class, two layers.
CI_VARIANTS: dict[str, tuple[dict, int]] = {
    "swin_tiny_patch4_window7_224": (dict(embed_dim=32, depths=(2, 1, 1, 1), num_heads=(2, 4, 8, 16)), 224),
    "pvt_v2_b0": (dict(depths=(1, 1, 1, 1)), 128),
    "cait_xxs24_224": (dict(depth=2, img_size=64), 64),
    "eva02_tiny_patch14_224": (dict(depth=2, img_size=112), 112),
    "torchvision:vit_b_16": (dict(image_size=64, patch_size=16, num_layers=2, num_heads=4, hidden_dim=64, mlp_dim=128), 64),
}
CI_MODELS = list(CI_VARIANTS)


def ci_variant(name: str) -> tuple[torch.nn.Module, torch.Tensor]:
    """A reduced model of the same class as ``name`` (random weights, eval) and a batch-2 input."""
    kw, size = CI_VARIANTS[name]
    torch.manual_seed(0)
    if name.startswith("torchvision:"):
        from torchvision.models.vision_transformer import VisionTransformer

        assert name == "torchvision:vit_b_16"
        model = VisionTransformer(num_classes=10, **kw)
    else:
        model = timm.create_model(name, pretrained=False, num_classes=10, **kw)
    return model.eval(), torch.randn(2, 3, size, size)


def _check(model: torch.nn.Module, x: torch.Tensor, name: str):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        rep = check_model(model, x, name=name, ratio=0.5, onnx=True)
    assert rep.ok, f"{name}: {rep.error}\n{rep.row()}\nops without a rule: {rep.unruled}"
    assert rep.analysis_s < MAX_ANALYSIS_S, f"{name}: analysis took {rep.analysis_s:.2f} s\n{rep.row()}"
    return rep


def test_model_list_is_read():
    """The coverage list has the 22 names (from the shared file or the fallback copy)."""
    assert len(MODELS) == len(set(MODELS)) == 22
    assert set(CI_MODELS) <= set(MODELS)


@pytest.mark.slow
@pytest.mark.parametrize("name", MODELS)
def test_zoo_model(name):
    """Full-size model: analyze, compress, masked equivalence and ONNX parity all pass."""
    model, x = load_model(name, batch=2)
    _check(model, x, name)


@pytest.mark.parametrize("name", CI_MODELS)
def test_zoo_ci(name):
    """Reduced variant: every check passes and attention and MLP groups are all found."""
    model, x = ci_variant(name)
    rep = _check(model, x, name)
    missing = [k for k in ("head", "qk", "v", "ffn") if rep.groups.get(k, 0) < 1]
    assert not missing, f"{name}: no {missing} groups found; groups {rep.groups}\n{rep.row()}"
