"""Channel axes: a union-find over tensor dimensions that carry channels, with refinement.

A *layout* describes the channels of one tensor dimension as a concatenation of blocks, each
block a row-major product of axes: ``((H, D),)`` is a head-major ``H x D`` dimension and
``((Hq, Dq), (Hk, Dk), (Hv, Dv))`` a fused q/k/v projection.  ``None`` marks a dimension that
carries no channels (batch, tokens, space).  Tying two layouts says both dimensions hold the same
channels in the same order; an axis tied to a structured layout is *refined*: it gets that layout
as its definition, so every dimension tied to it shares the structure.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Iterable, Iterator, Optional

import networkx as nx

Block = tuple[int, ...]
Layout = tuple[Block, ...]


@dataclass(frozen=True)
class Why:
    """Where a fact about axes came from: the graph node and the rule that decided it."""

    node: str
    rule: str
    detail: str = ""

    def __str__(self) -> str:
        extra = f": {self.detail}" if self.detail else ""
        return f"{self.rule} at {self.node}{extra}"


class AxisStore:
    """Axes with sizes, union-find ties, definitions (refinements), roles and freeze reasons."""

    def __init__(self) -> None:
        self.size: list[int] = []
        self.parent: list[int] = []
        self.origin: list[str] = []
        self.defs: dict[int, Layout] = {}
        self.frozen: dict[int, Why] = {}
        self.roles: dict[int, set[str]] = {}
        self.outer_of: dict[int, int] = {}  # leading factor axis -> axis it was split from
        self.count: dict[int, int] = {}  # root -> number of axes tied to it (absent: 1)
        self.stale: dict[int, list[int]] = {}  # axis replaced by per-section copies -> copies
        self.concat_parts: dict[int, tuple[int, tuple[int, ...]]] = {}  # part index axis -> (inner axis, parts)
        self.graph = nx.Graph()

    # -- basic union-find -------------------------------------------------------------------
    def new(self, size: int, origin: str) -> int:
        """A fresh axis of ``size`` channels."""
        a = len(self.size)
        self.size.append(int(size))
        self.parent.append(a)
        self.origin.append(origin)
        self.graph.add_node(a, size=int(size), origin=origin)
        return a

    def find(self, a: int) -> int:
        """Representative of ``a``'s tie class (with path halving)."""
        p = self.parent
        while p[a] != a:
            p[a] = p[p[a]]
            a = p[a]
        return a

    def union(self, a: int, b: int, why: Why) -> None:
        """Tie two axes of equal size; merges definitions, roles and freeze reasons."""
        if self.size[a] != self.size[b]:
            raise ValueError(f"cannot tie axes of sizes {self.size[a]} and {self.size[b]} ({why})")
        self.graph.add_edge(a, b, why=why)
        ra, rb = self.find(a), self.find(b)
        if ra == rb:
            return
        if ra > rb:
            ra, rb = rb, ra
        self.parent[rb] = ra
        self.count[ra] = self.count.get(ra, 1) + self.count.pop(rb, 1)
        self.roles.setdefault(ra, set()).update(self.roles.pop(rb, set()))
        if rb in self.frozen and ra not in self.frozen:
            self.frozen[ra] = self.frozen.pop(rb)
        else:
            self.frozen.pop(rb, None)
        if rb in self.outer_of and ra not in self.outer_of:
            self.outer_of[ra] = self.outer_of.pop(rb)
        da, db = self.defs.get(ra), self.defs.pop(rb, None)
        if db is not None:
            if da is None:
                self.defs[ra] = db
            else:
                self.tie(da, db, why)

    # -- facts --------------------------------------------------------------------------------
    def add_role(self, layout: Optional[Layout], role: str) -> None:
        """Record that the leaf axes of a single-axis layout play ``role`` (qk, v, head, ...)."""
        if layout is None:
            return
        for a in self.axes_of(layout, leaves=False):
            self.roles.setdefault(self.find(a), set()).add(role)

    def freeze(self, layout: Optional[Layout], why: Why) -> None:
        """Mark every axis of ``layout`` as not prunable, keeping the first reason."""
        if layout is None:
            return
        for a in self.axes_of(layout, leaves=True):
            r = self.find(a)
            self.frozen.setdefault(r, why)
            self.graph.add_edge(a, ("frozen", str(why.rule)), why=why)

    def define(self, a: int, layout: Layout, why: Why) -> None:
        """Refine axis ``a``: its channels are laid out as ``layout``."""
        r = self.find(a)
        if layout_size(self, layout) != self.size[r]:
            raise ValueError(f"definition of size {layout_size(self, layout)} for axis of size {self.size[r]}")
        old = self.defs.get(r)
        if old is not None:
            self.tie(old, layout, why)
            return
        self.defs[r] = layout
        for x in (f for blk in layout for f in blk):
            self.graph.add_edge(a, x, why=why, kind="refines")

    # -- structure queries --------------------------------------------------------------------
    def split_off(self, a: int, first: int, origin: str, why: Why) -> tuple[int, int]:
        """Refine axis ``a`` (undefined) into ``(first, size // first)``: returns the two new axes;
        the leading one remembers it was split from ``a`` (so sections of it can be taken)."""
        x = self.new(first, origin)
        y = self.new(self.size[a] // first, origin)
        self.define(a, ((x, y),), why)
        self.outer_of[x] = a
        return x, y

    def part_index(self, a: int, parts: tuple[int, ...], origin: str) -> tuple[int, int]:
        """Axes for a concatenation ``a`` of equal ``parts`` viewed as ``(len(parts), part)``: the
        index of the part, and an inner axis that stands for each part in turn (resolved to the
        part when the index dim is unbound)."""
        x = self.new(len(parts), f"part index of {origin}")
        y = self.new(self.size[a] // len(parts), f"part of {origin}")
        self.outer_of[x] = a
        self.concat_parts[x] = (y, parts)
        return x, y

    def mark_stale(self, outer: int, inner: list[int], maps: list[dict[int, int]]) -> None:
        """The inner axes of ``outer`` were replaced by per-section copies (``maps[i][x]``)."""
        for x in inner:
            self.stale[x] = [m[x] for m in maps]
        self.stale[outer] = []

    def into_sections(self, parent: int, outer: int, inner: list[int], maps: list[dict[int, int]], why: Why) -> None:
        """Redefine ``parent`` (``outer`` x ``inner``) as the concatenation of per-section copies
        of its inner axes (``maps[i]``: inner axis -> its copy in section ``i``); the replaced
        axes are marked stale and point at their copies."""
        self.mark_stale(outer, inner, maps)
        self.defs[parent] = tuple(tuple(m[x] for x in inner) for m in maps)
        self.graph.add_edges_from(((parent, y) for m in maps for y in m.values()), why=why, kind="refines")

    def axes_of(self, layout: Layout, leaves: bool) -> Iterator[int]:
        """Axes named in ``layout``; with ``leaves`` also those inside definitions."""
        seen: set[int] = set()
        stack = [f for blk in layout for f in blk]
        while stack:
            r = self.find(stack.pop())
            if r in seen:
                continue
            seen.add(r)
            yield r
            if leaves and r in self.defs:
                stack.extend(f for blk in self.defs[r] for f in blk)

    def expand(self, layout: Layout) -> Layout:
        """Layout in leaf axes: definitions inlined (single-block ones into their product)."""
        out: list[Block] = []
        for blk in layout:
            out.extend(self._expand_block(blk))
        return tuple(out)

    def _expand_block(self, blk: Block) -> list[Block]:
        parts: list[list[Block]] = []
        for f in blk:
            r = self.find(f)
            d = self.defs.get(r)
            parts.append(self.expand(d) if d is not None else [(r,)])
        # product of concatenations distributes only over the outermost factor
        blocks: list[Block] = [()]
        for i, p in enumerate(parts):
            if len(p) == 1:
                blocks = [b + p[0] for b in blocks]
            elif all(len(b) == 0 for b in blocks):
                blocks = [b + q for b in blocks for q in p]
            else:
                # inner concatenation: keep the factor opaque (its def is evaluated separately)
                blocks = [b + (self.find(blk[i]),) for b in blocks]
        return blocks

    # -- tying layouts ------------------------------------------------------------------------
    def tie(self, a: Optional[Layout], b: Optional[Layout], why: Why) -> None:
        """Say dimensions laid out as ``a`` and ``b`` hold the same channels in order."""
        if a is None and b is None:
            return
        if a is None or b is None:
            self.freeze(a if b is None else b, Why(why.node, why.rule, "tied to a dimension without channels"))
            return
        if layout_size(self, a) != layout_size(self, b):
            raise ValueError(f"cannot tie layouts of sizes {layout_size(self, a)} and {layout_size(self, b)}")
        self._tie_blocks(list(a), list(b), why)

    def _tie_blocks(self, xs: list[Block], ys: list[Block], why: Why) -> None:
        xs = [b for b in xs if self.block_size(b) > 0]
        ys = [b for b in ys if self.block_size(b) > 0]
        while xs and ys:
            x, y = xs[0], ys[0]
            sx, sy = self.block_size(x), self.block_size(y)
            if sx == sy:
                self._tie_products(x, y, why)
                xs.pop(0)
                ys.pop(0)
                continue
            if sx < sy:
                xs, ys, x, y, sx, sy = ys, xs, y, x, sy, sx
            # x spans several blocks of ys
            take, acc = [], 0
            while acc < sx:
                blk = ys.pop(0)
                take.append(blk)
                acc += self.block_size(blk)
            if acc != sx:
                # boundary falls inside a block: refine that block if it is a single axis
                last = take.pop()
                over = acc - sx
                keep_size = self.block_size(last) - over
                head_ax, tail_ax = self._split_single(last, keep_size, why)
                take.append((head_ax,))
                ys.insert(0, (tail_ax,))
            xs.pop(0)
            if len(x) == 1:
                self.define(x[0], tuple(take), why)
            else:
                self._freeze_pair((x,), tuple(take), why, "products span a concatenation")

    def _split_single(self, blk: Block, first: int, why: Why) -> tuple[int, int]:
        """Refine a single-axis block into two axes of sizes ``first`` and the rest."""
        if len(blk) != 1:
            raise ValueError("cannot split a product block")
        r = self.find(blk[0])
        d = self.defs.get(r)
        if d is not None:
            raise ValueError("cannot split an axis that is already refined")
        a = self.new(first, f"split of axis {r}")
        b = self.new(self.size[r] - first, f"split of axis {r}")
        self.define(r, ((a,), (b,)), why)
        return a, b

    def _tie_products(self, x: Block, y: Block, why: Why) -> None:
        x = tuple(f for f in x if self.size[f] != 1)
        y = tuple(f for f in y if self.size[f] != 1)
        if len(x) == 1 and len(y) == 1:
            self.union(x[0], y[0], why)
            return
        if len(x) == 1 or len(y) == 1:
            single, prod = (x, y) if len(x) == 1 else (y, x)
            r = self.find(single[0])
            if r in self.defs:
                self.tie(self.defs[r], (prod,), why)
            else:
                self.define(r, (prod,), why)
            return
        # align factor boundaries of two products by cumulative size
        xs, ys = list(x), list(y)
        while xs and ys:
            a, b = xs.pop(0), ys.pop(0)
            sa, sb = self.size[a], self.size[b]
            if sa == sb:
                self.union(a, b, why)
                continue
            if sa < sb:
                a, b, sa, sb, xs, ys = b, a, sb, sa, ys, xs
            take, acc = [b], sb
            while acc < sa and ys:
                nb = ys.pop(0)
                take.append(nb)
                acc *= self.size[nb]
            if acc != sa:
                self._freeze_pair((x,), (y,), why, "products do not factor alike")
                return
            self._tie_products((a,), tuple(take), why)

    def _freeze_pair(self, a: Layout, b: Layout, why: Why, detail: str) -> None:
        w = Why(why.node, why.rule, detail)
        self.freeze(a, w)
        self.freeze(b, w)

    def block_size(self, blk: Block) -> int:
        """Number of channels in a product block."""
        n = 1
        for f in blk:
            n *= self.size[f]
        return n


def layout_size(store: AxisStore, layout: Layout) -> int:
    """Number of channels in a layout."""
    return sum(store.block_size(b) for b in layout)


def single(a: int) -> Layout:
    """The layout of a dimension that is exactly one axis."""
    return ((a,),)


def flat_axes(layouts: Iterable[Optional[Layout]]) -> list[int]:
    """Every axis named in a sequence of layouts (no definitions expanded)."""
    return [f for lay in layouts if lay is not None for blk in lay for f in blk]
