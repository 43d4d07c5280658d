"""Score and rewrite passes (installed as ``vitgraph.passes``).

Score passes rank units: ``hessian`` (NViT), ``kl`` (UP-ViT), ``threshold`` (WDPruning's learned
widths), ``depth`` (exits); ``gates``, ``joint`` (the Fisher blocks both second-order passes rank by)
and ``scoring_common`` hold what they share.  Rewrite passes
change the model: ``slim`` (apply a selection), ``mask``, ``merge_heads``, ``sparsity24`` (2:4),
``recovery`` (fine-tuning after pruning).

May import every stage below (``vitgraph.capture``, ``analysis``, ``planning``, ``deploy``) and
the top-level helpers (``vitgraph.distributed``, ``vitgraph.errors``); nothing below imports a pass.
"""
