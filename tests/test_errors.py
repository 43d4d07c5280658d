"""Every error path names what is wrong and mutates nothing."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitgraph

from helpers import tiny_vit


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
def model():
    return tiny_vit()


@pytest.fixture(scope="module")
def an(model):  # (the analysis holds its model weakly: the model fixture keeps it alive)
    return vitgraph.analyze(model, torch.randn(1, 3, 32, 32))


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


# -- hardening: bad input of every kind gets a vitgraph error naming the field, argument or group


def _group(an, kind):
    return next(g for g in an.groups if g.kind == kind)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}, [m.training for m in model.modules()]


def _unchanged(model, before):
    sd, flags = before
    now = model.state_dict()
    assert now.keys() == sd.keys() and all(torch.equal(sd[k], now[k]) for k in sd)
    assert [m.training for m in model.modules()] == flags


def _plan_json(an, **fields):
    import json

    d = json.loads(vitgraph.Plan.from_scores(an, ratio=0.5).to_json())
    d.update(fields)
    return json.dumps(d)


def test_future_plan_version_is_refused(an):
    with pytest.raises(vitgraph.PlanError, match="vitgraph_plan") as e:
        vitgraph.Plan.from_json(_plan_json(an, vitgraph_plan=99))
    assert "99" in str(e.value)
    for bad in ("1", None, 0, True):
        with pytest.raises(vitgraph.PlanError, match="vitgraph_plan"):
            vitgraph.Plan.from_json(_plan_json(an, vitgraph_plan=bad))


@pytest.mark.parametrize(
    "fields, words",
    [
        ({"kept": [1, 2]}, "'kept'"),
        ({"kept": {"blocks.0.mlp:ffn": None}}, "blocks.0.mlp:ffn"),
        ({"kept": {"blocks.0.mlp:ffn": [True, 2]}}, "integers"),
        ({"kept": {"blocks.0.attn:qk": [[0], 1, [2]]}}, "mix"),
        ({"input_shapes": "abc"}, "'input_shapes'"),
        ({"input_shapes": [["a", 3]]}, r"'input_shapes'\[0\]"),
        ({"input_shapes": [[-1, 3, 32, 32]]}, "'input_shapes'"),
        ({"input_shapes": []}, "'input_shapes'"),
        ({"input_dtypes": [3]}, "'input_dtypes'"),
        ({"input_dtypes": ["float32", "float32"]}, "'input_dtypes'"),
        ({"input_dtypes": ["Size"]}, "'Size'"),
        ({"fingerprint": 3}, "'fingerprint'"),
        ({"extra": 1}, "extra"),
    ],
)
def test_bad_plan_fields_name_the_field(an, fields, words):
    with pytest.raises(vitgraph.PlanError, match=words):
        vitgraph.Plan.from_json(_plan_json(an, **fields))
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)  # the same data set on a Plan object fails at compress
    if "extra" in fields or "vitgraph_plan" in fields:
        return
    for k, v in fields.items():
        setattr(plan, k, v)
    plan.analysis = None
    before = _state(an.model)
    with pytest.raises(vitgraph.PlanError, match=words):
        vitgraph.compress(an.model, plan)
    _unchanged(an.model, before)


def test_plan_input_shapes_the_model_cannot_take(an):
    model = an.model
    before = _state(model)
    for shapes in ([[1, 3, 16, 16]], [[10**12, 3, 32, 32]]):
        with pytest.raises(vitgraph.PlanError, match="input_shapes"):
            vitgraph.compress(model, vitgraph.Plan.from_json(_plan_json(an, input_shapes=shapes)))
    _unchanged(model, before)


@pytest.mark.parametrize("value", [float("nan"), float("inf"), -float("inf")])
def test_non_finite_scores_are_refused(an, value):
    g = _group(an, "ffn")
    s = torch.rand(g.size)
    s[3] = value
    with pytest.raises(vitgraph.PlanError, match=g.id) as e:
        vitgraph.Plan.from_scores(an, {g.id: s}, ratio=0.5)
    assert "NaN or infinite" in str(e.value)


@pytest.mark.parametrize(
    "kind, make, words",
    [
        ("ffn", lambda g, h: torch.rand(5), r"shape \(5,\)"),
        ("ffn", lambda g, h: torch.rand(2, g.size), "shape"),
        ("qk", lambda g, h: torch.rand(h + 1, g.size), "shape"),
        ("head", lambda g, h: torch.rand(g.size + 1), "shape"),
        ("ffn", lambda g, h: "abc", "numbers"),
    ],
)
def test_scores_of_the_wrong_shape_or_type(an, kind, make, words):
    g = _group(an, kind)
    heads = an.group(g.head_group).size if g.head_group else 1
    with pytest.raises(vitgraph.PlanError, match=words) as e:
        vitgraph.Plan.from_scores(an, {g.id: make(g, heads)}, ratio=0.5, kinds=[kind])
    assert g.id in str(e.value)


@pytest.mark.parametrize("method", ["hessian", "kl", "threshold"])
@pytest.mark.parametrize("data", [[], (), "generator"])
def test_scoring_with_no_data_is_refused(an, method, data):
    model = an.model
    before = _state(model)
    if data == "generator":
        data = (b for b in [])
    opts = {"steps": 3} if method == "threshold" else {}
    with pytest.raises(vitgraph.ScoreError, match="data"):
        vitgraph.score(model, an, method, data=data, **opts)
    _unchanged(model, before)


def test_score_arguments(an):
    model = an.model
    with pytest.raises(vitgraph.ScoreError, match="analysis"):
        vitgraph.score(model, "not an analysis")
    with pytest.raises(vitgraph.ScoreError, match="model"):
        vitgraph.score(lambda x: x, an)
    with pytest.raises(vitgraph.ScoreError, match="data"):
        vitgraph.score(model, an, "hessian", data=5)
    batch = [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))]
    for method in ("hessian", "kl"):
        with pytest.raises(vitgraph.ScoreError, match="max_batches"):
            vitgraph.score(model, an, method, data=batch, max_batches=0)
    with pytest.raises(vitgraph.ScoreError, match="group_ids.*nope"):
        vitgraph.score(model, an, "magnitude", group_ids=["nope"])
    with pytest.raises(ValueError, match="unknown score method"):  # (ScoreError is a ValueError)
        vitgraph.score(model, an, 3)


def test_analyze_needs_a_module_and_tensors():
    with pytest.raises(vitgraph.TraceError, match="model must be a torch.nn.Module"):
        vitgraph.analyze(lambda x: x + 1, torch.randn(2, 3))
    with pytest.raises(vitgraph.TraceError, match="model must be a torch.nn.Module"):
        vitgraph.compress(lambda x: x + 1, vitgraph.Plan("0", [[2, 3]]))
    m = tiny_vit()
    before = _state(m)
    for bad, words in [(None, "example_inputs"), ("abc", "example_inputs"), ([], "example_inputs is empty"),
                       ([torch.randn(1, 3, 32, 32), "x"], r"example_inputs\[1\]"),
                       (torch.randn(1, 3, 16, 16), r"example inputs \(shapes \[\[1, 3, 16, 16\]\]\)"),
                       (torch.randn(1, 4, 32, 32), "example inputs")]:
        with pytest.raises(vitgraph.TraceError, match=words):
            vitgraph.analyze(m, bad)
    _unchanged(m, before)


@pytest.mark.parametrize(
    "kw, words",
    [
        ({"ratio": "0.5"}, "ratio"),
        ({"ratio": float("nan")}, "ratio"),
        ({"ratio": True}, "ratio"),
        ({"round_to": "8"}, "round_to"),
        ({"round_to": 0}, "round_to"),
        ({"round_to": 2.5}, "round_to"),
        ({"min_keep": -1}, "min_keep"),
        ({"kinds": ["bogus"]}, "bogus"),
        ({"kinds": 3}, "kinds"),
        ({"scores": [1, 2]}, "scores"),
        ({"scores": {"nope:ffn": torch.rand(3)}}, "nope:ffn"),
    ],
)
def test_from_scores_arguments(an, kw, words):
    kw = {"ratio": 0.5, **kw}
    with pytest.raises(vitgraph.PlanError, match=words):
        vitgraph.Plan.from_scores(an, **kw)


def test_from_scores_takes_one_kind_as_a_string(an):
    plan = vitgraph.Plan.from_scores(an, ratio=0.5, kinds="ffn")
    assert plan.kept and all(an.group(g).kind == "ffn" for g in plan.kept)


def test_random_plan_arguments(an):
    with pytest.raises(vitgraph.PlanError, match="ratio"):
        vitgraph.Plan.random(an, ratio="x")
    with pytest.raises(vitgraph.PlanError, match="bogus"):
        vitgraph.Plan.random(an, kinds=["bogus"])
    with pytest.raises(vitgraph.PlanError, match="seed"):
        vitgraph.Plan.random(an, seed="s")
    with pytest.raises(vitgraph.PlanError, match="Analysis"):
        vitgraph.Plan.random("not an analysis")


@pytest.mark.parametrize(
    "kind, keep, words",
    [
        ("ffn", 5, "list of integers"),
        ("ffn", [0.5, 1], "integers"),
        ("ffn", ["a"], "integers"),
        ("ffn", [True, 2], "integers"),
        ("ffn", torch.tensor([0.0, 1.0]), "integers"),
        ("ffn", [-1, 0], "out of range"),
        ("qk", [[[1]]] * 3, "integers"),
        ("qk", [0, [1]], "mix"),
        ("head", [[0], [1], [2]], "per-head"),
    ],
)
def test_keep_rejects_bad_indices(an, kind, keep, words):
    g = _group(an, kind)
    plan = vitgraph.Plan.keep_all(an)
    with pytest.raises(vitgraph.PlanError, match=words) as e:
        plan.keep(g.id, keep)
    assert g.id in str(e.value) and plan.kept == {}
    with pytest.raises(vitgraph.PlanError, match="group id"):
        plan.keep(3, [0])


def test_keep_takes_arrays_and_tensors(an):
    import numpy as np

    g = _group(an, "ffn")
    plan = vitgraph.Plan.keep_all(an).keep(g.id, np.arange(4)).keep(_group(an, "residual").id, torch.arange(8))
    assert plan.kept[g.id] == [0, 1, 2, 3] and all(type(i) is int for i in plan.kept[g.id])


def test_validate_needs_an_analysis(an):
    with pytest.raises(vitgraph.PlanError, match="Analysis"):
        vitgraph.Plan.keep_all(an).validate("abc")
    with pytest.raises(vitgraph.PlanError, match="analysis"):
        vitgraph.compress(an.model, vitgraph.Plan.keep_all(an), analysis="abc")


# -- the compressed module keeps the model's mode


def test_compress_and_mask_keep_the_training_flag():
    m = tiny_vit().train()
    x = torch.randn(1, 3, 32, 32)
    an = vitgraph.analyze(m, x)
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)
    assert m.training and an.graph_module.training
    for out in (vitgraph.compress(m, plan), vitgraph.mask(m, plan),
                vitgraph.compress(m, vitgraph.Plan.from_json(plan.to_json()))):
        assert out.training and all(mod.training for mod in out.modules())
    assert all(mod.training for mod in m.modules())
    m.eval()
    m.blocks[0].train()  # mixed modes are kept module by module
    an = vitgraph.analyze(m, x)
    plan = vitgraph.Plan.from_scores(an, ratio=0.5)
    for out in (vitgraph.compress(m, plan), vitgraph.mask(m, plan)):
        assert not out.training
        assert out.get_submodule("blocks.0").training and out.get_submodule("blocks.0.attn.qkv").training
        assert not out.get_submodule("blocks.1").training
    assert not m.training and m.blocks[0].training and not m.blocks[1].training


# -- loading a saved compressed module leaves tracing as it was


def _fx_wrap_table():
    import torch.fx._symbolic_trace as st

    return st._wrapped_fns_to_patch


def test_loading_a_saved_compressed_model_leaves_tracing_alone(tmp_path):
    m = tiny_vit()
    x = torch.randn(1, 3, 32, 32)
    an = vitgraph.analyze(m, x)
    slim = vitgraph.compress(m, vitgraph.Plan.from_scores(an, ratio=0.5))
    torch.save(slim, tmp_path / "model.pt")  # what `vitgraph compress` writes
    table = dict(_fx_wrap_table())
    loaded = torch.load(tmp_path / "model.pt", weights_only=False)
    assert torch.allclose(loaded(x), slim(x), atol=1e-6)
    assert dict(_fx_wrap_table()) == table  # loading registered nothing with fx
    torch.fx.symbolic_trace(tiny_vit())  # plain fx still traces
    an2 = vitgraph.analyze(tiny_vit(), x)  # and so does vitgraph
    assert an2.fingerprint == an.fingerprint
    retraced = torch.fx.symbolic_trace(loaded)  # re-tracing the loaded module is safe too
    assert torch.allclose(retraced(x), slim(x), atol=1e-6)
    torch.save(retraced, tmp_path / "again.pt")
    torch.load(tmp_path / "again.pt", weights_only=False)
    assert dict(_fx_wrap_table()) == table
    vitgraph.analyze(tiny_vit(), x)
    with pytest.raises(AssertionError, match="attn_mask"):  # the None-argument guard is kept
        loaded(x, torch.zeros(1))


def test_tracing_survives_a_broken_fx_wrap_table():
    """A GraphModule saved by plain fx (or an older vitgraph) leaves an entry in fx's table that no
    trace can patch; vitgraph traces around it and leaves the table as it found it."""
    table = _fx_wrap_table()
    key = (id(table), "torch.fx._symbolic_trace._assert_is_none")
    had = dict(table)
    table[key] = {}  # what loading such a module registers
    try:
        with pytest.raises(KeyError):
            torch.fx.symbolic_trace(tiny_vit())
        an = vitgraph.analyze(tiny_vit(), torch.randn(1, 3, 32, 32))
        assert an.groups
        assert key in table
    finally:
        table.pop(key, None)
    assert dict(table) == had


@pytest.mark.parametrize("target", ["flops:2", "flops", "speed:0.5", "flops:x"])
def test_score_command_checks_its_target_before_scoring(tmp_path, capsys, target):
    """``vitgraph score --target`` is parsed by the one target parser, before any work is done."""
    from vitgraph.cli import main

    rc = main(["score", "deit_tiny_patch16_224", "--method", "magnitude", "--target", target,
               "--out", str(tmp_path / "s.safetensors")])
    assert rc != 0
    assert "--target must be KIND:FRACTION" in capsys.readouterr().err
    assert not (tmp_path / "s.safetensors").exists()
