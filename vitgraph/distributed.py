"""torch.distributed helpers: shard batches over ranks and sum scores across them.

Scoring and fine-tuning run unchanged under ``torchrun``: each rank takes every ``world``-th
batch, and per-unit sums are all-reduced, so N processes produce the scores one process would
on the same batches (up to float summation order).
"""
from __future__ import annotations

import os
from typing import Any, Iterable, Iterator, Mapping

import torch
import torch.distributed as dist


def is_distributed() -> bool:
    """True inside an initialised process group with more than one rank."""
    return dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1


def rank() -> int:
    """This process' rank (0 outside torch.distributed)."""
    return dist.get_rank() if is_distributed() else 0


def world_size() -> int:
    """Number of ranks (1 outside torch.distributed)."""
    return dist.get_world_size() if is_distributed() else 1


def init_from_env(backend: str | None = None) -> bool:
    """Initialise the default process group when launched by torchrun (env:// variables set).

    Returns whether a process group is active.  ``backend`` defaults to nccl when CUDA is
    available, gloo otherwise.
    """
    if dist.is_initialized():
        return True
    if "WORLD_SIZE" not in os.environ or int(os.environ["WORLD_SIZE"]) < 2:
        return False
    backend = backend or ("nccl" if torch.cuda.is_available() else "gloo")
    dist.init_process_group(backend)
    return True


def shutdown() -> None:
    """Wait for every rank, then destroy the default process group (a no-op outside one).

    Ranks leave together: a rank that tears gloo down while a peer still talks to it can
    abort the peer at exit.
    """
    if dist.is_available() and dist.is_initialized():
        dist.barrier()
        dist.destroy_process_group()


def shard(data: Iterable[Any], even: bool = False) -> Iterator[Any]:
    """The batches of ``data`` this rank handles: every ``world``-th, starting at ``rank``.

    ``even`` drops the last ``len(data) % world`` batches so every rank takes the same number of
    steps (needed when ranks synchronise every step, as in data-parallel training).
    """
    r, w = rank(), world_size()
    limit = None
    if even and w > 1:
        try:
            limit = len(data) - len(data) % w  # type: ignore[arg-type]
        except TypeError:
            raise ValueError("data-parallel training under torchrun needs data with a len()") from None
    for i, batch in enumerate(data):
        if limit is not None and i >= limit:
            break
        if i % w == r:
            yield batch


def all_reduce_sum(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor across ranks (a no-op outside torch.distributed)."""
    out = {k: v.detach().clone() for k, v in values.items()}
    if not is_distributed():
        return out
    for k in sorted(out):  # same order on every rank
        dist.all_reduce(out[k], op=dist.ReduceOp.SUM)
    return out


def average_gradients(module: torch.nn.Module) -> None:
    """Average parameter gradients across ranks (plain data parallelism without DDP wrapping)."""
    if not is_distributed():
        return
    w = world_size()
    for p in module.parameters():
        if p.grad is not None:
            dist.all_reduce(p.grad, op=dist.ReduceOp.SUM)
            p.grad /= w
