"""Tracing a ``forward`` that a decorator wraps as ``wrapper(self, *args, **kwargs)``.

fx reads the root's arguments from the unwrapped function (``inspect.unwrap``) but, when that
function takes ``**kwargs``, patches the *wrapper's* code to take them positionally, so the
wrapper's own ``kwargs`` is bound to some argument's value (transformers' ``can_return_tuple``
then fails at ``kwargs.pop``).  :func:`through_wrapper` gives fx a plain function with the
unwrapped positional signature that calls the wrapper by keyword, so the decorator runs as it
does in eager mode.
"""
from __future__ import annotations

import inspect
from typing import Any, Callable

import torch.fx as fx
from torch.utils import _pytree as pytree


def through_wrapper(root_fn: Callable) -> Callable:
    """``root_fn`` itself when it wraps nothing; else a function fx can trace (module docstring)."""
    inner = inspect.unwrap(root_fn)
    if inner is root_fn:
        return root_fn
    try:
        sig = inspect.signature(inner)
    except (TypeError, ValueError):
        return root_fn
    kinds = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    params = [p for p in sig.parameters.values() if p.kind in kinds]
    if not params or not all(p.name.isidentifier() for p in params):
        return root_fn
    first, rest = params[0].name, [p.name for p in params[1:]]
    src = (f"def forward({', '.join(p.name for p in params)}):\n"
           f"    return __vitgraph_wrapper({first}{''.join(f', {n}={n}' for n in rest)})\n")
    ns: dict = {"__vitgraph_wrapper": root_fn}
    exec(src, ns)  # noqa: S102 - a signature copy; the names come from the model's own code
    shim = ns["forward"]
    shim.__defaults__ = tuple(p.default for p in params if p.default is not p.empty) or None
    shim.__qualname__ = getattr(inner, "__qualname__", "forward")
    return shim


class RebuiltOutput(fx.graph.CodeGen):
    """Code generation that returns ``tree_unflatten(<output leaves>, out_spec)``."""

    def __init__(self, out_spec: Any) -> None:
        super().__init__()
        self.out_spec = out_spec

    def additional_globals(self) -> list[tuple[str, Any]]:
        spec = self.out_spec

        def _vitgraph_rebuild(leaves: Any) -> Any:  # (a vitgraph function: fx names torch objects by import path)
            return pytree.tree_unflatten(list(leaves), spec)

        return [*super().additional_globals(), ("_vitgraph_rebuild", _vitgraph_rebuild)]

    def generate_output(self, output_args: Any, *args: Any, **kwargs: Any) -> str:
        code = super().generate_output(output_args, *args, **kwargs)
        head, _, expr = code.partition("return ")
        return f"{head}return _vitgraph_rebuild({expr.strip()})"

    def process_outputs(self, outputs: Any) -> Any:
        return pytree.tree_unflatten(list(outputs), self.out_spec)


def restore_output_structure(graph: fx.Graph, raw: Any) -> None:
    """Make ``graph`` return ``raw``'s container type (a transformers ``ModelOutput``, a
    namedtuple, any pytree-registered class): fx turns such outputs into plain dicts and tuples.

    The output node then holds the flat leaves and the generated code rebuilds the container
    (:class:`RebuiltOutput`), so every output tensor is still an argument of the output node,
    where the analysis protects it.
    """
    if raw is None or type(raw) in (tuple, list, dict) or isinstance(raw, fx.Proxy):
        return
    leaves, spec = pytree.tree_flatten(raw)
    if spec.is_leaf() or type(graph._codegen) is not fx.graph.CodeGen:
        return
    out = next(n for n in reversed(graph.nodes) if n.op == "output")
    out.args = ([x.node if isinstance(x, fx.Proxy) else x for x in leaves],)
    graph._codegen = RebuiltOutput(spec)
