"""INT8 ONNX by onnxruntime static quantization, its top-1 and its CPU speedup over the fp32 file.

:func:`quantize_int8` writes QDQ int8 (per-channel int8 MatMul/Gemm/Conv weights, uint8
activations: onnxruntime's U8S8 kernels on x86) calibrated on the given batches; MatMuls between two
activations (attention's q @ k^T and attn @ v) stay float: on the CPUs measured, int8
activations and quantized attention MatMuls made the file slower than fp32, while this form is
as fast or faster at the same top-1 (benchmarks/results/prune_pipeline.md has the figures).
:func:`evaluate_onnx` is the top-1 of an ONNX file in onnxruntime; :func:`int8_speedup` times both files interleaved at batch 1.
"""
from __future__ import annotations

import logging
import tempfile
from pathlib import Path
from typing import Any, Callable, Iterable, Optional

import torch

from vitgraph.errors import VitgraphError

__all__ = ["quantize_int8", "evaluate_onnx", "onnx_model", "int8_speedup"]


def _input_name(path: Path) -> str:
    import onnxruntime as ort

    return ort.InferenceSession(str(path), providers=["CPUExecutionProvider"]).get_inputs()[0].name


def quantize_int8(src: Path, dst: Path, calibration: Iterable[Any]) -> Path:
    """``dst``: ``src`` quantized to int8, calibrated on the first inputs of ``calibration``'s batches
    (``(x, y)`` or ``(x,)``)."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    name = _input_name(src)
    feeds = [{name: b[0].cpu().numpy()} for b in calibration]

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.it = iter(feeds)

        def get_next(self) -> Optional[dict]:
            return next(self.it, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns about every 1-d weight it leaves alone
    try:
        with tempfile.TemporaryDirectory() as d:
            pre = Path(d) / "pre.onnx"
            quant_pre_process(str(src), str(pre))
            quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QUInt8,
                            op_types_to_quantize=["MatMul", "Gemm", "Conv"],
                            nodes_to_exclude=_activation_matmuls(pre))
    except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer raises many kinds
        raise VitgraphError(f"--int8: onnxruntime static quantization of {src} failed: {type(e).__name__}: {e}") from e
    finally:
        root.setLevel(level)
    return dst


def _activation_matmuls(path: Path) -> list[str]:
    """MatMul nodes with no initializer input (attention's q @ k^T and attn @ v): left in float,
    since quantizing both activations costs more Quantize/DequantizeLinear work than int8 saves."""
    import onnx

    g = onnx.load(str(path)).graph
    weights = {i.name for i in g.initializer}
    weights |= {o for n in g.node if n.op_type == "Constant" for o in n.output}
    return [n.name for n in g.node if n.op_type == "MatMul" and not any(i in weights for i in n.input)]


def onnx_model(path: Path) -> Callable[..., list[torch.Tensor]]:
    """The ONNX file as a function of torch tensors returning its outputs (onnxruntime CPU), as a module would."""
    import onnxruntime as ort

    sess = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    names = [i.name for i in sess.get_inputs()]

    def run(*inputs: torch.Tensor) -> list[torch.Tensor]:
        feeds = {n: t.detach().cpu().numpy() for n, t in zip(names, inputs)}
        return [torch.from_numpy(o) for o in sess.run(None, feeds)]

    return run


def evaluate_onnx(path: Path, data: Iterable[Any], progress: Any = None) -> float:
    """Top-1 (percent) of the ONNX file over ``(inputs, labels)`` batches on onnxruntime's CPU provider.

    ``progress`` is a tqdm-like bar to tick per batch, or ``None``.
    """
    run = onnx_model(path)
    correct = total = 0
    for xb, yb in data:
        pred = run(xb)[0].argmax(-1)
        correct += int((pred == yb.cpu()).sum())
        total += len(yb)
        if progress is not None:
            progress.update(1)
    if total == 0:
        raise VitgraphError("the evaluation data yielded no examples")
    return 100.0 * correct / total


def int8_speedup(fp32: Path, int8: Path, x: torch.Tensor, reps: int) -> tuple[float, float]:
    """Median ms of the fp32 and the int8 file at batch 1 in onnxruntime CPU (interleaved runs)."""
    from vitgraph.deploy.measure import measure_latency, ort_runner

    xs = x[:1].cpu().numpy()
    stats = measure_latency({"fp32": ort_runner(fp32, xs), "int8": ort_runner(int8, xs)}, reps=reps, rounds=3)
    return stats["fp32"].median_ms, stats["int8"].median_ms
