"""ONNX export of (pruned) ViTs with a dynamic batch axis, checker and onnxruntime parity.

Exporter choice (torch 2.15): the dynamo-based exporter (``torch.onnx.export(..., dynamo=True)``)
is tried first. It handles plain timm models *and* ``torch.fx.symbolic_trace`` GraphModules of
them, whereas the TorchScript exporter (``dynamo=False``) fails on traced timm ViTs
(``scaled_dot_product_attention(): argument 'is_causal' must be bool, not Tensor``) and is
deprecated. The TorchScript exporter is kept as a fallback, announced with a warning.
"""

from __future__ import annotations

import contextlib
import logging
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

try:
    from vitgraph.errors import ExportError
except ImportError:  # the lead moves this class to vitgraph/errors.py

    class ExportError(RuntimeError):
        """Raised when a model cannot be exported to ONNX or the export is not faithful."""


__all__ = ["ExportError", "ExportReport", "export_onnx", "onnx_op_types"]

# Weights above this size go to an external ".data" file: a protobuf cannot exceed 2 GiB.
_EXTERNAL_DATA_BYTES = 1536 * 1024**2
_BATCH = "batch"
# Loggers that narrate the dynamo exporter's (harmless) opset down-conversion attempts.
_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "onnxscript")


@dataclass(frozen=True)
class ExportReport:
    """Outcome of one ONNX export: file, opset, parity errors and graph summary."""

    path: Path
    opset: int
    max_abs_diff: float
    max_rel_diff: float
    op_types: tuple[str, ...]
    n_nodes: int
    checked: bool
    exporter: str = "dynamo"


def export_onnx(
    module: nn.Module,
    path: str | Path,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    opset: int = 17,
    dynamic_batch: bool = True,
    simplify: bool = False,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
) -> ExportReport:
    """Export ``module`` to ONNX at ``path``, then check it and compare onnxruntime with torch."""
    inputs = _as_input_tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    with _eval_mode(module):
        reference = _torch_outputs(module, inputs)
        input_names = _io_names("input", len(inputs))
        output_names = _io_names("output", len(reference))
        exporter = _export_with_fallback(
            module, path, inputs, input_names, output_names, opset, dynamic_batch
        )
        if simplify:
            _simplify(path)
        max_abs, max_rel = float("nan"), float("nan")
        if check:
            _run_checker(path)
            max_abs, max_rel = _check_parity(
                module, path, inputs, reference, dynamic_batch, rtol, atol
            )
    proto = onnx.load(str(path), load_external_data=False)
    actual_opset = _default_opset(proto)
    if actual_opset != opset:
        warnings.warn(
            f"requested ONNX opset {opset} but the {exporter} exporter produced opset "
            f"{actual_opset} (it could not convert to the requested version)",
            stacklevel=2,
        )
    return ExportReport(
        path=path,
        opset=actual_opset,
        max_abs_diff=max_abs,
        max_rel_diff=max_rel,
        op_types=tuple(sorted(_collect_op_types(proto))),
        n_nodes=_count_nodes(proto.graph),
        checked=check,
        exporter=exporter,
    )


def onnx_op_types(path: str | Path) -> set[str]:
    """Set of ONNX operator types used in the model at ``path`` (subgraphs and functions too)."""
    return _collect_op_types(onnx.load(str(path), load_external_data=False))


# ----------------------------------------------------------------------------- inputs / outputs


def _as_input_tuple(example_inputs: tuple[torch.Tensor, ...] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Normalise example inputs to a non-empty tuple of tensors."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ValueError("export_onnx needs at least one example input tensor")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"example input {i} is {type(x).__name__}, expected torch.Tensor")
        if x.dim() == 0:
            raise ValueError(f"example input {i} is a scalar; a batch axis 0 is required")
    return inputs


def _io_names(prefix: str, count: int) -> list[str]:
    """ONNX input/output names: 'input' for one, 'input_0', 'input_1', ... for several."""
    return [prefix] if count == 1 else [f"{prefix}_{i}" for i in range(count)]


def _flatten_tensors(output: object) -> list[torch.Tensor]:
    """Tensor leaves of a (nested) model output, in the order the exporters emit them."""
    leaves, _ = torch.utils._pytree.tree_flatten(output)
    return [leaf for leaf in leaves if isinstance(leaf, torch.Tensor)]


def _torch_outputs(module: nn.Module, inputs: tuple[torch.Tensor, ...]) -> list[np.ndarray]:
    """Reference outputs of ``module`` as numpy arrays (inputs cloned so they cannot be mutated)."""
    with torch.no_grad():
        out = _flatten_tensors(module(*(x.clone() for x in inputs)))
    if not out:
        raise ExportError("the module returned no tensors; nothing to export")
    return [t.detach().cpu().numpy() for t in out]


@contextlib.contextmanager
def _eval_mode(module: nn.Module) -> Iterator[None]:
    """Put every submodule in eval mode and restore each one's training flag afterwards."""
    flags = [(m, m.training) for m in module.modules()]
    module.eval()
    try:
        yield
    finally:
        for m, training in flags:
            m.training = training


# ----------------------------------------------------------------------------- export


_DYNAMO_NATIVE_OPSET = 18  # the opset torch.onnx's dynamo exporter writes before converting


def _export_with_fallback(
    module: nn.Module,
    path: Path,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
) -> str:
    """Export with the dynamo exporter, falling back to TorchScript; returns the one used."""
    try:
        _export_dynamo(module, path, inputs, input_names, output_names, opset, dynamic_batch)
        # the dynamo exporter writes opset 18 and converts down; a node it could not convert
        # (Split with num_outputs below 18) fails the checker: the TorchScript exporter then
        # writes the requested opset natively
        _run_checker(path)
        return "dynamo"
    except Exception as dynamo_error:  # noqa: BLE001 - any exporter failure triggers the fallback
        warnings.warn(
            f"dynamo ONNX exporter failed ({type(dynamo_error).__name__}: "
            f"{_first_line(dynamo_error)}); falling back to the TorchScript exporter",
            stacklevel=3,
        )
        try:
            _export_torchscript(module, path, inputs, input_names, output_names, opset, dynamic_batch)
        except Exception as ts_error:  # noqa: BLE001
            if opset < _DYNAMO_NATIVE_OPSET:
                try:  # the dynamo graph is fine at its own opset; export_onnx warns about the change
                    _export_dynamo(module, path, inputs, input_names, output_names, _DYNAMO_NATIVE_OPSET, dynamic_batch)
                    _run_checker(path)
                    return "dynamo"
                except Exception:  # noqa: BLE001 - report the failures at the requested opset
                    pass
            raise ExportError(
                f"both ONNX exporters failed for {type(module).__name__}: dynamo: "
                f"{_first_line(dynamo_error)} | torchscript: {_first_line(ts_error)}"
            ) from ts_error
        return "torchscript"


def _export_dynamo(
    module: nn.Module,
    path: Path,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
) -> None:
    """torch.export-based export; one shared symbolic Dim ties axis 0 of all inputs."""
    dynamic_shapes = None
    if dynamic_batch:
        batch = torch.export.Dim(_BATCH)
        dynamic_shapes = tuple({0: batch} for _ in inputs)
    with _quiet_exporters():
        program = torch.onnx.export(
            module,
            inputs,
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=True,
            dynamic_shapes=dynamic_shapes,
            optimize=True,
            verbose=False,
        )
    if program is None:
        raise ExportError("torch.onnx.export(dynamo=True) returned no ONNXProgram")
    program.save(str(path), external_data=_needs_external_data(module))


def _export_torchscript(
    module: nn.Module,
    path: Path,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    opset: int,
    dynamic_batch: bool,
) -> None:
    """Legacy TorchScript-tracing export with ``dynamic_axes`` on axis 0."""
    dynamic_axes = {name: {0: _BATCH} for name in (*input_names, *output_names)} if dynamic_batch else None
    with _quiet_exporters():
        torch.onnx.export(
            module,
            inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=False,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )


@contextlib.contextmanager
def _quiet_exporters() -> Iterator[None]:
    """Silence exporter progress logs and deprecation warnings for the duration of an export."""
    loggers = [logging.getLogger(name) for name in _CHATTY_LOGGERS]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.CRITICAL)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def _needs_external_data(module: nn.Module) -> bool:
    """True when the weights are too large to live inside one protobuf file."""
    tensors = {id(t): t for t in (*module.parameters(), *module.buffers())}
    return sum(t.numel() * t.element_size() for t in tensors.values()) > _EXTERNAL_DATA_BYTES


def _simplify(path: Path) -> None:
    """Constant-fold and clean the graph at ``path`` in place with onnxscript's optimizer."""
    try:
        from onnxscript import optimizer
    except ImportError as exc:
        raise ImportError(
            "simplify=True needs the 'onnxscript' package (pip install onnxscript)"
        ) from exc
    proto = onnx.load(str(path))
    external = proto.ByteSize() > _EXTERNAL_DATA_BYTES
    try:
        optimized = optimizer.optimize(proto)
    except Exception as exc:  # noqa: BLE001
        raise ExportError(f"onnxscript optimizer failed on {path}: {_first_line(exc)}") from exc
    onnx.save_model(
        optimized,
        str(path),
        save_as_external_data=external,
        all_tensors_to_one_file=True,
        location=f"{path.name}.data",
    )


# ----------------------------------------------------------------------------- checks


def _run_checker(path: Path) -> None:
    """Full ONNX checker (including strict shape inference); wraps failures in ExportError."""
    try:
        onnx.checker.check_model(str(path), full_check=True)
    except Exception as exc:  # ValidationError, InferenceError, ...
        raise ExportError(f"onnx.checker rejected {path}: {_first_line(exc)}") from exc


def _run_ort(path: Path, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:
    """Run the ONNX file on CPU with onnxruntime and return all outputs."""
    import onnxruntime as ort

    session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
    feed = {meta.name: x for meta, x in zip(session.get_inputs(), inputs)}
    return list(session.run(None, feed))


def _grow_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with one extra sample (a copy of sample 0) to prove axis 0 is really dynamic."""
    return tuple(torch.cat([x, x[:1]], dim=0) for x in inputs)


def _check_parity(
    module: nn.Module,
    path: Path,
    inputs: tuple[torch.Tensor, ...],
    reference: list[np.ndarray],
    dynamic_batch: bool,
    rtol: float,
    atol: float,
) -> tuple[float, float]:
    """Compare onnxruntime with torch at the example batch (and batch+1); return max errors."""
    cases = [(inputs, reference)]
    if dynamic_batch:
        grown = _grow_batch(inputs)
        cases.append((grown, _torch_outputs(module, grown)))
    max_abs = max_rel = 0.0
    for case_inputs, expected in cases:
        got = _run_ort(path, [x.detach().cpu().numpy() for x in case_inputs])
        batch = int(case_inputs[0].shape[0])
        abs_err, rel_err = _compare(got, expected, batch, rtol, atol)
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    return max_abs, max_rel


def _compare(
    got: list[np.ndarray], expected: list[np.ndarray], batch: int, rtol: float, atol: float
) -> tuple[float, float]:
    """Max abs/rel error of onnxruntime outputs; raises ExportError outside the tolerance."""
    if len(got) != len(expected):
        raise ExportError(f"ONNX model returned {len(got)} outputs, torch returned {len(expected)}")
    max_abs = max_rel = 0.0
    for i, (g, e) in enumerate(zip(got, expected)):
        if g.shape != e.shape:
            raise ExportError(
                f"ONNX output {i} at batch {batch} has shape {g.shape}, torch gives {e.shape}"
            )
        g64, e64 = g.astype(np.float64), e.astype(np.float64)
        diff = np.abs(g64 - e64)
        # Relative error with the denominator floored at atol so near-zero references do not explode.
        rel = diff / np.maximum(np.abs(e64), atol)
        abs_err = float(diff.max(initial=0.0))
        rel_err = float(rel.max(initial=0.0))
        # Same criterion as numpy.allclose: |got - expected| <= atol + rtol * |expected|.
        if not np.all(diff <= atol + rtol * np.abs(e64)):
            raise ExportError(
                f"ONNX Runtime output {i} differs from torch at batch {batch}: "
                f"max abs diff {abs_err:.3e}, max rel diff {rel_err:.3e} (atol={atol}, rtol={rtol})"
            )
        max_abs, max_rel = max(max_abs, abs_err), max(max_rel, rel_err)
    return max_abs, max_rel


# ----------------------------------------------------------------------------- graph summary


def _default_opset(proto: onnx.ModelProto) -> int:
    """Opset version of the default ('' / ai.onnx) domain."""
    for entry in proto.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    raise ExportError("exported model declares no default-domain opset")


def _subgraphs(node: onnx.NodeProto) -> Iterator[onnx.GraphProto]:
    """Graphs nested in a node's attributes (If/Loop/Scan bodies)."""
    for attr in node.attribute:
        if attr.type == onnx.AttributeProto.GRAPH:
            yield attr.g
        elif attr.type == onnx.AttributeProto.GRAPHS:
            yield from attr.graphs


def _graph_op_types(graph: onnx.GraphProto) -> set[str]:
    """Operator types in ``graph`` and its nested subgraphs."""
    ops: set[str] = set()
    for node in graph.node:
        ops.add(node.op_type)
        for sub in _subgraphs(node):
            ops |= _graph_op_types(sub)
    return ops


def _collect_op_types(proto: onnx.ModelProto) -> set[str]:
    """Operator types of the main graph plus any local function bodies."""
    ops = _graph_op_types(proto.graph)
    for function in proto.functions:
        for node in function.node:
            ops.add(node.op_type)
    return ops


def _count_nodes(graph: onnx.GraphProto) -> int:
    """Number of nodes in ``graph`` including nested subgraphs."""
    return sum(1 + sum(_count_nodes(sub) for sub in _subgraphs(node)) for node in graph.node)


def _first_line(exc: BaseException) -> str:
    """First non-empty line of an exception message, for compact error chaining."""
    for line in str(exc).splitlines():
        if line.strip():
            return line.strip()[:300]
    return type(exc).__name__
