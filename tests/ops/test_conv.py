"""The convolution family (vitgraph/analysis/ops/conv.py): a convolution ties its in-channels to
the out-channels before it (depthwise: in and out channels are one; grouped: whole conv groups and
the same positions in every group), pooling keeps channels, and a kernel window over a dim that
carries channels freezes them.

Every model here is a few channels wide on a tiny image with small integer weights, so the
expected weights and outputs below are written out by hand (exact in float arithmetic).
"""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import vitgraph

from helpers import fill_params, floats


def _slim_and_masked(m: nn.Module, plan: vitgraph.Plan, x: torch.Tensor):
    slim, masked = vitgraph.compress(m, plan, keep_api=False), vitgraph.mask(m, plan)
    with torch.no_grad():
        return slim, slim(x), masked(x)


def _groups(an: vitgraph.Analysis) -> dict:
    return {g.id: (g.kind, g.size, set(g.params)) for g in an.groups}


IMAGE = floats([[1, 2], [3, 4]]).reshape(1, 1, 2, 2)


# ---------------------------------------------------------------------------------------------
# conv 2x2 -> relu -> flatten -> linear


class ConvFlattenLinear(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c, self.fc = nn.Conv2d(1, 3, 2), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc(torch.relu(self.c(x)).flatten(1))


def test_conv_out_channels_feeding_flatten_and_linear_are_one_group():
    m = fill_params(ConvFlattenLinear(),
              c__weight=[[[1, 0], [0, 1]], [[0, 1], [-1, 0]], [[1, 1], [1, 1]]], c__bias=[0, 0, -4],
              fc__weight=[[1, 1, 1], [1, 0, -1]], fc__bias=[0, 0])
    an = vitgraph.analyze(m, IMAGE)
    assert _groups(an) == {"c:ffn": ("ffn", 3, {("c.bias", 0), ("c.weight", 0), ("fc.weight", 1)})}, str(an)
    assert "tied by conv bias at" in an.explain("c:ffn") and "tied by linear at" in an.explain("c:ffn")
    # c(x) = [1 + 4, 2 - 3, 10 - 4] = [5, -1, 6]; relu -> [5, 0, 6]; fc -> [11, -1]
    with torch.no_grad():
        assert torch.equal(m(IMAGE), floats([[11, -1]]))
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep("c:ffn", [1, 2]), IMAGE)
    assert torch.equal(slim.c.weight, floats([[[[0, 1], [-1, 0]]], [[[1, 1], [1, 1]]]]))
    assert torch.equal(slim.c.bias, floats([0, -4]))
    assert (slim.c.in_channels, slim.c.out_channels, slim.c.groups) == (1, 2, 1)
    assert torch.equal(slim.fc.weight, floats([[1, 1], [0, -1]])) and slim.fc.in_features == 2
    # relu(c x) = [0, 6]; fc -> [6, -6]
    assert torch.equal(out, floats([[6, -6]]))
    assert torch.equal(out, masked)


def test_conv_channels_flattened_with_space_stay_a_group():
    """On a 3x3 image the 2x2 conv leaves 2x2 positions per channel; flatten puts each channel's
    four positions side by side in the linear's input (channel-major), so the channels stay one
    group (fc's columns in blocks of four) and the positions inside a block are frozen."""
    m = ConvFlattenLinear()
    m.fc = nn.Linear(12, 2, bias=False)
    # channel c: (c + 1) * the window's top-left pixel; fc: the sum, and each channel's first position
    m = fill_params(m, c__weight=[[[1, 0], [0, 0]], [[2, 0], [0, 0]], [[3, 0], [0, 0]]], c__bias=[0, 0, 0],
              fc__weight=[[1] * 12, [1, 0, 0, 0] * 3])
    x = torch.arange(1.0, 10.0).reshape(1, 1, 3, 3)  # [[1, 2, 3], [4, 5, 6], [7, 8, 9]]
    an = vitgraph.analyze(m, x)
    assert _groups(an) == {"c:ffn": ("ffn", 3, {("c.bias", 0), ("c.weight", 0), ("fc.weight", 1)})}, str(an)
    merged = [f for f in an.frozen if "dimension without channels merged into channels" in f.reason]
    assert [(f.size, f.where) for f in merged] == [(2, ("fc.weight",)), (2, ("fc.weight",))]  # 2 x 2 positions
    # flatten: [1, 2, 4, 5] * 1, * 2, * 3 -> fc: [12 + 24 + 36, 1 + 2 + 3]
    with torch.no_grad():
        assert torch.equal(m(x), floats([[72, 6]]))
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep("c:ffn", [1, 2]), x)
    assert torch.equal(slim.fc.weight, floats([[1] * 8, [1, 0, 0, 0] * 2])) and slim.fc.in_features == 8
    assert torch.equal(out, floats([[60, 5]]))
    assert torch.equal(out, masked)


# ---------------------------------------------------------------------------------------------
# depthwise


class Depthwise(nn.Module):
    """1x1 conv to three channels, a depthwise 1x2 conv, a 1x1 conv back to one channel."""

    def __init__(self) -> None:
        super().__init__()
        self.c1, self.c2 = nn.Conv2d(1, 3, 1, bias=False), nn.Conv2d(3, 1, 1, bias=False)
        self.dw = nn.Conv2d(3, 3, (1, 2), groups=3)

    def forward(self, x):
        return self.c2(self.dw(self.c1(x)))


def test_depthwise_conv_ties_in_and_out_channels():
    m = fill_params(Depthwise(), c1__weight=[1, 2, -1], dw__weight=[[1, 1], [1, -1], [2, 0]], dw__bias=[0, 0, 1],
              c2__weight=[1, 2, 3])
    x = floats([1, 2]).reshape(1, 1, 1, 2)
    an = vitgraph.analyze(m, x)
    assert _groups(an) == {
        "c1+dw:ffn": ("ffn", 3, {("c1.weight", 0), ("dw.bias", 0), ("dw.weight", 0), ("c2.weight", 1)})}, str(an)
    assert "tied by depthwise conv at" in an.explain("c1+dw:ffn")
    # c1 x = [1, 2], [2, 4], [-1, -2]; dw -> [3, -2, -2 + 1]; c2 -> 3 - 4 - 3 = -4
    with torch.no_grad():
        assert torch.equal(m(x), floats([-4]).reshape(1, 1, 1, 1))
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep("c1+dw:ffn", [1, 2]), x)
    assert torch.equal(slim.dw.weight, floats([[[[1, -1]]], [[[2, 0]]]])) and torch.equal(slim.dw.bias, floats([0, 1]))
    assert (slim.dw.in_channels, slim.dw.out_channels, slim.dw.groups) == (2, 2, 2)  # still depthwise
    assert torch.equal(slim.c1.weight.flatten(), floats([2, -1])) and torch.equal(slim.c2.weight.flatten(), floats([2, 3]))
    # dw -> [-2, -1]; c2 -> -4 - 3
    assert torch.equal(out, floats([-7]).reshape(1, 1, 1, 1))
    assert torch.equal(out, masked)


# ---------------------------------------------------------------------------------------------
# grouped (groups=2, two channels in and two out per group)


class Grouped(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.c1, self.g, self.c2 = (nn.Conv2d(1, 4, 1, bias=False), nn.Conv2d(4, 4, 1, groups=2, bias=False),
                                    nn.Conv2d(4, 1, 1, bias=False))

    def forward(self, x):
        return self.c2(torch.relu(self.g(self.c1(x))))


def grouped() -> nn.Module:
    # g: out0 = in0, out1 = in1 (group 0: in0, in1); out2 = in2 + in3, out3 = in2 - in3 (group 1)
    return fill_params(Grouped(), c1__weight=[1, 2, 3, 4], g__weight=[[1, 0], [0, 1], [1, 1], [1, -1]],
                 c2__weight=[1, 10, 100, 1000])


ONE = torch.ones(1, 1, 1, 1)


def test_grouped_conv_groups():
    """Three groups: the conv groups (c1's and g's channels by blocks of two), the positions
    inside each input group (c1's channels 0, 2 and 1, 3) and inside each output group."""
    an = vitgraph.analyze(grouped(), ONE)
    assert _groups(an) == {
        "c1:ffn": ("ffn", 2, {("c1.weight", 0), ("g.weight", 1)}),  # in-channel position in a group
        "c1+g:ffn": ("ffn", 2, {("c1.weight", 0), ("g.weight", 0), ("c2.weight", 1)}),  # the conv groups
        "g:ffn": ("ffn", 2, {("g.weight", 0), ("c2.weight", 1)}),  # out-channel position in a group
    }, str(an)
    assert "tied by grouped conv at" in an.explain("c1+g:ffn")
    lines = an.explain("g.weight").splitlines()  # g's out-channels: (conv group, out position)
    assert {"  dim 0: group c1+g:ffn (ffn, 2 units)", "  dim 0: group g:ffn (ffn, 2 units)",
            "  dim 1: group c1:ffn (ffn, 2 units)"} <= set(lines)
    # c1 x = [1, 2, 3, 4]; g -> [1, 2, 7, -1]; relu -> [1, 2, 7, 0]; c2 -> 1 + 20 + 700
    with torch.no_grad():
        assert grouped()(ONE).item() == 721


@pytest.mark.parametrize("gid, keep, c1_w, g_w, c2_w, groups, want", [
    # conv group 1 only: c1 channels 2, 3; g's rows 2, 3 as one group; c2 columns 2, 3
    ("c1+g:ffn", [1], [3, 4], [[1, 1], [1, -1]], [100, 1000], 1, 700),
    # in-position 1 of each group: c1 channels 1, 3; g's column 1; g -> [0, 2, 4, -4]
    ("c1:ffn", [1], [2, 4], [[0], [1], [1], [-1]], [1, 10, 100, 1000], 2, 420),
    # out-position 1 of each group: g's rows 1, 3 -> [2, -1]; c2 columns 1, 3
    ("g:ffn", [1], [1, 2, 3, 4], [[0, 1], [1, -1]], [10, 1000], 2, 20),
], ids=["conv-groups", "in-per-group", "out-per-group"])
def test_grouped_conv_rewrite(gid, keep, c1_w, g_w, c2_w, groups, want):
    m = grouped()
    an = vitgraph.analyze(m, ONE)
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep(gid, keep), ONE)
    assert torch.equal(slim.c1.weight.flatten(), floats(c1_w))
    assert torch.equal(slim.g.weight.flatten(1), floats(g_w))
    assert torch.equal(slim.c2.weight.flatten(), floats(c2_w))
    assert (slim.g.in_channels, slim.g.out_channels, slim.g.groups) == (len(c1_w), len(c2_w), groups)
    assert out.item() == want
    assert torch.equal(out, masked)


# ---------------------------------------------------------------------------------------------
# functional conv, pooling


class FunctionalConvPool(nn.Module):
    """A 1x1 conv module, then ``F.conv2d`` by a parameter, an average pool and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.c = nn.Conv2d(1, 3, 1, bias=False)
        self.w = nn.Parameter(torch.zeros(2, 3, 1, 1))
        self.pool, self.fc = nn.AdaptiveAvgPool2d(1), nn.Linear(2, 1, bias=False)

    def forward(self, x):
        return self.fc(self.pool(F.conv2d(torch.relu(self.c(x)), self.w)).flatten(1))


def test_functional_conv_and_pooling_keep_channels():
    m = fill_params(FunctionalConvPool(), c__weight=[1, -1, 2], w=[[1, 1, 0], [0, 1, 1]], fc__weight=[[2, 4]])
    an = vitgraph.analyze(m, IMAGE)
    assert _groups(an) == {
        "ffn": ("ffn", 3, {("c.weight", 0), ("w", 1)}),
        "ffn.1": ("ffn", 2, {("w", 0), ("fc.weight", 1)}),  # pooled, then read by fc
    }, str(an)
    # relu(c x) = x, 0, 2x; w -> x, 2x; mean over the image (2.5) -> [2.5, 5]; fc -> 5 + 20
    with torch.no_grad():
        assert torch.equal(m(IMAGE), floats([[25]]))
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep("ffn", [0, 2]).keep("ffn.1", [1]), IMAGE)
    assert torch.equal(slim.c.weight.flatten(), floats([1, 2]))
    assert torch.equal(slim.w.flatten(1), floats([[0, 1]])) and torch.equal(slim.fc.weight, floats([[4]]))
    # relu(c x) = x, 2x; w -> 2x; mean -> 5; fc -> 20
    assert torch.equal(out, floats([[20]]))
    assert torch.equal(out, masked)


# ---------------------------------------------------------------------------------------------
# a window over a dim that carries channels


class ConvOverChannels(nn.Module):
    """A Conv1d run along a Linear's output width (the width is the conv's length)."""

    def __init__(self, k: int) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 3), nn.Linear(3, 2)
        self.conv = nn.Conv1d(1, 1, k, padding=k // 2, bias=False)

    def forward(self, x):
        return self.fc2(self.conv(self.fc1(x).unsqueeze(1)).squeeze(1))


def test_kernel_window_over_channels_freezes_them():
    an = vitgraph.analyze(ConvOverChannels(3).eval(), torch.zeros(1, 2))
    assert an.groups == [], str(an)
    frozen = {f.where: f for f in an.frozen}
    assert frozen[("fc1.bias", "fc1.weight")].size == 3
    assert "a kernel window mixes the channels of a window dim" in frozen[("fc1.bias", "fc1.weight")].reason
    assert "frozen by conv" in an.explain("fc1.weight")


def test_one_wide_window_over_channels_keeps_them():
    an = vitgraph.analyze(ConvOverChannels(1).eval(), torch.zeros(1, 2))
    assert _groups(an) == {"fc1:ffn": ("ffn", 3, {("fc1.bias", 0), ("fc1.weight", 0), ("fc2.weight", 1)})}, str(an)
