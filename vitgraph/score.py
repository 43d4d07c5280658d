"""``vitgraph.score``: one entry point for the importance criteria.

    scores = vitgraph.score(model, an, "hessian", data=loader)
    plan = vitgraph.Plan.from_scores(an, scores, ratio=0.5)

Every method returns a :class:`Scores` mapping group id -> per-unit importance (``[heads, dims]``
for per-head q/k and v groups, ``[heads]`` for head groups), higher meaning keep.
"""
from __future__ import annotations

import logging
from typing import Any, Callable, Iterable, Optional

import torch
from torch import nn

from .analysis import Analysis

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
      (options: ``mode="fisher"|"hvp"``, ``kind_factors``, ``h``, ``probes``, ``max_batches``).
    * ``kl``: UP-ViT's KL divergence of the output when the unit is removed, over ``data`` as the
      proxy set (options: ``mode="approx"|"exact"``, ``chunk``, ``samples``).
    * ``threshold``: WDPruning's learnable saliency scores and keep-ratio thresholds, trained
      toward ``target`` (fraction of params or FLOPs kept); the result carries kept widths.

    ``data`` yields ``(inputs, targets)`` batches; ``loss_fn(output, targets)`` defaults to
    cross-entropy.  Under torchrun the batches are split over ranks and scores summed.
    """
    if method not in METHODS:
        raise ValueError(f"unknown score method {method!r}; choose one of {METHODS}")
    if analysis.model is not None and analysis.model is not model:
        raise ValueError("the analysis belongs to a different model: analyze this model first")
    if method != "magnitude" and data is None:
        raise ValueError(f"score method {method!r} needs data: an iterable of (inputs, targets) batches")
    if method == "magnitude":
        from vitgraph.passes.magnitude import magnitude_scores

        _no_options(method, options, {"group_ids"})
        return Scores(magnitude_scores(analysis, options.get("group_ids")), method)
    if method == "hessian":
        from vitgraph.passes.hessian import hessian_scores

        return Scores(hessian_scores(analysis, data, loss_fn, **options), method)
    if method == "kl":
        from vitgraph.passes.kl import kl_scores

        if loss_fn is not None:
            raise ValueError("the kl method compares output distributions and takes no loss_fn")
        return Scores(kl_scores(analysis, data, **options), method)
    from vitgraph.passes.threshold import learn_thresholds

    res = learn_thresholds(model, analysis, data, loss_fn, **options)
    return Scores(dict(res.scores), method, keep=dict(res.keep), info={"result": res})


def _no_options(method: str, options: dict, allowed: set) -> None:
    bad = sorted(set(options) - allowed)
    if bad:
        raise ValueError(f"score method {method!r} takes no options {bad}")
