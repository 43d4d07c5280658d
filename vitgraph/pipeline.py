"""``vitgraph.pipeline``: :func:`vitgraph.prune`, from a trained model and its data to a pruned,
fine-tuned, reloadable result.

    result = vitgraph.prune(model, train_loader, val_loader, method="kl", target="flops:0.5",
                            finetune_epochs=2, out="out/pruned", source=source)

The steps: dense top-1 on the validation data, scores (:func:`vitgraph.score`), a plan to the
target (:func:`vitgraph.plan_to_target`; latency targets through a
:class:`~vitgraph.planning.latency.LatencyTable` of the runtime, closed on measured latency),
compression, top-1 before fine-tuning, fine-tuning with distillation from the dense model
(:func:`vitgraph.passes.recovery.finetune`: one training loop, DistributedDataParallel under
torchrun), final top-1, and with ``out`` the result directory: ``source.json``, ``plan.json``,
``model.safetensors`` (reloadable by :func:`vitgraph.load`, no pickle), ``model.onnx``,
``preprocess.json``, ``widths.png`` and ``report.md`` (written last).  Under torchrun only rank 0
writes.  The steps are recorded in the directory as they finish (:mod:`vitgraph.journal`), so an
interrupted run continues with ``resume=True``; ``schedule="iterative"`` prunes in rounds.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
from dataclasses import asdict, dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from vitgraph.errors import VitgraphError
from vitgraph.artifact import INT8_FILE, ONNX_FILE, PREPROCESS_FILE, REPORT_FILE, WIDTHS_FILE
from vitgraph.planning.latency import RUNTIMES
from vitgraph.report import Stage, stage_table

__all__ = ["PruneResult", "Stage", "prune", "evaluate", "fidelity", "parse_target", "round_fractions", "METHODS",
           "TARGETS",
           "SCHEDULES", "REPORT_FILE"]

METHODS = ("hessian", "kl", "magnitude", "threshold")
TARGETS = ("flops", "params", "latency")
SCHEDULES = ("oneshot", "iterative")
log = logging.getLogger("vitgraph.prune")


@dataclass
class PruneResult:
    """What :func:`prune` returns: the fine-tuned compressed model, its plan and the report's figures.

    ``stages`` maps ``"dense"``, ``"pruned"`` (before fine-tuning) and ``"fine-tuned"`` to
    :class:`Stage`; ``widths`` lists ``(group id, kind, kept, total)`` for every group;
    ``finetune_losses`` the loss of every fine-tuning step; ``out`` the result directory;
    ``rounds`` one dict per pruning round (``round``, ``goal``, ``flops``, ``top1`` after pruning, or
    ``error``/``cosine`` for a model judged by its outputs); ``objective`` is ``"logits"`` (a
    classifier on labelled images) or ``"features"`` (distilled from its dense outputs), and
    ``loss`` says in words which loss scored and fine-tuned it.
    """

    model: nn.Module
    plan: Any
    stages: dict[str, Stage]
    widths: list[tuple[str, str, int, int]]
    method: str
    target: tuple[str, float]
    finetune_losses: list[float] = field(default_factory=list)
    out: Optional[Path] = None
    schedule: str = "oneshot"
    rounds: list[dict[str, Any]] = field(default_factory=list)
    objective: str = "logits"
    loss: str = ""

    @property
    def flops_fraction(self) -> float:
        """Fine-tuned FLOPs over dense FLOPs."""
        return self.stages["fine-tuned"].flops / self.stages["dense"].flops

    def table(self) -> str:
        """The figures as a markdown table."""
        return stage_table(self.stages)


def parse_target(target: Union[str, tuple[str, float]], flag: str = "target") -> tuple[str, float]:
    """``"flops:0.5"`` (or ``("flops", 0.5)``) as ``(kind, fraction)``, checked."""
    if isinstance(target, str):
        kind, colon, frac = target.partition(":")
        try:
            fraction = float(frac) if colon else float("nan")
        except ValueError:
            fraction = float("nan")
    elif isinstance(target, tuple) and len(target) == 2:
        kind, fraction = target[0], float(target[1])
    else:
        raise VitgraphError(f"{flag} must be KIND:FRACTION (flops:0.5), got {target!r}")
    if kind not in TARGETS or not 0.0 < fraction <= 1.0:
        raise VitgraphError(f"{flag} must be KIND:FRACTION with KIND one of {'|'.join(TARGETS)} and FRACTION "
                            f"in (0, 1], got {target!r}")
    return kind, fraction


# ---------------------------------------------------------------------------------------------
# progress bars


def _bars_on(progress: Optional[bool]) -> bool:
    """Bars are shown on rank 0 when asked, or by default when stderr is a terminal."""
    from vitgraph.distributed import rank

    if rank() != 0:
        return False
    return sys.stderr.isatty() if progress is None else bool(progress)


def _bar(total: Optional[int], desc: str, progress: Optional[bool]) -> Any:
    from tqdm.auto import tqdm

    return tqdm(total=total, desc=desc, unit="batch", disable=not _bars_on(progress), leave=False, file=sys.stderr)


class _Batches(list):
    """A list of batches whose iteration ticks a progress bar (still a sequence for torchrun's sampler)."""

    desc = ""
    progress: Optional[bool] = None

    def __iter__(self) -> Iterator[Any]:
        with _bar(len(self), self.desc, self.progress) as bar:
            for batch in super().__iter__():
                yield batch
                bar.update(1)


class _StepBar(logging.Handler):
    """Ticks a bar on every step that ``finetune(log_every=1)`` logs."""

    def __init__(self, bar: Any) -> None:
        super().__init__(logging.INFO)
        self.bar = bar

    def emit(self, record: logging.LogRecord) -> None:
        self.bar.update(1)
        if isinstance(record.args, tuple) and len(record.args) >= 2:
            self.bar.set_postfix(loss=f"{record.args[1]:.4f}")


@contextlib.contextmanager
def _finetune_bar(total: Optional[int], progress: Optional[bool]) -> Iterator[None]:
    log = logging.getLogger("vitgraph.recovery")
    with _bar(total, "fine-tuning", progress) as bar:
        handler, level, propagate = _StepBar(bar), log.level, log.propagate
        log.addHandler(handler)
        log.setLevel(logging.INFO)
        log.propagate = False  # the bar shows the steps; the root logger need not print them
        try:
            yield
        finally:
            log.removeHandler(handler)
            log.setLevel(level)
            log.propagate = propagate


# ---------------------------------------------------------------------------------------------
# evaluation


@contextlib.contextmanager
def _eval_mode(*models: Any) -> Iterator[None]:
    """The modules among ``models`` in eval mode, every submodule's own mode restored afterwards."""
    from vitgraph.deploy.export import _eval_mode as module_eval

    with contextlib.ExitStack() as stack:
        for m in models:
            if isinstance(m, nn.Module):
                stack.enter_context(module_eval(m))
        yield


def _on_device(data: Iterable[Any], device: Optional[torch.device], progress: Optional[bool],
               desc: str) -> Iterator[tuple[tuple[Any, ...], Any]]:
    """``(inputs, labels)`` of every batch of ``data`` (labels ``None`` when it has none) on ``device``,
    ticking a progress bar."""
    from vitgraph.passes.scoring_common import split_batch, to_device

    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = None
    with _bar(n, desc, progress) as bar:
        for batch in data:
            yield split_batch(to_device(batch, device))
            bar.update(1)


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Any], device: Optional[torch.device] = None,
             progress: Optional[bool] = None, desc: str = "evaluating") -> float:
    """Top-1 accuracy (percent) of ``model`` over ``(inputs, labels)`` batches, in eval mode."""
    from vitgraph.passes.scoring_common import logits_of

    correct = total = 0
    with _eval_mode(model):
        for inputs, y in _on_device(data, device, progress, desc):
            if y is None:
                raise VitgraphError("top-1 needs labelled (images, labels) batches; this data has no labels")
            correct += int((logits_of(model(*inputs)).argmax(-1) == y).sum())
            total += len(y)
    if total == 0:
        raise VitgraphError("the evaluation data yielded no examples")
    return 100.0 * correct / total


@torch.no_grad()
def fidelity(model: Any, reference: Any, data: Iterable[Any], device: Optional[torch.device] = None,
             progress: Optional[bool] = None, desc: str = "comparing outputs") -> tuple[float, float]:
    """How close ``model``'s outputs are to ``reference``'s over the batches of ``data`` (labels, if
    any, unused): the normalised MSE of the output tensors (the feature-distillation
    error, :func:`~vitgraph.passes.scoring_common.feature_errors`) and their mean cosine similarity,
    per example.  ``model`` may be any callable returning outputs (an ONNX session's runner)."""
    from vitgraph.passes.scoring_common import feature_cosines, feature_errors

    error = cosine = 0.0
    total = 0
    with _eval_mode(model, reference):
        for inputs, _ in _on_device(data, device, progress, desc):
            out, ref = model(*inputs), reference(*inputs)
            error += float(feature_errors(out, ref).sum())
            cosine += float(feature_cosines(out, ref).sum())
            total += inputs[0].shape[0]
    if total == 0:
        raise VitgraphError("the evaluation data yielded no examples")
    return error / total, cosine / total


def _figures(m: nn.Module, dense: nn.Module, val: Iterable[Any], dev: torch.device, progress: Optional[bool],
             desc: str, objective: str) -> dict[str, float]:
    """``m``'s figures for the report: top-1 under ``"logits"``, else how close its outputs are to ``dense``'s."""
    if objective == "features" and m is dense:
        return {"error": 0.0, "cosine": 1.0}
    m.to(dev)
    dense.to(dev)
    try:
        if objective == "logits":
            return {"top1": evaluate(m, val, dev, progress, desc)}
        error, cosine = fidelity(m, dense, val, dev, progress, desc)
        return {"error": error, "cosine": cosine}
    finally:
        m.cpu(), dense.cpu()


def _stage(fig: dict[str, float], params: int, flops: int, latency: Optional[float]) -> Stage:
    return Stage(fig.get("top1"), params, flops, latency, fig.get("error"), fig.get("cosine"))


# ---------------------------------------------------------------------------------------------
# the pipeline


def round_fractions(fraction: float, steps: int) -> list[float]:
    """The kept fraction of the dense cost after each of ``steps`` rounds: ``fraction ** (k / steps)``.

    Geometric rounds remove the same share of what is left each time, as NViT's schedule removes
    a fixed number of units per interval while training continues between removals.
    """
    return [fraction ** (k / steps) for k in range(1, steps + 1)]


def prune(
    model: nn.Module,
    train_data: Iterable[Any],
    val_data: Optional[Iterable[Any]] = None,
    *,
    method: str = "kl",
    target: Union[str, tuple[str, float]] = "flops:0.5",
    finetune_epochs: int = 1,
    out: Optional[Union[str, Path]] = None,
    source: Any = None,
    example_input: Optional[torch.Tensor] = None,
    runtime: str = "torch-cpu",
    round_to: int = 8,
    score_batches: int = 16,
    lr: float = 1e-4,
    alpha: float = 0.2,
    device: Optional[Union[str, torch.device]] = None,
    preprocess: Optional[dict] = None,
    measure: bool = True,
    reps: int = 10,
    progress: Optional[bool] = None,
    prune_outputs: bool = False,
    int8: bool = False,
    schedule: str = "oneshot",
    steps: int = 1,
    resume: bool = False,
    amp: Optional[bool] = None,
    align: Optional[str] = None,
    reconstruct: bool = True,
    check: bool = True,
    objective: Optional[str] = None,
) -> PruneResult:
    """Prune ``model`` to ``target``, fine-tune it with distillation from itself, and report.

    ``train_data`` and ``val_data`` yield ``(images, labels)`` batches, or image batches alone
    (DataLoaders, or lists of batches; under torchrun a DataLoader over a map-style dataset is
    shared out by a DistributedSampler).  Without ``val_data`` the figures are measured on ``train_data``.
    ``objective`` (default: from the model's output and the data) is ``"logits"`` for a classifier
    on labelled images (scores on class distributions, fine-tuning on cross-entropy + ``alpha`` KL
    from the dense model, top-1 in the report) or ``"features"`` for a model without class logits
    (CLIP/SigLIP/DINOv2 towers, HF backbones, timm ``features_only`` or ``num_classes=0``) or data
    without labels: distillation of every floating output tensor from the dense model's (normalised
    MSE; kl on a Gaussian output distribution, hessian giving way to kl), with the report's
    figures the outputs' cosine similarity and normalised MSE to the dense model's.
    ``method`` is a :func:`vitgraph.score` method (scores from the first ``score_batches``
    batches; the defaults, kl on 16 batches, are the best criterion and proxy size of
    ``benchmarks/results/criteria.md``); ``target`` is ``"flops:F"``, ``"params:F"`` or ``"latency:F"`` (``runtime`` names
    the runtime latency is predicted and measured on: ort-cpu, torch-cpu, ort-cuda, torch-cuda).

    ``schedule="iterative"`` with ``steps=K`` prunes in K rounds (NViT's schedule): round k keeps
    ``F ** (k / K)`` of the dense cost, re-scoring the model the round before left, and the
    fine-tuning budget (``finetune_epochs`` epochs of steps) is shared out evenly after the
    rounds.  ``"oneshot"`` is one round with all the fine-tuning after it.  ``reconstruct`` (on by
    default) refits, after each compression, the layers that read pruned channels to the model
    before it by ridge least squares on the scoring batches (:func:`vitgraph.reconstruct`).
    ``check`` (on by default) compares each compressed model with the masked model on the example
    input before that (:func:`vitgraph.verify.verify_compressed`) and raises on a mismatch.  ``align="kernels"`` plans
    widths fused GPU kernels run fast (:func:`vitgraph.plan_to_target`'s ``align``).  ``amp`` fine-tunes
    under bfloat16 autocast (default: on CUDA).

    ``out`` writes the result directory and needs ``source`` (the
    :class:`~vitgraph.artifact.Source` that rebuilds the model, as
    :func:`vitgraph.models.load_model_and_source` gives it).  Every finished step is recorded
    there (:class:`~vitgraph.journal.Journal`); ``resume=True`` continues an interrupted run from
    its last finished step (the same arguments and data are needed).  ``int8`` (with ``out``)
    also writes ``model.int8.onnx``: onnxruntime static quantization (QDQ, per-channel int8
    MatMul/Gemm/Conv weights, uint8 activations, attention's q@k^T and attn@v left float)
    calibrated on the scoring batches, with its top-1 and its onnxruntime CPU latency beside the
    fp32 file's.  The dense model is not changed.
    """
    from vitgraph import artifact
    from vitgraph.api import compress
    from vitgraph.distributed import rank
    from vitgraph.journal import Journal
    from vitgraph.passes.scoring_common import split_batch

    if not isinstance(model, nn.Module):
        raise VitgraphError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise VitgraphError(f"method must be one of {'|'.join(METHODS)}, got {method!r}")
    kind, fraction = parse_target(target)
    if kind == "latency" and method == "threshold":
        raise VitgraphError("method 'threshold' learns toward a flops or params target, not latency")
    if runtime not in RUNTIMES:
        raise VitgraphError(f"runtime must be one of {'|'.join(RUNTIMES)}, got {runtime!r}")
    for name, v in (("finetune_epochs", finetune_epochs), ("round_to", round_to), ("score_batches", score_batches),
                    ("steps", steps)):
        low = 0 if name == "finetune_epochs" else 1
        if isinstance(v, bool) or not isinstance(v, int) or v < low:
            raise VitgraphError(f"{name} must be an integer >= {low}, got {v!r}")
    if schedule not in SCHEDULES:
        raise VitgraphError(f"schedule must be one of {'|'.join(SCHEDULES)}, got {schedule!r}")
    if schedule == "oneshot" and steps != 1:
        raise VitgraphError(f"steps={steps} prunes in rounds and needs schedule='iterative' (--schedule iterative)")
    if align is not None and align not in ("kernels",):
        raise VitgraphError(f"align must be 'kernels' or None, got {align!r}")
    if int8 and out is None:
        raise VitgraphError("int8=True writes model.int8.onnx and needs out=")
    if out is not None and source is None:
        raise VitgraphError("out= writes a reloadable result and needs source= (the recipe that rebuilds the model: "
                            "vitgraph.models.load_model_and_source gives it)")
    dev = torch.device(device) if device is not None else torch.device("cuda" if torch.cuda.is_available() else "cpu")
    val = train_data if val_data is None else val_data
    model.eval()

    proxy = _Batches(islice(iter(train_data), score_batches))
    if not proxy:
        raise VitgraphError("the training data yielded no batches")
    x = example_input if example_input is not None else split_batch(proxy[0])[0][0][:1]
    x = x[:1].cpu()
    objective, scorer, loss = _objective(model, x, proxy, objective, method, prune_outputs, alpha)
    config = {"method": method, "target": [kind, fraction], "schedule": schedule, "steps": steps,
              "finetune_epochs": finetune_epochs, "lr": lr, "alpha": alpha, "round_to": round_to,
              "score_batches": score_batches, "prune_outputs": prune_outputs, "input": list(x.shape),
              "runtime": runtime if kind == "latency" else None,
              "source": source.to_dict() if source is not None else None} | ({"align": align} if align else {}) \
        | ({} if reconstruct else {"reconstruct": False}) | ({"objective": objective} if objective != "logits" else {})
    journal = Journal(out, config, resume=resume, writer=rank() == 0)
    if journal.finished is not None:
        return _finished(journal, Path(out), scorer, (kind, fraction))

    what = "top-1" if objective == "logits" else "outputs against dense"

    def figures(m: nn.Module, desc: str) -> dict[str, float]:
        return _figures(m, model, val, dev, progress, f"{desc} {what}", objective)

    run = _Run(model, proxy, x, dev, journal, scorer, kind, prune_outputs, round_to, runtime, progress)
    run.align, run.refits, run.objective = align, reconstruct, objective
    dense_fig = journal.run("dense", lambda: figures(model, "dense"))
    run.dense_cost = (_params(model), _flops(model, x))
    chain, current, plan, an = source, model, None, None
    shares = _finetune_shares(train_data, finetune_epochs, steps)
    rounds = round_fractions(fraction, steps)
    losses: list[float] = []
    round_log: list[dict[str, Any]] = []
    pruned_fig = dense_fig
    for k, goal in enumerate(rounds, start=1):
        if plan is not None and chain is not None:
            chain = artifact.nested(chain, plan)  # the next round prunes the last round's architecture
        an, plan = run.plan_round(k, current, goal, rounds[k - 2] if k > 1 else 1.0)
        slim = compress(current, plan, an).eval()
        if check:
            from vitgraph.verify import verify_compressed

            verify_compressed(current, slim, plan, an, (x,))
        if reconstruct:
            slim = run.reconstruct(current, slim, plan, an)
        pruned_fig = journal.run(f"round{k}.pruned", lambda: figures(slim, f"pruned ({k}/{steps})"))
        round_log.append({"round": k, "goal": goal, "flops": _flops(slim, x), **pruned_fig,
                          "allocation": run.candidates[0]["label"] if run.candidates else None,
                          "reconstructed": bool(reconstruct)})
        ep, max_steps = shares[k - 1]
        if ep and max_steps != 0:
            losses += run.finetune(k, slim, train_data, ep, max_steps, lr, alpha, amp)
        current = slim
    slim = current
    final_fig = journal.run("final", lambda: figures(slim, "fine-tuned"))
    model.cpu()
    slim.cpu().eval()

    sizes = {g.id: g.size for g in run.dense_groups}
    widths = [(g.id, g.kind, _kept(plan, g), sizes.get(g.id, g.size)) for g in an.groups]
    slim_cost = (_params(slim), _flops(slim, x))
    lat = _latency(model, slim, x, runtime, reps) if measure and rank() == 0 else (None, None)
    stages = {"dense": _stage(dense_fig, *run.dense_cost, lat[0]),
              "pruned": _stage(pruned_fig, *slim_cost, lat[1]),
              "fine-tuned": _stage(final_fig, *slim_cost, lat[1])}
    result = PruneResult(slim, plan, stages, widths, scorer, (kind, fraction), losses, schedule=schedule,
                         rounds=round_log, objective=objective, loss=loss)
    if out is not None and rank() == 0:
        result.out = _write(Path(out), result, chain, x, runtime, preprocess,
                            (proxy, val, reps if measure else 0, model) if int8 else None, progress)
        journal.finish({"stages": {n: asdict(s) for n, s in result.stages.items()},
                        "widths": [list(w) for w in widths], "losses": losses, "rounds": round_log,
                        "objective": objective, "loss": loss})
    return result


def _objective(model: nn.Module, x: torch.Tensor, proxy: list, objective: Optional[str], method: str,
               prune_outputs: bool, alpha: float) -> tuple[str, str, str]:
    """The run's objective (``objective``, else from the model's output and the labels of the scoring
    batches), the score method run for ``method`` under it, and the report's words for its loss; a
    classifier's labels are checked against its outputs."""
    from vitgraph.passes.scoring_common import (OBJECTIVES, logits_of, objective_of, output_kind, output_tensors,
                                                split_batch)
    from vitgraph.scoring import method_for

    with torch.no_grad():
        out = model(x)
    labels = [split_batch(b)[1] for b in list.__iter__(proxy)]
    labeled = all(isinstance(y, torch.Tensor) for y in labels)
    objective = objective or objective_of(out, model, labeled)
    if objective not in OBJECTIVES:
        raise VitgraphError(f"objective must be one of {'|'.join(OBJECTIVES)} (or None: from the model), "
                            f"got {objective!r}")
    if objective == "logits":
        if not labeled:
            raise VitgraphError("objective 'logits' trains on labels and the data has none (an image folder with no "
                                "class subfolders): leave the objective out to distil the dense model's outputs")
        n_out, top_label = logits_of(out).shape[-1], max(int(y.max()) for y in labels)
        if top_label >= n_out:
            raise VitgraphError(f"the data has label {top_label} but the model has {n_out} outputs: build it with as "
                                "many classes as the image folder has (--model-arg num_classes=N)")
        return objective, method, f"cross-entropy + {alpha:g} x KL from the dense model"
    if prune_outputs:
        raise VitgraphError("prune_outputs (--prune-outputs) narrows the model's outputs, and a model without class "
                            "logits (or labels) is fine-tuned to reproduce the dense model's outputs, which needs "
                            "their widths: leave it out")
    n = len(output_tensors(out))
    why = "the data has no labels" if output_kind(out, model) == "logits" else "the model has no class logits"
    log.info("%s: distilling the dense model's %d output tensor(s)", why, n)
    scorer, note = method_for(method, objective)
    if note:
        log.warning("%s", note)
    return objective, scorer, (f"feature distillation (normalised MSE on {n} output tensor{'s' if n != 1 else ''} "
                               f"of the dense model; {why}, no labels used)" + (f"; {note}" if note else ""))


class _Run:
    """The state one pruning run's rounds share: the dense model, the proxy batches, the journal."""

    def __init__(self, model: nn.Module, proxy: "_Batches", x: torch.Tensor, dev: torch.device, journal: Any,
                 method: str, kind: str, prune_outputs: bool, round_to: int, runtime: str,
                 progress: Optional[bool]) -> None:
        self.model, self.proxy, self.x, self.dev, self.journal = model, proxy, x, dev, journal
        self.method, self.kind, self.prune_outputs, self.round_to = method, kind, prune_outputs, round_to
        self.runtime, self.progress = runtime, progress
        self.dense_cost = (0, 0)
        self.dense_groups: list = []
        self.align: Optional[str] = None
        self.refits = True
        self.candidates: list[dict[str, Any]] = []
        self.objective = "logits"

    def plan_round(self, k: int, current: nn.Module, goal: float, last_goal: float) -> tuple[Any, Any]:
        """Round ``k``'s analysis of ``current`` and its plan toward ``goal`` of the dense cost."""
        from vitgraph.analysis.engine import analyze
        from vitgraph.planning.plan import Plan

        an = analyze(current, self.x, prune_outputs=self.prune_outputs)
        if k == 1:
            self.dense_groups = list(an.groups)
        done = self.journal.get(f"round{k}.plan")
        if done is not None:
            return an, Plan.from_json(done["plan"])
        # the round's fraction of ``current``'s cost: FLOPs and parameters are counted; latency
        # rounds are calibrated on measurement, so the last round's goal stands for what it reached
        if self.kind == "latency":
            reached = last_goal
        elif self.kind == "flops":
            reached = _flops(current, self.x) / self.dense_cost[1]
        else:
            reached = _params(current) / self.dense_cost[0]
        rel = min(goal / reached, 1.0)
        scores = self._scores(k, current, an, rel)
        if self.method == "threshold":
            plan = Plan.from_scores(an, scores, ratio=None, round_to=self.round_to if self.align else 1, align=self.align)
        else:
            from vitgraph.targets import plan_to_target

            table = None
            if self.kind == "latency":
                from vitgraph.planning.latency import LatencyTable

                table = LatencyTable(self.runtime, batch=1)
            opts = dict(round_to=self.round_to, normalize=self.method == "magnitude", align=self.align)
            if self.refits and self.kind != "latency" and len(self.proxy) >= 2:
                from vitgraph.allocation import choose_plan

                current.to(self.dev)
                try:
                    plan, tried = choose_plan(current, an, scores, self.kind, rel, list.__iter__(self.proxy),
                                              self.x.to(self.dev), plan_options=opts, objective=self.objective)
                finally:
                    current.cpu()
                self.candidates = [asdict(c) | {"label": c.label} for c in tried]
                log.info("allocation: %s (of %d candidates)", tried[0].label, len(tried))
            else:
                plan = plan_to_target(an, scores, target=self.kind, fraction=rel, latency_table=table,
                                      calibrate=self.kind == "latency", **opts)
        self.journal.record(f"round{k}.plan", {"plan": plan.to_json(indent=None), "fraction": rel})
        return an, plan

    def reconstruct(self, current: nn.Module, slim: nn.Module, plan: Any, an: Any) -> nn.Module:
        """``slim`` refitted to ``current`` on the scoring batches (every rank the same: all of them)."""
        from vitgraph.passes.reconstruct import refit

        current.to(self.dev), slim.to(self.dev)
        try:
            refit(slim, an, plan.selection(an), list.__iter__(self.proxy), progress=self.progress)
        finally:
            current.cpu(), slim.cpu()
        return slim

    def _scores(self, k: int, current: nn.Module, an: Any, rel: float) -> Any:
        from vitgraph.scoring import Scores, score

        step = f"round{k}.scores"
        if self.journal.get(step) is not None:
            saved = self.journal.tensors(step)
            return Scores(saved["scores"], self.method, keep=saved["keep"])
        self.proxy.desc, self.proxy.progress = f"scoring ({self.method})", self.progress
        if self.method == "magnitude":
            s = score(current, an, "magnitude")
        elif self.method == "threshold":
            s = score(current, an, "threshold", data=self.proxy, target=rel, budget=self.kind, objective=self.objective)
        elif self.method == "kl":
            s = score(current, an, "kl", data=self.proxy, objective=self.objective)
        else:
            s = score(current, an, self.method, data=self.proxy)
        self.journal.record(step, {"method": self.method},
                            tensors={"scores": {g: t.detach().cpu() for g, t in s.items()}, "keep": s.keep})
        return s

    def finetune(self, k: int, slim: nn.Module, train_data: Iterable[Any], epochs: int, max_steps: Optional[int],
                 lr: float, alpha: float, amp: Optional[bool]) -> list[float]:
        """Round ``k``'s fine-tuning of ``slim`` with distillation from the dense model (or its record)."""
        from safetensors.torch import load_model, save_model

        from vitgraph.passes.recovery import finetune
        from vitgraph.passes.training import batches_per_epoch, rank_loader

        step = f"round{k}.finetune"
        done = self.journal.get(step)
        if done is not None:
            load_model(slim, str(self.journal.dir / f"{step}.safetensors"), strict=True)
            return done["losses"]
        total = max_steps
        if total is None:
            n = batches_per_epoch(rank_loader(train_data))
            total = None if n is None else epochs * n
        with _finetune_bar(total, self.progress):
            loss = "upvit" if self.objective == "logits" else "features"
            losses = finetune(slim, train_data, teacher=self.model, loss=loss, alpha=alpha, epochs=epochs,
                              max_steps=max_steps, lr=lr, device=self.dev, log_every=1, amp=amp).losses
        self.model.cpu()
        slim.cpu().eval()
        if self.journal.writer:
            from vitgraph.atomic import atomic_path

            with atomic_path(self.journal.dir / f"{step}.safetensors") as partial:
                save_model(slim, str(partial))
        self.journal.record(step, {"losses": losses})
        return losses


def _finetune_shares(train_data: Iterable[Any], epochs: int, rounds: int) -> list[tuple[int, Optional[int]]]:
    """``(epochs, max_steps)`` of each round's fine-tuning: ``epochs`` epochs of steps shared out evenly."""
    if rounds == 1 or not epochs:
        return [(epochs, None)] * rounds
    from vitgraph.passes.training import batches_per_epoch, rank_loader

    n = batches_per_epoch(rank_loader(train_data))
    if n is None:  # no length: whole epochs, at least one per round
        return [(max(1, epochs // rounds), None)] * rounds
    cuts = [epochs * n * k // rounds for k in range(rounds + 1)]
    return [(epochs, cuts[k + 1] - cuts[k]) for k in range(rounds)]


def _finished(journal: Any, out: Path, method: str, target: tuple[str, float]) -> PruneResult:
    """The result of a run that already finished in ``out`` (``resume=True`` after the last step)."""
    from vitgraph import artifact
    from vitgraph.planning.plan import Plan

    log.info("%s: the run finished earlier; loading its result", out)
    done = journal.finished
    stages = {n: Stage(**s) for n, s in done["stages"].items()}
    plan = Plan.from_json((out / artifact.PLAN_FILE).read_text())
    cfg = journal.config
    return PruneResult(artifact.load(out), plan, stages, [tuple(w) for w in done["widths"]], method, target,
                       done["losses"], out, schedule=cfg["schedule"], rounds=done["rounds"],
                       objective=done.get("objective", "logits"), loss=done.get("loss", ""))


def _kept(plan: Any, group: Any) -> int:
    k = plan.kept.get(group.id)
    if k is None:
        return group.size
    return len(k[0]) if k and isinstance(k[0], list) else len(k)


def _params(m: nn.Module) -> int:
    from vitgraph.deploy.measure import count_params

    return count_params(m)


def _flops(m: nn.Module, x: torch.Tensor) -> int:
    from vitgraph.deploy.measure import count_flops

    return count_flops(m, (x,))


def _latency(model: nn.Module, slim: nn.Module, x: torch.Tensor, runtime: str, reps: int) -> tuple[float, float]:
    """Median ms of the dense and the compressed model at batch 1 on ``runtime`` (interleaved runs)."""
    from vitgraph.planning.latency import LatencyTable
    from vitgraph.targets import measure_fraction

    _, dense_ms, slim_ms = measure_fraction(model, slim, LatencyTable(runtime, batch=1), tuple(x.shape),
                                            reps=reps, rounds=3)
    model.cpu(), slim.cpu()
    return dense_ms, slim_ms


def _write(out: Path, r: PruneResult, source: Any, x: torch.Tensor, runtime: str,
           preprocess: Optional[dict], int8: Optional[tuple] = None, progress: Optional[bool] = None) -> Path:
    """The result directory: artifact files, model.onnx, preprocess.json, widths.png, then report.md last.

    Each file is renamed into place whole; report.md appears only once every other file is there.
    """
    from vitgraph import artifact
    from vitgraph.deploy.export import export_onnx
    from vitgraph.atomic import write_atomic
    from vitgraph.report import draw_widths, widths_table

    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).unlink(missing_ok=True)  # a report names a finished result only
    artifact.save(out, r.model, r.plan, source)
    rep = export_onnx(r.model, out / ONNX_FILE, (x,))
    if preprocess is not None:

        write_atomic(out / PREPROCESS_FILE, json.dumps(preprocess, indent=1))
    int8_line = _int8(out, r, x, int8, progress) if int8 is not None else ""
    kind, fraction = r.target
    sched = "one-shot" if r.schedule == "oneshot" else f"iterative, {len(r.rounds)} rounds"
    draw_widths(r.widths, out / WIDTHS_FILE, f"{r.method}, {kind}:{fraction:g} ({sched}): kept / dense width")
    lines = [f"# vitgraph prune: {r.method}, target {kind}:{fraction:g}, {sched}", "",
             f"Latency: median at batch 1 on {runtime} (pruned and fine-tuned share one architecture). "
             f"FLOPs fraction {r.flops_fraction:.3f}; ONNX parity max abs diff {rep.max_abs_diff:.2e}.{int8_line}", "",
             f"Loss (scores, allocation, fine-tuning): {r.loss}.", ""]
    if r.objective == "features":
        lines += ["Figures: no top-1 (the model is judged by its outputs): the cosine similarity and the normalised "
                  "MSE of its output tensors against the dense model's, averaged over the evaluation images "
                  "(--val-data, else --data).", ""]
    lines.append(r.table())
    chosen = ", ".join(d["allocation"] for d in r.rounds if d.get("allocation"))
    how = f"{chosen} (chosen by held-out loss after reconstruction)" if chosen else "the criterion's plan"
    refit = "on" if r.rounds and r.rounds[-1].get("reconstructed") else "off"
    lines += ["", f"Allocation: {how}; reconstruction {refit}."]
    if len(r.rounds) > 1:
        lines += ["", "## Rounds", "", *_rounds_table(r)]
    lines += ["", "## Widths", "", "![kept widths](widths.png)", "", *widths_table(r.widths)]
    if r.finetune_losses:
        lines += ["", f"Fine-tuning: {len(r.finetune_losses)} steps, loss {r.finetune_losses[0]:.4f} -> "
                  f"{r.finetune_losses[-1]:.4f}."]
    write_atomic(out / REPORT_FILE, "\n".join(lines) + "\n")
    return out


def _rounds_table(r: PruneResult) -> list[str]:
    """The report's table of pruning rounds: goal, FLOPs fraction and the figure after pruning."""
    dense_flops = r.stages["dense"].flops
    key, head, fmt = (("top1", "top-1 after pruning (%)", ".2f") if r.objective == "logits"
                      else ("cosine", "cosine to dense after pruning", ".4f"))
    return ([f"| round | goal (of dense FLOPs/cost) | FLOPs fraction | {head} |", "|---:|---:|---:|---:|"]
            + [f"| {d['round']} | {d['goal']:.3f} | {d['flops'] / dense_flops:.3f} | {d[key]:{fmt}} |"
               for d in r.rounds])


def _int8(out: Path, r: PruneResult, x: torch.Tensor, int8: tuple, progress: Optional[bool]) -> str:
    """``model.int8.onnx``, its report row (top-1, or its outputs against the dense model's) and the report's line."""
    from vitgraph.deploy.int8 import evaluate_onnx, int8_speedup, onnx_model, quantize_int8
    from vitgraph.passes.scoring_common import split_batch

    calibration, val, reps, dense = int8
    inputs = [split_batch(b)[0] for b in list.__iter__(calibration)]
    dst = quantize_int8(out / ONNX_FILE, out / INT8_FILE, inputs)
    if r.objective == "logits":
        with _bar(None, "int8 top-1", progress) as bar:
            fig = {"top1": evaluate_onnx(dst, val, bar)}
    else:
        error, cosine = fidelity(onnx_model(dst), dense, val, progress=progress, desc="int8 outputs against dense")
        fig = {"error": error, "cosine": cosine}
    ft = r.stages["fine-tuned"]
    fp32_ms, int8_ms = int8_speedup(out / ONNX_FILE, dst, x, reps) if reps else (None, None)
    r.stages["int8"] = _stage(fig, ft.params, ft.flops, int8_ms)
    if int8_ms is None:
        return ""
    return (f" INT8 (model.int8.onnx, onnxruntime static quantization calibrated on the scoring batches): "
            f"onnxruntime CPU {fp32_ms:.2f} ms fp32 -> {int8_ms:.2f} ms int8, speedup "
            f"{fp32_ms / int8_ms:.2f}x; its latency column is onnxruntime CPU.")
