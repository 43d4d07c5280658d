"""Which channels of any layout a plan keeps: coordinates of leaf axes and kept positions."""
from __future__ import annotations

from typing import Optional

import numpy as np

from vitgraph.analysis.axes import AxisStore, Layout


class RaggedSectionsError(ValueError):
    """Sections of one fused projection end at different per-head sizes."""


def layout_coords(store: AxisStore, layout: Layout) -> tuple[int, dict[int, np.ndarray]]:
    """Size of ``layout`` and, per leaf axis, its index at every position (-1 where absent)."""
    total = sum(store.block_size(b) for b in layout)
    out: dict[int, np.ndarray] = {}
    off = 0
    for blk in layout:
        n = store.block_size(blk)
        if n == 0:  # a zero-length part (no register tokens): no positions to place
            continue
        flat = np.arange(n)
        stride = n
        for f in blk:
            r = store.find(f)
            size = store.size[r]
            stride //= size
            local = (flat // stride) % size  # row-major index of this factor
            sub = _axis_coords(store, r)
            for a, arr in sub.items():
                dest = out.setdefault(a, np.full(total, -1, dtype=np.int64))
                dest[off:off + n] = np.where(local >= 0, arr[local], -1)
        off += n
    return total, out


def _axis_coords(store: AxisStore, r: int) -> dict[int, np.ndarray]:
    d = store.defs.get(r)
    if d is None:
        return {r: np.arange(store.size[r])}
    _, sub = layout_coords(store, d)
    return sub


class Selection:
    """A plan resolved to per-axis keep masks, answering sizes and kept positions of layouts."""

    def __init__(self, store: AxisStore, masks: dict[int, np.ndarray], head_of: dict[int, int]) -> None:
        self.store = store
        self.masks = masks  # leaf root -> bool mask (1-D, or 2-D [head, dim] for per-head groups)
        self.head_of = head_of  # per-head leaf root -> its head leaf root
        self._cache: dict[Layout, np.ndarray] = {}

    def kept(self, layout: Optional[Layout]) -> Optional[np.ndarray]:
        """Sorted positions of ``layout`` the plan keeps (``None`` for dims without channels)."""
        if layout is None:
            return None
        hit = self._cache.get(layout)
        if hit is not None:
            return hit
        n, coords = layout_coords(self.store, layout)
        keep = np.ones(n, dtype=bool)
        for a, c in coords.items():
            m = self.masks.get(a)
            if m is None:
                continue
            valid = c >= 0
            if m.ndim == 1:
                keep[valid] &= m[c[valid]]
            else:
                h = coords.get(self.head_of[a])
                if h is None:
                    raise ValueError(f"per-head keep-set for axis {a} used where its heads are absent")
                keep[valid] &= m[h[valid], c[valid]]
        idx = np.flatnonzero(keep)
        self._cache[layout] = idx
        return idx

    def size(self, layout: Optional[Layout], old: int) -> int:
        """Number of channels kept in a dim laid out as ``layout`` (``old`` if no channels)."""
        if layout is None:
            return old
        return sum(self._block_size(b) for b in layout)

    def _block_size(self, blk: tuple[int, ...]) -> int:
        n = 1
        for f in blk:
            n *= self._axis_size(self.store.find(f))
        return n

    def _axis_size(self, r: int) -> int:
        st = self.store
        if r in st.stale and st.stale[r]:
            sizes = {self._axis_size(st.find(c)) for c in st.stale[r]}
            if len(sizes) != 1:
                raise RaggedSectionsError(f"sections of axis {r} keep different sizes {sorted(sizes)}")
            return sizes.pop()
        d = st.defs.get(r)
        if d is not None:
            return sum(self._block_size(b) for b in d)
        m = self.masks.get(r)
        if m is None:
            return st.size[r]
        if m.ndim == 1:
            return int(m.sum())
        hm = self.masks.get(self.head_of[r])
        rows = m[hm] if hm is not None else m
        return int(rows.sum(axis=1)[0]) if len(rows) else 0
