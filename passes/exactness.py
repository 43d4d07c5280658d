"""Where a compressed model must equal the masked model, and how far two models' outputs are apart.

Masking is exact for the block kinds (``qk``, ``v``, ``head``, ``ffn``) when the group is not
normalised: zeroing a removed channel then changes nothing downstream but the removed terms.  The
residual stream and normalised widths are not exact (a layer norm over zeros is not one over
fewer channels), so checks restrict a plan to its exact part.
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch
from torch import nn

from vitgraph.analysis.kinds import BLOCK_KINDS


def keeps_all(g: Any, keep: Any) -> bool:
    """Whether ``keep`` keeps every unit of group ``g``."""
    if keep and isinstance(keep[0], (list, tuple)):
        return all(len(k) == g.size for k in keep)
    return len(keep) == g.size


def exact_plan(analysis: Any, plan: Any) -> Any:
    """``plan`` restricted to the groups whose masking is exact (block kinds, not normalised)."""
    kept, groups = {}, {g.id: g for g in analysis.groups}
    for gid, keep in plan.kept.items():
        g = groups.get(gid)
        if g is not None and g.kind in BLOCK_KINDS and not g.normalized and not keeps_all(g, keep):
            kept[gid] = keep
    return replace(plan, kept=kept)


def output_leaves(out: object) -> list[torch.Tensor]:
    """Every tensor in a model output, in order, through nested tuples, lists and dicts (a
    backbone's ``ModelOutput`` holds a tuple of feature maps)."""
    if isinstance(out, torch.Tensor):
        return [out]
    if isinstance(out, dict):
        out = list(out.values())
    if isinstance(out, (tuple, list)):
        return [t for x in out for t in output_leaves(x)]
    return []


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| / max |b| (0 for empty tensors)."""
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-12)) if b.numel() else 0.0


def output_error(slim: nn.Module, masked: nn.Module, xs: tuple[torch.Tensor, ...]) -> float:
    """Largest relative error over the output tensors of equal shape (a changed shape: inf), both
    models in eval mode (dropout would make any two runs differ); their modes are restored."""
    modes = [(m, m.training) for m in (*slim.modules(), *masked.modules())]
    try:
        slim.eval(), masked.eval()
        with torch.no_grad():
            got, want = output_leaves(slim(*xs)), output_leaves(masked(*xs))
    finally:
        for m, training in modes:
            m.training = training
    if len(got) != len(want):
        return float("inf")
    errs = [rel_err(a, b) if a.shape == b.shape else float("inf") for a, b in zip(got, want)]
    return max(errs, default=0.0)
