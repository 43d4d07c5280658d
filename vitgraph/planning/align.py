"""Hardware alignment of kept widths: what fused GPU attention and GEMM kernels run fast.

``align="kernels"`` (the only alignment so far) asks, per attention, for equal kept q/k and v
per-head widths that are multiples of 8 and at least 16 (fused attention kernels, FlashAttention
and cuDNN, take one head dim for q, k and v, in multiples of 8), FFN and residual widths that are
multiples of 64 (tensor-core GEMM tiles), and other channel groups in multiples of 8.  A group
whose dense width is below the minimum, or that cannot meet the rules (an attention designed with
unequal q/k and v head dims, as LeViT's), keeps its full width (the dense model is what it is).
An attention's q/k and v groups are found by their shared ``head`` group
(``ChannelGroup.head_group``), never by names.
"""
from __future__ import annotations

import math
from typing import TYPE_CHECKING, Any, Optional

from vitgraph.errors import PlanError

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup

ALIGNS = ("kernels",)
KERNEL_MULTIPLE = {"residual": 64, "ffn": 64, "qk": 8, "v": 8, "other": 8, "head": 1}
KERNEL_MIN = {"qk": 16, "v": 16}


def check_align(align: Optional[str]) -> Optional[str]:
    """``align`` if it names an alignment (or is None), else :class:`PlanError`."""
    if align is not None and align not in ALIGNS:
        raise PlanError(f"align must be one of {ALIGNS} or None, got {align!r}")
    return align


def multiple(kind: str, round_to: int, align: Optional[str]) -> int:
    """Kept counts of a group of ``kind`` are multiples of this (or the full width); heads: 1."""
    if kind == "head":
        return 1
    return math.lcm(max(1, int(round_to)), KERNEL_MULTIPLE.get(kind, 1) if align == "kernels" else 1)


def minimum(kind: str, min_width: int, size: int, round_to: int, align: Optional[str]) -> int:
    """The least kept count of a group: ``min_width`` (and the alignment's minimum) rounded up to its
    multiple, or the full ``size`` when that is not below it."""
    m = max(1, int(min_width), KERNEL_MIN.get(kind, 1) if align == "kernels" else 1)
    r = multiple(kind, round_to, align)
    m = math.ceil(m / r) * r
    return min(m, size)


def attention_pairs(analysis: "Analysis") -> dict[str, tuple[Optional["ChannelGroup"], Optional["ChannelGroup"]]]:
    """``head group id -> (qk group, v group)`` of every attention (an entry is None where the
    analysis has no prunable group of that kind, e.g. frozen channels)."""
    out: dict[str, list] = {}
    for g in analysis.groups:
        if g.kind in ("qk", "v") and g.head_group is not None:
            out.setdefault(g.head_group, [None, None])[0 if g.kind == "qk" else 1] = g
    return {h: (p[0], p[1]) for h, p in out.items()}


def aligned_count(g: "ChannelGroup", n: int, round_to: int, min_width: int, align: Optional[str]) -> int:
    """``n`` (a wished kept count) moved to the nearest count the group's rules allow."""
    if g.kind == "head":
        return int(min(g.size, max(1, n)))
    r = multiple(g.kind, round_to, align)
    lo = minimum(g.kind, min_width, g.size, round_to, align)
    if n >= g.size:
        return g.size
    n = int(round(n / r)) * r
    if n >= g.size:
        return g.size
    return int(max(lo, n))


def kernel_violations(analysis: "Analysis", plan: Any) -> list[str]:
    """What in ``plan`` breaks ``align="kernels"`` (empty: nothing), one line per group or attention."""
    def kept(g: "ChannelGroup") -> int:
        k = plan.kept.get(g.id)
        if k is None:
            return g.size
        return len(k[0]) if k and isinstance(k[0], list) else len(k)

    bad = []
    for g in analysis.groups:
        n = kept(g)
        if g.kind == "head" or n == g.size:
            continue
        r = KERNEL_MULTIPLE.get(g.kind, 1)
        lo = KERNEL_MIN.get(g.kind, 1)
        if n % r or n < lo:
            bad.append(f"{g.id} ({g.kind}) keeps {n} of {g.size}: not a multiple of {r} of at least {lo}")
        elif g.kind in ("qk", "v") and g.head_group is None:
            bad.append(f"{g.id} ({g.kind}) keeps {n} of {g.size} but belongs to no attention to match")
    for h, (qk, v) in attention_pairs(analysis).items():
        nq = kept(qk) if qk is not None else None
        nv = kept(v) if v is not None else None
        if nq is not None and nv is not None and nq != nv and (nq, nv) != (qk.size, v.size):
            bad.append(f"attention of {h}: q/k keeps {nq} dims per head, v keeps {nv}")
        for g, n in ((qk, nq), (v, nv)):
            if g is not None and (qk is None or v is None) and n != g.size:
                bad.append(f"{g.id} keeps {n} of {g.size} but its attention has no prunable "
                           f"{'v' if v is None else 'q/k'} group to match")
    return bad
