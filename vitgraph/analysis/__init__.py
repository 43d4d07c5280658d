"""Analysis: which channels are coupled, as groups of axes over the captured graph.

Owns the axis store (``axes``), the context rules run in (``context``), the op registry with one
declaration per op (``ops/``: analysis rule, slimming rewrite, cost, pass flags), the group kinds
(``kinds``), the driver that runs the rules and forms channel groups (``engine``) and the kept-unit
selection a plan resolves to on these axes (``selection``).

May import: ``vitgraph.capture``, ``vitgraph.errors``, ``vitgraph.gc_hold``; never planning,
deployment or ``vitgraph.passes`` (checked by ``tests/test_layout.py``).
"""
from vitgraph.analysis.engine import Analysis, ChannelGroup, FrozenChannels, analyze

__all__ = ["Analysis", "ChannelGroup", "FrozenChannels", "analyze"]
