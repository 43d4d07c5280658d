"""Loading a model by name: timm names, ``torchvision:<name>``, a vitgraph result directory, or a
saved module file."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Optional

import torch
from torch import nn

from vitgraph.artifact import PLAN_FILE, Source, is_artifact, load, nested, read_source
from vitgraph.errors import VitgraphError


def load_model(spec: str, input_size: Optional[str] = None, batch: int = 1, *,
               model_args: Optional[Mapping[str, Any]] = None,
               checkpoint: Optional[str] = None) -> tuple[nn.Module, torch.Tensor]:
    """A model (random weights unless a checkpoint or result directory gives them, eval mode) and
    an example input of its default size; see :func:`load_model_and_source`."""
    model, x, _ = load_model_and_source(spec, input_size, batch, model_args=model_args, checkpoint=checkpoint)
    return model, x


def load_model_and_source(spec: str, input_size: Optional[str] = None, batch: int = 1, *,
                          model_args: Optional[Mapping[str, Any]] = None,
                          checkpoint: Optional[str] = None) -> tuple[nn.Module, torch.Tensor, Optional[Source]]:
    """A model, an example input, and the :class:`Source` that rebuilds the model's architecture.

    ``spec`` is a timm model name, ``torchvision:<name>`` for ``torchvision.models``,
    ``hf:<class>`` for a transformers model class built from its default config (``model_args``
    set config fields), ``hf:<dir>`` for a local HuggingFace model directory (``config.json`` and
    weights, as ``save_pretrained`` writes; nothing is downloaded), a directory
    written by ``vitgraph compress`` (its weights are loaded; pruning it again records it as the
    base), or the path of a module saved with ``torch.save(model, path)`` (then ``input_size`` is
    required and there is no source: unpickling runs code from the file, so only load files you
    trust). ``input_size`` is ``"C,H,W"``. ``model_args`` are keyword arguments for
    ``timm.create_model`` / ``torchvision.models.get_model`` (``num_classes``, ``img_size``);
    ``checkpoint`` is a state dict file (``.safetensors``, or ``.pth``/``.pt`` read with
    ``weights_only=True``) in the model library's key layout.
    """
    kwargs = dict(model_args or {})
    path = Path(spec)
    if kwargs and (is_artifact(path) or path.exists()):
        raise VitgraphError(f"model arguments {sorted(kwargs)} apply to timm and torchvision names, not to {spec}")
    shape = _parse_size(input_size) if input_size else None
    torch.manual_seed(0)  # the same random weights in every process (torchrun ranks agree)
    source: Optional[Source]
    if is_artifact(path):
        saved = read_source(path)
        model = load(path)
        from vitgraph.planning.plan import Plan

        source = nested(saved, Plan.from_json((path / PLAN_FILE).read_text()))
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
    elif spec.startswith("hf:"):
        model, source = _transformers_model(spec[3:], kwargs)
        shape = shape or _transformers_input_size(model.config)
    elif spec.startswith("torchvision:"):
        source = Source("torchvision", spec.split(":", 1)[1], kwargs)
        model = source.build()
        image_size = getattr(model, "image_size", None)
        shape = shape or ((3, image_size, image_size) if isinstance(image_size, int) else (3, 224, 224))
    else:
        source = Source("timm", spec, kwargs)
        try:
            model = source.build()
        except VitgraphError as e:
            if kwargs and _is_timm_model(spec):
                raise VitgraphError(_bad_model_args(spec, kwargs, e)) from e
            raise VitgraphError(f"{spec!r} is neither a file nor a timm model name: {e.__cause__ or e}") from e
        shape = shape or _timm_input_size(model, kwargs)
    if source is not None:
        source = Source(source.kind, source.name, source.kwargs, tuple(shape), source.base, source.plan)
    if checkpoint is not None:
        load_checkpoint(model, checkpoint)
    torch.manual_seed(0)
    return model.eval(), torch.randn(batch, *shape), source


def _transformers_model(what: str, config: dict[str, Any]) -> tuple[nn.Module, Source]:
    """A transformers model from a local model directory (its weights) or a class name (random)."""
    from vitgraph.artifact import build_transformers, transformers_class

    path = Path(what)
    if not path.is_dir():
        source = Source("transformers", what, config)
        return build_transformers(what, config), source
    if config:
        raise VitgraphError(f"model arguments {sorted(config)} apply to hf:<class>, not to the directory {what}")
    cfg_file = path / "config.json"
    if not cfg_file.is_file():
        raise VitgraphError(f"{what} is not a HuggingFace model directory (no config.json)")
    import json

    fields = json.loads(cfg_file.read_text())
    archs = fields.get("architectures") or []
    if not archs:
        raise VitgraphError(f"{cfg_file} names no model class (its 'architectures' field is empty)")
    cls = transformers_class(archs[0])
    try:
        model = cls.from_pretrained(str(path), local_files_only=True).eval()
    except (OSError, ValueError) as e:
        raise VitgraphError(f"cannot load the HuggingFace model in {what}: {e}") from e
    return model, Source("transformers", archs[0], model.config.to_diff_dict())


def _transformers_input_size(config: Any) -> tuple[int, int, int]:
    """``(C, H, W)`` of a transformers vision config (``num_channels``, ``image_size``)."""
    size = getattr(config, "image_size", 224)
    h, w = (size, size) if isinstance(size, int) else tuple(size)[:2]
    return int(getattr(config, "num_channels", 3)), int(h), int(w)


def _timm_input_size(model: nn.Module, kwargs: Mapping[str, Any]) -> tuple[int, ...]:
    """The input size of a timm model: its config's, with timm's ``img_size``/``in_chans`` arguments applied."""
    c, h, w = model.pretrained_cfg.get("input_size", (3, 224, 224))
    size = kwargs.get("img_size")
    if isinstance(size, int):
        h = w = size
    elif isinstance(size, (tuple, list)) and len(size) == 2:
        h, w = size
    return (int(kwargs.get("in_chans", c)), int(h), int(w))


def _is_timm_model(name: str) -> bool:
    import timm

    return bool(timm.is_model(name))


def _bad_model_args(spec: str, kwargs: dict[str, Any], e: BaseException) -> str:
    """Why timm model ``spec`` cannot be built with ``kwargs``, naming the arguments that fail on
    their own (each is tried alone) and the ones that stayed strings."""
    culprits = list(kwargs)
    if len(kwargs) > 1:
        culprits = []
        for k, v in kwargs.items():
            try:
                Source("timm", spec, {k: v}).build()
            except VitgraphError:
                culprits.append(k)
        culprits = culprits or list(kwargs)
    named = ", ".join(f"{k}={kwargs[k]!r}" for k in culprits)
    strings = [k for k in culprits if isinstance(kwargs[k], str)]
    hint = (f"; {', '.join(strings)} did not parse as a Python literal (a number, list, True/False), so it was "
            "passed as a string" if strings else "")
    return f"--model-arg {named}: timm model {spec!r} does not accept it ({e.__cause__ or e}){hint}"


def parse_model_args(items: Any, flag: str = "--model-arg") -> dict[str, Any]:
    """``["KEY=VALUE", ...]`` as keyword arguments; values are Python literals where they parse
    (``10``, ``[1,1,2,1]``, ``True``), else strings."""
    import ast

    args: dict[str, Any] = {}
    for item in items:
        key, eq, value = str(item).partition("=")
        if not eq or not key.isidentifier():
            raise VitgraphError(f"{flag} must be KEY=VALUE with KEY a Python name, got {item!r}")
        try:
            args[key] = ast.literal_eval(value)
        except (ValueError, SyntaxError):
            args[key] = value
    return args


def _parse_size(text: str) -> tuple[int, ...]:
    try:
        shape = tuple(int(s) for s in text.split(","))
    except ValueError as e:
        raise VitgraphError(f"--input-size must be C,H,W integers, got {text!r}") from e
    if not shape or any(s <= 0 for s in shape):
        raise VitgraphError(f"--input-size must be positive integers, got {text!r}")
    return shape


def load_checkpoint(model: nn.Module, file: str) -> None:
    """Load a state dict file into ``model`` strictly, with no unpickling of code.

    ``.safetensors`` files are read with safetensors; other files with ``torch.load(...,
    weights_only=True)``. A dict wrapping the state dict under ``state_dict``, ``model`` or
    ``state_dict_ema`` (training scripts' checkpoints) is unwrapped, and a ``module.`` prefix
    (DistributedDataParallel) is dropped.
    """
    p = Path(file)
    if not p.is_file():
        raise VitgraphError(f"checkpoint {file} does not exist")
    try:
        if p.suffix == ".safetensors":
            from safetensors.torch import load_file

            state: Any = load_file(str(p))
        else:
            state = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # noqa: BLE001 - any reader failure is a bad checkpoint file
        first = str(e).strip().splitlines()[0] if str(e).strip() else ""
        raise VitgraphError(f"cannot read checkpoint {file} as a state dict of tensors (no pickled code is run): "
                            f"{type(e).__name__}: {first}") from e
    for key in ("state_dict", "model", "state_dict_ema"):
        if isinstance(state, dict) and isinstance(state.get(key), dict):
            state = state[key]
            break
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise VitgraphError(f"checkpoint {file} does not hold a state dict of tensors")
    if state and all(k.startswith("module.") for k in state):
        state = {k[len("module."):]: v for k, v in state.items()}
    try:
        model.load_state_dict(state, strict=True)
    except RuntimeError as e:
        raise VitgraphError(f"checkpoint {file} does not fit {type(model).__name__}: {e}") from e
