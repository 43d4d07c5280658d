"""Lowering: replace opaque library layers in a traced graph by the primitive ops they compute.

A leaf module whose forward cannot be traced (``nn.MultiheadAttention`` calls
``F.multi_head_attention_forward``, full of Python control flow) hides its channels from the
analysis.  When its call is in a supported configuration it is rewritten here, in the traced
graph, as ``F.linear`` / ``reshape`` / ``scaled_dot_product_attention`` over the module's own
parameters, so the op rules see inside it and the slim rewrite can change its widths freely
(q/k and v head dims apart, heads removed).  Unsupported calls stay opaque and are frozen.
"""
from __future__ import annotations

import operator
from typing import Callable

import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.capture.op_targets import module_entry
from vitgraph.capture.tracer import keeps_side_effect

LOWERINGS: dict[type, Callable[[fx.GraphModule, fx.Node, nn.Module], bool]] = {}


def register_lowering(cls: type) -> Callable:
    """Decorator: ``fn(gm, node, module) -> bool`` lowers a ``call_module`` node of ``cls``."""

    def deco(fn: Callable) -> Callable:
        LOWERINGS[cls] = fn
        return fn

    return deco


def lower(gm: fx.GraphModule) -> int:
    """Lower every supported leaf-module call in ``gm`` (in place); returns how many."""
    count = 0
    for node in list(gm.graph.nodes):
        if node.op != "call_module":
            continue
        mod = gm.get_submodule(node.target)
        fn = module_entry(LOWERINGS, mod)
        if fn is not None and fn(gm, node, mod):
            count += 1
    if count:
        gm.graph.eliminate_dead_code(is_impure_node=keeps_side_effect)
        gm.graph.lint()
        gm.recompile()
    return count


def _arg(node: fx.Node, i: int, name: str, default: object = None) -> object:
    return node.args[i] if len(node.args) > i else node.kwargs.get(name, default)


@register_lowering(nn.MultiheadAttention)
def lower_mha(gm: fx.GraphModule, node: fx.Node, m: nn.MultiheadAttention) -> bool:
    """``nn.MultiheadAttention`` without masks, dropout, extra k/v biases or separate in-projection
    weights, called with ``need_weights=False``: three projections, per-head SDPA, output
    projection (what the module computes)."""
    query, key, value = (_arg(node, i, n) for i, n in enumerate(("query", "key", "value")))
    unsupported = (
        m.bias_k is not None or m.add_zero_attn or not m._qkv_same_embed_dim or m.in_proj_weight is None
        or _arg(node, 3, "key_padding_mask") is not None or _arg(node, 5, "attn_mask") is not None
        or _arg(node, 7, "is_causal", False) or _arg(node, 4, "need_weights", True) is not False
        or m.dropout > 0
    )
    if unsupported or not all(isinstance(t, fx.Node) for t in (query, key, value)):
        return False
    outs = {}
    for user in node.users:  # the module returns (output, weights); weights are None here
        if user.op != "call_function" or user.target is not operator.getitem or user.args[1] not in (0, 1):
            return False
        if user.args[1] == 1 and user.users:
            return False
        outs[user] = user.args[1]
    g, t, H = gm.graph, node.target, m.num_heads
    with g.inserting_before(node):
        w = g.get_attr(f"{t}.in_proj_weight")
        b = g.get_attr(f"{t}.in_proj_bias") if m.in_proj_bias is not None else None
        ws = g.call_method("chunk", (w, 3, 0))
        bs = g.call_method("chunk", (b, 3, 0)) if b is not None else None
        heads = []
        for i, x in enumerate((query, key, value)):
            if not m.batch_first:
                x = g.call_method("transpose", (x, 0, 1))
            wi = g.call_function(operator.getitem, (ws, i))
            bi = g.call_function(operator.getitem, (bs, i)) if bs is not None else None
            y = g.call_function(F.linear, (x, wi, bi))
            bsz, n = g.call_method("size", (x, 0)), g.call_method("size", (x, 1))
            y = g.call_method("reshape", (y, bsz, n, H, -1))
            heads.append(g.call_method("transpose", (y, 1, 2)))
            if i == 0:
                q_bsz, q_n = bsz, n
        o = g.call_function(F.scaled_dot_product_attention, tuple(heads))
        o = g.call_method("transpose", (o, 1, 2))
        o = g.call_method("reshape", (o, q_bsz, q_n, -1))
        ow = g.get_attr(f"{t}.out_proj.weight")
        ob = g.get_attr(f"{t}.out_proj.bias") if m.out_proj.bias is not None else None
        o = g.call_function(F.linear, (o, ow, ob))
        if not m.batch_first:
            o = g.call_method("transpose", (o, 0, 1))
    for user, i in outs.items():
        if i == 0:
            user.replace_all_uses_with(o)
        g.erase_node(user)
    g.erase_node(node)
    return True
