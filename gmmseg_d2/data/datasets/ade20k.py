"""ADE20K-150 (SceneParsing / ADEChallengeData2016), Detectron2's layout.

::

    $DETECTRON2_DATASETS/ADEChallengeData2016/
        images/{training,validation}/ADE_*.jpg
        annotations/{training,validation}/ADE_*.png            as published: 0 = other, 1..150
        annotations_detectron2/{training,validation}/ADE_*.png written by prepare: 0..149, 255

Registered names (Detectron2's own): ``ade20k_sem_seg_train`` (20,210
images) and ``ade20k_sem_seg_val`` (2,000). Detectron2 registers both when
``detectron2.data`` is imported; gmmseg_d2 keeps that metadata (150
``stuff_classes``, ``ignore_label=255``, ``evaluator_type="sem_seg"``) and
replaces the loader with one that reads ``$DETECTRON2_DATASETS`` when called
and checks the tree before calling Detectron2's ``load_sem_seg``.
"""
from __future__ import annotations

import os
from typing import Dict, List, Optional

import numpy as np

from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.builtin_meta import ADE20K_SEM_SEG_CATEGORIES

from .common import (
    DatasetNotReadyError,
    convert_label_files,
    datasets_root,
    list_stems,
    register_checked,
    refresh_metadata,
    require_complete_conversion,
    require_dir,
)

__all__ = [
    "ADE20K_SPLITS",
    "ADE20K_NUM_CLASSES",
    "ade20k_dir",
    "convert_ade20k_label",
    "prepare_ade20k_sem_seg",
    "load_ade20k_sem_seg",
    "register_all_ade20k",
]

ADE20K_NUM_CLASSES = 150
#: registered name -> folder name of the split
ADE20K_SPLITS: Dict[str, str] = {
    "ade20k_sem_seg_train": "training",
    "ade20k_sem_seg_val": "validation",
}
PREPARE_COMMAND = "python datasets/prepare_ade20k_sem_seg.py"
DOWNLOAD_HINT = (
    "download ADEChallengeData2016.zip from http://sceneparsing.csail.mit.edu/ and unzip it into "
    f"$DETECTRON2_DATASETS, then run {PREPARE_COMMAND}"
)


def ade20k_dir(root: Optional[str] = None) -> str:
    return os.path.join(root if root is not None else datasets_root(), "ADEChallengeData2016")


def convert_ade20k_label(label: np.ndarray, path: str = "<array>") -> np.ndarray:
    """Published ADE20K-150 labels to Detectron2's: 0 (other) -> 255, k -> k - 1.

    Args:
        label: ``(H, W)`` uint8 with values ``0..150``.
    """
    if label.max(initial=0) > ADE20K_NUM_CLASSES:
        raise ValueError(
            f"{path}: value {int(label.max())} is not an ADE20K-150 label (0..150); is this "
            "annotations/ of ADEChallengeData2016, not an already converted annotations_detectron2/?"
        )
    # uint8 arithmetic wraps 0 - 1 to 255, the ignore label.
    return (label.astype(np.uint8) - np.uint8(1)).astype(np.uint8)


def prepare_ade20k_sem_seg(
    root: Optional[str] = None, *, force: bool = False, num_workers: Optional[int] = None
) -> Dict[str, int]:
    """Write ``annotations_detectron2/`` from ``annotations/``; returns files written per split.

    Idempotent: existing outputs are kept unless ``force`` (they are written
    atomically, so an interrupted run is finished by running it again).
    """
    base = ade20k_dir(root)
    written = {}
    for split in ADE20K_SPLITS.values():
        source = os.path.join(base, "annotations", split)
        if not os.path.isdir(source):
            raise FileNotFoundError(f"ADE20K annotations not found at '{os.path.abspath(source)}': {DOWNLOAD_HINT}")
        target = os.path.join(base, "annotations_detectron2", split)
        names = sorted(list_stems(source, (".png",)).values())
        pairs = [(os.path.join(source, n), os.path.join(target, n)) for n in names]
        os.makedirs(target, exist_ok=True)
        written[split] = convert_label_files(pairs, convert_ade20k_label, force=force, num_workers=num_workers)
    return written


def load_ade20k_sem_seg(dataset_name: str, root: str) -> List[dict]:
    """Checked records of one ADE20K split (see the module docstring for the tree)."""
    split = ADE20K_SPLITS[dataset_name]
    base = ade20k_dir(root)
    require_dir(dataset_name, base, "ADEChallengeData2016 not found", DOWNLOAD_HINT)
    image_dir = os.path.join(base, "images", split)
    require_dir(dataset_name, image_dir, f"images/{split} not found", DOWNLOAD_HINT)
    label_dir = os.path.join(base, "annotations_detectron2", split)
    require_dir(dataset_name, label_dir, "annotations_detectron2 not found", f"run {PREPARE_COMMAND}")
    raw_dir = os.path.join(base, "annotations", split)
    if os.path.isdir(raw_dir):
        require_complete_conversion(dataset_name, raw_dir, label_dir, ".png", f"run {PREPARE_COMMAND}")
    labels = list_stems(label_dir, (".png",))
    images = list_stems(image_dir, (".jpg",))
    unpaired = sorted(set(labels) - set(images))
    if not labels or unpaired:
        problem = "no label PNG" if not labels else f"{len(unpaired)} labels without image (e.g. {unpaired[0]})"
        raise DatasetNotReadyError(dataset_name, label_dir, f"half-prepared: {problem}", DOWNLOAD_HINT)
    refresh_metadata(dataset_name, image_root=image_dir, sem_seg_root=label_dir)
    return load_sem_seg(label_dir, image_dir, gt_ext="png", image_ext="jpg")


def register_all_ade20k() -> None:
    """Register (or take over from Detectron2's builtin) both ADE20K-150 splits; reads no file."""
    for dataset_name, split in ADE20K_SPLITS.items():
        base = ade20k_dir()
        register_checked(
            dataset_name,
            load_ade20k_sem_seg,
            dict(
                stuff_classes=list(ADE20K_SEM_SEG_CATEGORIES),
                image_root=os.path.join(base, "images", split),
                sem_seg_root=os.path.join(base, "annotations_detectron2", split),
                evaluator_type="sem_seg",
                ignore_label=255,
            ),
            replace_builtin=True,
        )


register_all_ade20k()
