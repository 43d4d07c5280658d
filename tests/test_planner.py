"""plan_to_target, the cost model and the latency table (tiny timm ViTs, synthetic tables)."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import vitgraph
from vitgraph import CostModel, LatencyTable, PlanError, UnknownGroupError, plan_to_target
from vitgraph.deploy.export import onnx_op_types
from vitgraph.deploy.measure import count_flops, count_params

from helpers import FlopTable, tiny_vit

KINDS = ("residual", "head", "qk", "v", "ffn")


@pytest.fixture(scope="module")
def setup():
    model = tiny_vit(embed_dim=96, num_heads=3, mlp_ratio=4.0, depth=2)
    x = torch.randn(1, 3, 32, 32)
    return model, x, vitgraph.analyze(model, x)


def widths_of(an, plan) -> dict[str, int]:
    out = {}
    for gid, k in plan.kept.items():
        out[gid] = len(k[0]) if isinstance(k[0], list) else len(k)
    return out


def test_cost_model_matches_counts(setup):
    model, x, an = setup
    cm = CostModel(an)
    assert cm.flops() == count_flops(model, x)
    assert cm.params() == count_params(model)
    plans = [plan_to_target(an, target=t, fraction=0.5, mode=m, kinds=KINDS)
             for t in ("flops", "params") for m in ("global", "uniform")]
    ragged = vitgraph.Plan.keep_all(an)
    ragged.keep("blocks.0.attn:qk", [[0, 1, 2, 3]] * 3).keep("blocks.0.attn:v", [[0, 1, 2, 3, 4, 5, 6, 7, 8]] * 3)
    ragged.keep("blocks.1.attn:head", [0, 2])
    for plan in plans + [ragged, vitgraph.Plan.random(an, 0.4, seed=3)]:
        slim = vitgraph.compress(model, plan, an)
        w = widths_of(an, plan)
        assert cm.flops(w) == count_flops(slim, x)
        assert cm.params(w) == count_params(slim)


@pytest.mark.parametrize("target", ["flops", "params"])
@pytest.mark.parametrize("batch_units", [1, 8])
def test_global_target_reached_within_one_unit(setup, target, batch_units):
    _, _, an = setup
    cm = CostModel(an)
    plan = plan_to_target(an, target=target, fraction=0.4, kinds=KINDS, batch_units=batch_units, unit={"residual": 8, "ffn": 8})
    w = {g.id: g.size for g in an.groups} | widths_of(an, plan)
    goal = 0.4 * cm.cost(target, {})
    assert cm.cost(target, w) <= goal
    steps = {"residual": 8, "ffn": 8, "qk": 8, "v": 8, "head": 1}
    # restoring one unit of some group (the last one removed) must exceed the target
    over = [g.id for g in an.groups if g.kind in KINDS and w[g.id] < g.size
            and cm.cost(target, w | {g.id: min(g.size, w[g.id] + steps[g.kind])}) > goal]
    assert over


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_rounding_honoured_end_to_end(setup, mode):
    model, x, an = setup
    plan = plan_to_target(an, target="flops", fraction=0.45, round_to=16, kinds=KINDS, mode=mode,
                          unit={"qk": 16, "v": 16}, min_width={"qk": 16, "v": 16})
    w = widths_of(an, plan)
    assert w, "plan removes nothing"
    for gid, n in w.items():
        if an.group(gid).kind != "head":
            assert n % 16 == 0, (gid, n)
    slim = vitgraph.compress(model, plan, an)
    linears = [m for m in slim.modules() if isinstance(m, nn.Linear)]
    assert linears
    for lin in linears:
        assert lin.in_features % 16 == 0, lin
        assert lin.out_features % 16 == 0 or lin.out_features == 10, lin  # 10: the classifier output


def test_head_alignment_and_min_widths(setup):
    model, x, an = setup
    plan = plan_to_target(an, target="flops", fraction=0.15, kinds=KINDS, min_width={"ffn": 64, "residual": 32, "qk": 16})
    for g in an.groups:
        k = plan.kept.get(g.id)
        if k is None:
            continue
        if g.kind in ("qk", "v") and g.per_head:
            assert isinstance(k[0], list) and len(k) == an.group(g.head_group).size
            assert len({len(r) for r in k}) == 1
        n = len(k[0]) if isinstance(k[0], list) else len(k)
        assert n >= {"ffn": 64, "residual": 32, "qk": 16, "v": 8, "head": 1}[g.kind]
    out = vitgraph.compress(model, plan, an)(x)
    assert out.shape == (1, 10)


def test_uniform_mode_one_ratio(setup):
    _, _, an = setup
    cm = CostModel(an)
    plan = plan_to_target(an, target="flops", fraction=0.5, mode="uniform", kinds=("residual", "ffn"), min_width={"residual": 16})
    w = widths_of(an, plan)
    ffn = {w[g.id] for g in an.groups if g.kind == "ffn"}
    assert len(ffn) == 1
    ratio_res = w["residual"] / 96
    ratio_ffn = ffn.pop() / 384
    assert abs(ratio_res - ratio_ffn) < 0.02
    assert cm.flops(w) <= 0.5 * cm.flops()
    assert cm.flops(w) > 0.4 * cm.flops()


def test_impossible_targets_raise(setup):
    _, _, an = setup
    with pytest.raises(PlanError, match="cannot reach"):
        plan_to_target(an, target="flops", fraction=0.01, kinds=("ffn",))
    with pytest.raises(PlanError, match="latency_table"):
        plan_to_target(an, target="latency", fraction=0.5)
    with pytest.raises(PlanError, match="fraction"):
        plan_to_target(an, fraction=1.5)


def test_lut_interpolation_synthetic():
    entries = {f"linear:10,{k},{n}": 0.001 * k + 0.01 * n for k in (64, 72, 128, 144) for n in (16, 24)}
    entries.update({f"eltwise:{n}": 1e-5 * n for n in (4096, 6144, 8192)})
    t = LatencyTable("ort-cpu", entries=entries, measure=False)
    assert t.lookup("linear", (10, 68, 20), (False, True, True)) == pytest.approx(0.001 * 68 + 0.01 * 20)
    assert t.lookup("linear", (10, 128, 16), (False, True, True)) == pytest.approx(0.128 + 0.16)
    assert t.lookup("linear", (10, 130, 24), (False, True, True)) == pytest.approx(0.13 + 0.24)
    assert t.lookup("eltwise", (5000,)) == pytest.approx(0.05)
    with pytest.raises(KeyError):
        t.lookup("linear", (10, 200, 16), (False, True, True))


def test_lut_cache_round_trip(tmp_path):
    """Measured points are written to the cache file and a new table for the same runtime and batch
    reads them back in its constructor; a corrupt file is ignored (an empty table, nothing raised)."""
    written = FlopTable(cache_dir=tmp_path)  # measures with a FLOP formula instead of timing
    assert written.path.parent == tmp_path and not written.path.exists()
    v = written.lookup("linear", (197, 100, 300), (False, True, True))
    assert written.n_measured >= 2 and written.save() == written.path and written.path.exists()

    # a plain table (it cannot measure) finds the same file and has every point from it
    read = LatencyTable("torch-cpu", cache_dir=tmp_path, measure=False)
    assert read.path == written.path and read.n_measured == 0
    assert read.entries == written.entries
    assert read.lookup("linear", (197, 100, 300), (False, True, True)) == pytest.approx(v)
    with pytest.raises(UnknownGroupError, match="measuring is off"):
        read.lookup("linear", (197, 100, 500), (False, True, True))  # a point the file does not hold

    # another batch size is another file
    assert LatencyTable("torch-cpu", batch=2, cache_dir=tmp_path, measure=False).entries == {}

    written.path.write_text('{"entries": {"linear:197,96,256": 1.0')  # truncated JSON
    assert LatencyTable("torch-cpu", cache_dir=tmp_path, measure=False).entries == {}
    written.path.write_text('{"runtime": "torch-cpu"}')  # no entries
    assert LatencyTable("torch-cpu", cache_dir=tmp_path, measure=False).entries == {}


@pytest.mark.parametrize("mode", ["global", "uniform"])
def test_latency_target_with_table(setup, mode):
    _, _, an = setup
    cm = CostModel(an)
    table = FlopTable(batch=4)
    hist: list = []
    plan = plan_to_target(an, target="latency", fraction=0.5, latency_table=table, kinds=KINDS, mode=mode, history=hist)
    w = widths_of(an, plan)
    dense = cm.latency({}, table)
    assert cm.latency(w, table) <= 0.5 * dense
    assert hist[-1]["predicted"] == pytest.approx(cm.latency(w, table) / dense)
    if mode == "global":
        plain = plan_to_target(an, target="latency", fraction=0.5, latency_table=table, kinds=KINDS, eta=0.0)
        assert widths_of(an, plain)  # eta=0: scores alone, still reaches the target
        assert cm.latency(widths_of(an, plain), table) <= 0.5 * dense


def test_compressed_onnx_has_no_new_op_types(setup, tmp_path):
    model, x, an = setup
    plan = plan_to_target(an, target="flops", fraction=0.5, round_to=16, kinds=("residual", "head", "ffn"), mode="uniform")
    slim = vitgraph.compress(model, plan, an)
    vitgraph.export_onnx(model, tmp_path / "dense.onnx", (x,))
    vitgraph.export_onnx(slim, tmp_path / "slim.onnx", (x,))
    extra = onnx_op_types(tmp_path / "slim.onnx") - onnx_op_types(tmp_path / "dense.onnx")
    assert not extra, f"compressed graph adds op types {sorted(extra)}"
    with torch.no_grad():
        assert math.isfinite(float(slim(x).sum()))


_SHAPE_PLUMBING = {"Shape", "Gather", "Unsqueeze", "Constant"}


def test_compressed_onnx_matches_same_width_dense_graph(setup, tmp_path):
    """The slim ONNX graph has exactly the compute ops (by type and count) of a dense model built at
    its widths. Shape plumbing is left out: how many Shape/Gather/Unsqueeze/Constant nodes the
    exporter writes for the same sizes differs between torch releases (2.13 writes two more for
    the dense model)."""
    import collections

    import onnx

    model, x, an = setup
    plan = vitgraph.Plan.keep_all(an).keep("residual", sorted(list(range(0, 96, 3)) + list(range(1, 96, 3))))
    for g in an.groups:
        if g.kind == "head":
            plan.keep(g.id, [0, 2])
        elif g.kind == "ffn":
            plan.keep(g.id, sorted(list(range(0, 384, 3)) + list(range(1, 384, 3))))
    slim = vitgraph.compress(model, plan, an)
    same = tiny_vit(embed_dim=64, num_heads=2, mlp_ratio=4.0, depth=2)
    assert count_flops(slim, x) == count_flops(same, x) and count_params(slim) == count_params(same)
    hist = {}
    for name, m in (("slim", slim), ("same", same)):
        vitgraph.export_onnx(m, tmp_path / f"{name}.onnx", (x,), check=False)
        hist[name] = collections.Counter(n.op_type for n in onnx.load(str(tmp_path / f"{name}.onnx")).graph.node
                                         if n.op_type not in _SHAPE_PLUMBING)
    assert hist["slim"] == hist["same"]


def test_latency_calibration_referees_its_closest_plans(setup, monkeypatch):
    """On a machine whose single measurements are noisy, the closed loop returns the plan that the
    joint, longer referee run measures closest to the target (a synthetic machine: latency is
    0.2 + 0.8 x the FLOPs fraction, and each calibration round is off by +-0.06 in turn)."""
    from types import SimpleNamespace

    import vitgraph.targets as targets

    model, x, an = setup
    dense_flops = count_flops(model, (x,))

    def true_ratio(m):
        return 0.2 + 0.8 * count_flops(m, (x,)) / dense_flops

    calls = []

    def fake_measure_many(model_, slims, table, shape, reps=5, rounds=5, cache=None, seconds=None):
        calls.append((len(slims), seconds))
        noise = 0.06 * (-1) ** len(calls) if len(slims) == 1 else 0.0
        stats = {"dense": SimpleNamespace(median_ms=1.0)}
        stats.update({k: SimpleNamespace(median_ms=true_ratio(m) + noise) for k, m in slims.items()})
        return stats

    monkeypatch.setattr(targets, "measure_many", fake_measure_many)
    hist: list = []
    plan = targets.plan_to_target(an, target="latency", fraction=0.5, latency_table=FlopTable(), kinds=KINDS,
                                  calibrate=True, calibrate_rounds=4, history=hist)
    rounds = [h for h in hist if h["round"] != "referee"]
    referee = hist[-1]
    assert referee["round"] == "referee" and len(referee["candidates"]) >= 2
    assert all(n == 1 and s and s > 0 for n, s in calls[:len(rounds)])  # every round timed for a while
    # the chosen plan is the candidate the referee measured closest, by its true latency
    chosen = true_ratio(vitgraph.compress(model, plan, an))
    assert chosen == pytest.approx(referee["achieved"])
    assert abs(chosen - 0.5) == pytest.approx(min(abs(c["achieved"] - 0.5) for c in referee["candidates"]))
