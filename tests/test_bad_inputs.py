"""Bad input to the pipeline and saved results: each ends in a VitgraphError that names the file,
field or argument; files are written with the user's umask."""
from __future__ import annotations

import os

import pytest
import torch

import vitgraph
from vitgraph.artifact import Source, load, save

from helpers import random_plan

TINY = Source("timm", "vit_tiny_patch16_224",
              {"img_size": 32, "patch_size": 8, "depth": 1, "embed_dim": 48, "num_heads": 3, "num_classes": 10}, (3, 32, 32))


def _saved(tmp_path):
    torch.manual_seed(0)
    model = TINY.build()
    an = vitgraph.analyze(model, torch.randn(1, 3, 32, 32))
    plan = random_plan(an, ("ffn",))
    return save(tmp_path / "a", vitgraph.compress(model, plan), plan, TINY)


@pytest.mark.parametrize("damage", ["truncated", "garbage", "empty"])
def test_corrupt_weights_name_the_file(tmp_path, damage):
    out = _saved(tmp_path)
    w = out / "model.safetensors"
    data = w.read_bytes()
    w.write_bytes({"truncated": data[: len(data) // 2], "garbage": b"\x00\x01not safetensors" * 8, "empty": b""}[damage])
    with pytest.raises(vitgraph.VitgraphError, match="model.safetensors"):
        load(out)


def test_weights_get_the_umask_mode(tmp_path):
    old = os.umask(0o022)
    try:
        out = _saved(tmp_path)
    finally:
        os.umask(old)
    modes = {f.name: f.stat().st_mode & 0o777 for f in out.iterdir()}
    assert modes["model.safetensors"] == modes["plan.json"] == 0o644, modes


def test_corrupt_image_names_the_file(tmp_path):
    from PIL import Image

    from vitgraph.data import image_folder

    (tmp_path / "cat").mkdir()
    Image.new("RGB", (8, 8), (10, 20, 30)).save(tmp_path / "cat" / "good.png")
    Image.new("RGB", (64, 64), (200, 20, 30)).save(tmp_path / "cat" / "bad.png")
    bad = tmp_path / "cat" / "bad.png"
    bad.write_bytes(bad.read_bytes()[:60])  # header, then cut: "Truncated File Read"
    loader = image_folder(tmp_path, transform=lambda im: torch.zeros(3, 8, 8), batch_size=2)
    with pytest.raises(vitgraph.VitgraphError, match=r"--data: cannot read image .*bad\.png"):
        list(loader)


def test_bad_model_arg_names_the_argument(capsys):
    from vitgraph.cli import main

    assert main(["inspect", "vit_tiny_patch16_224", "--model-arg", "num_classes=abc", "--model-arg", "img_size=32"]) == 2
    err = capsys.readouterr().err
    assert "--model-arg num_classes='abc'" in err and "img_size" not in err.split("error:")[1].split("(")[0]
    assert "Traceback" not in err


def test_scores_are_safetensors_and_a_pickle_is_refused(tmp_path):
    from vitgraph.scoring import Scores, load_scores, save_scores

    s = Scores({"a:ffn": torch.arange(4.0), "b:qk": torch.ones(2, 3)}, "magnitude", keep={"a:ffn": 2})
    save_scores(tmp_path / "s.safetensors", s, "abc")
    back, fp = load_scores(tmp_path / "s.safetensors")
    assert fp == "abc" and back.method == "magnitude" and back.keep == {"a:ffn": 2}
    assert torch.equal(back["b:qk"], torch.ones(2, 3))
    torch.save({"scores": dict(s)}, tmp_path / "old.pt")
    with pytest.raises(vitgraph.ScoreError, match="old.pt"):
        load_scores(tmp_path / "old.pt")


def test_argument_errors_are_vitgraph_errors_and_builtin_ones(tmp_path):
    """Errors raised on purpose are VitgraphError subclasses that still match the built-in type
    callers catch (ValueError, TypeError, KeyError)."""
    from vitgraph.data import batches
    from vitgraph.deploy.export import export_onnx

    with pytest.raises(vitgraph.ArgumentError) as e:
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx", torch.randn(1, 2), exporter="nope")
    assert isinstance(e.value, ValueError)
    with pytest.raises(vitgraph.ArgumentTypeError) as e:
        export_onnx(torch.nn.Linear(2, 2), tmp_path / "m.onnx", ("x",))
    assert isinstance(e.value, TypeError)
    with pytest.raises(vitgraph.DataError):
        list(batches(torch.zeros(4, 2), torch.zeros(3), 2))
    an = vitgraph.analyze(TINY.build(), torch.randn(1, 3, 32, 32))
    with pytest.raises(vitgraph.UnknownGroupError, match="no group 'nope:qk'") as e:
        an.group("nope:qk")
    assert isinstance(e.value, KeyError)
