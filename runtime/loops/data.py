"""Dataloaders as the loops need them: sharded, limited, resumable, on the device.

Distributed runs swap the sampler for a ``DistributedSampler`` (keeping
``shuffle``); every map-style loader gets a thin batch-sampler wrapper that
can skip the batches an interrupted epoch already consumed, so a resumed run
sees exactly the batches the uninterrupted one would have seen.
"""

from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable, Iterator

import torch
from torch import Tensor
from torch.utils.data import BatchSampler, DataLoader, DistributedSampler, IterableDataset, RandomSampler, Sampler

from runtime.errors import MisconfigurationError
from runtime.seed import seed_dataloader_worker, seeds_workers


def move_to_device(batch: Any, device: torch.device) -> Any:
    """Move every tensor in a (nested) batch to ``device``."""
    if isinstance(batch, Tensor):
        return batch.to(device, non_blocking=True) if batch.device != device else batch
    if isinstance(batch, dict):
        return type(batch)((k, move_to_device(v, device)) for k, v in batch.items())
    if isinstance(batch, tuple) and hasattr(batch, "_fields"):
        return type(batch)(*(move_to_device(v, device) for v in batch))
    if isinstance(batch, (list, tuple)):
        return type(batch)(move_to_device(v, device) for v in batch)
    if hasattr(batch, "to") and callable(batch.to):
        return batch.to(device)
    return batch


class _SkippingIterator:
    """Iterates a batch sampler, first dropping ``skip`` batches and recording indices.

    The inner sampler is iterated lazily (on the first ``next``), exactly as
    the DataLoader would, so random samplers draw from the global RNG at the
    same moment as without the wrapper. ``materialize`` forces that draw.
    """

    def __init__(self, owner: "ResumableBatchSampler"):
        self._owner = owner
        self._inner: Iterator[list[int]] | None = None

    def materialize(self) -> None:
        if self._inner is None:
            self._inner = iter(self._owner.batch_sampler)
            for _ in range(self._owner.skip):
                next(self._inner, None)

    def __iter__(self) -> "_SkippingIterator":
        return self

    def __next__(self) -> list[int]:
        self.materialize()
        batch = next(self._inner)
        if self._owner.record_indices:
            self._owner.yielded.append(list(batch))
        return batch


class ResumableBatchSampler(Sampler):
    """Wraps a loader's batch sampler; ``skip`` drops the first batches of the next epoch."""

    def __init__(self, batch_sampler: Any, record_indices: bool = False):
        self.batch_sampler = batch_sampler
        self.skip = 0
        self.record_indices = record_indices
        self.yielded: list[list[int]] = []
        self.current: _SkippingIterator | None = None

    def __len__(self) -> int:
        return max(0, len(self.batch_sampler) - self.skip)

    def __iter__(self) -> _SkippingIterator:
        self.yielded = []
        self.current = _SkippingIterator(self)
        return self.current

    def set_epoch(self, epoch: int) -> None:
        sampler = getattr(self.batch_sampler, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)


_END = object()


class LookAhead:
    """Iterates a loader one batch ahead, so that ``done`` says whether the batch just returned is the last one.

    For a loader without a length the loop learns no other way that a batch ends the epoch, and validation,
    epoch-interval schedulers and the last accumulation window all wait for that batch (Lightning's fetcher
    looks ahead in the same way). Batch ``k + 1`` is fetched when batch ``k`` is returned, before its step.

    ``agree(has_next)``, in a distributed run, returns whether every rank has a next batch: all ranks then end
    the epoch at the same batch, the shortest rank's last, rather than one rank stepping on while the others
    validate (a collective that the others never join, which hangs).

    ``resumed``: the epoch's first batches were skipped before ``iterator`` (a resumed epoch), so ``done``
    says at once whether the last of them ended the epoch.
    """

    def __init__(
        self, iterator: Iterator[Any], agree: Callable[[bool], bool] | None = None, resumed: bool = False
    ):
        self._iterator: Iterator[Any] | None = iterator
        self._agree = agree
        self._pending: Any = _END
        self._fetch()
        # Before an epoch's first batch none is the last, even in an empty loader (as Lightning's is_last_batch).
        self.done = resumed and self._pending is _END

    def _fetch(self) -> None:
        pending = next(self._iterator, _END)
        has_next = pending is not _END
        if self._agree is not None and not self._agree(has_next):  # a collective: every rank, every fetch
            if has_next:
                warnings.warn(
                    "the training dataloader of this rank still has batches, but another rank's has run out; the "
                    "epoch ends at the same batch on every rank, so this rank's remaining batches are skipped. "
                    "Give every rank the same number of batches (split an IterableDataset evenly across ranks)",
                    stacklevel=2,
                )
            pending = _END
        self._pending = pending

    def __iter__(self) -> "LookAhead":
        return self

    def __next__(self) -> Any:
        batch = self._pending
        if batch is _END:
            raise StopIteration
        self._fetch()
        self.done = self._pending is _END
        return batch

    def close(self) -> None:
        """Let go of the loader's iterator (and its worker processes); ``done`` keeps its value."""
        self._iterator = None
        self._pending = _END


def _worker_init_fn(loader: DataLoader, rank: int) -> Any:
    """The loader's own worker_init_fn, or after seed_everything(workers=True) one that seeds each worker."""
    if loader.worker_init_fn is None and loader.num_workers > 0 and seeds_workers():
        return functools.partial(seed_dataloader_worker, rank=rank)
    return loader.worker_init_fn


def _loader_kwargs(loader: DataLoader, rank: int) -> dict[str, Any]:
    kwargs = dict(
        num_workers=loader.num_workers,
        collate_fn=loader.collate_fn,
        pin_memory=loader.pin_memory,
        timeout=loader.timeout,
        worker_init_fn=_worker_init_fn(loader, rank),
        multiprocessing_context=loader.multiprocessing_context,
        generator=loader.generator,
        persistent_workers=loader.persistent_workers,
    )
    if loader.num_workers > 0:
        kwargs["prefetch_factor"] = loader.prefetch_factor
    return kwargs


def has_len(loader: Any) -> bool:
    try:
        return len(loader) is not None
    except (TypeError, NotImplementedError):
        return False


@dataclass
class PreparedLoader:
    """A dataloader ready for one loop, with its batch budget."""

    loader: Any
    num_batches: int | float  # batches this loop takes per epoch (inf when unknown)
    resumable: ResumableBatchSampler | None = None
    distributed_sampler: DistributedSampler | None = None
    extras: dict[str, Any] = field(default_factory=dict)

    def set_epoch(self, epoch: int) -> None:
        """Reseed shuffling for this epoch (DistributedSampler and any sampler with set_epoch)."""
        if self.resumable is not None:
            self.resumable.set_epoch(epoch)
            return
        sampler = getattr(self.loader, "sampler", None)
        if hasattr(sampler, "set_epoch"):
            sampler.set_epoch(epoch)
        batch_sampler = getattr(self.loader, "batch_sampler", None)
        inner = getattr(batch_sampler, "sampler", None)
        if hasattr(inner, "set_epoch"):
            inner.set_epoch(epoch)


def prepare_loader(
    loader: Any,
    *,
    stage: str,
    world_size: int,
    rank: int,
    use_distributed_sampler: bool,
    limit: int | float,
    record_indices: bool = False,
    seed: int = 0,
) -> PreparedLoader:
    """Shard, wrap and budget one dataloader for ``stage`` ("train", "val", "test", "predict")."""
    if not isinstance(loader, DataLoader):
        if not hasattr(loader, "__iter__"):
            raise MisconfigurationError(
                f"the {stage} dataloader must be a torch DataLoader or an iterable of batches, "
                f"got {type(loader).__name__}"
            )
        total = len(loader) if has_len(loader) else math.inf
        return PreparedLoader(loader, _limited(total, limit, stage))

    if isinstance(loader.dataset, IterableDataset) or loader.batch_sampler is None:
        # Used as given (no sampler to wrap); only the worker seeding is added, on the loader itself.
        loader.worker_init_fn = _worker_init_fn(loader, rank)
        total = len(loader) if has_len(loader) else math.inf
        return PreparedLoader(loader, _limited(total, limit, stage))

    batch_sampler = loader.batch_sampler
    distributed_sampler = None
    if world_size > 1 and use_distributed_sampler and not isinstance(loader.sampler, DistributedSampler):
        if type(batch_sampler) is not BatchSampler:
            raise MisconfigurationError(
                f"the {stage} dataloader uses a custom batch_sampler ({type(batch_sampler).__name__}) that cannot "
                "be sharded across ranks automatically; shard it yourself and pass "
                "Trainer(use_distributed_sampler=False)"
            )
        shuffle = isinstance(loader.sampler, RandomSampler) and stage == "train"
        distributed_sampler = DistributedSampler(
            loader.dataset, num_replicas=world_size, rank=rank, shuffle=shuffle, seed=seed, drop_last=False
        )
        batch_sampler = BatchSampler(distributed_sampler, batch_sampler.batch_size, batch_sampler.drop_last)
    elif isinstance(loader.sampler, DistributedSampler):
        distributed_sampler = loader.sampler

    resumable = ResumableBatchSampler(batch_sampler, record_indices=record_indices)
    rebuilt = DataLoader(loader.dataset, batch_sampler=resumable, **_loader_kwargs(loader, rank))
    total = len(batch_sampler) if has_len(batch_sampler) else math.inf  # a sampler may have no length
    return PreparedLoader(rebuilt, _limited(total, limit, stage), resumable, distributed_sampler)


def _limited(total: int | float, limit: int | float, stage: str) -> int | float:
    if isinstance(limit, bool):
        raise MisconfigurationError(f"limit_{stage}_batches must be an int or a float, got {limit!r}")
    if isinstance(limit, int):
        return min(total, limit)
    if limit == 1.0:
        return total
    if total == math.inf:
        raise MisconfigurationError(
            f"limit_{stage}_batches={limit} is a fraction, but the {stage} dataloader has no length; "
            "pass an int number of batches instead"
        )
    batches = int(total * limit)
    if limit > 0 and batches == 0:
        raise MisconfigurationError(
            f"limit_{stage}_batches={limit} of {total} batches is less than one batch; raise it to at least "
            f"{1 / total:.4f} or pass an int"
        )
    return batches


def as_loader_list(loaders: Any) -> list[Any]:
    """One loader, a list/tuple of loaders, or a dict of loaders -> list."""
    if loaders is None:
        return []
    if isinstance(loaders, (list, tuple)):
        return list(loaders)
    if isinstance(loaders, dict):
        return list(loaders.values())
    return [loaders]
