"""Verify the 2:4 semi-structured sparsity pattern of weights in an ONNX file.

A weight initializer is a 2-D float initializer feeding a MatMul or Gemm (possibly
through Identity / Cast / 2-D Transpose).  Its INPUT (reduction) axis follows from
the consumer:

  * ``MatMul(x, W)``       W is (in, out)            -> input axis 0
  * ``MatMul(W, x)``       W is (out, in)            -> input axis 1
  * ``Gemm(x, W, transB)`` transB=1: (out, in) -> 1;  transB=0: (in, out) -> 0
  * ``Gemm(W, x, transA)`` transA=0: (out, in) -> 1;  transA=1: (in, out) -> 0
  * each ``Transpose(perm=[1, 0])`` on the way flips the axis.

Every group of 4 consecutive weights along the input axis must have at most 2
non-zeros.  Eligibility is :func:`shape_skip_reason`, the shape rule ``vitgraph.passes.sparsity24`` uses too.
"""

from __future__ import annotations

import argparse
import fnmatch
import os
import sys
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import onnx
from google.protobuf.message import DecodeError
from onnx import numpy_helper


def shape_skip_reason(out_features: int, in_features: int, *, min_features: int = 64,
                      row_multiple: int = 32, col_multiple: int = 64) -> str | None:
    """Reason a (out, in) weight cannot take 2:4 sparsity, or None if it is eligible."""
    if in_features % 4:
        return f"in_features={in_features} is not a multiple of 4"
    if min(in_features, out_features) < min_features:
        return f"shape ({out_features}, {in_features}) smaller than min_features={min_features}"
    if in_features % col_multiple:
        return f"in_features={in_features} is not a multiple of {col_multiple} (sparse kernel columns)"
    if out_features % row_multiple:
        return f"out_features={out_features} is not a multiple of {row_multiple} (sparse kernel rows)"
    return None



__all__ = ["Initializer24", "Check24Report", "check_24", "main"]

_FLOAT_TYPES = {onnx.TensorProto.FLOAT, onnx.TensorProto.FLOAT16, onnx.TensorProto.BFLOAT16,
                onnx.TensorProto.DOUBLE}
_PASSTHROUGH = {"Identity", "Cast"}


@dataclass(frozen=True)
class Initializer24:
    """2:4 check result for one weight initializer."""

    name: str
    shape: tuple[int, ...]
    input_axis: int | None  # None when the orientation is ambiguous
    eligible: bool
    reason: str  # why not eligible; "" when eligible
    groups: int  # 4-groups checked (0 when not eligible)
    violations: int  # groups with more than 2 non-zeros

    @property
    def satisfies(self) -> bool:
        """True iff checked and every 4-group holds at most 2 non-zeros."""
        return self.eligible and self.violations == 0

    @property
    def all_dense(self) -> bool:
        """True iff checked and no 4-group holds the pattern (weight was not sparsified)."""
        return self.eligible and self.groups > 0 and self.violations == self.groups

    @property
    def ok(self) -> bool:
        """True iff the weight satisfies 2:4 or is not eligible for it."""
        return not self.eligible or self.violations == 0

    @property
    def status(self) -> str:
        """One word: 2:4, dense, partial or skipped."""
        if not self.eligible:
            return "skipped"
        if self.satisfies:
            return "2:4"
        return "dense" if self.all_dense else "partial"


@dataclass(frozen=True)
class Check24Report:
    """2:4 check results for all weight initializers of one ONNX model."""

    initializers: tuple[Initializer24, ...]

    @property
    def ok(self) -> bool:
        """True iff every weight initializer satisfies 2:4 or is listed as not eligible."""
        return all(item.ok for item in self.initializers)

    @property
    def checked(self) -> tuple[Initializer24, ...]:
        """Initializers that were eligible and therefore checked."""
        return tuple(item for item in self.initializers if item.eligible)

    def summary(self) -> str:
        """Table of per-initializer results followed by a verdict line."""
        header = ("initializer", "shape", "in-axis", "status", "groups", "violations", "note")
        rows = [(i.name, "x".join(map(str, i.shape)), "-" if i.input_axis is None else str(i.input_axis),
                 i.status, str(i.groups), str(i.violations), i.reason) for i in self.initializers]
        widths = [max(len(r[k]) for r in [header, *rows]) for k in range(len(header))]
        lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in [header, *rows]]
        bad = sum(not i.ok for i in self.initializers)
        verdict = ("OK" if self.ok else f"FAIL ({bad} eligible weights violate 2:4)")
        lines.append(f"{len(self.checked)} of {len(self.initializers)} weight initializers checked: {verdict}")
        return "\n".join(lines)


def _load(model: str | os.PathLike | onnx.ModelProto) -> onnx.ModelProto:
    """Return a ModelProto from a path or pass one through."""
    if isinstance(model, onnx.ModelProto):
        return model
    if not os.path.isfile(model):
        raise FileNotFoundError(f"ONNX file not found: {model}")
    return onnx.load(os.fspath(model))


def _int_attr(node: onnx.NodeProto, name: str, default: int) -> int:
    """Integer attribute of a node, or default."""
    for attr in node.attribute:
        if attr.name == name:
            return int(attr.i)
    return default


def _is_transpose_2d(node: onnx.NodeProto) -> bool:
    """True for a Transpose that swaps the two axes of a 2-D tensor."""
    perm = [list(a.ints) for a in node.attribute if a.name == "perm"]
    return node.op_type == "Transpose" and perm in ([], [[1, 0]])


def _consumer_axis(node: onnx.NodeProto, slot: int) -> int | None:
    """Input axis of a (out,in)-or-(in,out) weight fed to input ``slot`` of MatMul/Gemm."""
    if node.op_type == "MatMul" and slot in (0, 1):
        return 1 if slot == 0 else 0
    if node.op_type == "Gemm" and slot in (0, 1):
        if slot == 1:
            return 1 if _int_attr(node, "transB", 0) else 0
        return 0 if _int_attr(node, "transA", 0) else 1
    return None


def _input_axes(name: str, users: dict[str, list[onnx.NodeProto]]) -> set[int]:
    """Input axes implied by every MatMul/Gemm reached from tensor ``name`` via passthrough ops."""
    axes: set[int] = set()
    stack = [(name, False)]  # (tensor, flipped by an odd number of transposes)
    seen = set()
    while stack:
        tensor, flipped = stack.pop()
        if (tensor, flipped) in seen:
            continue
        seen.add((tensor, flipped))
        for node in users.get(tensor, []):
            if node.op_type in _PASSTHROUGH or _is_transpose_2d(node):
                stack.append((node.output[0], flipped ^ _is_transpose_2d(node)))
                continue
            for slot, inp in enumerate(node.input):
                axis = _consumer_axis(node, slot) if inp == tensor else None
                if axis is not None:
                    axes.add(1 - axis if flipped else axis)
    return axes


def _count_violations(array: np.ndarray, axis: int) -> tuple[int, int]:
    """(groups, groups with > 2 non-zeros) along ``axis`` of a 2-D array."""
    weight = array if axis == 1 else array.T  # now (out, in)
    groups = (weight.reshape(weight.shape[0], -1, 4) != 0).sum(-1)
    return int(groups.size), int((groups > 2).sum())


def _check_one(init: onnx.TensorProto, axes: set[int], ignore: tuple[str, ...], min_size: int,
               row_multiple: int, col_multiple: int) -> Initializer24:
    """Check one weight initializer."""
    shape = tuple(int(d) for d in init.dims)
    if len(axes) != 1:
        reason = f"ambiguous input axis (consumers imply axes {sorted(axes)})"
        return Initializer24(init.name, shape, None, False, reason, 0, 0)
    (axis,) = axes
    if any(fnmatch.fnmatchcase(init.name, p) for p in ignore):
        return Initializer24(init.name, shape, axis, False, "ignored by pattern", 0, 0)
    reason = shape_skip_reason(shape[1 - axis], shape[axis], min_features=min_size,
                               row_multiple=row_multiple, col_multiple=col_multiple)
    if reason is not None:
        return Initializer24(init.name, shape, axis, False, reason, 0, 0)
    groups, violations = _count_violations(numpy_helper.to_array(init), axis)
    return Initializer24(init.name, shape, axis, True, "", groups, violations)


def check_24(model: str | os.PathLike | onnx.ModelProto, min_size: int = 64, *, ignore: Iterable[str] = (),
             row_multiple: int = 32, col_multiple: int = 64) -> Check24Report:
    """Check every MatMul/Gemm weight initializer of an ONNX model for the 2:4 pattern.

    ``min_size``, ``row_multiple`` and ``col_multiple`` define eligibility exactly as
    ``sparsify_24``'s ``min_features`` rule; ``ignore`` holds fnmatch patterns of
    initializer names to list as not eligible (e.g. a deliberately dense head).
    """
    proto = _load(model)
    users: dict[str, list[onnx.NodeProto]] = {}
    for node in proto.graph.node:
        for inp in set(node.input):
            users.setdefault(inp, []).append(node)
    results = []
    for init in proto.graph.initializer:
        if len(init.dims) != 2 or init.data_type not in _FLOAT_TYPES:
            continue
        axes = _input_axes(init.name, users)
        if axes:  # consumed as a MatMul/Gemm weight
            results.append(_check_one(init, axes, tuple(ignore), min_size, row_multiple, col_multiple))
    return Check24Report(tuple(results))


def main(argv: Sequence[str] | None = None) -> int:
    """``vitgraph check-24 FILE.onnx``: print the table; exit 0 if OK, 1 if not, 2 on bad input."""
    parser = argparse.ArgumentParser(prog="vitgraph check-24",
                                     description="Verify 2:4 sparsity of MatMul/Gemm weights in an ONNX file.")
    parser.add_argument("file", help="ONNX model file")
    parser.add_argument("--min-size", type=int, default=64, help="skip weights with a dimension below this")
    parser.add_argument("--ignore", action="append", default=[], metavar="PATTERN",
                        help="fnmatch pattern of initializer names to skip (repeatable)")
    args = parser.parse_args(argv)
    try:
        report = check_24(args.file, min_size=args.min_size, ignore=args.ignore)
    except (OSError, DecodeError) as exc:
        print(f"vitgraph check-24: cannot read {args.file}: {exc}", file=sys.stderr)
        return 2
    print(report.summary())
    return 0 if report.ok else 1

