"""Capture reads timm's not-traceable registries through timm's public getters."""
from __future__ import annotations

import timm.layers
from torch import nn

from vitgraph.capture.tracer import ViTTracer, _timm_registries


class _Opaque(nn.Module):
    def forward(self, x):
        return x * 2


def _opaque_fn(x):
    return x + 1


def test_registries_come_from_public_getters(monkeypatch):
    monkeypatch.setattr(timm.layers, "get_notrace_modules", lambda: [_Opaque])
    monkeypatch.setattr(timm.layers, "get_notrace_functions", lambda: [_opaque_fn])
    assert _timm_registries() == ({_Opaque}, {_opaque_fn})
    tracer = ViTTracer(honour_timm=True)
    assert tracer.is_leaf_module(_Opaque(), "m")


def test_registries_match_timm_contents():
    from timm.layers import _fx

    leaves, funcs = _timm_registries()
    assert leaves == set(_fx._leaf_modules) and funcs == set(_fx._autowrap_functions)
    assert leaves  # timm registers its own leaves on import
