"""Data loading that resumes exactly where it stopped, mid-epoch included.

A resumed run must see the batches the uninterrupted run would have seen. That needs
three facts, all saved in the checkpoint: the shuffle seed, the epoch, and how many
batches of that epoch the training loop has *taken*. The last one cannot come from
the sampler: a DataLoader with workers draws indices ahead of the loop (prefetch), so
:class:`ResumableDataLoader` counts batches as it hands them to the loop.

::

    loader = ckptstore.ResumableDataLoader(dataset, batch_size=32, shuffle=True, seed=0)
    state = ckptstore.TrainState(model=model, optimizer=opt, dataloader=loader)
    mgr.restore(state)                       # puts the loader back at its epoch and batch
    for epoch in range(loader.epoch, epochs):
        for batch in loader:                 # the rest of this epoch, then the next ones
            ...
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, Dataset, Sampler

from ckptstore.errors import (
    IncompatibleCheckpointError,
    InvalidArgumentError,
)


class ResumableSampler(Sampler[int]):
    """A deterministic order per (seed, epoch), split across ranks, that can start mid-way.

    Like ``DistributedSampler``: with ``world_size`` ranks each rank takes every
    ``world_size``-th index of the epoch's permutation (padded by repetition so every
    rank gets as many, or cut when ``drop_last``).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
    ) -> None:
        if num_samples < 0:
            raise InvalidArgumentError(f"num_samples must be >= 0, got {num_samples}")
        if not 0 <= rank < world_size:
            raise InvalidArgumentError(f"rank {rank} is not in a world of {world_size}")
        self.num_samples = num_samples
        self.shuffle = shuffle
        self.seed = seed
        self.rank = rank
        self.world_size = world_size
        self.drop_last = drop_last
        self.epoch = 0
        self.start = 0  # indices of this rank's share to skip

    def per_rank(self) -> int:
        if self.drop_last:
            return self.num_samples // self.world_size
        return math.ceil(self.num_samples / self.world_size)

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def set_start(self, start: int) -> None:
        self.start = start

    def order(self) -> list[int]:
        """This rank's indices for the current epoch, from the beginning."""
        if self.shuffle:
            g = torch.Generator().manual_seed(self.seed + self.epoch)
            indices = torch.randperm(self.num_samples, generator=g).tolist()
        else:
            indices = list(range(self.num_samples))
        total = self.per_rank() * self.world_size
        if total > len(indices) and indices:
            indices += (indices * math.ceil(total / len(indices)))[: total - len(indices)]
        return indices[:total][self.rank :: self.world_size]

    def __iter__(self) -> Iterator[int]:
        return iter(self.order()[self.start :])

    def __len__(self) -> int:
        return max(0, self.per_rank() - self.start)


class ResumableDataLoader:
    """A ``DataLoader`` over a :class:`ResumableSampler` that knows where the loop is.

    Iterating it yields the rest of the current epoch and then moves to the next epoch.
    ``state_dict()`` records seed, epoch and the batches taken so far in that epoch;
    ``load_state_dict()`` resumes right after the last batch taken. Extra keyword
    arguments (``num_workers``, ``collate_fn``, ``pin_memory``, ...) go to ``DataLoader``.
    """

    def __init__(
        self,
        dataset: Dataset[Any],
        batch_size: int,
        *,
        shuffle: bool = True,
        seed: int = 0,
        drop_last: bool = False,
        rank: int | None = None,
        world_size: int | None = None,
        **loader_kwargs: Any,
    ) -> None:
        if batch_size < 1:
            raise InvalidArgumentError(f"batch_size must be >= 1, got {batch_size}")
        for reserved in ("sampler", "batch_sampler", "shuffle"):
            if reserved in loader_kwargs:
                raise InvalidArgumentError(
                    f"ResumableDataLoader chooses its own {reserved}; do not pass it"
                )
        if rank is None or world_size is None:
            distributed = dist.is_available() and dist.is_initialized()
            rank = dist.get_rank() if distributed else 0
            world_size = dist.get_world_size() if distributed else 1
        self.batch_size = batch_size
        self.sampler = ResumableSampler(
            len(dataset),  # type: ignore[arg-type]
            shuffle=shuffle,
            seed=seed,
            rank=rank,
            world_size=world_size,
            drop_last=drop_last,
        )
        # A generator of its own: without one, every iter(DataLoader) draws its workers'
        # base seed from torch's global generator, so a run resumed mid-epoch (which
        # creates its iterator at another step) would see different random numbers.
        self._generator = torch.Generator()
        self.loader = DataLoader(
            dataset,
            batch_size=batch_size,
            sampler=self.sampler,
            drop_last=drop_last,
            generator=self._generator,
            **loader_kwargs,
        )
        self.epoch = 0
        self.batches_taken = 0  # in the current epoch
        self._drop_last = drop_last

    def batches_per_epoch(self) -> int:
        n = self.sampler.per_rank()
        return n // self.batch_size if self._drop_last else math.ceil(n / self.batch_size)

    def __len__(self) -> int:
        """Batches per epoch, like ``len(DataLoader)`` (see :meth:`remaining` for what is left)."""
        return self.batches_per_epoch()

    def remaining(self) -> int:
        """Batches left in the current epoch."""
        return max(0, self.batches_per_epoch() - self.batches_taken)

    def __iter__(self) -> Iterator[Any]:
        if self.batches_per_epoch() and self.batches_taken >= self.batches_per_epoch():
            # The last iteration handed over the whole epoch but was not run to its end
            # (a loop that stops after len(loader) batches, as Lightning does): this one
            # is the next epoch, not an empty rest of that one.
            self.epoch, self.batches_taken = self.epoch + 1, 0
        self.sampler.set_epoch(self.epoch)
        self.sampler.set_start(self.batches_taken * self.batch_size)
        self._generator.manual_seed(self.sampler.seed * 1_000_003 + self.epoch)  # worker seeds
        for batch in self.loader:
            # Counted when handed over: a checkpoint taken after the loop trained on
            # this batch resumes with the next one.
            self.batches_taken += 1
            yield batch
        self.epoch += 1
        self.batches_taken = 0

    def state_dict(self) -> dict[str, Any]:
        return {
            "epoch": self.epoch,
            "batches_taken": self.batches_taken,
            "seed": self.sampler.seed,
            "batch_size": self.batch_size,
            "num_samples": self.sampler.num_samples,
            "world_size": self.sampler.world_size,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state.get("num_samples") != self.sampler.num_samples:
            raise IncompatibleCheckpointError(
                f"the checkpoint's data loader had {state.get('num_samples')} samples, this one has "
                f"{self.sampler.num_samples}: resuming the data position needs the same dataset"
            )
        self.epoch = int(state["epoch"])
        self.sampler.seed = int(state["seed"])
        taken = int(state["batches_taken"])
        same_split = (
            state.get("batch_size") == self.batch_size
            and state.get("world_size") == self.sampler.world_size
        )
        if not same_split and taken:
            # Another batch size or world size: keep the epoch, restart it from the sample
            # position rounded down (some samples of this epoch are seen twice).
            samples = taken * int(state["batch_size"]) * int(state["world_size"])
            taken = samples // (self.batch_size * self.sampler.world_size)
        if taken >= self.batches_per_epoch():  # saved right at the end of an epoch
            self.epoch, taken = self.epoch + 1, 0
        self.batches_taken = taken
