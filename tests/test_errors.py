"""Every error path names what is wrong and mutates nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitgraph

from conftest import tiny_vit


class DataDependent(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.inner = nn.Sequential(nn.Linear(4, 4), Branchy())

    def forward(self, x):
        return self.inner(x)


class Branchy(nn.Module):
    def forward(self, x):
        if x.sum() > 0:  # control flow on tensor values cannot be traced
            return x
        return -x


def test_untraceable_model_names_module_and_line():
    with pytest.raises(vitgraph.TraceError) as e:
        vitgraph.analyze(DataDependent(), torch.randn(2, 4))
    msg = str(e.value)
    assert "inner.1" in msg and "Branchy" in msg and "x.sum() > 0" in msg


@pytest.fixture(scope="module")
def an():
    return vitgraph.analyze(tiny_vit(), torch.randn(1, 3, 32, 32))


@pytest.mark.parametrize(
    "gid, keep, words",
    [
        ("nope:qk", [0], "unknown group 'nope:qk'"),
        ("blocks.0.mlp:ffn", [0, 96], "out of range"),
        ("blocks.0.mlp:ffn", [1, 1], "repeated"),
        ("blocks.0.mlp:ffn", [], "empty"),
        ("blocks.0.mlp:ffn", [3, 1], "sorted"),
        ("blocks.0.attn:qk", [[0, 1], [0], [1, 2]], "same number"),
        ("blocks.0.attn:qk", [[0, 1], [0, 1]], "one row per head"),
    ],
)
def test_bad_plans_raise_plan_error(an, gid, keep, words):
    plan = vitgraph.Plan.keep_all(an)
    with pytest.raises(vitgraph.PlanError, match=words):
        plan.keep(gid, keep)
    assert plan.kept == {}
    plan.analysis = None
    plan.kept[gid] = keep  # raw data (as from JSON) fails at compress time too
    with pytest.raises(vitgraph.PlanError) as e:
        vitgraph.compress(an.model, plan, analysis=an)
    assert gid in str(e.value)


def test_plan_for_another_architecture(an):
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)
    other = tiny_vit(depth=3)
    before = {k: v.clone() for k, v in other.state_dict().items()}
    with pytest.raises(vitgraph.PlanError, match="architecture"):
        vitgraph.compress(other, vitgraph.Plan.from_json(plan.to_json()))
    assert all(torch.equal(before[k], v) for k, v in other.state_dict().items())


def test_bad_ratio_and_kinds(an):
    with pytest.raises(vitgraph.PlanError, match="ratio"):
        vitgraph.Plan.from_scores(an, ratio=1.0)
    with pytest.raises(vitgraph.PlanError, match="kinds"):
        vitgraph.Plan.from_scores(an, kinds=["bogus"])
    with pytest.raises(vitgraph.PlanError, match="not a vitgraph plan"):
        vitgraph.Plan.from_json("{}")


def test_op_without_rule_freezes_and_reports():
    class Odd(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.b = nn.Linear(8, 16), nn.Linear(16, 4)

        def forward(self, x):
            return self.b(torch.cummax(self.a(x), dim=-1).values)

    an = vitgraph.analyze(Odd(), torch.randn(2, 8))
    assert not [g for g in an.groups if g.size == 16]
    assert any("no rule" in f.reason and "cummax" in f.reason for f in an.frozen)
