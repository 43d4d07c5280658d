"""torch.distributed helpers: the process group under torchrun and sums of scores across ranks.

Scoring and training run unchanged under ``torchrun``.  The score passes take every ``world``-th
batch (``passes.scoring_common.scoring_batches``) and all-reduce their per-unit sums
(:func:`all_reduce_sum`), so N processes produce the scores one process would on the same batches
(up to float summation order).  Training (``passes.training``) uses DistributedDataParallel and a
DistributedSampler.  Scores are statistics, not gradients of a model's parameters, so
DistributedDataParallel cannot reduce them: :func:`all_reduce_sum` does.
"""
from __future__ import annotations

import os
from typing import Mapping

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


def all_reduce_sum(values: Mapping[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Sum every tensor across ranks (a no-op outside torch.distributed)."""
    out = {k: v.detach().clone() for k, v in values.items()}
    if not is_distributed():
        return out
    for k in sorted(out):  # same order on every rank
        dist.all_reduce(out[k], op=dist.ReduceOp.SUM)
    return out
