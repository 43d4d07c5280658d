"""The fx tracer vitgraph traces with, its guards, and the node.meta keys capture writes."""
from __future__ import annotations

import contextlib
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.fx._symbolic_trace as _fx_trace
from torch import nn

from vitgraph.capture.wrapped import restore_output_structure, through_wrapper



def _timm_registries() -> tuple[set[type], set[Callable]]:
    """timm's registered not-traceable modules and functions (empty without timm).

    Read through timm's public ``get_notrace_modules`` / ``get_notrace_functions`` (present in
    every timm the project supports, 1.0.20 onwards).  Only a timm without them, older than the
    supported range, is read through the private ``timm.layers._fx`` sets they return copies of.
    """
    try:
        import timm.layers as layers
    except ImportError:  # pragma: no cover - timm is a dependency, but keep tracing usable
        return set(), set()
    if hasattr(layers, "get_notrace_modules") and hasattr(layers, "get_notrace_functions"):
        return set(layers.get_notrace_modules()), set(layers.get_notrace_functions())
    from timm.layers import _fx  # pragma: no cover - timm older than the supported range

    return set(getattr(_fx, "_leaf_modules", ())), set(getattr(_fx, "_autowrap_functions", ()))  # pragma: no cover


GROWN_SHAPE_KEY = "vitgraph.grown_shape"  # a node's tensor shape at the example batch + 1
VALUE_KEY = "vitgraph.value"  # node.meta entry: the concrete non-tensor value seen at shape propagation


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
        self._raw_output = None
        with _without_dead_wraps():
            graph = super().trace(root, concrete_args)
        _use_safe_leaves(graph)
        restore_output_structure(graph, self._raw_output)
        return graph

    def create_args_for_root(self, root_fn: Callable, is_module: bool, concrete_args: Any = None) -> Any:
        """fx's placeholders for the root, through a decorator on ``forward`` (see ``wrapped.py``);
        the root's raw return value is kept, so its container type can be restored."""
        fn, args = super().create_args_for_root(through_wrapper(root_fn), is_module, concrete_args)

        def recording(*a: Any, **k: Any) -> Any:
            self._raw_output = fn(*a, **k)
            return self._raw_output

        return recording, args

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


@contextlib.contextmanager
def preserved_state(root: Optional[nn.Module]) -> Iterator[None]:
    """Put every module's attributes back after tracing: a forward may cache values on its
    module (``self.cached = ...``, a cache dict filled in place), and tracing would
    leave proxies in the user's model.

    Empty containers (most of them: a module's hook dicts) are remembered as empty, not copied:
    a deep model has tens of thousands, and copies that live through tracing only feed the
    garbage collector's full collections."""
    saved = []
    for m in root.modules() if root is not None else ():
        d = m.__dict__
        full = [(v, v.copy()) for v in d.values() if isinstance(v, (dict, list)) and v]
        empty = tuple(v for v in d.values() if isinstance(v, (dict, list)) and not v)
        saved.append((m, dict(d), full, empty))
    try:
        yield
    finally:
        for m, attrs, full, empty in saved:
            m.__dict__.clear()
            m.__dict__.update(attrs)
            for obj in empty:
                obj.clear()
            for obj, content in full:
                obj.clear()
                obj.extend(content) if isinstance(obj, list) else obj.update(content)


def keeps_side_effect(node: fx.Node) -> bool:
    """Dead-code elimination must keep in-place ops whose result is unused (``x.add_(pos)``:
    later uses of ``x`` read the mutated tensor) besides fx's own side-effectful calls."""
    if node.op == "call_method" and isinstance(node.target, str) and node.target.endswith("_") \
            and not node.target.startswith("_"):
        return True
    return node.is_impure()
