"""Plan: what each channel group keeps. Plain data with JSON round-trip and validation."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from .errors import PlanError
from .selection import Selection

if TYPE_CHECKING:
    from .analysis import Analysis, ChannelGroup

Keep = Union[list[int], list[list[int]]]
DEFAULT_KINDS = ("residual", "head", "qk", "v", "ffn")


@dataclass
class Plan:
    """Kept indices per group id; groups not listed keep everything.

    For ``qk`` and ``v`` groups an entry is either one sorted list shared by all heads or, where
    the group allows it (``ChannelGroup.per_head``), one list per original head, all of equal
    length.  ``head`` groups list kept head indices.
    """

    fingerprint: str
    input_shapes: list[list[int]]
    input_dtypes: list[str] = field(default_factory=lambda: ["float32"])
    kept: dict[str, Keep] = field(default_factory=dict)
    analysis: Optional["Analysis"] = field(default=None, repr=False, compare=False)

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def keep_all(cls, analysis: "Analysis") -> "Plan":
        """The identity plan: every group keeps every channel."""
        return cls(analysis.fingerprint, [list(s) for s in analysis.input_shapes], list(analysis.input_dtypes), {}, analysis)

    def keep(self, group_id: str, indices: Union[Sequence[int], Sequence[Sequence[int]], torch.Tensor, np.ndarray]) -> "Plan":
        """Set the kept indices of one group (validated now if the plan knows its analysis)."""
        raw = indices.tolist() if isinstance(indices, (torch.Tensor, np.ndarray)) else list(indices)
        nested = bool(raw) and not isinstance(raw[0], (int, np.integer))
        keep: Keep = [[int(i) for i in row] for row in raw] if nested else [int(i) for i in raw]
        if self.analysis is not None:
            if group_id not in _ids(self.analysis):
                _unknown(group_id)
            _validate_entry(self.analysis.group(group_id), keep, self.analysis)
        self.kept[group_id] = keep
        return self

    @classmethod
    def random(
        cls, analysis: "Analysis", ratio: float = 0.5, kinds: Optional[Iterable[str]] = None, seed: int = 0,
        per_head: bool = True,
    ) -> "Plan":
        """Remove a random ``ratio`` of every group of ``kinds`` (default: all prunable kinds).

        Per-head ``qk``/``v`` groups get a different random set per head when ``per_head``.  Used
        to check that any keep-set compresses correctly, not to prune well.
        """
        if not 0.0 <= ratio < 1.0:
            raise PlanError(f"ratio must be in [0, 1), got {ratio}")
        kinds = tuple(kinds) if kinds is not None else DEFAULT_KINDS + ("other",)
        gen = np.random.default_rng(seed)
        plan = cls.keep_all(analysis)
        for g in analysis.groups:
            if g.kind not in kinds:
                continue
            n = _target_count(g.size, ratio, 1, 1)
            if g.per_head and per_head:
                heads = analysis.group(g.head_group).size
                plan.kept[g.id] = [sorted(gen.choice(g.size, n, replace=False).tolist()) for _ in range(heads)]
            else:
                plan.kept[g.id] = sorted(gen.choice(g.size, n, replace=False).tolist())
        return plan

    @classmethod
    def from_scores(
        cls,
        analysis: "Analysis",
        scores: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
        ratio: Optional[float] = 0.5,
        kinds: Optional[Iterable[str]] = None,
        round_to: int = 1,
        min_keep: int = 1,
    ) -> "Plan":
        """Keep the highest-scoring units of each selected group, removing ``ratio`` of each.

        ``scores`` maps group ids to 1-D importance per unit (or ``[heads, dims]`` for per-head
        ``qk``/``v`` groups); a missing or ``None`` entry means magnitude.  Kept channel counts are
        rounded to multiples of ``round_to`` (not for heads) and never fall below ``min_keep``.
        ``ratio=None`` takes each group's kept count from ``scores.keep`` (scores from a method
        that learns widths, such as ``vitgraph.score(..., "threshold")``).
        """
        learned = getattr(scores, "keep", None) if ratio is None else None
        if ratio is None and not learned:
            raise PlanError("ratio=None needs scores that carry learned widths (scores.keep)")
        if ratio is not None and not 0.0 <= ratio < 1.0:
            raise PlanError(f"ratio must be in [0, 1), got {ratio}")
        if learned:
            kinds = tuple(kinds) if kinds is not None else tuple({analysis.group(gid).kind for gid in learned})
        kinds = tuple(kinds) if kinds is not None else DEFAULT_KINDS
        bad = [k for k in kinds if k not in ("residual", "head", "qk", "v", "ffn", "other")]
        if bad:
            raise PlanError(f"unknown group kinds {bad}")
        scores = dict(scores or {})
        missing = [g.id for g in analysis.groups if g.kind in kinds and scores.get(g.id) is None]
        if missing:
            from vitgraph.passes.magnitude import magnitude_scores

            scores.update(magnitude_scores(analysis, missing))
        plan = cls.keep_all(analysis)
        for g in analysis.groups:
            if g.kind not in kinds:
                continue
            if learned:
                if g.id not in learned:
                    continue
                n = int(min(g.size, max(1, min_keep, learned[g.id])))
            else:
                n = _target_count(g.size, ratio, 1 if g.kind == "head" else round_to, min_keep)
            s = torch.as_tensor(scores[g.id], dtype=torch.float64)
            plan.kept[g.id] = _top(s, n, g.per_head)
        return plan

    # -- checks -------------------------------------------------------------------------------
    def validate(self, analysis: "Analysis") -> None:
        """Raise :class:`PlanError` unless the plan fits ``analysis`` exactly."""
        if self.fingerprint != analysis.fingerprint:
            raise PlanError(
                f"plan was made for architecture {self.fingerprint} but the model is {analysis.fingerprint} "
                "(a different architecture or input shape)"
            )
        ids = _ids(analysis)
        for gid, keep in self.kept.items():
            if gid not in ids:
                _unknown(gid)
            _validate_entry(analysis.group(gid), keep, analysis)

    def selection(self, analysis: "Analysis") -> Selection:
        """Resolve the plan to keep masks over the analysis' axes."""
        self.validate(analysis)
        masks: dict[int, np.ndarray] = {}
        head_of: dict[int, int] = {}
        for gid, keep in self.kept.items():
            g = analysis.group(gid)
            if keep and isinstance(keep[0], list):
                h = analysis.group(g.head_group)
                m = np.zeros((h.size, g.size), dtype=bool)
                for row, idx in enumerate(keep):
                    m[row, idx] = True
                head_of[g.axis] = h.axis
            else:
                m = np.zeros(g.size, dtype=bool)
                m[keep] = True
            masks[g.axis] = m
        return Selection(analysis.store, masks, head_of)

    # -- serialisation ------------------------------------------------------------------------
    def to_json(self, indent: Optional[int] = 1) -> str:
        """JSON text of the plan."""
        return json.dumps(
            {"vitgraph_plan": 1, "fingerprint": self.fingerprint, "input_shapes": self.input_shapes,
             "input_dtypes": self.input_dtypes, "kept": self.kept},
            indent=indent,
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Plan from :meth:`to_json` text."""
        try:
            d = json.loads(text)
            return cls(d["fingerprint"], d["input_shapes"], d.get("input_dtypes", ["float32"]), d["kept"])
        except (KeyError, TypeError, json.JSONDecodeError) as e:
            raise PlanError(f"not a vitgraph plan: {e}") from e

    def summary(self, analysis: "Analysis") -> str:
        """One line per changed group: id, kind, kept/total."""
        lines = []
        for g in analysis.groups:
            k = self.kept.get(g.id)
            if k is None:
                continue
            n = len(k[0]) if k and isinstance(k[0], list) else len(k)
            lines.append(f"{g.id:<32} {g.kind:<8} {n}/{g.size}")
        return "\n".join(lines) or "keeps everything"


def _ids(analysis: "Analysis") -> set[str]:
    return {g.id for g in analysis.groups}


def _unknown(gid: str) -> Any:
    raise PlanError(f"unknown group {gid!r}")


def _target_count(size: int, ratio: float, round_to: int, min_keep: int) -> int:
    n = size * (1.0 - ratio)
    if round_to > 1:
        n = max(round_to, round(n / round_to) * round_to)
    return int(min(size, max(1, min_keep, round(n))))


def _top(scores: torch.Tensor, n: int, per_head: bool) -> Keep:
    if scores.dim() == 2 and per_head:
        return [sorted(torch.topk(row, n).indices.tolist()) for row in scores]
    if scores.dim() == 2:
        scores = scores.sum(0)
    return sorted(torch.topk(scores, n).indices.tolist())


def _validate_entry(g: "ChannelGroup", keep: Keep, analysis: "Analysis") -> None:
    if not isinstance(keep, list) or not keep:
        raise PlanError(f"group {g.id!r}: empty keep-set (a group must keep at least one unit)")
    rows = keep if isinstance(keep[0], list) else None
    if rows is not None:
        if g.kind not in ("qk", "v"):
            raise PlanError(f"group {g.id!r} ({g.kind}): per-head keep-sets are only for qk and v groups")
        heads = analysis.group(g.head_group).size if g.head_group else None
        if heads is None or len(rows) != heads:
            raise PlanError(f"group {g.id!r}: per-head keep-sets need one row per head ({heads}), got {len(rows)}")
        if len({len(r) for r in rows}) != 1:
            raise PlanError(f"group {g.id!r}: every head must keep the same number of dims, got {[len(r) for r in rows]}")
        if not g.per_head and any(r != rows[0] for r in rows):
            raise PlanError(f"group {g.id!r}: its dims are shared across heads, so all heads must keep the same dims")
    for row in rows or [keep]:
        if not row:
            raise PlanError(f"group {g.id!r}: empty keep-set (a group must keep at least one unit)")
        if any(not isinstance(i, int) for i in row):
            raise PlanError(f"group {g.id!r}: indices must be integers")
        if any(i < 0 or i >= g.size for i in row):
            raise PlanError(f"group {g.id!r}: index out of range 0..{g.size - 1}: {[i for i in row if i < 0 or i >= g.size][:5]}")
        if len(set(row)) != len(row):
            raise PlanError(f"group {g.id!r}: repeated indices")
        if list(row) != sorted(row):
            raise PlanError(f"group {g.id!r}: indices must be sorted")
