"""vitgraph.data on library calls gives the tensors its hand-written readers gave."""
from __future__ import annotations

import gzip

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from vitgraph.data import FASHION_MNIST_DIR, EpochLoader, batches, fit_input, load_fashion_mnist

_HAVE_FMNIST = (FASHION_MNIST_DIR / "t10k-images-idx3-ubyte.gz").exists()


def _old_load(split, root=FASHION_MNIST_DIR, limit=None):
    """The hand-written gzip + numpy reader vitgraph.data had before torchvision read the files."""
    prefix = {"train": "train", "test": "t10k"}[split]
    with gzip.open(root / f"{prefix}-images-idx3-ubyte.gz", "rb") as f:
        images = np.frombuffer(f.read(), np.uint8, offset=16).reshape(-1, 1, 28, 28)
    with gzip.open(root / f"{prefix}-labels-idx1-ubyte.gz", "rb") as f:
        labels = np.frombuffer(f.read(), np.uint8, offset=8)
    if limit is not None:
        images, labels = images[:limit], labels[:limit]
    return torch.from_numpy(images.astype(np.float32) / 255.0), torch.from_numpy(labels.astype(np.int64))


def _old_fit(x, input_size):
    c, h, w = input_size
    if x.shape[-2:] != (h, w):
        x = F.interpolate(x, size=(h, w), mode="bilinear", align_corners=False)
    if x.shape[1] != c:
        x = x.expand(-1, c, -1, -1)
    return x.contiguous()


def _old_batches(x, y, batch_size, shuffle=False, seed=0):
    idx = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed)) if shuffle else torch.arange(len(x))
    return [(x[idx[i:i + batch_size]], None if y is None else y[idx[i:i + batch_size]]) for i in range(0, len(x), batch_size)]


def _same_batches(a, b):
    assert len(a) == len(b)
    for (xa, ya), (xb, yb) in zip(a, b):
        assert torch.equal(xa, xb) and xa.dtype == xb.dtype
        assert (ya is None and yb is None) or (torch.equal(ya, yb) and ya.dtype == yb.dtype)


@pytest.mark.skipif(not _HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
@pytest.mark.parametrize("split,limit", [("test", None), ("train", None)])
def test_fashion_mnist_matches_old_reader(split, limit, tmp_path, monkeypatch):
    monkeypatch.setenv("VITGRAPH_CACHE", str(tmp_path))
    x, y = load_fashion_mnist(split, limit=limit)
    ox, oy = _old_load(split, limit=limit)
    assert x.shape == ox.shape and x.dtype == torch.float32 and y.dtype == torch.int64
    assert torch.equal(x, ox) and torch.equal(y, oy)
    again, _ = load_fashion_mnist(split, limit=10)  # from the cache
    assert torch.equal(again, ox[:10])


@pytest.mark.skipif(not _HAVE_FMNIST, reason="dataset-fashion-mnist is not installed")
def test_fashion_mnist_plain_files_are_linked(tmp_path, monkeypatch):
    monkeypatch.setenv("VITGRAPH_CACHE", str(tmp_path / "cache"))
    root = tmp_path / "plain"
    root.mkdir()
    for p in FASHION_MNIST_DIR.glob("*-ubyte.gz"):
        (root / p.stem).write_bytes(gzip.decompress(p.read_bytes()))
    x, y = load_fashion_mnist("test", root=root, limit=50)
    ox, oy = _old_load("test", limit=50)
    assert torch.equal(x, ox) and torch.equal(y, oy)
    raw = next((tmp_path / "cache").rglob("raw"))
    assert all(f.is_symlink() for f in raw.iterdir())


def test_fashion_mnist_missing_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="dataset-fashion-mnist"):
        load_fashion_mnist("train", root=tmp_path)
    with pytest.raises(ValueError):
        load_fashion_mnist("val", root=tmp_path)


@pytest.mark.parametrize("shape,size", [((5, 1, 28, 28), (3, 32, 32)), ((2, 1, 28, 28), (1, 20, 24)),
                                        ((2, 1, 16, 16), (3, 16, 16)), ((2, 3, 28, 28), (3, 28, 28)),
                                        ((2, 1, 12, 12), (4, 18, 18))])
def test_fit_input_matches_interpolate_and_expand(shape, size):
    x = torch.rand(shape, generator=torch.Generator().manual_seed(0))
    out = fit_input(x, size)
    assert out.shape == (shape[0], *size) and out.is_contiguous()
    assert torch.equal(out, _old_fit(x, size))


def test_fit_input_rejects_other_channel_counts():
    with pytest.raises(ValueError):
        fit_input(torch.zeros(1, 2, 8, 8), (3, 8, 8))


@pytest.mark.parametrize("n,bs,shuffle,seed", [(10, 3, False, 0), (10, 3, True, 0), (64, 16, True, 5), (7, 10, True, 1)])
def test_batches_match_old_helper(n, bs, shuffle, seed):
    g = torch.Generator().manual_seed(2)
    x, y = torch.randn(n, 3, 4, 4, generator=g), torch.randint(0, 10, (n,), generator=g)
    _same_batches(batches(x, y, bs, shuffle=shuffle, seed=seed), _old_batches(x, y, bs, shuffle, seed))
    _same_batches(batches(x, None, bs, shuffle=shuffle, seed=seed), _old_batches(x, None, bs, shuffle, seed))


def test_batches_edge_cases():
    assert batches(torch.zeros(0, 3), None, 4, shuffle=True) == []
    with pytest.raises(ValueError):
        batches(torch.zeros(4, 3), torch.zeros(3), 2)
    with pytest.raises(ValueError):
        batches(torch.zeros(4, 3), None, 0)


def test_epoch_loader_reseeds_each_epoch():
    x, y = torch.arange(20.0).view(10, 2), torch.arange(10)
    loader = EpochLoader(x, y, 4, seed=3)
    assert len(loader) == 3
    first, second = list(loader), list(loader)
    _same_batches(first, _old_batches(x, y, 4, True, 4))
    _same_batches(second, _old_batches(x, y, 4, True, 5))
