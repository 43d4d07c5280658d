"""The ``vitgraph prune`` pipeline end to end on Fashion-MNIST image folders (issue 13's "done when").

    apt-get update && apt-get install -y dataset-fashion-mnist    # the data (Debian package)
    python benchmarks/prune_pipeline.py [--work /tmp/vitgraph_prune_pipeline]

1. Writes a Fashion-MNIST subset as ImageFolder trees ``WORK/data/train/<class>/<i>.png`` (from the
   training split) and ``WORK/data/val/<class>/<i>.png`` (from the test split).
2. Trains a small timm ViT (``vit_tiny_patch16_224`` rebuilt by name with ``--model-arg``s) on
   the training folder, preprocessed exactly as ``vitgraph prune`` preprocesses it (timm's data
   config through :func:`vitgraph.data.preprocessing`), and saves its state dict as ``ckpt.pth``
   and ``ckpt.safetensors``.
3. Runs the one command per method as a subprocess (hessian reads the ``.pth``, kl the
   ``.safetensors`` checkpoint): ``vitgraph prune ... --target flops:0.5 --finetune-epochs 2
   --int8 --runtime ort-cpu --out WORK/out_<method>``.
4. For each result, in a fresh interpreter where every way to unpickle raises (checked first),
   ``vitgraph.load(OUT)``: FLOPs fraction against the dense architecture, top-1 on the validation
   folder, max abs difference against ``OUT/model.onnx`` in onnxruntime on a validation batch,
   and the top-1 of ``OUT/model.int8.onnx``.
5. The default method's (kl) command under ``torchrun --nproc_per_node 2`` (CPU, gloo): its plan.json
   against the one-process run's.
6. ``--target latency:0.5 --runtime ort-cpu --finetune-epochs 0``, then the dense and the result's
   ONNX files timed against each other several times (interleaved medians), with the spread.
7. With ``--schedule`` in ``vitgraph prune --help``: the default method's command with ``--schedule
   iterative --steps 3`` beside the one-shot row.

Prints the table and writes benchmarks/results/prune_pipeline.md.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import shlex
import statistics
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import torch
import torch.nn.functional as F

HERE = Path(__file__).resolve().parent
RESULTS = HERE / "results"
BIN = Path(sys.executable).parent
MODEL = "vit_tiny_patch16_224"
MODEL_ARGS = {"img_size": 28, "patch_size": 4, "embed_dim": 96, "depth": 4, "num_heads": 3, "num_classes": 10}
CLASSES = ("t-shirt", "trouser", "pullover", "dress", "coat", "sandal", "shirt", "sneaker", "bag", "boot")

# a fresh interpreter: every way to unpickle raises (checked), then the result is reloaded
FRESH = textwrap.dedent(r"""
    import json, pickle, sys, collections
    import _pickle
    import numpy as np, onnxruntime as ort, torch, timm
    import torch.serialization
    import vitgraph, vitgraph.artifact, vitgraph.api
    from vitgraph.deploy.measure import count_flops
    from vitgraph.data import make_transform
    from torchvision.datasets import ImageFolder

    class Forbidden(RuntimeError):
        pass

    def _audit(event, args):  # the C unpickler too: any global it looks up raises
        if event == "pickle.find_class":
            raise Forbidden(f"unpickling is forbidden here ({args})")

    def forbidden(*a, **k):
        raise Forbidden("unpickling is forbidden here")

    class NoUnpickler:
        def __init__(self, *a, **k):
            raise Forbidden("unpickling is forbidden here")

    original_loads = pickle.loads
    sys.addaudithook(_audit)
    for mod in (pickle, _pickle):
        for name in ("load", "loads", "_load", "_loads"):
            if hasattr(mod, name):
                setattr(mod, name, forbidden)
        for name in ("Unpickler", "_Unpickler"):
            if hasattr(mod, name):
                setattr(mod, name, NoUnpickler)
    torch.load = torch.serialization.load = forbidden
    import torch._weights_only_unpickler as wou
    wou.Unpickler, wou.load = NoUnpickler, forbidden
    guard = []
    for what, fn in (("pickle.loads", lambda: pickle.loads(pickle.dumps([1]))),
                     ("original C loads of a class", lambda: original_loads(pickle.dumps(collections.OrderedDict()))),
                     ("pickle.Unpickler", lambda: pickle.Unpickler(None)),
                     ("torch.load", lambda: torch.load("x.pt"))):
        try:
            fn()
            guard.append(f"{what}: NOT blocked")
        except Forbidden:
            guard.append(f"{what}: blocked")
    assert all(g.endswith(": blocked") for g in guard), guard

    out, val_dir = sys.argv[1], sys.argv[2]
    m = vitgraph.load(out)
    src = json.load(open(out + "/source.json"))
    base = src
    while base["kind"] == "vitgraph":  # an iterative result: rounds of plans over the timm source
        base = base["base"]
    dense = timm.create_model(base["name"], pretrained=False, **base["kwargs"]).eval()
    x1 = torch.zeros(1, *src["input_size"])
    flops = count_flops(m, (x1,)) / count_flops(dense, (x1,))
    tf = make_transform(json.load(open(out + "/preprocess.json")))
    ds = ImageFolder(val_dir, transform=tf)
    loader = torch.utils.data.DataLoader(ds, batch_size=250)
    sess = ort.InferenceSession(out + "/model.onnx", providers=["CPUExecutionProvider"])
    name = sess.get_inputs()[0].name
    q = None
    try:
        q = ort.InferenceSession(out + "/model.int8.onnx", providers=["CPUExecutionProvider"])
    except Exception:
        pass
    hits = hits8 = n = 0
    diff = None
    with torch.no_grad():
        for i, (x, y) in enumerate(loader):
            logits = m(x)
            hits += int((logits.argmax(-1) == y).sum())
            n += len(y)
            if i == 0:  # the ONNX parity on the first validation batch
                xb = x[:64]
                z = sess.run(None, {name: xb.numpy()})[0]
                diff = float(np.abs(logits[:64].numpy() - z).max())
            if q is not None:
                hits8 += int((q.run(None, {name: x.numpy()})[0].argmax(-1) == y.numpy()).sum())
    print(json.dumps({"guard": guard, "flops_fraction": flops, "top1": 100.0 * hits / n, "n_val": n,
                      "onnx_max_abs_diff": diff, "onnx_batch": 64,
                      "int8_top1": 100.0 * hits8 / n if q is not None else None,
                      "params": sum(p.numel() for p in m.parameters())}))
""")


# ---------------------------------------------------------------------------------------------
# 1. the image folders


def write_folders(root: Path, train_per_class: int, val_per_class: int) -> tuple[Path, Path]:
    """Fashion-MNIST as ImageFolder trees: the first N images of each class of each split."""
    from PIL import Image

    from vitgraph.data import load_fashion_mnist

    stamp = root / "data" / "done.json"
    want = {"train_per_class": train_per_class, "val_per_class": val_per_class}
    train, val = root / "data" / "train", root / "data" / "val"
    if stamp.is_file() and json.loads(stamp.read_text()) == want:
        return train, val
    for split, folder, n in (("train", train, train_per_class), ("test", val, val_per_class)):
        x, y = load_fashion_mnist(split)
        for c, cname in enumerate(CLASSES):
            d = folder / f"{c}_{cname}"
            d.mkdir(parents=True, exist_ok=True)
            for old in d.glob("*.png"):
                old.unlink()
            idx = (y == c).nonzero().flatten()[:n]
            for i in idx.tolist():
                Image.fromarray((x[i, 0] * 255).round().to(torch.uint8).numpy(), mode="L").save(d / f"{i}.png")
    stamp.write_text(json.dumps(want))
    return train, val


# ---------------------------------------------------------------------------------------------
# 2. the dense model, trained with the pipeline's own preprocessing


def _tensors(folder: Path, transform) -> tuple[torch.Tensor, torch.Tensor]:
    from vitgraph.data import image_folder

    xs, ys = zip(*image_folder(folder, transform, 500))
    return torch.cat(xs), torch.cat(ys)


def _augment(x: torch.Tensor, gen: torch.Generator) -> torch.Tensor:
    """Random horizontal flip and +-2 pixel shift (the preprocessed tensors, background -1)."""
    flip = torch.rand(len(x), generator=gen) < 0.5
    x = torch.where(flip[:, None, None, None], x.flip(-1), x)
    dx, dy = (int(v) for v in torch.randint(-2, 3, (2,), generator=gen))
    return torch.roll(F.pad(x, (2, 2, 2, 2), value=-1.0), (dy, dx), dims=(-2, -1))[..., 2:-2, 2:-2]


@torch.no_grad()
def _top1(model, x, y, bs: int = 500) -> float:
    model.eval()
    return 100.0 * sum(int((model(x[i:i + bs]).argmax(-1) == y[i:i + bs]).sum()) for i in range(0, len(x), bs)) / len(x)


def train_dense(work: Path, train: Path, val: Path, epochs: int, lr: float, bs: int = 64) -> dict:
    """Train (or reuse) the dense model; writes ckpt.pth and ckpt.safetensors."""
    from safetensors.torch import save_file

    from vitgraph.data import make_transform, preprocessing
    from vitgraph.models import load_model_and_source

    info_file = work / "ckpt.json"
    key = {"model": MODEL, "args": MODEL_ARGS, "epochs": epochs, "lr": lr, "bs": bs,
           "data": json.loads((train.parent / "done.json").read_text())}
    if info_file.is_file() and json.loads(info_file.read_text()).get("key") == key:
        info = json.loads(info_file.read_text())
        print(f"dense model from {work / 'ckpt.pth'} (trained earlier: {info['top1']:.2f}% val top-1)")
        return info
    model, _, source = load_model_and_source(MODEL, model_args=MODEL_ARGS)
    recipe = preprocessing(source)
    tf = make_transform(recipe)
    t0 = time.perf_counter()
    xtr, ytr = _tensors(train, tf)
    xva, yva = _tensors(val, tf)
    print(f"preprocessed {len(xtr)} training and {len(xva)} validation images ({time.perf_counter() - t0:.1f} s), "
          f"input {tuple(xtr.shape[1:])}, recipe {recipe}")
    torch.manual_seed(0)
    model.train()
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.05)
    steps = epochs * -(-len(xtr) // bs)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps, pct_start=0.1)
    gen = torch.Generator().manual_seed(0)
    t0 = time.perf_counter()
    for ep in range(epochs):
        model.train()
        order = torch.randperm(len(xtr), generator=gen)
        for i in range(0, len(xtr), bs):
            idx = order[i:i + bs]
            loss = F.cross_entropy(model(_augment(xtr[idx], gen)), ytr[idx], label_smoothing=0.1)
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
        print(f"  epoch {ep + 1}/{epochs}: loss {loss.item():.3f}, val top-1 {_top1(model, xva, yva):.2f}% "
              f"({time.perf_counter() - t0:.0f} s)", flush=True)
    seconds = time.perf_counter() - t0
    model.eval()
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    torch.save(state, work / "ckpt.pth")
    save_file(state, str(work / "ckpt.safetensors"))
    info = {"key": key, "top1": _top1(model, xva, yva), "train_seconds": seconds, "steps": steps}
    info_file.write_text(json.dumps(info, indent=1))
    return info


# ---------------------------------------------------------------------------------------------
# 3.-7. the commands and their checks


def model_argv() -> list[str]:
    out = [MODEL]
    for k, v in MODEL_ARGS.items():
        out += ["--model-arg", f"{k}={v}"]
    return out


def prune_argv(ckpt: Path, train: Path, val: Path, out: Path, method: str, target: str, epochs: int,
               extra: tuple[str, ...] = ()) -> list[str]:
    return ["prune", *model_argv(), "--checkpoint", str(ckpt), "--data", str(train), "--val-data", str(val),
            "--method", method, "--target", target, "--finetune-epochs", str(epochs), *extra,
            "--runtime", "ort-cpu", "--out", str(out)]


def run(cmd: list[str], log: Path, env: dict) -> float:
    """Run ``cmd`` (output to ``log``); its seconds. Raises with the log's tail when it fails."""
    print(f"$ {shlex.join(cmd)}", flush=True)
    t0 = time.perf_counter()
    with open(log, "w") as f:
        rc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env).returncode
    seconds = time.perf_counter() - t0
    if rc != 0:
        raise RuntimeError(f"exit {rc} after {seconds:.0f} s: {' '.join(cmd)}\n{log.read_text()[-3000:]}")
    print(f"  done in {seconds:.0f} s (log {log})", flush=True)
    return seconds


def read_report(out: Path) -> dict:
    """The stage rows of OUT/report.md and its summary line's figures."""
    text = (out / "report.md").read_text()
    stages = {}
    for m in re.finditer(r"^\| (dense|pruned|fine-tuned|int8) \| ([\d.]+) \| ([\d.]+) \| ([\d.]+) \| ([\d.\-]+) \|$",
                         text, re.M):
        stages[m[1]] = {"top1": float(m[2]), "params_M": float(m[3]), "gflops": float(m[4]),
                        "latency_ms": None if m[5] == "-" else float(m[5])}
    info = {"stages": stages}
    if (m := re.search(r"FLOPs fraction ([\d.]+)", text)):
        info["flops_fraction"] = float(m[1])
    if (m := re.search(r"ONNX parity max abs diff ([\d.e+\-]+)", text)):
        info["onnx_diff"] = float(m[1].rstrip("."))
    if (m := re.search(r"onnxruntime CPU ([\d.]+) ms fp32 -> ([\d.]+) ms int8, speedup ([\d.]+)x", text)):
        info["fp32_ms"], info["int8_ms"], info["int8_speedup"] = float(m[1]), float(m[2]), float(m[3])
    if (m := re.search(r"Fine-tuning: (\d+) steps", text)):
        info["ft_steps"] = int(m[1])
    return info


def fresh_check(out: Path, val: Path, env: dict) -> dict:
    res = subprocess.run([sys.executable, "-c", FRESH, str(out), str(val)], capture_output=True, text=True, env=env)
    if res.returncode != 0:
        raise RuntimeError(f"the no-pickle reload of {out} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def latency_spread(work: Path, out: Path, times: int, reps: int, rounds: int) -> list[float]:
    """``times`` interleaved measurements of OUT/model.onnx over the dense model's ONNX (batch 1,
    onnxruntime CPU, default threads, as the pipeline's latency table): the fractions."""
    from vitgraph.deploy.export import export_onnx
    from vitgraph.deploy.measure import measure_latency, ort_runner
    from vitgraph.models import load_model

    dense, x = load_model(MODEL, model_args=MODEL_ARGS, checkpoint=str(work / "ckpt.pth"))
    export_onnx(dense, work / "dense.onnx", (x,))
    fns = {"dense": ort_runner(work / "dense.onnx", x), "pruned": ort_runner(out / "model.onnx", x)}
    fracs = []
    for i in range(times):
        stats = measure_latency(fns, warmup=3, reps=reps, rounds=rounds)
        fracs.append(stats["pruned"].median_ms / stats["dense"].median_ms)
        print(f"  latency measurement {i + 1}/{times}: {stats['dense'].median_ms:.4f} ms dense, "
              f"{stats['pruned'].median_ms:.4f} ms pruned, fraction {fracs[-1]:.3f}", flush=True)
    return fracs


def int8_speed(out: Path, batches: tuple[int, ...] = (1, 64), reps: int = 20, rounds: int = 5) -> dict[int, tuple]:
    """onnxruntime CPU medians (ms) of OUT/model.onnx and OUT/model.int8.onnx, interleaved, per batch size."""
    from vitgraph.deploy.measure import measure_latency, ort_runner

    size = json.loads((out / "source.json").read_text())["input_size"]
    res = {}
    for b in batches:
        x = torch.randn(b, *size).numpy()
        stats = measure_latency({"fp32": ort_runner(out / "model.onnx", x), "int8": ort_runner(out / "model.int8.onnx", x)},
                                reps=reps, rounds=rounds)
        res[b] = (stats["fp32"].median_ms, stats["int8"].median_ms, stats["fp32"].median_ms / stats["int8"].median_ms)
    return res


def latency_diagnosis(work: Path, train: Path, repeats: int = 2) -> dict:
    """Why a latency target lands where it does: the command's scores (its first 8 training batches),
    then (a) ``plan_to_target(..., calibrate=True)`` as the command calls it, with its round history,
    ``repeats`` times, and (b) plans from the latency table alone at several planned fractions, each
    timed against the dense model in long interleaved runs (200 calls x 10 rounds, 3 times)."""
    import tempfile
    from itertools import islice

    import vitgraph
    from vitgraph.data import image_folder, make_transform, preprocessing
    from vitgraph.deploy.export import export_onnx
    from vitgraph.deploy.measure import count_flops, measure_latency, ort_runner
    from vitgraph.errors import PlanError
    from vitgraph.models import load_model_and_source
    from vitgraph.planning.latency import LatencyTable
    from vitgraph.targets import plan_to_target

    model, x, source = load_model_and_source(MODEL, model_args=MODEL_ARGS, checkpoint=str(work / "ckpt.pth"))
    loader = image_folder(train, make_transform(preprocessing(source)), 32, shuffle=True, seed=0)
    proxy = list(islice(iter(loader), 8))
    an = vitgraph.analyze(model, x)
    scores = vitgraph.score(model, an, "hessian", data=proxy)
    table = LatencyTable("ort-cpu", batch=1)
    dense_flops = count_flops(model, (x,))
    calibrated = []
    for _ in range(repeats):
        hist: list = []
        plan = plan_to_target(an, scores, target="latency", fraction=0.5, round_to=8, latency_table=table,
                              calibrate=True, history=hist)
        slim = vitgraph.compress(model, plan, an)
        calibrated.append({"chosen_flops": count_flops(slim, (x,)) / dense_flops,
                           "rounds": [{k: round(v, 3) for k, v in h.items() if k in ("planned_fraction", "predicted",
                                                                                     "achieved")} for h in hist]})
    floor = None
    try:
        plan_to_target(an, scores, target="latency", fraction=0.05, round_to=8, latency_table=table)
    except PlanError as e:
        floor = str(e)
    curve = {}
    with tempfile.TemporaryDirectory() as d:
        export_onnx(model, Path(d) / "dense.onnx", (x,), check=False)
        fns = {"dense": ort_runner(Path(d) / "dense.onnx", x)}
        flops = {}
        for f in (0.5, 0.6, 0.7, 0.8, 0.9):
            plan = plan_to_target(an, scores, target="latency", fraction=f, round_to=8, latency_table=table)
            slim = vitgraph.compress(model, plan, an)
            export_onnx(slim, Path(d) / f"p{f}.onnx", (x,), check=False)
            fns[f] = ort_runner(Path(d) / f"p{f}.onnx", x)
            flops[f] = count_flops(slim, (x,)) / dense_flops
        meas = {f: [] for f in flops}
        for _ in range(3):
            st = measure_latency(fns, reps=200, rounds=10)
            for f in flops:
                meas[f].append(st[f].median_ms / st["dense"].median_ms)
        for f in flops:
            curve[f] = {"flops": round(flops[f], 3), "measured": [round(v, 3) for v in meas[f]]}
    # (c) the same calibration with every measurement 200 calls x 10 rounds instead of 5 x 5
    import vitgraph.targets as targets

    short = targets.measure_fraction
    targets.measure_fraction = lambda m, s, t, shape, reps=5, rounds=5, cache=None, seconds=None: short(
        m, s, t, shape, reps=200, rounds=10, cache=cache)
    try:
        hist = []
        plan = plan_to_target(an, scores, target="latency", fraction=0.5, round_to=8, latency_table=table,
                              calibrate=True, history=hist)
    finally:
        targets.measure_fraction = short
    slim = vitgraph.compress(model, plan, an)
    long_cal = {"chosen_flops": count_flops(slim, (x,)) / dense_flops,
                "rounds": [{k: round(v, 3) for k, v in h.items() if k in ("planned_fraction", "predicted", "achieved")}
                           for h in hist],
                "remeasured": [round(short(model, slim, table, tuple(x.shape), reps=200, rounds=10)[0], 3)
                               for _ in range(3)]}
    return {"calibrated": calibrated, "floor": floor, "curve": curve, "long_calibration": long_cal}


def has_schedule() -> bool:
    res = subprocess.run([str(BIN / "vitgraph"), "prune", "--help"], capture_output=True, text=True)
    return "--schedule" in res.stdout


def _fmt(v, spec: str = ".2f") -> str:
    return "-" if v is None else format(v, spec)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--work", default="/tmp/vitgraph_prune_pipeline", help="work directory (data, checkpoint, results)")
    ap.add_argument("--train-per-class", type=int, default=600)
    ap.add_argument("--val-per-class", type=int, default=100)
    ap.add_argument("--epochs", type=int, default=20, help="dense training epochs")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--finetune-epochs", type=int, default=2)
    ap.add_argument("--methods", default="hessian,kl")
    ap.add_argument("--no-torchrun", action="store_true")
    ap.add_argument("--no-latency", action="store_true")
    ap.add_argument("--default-method", default="kl", help="vitgraph prune's default method: the iterative and "
                    "torchrun rows run it (its one-shot run must be in --methods)")
    ap.add_argument("--latency-method", default="kl")
    ap.add_argument("--latency-runs", type=int, default=3, help="runs of the latency:0.5 command")
    ap.add_argument("--latency-times", type=int, default=5, help="interleaved latency measurements of each run")
    ap.add_argument("--latency-reps", type=int, default=200, help="calls per candidate per round (10 rounds)")
    ap.add_argument("--no-latency-diagnosis", dest="latency_diagnosis", action="store_false",
                    help="skip re-running the latency calibration with its round history")
    ap.add_argument("--iterative", choices=["auto", "yes", "no"], default="auto",
                    help="the --schedule iterative --steps 3 row (auto: when vitgraph prune --help shows --schedule)")
    ap.add_argument("--name", default="prune_pipeline")
    a = ap.parse_args(argv)
    torch.set_num_threads(1)
    t_start = time.perf_counter()
    work = Path(a.work)
    work.mkdir(parents=True, exist_ok=True)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    vitgraph_bin = str(BIN / "vitgraph")

    train, val = write_folders(work, a.train_per_class, a.val_per_class)
    print(f"image folders: {train} ({10 * a.train_per_class} images), {val} ({10 * a.val_per_class} images)")
    info = train_dense(work, train, val, a.epochs, a.lr)
    ckpts = {"hessian": work / "ckpt.pth", "kl": work / "ckpt.safetensors"}

    commands: list[str] = []
    seconds: dict[str, float] = {}
    reports: dict[str, dict] = {}
    checks: dict[str, dict] = {}
    runs: list[tuple[str, str, list[str]]] = []  # (row, method, argv after the program)
    for method in a.methods.split(","):
        runs.append((method, method, prune_argv(ckpts.get(method, ckpts["hessian"]), train, val, work / f"out_{method}",
                                                method, "flops:0.5", a.finetune_epochs, ("--int8",))))
    D = a.default_method  # the iterative, torchrun and latency rows run vitgraph prune's default method
    iterative = a.iterative == "yes" or (a.iterative == "auto" and has_schedule())
    if iterative:
        runs.append((f"{D} iterative (3 steps)", D,
                     prune_argv(ckpts[D], train, val, work / f"out_{D}_iter", D, "flops:0.5",
                                a.finetune_epochs, ("--schedule", "iterative", "--steps", "3", "--int8"))))
    for row, _method, args in runs:
        out = Path(args[args.index("--out") + 1])
        cmd = [vitgraph_bin, *args]
        commands.append(shlex.join(cmd))
        seconds[row] = run(cmd, work / f"log_{out.name}.txt", env)
        reports[row] = read_report(out)
        checks[row] = fresh_check(out, val, env)
        if (out / "model.int8.onnx").is_file():
            checks[row]["int8_speed"] = int8_speed(out)
        print(f"  {row}: {json.dumps(checks[row])}", flush=True)

    torchrun = None
    if not a.no_torchrun:
        args = prune_argv(ckpts[D], train, val, work / f"out_{D}_torchrun", D, "flops:0.5",
                          a.finetune_epochs, ("--int8",))
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", "-m", "vitgraph.cli", *args]
        commands.append("OMP_NUM_THREADS=1 " + shlex.join(cmd))
        seconds[f"{D} torchrun x2"] = run(cmd, work / f"log_out_{D}_torchrun.txt", env)
        out2 = work / f"out_{D}_torchrun"
        same = (out2 / "plan.json").read_text() == (work / f"out_{D}" / "plan.json").read_text()
        reports[f"{D} torchrun x2"] = read_report(out2)
        checks[f"{D} torchrun x2"] = fresh_check(out2, val, env)
        checks[f"{D} torchrun x2"]["int8_speed"] = int8_speed(out2)
        printed = (work / f"log_out_{D}_torchrun.txt").read_text().count("| fine-tuned |")
        torchrun = {"plan_equal": same, "reports_printed": printed}
        print(f"  torchrun: plan.json equal to the one-process run's: {same}; fine-tuned rows printed: {printed}")

    latency = []
    for k in range(0 if a.no_latency else a.latency_runs):
        out3 = work / f"out_latency_{k + 1}"
        args = prune_argv(ckpts[a.latency_method], train, val, out3, a.latency_method, "latency:0.5", 0)
        cmd = [vitgraph_bin, *args]
        commands.append(shlex.join(cmd))
        row = f"{a.latency_method} latency:0.5 (run {k + 1})"
        seconds[row] = run(cmd, work / f"log_{out3.name}.txt", env)
        reports[row] = read_report(out3)
        checks[row] = fresh_check(out3, val, env)
        fracs = latency_spread(work, out3, a.latency_times, reps=a.latency_reps, rounds=10)
        st = reports[row]["stages"]
        latency.append({"row": row, "fractions": fracs, "median": statistics.median(fracs), "min": min(fracs),
                        "max": max(fracs), "own": st["fine-tuned"]["latency_ms"] / st["dense"]["latency_ms"]})
    diagnosis = latency_diagnosis(work, train) if latency and a.latency_diagnosis else None
    if diagnosis is not None:
        print(f"  latency diagnosis: {json.dumps(diagnosis)}", flush=True)
    total = time.perf_counter() - t_start

    # the table
    rows = []
    d = reports[runs[0][0]]["stages"]["dense"]
    rows.append({"model": "dense", "top-1 dense": d["top1"], "top-1 pruned": "-", "top-1 fine-tuned": "-",
                 "top-1 int8": "-", "params (M)": d["params_M"], "MFLOPs": round(d["gflops"] * 1e3, 2),
                 "FLOPs fraction": 1.0, "ORT ms": d["latency_ms"], "ORT ms int8": "-", "command s": "-"})
    for row, rep in reports.items():
        st, ck = rep["stages"], checks[row]
        rows.append({"model": row, "top-1 dense": st["dense"]["top1"], "top-1 pruned": st["pruned"]["top1"],
                     "top-1 fine-tuned": st["fine-tuned"]["top1"],
                     "top-1 int8": st["int8"]["top1"] if "int8" in st else "-",
                     "params (M)": st["fine-tuned"]["params_M"], "MFLOPs": round(st["fine-tuned"]["gflops"] * 1e3, 2),
                     "FLOPs fraction": round(ck["flops_fraction"], 3), "ORT ms": st["fine-tuned"]["latency_ms"],
                     "ORT ms int8": rep.get("int8_ms", "-"), "command s": round(seconds[row])})

    def verdict(ok: bool) -> str:
        return "PASS" if ok else "FAIL"

    done = []
    for row in reports:
        if "latency" in row:
            continue
        st, ck = reports[row]["stages"], checks[row]
        dense_top1 = st["dense"]["top1"]
        done += [
            {"check": f"{row}: FLOPs fraction <= 0.55 (fresh process)", "measured": f"{ck['flops_fraction']:.3f}",
             "result": verdict(ck["flops_fraction"] <= 0.55)},
            {"check": f"{row}: top-1 within 3 points of dense (fresh process)",
             "measured": f"{ck['top1']:.2f} vs {dense_top1:.2f} ({ck['top1'] - dense_top1:+.2f})",
             "result": verdict(ck["top1"] >= dense_top1 - 3.0)},
            {"check": f"{row}: ONNX max abs diff <= 1e-4, no-pickle fresh process",
             "measured": f"{ck['onnx_max_abs_diff']:.2e} (batch {ck['onnx_batch']}; guard: {len(ck['guard'])} ways blocked)",
             "result": verdict(ck["onnx_max_abs_diff"] <= 1e-4)},
        ]
        if "int8_speedup" in reports[row]:
            r = reports[row]
            done.append({"check": f"{row}: INT8 top-1 / ORT CPU speedup over fp32 (report)",
                         "measured": f"{st['int8']['top1']:.2f}% (fresh process: {_fmt(ck['int8_top1'])}%) vs "
                                     f"fp32 {st['fine-tuned']['top1']:.2f}%; {r['fp32_ms']:.3f} -> {r['int8_ms']:.3f} ms, "
                                     f"{r['int8_speedup']:.2f}x; re-measured (batch: fp32 -> int8 ms, speedup) "
                                     + ", ".join(f"b{b}: {f:.3f} -> {q:.3f}, {sp:.2f}x"
                                                 for b, (f, q, sp) in ck.get("int8_speed", {}).items()),
                         "result": "reported"})
    if torchrun is not None:
        t = reports[f"{a.default_method} torchrun x2"]["stages"]
        done.append({"check": "torchrun x2 plan.json == one-process plan.json",
                     "measured": f"equal: {torchrun['plan_equal']}; top-1 dense/pruned/fine-tuned "
                                 f"{t['dense']['top1']:.2f}/{t['pruned']['top1']:.2f}/{t['fine-tuned']['top1']:.2f}; "
                                 f"report printed {torchrun['reports_printed']}x",
                     "result": verdict(torchrun["plan_equal"] and torchrun["reports_printed"] == 1)})
    for lat in latency:
        done.append({"check": f"{lat['row']}: latency fraction on ort-cpu within 5% of 0.5 (in [0.475, 0.525])",
                     "measured": f"median {lat['median']:.3f} of {len(lat['fractions'])} interleaved measurements "
                                 f"(spread {lat['min']:.3f}-{lat['max']:.3f}); the command's own report: {lat['own']:.3f}; "
                                 f"FLOPs fraction {checks[lat['row']]['flops_fraction']:.3f}",
                     "result": verdict(0.475 <= lat["median"] <= 0.525)})
    if not iterative:
        done.append({"check": "--schedule iterative --steps 3 row", "measured": "vitgraph prune --help has no --schedule",
                     "result": "missing"})

    from vitgraph.deploy.measure import format_table, write_results_md

    print(format_table(rows))
    print(format_table(done))
    print(f"total {total:.0f} s")
    argv_line = shlex.join([Path(sys.executable).name, "benchmarks/prune_pipeline.py",
                            *(argv if argv is not None else sys.argv[1:])])
    notes = [
        "## Done when", "", _md(done), "",
        f"Benchmark command: `{argv_line}` (total {total / 60:.1f} min on this machine, shared with two other jobs).", "",
        "Commands it ran (each a subprocess; OMP_NUM_THREADS=1):", "",
        *[f"    {c}" for c in commands], "",
        f"Data: Fashion-MNIST (Debian's dataset-fashion-mnist) written as PNG ImageFolder trees: "
        f"{10 * a.train_per_class} training images ({a.train_per_class} per class, the first of each class in the "
        f"training split) and {10 * a.val_per_class} validation images ({a.val_per_class} per class from the test "
        "split). Every top-1 is on those validation images.", "",
        f"Model: timm `{MODEL}` with {MODEL_ARGS} (rebuilt by name with `--model-arg`), trained from scratch "
        f"{a.epochs} epochs ({info['steps']} steps of batch 64, AdamW lr {a.lr} one-cycle, flips and +-2 px shifts, "
        f"label smoothing 0.1; {info['train_seconds']:.0f} s) on the training folder preprocessed by "
        "`vitgraph.data.preprocessing` (timm's data config: bicubic resize to 31, centre crop 28, mean/std 0.5), "
        f"the preprocessing `vitgraph prune` applies; val top-1 {info['top1']:.2f}%. Its state dict is saved as "
        "`ckpt.pth` (the hessian run reads it) and `ckpt.safetensors` (the kl, iterative, torchrun and latency runs "
        "read it; its dense top-1 equals the .pth run's).", "",
        "Columns: top-1 in % on the validation folder as each command's report.md gives it (dense, pruned before "
        "fine-tuning, fine-tuned, int8 = model.int8.onnx in onnxruntime); params, MFLOPs and ORT ms (batch 1, "
        "onnxruntime CPU median of interleaved runs, by the command) of the fine-tuned model; FLOPs fraction as "
        "measured in the fresh no-pickle process; command s: wall seconds of the command.", "",
        "The fresh process: a new interpreter in which pickle/_pickle's load, loads and Unpickler, torch.load and "
        "torch's weights-only unpickler raise, and an audit hook makes any `pickle.find_class` raise (so the C "
        "unpickler cannot build objects either); it checks those raise, then `vitgraph.load(OUT)`, counts FLOPs "
        "against the dense architecture of source.json, takes top-1 over the validation folder with OUT's "
        "preprocess.json, the max abs difference to OUT/model.onnx in onnxruntime on the first 64 validation "
        "images, and the top-1 of OUT/model.int8.onnx.", "",
    ]
    if latency:
        notes += [f"Latency target: each run's OUT/model.onnx timed against the dense model's ONNX, {a.latency_times} "
                  f"times (onnxruntime CPU, batch 1, default threads as the command's latency table, "
                  f"{a.latency_reps} calls x 10 rounds interleaved each): "
                  + "; ".join(f"run {i + 1}: " + ", ".join(f"{f:.3f}" for f in lat["fractions"])
                              for i, lat in enumerate(latency)) + ".", ""]
    if diagnosis is not None:
        notes += ["Latency diagnosis (the command's hessian scores, in this process): the latency table's own "
                  f"floor: {diagnosis['floor']}. `plan_to_target(..., target='latency', fraction=0.5, "
                  "calibrate=True)` as the command calls it (each round: planned fraction, table's prediction, "
                  "measured fraction by `measure_fraction`'s defaults, 5 calls x 5 rounds):", "", "```"]
        notes += [f"calibration {i + 1}: chosen plan at FLOPs {c['chosen_flops']:.3f}; rounds {json.dumps(c['rounds'])}"
                  for i, c in enumerate(diagnosis["calibrated"])]
        notes += ["```", "", "Plans from the latency table alone (no calibration), each timed against the dense "
                  "model 3 times (200 calls x 10 rounds interleaved):", "", "```"]
        notes += [f"planned {f}: FLOPs {c['flops']}, measured latency fraction {c['measured']}"
                  for f, c in diagnosis["curve"].items()]
        lc = diagnosis["long_calibration"]
        notes += ["```", "", "The same calibration with every measurement 200 calls x 10 rounds (`measure_fraction` "
                  f"patched): chosen plan at FLOPs {lc['chosen_flops']:.3f}, rounds {json.dumps(lc['rounds'])}; "
                  f"that plan re-measured 3 times: {lc['remeasured']}.", ""]
    steps = {row: rep.get("ft_steps") for row, rep in reports.items()}
    D = a.default_method
    if f"{D} torchrun x2" in steps and D in steps:
        notes += [f"torchrun: the 2 ranks share out the training batches (DistributedSampler, batch 32 per rank), so "
                  f"the fine-tuning took {steps[f'{D} torchrun x2']} steps against the one-process run's "
                  f"{steps[D]} at the same learning rate; the plan is scored before fine-tuning, so it is "
                  "the same, and the fine-tuned top-1 differs.", ""]
    notes += ["Fresh-process figures per run:", "", "```"]
    notes += [f"{row:<28} {json.dumps({k: v for k, v in ck.items() if k != 'guard'})}" for row, ck in checks.items()]
    notes += ["```", "", "Guard: " + "; ".join(next(iter(checks.values()))["guard"])]
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = write_results_md(a.name, "vitgraph prune on Fashion-MNIST image folders (issue 13)", rows, "\n".join(notes))
    print(f"wrote {path}")
    return 0


def _md(rows: list[dict]) -> str:
    cols = list(rows[0])
    return "\n".join(["| " + " | ".join(cols) + " |", "| " + " | ".join("---" for _ in cols) + " |",
                      *("| " + " | ".join(str(r[c]) for c in cols) + " |" for r in rows)])


if __name__ == "__main__":
    sys.exit(main())
