"""Fixtures shared by the tests; the plain helpers they use are in helpers.py."""
from __future__ import annotations

import pytest
import torch

from helpers import write_image_folder


@pytest.fixture
def x32() -> torch.Tensor:
    torch.manual_seed(1)
    return torch.randn(2, 3, 32, 32)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny two-class image folders: (train with 8 images a class, val with 4)."""
    root = tmp_path_factory.mktemp("images")
    write_image_folder(root / "train", 8, 0)
    write_image_folder(root / "val", 4, 1)
    return root / "train", root / "val"
