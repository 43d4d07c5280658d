"""Recovery: fine-tune a pruned model with distillation from the original.

Three losses, two as the papers' code uses them:

* ``"upvit"``: ``CE(y, p) + alpha * KL(q || p)``, ``q`` the teacher's softmax (UP-ViT, alpha 0.2).
* ``"nvit"``: ``kd_weight * tau^2 * KL(q_tau || p_tau)`` on the whole output (NViT, tau 20) plus
  DeiT's hard distillation when a CNN teacher is given: the distillation-token logits learn the
  CNN's argmax while the class-token logits learn the labels (a model without a distillation
  output learns both from its one output).
* ``"features"``: feature distillation, for models without class logits (backbones, embedding
  models) or data without labels: the normalised MSE of every floating output tensor against
  the teacher's (``scoring_common.feature_loss``); no labels are read.

Masked fine-tuning keeps a plan's removed channels at zero (:class:`MaskKeeper`: a
``torch.nn.utils.parametrize`` mask on each pruned parameter while fine-tuning runs).  Training runs
in ``passes.training``: under torchrun, DistributedDataParallel over a DistributedSampler's shares.
"""
from __future__ import annotations

import contextlib
import logging
import time
from dataclasses import dataclass, field
from typing import Any, Iterable, Optional

import torch
import torch.nn.functional as F
from torch import nn
from torch.nn.utils import parametrize

from vitgraph.passes.mask import kept_elements
from vitgraph.passes.scoring_common import feature_loss, logits_of, output_divergence
from vitgraph.passes.training import batches_per_epoch, fit, rank_loader
from vitgraph.errors import ArgumentError, VitgraphError

log = logging.getLogger("vitgraph.recovery")

LOSSES = ("upvit", "nvit", "ce", "features")


@dataclass
class FinetuneLog:
    """Loss per step and wall time of a fine-tuning run."""

    losses: list[float] = field(default_factory=list)
    seconds: float = 0.0
    steps: int = 0


class _Keep(nn.Module):
    """Parametrization: the tensor with the elements a plan removes at zero."""

    def __init__(self, keep: torch.Tensor) -> None:
        super().__init__()
        self.removed = ~keep  # not a buffer: DistributedDataParallel need not broadcast it

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x.masked_fill(self.removed, 0)


class MaskKeeper:
    """Keeps the parameter slices a plan removes at zero while fine-tuning (``with keeper:``).

    Inside the ``with`` block every pruned parameter is parametrized (``torch.nn.utils.parametrize``)
    as its stored values with the removed elements at zero, so the forward pass never sees them and
    their gradient is zero; leaving the block stores the masked values back into the parameter
    (same tensor objects) and removes the parametrizations.  :func:`finetune` enters it itself.
    """

    def __init__(self, model: nn.Module, analysis: Any, plan: Any) -> None:
        sel = plan.selection(analysis)
        tensors = dict(model.named_parameters())
        self.model = model
        self._keep: dict[str, torch.Tensor] = {}
        for name, td in analysis.params.items():
            t = tensors.get(name)
            keep = kept_elements(t.shape, td.dims, sel) if t is not None else None
            if keep is not None:
                self._keep[name] = keep
        self._active: list[tuple[nn.Module, str]] = []

    def __enter__(self) -> "MaskKeeper":
        if self._active:
            raise VitgraphError("MaskKeeper is already active")
        params = dict(self.model.named_parameters())
        masked = {id(params[n]): keep for n, keep in self._keep.items()}
        try:
            # every module attribute holding a masked parameter (a tied parameter has several)
            for name, p in list(self.model.named_parameters(remove_duplicate=False)):
                if id(p) not in masked:
                    continue
                owner, _, attr = name.rpartition(".")
                module = self.model.get_submodule(owner)
                keep = masked[id(p)].to(p.device)
                parametrize.register_parametrization(module, attr, _Keep(keep))
                self._active.append((module, attr))
        except BaseException:
            self.__exit__(None, None, None)
            raise
        return self

    def __exit__(self, *exc: Any) -> None:
        while self._active:
            module, attr = self._active.pop()
            parametrize.remove_parametrizations(module, attr, leave_parametrized=True)


def distill_loss(
    student_out: Any, targets: torch.Tensor, teacher_logits: Optional[torch.Tensor], loss: str = "upvit",
    alpha: float = 0.2, tau: float = 20.0, kd_weight: float = 1.0, cnn_logits: Optional[torch.Tensor] = None,
) -> torch.Tensor:
    """The recovery loss of one batch from class logits (see the module docstring; ``"features"``
    compares whole outputs: :func:`~vitgraph.passes.scoring_common.feature_loss`)."""
    if loss not in LOSSES or loss == "features":
        raise ArgumentError(f"loss must be one of {LOSSES[:-1]}, got {loss!r}")
    if targets is None:
        raise ArgumentError(f"the {loss} loss trains on labels and the batch has none: without labels use "
                            "loss='features' (distillation of the teacher's outputs)")
    outs = list(student_out) if isinstance(student_out, (tuple, list)) else [student_out]
    cls_logits = logits_of(outs[0]).float()  # in float32: a log-softmax over bfloat16 loses small probabilities
    dist_logits = logits_of(outs[1]).float() if len(outs) > 1 else None
    mean_logits = cls_logits if dist_logits is None else (cls_logits + dist_logits) / 2
    if loss == "ce" or (loss == "upvit" and teacher_logits is None):
        return F.cross_entropy(mean_logits, targets)
    if loss == "upvit":
        return F.cross_entropy(mean_logits, targets) + alpha * output_divergence(mean_logits, teacher_logits, "logits")
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
    amp: Optional[bool] = None,
) -> FinetuneLog:
    """Fine-tune ``student`` in place on ``(inputs, targets)`` batches with AdamW and a cosine
    schedule; returns the loss history.  ``data`` must be re-iterable for ``epochs > 1``.

    ``amp`` runs the forward passes under bfloat16 autocast (the weights, gradients and optimizer
    stay float32; bfloat16 has float32's range, so no loss scaling is needed); by default it is
    on when ``device`` is a CUDA device."""
    if epochs < 1:
        raise ArgumentError(f"epochs must be >= 1, got {epochs}")
    if loss == "features" and teacher is None:
        raise ArgumentError("the features loss distils the teacher's outputs and needs a teacher (the original model)")
    if loss == "nvit" and teacher is None and cnn_teacher is None:
        raise ArgumentError("the nvit loss needs a teacher (the original model) or a cnn_teacher")
    if keeper is not None and keeper.model is not student:
        raise ArgumentError("keeper was made for another model (MaskKeeper(student, analysis, plan))")
    if device is not None:
        student.to(device)
        for t in (teacher, cnn_teacher):
            if t is not None:
                t.to(device)
    batches = rank_loader(data)
    for t in (teacher, cnn_teacher):
        if t is not None:
            t.eval()
    out = FinetuneLog()
    t0 = time.perf_counter()

    dev_type = torch.device(device).type if device is not None else "cpu"
    autocast = amp if amp is not None else dev_type == "cuda"

    def step_loss(net: nn.Module, inputs: tuple, targets: Any) -> torch.Tensor:
        with torch.autocast(dev_type, dtype=torch.bfloat16, enabled=autocast):
            with torch.no_grad():
                ref = teacher(*inputs) if teacher is not None else None
                cl = logits_of(cnn_teacher(*inputs)).float() if cnn_teacher is not None else None
            out = net(*inputs)
        if loss == "features":  # (in float32, as the logits below)
            return feature_loss(out, ref)
        tl = logits_of(ref).float() if ref is not None else None
        return distill_loss(out, targets, tl, loss, alpha, tau, kd_weight, cl)

    def on_step(step: int, value: torch.Tensor) -> None:
        if log_every and (step + 1) % log_every == 0:
            log.info("finetune step %d loss %.4f (%.1f s)", step + 1, float(value.detach()), time.perf_counter() - t0)

    with keeper if keeper is not None else contextlib.nullcontext():
        params = [p for p in student.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(params, lr=lr, weight_decay=weight_decay)
        total = max_steps or epochs * (batches_per_epoch(batches) or 0)
        sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, max(total, 1)) if total else None
        student.train()
        out.losses = fit(student, batches, step_loss, opt, epochs=epochs, steps=max_steps, scheduler=sched,
                         device=device, on_step=on_step)
    out.steps = len(out.losses)
    student.eval()
    out.seconds = time.perf_counter() - t0
    return out
