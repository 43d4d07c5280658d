"""Op semantics, one declaration per op (see :mod:`vitgraph.analysis.ops.registry`).

Family files: ``pointwise``, ``shape``, ``indexing``, ``reduce``, ``linear``, ``norm``, ``conv``,
``attention``; ``common`` and ``rewriting`` hold the helpers their rules and rewrites share.
Importing this package declares every op.
"""
from vitgraph.analysis.ops import attention, conv, indexing, linear, norm, pointwise, reduce, shape  # noqa: F401
from vitgraph.analysis.ops.registry import OPS, Cost, Op, declare, lookup_op, lookup_rule, op, register_rule

__all__ = ["OPS", "Cost", "Op", "declare", "lookup_op", "lookup_rule", "op", "register_rule"]
