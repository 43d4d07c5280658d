"""One training loop for the passes that train: recovery, learnable thresholds and exit heads.

Batches come from a :class:`torch.utils.data.DataLoader` (:func:`rank_loader`).  Under torchrun
(:func:`vitgraph.distributed.is_distributed`) the loader samples with a
:class:`~torch.utils.data.DistributedSampler`, so each rank trains on its own share, and
:func:`fit` wraps the model in :class:`~torch.nn.parallel.DistributedDataParallel`, which
broadcasts rank 0's weights and buffers when it is built and averages the gradients of every
backward pass.  N processes then take the steps one process would take on batches N times as
large.
"""
from __future__ import annotations

import collections.abc
from typing import Any, Callable, Iterable, Iterator, Optional

import torch
from torch import nn
from torch.nn.parallel import DistributedDataParallel
from torch.utils.data import (BatchSampler, DataLoader, Dataset, DistributedSampler, IterableDataset, RandomSampler,
                              SequentialSampler)

from vitgraph.distributed import is_distributed
from vitgraph.passes.scoring_common import split_batch, to_device
from vitgraph.errors import DataError

StepLoss = Callable[[nn.Module, tuple, Any], torch.Tensor]


class _Stream(IterableDataset):
    """The batches of an iterable as an iterable-style dataset (each item is one batch)."""

    def __init__(self, data: Iterable[Any]) -> None:
        self.data = data

    def __iter__(self) -> Iterator[Any]:
        return iter(self.data)

    def __len__(self) -> int:
        return len(self.data)  # type: ignore[arg-type]  # TypeError for data without a length


def _as_is(batch: Any) -> Any:
    """Collate function of batch-per-item loaders: the batch exactly as the data holds it."""
    return batch


def rank_loader(data: Iterable[Any]) -> DataLoader:
    """The batches of ``data`` this process trains on, as a DataLoader.

    ``data`` is a DataLoader, a sequence of ``(inputs, targets)`` batches (a list, a map-style
    Dataset of batches) or, outside torchrun, any iterable of batches.  Under torchrun a
    DistributedSampler without shuffling gives rank ``r`` the batches ``r, r + N, ...`` of a
    sequence (each rank takes ``len(data) // N``; the rest is dropped so that the ranks take equal
    steps); a DataLoader over a map-style dataset is rebuilt with a DistributedSampler over its
    examples (shuffled when it shuffled, seed 0 on every rank), keeping its batch size, collate
    function and workers.
    """
    if isinstance(data, DataLoader):
        return _distributed_loader(data) if is_distributed() else data
    indexable = isinstance(data, collections.abc.Sequence) or (
        isinstance(data, Dataset) and not isinstance(data, IterableDataset))
    if not is_distributed():
        return DataLoader(data if indexable else _Stream(data), batch_size=None, collate_fn=_as_is,
                          generator=_own_seed())
    if not indexable:
        raise DataError("data-parallel training under torchrun needs data a DistributedSampler can share out: "
                         "a sequence of batches (len() and indexing, e.g. a list) or a DataLoader over a map-style "
                         f"dataset, got {type(data).__name__}")
    sampler = DistributedSampler(data, shuffle=False, drop_last=True)  # type: ignore[arg-type]
    return DataLoader(data, batch_size=None, sampler=sampler, collate_fn=_as_is, generator=_own_seed())


def _own_seed() -> torch.Generator:
    """A generator for the seed a DataLoader draws on every pass (so it leaves torch's global RNG
    as it was: training on batches does not change the caller's random numbers)."""
    return torch.Generator().manual_seed(0)


def _distributed_loader(loader: DataLoader) -> DataLoader:
    """``loader`` sampling with a DistributedSampler (itself when it already does)."""
    batches = loader.batch_sampler
    sampler = batches.sampler if isinstance(batches, BatchSampler) else loader.sampler
    if isinstance(sampler, DistributedSampler):
        return loader
    if isinstance(loader.dataset, IterableDataset):
        raise DataError("data-parallel training under torchrun cannot share out a DataLoader over an IterableDataset "
                         "with a DistributedSampler: pass a DataLoader over a map-style dataset or a list of batches")
    plain = type(sampler) is SequentialSampler or (
        type(sampler) is RandomSampler and not sampler.replacement
        and sampler.num_samples == len(sampler.data_source))
    if (batches is not None and type(batches) is not BatchSampler) or not plain:
        raise DataError(f"data-parallel training under torchrun: the DataLoader's {type(sampler).__name__} cannot be "
                         "replaced by a DistributedSampler faithfully; build the DataLoader with a DistributedSampler")
    dist_sampler = DistributedSampler(loader.dataset, shuffle=isinstance(sampler, RandomSampler), drop_last=True)
    return DataLoader(
        loader.dataset, batch_size=loader.batch_size, sampler=dist_sampler, drop_last=loader.drop_last,
        collate_fn=loader.collate_fn, num_workers=loader.num_workers, pin_memory=loader.pin_memory,
        timeout=loader.timeout, worker_init_fn=loader.worker_init_fn,
        multiprocessing_context=loader.multiprocessing_context, generator=loader.generator,
        prefetch_factor=loader.prefetch_factor, persistent_workers=loader.persistent_workers,
        pin_memory_device=loader.pin_memory_device, in_order=loader.in_order,
    )


def fit(
    model: nn.Module,
    batches: Iterable[Any],
    loss: StepLoss,
    optimizer: torch.optim.Optimizer,
    *,
    epochs: Optional[int] = 1,
    steps: Optional[int] = None,
    scheduler: Optional[Any] = None,
    device: Optional[torch.device] = None,
    on_step: Optional[Callable[[int, torch.Tensor], None]] = None,
    find_unused: bool = False,
) -> list[float]:
    """Train ``model`` on ``batches`` (from :func:`rank_loader`); returns the loss of every step.

    Each step moves the batch to ``device``, computes ``loss(net, inputs, targets)`` with ``net``
    the model (under torchrun: the model in DistributedDataParallel; call it, not the model, for
    the forward pass), steps ``optimizer`` and ``scheduler``, then calls ``on_step(step, loss)``.
    It runs ``epochs`` passes over the batches (``None``: as many as ``steps`` needs) and at most
    ``steps`` steps, and stops when a pass yields no batch (a one-shot iterator ran dry).
    Under torchrun every trainable parameter must take part in the loss unless ``find_unused``.
    """
    net = DistributedDataParallel(model, find_unused_parameters=find_unused) if is_distributed() else model
    sampler = batches.sampler if isinstance(batches, DataLoader) else None
    losses: list[float] = []
    epoch = 0
    while (epochs is None or epoch < epochs) and (steps is None or len(losses) < steps):
        if isinstance(sampler, DistributedSampler):
            sampler.set_epoch(epoch)  # a new order per epoch when it shuffles
        start = len(losses)
        for batch in batches:
            inputs, targets = split_batch(to_device(batch, device))
            value = loss(net, inputs, targets)
            optimizer.zero_grad(set_to_none=True)
            value.backward()
            optimizer.step()
            if scheduler is not None:
                scheduler.step()
            losses.append(float(value.detach()))
            if on_step is not None:
                on_step(len(losses) - 1, value)
            if steps is not None and len(losses) >= steps:
                break
        epoch += 1
        if len(losses) == start:
            break
    return losses


def batches_per_epoch(batches: Iterable[Any]) -> Optional[int]:
    """Steps one pass over ``batches`` takes on this rank (``None`` when the data has no length)."""
    try:
        return len(batches)  # type: ignore[arg-type]
    except TypeError:
        return None
