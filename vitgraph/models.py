"""Loading a model by name: timm names, ``torchvision:<name>``, a vitgraph result directory, or a
saved module file."""
from __future__ import annotations

from pathlib import Path
from typing import Optional

import torch
from torch import nn

from .artifact import Source, is_artifact, load, nested, read_source
from .errors import VitgraphError


def load_model(spec: str, input_size: Optional[str] = None, batch: int = 1) -> tuple[nn.Module, torch.Tensor]:
    """A model (random weights unless ``spec`` is a result directory, eval mode) and an example
    input of its default size; see :func:`load_model_and_source`."""
    model, x, _ = load_model_and_source(spec, input_size, batch)
    return model, x


def load_model_and_source(spec: str, input_size: Optional[str] = None,
                          batch: int = 1) -> tuple[nn.Module, torch.Tensor, Optional[Source]]:
    """A model, an example input, and the :class:`Source` that rebuilds the model's architecture.

    ``spec`` is a timm model name, ``torchvision:<name>`` for ``torchvision.models``, a directory
    written by ``vitgraph compress`` (its weights are loaded; pruning it again records it as the
    base), or the path of a module saved with ``torch.save(model, path)`` (then ``input_size`` is
    required and there is no source: unpickling runs code from the file, so only load files you
    trust). ``input_size`` is ``"C,H,W"``.
    """
    path = Path(spec)
    shape = _parse_size(input_size) if input_size else None
    torch.manual_seed(0)  # the same random weights in every process (torchrun ranks agree)
    source: Optional[Source]
    if is_artifact(path):
        saved = read_source(path)
        model = load(path)
        from .plan import Plan

        source = nested(saved, Plan.from_json((path / "plan.json").read_text()))
        shape = shape or saved.input_size
    elif path.exists():
        if path.is_dir():
            raise VitgraphError(f"{spec} is a directory but not a vitgraph result (source.json, plan.json, model.safetensors)")
        model = torch.load(path, map_location="cpu", weights_only=False)
        if isinstance(model, dict):
            raise VitgraphError(f"{spec} holds a state dict; save the whole module (torch.save(model, path)) instead")
        if shape is None:
            raise VitgraphError(f"--input-size is required for a saved module ({spec})")
        source = None
    elif spec.startswith("torchvision:"):
        source = Source("torchvision", spec.split(":", 1)[1])
        model = source.build()
        image_size = getattr(model, "image_size", None)
        shape = shape or ((3, image_size, image_size) if isinstance(image_size, int) else (3, 224, 224))
    else:
        source = Source("timm", spec)
        try:
            model = source.build()
        except VitgraphError as e:
            raise VitgraphError(f"{spec!r} is neither a file nor a timm model name: {e.__cause__ or e}") from e
        shape = shape or tuple(model.pretrained_cfg.get("input_size", (3, 224, 224)))
    if source is not None:
        source = Source(source.kind, source.name, source.kwargs, tuple(shape), source.base, source.plan)
    torch.manual_seed(0)
    return model.eval(), torch.randn(batch, *shape), source


def _parse_size(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError as e:
        raise VitgraphError(f"--input-size must be C,H,W integers, got {text!r}") from e
    if not shape or any(s <= 0 for s in shape):
        raise VitgraphError(f"--input-size must be positive integers, got {text!r}")
    return shape
