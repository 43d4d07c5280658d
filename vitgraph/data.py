"""Data for scoring, pruning and benchmarks: image folders, Fashion-MNIST from Debian's package,
saved tensors, random inputs.

The files are read by ``torchvision.datasets.FashionMNIST`` (never downloading), inputs are fitted
to a model by ``torchvision.transforms.v2``, and batches come from ``torch.utils.data.DataLoader``
over a ``TensorDataset``; the tensors are the ones the hand-written readers gave, bit for bit.
Image folders (torchvision's ``ImageFolder`` layout) are preprocessed as the model's library
says (:func:`preprocessing`: timm's data config, a HuggingFace image processor's config).
"""
from __future__ import annotations

import hashlib
import json
import os
import tempfile
from pathlib import Path
from typing import Any, Iterator, Optional, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, Dataset, RandomSampler, SequentialSampler, TensorDataset

from vitgraph.artifact import PREPROCESS_FILE
from vitgraph.atomic import atomic_path
from vitgraph.errors import DataError

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = 10
_FASHION_MNIST_FILES = tuple(f"{p}-{kind}-ubyte" for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR,
                       limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` in [0, 1] and labels ``[N]`` of one split (``train``/``test``).

    ``root`` holds the four idx files, plain or gzipped (``<name>-ubyte[.gz]``, as Debian's
    ``dataset-fashion-mnist`` installs them).  ``torchvision.datasets.FashionMNIST`` reads them
    with ``download=False`` from a ``FashionMNIST/raw`` folder under the cache directory
    (``$VITGRAPH_CACHE`` or ``~/.cache/vitgraph``): plain files are symlinked there, gzipped ones
    are decompressed there once, since torchvision reads only the decompressed files.
    """
    from torchvision.datasets import FashionMNIST

    if split not in ("train", "test"):
        raise DataError(f"split must be 'train' or 'test', got {split!r}")
    dataset = FashionMNIST(str(_torchvision_root(Path(root))), train=split == "train", download=False)
    images, labels = dataset.data[:limit], dataset.targets[:limit]
    # uint8 -> float32, then a division by 255 (v2.ToDtype(scale=True) multiplies by 1/255,
    # which rounds 126 of the 256 grey levels differently)
    return images.unsqueeze(1).to(torch.float32) / 255.0, labels.clone()


def _torchvision_root(root: Path) -> Path:
    """A root whose ``FashionMNIST/raw`` holds the decompressed idx files of ``root``."""
    sources = {}
    for name in _FASHION_MNIST_FILES:
        plain, packed = root / name, root / f"{name}.gz"
        sources[name] = plain if plain.is_file() else packed if packed.is_file() else None
    missing = [name for name, src in sources.items() if src is None]
    if missing:
        raise FileNotFoundError(f"Fashion-MNIST not found in {root} (missing {', '.join(missing)}); "
                                f"install it with: {INSTALL_HINT}")
    cache = Path(os.environ.get("VITGRAPH_CACHE") or Path.home() / ".cache" / "vitgraph")
    key = hashlib.sha256(str(root.resolve()).encode()).hexdigest()[:12]
    out = cache / "fashion-mnist" / key
    raw = out / "FashionMNIST" / "raw"
    raw.mkdir(parents=True, exist_ok=True)
    for name, src in sources.items():
        _place(src.resolve(), raw / name)
    return out


def _place(src: Path, dst: Path) -> None:
    """``dst`` as a symlink to a plain ``src``, or as ``src`` decompressed (kept while ``src`` is unchanged)."""
    from torchvision.datasets.utils import extract_archive

    if src.suffix != ".gz":
        if not (dst.is_symlink() and dst.resolve() == src):
            with atomic_path(dst) as tmp:
                tmp.symlink_to(src)
        return
    stamp = src.stat().st_mtime_ns
    if dst.is_file() and not dst.is_symlink() and dst.stat().st_mtime_ns == stamp:
        return
    with tempfile.TemporaryDirectory(dir=dst.parent) as tmp:
        plain = Path(extract_archive(str(src), tmp))
        os.utime(plain, ns=(stamp, stamp))
        os.replace(plain, dst)  # atomic: a concurrent reader sees the old file or the whole new one


def fit_input(x: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images to ``input_size`` (C, H, W), repeating grey channels.

    Bilinear resizing without antialiasing (``v2.Resize(..., antialias=False)``, which is
    ``F.interpolate(..., align_corners=False)``) and ``v2.RGB`` for grey to three channels.
    ``v2`` has no transform to other channel counts, so those are still a plain ``expand``.
    """
    from torchvision.transforms import v2

    c, h, w = input_size
    if x.shape[1] != c and x.shape[1] != 1:
        raise DataError(f"cannot turn {x.shape[1]} channels into {c}")
    if x.shape[-2:] != (h, w):
        x = v2.Resize((h, w), interpolation=v2.InterpolationMode.BILINEAR, antialias=False)(x)
    if x.shape[1] != c:
        x = v2.RGB()(x) if c == 3 else x.expand(-1, c, -1, -1)
    return x.contiguous()


def batches(x: torch.Tensor, y: Optional[torch.Tensor], batch_size: int, shuffle: bool = False,
            seed: int = 0) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(inputs, targets)`` batches of ``x``/``y`` (a list, so it can be iterated many times).

    A ``DataLoader`` over a ``TensorDataset``; shuffled, the order is ``torch.randperm`` under a
    generator seeded with ``seed`` (a ``RandomSampler``'s).  Each batch is one indexing of the
    tensors (the loader's sampler yields index lists), not a stack of single items.
    """
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if y is not None and len(y) != len(x):
        raise DataError(f"{len(x)} inputs but {len(y)} targets")
    if len(x) == 0:
        return []
    dataset = TensorDataset(x) if y is None else TensorDataset(x, y)
    order = RandomSampler(dataset, generator=torch.Generator().manual_seed(seed)) if shuffle else SequentialSampler(dataset)
    loader = DataLoader(dataset, sampler=BatchSampler(order, batch_size, drop_last=False), batch_size=None)
    return [(b[0], None if y is None else b[1]) for b in loader]


class EpochLoader:
    """Re-iterable shuffled batches with a fresh order every epoch (for fine-tuning).

    Epoch ``e`` (from 1) is :func:`batches` shuffled with seed ``seed + e``, so a run's order
    depends only on ``seed`` and the epoch, not on how many random numbers were drawn before.
    """

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        return iter(batches(self.x, self.y, self.batch_size, shuffle=True, seed=self.seed + self.epoch))


# ---------------------------------------------------------------------------------------------
# image folders, preprocessed the way the model expects

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
_PIL_RESAMPLE = {0: "nearest", 1: "lanczos", 2: "bilinear", 3: "bicubic", 4: "box", 5: "hamming"}


def preprocessing(source: Any, spec: Optional[str] = None) -> dict[str, Any]:
    """The model's evaluation preprocessing as data (JSON-ready; :func:`make_transform` builds it).

    ``source`` is the model's :class:`vitgraph.artifact.Source` (its ``input_size`` is the size the
    images end at, so ``--input-size`` and ``img_size`` override the library's config).  timm
    models take their data config (``timm.data.resolve_data_config``, built by
    ``timm.data.create_transform``); HuggingFace models the image-processor config of their model
    directory (``spec`` ``hf:DIR`` with ``preprocessor_config.json``), else the model config's
    ``image_mean``/``image_std`` (0.5 where absent, transformers' default); torchvision models
    ImageNet's resize to 1/0.875, centre crop and mean/std.  A result directory ``spec`` holding
    ``preprocess.json`` (``vitgraph prune`` writes it) gives that file's recipe.
    """
    size = tuple(int(s) for s in source.input_size)
    if spec is not None and (Path(spec) / PREPROCESS_FILE).is_file():
        recipe = json.loads((Path(spec) / PREPROCESS_FILE).read_text())
        return _resized(recipe, size)
    base = source
    while base.kind == "vitgraph":
        base = base.base
    if base.kind == "timm":
        import timm
        from timm.data import resolve_data_config

        cfg = timm.models.get_pretrained_cfg(base.name)
        data_cfg = resolve_data_config({"input_size": size}, pretrained_cfg=cfg.to_dict() if cfg else {})
        return {"library": "timm", "config": {k: list(v) if isinstance(v, tuple) else v for k, v in data_cfg.items()}}
    if base.kind == "transformers":
        hf_dir = Path(spec[3:]) if spec and spec.startswith("hf:") else None
        file = hf_dir / "preprocessor_config.json" if hf_dir is not None else None
        if file is not None and file.is_file():
            return _resized(_hf_recipe(json.loads(file.read_text())), size)
        cfg = base.kwargs
        return {"library": "vitgraph", "size": list(size[1:]), "resize": list(size[1:]), "crop": False,
                "interpolation": "bilinear", "mean": list(cfg.get("image_mean", (0.5,) * 3)),
                "std": list(cfg.get("image_std", (0.5,) * 3))}
    h, w = size[1:]
    return {"library": "vitgraph", "size": [h, w], "resize": round(min(h, w) / 0.875), "crop": True,
            "interpolation": "bilinear", "mean": list(IMAGENET_MEAN), "std": list(IMAGENET_STD)}


def _hf_recipe(p: dict[str, Any]) -> dict[str, Any]:
    """A recipe from a transformers image processor's config (size/crop_size/resample/mean/std)."""
    size, crop = p.get("size", 224), p.get("crop_size")
    if isinstance(size, int):
        size = {"shortest_edge": size}
    resize: Any = [size["height"], size["width"]] if "height" in size else size.get("shortest_edge", 224)
    do_crop = bool(p.get("do_center_crop", False)) and crop is not None
    if isinstance(crop, int):
        crop = {"height": crop, "width": crop}
    final = [crop["height"], crop["width"]] if do_crop else (resize if isinstance(resize, list) else [resize, resize])
    normalize = p.get("do_normalize", True)
    return {"library": "vitgraph", "size": final, "resize": resize if p.get("do_resize", True) else None,
            "crop": do_crop, "interpolation": _PIL_RESAMPLE.get(p.get("resample", 2), "bilinear"),
            "mean": list(p.get("image_mean", (0.5,) * 3)) if normalize else [0.0] * 3,
            "std": list(p.get("image_std", (0.5,) * 3)) if normalize else [1.0] * 3}


def _resized(recipe: dict[str, Any], size: tuple[int, ...]) -> dict[str, Any]:
    """``recipe`` ending at the model's input size (a vitgraph recipe whose size differs is rescaled)."""
    if recipe.get("library") == "timm":
        return recipe | {"config": recipe["config"] | {"input_size": list(size)}}
    if list(recipe["size"]) == list(size[1:]):
        return recipe
    return recipe | {"size": list(size[1:]), "resize": list(size[1:]), "crop": False}


def make_transform(recipe: dict[str, Any]) -> Any:
    """The torchvision transform (PIL image -> float tensor ``[C, H, W]``) of a :func:`preprocessing` recipe."""
    if recipe.get("library") == "timm":
        from timm.data import create_transform

        cfg = {k: tuple(v) if isinstance(v, list) else v for k, v in recipe["config"].items()}
        return create_transform(**cfg, is_training=False)
    from torchvision.transforms import v2

    mode = v2.InterpolationMode(recipe.get("interpolation", "bilinear"))
    steps: list[Any] = [v2.ToImage()]
    if recipe.get("resize") is not None:
        steps.append(v2.Resize(recipe["resize"], interpolation=mode, antialias=True))
    if recipe.get("crop"):
        steps.append(v2.CenterCrop(recipe["size"]))
    steps += [v2.ToDtype(torch.float32, scale=True), v2.Normalize(recipe["mean"], recipe["std"])]
    return v2.Compose(steps)


class _ImageLoader:
    """torchvision's image loader; an unreadable image is an error naming its file (picklable,
    for DataLoader workers)."""

    def __init__(self, flag: str) -> None:
        self.flag = flag

    def __call__(self, path: str) -> Any:
        from torchvision.datasets.folder import default_loader

        from vitgraph.errors import VitgraphError

        try:
            return default_loader(path)
        except (OSError, ValueError, SyntaxError) as e:  # PIL: truncated, corrupt, not an image
            raise VitgraphError(f"{self.flag}: cannot read image {path}: {type(e).__name__}: {e}") from e


class UnlabeledImages(Dataset):
    """The images directly inside a folder (no class subfolders), transformed, without labels
    (items are image tensors; ``classes`` is empty)."""

    classes: list[str] = []

    def __init__(self, root: str | Path, transform: Any, loader: Any) -> None:
        from torchvision.datasets.folder import IMG_EXTENSIONS

        self.files = sorted(p for p in Path(root).iterdir() if p.is_file() and p.suffix.lower() in IMG_EXTENSIONS)
        self.transform, self.loader = transform, loader

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        return self.transform(self.loader(str(self.files[i])))


def image_folder(root: str | Path, transform: Any, batch_size: int, *, shuffle: bool = False, seed: int = 0,
                 workers: int = 0, flag: str = "--data") -> DataLoader:
    """A DataLoader of ``(images, labels)`` over a torchvision ``ImageFolder`` (``root/<class>/<image>``),
    or of image batches alone over a folder of images with no subfolders (unlabeled: for models
    distilled from their dense outputs, which need no labels).

    Shuffled, the order comes from a generator seeded with ``seed`` (the same on every rank, so a
    DistributedSampler built from it agrees).  A missing or empty folder is a
    :class:`~vitgraph.errors.VitgraphError` naming ``flag``.
    """
    from torchvision.datasets import ImageFolder

    from vitgraph.errors import VitgraphError

    if batch_size < 1:
        raise VitgraphError(f"--batch-size must be >= 1, got {batch_size}")
    layout = "DIR/<class>/<image>, or DIR/<image> unlabeled"
    if not Path(root).is_dir():
        raise VitgraphError(f"{flag} {root} is not a directory (an image folder: {flag} DIR with {layout})")
    dataset: Any
    if not any(p.is_dir() for p in Path(root).iterdir()):
        dataset = UnlabeledImages(root, transform, _ImageLoader(flag))
        if not len(dataset):
            raise VitgraphError(f"{flag} {root} holds no images and no class folders ({layout})")
    else:
        try:
            dataset = ImageFolder(str(root), transform=transform, loader=_ImageLoader(flag))
        except (FileNotFoundError, OSError) as e:
            raise VitgraphError(f"{flag} {root} is not an image folder in ImageFolder layout ({layout}): {e}") from e
    gen = torch.Generator().manual_seed(seed)
    return DataLoader(dataset, batch_size=batch_size, shuffle=shuffle, generator=gen, num_workers=workers)
