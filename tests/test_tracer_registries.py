"""Capture reads timm's not-traceable registries through timm's public getters, and a model whose
untraceable parts timm registers is captured with those parts opaque."""
from __future__ import annotations

import pytest
import timm.layers
import torch.nn.functional as F
from torch import nn

import vitgraph
from vitgraph.capture.trace import FRONT_ENDS
from vitgraph.capture.tracer import ViTTracer, _timm_registries

from helpers import C, assert_exact, build, inputs, kinds_and_sizes


class _Opaque(nn.Module):
    def forward(self, x):
        return x * 2


def _opaque_fn(x):
    return x + 1


def test_registries_come_from_public_getters(monkeypatch):
    monkeypatch.setattr(timm.layers, "get_notrace_modules", lambda: [_Opaque])
    monkeypatch.setattr(timm.layers, "get_notrace_functions", lambda: [_opaque_fn])
    assert _timm_registries() == ({_Opaque}, {_opaque_fn})
    tracer = ViTTracer(honour_timm=True)
    assert tracer.is_leaf_module(_Opaque(), "m")


class Reverse(nn.Module):
    """Reorders channels behind data-dependent control flow: no front end can trace into it."""

    def forward(self, x):
        return x.flip(-1) if bool(x.sum() > -1e30) else x


def double_if_finite(x):
    """Data-dependent control flow, as a plain function."""
    return x * 2 if bool(x.sum() > -1e30) else x


class TwoOpaqueMLPs(nn.Module):
    """Three MLPs on the residual stream: one through ``Reverse``, one through ``double_if_finite``
    and one plain."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 24), nn.Linear(24, C)
        self.fc3, self.fc4 = nn.Linear(C, 16), nn.Linear(16, C)
        self.fc5, self.fc6 = nn.Linear(C, 12), nn.Linear(12, C)
        self.reverse = Reverse()

    def forward(self, x):
        h1 = self.reverse(F.gelu(self.fc1(x)))
        h2 = double_if_finite(F.gelu(self.fc3(x)))
        return x + self.fc2(h1) + self.fc4(h2) + self.fc6(F.gelu(self.fc5(x)))


def test_timm_registered_modules_and_functions_stay_opaque_and_freeze_their_channels(monkeypatch):
    """A model that no front end traces through is analysed once timm registers its untraceable
    parts: they become one leaf / wrapped call each, the channels through them freeze with a
    reason naming them, and the rest of the model compresses like it masks."""
    m = build(TwoOpaqueMLPs)
    monkeypatch.setattr(timm.layers, "get_notrace_modules", lambda: [])
    monkeypatch.setattr(timm.layers, "get_notrace_functions", lambda: [])
    with pytest.raises(vitgraph.TraceError, match="block.reverse"):
        vitgraph.analyze(m, inputs(1))

    monkeypatch.setattr(timm.layers, "get_notrace_modules", lambda: [Reverse])
    monkeypatch.setattr(timm.layers, "get_notrace_functions", lambda: [double_if_finite])
    an = vitgraph.analyze(m, inputs(1))
    assert an.front_end == FRONT_ENDS[1]
    calls = {(n.op, n.target) for n in an.graph_module.graph.nodes}
    assert ("call_module", "block.reverse") in calls and ("call_function", double_if_finite) in calls
    frozen = {f.size: f for f in an.frozen if "no rule" in f.reason}
    assert sorted(frozen) == [16, 24], an.explain_frozen()
    assert "Reverse" in frozen[24].reason and "block.fc1.weight" in frozen[24].where
    assert "double_if_finite" in frozen[16].reason and "block.fc3.weight" in frozen[16].where
    assert kinds_and_sizes(an) == [("ffn", 12), ("residual", C)], str(an)  # the plain MLP and the stream
    assert_exact(m, an)
