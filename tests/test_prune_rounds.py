"""vitgraph.prune's record of finished steps (resume after an interruption) and its iterative schedule."""
from __future__ import annotations

import importlib
import json

import pytest
import torch

import vitgraph
import vitgraph.passes.recovery as recovery
from vitgraph.data import image_folder, make_transform, preprocessing
from vitgraph.errors import VitgraphError
from vitgraph.journal import STATE_DIR
from vitgraph.models import load_model_and_source
from vitgraph.pipeline import round_fractions

from helpers import rel_err, tiny_vit

score_module = importlib.import_module("vitgraph.scoring")
MODEL = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 2}


def _run(folders, out, **kw):
    """One prune of the same trained model on fresh loaders (as a rerun of the command makes them)."""
    model, x, source = load_model_and_source(MODEL, model_args=KWARGS)
    torch.manual_seed(5)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.02 * torch.randn_like(p))
    tf = make_transform(preprocessing(source))
    train = image_folder(folders[0], tf, 4, shuffle=True, seed=0)
    opts = dict(method="hessian", target="flops:0.6", finetune_epochs=1, out=out, source=source, example_input=x,
                score_batches=2, measure=False, round_to=1)
    opts.update(kw)
    return vitgraph.prune(model, train, image_folder(folders[1], tf, 4), **opts)


def test_resume_continues_after_an_interrupted_finetune(folders, tmp_path, monkeypatch):
    whole = _run(folders, tmp_path / "whole")

    real = recovery.finetune
    monkeypatch.setattr(recovery, "finetune", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(folders, tmp_path / "cut")
    state = json.loads((tmp_path / "cut" / STATE_DIR / "state.json").read_text())
    assert list(state["steps"]) == ["dense", "round1.scores", "round1.plan", "round1.pruned"]
    assert not (tmp_path / "cut" / "report.md").exists()  # not a finished result

    # resumed: the scores are read back, not recomputed, and the fine-tuning runs
    monkeypatch.setattr(recovery, "finetune", real)
    monkeypatch.setattr(score_module, "score", lambda *a, **k: pytest.fail("resume re-scored a finished step"))
    again = _run(folders, tmp_path / "cut", resume=True)
    assert again.plan.to_json() == whole.plan.to_json()
    assert again.finetune_losses == pytest.approx(whole.finetune_losses, rel=1e-5)
    assert {k: s.top1 for k, s in again.stages.items()} == {k: s.top1 for k, s in whole.stages.items()}
    assert not list((tmp_path / "cut" / STATE_DIR).glob("*.pt"))  # dropped once the result is written

    # a finished run resumes to its result without running a step
    monkeypatch.setattr(recovery, "finetune", lambda *a, **k: pytest.fail("a finished run fine-tuned again"))
    done = _run(folders, tmp_path / "cut", resume=True)
    assert done.plan.to_json() == whole.plan.to_json() and done.stages["fine-tuned"].top1 == again.stages["fine-tuned"].top1
    torch.manual_seed(1)
    x = torch.randn(2, 3, 16, 16)
    assert rel_err(done.model(x), again.model(x)) <= 1e-6


def test_resume_refuses_other_arguments(folders, tmp_path, monkeypatch):
    monkeypatch.setattr(recovery, "finetune", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    with pytest.raises(KeyboardInterrupt):
        _run(folders, tmp_path / "o")
    with pytest.raises(VitgraphError, match=r"other arguments \(method, target differ\)"):
        _run(folders, tmp_path / "o", method="magnitude", target="flops:0.5", resume=True)
    with pytest.raises(VitgraphError, match="needs out="):
        _run(folders, None, resume=True, source=None)


def test_iterative_schedule_prunes_in_rounds_and_reloads(folders, tmp_path):
    assert round_fractions(0.5, 2) == pytest.approx([0.5 ** 0.5, 0.5])
    r = _run(folders, tmp_path / "it", target="flops:0.5", schedule="iterative", steps=2)
    assert [d["round"] for d in r.rounds] == [1, 2]
    fractions = [d["flops"] / r.stages["dense"].flops for d in r.rounds]
    assert fractions[0] > fractions[1] and fractions[1] <= 0.5
    assert r.flops_fraction <= 0.5
    assert len(r.finetune_losses) == 4  # one epoch of 4 steps shared by the two rounds
    report = (tmp_path / "it" / "report.md").read_text()
    assert "iterative, 2 rounds" in report and "## Rounds" in report
    # the result's source is the first round's architecture; load rebuilds it and replays the last plan
    src = json.loads((tmp_path / "it" / "source.json").read_text())
    assert src["kind"] == "vitgraph" and src["base"]["kind"] == "timm"
    torch.manual_seed(2)
    x = torch.randn(2, 3, 16, 16)
    assert rel_err(vitgraph.load(tmp_path / "it")(x), r.model(x)) <= 1e-6
    # widths are of the dense model's groups
    sizes = {gid: size for gid, _, _, size in r.widths}
    assert sizes["residual"] == 64 and sizes["blocks.0.mlp:ffn"] == 256


def test_widths_png_is_drawn(folders, tmp_path):
    from PIL import Image

    r = _run(folders, tmp_path / "w", method="magnitude", finetune_epochs=0)
    img = Image.open(tmp_path / "w" / "widths.png")
    assert img.format == "PNG" and img.height >= 18 * len(r.widths)
    assert "![kept widths](widths.png)" in (tmp_path / "w" / "report.md").read_text()


def test_schedule_arguments_are_checked(folders):
    with pytest.raises(VitgraphError, match="schedule must be one of"):
        _run(folders, None, source=None, schedule="cosine")
    with pytest.raises(VitgraphError, match="needs schedule='iterative'"):
        _run(folders, None, source=None, steps=3)
    with pytest.raises(VitgraphError, match="steps must be an integer >= 1"):
        _run(folders, None, source=None, schedule="iterative", steps=0)


def test_amp_finetunes_under_bfloat16_autocast():
    torch.manual_seed(0)
    model = tiny_vit()
    seen = []
    model.head.register_forward_hook(lambda m, i, o: seen.append(o.dtype))
    data = [(torch.randn(4, 3, 32, 32), torch.randint(0, 10, (4,))) for _ in range(3)]
    before = [p.detach().clone() for p in model.parameters()]
    log = recovery.finetune(model, data, loss="ce", epochs=1, lr=1e-3, amp=True, log_every=0)
    assert seen == [torch.bfloat16] * 3 and all(torch.isfinite(torch.tensor(log.losses)))
    assert all(p.dtype == torch.float32 for p in model.parameters())
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    seen.clear()
    recovery.finetune(model, data, loss="ce", epochs=1, amp=False, log_every=0)
    assert seen == [torch.float32] * 3


def test_cli_ctrl_c_then_resume(folders, tmp_path, monkeypatch, capsys):
    from vitgraph.cli import main

    args = [f"--model-arg={k}={v}" for k, v in KWARGS.items()]
    argv = ["prune", MODEL, *args, "--data", str(folders[0]), "--val-data", str(folders[1]), "--method", "magnitude",
            "--target", "params:0.7", "--batch-size", "4", "--reps", "1", "--out", str(tmp_path / "o")]
    real = recovery.finetune
    monkeypatch.setattr(recovery, "finetune", lambda *a, **k: (_ for _ in ()).throw(KeyboardInterrupt))
    assert main(argv) == 130
    assert "continue with the same command and --resume" in capsys.readouterr().err
    monkeypatch.setattr(recovery, "finetune", real)
    assert main([*argv, "--resume"]) == 0
    assert (tmp_path / "o" / "report.md").is_file() and vitgraph.artifact.is_artifact(tmp_path / "o")
    assert main([*argv[:-2], "--steps", "2", "--out", str(tmp_path / "p")]) == 2
    assert "--steps 2 prunes in rounds and needs --schedule iterative" in capsys.readouterr().err
