"""The safety net (vitgraph/verify.py): a compressed model that differs from the masked model
where masking is exact raises an error naming the group and the op; ``vitgraph compress`` runs it
unless ``--no-check``."""
from __future__ import annotations

import pytest
import torch
from torch import nn

import vitgraph
from vitgraph.analysis.ops import reduce as reduce_ops

from helpers import C, CIN, NCLS, SeparateQKV, build, inputs


class StateMixer(nn.Module):
    """q/k-like state width averaged into the output (a mean over channels)."""

    def __init__(self) -> None:
        super().__init__()
        self.embed, self.v = nn.Linear(CIN, C), nn.Linear(C, C)
        self.bc = nn.Linear(C, 16)
        self.head = nn.Linear(C, NCLS)

    def forward(self, x):
        x = self.embed(x)
        b, c = self.bc(x).chunk(2, dim=-1)
        h = b.softmax(dim=1).transpose(1, 2) @ self.v(x)  # [B, 8, C]
        y = c @ h
        return self.head((x + y).mean(1)) * h.mean((1, 2))[:, None]


def _setup():
    torch.manual_seed(0)
    m = StateMixer().eval()
    an = vitgraph.analyze(m, inputs())
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["qk"])
    return m, an, plan


def test_verify_passes_a_correct_compression():
    torch.manual_seed(0)
    m = build(SeparateQKV)
    an = vitgraph.analyze(m, inputs())
    plan = vitgraph.Plan.random(an, 0.5, seed=0)  # residual too: checked on the exact groups
    slim = vitgraph.compress(m, plan, an)
    assert vitgraph.verify_compressed(m, slim, plan, an, inputs()) <= vitgraph.verify.VERIFY_TOL


def test_verify_names_group_and_op_of_a_wrong_rule(monkeypatch):
    """A rule with wrong semantics (a mean over channels treated as exact, the hidden-state mixer
    bug) is caught: the error names the q/k group and the mean."""
    monkeypatch.setattr(reduce_ops, "_ZERO_EXACT", reduce_ops._ZERO_EXACT | {"mean"})
    m, an, plan = _setup()
    qk = [g for g in an.groups if g.kind == "qk"]
    assert qk and not qk[0].normalized  # the wrong rule at work
    slim = vitgraph.compress(m, plan, an)
    with pytest.raises(vitgraph.CompressionMismatchError) as e:
        vitgraph.verify_compressed(m, slim, plan, an, inputs())
    assert e.value.group == qk[0].id and qk[0].id in str(e.value)
    assert e.value.op is not None and "mean" in e.value.op, str(e.value)


def test_verify_skips_normalised_groups():
    m, an, plan = _setup()  # the right rule: the q/k group is normalised, nothing to compare
    assert vitgraph.verify_compressed(m, vitgraph.compress(m, plan, an), plan, an, inputs()) == 0.0


class ImageStateMixer(StateMixer):
    """``StateMixer`` on images ``[B, CIN, 3, 3]`` (pixels as tokens), for the command line."""

    def forward(self, x):
        return super().forward(x.flatten(2).transpose(1, 2))


def test_cli_compress_checks_unless_no_check(monkeypatch, tmp_path, capsys):
    from vitgraph.cli import main

    monkeypatch.setattr(reduce_ops, "_ZERO_EXACT", reduce_ops._ZERO_EXACT | {"mean"})
    torch.manual_seed(0)
    path = tmp_path / "m.pt"
    torch.save(ImageStateMixer().eval(), path)
    args = ["compress", str(path), "--input-size", f"{CIN},3,3", "--kinds", "qk", "--reps", "1"]
    assert main([*args, "--out", str(tmp_path / "a")]) != 0
    err = capsys.readouterr()
    assert "bc:qk" in err.out + err.err and "Traceback" not in err.err
    assert not (tmp_path / "a" / "model.pt").exists()  # nothing wrong is written
    assert main([*args, "--no-check", "--out", str(tmp_path / "b")]) == 0


class RandomTokens(nn.Module):
    """Adds fresh noise on every call (like ViTMAE's random masking): no two runs agree."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(CIN, 16), nn.Linear(16, NCLS)

    def forward(self, x):
        return self.fc2(torch.relu(self.fc1(x + torch.rand_like(x)))).mean(1)


def test_verify_says_when_the_model_is_not_repeatable():
    torch.manual_seed(0)
    m = RandomTokens().eval()
    an = vitgraph.analyze(m, inputs())
    plan = vitgraph.Plan.from_scores(an, None, ratio=0.5, kinds=["ffn"])
    assert plan.kept
    with pytest.raises(vitgraph.CompressionMismatchError, match="different outputs on the same input"):
        vitgraph.verify_compressed(m, vitgraph.compress(m, plan, an), plan, an, inputs())
