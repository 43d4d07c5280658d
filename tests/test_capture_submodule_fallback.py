"""The meta-value fallback at a submodule (vitgraph/capture/trace.py): a submodule whose Python
control flow reads static sizes is traced with meta values even when the proxies of the whole
model cannot carry them (an op before it has no meta kernel)."""
from __future__ import annotations

import torch
import torch.fx
import torch.nn.functional as F
from torch import nn

import vitgraph

from helpers import C, assert_exact, build, inputs, only


@torch.fx.wrap
def host_roundtrip(x: torch.Tensor) -> torch.Tensor:
    """A copy made on the host through numpy (no meta kernel: the meta-value tracer loses the
    values of everything after it)."""
    return torch.from_numpy(x.detach().cpu().numpy().copy())


class CheckedMLP(nn.Module):
    """Branches on its input's (static) width, as encoders check their input shapes."""

    def __init__(self) -> None:
        super().__init__()
        self.fc1, self.fc2 = nn.Linear(C, 2 * C), nn.Linear(2 * C, C)

    def forward(self, x):
        if x.shape[-1] != self.fc1.in_features:
            raise ValueError(f"expected width {self.fc1.in_features}, got {x.shape[-1]}")
        return x + self.fc2(F.gelu(self.fc1(x)))


class HostThenMLP(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.mlp = CheckedMLP()

    def forward(self, x):
        return self.mlp(host_roundtrip(x))


def test_submodule_with_static_control_flow_is_traced_with_meta_values():
    m = build(HostThenMLP)
    an = vitgraph.analyze(m, inputs())
    assert an.front_end == "symbolic, failing submodules traced with meta values"
    assert [w for _, w in an.unruled] == ["function test_capture_submodule_fallback.host_roundtrip"], an.unruled
    assert only(an, "ffn").size == 2 * C  # the submodule was inlined, not left opaque
    assert_exact(m, an)
