"""The linear family (vitgraph/analysis/ops/linear.py): nn.Linear, F.linear, matmul and einsum tie
the input width of a map to the output width of the map before it, and slimming slices the
weights; addmm has no rule yet and freezes what it touches.

Every model here is a few channels wide with small integer weights, so the expected weights and
outputs below are written out by hand (float arithmetic on small integers is exact).
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


# ---------------------------------------------------------------------------------------------
# nn.Linear -> ReLU -> nn.Linear


class Mlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(2, 3), nn.Linear(3, 2)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x)))


def mlp() -> nn.Module:
    return fill_params(Mlp(),
                 fc1__weight=[[1, -1], [2, 0], [0, 3]], fc1__bias=[0, 1, -1],
                 fc2__weight=[[1, 2, 3], [-1, 0, 1]], fc2__bias=[1, 0])


X2 = floats([[1, 2], [-1, 0]])


def test_linear_out_width_feeding_a_linear_is_one_group():
    m = mlp()
    an = vitgraph.analyze(m, X2)
    assert [(g.id, g.kind, g.size) for g in an.groups] == [("fc1:ffn", "ffn", 3)], str(an)
    assert set(an.group("fc1:ffn").params) == {("fc1.bias", 0), ("fc1.weight", 0), ("fc2.weight", 1)}
    assert "tied by linear at" in an.explain("fc1:ffn")
    assert "tied by linear bias at" in an.explain("fc1:ffn")
    # fc2's rows are the model's output: frozen, with the reason
    assert [(f.size, f.where) for f in an.frozen] == [(2, ("fc2.bias", "fc2.weight"))]
    assert "model output" in an.frozen[0].reason
    assert "dim 0: 2 channels frozen by output" in an.explain("fc2.weight")


def test_linear_reference_output():
    """fc1(x) = [-1, 3, 5] and [-1, -1, -1]; relu -> [0, 3, 5], [0, 0, 0]; fc2 -> [22, 5], [1, 0]."""
    with torch.no_grad():
        assert torch.equal(mlp()(X2), floats([[22, 5], [1, 0]]))


def test_linear_rewrite_slices_rows_and_columns():
    m = mlp()
    an = vitgraph.analyze(m, X2)
    plan = vitgraph.Plan.keep_all(an).keep("fc1:ffn", [0, 2])
    slim, out, masked = _slim_and_masked(m, plan, X2)
    # rows 0 and 2 of fc1, columns 0 and 2 of fc2; fc2's bias untouched
    assert torch.equal(slim.fc1.weight, floats([[1, -1], [0, 3]]))
    assert torch.equal(slim.fc1.bias, floats([0, -1]))
    assert torch.equal(slim.fc2.weight, floats([[1, 3], [-1, 1]]))
    assert torch.equal(slim.fc2.bias, floats([1, 0]))
    assert (slim.fc1.in_features, slim.fc1.out_features) == (2, 2)
    assert (slim.fc2.in_features, slim.fc2.out_features) == (2, 2)
    # relu(fc1 x) = [0, 5] and [0, 0]; fc2 -> [0 + 15 + 1, 0 + 5 + 0] and [1, 0]
    assert torch.equal(out, floats([[16, 5], [1, 0]]))
    assert torch.equal(out, masked)
    assert torch.equal(m.fc1.weight, floats([[1, -1], [2, 0], [0, 3]]))  # the input model is untouched


def test_linear_output_width_is_a_group_with_prune_outputs():
    an = vitgraph.analyze(mlp(), X2, prune_outputs=True)
    assert [(g.id, g.kind, g.size, set(g.params)) for g in an.groups] == [
        ("fc1:ffn", "ffn", 3, {("fc1.bias", 0), ("fc1.weight", 0), ("fc2.weight", 1)}),
        ("fc2:other", "other", 2, {("fc2.bias", 0), ("fc2.weight", 0)}),
    ]
    assert not an.frozen


# ---------------------------------------------------------------------------------------------
# a residual stream: embed -> x + relu(fc(x)) -> head


class Residual(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed, self.fc, self.head = nn.Linear(1, 2), nn.Linear(2, 2), nn.Linear(2, 1)

    def forward(self, x):
        x = self.embed(x)
        return self.head(x + torch.relu(self.fc(x)))


def test_linear_residual_ties_every_map_on_the_stream():
    m = fill_params(Residual(), embed__weight=[[1], [2]], embed__bias=[0, 1],
              fc__weight=[[1, 0], [1, -1]], fc__bias=[0, 0], head__weight=[[1, 1]], head__bias=[0])
    x = floats([[2]])
    an = vitgraph.analyze(m, x)
    assert [(g.id, g.kind, g.size) for g in an.groups] == [("embed+fc:residual", "residual", 2)], str(an)
    # both dims of fc's square weight are on the stream
    assert set(an.group("embed+fc:residual").params) == {
        ("embed.bias", 0), ("embed.weight", 0), ("fc.weight", 1), ("fc.bias", 0), ("fc.weight", 0), ("head.weight", 1)}
    # e = [2, 5]; fc(e) = [2, -3]; e + relu = [4, 5]; head -> 9
    with torch.no_grad():
        assert torch.equal(m(x), floats([[9]]))
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep("embed+fc:residual", [1]), x)
    assert torch.equal(slim.embed.weight, floats([[2]])) and torch.equal(slim.embed.bias, floats([1]))
    assert torch.equal(slim.fc.weight, floats([[-1]])) and torch.equal(slim.head.weight, floats([[1]]))
    # e = [5]; fc(e) = [-5]; e + relu = [5]; head -> 5
    assert torch.equal(out, floats([[5]]))
    assert torch.equal(out, masked)


# ---------------------------------------------------------------------------------------------
# F.linear and matmul with parameters (no modules: the group id has no owner prefix)


class FunctionalMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.b1 = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(3))
        self.w2 = nn.Parameter(torch.zeros(3, 2))

    def forward(self, x):
        return torch.relu(F.linear(x, self.w1, self.b1)) @ self.w2


def test_functional_linear_and_matmul_by_a_parameter():
    m = fill_params(FunctionalMlp(), w1=[[1, -1], [2, 0], [0, 3]], b1=[0, 1, -1], w2=[[1, -1], [2, 0], [3, 1]])
    an = vitgraph.analyze(m, X2)
    assert [(g.id, g.kind, g.size, set(g.params)) for g in an.groups] == [
        ("ffn", "ffn", 3, {("w1", 0), ("b1", 0), ("w2", 0)})], str(an)
    assert [(f.size, f.where) for f in an.frozen] == [(2, ("w2",))]  # the output columns
    with torch.no_grad():  # relu(h) = [0, 3, 5], [0, 0, 0]; @ w2 -> [21, 5], [0, 0]
        assert torch.equal(m(X2), floats([[21, 5], [0, 0]]))
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep("ffn", [0, 2]), X2)
    assert torch.equal(slim.w1, floats([[1, -1], [0, 3]])) and torch.equal(slim.b1, floats([0, -1]))
    assert torch.equal(slim.w2, floats([[1, -1], [3, 1]]))
    # relu(h) = [0, 5], [0, 0] -> [0 + 15, 0 + 5]
    assert torch.equal(out, floats([[15, 5], [0, 0]]))
    assert torch.equal(out, masked)


# ---------------------------------------------------------------------------------------------
# einsum


class EinsumMlp(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.w1, self.w2 = nn.Parameter(torch.zeros(3, 2)), nn.Parameter(torch.zeros(3, 2))

    def forward(self, x):
        h = torch.relu(torch.einsum("bi,oi->bo", x, self.w1))
        return torch.einsum("oc,bo->bc", self.w2, h)


def test_einsum_ties_equal_letters():
    """Between an activation and a parameter einsum ties letters but gives no linear roles, so the
    width is an ``other`` group; it still slims."""
    m = fill_params(EinsumMlp(), w1=[[1, -1], [2, 0], [0, 3]], w2=[[1, -1], [2, 0], [3, 1]])
    an = vitgraph.analyze(m, X2)
    assert [(g.id, g.kind, g.size, set(g.params)) for g in an.groups] == [
        ("other", "other", 3, {("w2", 0), ("w1", 0)})], str(an)
    assert "tied by einsum at" in an.explain("other")
    slim, out, masked = _slim_and_masked(m, vitgraph.Plan.keep_all(an).keep("other", [0, 1]), X2)
    assert torch.equal(slim.w1, floats([[1, -1], [2, 0]])) and torch.equal(slim.w2, floats([[1, -1], [2, 0]]))
    # h = [-1, 2] and [-1, -2]; relu -> [0, 2], [0, 0]; -> [4, 0], [0, 0]
    assert torch.equal(out, floats([[4, 0], [0, 0]]))
    assert torch.equal(out, masked)


class EinsumAttention(nn.Module):
    """Two heads of two dims, q k^T and attn v written as einsums between activations."""

    def __init__(self) -> None:
        super().__init__()
        self.qkv, self.proj = nn.Linear(4, 12), nn.Linear(4, 4)

    def forward(self, x):
        b, n, c = x.shape
        q, k, v = self.qkv(x).reshape(b, n, 3, 2, 2).permute(2, 0, 3, 1, 4).unbind(0)
        attn = torch.einsum("bhld,bhtd->bhlt", q, k).softmax(-1)
        return self.proj(torch.einsum("bhlt,bhtv->bhlv", attn, v).transpose(1, 2).reshape(b, n, c))


def test_einsum_between_activations_gives_attention_roles():
    """A summed letter is qk, a kept letter both bring is a head, the second's own letter is v."""
    torch.manual_seed(0)
    an = vitgraph.analyze(EinsumAttention().eval(), torch.randn(1, 3, 4))
    got = {g.id: (g.kind, g.size, g.head_group, g.per_head) for g in an.groups}
    assert got == {"qkv:head": ("head", 2, None, False), "qkv:qk": ("qk", 2, "qkv:head", True),
                   "qkv:v": ("v", 2, "qkv:head", True)}, str(an)


# ---------------------------------------------------------------------------------------------
# an op declared without a rule


class AddmmHead(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.fc1 = nn.Linear(2, 3)
        self.w, self.b = nn.Parameter(torch.ones(3, 2)), nn.Parameter(torch.zeros(2))

    def forward(self, x):
        return torch.addmm(self.b, torch.relu(self.fc1(x)), self.w)


def test_addmm_has_no_rule_and_freezes_its_inputs():
    m = AddmmHead().eval()
    an = vitgraph.analyze(m, X2)
    assert an.groups == []
    assert an.unruled == [("addmm", "function torch.addmm")]
    assert [(f.size, f.where) for f in an.frozen] == [(3, ("fc1.bias", "fc1.weight"))]
    assert "no rule for function torch.addmm" in an.frozen[0].reason
    assert "dim 0: 3 channels frozen by no rule" in an.explain("fc1.weight")
    with pytest.raises(vitgraph.PlanError, match="unknown group 'fc1:ffn'"):
        vitgraph.Plan.keep_all(an).keep("fc1:ffn", [0])
