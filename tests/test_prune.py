"""vitgraph prune / compress --plan / sparsify: a tiny timm ViT and a tiny image folder end to end."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import vitgraph
from vitgraph.cli import main
from vitgraph.models import load_model_and_source

from helpers import NO_UNPICKLING, random_plan, rel_err, run_fresh

ARGS = ["--model-arg", "img_size=16", "--model-arg", "patch_size=8", "--model-arg", "depth=2",
        "--model-arg", "embed_dim=64", "--model-arg", "num_heads=2", "--model-arg", "num_classes=2"]
MODEL = "vit_tiny_patch16_224"
KWARGS = {"img_size": 16, "patch_size": 8, "depth": 2, "embed_dim": 64, "num_heads": 2, "num_classes": 2}

# runs in a fresh interpreter: every way to unpickle raises, then the result is reloaded and
# compared with its ONNX file and with the dense architecture's FLOPs
FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort, torch, timm
    import vitgraph
    from vitgraph.deploy.measure import count_flops
""") + NO_UNPICKLING + textwrap.dedent("""
    out, kwargs = sys.argv[1], json.loads(sys.argv[2])
    m = vitgraph.load(out)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 16, 16)
    with torch.no_grad():
        y = m(x).numpy()
    sess = ort.InferenceSession(out + "/model.onnx", providers=["CPUExecutionProvider"])
    z = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})[0]
    dense = timm.create_model("vit_tiny_patch16_224", pretrained=False, **kwargs).eval()
    print(json.dumps({"onnx_diff": float(np.abs(y - z).max()),
                      "flops": count_flops(m, (x[:1],)) / count_flops(dense, (x[:1],))}))
""")


def _prune_argv(ckpt, train, val, out, epochs: str) -> list[str]:
    return ["prune", MODEL, *ARGS, "--checkpoint", str(ckpt), "--data", str(train), "--val-data", str(val),
            "--method", "hessian", "--target", "flops:0.5", "--finetune-epochs", epochs, "--batch-size", "4",
            "--score-batches", "2", "--reps", "2", "--out", str(out)]


@pytest.fixture(scope="module")
def pruned(folders, tmp_path_factory):
    """One run of the command on a user's checkpoint: (OUT, checkpoint, what it printed, its exit code)."""
    import contextlib
    import io

    tmp = tmp_path_factory.mktemp("pruned")
    torch.manual_seed(5)  # a user's checkpoint in timm's key layout
    trained = vitgraph.models.load_model(MODEL, model_args=KWARGS)[0]
    with torch.no_grad():
        for p in trained.parameters():
            p.add_(0.02 * torch.randn_like(p))
    ckpt = tmp / "ckpt.pth"
    torch.save(trained.state_dict(), ckpt)
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        rc = main(_prune_argv(ckpt, *folders, tmp / "out", "1"))
    return tmp / "out", ckpt, buf.getvalue(), rc


def test_prune_command_end_to_end_reloads_without_pickle(pruned):
    out, _, printed, rc = pruned
    assert rc == 0
    assert "| fine-tuned |" in printed
    for f in ("source.json", "plan.json", "model.safetensors", "model.onnx", "preprocess.json", "report.md"):
        assert (out / f).is_file(), f
    assert not list(out.glob("*.pt"))
    report = (out / "report.md").read_text()
    for row in ("| dense |", "| pruned |", "| fine-tuned |", "## Widths", "blocks.1.mlp:ffn",
                "(chosen by held-out loss after reconstruction); reconstruction on."):
        assert row in report
    assert json.loads((out / "preprocess.json").read_text())["config"]["input_size"] == [3, 16, 16]

    figures = run_fresh(FRESH, str(out), json.dumps(KWARGS))
    assert figures["onnx_diff"] <= 1e-4
    assert figures["flops"] <= 0.5

    # the result is a MODEL again: its preprocessing is the one it was pruned with
    from vitgraph.data import preprocessing

    _, _, source = load_model_and_source(str(out))
    assert preprocessing(source, str(out)) == json.loads((out / "preprocess.json").read_text())


def test_torchrun_two_processes_plan_as_one(pruned, folders, tmp_path):
    out, ckpt, _, _ = pruned
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=os.pathsep.join(sys.path))
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           "-m", "vitgraph.cli", *_prune_argv(ckpt, *folders, tmp_path / "two", "1")]
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (tmp_path / "two" / "plan.json").read_text() == (out / "plan.json").read_text()
    assert proc.stdout.count("| fine-tuned |") == 1  # only rank 0 reports and writes
    assert (tmp_path / "two" / "report.md").is_file()


def test_python_twin_returns_model_plan_and_figures(folders):
    from vitgraph.data import image_folder, make_transform, preprocessing

    model, x, source = load_model_and_source(MODEL, model_args=KWARGS)
    tf = make_transform(preprocessing(source))
    train = image_folder(folders[0], tf, 4, shuffle=True)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    r = vitgraph.prune(model, train, image_folder(folders[1], tf, 4), method="magnitude", target="params:0.6",
                       finetune_epochs=1, measure=False)
    assert isinstance(r, vitgraph.PruneResult) and isinstance(r.plan, vitgraph.Plan)
    assert set(r.stages) == {"dense", "pruned", "fine-tuned"}
    assert r.stages["fine-tuned"].params <= 0.6 * r.stages["dense"].params
    assert len(r.finetune_losses) == 4  # 16 images, batches of 4, one epoch
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # the dense model is untouched
    assert r.out is None
    with torch.no_grad():
        assert r.model(x).shape == (1, 2)


def test_compress_plan_applies_the_saved_plan_exactly(tmp_path):
    model, x, _ = load_model_and_source(MODEL, model_args=KWARGS)
    plan = random_plan(vitgraph.analyze(model, x), ("head", "qk", "v", "ffn"), seed=4)
    (tmp_path / "plan.json").write_text(plan.to_json())
    out = tmp_path / "out"
    assert main(["compress", MODEL, *ARGS, "--plan", str(tmp_path / "plan.json"), "--reps", "1", "--out", str(out)]) == 0
    assert vitgraph.Plan.from_json((out / "plan.json").read_text()).kept == plan.kept
    torch.manual_seed(1)
    xs = torch.randn(2, 3, 16, 16)
    assert rel_err(vitgraph.load(out)(xs), vitgraph.compress(model, plan)(xs)) <= 1e-6


def test_sparsify_writes_a_reloadable_24_result(tmp_path):
    from vitgraph.passes.sparsity24 import reapply_masks, satisfies_24

    out = tmp_path / "s"
    assert main(["sparsify", MODEL, *ARGS, "--out", str(out)]) == 0
    info = json.loads((out / "sparsity24.json").read_text())
    assert len(info["sparsified"]) == 8 and info["skipped"][0][0] == "head"
    m = vitgraph.load(out)
    layers = dict(m.named_modules())
    assert all(satisfies_24(layers[n].weight) for n in info["sparsified"])
    # the masks (not in the state dict) are restored, so fine-tuning the reloaded result keeps 2:4
    tuned = vitgraph.load(out)
    tuned_layers = dict(tuned.named_modules())
    with torch.no_grad():
        for n in info["sparsified"]:
            tuned_layers[n].weight.add_(1.0)  # what an optimizer step does to every weight
    assert reapply_masks(tuned) == 8
    assert all(satisfies_24(tuned_layers[n].weight) for n in info["sparsified"])
    again = tmp_path / "s2"  # a result directory in: same source and plan, still 2:4
    assert main(["sparsify", str(out), "--out", str(again)]) == 0
    assert json.loads((again / "source.json").read_text())["kind"] == "timm"
    torch.manual_seed(2)
    xs = torch.randn(2, 3, 16, 16)
    assert rel_err(vitgraph.load(again)(xs), m(xs)) <= 1e-6


@pytest.mark.parametrize("extra, names", [
    (["--target", "flops"], "--target"),
    (["--target", "speed:0.5"], "--target"),
    (["--finetune-epochs", "-1"], "--finetune-epochs"),
    (["--batch-size", "0"], "--batch-size"),
    (["--data", "/nonexistent/images"], "--data"),
    (["--val-data", "/nonexistent/val"], "--val-data"),
    (["--checkpoint", "/nonexistent/ckpt.pth"], "checkpoint"),
])
def test_bad_prune_arguments_name_the_argument(folders, tmp_path, capsys, extra, names):
    argv = ["prune", MODEL, *ARGS, "--data", str(folders[0]), "--out", str(tmp_path / "o"), *extra]
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert "vitgraph: error:" in err and names in err
    assert not (tmp_path / "o" / "report.md").exists()


def test_bad_inputs_name_the_problem(folders, tmp_path, capsys):
    # a folder with more classes than the model has outputs
    argv = ["prune", MODEL, *ARGS[:-2], "--model-arg", "num_classes=1", "--data", str(folders[0]),
            "--out", str(tmp_path / "o")]
    assert main(argv) == 2
    assert "num_classes" in capsys.readouterr().err
    (tmp_path / "bad.json").write_text("{}")
    assert main(["compress", MODEL, *ARGS, "--plan", str(tmp_path / "bad.json"), "--out", str(tmp_path / "c")]) == 2
    assert "--plan" in capsys.readouterr().err
    assert main(["compress", MODEL, *ARGS, "--plan", str(tmp_path / "bad.json"), "--ratio", "0.3",
                 "--out", str(tmp_path / "c")]) == 2
    assert "--ratio" in capsys.readouterr().err
    with pytest.raises(vitgraph.VitgraphError, match="target"):
        vitgraph.prune(torch.nn.Linear(2, 2), [(torch.randn(1, 2), torch.zeros(1, dtype=torch.long))], target="flops:2")
    with pytest.raises(vitgraph.VitgraphError, match="method"):
        vitgraph.prune(torch.nn.Linear(2, 2), [], method="random")
    with pytest.raises(vitgraph.VitgraphError, match="source="):
        vitgraph.prune(torch.nn.Linear(2, 2), [], out=tmp_path / "x")


def test_int8_writes_a_quantized_onnx_and_reports_it(folders, tmp_path):
    import onnxruntime as ort

    out = tmp_path / "o"
    assert main(["prune", MODEL, *ARGS, "--data", str(folders[0]), "--method", "magnitude", "--finetune-epochs", "0",
                 "--batch-size", "4", "--score-batches", "2", "--reps", "1", "--int8", "--out", str(out)]) == 0
    report = (out / "report.md").read_text()
    assert "| int8 |" in report and "speedup" in report
    sess = ort.InferenceSession(str(out / "model.int8.onnx"), providers=["CPUExecutionProvider"])
    assert any(n.op_type == "QuantizeLinear" for n in __import__("onnx").load(str(out / "model.int8.onnx")).graph.node)
    x = torch.randn(2, 3, 16, 16).numpy()
    assert sess.run(None, {sess.get_inputs()[0].name: x})[0].shape == (2, 2)
