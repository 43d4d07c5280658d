"""The reduction family (vitgraph/analysis/ops/reduce.py): a reduction over channels is exact under
masking only when it is a sum or a norm; every other one (mean, max, std, logsumexp) marks the
channels normalised, so no plan is ever checked, or trusted, against a masked model it cannot equal.
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitgraph
from vitgraph.passes.exactness import output_leaves as _leaves

from helpers import C, CIN, NCLS, assert_exact, build, inputs, only, rel_err

S = 8  # state width of the mixer (B, C and dt sections)


class HiddenStateMixer(nn.Module):
    """Mamba-like: a fused projection, a depthwise conv over it, split into equal B, C, dt
    sections; B softmaxed over tokens, ``h = B^T v`` and ``y = C h`` (two matmuls between
    activations); the hidden state ``h`` is returned beside the output."""

    def __init__(self, dim: int = C) -> None:
        super().__init__()
        self.v = nn.Linear(dim, dim)
        self.bcdt = nn.Linear(dim, 3 * S)
        self.conv = nn.Conv1d(3 * S, 3 * S, 3, padding=1, groups=3 * S)
        self.out_proj = nn.Linear(dim, dim)

    def forward(self, x):
        p = self.conv(self.bcdt(x).transpose(1, 2)).transpose(1, 2)
        b, c, dt = p.chunk(3, dim=-1)
        h = b.softmax(dim=1).transpose(1, 2) @ self.v(x)  # [B, S, dim]
        y = (c * F.softplus(dt)) @ h
        return self.out_proj(y), h


class StateNet(nn.Module):
    """Tokens -> mixer block -> logits, and a per-sample summary (mean) of the hidden state."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.norm = nn.Linear(CIN, C), nn.LayerNorm(C)
        self.mixer, self.head = HiddenStateMixer(), nn.Linear(C, NCLS)

    def forward(self, x):
        x = self.embed(x)
        y, h = self.mixer(self.norm(x))
        return self.head((x + y).mean(1)), h.mean((1, 2))


def _errors(m: nn.Module, an: vitgraph.Analysis, plan: vitgraph.Plan) -> list[float]:
    x = inputs()
    with torch.no_grad():
        got, want = _leaves(vitgraph.compress(m, plan, an)(x)), _leaves(vitgraph.mask(m, plan, an)(x))
    return [rel_err(a, b) for a, b in zip(got, want)]


def test_hidden_state_mixer_mean_over_state_marks_qk_normalized():
    """The state's mean divides by the kept width: compress and mask differ by 100% on a q/k
    plan, so the q/k group must say it is normalised (and is never compared as exact)."""
    torch.manual_seed(0)
    m = StateNet().eval()
    an = vitgraph.analyze(m, inputs())
    qk = only(an, "qk")
    assert qk.size == S
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["qk"])
    assert list(plan.kept) == [qk.id]
    errs = _errors(m, an, plan)
    assert errs[1] > 1e-2  # the mean of the state really changes
    assert qk.normalized
    v = only(an, "v")  # the value width is summed (matmul), not averaged... then averaged by h.mean
    assert v.normalized


class ReduceMLP(nn.Module):
    """An MLP whose hidden activations are gated by a reduction over the hidden width."""

    def __init__(self, how: str) -> None:
        super().__init__()
        self.fc1, self.fc2, self.how = nn.Linear(C, 2 * C), nn.Linear(2 * C, C), how

    def forward(self, x):
        h = F.gelu(self.fc1(x))
        how = self.how
        if how == "max":
            g = h.max(-1, keepdim=True).values
        elif how == "norm":
            g = h.norm(2, -1, keepdim=True)
        else:
            g = getattr(h, how)(-1, keepdim=True)
        return x + self.fc2(h * torch.sigmoid(g))


@pytest.mark.parametrize("how", ["mean", "amax", "amin", "max", "std", "var", "logsumexp"])
def test_reductions_that_see_masked_zeros_mark_normalized(how):
    m = build(ReduceMLP, how)
    an = vitgraph.analyze(m, inputs())
    g = only(an, "ffn")
    assert g.normalized, f"{how} over the hidden width must mark it normalised"
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["ffn"])
    x = inputs()
    with torch.no_grad():  # compress still runs and keeps the output shape
        assert vitgraph.compress(m, plan, an)(x).shape == m(x).shape


@pytest.mark.parametrize("how", ["sum", "norm"])
def test_sums_and_norms_over_channels_stay_exact(how):
    m = build(ReduceMLP, how)
    an = vitgraph.analyze(m, inputs())
    assert not only(an, "ffn").normalized
    assert_exact(m, an)


class ArgmaxMLP(nn.Module):
    """Uses the position of the largest hidden channel: removing channels renumbers them."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        h = self.fc1(x)
        idx = h.max(-1).indices
        return x + self.fc2(h) * idx.unsqueeze(-1).to(x.dtype)


def test_indices_of_a_max_over_channels_freeze_them():
    m = build(ArgmaxMLP)
    an = vitgraph.analyze(m, inputs())
    assert not [g for g in an.groups if g.kind == "ffn"]
    assert any("max/min over channels" in f.reason for f in an.frozen)
