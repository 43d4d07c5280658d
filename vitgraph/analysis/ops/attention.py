"""Scaled dot-product attention."""
from __future__ import annotations

import math
from typing import Any, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.analysis.context import RuleContext, TensorDims
from vitgraph.analysis.ops.registry import declare
from vitgraph.analysis.ops.common import arg, broadcast
from vitgraph.analysis.ops.rewriting import RewriteContext
from vitgraph.analysis.ops.registry import Cost


def sdpa_rule(ctx: RuleContext, node: fx.Node) -> Any:
    """softmax(q k^T * scale + mask) v: q/k dims tied (qk), v's dim is the output (v)."""
    q, k, v = (ctx.dims(arg(node, i, n)) for i, n in enumerate(("query", "key", "value")))
    shp = ctx.out_shape()
    ctx.tie(q.dims[-1], k.dims[-1], "attention qk")
    ctx.role(q.dims[-1], "qk")
    ctx.role(v.dims[-1], "v")
    parts = [TensorDims(t.shape[:-2], t.dims[:-2], t.live) for t in (q, k, v)]
    mask = ctx.dims(arg(node, 3, "attn_mask"))
    if isinstance(mask, TensorDims) and len(mask.shape) > 2:
        parts.append(TensorDims(mask.shape[:-2], mask.dims[:-2], mask.live))
    batch = broadcast(ctx, parts, shp[:-2], "attention heads")
    for lay in batch.dims:
        ctx.role(lay, "head")
    return TensorDims(shp, batch.dims + (q.dims[-2], v.dims[-1]), True)


def rewrite_sdpa(rc: RewriteContext, node: fx.Node) -> None:
    """Keep the original attention scale when the q/k head dim shrinks."""
    q = rc.dims(node.args[0] if node.args else node.kwargs["query"])
    old, new = q.shape[-1], rc.new_shape(q)[-1]
    if old != new and node.kwargs.get("scale") is None and len(node.args) < 7:
        node.kwargs = {**node.kwargs, "scale": 1.0 / math.sqrt(old)}


# ---------------------------------------------------------------------------------------------
# declarations

def _qkv(node: fx.Node, module: Optional[nn.Module]) -> tuple[tuple, tuple]:
    key = node.args[1] if len(node.args) > 1 else node.kwargs.get("key")
    value = node.args[2] if len(node.args) > 2 else node.kwargs.get("value")
    return (node.args[0] if node.args else node.kwargs.get("query"), key, value), ()


_SDPA = [F.scaled_dot_product_attention]
if getattr(torch._C._nn, "scaled_dot_product_attention", F.scaled_dot_product_attention) is not F.scaled_dot_product_attention:
    _SDPA.append(torch._C._nn.scaled_dot_product_attention)  # (the builtin, where F's is a wrapper)

declare(*_SDPA, rule=sdpa_rule, rewrite=rewrite_sdpa, attention=True, cost=Cost("sdpa", _qkv))
