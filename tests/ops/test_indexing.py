"""The indexing family (vitgraph/analysis/ops/indexing.py, vitgraph/analysis/selection.py):
concatenations whose parts carry no positions."""
from __future__ import annotations

import torch
from torch import nn

import vitgraph

from helpers import C, Net, assert_exact, inputs, only


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


class Glu(nn.Module):
    """``fc2(a * b)`` with ``a, b = fc1(x).chunk(2, -1)``: fc1's rows j and j + 2 go together."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 4, bias=False), nn.Linear(2, 1, bias=False)

    def forward(self, x):
        a, b = self.fc1(x).chunk(2, -1)
        return self.fc2(a * b)


def test_chunk_pairs_the_halves_hand_computed():
    m = Glu()
    with torch.no_grad():
        m.fc1.weight.copy_(torch.tensor([[1.0, 0], [0, 1], [2, 0], [1, 1]]))
        m.fc2.weight.copy_(torch.tensor([[1.0, 10]]))
    x = torch.tensor([[1.0, 2]])
    an = vitgraph.analyze(m.eval(), x)
    got = {g.id: (g.kind, g.size, set(g.params)) for g in an.groups}
    assert got == {"fc1:ffn": ("ffn", 2, {("fc1.weight", 0), ("fc2.weight", 1)})}, str(an)
    # fc1 x = [1, 2, 2, 3]; a * b = [2, 6]; fc2 -> 2 + 60
    with torch.no_grad():
        assert torch.equal(m(x), torch.tensor([[62.0]]))
    slim = vitgraph.compress(m, vitgraph.Plan.keep_all(an).keep("fc1:ffn", [1]), keep_api=False)
    assert torch.equal(slim.fc1.weight, torch.tensor([[0.0, 1], [1, 1]]))  # rows 1 and 3
    assert torch.equal(slim.fc2.weight, torch.tensor([[10.0]]))
    with torch.no_grad():
        assert torch.equal(slim(x), torch.tensor([[60.0]]))  # a * b = [6]
