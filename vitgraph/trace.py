"""Tracing a model to a torch.fx GraphModule annotated with tensor shapes."""
from __future__ import annotations

import contextlib
import linecache
import traceback
from typing import Any, Callable, Iterator, Optional, Sequence

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _fx_trace
from torch import nn
from torch.fx.passes.shape_prop import _extract_tensor_metadata

from .lowering import VALUE_KEY, inline_opaque, lower, preserved_state
from .shape_memo import ShapeMemo
from .errors import TraceError


def _timm_registries() -> tuple[set[type], set[Callable]]:
    """timm's registered not-traceable modules and functions (empty without timm)."""
    try:
        from timm.layers import _fx
    except ImportError:  # pragma: no cover - timm is a dependency, but keep tracing usable
        return set(), set()
    return set(getattr(_fx, "_leaf_modules", ())), set(getattr(_fx, "_autowrap_functions", ()))


GROWN_SHAPE_KEY = "vitgraph.grown_shape"  # a node's tensor shape at the example batch + 1


def assert_is_none(value: Any, msg: str) -> None:
    """The guard on an argument traced as ``None`` (fx's ``_assert_is_none``), as a leaf that
    records itself when called on a Proxy, so re-tracing a graph that holds it needs no entry
    in fx's table of wrapped functions.

    fx's own ``_assert_is_none`` is registered with ``torch.fx.wrap`` and printed in generated
    code under its dotted name.  Re-tracing such a graph (``torch.load`` of a pickled
    GraphModule re-traces its code; so does ``symbolic_trace`` of a GraphModule) marks the node
    ``is_wrapped``, and the recompiled code then runs
    ``wrap("torch.fx._symbolic_trace._assert_is_none")``: an entry keyed by a dotted name that no
    globals dict holds, so every later trace in the process fails with a ``KeyError``.
    """
    if isinstance(value, fx.Proxy):
        return value.tracer.create_proxy("call_function", assert_is_none, (value, msg), {})
    if value is not None:
        raise AssertionError(msg)
    return None


# torch functions fx wraps that tracing itself puts in graphs, and the leaves that replace them
_SAFE_LEAVES: dict[Callable, Callable] = {_fx_trace._assert_is_none: assert_is_none}


def _use_safe_leaves(graph: fx.Graph) -> None:
    for n in graph.nodes:
        if n.op != "call_function":
            continue
        for fx_fn, leaf in _SAFE_LEAVES.items():  # (by identity; fx's patched wrapper of it too)
            if n.target is fx_fn or getattr(n.target, "__wrapped__", None) is fx_fn:
                n.target = leaf
                n.meta.pop("is_wrapped", None)


@contextlib.contextmanager
def _without_dead_wraps() -> Iterator[None]:
    """Trace with fx's wrapped-function table minus the entries that cannot be patched.

    An entry whose name is neither in its globals nor a builtin makes every trace fail with a
    ``KeyError`` (see :func:`assert_is_none`; loading a GraphModule pickled by another tool or an
    older vitgraph adds them).  They are set aside while vitgraph traces and put back after, so
    fx's table is left as it was found.
    """
    import builtins

    table = _fx_trace._wrapped_fns_to_patch
    dead = {k: d for k, d in list(table.items()) if k[1] not in d and not hasattr(builtins, k[1])}
    for k in dead:
        del table[k]
    try:
        yield
    finally:
        for k, d in dead.items():
            table.setdefault(k, d)


class ViTTracer(fx.Tracer):
    """fx tracer that records which module is being traced, so errors can name it.

    With ``honour_timm`` the modules and functions that timm registers as not traceable stay
    opaque (leaf modules / wrapped calls); otherwise every Python module is traced through.
    """

    def __init__(self, honour_timm: bool = False) -> None:
        leaves, funcs = _timm_registries() if honour_timm else (set(), set())
        super().__init__(autowrap_functions=tuple(funcs))
        self._leaf_types = tuple(leaves)
        self.module_path: list[str] = []
        self.failed_in: Optional[str] = None

    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        """fx tracing, immune to dead entries in fx's wrapped-function table; fx's own guard
        functions in the result are replaced by leaves that re-trace safely."""
        with _without_dead_wraps():
            graph = super().trace(root, concrete_args)
        _use_safe_leaves(graph)
        return graph

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        """Parameters and buffers become get_attr nodes (found by identity in O(1), not by a scan)."""
        if not isinstance(attr_val, torch.Tensor):
            return attr_val
        if getattr(self, "_names_root", None) is not self.root:
            names: dict[int, str] = {}
            for n, p in self.root.named_parameters():
                names.setdefault(id(p), n)
            if self.proxy_buffer_attributes:
                for n, b in self.root.named_buffers():
                    names.setdefault(id(b), n)
            self._names, self._names_root = names, self.root
        n = self._names.get(id(attr_val))
        if n is None:
            return attr_val
        if n not in parameter_proxy_cache:
            parameter_proxy_cache[n] = self.create_proxy("get_attr", n, (), {})
        return parameter_proxy_cache[n]

    def is_leaf_module(self, m: nn.Module, qualname: str) -> bool:
        if self._leaf_types and isinstance(m, self._leaf_types):
            return True
        return super().is_leaf_module(m, qualname)

    def call_module(self, m: nn.Module, forward: Callable, args: tuple, kwargs: dict) -> Any:
        self.module_path.append(self.path_of_module(m))
        try:
            return super().call_module(m, forward, args, kwargs)
        except Exception:
            if self.failed_in is None:
                self.failed_in = self.module_path[-1]  # the innermost module, recorded once
            raise
        finally:
            self.module_path.pop()


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


def _trace_once(model: nn.Module, honour_timm: bool, n_inputs: int = 1) -> fx.GraphModule:
    tracer = ViTTracer(honour_timm)
    try:
        with preserved_state(model):  # (the GraphModule takes the constants tracing put on model)
            graph = tracer.trace(model, concrete_args=_defaults_beyond(model, n_inputs) or None)
            return fx.GraphModule(tracer.root, graph, type(model).__name__)
    except Exception as e:  # noqa: BLE001 - every tracing failure becomes one typed error
        where = tracer.failed_in or "<root>"
        mod = model.get_submodule(where) if where not in ("", "<root>") else model
        raise TraceError(
            f"cannot trace module '{where or '<root>'}' ({type(mod).__name__}): "
            f"{type(e).__name__}: {e} -- at {_user_frame(e)}"
        ) from e


def trace(model: nn.Module, example_inputs: Sequence[torch.Tensor]) -> fx.GraphModule:
    """Trace ``model`` and annotate every node with its tensor metadata (``node.meta['tensor_meta']``).

    Tracing first goes through every module; if that fails it retries with timm's registered
    leaf modules and wrapped functions kept opaque (their channels are then frozen by the
    analysis), and raises :class:`TraceError` naming the module and source line if both fail.
    """
    was_training = {m: m.training for m in model.modules()}
    model.eval()
    try:
        try:
            gm = _trace_once(model, honour_timm=False, n_inputs=len(example_inputs))
        except TraceError as first:
            try:
                gm = _trace_once(model, honour_timm=True, n_inputs=len(example_inputs))
            except TraceError:
                raise first from None
        gm.meta["vitgraph.honour_timm"] = False
        lower(gm)
        _propagate_shapes(gm, example_inputs)
        for _ in range(4):  # an inlined call's nodes get shapes before the calls they feed are tried
            if not (any(_is_opaque(n) for n in gm.graph.nodes) and _probe_batch_values(gm, example_inputs)
                    and inline_opaque(gm, _is_opaque)):
                break
            lower(gm)
            _propagate_shapes(gm, example_inputs)
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
            MetaShapeProp(gm).run(*(t.to("meta") for t in grown))
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


def _is_opaque(node: fx.Node) -> bool:
    """A call the tracer did not enter (a leaf module or a wrapped function) with no op rule."""
    from .rules import lookup_rule

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
    return lookup_rule(gm, node) is None


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
    in every block) is answered from a memo (see :mod:`vitgraph.shape_memo`)."""

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
