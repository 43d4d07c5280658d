"""Deployment: what leaves vitgraph -- ONNX export and checks, the 2:4 checker, measurement.

Owns ONNX export with checker, parity and the fastest form (``export``), the 2:4 (Ampere)
checker of ONNX weights (``onnx24``), FLOP counting by vitgraph's convention (``flops``) and
latency, FLOP and parameter measurement (``measure``).

May import: torch, onnx, onnxruntime, ``vitgraph.errors``; nothing that captures, analyses or
plans, and never ``vitgraph.passes`` (checked by ``tests/test_layout.py``).
"""
