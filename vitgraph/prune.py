"""``vitgraph.prune``: from a trained model and its data to a pruned, fine-tuned, reloadable result.

    result = vitgraph.prune(model, train_loader, val_loader, method="hessian", target="flops:0.5",
                            finetune_epochs=2, out="out/pruned", source=source)

The steps: dense top-1 on the validation data, scores (:func:`vitgraph.score`), a plan to the
target (:func:`vitgraph.plan_to_target`; latency targets through a
:class:`~vitgraph.planning.latency.LatencyTable` of the runtime, closed on measured latency),
compression, top-1 before fine-tuning, fine-tuning with distillation from the dense model
(:func:`vitgraph.passes.recovery.finetune`: one training loop, DistributedDataParallel under
torchrun), final top-1, and with ``out`` the result directory: ``source.json``, ``plan.json``,
``model.safetensors`` (reloadable by :func:`vitgraph.load`, no pickle), ``model.onnx``,
``preprocess.json`` and ``report.md``.  Under torchrun only rank 0 writes.
"""
from __future__ import annotations

import contextlib
import json
import logging
import sys
import tempfile
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path
from typing import Any, Iterable, Iterator, Optional, Union

import torch
from torch import nn

from vitgraph.errors import VitgraphError

__all__ = ["PruneResult", "Stage", "prune", "evaluate", "parse_target", "METHODS", "TARGETS", "REPORT_FILE"]

METHODS = ("hessian", "kl", "magnitude", "threshold")
TARGETS = ("flops", "params", "latency")
RUNTIMES = ("ort-cpu", "torch-cpu", "ort-cuda", "torch-cuda")
REPORT_FILE = "report.md"


@dataclass
class Stage:
    """The figures of one model in the report: top-1 (percent), params, FLOPs, latency (ms)."""

    top1: float
    params: int
    flops: int
    latency_ms: Optional[float] = None


@dataclass
class PruneResult:
    """What :func:`prune` returns: the fine-tuned compressed model, its plan and the report's figures.

    ``stages`` maps ``"dense"``, ``"pruned"`` (before fine-tuning) and ``"fine-tuned"`` to
    :class:`Stage`; ``widths`` lists ``(group id, kind, kept, total)`` for every group;
    ``finetune_losses`` the loss of every fine-tuning step; ``out`` the result directory.
    """

    model: nn.Module
    plan: Any
    stages: dict[str, Stage]
    widths: list[tuple[str, str, int, int]]
    method: str
    target: tuple[str, float]
    finetune_losses: list[float] = field(default_factory=list)
    out: Optional[Path] = None

    @property
    def flops_fraction(self) -> float:
        """Fine-tuned FLOPs over dense FLOPs."""
        return self.stages["fine-tuned"].flops / self.stages["dense"].flops

    def table(self) -> str:
        """The figures as a markdown table."""
        lines = ["| model | top-1 (%) | params (M) | GFLOPs | latency (ms) |", "|---|---:|---:|---:|---:|"]
        for name, s in self.stages.items():
            lat = "-" if s.latency_ms is None else f"{s.latency_ms:.2f}"
            lines.append(f"| {name} | {s.top1:.2f} | {s.params / 1e6:.3f} | {s.flops / 1e9:.4f} | {lat} |")
        return "\n".join(lines)


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


@torch.no_grad()
def evaluate(model: nn.Module, data: Iterable[Any], device: Optional[torch.device] = None,
             progress: Optional[bool] = None, desc: str = "evaluating") -> float:
    """Top-1 accuracy (percent) of ``model`` over ``(inputs, labels)`` batches, in eval mode."""
    from vitgraph.passes.scoring_common import logits_of

    was_training = model.training
    model.eval()
    correct = total = 0
    try:
        n = len(data)  # type: ignore[arg-type]
    except TypeError:
        n = None
    with _bar(n, desc, progress) as bar:
        for x, y in data:
            if device is not None:
                x, y = x.to(device), y.to(device)
            correct += int((logits_of(model(x)).argmax(-1) == y).sum())
            total += len(y)
            bar.update(1)
    model.train(was_training)
    if total == 0:
        raise VitgraphError("the evaluation data yielded no examples")
    return 100.0 * correct / total


# ---------------------------------------------------------------------------------------------
# the pipeline


def prune(
    model: nn.Module,
    train_data: Iterable[Any],
    val_data: Optional[Iterable[Any]] = None,
    *,
    method: str = "hessian",
    target: Union[str, tuple[str, float]] = "flops:0.5",
    finetune_epochs: int = 1,
    out: Optional[Union[str, Path]] = None,
    source: Any = None,
    example_input: Optional[torch.Tensor] = None,
    runtime: str = "torch-cpu",
    round_to: int = 8,
    score_batches: int = 8,
    lr: float = 1e-4,
    alpha: float = 0.2,
    device: Optional[Union[str, torch.device]] = None,
    preprocess: Optional[dict] = None,
    measure: bool = True,
    reps: int = 10,
    progress: Optional[bool] = None,
    prune_outputs: bool = False,
    int8: bool = False,
) -> PruneResult:
    """Prune ``model`` to ``target``, fine-tune it with distillation from itself, and report.

    ``train_data`` and ``val_data`` yield ``(images, labels)`` batches (DataLoaders, or lists of
    batches; under torchrun a DataLoader over a map-style dataset is shared out by a
    DistributedSampler).  Without ``val_data`` the figures are measured on ``train_data``.
    ``method`` is a :func:`vitgraph.score` method (scores from the first ``score_batches``
    batches); ``target`` is ``"flops:F"``, ``"params:F"`` or ``"latency:F"`` (``runtime`` names
    the runtime latency is predicted and measured on: ort-cpu, torch-cpu, ort-cuda, torch-cuda).
    ``out`` writes the result directory and needs ``source`` (the
    :class:`~vitgraph.artifact.Source` that rebuilds the model, as
    :func:`vitgraph.models.load_model_and_source` gives it).  ``int8`` (with ``out``) also writes
    ``model.int8.onnx``: onnxruntime static quantization (QDQ, per-channel int8 MatMul/Gemm/Conv
    weights and int8 activations) calibrated on the scoring batches, with its top-1 and its
    onnxruntime CPU latency beside the fp32 file's.  The dense model is not changed.
    """
    from vitgraph.analysis.engine import analyze
    from vitgraph.api import compress
    from vitgraph.distributed import rank
    from vitgraph.passes.recovery import finetune
    from vitgraph.passes.training import rank_loader
    from vitgraph.planning.plan import Plan
    from vitgraph.score import score
    from vitgraph.targets import plan_to_target

    if not isinstance(model, nn.Module):
        raise VitgraphError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    if method not in METHODS:
        raise VitgraphError(f"method must be one of {'|'.join(METHODS)}, got {method!r}")
    kind, fraction = parse_target(target)
    if kind == "latency" and method == "threshold":
        raise VitgraphError("method 'threshold' learns toward a flops or params target, not latency")
    if runtime not in RUNTIMES:
        raise VitgraphError(f"runtime must be one of {'|'.join(RUNTIMES)}, got {runtime!r}")
    if isinstance(finetune_epochs, bool) or not isinstance(finetune_epochs, int) or finetune_epochs < 0:
        raise VitgraphError(f"finetune_epochs must be an integer >= 0, got {finetune_epochs!r}")
    if isinstance(round_to, bool) or not isinstance(round_to, int) or round_to < 1:
        raise VitgraphError(f"round_to must be an integer >= 1, got {round_to!r}")
    if isinstance(score_batches, bool) or not isinstance(score_batches, int) or score_batches < 1:
        raise VitgraphError(f"score_batches must be an integer >= 1, got {score_batches!r}")
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
    x = example_input if example_input is not None else proxy[0][0][:1]
    x = x[:1].cpu()
    with torch.no_grad():
        n_out = _logits(model(x)).shape[-1]
    top_label = max(int(b[1].max()) for b in list.__iter__(proxy))
    if top_label >= n_out:
        raise VitgraphError(f"the data has label {top_label} but the model has {n_out} outputs: build it with as many "
                            "classes as the image folder has (--model-arg num_classes=N)")

    model.to(dev)
    dense_top1 = evaluate(model, val, dev, progress, "dense top-1")
    model.cpu()

    an = analyze(model, x, prune_outputs=prune_outputs)
    proxy.desc, proxy.progress = f"scoring ({method})", progress
    if method == "magnitude":
        scores = score(model, an, "magnitude")
    elif method == "threshold":
        scores = score(model, an, "threshold", data=proxy, target=fraction, budget=kind)
    else:
        scores = score(model, an, method, data=proxy)
    if method == "threshold":
        plan = Plan.from_scores(an, scores, ratio=None)
    else:
        table = None
        if kind == "latency":
            from vitgraph.planning.latency import LatencyTable

            table = LatencyTable(runtime, batch=1)
        plan = plan_to_target(an, scores, target=kind, fraction=fraction, round_to=round_to,
                              normalize=method == "magnitude", latency_table=table, calibrate=kind == "latency")
    slim = compress(model, plan, an).eval()

    slim.to(dev)
    pruned_top1 = evaluate(slim, val, dev, progress, "pruned top-1")
    losses: list[float] = []
    if finetune_epochs:
        steps = finetune_epochs * len(rank_loader(train_data)) if hasattr(train_data, "__len__") else None
        with _finetune_bar(steps, progress):
            losses = finetune(slim, train_data, teacher=model, loss="upvit", alpha=alpha, epochs=finetune_epochs,
                              lr=lr, device=dev, log_every=1).losses
    final_top1 = evaluate(slim, val, dev, progress, "fine-tuned top-1")
    model.cpu()
    slim.cpu().eval()

    widths = [(g.id, g.kind, _kept(plan, g), g.size) for g in an.groups]
    dense_cost = (_params(model), _flops(model, x))
    slim_cost = (_params(slim), _flops(slim, x))
    lat = _latency(model, slim, x, runtime, reps) if measure and rank() == 0 else (None, None)
    stages = {"dense": Stage(dense_top1, *dense_cost, lat[0]),
              "pruned": Stage(pruned_top1, *slim_cost, lat[1]),
              "fine-tuned": Stage(final_top1, *slim_cost, lat[1])}
    result = PruneResult(slim, plan, stages, widths, method, (kind, fraction), losses)
    if out is not None and rank() == 0:
        result.out = _write(Path(out), result, source, x, runtime, preprocess,
                            (proxy, val, reps if measure else 0) if int8 else None)
    return result


def _logits(out: Any) -> torch.Tensor:
    from vitgraph.passes.scoring_common import logits_of

    return logits_of(out[0] if isinstance(out, (tuple, list)) else out)


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


def _quantize(out: Path, calibration: list, val: Iterable[Any], reps: int, x: torch.Tensor) -> tuple[float, Optional[float], Optional[float]]:
    """``model.int8.onnx`` from ``model.onnx``, calibrated on ``calibration``: (top-1, fp32 ms, int8 ms)."""
    import onnxruntime as ort
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    from vitgraph.deploy.measure import measure_latency, ort_runner

    src, dst = out / "model.onnx", out / "model.int8.onnx"
    name = ort.InferenceSession(str(src), providers=["CPUExecutionProvider"]).get_inputs()[0].name

    class _Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.feeds = iter([{name: b[0].cpu().numpy()} for b in list.__iter__(calibration)])

        def get_next(self) -> Optional[dict]:
            return next(self.feeds, None)

    root = logging.getLogger()
    level = root.level
    root.setLevel(logging.ERROR)  # the quantizer warns about every 1-d weight it leaves alone
    try:
        with tempfile.TemporaryDirectory() as d:
            pre = Path(d) / "pre.onnx"
            quant_pre_process(str(src), str(pre))
            quantize_static(str(pre), str(dst), _Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                            weight_type=QuantType.QInt8, activation_type=QuantType.QInt8,
                            op_types_to_quantize=["MatMul", "Gemm", "Conv"])
    except Exception as e:  # noqa: BLE001 - onnxruntime's quantizer raises many kinds
        raise VitgraphError(f"--int8: onnxruntime static quantization of {src} failed: {type(e).__name__}: {e}") from e
    finally:
        root.setLevel(level)
    sess = ort.InferenceSession(str(dst), providers=["CPUExecutionProvider"])
    correct = total = 0
    with _bar(None, "int8 top-1", None) as bar:
        for xb, yb in val:
            pred = sess.run(None, {name: xb.cpu().numpy()})[0].argmax(-1)
            correct += int((torch.from_numpy(pred) == yb.cpu()).sum())
            total += len(yb)
            bar.update(1)
    if not reps:
        return 100.0 * correct / max(total, 1), None, None
    xs = x[:1].numpy()
    stats = measure_latency({"fp32": ort_runner(src, xs), "int8": ort_runner(dst, xs)}, reps=reps, rounds=3)
    return 100.0 * correct / max(total, 1), stats["fp32"].median_ms, stats["int8"].median_ms


def _write(out: Path, r: PruneResult, source: Any, x: torch.Tensor, runtime: str,
           preprocess: Optional[dict], int8: Optional[tuple] = None) -> Path:
    """The result directory: artifact files, model.onnx, preprocess.json, then report.md (written last)."""
    from vitgraph import artifact
    from vitgraph.deploy.export import export_onnx

    out.mkdir(parents=True, exist_ok=True)
    (out / REPORT_FILE).unlink(missing_ok=True)  # a report names a finished result only
    artifact.save(out, r.model, r.plan, source)
    rep = export_onnx(r.model, out / "model.onnx", (x,))
    if preprocess is not None:
        from vitgraph.data import PREPROCESS_FILE

        (out / PREPROCESS_FILE).write_text(json.dumps(preprocess, indent=1))
    int8_line = ""
    if int8 is not None:
        top1, fp32_ms, int8_ms = _quantize(out, *int8, x)
        ft = r.stages["fine-tuned"]
        r.stages["int8"] = Stage(top1, ft.params, ft.flops, int8_ms)
        if int8_ms is not None:
            int8_line = (f" INT8 (model.int8.onnx, onnxruntime static quantization calibrated on the scoring batches): "
                         f"onnxruntime CPU {fp32_ms:.2f} ms fp32 -> {int8_ms:.2f} ms int8, speedup "
                         f"{fp32_ms / int8_ms:.2f}x; its latency column is onnxruntime CPU.")
    kind, fraction = r.target
    lines = [f"# vitgraph prune: {r.method}, target {kind}:{fraction:g}", "",
             f"Latency: median at batch 1 on {runtime} (pruned and fine-tuned share one architecture). "
             f"FLOPs fraction {r.flops_fraction:.3f}; ONNX parity max abs diff {rep.max_abs_diff:.2e}.{int8_line}", "",
             r.table(), "", "## Widths", "", "| group | kind | kept | of |", "|---|---|---:|---:|"]
    lines += [f"| {gid} | {k} | {n} | {size} |" for gid, k, n, size in r.widths]
    if r.finetune_losses:
        lines += ["", f"Fine-tuning: {len(r.finetune_losses)} steps, loss {r.finetune_losses[0]:.4f} -> "
                  f"{r.finetune_losses[-1]:.4f}."]
    (out / REPORT_FILE).write_text("\n".join(lines) + "\n")
    return out
