"""Public entry points: compress, mask, and resolving the analysis a plan belongs to."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from vitgraph.analysis.engine import Analysis, analyze, require_module
from vitgraph.gc_hold import holds_existing_objects
from vitgraph.errors import PlanError, VitgraphError
from vitgraph.planning.plan import Plan


def _dtype(name: str) -> torch.dtype:
    dt = getattr(torch, name, None)
    if not isinstance(dt, torch.dtype):
        raise PlanError(f"plan names unknown input dtype {name!r}")
    return dt


def _plan_inputs(plan: Plan) -> tuple[torch.Tensor, ...]:
    """Zero tensors of the plan's input shapes and dtypes (the inputs its analysis was made on)."""
    try:
        return tuple(torch.zeros(s, dtype=_dtype(d)) for s, d in zip(plan.input_shapes, plan.input_dtypes))
    except (RuntimeError, MemoryError) as e:
        raise PlanError(f"cannot make inputs of the plan's input_shapes {plan.input_shapes}: {e}") from e


def analysis_for(model: nn.Module, plan: Plan, analysis: Optional[Analysis] = None) -> Analysis:
    """The analysis of ``model`` the plan applies to (reused when the plan carries it)."""
    if not isinstance(plan, Plan):
        raise PlanError(f"expected a vitgraph.Plan, got {type(plan).__name__}")
    require_module(model)
    if analysis is not None and not isinstance(analysis, Analysis):
        raise PlanError(f"analysis must be a vitgraph.Analysis, got {type(analysis).__name__}")
    plan.check_fields()
    an = analysis or plan.analysis
    if an is None or an.model is not model or an.prune_outputs != plan.prune_outputs:
        inputs = _plan_inputs(plan)
        try:
            an = analyze(model, inputs, prune_outputs=plan.prune_outputs)
        except VitgraphError as e:  # the plan was made on a model that ran on these inputs
            raise PlanError(
                f"the plan does not fit the model: it cannot be analysed at the plan's input_shapes "
                f"{plan.input_shapes} ({', '.join(plan.input_dtypes)}): {e}"
            ) from e
    plan.validate(an)
    return an


def _same_modes(out: nn.Module, model: nn.Module) -> nn.Module:
    """Give ``out`` and its submodules the training flags of ``model``'s modules of the same names."""
    flags = {name: m.training for name, m in model.named_modules()}
    for name, m in out.named_modules():
        m.training = flags.get(name, model.training)
    return out


@holds_existing_objects
def compress(model: nn.Module, plan: Plan, analysis: Optional[Analysis] = None, *,
             keep_api: bool = True) -> nn.Module:
    """A new, smaller module that computes what ``plan`` keeps of ``model``; ``model`` is untouched.

    The result is in the model's mode (train or eval, module by module).  With ``keep_api`` it
    also offers the model's public tensor methods (``forward_features``, ``forward_head``, ...),
    its plain attributes (``num_classes``, ``pretrained_cfg``, an HF ``config``) and
    ``reset_classifier`` (see ``vitgraph.passes.keep_api``).
    """
    from vitgraph.passes.keep_api import keep_api as attach
    from vitgraph.passes.slim import slim

    an = analysis_for(model, plan, analysis)
    out = _same_modes(slim(an, plan.selection(an)), model)
    return attach(out, model, an, plan, _plan_inputs(plan)) if keep_api else out


@holds_existing_objects
def mask(model: nn.Module, plan: Plan, analysis: Optional[Analysis] = None) -> nn.Module:
    """A dense copy of ``model`` with the channels ``plan`` removes set to zero (in the model's mode)."""
    from vitgraph.passes.mask import apply_mask

    an = analysis_for(model, plan, analysis)
    return _same_modes(apply_mask(model, an, plan.selection(an)), model)
