"""vitgraph's FLOP convention, counted on ATen ops so it does not change with the torch version.

The convention: one multiply-add is 2 FLOPs, and only contractions count.

- ``mm``/``addmm``/``bmm``/``baddbmm`` (hence ``F.linear`` and ``@``): ``2 * prod(out) * k``, the bias
  add of ``addmm`` not counted;
- convolutions: ``2 * prod(out) * prod(weight.shape[1:])`` (``2 * prod(x) * prod(weight.shape[1:])``
  when transposed);
- attention, fused or not: ``2*B*H*L*S*E`` for ``q @ k^T`` plus ``2*B*H*L*S*Ev`` for ``attn @ v``,
  whatever kernel the installed torch dispatches ``scaled_dot_product_attention`` to (flash, the CPU
  flash kernel, memory-efficient, cuDNN or the math decomposition into ``bmm``);
- element-wise ops, softmax, normalisation, reductions, copies: 0.

torch's own ``FlopCounterMode`` registers a different set of attention kernels in different
releases (2.14 does not count the CPU flash kernel), so vitgraph counts with its own table;
``CostModel`` prices graphs by the same rules.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode

__all__ = ["FlopCounter", "attention_flops"]

aten = torch.ops.aten


def attention_flops(q_shape: Any, k_shape: Any, v_shape: Any) -> int:
    """FLOPs of ``softmax(q @ k^T) @ v`` for q ``(*B, L, E)``, k ``(*B, S, E)``, v ``(*B, S, Ev)``."""
    bl = math.prod(q_shape[:-1])
    s, e, ev = k_shape[-2], q_shape[-1], v_shape[-1]
    return 2 * bl * s * e + 2 * bl * s * ev


def _mm(args: tuple, out: Any) -> int:
    a = args[0]
    return 2 * math.prod(out.shape) * a.shape[-1]


def _addmm(args: tuple, out: Any) -> int:
    return 2 * math.prod(out.shape) * args[1].shape[-1]


def _conv(args: tuple, out: Any) -> int:
    x, w = args[0], args[1]
    transposed = bool(args[6]) if len(args) > 6 else False
    reach = math.prod(w.shape[1:])
    return 2 * math.prod(x.shape if transposed else out.shape) * reach


def _sdpa(args: tuple, out: Any) -> int:
    q, k, v = args[0], args[1], args[2]
    return attention_flops(q.shape, k.shape, v.shape)


def _ops(names: tuple[str, ...]) -> list:
    """The overload packets among ``names`` that this torch build has."""
    return [getattr(aten, n) for n in names if hasattr(aten, n)]


_RULES: dict[Any, Callable[[tuple, Any], int]] = {}
for _op in _ops(("mm", "bmm")):
    _RULES[_op] = _mm
for _op in _ops(("addmm", "baddbmm")):
    _RULES[_op] = _addmm
for _op in _ops(("convolution", "_convolution")):
    _RULES[_op] = _conv
for _op in _ops(("_scaled_dot_product_flash_attention", "_scaled_dot_product_flash_attention_for_cpu",
                 "_scaled_dot_product_efficient_attention", "_scaled_dot_product_cudnn_attention",
                 "_scaled_dot_product_fused_attention_overrideable")):
    _RULES[_op] = _sdpa


class FlopCounter(TorchDispatchMode):
    """Counts FLOPs of the ATen ops run inside it by vitgraph's convention (see the module doc).

    ``with FlopCounter() as c: model(x)`` then ``c.total``. Ops that decompose (``linear``,
    ``matmul``, ``scaled_dot_product_attention``) are seen as the kernels they dispatch to, so each
    multiply-add is counted once.
    """

    def __init__(self) -> None:
        super().__init__()
        self.total = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        rule = _RULES.get(func.overloadpacket)
        if rule is not None:
            first = out[0] if isinstance(out, (tuple, list)) else out
            self.total += int(rule(args, first))
        return out
