"""The pointwise family (vitgraph/analysis/ops/pointwise.py): every declared activation keeps an
MLP's hidden width prunable, and compressing equals masking through it."""
from __future__ import annotations

import pytest
import torch.nn.functional as F
from torch import nn

import vitgraph
from vitgraph.analysis.ops import OPS

from helpers import C, assert_exact, build, inputs, only


class Mlp(nn.Module):
    """``fc2(act(fc1(x)))``; ``act`` is a module class or a function."""

    def __init__(self, act) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 4 * C), nn.Linear(4 * C, C)
        self.act = act() if isinstance(act, type) else act

    def forward(self, x):
        return x + self.fc2(self.act(self.fc1(x)))


def _declared_activation_modules() -> list[type]:
    mods = {t for t, spec in OPS.items() if spec.pointwise and isinstance(t, type) and issubclass(t, nn.Module)}
    return sorted(mods, key=lambda t: t.__name__)


@pytest.mark.filterwarnings("ignore:dropout2d")
@pytest.mark.parametrize("act", _declared_activation_modules(), ids=lambda t: t.__name__)
def test_every_pointwise_module_keeps_the_hidden_width(act):
    m = build(Mlp, act)
    an = vitgraph.analyze(m, inputs())
    assert only(an, "ffn").size == 4 * C
    assert_exact(m, an, seeds=range(2))


@pytest.mark.parametrize("act", [nn.Hardshrink, F.hardshrink], ids=["module", "function"])
def test_hardshrink(act):
    """An activation added to the family with one declaration."""
    m = build(Mlp, act)
    an = vitgraph.analyze(m, inputs())
    assert only(an, "ffn").size == 4 * C
    assert_exact(m, an)
