"""Tests for vitgraph.deploy.export (ONNX export + parity) and vitgraph.deploy.measure (params, FLOPs, latency)."""

from __future__ import annotations

import warnings
from pathlib import Path

import numpy as np
import pytest
import timm
import torch
from torch import nn
import torch.nn.functional as F

import vitgraph
from vitgraph.deploy import export as export_mod
from vitgraph.deploy.export import DEFAULT_FORMS, ExportError, ExportFallbackWarning, export_onnx, onnx_op_types
from vitgraph.deploy.measure import (
    LatencyStats,
    count_flops,
    count_params,
    format_table,
    machine_info,
    measure_latency,
    ort_runner,
    torch_runner,
    write_results_md,
)


def tiny_vit(embed_dim: int = 64, num_heads: int = 2) -> nn.Module:
    """A 2-block ViT on 32x32 images with random weights."""
    torch.manual_seed(0)
    return timm.create_model(
        "vit_tiny_patch16_224",
        pretrained=False,
        img_size=32,
        patch_size=8,
        depth=2,
        embed_dim=embed_dim,
        num_heads=num_heads,
        num_classes=10,
    )


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def image() -> torch.Tensor:
    return torch.randn(1, 3, 32, 32, generator=torch.Generator().manual_seed(1))


# ----------------------------------------------------------------------------- export


def test_export_tiny_vit_parity_and_dynamic_batch(vit, image, tmp_path):
    vit.train()  # export must use eval mode and restore training afterwards
    before = image.clone()
    report = export_onnx(vit, tmp_path / "vit.onnx", image)
    assert vit.training and all(m.training for m in vit.modules())
    assert torch.equal(image, before)
    assert report.path.exists() and report.checked
    assert report.max_abs_diff < 1e-4
    assert report.n_nodes > 0
    assert {"MatMul", "Softmax"} <= set(report.op_types) or "Attention" in report.op_types
    assert list(report.op_types) == sorted(report.op_types)
    assert set(report.op_types) == onnx_op_types(report.path)

    # The batch axis must be symbolic: run batch 1 and 3 through onnxruntime directly.
    vit.eval()
    for batch in (1, 3):
        x = torch.randn(batch, 3, 32, 32)
        (got,) = ort_runner(report.path, x)()
        with torch.no_grad():
            want = vit(x).numpy()
        assert got.shape == (batch, 10)
        np.testing.assert_allclose(got, want, atol=1e-4, rtol=1e-4)


def test_export_fx_traced_vit(vit, image, tmp_path):
    traced = torch.fx.symbolic_trace(vit.eval())
    report = export_onnx(traced, tmp_path / "traced.onnx", image, simplify=True)
    assert report.path.exists() and report.checked
    assert report.max_abs_diff < 1e-4


def test_export_multi_input_module(tmp_path):
    class Add(nn.Module):
        def forward(self, a, b):
            return a + b, a * b

    a, b = torch.randn(2, 4), torch.randn(2, 4)
    report = export_onnx(Add(), tmp_path / "add.onnx", (a, b))
    assert report.op_types == ("Add", "Mul")


def test_export_parity_failure_raises(vit, image, tmp_path, monkeypatch):
    real_run = export_mod._run_ort

    def broken(path, inputs):
        return [out + 1.0 for out in real_run(path, inputs)]

    monkeypatch.setattr(export_mod, "_run_ort", broken)
    with pytest.warns(ExportFallbackWarning), pytest.raises(ExportError, match="max abs diff 1.0"):
        export_onnx(vit, tmp_path / "broken.onnx", image)
    assert not (tmp_path / "broken.onnx").exists()


def _ort_matches_torch(module: nn.Module, path, batches=(1, 3), shape=(3, 32, 32)) -> None:
    """onnxruntime equals torch on fresh inputs at each batch size."""
    module.eval()
    for batch in batches:
        x = torch.randn(batch, *shape)
        (got,) = ort_runner(path, x)()
        with torch.no_grad():
            np.testing.assert_allclose(got, module(x).numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize("traced", [False, True], ids=["module", "fx-graphmodule"])
def test_default_form_is_first_measured_form_and_valid(vit, image, tmp_path, traced):
    """The default writes DEFAULT_FORMS[0] without any fallback, for a module and a traced
    GraphModule (whose defaulted forward arguments break a plain TorchScript export)."""
    import onnx

    model = torch.fx.symbolic_trace(vit.eval()) if traced else vit
    with warnings.catch_warnings():
        warnings.simplefilter("error", ExportFallbackWarning)
        report = export_onnx(model, tmp_path / "m.onnx", image)
    assert report.form == DEFAULT_FORMS[0].name == "torchscript-17"
    assert report.exporter == "torchscript" and report.opset == 17 and report.fallbacks == ()
    onnx.checker.check_model(str(report.path), full_check=True)
    proto = onnx.load(str(report.path))
    assert proto.graph.input[0].type.tensor_type.shape.dim[0].dim_param == "batch"
    # names are the module's, not the positional wrapper's
    assert not [i.name for i in proto.graph.initializer if i.name.startswith("module.")]
    assert not [n.name for n in proto.graph.node if n.name.startswith("/module/")]
    _ort_matches_torch(vit, report.path)


def test_fallback_is_announced_when_a_form_fails(vit, image, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("torchscript exporter unavailable")

    monkeypatch.setattr(export_mod, "_export_torchscript", broken)
    with pytest.warns(ExportFallbackWarning, match=r"torchscript-17 rejected \(RuntimeError: torchscript "
                                                   r"exporter unavailable\); trying dynamo-20"):
        report = export_onnx(vit, tmp_path / "m.onnx", image)
    assert report.form == "dynamo-20" and report.exporter == "dynamo" and report.opset == 20
    assert report.fallbacks == ("torchscript-17: RuntimeError: torchscript exporter unavailable",)
    assert report.checked and report.max_abs_diff < 1e-4
    _ort_matches_torch(vit, report.path)


class _BatchSlice(nn.Module):
    """Correct in torch and in a dynamo export; a TorchScript trace freezes the Python ``max``."""

    def forward(self, x):
        return x[: max(1, x.shape[0] - 1)].sum(0, keepdim=True) + x


class _BakesBatch(nn.Module):
    """Specialises on the batch size: no exporter can keep its batch axis dynamic."""

    def forward(self, x):
        return x * torch.tensor(float(x.shape[0]))


@pytest.mark.parametrize("check", [True, False])
def test_trace_that_bakes_the_batch_is_rejected_even_unchecked(tmp_path, check):
    """A TorchScript file that is wrong at another batch size is never kept, even with check=False."""
    module = _BatchSlice()
    with pytest.warns(ExportFallbackWarning, match="torchscript-17 rejected .*differs from torch at batch 3"):
        report = export_onnx(module, tmp_path / "b.onnx", torch.randn(2, 4), check=check)
    assert report.form == "dynamo-20" and len(report.fallbacks) == 1
    for batch in (1, 5):
        x = torch.randn(batch, 4)
        (got,) = ort_runner(report.path, x)()
        np.testing.assert_allclose(got, module(x).numpy(), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("check", [True, False])
def test_model_specialised_on_the_batch_raises(tmp_path, check):
    """dynamo silently writes a static batch for such a model; that file is rejected too."""
    with pytest.warns(ExportFallbackWarning), pytest.raises(ExportError) as info:
        export_onnx(_BakesBatch(), tmp_path / "b.onnx", torch.randn(2, 4), check=check)
    assert "torchscript-17: ExportError: ONNX Runtime output 0 differs from torch at batch 3" in str(info.value)
    assert "dynamo-20: ExportError: the dynamo exporter fixed axis 0 of input 'input' to 2" in str(info.value)
    assert not (tmp_path / "b.onnx").exists()
    report = export_onnx(_BakesBatch(), tmp_path / "s.onnx", torch.randn(2, 4), dynamic_batch=False, check=check)
    assert report.form == "torchscript-17"


def test_every_form_failing_raises_and_leaves_no_file(vit, image, tmp_path, monkeypatch):
    def broken(module, path, *args):
        Path(path).write_bytes(b"not onnx")
        raise RuntimeError(f"no exporter ({Path(path).name})")

    monkeypatch.setattr(export_mod, "_export_torchscript", broken)
    monkeypatch.setattr(export_mod, "_export_dynamo", broken)
    with pytest.warns(ExportFallbackWarning), pytest.raises(ExportError) as info:
        export_onnx(vit, tmp_path / "x.onnx", image)
    for form in DEFAULT_FORMS:
        assert f"{form.name}: RuntimeError" in str(info.value)
    assert not (tmp_path / "x.onnx").exists()


def test_explicit_exporter_and_opset(vit, image, tmp_path):
    report = export_onnx(vit, tmp_path / "d.onnx", image, exporter="dynamo", opset=18)
    assert report.form == "dynamo-18" and report.opset == 18 and report.checked
    report = export_onnx(vit, tmp_path / "t.onnx", image, opset=20, check=False)
    assert report.form == "torchscript-20" and report.opset == 20
    with pytest.raises(ValueError, match="cannot write opset 23"):
        export_onnx(vit, tmp_path / "x.onnx", image, exporter="torchscript", opset=23)
    with pytest.raises(ValueError, match="exporter must be one of"):
        export_onnx(vit, tmp_path / "x.onnx", image, exporter="jit")


def test_export_rejects_non_tensor_input(vit, tmp_path):
    with pytest.raises(TypeError, match="example input 0"):
        export_onnx(vit, tmp_path / "x.onnx", ([1.0, 2.0],))


# ----------------------------------------------------------------------------- measure


def test_count_params_matches_numel(vit):
    assert count_params(vit) == sum(p.numel() for p in vit.parameters())


def test_count_params_counts_tied_and_frozen_once():
    lin = nn.Linear(4, 4)
    tied = nn.Sequential(lin, lin)
    tied[0].bias.requires_grad_(False)
    assert count_params(tied) == 4 * 4 + 4


def test_count_flops_linear():
    assert count_flops(nn.Linear(64, 32), torch.randn(5, 64)) == 2 * 5 * 64 * 32


def test_count_flops_attention_fused_and_unfused(vit, image):
    vit.eval()
    fused = count_flops(vit, image)
    for block in vit.blocks:
        block.attn.fused_attn = False
    try:
        unfused = count_flops(vit, image)
    finally:
        for block in vit.blocks:
            block.attn.fused_attn = True
    assert fused == unfused
    # Attention matmuls q@k^T and attn@v: 2 FLOPs/MAC * 2 matmuls * N^2 * D per block, N=17 tokens.
    attn = 2 * 2 * 17 * 17 * 64 * len(vit.blocks)
    without_attention = count_flops(nn.Sequential(vit.patch_embed), image)
    assert fused > attn + without_attention
    assert count_flops(tiny_vit(embed_dim=64), image) > count_flops(tiny_vit(embed_dim=32), image)


class _Convention(nn.Module):
    """A linear, a strided conv, a transposed conv and attention with q/k and v of different widths."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(12, 20)
        self.conv = nn.Conv2d(4, 6, 3, stride=2, groups=2)
        self.up = nn.ConvTranspose2d(6, 4, 2, stride=2)

    def forward(self, x, img, q, k, v):
        return self.fc(x), self.up(self.conv(img)), F.scaled_dot_product_attention(q, k, v)


def test_count_flops_follows_the_documented_convention():
    """2 FLOPs per multiply-add of contractions only, the same for every attention kernel."""
    m = _Convention()
    x, img = torch.randn(5, 3, 12), torch.randn(2, 4, 9, 9)
    q, k, v = torch.randn(2, 3, 7, 16), torch.randn(2, 3, 11, 16), torch.randn(2, 3, 11, 24)
    conv_out = 2 * 6 * 4 * 4  # (B, C, 4, 4) at stride 2 on 9x9 with a 3x3 kernel
    expected = (2 * 5 * 3 * 12 * 20            # linear: 2 * rows * in * out, bias not counted
                + 2 * conv_out * (4 // 2) * 9  # conv: 2 * prod(out) * in/groups * kernel
                + 2 * conv_out * 4 * 4         # transposed conv: 2 * prod(in) * out * kernel
                + 2 * 2 * 3 * 7 * 11 * 16      # q @ k^T
                + 2 * 2 * 3 * 7 * 11 * 24)     # attn @ v
    assert count_flops(m, (x, img, q, k, v)) == expected
    from torch.nn.attention import SDPBackend, sdpa_kernel

    # the fused CPU kernel needs equal q/k and v widths; the math path decomposes into bmm
    v16 = v[..., :16]
    same_width = expected - 2 * 2 * 3 * 7 * 11 * 8
    for backend in (SDPBackend.MATH, SDPBackend.FLASH_ATTENTION):
        with sdpa_kernel(backend):
            assert count_flops(m, (x, img, q, k, v16)) == same_width, backend


def test_measure_latency_interleaved(vit, image, tmp_path):
    path = export_onnx(vit, tmp_path / "lat.onnx", image, check=False).path
    stats = measure_latency(
        {"torch": torch_runner(vit.eval(), image), "ort": ort_runner(path, image, threads=1)},
        warmup=1,
        reps=3,
        rounds=2,
    )
    assert set(stats) == {"torch", "ort"}
    for s in stats.values():
        assert isinstance(s, LatencyStats)
        assert s.n == 6 and 0 < s.p10_ms <= s.median_ms <= s.p90_ms


def test_measure_latency_rejects_empty():
    with pytest.raises(ValueError):
        measure_latency({})


def test_write_results_md_and_format_table(tmp_path):
    rows = [{"model": "vit", "ms": 1.23456, "flops": 100}, {"model": "deit", "ms": 2.0, "flops": 7}]
    path = write_results_md("unit", "Unit test", rows, notes="hello", results_dir=tmp_path)
    text = path.read_text()
    assert path == tmp_path / "unit.md"
    assert "# Unit test" in text and "| model | ms | flops |" in text and "1.235" in text
    assert "hello" in text and machine_info()["torch"] in text
    table = format_table(rows)
    assert table.splitlines()[0].split() == ["model", "ms", "flops"]
    with pytest.raises(ValueError):
        write_results_md("../escape", "x", rows, results_dir=tmp_path)


def test_export_leaves_batchnorm_in_eval_mode(tmp_path):
    """The TorchScript exporter restores its wrapper's mode recursively: a BatchNorm left in train
    mode would make the reference at the grown batch use batch statistics (parity then fails)."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3), nn.BatchNorm2d(8), nn.ReLU(), nn.AdaptiveAvgPool2d(1), nn.Flatten(),
                          nn.Linear(8, 4)).eval()
    with torch.no_grad():  # running statistics far from a batch's own
        model[1].running_mean.fill_(3.0)
        model[1].running_var.fill_(0.1)
    x = torch.randn(2, 3, 16, 16)
    before = model(x)
    rep = vitgraph.export_onnx(model, tmp_path / "bn.onnx", (x,), exporter="torchscript")
    assert rep.max_abs_diff < 1e-4
    assert not any(m.training for m in model.modules())
    assert torch.equal(model(x), before)
