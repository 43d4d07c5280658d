"""The ``vitgraph`` console command: inspect, explain, score, compress, prune, sparsify, export, check-24."""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import time
from pathlib import Path
from itertools import islice
from typing import TYPE_CHECKING, Any, Iterator, Optional, Sequence

import torch

from vitgraph.analysis.kinds import PRUNABLE_KINDS
from vitgraph.errors import VitgraphError
from vitgraph.planning.latency import RUNTIMES
from vitgraph import artifact
from vitgraph.models import load_model_and_source, parse_model_args

if TYPE_CHECKING:
    from vitgraph.planning.plan import Plan

SPARSITY_FILE = artifact.SPARSITY_FILE
ALIGN_HELP = ("kernels: widths fused GPU kernels run fast (equal q/k and v head dims, multiples of 8, at least 16; "
              "FFN and residual widths in multiples of 64)")


@contextlib.contextmanager
def step(msg: str) -> Iterator[None]:
    """Print a progress line for one long step, with its duration."""
    print(f"  {msg} ...", end="", flush=True)
    t0 = time.perf_counter()
    yield
    print(f" done ({time.perf_counter() - t0:.2f} s)", flush=True)


def cmd_inspect(a: argparse.Namespace) -> int:
    from vitgraph import analyze

    model, x, _ = _load(a)
    with step(f"analyzing {a.model}"):
        an = analyze(model, x, prune_outputs=a.prune_outputs)
    print(an.summary())
    return 0


def cmd_explain(a: argparse.Namespace) -> int:
    from vitgraph import analyze

    model, x, _ = _load(a)
    an = analyze(model, x, prune_outputs=a.prune_outputs)
    if a.group:
        for gid in a.group:
            print(an.explain(gid))
    else:
        for g in an.groups:
            print(an.explain(g.id))
        print("frozen:\n" + an.explain_frozen())
    return 0


def _score_data(a: argparse.Namespace, model: torch.nn.Module, x: torch.Tensor, source: Any = None) -> list:
    """Batches of ``--data``: an ImageFolder DIR, Fashion-MNIST, a saved ``(inputs, targets)`` file, or random."""
    from vitgraph.data import batches, fit_input, load_fashion_mnist

    n = a.batches * a.batch_size
    if a.batches < 1 or a.batch_size < 1:
        raise VitgraphError(f"--batches and --batch-size must be >= 1, got {a.batches} and {a.batch_size}")
    if Path(a.data).is_dir():
        from vitgraph.data import image_folder, make_transform, preprocessing

        if source is None:
            raise VitgraphError(f"--data {a.data}: an image folder needs a model with a preprocessing recipe "
                                "(a timm/torchvision/hf name or a result directory)")
        loader = image_folder(a.data, make_transform(preprocessing(source, a.model)), a.batch_size, flag="--data")
        return list(islice(loader, a.batches))
    if a.data == "random":
        from vitgraph.passes.scoring_common import logits_of, output_kind

        g = torch.Generator().manual_seed(0)
        xs = torch.randn((n, *x.shape[1:]), generator=g)
        with torch.no_grad():  # a classifier's own predictions stand in for labels; other models need none
            outs = [model(xs[i:i + a.batch_size]) for i in range(0, n, a.batch_size)]
        ys = torch.cat([logits_of(o).argmax(-1) for o in outs]) if output_kind(outs[0], model) == "logits" else None
    elif a.data == "fashion-mnist":
        xs, ys = load_fashion_mnist("train", limit=n)
        xs = fit_input(xs, x.shape[1:])
    else:
        import pickle

        try:
            xs, ys = torch.load(a.data, weights_only=True)
        except (OSError, RuntimeError, ValueError, TypeError, EOFError, pickle.UnpicklingError) as e:
            raise VitgraphError(f"--data {a.data}: not a saved (inputs, targets) tensor pair: {type(e).__name__}: {e}") from e
        xs, ys = xs[:n], ys[:n]
    return batches(xs, ys, a.batch_size)


def cmd_score(a: argparse.Namespace) -> int:
    from vitgraph.distributed import init_from_env, shutdown

    init_from_env()
    try:
        return _score(a)
    finally:
        shutdown()


def _score(a: argparse.Namespace) -> int:
    from vitgraph import Plan, analyze, plan_to_target, score
    from vitgraph.distributed import rank
    from vitgraph.pipeline import parse_target

    model, x, _ = _load(a)
    with step(f"analyzing {a.model}"):
        an = analyze(model, x, prune_outputs=a.prune_outputs)
    data = None if a.method == "magnitude" else _score_data(a, model, x)
    opts = parse_model_args(a.option, "--option")
    method = a.method
    if data is not None:
        method = _data_method(a.method, model, x, data)
    kind, frac = parse_target(a.target, "--target")
    if method == "threshold":  # thresholds learn widths toward --target themselves
        opts.setdefault("budget", kind)
        opts.setdefault("target", frac)
    with step(f"scoring ({method})"):
        s = score(model, an, method, data=data, **opts)
    if rank() != 0:
        return 0
    from vitgraph.scoring import save_scores

    save_scores(a.out, s, an.fingerprint)
    print(f"wrote scores of {len(s)} groups to {a.out}")
    if a.plan:
        if method == "threshold":
            plan = Plan.from_scores(an, s, ratio=None, round_to=a.round_to if a.align else 1, align=a.align)
        else:
            plan = plan_to_target(an, s, target=kind, fraction=frac, round_to=a.round_to,
                                  normalize=method == "magnitude", align=a.align)
        Path(a.plan).write_text(plan.to_json())
        print(plan.summary(an))
        print(f"wrote plan to {a.plan}")
    return 0


def _data_method(method: str, model: torch.nn.Module, x: torch.Tensor, data: list) -> str:
    """The score method run on ``data`` for ``method`` (hessian gives way to kl on a model without class
    logits or data without labels: :func:`vitgraph.scoring.method_for`), printing why when it differs."""
    from vitgraph.passes.scoring_common import objective_of, split_batch
    from vitgraph.scoring import method_for

    with torch.no_grad():
        out = model(x)
    objective = objective_of(out, model, all(split_batch(b)[1] is not None for b in data))
    used, note = method_for(method, objective)
    if note:
        print(f"  {note}")
    return used


def _load(a: argparse.Namespace):
    """The command's model, example input and source, from MODEL, --input-size, --model-arg, --checkpoint."""
    args = parse_model_args(a.model_arg)
    return load_model_and_source(a.model, a.input_size, model_args=args, checkpoint=a.checkpoint)


def read_plan_file(path: str, flag: str) -> "Plan":
    """The plan saved at ``path`` (JSON); a missing or malformed file is an error naming ``flag``."""
    from vitgraph.errors import PlanError
    from vitgraph.planning.plan import Plan

    try:
        text = Path(path).read_text()
    except OSError as e:
        raise VitgraphError(f"{flag} {path}: cannot read the plan file: {e.strerror or e}") from e
    try:
        return Plan.from_json(text)
    except (PlanError, ValueError, KeyError, TypeError) as e:
        raise VitgraphError(f"{flag} {path} is not a vitgraph plan (JSON from Plan.to_json): {e}") from e


def cmd_compress(a: argparse.Namespace) -> int:
    from vitgraph import Plan, analyze, compress
    from vitgraph.api import analysis_for
    from vitgraph.errors import PlanError
    from vitgraph.deploy.export import export_onnx
    from vitgraph.deploy.measure import count_flops, count_params, measure_latency, torch_runner

    if a.plan is not None and (a.ratio is not None or a.kinds is not None):
        raise VitgraphError("--plan applies a saved plan as it is: leave out --ratio and --kinds")
    saved_plan = read_plan_file(a.plan, "--plan") if a.plan is not None else None
    if saved_plan is not None and a.align:
        raise VitgraphError("--plan applies a saved plan as it is: align it when planning (vitgraph score --plan "
                            "... --align kernels), leave out --align")
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    model, x, source = _load(a)
    ratio = 0.5 if a.ratio is None else a.ratio
    kinds = list(PRUNABLE_KINDS) if a.kinds is None else a.kinds
    how = f"--plan {a.plan}" if saved_plan is not None else f"--ratio {ratio} --kinds {','.join(kinds)}"
    print(f"vitgraph compress {a.model} {how} -> {out}")
    if saved_plan is not None:
        with step("analyzing at the plan's input shapes"):
            try:
                an = analysis_for(model, saved_plan)
            except PlanError as e:
                raise PlanError(f"--plan {a.plan} does not fit {a.model}: {e}") from e
        plan = saved_plan
        if tuple(plan.input_shapes[0][1:]) != tuple(x.shape[1:]):
            x = torch.randn(1, *plan.input_shapes[0][1:])
    else:
        with step("analyzing"):
            an = analyze(model, x, prune_outputs=a.prune_outputs)
        with step("planning (magnitude scores)"):
            plan = Plan.from_scores(an, ratio=ratio, kinds=kinds, round_to=a.round_to, align=a.align)
    with step("compressing"):
        slim = compress(model, plan, an)
    if a.check:  # never write a model that differs from the masked one where masking is exact
        from vitgraph.verify import verify_compressed

        with step("checking compressed == masked on the example input"):
            verify_compressed(model, slim, plan, an, (x,))
    if a.reconstruct:
        from vitgraph.passes.reconstruct import refit

        data = _score_data(a, model, x, source)
        with step(f"reconstructing on {len(data)} batches of {a.data}"):
            fits = refit(slim, an, plan.selection(an), data)
        for f in fits:
            print(f"  {f}")
    if source is not None:
        saved = artifact.save(out, slim, plan, source)
        files = f"{artifact.SOURCE_FILE}, {artifact.PLAN_FILE}, {artifact.WEIGHTS_FILE}, model.onnx"
    else:  # a pickled module in: no recipe to rebuild it from, so the result is pickled too
        (out / artifact.PLAN_FILE).write_text(plan.to_json())
        torch.save(slim, out / "model.pt")
        files = "plan.json, model.pt, model.onnx"
    with step("exporting ONNX and checking parity"):
        rep = export_onnx(slim, out / artifact.ONNX_FILE, (x,))
    with step("counting FLOPs and measuring latency"):
        rows = {"dense": (count_params(model), count_flops(model, (x,))),
                "compressed": (count_params(slim), count_flops(slim, (x,)))}
        lat = measure_latency({"dense": torch_runner(model, (x,)), "compressed": torch_runner(slim, (x,))}, reps=a.reps, rounds=3)
    print(f"\n{'':<12}{'params (M)':>12}{'GFLOPs':>10}{'latency ms':>12}")
    for k, (p, f) in rows.items():
        print(f"{k:<12}{p / 1e6:>12.2f}{f / 1e9:>10.3f}{lat[k].median_ms:>12.2f}")
    sp = lat["dense"].median_ms / lat["compressed"].median_ms
    print(f"\nspeedup {sp:.2f}x (torch eager, batch 1, median); FLOPs ratio {rows['compressed'][1] / rows['dense'][1]:.3f}")
    print(f"ONNX parity max abs diff {rep.max_abs_diff:.2e}; wrote {out}/: {files}")
    if source is not None:
        print(f"reload with vitgraph.load({str(saved)!r}); prune again with vitgraph compress {saved} ...")
    return 0


def cmd_sparsify(a: argparse.Namespace) -> int:
    from vitgraph import Plan, analyze, compress, sparsify_24
    from vitgraph.deploy.export import export_onnx
    from vitgraph.deploy.onnx24 import check_24

    model, x, source = _load(a)
    if source is None:
        raise VitgraphError(f"sparsify writes a reloadable result, and {a.model} (a pickled module) has no recipe "
                            "to rebuild it from: give a timm/torchvision/hf name or a result directory")
    out = Path(a.out)
    print(f"vitgraph sparsify {a.model} -> {out}")
    if artifact.is_artifact(a.model):  # the result's own recipe: the 2:4 pass keeps every shape
        base, plan = artifact.read_source(a.model), read_plan_file(str(Path(a.model) / artifact.PLAN_FILE), "MODEL")
        dense = model
    else:  # the architecture as vitgraph.load rebuilds it: the model compressed by a keep-all plan
        with step("analyzing"):
            an = analyze(model, x, prune_outputs=a.prune_outputs)
        base, plan = source, Plan.keep_all(an)
        dense = compress(model, plan, an)
    with step(f"applying the 2:4 pattern ({a.method})"):
        try:
            sparse = sparsify_24(dense, a.method, min_features=a.min_features, exclude=a.exclude)
        except ValueError as e:
            raise VitgraphError(f"sparsify: {e}") from e
    report = sparse.vitgraph_24_report
    del sparse.vitgraph_24_report  # not part of the module's state
    artifact.save(out, sparse, plan, base)
    recipe = Path(a.model) / artifact.PREPROCESS_FILE
    if artifact.is_artifact(a.model) and recipe.is_file():  # a pruned result's preprocessing goes along
        (out / artifact.PREPROCESS_FILE).write_text(recipe.read_text())
    (out / SPARSITY_FILE).write_text(json.dumps({
        "method": report.method, "min_features": a.min_features, "exclude": list(a.exclude),
        "sparsified": list(report.sparsified), "skipped": [list(s) for s in report.skipped],
        "kept_magnitude_fraction": report.kept_magnitude_fraction}, indent=1))
    with step("exporting ONNX and checking parity"):
        rep = export_onnx(sparse, out / artifact.ONNX_FILE, (x,))
    check = check_24(out / artifact.ONNX_FILE, min_size=a.min_features)
    print(report.summary())
    print(f"ONNX parity max abs diff {rep.max_abs_diff:.2e}; check-24 of model.onnx: "
          f"{len(check.checked)} weights checked, {'OK' if check.ok else 'FAIL'}")
    print(f"wrote {out}/: {artifact.SOURCE_FILE}, {artifact.PLAN_FILE}, {artifact.WEIGHTS_FILE}, "
          f"{SPARSITY_FILE}, model.onnx")
    return 0 if check.ok else 1


def cmd_prune(a: argparse.Namespace) -> int:
    from vitgraph.distributed import init_from_env, shutdown

    init_from_env()
    try:
        return _prune(a)
    except KeyboardInterrupt:
        print(f"\ninterrupted: {a.out} keeps every finished step; continue with the same command and --resume",
              file=sys.stderr)
        return 130
    finally:
        shutdown()


def _prune(a: argparse.Namespace) -> int:
    from vitgraph.data import image_folder, make_transform, preprocessing
    from vitgraph.distributed import rank
    from vitgraph.pipeline import parse_target, prune

    parse_target(a.target, "--target")  # before any model is built
    if a.schedule == "oneshot" and a.steps != 1:
        raise VitgraphError(f"--steps {a.steps} prunes in rounds and needs --schedule iterative")
    for flag, v, low in (("--finetune-epochs", a.finetune_epochs, 0), ("--batch-size", a.batch_size, 1),
                         ("--round-to", a.round_to, 1), ("--score-batches", a.score_batches, 1),
                         ("--steps", a.steps, 1)):
        if v < low:
            raise VitgraphError(f"{flag} must be >= {low}, got {v}")
    model, x, source = _load(a)
    if source is None:
        raise VitgraphError(f"prune writes a reloadable result, and {a.model} (a pickled module) has no recipe to "
                            "rebuild it from: give a timm/torchvision/hf name or a result directory")
    recipe = preprocessing(source, a.model)
    transform = make_transform(recipe)
    train = image_folder(a.data, transform, a.batch_size, shuffle=True, seed=0, workers=a.workers, flag="--data")
    val = (image_folder(a.val_data, transform, a.batch_size, workers=a.workers, flag="--val-data")
           if a.val_data else None)
    if rank() == 0:
        print(f"vitgraph prune {a.model} --method {a.method} --target {a.target} -> {a.out}")
        classes = len(train.dataset.classes)
        found = f"in {classes} classes" if classes else "without labels"
        print(f"  {len(train.dataset)} training images {found}"
              + (f", {len(val.dataset)} validation images" if val is not None else " (no --val-data: measured on them)"))
    r = prune(model, train, val, method=a.method, target=a.target, finetune_epochs=a.finetune_epochs,
              out=a.out, source=source, example_input=x, runtime=a.runtime, round_to=a.round_to,
              score_batches=a.score_batches, lr=a.lr, preprocess=recipe, reps=a.reps,
              prune_outputs=a.prune_outputs, int8=a.int8, schedule=a.schedule, steps=a.steps, resume=a.resume,
              reconstruct=a.reconstruct, check=a.check,
              **({"align": a.align} if a.align else {}))
    if rank() == 0:
        print(f"  loss: {r.loss}")
        print()
        print(r.table())
        print(f"\nFLOPs fraction {r.flops_fraction:.3f}; wrote {a.out}/: source.json, plan.json, model.safetensors, "
              f"model.onnx{', model.int8.onnx' if a.int8 else ''}, preprocess.json, widths.png, report.md; "
              f"reload with vitgraph.load({a.out!r})")
    return 0


def cmd_export(a: argparse.Namespace) -> int:
    from vitgraph.deploy.export import export_onnx

    model, x, _ = _load(a)
    with step(f"exporting {a.model} to {a.out}"):
        rep = export_onnx(model, a.out, (x,), opset=a.opset, simplify=a.simplify)
    print(f"{rep.exporter} exporter, opset {rep.opset}, {rep.n_nodes} nodes, "
          f"parity max abs diff {rep.max_abs_diff:.2e}; ops: {', '.join(rep.op_types)}")
    return 0


def cmd_check24(a: argparse.Namespace) -> int:
    from vitgraph.deploy.onnx24 import main as check_main

    return check_main([a.file])


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="vitgraph", description="Structured pruning of Vision Transformers as torch.fx passes.")
    p.add_argument("--verbose", action="store_true",
                   help="show what the exporters print while trying a form (TorchScript IR of a failed trace)")
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_cmd(name: str, help: str, analyzes: bool = True) -> argparse.ArgumentParser:
        s = sub.add_parser(name, help=help)
        s.add_argument("model", help="timm model name or torchvision:NAME (random weights), hf:CLASS (a transformers "
                       "model class, random weights) or hf:DIR (a local HuggingFace model directory), a vitgraph "
                       "compress --out directory, or path to a saved module")
        s.add_argument("--input-size", help="C,H,W of the example input (default: the model's config)")
        s.add_argument("--model-arg", action="append", default=[], metavar="KEY=VALUE",
                       help="keyword argument for timm.create_model / torchvision get_model (num_classes=10, "
                       "img_size=160), or a config field of hf:CLASS (hidden_size=192)")
        s.add_argument("--checkpoint", metavar="FILE",
                       help="state dict to load (.safetensors, or .pth/.pt read with weights_only=True)")
        if analyzes:
            s.add_argument("--prune-outputs", action="store_true",
                           help="let the channels of model outputs be pruned too (a feature extractor's embedding)")
        return s

    model_cmd("inspect", "print the channel groups of a model").set_defaults(fn=cmd_inspect)
    s = model_cmd("explain", "why channels are coupled or frozen")
    s.add_argument("group", nargs="*", help="group ids or parameter names (default: every group and frozen set)")
    s.set_defaults(fn=cmd_explain)
    s = model_cmd("score", "score every prunable unit (magnitude, hessian, kl, threshold); optionally plan")
    s.add_argument("--method", choices=["magnitude", "hessian", "kl", "threshold"], default="kl",
                   help="criterion (default kl: the best in benchmarks/results/criteria.md)")
    s.add_argument("--data", default="random", help="random | fashion-mnist | FILE.pt holding (inputs, targets) | DIR "
                   "(images, in class folders or not: a model without class logits needs no labels)")
    s.add_argument("--batches", type=int, default=32, help="number of batches (default 32: 512 images at batch 16)")
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--option", action="append", default=[], metavar="KEY=VALUE", help="method option, e.g. mode=hvp")
    s.add_argument("--out", default="scores.safetensors",
                   help="where to save the scores (safetensors: a tensor per group, method and fingerprint in its metadata)")
    s.add_argument("--plan", help="also write a plan (JSON) meeting --target")
    s.add_argument("--target", default="flops:0.5",
                   help="flops|params:FRACTION kept (default flops:0.5); threshold learns toward it")
    s.add_argument("--round-to", type=int, default=8, help="round kept channel counts to this multiple")
    s.add_argument("--align", choices=["kernels"], default=None, help=ALIGN_HELP)
    s.set_defaults(fn=cmd_score)
    s = model_cmd("compress", "prune by magnitude (or apply a saved plan), write plan, slim model and ONNX")
    s.add_argument("--ratio", type=float, default=None, help="fraction of each selected group removed (default 0.5)")
    s.add_argument("--kinds", type=lambda v: v.split(","), default=None,
                   help="comma-separated group kinds (default: every prunable kind)")
    s.add_argument("--plan", metavar="FILE", help="apply this saved plan (JSON, e.g. from vitgraph score --plan) "
                   "instead of planning by magnitude")
    s.add_argument("--round-to", type=int, default=1, help="round kept channel counts to this multiple")
    s.add_argument("--align", choices=["kernels"], default=None, help=ALIGN_HELP)
    s.add_argument("--reps", type=int, default=10, help="latency repetitions per round")
    s.add_argument("--out", required=True, help="output directory")
    s.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking the compressed model against the masked model on the example input")
    s.add_argument("--reconstruct", action="store_true",
                   help="refit the layers that read pruned channels to the dense model by ridge least squares "
                   "on --data (see vitgraph.reconstruct)")
    s.add_argument("--data", default="random",
                   help="calibration data of --reconstruct: DIR (ImageFolder) | random | fashion-mnist | FILE.pt")
    s.add_argument("--batches", type=int, default=8, help="calibration batches of --reconstruct (default 8)")
    s.add_argument("--batch-size", type=int, default=32)
    s.set_defaults(fn=cmd_compress)
    s = model_cmd("prune", "score, plan to a target, compress, fine-tune with distillation, export and report")
    s.add_argument("--data", required=True, metavar="DIR",
                   help="training images in ImageFolder layout (DIR/<class>/<image>), or DIR/<image> without labels "
                   "(a model without class logits, or any model distilled from its dense outputs)")
    s.add_argument("--val-data", metavar="DIR", help="validation images in ImageFolder layout (default: --data)")
    s.add_argument("--method", choices=["hessian", "kl", "magnitude", "threshold"], default="kl",
                   help="criterion (default kl: the best in benchmarks/results/criteria.md)")
    s.add_argument("--target", default="flops:0.5", help="flops|params|latency:FRACTION kept (default flops:0.5)")
    s.add_argument("--runtime", choices=RUNTIMES, default="torch-cpu",
                   help="runtime of latency targets and of the measured latency")
    s.add_argument("--finetune-epochs", type=int, default=1, help="epochs of fine-tuning with distillation (0: none)")
    s.add_argument("--batch-size", type=int, default=32)
    s.add_argument("--round-to", type=int, default=8, help="round kept channel counts to this multiple")
    s.add_argument("--score-batches", type=int, default=16,
                   help="training batches the scores are taken on (default 16: 512 images at batch 32)")
    s.add_argument("--lr", type=float, default=1e-4, help="fine-tuning learning rate (AdamW, cosine schedule)")
    s.add_argument("--workers", type=int, default=0, help="DataLoader worker processes")
    s.add_argument("--int8", action="store_true", help="also write model.int8.onnx (onnxruntime static quantization "
                   "calibrated on the scoring batches) and report its top-1 and onnxruntime CPU speedup")
    s.add_argument("--schedule", choices=["oneshot", "iterative"], default="oneshot",
                   help="oneshot: prune once, then fine-tune; iterative: prune in --steps rounds toward the target, "
                   "re-scoring each time, with the fine-tuning epochs shared out after the rounds (NViT)")
    s.add_argument("--steps", type=int, default=1, help="rounds of --schedule iterative (default 1)")
    s.add_argument("--resume", action="store_true",
                   help="continue an interrupted run in --out from its last finished step (same arguments)")
    s.add_argument("--reps", type=int, default=10, help="latency repetitions per round")
    s.add_argument("--align", choices=["kernels"], default=None, help=ALIGN_HELP)
    s.add_argument("--reconstruct", action=argparse.BooleanOptionalAction, default=True,
                   help="refit the layers that read pruned channels by ridge least squares on the scoring batches "
                   "before fine-tuning (default on)")
    s.add_argument("--no-check", dest="check", action="store_false",
                   help="skip checking the compressed model against the masked model on the example input")
    s.add_argument("--out", required=True, help="output directory")
    s.set_defaults(fn=cmd_prune)
    s = model_cmd("sparsify", "apply the 2:4 pattern to Linear weights and write a reloadable result")
    s.add_argument("--method", choices=["magnitude"], default="magnitude",
                   help="which 2 of every 4 weights are kept (largest magnitude)")
    s.add_argument("--min-features", type=int, default=64, help="Linear layers narrower than this stay dense")
    s.add_argument("--exclude", action="append", default=[], metavar="PATTERN",
                   help="fnmatch pattern of Linear names to leave dense (e.g. head)")
    s.add_argument("--out", required=True, help="output directory")
    s.set_defaults(fn=cmd_sparsify)
    s = model_cmd("export", "export a model to ONNX with a dynamic batch axis", analyzes=False)
    s.add_argument("--out", required=True)
    s.add_argument("--opset", type=int, default=None,
                   help="ONNX opset (default: the measured fastest form, see vitgraph.export_onnx)")
    s.add_argument("--simplify", action="store_true")
    s.set_defaults(fn=cmd_export)
    s = sub.add_parser("check-24", help="verify the 2:4 pattern of an ONNX file's weights")
    s.add_argument("file")
    s.set_defaults(fn=cmd_check24)
    return p


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Entry point of the console command."""
    a = build_parser().parse_args(argv)
    if a.verbose:
        from vitgraph.deploy.export import VERBOSE_ENV

        os.environ[VERBOSE_ENV] = "1"
    try:
        return a.fn(a)
    except VitgraphError as e:
        print(f"\nvitgraph: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
