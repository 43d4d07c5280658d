"""The data-driven estimators behind the criteria: per-example Fisher, batch Fisher, KL."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitgraph
from vitgraph.passes.scoring_common import spearman

from helpers import score_setup, trained_tiny


@pytest.fixture(scope="module")
def setup():
    return score_setup(batches=2)


def _ffn_gate_grad(model, x, y, block: int = 1) -> torch.Tensor:
    """c_u = sum over fc1 row u, fc1 bias u and fc2 column u of w * dL/dw (mean loss over x)."""
    model.zero_grad()
    F.cross_entropy(model(x), y).backward()
    mlp = model.blocks[block].mlp
    c = (mlp.fc1.weight * mlp.fc1.weight.grad).sum(1) + mlp.fc1.bias * mlp.fc1.bias.grad
    c = c + (mlp.fc2.weight * mlp.fc2.weight.grad).sum(0)
    model.zero_grad()
    return c.detach().double()


def test_fisher_is_the_sum_of_per_example_squared_gate_gradients(setup):
    model, an, data = setup
    s = vitgraph.score(model, an, "hessian", data=data, chunk=3, joint=False)  # chunks that do not divide the batch
    ref = sum(_ffn_gate_grad(model, x[i:i + 1], y[i:i + 1]) ** 2 for x, y in data for i in range(len(x)))
    torch.testing.assert_close(s["blocks.1.mlp:ffn"].double(), ref, rtol=1e-3, atol=1e-10)
    # not the squared batch-mean gradient: that one is far smaller and orders the units differently
    batch = sum(_ffn_gate_grad(model, x, y) ** 2 for x, y in data)
    assert not torch.allclose(ref, batch, rtol=0.1)


def test_batch_mode_is_the_squared_batch_mean_gate_gradient(setup):
    """NViT's batch form: per unit, (sum of w * dL/dw over the unit's weights and bias)^2 of the
    batch-mean loss; per-head groups score every head apart."""
    model, an, data = setup
    s = vitgraph.score(model, an, "hessian", data=data[:1], mode="batch")
    x, y = data[0]
    torch.testing.assert_close(s["blocks.1.mlp:ffn"].double(), _ffn_gate_grad(model, x, y) ** 2, rtol=1e-4, atol=1e-12)
    torch.testing.assert_close(s["blocks.0.mlp:ffn"].double(), _ffn_gate_grad(model, x, y, block=0) ** 2,
                               rtol=1e-4, atol=1e-12)
    assert s["blocks.0.attn:qk"].shape == (2, 12) and s["blocks.0.attn:head"].shape == (2,)


def test_fisher_divides_by_the_kind_factor_before_squaring(setup):
    model, an, data = setup
    one = vitgraph.score(model, an, "hessian", data=data[:1])
    half = vitgraph.score(model, an, "hessian", data=data[:1], kind_factors={"ffn": 2.0})
    torch.testing.assert_close(half["blocks.1.mlp:ffn"] * 4, one["blocks.1.mlp:ffn"], rtol=1e-5, atol=1e-12)
    torch.testing.assert_close(half["blocks.0.attn:qk"], one["blocks.0.attn:qk"])


def test_fisher_takes_a_loss_per_example_and_refuses_untensored_targets(setup):
    model, an, data = setup
    seen = []

    def loss(out, t):
        seen.append(out.shape[0])
        return F.cross_entropy(out, t)

    vitgraph.score(model, an, "hessian", data=data[:1], loss_fn=loss)
    assert set(seen) == {1}
    with pytest.raises(ValueError, match="tensor targets"):
        vitgraph.score(model, an, "hessian", data=[(data[0][0], [1, 2])], loss_fn=lambda o, t: o.sum())
    with pytest.raises(ValueError, match="chunk"):
        vitgraph.score(model, an, "hessian", data=data, chunk=0)


def test_fisher_orders_units_like_the_loss_increase_of_removing_them():
    """On a fitted model, the per-example Fisher's diagonal ranks FFN channels like the measured loss
    increase when each is removed alone."""
    model, x, y = trained_tiny()
    an = vitgraph.analyze(model, x[:1])
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    gid = "blocks.1.mlp:ffn"
    size = an.group(gid).size
    with torch.no_grad():
        base = F.cross_entropy(model(x), y).item()
        rise = []
        for u in range(size):
            plan = vitgraph.Plan.keep_all(an).keep(gid, [i for i in range(size) if i != u])
            rise.append(F.cross_entropy(vitgraph.mask(model, plan, an)(x), y).item() - base)
    rise = torch.tensor(rise)
    fisher = vitgraph.score(model, an, "hessian", data=data, kinds=("ffn",), joint=False)[gid]
    assert spearman(fisher, rise) >= 0.8
