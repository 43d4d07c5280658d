"""What a channel group is: its kind, defined once for the analysis, the plans and the passes."""
from __future__ import annotations

import enum
from typing import Iterable, Optional


class GroupKind(str, enum.Enum):
    """The kind of a :class:`~vitgraph.analysis.engine.ChannelGroup` (compares equal to its name)."""

    RESIDUAL = "residual"  # the residual stream: every block's input and output width
    HEAD = "head"  # whole attention heads
    QK = "qk"  # per-head query/key dims (they are contracted together)
    V = "v"  # per-head value dims
    FFN = "ffn"  # an MLP's hidden width
    OTHER = "other"  # channels of anything else (a conv stem, a patch merge)

    def __str__(self) -> str:
        return self.value


ALL_KINDS: tuple[str, ...] = tuple(k.value for k in GroupKind)
PRUNABLE_KINDS: tuple[str, ...] = ("residual", "head", "qk", "v", "ffn")  # what plans and scores cover by default
BLOCK_KINDS: tuple[str, ...] = ("head", "qk", "v", "ffn")  # widths inside blocks (the residual stream kept)
PER_HEAD_KINDS: tuple[str, ...] = ("qk", "v")  # groups whose units may differ head by head


def unknown_kinds(kinds: Optional[Iterable[str]]) -> list[str]:
    """The entries of ``kinds`` that are not group kinds."""
    return [k for k in (kinds or ()) if k not in ALL_KINDS]
