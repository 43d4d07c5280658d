"""Tests for the 2:4 semi-structured sparsity pass and the ONNX 2:4 checker."""

from __future__ import annotations

import itertools

import numpy as np
import onnx
import pytest
import timm
import torch
from onnx import TensorProto, helper, numpy_helper
from torch import nn

from vitgraph.deploy.onnx24 import check_24, main
from vitgraph.passes.sparsity24 import (
    MASK_BUFFER,
    SEMI_STRUCTURED_UNAVAILABLE,
    accumulate_saliency,
    enforce_24,
    find_permutable_pairs,
    mask_24,
    permutation_gain,
    permute_for_24,
    reapply_masks,
    satisfies_24,
    shape_skip_reason,
    sparsify_24,
    to_semi_structured,
)


def tiny_vit() -> nn.Module:
    """Small random ViT whose Linear layers (except the 10-class head) fit the 2:4 kernels."""
    torch.manual_seed(0)
    return timm.create_model("vit_tiny_patch16_224", pretrained=False, img_size=64, patch_size=16,
                             embed_dim=128, depth=2, num_heads=2, num_classes=10).eval()


def mlp() -> nn.Sequential:
    """Linear-act-dropout-Linear block with eligible shapes."""
    torch.manual_seed(1)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Dropout(0.1), nn.Linear(256, 64)).eval()


@pytest.fixture(scope="module")
def vit() -> nn.Module:
    return tiny_vit()


@pytest.fixture(scope="module")
def sparse_vit(vit: nn.Module) -> nn.Module:
    return sparsify_24(vit, exclude=["head"])


def nonzeros_per_group(weight: torch.Tensor) -> torch.Tensor:
    """Non-zero count of each 4-group along the input dimension."""
    return (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)


def brute_force_top2(score: torch.Tensor) -> torch.Tensor:
    """Reference mask: for every row and 4-group, the pair of positions with the largest sum."""
    mask = torch.zeros_like(score, dtype=torch.bool)
    for r, g in itertools.product(range(score.shape[0]), range(score.shape[1] // 4)):
        block = score[r, 4 * g:4 * g + 4]
        best = max(itertools.combinations(range(4), 2), key=lambda ij: float(block[ij[0]] + block[ij[1]]))
        mask[r, [4 * g + best[0], 4 * g + best[1]]] = True
    return mask


# --------------------------------------------------------------------------- sparsify_24


def test_pattern_holds_and_report(vit: nn.Module, sparse_vit: nn.Module) -> None:
    report = sparse_vit.vitgraph_24_report
    linears = {n for n, m in vit.named_modules() if isinstance(m, nn.Linear)}
    assert set(report.sparsified) == linears - {"head"}
    assert len(report.sparsified) == 8
    assert dict(report.skipped) == {"head": "excluded by pattern"}
    modules = dict(sparse_vit.named_modules())
    for name in report.sparsified:
        weight = modules[name].weight
        assert (nonzeros_per_group(weight) == 2).all(), name
        assert torch.equal(getattr(modules[name], MASK_BUFFER), weight != 0)
    assert 0.5 < report.kept_magnitude_fraction < 1.0
    # The mask buffers are non-persistent: the state dict loads into the dense architecture.
    tiny_vit().load_state_dict(sparse_vit.state_dict())


def test_shape_rule_reports_reasons() -> None:
    model = nn.Sequential(nn.Linear(64, 64), nn.Linear(64, 48), nn.Linear(30, 64), nn.Linear(96, 64))
    report = sparsify_24(model, min_features=32).vitgraph_24_report
    assert report.sparsified == ("0",)
    reasons = dict(report.skipped)
    assert "multiple of 32" in reasons["1"] and "multiple of 4" in reasons["2"]
    assert "multiple of 64" in reasons["3"]
    assert "min_features" in dict(sparsify_24(model, min_features=128).vitgraph_24_report.skipped)["0"]
    assert shape_skip_reason(768, 3072) is None


def test_input_model_unchanged(vit: nn.Module, sparse_vit: nn.Module) -> None:
    fresh = tiny_vit().state_dict()
    for key, value in vit.state_dict().items():
        assert torch.equal(value, fresh[key]), key
    assert not hasattr(vit, "vitgraph_24_report")
    assert all(getattr(m, MASK_BUFFER, None) is None for m in vit.modules())


def test_exclude_patterns(vit: nn.Module) -> None:
    report = sparsify_24(vit, exclude=("blocks.0.*", "head")).vitgraph_24_report
    assert all(name.startswith("blocks.1.") for name in report.sparsified)
    assert dict(report.skipped)["blocks.0.mlp.fc2"] == "excluded by pattern"


def test_magnitude_keeps_top2_like_brute_force() -> None:
    torch.manual_seed(2)
    layer = nn.Linear(64, 32)
    expected = brute_force_top2(layer.weight.detach().abs())
    assert torch.equal(mask_24(layer.weight.abs()), expected)
    sparse = sparsify_24(layer, min_features=32)
    assert torch.equal(sparse.weight != 0, expected)
    assert torch.equal(sparse.weight, layer.weight * expected)


def test_hessian_uses_saliency() -> None:
    torch.manual_seed(3)
    layer = nn.Linear(64, 32)
    saliency = {"": 1.0 / layer.weight.detach().abs()}  # root module name is ""
    sparse = sparsify_24(layer, "hessian", saliency=saliency, min_features=32)
    assert torch.equal(sparse.weight != 0, brute_force_top2(saliency[""]))
    # Inverse-magnitude saliency keeps the two smallest |w| of each group.
    smallest = brute_force_top2(-layer.weight.detach().abs())
    assert torch.equal(sparse.weight != 0, smallest)


def test_hessian_errors_and_accumulated_saliency() -> None:
    model = mlp()
    with pytest.raises(ValueError, match="accumulate_saliency"):
        sparsify_24(model, "hessian")
    with pytest.raises(ValueError, match="no entry"):
        sparsify_24(model, "hessian", saliency={"0": torch.ones(256, 64)})
    with pytest.raises(ValueError, match="shape"):
        sparsify_24(model, "hessian", saliency={"0": torch.ones(3, 3), "3": torch.ones(64, 256)})
    with pytest.raises(ValueError, match="unknown method"):
        sparsify_24(model, "random")
    batches = [torch.randn(8, 64) for _ in range(2)]
    saliency = accumulate_saliency(model, lambda m, x: m(x).pow(2).mean(), batches)
    assert saliency["0"].shape == (256, 64) and (saliency["0"] >= 0).all() and saliency["3"].sum() > 0
    sparse = sparsify_24(model, "hessian", saliency=saliency)
    assert sparse.vitgraph_24_report.sparsified == ("0", "3")
    assert torch.equal(sparse[3].weight != 0, mask_24(saliency["3"]))
    assert all(p.grad is None for p in model.parameters())


# --------------------------------------------------------------------------- permutation


def test_permutation_gain_is_valid_and_monotone() -> None:
    torch.manual_seed(4)
    weight = torch.randn(64, 256)
    perm, before, after = permutation_gain(weight)
    assert sorted(perm.tolist()) == list(range(256))
    assert after > before
    kept_identity = float((weight.abs() * mask_24(weight.abs())).sum())
    permuted = weight[:, perm].abs()
    assert before == pytest.approx(kept_identity, rel=1e-6)
    assert after == pytest.approx(float((permuted * mask_24(permuted)).sum()), rel=1e-6)


def test_permutation_preserves_function_exactly() -> None:
    model = mlp().double()
    assert find_permutable_pairs(model) == [("0", "3", ("2", "1"))]
    permuted, pairs = permute_for_24(model)
    assert pairs == (("0", "3"),)
    assert not torch.equal(permuted[0].weight, model[0].weight)
    x = torch.randn(16, 64, dtype=torch.float64)
    torch.testing.assert_close(permuted(x), model(x), rtol=0, atol=1e-12)
    plain = sparsify_24(model).vitgraph_24_report
    with_perm = sparsify_24(model, permute=True)
    assert with_perm.vitgraph_24_report.permuted == (("0", "3"),)
    assert with_perm.vitgraph_24_report.kept_magnitude_fraction >= plain.kept_magnitude_fraction
    assert satisfies_24(with_perm[3].weight)


def test_permutation_through_layernorm_and_vit_mlp(vit: nn.Module) -> None:
    torch.manual_seed(5)
    model = nn.Sequential(nn.Linear(64, 128), nn.ReLU(), nn.LayerNorm(128), nn.Linear(128, 64)).double()
    with torch.no_grad():
        model[2].weight.uniform_(0.5, 1.5)
        model[2].bias.uniform_(-1, 1)
    permuted, pairs = permute_for_24(model)
    assert pairs == (("0", "3"),)
    x = torch.randn(4, 64, dtype=torch.float64)
    torch.testing.assert_close(permuted(x), model(x), rtol=0, atol=1e-12)
    permuted_vit, vit_pairs = permute_for_24(vit)
    assert {p[1] for p in vit_pairs} == {"blocks.0.mlp.fc2", "blocks.1.mlp.fc2"}
    image = torch.randn(2, 3, 64, 64)
    torch.testing.assert_close(permuted_vit(image), vit(image), rtol=1e-5, atol=1e-5)


def test_no_permutation_for_parallel_branches() -> None:
    class Parallel(nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.a, self.act, self.b = nn.Linear(64, 64), nn.GELU(), nn.Linear(64, 64)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.b(x) + self.act(self.a(x))

    assert find_permutable_pairs(Parallel()) == []


# --------------------------------------------------------------------------- enforcement


def test_masks_survive_optimizer_steps() -> None:
    sparse = sparsify_24(mlp())
    masks = [sparse[0].weight_mask24.clone(), sparse[3].weight_mask24.clone()]
    before = sparse[3].weight.detach().clone()
    optimizer = torch.optim.SGD(sparse.parameters(), lr=0.1, momentum=0.9, weight_decay=1e-3)
    sparse.train()
    with enforce_24(sparse, optimizer):
        for _ in range(3):
            optimizer.zero_grad()
            sparse(torch.randn(8, 64)).pow(2).mean().backward()
            optimizer.step()
    for layer, mask in zip((sparse[0], sparse[3]), masks):
        assert satisfies_24(layer.weight)
        assert (layer.weight[~mask] == 0).all()
    assert not torch.equal(sparse[3].weight, before)
    # Without the enforcer the same training breaks the pattern (the test is meaningful).
    unguarded = sparsify_24(mlp()).train()
    optimizer = torch.optim.SGD(unguarded.parameters(), lr=0.1)
    unguarded(torch.randn(8, 64)).pow(2).mean().backward()
    optimizer.step()
    assert not satisfies_24(unguarded[3].weight)


def test_reapply_masks_and_enforcer_errors() -> None:
    sparse = sparsify_24(mlp())
    with torch.no_grad():
        sparse[0].weight.add_(1.0)
    assert not satisfies_24(sparse[0].weight)
    assert reapply_masks(sparse) == 2
    assert satisfies_24(sparse[0].weight)
    with pytest.raises(ValueError, match="sparsify_24"):
        enforce_24(mlp())


def test_semi_structured_cpu_path_reports_clearly() -> None:
    sparse = sparsify_24(mlp())
    weight = sparse[0].weight.detach().clone()
    model, report = to_semi_structured(sparse)
    assert not report.applied and report.converted == ()
    assert SEMI_STRUCTURED_UNAVAILABLE in report.message
    assert model[0].weight.layout == torch.strided
    assert torch.equal(model[0].weight, weight)


# --------------------------------------------------------------------------- ONNX


def export(model: nn.Module, path) -> str:
    """Export a 64x64 image model to ONNX with the TorchScript exporter."""
    torch.onnx.export(model, (torch.randn(1, 3, 64, 64),), str(path), dynamo=False, opset_version=17,
                      input_names=["image"], output_names=["logits"])
    return str(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_export_passes_check_and_matches_ort(sparse_vit: nn.Module, tmp_path, capsys) -> None:
    import onnxruntime as ort

    path = export(sparse_vit, tmp_path / "sparse.onnx")
    report = check_24(path)
    assert report.ok
    assert len(report.checked) == 8 and all(i.status == "2:4" for i in report.checked)
    assert [i.name for i in report.initializers if not i.eligible] == ["head.weight"]
    assert main([path]) == 0
    assert "8 of 9 weight initializers checked: OK" in capsys.readouterr().out
    image = torch.randn(2, 3, 64, 64)
    session = ort.InferenceSession(path, providers=["CPUExecutionProvider"])
    for sample in image.split(1):
        (got,) = session.run(None, {"image": sample.numpy()})
        np.testing.assert_allclose(got, sparse_vit(sample).detach().numpy(), atol=1e-4, rtol=1e-4)


@pytest.mark.filterwarnings("ignore::DeprecationWarning", "ignore::torch.jit.TracerWarning")
def test_onnx_dense_export_fails_check(vit: nn.Module, tmp_path, capsys) -> None:
    path = export(vit, tmp_path / "dense.onnx")
    report = check_24(path)
    assert not report.ok
    assert len(report.checked) == 8 and all(i.all_dense and i.status == "dense" for i in report.checked)
    assert main([path]) == 1
    assert "FAIL" in capsys.readouterr().out
    assert main([str(tmp_path / "missing.onnx")]) == 2
    with pytest.raises(FileNotFoundError):
        check_24(tmp_path / "missing.onnx")


def weight_graph(op: str, weight: np.ndarray, *, trans_b: int | None = None, transpose: bool = False
                 ) -> onnx.ModelProto:
    """One-node model y = op(x, W) (optionally through a Transpose of W)."""
    init = numpy_helper.from_array(weight.astype(np.float32), "W")
    nodes, w_name = [], "W"
    if transpose:
        nodes.append(helper.make_node("Transpose", ["W"], ["Wt"], perm=[1, 0]))
        w_name = "Wt"
    attrs = {} if trans_b is None else {"transB": trans_b}
    nodes.append(helper.make_node(op, ["x", w_name], ["y"], **attrs))
    graph = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, None)],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, None)], [init])
    return helper.make_model(graph)


def test_onnx_input_axis_orientation() -> None:
    torch.manual_seed(6)
    w_out_in = torch.randn(64, 64)
    w_out_in = (w_out_in * mask_24(w_out_in.abs())).numpy()  # 2:4 along axis 1 (input of Linear)
    w_in_out = w_out_in.T  # MatMul layout: 2:4 along axis 0
    assert check_24(weight_graph("MatMul", w_in_out)).ok
    assert check_24(weight_graph("Gemm", w_out_in, trans_b=1)).ok
    assert check_24(weight_graph("Gemm", w_in_out, trans_b=0)).ok
    assert check_24(weight_graph("MatMul", w_out_in, transpose=True)).ok
    wrong = check_24(weight_graph("MatMul", w_out_in)).initializers[0]
    assert wrong.input_axis == 0 and wrong.violations > 0 and not wrong.ok
    assert not check_24(weight_graph("Gemm", w_in_out, trans_b=1)).ok
    ignored = check_24(weight_graph("Gemm", w_in_out, trans_b=1), ignore=["W"])
    assert ignored.ok and ignored.initializers[0].reason == "ignored by pattern"
