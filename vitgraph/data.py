"""Data for scoring and benchmarks: Fashion-MNIST from Debian's package, saved tensors, random inputs.

The files are read by ``torchvision.datasets.FashionMNIST`` (never downloading), inputs are fitted
to a model by ``torchvision.transforms.v2``, and batches come from ``torch.utils.data.DataLoader``
over a ``TensorDataset``; the tensors are the ones the hand-written readers gave, bit for bit.
"""
from __future__ import annotations

import hashlib
import os
import tempfile
from pathlib import Path
from typing import Iterator, Optional, Sequence

import torch
from torch.utils.data import BatchSampler, DataLoader, RandomSampler, SequentialSampler, TensorDataset

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = 10
_FASHION_MNIST_FILES = tuple(f"{p}-{kind}-ubyte" for p in ("train", "t10k") for kind in ("images-idx3", "labels-idx1"))


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` in [0, 1] and labels ``[N]`` of one split (``train``/``test``).

    ``root`` holds the four idx files, plain or gzipped (``<name>-ubyte[.gz]``, as Debian's
    ``dataset-fashion-mnist`` installs them).  ``torchvision.datasets.FashionMNIST`` reads them
    with ``download=False`` from a ``FashionMNIST/raw`` folder under the cache directory
    (``$VITGRAPH_CACHE`` or ``~/.cache/vitgraph``): plain files are symlinked there, gzipped ones
    are decompressed there once, since torchvision reads only the decompressed files.
    """
    from torchvision.datasets import FashionMNIST

    if split not in ("train", "test"):
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
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
            tmp = dst.with_name(f".{dst.name}.{os.getpid()}.link")
            tmp.unlink(missing_ok=True)
            tmp.symlink_to(src)
            os.replace(tmp, dst)
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
        raise ValueError(f"cannot turn {x.shape[1]} channels into {c}")
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
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if y is not None and len(y) != len(x):
        raise ValueError(f"{len(x)} inputs but {len(y)} targets")
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
