"""The indexing family (vitgraph/analysis/ops/indexing.py, vitgraph/analysis/selection.py):
concatenations whose parts carry no positions."""
from __future__ import annotations

import torch
from torch import nn

import vitgraph

from test_op_rules import C, Net, assert_exact, inputs, only


class EmptyRegisterTokens(nn.Module):
    """``cat(cls, registers, tokens)`` with zero register tokens (a ``[1, 0, C]`` parameter),
    then an MLP block; the prefix token is dropped at the end."""

    def __init__(self) -> None:
        super().__init__()
        self.cls = nn.Parameter(torch.randn(1, 1, C))
        self.reg = nn.Parameter(torch.zeros(1, 0, C))
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        b = x.shape[0]
        x = torch.cat([self.cls.expand(b, -1, -1), self.reg.expand(b, -1, -1), x], dim=1)
        x = x + self.fc2(torch.relu(self.fc1(x)))
        return x[:, 1:]


def test_zero_length_concatenated_part_compresses():
    torch.manual_seed(0)
    m = Net(EmptyRegisterTokens()).eval()
    x = inputs()
    an = vitgraph.analyze(m, x)
    assert only(an, "ffn").size == 2 * C
    assert_exact(m, an)
    for kinds in (["residual"], ["ffn"], None):
        plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=kinds)
        with torch.no_grad():
            assert vitgraph.compress(m, plan, an)(x).shape == m(x).shape
