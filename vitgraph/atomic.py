"""Writing files all or nothing: through a temporary file beside the target and a rename.

A reader (or a run resumed after Ctrl-C) sees the old file or the whole new one, never a part.
A leaf module: every stage may import it.
"""
from __future__ import annotations

import contextlib
import os
from pathlib import Path
from typing import Iterator, Union


@contextlib.contextmanager
def atomic_path(path: Union[str, Path]) -> Iterator[Path]:
    """A temporary path beside ``path`` to write to; renamed onto ``path`` when the block ends
    without an error, removed otherwise."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.partial")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if tmp.exists() or tmp.is_symlink():
            tmp.unlink()


def write_atomic(path: Union[str, Path], data: Union[str, bytes]) -> None:
    """Write ``data`` to ``path`` through a temporary file and a rename (all or nothing)."""
    with atomic_path(path) as tmp:
        if isinstance(data, str):
            tmp.write_text(data)
        else:
            tmp.write_bytes(data)
