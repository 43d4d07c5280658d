"""Shared pieces of the data-driven score passes: batches, losses, the graph to run."""
from __future__ import annotations

import copy
import itertools
import logging
from typing import Any, Callable, Iterable, Iterator, Mapping, Optional

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


def scoring_batches(data: Iterable[Any], max_batches: Optional[int],
                    device: Optional[torch.device]) -> Iterator[tuple[tuple[Any, ...], Any]]:
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


OBJECTIVES = ("logits", "features")


def output_tensors(out: Any) -> list[torch.Tensor]:
    """Every floating tensor of a model output that has a batch axis, in the order the ONNX exporters
    emit them (pytree leaves: tuples, lists, dicts, a HuggingFace ``ModelOutput``'s fields)."""
    from vitgraph.deploy.export import _flatten_tensors

    return [t for t in _flatten_tensors(out) if t.is_floating_point() and t.dim() >= 1]


def logits_of(out: Any) -> torch.Tensor:
    """The logits of a model output: a tensor itself, a ``ModelOutput``'s (or any object's) ``logits``,
    or the first output's where there are several (a tuple or list: DeiT's ``(cls, dist)``)."""
    if isinstance(out, torch.Tensor):
        return out
    if isinstance(out, Mapping) and "logits" in out:
        return logits_of(out["logits"])
    if isinstance(out, (tuple, list)) and out:
        return logits_of(out[0])
    if isinstance(getattr(out, "logits", None), torch.Tensor):
        return out.logits
    fields = f" (its fields: {', '.join(map(str, out))})" if isinstance(out, Mapping) else ""
    raise ScoreError(f"model output {type(out).__name__}{fields} has no class logits: a model without them is "
                     "scored by kl (the output distribution, Gaussian on its features) or trained by feature "
                     "distillation (objective 'features'), or pass your own loss_fn")


def output_kind(out: Any, model: Any = None) -> str:
    """``"logits"`` when a model output carries class logits (:func:`logits_of` finds a 2-D floating
    tensor), else ``"features"`` (CLIP/DINOv2 towers, backbones, timm ``features_only``).  A timm
    ``model`` built with ``num_classes=0`` returns pooled features, 2-D like logits: it says so."""
    if model is not None and getattr(model, "num_classes", None) == 0:
        return "features"
    try:
        t = logits_of(out)
    except ScoreError:
        return "features"
    return "logits" if t.is_floating_point() and t.dim() == 2 else "features"


def objective_of(out: Any, model: Any = None, labeled: bool = True) -> str:
    """What a model is scored and fine-tuned on: ``"logits"`` (cross-entropy on labels, KL of the
    class distributions) when its output ``out`` carries class logits and the data has labels, else
    ``"features"`` (distillation of its floating output tensors from the dense model's, no labels)."""
    return "logits" if labeled and output_kind(out, model) == "logits" else "features"


def _flat_pairs(out: Any, ref: Any) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """``(student, reference)`` output tensors, flattened to ``[..., batch, features]`` and ``[batch, features]``
    (``out`` may have leading axes ``ref`` has not, e.g. ``vmap``ped weight copies), in float32 or wider."""
    outs, refs = output_tensors(out), output_tensors(ref)
    if not refs or len(outs) != len(refs):
        raise ScoreError(f"feature distillation compares the floating output tensors of two models: got {len(outs)} "
                         f"and {len(refs)}")
    for s, t in zip(outs, refs):
        lead = s.dim() - t.dim()
        if lead < 0 or s.shape[lead:] != t.shape:
            raise ScoreError(f"feature distillation needs outputs of equal shapes, got {tuple(s.shape)} and "
                             f"{tuple(t.shape)} (an output whose width was pruned cannot be distilled)")
        dtype = torch.promote_types(torch.promote_types(s.dtype, t.dtype), torch.float32)
        yield s.reshape(*s.shape[:lead + 1], -1).to(dtype), t.reshape(t.shape[0], -1).to(dtype)


def feature_errors(out: Any, ref: Any) -> torch.Tensor:
    """Per example, the squared error of each output tensor relative to the reference tensor's mean
    squared norm over the batch, averaged over the ``K`` tensors:
    ``1/K sum_k ||s_k - t_k||^2 / mean_batch ||t_k||^2`` (shape ``[..., batch]``; its batch mean is
    the normalised MSE).  Normalising by the batch, not each example, keeps near-zero outputs stable."""
    errs = [(s - t).pow(2).sum(-1) / t.pow(2).sum(-1).mean().clamp_min(1e-12) for s, t in _flat_pairs(out, ref)]
    return torch.stack(errs).mean(0)


def feature_cosines(out: Any, ref: Any) -> torch.Tensor:
    """Per example, the cosine similarity of each output tensor to the reference's, averaged over the tensors."""
    return torch.stack([F.cosine_similarity(s, t, dim=-1) for s, t in _flat_pairs(out, ref)]).mean(0)


def feature_loss(out: Any, ref: Any) -> torch.Tensor:
    """The feature-distillation loss: :func:`feature_errors` averaged over the batch (the normalised MSE
    of the output tensors, averaged over them)."""
    return feature_errors(out, ref).mean(-1)


def output_divergence(out: Any, ref: Any, objective: str) -> torch.Tensor:
    """How far ``out`` is from the reference output ``ref``, averaged over the batch: ``KL(ref || out)``
    of the class distributions for ``"logits"``, :func:`feature_loss` for ``"features"``."""
    if objective == "features":
        return feature_loss(out, ref)
    if objective != "logits":
        raise ScoreError(f"objective must be one of {OBJECTIVES}, got {objective!r}")
    logp, logq = F.log_softmax(logits_of(out).float(), -1), F.log_softmax(logits_of(ref).float(), -1)
    return F.kl_div(logp, logq, reduction="batchmean", log_target=True)


def default_loss(out: Any, targets: Any) -> torch.Tensor:
    """Cross-entropy of the model's logits against integer class targets."""
    if targets is None:
        raise ScoreError("this score needs targets: pass (inputs, targets) batches or a loss_fn; without labels "
                         "use kl, which compares the model's output distributions")
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
