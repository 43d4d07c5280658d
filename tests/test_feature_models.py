"""Every captured model through the pipeline: class logits read from any output, and models without
them (backbones, timm ``features_only``) scored and fine-tuned by distillation of their outputs."""
from __future__ import annotations

import shutil
import textwrap

import pytest
import torch

import vitgraph
from vitgraph.cli import main
from vitgraph.passes.scoring_common import (feature_cosines, feature_errors, feature_loss, logits_of, output_divergence,
                                            output_kind)

from helpers import NO_UNPICKLING, run_fresh

HF_CONFIG = dict(hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64, image_size=32,
                 patch_size=8, num_labels=2)
FEATURES = dict(features_only=True, out_indices=(0, 1), img_size=32, patch_size=8, depth=2, embed_dim=48, num_heads=3)

# in a fresh interpreter that refuses to unpickle: reload the result, run it and its ONNX file
FRESH = textwrap.dedent("""
    import json, sys
    import numpy as np, onnxruntime as ort
    import vitgraph
""") + NO_UNPICKLING + textwrap.dedent("""
    from vitgraph.passes.scoring_common import output_tensors

    out = sys.argv[1]
    m = vitgraph.load(out)
    torch.manual_seed(3)
    x = torch.randn(3, 3, 32, 32)
    with torch.no_grad():
        y = m(x)
    sess = ort.InferenceSession(out + "/model.onnx", providers=["CPUExecutionProvider"])
    z = sess.run(None, {sess.get_inputs()[0].name: x.numpy()})
    ys = output_tensors(y)
    cfg = getattr(m, "config", None)
    print(json.dumps({"type": type(y).__name__, "outputs": [len(ys), len(z)],
                      "onnx_diff": max(float(np.abs(a.numpy() - b).max()) for a, b in zip(ys, z)),
                      "config": type(cfg).__name__, "labels": dict(cfg.id2label) if cfg is not None else None}))
""")


def _hf_dir(tmp_path, cls_name: str):
    """A ``save_pretrained`` directory of a tiny transformers ViT class, with its image processor's config."""
    transformers = pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
    torch.manual_seed(0)
    model = getattr(transformers, cls_name)(transformers.ViTConfig(**HF_CONFIG)).eval()
    path = tmp_path / cls_name
    model.save_pretrained(path)
    transformers.ViTImageProcessor(size={"height": 32, "width": 32}).save_pretrained(path)
    return path


@pytest.fixture(scope="module")
def unlabeled(folders, tmp_path_factory):
    """The training images of ``folders`` in one folder, without class subfolders."""
    flat = tmp_path_factory.mktemp("unlabeled")
    for png in folders[0].rglob("*.png"):
        shutil.copy(png, flat / f"{png.parent.name}_{png.name}")
    return flat


def _prune_cli(model: str, data, out, *extra: str) -> int:
    return main(["prune", model, "--data", str(data), "--target", "flops:0.8", "--finetune-epochs", "1",
                 "--batch-size", "4", "--score-batches", "2", "--reps", "1", "--int8", "--out", str(out), *extra])


def test_logits_are_read_from_any_output():
    t, u = torch.randn(2, 3), torch.randn(2, 5)
    assert logits_of((t, u)) is t and logits_of([[t], u]) is t and logits_of({"logits": t, "x": u}) is t
    assert output_kind((t, u)) == "logits" and output_kind([torch.randn(2, 4, 3, 3)]) == "features"
    assert output_kind(t, torch.nn.Module()) == "logits"
    nc0 = torch.nn.Module()
    nc0.num_classes = 0  # timm's pooled features: 2-D like logits
    assert output_kind(t, nc0) == "features"
    with pytest.raises(vitgraph.ScoreError, match="no class logits"):
        logits_of(object())


def test_logits_of_a_huggingface_model_output():
    outputs = pytest.importorskip("transformers.modeling_outputs")
    t = torch.randn(2, 3)
    assert logits_of(outputs.ImageClassifierOutput(logits=t)) is t
    pooled = outputs.BaseModelOutputWithPooling(last_hidden_state=torch.randn(2, 5, 4), pooler_output=t)
    assert output_kind(pooled) == "features"
    with pytest.raises(vitgraph.ScoreError, match="last_hidden_state, pooler_output"):
        logits_of(pooled)


def test_feature_distillation_loss_by_hand():
    # tensor a: squared norms 25 and 25 (mean 25), errors 16 and 0; tensor b: norms 1 and 1, errors 1 and 1
    ref = (torch.tensor([[3.0, 4.0], [4.0, 3.0]]), torch.tensor([[1.0, 0.0], [0.0, 1.0]]))
    out = {"a": torch.tensor([[3.0, 0.0], [4.0, 3.0]]), "b": torch.tensor([[0.0, 0.0], [0.0, 2.0]])}
    assert feature_errors(out, ref).tolist() == pytest.approx([(16 / 25 + 1) / 2, (0 + 1) / 2])
    assert float(feature_loss(out, ref)) == pytest.approx((0.82 + 0.5) / 2)
    assert float(output_divergence(out, ref, "features")) == pytest.approx(0.66)
    # cosines: a 0.6 and 1, b 0 (a zero vector) and 1
    assert feature_cosines(out, ref).tolist() == pytest.approx([0.3, 1.0], abs=1e-6)
    from vitgraph.allocation import divergence

    assert divergence(ref, out, "features") == pytest.approx(0.82 + 0.5)  # summed over the batch
    assert float(output_divergence(ref[0], ref[0], "logits")) == pytest.approx(0.0, abs=1e-7)
    with pytest.raises(vitgraph.ScoreError, match="equal shapes"):
        feature_loss(torch.zeros(2, 3), torch.ones(2, 4))


def test_kl_of_a_feature_model_is_its_distillation_error():
    """Exact kl removes each unit and sums the feature error it causes (checked against the masked
    model); approx kl's Gaussian Fisher ranks the units alike."""
    from vitgraph.passes.scoring_common import spearman

    model, x, _ = vitgraph.models.load_model_and_source("vit_tiny_patch16_224", model_args=FEATURES)
    an = vitgraph.analyze(model, x)
    data = [torch.randn(4, 3, 32, 32, generator=torch.Generator().manual_seed(1))]
    exact = vitgraph.score(model, an, "kl", data=data, mode="exact", kinds=("ffn",))
    gid = "model.blocks.1.mlp:ffn"
    plan = vitgraph.Plan.keep_all(an)
    plan.keep(gid, [u for u in range(an.group(gid).size) if u != 5])
    with torch.no_grad():
        want = feature_errors(vitgraph.mask(model, plan, an)(data[0]), model(data[0])).sum()
    assert float(exact[gid][5]) == pytest.approx(float(want), rel=1e-3)
    approx = vitgraph.score(model, an, "kl", data=data, kinds=("ffn",), joint=False, samples=16)
    assert spearman(approx[gid], exact[gid]) > 0.7


def test_unlabeled_folder_yields_image_batches(unlabeled, folders, tmp_path):
    from vitgraph.data import image_folder

    loader = image_folder(unlabeled, lambda im: torch.zeros(3, 8, 8), batch_size=4)
    batch = next(iter(loader))
    assert isinstance(batch, torch.Tensor) and batch.shape == (4, 3, 8, 8) and len(loader.dataset) == 16
    assert len(image_folder(folders[0], lambda im: torch.zeros(3, 8, 8), batch_size=4).dataset.classes) == 2
    (tmp_path / "empty").mkdir()
    with pytest.raises(vitgraph.VitgraphError, match="no images"):
        image_folder(tmp_path / "empty", lambda im: im, batch_size=4)


def test_hf_classifier_directory_through_prune_int8(folders, tmp_path):
    path = _hf_dir(tmp_path, "ViTForImageClassification")
    out = tmp_path / "out"
    assert _prune_cli(f"hf:{path}", folders[0], out, "--val-data", str(folders[1])) == 0
    report = (out / "report.md").read_text()
    assert "Loss (scores, allocation, fine-tuning): cross-entropy + 0.2 x KL from the dense model." in report
    assert "| int8 |" in report and "| top-1 (%) |" in report
    got = run_fresh(FRESH, str(out))
    assert got["type"] == "ImageClassifierOutput" and got["outputs"] == [1, 1]
    assert got["onnx_diff"] <= 1e-4
    assert got["config"] == "ViTConfig" and got["labels"] == {"0": "LABEL_0", "1": "LABEL_1"}  # id2label kept


def test_hf_backbone_directory_with_unlabeled_images_through_prune_int8(unlabeled, tmp_path, capsys):
    path = _hf_dir(tmp_path, "ViTModel")
    out = tmp_path / "out"
    assert _prune_cli(f"hf:{path}", unlabeled, out) == 0
    assert "16 training images without labels" in capsys.readouterr().out
    report = (out / "report.md").read_text()
    assert "feature distillation (normalised MSE on 2 output tensors of the dense model" in report
    assert "| cosine to dense outputs |" in report and "| int8 |" in report and "top-1 (%)" not in report
    got = run_fresh(FRESH, str(out))
    assert got["type"] == "BaseModelOutputWithPooling" and got["outputs"] == [2, 2]
    assert got["onnx_diff"] <= 1e-4
    assert got["config"] == "ViTConfig"


def test_timm_features_only_through_python_prune():
    model, x, _ = vitgraph.models.load_model_and_source("vit_tiny_patch16_224", model_args=FEATURES)
    g = torch.Generator().manual_seed(0)
    images = [torch.randn(4, 3, 32, 32, generator=g) for _ in range(3)]  # unlabeled batches
    r = vitgraph.prune(model, images, method="hessian", target="flops:0.7", finetune_epochs=1, score_batches=2,
                       measure=False)
    assert r.objective == "features" and r.method == "kl" and "scored by kl" in r.loss
    assert "2 output tensors" in r.loss and len(r.finetune_losses) == 3
    tuned = r.stages["fine-tuned"]
    assert tuned.top1 is None and 0.9 < tuned.cosine <= 1.0 and tuned.error < 0.2
    assert r.flops_fraction <= 0.7 * 1.02
    with torch.no_grad():
        assert [t.shape for t in r.model(x)] == [t.shape for t in model(x)]
    assert "cosine to dense outputs" in r.table()


def test_objective_errors_name_the_problem():
    model, _, _ = vitgraph.models.load_model_and_source("vit_tiny_patch16_224", model_args=FEATURES)
    images = [torch.randn(2, 3, 32, 32)]
    with pytest.raises(vitgraph.VitgraphError, match="labels"):
        vitgraph.prune(model, images, objective="logits", measure=False)
    with pytest.raises(vitgraph.VitgraphError, match="prune_outputs"):
        vitgraph.prune(model, images, prune_outputs=True, measure=False)


def test_score_command_on_a_backbone_needs_no_labels(tmp_path, capsys):
    pytest.importorskip("transformers", reason="transformers is not installed (pip install -e '.[hf]')")
    args = [f"{k}={v}" for k, v in HF_CONFIG.items()]
    argv = ["score", "hf:ViTModel", *[a for kv in args for a in ("--model-arg", kv)], "--method", "hessian",
            "--batches", "1", "--batch-size", "2", "--out", str(tmp_path / "s.safetensors")]
    assert main(argv) == 0
    assert "scored by kl" in capsys.readouterr().out
