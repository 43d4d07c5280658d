"""Data for scoring and benchmarks: Fashion-MNIST from Debian's package, saved tensors, random inputs."""
from __future__ import annotations

import gzip
from pathlib import Path
from typing import Iterator, Optional, Sequence

import numpy as np
import torch
import torch.nn.functional as F

FASHION_MNIST_DIR = Path("/usr/share/datasets/fashion-mnist")
INSTALL_HINT = "apt-get update && apt-get install -y dataset-fashion-mnist"
FASHION_MNIST_CLASSES = 10


def load_fashion_mnist(split: str = "train", root: Path = FASHION_MNIST_DIR, limit: Optional[int] = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Images ``[N, 1, 28, 28]`` in [0, 1] and labels ``[N]`` of one split (``train``/``test``)."""
    prefix = {"train": "train", "test": "t10k"}.get(split)
    if prefix is None:
        raise ValueError(f"split must be 'train' or 'test', got {split!r}")
    img_path, lab_path = root / f"{prefix}-images-idx3-ubyte.gz", root / f"{prefix}-labels-idx1-ubyte.gz"
    if not img_path.exists() or not lab_path.exists():
        raise FileNotFoundError(f"Fashion-MNIST not found in {root}; install it with: {INSTALL_HINT}")
    with gzip.open(img_path, "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(lab_path, "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def fit_input(x: torch.Tensor, input_size: Sequence[int]) -> torch.Tensor:
    """Resize ``[N, C, H, W]`` images to ``input_size`` (C, H, W), repeating grey channels."""
    c, h, w = input_size
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        if x.shape[1] != 1:
            raise ValueError(f"cannot turn {x.shape[1]} channels into {c}")
        x = x.expand(-1, c, -1, -1)
    return x.contiguous()


def batches(x: torch.Tensor, y: Optional[torch.Tensor], batch_size: int, shuffle: bool = False,
            seed: int = 0) -> list[tuple[torch.Tensor, Optional[torch.Tensor]]]:
    """``(inputs, targets)`` batches of ``x``/``y`` (a list, so it can be iterated many times)."""
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    return [(x[idx[i:i + batch_size]], None if y is None else y[idx[i:i + batch_size]]) for i in range(0, len(x), batch_size)]


class EpochLoader:
    """Re-iterable shuffled batches with a fresh order every epoch (for fine-tuning)."""

    def __init__(self, x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int = 0) -> None:
        self.x, self.y, self.batch_size, self.seed, self.epoch = x, y, batch_size, seed, 0

    def __len__(self) -> int:
        return -(-len(self.x) // self.batch_size)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.epoch += 1
        return iter(batches(self.x, self.y, self.batch_size, shuffle=True, seed=self.seed + self.epoch))
