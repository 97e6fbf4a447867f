"""DataLoaders whose order depends only on the seed and the epoch, so a resumed run draws the same."""

from __future__ import annotations

import random
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, default_collate

from densenet.data.datasets import GatheredBatch, InMemoryImages
from densenet.runtime import SEED_STRIDE


class EpochSampler(Sampler[int]):
    """A permutation drawn from ``seed + epoch`` (or the identity): the same order on resume.

    ``num_replicas``/``rank`` give each DDP process its strided share: rank ``r`` of ``W`` takes
    ``order[r::W]``, so a per-rank batch of ``B/W`` is the strided share of the global batch of
    ``B`` that one process would draw, whatever ``W`` is. Shuffled (training) shares are cut to
    equal length, as every rank must take the same number of steps; ordered (evaluation) shares
    are uneven and cover each sample exactly once.
    """

    def __init__(
        self, size: int, shuffle: bool, seed: int = 0, num_replicas: int = 1, rank: int = 0
    ) -> None:
        self.size, self.shuffle, self.seed = size, shuffle, seed
        self.num_replicas, self.rank = num_replicas, rank
        self.epoch = 0
        self.start = 0  # samples of this epoch already consumed (a run resumed mid-epoch)

    def set_epoch(self, epoch: int, start: int = 0) -> None:
        self.epoch, self.start = epoch, start

    def _total(self) -> int:
        if self.shuffle:
            return self.size // self.num_replicas * self.num_replicas
        return self.size

    def __len__(self) -> int:
        return len(range(self.rank, self._total(), self.num_replicas)) - self.start

    def __iter__(self):
        if self.shuffle:
            generator = torch.Generator().manual_seed(self.seed + self.epoch)
            order = torch.randperm(self.size, generator=generator).tolist()
        else:
            order = list(range(self.size))
        return iter(order[self.rank : self._total() : self.num_replicas][self.start :])


def _collate(samples: Any) -> Any:
    """A batch :class:`InMemoryImages` gathered itself passes through; others are collated."""
    return tuple(samples) if isinstance(samples, GatheredBatch) else default_collate(samples)


def build_loader(
    dataset: Dataset,
    batch_size: int,
    train: bool,
    workers: int = 0,
    seed: int = 0,
    device: str | torch.device = "cpu",
    drop_last: bool | None = None,
    num_replicas: int = 1,
    rank: int = 0,
) -> DataLoader:
    """A DataLoader whose order depends only on ``seed`` and the epoch (:func:`set_epoch`).

    In-memory datasets without a per-image transform are served as whole uint8 batches in the
    main process (indexing a tensor is faster than any worker); file datasets decode in
    ``workers`` processes. Memory is pinned when training on CUDA.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    sampler = EpochSampler(len(dataset), train, seed, num_replicas, rank)
    batched = isinstance(dataset, InMemoryImages) and dataset.transform is None
    workers = 0 if batched else workers
    return DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        collate_fn=_collate,
        pin_memory=torch.device(device).type == "cuda",
        drop_last=train if drop_last is None else drop_last,
        # Fresh workers each epoch take their seeds from the generator reseeded by set_epoch,
        # so a resumed run augments exactly like an uninterrupted one.
        persistent_workers=False,
        worker_init_fn=_seed_worker if workers > 0 else None,
        generator=torch.Generator().manual_seed(seed),
    )


def _seed_worker(worker_id: int) -> None:
    # Per-image augmentation in workers draws from torch's per-worker seed; numpy and random too.
    seed = torch.initial_seed() % 2**32
    np.random.seed(seed)
    random.seed(seed)


def set_epoch(loader: DataLoader, epoch: int, start_batch: int = 0) -> None:
    """Make ``loader``'s next pass use epoch ``epoch``'s order, from batch ``start_batch`` on."""
    sampler = loader.sampler
    if isinstance(sampler, EpochSampler):
        sampler.set_epoch(epoch, start_batch * (loader.batch_size or 1))
    if loader.generator is not None:
        # Worker seeds come from this generator: reseed so a resumed epoch draws the same.
        loader.generator.manual_seed(getattr(sampler, "seed", 0) * SEED_STRIDE + epoch)
