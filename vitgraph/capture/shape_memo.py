"""Memo for shape propagation on the meta device.

A transformer repeats one block many times, so shape propagation calls the same pure op (a
torch function, a tensor method, a built-in ``torch.nn`` layer) on inputs of the same metadata
again and again; torch's meta kernels are Python decompositions and cost far more than the
lookup.  A call is looked up by its op and the metadata of its arguments (shape, stride, storage
offset, dtype, ``requires_grad`` of each tensor; the exact value and type of everything else) and
answered with fresh meta tensors of the recorded metadata (or, where the op returned one of its
arguments, as ``nn.Identity`` does, with that argument again).

Nothing that could have an effect is memoised: in-place ops and methods (``add_``, ``setitem``,
``inplace=True``, ``out=``), modules with hooks or submodules, anything outside torch and the
operator module, results that hold one of their inputs inside a container, views (whose storage
is an input's: a fresh tensor would not share it), and any argument or result of a kind it does
not know (then the call simply runs).
"""
from __future__ import annotations

import inspect
import math
import operator
from typing import Any, Callable, Optional

import torch
from torch import nn
from torch.fx.immutable_collections import immutable_dict, immutable_list

_PLAIN = frozenset({int, bool, str, type(None), torch.dtype, torch.device, torch.memory_format, torch.layout,
                    type(Ellipsis)})
_INPLACE_OPERATORS = frozenset({
    operator.setitem, operator.delitem, operator.iadd, operator.iand, operator.iconcat, operator.ifloordiv,
    operator.ilshift, operator.imod, operator.imul, operator.imatmul, operator.ior, operator.ipow, operator.irshift,
    operator.isub, operator.itruediv, operator.ixor,
})
_BUILTINS = frozenset({getattr, len})
_NO_INPLACE_ARG = -1


class _Unkeyable(Exception):
    """An argument or result the memo does not describe exactly: the call is run."""


def _key(v: Any) -> Any:
    t = type(v)
    if t in _PLAIN:
        return (t, v)
    if t is float:
        return (t, v.hex() if math.isfinite(v) else repr(v))  # (-0.0 and 0.0 apart)
    if isinstance(v, torch.Tensor):
        if v.device.type != "meta" or v.layout != torch.strided or v.is_complex():
            raise _Unkeyable
        return (t, tuple(v.shape), v.stride(), v.storage_offset(), v.dtype, v.requires_grad)
    if t is tuple or t is list or t is torch.Size or t is immutable_list:
        return (t, tuple(_key(x) for x in v))
    if t is slice:
        return (t, _key(v.start), _key(v.stop), _key(v.step))
    if t is dict or t is immutable_dict:
        return (t, tuple((k, _key(x)) for k, x in v.items()))
    if t is set or t is frozenset:
        return (t, frozenset(_key(x) for x in v))
    raise _Unkeyable


_TENSOR, _VALUE, _ARG = object(), object(), object()


def _template(v: Any) -> Any:
    t = type(v)
    if t is torch.Tensor:
        if v.device.type != "meta" or v.layout != torch.strided or v.storage_offset() != 0 or v.is_complex():
            raise _Unkeyable
        return (_TENSOR, tuple(v.shape), v.stride(), v.dtype, v.requires_grad)
    if t in _PLAIN or t is float or t is torch.Size:
        return (_VALUE, v)
    if t is tuple or t is list:
        return (t, tuple(_template(x) for x in v))
    raise _Unkeyable


def _build(tp: Any) -> Any:
    kind = tp[0]
    if kind is _TENSOR:
        return torch.empty_strided(tp[1], tp[2], dtype=tp[3], device="meta", requires_grad=tp[4])
    if kind is _VALUE:
        return tp[1]
    return kind(_build(x) for x in tp[1])


def _tensors(v: Any, out: list) -> list:
    if isinstance(v, torch.Tensor):
        out.append(v)
    elif isinstance(v, (tuple, list)):
        for x in v:
            _tensors(x, out)
    elif isinstance(v, dict):
        for x in v.values():
            _tensors(x, out)
    return out


_inplace_index: dict[Any, int] = {}


def _inplace_arg(fn: Callable) -> int:
    """Position of ``fn``'s ``inplace`` parameter, or ``_NO_INPLACE_ARG``.  (torch's C functions
    have no signature to read and no such parameter: their in-place forms end in ``_``.)"""
    try:
        return _inplace_index[fn]
    except (KeyError, TypeError):
        pass
    try:
        names = list(inspect.signature(fn).parameters)
    except (TypeError, ValueError):
        names = []
    i = names.index("inplace") if "inplace" in names else _NO_INPLACE_ARG
    try:
        _inplace_index[fn] = i
    except TypeError:
        pass
    return i


def _pure_function(target: Any, args: tuple, kwargs: dict) -> bool:
    if "out" in kwargs or kwargs.get("inplace") or isinstance(target, torch._ops.OpOverload) \
            or isinstance(target, torch._ops.OpOverloadPacket):
        return False
    try:
        if target in _INPLACE_OPERATORS:
            return False
        if target in _BUILTINS:
            return True
    except TypeError:  # (an unhashable callable)
        return False
    name = getattr(target, "__name__", "")
    mod = getattr(target, "__module__", None) or ""
    if not isinstance(name, str) or name.endswith("_") or name.startswith("__"):
        return False
    if mod in ("_operator", "operator", "math"):
        return True
    if not (mod == "torch" or mod.startswith("torch.")):
        return False
    i = _inplace_arg(target)
    return i == _NO_INPLACE_ARG or len(args) <= i or args[i] is False


def _pure_method(target: Any, args: tuple, kwargs: dict) -> bool:
    return (isinstance(target, str) and not target.startswith("_") and not target.endswith("_")
            and bool(args) and type(args[0]) is torch.Tensor and "out" not in kwargs)


def _global_hooks() -> bool:
    import torch.nn.modules.module as m

    return any(getattr(m, h, None) for h in (
        "_global_forward_hooks", "_global_forward_pre_hooks", "_global_forward_hooks_with_kwargs",
        "_global_forward_hooks_always_called", "_global_backward_hooks", "_global_backward_pre_hooks"))


def _state_key(p: Optional[torch.Tensor]) -> Any:
    """A parameter or buffer as the meta copy ``functional_call`` runs the layer with."""
    if p is None:
        return None
    if p.layout != torch.strided or p.is_complex() or not p.is_contiguous():
        raise _Unkeyable
    return (type(p), tuple(p.shape), p.stride(), p.dtype, p.requires_grad)


def _module_key(mod: nn.Module) -> Any:
    """What a built-in ``torch.nn`` layer's output metadata can depend on, or ``_Unkeyable``."""
    cls = type(mod)
    if not cls.__module__.startswith("torch.nn.modules.") or mod._modules or "forward" in mod.__dict__ \
            or getattr(mod, "inplace", False):
        raise _Unkeyable
    attrs = []
    for k, v in mod.__dict__.items():
        if k in ("_parameters", "_buffers"):
            attrs.append((k, tuple((n, _state_key(p)) for n, p in v.items())))
        elif k == "_modules":
            continue
        elif isinstance(v, dict):
            if v:  # (hooks)
                raise _Unkeyable
        else:
            attrs.append((k, _key(v)))
    return (cls, tuple(attrs))


class ShapeMemo:
    """Results of pure calls by op and argument metadata, for one propagation run."""

    def __init__(self) -> None:
        self.table: dict[Any, Any] = {}
        self.hooks = _global_hooks()

    def run(self, op: str, target: Any, args: tuple, kwargs: dict, call: Callable[[], Any],
            module: Optional[nn.Module] = None) -> Any:
        """``call()``, or a fresh copy of the result it gave for the same op and argument metadata."""
        try:
            if op == "call_function":
                pure = _pure_function(target, args, kwargs)
                who = target
            elif op == "call_method":
                pure = _pure_method(target, args, kwargs)
                who = target
            else:
                pure = not self.hooks
                who = _module_key(module) if pure else None
            key = (op, who, _key(args), _key(kwargs)) if pure else None
            hash(key)
        except (_Unkeyable, TypeError):
            key = None
        if key is None:
            return call()
        hit = self.table.get(key)
        if hit is not None:
            return args[hit[1]] if hit[0] is _ARG else _build(hit)
        result = call()
        same = next((i for i, a in enumerate(args) if a is result and isinstance(a, torch.Tensor)), None)
        if same is not None:  # (an op that returns its input, as nn.Identity: the input again)
            self.table[key] = (_ARG, same)
            return result
        ins = {id(t) for t in _tensors((args, kwargs), [])}
        outs = _tensors(result, [])
        # (a result that holds an input, or a view that shares an input's storage: not memoised)
        if not any(id(t) in ins or t._base is not None for t in outs):
            try:
                self.table[key] = _template(result)
            except _Unkeyable:
                pass
        return result
