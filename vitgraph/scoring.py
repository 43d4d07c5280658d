"""``vitgraph.scoring``: :func:`vitgraph.score`, one entry point for the importance criteria.

    scores = vitgraph.score(model, an, "hessian", data=loader)
    plan = vitgraph.Plan.from_scores(an, scores, ratio=0.5)

Every method returns a :class:`Scores` mapping group id -> per-unit importance (``[heads, dims]``
for per-head q/k and v groups, ``[heads]`` for head groups), higher meaning keep.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn

from vitgraph.analysis.engine import Analysis
from vitgraph.errors import ScoreError

log = logging.getLogger("vitgraph.score")

METHODS = ("magnitude", "hessian", "kl", "threshold")


class Scores(dict):
    """Per-unit scores by group id, with the method that made them.

    ``keep`` is set by methods that also decide widths (learnable thresholds): the number of
    units each group keeps; ``Plan.from_scores(an, scores, ratio=None)`` then honours it.
    """

    def __init__(self, data: dict, method: str, keep: Optional[dict[str, int]] = None, info: Optional[dict] = None) -> None:
        super().__init__(data)
        self.method = method
        self.keep = keep
        self.info = info or {}


def score(
    model: nn.Module,
    analysis: Analysis,
    method: str = "magnitude",
    data: Optional[Iterable[Any]] = None,
    loss_fn: Optional[Callable[[Any, Any], torch.Tensor]] = None,
    **options: Any,
) -> Scores:
    """Score every prunable unit of ``model`` by ``method``.

    * ``magnitude``: L2 norm of the unit's weights (no data).
    * ``hessian``: NViT's Hessian-aware saliency, normalised across kinds for one global ranking
      (options: ``mode="fisher"|"batch"|"hvp"``, ``joint``, ``kind_factors``, ``h``, ``probes``,
      ``max_batches``, ``chunk``).
    * ``kl``: UP-ViT's KL divergence of the output when the unit is removed, over ``data`` as the
      proxy set (options: ``mode="approx"|"exact"``, ``joint``, ``chunk``, ``samples``,
      ``max_exact_classes``).

    ``joint`` (default True; fisher and approx modes) ranks the units of each group by the greedy
    removal order of the second-order form over the removed set, cross terms included
    (``passes.joint``); ``joint=False`` ranks by the diagonal, each unit as if removed alone.
    * ``threshold``: WDPruning's learnable saliency scores and keep-ratio thresholds, trained
      toward ``target`` (fraction of params or FLOPs kept); the result carries kept widths.

    ``data`` yields ``(inputs, targets)`` batches; ``loss_fn(output, targets)`` defaults to
    cross-entropy.  Under torchrun the batches are split over ranks and scores summed.
    """
    if not isinstance(model, nn.Module):
        raise ScoreError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if not isinstance(analysis, Analysis):
        raise ScoreError(f"analysis must be a vitgraph.Analysis (from vitgraph.analyze), got {type(analysis).__name__}")
    if not isinstance(method, str) or method not in METHODS:
        raise ScoreError(f"unknown score method {method!r}; choose one of {METHODS}")
    if analysis.model is not None and analysis.model is not model:
        raise ScoreError("the analysis belongs to a different model: analyze this model first")
    if loss_fn is not None and not callable(loss_fn):
        raise ScoreError(f"loss_fn must be callable, got {type(loss_fn).__name__}")
    if method == "magnitude":
        from vitgraph.planning.magnitude import magnitude_scores

        _no_options(method, options, {"group_ids"})
        ids = options.get("group_ids")
        if ids is not None:
            ids = [ids] if isinstance(ids, str) else list(ids)
            known = {g.id for g in analysis.groups}
            unknown = [i for i in ids if i not in known]
            if unknown:
                raise ScoreError(f"group_ids names groups the analysis does not have: {unknown[:5]}")
        return Scores(magnitude_scores(analysis, ids), method)
    if data is None:
        raise ScoreError(f"score method {method!r} needs data: an iterable of (inputs, targets) batches")
    mb = options.get("max_batches")
    if method in ("hessian", "kl") and mb is not None and (isinstance(mb, bool) or not isinstance(mb, int) or mb < 1):
        raise ScoreError(f"score method {method!r}: max_batches must be an integer >= 1 (or None for all), got {mb!r}")
    if not (method == "threshold" and options.get("steps") == 0):  # (0 steps: the initial scores, no data read)
        data = _batches(method, data)
    if method == "hessian":
        from vitgraph.passes.hessian import hessian_scores

        out = Scores(hessian_scores(analysis, data, loss_fn, **options), method)
    elif method == "kl":
        from vitgraph.passes.kl import kl_scores

        if loss_fn is not None:
            raise ScoreError("the kl method compares output distributions and takes no loss_fn")
        out = Scores(kl_scores(analysis, data, **options), method)
    else:
        from vitgraph.passes.threshold import learn_thresholds

        res = learn_thresholds(model, analysis, data, loss_fn, **options)
        out = Scores(dict(res.scores), method, keep=dict(res.keep), info={"result": res})
    if isinstance(data, _Counted) and data.count == 0:
        raise ScoreError(f"score method {method!r}: data yielded no batches (scores from no data are meaningless)")
    return out


def method_for(method: str, objective: str) -> tuple[str, str]:
    """The score method run for ``method`` under ``objective`` and, when it differs, why.

    ``hessian`` ranks by the empirical Fisher of the training loss, which needs labels on class
    logits: feature distillation from the model itself has no gradient at the dense model.  Under
    ``"features"`` the units are therefore scored by ``kl``, the Fisher of the output distribution
    (Gaussian on the output tensors), whose second-order form is the feature-distillation error.
    """
    if method == "hessian" and objective == "features":
        return "kl", ("hessian needs labelled class logits (its empirical Fisher of a distillation loss is zero at "
                      "the dense model), so the units were scored by kl: the Fisher of the output distribution, "
                      "Gaussian on the output tensors")
    return method, ""


class _Counted:
    """An iterable without a length (a generator, a streaming loader), counting the batches it
    yields over all passes: empty data is only found by reading it."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data, self.count = data, 0

    def __iter__(self) -> Iterator[Any]:
        for batch in self.data:
            self.count += 1
            yield batch


def _batches(method: str, data: Any) -> Any:
    """``data`` as given when it has a length (refused if 0), else wrapped to count its batches."""
    if isinstance(data, (str, bytes)) or not isinstance(data, Iterable):
        raise ScoreError(f"score method {method!r}: data must be an iterable of (inputs, targets) batches, "
                         f"got {type(data).__name__}")
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        return _Counted(data)
    if n == 0:
        raise ScoreError(f"score method {method!r}: data is empty (no batches to score on)")
    return data


def _no_options(method: str, options: dict, allowed: set) -> None:
    bad = sorted(set(options) - allowed)
    if bad:
        raise ScoreError(f"score method {method!r} takes no options {bad}")


def save_scores(path: Any, scores: Scores, fingerprint: str = "") -> None:
    """Write ``scores`` to ``path`` as safetensors (data, never pickle): one tensor per group id,
    the method, the analysis fingerprint and ``keep`` in the file's metadata."""
    import json

    from safetensors.torch import save_file

    tensors = {gid: torch.as_tensor(s).detach().float().contiguous().cpu() for gid, s in scores.items()}
    meta = {"vitgraph_scores": "1", "method": scores.method, "fingerprint": fingerprint,
            "keep": json.dumps(scores.keep)}
    save_file(tensors, str(path), metadata=meta)


def load_scores(path: Any) -> tuple[Scores, str]:
    """The scores saved by :func:`save_scores` and the fingerprint of the analysis they were made
    on; a file that is not one is a :class:`ScoreError` naming it."""
    import json

    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
            data = {k: f.get_tensor(k) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise ScoreError(f"{path} is not a vitgraph scores file (safetensors from vitgraph score): {e}") from e
    if meta.get("vitgraph_scores") != "1":
        raise ScoreError(f"{path} is a safetensors file but not vitgraph scores (no 'vitgraph_scores' metadata)")
    try:
        keep = json.loads(meta.get("keep", "null"))
    except json.JSONDecodeError as e:
        raise ScoreError(f"{path}: metadata field 'keep' is not JSON: {e}") from e
    return Scores(data, meta.get("method", ""), keep=keep), meta.get("fingerprint", "")
