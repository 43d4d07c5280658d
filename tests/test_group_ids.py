"""Group ids name the modules a group lives in, also for groups shared across blocks or stages."""
from __future__ import annotations

import timm
import torch
from torch import nn

import vitgraph

from helpers import tiny_vit


class _Attn(nn.Module):
    def __init__(self, dim: int, heads: int, shared: nn.Module) -> None:
        super().__init__()
        self.heads, self.qkv, self.proj, self.shared = heads, nn.Linear(dim, 3 * dim), nn.Linear(dim, dim), shared

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4).unbind(0)
        v = v + self.shared(v)  # a per-head-dim mixer that every block shares
        x = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(b, n, c))


class _SharedAcrossBlocks(nn.Module):
    """Two attention blocks in a ModuleList that share one Linear on the v head dim, then a classifier ``head``."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(8, 16)
        mixer = nn.Linear(4, 4)
        self.blocks = nn.ModuleList([_Attn(16, 4, mixer), _Attn(16, 4, mixer)])
        self.mixer = mixer
        self.head = nn.Linear(16, 3)

    def forward(self, x):
        x = self.embed(x)
        for blk in self.blocks:
            x = x + blk(x)
        return self.head(x.mean(1))


def _located(gid: str) -> bool:
    where, _, _ = gid.partition(":")
    return bool(where) or gid.startswith("residual")


def test_groups_shared_across_blocks_name_their_modules():
    an = vitgraph.analyze(_SharedAcrossBlocks().eval(), torch.randn(2, 5, 8))
    ids = [g.id for g in an.groups]
    assert all(_located(i) for i in ids), ids
    assert "head" not in ids and not any(i.split(":")[0] == "blocks" for i in ids), ids
    # the mixer couples the v dims of both blocks: one group, placed in both
    assert [g.id for g in an.groups if g.kind == "v"] == ["blocks.0+blocks.1:v"], ids


def test_stage_streams_name_their_stage():
    torch.manual_seed(0)
    swin = timm.create_model("swin_tiny_patch4_window7_224", pretrained=False, img_size=64, window_size=4,
                             embed_dim=16, depths=(1, 1), num_heads=(2, 2), num_classes=5).eval()
    an = vitgraph.analyze(swin, torch.randn(1, 3, 64, 64))
    streams = [g.id for g in an.groups if g.kind == "residual"]
    assert len(streams) == 2 and streams[1] == "layers.1:residual", streams
    assert all(_located(g.id) for g in an.groups)
    assert [g.id for g in vitgraph.analyze(tiny_vit(), torch.randn(1, 3, 32, 32)).groups if g.kind == "residual"] == ["residual"]
