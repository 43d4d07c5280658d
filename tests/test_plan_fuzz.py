"""Fuzzing plans: any mutation of a valid plan's JSON gives a working compression or a PlanError.

Mutations touch every part of the format (version, fingerprint, input shapes and dtypes, kept
indices, the keys themselves) with wrong types, out-of-range and repeated indices, ragged and
nested lists.  Whatever comes out, the model's weights and training flag are unchanged.
"""
from __future__ import annotations

import json

import pytest
import torch
from hypothesis import HealthCheck, event, given, settings
from hypothesis import strategies as st

import vitgraph

from helpers import tiny_vit

FIELDS = ("vitgraph_plan", "fingerprint", "input_shapes", "input_dtypes", "kept")
X = torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit()
    an = vitgraph.analyze(model, X[:1])
    base = json.loads(vitgraph.Plan.random(an, ratio=0.5, seed=0).to_json())
    with torch.no_grad():
        ref = model(X)
    return model, an, base, ref.shape


json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-5, 200) | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=6),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=6), inner, max_size=3),
    max_leaves=12,
)
# dims stay small (or absurd, which fails to allocate at once) so no mutation allocates much
dims = st.integers(-2, 40) | st.just(10**15)
shapes = st.lists(st.lists(dims, min_size=0, max_size=4), min_size=0, max_size=3)
dtypes = st.lists(st.sampled_from(["float32", "float64", "float16", "int64", "bool", "Size", "floaty", ""]) | json_values,
                  max_size=3)


def index_lists(size: int) -> st.SearchStrategy:
    """Keep-sets near the valid ones: often sorted unique in range, sometimes not."""
    valid = st.lists(st.integers(0, size - 1), min_size=1, max_size=size, unique=True).map(sorted)
    wild = st.lists(st.integers(-3, size + 3) | json_values, max_size=8)
    return valid | wild | valid.map(lambda v: v + v[-1:]) | valid.map(lambda v: v[::-1])


@st.composite
def mutations(draw, an, base: dict) -> dict:
    d = json.loads(json.dumps(base))
    groups = {g.id: g for g in an.groups}
    for _ in range(draw(st.integers(1, 3))):
        op = draw(st.sampled_from(["drop", "add", "retype", "version", "fingerprint", "shapes", "dtypes",
                                   "kept_entry", "kept_index", "kept_drop", "kept_unknown", "kept_valid", "kept_valid"]))
        if op == "drop" and d:
            d.pop(draw(st.sampled_from(sorted(d))))
        elif op == "add":
            d[draw(st.text(max_size=8) | st.sampled_from(FIELDS))] = draw(json_values)
        elif op == "retype":
            d[draw(st.sampled_from(FIELDS))] = draw(json_values)
        elif op == "version":
            d["vitgraph_plan"] = draw(st.integers(-2, 100) | json_values)
        elif op == "fingerprint":
            fp = str(d.get("fingerprint", ""))
            d["fingerprint"] = draw(st.just(fp[::-1]) | st.text(max_size=16) | json_values)
        elif op == "shapes":
            d["input_shapes"] = draw(shapes | st.just([[1, 3, 16, 16]]) | st.just([[4, 3, 32, 32]]))
        elif op == "dtypes":
            d["input_dtypes"] = draw(dtypes)
        elif op.startswith("kept"):
            kept = d.get("kept")
            if not isinstance(kept, dict):
                kept = d["kept"] = {}
            gid = draw(st.sampled_from(sorted(groups)))
            g = groups[gid]
            if op == "kept_valid":  # a different valid keep-set (per head where the group allows it)
                one = st.lists(st.integers(0, g.size - 1), min_size=1, max_size=g.size, unique=True).map(sorted)
                if g.per_head:
                    n = draw(st.integers(1, g.size))
                    row = st.lists(st.integers(0, g.size - 1), min_size=n, max_size=n, unique=True).map(sorted)
                    kept[gid] = draw(st.lists(row, min_size=groups[g.head_group].size, max_size=groups[g.head_group].size))
                else:
                    kept[gid] = draw(one)
            elif op == "kept_drop":
                kept.pop(gid, None)
            elif op == "kept_unknown":
                kept[draw(st.text(max_size=10))] = draw(index_lists(4))
            elif op == "kept_entry":
                heads = groups[g.head_group].size if g.head_group else 2
                kept[gid] = draw(index_lists(g.size) | st.lists(index_lists(g.size), min_size=1, max_size=heads + 1)
                                 | json_values)
            else:
                entry = kept.get(gid)
                if isinstance(entry, list) and entry:
                    i = draw(st.integers(0, len(entry) - 1))
                    entry[i] = draw(st.integers(-2, g.size + 2) | json_values)
    return d


@st.composite
def mutated_plans(draw, setup) -> str:
    _, an, base, _ = setup
    return json.dumps(draw(mutations(an, base)))


@settings(max_examples=50, deadline=None, suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(data=st.data())
def test_mutated_plan_compresses_or_raises_plan_error(setup, data):
    model, an, base, out_shape = setup
    text = data.draw(mutated_plans(setup))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    flags = [m.training for m in model.modules()]
    reanalyze = data.draw(st.booleans()) and ("input_shapes" in text or "input_dtypes" in text)
    try:
        plan = vitgraph.Plan.from_json(text)
        slim = vitgraph.compress(model, plan, analysis=None if reanalyze else an)
    except vitgraph.PlanError:
        event("PlanError")
    else:
        event("compressed")
        with torch.no_grad():
            y = slim(X)
        assert y.shape == out_shape and bool(torch.isfinite(y).all())
        assert slim.training == model.training
    after = model.state_dict()
    assert after.keys() == before.keys() and all(torch.equal(before[k], after[k]) for k in before)
    assert [m.training for m in model.modules()] == flags


def test_unmutated_plan_compresses(setup):
    model, an, base, out_shape = setup
    for analysis in (an, None):
        slim = vitgraph.compress(model, vitgraph.Plan.from_json(json.dumps(base)), analysis=analysis)
        assert slim(X).shape == out_shape
