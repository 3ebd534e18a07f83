"""Bit-exact ``--resume``: a data stream and RNG streams that are functions of the iteration.

Detectron2's :class:`~detectron2.data.samplers.TrainingSampler` restarts its
infinite index stream from its seed when a run resumes, the augmentations draw
from whatever state the global (or worker) RNGs happen to be in, and dropout
draws from the main process's torch RNG. A resumed run therefore sees other
batches and other random numbers than the uninterrupted run would have.

Here every random quantity of training is a pure function of
``(seed, iteration)`` (plus the rank or the sample position), so resuming at
iteration ``i`` needs nothing but ``seed`` and ``i``, both in the checkpoint:

* :class:`~gmmseg_d2.data.training_stream.ResumableTrainingStream` is the
  training data: the ``k``-th sample of its infinite stream is a pure function
  of ``(seed, k)``, independent of the number of ranks and of
  ``DATALOADER.NUM_WORKERS`` (details in :mod:`gmmseg_d2.data.training_stream`,
  where it lives, next to the data).
* :class:`IterationSeedHook` reseeds ``random``, ``numpy`` and ``torch`` (all
  devices) before every step from ``(seed, rank, iteration)``, so dropout and
  any other randomness inside the step does not depend on the steps before.
  Its ``state_dict`` (checkpointed with the trainer) holds ``seed``; loading it
  also reseeds the data stream, which matters when ``cfg.SEED < 0`` drew a
  random seed.

What is *not* covered: ``DATALOADER.ASPECT_RATIO_GROUPING`` (batches are
consecutive stream samples; the models pad a batch to a common size anyway),
other ``DATALOADER.SAMPLER_TRAIN`` choices (the trainer falls back to
Detectron2's loader, which is not resumable exactly), and nondeterministic
kernels (set ``torch.use_deterministic_algorithms`` / cuDNN flags for GPU runs;
CPU kernels are deterministic for a fixed thread count).

``ResumableTrainingStream``, ``find_stream``, ``derive_seeds`` and
``seeded_global_rngs`` are still importable from here.
"""
from __future__ import annotations

import logging
import random
from typing import Optional

import numpy as np
import torch

from detectron2.engine import HookBase
from detectron2.utils import comm

from ..data.training_stream import (  # noqa: F401  (re-exported: their former home)
    _STEP,
    ResumableTrainingStream,
    derive_seeds,
    find_stream,
    seeded_global_rngs,
)

__all__ = ["ResumableTrainingStream", "IterationSeedHook", "derive_seeds", "find_stream", "seeded_global_rngs"]


def _seed_all(seeds: tuple) -> None:
    random.seed(seeds[0])
    np.random.seed(seeds[1])
    torch.manual_seed(seeds[2])  # also seeds every CUDA device (lazily)


class IterationSeedHook(HookBase):
    """Reseed the global RNGs before each step from ``(seed, rank, iteration)``; checkpointable.

    Args:
        seed: base seed shared by all ranks.
        stream: the training stream to keep on the same seed when a
            checkpoint's seed is loaded (optional).
    """

    def __init__(self, seed: int, stream: Optional[ResumableTrainingStream] = None) -> None:
        self.seed = int(seed)
        self._stream = stream

    def before_step(self) -> None:
        _seed_all(derive_seeds(self.seed, _STEP, comm.get_rank(), self.trainer.iter))

    def state_dict(self) -> dict:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict) -> None:
        seed = int(state_dict["seed"])
        if seed != self.seed:
            logging.getLogger(__name__).info(f"Resuming with the checkpoint's training seed {seed} "
                                             f"(this run's would be {self.seed})")
        self.seed = seed
        if self._stream is not None:
            self._stream.seed = seed
