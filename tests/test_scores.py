"""Score passes: Hessian-aware saliency (NViT), KL importance (UP-ViT), recovery, torchrun."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import vitgraph
from vitgraph.passes.gates import GateSet
from vitgraph.passes.recovery import MaskKeeper, distill_loss, finetune
from vitgraph.passes.scoring_common import spearman

from helpers import score_setup

HERE = Path(__file__).resolve().parent


@pytest.fixture(scope="module")
def setup():
    return score_setup()


def test_gates_at_zero_equal_the_masked_model(setup):
    model, an, data = setup
    gates = GateSet(an)
    gid = "blocks.0.mlp:ffn"
    g = gates.ones()
    g[gid][3] = 0.0
    out = torch.func.functional_call(an.graph_module, gates.apply(dict(an.graph_module.named_parameters()), g), (data[0][0],))
    plan = vitgraph.Plan.keep_all(an).keep(gid, [i for i in range(an.group(gid).size) if i != 3])
    ref = vitgraph.mask(model, plan, an)(data[0][0])
    torch.testing.assert_close(out, ref)


def test_fisher_and_finite_difference_hessian_rank_alike(setup):
    model, an, data = setup
    fisher = vitgraph.score(model, an, "hessian", data=data, joint=False)  # both estimate the diagonal
    hvp = vitgraph.score(model, an, "hessian", data=data, mode="hvp", probes=3, h=1e-3)
    flat = lambda s: torch.cat([s[k].flatten() for k in sorted(s)])  # noqa: E731
    assert spearman(flat(fisher), flat(hvp)) >= 0.6


def test_exact_kl_equals_removing_the_unit(setup):
    model, an, data = setup
    s = vitgraph.score(model, an, "kl", data=data[:2], mode="exact", kinds=("ffn",), chunk=7)
    gid = "blocks.1.mlp:ffn"
    size = an.group(gid).size
    for u in (0, 5, size - 1):
        plan = vitgraph.Plan.keep_all(an).keep(gid, [i for i in range(size) if i != u])
        masked = vitgraph.mask(model, plan, an)
        ref = 0.0
        for x, _ in data[:2]:
            logq = F.log_softmax(model(x).double(), -1)
            logp = F.log_softmax(masked(x).double(), -1)
            ref += (logq.exp() * (logq - logp)).sum().item()
        assert s[gid][u].item() == pytest.approx(ref, rel=1e-3, abs=1e-9)


def test_approximate_kl_ranks_like_exact(setup):
    model, an, data = setup
    exact = vitgraph.score(model, an, "kl", data=data[:2], mode="exact", chunk=32)
    approx = vitgraph.score(model, an, "kl", data=data[:2], mode="approx", joint=False)  # unit by unit, as exact
    flat = lambda s: torch.cat([s[k].flatten() for k in sorted(s)])  # noqa: E731
    assert spearman(flat(exact), flat(approx)) >= 0.8


def test_scores_make_plans_that_compress(setup):
    model, an, data = setup
    s = vitgraph.score(model, an, "hessian", data=data[:2])
    plan = vitgraph.Plan.from_scores(an, s, ratio=0.5, kinds=["head", "qk", "v", "ffn"])
    slim = vitgraph.compress(model, plan, an)
    assert slim(data[0][0]).shape == (8, 10)
    assert sum(p.numel() for p in slim.parameters()) < sum(p.numel() for p in model.parameters())


def test_score_errors(setup):
    model, an, data = setup
    with pytest.raises(ValueError, match="unknown score method 'taylor'"):
        vitgraph.score(model, an, "taylor", data=data)
    with pytest.raises(ValueError, match="needs data"):
        vitgraph.score(model, an, "hessian")
    with pytest.raises(ValueError, match="takes no loss_fn"):
        vitgraph.score(model, an, "kl", data=data, loss_fn=F.cross_entropy)
    with pytest.raises(ValueError, match="hessian mode"):
        vitgraph.score(model, an, "hessian", data=data, mode="exact")
    with pytest.raises(ValueError, match="different model"):
        vitgraph.score(torch.nn.Linear(2, 2), an, "magnitude")
    with pytest.raises(vitgraph.PlanError, match="learned widths"):
        vitgraph.Plan.from_scores(an, vitgraph.score(model, an, "magnitude"), ratio=None)


def test_masked_finetune_keeps_removed_channels_zero(setup):
    model, an, data = setup
    plan = vitgraph.Plan.random(an, 0.5, kinds=("ffn", "qk", "v", "head"), seed=3)
    student = vitgraph.mask(model, plan, an)
    keeper = MaskKeeper(student, an, plan)
    orig = dict(model.named_parameters())
    removed = {k: (v == 0) & (orig[k] != 0) for k, v in student.named_parameters()}
    assert sum(int(r.sum()) for r in removed.values()) > 0
    log = finetune(student, data, teacher=model, loss="upvit", lr=1e-3, keeper=keeper, log_every=0)
    assert log.steps == len(data) and all(torch.isfinite(torch.tensor(log.losses)))
    for k, v in student.named_parameters():
        assert torch.all(v[removed[k]] == 0), k
    changed = sum(not torch.equal(a, b) for a, b in zip(student.parameters(), model.parameters()))
    assert changed > 0


def test_distill_losses():
    torch.manual_seed(0)
    s, t, y = torch.randn(4, 5), torch.randn(4, 5), torch.randint(0, 5, (4,))
    up = distill_loss(s, y, t, "upvit", alpha=0.2)
    ref = F.cross_entropy(s, y) + 0.2 * (F.softmax(t, -1) * (F.log_softmax(t, -1) - F.log_softmax(s, -1))).sum(1).mean()
    torch.testing.assert_close(up, ref)
    d = torch.randn(4, 5)
    cnn = torch.randn(4, 5)
    nv = distill_loss((s, d), y, None, "nvit", cnn_logits=cnn)
    torch.testing.assert_close(nv, 0.5 * F.cross_entropy(s, y) + 0.5 * F.cross_entropy(d, cnn.argmax(-1)))
    with pytest.raises(ValueError, match="loss must be one of"):
        distill_loss(s, y, t, "mse")


def test_two_processes_score_and_finetune_like_one(setup, tmp_path):
    model, an, data = setup
    one = {m: dict(vitgraph.score(model, an, m, data=data, **kw)) for m, kw in (("hessian", {}), ("kl", {"mode": "approx"}))}
    out = tmp_path / "scores.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_scores_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "SIGABRT" in proc.stderr and not re.search(r"exitcode\s*:\s*[1-9]", proc.stderr):
        # a gloo thread aborting at process exit (seen once in CI, never reproduced) is not a
        # scoring failure: run once more; a Python error in a worker is never retried
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    two = torch.load(out)
    assert two.pop("finetune_spread") == 0.0  # data-parallel fine-tuning keeps the ranks' weights equal
    assert two.pop("finetune_changed") > 0.0
    for m in one:
        for gid in one[m]:
            torch.testing.assert_close(two[m][gid], one[m][gid], rtol=1e-5, atol=1e-12)


def test_score_command_writes_scores_and_a_plan(setup, tmp_path):
    from vitgraph.cli import main

    model, an, _ = setup
    path = tmp_path / "tiny.pt"
    torch.save(model, path)
    rc = main(["score", str(path), "--input-size", "3,32,32", "--method", "hessian", "--batches", "2",
               "--batch-size", "4", "--out", str(tmp_path / "s.safetensors"), "--plan", str(tmp_path / "plan.json"),
               "--target", "flops:0.85", "--round-to", "4"])
    assert rc == 0
    from vitgraph.scoring import load_scores

    saved, fingerprint = load_scores(tmp_path / "s.safetensors")  # data, not a pickle
    assert saved.method == "hessian" and set(saved) == {g.id for g in an.groups if g.kind != "other"}
    assert fingerprint == an.fingerprint
    plan = vitgraph.Plan.from_json((tmp_path / "plan.json").read_text())
    slim = vitgraph.compress(model, plan)
    x = torch.randn(1, 3, 32, 32)
    from vitgraph.deploy.measure import count_flops
    assert count_flops(slim, (x,)) <= 0.85 * count_flops(model, (x,))


def test_threshold_scores_carry_learned_widths(setup):
    model, an, data = setup
    s = vitgraph.score(model, an, "threshold", data=data, target=0.6, steps=4, log_every=0)
    assert s.method == "threshold" and s.keep and set(s.keep) <= set(s)
    plan = vitgraph.Plan.from_scores(an, s, ratio=None)
    for gid, k in s.keep.items():
        kept = plan.kept.get(gid)
        n = an.group(gid).size if kept is None else (len(kept[0]) if isinstance(kept[0], list) else len(kept))
        assert n == min(k, an.group(gid).size)
    assert vitgraph.compress(model, plan, an)(data[0][0]).shape == (8, 10)
