"""Capture front ends: decorated forwards, control flow on static sizes, outputs kept as returned."""
from __future__ import annotations

import dataclasses
import functools

import torch
from torch import nn
from torch.utils import _pytree as pytree

import vitgraph
from vitgraph.capture.trace import FRONT_ENDS

from helpers import rel_err


class Block(nn.Module):
    def __init__(self, c: int = 16) -> None:
        super().__init__()
        self.fc1, self.fc2, self.head = nn.Linear(c, 4 * c), nn.Linear(4 * c, c), nn.Linear(c, 3)
        self.c = c

    def body(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x + self.fc2(torch.relu(self.fc1(x))))


class ChecksChannels(Block):
    """Python control flow on a static size, as transformers' embeddings do."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.c:
            raise ValueError("wrong width")
        if x.dtype != torch.float32:
            x = x.float()
        return self.body(x)


def returns_dict_flag(fn):
    """A decorator like transformers' ``can_return_tuple``: reads and pops its own keyword."""

    @functools.wraps(fn)
    def wrapper(self, *args, **kwargs):
        as_tuple = kwargs.pop("as_tuple", False)
        out = fn(self, *args, **kwargs)
        return (out,) if as_tuple else out

    return wrapper


class Decorated(Block):
    @returns_dict_flag
    def forward(self, x: torch.Tensor, scale: float = 1.0, **kwargs) -> torch.Tensor:
        return self.body(x) * scale


@dataclasses.dataclass
class Out:
    logits: torch.Tensor
    hidden: torch.Tensor


pytree.register_pytree_node(Out, lambda o: ([o.logits, o.hidden], None), lambda xs, _: Out(*xs))


class ReturnsContainer(Block):
    def forward(self, x: torch.Tensor) -> Out:
        h = x + self.fc2(torch.relu(self.fc1(x)))
        return Out(self.head(h), h)


def _exact(model: nn.Module, x: torch.Tensor) -> vitgraph.Analysis:
    an = vitgraph.analyze(model, x)
    assert [g.kind for g in an.groups if g.kind == "ffn"] == ["ffn"]
    plan = vitgraph.Plan.random(an, 0.5, kinds=("ffn",))
    slim, masked = vitgraph.compress(model, plan, an), vitgraph.mask(model, plan, an)
    with torch.no_grad():
        a, b = slim(x), masked(x)
    a, b = (a.logits, b.logits) if isinstance(a, Out) else (a, b)
    assert rel_err(a, b) <= 1e-5
    return an


def test_control_flow_on_static_sizes_is_followed_by_meta_value_proxies():
    model, x = ChecksChannels().eval(), torch.randn(2, 5, 16)
    an = _exact(model, x)
    assert an.front_end == FRONT_ENDS[2] and "captured by meta-value proxies" in an.summary()
    slim = vitgraph.compress(model, vitgraph.Plan.keep_all(an), an)
    with torch.no_grad():  # the batch stays dynamic: a size that follows it is not a constant
        assert torch.equal(slim(torch.ones(3, 5, 16)), model(torch.ones(3, 5, 16)))


def test_plain_models_keep_the_symbolic_front_end():
    an = vitgraph.analyze(Decorated().eval(), torch.randn(2, 5, 16))
    assert an.front_end == FRONT_ENDS[0]


def test_decorated_forward_runs_its_decorator():
    model, x = Decorated().eval(), torch.randn(2, 5, 16)
    _exact(model, x)
    an = vitgraph.analyze(model, x)
    with torch.no_grad():
        assert torch.equal(an.graph_module(x), model(x))


def test_output_container_is_kept_and_every_leaf_protected():
    model, x = ReturnsContainer().eval(), torch.randn(2, 5, 16)
    an = _exact(model, x)
    assert not [g for g in an.groups if g.kind == "residual"]  # the residual stream is an output
    slim = vitgraph.compress(model, vitgraph.Plan.from_scores(an, ratio=0.5), an)
    with torch.no_grad():
        out, ref = slim(x), model(x)
    assert isinstance(out, Out)
    assert out.logits.shape == ref.logits.shape and out.hidden.shape == ref.hidden.shape
    again = vitgraph.analyze(slim, x)  # a compressed model captures again, container and all
    assert isinstance(again.graph_module(x), Out)


class ReturnsFeatureMaps(Block):
    """A backbone's output: a dict whose first value is a tuple of feature maps."""

    def forward(self, x: torch.Tensor) -> dict:
        h = x + self.fc2(torch.relu(self.fc1(x)))
        return {"feature_maps": (self.head(h), h)}


def test_check_model_compares_nested_outputs_leaf_by_leaf():
    from vitgraph.check import _first, _same_shapes, check_model

    model, x = ReturnsFeatureMaps().eval(), torch.randn(2, 5, 16)
    rep = check_model(model, x, onnx=False)
    assert rep.error is None and rep.shape_ok and rep.ok, rep.failures()
    out = model(x)
    assert _first(out) is out["feature_maps"][0]
    assert not _same_shapes(out, {"feature_maps": (out["feature_maps"][0], out["feature_maps"][1][:, :1])})


class MovesToDevice(Block):
    """Moves a parameter to an activation's device, then branches on a static size (as
    transformers' YOLOS adds its mid position embeddings with ``.to(hidden_states.device)``)."""

    def __init__(self) -> None:
        super().__init__()
        self.pos = nn.Parameter(torch.randn(5, 16))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.c:
            raise ValueError("wrong width")
        h = x + self.pos.to(x.device)
        if h.shape[1] > 1:  # known only if the meta values survived the moves
            h = h * 2
        return self.body(h)


def test_moves_to_the_model_device_keep_their_meta_values():
    model, x = MovesToDevice().eval(), torch.randn(2, 5, 16)
    an = _exact(model, x)
    assert an.front_end == FRONT_ENDS[2]
    slim = vitgraph.compress(model, vitgraph.Plan.keep_all(an), an)
    with torch.no_grad():
        assert torch.equal(slim(torch.ones(3, 5, 16)), model(torch.ones(3, 5, 16)))


def test_timm_features_only_keeps_every_output():
    import timm

    model = timm.create_model("vit_tiny_patch16_224", features_only=True, out_indices=(1, 3), img_size=32,
                              patch_size=8, depth=4).eval()
    x = torch.randn(2, 3, 32, 32)
    an = vitgraph.analyze(model, x)
    assert {g.kind for g in an.groups} >= {"head", "qk", "v", "ffn"}
    slim = vitgraph.compress(model, vitgraph.Plan.from_scores(an, ratio=0.5), an)
    with torch.no_grad():
        ref, out = model(x), slim(x)
    assert isinstance(out, list) and [t.shape for t in out] == [t.shape for t in ref]


class BuildsBatchSizedTensors(Block):
    """Tensors built with a size that follows the batch (``torch.ones(batch, n)``, as transformers'
    ViTMAE builds its token mask), next to control flow on a static size."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.shape[-1] != self.c:
            raise ValueError("wrong width")
        b, n, _ = x.shape
        keep = torch.ones(b, n, 1, device=x.device) - torch.zeros([b, n, 1], device=x.device)
        steps = torch.arange(n, device=x.device).reshape(1, n, 1).float()
        return self.body(x * keep + steps)


def test_constructors_take_sizes_that_follow_the_batch():
    model, x, ones = BuildsBatchSizedTensors().eval(), torch.randn(2, 5, 16), torch.ones
    an = _exact(model, x)
    assert an.front_end == FRONT_ENDS[2]
    assert torch.ones is ones  # torch's constructors are put back after tracing
    slim = vitgraph.compress(model, vitgraph.Plan.keep_all(an), an)
    with torch.no_grad():  # the batch stays dynamic
        assert torch.equal(slim(torch.ones(3, 5, 16)), model(torch.ones(3, 5, 16)))
