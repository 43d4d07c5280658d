"""The figures of a pruning run and their files: the markdown table of ``report.md`` and ``widths.png``.

A :class:`Stage` is one model's row (dense, pruned, fine-tuned, INT8): top-1 for a classifier, or
for a model distilled from its dense outputs (no class logits, or no labels) how close its
outputs are to the dense model's (cosine similarity and normalised MSE).  Widths are
``(group id, kind, kept, dense size)`` rows, drawn by :func:`draw_widths` as one bar per group,
filled to the kept fraction, with Pillow (which torchvision already needs), so the figure needs no
plotting library.
"""
from __future__ import annotations

import io
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Sequence, Union

__all__ = ["Stage", "stage_table", "widths_table", "draw_widths"]

Width = tuple[str, str, int, int]

_COLOURS = {"residual": (31, 119, 180), "head": (148, 103, 189), "qk": (255, 127, 14), "v": (44, 160, 44),
            "ffn": (214, 39, 40)}


@dataclass
class Stage:
    """The figures of one model in the report: top-1 (percent; ``None`` for a model judged by its
    outputs), params, FLOPs, latency (ms), and against the dense model's outputs the normalised MSE
    (``error``) and cosine similarity (``cosine``) of the output tensors."""

    top1: Optional[float]
    params: int
    flops: int
    latency_ms: Optional[float] = None
    error: Optional[float] = None
    cosine: Optional[float] = None


def stage_table(stages: dict[str, Stage]) -> str:
    """The stages as a markdown table (top-1, or closeness to the dense outputs where no stage has a top-1)."""
    by_top1 = any(s.top1 is not None for s in stages.values())
    quality = ["top-1 (%)"] if by_top1 else ["cosine to dense outputs", "normalised MSE to dense outputs"]
    lines = [f"| model | {' | '.join(quality)} | params (M) | GFLOPs | latency (ms) |",
             "|---|" + "---:|" * (len(quality) + 3)]
    for name, s in stages.items():
        lat = "-" if s.latency_ms is None else f"{s.latency_ms:.2f}"
        cells = [_figure(s.top1, ".2f")] if by_top1 else [_figure(s.cosine, ".4f"), _figure(s.error, ".2e")]
        lines.append(f"| {name} | {' | '.join(cells)} | {s.params / 1e6:.3f} | {s.flops / 1e9:.4f} | {lat} |")
    return "\n".join(lines)


def _figure(value: Optional[float], fmt: str) -> str:
    return "-" if value is None else format(value, fmt)


def widths_table(widths: Sequence[Width]) -> list[str]:
    """The widths as markdown table lines."""
    return (["| group | kind | kept | of |", "|---|---|---:|---:|"]
            + [f"| {gid} | {kind} | {kept} | {size} |" for gid, kind, kept, size in widths])


def draw_widths(widths: Sequence[Width], path: Union[str, Path], title: str = "") -> Path:
    """``widths.png``: one row per group, a bar filled to kept / dense size, labelled ``kept/size``."""
    from PIL import Image, ImageDraw

    row, label_w, bar_w, pad = 18, 230, 360, 8
    top = pad + (row if title else 0)
    img = Image.new("RGB", (label_w + bar_w + 90, top + row * max(len(widths), 1) + pad), "white")
    d = ImageDraw.Draw(img)
    if title:
        d.text((pad, pad), title, fill="black")
    for i, (gid, kind, kept, size) in enumerate(widths):
        y = top + i * row
        d.text((pad, y + 3), gid[-34:], fill="black")
        x0, x1 = label_w, label_w + bar_w
        d.rectangle((x0, y + 3, x1, y + row - 3), fill=(225, 225, 225))
        frac = kept / size if size else 1.0
        if frac > 0:
            d.rectangle((x0, y + 3, x0 + round(bar_w * frac), y + row - 3), fill=_COLOURS.get(kind, (127, 127, 127)))
        d.text((x1 + 6, y + 3), f"{kept}/{size}", fill="black")
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    from vitgraph.atomic import write_atomic

    path = Path(path)
    write_atomic(path, buf.getvalue())
    return path
