"""Depth pruning (WDPruning): residual blocks, early exits, truncation and block removal.

A *residual add* is an ``add`` of two same-shaped tensors where one operand (the skip) is an
ancestor of the other (the branch); a *block* is the innermost module that performs residual adds
(``blocks.3``), found from ``node.meta["nn_module_stack"]``.  Its output is the residual stream
after it.  Nothing here knows model names, module classes or attribute names.

- :func:`residual_blocks` lists the blocks of an analysed model in graph order.
- :func:`add_exits` attaches shallow classifiers (pool, LayerNorm, Linear) after chosen blocks;
  :func:`train_exits` trains them with the sum of their cross-entropies; :func:`truncate` keeps
  the model up to one exit and drops every later block.
- :func:`drop_blocks` removes blocks whose residual lets them go: their adds become the skip.
Every pass copies the GraphModule and returns a new one; the input is not mutated.
"""
from __future__ import annotations

import copy
import logging
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Iterable, Optional, Sequence, Union

import torch
import torch.fx as fx
import torch.nn.functional as F
from torch import nn

from vitgraph.analysis.context import META_KEY, TensorDims, node_shapes
from vitgraph.analysis.ops import OPS
from vitgraph.errors import ArgumentError, ArgumentTypeError, PlanError
from vitgraph.passes.training import fit, rank_loader

if TYPE_CHECKING:
    from vitgraph.analysis.engine import Analysis

log = logging.getLogger(__name__)

EXIT_PREFIX = "vitgraph_exits"
BlockRef = Union[str, int]


@dataclass(frozen=True)
class ResidualBlock:
    """A module that adds branches to the residual stream.

    ``adds``: its residual add nodes in graph order; ``skips``: for each add, the index (0/1) of
    the operand that is the skip; ``output``: the node holding the residual stream after it.
    """

    name: str
    adds: tuple[str, ...]
    skips: tuple[int, ...]
    output: str

    @property
    def removable(self) -> bool:
        """Whether the block's output is its last residual add (so dropping it leaves the skip)."""
        return self.output == self.adds[-1]


# ---------------------------------------------------------------------------------------------
# finding blocks


def _module_path(node: fx.Node) -> Optional[str]:
    stack = node.meta.get("nn_module_stack")
    if not stack:
        return None
    path = list(stack.values())[-1]
    path = path[0] if isinstance(path, tuple) else path
    return path or None


def _is_add(node: fx.Node) -> bool:
    """An op the registry declares a residual add (``x + f(x)`` in any of its spellings)."""
    spec = OPS.get(node.target) if node.op in ("call_function", "call_method") else None
    return spec is not None and spec.residual_add


def _is_ancestor(a: fx.Node, b: fx.Node, order: dict[fx.Node, int]) -> bool:
    """Whether ``a`` is an ancestor of ``b`` (search stops at nodes earlier than ``a``)."""
    if order[a] >= order[b]:
        return False
    seen, todo = set(), [b]
    while todo:
        n = todo.pop()
        for p in n.all_input_nodes:
            if p is a:
                return True
            if p not in seen and order[p] > order[a]:
                seen.add(p)
                todo.append(p)
    return False


def _residual_skip(node: fx.Node, order: dict[fx.Node, int]) -> Optional[int]:
    """Index of the skip operand if ``node`` is a residual add, else ``None``."""
    if not _is_add(node) or len(node.args) < 2 or node.kwargs.get("alpha") not in (None, 1):
        return None
    a, b = node.args[0], node.args[1]
    if not (isinstance(a, fx.Node) and isinstance(b, fx.Node)):
        return None
    shape = node_shapes(node)
    if shape is None or node_shapes(a) != shape or node_shapes(b) != shape:
        return None
    if _is_ancestor(a, b, order):
        return 0
    if _is_ancestor(b, a, order):
        return 1
    return None


def _inside(path: Optional[str], block: str) -> bool:
    return path is not None and (path == block or path.startswith(block + "."))


def _find_blocks(gm: fx.GraphModule) -> list[ResidualBlock]:
    nodes = list(gm.graph.nodes)
    order = {n: i for i, n in enumerate(nodes)}
    found: dict[str, list[tuple[fx.Node, int]]] = {}
    for n in nodes:
        path = _module_path(n)
        if path is None:
            continue
        skip = _residual_skip(n, order)
        if skip is not None:
            found.setdefault(path, []).append((n, skip))
    # a path inside another block's path belongs to that block (its adds are the block's adds)
    names = sorted(found, key=lambda p: order[found[p][0][0]])
    outer = [p for p in names if not any(q != p and _inside(p, q) for q in names)]
    blocks = []
    for name in outer:
        adds = sorted((a for p in names if _inside(p, name) for a in found[p]), key=lambda t: order[t[0]])
        blocks.append(ResidualBlock(name, tuple(a.name for a, _ in adds), tuple(s for _, s in adds),
                                    _block_output(nodes, name, adds[-1][0]).name))
    return blocks


def _block_output(nodes: list[fx.Node], name: str, last_add: fx.Node) -> fx.Node:
    """The block's node whose value leaves the block (the last residual add unless post-norm)."""
    leaving = [n for n in nodes if _inside(_module_path(n), name) and n.op != "get_attr"
               and node_shapes(n) == node_shapes(last_add)
               and any(not _inside(_module_path(u), name) for u in n.users)]
    return leaving[-1] if leaving else last_add


def residual_blocks(analysis: "Analysis") -> list[ResidualBlock]:
    """The residual blocks of an analysed model, in graph order."""
    return _find_blocks(analysis.graph_module)


def _resolve(blocks: list[ResidualBlock], refs: Union[BlockRef, Sequence[BlockRef]]) -> list[ResidualBlock]:
    if isinstance(refs, (str, int)):
        refs = [refs]
    by_name = {b.name: b for b in blocks}
    out = []
    for r in refs:
        if isinstance(r, bool) or not isinstance(r, (str, int)):
            raise PlanError(f"blocks are named by module path or index, got {r!r}")
        if isinstance(r, int):
            if not -len(blocks) <= r < len(blocks):
                raise PlanError(f"block index {r} out of range: the model has {len(blocks)} residual blocks")
            out.append(blocks[r])
        elif r in by_name:
            out.append(by_name[r])
        else:
            near = [b.name for b in blocks if r.rpartition(".")[0] and b.name.startswith(r.rpartition(".")[0])]
            raise PlanError(f"no residual block {r!r}; blocks are {near[:8] or [b.name for b in blocks][:8]}")
    if len({b.name for b in out}) != len(out):
        raise PlanError(f"blocks named twice: {[b.name for b in out]}")
    return sorted(out, key=blocks.index)


def _check_model(model: nn.Module, analysis: "Analysis") -> None:
    if analysis.model is not model:
        raise ArgumentError("analysis was made for another model (call vitgraph.analyze(model, x) first)")


def _finish(gm: fx.GraphModule) -> fx.GraphModule:
    gm.graph.eliminate_dead_code()
    gm.delete_all_unused_submodules()
    gm.graph.lint()
    gm.recompile()
    return gm


# ---------------------------------------------------------------------------------------------
# dropping blocks


def drop_blocks(model: nn.Module, analysis: "Analysis", blocks: Union[BlockRef, Sequence[BlockRef]]) -> fx.GraphModule:
    """A new module without ``blocks`` (module paths such as ``"blocks.3"`` or indices).

    Each residual add of a dropped block becomes its skip operand, so the residual stream passes
    through unchanged; the branches and their parameters go.  A block whose output is not a
    residual add (post-norm) cannot be dropped this way (:class:`PlanError`).
    """
    _check_model(model, analysis)
    chosen = _resolve(residual_blocks(analysis), blocks)
    for b in chosen:
        if not b.removable:
            raise PlanError(f"block {b.name!r} cannot be dropped: its output {b.output} is not a residual add "
                            f"(the stream is transformed after the residual, e.g. a post-norm)")
    gm = copy.deepcopy(analysis.graph_module)
    named = {n.name: n for n in gm.graph.nodes}
    for b in chosen:
        for add_name, skip in zip(b.adds, b.skips):
            node = named[add_name]
            node.replace_all_uses_with(node.args[skip])
            gm.graph.erase_node(node)
    gm = _finish(gm)
    for b in chosen:
        # shape reads and asserts on the skip may stay; nothing holding the block's weights may
        left = [n.name for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and _inside(_module_path(n), b.name)]
        left += [n.name for n in gm.graph.nodes if n.op in ("get_attr", "call_module") and _inside(str(n.target), b.name)]
        if left:
            raise PlanError(f"block {b.name!r} cannot be dropped: {sorted(set(left))[:3]} are still used outside it")
    return gm


# ---------------------------------------------------------------------------------------------
# early exits


class ExitHead(nn.Module):
    """Shallow classifier on the residual stream: pool tokens, LayerNorm, Linear."""

    def __init__(self, dim: int, num_classes: int, pool: str = "token") -> None:
        super().__init__()
        if pool not in ("token", "mean"):
            raise ArgumentError(f"pool must be 'token' (first token) or 'mean', got {pool!r}")
        self.pool = pool
        self.norm = nn.LayerNorm(dim)
        self.fc = nn.Linear(dim, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.pool == "token":
            x = x[:, 0]
        elif x.dim() > 2:
            x = x.flatten(1, -2).mean(1)  # every token / spatial position, channels last
        return self.fc(self.norm(x))


class ExitModel(nn.Module):
    """A model with exit heads after some blocks: ``forward`` returns ``(*exit_logits, output)``.

    ``exit_blocks`` names the blocks in the order of the returned exits; ``heads`` are the exit
    heads (also reachable inside ``graph_module``).
    """

    def __init__(self, gm: fx.GraphModule, exit_blocks: Sequence[str], exit_nodes: Sequence[str],
                 all_blocks: Sequence[str]) -> None:
        super().__init__()
        self.graph_module = gm
        self.exit_blocks = tuple(exit_blocks)
        self._exit_nodes = tuple(exit_nodes)
        self._all_blocks = tuple(all_blocks)  # every residual block, so integers index blocks as in add_exits

    @property
    def heads(self) -> list[ExitHead]:
        return [self.graph_module.get_submodule(f"{EXIT_PREFIX}.{i}") for i in range(len(self.exit_blocks))]

    def forward(self, *args: Any, **kwargs: Any) -> Any:
        return self.graph_module(*args, **kwargs)

    def backbone_parameters(self) -> Iterable[nn.Parameter]:
        """Parameters of the model itself (not of the exit heads)."""
        return (p for n, p in self.graph_module.named_parameters() if not n.startswith(EXIT_PREFIX + "."))


def add_exits(
    model: nn.Module,
    analysis: "Analysis",
    blocks: Union[BlockRef, Sequence[BlockRef]],
    num_classes: int,
    pool: str = "token",
) -> ExitModel:
    """A copy of the model with a shallow classifier after each of ``blocks``.

    ``pool="token"`` classifies the first token (the class token); ``"mean"`` averages every
    position (for models without a class token).  The residual stream must be channels-last.
    """
    _check_model(model, analysis)
    if num_classes < 1:
        raise ArgumentError(f"num_classes must be >= 1, got {num_classes}")
    all_blocks = residual_blocks(analysis)
    chosen = _resolve(all_blocks, blocks)
    gm = copy.deepcopy(analysis.graph_module)
    named = {n.name: n for n in gm.graph.nodes}
    heads = nn.Module()
    gm.add_module(EXIT_PREFIX, heads)
    exits = []
    for i, b in enumerate(chosen):
        node = named[b.output]
        td = node.meta.get(META_KEY)
        shape = node_shapes(node)
        if not isinstance(td, TensorDims) or shape is None or len(shape) < 2 or td.dims[-1] is None:
            raise PlanError(f"block {b.name!r}: its output {node.format_node()} has no channels-last residual stream")
        if pool == "token" and len(shape) != 3:
            raise PlanError(f"block {b.name!r}: pool='token' needs a [batch, tokens, channels] stream, got {list(shape)}"
                            " (use pool='mean')")
        heads.add_module(str(i), ExitHead(shape[-1], num_classes, pool))
        with gm.graph.inserting_after(node):
            exits.append(gm.graph.call_module(f"{EXIT_PREFIX}.{i}", (node,)))
    out = next(n for n in gm.graph.nodes if n.op == "output")
    final = out.args[0]
    out.args = (tuple(exits) + (final,),)
    gm.graph.lint()
    gm.recompile()
    return ExitModel(gm, [b.name for b in chosen], [e.name for e in exits], [b.name for b in all_blocks])


def truncate(exit_model: ExitModel, exit_block: BlockRef) -> fx.GraphModule:
    """The model up to the exit after ``exit_block`` (name, or block index as in :func:`add_exits`).

    The result returns that exit's logits; every later block, the final norm and head are dropped.
    """
    if not isinstance(exit_model, ExitModel):
        raise ArgumentTypeError(f"truncate expects an ExitModel from add_exits, got {type(exit_model).__name__}")
    name = exit_block
    if isinstance(exit_block, int) and not isinstance(exit_block, bool):
        blocks = exit_model._all_blocks
        if not -len(blocks) <= exit_block < len(blocks):
            raise PlanError(f"block index {exit_block} out of range: the model has {len(blocks)} residual blocks")
        name = blocks[exit_block]
    if name not in exit_model.exit_blocks:
        raise PlanError(f"no exit after block {name!r}; exits are after {list(exit_model.exit_blocks)}")
    i = exit_model.exit_blocks.index(name)
    gm = copy.deepcopy(exit_model.graph_module)
    node = next(n for n in gm.graph.nodes if n.name == exit_model._exit_nodes[i])
    out = next(n for n in gm.graph.nodes if n.op == "output")
    out.args = (node,)
    return _finish(gm)




def train_exits(
    exit_model: ExitModel,
    data: Iterable,
    steps: Optional[int] = None,
    lr: float = 1e-3,
    train_backbone: bool = False,
    final_weight: float = 1.0,
    loss_fn: Optional[Callable[[torch.Tensor, Any], torch.Tensor]] = None,
    device: Optional[Union[torch.device, str]] = None,
    log_every: int = 50,
    callback: Optional[Callable[[dict[str, float]], None]] = None,
) -> list[float]:
    """Train the exit heads (and with ``train_backbone`` the model) on the sum of exit losses.

    ``data`` yields ``(inputs, targets)``; ``steps=None`` is one pass, otherwise ``data`` is
    re-iterated.  With ``train_backbone`` the final output's loss (times ``final_weight``) joins
    the sum.  ``loss_fn`` defaults to cross-entropy.  Trains ``exit_model`` in place and returns
    the loss of every step.
    """
    loss_fn = loss_fn or F.cross_entropy
    dev = torch.device(device) if device is not None else next(exit_model.parameters()).device
    exit_model.to(dev)
    head_params = [p for h in exit_model.heads for p in h.parameters()]
    for p in exit_model.backbone_parameters():
        p.requires_grad_(train_backbone)
    params = head_params + (list(exit_model.backbone_parameters()) if train_backbone else [])
    opt = torch.optim.AdamW(params, lr=lr)
    was = exit_model.training
    with_final = train_backbone and bool(final_weight)

    def step_loss(net: nn.Module, x: tuple, y: Any) -> torch.Tensor:
        *exits, final = net(*x)
        loss = sum(loss_fn(e, y) for e in exits)
        if with_final:
            loss = loss + final_weight * loss_fn(final[0] if isinstance(final, (tuple, list)) else final, y)
        return loss

    def on_step(step: int, loss: torch.Tensor) -> None:
        if log_every and step % log_every == 0:
            rec = {"step": step, "loss": float(loss.detach())}
            log.info("exits step %d: loss %.4f", step, rec["loss"])
            if callback is not None:
                callback(rec)

    losses: list[float] = []
    try:
        exit_model.train()
        if steps != 0:  # (0 steps: data is not read)
            # a trained backbone without the final loss leaves the blocks after the last exit unused
            losses = fit(exit_model, rank_loader(data), step_loss, opt, epochs=None if steps is not None else 1,
                         steps=steps, device=dev, on_step=on_step, find_unused=train_backbone and not with_final)
    finally:
        exit_model.train(was)
        for p in exit_model.backbone_parameters():
            p.requires_grad_(True)
    return losses
