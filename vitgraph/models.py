"""Loading a model by name: timm names, ``torchvision:<name>``, or a saved module file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .errors import VitgraphError


def load_model(spec: str, input_size: Optional[str] = None, batch: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """A model with random weights (eval mode) and an example input of its default size.

    ``spec`` is a timm model name, ``torchvision:<name>`` for ``torchvision.models``, or the path
    of a module saved with ``torch.save(model, path)`` (then ``input_size`` is required).
    ``input_size`` is ``"C,H,W"``.
    """
    path = Path(spec)
    default: tuple[int, ...] = (3, 224, 224)
    torch.manual_seed(0)  # the same random weights in every process (torchrun ranks agree)
    if path.exists():
        model = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(model, dict):
            raise VitgraphError(f"{spec} holds a state dict; save the whole module (torch.save(model, path)) instead")
        if input_size is None:
            raise VitgraphError(f"--input-size is required for a saved module ({spec})")
    elif spec.startswith("torchvision:"):
        import torchvision

        name = spec.split(":", 1)[1]
        try:
            model = torchvision.models.get_model(name, weights=None)
        except ValueError as e:
            raise VitgraphError(f"{name!r} is not a torchvision model: {e}") from e
        image_size = getattr(model, "image_size", None)
        if isinstance(image_size, int):
            default = (3, image_size, image_size)
    else:
        import timm

        try:
            model = timm.create_model(spec, pretrained=False)
        except RuntimeError as e:
            raise VitgraphError(f"{spec!r} is neither a file nor a timm model name: {e}") from e
        default = tuple(model.pretrained_cfg.get("input_size", default))
    shape = [int(s) for s in input_size.split(",")] if input_size else list(default)
    torch.manual_seed(0)
    return model.eval(), torch.randn(batch, *shape)
