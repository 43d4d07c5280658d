"""The shape family (vitgraph/analysis/ops/shape.py): 2-D rotary tables whose per-frequency
values are repeated for both channels of a pair (``repeat_interleave(2, -1)``, timm's mixed RoPE)
follow the q/k channel pairs."""
from __future__ import annotations

import torch
from torch import nn

import vitgraph

from helpers import C, D, H, N, assert_exact, build, inputs, merge_heads, only, rotate_pairs


class Rope2dAttention(nn.Module):
    """Learned per-head frequencies for x and y (``freqs [2, H, D/2]``), angles on a 3x3 grid,
    ``sin``/``cos`` repeated to D channels, applied to q and k as ``x cos + rot(x) sin``."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(C, 3 * C), nn.Linear(C, C)
        self.freqs = nn.Parameter(torch.rand(2, H, D // 2))
        side = int(N ** 0.5)
        ys, xs = torch.meshgrid(torch.arange(side), torch.arange(side), indexing="ij")
        self.register_buffer("t_x", xs.reshape(-1).float(), persistent=False)
        self.register_buffer("t_y", ys.reshape(-1).float(), persistent=False)

    def forward(self, x):
        b, n, c = x.shape
        ang = self.t_x[:, None] * self.freqs[0][:, None, :] + self.t_y[:, None] * self.freqs[1][:, None, :]  # [H, N, D/2]
        sin, cos = ang.sin().repeat_interleave(2, -1), ang.cos().repeat_interleave(2, -1)
        q, k, v = self.qkv(x).reshape(b, n, 3, H, D).permute(2, 0, 3, 1, 4).unbind(0)
        q, k = q * cos + rotate_pairs(q) * sin, k * cos + rotate_pairs(k) * sin
        attn = (q @ k.transpose(-2, -1) * D ** -0.5).softmax(-1)
        return x + self.proj(merge_heads(attn @ v))


def test_repeated_rotary_table_follows_qk_pairs():
    m = build(Rope2dAttention)
    an = vitgraph.analyze(m, inputs(1))
    qk = only(an, "qk")
    assert qk.size == D // 2
    assert ("block.freqs", 2) in qk.params
    assert only(an, "residual").size == C
    assert any("position inside 2 repeats" in f.reason for f in an.frozen)
    assert_exact(m, an, seeds=range(4))
