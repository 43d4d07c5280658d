"""The record of a pruning run inside its output directory, so that a rerun with ``resume`` continues
from the last finished step.

``OUT/.vitgraph-run/state.json`` holds the run's arguments and, for every finished step, its
figures (top-1, a plan's JSON text, losses).  The tensors a step made (scores, fine-tuned weights)
are files beside it, saved with ``torch.save`` of plain tensors and read back with
``weights_only=True``, so resuming unpickles no code.  Every file is written under a temporary
name and renamed into place: an interrupted run leaves the old file or the new one, never half of
one, and a step counts as finished only once its record is in ``state.json``.
"""
from __future__ import annotations

import json
import logging
import shutil
from pathlib import Path
from typing import Any, Callable, Optional, Union

import torch

from vitgraph.atomic import atomic_path, write_atomic
from vitgraph.errors import VitgraphError

__all__ = ["Journal", "write_atomic", "STATE_DIR"]

STATE_DIR = ".vitgraph-run"
_STATE = "state.json"
log = logging.getLogger("vitgraph.prune")


class Journal:
    """Finished steps of one run, kept in ``out`` (nothing is kept when ``out`` is ``None``).

    ``config`` is what the steps depend on; resuming a run made with another config is refused.
    Without ``resume`` an earlier record in ``out`` is discarded.  Only the ``writer`` (rank 0
    under torchrun) writes; every rank reads.
    """

    def __init__(self, out: Optional[Union[str, Path]], config: dict[str, Any], resume: bool = False,
                 writer: bool = True) -> None:
        self.dir = Path(out) / STATE_DIR if out is not None else None
        self.writer = writer and self.dir is not None
        self.config = json.loads(json.dumps(config))  # as it reads back from JSON
        self.steps: dict[str, dict[str, Any]] = {}
        self.finished: Optional[dict[str, Any]] = None
        if self.dir is None:
            if resume:
                raise VitgraphError("resume continues a run recorded in its output directory and needs out=")
            return
        state = self.dir / _STATE
        if resume and state.is_file():
            try:
                saved = json.loads(state.read_text())
            except (OSError, json.JSONDecodeError) as e:
                raise VitgraphError(f"--resume: cannot read {state}: {e}") from e
            if saved.get("config") != self.config:
                diff = sorted(k for k in set(self.config) | set(saved.get("config", {}))
                              if self.config.get(k) != saved.get("config", {}).get(k))
                raise VitgraphError(f"--resume: {out} holds a run with other arguments ({', '.join(diff)} differ); "
                                    "give the same arguments, or another --out, or leave out --resume")
            self.steps = saved.get("steps", {})
            self.finished = saved.get("finished")
            if self.steps:
                log.info("resuming %s after %s", out, ", ".join(self.steps))
        elif resume:
            log.info("--resume: %s has no earlier run; starting afresh", out)
        elif self.writer and self.dir.exists():
            shutil.rmtree(self.dir)
        if self.writer:
            self.dir.mkdir(parents=True, exist_ok=True)
            self._save()

    def _save(self) -> None:
        if self.writer:
            write_atomic(self.dir / _STATE, json.dumps({"config": self.config, "steps": self.steps,
                                                        "finished": self.finished}, indent=1))

    def get(self, step: str) -> Optional[dict[str, Any]]:
        """The figures of ``step`` if it finished in this run or the one resumed."""
        return self.steps.get(step)

    def run(self, step: str, fn: Callable[[], dict[str, Any]]) -> dict[str, Any]:
        """The figures of ``step``: recorded ones, or ``fn()``'s, which are then recorded."""
        done = self.get(step)
        if done is not None:
            return done
        figures = fn()
        self.record(step, figures)
        return figures

    def record(self, step: str, figures: dict[str, Any], tensors: Optional[dict[str, Any]] = None) -> None:
        """Mark ``step`` finished with ``figures`` (JSON) and ``tensors`` (a dict of tensors, saved first)."""
        if tensors is not None and self.writer:
            with atomic_path(self.dir / f"{step}.pt") as tmp:
                torch.save(tensors, tmp)
        self.steps[step] = figures
        self._save()

    def tensors(self, step: str) -> dict[str, Any]:
        """The tensors recorded with ``step`` (read with ``weights_only=True``: no code is unpickled)."""
        if self.dir is None:
            raise VitgraphError(f"step {step!r} has no recorded tensors")
        path = self.dir / f"{step}.pt"
        try:
            return torch.load(path, weights_only=True)
        except (OSError, RuntimeError) as e:
            raise VitgraphError(f"--resume: cannot read {path} (the record of step {step!r}): {e}") from e

    def finish(self, summary: dict[str, Any]) -> None:
        """Mark the run finished with ``summary`` and drop the step tensors (the result holds them)."""
        self.finished = summary
        self._save()
        if self.writer:
            for f in self.dir.glob("*.pt"):
                f.unlink()
