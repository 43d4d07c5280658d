"""Shared pieces of the data-driven score passes: batches, losses, the graph to run."""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
import torch.fx as fx
import torch.nn.functional as F

from vitgraph.distributed import rank, world_size
from vitgraph.errors import ScoreError

log = logging.getLogger("vitgraph.score")

LossFn = Callable[[Any, Any], torch.Tensor]


def split_batch(batch: Any) -> tuple[tuple[Any, ...], Any]:
    """``(inputs, targets)`` of one batch; inputs become a tuple, a bare tensor has no targets."""
    if isinstance(batch, torch.Tensor):
        return (batch,), None
    if not isinstance(batch, (tuple, list)) or len(batch) != 2:
        raise ScoreError("data must yield (inputs, targets) batches or input tensors, "
                         f"got {type(batch).__name__}")
    inputs, targets = batch
    return (tuple(inputs) if isinstance(inputs, (tuple, list)) else (inputs,)), targets


def scoring_batches(data: Iterable[Any], max_batches: Optional[int], device: Optional[torch.device]) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(inputs, targets)`` of this rank's share of ``data`` (at most ``max_batches``), on ``device``.

    Under torchrun rank ``r`` of ``N`` scores batches ``r, r + N, ...``: every batch exactly once
    over the ranks, so the summed statistics are those of one process.  (A DistributedSampler
    would pad or drop batches to give every rank the same number, which training needs and sums
    must not have.)
    """
    share = itertools.islice(data, rank(), None, world_size())
    for batch in itertools.islice(share, max_batches):
        yield split_batch(to_device(batch, device))


def to_device(x: Any, device: Optional[torch.device]) -> Any:
    """Move tensors (possibly nested in tuples/lists) to ``device``."""
    if device is None:
        return x
    if isinstance(x, torch.Tensor):
        return x.to(device)
    if isinstance(x, (tuple, list)):
        return type(x)(to_device(v, device) for v in x)
    return x


def logits_of(out: Any) -> torch.Tensor:
    """The first tensor of a model output (logits; models with a distillation head return a tuple)."""
    while isinstance(out, (tuple, list)):
        out = out[0]
    if not isinstance(out, torch.Tensor):
        raise ScoreError(f"model output is {type(out).__name__}, not a tensor of logits")
    return out


def default_loss(out: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy of the model's logits against integer class targets."""
    if targets is None:
        raise ScoreError("this score needs targets: pass (inputs, targets) batches or a loss_fn")
    return F.cross_entropy(logits_of(out), targets)


def sdpa_math(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, attn_mask: Optional[torch.Tensor] = None,
              dropout_p: float = 0.0, is_causal: bool = False, scale: Optional[float] = None,
              enable_gqa: bool = False) -> torch.Tensor:
    """Scaled dot-product attention written out (vmap-friendly; no dropout: scoring is eval)."""
    s = q.shape[-1] ** -0.5 if scale is None else scale
    a = (q * s) @ k.transpose(-2, -1)
    if is_causal:
        n, m = a.shape[-2], a.shape[-1]
        causal = torch.ones(n, m, dtype=torch.bool, device=a.device).tril()
        a = a.masked_fill(~causal, float("-inf"))
    if attn_mask is not None:
        a = a.masked_fill(~attn_mask, float("-inf")) if attn_mask.dtype == torch.bool else a + attn_mask
    return a.softmax(-1) @ v


def scoring_graph(gm: fx.GraphModule) -> fx.GraphModule:
    """A copy of ``gm`` (sharing parameters) whose fused attention kernels are written out.

    ``torch.func.vmap`` has no batching rule for the CPU flash-attention kernel and would fall
    back to a slow loop; the written-out form batches.
    """
    graph = copy.deepcopy(gm.graph)
    targets = {F.scaled_dot_product_attention, torch._C._nn.scaled_dot_product_attention}
    for node in graph.nodes:
        if node.op == "call_function" and node.target in targets:
            node.target = sdpa_math
    graph.lint()
    return fx.GraphModule(gm, graph)


def spearman(a: torch.Tensor, b: torch.Tensor) -> float:
    """Spearman rank correlation of two score vectors (average ranks for ties)."""
    a, b = a.flatten().double(), b.flatten().double()
    if a.numel() != b.numel() or a.numel() < 2:
        raise ScoreError(f"need two score vectors of equal length >= 2, got {a.numel()} and {b.numel()}")
    ra, rb = _ranks(a), _ranks(b)
    ra, rb = ra - ra.mean(), rb - rb.mean()
    den = (ra.norm() * rb.norm()).item()
    return float((ra @ rb).item() / den) if den > 0 else 0.0


def _ranks(x: torch.Tensor) -> torch.Tensor:
    order = torch.argsort(x)
    r = torch.empty_like(x)
    r[order] = torch.arange(x.numel(), dtype=x.dtype)
    uniq, inv = torch.unique(x, return_inverse=True)
    if uniq.numel() < x.numel():  # ties share their mean rank
        sums = torch.zeros(uniq.numel(), dtype=x.dtype).index_add_(0, inv, r)
        counts = torch.zeros(uniq.numel(), dtype=x.dtype).index_add_(0, inv, torch.ones_like(r))
        r = (sums / counts)[inv]
    return r
