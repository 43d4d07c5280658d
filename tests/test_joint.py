"""Joint second-order ranking (passes/joint.py): Fisher blocks and their greedy removal order."""
from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import vitgraph
from vitgraph.passes.gates import GateSet
from vitgraph.passes.joint import FisherBlocks, greedy_scores

from helpers import score_setup, trained_tiny


@pytest.fixture(scope="module")
def setup():
    return score_setup(batches=2)


def _greedy_reference(c: torch.Tensor) -> list[int]:
    """Greedy order from per-example gradients ``c [n, units]``: each step removes the unit that
    least raises sum_n (sum over removed u of c_nu)^2 (the quadratic form written out)."""
    c = c.double()
    s = torch.zeros(c.shape[0], dtype=torch.float64)
    left, order = list(range(c.shape[1])), []
    while left:
        costs = [((s + c[:, u]) ** 2).sum().item() for u in left]
        u = left[min(range(len(left)), key=costs.__getitem__)]
        order.append(u)
        left.remove(u)
        s = s + c[:, u]
    return order


def test_redundant_units_are_not_removed_together():
    # units 0 and 1 carry the same signal, unit 2 an independent one, slightly stronger:
    # the diagonal removes 0 and 1 (the two smallest); removing both costs 4|v|^2, so the joint
    # form removes one of them and then unit 2
    v = torch.tensor([1.0, -1.0, 0.5, 0.0])
    w = torch.tensor([0.0, 0.5, 1.0, 1.2])
    c = torch.stack([v, v, w], 1)
    s = greedy_scores(c.T @ c)
    removed = set(torch.argsort(s)[:2].tolist())
    assert removed in ({0, 2}, {1, 2})
    diag = (c ** 2).sum(0)
    assert set(torch.argsort(diag)[:2].tolist()) == {0, 1}


def test_greedy_order_matches_the_written_out_quadratic_form():
    g = torch.Generator().manual_seed(0)
    c = torch.randn(40, 12, generator=g) @ torch.randn(12, 12, generator=g)  # correlated units
    s = greedy_scores(c.T @ c)
    assert torch.argsort(s, stable=True).tolist() == _greedy_reference(c)
    assert s.dtype == torch.float64
    assert (s[torch.argsort(s)].diff() >= 0).all()


def test_blocks_accumulate_weighted_outer_products_per_head(setup):
    model, an, _ = setup
    gates = GateSet(an, kinds=("qk", "ffn"))
    blocks = FisherBlocks(gates)
    g = torch.Generator().manual_seed(1)
    grads = {gid: torch.randn(5, gates.numel(gid), generator=g) for gid in gates.shapes}
    w = torch.rand(5, generator=g)
    blocks.add(grads, weights=w)
    blocks.add(grads)
    for gid, c in grads.items():
        shape = gates.shapes[gid]
        if len(shape) == 2:  # [heads, dims, dims]: no cross-head terms
            h, d = shape
            c3 = c.reshape(5, h, d)
            ref = torch.einsum("n,nhi,nhj->hij", w + 1, c3, c3)
        else:
            ref = (c * (w + 1)[:, None]).T @ c
        torch.testing.assert_close(blocks.blocks[gid], ref, rtol=1e-5, atol=1e-6)


def test_hessian_joint_starts_from_the_diagonal_and_follows_the_block(setup):
    model, an, data = setup
    diag = vitgraph.score(model, an, "hessian", data=data, joint=False)
    joint = vitgraph.score(model, an, "hessian", data=data)
    assert set(joint) == set(diag)
    for gid, s in joint.items():
        assert s.shape == diag[gid].shape
        rows_j = s.reshape(-1, s.shape[-1]) if s.dim() == 2 else s[None]
        rows_d = diag[gid].reshape(rows_j.shape)
        for rj, rd in zip(rows_j, rows_d):
            # the first unit removed is the one whose removal alone costs least
            assert int(rj.argmin()) == int(rd.argmin()), gid
    # residual channels and heads keep the diagonal (LayerNorm's scale invariance, see passes/joint.py)
    for g in an.groups:
        if g.kind in ("residual", "head") and g.id in joint:
            torch.testing.assert_close(joint[g.id], diag[g.id])
    # the joint and diagonal orders differ somewhere (cross terms matter on this model)
    assert any(not torch.equal(torch.argsort(joint[g].flatten()), torch.argsort(diag[g].flatten())) for g in joint)


def test_kl_joint_scores_have_the_diagonal_shapes_and_first_choices(setup):
    model, an, data = setup
    diag = vitgraph.score(model, an, "kl", data=data[:2], mode="approx", joint=False, kinds=("ffn",))
    joint = vitgraph.score(model, an, "kl", data=data[:2], mode="approx", kinds=("ffn",))
    for gid, s in joint.items():
        assert s.shape == diag[gid].shape
        assert int(s.argmin()) == int(diag[gid].argmin())


def test_joint_ranking_removes_value_dims_at_lower_loss_than_the_diagonal():
    """On a fitted tiny ViT, the v dims the joint form removes cost less loss than the diagonal's."""
    model, x, y = trained_tiny()
    an = vitgraph.analyze(model, x[:1])
    data = [(x[i:i + 32], y[i:i + 32]) for i in range(0, 256, 32)]
    for ratio in (0.5, 0.75):
        loss = {}
        for joint in (False, True):
            s = vitgraph.score(model, an, "hessian", data=data, kinds=("v",), joint=joint)
            plan = vitgraph.Plan.from_scores(an, s, ratio=ratio, kinds=("v",))
            with torch.no_grad():
                loss[joint] = F.cross_entropy(vitgraph.mask(model, plan, an)(x), y).item()
        assert loss[True] < loss[False], (ratio, loss)
