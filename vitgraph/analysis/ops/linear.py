"""Linear maps: nn.Linear, F.linear, matmul / bmm, baddbmm / addmm, einsum."""
from __future__ import annotations

import operator
from typing import Any, Callable, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.analysis.axes import Layout
from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, broadcast, no_rule
from vitgraph.analysis.ops.rewriting import RewriteContext
from vitgraph.analysis.ops.registry import Cost, ELTWISE


def linear_dims(ctx: RuleContext, x: TensorDims, w: TensorDims, b: Optional[TensorDims]) -> TensorDims:
    """``x @ w.T + b``: the input dim is tied to the weight's columns, the output is its rows."""
    ctx.tie(x.dims[-1], w.dims[1], "linear")
    ctx.role(w.dims[1], "linear_in")
    ctx.role(w.dims[0], "linear_out")
    if b is not None:
        ctx.tie(w.dims[0], b.dims[0], "linear bias")
    shape = x.shape[:-1] + (w.shape[0],)
    return TensorDims(shape, x.dims[:-1] + (w.dims[0],), x.live)


def linear_module(ctx: RuleContext, node: fx.Node) -> Any:
    """nn.Linear."""
    mod = ctx.gm.get_submodule(node.target)
    b = ctx.param(f"{node.target}.bias") if mod.bias is not None else None
    return linear_dims(ctx, ctx.dims(node.args[0]), ctx.param(f"{node.target}.weight"), b)


def linear_function(ctx: RuleContext, node: fx.Node) -> Any:
    """F.linear(x, weight, bias)."""
    b = arg(node, 2, "bias")
    return linear_dims(ctx, ctx.dims(node.args[0]), ctx.dims(arg(node, 1, "weight")), ctx.dims(b) if b is not None else None)


def matmul_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """``a @ b``: contraction dims tied; between two activations they are attention dims."""
    a, b = ctx.dims(node.args[0]), ctx.dims(node.args[1])
    if not isinstance(a, TensorDims) or not isinstance(b, TensorDims) or len(a.shape) < 2 or len(b.shape) < 2:
        return no_rule(ctx, node)
    shp = ctx.out_shape()
    ctx.tie(a.dims[-1], b.dims[-2], "matmul")
    both_live = a.live and b.live
    batch = broadcast(ctx, [TensorDims(a.shape[:-2], a.dims[:-2], a.live), TensorDims(b.shape[:-2], b.dims[:-2], b.live)],
                      shp[:-2], "matmul batch")
    if both_live:
        ctx.role(a.dims[-1], "qk")
        ctx.role(b.dims[-1], "v")
        for lay in batch.dims:
            ctx.role(lay, "head")
    elif a.live and not b.live:
        ctx.role(b.dims[-2], "linear_in")
        ctx.role(b.dims[-1], "linear_out")
    return TensorDims(shp, batch.dims + (a.dims[-2], b.dims[-1]), a.live or b.live)


def einsum_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """Einsum: equal letters are tied.  Between two activations the roles are matmul's: a letter
    summed over is a qk dim, a letter both keep is a head (batch) dim, and a letter only the
    second operand brings to the output is a v dim (``bhlt,bhtv->bhlv``)."""
    eq = node.args[0]
    ops = node.args[1:]
    if len(ops) == 1 and isinstance(ops[0], (list, tuple)):
        ops = ops[0]
    tds = [ctx.dims(o) for o in ops]
    if "..." in eq or "->" not in eq or not all(isinstance(t, TensorDims) for t in tds):
        return no_rule(ctx, node)
    lhs, out = eq.replace(" ", "").split("->")
    terms = lhs.split(",")
    shp = ctx.out_shape()
    seen: dict[str, tuple[Optional[Layout], int, bool]] = {}
    for term, td in zip(terms, tds):
        for ch, lay, s in zip(term, td.dims, td.shape):
            if ch in seen:
                prev, ps, plive = seen[ch]
                if s == ps and s != 1:
                    ctx.tie(prev, lay, "einsum")
                    if ch not in out and plive and td.live:
                        ctx.role(lay, "qk")
            else:
                seen[ch] = (lay, s, td.live)
    if len(tds) == 2 and tds[0].live and tds[1].live:
        for ch, lay, s in zip(terms[1], tds[1].dims, tds[1].shape):
            if ch in out and s != 1:
                ctx.role(lay, "head" if ch in terms[0] else "v")
    dims = tuple(seen[ch][0] if seen[ch][1] == s else None for ch, s in zip(out, shp))
    return TensorDims(shp, dims, any(t.live for t in tds))


def rewrite_linear(rc: RewriteContext, node: fx.Node) -> None:
    """Linear sizes follow its (sliced) weight."""
    m = rc.root.get_submodule(node.target)
    m.out_features, m.in_features = m.weight.shape


# ---------------------------------------------------------------------------------------------
# declarations

def _operand(i: int, need: int) -> Callable:
    """Cost inputs: the ``i``-th argument, the operand a linear map or batched matmul contracts
    (not priced as one with fewer than ``need`` positional arguments)."""

    def inputs(node: fx.Node, module: Optional[nn.Module]) -> Optional[tuple[tuple, tuple]]:
        if len(node.args) < need:
            return None
        return (node.args[i] if len(node.args) > i else None,), ()

    return inputs


declare(nn.Linear, rule=linear_module, rewrite=rewrite_linear, cost=Cost("linear", _operand(0, 0)))
declare(F.linear, rule=linear_function, cost=Cost("linear", _operand(0, 0)))
declare(operator.matmul, torch.matmul, torch.bmm, "matmul", "bmm", "__matmul__", rule=matmul_rule,
        cost=Cost("bmm", _operand(0, 2)))
declare(torch.baddbmm, "baddbmm", cost=Cost("bmm", _operand(1, 2)))  # (no rule yet: frozen)
declare(torch.addmm, cost=Cost("linear", _operand(1, 2)))  # (no rule yet: frozen)
declare(torch.einsum, rule=einsum_rule, cost=ELTWISE)
