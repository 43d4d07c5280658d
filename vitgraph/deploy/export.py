"""ONNX export of (pruned) ViTs with a dynamic batch axis, checker and onnxruntime parity.

The form written by default is chosen by measurement (``benchmarks/export_forms.py``, results in
``benchmarks/results/export_forms.md``, onnxruntime CPU, batch 8): the TorchScript exporter at
opset 17. It runs as fast as the fastest forms measured and is written several times faster than
any dynamo form (the figures are in that file): the dynamo exporter's torch.export capture,
decomposition (a retrace with symbolic shapes) and onnxscript optimisation take most of an
export's time.
Why forms differ, read from the graph onnxruntime runs after its own optimisation at load:

- dynamo at opset 17 and 18 writes GELU as ``Div, Erf, Add, Mul, Mul`` in an order onnxruntime's
  GELU fusion does not match, so five element-wise kernels run over the MLP's hidden tensor; the
  TorchScript erf form and opset 20's ``Gelu`` op both run as one ``BiasGelu``. Opset 17 and 18
  run the same graph, as do TorchScript's opset 17 and 20;
- dynamo transposes K through ``Reshape, Transpose, Reshape`` with shapes computed at run time
  (one more transpose per block) but folds the attention scale into ``FusedMatMul``; TorchScript
  scales q and k with two ``Mul``; dynamo at opset 23 writes the ONNX ``Attention`` op;
- fusing the residual Add and LayerNorm into ``com.microsoft.SkipLayerNormalization``
  (onnxscript's onnxruntime fusions, onnxruntime's transformer optimizer) makes the CPU model
  slower, so no contrib-op fusion is applied; onnxruntime's offline optimisation
  written back to the file (BASIC or EXTENDED) and onnxscript's optimizer change nothing that
  onnxruntime does not already do when it loads the file.

Candidates are tried in order (:data:`DEFAULT_FORMS`): TorchScript at opset 17, dynamo at opset
20, dynamo at opset 18. A form is kept only if the file passes ``onnx.checker`` (full check), keeps
axis 0 of every input symbolic, and onnxruntime matches torch at the example batch and one more
(``check=True``). A TorchScript trace can freeze a batch-dependent Python value into the graph, so
its file is compared with torch at the second batch size even with ``check=False``; the dynamo
exporter instead falls back, silently, to a static batch, which the axis check rejects. A form
that fails is announced with an :class:`ExportFallbackWarning` naming the reason and the next
form; when every form fails, :class:`ExportError` lists all the reasons and no file is left.
The TorchScript exporter passes a ``forward``'s defaulted arguments as tensors, which breaks a
traced timm GraphModule (``is_causal must be bool, not Tensor``), so it traces a positional-only
wrapper whose prefix is then removed from the file's names.
"""

from __future__ import annotations

import contextlib
import io
import logging
import os
import sys
import tempfile
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import onnx
import torch
from torch import nn

from vitgraph.errors import ArgumentError, ArgumentTypeError, ExportError

__all__ = [
    "DEFAULT_FORMS",
    "ExportError",
    "ExportFallbackWarning",
    "ExportForm",
    "ExportReport",
    "export_onnx",
    "onnx_op_types",
]

# Weights above this size go to an external ".data" file: a protobuf cannot exceed 2 GiB.
_EXTERNAL_DATA_BYTES = 1536 * 1024**2
_BATCH = "batch"
# Loggers that narrate the exporters' progress and (harmless) opset down-conversion attempts.
_CHATTY_LOGGERS = ("torch.onnx", "torch.export", "onnxscript")
_EXPORTERS = ("torchscript", "dynamo")
_TORCHSCRIPT_MAX_OPSET = 20  # the TorchScript exporter writes opsets 7..20
_DYNAMO_NATIVE_OPSET = 18  # the opset torch.onnx's dynamo exporter writes before converting
_WRAPPED = "module"  # attribute under which the TorchScript path wraps the module
VERBOSE_ENV = "VITGRAPH_VERBOSE"  # set (not "0"): show what the exporters print while writing a form


class ExportFallbackWarning(UserWarning):
    """An export form failed (exporter error, checker or parity); the next form is used."""


@dataclass(frozen=True)
class ExportForm:
    """One way of writing the ONNX file: which torch exporter, at which opset."""

    exporter: str
    opset: int

    def __post_init__(self) -> None:
        if self.exporter not in _EXPORTERS:
            raise ArgumentError(f"exporter must be one of {_EXPORTERS}, got {self.exporter!r}")
        if self.exporter == "torchscript" and self.opset > _TORCHSCRIPT_MAX_OPSET:
            raise ArgumentError(f"the TorchScript exporter writes opsets up to {_TORCHSCRIPT_MAX_OPSET}")

    @property
    def name(self) -> str:
        return f"{self.exporter}-{self.opset}"


# Measured fastest first (benchmarks/results/export_forms.md); the rest are fallbacks.
DEFAULT_FORMS: tuple[ExportForm, ...] = (
    ExportForm("torchscript", 17),
    ExportForm("dynamo", 20),
    ExportForm("dynamo", 18),
)


@dataclass(frozen=True)
class ExportReport:
    """Outcome of one ONNX export: file, form, parity errors and graph summary."""

    path: Path
    opset: int
    max_abs_diff: float
    max_rel_diff: float
    op_types: tuple[str, ...]
    n_nodes: int
    checked: bool
    exporter: str = "torchscript"
    form: str = "torchscript-17"
    fallbacks: tuple[str, ...] = ()  # one "form: reason" line per form that was rejected first


def export_onnx(
    module: nn.Module,
    path: str | Path,
    example_inputs: tuple[torch.Tensor, ...] | torch.Tensor,
    *,
    opset: int | None = None,
    exporter: str | None = None,
    dynamic_batch: bool = True,
    simplify: bool = False,
    check: bool = True,
    rtol: float = 1e-4,
    atol: float = 1e-4,
    verbose: bool | None = None,
) -> ExportReport:
    """Export ``module`` to ONNX at ``path``, then check it and compare onnxruntime with torch.

    With ``opset`` and ``exporter`` left out the measured fastest form is written
    (:data:`DEFAULT_FORMS`, first that passes). ``opset`` asks for that opset (TorchScript first,
    then dynamo, then dynamo's native opset 18 with a warning); ``exporter`` ("torchscript" or
    "dynamo") restricts the candidates to one exporter. Every rejected form is announced with an
    :class:`ExportFallbackWarning`. ``check=False`` skips the parity run (the checker still runs;
    a TorchScript trace is still compared with torch at a second batch size, see the module doc).
    What the exporters print while a form is written (TorchScript IR of a failing trace, progress
    lines) is captured and shown only with ``verbose`` (default: the ``VITGRAPH_VERBOSE``
    environment variable, set by ``vitgraph --verbose``).
    """
    if verbose is None:
        verbose = os.environ.get(VERBOSE_ENV, "") not in ("", "0")
    inputs = _as_input_tuple(example_inputs)
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    forms = _candidate_forms(opset, exporter)
    rejected: list[str] = []
    with _eval_mode(module):
        reference = _torch_outputs(module, inputs)
        input_names = _io_names("input", len(inputs))
        output_names = _io_names("output", len(reference))
        grown: list[tuple[tuple[torch.Tensor, ...], list[np.ndarray]]] = []  # computed once, on demand
        for i, form in enumerate(forms):
            try:
                with _captured_output(show=verbose):
                    _write_form(form, module, path, inputs, input_names, output_names, dynamic_batch)
                module.eval()  # (exporters restore modes their own way; the references below need eval)
                if simplify:
                    _simplify(path)
                _run_checker(path)
                if dynamic_batch:
                    _check_batch_axis(path, form)
                max_abs, max_rel = float("nan"), float("nan")
                probe = form.exporter == "torchscript" and dynamic_batch
                if check or probe:
                    if dynamic_batch and not grown:
                        grown_inputs = _grow_batch(inputs)
                        grown.append((grown_inputs, _torch_outputs(module, grown_inputs)))
                    cases = ([(inputs, reference)] if check else []) + (grown if dynamic_batch else [])
                    max_abs, max_rel = _check_parity(path, cases, rtol, atol)
                break
            except Exception as error:  # noqa: BLE001 - any failure of a form moves to the next
                reason = f"{type(error).__name__}: {_first_line(error)}"
                rejected.append(f"{form.name}: {reason}")
                if i + 1 < len(forms):
                    warnings.warn(
                        f"ONNX export form {form.name} rejected ({reason}); trying {forms[i + 1].name}",
                        ExportFallbackWarning,
                        stacklevel=2,
                    )
                else:
                    _remove_onnx(path)
                    raise ExportError(
                        f"no ONNX export form worked for {type(module).__name__}: " + " | ".join(rejected)
                    ) from error
    proto = onnx.load(str(path), load_external_data=False)
    actual_opset = _default_opset(proto)
    if actual_opset != form.opset:
        warnings.warn(
            f"requested ONNX opset {form.opset} but the {form.exporter} exporter produced opset "
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
        exporter=form.exporter,
        form=form.name,
        fallbacks=tuple(rejected),
    )


def onnx_op_types(path: str | Path) -> set[str]:
    """Set of ONNX operator types used in the model at ``path`` (subgraphs and functions too)."""
    return _collect_op_types(onnx.load(str(path), load_external_data=False))


def _candidate_forms(opset: int | None, exporter: str | None) -> list[ExportForm]:
    """Forms to try, in order, for an optional opset and exporter request."""
    if exporter is not None and exporter not in _EXPORTERS:
        raise ArgumentError(f"exporter must be one of {_EXPORTERS} or None, got {exporter!r}")
    if opset is None:
        forms = list(DEFAULT_FORMS)
    else:
        forms = [ExportForm("torchscript", opset)] if opset <= _TORCHSCRIPT_MAX_OPSET else []
        forms.append(ExportForm("dynamo", opset))
        if opset < _DYNAMO_NATIVE_OPSET:
            # the dynamo graph is fine at its own opset; export_onnx warns about the change
            forms.append(ExportForm("dynamo", _DYNAMO_NATIVE_OPSET))
    forms = [f for f in forms if exporter is None or f.exporter == exporter]
    if not forms:
        raise ArgumentError(f"the {exporter} exporter cannot write opset {opset}")
    return forms


# ----------------------------------------------------------------------------- inputs / outputs


def _as_input_tuple(example_inputs: tuple[torch.Tensor, ...] | torch.Tensor) -> tuple[torch.Tensor, ...]:
    """Normalise example inputs to a non-empty tuple of tensors."""
    inputs = (example_inputs,) if isinstance(example_inputs, torch.Tensor) else tuple(example_inputs)
    if not inputs:
        raise ArgumentError("export_onnx needs at least one example input tensor")
    for i, x in enumerate(inputs):
        if not isinstance(x, torch.Tensor):
            raise ArgumentTypeError(f"example input {i} is {type(x).__name__}, expected torch.Tensor")
        if x.dim() == 0:
            raise ArgumentError(f"example input {i} is a scalar; a batch axis 0 is required")
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


def _write_form(
    form: ExportForm,
    module: nn.Module,
    path: Path,
    inputs: tuple[torch.Tensor, ...],
    input_names: list[str],
    output_names: list[str],
    dynamic_batch: bool,
) -> None:
    """Write ``module`` to ``path`` in ``form``."""
    export = _export_torchscript if form.exporter == "torchscript" else _export_dynamo
    export(module, path, inputs, input_names, output_names, form.opset, dynamic_batch)


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


class _Positional(nn.Module):
    """Calls the wrapped module with positional inputs only.

    The TorchScript exporter appends every defaulted ``forward`` argument to the inputs and traces
    it as a tensor; a traced timm GraphModule's ``forward(x, attn_mask=None, is_causal=False)``
    then fails (``is_causal must be bool, not Tensor``).
    """

    def __init__(self, module: nn.Module) -> None:
        super().__init__()
        setattr(self, _WRAPPED, module)

    def forward(self, *inputs: torch.Tensor) -> object:
        return getattr(self, _WRAPPED)(*inputs)


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
    wrapper = _Positional(module)
    wrapper.training = module.training  # the exporter restores the wrapper's mode recursively afterwards:
    # a fresh wrapper is in train mode, which would leave module's BatchNorms using batch statistics
    with _quiet_exporters():
        torch.onnx.export(
            wrapper,
            inputs,
            str(path),
            input_names=input_names,
            output_names=output_names,
            opset_version=opset,
            dynamo=False,
            dynamic_axes=dynamic_axes,
            do_constant_folding=True,
        )
    _strip_wrapper_prefix(path)


def _strip_wrapper_prefix(path: Path) -> None:
    """Drop the wrapper from names: initializer 'module.blocks.0.x' -> 'blocks.0.x', node '/module/y' -> '/y'."""
    proto = onnx.load(str(path), load_external_data=False)
    prefix, scope = f"{_WRAPPED}.", f"/{_WRAPPED}/"
    graphs = list(_all_graphs(proto.graph))
    # every value name in the model: a rename onto a name another value already has would rewire
    # its consumers (the exporter's own names, '/Constant_output_0', also live outside the scope)
    taken = {i.name for g in graphs for i in g.initializer}
    taken |= {v.name for g in graphs for v in (*g.input, *g.output, *g.value_info)}
    taken |= {name for g in graphs for node in g.node for name in node.output}
    renames: dict[str, str] = {}
    for name in sorted(taken):
        if name.startswith(prefix):
            new = name[len(prefix):]
        elif name.startswith(scope):
            new = name[len(scope) - 1:]
        else:
            continue
        if new not in taken and new not in renames.values():
            renames[name] = new
    for init in proto.graph.initializer:
        init.name = renames.get(init.name, init.name)
    for graph in graphs:
        for node in graph.node:
            if node.name.startswith(scope):
                node.name = node.name[len(scope) - 1:]
            for field in (node.input, node.output):
                for j, name in enumerate(field):
                    field[j] = renames.get(name, name)
        for value in (*graph.input, *graph.output, *graph.value_info):
            value.name = renames.get(value.name, value.name)
    onnx.save_model(proto, str(path))  # loaded without external data: its references stay as they were


def _all_graphs(graph: onnx.GraphProto) -> Iterator[onnx.GraphProto]:
    """``graph`` and every subgraph nested in its nodes."""
    yield graph
    for node in graph.node:
        for sub in _subgraphs(node):
            yield from _all_graphs(sub)


@contextlib.contextmanager
def _captured_output(show: bool) -> Iterator[None]:
    """Capture what is written to stdout and stderr: Python's streams and the process's file
    descriptors 1 and 2 (the exporters' C++ prints); with ``show`` it is written to stderr after."""
    py = io.StringIO()
    sys.stdout.flush(), sys.stderr.flush()
    with tempfile.TemporaryFile() as sink:
        saved = [os.dup(1), os.dup(2)]
        try:
            os.dup2(sink.fileno(), 1)
            os.dup2(sink.fileno(), 2)
            with contextlib.redirect_stdout(py), contextlib.redirect_stderr(py):
                yield
        finally:
            os.dup2(saved[0], 1)
            os.dup2(saved[1], 2)
            for fd in saved:
                os.close(fd)
            if show:
                sink.seek(0)
                text = py.getvalue() + sink.read().decode(errors="replace")
                if text:
                    sys.stderr.write(text)


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


def _remove_onnx(path: Path) -> None:
    """Delete a rejected file (and its external data) so no unchecked file is left behind."""
    for p in (path, path.with_name(f"{path.name}.data")):
        with contextlib.suppress(FileNotFoundError):
            p.unlink()


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


def _check_batch_axis(path: Path, form: ExportForm) -> None:
    """Reject a file whose inputs have a fixed axis 0 although a dynamic batch was asked for.

    The dynamo exporter falls back to static shapes, silently, when the model specialises on the
    batch size (``float(x.shape[0])``); the file would then only run at the example's batch.
    """
    proto = onnx.load(str(path), load_external_data=False)
    for value in proto.graph.input:
        dims = value.type.tensor_type.shape.dim
        if dims and dims[0].HasField("dim_value"):
            raise ExportError(
                f"the {form.exporter} exporter fixed axis 0 of input {value.name!r} to {dims[0].dim_value} "
                "(the model specialises on the batch size)"
            )


def _ort_session(path: Path):  # noqa: ANN202 - onnxruntime is imported lazily
    """A CPU onnxruntime session for the file at ``path``."""
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.log_severity_level = 4  # a failing run is reported by the ExportError, not by onnxruntime's log
    return ort.InferenceSession(str(path), sess_options=options, providers=["CPUExecutionProvider"])


def _run_ort(session, inputs: Sequence[np.ndarray]) -> list[np.ndarray]:  # noqa: ANN001
    """Run an onnxruntime session on ``inputs`` and return all outputs."""
    feed = {meta.name: x for meta, x in zip(session.get_inputs(), inputs)}
    return list(session.run(None, feed))


def _grow_batch(inputs: tuple[torch.Tensor, ...]) -> tuple[torch.Tensor, ...]:
    """Inputs with one extra sample (a copy of sample 0) to prove axis 0 is really dynamic."""
    return tuple(torch.cat([x, x[:1]], dim=0) for x in inputs)


def _check_parity(
    path: Path,
    cases: Sequence[tuple[tuple[torch.Tensor, ...], list[np.ndarray]]],
    rtol: float,
    atol: float,
) -> tuple[float, float]:
    """Compare onnxruntime (one session) with torch on each (inputs, expected) case."""
    session = _ort_session(path)
    max_abs = max_rel = 0.0
    for case_inputs, expected in cases:
        got = _run_ort(session, [x.detach().cpu().numpy() for x in case_inputs])
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
