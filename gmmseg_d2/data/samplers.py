"""Class-balanced image sampling for semantic-segmentation training.

Two rules, both functions of which classes each training image contains
(its *class presence*, read once from the label maps and cached):

* ``DATALOADER.SAMPLER_TRAIN = "ClassBalancedTrainingSampler"`` -- the rule of
  the official GMMSeg code (its ``BatchBalanceClassSampler``, used for
  COCO-Stuff): draw a class uniformly, then an image containing it
  uniformly. An image's probability is therefore

      P(i) = 1/|C+| * sum over classes c in image i of 1/n_c

  with ``n_c`` the number of training images containing ``c`` and ``C+`` the
  classes present in at least one image (the official code draws from all
  classes and fails on an absent one; absent classes are skipped here, with
  a warning). Images dominated by rare classes are drawn most.
* ``DATALOADER.SAMPLER_TRAIN = "RepeatFactorTrainingSampler"`` -- Detectron2's
  rule (LVIS), driven by the rarest class an image contains: with ``f_c``
  the fraction of training images containing ``c`` and
  ``t = DATALOADER.REPEAT_THRESHOLD``, ``r_c = max(1, sqrt(t / f_c))``
  (``t / f_c`` with ``DATALOADER.REPEAT_SQRT`` false), the image weight is
  ``r_i = max over c in image i of r_c`` (1 for an image with no class), and
  ``P(i) = r_i / sum_j r_j``. Detectron2 computes ``f_c`` from instance
  annotations, which semantic-segmentation records do not have; here it
  comes from the label maps.

Samples are drawn independently from ``P`` (in expectation the same mix as
Detectron2's per-epoch repeats), each stream position from its own seed, so
the weighted stream is as resumable and as independent of the number of
ranks and workers as the default one (:mod:`gmmseg_d2.data.training_stream`).
"""
from __future__ import annotations

import hashlib
import json
import logging
import os
from typing import List, Optional, Sequence

import numpy as np
from torch.utils.data import Sampler

from detectron2.config import CfgNode
from detectron2.utils import comm

from .training_stream import ResumableTrainingStream
from .datasets.common import read_label_png, run_jobs

__all__ = [
    "WEIGHTED_SAMPLERS",
    "class_presence",
    "load_or_compute_class_presence",
    "class_balanced_probabilities",
    "repeat_factor_probabilities",
    "draw_index",
    "WeightedTrainingStream",
    "WeightedTrainingSampler",
    "build_weighted_training_stream",
]

logger = logging.getLogger(__name__)

#: ``DATALOADER.SAMPLER_TRAIN`` values handled here.
WEIGHTED_SAMPLERS = ("ClassBalancedTrainingSampler", "RepeatFactorTrainingSampler")
# Domain tag of the draws, distinct from the stream's own seed domains (0..3).
_WEIGHTED_DRAW = 17


# ---------------------------------------------------------------------------
# Class presence
# ---------------------------------------------------------------------------


def class_presence(
    label_files: Sequence[str], num_classes: int, ignore_label: int, *, num_workers: Optional[int] = 1
) -> np.ndarray:
    """Which classes each label map contains.

    Args:
        label_files: ``N`` label PNGs with values in ``0..num_classes-1`` or ``ignore_label``.
        num_classes: ``C``.
        ignore_label: the value that counts as no class.
        num_workers: reader threads.

    Returns:
        ``(N, C)`` bool array. Raises ``ValueError`` naming the file for any
        other value (a wrong ``NUM_CLASSES`` or an unconverted label map).
    """

    def present(path: str) -> np.ndarray:
        counts = np.bincount(read_label_png(path).ravel(), minlength=256)
        counts[ignore_label] = 0
        if counts[num_classes:].any():
            bad = np.flatnonzero(counts[num_classes:]) + num_classes
            raise ValueError(f"{path} contains value(s) {bad.tolist()}: labels must be 0..{num_classes - 1} "
                             f"or {ignore_label} (ignored); check NUM_CLASSES and that the dataset is prepared")
        return counts[:num_classes] > 0

    rows = run_jobs(list(label_files), present, num_workers)
    return np.stack(rows) if rows else np.zeros((0, num_classes), dtype=bool)


def _presence_digest(label_files: Sequence[str], num_classes: int, ignore_label: int) -> str:
    """Digest of the inputs (paths, sizes, modification times, label set) of a presence matrix."""
    digest = hashlib.sha256(json.dumps([num_classes, ignore_label]).encode())
    for path in label_files:
        stat = os.stat(path)
        digest.update(f"{path}\0{stat.st_size}\0{stat.st_mtime_ns}\n".encode())
    return digest.hexdigest()[:20]


def load_or_compute_class_presence(
    label_files: Sequence[str], num_classes: int, ignore_label: int, cache_dir: Optional[str], *,
    num_workers: Optional[int] = 1,
) -> np.ndarray:
    """:func:`class_presence`, cached in ``cache_dir`` under a digest of its inputs.

    In a distributed run the first process of each machine computes (or
    loads) the matrix and writes the cache; the others wait and read it.
    Reading every label map of COCO-Stuff-164k takes minutes, so a resumed
    run reuses the cache.
    """
    if cache_dir is None:
        return class_presence(label_files, num_classes, ignore_label, num_workers=num_workers)
    path = os.path.join(cache_dir, f"class_presence_{_presence_digest(label_files, num_classes, ignore_label)}.npz")
    if comm.get_local_rank() == 0 and not os.path.isfile(path):
        presence = class_presence(label_files, num_classes, ignore_label, num_workers=num_workers)
        os.makedirs(cache_dir, exist_ok=True)
        partial = f"{path}.partial-{os.getpid()}.npz"
        np.savez_compressed(partial, packed=np.packbits(presence, axis=1), shape=np.array(presence.shape))
        os.replace(partial, path)
    comm.synchronize()
    with np.load(path) as cached:
        rows, cols = cached["shape"].tolist()
        return np.unpackbits(cached["packed"], axis=1, count=cols).astype(bool).reshape(rows, cols)


# ---------------------------------------------------------------------------
# Sampling rules
# ---------------------------------------------------------------------------


def class_balanced_probabilities(presence: np.ndarray, class_names: Optional[Sequence[str]] = None) -> np.ndarray:
    """Per-image probabilities of the official GMMSeg rule (uniform class, then uniform image).

    Args:
        presence: ``(N, C)`` bool, see :func:`class_presence`.
        class_names: for the warning about classes no image contains.

    Returns:
        ``(N,)`` float64 summing to 1.
    """
    presence = np.asarray(presence, dtype=bool)
    images_per_class = presence.sum(axis=0)
    present = images_per_class > 0
    if not present.any():
        raise ValueError("class-balanced sampling: no training image contains any class")
    if not present.all():
        absent = np.flatnonzero(~present)
        names = [class_names[c] for c in absent] if class_names is not None else absent.tolist()
        logger.warning(f"class-balanced sampling: {absent.size} class(es) occur in no training image and are "
                       f"never drawn: {names[:10]}{' ...' if absent.size > 10 else ''}")
    weight_per_class = np.where(present, 1.0 / np.maximum(images_per_class, 1), 0.0) / present.sum()
    return presence.astype(np.float64) @ weight_per_class


def repeat_factor_probabilities(presence: np.ndarray, repeat_threshold: float, sqrt: bool = True) -> np.ndarray:
    """Per-image probabilities of Detectron2's repeat-factor rule (rarest class decides).

    Args:
        presence: ``(N, C)`` bool, see :func:`class_presence`.
        repeat_threshold: ``t``; classes in fewer than this fraction of images are boosted.
        sqrt: ``r_c = max(1, sqrt(t / f_c))`` if true, else ``max(1, t / f_c)``.

    Returns:
        ``(N,)`` float64 summing to 1.
    """
    if repeat_threshold <= 0:
        raise ValueError(
            f"DATALOADER.REPEAT_THRESHOLD must be > 0 for RepeatFactorTrainingSampler (got {repeat_threshold}); "
            "classes present in fewer than that fraction of training images are oversampled, e.g. 0.01")
    presence = np.asarray(presence, dtype=bool)
    frequency = presence.mean(axis=0)
    ratio = np.divide(repeat_threshold, frequency, out=np.zeros_like(frequency), where=frequency > 0)
    class_factor = np.maximum(1.0, np.sqrt(ratio) if sqrt else ratio)
    image_factor = np.where(presence, class_factor[None, :], 1.0).max(axis=1, initial=1.0)
    return image_factor / image_factor.sum()


def draw_index(cumulative: np.ndarray, seed: int, position: int) -> int:
    """Index drawn from the distribution with cumulative sums ``cumulative``; a pure function of its inputs."""
    generator = np.random.default_rng(np.random.SeedSequence([int(seed), _WEIGHTED_DRAW, int(position)]))
    # side="right": the first index whose cumulative sum exceeds the draw, so an
    # index of probability 0 (equal neighbouring sums) is never returned.
    index = int(np.searchsorted(cumulative, generator.random() * cumulative[-1], side="right"))
    return min(index, cumulative.size - 1)


class WeightedTrainingStream(ResumableTrainingStream):
    """:class:`~gmmseg_d2.data.training_stream.ResumableTrainingStream` drawing images from per-image probabilities.

    The ``k``-th sample of the stream is image :func:`draw_index` ``(seed, k)``:
    independent draws, each a pure function of the seed and the position, so
    resuming, the world size and the number of workers change nothing.

    Args:
        dataset, mapper, total_batch_size, seed: as for the base class.
        probabilities: ``(N,)`` non-negative, one per dataset record (normalised here).
    """

    def __init__(self, dataset, mapper, total_batch_size: int, *, seed: int, probabilities: np.ndarray) -> None:
        super().__init__(dataset, mapper, total_batch_size, seed=seed, shuffle=True)
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.shape != (len(self.dataset),):
            raise ValueError(f"need one probability per image ({len(self.dataset)}), got shape {probabilities.shape}")
        if not np.isfinite(probabilities).all() or (probabilities < 0).any() or probabilities.sum() <= 0:
            raise ValueError("sampling probabilities must be finite, non-negative and not all zero")
        self.probabilities = probabilities / probabilities.sum()
        self._cumulative = np.cumsum(self.probabilities)

    def index_at(self, position: int) -> int:
        return draw_index(self._cumulative, self.seed, position)


class WeightedTrainingSampler(Sampler):
    """Infinite weighted index sampler for Detectron2's ``build_detection_train_loader(sampler=...)``.

    Rank ``r`` of ``W`` yields the draws of stream positions ``r, r + W, r + 2W, ...``
    (the sharding of Detectron2's ``TrainingSampler``).
    """

    def __init__(self, probabilities: np.ndarray, seed: Optional[int] = None) -> None:
        probabilities = np.asarray(probabilities, dtype=np.float64)
        if probabilities.ndim != 1 or probabilities.sum() <= 0 or (probabilities < 0).any():
            raise ValueError("probabilities must be a non-negative (N,) vector, not all zero")
        self._cumulative = np.cumsum(probabilities / probabilities.sum())
        self._seed = int(comm.shared_random_seed() if seed is None else seed)
        self._rank, self._world_size = comm.get_rank(), comm.get_world_size()

    def __iter__(self):
        position = self._rank
        while True:
            yield draw_index(self._cumulative, self._seed, position)
            position += self._world_size


def build_weighted_training_stream(
    cfg: CfgNode, dataset_dicts: List[dict], mapper, seed: int
) -> WeightedTrainingStream:
    """The training stream of ``cfg.DATALOADER.SAMPLER_TRAIN`` in :data:`WEIGHTED_SAMPLERS`.

    Class presence is read with ``DATALOADER.NUM_WORKERS`` threads and cached
    under ``OUTPUT_DIR/class_presence``; classes are
    ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` with ``IGNORE_VALUE`` ignored.
    """
    name = cfg.DATALOADER.SAMPLER_TRAIN
    if name not in WEIGHTED_SAMPLERS:
        raise ValueError(f"DATALOADER.SAMPLER_TRAIN {name!r} is not one of {WEIGHTED_SAMPLERS}")
    missing = [i for i, d in enumerate(dataset_dicts) if "sem_seg_file_name" not in d]
    if missing:
        raise ValueError(f"{name} needs semantic labels: record {missing[0]} has no 'sem_seg_file_name'")
    num_classes = int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    presence = load_or_compute_class_presence(
        [d["sem_seg_file_name"] for d in dataset_dicts], num_classes, int(cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE),
        os.path.join(cfg.OUTPUT_DIR, "class_presence"), num_workers=max(1, cfg.DATALOADER.NUM_WORKERS))
    if name == "ClassBalancedTrainingSampler":
        probabilities = class_balanced_probabilities(presence)
    else:
        probabilities = repeat_factor_probabilities(presence, float(cfg.DATALOADER.REPEAT_THRESHOLD),
                                                    bool(cfg.DATALOADER.REPEAT_SQRT))
    uniform = 1.0 / len(probabilities)
    logger.info(f"{name}: {len(probabilities)} images, probability relative to uniform "
                f"min {probabilities.min() / uniform:.3g} / max {probabilities.max() / uniform:.3g}; "
                f"{int((probabilities == 0).sum())} images never drawn")
    return WeightedTrainingStream(dataset_dicts, mapper, cfg.SOLVER.IMS_PER_BATCH, seed=seed,
                                  probabilities=probabilities)
