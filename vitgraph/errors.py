"""Exception types raised by vitgraph."""


class VitgraphError(Exception):
    """Base class of every error vitgraph raises on purpose."""


class TraceError(VitgraphError):
    """The model cannot be traced to a torch.fx graph."""


class AnalysisError(VitgraphError):
    """The channel analysis met a graph it cannot describe."""


class PlanError(VitgraphError, ValueError):
    """A plan does not fit the analysed model."""


class ExportError(VitgraphError, RuntimeError):
    """ONNX export failed, or its output does not match torch."""


class ScoreError(VitgraphError, ValueError):
    """Scoring was asked for something it cannot do (no data, an unknown method or group)."""
