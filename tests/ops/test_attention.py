"""The attention family: cosine attention written as torchvision's Swin V2 writes it (the key
bias zeroed in place through slice bounds computed from ``numel()``, q and k ``F.normalize``d, a
clamped learned logit scale) keeps heads, q/k and v prunable."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import vitgraph

from test_op_rules import C, H, assert_exact, build, inputs, kinds_and_sizes, only


class TorchvisionCosineAttention(nn.Module):
    """``F.linear`` with a cloned bias whose key third is ``zero_()``-ed, cosine logits."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.logit_scale = nn.Parameter(torch.log(10 * torch.ones((H, 1, 1))))

    def forward(self, x):
        b, n, c = x.shape
        bias = self.qkv.bias.clone()
        length = bias.numel() // 3
        bias[length: 2 * length].zero_()
        qkv = F.linear(x, self.qkv.weight, bias)
        qkv = qkv.reshape(b, n, 3, H, c // H).permute(2, 0, 3, 1, 4)
        q, k, v = qkv[0], qkv[1], qkv[2]
        attn = F.normalize(q, dim=-1) @ F.normalize(k, dim=-1).transpose(-2, -1)
        attn = attn * torch.clamp(self.logit_scale, max=math.log(100.0)).exp()
        out = (attn.softmax(-1) @ v).transpose(1, 2).reshape(b, n, -1)
        return x + self.proj(out)


def test_cosine_attention_with_in_place_key_bias_prunes():
    m = build(TorchvisionCosineAttention)
    an = vitgraph.analyze(m, inputs())
    assert not an.unruled, an.unruled
    assert [k for k, _ in kinds_and_sizes(an)] == ["head", "qk", "residual", "v"], str(an)
    assert only(an, "qk").normalized and not only(an, "v").normalized
    assert_exact(m, an)  # v and head groups: compress == mask
    for kinds in (["qk"], ["v"], ["head"], None):  # q/k and v at different widths: bounds rewritten
        plan = vitgraph.Plan.random(an, 0.5, kinds=kinds, seed=1)
        slim = vitgraph.compress(m, plan, an)
        with torch.no_grad():
            assert slim(inputs()).shape == m(inputs()).shape
        vitgraph.verify_compressed(m, slim, plan, an, inputs())


def test_torchvision_swin_v2_attention_is_not_frozen():
    from torchvision.models.swin_transformer import PatchMergingV2, SwinTransformer, SwinTransformerBlockV2

    torch.manual_seed(0)
    m = SwinTransformer(patch_size=[4, 4], embed_dim=32, depths=[1, 1], num_heads=[2, 4], window_size=[4, 4],
                        block=SwinTransformerBlockV2, downsample_layer=PatchMergingV2, num_classes=5).eval()
    x = torch.randn(2, 3, 32, 32)
    an = vitgraph.analyze(m, x[:1])
    kinds = sorted(g.kind for g in an.groups)
    assert kinds.count("qk") == 2 and kinds.count("v") == 2 and kinds.count("head") == 2, str(an)
    plan = vitgraph.Plan.random(an, 0.5, seed=0)
    vitgraph.verify_compressed(m, vitgraph.compress(m, plan, an), plan, an, x)
