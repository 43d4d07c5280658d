"""The op registry: everything vitgraph knows about an op, declared once and read by every pass.

An :class:`Op` names its targets (functions, tensor-method names, module types) and holds

- ``rule``: how the op ties the channel axes of its inputs and output (the analysis);
- ``rewrite``: how slimming changes its arguments when widths change (``passes/slim.py``);
- ``cost``: what it costs (:class:`Cost`: the FLOP/latency family and the inputs that size it;
  ``vitgraph.planning.planner`` prices it);
- flags the passes ask about: ``pointwise`` (acts on each channel alone, so permuting channels
  commutes with it: the 2:4 pass), ``residual_add`` (adds two live streams: the depth pass),
  ``attention`` (scaled dot-product attention: the threshold budget), ``convolution``.

Ops are declared in the family files of this package with :func:`op` (a decorator on the rule)
or :func:`declare`; each family has its test in ``tests/ops/``.  An op with no declaration, or
one without a rule, freezes every channel it touches.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Callable, Optional, Union

import torch.fx as fx
from torch import nn

from vitgraph.capture.op_targets import node_entry
from vitgraph.errors import ArgumentError

Target = Union[Callable, str, type]
Rule = Callable[..., Any]  # rule(ctx: RuleContext, node) -> the output's dims
Rewrite = Callable[..., None]  # rewrite(rc: RewriteContext, node) -> None (edits the node in place)

COST_FAMILIES = ("linear", "bmm", "conv", "sdpa", "eltwise", "free")


@dataclass(frozen=True)
class Cost:
    """An op's cost family and, for the compute families, the inputs its FLOPs are sized by.

    ``inputs(node, module)`` returns ``(operands, extra)``: the fx nodes (or parameter names)
    whose dims enter the family's formula after the output's -- the activation a linear map
    contracts, the weight of a convolution, q, k and v of attention -- and integers the formula
    needs (a convolution's groups).  ``free``: moves no data (views) or is folded away by the
    runtimes; ``eltwise``: priced by its output's size.
    """

    family: str
    inputs: Optional[Callable[[fx.Node, Optional[nn.Module]], tuple[tuple, tuple]]] = None

    def __post_init__(self) -> None:
        if self.family not in COST_FAMILIES:
            raise ArgumentError(f"cost family must be one of {COST_FAMILIES}, got {self.family!r}")


FREE = Cost("free")
ELTWISE = Cost("eltwise")


@dataclass
class Op:
    """One op's declaration (see the module docstring)."""

    name: str
    targets: tuple[Target, ...]
    rule: Optional[Rule] = None
    rewrite: Optional[Rewrite] = None
    cost: Optional[Cost] = None  # None: element-wise when it carries channels, else free
    pointwise: bool = False
    residual_add: bool = False
    attention: bool = False
    convolution: bool = False


OPS: dict[Target, Op] = {}


def declare(*targets: Target, name: Optional[str] = None, **fields: Any) -> Op:
    """Declare an op for ``targets`` (one declaration shared by all of them).

    A target declared before is redeclared: its fields are replaced by the new declaration's.
    """
    if not targets:
        raise ArgumentError("declare() needs at least one target")
    label = name or _label(targets[0])
    spec = Op(label, tuple(targets), **fields)
    for t in targets:
        OPS[t] = spec
    return spec


def op(*targets: Target, **fields: Any) -> Callable[[Rule], Rule]:
    """Decorator: declare an op for ``targets`` whose analysis rule is the decorated function."""

    def deco(fn: Rule) -> Rule:
        declare(*targets, name=fn.__name__, rule=fn, **fields)
        return fn

    return deco


def register_rule(*targets: Target) -> Callable[[Rule], Rule]:
    """Decorator (public API): use the rule for these targets, keeping the rest of any existing
    declaration (its rewrite, cost and flags)."""

    def deco(fn: Rule) -> Rule:
        for t in targets:
            old = OPS.get(t)
            OPS[t] = dataclasses.replace(old, rule=fn) if old is not None else Op(fn.__name__, (t,), rule=fn)
        return fn

    return deco


def lookup_op(root: nn.Module, node: fx.Node) -> Optional[Op]:
    """The declaration for a call node (None when the op is not declared)."""
    return node_entry(OPS, root, node)


def lookup_rule(gm: fx.GraphModule, node: fx.Node) -> Optional[Rule]:
    """The analysis rule for a node (None: no declaration, or one without a rule)."""
    spec = lookup_op(gm, node)
    return spec.rule if spec is not None else None


def has_flag(root: nn.Module, node: fx.Node, flag: str) -> bool:
    """Whether the node's op is declared with ``flag`` (pointwise, residual_add, attention, convolution)."""
    spec = lookup_op(root, node)
    return bool(spec is not None and getattr(spec, flag))


def _label(t: Target) -> str:
    return t if isinstance(t, str) else getattr(t, "__qualname__", getattr(t, "__name__", repr(t)))
