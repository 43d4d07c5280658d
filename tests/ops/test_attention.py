"""The attention family: cosine attention written as torchvision's Swin V2 writes it (the key
bias zeroed in place through slice bounds computed from ``numel()``, q and k ``F.normalize``d, a
clamped learned logit scale) keeps heads, q/k and v prunable."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

import vitgraph

from helpers import C, H, assert_exact, build, inputs, kinds_and_sizes, only


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


class OneHeadSDPA(nn.Module):
    """One head of four q/k and four v dims through ``F.scaled_dot_product_attention``."""

    def __init__(self) -> None:
        super().__init__()
        self.q, self.k, self.v = (nn.Linear(2, 4, bias=False) for _ in range(3))
        self.proj = nn.Linear(4, 2, bias=False)

    def forward(self, x):
        q, k, v = (f(x).unsqueeze(1) for f in (self.q, self.k, self.v))
        return self.proj(F.scaled_dot_product_attention(q, k, v).squeeze(1))


def test_sdpa_groups_and_kept_scale_hand_computed():
    """Tokens e1, e2.  q(e1) = [2, 0, 0, 0], q(e2) = 0; k(e1) = [1, 0, 0, 0], k(e2) = 0; v(e_i) = e_i
    (padded to 4 dims); proj reads v's first two dims.  Logits times 1/sqrt(4): [1, 0] and [0, 0],
    so the outputs are [e, 1] / (1 + e) and [1/2, 1/2].  Dropping q/k dims 2 and 3 (all zero)
    must keep the scale 1/sqrt(4) = 0.5, not 1/sqrt(2), so the output is unchanged."""
    m = OneHeadSDPA()
    with torch.no_grad():
        m.q.weight.copy_(torch.tensor([[2.0, 0], [0, 0], [0, 0], [0, 0]]))
        m.k.weight.copy_(torch.tensor([[1.0, 0], [0, 0], [0, 0], [0, 0]]))
        m.v.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [0, 0], [0, 0]]))
        m.proj.weight.copy_(torch.tensor([[1.0, 0, 0, 0], [0, 1, 0, 0]]))
    x = torch.eye(2).unsqueeze(0)
    e = math.e
    want = torch.tensor([[[e / (1 + e), 1 / (1 + e)], [0.5, 0.5]]])
    an = vitgraph.analyze(m.eval(), x)
    got = {g.id: (g.kind, g.size, set(g.params)) for g in an.groups}
    assert got == {"q+k:qk": ("qk", 4, {("q.weight", 0), ("k.weight", 0)}),
                   "v:v": ("v", 4, {("v.weight", 0), ("proj.weight", 1)})}, str(an)
    plan = vitgraph.Plan.keep_all(an).keep("q+k:qk", [0, 1]).keep("v:v", [0, 1])
    slim = vitgraph.compress(m, plan, keep_api=False)
    assert tuple(slim.q.weight.shape) == tuple(slim.k.weight.shape) == (2, 2)
    assert torch.equal(slim.proj.weight, torch.eye(2))
    sdpa = [n for n in slim.graph.nodes if "scaled_dot_product_attention" in str(n.target)]
    assert [n.kwargs.get("scale") for n in sdpa] == [0.5]
    with torch.no_grad():
        torch.testing.assert_close(m(x), want)
        torch.testing.assert_close(slim(x), want)
