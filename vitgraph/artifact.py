"""Saved results as data, never pickled code: ``source.json`` + ``plan.json`` + ``model.safetensors``.

``source.json`` says how to rebuild the base architecture (a timm name and its keyword arguments,
a torchvision name, or an earlier artifact with the plan that slimmed it); ``plan.json`` is the
plan; ``model.safetensors`` holds the compressed weights. :func:`load` rebuilds the architecture,
replays the plan and loads the weights, so a result reloads with ``torch.load``'s safe defaults
in mind: nothing is unpickled, and no code is run but vitgraph's and the model library's own.
"""
from __future__ import annotations

import json
import os
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Optional, Union

import torch
from torch import nn

from vitgraph.errors import VitgraphError

__all__ = ["SOURCE_FILE", "PLAN_FILE", "WEIGHTS_FILE", "SPARSITY_FILE", "CLASSIFIER_FILE", "ONNX_FILE", "INT8_FILE",
           "PREPROCESS_FILE", "WIDTHS_FILE", "REPORT_FILE", "Source", "is_artifact", "load",
           "save"]

SOURCE_FILE, PLAN_FILE, WEIGHTS_FILE = "source.json", "plan.json", "model.safetensors"
SPARSITY_FILE = "sparsity24.json"  # written by vitgraph sparsify: the 2:4 layers, whose masks load restores
CLASSIFIER_FILE = "classifier.json"  # written when the model's classifier was reset: load resets it again
# the other files of a result directory (written by vitgraph compress/prune/sparsify, not needed by load)
ONNX_FILE, INT8_FILE = "model.onnx", "model.int8.onnx"
PREPROCESS_FILE = "preprocess.json"  # the input recipe, used again when the result is pruned again
WIDTHS_FILE, REPORT_FILE = "widths.png", "report.md"
_KINDS = ("timm", "torchvision", "transformers", "vitgraph")
SOURCE_VERSION = 1


@dataclass(frozen=True)
class Source:
    """How to rebuild a base architecture with random weights.

    ``kind`` is ``"timm"`` (``name`` for ``timm.create_model``, ``kwargs`` passed on),
    ``"torchvision"`` (``torchvision.models.get_model(name, **kwargs)``), ``"transformers"``
    (``name`` a transformers model class, ``kwargs`` the fields of its config) or ``"vitgraph"`` (an
    earlier result: ``base`` is its source, ``plan`` the JSON text of the plan that slimmed it).
    ``input_size`` is the example input's ``(C, H, W)``.
    """

    kind: str
    name: str = ""
    kwargs: dict[str, Any] = field(default_factory=dict)
    input_size: tuple[int, ...] = (3, 224, 224)
    base: Optional["Source"] = None
    plan: Optional[str] = None

    def build(self) -> nn.Module:
        """The architecture, with random weights, in eval mode."""
        if self.kind == "timm":
            import timm

            try:
                return timm.create_model(self.name, pretrained=False, **self.kwargs).eval()
            except (RuntimeError, TypeError, ValueError, AssertionError, KeyError) as e:
                raise VitgraphError(f"cannot build timm model {self.name!r} with {self.kwargs}: {e}") from e
        if self.kind == "torchvision":
            import torchvision

            try:
                return torchvision.models.get_model(self.name, weights=None, **self.kwargs).eval()
            except (ValueError, TypeError, RuntimeError, AssertionError, KeyError) as e:
                raise VitgraphError(f"cannot build torchvision model {self.name!r}: {e}") from e
        if self.kind == "transformers":
            return build_transformers(self.name, self.kwargs)
        from vitgraph.api import compress
        from vitgraph.planning.plan import Plan

        return compress(self.base.build(), Plan.from_json(self.plan)).eval()

    def to_dict(self) -> dict[str, Any]:
        d = {k: v for k, v in asdict(self).items() if k not in ("base", "plan")}
        d["input_size"] = list(self.input_size)
        if self.kind == "vitgraph":
            d["base"], d["plan"] = self.base.to_dict(), json.loads(self.plan)
        return d

    @classmethod
    def from_dict(cls, d: Any, where: str = SOURCE_FILE) -> "Source":
        if not isinstance(d, dict) or d.get("kind") not in _KINDS:
            kind = d.get("kind") if isinstance(d, dict) else d
            raise VitgraphError(f"{where}: field 'kind' must be one of {list(_KINDS)}, got {kind!r}")
        size = d.get("input_size", [3, 224, 224])
        if not isinstance(size, list) or not size or not all(isinstance(s, int) and s > 0 for s in size):
            raise VitgraphError(f"{where}: field 'input_size' must be a list of positive integers, got {size!r}")
        kwargs = d.get("kwargs", {})
        if not isinstance(kwargs, dict):
            raise VitgraphError(f"{where}: field 'kwargs' must be an object, got {type(kwargs).__name__}")
        if d["kind"] == "vitgraph":
            if "base" not in d or "plan" not in d:
                raise VitgraphError(f"{where}: a 'vitgraph' source needs fields 'base' and 'plan'")
            return cls("vitgraph", input_size=tuple(size), base=cls.from_dict(d["base"], where + " base"),
                       plan=json.dumps(d["plan"]))
        name = d.get("name")
        if not isinstance(name, str) or not name:
            raise VitgraphError(f"{where}: field 'name' must be a model name, got {name!r}")
        return cls(d["kind"], name, kwargs, tuple(size))


def is_artifact(path: Union[str, Path]) -> bool:
    """Whether ``path`` is a directory written by :func:`save`."""
    p = Path(path)
    return p.is_dir() and all((p / f).is_file() for f in (SOURCE_FILE, PLAN_FILE, WEIGHTS_FILE))


def save(out: Union[str, Path], module: nn.Module, plan: Any, source: Source) -> Path:
    """Write ``module`` (the result of ``compress(source.build(), plan)`` with any weights) to ``out``."""
    from safetensors.torch import save_model

    from vitgraph.atomic import atomic_path, write_atomic

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    # each file is renamed into place whole, the weights last: an interrupted save leaves no
    # directory that passes is_artifact with files of two different results
    (out / WEIGHTS_FILE).unlink(missing_ok=True)
    write_atomic(out / SOURCE_FILE, json.dumps({"vitgraph_source": SOURCE_VERSION} | source.to_dict(), indent=1))
    write_atomic(out / PLAN_FILE, plan.to_json())
    _save_classifier(out, module)
    with atomic_path(out / WEIGHTS_FILE) as partial:
        save_model(module, str(partial))
        # safetensors creates its file 0600; the weights get the mode the user's umask gives the others
        os.chmod(partial, (out / PLAN_FILE).stat().st_mode & 0o777)
    return out


def read_source(path: Union[str, Path]) -> Source:
    """The :class:`Source` in an artifact directory."""
    where = Path(path) / SOURCE_FILE
    try:
        d = json.loads(where.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise VitgraphError(f"cannot read {where}: {e}") from e
    version = d.get("vitgraph_source") if isinstance(d, dict) else None
    if not isinstance(version, int) or version > SOURCE_VERSION:
        raise VitgraphError(f"{where}: field 'vitgraph_source' must be a format version up to {SOURCE_VERSION}, "
                            f"got {version!r}")
    return Source.from_dict({k: v for k, v in d.items() if k != "vitgraph_source"}, str(where))


def load(path: Union[str, Path]) -> nn.Module:
    """The compressed model saved at ``path``: rebuilt from source and plan, weights loaded (eval mode)."""
    from safetensors.torch import load_model

    from vitgraph.api import compress
    from vitgraph.planning.plan import Plan

    path = Path(path)
    if not is_artifact(path):
        raise VitgraphError(f"{path} is not a vitgraph result: it needs {SOURCE_FILE}, {PLAN_FILE} and {WEIGHTS_FILE}")
    from safetensors import SafetensorError

    source = read_source(path)
    try:
        plan = Plan.from_json((path / PLAN_FILE).read_text())
    except OSError as e:
        raise VitgraphError(f"cannot read {path / PLAN_FILE}: {e.strerror or e}") from e
    torch.manual_seed(0)
    slim = compress(source.build(), plan)
    _load_classifier(path, slim)
    weights = path / WEIGHTS_FILE
    try:
        load_model(slim, str(weights), strict=True)
    except (SafetensorError, OSError, ValueError) as e:  # truncated, corrupt or unreadable
        raise VitgraphError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {e}") from e
    except RuntimeError as e:
        raise VitgraphError(f"{weights} does not fit the model its source and plan build: {e}") from e
    if (path / SPARSITY_FILE).is_file():
        _restore_24(slim, path / SPARSITY_FILE)
    return slim.eval()


def _save_classifier(out: Path, module: nn.Module) -> None:
    from vitgraph.atomic import write_atomic
    from vitgraph.passes.keep_api import CLASSIFIER_ATTR

    rec = getattr(module, CLASSIFIER_ATTR, None)
    if rec is None:
        (out / CLASSIFIER_FILE).unlink(missing_ok=True)
    else:
        write_atomic(out / CLASSIFIER_FILE, json.dumps(rec))


def _load_classifier(path: Path, slim: nn.Module) -> None:
    """Repeat a ``reset_classifier(n)`` the saved model had (its new layer's weights come next)."""
    where = path / CLASSIFIER_FILE
    if not where.is_file():
        return
    try:
        n = json.loads(where.read_text())["num_classes"]
    except (OSError, json.JSONDecodeError, KeyError, TypeError) as e:
        raise VitgraphError(f"{where}: cannot read the reset classifier: {e}") from e
    if not callable(getattr(slim, "reset_classifier", None)):
        raise VitgraphError(f"{where}: the model its source and plan build has no reset_classifier")
    slim.reset_classifier(n)


def _restore_24(model: nn.Module, where: Path) -> None:
    """The 2:4 mask buffers of a sparsified result (not in the state dict), so fine-tuning keeps the pattern."""
    from vitgraph.passes.sparsity24 import restore_masks

    try:
        names = json.loads(where.read_text())["sparsified"]
        restore_masks(model, names)
    except (OSError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise VitgraphError(f"{where}: cannot restore the 2:4 masks of its layers: {e}") from e


def nested(source: Source, plan: Any) -> Source:
    """The source of ``compress(source.build(), plan)``: what a result pruned again is built from."""
    return Source("vitgraph", input_size=source.input_size, base=source, plan=plan.to_json(indent=None))


def transformers_class(name: str) -> type:
    """The transformers model class ``name`` (``ViTForImageClassification``)."""
    try:
        import transformers
    except ImportError as e:
        raise VitgraphError("HuggingFace models need transformers: pip install -e \".[hf]\"") from e
    cls = getattr(transformers, name, None)
    if not isinstance(cls, type) or not hasattr(cls, "config_class"):
        raise VitgraphError(f"{name!r} is not a transformers model class")
    return cls


def build_transformers(name: str, config: dict[str, Any]) -> nn.Module:
    """A transformers model of class ``name`` with random weights, from its config's fields
    (the defaults where ``config`` does not say)."""
    cls = transformers_class(name)
    try:
        return cls(cls.config_class(**config)).eval()
    except (TypeError, ValueError) as e:
        raise VitgraphError(f"cannot build transformers model {name} with config {config}: {e}") from e
