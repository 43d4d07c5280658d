"""Planning: which units to keep -- plans, their validation and JSON, and plans built to a target.

Owns :class:`~vitgraph.planning.plan.Plan` (``plan``), the magnitude scores a plan falls back on
(``magnitude``), the cost model and the target planner (``planner``: FLOPs, parameters, latency;
NViT's global ranking or a uniform ratio) and latency tables (``latency``).

May import: ``vitgraph.analysis``, ``vitgraph.capture``, ``vitgraph.deploy`` (measurement for
latency tables), ``vitgraph.errors``, ``vitgraph.gc_hold``; never ``vitgraph.passes``
(checked by ``tests/test_layout.py``).  Closing the loop on measured latency compresses and
exports, so it lives above planning, in ``vitgraph.targets``.
"""
