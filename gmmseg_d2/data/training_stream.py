"""The training data of bit-exact ``--resume``: a data stream that is a function of the iteration.

Detectron2's :class:`~detectron2.data.samplers.TrainingSampler` restarts its
infinite index stream from its seed when a run resumes, and the augmentations
draw from whatever state the global (or worker) RNGs happen to be in, so a
resumed run sees other batches than the uninterrupted run would have. Here
every sample is a pure function of ``(seed, position)``:

* :class:`ResumableTrainingStream` is the training data. The ``k``-th sample
  of the infinite stream (``k = iteration * total_batch_size + rank *
  per_rank_batch + j``) is ``dataset[perm_e[k mod n]]`` with ``e = k div n``
  and ``perm_e`` a permutation seeded by ``(seed, e)``, mapped with
  ``random``/``numpy``/``torch`` seeded by ``(seed, k)`` (the global RNG states
  are saved and restored around the mapper, so mapping in the main process
  leaves the training RNGs alone). A stream started at ``start_iteration``
  simply begins at its first sample; nothing is replayed or skipped by
  iterating. The stream is independent of the number of ranks (the global
  batch of an iteration is the same for any world size, split into contiguous
  per-rank chunks in rank order) and of ``DATALOADER.NUM_WORKERS``: worker
  ``w`` of ``W`` produces the batches of iterations ``start + w, start + w +
  W, ...`` and PyTorch's in-order round-robin over workers hands them out in
  iteration order.

:class:`~gmmseg_d2.engine.resumable.IterationSeedHook` makes the rest of a
training step a function of the iteration as well.
"""
from __future__ import annotations

import random
from contextlib import contextmanager
from typing import Callable, Optional, Sequence

import numpy as np
import torch
from torch.utils import data as torchdata

from detectron2.data.common import DatasetFromList
from detectron2.utils import comm

__all__ = ["ResumableTrainingStream", "derive_seeds", "find_stream", "seeded_global_rngs"]

# Domain tags, so the stream's sample seeds and the step seeds never coincide.
_PERMUTATION, _SAMPLE, _STEP, _LOADER = 0, 1, 2, 3
# Attempts at another (seeded) index when the mapper returns None.
_MAX_MAPPER_RETRIES = 100


def derive_seeds(*key: int) -> tuple:
    """Three independent seeds ``(python, numpy, torch)`` from a key of non-negative ints."""
    state = np.random.SeedSequence([int(k) for k in key]).generate_state(3, dtype=np.uint32)
    return int(state[0]), int(state[1]), int(state[2])


@contextmanager
def seeded_global_rngs(seeds: tuple):
    """Run a block with ``random``/``numpy``/``torch`` (CPU) seeded, then restore their states."""
    saved = random.getstate(), np.random.get_state(), torch.get_rng_state()
    try:
        random.seed(seeds[0])
        np.random.seed(seeds[1])
        # CPU generator only: torch.manual_seed would also reseed the CUDA
        # generators, which this block does not restore.
        torch.random.default_generator.manual_seed(seeds[2])
        yield
    finally:
        random.setstate(saved[0])
        np.random.set_state(saved[1])
        torch.set_rng_state(saved[2])


class ResumableTrainingStream(torchdata.IterableDataset):
    """Infinite, shuffled, mapped training samples of this rank, starting at an iteration.

    Use it through :meth:`build_loader`; set :attr:`start_iteration` (and, when
    resuming, :attr:`seed`) before the loader's first ``iter()``, since
    DataLoader workers receive a copy of the stream at that moment.

    Args:
        dataset: dataset dicts (a list is wrapped in a serialized
            :class:`~detectron2.data.common.DatasetFromList`) or a map-style dataset.
        mapper: callable ``dict -> dict`` (``None`` from it means "take another sample").
        total_batch_size: images per iteration over all ranks.
        seed: seed of the permutations and of the per-sample RNGs.
        shuffle: ``False`` walks the dataset in order every epoch.
    """

    def __init__(self, dataset, mapper: Callable, total_batch_size: int, *, seed: int,
                 shuffle: bool = True) -> None:
        if isinstance(dataset, list):
            dataset = DatasetFromList(dataset, copy=False)
        if len(dataset) == 0:
            raise ValueError("ResumableTrainingStream needs a non-empty dataset")
        world_size = comm.get_world_size()
        if total_batch_size <= 0 or total_batch_size % world_size != 0:
            raise ValueError(f"Total batch size ({total_batch_size}) must be a positive multiple "
                             f"of the number of processes ({world_size})")
        self.dataset = dataset
        self.mapper = mapper
        self.total_batch_size = total_batch_size
        self.batch_size = total_batch_size // world_size
        self.rank = comm.get_rank()
        self.seed = int(seed)
        self.shuffle = shuffle
        self.start_iteration = 0
        self._cached_epoch: Optional[int] = None
        self._cached_order: Optional[Sequence[int]] = None

    # ------------------------------------------------------------ positions

    def _order(self, epoch: int) -> Sequence[int]:
        if self._cached_epoch != epoch:
            n = len(self.dataset)
            if self.shuffle:
                rng = np.random.default_rng(np.random.SeedSequence([self.seed, _PERMUTATION, epoch]))
                self._cached_order = rng.permutation(n).tolist()
            else:
                self._cached_order = list(range(n))
            self._cached_epoch = epoch
        return self._cached_order

    def index_at(self, position: int) -> int:
        """Dataset index of the ``position``-th sample of the infinite stream."""
        epoch, offset = divmod(position, len(self.dataset))
        return self._order(epoch)[offset]

    def positions(self, iteration: int) -> range:
        """Stream positions of this rank's samples at ``iteration``."""
        first = iteration * self.total_batch_size + self.rank * self.batch_size
        return range(first, first + self.batch_size)

    def sample(self, position: int):
        """The mapped ``position``-th sample; a pure function of ``(seed, position)``."""
        seeds = derive_seeds(self.seed, _SAMPLE, position)
        index = self.index_at(position)
        with seeded_global_rngs(seeds):
            retry = random.Random(seeds[0] ^ 0x5EED)
            for _ in range(_MAX_MAPPER_RETRIES):
                mapped = self.mapper(self.dataset[index])
                if mapped is not None:
                    return mapped
                index = retry.randrange(len(self.dataset))
        raise RuntimeError(f"The mapper returned None for {_MAX_MAPPER_RETRIES} samples in a row "
                           f"(stream position {position})")

    # ------------------------------------------------------------ iteration

    def __iter__(self):
        info = torchdata.get_worker_info()
        worker_id, num_workers = (0, 1) if info is None else (info.id, info.num_workers)
        iteration = self.start_iteration + worker_id
        while True:
            for position in self.positions(iteration):
                yield self.sample(position)
            iteration += num_workers

    def build_loader(self, num_workers: int = 0) -> torchdata.DataLoader:
        """A DataLoader yielding this rank's batch (a list of dicts) of each iteration, in order."""
        # An own generator: without one, creating the loader's iterator (lazily,
        # inside the first training step) would draw its base seed from the
        # global torch RNG, shifting dropout at the first step of a resumed run.
        generator = torch.Generator()
        generator.manual_seed(derive_seeds(self.seed, _LOADER)[2])
        return torchdata.DataLoader(
            self, batch_size=self.batch_size, num_workers=num_workers,
            collate_fn=_trivial_batch_collator, drop_last=True, generator=generator,
        )


def _trivial_batch_collator(batch):
    return batch


def find_stream(data_loader) -> Optional[ResumableTrainingStream]:
    """The :class:`ResumableTrainingStream` behind a loader built by :meth:`~ResumableTrainingStream.build_loader`."""
    dataset = getattr(data_loader, "dataset", None)
    return dataset if isinstance(dataset, ResumableTrainingStream) else None
