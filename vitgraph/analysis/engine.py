"""``analyze``: trace a model and find its coupled channel groups."""
from __future__ import annotations

import hashlib
import itertools
import weakref
from dataclasses import dataclass
from typing import Any, Iterable, Mapping, Optional, Sequence, Union

import networkx as nx
import torch
import torch.fx as fx
from torch import nn

import vitgraph.analysis.ops  # noqa: F401  (declares every op)
from vitgraph.analysis.kinds import ALL_KINDS, PER_HEAD_KINDS
from vitgraph.analysis.axes import AxisStore, Layout
from vitgraph.analysis.context import META_KEY, RuleContext, TensorDims
from vitgraph.errors import AnalysisError, TraceError, UnknownGroupError
from vitgraph.gc_hold import holds_existing_objects
from vitgraph.analysis.ops.common import get_attr_dims, no_rule, output_dims, placeholder_dims
from vitgraph.analysis.ops.registry import lookup_rule
from vitgraph.capture.trace import FRONT_END_KEY, FRONT_ENDS, trace



@dataclass(frozen=True)
class ChannelGroup:
    """Channels (or heads) that must be removed together.

    ``size`` counts units: heads for ``head`` groups, per-head dims for ``qk`` and ``v`` groups,
    channels otherwise.  ``per_head`` says whether each head may keep different dims.
    ``normalized`` says a normalisation runs over these channels (LayerNorm, q/k norm), so zeroing
    them is not the same as removing them.
    """

    id: str
    kind: str  # a GroupKind value (vitgraph.analysis.kinds)
    size: int
    params: tuple[tuple[str, int], ...]
    nodes: tuple[str, ...]
    head_group: Optional[str] = None
    per_head: bool = False
    axis: int = -1
    normalized: bool = False

    def __str__(self) -> str:
        extra = f", heads={self.head_group}" if self.head_group else ""
        return f"{self.id:<32} {self.kind:<8} size={self.size}{extra}"


@dataclass(frozen=True)
class FrozenChannels:
    """Channels that cannot be pruned, where they live and why."""

    axis: int
    size: int
    where: tuple[str, ...]
    reason: str

    def __str__(self) -> str:
        places = ", ".join(self.where[:3]) + (" ..." if len(self.where) > 3 else "")
        return f"{self.size} channels in {places or '<activations>'}: {self.reason}"


class Analysis:
    """Result of :func:`analyze`: the traced graph, channel groups and frozen channels."""

    def __init__(self, gm: fx.GraphModule, ctx: RuleContext, model: nn.Module, inputs: Sequence[torch.Tensor]) -> None:
        self.graph_module = gm
        self.store = ctx.store
        self.params: dict[str, TensorDims] = ctx.params
        self.unruled = list(ctx.unruled)
        self.input_shapes = [list(t.shape) for t in inputs]
        self.input_dtypes = [str(t.dtype).replace("torch.", "") for t in inputs]
        self.fingerprint = fingerprint(gm)
        self.prune_outputs = not ctx.protect_outputs
        self._model = weakref.ref(model)
        self.groups: list[ChannelGroup] = []
        self.frozen: list[FrozenChannels] = []
        self.sections: dict[int, list[int]] = {}
        _build_groups(self)
        self._by_id = {g.id: g for g in self.groups}
        self._by_axis = {g.axis: g for g in self.groups}

    @property
    def graph(self) -> nx.Graph:
        """The networkx graph of axes (nodes) and the ties between them (edges, with reasons)."""
        return self.store.graph

    @property
    def model(self) -> Optional[nn.Module]:
        """The analysed model, while it is alive."""
        return self._model()

    @property
    def front_end(self) -> str:
        """How the model was captured (one of ``vitgraph.capture.trace.FRONT_ENDS``)."""
        return self.graph_module.meta.get(FRONT_END_KEY, FRONT_ENDS[0])

    def group(self, group_id: str) -> ChannelGroup:
        """The group with this id (``KeyError`` listing close ids if unknown)."""
        try:
            return self._by_id[group_id]
        except KeyError:
            near = [g for g in self._by_id if group_id.split(":")[0] in g][:5]
            raise UnknownGroupError(f"no group {group_id!r}; similar: {near or list(self._by_id)[:5]}") from None

    def group_of_axis(self, axis: int) -> Optional[ChannelGroup]:
        """The group whose leaf axis is ``axis`` (a root), if any."""
        return self._by_axis.get(self.store.find(axis))

    def explain(self, group_id: str) -> str:
        """Why channels are coupled or frozen, traced back to the ops that decided it.

        ``group_id`` is a group id (the ties that join its channels, each with its op) or a
        parameter name (for each of its dims: the groups it belongs to and the frozen channels,
        with the op that froze them).
        """
        if group_id not in self._by_id and group_id in self.params:
            return self._explain_param(group_id)
        g = self.group(group_id)
        comp = _component(self.store, g.axis)
        lines = [f"{g.id}: {g.kind} group of {g.size} units; roles {sorted(self.store.roles.get(g.axis, ()))}"]
        lines.append(f"  parameters: {', '.join(f'{p}[dim {d}]' for p, d in g.params) or '-'}")
        seen = set()
        for _a, _b, data in self.graph.edges(comp, data=True):
            why = data.get("why")
            if why is None or str(why) in seen:
                continue
            seen.add(str(why))
            lines.append(f"  tied by {why}")
        return "\n".join(lines)

    def _explain_param(self, name: str) -> str:
        td = self.params[name]
        lines = [f"{name}: shape {list(td.shape)}"]
        frozen = {f.axis: f for f in self.frozen}
        for d, lay in enumerate(td.dims):
            if lay is None:
                lines.append(f"  dim {d}: no channels")
                continue
            for blk in self.store.expand(lay):
                for a in blk:
                    for leaf in self.store.axes_of(((a,),), leaves=True):
                        if leaf in self.store.defs:
                            continue
                        g = self._by_axis.get(leaf)
                        if g is not None:
                            lines.append(f"  dim {d}: group {g.id} ({g.kind}, {g.size} units)")
                        elif leaf in frozen:
                            lines.append(f"  dim {d}: {self.store.size[leaf]} channels frozen by {frozen[leaf].reason}")
        return "\n".join(dict.fromkeys(lines))

    def explain_frozen(self) -> str:
        """Every frozen channel set with the op that froze it."""
        return "\n".join(str(f) for f in self.frozen) or "no frozen channels"

    def summary(self) -> str:
        """Readable summary: groups by kind and frozen channels."""
        by_kind = {k: [g for g in self.groups if g.kind == k] for k in ALL_KINDS}
        head = ", ".join(f"{len(v)} {k}" for k, v in by_kind.items() if v)
        lines = [f"Analysis of {self.graph_module.__class__.__name__} (captured by {self.front_end}): "
                 f"{len(self.groups)} groups ({head}); {len(self.frozen)} frozen channel sets"]
        lines += [f"  {g}" for g in self.groups]
        if self.frozen:
            lines.append("frozen:")
            lines += [f"  {f}" for f in self.frozen]
        if self.unruled:
            ops = sorted({w for _, w in self.unruled})
            lines.append(f"ops without a rule (their channels are frozen): {', '.join(ops)}")
        return "\n".join(lines)

    def __str__(self) -> str:
        return self.summary()

    def __repr__(self) -> str:
        return f"<Analysis {len(self.groups)} groups, {len(self.frozen)} frozen>"


def _component(store: AxisStore, axis: int) -> set:
    r = store.find(axis)
    return {n for n in store.graph.nodes if isinstance(n, int) and store.find(n) == r}


def fingerprint(gm: fx.GraphModule) -> str:
    """Architecture fingerprint: the generated code plus parameter and buffer shapes."""
    h = hashlib.sha256(gm.code.encode())
    for name, t in list(gm.named_parameters()) + list(gm.named_buffers()):
        h.update(f"{name}:{tuple(t.shape)};".encode())
    return h.hexdigest()[:16]


def as_inputs(example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]]) -> tuple[torch.Tensor, ...]:
    """Normalise example inputs to a tuple of tensors (:class:`TraceError` naming the bad one)."""
    if isinstance(example_inputs, torch.Tensor):
        return (example_inputs,)
    if not isinstance(example_inputs, (list, tuple)):
        raise TraceError(f"example_inputs must be a tensor or a list/tuple of tensors, got {type(example_inputs).__name__}")
    if not example_inputs:
        raise TraceError("example_inputs is empty: give the model's input tensors")
    for i, t in enumerate(example_inputs):
        if not isinstance(t, torch.Tensor):
            raise TraceError(f"example_inputs[{i}] must be a tensor, got {type(t).__name__}")
    return tuple(example_inputs)


def require_module(model: Any) -> None:
    """:class:`TraceError` unless ``model`` is an ``nn.Module`` (vitgraph traces modules)."""
    if not isinstance(model, nn.Module):
        what = f" {model.__qualname__!r}" if callable(model) and hasattr(model, "__qualname__") else ""
        raise TraceError(f"model must be a torch.nn.Module, got {type(model).__name__}{what} "
                         "(wrap a function in an nn.Module whose forward calls it)")


@holds_existing_objects
def analyze(model: nn.Module, example_inputs: Union[torch.Tensor, Sequence[torch.Tensor]], *,
            prune_outputs: bool = False, channel_inputs: bool = False) -> Analysis:
    """Trace ``model`` on ``example_inputs`` and find its coupled channel groups.

    Model outputs keep their widths unless ``prune_outputs`` is true: then channels that reach an
    output are prunable too, and the compressed model's outputs are narrower (a feature
    extractor whose embedding width a new head will be trained on).  ``channel_inputs`` gives
    the inputs channels too, for a graph that reads another's activations (a ``forward_head``).
    """
    require_module(model)
    if not isinstance(prune_outputs, bool):
        raise TraceError(f"prune_outputs must be True or False, got {prune_outputs!r}")
    inputs = as_inputs(example_inputs)
    gm = trace(model, inputs, known=lambda g, n: lookup_rule(g, n) is not None)
    store = AxisStore()
    ctx = RuleContext(gm, store)
    ctx.protect_outputs = not prune_outputs
    ctx.channel_inputs = bool(channel_inputs)
    for node in gm.graph.nodes:
        ctx.node = node
        try:
            node.meta[META_KEY] = _run_rule(ctx, gm, node)
        except Exception as e:  # noqa: BLE001 - a failing rule freezes, never guesses
            node.meta[META_KEY] = _fail_rule(ctx, node, e)
    ctx.node = None
    return Analysis(gm, ctx, model, inputs)


def _run_rule(ctx: RuleContext, gm: fx.GraphModule, node: fx.Node) -> Any:
    if node.op == "placeholder":
        return placeholder_dims(ctx, node)
    if node.op == "get_attr":
        return get_attr_dims(ctx, node)
    if node.op == "output":
        return output_dims(ctx, node)
    rule = lookup_rule(gm, node)
    return (rule or no_rule)(ctx, node)


def _fail_rule(ctx: RuleContext, node: fx.Node, e: Exception) -> Any:
    """A rule that raised: freeze what the node touches and record why."""
    ctx.unruled.append((node.name, f"rule failed ({type(e).__name__}: {e})"))
    try:
        return no_rule(ctx, node)
    except Exception as e2:  # noqa: BLE001
        raise AnalysisError(f"cannot analyse {node.format_node()}: {e}") from e2


# ---------------------------------------------------------------------------------------------
# group building


def _propagate(store: AxisStore) -> None:
    """Push freeze reasons and roles from refined axes down to their leaf axes."""
    changed = True
    while changed:
        changed = False
        for r, d in list(store.defs.items()):
            if store.find(r) != r:
                continue
            why = store.frozen.get(r)
            roles = store.roles.get(r, set())
            for leaf in store.axes_of(d, leaves=True):
                if why is not None and leaf not in store.frozen:
                    store.frozen[leaf] = why
                    changed = True
                have = store.roles.setdefault(leaf, set())
                if not roles <= have:
                    have |= roles
                    changed = True


def _kind(roles: set[str]) -> str:
    for kind, role in (("head", "head"), ("qk", "qk"), ("v", "v"), ("residual", "add")):
        if role in roles:
            return kind
    if {"linear_in", "linear_out"} <= roles:  # a sub-LN or GRN FFN too (then marked normalised)
        return "ffn"
    return "other"


def _bridges_residual(store: AxisStore, params: Sequence[tuple[str, int]], shapes: Mapping[str, TensorDims]) -> bool:
    """Whether the layers around a width read from and write back to one residual stream: some
    weight producing it (dim 0) takes its input (dim 1) from the axes some weight consuming it
    (dim 1) writes to (dim 0), and those carry a residual add -- an MLP's hidden width, even with
    a norm inside (sub-LN, GRN)."""
    def roots(name: str, d: int) -> set[int]:
        lay = shapes[name].dims[d] if d < len(shapes[name].dims) else None
        return {store.find(x) for x in store.axes_of(lay, leaves=True)} if lay is not None else set()

    read, written = set(), set()
    for name, d in params:
        if len(shapes[name].dims) < 2 or d > 1:
            continue
        (read if d == 0 else written).update(roots(name, 1 - d))
    return any("add" in store.roles.get(r, set()) for r in read & written)


def _owner(param: str) -> str:
    return param.rpartition(".")[0]


def _common_prefix(paths: Iterable[str]) -> str:
    parts = [p.split(".") for p in paths if p]
    if not parts:
        return ""
    out = []
    for seg in zip(*parts):
        if all(s == seg[0] for s in seg):
            out.append(seg[0])
        else:
            break
    return ".".join(out)


def _trim(owners: list[str]) -> str:
    """The module a set of parameter owners lives in: their common prefix, or the parent of a
    single owner (``blocks.0.attn.qkv`` -> ``blocks.0.attn``) unless that owner is a numbered one."""
    prefix = _common_prefix(owners)
    if all(o == prefix for o in owners) and "." in prefix and not prefix.rpartition(".")[2].isdigit():
        prefix = prefix.rpartition(".")[0]
    return prefix


def _location(params: Sequence[tuple[str, int]], shapes: Mapping[str, TensorDims], state: set[str]) -> str:
    """Where a group lives: the module its parameters share, else the modules that produce it.

    A group with root parameters (class token, position embedding) is the model's own stream and
    gets no location; constants that tracing made (a rotary table) place nothing. When the
    parameters share no module, or only a container of numbered blocks (a stage's stream feeding
    the next stage, attention shared across blocks), the producers place it: dim 0 of a matrix or
    conv weight (an input dim only consumes the group). If they too share no module, every branch
    is named: ``crpe1.conv_list+serial_blocks1``.
    """
    params = [(p, d) for p, d in params if p in state] or list(params)
    owners = list(dict.fromkeys(_owner(p) for p, _ in params))
    if not owners or "" in owners:
        return ""
    where = _shared_module(owners)
    if where:
        return where
    producers = list(dict.fromkeys(_owner(p) for p, d in params if d == 0 and len(shapes[p].shape) >= 2))
    where = _shared_module(producers) if producers else None
    if where:
        return where
    members = producers or owners
    depth = len(_common_prefix(members).split(".")) + 1 if _common_prefix(members) else 1
    branches: dict[str, list[str]] = {}
    for o in members:
        branches.setdefault(".".join(o.split(".")[:depth]), []).append(o)
    return "+".join(_trim(b) for b in branches.values())


def _shared_module(owners: list[str]) -> Optional[str]:
    """The owners' common module, or None when that names no place: the root, or a container
    (no numbered segment) whose members here are numbered blocks."""
    prefix = _trim(owners)
    if not prefix:
        return None
    segs = prefix.split(".")
    below = {o.split(".")[len(segs)] for o in owners if o.count(".") >= len(segs)}
    if any(s.isdigit() for s in segs) or not below or not all(n.isdigit() for n in below):
        return prefix
    return None


def _build_groups(an: Analysis) -> None:
    store = an.store
    _propagate(store)
    leaf_nodes: dict[int, list[str]] = {}
    blocks_with: dict[int, list[tuple[int, ...]]] = {}
    gm = an.graph_module

    def visit_layout(lay: Optional[Layout], where: str, sink: dict[int, list[str]], is_param: bool) -> None:
        if lay is None:
            return
        for blk in store.expand(lay):
            leaves = tuple(store.find(a) for a in blk)
            for a in leaves:
                sink.setdefault(a, []).append(where)
                if is_param:  # only parameters are sliced, so only they constrain per-head sets
                    blocks_with.setdefault(a, []).append(leaves)
            for a in leaves:
                d = store.defs.get(a)
                if d is not None:
                    visit_layout(d, where, sink, is_param)

    for node in gm.graph.nodes:
        val = node.meta.get(META_KEY)
        for td in (val if isinstance(val, tuple) else (val,)):
            if isinstance(td, TensorDims) and td.live:
                for lay in td.dims:
                    visit_layout(lay, node.name, leaf_nodes, False)
    leaf_params: dict[int, list[tuple[str, int]]] = {}
    for name, td in an.params.items():
        for d, lay in enumerate(td.dims):
            sink: dict[int, list[str]] = {}
            visit_layout(lay, name, sink, True)
            for a in sink:
                leaf_params.setdefault(a, []).append((name, d))
    raw = []
    for a in sorted(leaf_nodes):
        if store.size[a] <= 1 or a in store.defs or a in store.stale:
            continue
        params = tuple(dict.fromkeys(leaf_params.get(a, [])))
        nodes = tuple(dict.fromkeys(leaf_nodes[a]))
        if a in store.frozen:
            an.frozen.append(FrozenChannels(a, store.size[a], tuple(p for p, _ in params) or nodes[:3], str(store.frozen[a])))
            continue
        kind = _kind(store.roles.get(a, set()))
        if kind == "ffn" and "norm" in store.roles.get(a, set()) and not _bridges_residual(store, params, an.params):
            kind = "other"  # normalised between two layers that are not a block's MLP (a spatial reduction, a head)
        raw.append((a, kind, params, nodes))
    heads = {a for a, k, _, _ in raw if k == "head"}
    # the user's own parameters and buffers (the graph module also holds constants tracing made)
    model = an.model if an.model is not None else gm
    state = {n for n, _ in itertools.chain(model.named_parameters(), model.named_buffers())}
    ids: dict[str, int] = {}
    named: dict[int, str] = {}
    for a, kind, params, _nodes in raw:
        where = _location(params, an.params, state)
        base = f"{where}:{kind}" if where else kind
        n = ids.get(base, 0)
        ids[base] = n + 1
        named[a] = base if n == 0 else f"{base}.{n}"
    for a, kind, params, nodes in raw:
        head, per_head = None, False
        if kind in PER_HEAD_KINDS:
            # per-head sets need the head axis outside the dim in every sliced parameter: a
            # dim-major product (D, H) cannot hold different dims per head
            partners = [{h for h in b[:b.index(a)] if h in heads} for b in blocks_with.get(a, [])]
            common = set.intersection(*partners) if partners else set()
            if len(common) == 1:
                h = common.pop()
                head = named[h]
                per_head = True
        normed = "norm" in store.roles.get(a, set())
        an.groups.append(ChannelGroup(named[a], kind, store.size[a], params, nodes, head, per_head, a, normed))
