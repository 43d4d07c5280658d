"""The tracer used to inline opaque calls: proxies that know their shapes.

An opaque call (a timm leaf module, a ``torch.fx.wrap``-ped function) usually is opaque because
its Python code branches on sizes: ``if window_size[0] >= pad_H``, ``if v.device.type != 'meta'``.
Within one analysis those sizes are fixed except the ones that follow the batch.  While tracing
the callee, every proxy here carries two meta tensors: its value at the example batch and at the
example batch + 1.  A size equal in both is a constant the code may branch on; a size that
differs follows the batch and stays symbolic in the graph (so the batch stays dynamic).
"""
from __future__ import annotations

import contextlib
import functools
import operator
from typing import Any, Callable, Iterator, Optional

import torch
import torch.fx as fx
from torch.fx.proxy import Attribute
from torch.nn.utils.stateless import _reparametrize_module
from torch.utils import _pytree as pytree

from vitgraph.capture.tracer import ViTTracer

Pair = Optional[tuple[Any, Any]]  # meta tensors, or plain values (sizes, tuples of both)


class ShapedProxy(fx.Proxy):
    """A proxy with the meta values at two batch sizes (``pair``, None if unknown)."""

    def __init__(self, node: fx.Node, tracer: fx.Tracer) -> None:
        super().__init__(node, tracer)
        self.pair: Pair = None

    @property
    def device(self) -> torch.device:
        return self.tracer.static_device  # one device for the whole model being analysed

    @property
    def _tensors(self) -> bool:
        return self.pair is not None and isinstance(self.pair[0], torch.Tensor)

    @property
    def dtype(self) -> Any:
        if self._tensors and self.tracer.static_dtype:
            return self.pair[0].dtype
        if self._tensors:  # symbolic, but with its value known (a cast to it can be evaluated)
            return self.tracer.create_proxy("call_function", getattr, (self, "dtype"), {})
        return Attribute(self, "dtype")

    @property
    def shape(self) -> Any:
        if not self._tensors:
            return Attribute(self, "shape")
        a, b = self.pair[0].shape, self.pair[1].shape
        if a == b:
            return a
        full = self.tracer.create_proxy("call_function", getattr, (self, "shape"), {})
        return tuple(full[i] if x != y else x for i, (x, y) in enumerate(zip(a, b)))

    @property
    def ndim(self) -> Any:
        return self.pair[0].dim() if self._tensors else Attribute(self, "ndim")

    def size(self, dim: Optional[int] = None) -> Any:
        if not self._tensors:
            return Attribute(self, "size")(*(() if dim is None else (dim,)))
        return self.shape if dim is None else self.shape[dim]

    def dim(self) -> Any:
        return self.pair[0].dim() if self._tensors else Attribute(self, "dim")()

    def __setitem__(self, idx: Any, value: Any) -> None:
        # in-place writes (a shifted-window mask built by ``mask[h0:h1, w0:w1] = k``) are recorded
        # as operator.setitem, which fx keeps as a side effect; the meta values follow the write
        self.tracer.create_proxy("call_function", operator.setitem, (self, idx, value), {})


def _side(v: Any, k: int) -> Any:
    """``v`` with every proxy replaced by its meta value number ``k`` (raises if one is unknown)."""
    if isinstance(v, ShapedProxy):
        if v.pair is None:
            raise LookupError("no meta value")
        return v.pair[k]
    if isinstance(v, fx.Proxy):
        raise LookupError("no meta value")
    if isinstance(v, torch.Tensor) and v.device.type != "meta":
        return v.to("meta")  # a constant the traced code made (a mask): evaluated beside the meta values
    if isinstance(v, (list, tuple)):
        return type(v)(_side(x, k) for x in v) if not hasattr(v, "_fields") else type(v)(*(_side(x, k) for x in v))
    if isinstance(v, dict):
        return {key: _side(x, k) for key, x in v.items()}
    return v


def _on_meta(v: Any) -> Any:
    """``v`` with every device (a ``torch.device``, or the string of a ``device=`` argument) set
    to the meta device: a value computed from meta values stays one when the code moves it to
    the model's device (``x.to(hidden.device)``, ``torch.ones(..., device=x.device)``), where
    copying out of a meta tensor would fail."""
    if isinstance(v, torch.device):
        return torch.device("meta")
    if isinstance(v, dict):
        return {key: torch.device("meta") if key == "device" and isinstance(x, str) else _on_meta(x)
                for key, x in v.items()}
    if isinstance(v, (list, tuple)) and any(isinstance(x, (torch.device, list, tuple, dict)) for x in v):
        return type(v)(_on_meta(x) for x in v) if not hasattr(v, "_fields") else type(v)(*(_on_meta(x) for x in v))
    return v


# torch's tensor constructors whose sizes (or bounds) may follow the batch
_FACTORIES = ("zeros", "ones", "empty", "full", "rand", "randn", "randint", "arange")


@contextlib.contextmanager
def _factories_take_proxies() -> Iterator[None]:
    """While tracing, ``torch.ones(batch, n)`` with a size that follows the batch (a proxy) is
    recorded as a call: torch's own argument parser rejects a proxy among the sizes with a
    ``TypeError``.  Calls without proxies run as before (constants the code makes)."""
    originals = {name: getattr(torch, name) for name in _FACTORIES}

    def taking_proxies(fn: Callable) -> Callable:
        @functools.wraps(fn)
        def call(*args: Any, **kwargs: Any) -> Any:
            proxy = next((p for p in pytree.tree_leaves((args, kwargs)) if isinstance(p, fx.Proxy)), None)
            if proxy is None:
                return fn(*args, **kwargs)
            return proxy.tracer.create_proxy("call_function", fn, args, kwargs)

        return call

    try:
        for name, fn in originals.items():
            setattr(torch, name, taking_proxies(fn))
        yield
    finally:
        for name, fn in originals.items():
            setattr(torch, name, fn)


class InlineTracer(ViTTracer):
    """Traces a callee with every proxy's meta values computed alongside (see module doc)."""

    def trace(self, root: Any, concrete_args: Optional[dict[str, Any]] = None) -> fx.Graph:
        """fx tracing with torch's constructors taking sizes that follow the batch."""
        with _factories_take_proxies():
            return super().trace(root, concrete_args)

    def __init__(self, honour_timm: bool = False) -> None:
        super().__init__(honour_timm)
        self.inputs: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # placeholder -> meta pair
        self.static_device = torch.device("cpu")
        self._evaluating = False
        self.static_dtype = True  # False: ``x.dtype`` stays symbolic (see LooseInlineTracer)

    def proxy(self, node: fx.Node) -> fx.Proxy:
        return ShapedProxy(node, self)

    def create_proxy(self, kind: str, target: Any, args: tuple, kwargs: dict, name: Optional[str] = None,
                     type_expr: Any = None, proxy_factory_fn: Any = None) -> fx.Proxy:
        p = super().create_proxy(kind, target, args, kwargs, name, type_expr, proxy_factory_fn)
        if isinstance(p, ShapedProxy):
            try:
                p.pair = self._values(kind, target, args, kwargs)
            except Exception:  # noqa: BLE001 - unknown value: the proxy behaves like a plain one
                p.pair = None
        return p

    def _values(self, kind: str, target: Any, args: tuple, kwargs: dict) -> Pair:
        if kind == "placeholder":  # an input, or a root argument fixed to its default (args: the default)
            pair = self.inputs.get(target)
            return pair if pair is not None or not args or not _plain(args[0]) else (args[0], args[0])
        if kind == "get_attr":
            t = _lookup(self.root, target)
            m = t.to("meta") if isinstance(t, torch.Tensor) else None
            return (m, m) if m is not None else None
        out = []
        self._evaluating = True  # module calls and attribute reads run for real, recording nothing
        try:
            for k in (0, 1):
                out.append(self._evaluate(kind, target, args, kwargs, k))
        finally:
            self._evaluating = False
        return out[0], out[1]

    def getattr(self, attr: str, attr_val: Any, parameter_proxy_cache: dict[str, Any]) -> Any:
        return attr_val if self._evaluating else super().getattr(attr, attr_val, parameter_proxy_cache)

    def call_module(self, m: torch.nn.Module, forward: Any, args: tuple, kwargs: dict) -> Any:
        return forward(*args, **kwargs) if self._evaluating else super().call_module(m, forward, args, kwargs)

    def _evaluate(self, kind: str, target: Any, args: tuple, kwargs: dict, k: int) -> Any:
        """The value of one call with meta value number ``k`` of every proxy argument."""
        a, kw = _on_meta(_side(args, k)), _on_meta(_side(kwargs, k))
        with torch.no_grad():
            if kind == "call_function":
                return target(*a, **kw)
            if kind == "call_method":
                if target in ("cpu", "cuda") and isinstance(a[0], torch.Tensor) and a[0].device.type == "meta":
                    return a[0]  # (a move to the model's device: the value stays a meta tensor)
                return getattr(a[0], target)(*a[1:], **kw)
            if kind == "call_module":
                mod = _lookup_module(self.root, target)
                state = {n: v.to("meta") for n, v in list(mod.named_parameters()) + list(mod.named_buffers())}
                with _reparametrize_module(mod, state):
                    return mod(*a, **kw)
        raise LookupError(kind)

    def to_bool(self, obj: fx.Proxy) -> bool:
        """A condition on plain values that are the same at both batch sizes is a constant."""
        if isinstance(obj, ShapedProxy) and obj.pair is not None and _plain(obj.pair[0]) and obj.pair[0] == obj.pair[1]:
            return bool(obj.pair[0])
        return super().to_bool(obj)

    def iter(self, obj: fx.Proxy) -> Any:
        """Unpacking a tuple result of known length (``x, grid = wrapped(...)``)."""
        if isinstance(obj, ShapedProxy) and obj.pair is not None and isinstance(obj.pair[0], (tuple, list)):
            return iter([obj[i] for i in range(len(obj.pair[0]))])
        return super().iter(obj)


def _lookup_module(root: torch.nn.Module, target: str) -> torch.nn.Module:
    """``root.<target>`` for a submodule path, read from the module dicts (``getattr`` is
    patched while tracing and would record another get_attr)."""
    mod = root
    for part in target.split(".") if target else ():
        mod = mod._modules[part]
    return mod


def _lookup(root: torch.nn.Module, target: str) -> Any:
    """``root.<target>`` for a parameter, buffer or plain attribute, read from the module dicts."""
    path, _, name = target.rpartition(".")
    mod = _lookup_module(root, path)
    for store in (mod._parameters, mod._buffers, mod.__dict__):
        if name in store:
            return store[name]
    raise LookupError(target)


def _plain(v: Any) -> bool:
    return isinstance(v, (bool, int, float, str, type(None))) or (
        isinstance(v, (tuple, list)) and all(_plain(x) for x in v))


class LooseInlineTracer(InlineTracer):
    """The second try: ``dtype`` stays a proxy, so a tensor the callee builds and casts to an
    input's dtype (``torch.zeros(...).to(dtype=w.dtype)``) is a graph value rather than a
    constant that a method call with a symbolic size (``.expand(B, ...)``) cannot take."""

    def __init__(self, honour_timm: bool = False) -> None:
        super().__init__(honour_timm)
        self.static_dtype = False
