"""Reconstruction pass: closed-form refit of the layers that read pruned channels."""
import numpy as np
import pytest
import torch
from timm.models.vision_transformer import VisionTransformer

import vitgraph
from vitgraph.passes.reconstruct import refit, reconstruct


def _vit(depth: int = 2) -> torch.nn.Module:
    torch.manual_seed(0)
    return VisionTransformer(img_size=16, patch_size=4, in_chans=3, num_classes=5, embed_dim=48, depth=depth,
                             num_heads=3, mlp_ratio=4.0).eval()


def _data(n_batches: int = 4, bs: int = 8, seed: int = 1) -> list:
    g = torch.Generator().manual_seed(seed)
    return [(torch.randn(bs, 3, 16, 16, generator=g), None) for _ in range(n_batches)]


def _capture(model: torch.nn.Module, name: str, data: list, output: bool) -> torch.Tensor:
    """Inputs (or outputs) of submodule ``name`` over ``data``, rows = tokens."""
    got = []
    mod = model.get_submodule(name)
    h = mod.register_forward_hook(lambda m, a, o: got.append((o if output else a[0]).detach()))
    with torch.no_grad():
        for x, _ in data:
            model(x)
    h.remove()
    return torch.cat([g.reshape(-1, g.shape[-1]) for g in got]).double()


def test_refit_equals_independent_least_squares():
    model, x = _vit(), torch.randn(1, 3, 16, 16)
    an = vitgraph.analyze(model, x)
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["ffn"])
    slim = vitgraph.compress(model, plan, an)
    data = _data()
    # the first consumer's slim input is not touched by earlier refits: solve it independently
    xs = _capture(slim, "blocks.0.mlp.fc2", data, output=False)
    y = _capture(model, "blocks.0.mlp.fc2", data, output=True)
    a = torch.cat([xs, torch.ones(len(xs), 1, dtype=xs.dtype)], 1).numpy()
    sol = np.linalg.lstsq(a, y.numpy(), rcond=None)[0]
    fits = refit(slim, an, plan.selection(an), data, damping=0.0)
    assert [f.name for f in fits] == ["blocks.0.mlp.fc2", "blocks.1.mlp.fc2"]
    fc2 = slim.get_submodule("blocks.0.mlp.fc2")
    np.testing.assert_allclose(fc2.weight.detach().double().T.numpy(), sol[:-1], rtol=1e-3, atol=1e-4)
    np.testing.assert_allclose(fc2.bias.detach().double().numpy(), sol[-1], rtol=1e-3, atol=1e-4)
    # the reported error is the residual sum of squares of that solution
    rss = float(((a @ sol - y.numpy()) ** 2).sum())
    assert fits[0].error_after == pytest.approx(rss, rel=1e-4)


@pytest.mark.parametrize("kinds", [["ffn"], ["v", "head"], ["qk", "v", "ffn", "residual"]])
def test_no_layer_error_grows_and_output_gets_closer(kinds):
    model, x = _vit(3), torch.randn(1, 3, 16, 16)
    an = vitgraph.analyze(model, x)
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=kinds)
    slim = vitgraph.compress(model, plan, an)
    data = _data()
    fits = refit(slim2 := vitgraph.compress(model, plan, an), an, plan.selection(an), data)
    assert fits, "a plan that narrows inputs has consumers to refit"
    assert all(f.error_after <= f.error_before for f in fits)
    assert any(f.error_after < 0.9 * f.error_before for f in fits)
    held_out = _data(2, seed=7)
    with torch.no_grad():
        ref = torch.cat([model(b) for b, _ in held_out])
        before = (torch.cat([slim(b) for b, _ in held_out]) - ref).pow(2).mean()
        after = (torch.cat([slim2(b) for b, _ in held_out]) - ref).pow(2).mean()
    assert after < before


def test_residual_plan_refits_the_readers_of_the_stream():
    model, x = _vit(), torch.randn(1, 3, 16, 16)
    an = vitgraph.analyze(model, x)
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.25, kinds=["residual"])
    slim = vitgraph.compress(model, plan, an)
    names = {f.name for f in refit(slim, an, plan.selection(an), _data())}
    assert {"blocks.0.attn.qkv", "blocks.0.mlp.fc1", "blocks.1.attn.qkv", "head"} <= names


def test_identity_plan_is_unchanged():
    model, x = _vit(), torch.randn(1, 3, 16, 16)
    an = vitgraph.analyze(model, x)
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.0)
    slim = vitgraph.compress(model, plan, an)
    out = reconstruct(slim, model, _data(), plan=plan, analysis=an)
    for (n, p), (_, q) in zip(slim.state_dict().items(), out.state_dict().items()):
        assert torch.equal(p, q), n
    assert refit(slim, an, plan.selection(an), _data()) == []


def test_reconstruct_copies_and_bias_mode_keeps_weights():
    model, x = _vit(), torch.randn(1, 3, 16, 16)
    an = vitgraph.analyze(model, x)
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["ffn"])
    slim = vitgraph.compress(model, plan, an)
    w = slim.get_submodule("blocks.0.mlp.fc2").weight.clone()
    b = slim.get_submodule("blocks.0.mlp.fc2").bias.clone()
    out = reconstruct(slim, model, _data(), plan=plan, analysis=an, mode="bias")
    assert torch.equal(slim.get_submodule("blocks.0.mlp.fc2").weight, w)  # input untouched
    assert torch.equal(out.get_submodule("blocks.0.mlp.fc2").weight, w)  # bias mode: weights kept
    assert not torch.equal(out.get_submodule("blocks.0.mlp.fc2").bias, b)


def test_bad_arguments_are_named():
    model, x = _vit(), torch.randn(1, 3, 16, 16)
    an = vitgraph.analyze(model, x)
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["ffn"])
    slim = vitgraph.compress(model, plan, an)
    with pytest.raises(vitgraph.VitgraphError, match="mode"):
        reconstruct(slim, model, _data(), plan=plan, mode="lsq")
    with pytest.raises(vitgraph.VitgraphError, match="no batches"):
        reconstruct(slim, model, [], plan=plan)
    with pytest.raises(vitgraph.VitgraphError, match="vitgraph.compress"):
        reconstruct(model, model, _data(), plan=plan)


def test_choose_plan_keeps_the_candidate_closest_to_dense_after_reconstruction():
    from vitgraph.allocation import choose_plan, divergence
    from vitgraph.deploy.measure import count_flops

    model, x = _vit(3), torch.randn(1, 3, 16, 16)
    an = vitgraph.analyze(model, x)
    data = _data(4)
    plan, tried = choose_plan(model, an, None, "flops", 0.5, data, x, plan_options=dict(round_to=8))
    assert len(tried) >= 2 and [c.loss for c in tried] == sorted(c.loss for c in tried)
    assert all(abs(c.fraction - 0.5) <= 0.01 for c in tried)
    slim = vitgraph.compress(model, plan, an)
    assert abs(count_flops(slim, (x,)) / count_flops(model, (x,)) - 0.5) <= 0.01
    # the winner's held-out divergence is the one reported first
    refit(slim, an, plan.selection(an), data[:-1], progress=False)
    held = data[-1][0]
    with torch.no_grad():
        assert divergence(model(held), slim(held)) == pytest.approx(tried[0].loss, rel=1e-4)
    with pytest.raises(vitgraph.PlanError, match="at least 2"):
        choose_plan(model, an, None, "flops", 0.5, data[:1], x)
    with pytest.raises(vitgraph.PlanError, match="flops or params"):
        choose_plan(model, an, None, "latency", 0.5, data, x)
