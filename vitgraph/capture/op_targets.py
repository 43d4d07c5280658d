"""How a graph node's target is matched against a table keyed by op targets.

Tables (the op registry, the lowerings) are keyed by functions, tensor-method names and module
types.  A ``call_module`` node matches the nearest class in its module's MRO that has an entry,
and only while the module's class inherits that class's ``forward``: a subclass that overrides
``forward`` computes something else, so an entry written for its base does not describe it.
"""
from __future__ import annotations

from typing import Any, Mapping

import torch.fx as fx
from torch import nn


def module_entry(table: Mapping[Any, Any], module: nn.Module) -> Any:
    """The entry for a module (see the module docstring), or None."""
    cls = type(module)
    for base in cls.__mro__:
        if base in table:
            return table[base] if getattr(cls, "forward", None) is getattr(base, "forward", None) else None
    return None


def node_entry(table: Mapping[Any, Any], root: nn.Module, node: fx.Node) -> Any:
    """The entry for a call node: by function, method name or module (see :func:`module_entry`)."""
    if node.op == "call_module":
        return module_entry(table, root.get_submodule(node.target))
    if node.op in ("call_function", "call_method"):
        try:
            return table.get(node.target)
        except TypeError:  # an unhashable target
            return None
    return None
