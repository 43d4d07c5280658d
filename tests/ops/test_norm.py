"""The normalisation family (vitgraph/analysis/ops/norm.py, reduce.py): normalisations inside an
MLP keep its hidden width an ``ffn`` group, marked normalised."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

import vitgraph

from helpers import B, C, NCLS, build, inputs, kinds_and_sizes, only


class GRNMLP(nn.Module):
    """Global response normalisation between fc1 and fc2 (ConvNeXt-V2 style, on tokens):
    ``h + gamma * (h * ||h||_tokens / mean_c ||h||_tokens) + beta``."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)
        self.gamma, self.beta = nn.Parameter(torch.randn(2 * C)), nn.Parameter(torch.randn(2 * C))

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        gx = torch.norm(h, p=2, dim=1, keepdim=True)
        nx = gx / (gx.mean(dim=-1, keepdim=True) + 1e-6)
        return x + self.fc2(self.gamma * (h * nx) + self.beta + h)


class SubLNMLP(nn.Module):
    """A LayerNorm over the hidden width between fc1 and fc2 (sub-LN, as in BEiT-3 / EVA-02)."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.norm, self.fc2 = nn.Linear(C, 2 * C), nn.LayerNorm(2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        return x + self.fc2(self.norm(F.gelu(self.fc1(x))))


def _prunes(m: nn.Module, an: vitgraph.Analysis) -> None:
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["ffn"])
    assert plan.kept
    with torch.no_grad():
        assert vitgraph.compress(m, plan, an)(inputs()).shape == (B, NCLS)


def test_grn_keeps_the_hidden_width_prunable():
    m = build(GRNMLP)
    an = vitgraph.analyze(m, inputs())
    assert not an.unruled, an.unruled
    assert kinds_and_sizes(an) == [("ffn", 2 * C), ("residual", C)], str(an)
    ffn = only(an, "ffn")
    assert ffn.normalized
    assert {("block.gamma", 0), ("block.beta", 0)} <= set(ffn.params)
    _prunes(m, an)


def test_sub_ln_ffn_is_classed_ffn():
    m = build(SubLNMLP)
    an = vitgraph.analyze(m, inputs())
    assert kinds_and_sizes(an) == [("ffn", 2 * C), ("residual", C)], str(an)
    assert only(an, "ffn").normalized
    _prunes(m, an)
