"""Keep the process's existing objects out of the cyclic garbage collector while a stage runs.

A full collection walks every object of the process -- with torch and timm imported, about 0.4
million -- and CPython starts one whenever the objects that survived since the last reach a
quarter of those.  A stage that builds a large graph or model (analyze, plan or compress of a
deep ViT) makes that many, so the walk of objects that existed before the stage lands inside it
and its time stops growing linearly with depth.  ``gc.freeze()`` moves those objects to the
permanent generation for the stage; the objects the stage creates are collected as usual, and
``gc.unfreeze()`` hands the old ones back to the oldest generation afterwards.  Nothing is
deferred that the stage created; only the walk of objects it did not create is skipped.
"""
from __future__ import annotations

import functools
import gc
from typing import Callable, TypeVar

F = TypeVar("F", bound=Callable)


def holds_existing_objects(fn: F) -> F:
    """Run ``fn`` with the objects that exist at its call frozen (see the module docstring).

    Does nothing when the collector is disabled or objects are already frozen (a caller's own
    ``gc.freeze()``, or an outer stage that already holds them).
    """

    @functools.wraps(fn)
    def run(*args, **kwargs):
        if not gc.isenabled() or gc.get_freeze_count():
            return fn(*args, **kwargs)
        gc.freeze()
        try:
            return fn(*args, **kwargs)
        finally:
            gc.unfreeze()

    return run  # type: ignore[return-value]
