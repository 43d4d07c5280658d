"""A rejected export form is one warning line; what the exporter printed while trying it (the
TorchScript IR of a failing trace) is shown only when asked (verbose / VITGRAPH_VERBOSE)."""
from __future__ import annotations

import os
import warnings

import torch
from torch import nn

from vitgraph.deploy.export import ExportFallbackWarning, export_onnx


class NoisyUnderTrace(nn.Module):
    """Prints 1,500 lines (Python and the raw file descriptors) and fails while TorchScript traces it."""

    def __init__(self) -> None:
        super().__init__()
        self.fc = nn.Linear(4, 3)

    def forward(self, x):
        if torch.jit.is_tracing():
            print("graph(%x : Float(...)):\n" * 500, end="")
            os.write(1, b"  %1 : Tensor = aten::linear(...)\n" * 500)
            os.write(2, b"  %2 : Tensor = aten::relu(...)\n" * 500)
            raise RuntimeError("tracing failed on purpose")
        return self.fc(x)


def _export(tmp_path, **kw):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        rep = export_onnx(NoisyUnderTrace().eval(), tmp_path / "m.onnx", torch.randn(2, 4), **kw)
    return rep, [w for w in caught if issubclass(w.category, ExportFallbackWarning)]


def test_fallback_is_one_warning_and_no_ir(tmp_path, capfd, monkeypatch):
    monkeypatch.delenv("VITGRAPH_VERBOSE", raising=False)
    rep, falls = _export(tmp_path)
    assert rep.form != "torchscript-17"
    assert len(falls) == 1 and "torchscript-17" in str(falls[0].message) and "tracing failed" in str(falls[0].message)
    out, err = capfd.readouterr()
    assert "aten::" not in out + err and "graph(" not in out + err


def test_verbose_shows_what_the_exporter_printed(tmp_path, capfd):
    _export(tmp_path, verbose=True)
    out, err = capfd.readouterr()
    assert err.count("aten::linear") == 500 and err.count("aten::relu") == 500
