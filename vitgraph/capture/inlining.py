"""Inlining: trace through opaque calls whose control flow depends only on non-tensor arguments."""
from __future__ import annotations

import operator
from typing import Callable, Optional

import torch
import torch.fx as fx
from torch import nn

from vitgraph.capture.inline_tracer import InlineTracer, LooseInlineTracer
from vitgraph.capture.tracer import GROWN_SHAPE_KEY, VALUE_KEY, keeps_side_effect, preserved_state


def inline_opaque(gm: fx.GraphModule, is_opaque: Callable[[fx.Node], bool]) -> list[str]:
    """Trace through opaque calls (leaf modules, wrapped functions) whose Python control flow
    only depends on their non-tensor arguments (spatial sizes, window shapes, flags).

    Those arguments are fixed to the values seen while propagating shapes (they do not depend
    on channels, which is what a plan changes), the callee is traced with them as constants,
    and its graph replaces the call.  Calls that still cannot be traced stay opaque.  Returns
    the targets that were inlined.
    """
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
