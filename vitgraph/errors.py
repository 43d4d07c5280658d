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


class CompressionMismatchError(VitgraphError, RuntimeError):
    """A compressed model differs from the masked model where masking is exact (a vitgraph bug)."""

    def __init__(self, message: str, group: str = "", op: "str | None" = None) -> None:
        super().__init__(message)
        self.group, self.op = group, op


class ArgumentError(VitgraphError, ValueError):
    """An argument or option given to a vitgraph function is not valid (names it and what it accepts)."""


class ArgumentTypeError(ArgumentError, TypeError):
    """An argument given to a vitgraph function has the wrong type."""


class DataError(VitgraphError, ValueError):
    """Data given for scoring, training or calibration cannot be used as it is."""


class UnknownGroupError(VitgraphError, KeyError):
    """No channel group has the id asked for."""

    def __str__(self) -> str:  # (KeyError would quote the message)
        return str(self.args[0]) if self.args else ""
