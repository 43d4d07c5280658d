"""Tracing a model to a torch.fx GraphModule annotated with tensor shapes."""
from __future__ import annotations

import functools
import linecache
import traceback
from typing import Any, Callable, Optional, Sequence

import torch
import torch.fx as fx
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from vitgraph.capture.inline_tracer import InlineTracer, LooseInlineTracer
from vitgraph.capture.inlining import inline_opaque
from vitgraph.capture.lowering import lower
from vitgraph.capture.tracer import _SAFE_LEAVES, GROWN_SHAPE_KEY, VALUE_KEY, ViTTracer, preserved_state
from vitgraph.capture.shape_memo import ShapeMemo
from vitgraph.errors import TraceError


def _user_frame(exc: BaseException) -> str:
    """'file:line: code' of the deepest frame outside torch.fx, where tracing broke."""
    frames = [f for f in traceback.extract_tb(exc.__traceback__) if "/torch/fx/" not in f.filename]
    if not frames:
        return "unknown location"
    f = frames[-1]
    code = (f.line or linecache.getline(f.filename, f.lineno)).strip()
    return f"{f.filename}:{f.lineno}: {code}"


def _defaults_beyond(model: nn.Module, n_inputs: int) -> dict[str, Any]:
    """Defaults of the ``forward`` arguments the example inputs do not give (``mask=None``,
    flags): the model is called without them, so they are traced as those constants."""
    import inspect

    try:
        params = list(inspect.signature(model.forward).parameters.values())
    except (TypeError, ValueError):
        return {}
    out = {}
    for p in params[n_inputs:]:
        if p.kind in (p.VAR_POSITIONAL, p.VAR_KEYWORD) or p.default is p.empty:
            continue
        out[p.name] = p.default
    return out


def _trace_once(model: nn.Module, honour_timm: bool, n_inputs: int = 1,
                shaped: Optional[Sequence[torch.Tensor]] = None, tracer_cls: type = ViTTracer) -> fx.GraphModule:
    """One symbolic trace of ``model``.  With ``shaped`` (the example inputs) the tracer is a
    meta-value tracer (``inline_tracer``): every proxy carries the values at the example batch
    and the batch + 1, so the model's own Python control flow on static sizes, dtypes and
    channel counts (``if num_channels != self.num_channels``) is followed."""
    tracer = tracer_cls(honour_timm)
    if shaped is not None:
        tracer.inputs = _input_pairs(model, shaped)
        p = next(iter(model.parameters()), None)
        tracer.static_device = p.device if p is not None else torch.device("cpu")
    try:
        with preserved_state(model):  # (the GraphModule takes the constants tracing put on model)
            graph = tracer.trace(model, concrete_args=_defaults_beyond(model, n_inputs) or None)
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # noqa: BLE001 - every tracing failure becomes one typed error
        where = tracer.failed_in or "<root>"
        mod = model.get_submodule(where) if where not in ("", "<root>") else model
        err = TraceError(
            f"cannot trace module '{where or '<root>'}' ({type(mod).__name__}): "
            f"{type(e).__name__}: {e} -- at {_user_frame(e)}"
        )
        err.module = where if where not in ("", "<root>") else None  # the failing submodule's path
        raise err from e


def _input_pairs(model: nn.Module, inputs: Sequence[torch.Tensor]) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """Meta values of each example input at its batch and at the batch + 1, by the name of the
    ``forward`` argument it binds to."""
    import inspect

    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    names = [p.name for p in inspect.signature(model.forward).parameters.values() if p.kind in kinds]
    out = {}
    for name, t in zip(names, inputs):
        grown = (t.shape[0] + 1, *t.shape[1:]) if t.dim() else ()
        out[name] = (torch.empty(t.shape, dtype=t.dtype, device="meta"), torch.empty(grown, dtype=t.dtype, device="meta"))
    return out


# how the graph was captured, tried in this order (``Analysis.front_end`` says which one worked)
FRONT_ENDS = ("symbolic", "symbolic, timm's not-traceable modules opaque", "meta-value proxies",
              "meta-value proxies, dtypes symbolic", "symbolic, failing submodules traced with meta values")
FRONT_END_KEY = "vitgraph.front_end"
MAX_OPAQUE_SUBMODULES = 16  # submodules the last front end may set aside before it gives up
SET_ASIDE_KEY = "vitgraph.set_aside"  # gm.meta: the submodules the last front end kept opaque


def _with_leaves(paths: frozenset[str]) -> type:
    """A tracer that keeps the submodules at ``paths`` opaque (``trace`` inlines them afterwards
    with the meta values shape propagation gives their inputs)."""

    class SubmoduleLeaves(ViTTracer):
        def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
            return qualname in paths or super().is_leaf_module(m, qualname)

    return SubmoduleLeaves


def _trace_setting_aside(model: nn.Module, n: int) -> fx.GraphModule:
    """Symbolic tracing in which each submodule that fails is kept opaque and tracing retried:
    the meta-value fallback at the module where it is needed (whose Python control flow reads
    static values the proxies of the whole model cannot carry), not only at the root."""
    paths: frozenset[str] = frozenset()
    while True:
        try:
            gm = _trace_once(model, honour_timm=False, n_inputs=n, tracer_cls=_with_leaves(paths))
            gm.meta[SET_ASIDE_KEY] = paths
            return gm
        except TraceError as e:
            where = getattr(e, "module", None)
            if not where or where in paths or len(paths) >= MAX_OPAQUE_SUBMODULES:
                raise
            paths = paths | {where}


def _capture(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    n = len(example_inputs)
    tries = ((False, None, ViTTracer), (True, None, ViTTracer), (False, example_inputs, InlineTracer),
             (False, example_inputs, LooseInlineTracer), None)
    failures: list[tuple[str, TraceError]] = []
    for name, how in zip(FRONT_ENDS, tries):
        try:
            if how is None:
                gm = _trace_setting_aside(model, n)
            else:
                honour, shaped, cls = how
                gm = _trace_once(model, honour_timm=honour, n_inputs=n, shaped=shaped, tracer_cls=cls)
        except TraceError as e:
            failures.append((name, e))
            continue
        gm.meta[FRONT_END_KEY] = name
        if failures:
            gm.meta["vitgraph.first_failure"] = str(failures[0][1])
        return gm
    (first_name, first), (last_name, last) = failures[0], failures[-1]
    raise TraceError(f"{first} [front end: {first_name}; the last one tried, {last_name}, failed with: {last}]") from first


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor],
          known: Optional[Callable[[fx.GraphModule, fx.Node], bool]] = None) -> fx.GraphModule:
    """Trace ``model`` and annotate every node with its tensor metadata (``node.meta['tensor_meta']``).

    ``known(gm, node)`` says whether the analysis knows an op's channel semantics (its op
    registry); opaque calls it does not know are inlined where their code allows.  Without it
    every opaque call is tried.

    Tracing first goes through every module; if that fails it retries with timm's registered
    leaf modules and wrapped functions kept opaque (their channels are then frozen by the
    analysis), then with proxies that carry meta values (the model's control flow on static
    sizes and dtypes is followed, as transformers' models need); it raises :class:`TraceError`
    with the first failure, naming the module and source line, if every front end fails.
    ``gm.meta[FRONT_END_KEY]`` names the one that worked (see :data:`FRONT_ENDS`).
    """
    is_opaque = functools.partial(_is_opaque, known=known)
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        gm = _capture(model, example_inputs)
        gm.meta["vitgraph.honour_timm"] = False
        lower(gm)
        _propagate_shapes(gm, example_inputs)
        for _ in range(4):  # an inlined call's nodes get shapes before the calls they feed are tried
            if not (any(is_opaque(n) for n in gm.graph.nodes) and _probe_batch_values(gm, example_inputs)
                    and inline_opaque(gm, is_opaque)):
                break
            lower(gm)
            _propagate_shapes(gm, example_inputs)
        aside, first = gm.meta.pop(SET_ASIDE_KEY, ()), gm.meta.pop("vitgraph.first_failure", "")
        left = sorted({str(n.target) for n in gm.graph.nodes if n.op == "call_module" and n.target in aside})
        if left:  # set aside, but not traceable with meta values either (data-dependent control flow)
            raise TraceError(f"{first} [set aside and traced with meta values, {', '.join(left)} still cannot be traced]")
    finally:
        for m, t in was_training.items():
            m.training = t
    gm.training = model.training  # (GraphModule copied the flag while the model was in eval mode)
    return gm


def _propagate_shapes(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> None:
    with torch.no_grad():
        try:
            MetaShapeProp(gm).run(*(t.to("meta") for t in example_inputs))
        except Exception:  # noqa: BLE001 - an op without a meta kernel: run it for real
            try:
                RealShapeProp(gm).run(*example_inputs)
            except Exception as e:  # noqa: BLE001
                shapes = [list(t.shape) for t in example_inputs]
                raise TraceError(f"traced graph does not run on the example inputs (shapes {shapes}): "
                                 f"{type(e).__name__}: {e}") from e


def _probe_batch_values(gm: fx.GraphModule, example_inputs: Sequence[torch.Tensor]) -> bool:
    """Drop the recorded values that change with the batch size: only values that are the same
    at batch n and n + 1 (spatial sizes, window shapes) may be fixed when inlining."""
    first = {n: n.meta[VALUE_KEY] for n in gm.graph.nodes if VALUE_KEY in n.meta}
    grown = [torch.cat([t, t[:1]]) if t.dim() > 0 else t for t in example_inputs]
    try:
        with torch.no_grad():
            try:
                MetaShapeProp(gm).run(*(t.to("meta") for t in grown))
            except Exception:  # noqa: BLE001 - an op without a meta kernel: run it for real
                RealShapeProp(gm).run(*grown)
    except Exception:  # noqa: BLE001
        for n in first:
            n.meta.pop(VALUE_KEY, None)
        return False
    stable = {n for n, v in first.items() if n.meta.get(VALUE_KEY) == v}
    for n in gm.graph.nodes:  # tensor shapes at the grown batch, before they are put back
        s1 = getattr(n.meta.get("tensor_meta"), "shape", None)
        if s1 is not None:
            n.meta[GROWN_SHAPE_KEY] = tuple(s1)
    _propagate_shapes(gm, example_inputs)  # tensor metadata back at the example batch
    for n in gm.graph.nodes:
        if n not in stable:
            n.meta.pop(VALUE_KEY, None)
    return True


def _is_opaque(node: fx.Node, known: Optional[Callable[[fx.GraphModule, fx.Node], bool]]) -> bool:
    """A call the tracer did not enter (a leaf module or a wrapped function) that ``known`` does not know."""
    gm = node.graph.owning_module
    if node.op == "call_module":
        mod = gm.get_submodule(node.target)
        if type(mod).__module__.startswith("torch."):
            return False
    elif node.op == "call_function":
        if node.target in _SAFE_LEAVES.values():
            return False
        mod_name = getattr(node.target, "__module__", None)
        if mod_name in (None, "_operator", "operator", "builtins", "math", "torch") or mod_name.startswith("torch."):
            return False  # (torchvision's wrapped functions are not torch's own: they may be inlined)
    else:
        return False
    return known is None or not known(gm, node)


def _record(n: fx.Node, result: Any) -> None:
    meta = _tensor_meta(result)
    if meta is not None:
        n.meta["tensor_meta"] = meta
    elif _is_plain(result):
        n.meta[VALUE_KEY] = result


def _is_plain(v: Any) -> bool:
    if isinstance(v, (list, tuple)):
        return all(_is_plain(x) for x in v)
    return v is None or isinstance(v, (int, float, bool, str, torch.Size))


class RealShapeProp(fx.Interpreter):
    """Shape propagation by running the graph (for ops without meta kernels)."""

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result)
        return result


class MetaShapeProp(fx.Interpreter):
    """Shape propagation on the meta device: no data is computed, parameters are not copied.
    A pure call that repeats one already made on inputs of the same metadata (the same layer
    in every block) is answered from a memo (see :mod:`vitgraph.capture.shape_memo`)."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._memo = ShapeMemo()

    def run_node(self, n: fx.Node) -> Any:
        result = super().run_node(n)
        _record(n, result)
        return result

    def fetch_attr(self, target: str) -> Any:
        t = super().fetch_attr(target)
        return t.to("meta") if isinstance(t, torch.Tensor) else t

    def call_function(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._memo.run("call_function", target, args, kwargs,
                              lambda: fx.Interpreter.call_function(self, target, args, kwargs))

    def call_method(self, target: Any, args: tuple, kwargs: dict) -> Any:
        return self._memo.run("call_method", target, args, kwargs,
                              lambda: fx.Interpreter.call_method(self, target, args, kwargs))

    def call_module(self, target: str, args: tuple, kwargs: dict) -> Any:
        mod = self.fetch_attr(target)

        def call() -> Any:
            state = {k: v.to("meta") for k, v in list(mod.named_parameters()) + list(mod.named_buffers())}
            return torch.func.functional_call(mod, state, args, kwargs)

        return self._memo.run("call_module", target, args, kwargs, call, module=mod)


def _tensor_meta(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return _extract_tensor_metadata(v)
    if isinstance(v, (list, tuple)) and v and any(isinstance(x, torch.Tensor) for x in v):
        return tuple(_extract_tensor_metadata(x) if isinstance(x, torch.Tensor) else None for x in v)
    return None
