"""Recovery: fine-tune a pruned model with distillation from the original.

Two losses, as the papers' code uses them:

* ``"upvit"``: ``CE(y, p) + alpha * KL(q || p)``, ``q`` the teacher's softmax (UP-ViT, alpha 0.2).
* ``"nvit"``: ``kd_weight * tau^2 * KL(q_tau || p_tau)`` on the whole output (NViT, tau 20) plus
  DeiT's hard distillation when a CNN teacher is given: the distillation-token logits learn the
  CNN's argmax while the class-token logits learn the labels (a model without a distillation
  output learns both from its one output).

Masked fine-tuning keeps a plan's removed channels at zero after every step (:class:`MaskKeeper`).
Under torchrun the batches are split over ranks and gradients averaged (plain data parallelism).
"""
from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from vitgraph.distributed import average_gradients, is_distributed, shard, world_size
from vitgraph.passes.mask import kept_elements
from vitgraph.passes.scoring_common import logits_of, split_batch, to_device

log = logging.getLogger("vitgraph.recovery")

LOSSES = ("upvit", "nvit", "ce")


@dataclass
class FinetuneLog:
    """Loss per step and wall time of a fine-tuning run."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


class MaskKeeper:
    """Zeroes, in place, the parameter slices a plan removes (keep a masked model masked)."""

    def __init__(self, model: nn.Module, analysis: Any, plan: Any) -> None:
        sel = plan.selection(analysis)
        tensors = dict(model.named_parameters())
        self._zero: list[tuple[torch.Tensor, torch.Tensor]] = []
        for name, td in analysis.params.items():
            t = tensors.get(name)
            keep = kept_elements(t.shape, td.dims, sel) if t is not None else None
            if keep is not None:
                self._zero.append((t, keep.to(t.device)))

    @torch.no_grad()
    def apply(self) -> None:
        """Zero the removed slices (call after every optimizer step)."""
        for t, keep in self._zero:
            t.masked_fill_(~keep, 0)

    def zero_grads(self) -> None:
        """Zero the gradients of removed slices (so momentum never revives them)."""
        for t, keep in self._zero:
            if t.grad is not None:
                t.grad.masked_fill_(~keep, 0)


def distill_loss(
    student_out: Any, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor], loss: str = "upvit",
    alpha: float = 0.2, tau: float = 20.0, kd_weight: float = 1.0, cnn_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The recovery loss of one batch (see the module docstring)."""
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    outs = list(student_out) if isinstance(student_out, (tuple, list)) else [student_out]
    cls_logits = logits_of(outs[0])
    dist_logits = logits_of(outs[1]) if len(outs) > 1 else None
    mean_logits = cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2
    if loss == "ce" or (loss == "upvit" and teacher_logits is None):
        return F.cross_entropy(mean_logits, targets)
    if loss == "upvit":
        kl = F.kl_div(F.log_softmax(mean_logits, -1), F.log_softmax(teacher_logits, -1), reduction="batchmean", log_target=True)
        return F.cross_entropy(mean_logits, targets) + alpha * kl
    total = torch.zeros((), device=cls_logits.device)
    if teacher_logits is not None:
        kl = F.kl_div(F.log_softmax(mean_logits / tau, -1), F.log_softmax(teacher_logits / tau, -1),
                      reduction="batchmean", log_target=True)
        total = total + kd_weight * tau * tau * kl
    if cnn_logits is not None:
        hard = cnn_logits.argmax(-1)
        second = dist_logits if dist_logits is not None else cls_logits
        total = total + 0.5 * F.cross_entropy(cls_logits, targets) + 0.5 * F.cross_entropy(second, hard)
    else:
        total = total + F.cross_entropy(mean_logits, targets)
    return total


def finetune(
    student: nn.Module,
    data: Iterable[Any],
    teacher: Optional[nn.Module] = None,
    loss: str = "upvit",
    epochs: int = 1,
    lr: float = 1e-4,
    weight_decay: float = 0.05,
    alpha: float = 0.2,
    tau: float = 20.0,
    kd_weight: float = 1.0,
    cnn_teacher: Optional[nn.Module] = None,
    keeper: Optional[MaskKeeper] = None,
    max_steps: Optional[int] = None,
    device: Optional[torch.device] = None,
    log_every: int = 50,
) -> FinetuneLog:
    """Fine-tune ``student`` in place on ``(inputs, targets)`` batches with AdamW and a cosine
    schedule; returns the loss history.  ``data`` must be re-iterable for ``epochs > 1``."""
    if epochs < 1:
        raise ValueError(f"epochs must be >= 1, got {epochs}")
    if loss == "nvit" and teacher is None and cnn_teacher is None:
        raise ValueError("the nvit loss needs a teacher (the original model) or a cnn_teacher")
    if device is not None:
        student.to(device)
        for t in (teacher, cnn_teacher):
            if t is not None:
                t.to(device)
    if is_distributed():  # identical starting weights on every rank
        for p in student.parameters():
            torch.distributed.broadcast(p.data, 0)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
    total = max_steps or epochs * (_len_or(data, 0) // world_size())
    sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1)) if total else None
    for t in (teacher, cnn_teacher):
        if t is not None:
            t.eval()
    student.train()
    out = FinetuneLog()
    t0 = time.perf_counter()
    for _ in range(epochs):
        for batch in shard(data, even=True):
            inputs, targets = split_batch(to_device(batch, device))
            with torch.no_grad():
                tl = logits_of(teacher(*inputs)) if teacher is not None else None
                cl = logits_of(cnn_teacher(*inputs)) if cnn_teacher is not None else None
            l = distill_loss(student(*inputs), targets, tl, loss, alpha, tau, kd_weight, cl)
            opt.zero_grad(set_to_none=True)
            l.backward()
            average_gradients(student)
            if keeper is not None:
                keeper.zero_grads()
            opt.step()
            if sched is not None:
                sched.step()
            if keeper is not None:
                keeper.apply()
            out.losses.append(float(l.detach()))
            out.steps += 1
            if log_every and out.steps % log_every == 0:
                log.info("finetune step %d loss %.4f (%.1f s)", out.steps, out.losses[-1], time.perf_counter() - t0)
            if max_steps is not None and out.steps >= max_steps:
                break
        if max_steps is not None and out.steps >= max_steps:
            break
    student.eval()
    out.seconds = time.perf_counter() - t0
    return out


def _len_or(data: Any, default: int) -> int:
    try:
        return len(data)
    except TypeError:
        return default
