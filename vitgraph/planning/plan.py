"""Plan: what each channel group keeps. Plain data with JSON round-trip and validation."""
from __future__ import annotations

import json
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Iterable, Mapping, Optional, Sequence, Union

import numpy as np
import torch

from vitgraph.analysis.kinds import ALL_KINDS, PER_HEAD_KINDS, PRUNABLE_KINDS
from vitgraph.errors import PlanError
from vitgraph.gc_hold import holds_existing_objects
from vitgraph.analysis.selection import Selection

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis, ChannelGroup

Keep = Union[list[int], list[list[int]]]
PLAN_VERSION = 1  # the "vitgraph_plan" field of the JSON form; newer versions are refused
_FIELDS = ("vitgraph_plan", "fingerprint", "input_shapes", "input_dtypes", "kept", "prune_outputs")


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
    prune_outputs: bool = False  # made on an analysis that may prune model outputs (analyze(prune_outputs=True))

    # -- construction -------------------------------------------------------------------------
    @classmethod
    def keep_all(cls, analysis: "Analysis") -> "Plan":
        """The identity plan: every group keeps every channel."""
        _check_analysis(analysis)
        return cls(analysis.fingerprint, [list(s) for s in analysis.input_shapes], list(analysis.input_dtypes), {}, analysis,
                   analysis.prune_outputs)

    def keep(self, group_id: str, indices: Union[Sequence[int], Sequence[Sequence[int]], torch.Tensor, np.ndarray]) -> "Plan":
        """Set the kept indices of one group (validated now if the plan knows its analysis)."""
        if not isinstance(group_id, str):
            raise PlanError(f"group id must be a string, got {type(group_id).__name__} {group_id!r}")
        if not isinstance(indices, (list, tuple, range, torch.Tensor, np.ndarray)):
            raise PlanError(f"group {group_id!r}: indices must be a list of integers (or one list per head), "
                            f"got {type(indices).__name__}")
        keep = _plain(indices)
        _check_structure(group_id, keep)
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
        _check_analysis(analysis)
        _check_ratio(ratio)
        kinds = _check_kinds(kinds, ALL_KINDS)
        if not _is_int(seed):
            raise PlanError(f"seed must be an integer, got {type(seed).__name__} {seed!r}")
        gen = np.random.default_rng(int(seed))
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
    @holds_existing_objects
    def from_scores(
        cls,
        analysis: "Analysis",
        scores: Optional[Mapping[str, Optional[torch.Tensor]]] = None,
        ratio: Optional[float] = 0.5,
        kinds: Optional[Iterable[str]] = None,
        round_to: int = 1,
        min_keep: int = 1,
        align: Optional[str] = None,
    ) -> "Plan":
        """Keep the highest-scoring units of each selected group, removing ``ratio`` of each.

        ``scores`` maps group ids to 1-D importance per unit (or ``[heads, dims]`` for per-head
        ``qk``/``v`` groups); a missing or ``None`` entry means magnitude.  Kept channel counts are
        rounded to multiples of ``round_to`` (not for heads) and never fall below ``min_keep``.
        ``ratio=None`` takes each group's kept count from ``scores.keep`` (scores from a method
        that learns widths, such as ``vitgraph.score(..., "threshold")``).  ``align="kernels"``
        moves each count to the nearest one fused GPU kernels run fast (:mod:`vitgraph.planning.align`:
        equal q/k and v head dims in multiples of 8, at least 16; FFN and residual in multiples of 64).
        """
        from vitgraph.planning.align import check_align
        _check_analysis(analysis)
        if scores is not None and not isinstance(scores, Mapping):
            raise PlanError(f"scores must map group ids to score tensors, got {type(scores).__name__}")
        learned = getattr(scores, "keep", None) if ratio is None else None
        if ratio is None and not learned:
            raise PlanError("ratio=None needs scores that carry learned widths (scores.keep)")
        if ratio is not None:
            _check_ratio(ratio)
        for name, v in (("round_to", round_to), ("min_keep", min_keep)):
            if not _is_int(v) or v < 1:
                raise PlanError(f"{name} must be an integer >= 1, got {type(v).__name__} {v!r}")
        check_align(align)
        ids = _ids(analysis)
        unknown = sorted(str(k) for k in (scores or {}) if k not in ids)
        if unknown:
            raise PlanError(f"scores name groups the analysis does not have: {unknown[:5]} "
                            "(scores made for another model or analysis?)")
        if learned:
            if not isinstance(learned, Mapping):
                raise PlanError(f"scores.keep must map group ids to kept counts, got {type(learned).__name__}")
            for gid, k in learned.items():
                if gid not in ids:
                    raise PlanError(f"scores.keep names unknown group {gid!r}")
                if not _is_int(k):
                    raise PlanError(f"scores.keep[{gid!r}] must be an integer count, got {type(k).__name__} {k!r}")
            kinds = _check_kinds(kinds, tuple(dict.fromkeys(analysis.group(gid).kind for gid in learned)))
        kinds = _check_kinds(kinds, PRUNABLE_KINDS)
        scores = dict(scores or {})
        missing = [g.id for g in analysis.groups if g.kind in kinds and scores.get(g.id) is None]
        if missing:
            from vitgraph.planning.magnitude import magnitude_scores

            scores.update(magnitude_scores(analysis, missing))
        plan = cls.keep_all(analysis)
        counts: dict[str, int] = {}
        for g in analysis.groups:
            if g.kind not in kinds:
                continue
            if learned:
                if g.id not in learned:
                    continue
                counts[g.id] = int(min(g.size, max(1, min_keep, learned[g.id])))
            else:
                counts[g.id] = _target_count(g.size, ratio, 1 if g.kind == "head" else int(round_to), int(min_keep))
        if align is not None:
            counts = _aligned_counts(analysis, counts, int(round_to), int(min_keep), align)
        for gid, n in counts.items():
            g = analysis.group(gid)
            plan.kept[g.id] = _top(_score_tensor(g, scores[g.id], analysis), n, g.per_head)
        return plan

    # -- checks -------------------------------------------------------------------------------
    def validate(self, analysis: "Analysis") -> None:
        """Raise :class:`PlanError` unless the plan fits ``analysis`` exactly."""
        _check_analysis(analysis)
        self.check_fields()
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

    def check_fields(self) -> None:
        """Raise :class:`PlanError` unless every field has the right type and form (no analysis
        needed: index ranges are checked by :meth:`validate`)."""
        if not isinstance(self.fingerprint, str):
            raise PlanError(f"plan field 'fingerprint' must be a string, got {type(self.fingerprint).__name__}")
        shapes, dtypes = self.input_shapes, self.input_dtypes
        if not isinstance(shapes, (list, tuple)) or not shapes:
            raise PlanError(f"plan field 'input_shapes' must be a non-empty list of shapes, got {shapes!r:.80}")
        for i, sh in enumerate(shapes):
            if not isinstance(sh, (list, tuple)) or not all(_is_int(d) and d >= 0 for d in sh):
                raise PlanError(f"plan field 'input_shapes'[{i}] must be a list of non-negative integers, got {sh!r:.80}")
        if not isinstance(dtypes, (list, tuple)) or not all(isinstance(d, str) for d in dtypes):
            raise PlanError(f"plan field 'input_dtypes' must be a list of dtype names, got {dtypes!r:.80}")
        if len(dtypes) != len(shapes):
            raise PlanError(f"plan field 'input_dtypes' names {len(dtypes)} dtypes for {len(shapes)} input_shapes")
        for d in dtypes:
            if not isinstance(getattr(torch, d, None), torch.dtype):
                raise PlanError(f"plan field 'input_dtypes' names unknown dtype {d!r}")
        if not isinstance(self.prune_outputs, bool):
            raise PlanError(f"plan field 'prune_outputs' must be true or false, got {self.prune_outputs!r:.80}")
        if not isinstance(self.kept, dict):
            raise PlanError(f"plan field 'kept' must map group ids to kept indices, got {type(self.kept).__name__}")
        for gid, keep in self.kept.items():
            if not isinstance(gid, str):
                raise PlanError(f"plan field 'kept': group ids must be strings, got {gid!r}")
            _check_structure(gid, keep)

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
            {"vitgraph_plan": PLAN_VERSION, "fingerprint": self.fingerprint, "input_shapes": self.input_shapes,
             "input_dtypes": self.input_dtypes, "kept": self.kept}
            | ({"prune_outputs": True} if self.prune_outputs else {}),
            indent=indent,
        )

    @classmethod
    def from_json(cls, text: str) -> "Plan":
        """Plan from :meth:`to_json` text (every field checked; index ranges at :meth:`validate`)."""
        if not isinstance(text, (str, bytes, bytearray)):
            raise PlanError(f"not a vitgraph plan: expected JSON text, got {type(text).__name__}")
        try:
            d = json.loads(text)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise PlanError(f"not a vitgraph plan: invalid JSON: {e}") from e
        if not isinstance(d, dict):
            raise PlanError(f"not a vitgraph plan: expected a JSON object, got {type(d).__name__}")
        if "vitgraph_plan" not in d:
            raise PlanError("not a vitgraph plan: missing field 'vitgraph_plan' (the format version)")
        version = d["vitgraph_plan"]
        if not _is_int(version) or version < 1:
            raise PlanError(f"not a vitgraph plan: field 'vitgraph_plan' must be a format version number, got {version!r}")
        if version > PLAN_VERSION:
            raise PlanError(f"plan format version {version} (field 'vitgraph_plan') is newer than this vitgraph reads "
                            f"(up to {PLAN_VERSION}): upgrade vitgraph")
        missing = [k for k in ("fingerprint", "input_shapes", "kept") if k not in d]
        if missing:
            raise PlanError(f"not a vitgraph plan: missing field(s) {missing}")
        extra = sorted(set(d) - set(_FIELDS))
        if extra:
            raise PlanError(f"not a vitgraph plan: unknown field(s) {extra}")
        plan = cls(d["fingerprint"], d["input_shapes"], d.get("input_dtypes", ["float32"] * _len(d["input_shapes"])), d["kept"],
                   prune_outputs=d.get("prune_outputs", False))
        plan.check_fields()
        return plan

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


def _aligned_counts(analysis: "Analysis", counts: dict[str, int], round_to: int, min_keep: int,
                    align: str) -> dict[str, int]:
    """``counts`` moved to the nearest the alignment allows; each attention's q/k and v keep the
    smaller of their two counts (both dense where only one of them is planned)."""
    from vitgraph.planning.align import aligned_count, attention_pairs

    out = {gid: aligned_count(analysis.group(gid), n, round_to, min_keep, align) for gid, n in counts.items()}
    for gid in out:
        g = analysis.group(gid)
        if g.kind in PER_HEAD_KINDS and g.head_group is None:  # no attention to match it in
            out[gid] = g.size
    for qk, v in attention_pairs(analysis).values():
        pair = [g for g in (qk, v) if g is not None and g.id in out]
        if len(pair) == 2 and qk.size == v.size:
            out[qk.id] = out[v.id] = min(out[qk.id], out[v.id])
        else:
            for g in pair:
                out[g.id] = g.size
    return out


def _top(scores: torch.Tensor, n: int, per_head: bool) -> Keep:
    if scores.dim() == 2 and per_head:
        return [sorted(torch.topk(row, n).indices.tolist()) for row in scores]
    if scores.dim() == 2:
        scores = scores.sum(0)
    return sorted(torch.topk(scores, n).indices.tolist())


def _is_int(v: Any) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, (bool, np.bool_))


def _len(v: Any) -> int:
    return len(v) if isinstance(v, (list, tuple)) else 1


def _plain(x: Any) -> Any:
    """Tensors, arrays, tuples and numpy integers as plain lists and ints (anything else as is)."""
    if isinstance(x, (torch.Tensor, np.ndarray)):
        x = x.tolist()
    if isinstance(x, (list, tuple, range)):
        return [_plain(v) for v in x]
    if isinstance(x, np.integer):
        return int(x)
    return x


def _check_analysis(analysis: Any) -> None:
    from vitgraph.analysis.engine import Analysis

    if not isinstance(analysis, Analysis):
        raise PlanError(f"expected a vitgraph.Analysis (from vitgraph.analyze), got {type(analysis).__name__}")


def _check_ratio(ratio: Any) -> None:
    if not isinstance(ratio, (int, float, np.floating, np.integer)) or isinstance(ratio, (bool, np.bool_)):
        raise PlanError(f"ratio must be a number in [0, 1), got {type(ratio).__name__} {ratio!r}")
    if not 0.0 <= float(ratio) < 1.0:
        raise PlanError(f"ratio must be in [0, 1), got {ratio}")


def _check_kinds(kinds: Any, default: tuple[str, ...]) -> tuple[str, ...]:
    if kinds is None:
        return default
    if isinstance(kinds, str):  # one kind
        kinds = (kinds,)
    try:
        kinds = tuple(kinds)
    except TypeError:
        raise PlanError(f"kinds must be a list of group kinds, got {type(kinds).__name__}") from None
    bad = [k for k in kinds if k not in ALL_KINDS]
    if bad:
        raise PlanError(f"unknown group kinds {bad}; expected some of {list(ALL_KINDS)}")
    return kinds


def _score_tensor(g: "ChannelGroup", v: Any, analysis: "Analysis") -> torch.Tensor:
    """The scores of one group as a float64 tensor of a shape that fits it, all finite."""
    try:
        s = torch.as_tensor(_plain(v) if not isinstance(v, torch.Tensor) else v.detach(), dtype=torch.float64).cpu()
    except (TypeError, ValueError, RuntimeError) as e:
        raise PlanError(f"group {g.id!r}: scores must be numbers, got {type(v).__name__}: {e}") from e
    heads = analysis.group(g.head_group).size if g.head_group else None
    ok = s.shape == (g.size,) or (
        s.dim() == 2 and g.kind in PER_HEAD_KINDS and s.shape[1] == g.size and s.shape[0] >= 1
        and (heads is None or s.shape[0] == heads))
    if not ok:
        want = f"({g.size},)" + (f" or ({heads}, {g.size})" if heads else "")
        raise PlanError(f"group {g.id!r}: scores have shape {tuple(s.shape)}, expected {want}")
    if not bool(torch.isfinite(s).all()):
        bad = int((~torch.isfinite(s)).sum())
        raise PlanError(f"group {g.id!r}: {bad} of {s.numel()} scores are NaN or infinite")
    return s


_INT_TYPE = {int}


def _check_structure(gid: str, keep: Any) -> None:
    """A keep-set's form: a list of integers, or a list of per-head lists of integers."""
    if not isinstance(keep, list):
        raise PlanError(f"group {gid!r}: kept indices must be a list of integers (or one list per head), "
                        f"got {type(keep).__name__}")
    if not keep:
        raise PlanError(f"group {gid!r}: empty keep-set (a group must keep at least one unit)")
    if set(map(type, keep)) <= _INT_TYPE:  # (a flat list of ints, the common case, checked at C speed)
        return
    nested = [isinstance(r, list) for r in keep]
    if any(nested) and not all(nested):
        raise PlanError(f"group {gid!r}: kept indices mix integers and per-head lists")
    for row in keep if all(nested) else [keep]:
        if set(map(type, row)) <= _INT_TYPE:  # (the common case, checked at C speed)
            continue
        bad = [i for i in row if not _is_int(i)]
        if bad:
            raise PlanError(f"group {gid!r}: indices must be integers, got {bad[0]!r} ({type(bad[0]).__name__})")


def _validate_entry(g: "ChannelGroup", keep: Keep, analysis: "Analysis") -> None:
    _check_structure(g.id, keep)
    rows = keep if isinstance(keep[0], list) else None
    if rows is not None:
        if g.kind not in PER_HEAD_KINDS:
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
        if min(row) < 0 or max(row) >= g.size:
            raise PlanError(f"group {g.id!r}: index out of range 0..{g.size - 1}: {[i for i in row if i < 0 or i >= g.size][:5]}")
        if len(set(row)) != len(row):
            raise PlanError(f"group {g.id!r}: repeated indices")
        if list(row) != sorted(row):
            raise PlanError(f"group {g.id!r}: indices must be sorted")
