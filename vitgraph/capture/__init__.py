"""Capture: a model becomes a ``torch.fx`` graph annotated with tensor shapes.

Owns the tracer (``tracer``: vitgraph's fx tracer, its guards, the ``node.meta`` keys capture
writes), the tracing pipeline (``trace``), lowering of opaque library layers to primitive ops
(``lowering``), inlining of opaque calls whose control flow only reads sizes (``inlining``,
``inline_tracer``), the shape memo for size arithmetic (``shape_memo``) and how a node's target
is matched against op tables (``targets``).

May import: torch, timm, ``vitgraph.errors``. Nothing else of vitgraph (checked by
``tests/test_layout.py``); what the analysis knows is passed in (``trace(..., known=...)``).
"""
