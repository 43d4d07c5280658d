"""Lowering: replace opaque library layers in a traced graph by the primitive ops they compute.

A leaf module whose forward cannot be traced (``nn.MultiheadAttention`` calls
``F.multi_head_attention_forward``, full of Python control flow) hides its channels from the
analysis.  When its call is in a supported configuration it is rewritten here, in the traced
graph, as ``F.linear`` / ``reshape`` / ``scaled_dot_product_attention`` over the module's own
parameters, so the op rules see inside it and the slim rewrite can change its widths freely
(q/k and v head dims apart, heads removed).  Unsupported calls stay opaque and are frozen.
"""
from __future__ import annotations

import contextlib
import operator
from typing import Callable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

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
        fn = next((f for cls, f in LOWERINGS.items() if type(mod) is cls), None)
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



# ---------------------------------------------------------------------------------------------
# opaque calls traced with their non-tensor arguments fixed

VALUE_KEY = "vitgraph.value"  # node.meta entry: the concrete non-tensor value seen at shape propagation


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


def inline_opaque(gm: fx.GraphModule, is_opaque: Callable[[fx.Node], bool]) -> list[str]:
    """Trace through opaque calls (leaf modules, wrapped functions) whose Python control flow
    only depends on their non-tensor arguments (spatial sizes, window shapes, flags).

    Those arguments are fixed to the values seen while propagating shapes (they do not depend
    on channels, which is what a plan changes), the callee is traced with them as constants,
    and its graph replaces the call.  Calls that still cannot be traced stay opaque.  Returns
    the targets that were inlined.
    """
    from .inline_tracer import InlineTracer, LooseInlineTracer

    done = []
    for node in list(gm.graph.nodes):
        if node.op not in ("call_module", "call_function") or not is_opaque(node):
            continue
        sub = None
        for tracer_cls in (InlineTracer, LooseInlineTracer):
            try:
                sub, inputs, root, made = _subtrace(gm, node, tracer_cls)
                break
            except Exception:  # noqa: BLE001 - not traceable even with fixed arguments: stays opaque
                continue
        if sub is None:
            continue
        if _splice(gm, node, sub, inputs, root, made):
            done.append(str(node.target if node.op == "call_module" else getattr(node.target, "__name__", node.target)))
    if done:
        gm.graph.eliminate_dead_code(is_impure_node=keeps_side_effect)
        gm.graph.lint()
        gm.recompile()
    return done


def _concrete(v: object) -> object:
    if isinstance(v, fx.Node):
        if VALUE_KEY not in v.meta:
            raise ValueError(f"no concrete value for {v.name}")
        return v.meta[VALUE_KEY]
    if isinstance(v, (list, tuple)):
        return type(v)(_concrete(x) for x in v)
    return v


def _subtrace(gm: fx.GraphModule, node: fx.Node, tracer_cls: type) -> tuple:
    import inspect

    if node.op == "call_module":
        root = gm.get_submodule(node.target)
        sig = inspect.signature(root.forward)
    else:
        root = node.target
        sig = inspect.signature(root)
    bound = sig.bind(*node.args, **node.kwargs)
    bound.apply_defaults()  # arguments left at their defaults are constants too (``scale=None``)
    tensors: dict[str, fx.Node] = {}
    consts: dict[str, object] = {}
    for name, val in bound.arguments.items():
        kind = sig.parameters[name].kind
        if kind in (inspect.Parameter.VAR_POSITIONAL, inspect.Parameter.VAR_KEYWORD):
            raise ValueError("variadic arguments")
        if isinstance(val, fx.Node) and val.meta.get("tensor_meta") is not None and VALUE_KEY not in val.meta:
            tensors[name] = val
        else:
            consts[name] = _concrete(val)
    tracer = tracer_cls(honour_timm=False)
    # the callee may branch on sizes: its proxies carry meta values at two batch sizes
    tracer.inputs = {name: pair for name, v in tensors.items() if (pair := _meta_pair(v)) is not None}
    p = next(iter(gm.parameters()), None)
    tracer.static_device = p.device if p is not None else torch.device("cpu")
    made: dict[str, object] = {}  # constants the tracer stored on the callee while tracing
    with preserved_state(root if isinstance(root, nn.Module) else None):
        before = set(root.__dict__) if isinstance(root, nn.Module) else set()
        graph = tracer.trace(root, concrete_args=consts)
        if isinstance(root, nn.Module):
            for n in graph.nodes:
                if n.op == "get_attr" and "." not in n.target and n.target not in before \
                        and n.target not in root._parameters and n.target not in root._buffers:
                    made[n.target] = getattr(root, n.target)
    # placeholders come in signature order, a fixed argument flattened into its leaves
    from torch.utils._pytree import tree_leaves

    flat: list[object] = []
    for name, par in sig.parameters.items():
        if name in tensors:
            flat.append(tensors[name])
        elif name in consts:
            leaves = tree_leaves(consts[name])
            flat.extend(leaves if leaves else [consts[name]])
        else:
            flat.append(par.default)
    phs = [n for n in graph.nodes if n.op == "placeholder"]
    if len(phs) != len(flat):
        raise ValueError("placeholders do not match the arguments")
    return graph, dict(zip(phs, flat)), tracer.root, made


def _meta_pair(v: fx.Node) -> Optional[tuple[torch.Tensor, torch.Tensor]]:
    """Meta tensors of ``v`` at the example batch and at the example batch + 1 (None if the
    second is unknown)."""
    from .trace import GROWN_SHAPE_KEY

    tm = v.meta["tensor_meta"]
    grown = tuple(tm.shape) if v.op == "get_attr" else v.meta.get(GROWN_SHAPE_KEY)
    if grown is None:
        return None
    return torch.empty(tm.shape, dtype=tm.dtype, device="meta"), torch.empty(grown, dtype=tm.dtype, device="meta")


def _splice(gm: fx.GraphModule, node: fx.Node, sub: fx.Graph, inputs: dict, root: nn.Module, made: dict) -> bool:
    """Replace ``node`` by the nodes of ``sub``; ``inputs`` maps sub's placeholders to values;
    ``made``: the constants tracing stored on the traced ``root``."""
    out_node = next(n for n in sub.nodes if n.op == "output")
    result = out_node.args[0]
    info = getattr(sub._codegen, "pytree_info", None)
    if info is not None and info.out_spec is not None:  # traced with fixed arguments: flat outputs
        from torch.utils._pytree import tree_unflatten

        result = tree_unflatten(list(result), info.out_spec)
    if not isinstance(result, fx.Node):
        # a tuple result: every user must take one element that is a graph value
        if not isinstance(result, (tuple, list)):
            return False
        for user in node.users:
            if user.target is not operator.getitem or not isinstance(user.args[1], int):
                return False
            if not isinstance(result[user.args[1]], fx.Node) and user.users:
                return False
    prefix = f"{node.target}." if node.op == "call_module" else ""
    env: dict[fx.Node, object] = {}
    g = gm.graph
    with g.inserting_before(node):
        for sn in sub.nodes:
            if sn.op == "placeholder":
                env[sn] = inputs[sn]
            elif sn.op == "output":
                continue
            elif sn.op == "get_attr":
                if prefix and sn.target not in made:
                    env[sn] = g.get_attr(prefix + sn.target)
                else:  # constants made while tracing: move them onto gm
                    new = f"_vitgraph_const_{len(list(gm.named_buffers()))}_{sn.target}"
                    gm.register_buffer(new, made[sn.target] if sn.target in made else getattr(root, sn.target))
                    env[sn] = g.get_attr(new)
            else:
                new = g.node_copy(sn, lambda a: env[a])
                if sn.op == "call_module":
                    new.target = prefix + sn.target
                env[sn] = new
    mapped = fx.node.map_arg(result, lambda a: env[a])
    if isinstance(mapped, fx.Node):
        node.replace_all_uses_with(mapped)
    else:
        for user in list(node.users):
            v = mapped[user.args[1]]
            if isinstance(v, fx.Node):
                user.replace_all_uses_with(v)
            g.erase_node(user)
    g.erase_node(node)
    return True
