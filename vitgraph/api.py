"""Public entry points: compress, mask, and resolving the analysis a plan belongs to."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .analysis import Analysis, analyze
from .errors import PlanError
from .plan import Plan


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise PlanError(f"plan names unknown input dtype {name!r}")
    return dt


def analysis_for(model: nn.Module, plan: Plan, analysis: Optional[Analysis] = None) -> Analysis:
    """The analysis of ``model`` the plan applies to (reused when the plan carries it)."""
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a vitgraph.Plan, got {type(plan).__name__}")
    an = analysis or plan.analysis
    if an is None or an.model is not model:
        inputs = tuple(torch.zeros(s, dtype=_dtype(d)) for s, d in zip(plan.input_shapes, plan.input_dtypes))
        an = analyze(model, inputs)
    plan.validate(an)
    return an


def compress(model: nn.Module, plan: Plan, analysis: Optional[Analysis] = None) -> nn.Module:
    """A new, smaller module that computes what ``plan`` keeps of ``model``; ``model`` is untouched."""
    from vitgraph.passes.slim import slim

    an = analysis_for(model, plan, analysis)
    return slim(an, plan.selection(an))


def mask(model: nn.Module, plan: Plan, analysis: Optional[Analysis] = None) -> nn.Module:
    """A dense copy of ``model`` with the channels ``plan`` removes set to zero."""
    from vitgraph.passes.mask import apply_mask

    an = analysis_for(model, plan, analysis)
    return apply_mask(model, an, plan.selection(an))
