"""q/k and v pruned to different sizes in a model mixing a fused qkv (three sections) with a
fused kv (two sections): each ragged fused reshape is split with its own section copies."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitgraph

from helpers import random_plan, rel_err


class QKVAttention(nn.Module):
    """Self-attention with one fused q/k/v projection: ``reshape(B, N, 3, H, D).unbind(0)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, dim * 3)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class KVAttention(nn.Module):
    """Attention with its own q projection and a fused k/v one: ``reshape(B, N, 2, H, D)``."""

    def __init__(self, dim: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, dim * 2)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        q = self.q(x).reshape(B, N, self.heads, C // self.heads).permute(0, 2, 1, 3)
        k, v = self.kv(x).reshape(B, N, 2, self.heads, C // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        x = nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class MixedSections(nn.Module):
    """Two residual attention blocks, one with three fused sections and one with two."""

    def __init__(self, dim: int = 24, heads: int = 3) -> None:
        super().__init__()
        self.a = QKVAttention(dim, heads)
        self.b = KVAttention(dim, heads)
        self.head = nn.Linear(dim, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.a(x)
        x = x + self.b(x)
        return self.head(x.mean(1))


@pytest.mark.parametrize("kinds", [("qk",), ("v",), ("qk", "v", "head")])
def test_ragged_sections_with_mixed_section_counts(kinds):
    torch.manual_seed(0)
    m = MixedSections().eval()
    x = torch.randn(2, 7, 24)
    an = vitgraph.analyze(m, x[:1])
    assert {g.kind for g in an.groups} >= {"qk", "v", "head"}
    plan = random_plan(an, kinds, seed=3)
    slim = vitgraph.compress(m, plan)
    with torch.no_grad():
        out, ref = slim(x), vitgraph.mask(m, plan)(x)
    assert out.shape == ref.shape
    assert rel_err(out, ref) <= 1e-5


class FoldedTokens(nn.Module):
    """MobileViT-style: a conv's channels unfolded into patch tokens, so the token dims carry
    channel layouts too, then a fused qkv over the last dim."""

    def __init__(self, c: int = 16, dim: int = 32, heads: int = 4) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, c, 3, padding=1)
        self.heads = heads
        self.attn = QKVAttention(dim, heads)
        self.head = nn.Linear(dim, 5)
        self.c = c

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        f = self.conv(x)  # [B, c, 8, 8]
        t = f.reshape(b, self.c // 2, 2, 64).permute(0, 1, 3, 2).reshape(b * (self.c // 2), 64 * 2)
        t = t.reshape(b * (self.c // 2), 4, 32)  # tokens whose dims come from conv channels
        return self.head(self.attn(t).mean(1)).reshape(b, self.c // 2, 5).mean(1)


@pytest.mark.parametrize("kinds", [("qk",), ("v",)], ids=["qk-only", "v-only"])
def test_ragged_sections_when_tokens_carry_channels(kinds):
    torch.manual_seed(0)
    model, x = FoldedTokens().eval(), torch.randn(2, 3, 8, 8)
    an = vitgraph.analyze(model, x)
    plan = random_plan(an, kinds)
    assert plan.kept, an
    slim, masked = vitgraph.compress(model, plan, an), vitgraph.mask(model, plan, an)
    with torch.no_grad():
        assert rel_err(slim(x), masked(x)) <= 1e-5
