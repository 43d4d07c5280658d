"""Reconstruction pass: refit, in closed form, every layer that reads pruned channels.

After a plan is applied, a Linear whose input lost channels (an FFN's down projection reading the
kept hidden units, an attention output projection reading the kept v dims and heads, every
projection reading a narrowed residual stream) computes less than it did.  This pass refits each
such layer so that, on a calibration set, its output matches the dense layer's output on the dense
model's activations (only the output rows the plan keeps):

    min_{W, b}  sum_t || W x_t + b - y_t ||^2 + lam ||W||^2,    y_t = W_dense x_dense_t + b_dense

with ``x_t`` the slim model's input to the layer (the layers before it already refitted, so each
layer is fitted on the inputs it will see) and a relative ridge ``lam = damping * mean(diag(S))``
on the centred second moment ``S`` of the inputs.  The intercept is the mean fold: with ``W``
fixed, the best ``b`` is ``mean(y) - W mean(x)``, which puts the mean of what the removed channels
contributed into the bias (``mode="bias"`` does only that, at no solve cost).

Consumers are found from the analysis, not from names: every ``nn.Linear`` called once in the
graph whose weight's input dim the plan narrows.  Both graphs are run node by node over all
calibration batches at once (each node once per batch per model), so the whole pass costs one
dense and one slim forward over the calibration set plus one solve per consumer; the live values
of one graph cut are held per batch.  A refit that would raise the layer's calibration error
(possible with damping) is not applied, and a layer with fewer calibration rows than twice its
kept inputs (a classifier reading one token per image) gets the mean fold only.
"""
from __future__ import annotations

import logging
import sys
from dataclasses import dataclass
from typing import Any, Iterable, Optional

import torch
import torch.fx as fx
from torch import nn

from vitgraph.errors import VitgraphError

log = logging.getLogger("vitgraph.reconstruct")

MODES = ("ridge", "bias")


@dataclass(frozen=True)
class LayerFit:
    """One refitted consumer: calibration error (sum of squares over kept outputs) before and after."""

    name: str
    in_kept: int
    in_dense: int
    error_before: float
    error_after: float
    applied: bool

    def __str__(self) -> str:
        state = "refit" if self.applied else "kept (refit was not better)"
        return (f"{self.name}: {self.in_kept}/{self.in_dense} inputs, error {self.error_before:.4g} -> "
                f"{self.error_after:.4g} ({state})")


class _GraphRunner:
    """Runs a GraphModule node by node over several batches, freeing values after their last use."""

    def __init__(self, gm: fx.GraphModule, batches: list[tuple[Any, ...]]) -> None:
        self.nodes = [n for n in gm.graph.nodes if n.op != "output"]
        self.pos = 0
        last: dict[fx.Node, int] = {}
        for i, n in enumerate(self.nodes):
            for a in n.all_input_nodes:
                last[a] = i
        self.free_after: dict[int, list[fx.Node]] = {}
        for n, i in last.items():
            self.free_after.setdefault(i, []).append(n)
        self.interps = []
        for inputs in batches:
            it = fx.Interpreter(gm, garbage_collect_values=False)
            it.env = {}
            it.args_iter = iter(inputs)
            self.interps.append(it)

    def node_named(self, name: str) -> Optional[fx.Node]:
        return next((n for n in self.nodes[self.pos:] if n.name == name), None)

    def run_until(self, stop: Optional[fx.Node]) -> None:
        """Evaluate the nodes before ``stop`` (all remaining ones when ``stop`` is None)."""
        while self.pos < len(self.nodes) and self.nodes[self.pos] is not stop:
            self._step()

    def _step(self) -> None:
        i, node = self.pos, self.nodes[self.pos]
        for it in self.interps:
            it.env[node] = it.run_node(node)
        for dead in self.free_after.get(i, ()):
            for it in self.interps:
                it.env.pop(dead, None)
        if not node.users:
            for it in self.interps:
                it.env.pop(node, None)
        self.pos += 1

    def inputs_of(self, node: fx.Node) -> list[torch.Tensor]:
        """The first argument of ``node`` in every batch."""
        arg = node.args[0]
        return [it.env[arg] for it in self.interps]


def _consumers(slim: fx.GraphModule, dense: fx.GraphModule) -> list[fx.Node]:
    """Nodes calling an ``nn.Linear`` once whose input width the slim model narrows."""
    calls: dict[str, int] = {}
    for n in slim.graph.nodes:
        if n.op == "call_module":
            calls[n.target] = calls.get(n.target, 0) + 1
    out = []
    for n in slim.graph.nodes:
        if n.op != "call_module" or calls[n.target] != 1 or not n.args or not isinstance(n.args[0], fx.Node):
            continue
        mod = slim.get_submodule(n.target)
        try:
            ref = dense.get_submodule(n.target)
        except AttributeError:
            continue
        if isinstance(mod, nn.Linear) and isinstance(ref, nn.Linear) and mod.in_features < ref.in_features:
            out.append(n)
    return out


class _Stats:
    """Sufficient statistics of ``y ~ W x + b`` over the calibration rows (float64)."""

    def __init__(self, k: int, m: int, device: torch.device) -> None:
        f = dict(dtype=torch.float64, device=device)
        self.xx = torch.zeros(k, k, **f)
        self.xy = torch.zeros(k, m, **f)
        self.sx = torch.zeros(k, **f)
        self.sy = torch.zeros(m, **f)
        self.yy = 0.0
        self.n = 0

    def add(self, x: torch.Tensor, y: torch.Tensor) -> None:
        # one batch's products in float32 (fast), summed over batches in float64
        x, y = x.reshape(-1, x.shape[-1]).float(), y.reshape(-1, y.shape[-1]).float()
        self.xx += (x.T @ x).double()
        self.xy += (x.T @ y).double()
        self.sx += x.double().sum(0)
        self.sy += y.double().sum(0)
        self.yy += float((y.double() ** 2).sum())
        self.n += x.shape[0]

    def error(self, w: torch.Tensor, b: Optional[torch.Tensor]) -> float:
        """``sum ||W x + b - y||^2`` from the moments (``w`` is ``[in, out]``)."""
        e = (w * (self.xx @ w)).sum() - 2 * (w * self.xy).sum() + self.yy
        if b is not None:
            e = e + 2 * b @ (w.T @ self.sx) + self.n * (b @ b) - 2 * b @ self.sy
        return float(e)

    def solve(self, damping: float, bias: bool) -> tuple[torch.Tensor, Optional[torch.Tensor]]:
        """Ridge least squares (intercept unpenalised when ``bias``): ``W [in, out]`` and ``b``."""
        xx, xy = self.xx, self.xy
        if bias:
            mx, my = self.sx / self.n, self.sy / self.n
            xx = xx - self.n * torch.outer(mx, mx)
            xy = xy - self.n * torch.outer(mx, my)
        lam = damping * float(xx.diagonal().mean().clamp_min(1e-12))
        a = xx + lam * torch.eye(xx.shape[0], dtype=xx.dtype, device=xx.device)
        w = torch.linalg.lstsq(a, xy).solution if lam == 0 else torch.linalg.solve(a, xy)
        return w, ((my - mx @ w) if bias else None)

    def intercept(self, w: torch.Tensor) -> torch.Tensor:
        """The best bias for a fixed ``W``: ``mean(y) - W mean(x)`` (the mean fold)."""
        return (self.sy - self.sx @ w) / self.n


def _kept_rows(analysis: Any, sel: Any, name: str) -> Optional[torch.Tensor]:
    td = analysis.params.get(f"{name}.weight")
    if td is None or td.dims[0] is None:
        return None
    return torch.as_tensor(sel.kept(td.dims[0]), dtype=torch.long)


def _batches(data: Iterable[Any], max_batches: Optional[int], device: torch.device) -> list[tuple[Any, ...]]:
    from itertools import islice

    from vitgraph.passes.scoring_common import split_batch, to_device

    out = [split_batch(to_device(b, device))[0] for b in islice(data, max_batches)]
    if not out:
        raise VitgraphError("reconstruction needs calibration data: the data yielded no batches")
    return out


def _bar(total: int, progress: Optional[bool]) -> Any:
    from tqdm.auto import tqdm

    show = sys.stderr.isatty() if progress is None else bool(progress)
    return tqdm(total=total, desc="reconstructing", unit="layer", disable=not show, leave=False, file=sys.stderr)


@torch.no_grad()
def refit(slim: fx.GraphModule, analysis: Any, sel: Any, data: Iterable[Any], mode: str = "ridge",
          damping: float = 1e-2, max_batches: Optional[int] = None,
          progress: Optional[bool] = None) -> list[LayerFit]:
    """Refit ``slim``'s consumers of pruned channels in place against ``analysis``'s dense graph.

    ``sel`` is the plan's selection on ``analysis``; returns one :class:`LayerFit` per consumer.
    """
    if mode not in MODES:
        raise VitgraphError(f"reconstruction mode must be one of {', '.join(MODES)}, got {mode!r}")
    if not damping >= 0:
        raise VitgraphError(f"reconstruction damping must be >= 0, got {damping!r}")
    dense = analysis.graph_module
    device = next(slim.parameters()).device
    batches = _batches(data, max_batches, device)
    consumers = _consumers(slim, dense)
    modes = {m: m.training for m in (*slim.modules(), *dense.modules())}
    slim.eval(), dense.eval()
    fits: list[LayerFit] = []
    try:
        run_s, run_d = _GraphRunner(slim, batches), _GraphRunner(dense, batches)
        with _bar(len(consumers), progress) as bar:
            for node in consumers:
                ref = run_d.node_named(node.name)
                if ref is None:
                    bar.update(1)
                    continue
                run_s.run_until(node)
                run_d.run_until(ref)
                fits.append(_refit_one(node.target, slim.get_submodule(node.target),
                                       dense.get_submodule(ref.target), run_s.inputs_of(node),
                                       run_d.inputs_of(ref), _kept_rows(analysis, sel, node.target),
                                       mode, damping))
                log.info("%s", fits[-1])
                bar.update(1)
    finally:
        for m, t in modes.items():
            m.training = t
    return fits


def _refit_one(name: str, mod: nn.Linear, ref: nn.Linear, xs: list[torch.Tensor], xd: list[torch.Tensor],
               rows: Optional[torch.Tensor], mode: str, damping: float) -> LayerFit:
    st = _Stats(mod.in_features, mod.out_features, mod.weight.device)
    for a, b in zip(xs, xd):
        y = ref(b)
        st.add(a, y if rows is None else y.index_select(-1, rows.to(y.device)))
    w0 = mod.weight.detach().double().T
    b0 = mod.bias.detach().double() if mod.bias is not None else None
    before = st.error(w0, b0)
    if mode == "bias" or st.n < 2 * mod.in_features:  # too few rows to fit a weight: the mean fold only
        w, b = w0, (st.intercept(w0) if b0 is not None else None)
    else:
        w, b = st.solve(damping, b0 is not None)
    after = st.error(w, b)
    applied = bool(after < before) and bool(torch.isfinite(w).all())
    if applied:
        mod.weight.copy_(w.T.to(mod.weight.dtype))
        if b is not None:
            mod.bias.copy_(b.to(mod.bias.dtype))
    return LayerFit(name, mod.in_features, ref.in_features, before, after if applied else before, applied)


def reconstruct(slim: nn.Module, dense: nn.Module, data: Iterable[Any], *, plan: Any,
                analysis: Any = None, mode: str = "ridge", damping: float = 1e-2,
                max_batches: Optional[int] = None, progress: Optional[bool] = None,
                inplace: bool = False) -> nn.Module:
    """``slim`` (``vitgraph.compress(dense, plan)``) with its consumers of pruned channels refitted.

    ``data`` yields ``(inputs, targets)`` batches or input tensors (targets are not used);
    ``max_batches`` caps how many are read.  ``dense`` and ``data`` are not changed; ``slim`` is
    copied unless ``inplace``.  The per-layer figures are logged on ``vitgraph.reconstruct``;
    :func:`refit` returns them.
    """
    import copy

    from vitgraph.api import analysis_for

    if not isinstance(slim, fx.GraphModule):
        raise VitgraphError(f"reconstruct takes the module vitgraph.compress returned, got {type(slim).__name__}")
    an = analysis_for(dense, plan, analysis)
    out = slim if inplace else copy.deepcopy(slim)
    refit(out, an, plan.selection(an), data, mode=mode, damping=damping, max_batches=max_batches,
          progress=progress)
    return out
