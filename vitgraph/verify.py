"""The safety net: a compressed model must equal the masked model where masking is exact.

:func:`verify_compressed` runs the compressed model and the dense model with the removed channels
zeroed on one input, for the groups whose masking is exact (``qk``, ``v``, ``head`` and ``ffn``
groups that are not normalised), and raises :class:`CompressionMismatchError` naming the group
and the first op whose outputs differ.  On success it costs one forward of each model (a second
compressed model is built, not run twice, when the plan also prunes groups masking cannot model).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Any, Optional, Sequence, Union

import torch
import torch.fx as fx
from torch import nn

from vitgraph.analysis.context import META_KEY, TensorDims
from vitgraph.errors import CompressionMismatchError, PlanError
from vitgraph.passes.exactness import exact_plan, keeps_all, output_error, rel_err
from vitgraph.planning.plan import Plan

VERIFY_TOL = 1e-4  # max |compressed - masked| / max |masked|, per output tensor

Inputs = Union[torch.Tensor, Sequence[torch.Tensor]]


def verify_compressed(model: nn.Module, slim: nn.Module, plan: Plan, analysis: Any = None,
                      inputs: Optional[Inputs] = None, tol: float = VERIFY_TOL) -> float:
    """Check ``slim`` (``compress(model, plan)``) against the masked ``model`` on ``inputs``.

    Only the plan's exact groups are compared (see :func:`exact_plan`); when the plan prunes
    other groups too (the residual stream, normalised widths), a model compressed with the exact
    groups alone stands in for ``slim``.  ``inputs`` defaults to seeded random tensors of the
    plan's input shapes.  Returns the largest relative error of an output tensor (0.0 when no
    group is comparable); raises :class:`CompressionMismatchError` above ``tol``, naming the
    group and, where it can be found, the first op whose kept outputs differ.
    """
    from vitgraph.api import analysis_for, compress, mask

    an = analysis_for(model, plan, analysis)
    sub = exact_plan(an, plan)
    if not sub.kept:
        return 0.0
    xs = _inputs(plan, inputs)
    groups = {g.id: g for g in an.groups}
    pruned = {g: k for g, k in plan.kept.items() if g in groups and not keeps_all(groups[g], k)}
    candidate = slim if sub.kept == pruned else compress(model, sub, an, keep_api=False)
    masked = mask(model, sub, an)
    err = output_error(candidate, masked, xs)
    if err <= tol:
        return err
    again = output_error(masked, masked, xs)  # (only on a mismatch: is the model itself repeatable?)
    if again > tol:
        raise CompressionMismatchError(
            f"cannot check the compressed model: the model gives different outputs on the same input "
            f"(two runs differ by {again:.1e}; random masking or sampling in forward?); `--no-check` "
            "(check=False) skips this check", group="", op=None)
    gid, gerr = _culprit(model, an, sub, xs, tol)
    one = replace(sub, kept={gid: sub.kept[gid]})
    where = _first_divergent_op(an, one, compress(model, one, an, keep_api=False), xs, tol)
    g = an.group(gid)
    raise CompressionMismatchError(
        f"the compressed model differs from the masked model by {err:.1e} (relative, tolerance {tol:.0e}) "
        f"on the example input; group {gid!r} ({g.kind}, {g.size} units) alone differs by {gerr:.1e}"
        + (f"; first differing op: {where}" if where else "")
        + ". This is a vitgraph bug: please report it; `--no-check` (check=False) skips this check.",
        group=gid, op=where,
    )


def _inputs(plan: Plan, inputs: Optional[Inputs]) -> tuple[torch.Tensor, ...]:
    if inputs is None:
        gen = torch.Generator().manual_seed(0)
        out = []
        for shape, dt in zip(plan.input_shapes, plan.input_dtypes):
            dtype = getattr(torch, dt, None)
            if not isinstance(dtype, torch.dtype):
                raise PlanError(f"plan names unknown input dtype {dt!r}")
            out.append(torch.randn(shape, generator=gen).to(dtype) if dtype.is_floating_point
                       else torch.zeros(shape, dtype=dtype))
        return tuple(out)
    return (inputs,) if isinstance(inputs, torch.Tensor) else tuple(inputs)


def _culprit(model: nn.Module, an: Any, sub: Plan, xs: tuple, tol: float) -> tuple[str, float]:
    """The first group of ``sub`` that differs on its own (by halving the groups), and its error."""
    from vitgraph.api import compress, mask

    def err(ids: list[str]) -> float:
        part = replace(sub, kept={g: sub.kept[g] for g in ids})
        return output_error(compress(model, part, an, keep_api=False), mask(model, part, an), xs)

    ids = list(sub.kept)
    while len(ids) > 1:
        half = ids[: len(ids) // 2]
        ids = half if err(half) > tol else ids[len(ids) // 2:]
    return ids[0], err(ids)


class _Recorder(fx.Interpreter):
    """Runs a GraphModule and keeps every node's tensor output by node name."""

    def __init__(self, gm: fx.GraphModule) -> None:
        super().__init__(gm)
        self.values: dict[str, torch.Tensor] = {}

    def run_node(self, n: fx.Node) -> Any:
        out = super().run_node(n)
        if isinstance(out, torch.Tensor):
            self.values[n.name] = out.detach()
        return out


def _first_divergent_op(an: Any, one: Plan, slim: nn.Module, xs: tuple, tol: float) -> Optional[str]:
    """The first node (in graph order) whose kept outputs differ between the masked analysed graph
    and ``slim``, formatted; ``None`` when the graphs cannot be compared node by node."""
    from vitgraph.passes.mask import apply_mask, kept_elements

    if not isinstance(slim, fx.GraphModule):
        return None
    sel = one.selection(an)
    masked = apply_mask(an.graph_module, an, sel)
    try:
        with torch.no_grad():
            rm, rs = _Recorder(masked), _Recorder(slim)
            rm.run(*xs)
            rs.run(*xs)
    except Exception:  # noqa: BLE001 - localising is best effort; the mismatch is reported anyway
        return None
    for node in an.graph_module.graph.nodes:
        m, s = rm.values.get(node.name), rs.values.get(node.name)
        td = node.meta.get(META_KEY)
        if m is None or s is None or not isinstance(td, TensorDims) or len(td.dims) != m.dim():
            continue
        keep = kept_elements(m.shape, td.dims, sel)
        want = m if keep is None else m[keep]
        if want.numel() != s.numel():
            continue
        if rel_err(s.reshape(-1), want.reshape(-1)) > tol:
            return node.format_node()
    return None
