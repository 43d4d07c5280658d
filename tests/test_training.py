"""The one training loop (passes/training.py): DataLoader batches, DDP under torchrun, mask keeping."""
from __future__ import annotations

import copy
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch.utils.data import DataLoader, TensorDataset

import vitgraph
from vitgraph.passes.recovery import MaskKeeper, finetune
from vitgraph.passes.training import fit, rank_loader

from helpers import examples, tiny_vit, train_all

HERE = Path(__file__).resolve().parent


def test_two_processes_train_like_one_on_the_whole_batch(tmp_path):
    out = tmp_path / "train.pt"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join([str(HERE), os.environ.get("PYTHONPATH", "")]))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(HERE / "dist_train_worker.py"), str(out)]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    if proc.returncode != 0 and "SIGABRT" in proc.stderr and not re.search(r"exitcode\s*:\s*[1-9]", proc.stderr):
        proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)  # gloo abort at exit only
    assert proc.returncode == 0, proc.stderr[-3000:]
    two, other = torch.load(out), torch.load(str(out) + ".rank1")
    one = train_all(batch_size=8)
    assert two["finetune_steps"] == one["finetune_steps"] == 2
    assert two["exits_steps"] == one["exits_steps"] == 2
    assert two["thresholds_keep"] == one["thresholds_keep"]
    for part in ("finetune", "thresholds", "exits"):
        for k in one[part]:
            assert torch.equal(two[part][k], other[part][k]), (part, k)  # ranks hold the same weights
            torch.testing.assert_close(two[part][k], one[part][k], rtol=1e-4, atol=1e-5, msg=f"{part} {k}")


def test_batches_pass_as_given():
    x, y = examples(8)
    data = [(x[:4], y[:4]), (x[4:], y[4:])]
    got = list(rank_loader(data))
    assert all(type(b) is tuple and b[0] is d[0] and b[1] is d[1] for b, d in zip(got, data))
    assert [b[0] is d[0] for b, d in zip(rank_loader(iter(data)), data)] == [True, True]
    loader = DataLoader(TensorDataset(x, y), batch_size=4)
    assert rank_loader(loader) is loader
    state = torch.get_rng_state()
    list(rank_loader(data))
    assert torch.equal(torch.get_rng_state(), state)  # passes over the batches leave torch's RNG alone


def test_fit_runs_epochs_steps_and_stops_when_data_runs_dry():
    net = torch.nn.Linear(3, 2)
    data = [(torch.randn(4, 3), torch.randint(0, 2, (4,))) for _ in range(3)]
    opt = torch.optim.SGD(net.parameters(), lr=0.1)
    ce = lambda m, x, y: torch.nn.functional.cross_entropy(m(*x), y)  # noqa: E731
    seen = []
    assert len(fit(net, rank_loader(data), ce, opt, epochs=2, on_step=lambda i, _: seen.append(i))) == 6
    assert seen == list(range(6))
    assert len(fit(net, rank_loader(data), ce, opt, epochs=None, steps=7)) == 7
    assert len(fit(net, rank_loader(iter(data)), ce, opt, epochs=None, steps=7)) == 3  # a one-shot iterator


def test_mask_keeper_parametrizes_only_while_active():
    model = tiny_vit(depth=1, embed_dim=24, num_heads=2, mlp_ratio=2.0)
    an = vitgraph.analyze(model, torch.randn(1, 3, 32, 32))
    plan = vitgraph.Plan.random(an, 0.5, kinds=("ffn",), seed=1)
    student = vitgraph.mask(model, plan, an)
    fc1 = student.blocks[0].mlp.fc1
    weight = fc1.weight
    with torch.no_grad():
        weight.add_(1.0)  # the masked elements are stored non-zero: the keeper hides them
    keeper = MaskKeeper(student, an, plan)
    with keeper:
        assert torch.nn.utils.parametrize.is_parametrized(fc1, "weight")
        removed = fc1.weight == 0
        assert removed.any() and (fc1.parametrizations.weight.original[removed] != 0).all()
        fc1.weight.sum().backward()
        assert (fc1.parametrizations.weight.original.grad[removed] == 0).all()
    assert not torch.nn.utils.parametrize.is_parametrized(fc1)
    assert fc1.weight is weight and (weight[removed] == 0).all()
    assert type(student) is type(model) and set(dict(student.named_parameters())) == set(dict(model.named_parameters()))
    with pytest.raises(ValueError, match="another model"):
        finetune(copy.deepcopy(student), [(torch.randn(2, 3, 32, 32), torch.tensor([0, 1]))], keeper=keeper)
