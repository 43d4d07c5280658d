"""What an op rule sees: the dims of its inputs, the axis store, and helpers to record facts."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional, Sequence

import torch
import torch.fx as fx

from vitgraph.analysis.axes import AxisStore, Layout, Why, single

META_KEY = "vitgraph.dims"


@dataclass(frozen=True)
class TensorDims:
    """Channel layout of every dimension of one tensor value (``None``: no channels)."""

    shape: tuple[int, ...]
    dims: tuple[Optional[Layout], ...]
    live: bool = True  # depends on a model input (an activation, not a parameter)

    def with_dims(self, dims: Sequence[Optional[Layout]], shape: Optional[Sequence[int]] = None) -> "TensorDims":
        """Same liveness, new dims (and shape)."""
        return TensorDims(tuple(shape if shape is not None else self.shape), tuple(dims), self.live)


def node_shapes(node: fx.Node) -> Any:
    """Shape (tuple) of a node's tensor output, or a tuple of shapes for tuple outputs."""
    tm = node.meta.get("tensor_meta")
    if tm is None:
        return None
    if hasattr(tm, "shape"):
        return tuple(int(s) for s in tm.shape)
    if isinstance(tm, (list, tuple)):
        return tuple(tuple(int(s) for s in t.shape) if hasattr(t, "shape") else None for t in tm)
    return None


class RuleContext:
    """State shared by the rules while one graph is analysed."""

    def __init__(self, gm: fx.GraphModule, store: AxisStore) -> None:
        self.gm = gm
        self.store = store
        self.params: dict[str, TensorDims] = {}
        self.section_cache: dict[tuple[int, int], list[dict[int, int]]] = {}
        self.node: Optional[fx.Node] = None
        self.unruled: list[tuple[str, str]] = []
        self.protect_outputs = True  # model outputs keep their widths
        self.channel_inputs = False  # model inputs carry no channels

    # -- reading ----------------------------------------------------------------------------
    def dims(self, arg: Any) -> Any:
        """The recorded dims of an argument (``None`` for non-tensor arguments)."""
        if isinstance(arg, fx.Node):
            return arg.meta.get(META_KEY)
        return None

    def out_shape(self) -> Any:
        """Shape of the current node's output from shape propagation."""
        return node_shapes(self.node)

    def why(self, rule: str, detail: str = "") -> Why:
        """Provenance record for a fact decided at the current node."""
        return Why(self.node.format_node() if self.node is not None else "<graph>", rule, detail)

    # -- writing ----------------------------------------------------------------------------
    def fresh(self, size: int, origin: str) -> Optional[Layout]:
        """A new single-axis layout (``None`` for size-1 dims, which carry no channels)."""
        return None if size == 1 else single(self.store.new(size, origin))

    def tie(self, a: Optional[Layout], b: Optional[Layout], rule: str) -> None:
        """Tie two dimension layouts at the current node."""
        self.store.tie(a, b, self.why(rule))

    def freeze(self, layout: Optional[Layout], rule: str, detail: str) -> None:
        """Freeze the channels of a layout, saying why."""
        self.store.freeze(layout, self.why(rule, detail))

    def role(self, layout: Optional[Layout], role: str) -> None:
        """Record the role an axis plays (qk, v, head, norm, add, linear_in, linear_out)."""
        self.store.add_role(layout, role)

    def new_axis(self, size: int, origin: str) -> int:
        """A new axis (its id), for rules that build products or refinements themselves."""
        return self.store.new(size, origin)

    def define(self, axis: int, layout: Layout, rule: str, detail: str = "") -> None:
        """Say that ``axis`` is the concatenation/product ``layout`` of other axes."""
        self.store.define(axis, layout, self.why(rule, detail))

    def union(self, a: int, b: int, rule: str) -> None:
        """Tie two single axes."""
        self.store.union(a, b, self.why(rule))

    def split_off(self, axis: int, first: int, rule: str) -> tuple[int, int]:
        """Refine ``axis`` into ``(first, rest)`` (see :meth:`AxisStore.split_off`)."""
        return self.store.split_off(axis, first, f"factor of axis {axis}", self.why(rule, "split"))

    def part_index(self, axis: int, parts: tuple[int, ...]) -> tuple[int, int]:
        """Index and inner axes of a concatenation of equal parts (see :meth:`AxisStore.part_index`)."""
        return self.store.part_index(axis, parts, f"axis {axis}")

    def mark_stale(self, outer: int, inner: list[int], maps: list[dict[int, int]]) -> None:
        """Record that the inner axes of ``outer`` were replaced by per-section copies."""
        self.store.mark_stale(outer, inner, maps)

    def into_sections(self, parent: int, outer: int, inner: list[int], maps: list[dict[int, int]]) -> None:
        """Record per-section copies of a refined axis (see :meth:`AxisStore.into_sections`)."""
        self.store.into_sections(parent, outer, inner, maps, self.why("section"))

    def param(self, qualname: str) -> TensorDims:
        """Dims of a parameter or buffer: one fresh axis per dimension, created once."""
        td = self.params.get(qualname)
        if td is None:
            t = _get_tensor(self.gm, qualname)
            if t.is_floating_point() or t.is_complex():
                dims = tuple(self.fresh(s, f"{qualname}[{i}]") for i, s in enumerate(t.shape))
            else:
                dims = (None,) * t.dim()  # integer buffers are indices, not channels
            td = TensorDims(tuple(t.shape), dims, live=False)
            self.params[qualname] = td
        return td


def _get_tensor(gm: fx.GraphModule, qualname: str) -> torch.Tensor:
    mod_path, _, name = qualname.rpartition(".")
    mod = gm.get_submodule(mod_path) if mod_path else gm
    t = getattr(mod, name)
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{qualname} is not a tensor")
    return t
