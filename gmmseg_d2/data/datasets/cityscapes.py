"""Cityscapes fine semantic segmentation (19 train IDs), Detectron2's layout.

::

    $DETECTRON2_DATASETS/cityscapes/
        leftImg8bit/{train,val,test}/<city>/<city>_<seq>_<frame>_leftImg8bit.png
        gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_{labelIds,instanceIds,color}.png
        gtFine/{train,val,test}/<city>/<city>_<seq>_<frame>_gtFine_polygons.json
        gtFine/.../*_gtFine_labelTrainIds.png      written by prepare: 0..18, 255

Registered names (Detectron2's own): ``cityscapes_fine_sem_seg_train`` (2,975
images) and ``cityscapes_fine_sem_seg_val`` (500). As for ADE20K, Detectron2's
metadata is kept (``evaluator_type="cityscapes_sem_seg"``, 19
``stuff_classes``, ``ignore_label=255``, ``gt_dir``) and completed with
``stuff_colors``; the loader is the checked one, ending in Detectron2's
``load_cityscapes_semantic``.

``labelTrainIds`` come from ``prepare_cityscapes_sem_seg.py`` (a lookup on
``labelIds``; it needs no cityscapesscripts) or from cityscapesscripts'
``createTrainIdLabelImgs`` (rasterises the polygons with train IDs): for the
fine annotations both give the same maps.

Evaluation lives in :mod:`gmmseg_d2.evaluation.cityscapes_evaluation`
(:func:`~gmmseg_d2.evaluation.build_cityscapes_sem_seg_evaluator`); its names
stay importable from this module, which used to hold them.
"""
from __future__ import annotations

import logging
import os
from typing import Dict, List, Optional

import numpy as np

from detectron2.data.datasets.cityscapes import load_cityscapes_semantic
from detectron2.data.datasets.builtin_meta import _get_builtin_metadata

from .common import (
    DatasetNotReadyError,
    convert_label_files,
    datasets_root,
    lookup_table,
    register_checked,
    refresh_metadata,
    require_dir,
)

__all__ = [
    "CITYSCAPES_CLASSES",
    "CITYSCAPES_COLORS",
    "CITYSCAPES_LABEL_ID_TO_TRAIN_ID",
    "CITYSCAPES_SPLITS",
    "cityscapes_dir",
    "cityscapes_metadata",
    "convert_cityscapes_label",
    "prepare_cityscapes_sem_seg",
    "load_cityscapes_fine_sem_seg",
    "register_all_cityscapes",
]

logger = logging.getLogger(__name__)

#: Names that moved to gmmseg_d2.evaluation.cityscapes_evaluation (see ``__getattr__``).
_MOVED_TO_EVALUATION = ("CityscapesSemSegEvaluatorNumpy2", "build_cityscapes_sem_seg_evaluator",
                        "cityscapesscripts_available")


def __getattr__(name: str):
    """Old import path of the Cityscapes evaluator, resolved lazily (data does not import evaluation)."""
    if name in _MOVED_TO_EVALUATION:
        from ...evaluation import cityscapes_evaluation

        return getattr(cityscapes_evaluation, name)
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

#: The 19 evaluated classes, in train-ID order (Detectron2's builtin metadata).
CITYSCAPES_CLASSES: List[str] = list(_get_builtin_metadata("cityscapes")["stuff_classes"])
#: The official Cityscapes palette of those classes.
CITYSCAPES_COLORS: List[List[int]] = [
    [128, 64, 128], [244, 35, 232], [70, 70, 70], [102, 102, 156], [190, 153, 153],
    [153, 153, 153], [250, 170, 30], [220, 220, 0], [107, 142, 35], [152, 251, 152],
    [70, 130, 180], [220, 20, 60], [255, 0, 0], [0, 0, 142], [0, 0, 70],
    [0, 60, 100], [0, 80, 100], [0, 0, 230], [119, 11, 32],
]
#: labelIds value -> train ID for the 19 evaluated classes; every other id
#: (unlabeled, ego vehicle, ..., parking, rail track, guard rail, bridge,
#: tunnel, polegroup, caravan, trailer) is ignored (255).
CITYSCAPES_LABEL_ID_TO_TRAIN_ID: Dict[int, int] = {
    7: 0, 8: 1, 11: 2, 12: 3, 13: 4, 17: 5, 19: 6, 20: 7, 21: 8, 22: 9,
    23: 10, 24: 11, 25: 12, 26: 13, 27: 14, 28: 15, 31: 16, 32: 17, 33: 18,
}
_TRAIN_ID_TABLE = lookup_table(CITYSCAPES_LABEL_ID_TO_TRAIN_ID)
#: registered name -> split folder
CITYSCAPES_SPLITS: Dict[str, str] = {
    "cityscapes_fine_sem_seg_train": "train",
    "cityscapes_fine_sem_seg_val": "val",
}
LABEL_IDS_SUFFIX = "_gtFine_labelIds.png"
TRAIN_IDS_SUFFIX = "_gtFine_labelTrainIds.png"
IMAGE_SUFFIX = "_leftImg8bit.png"
PREPARE_COMMAND = "python datasets/prepare_cityscapes_sem_seg.py"
DOWNLOAD_HINT = (
    "download gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip from "
    "https://www.cityscapes-dataset.com/downloads/, unzip both into $DETECTRON2_DATASETS/cityscapes, "
    f"then run {PREPARE_COMMAND}"
)


def cityscapes_dir(root: Optional[str] = None) -> str:
    return os.path.join(root if root is not None else datasets_root(), "cityscapes")


def cityscapes_metadata() -> dict:
    """Class names, colours and ignore label of a model trained on Cityscapes' 19 classes."""
    return dict(stuff_classes=list(CITYSCAPES_CLASSES), stuff_colors=[list(c) for c in CITYSCAPES_COLORS],
                ignore_label=255)


def convert_cityscapes_label(label: np.ndarray, path: str = "<array>") -> np.ndarray:
    """``(H, W)`` labelIds to train IDs (0..18, 255 = ignored)."""
    del path  # every uint8 value has a train ID (unknown ids are ignored)
    return _TRAIN_ID_TABLE[label]


def _walk_split(gt_dir: str, suffix: str) -> Dict[str, str]:
    """``{frame id: path}`` of ``gt_dir/<city>/<frame id><suffix>``."""
    found = {}
    for city in sorted(os.listdir(gt_dir)):
        city_dir = os.path.join(gt_dir, city)
        if not os.path.isdir(city_dir):
            continue
        for name in os.listdir(city_dir):
            if name.endswith(suffix):
                found[name[: -len(suffix)]] = os.path.join(city_dir, name)
    return found


def prepare_cityscapes_sem_seg(
    root: Optional[str] = None, *, force: bool = False, num_workers: Optional[int] = None
) -> Dict[str, int]:
    """Write ``*_gtFine_labelTrainIds.png`` next to every ``*_gtFine_labelIds.png``.

    Covers every split folder present under ``gtFine/``. Returns files written
    per split; existing outputs are kept unless ``force``.
    """
    gt_root = os.path.join(cityscapes_dir(root), "gtFine")
    if not os.path.isdir(gt_root):
        raise FileNotFoundError(f"Cityscapes gtFine not found at '{os.path.abspath(gt_root)}': {DOWNLOAD_HINT}")
    written = {}
    for split in sorted(os.listdir(gt_root)):
        split_dir = os.path.join(gt_root, split)
        if not os.path.isdir(split_dir):
            continue
        sources = _walk_split(split_dir, LABEL_IDS_SUFFIX)
        pairs = [(path, path[: -len(LABEL_IDS_SUFFIX)] + TRAIN_IDS_SUFFIX) for _, path in sorted(sources.items())]
        written[split] = convert_label_files(pairs, convert_cityscapes_label, force=force, num_workers=num_workers)
    if not written:
        raise FileNotFoundError(f"no split folder under '{os.path.abspath(gt_root)}': {DOWNLOAD_HINT}")
    return written


def load_cityscapes_fine_sem_seg(dataset_name: str, root: str) -> List[dict]:
    """Checked records of one Cityscapes split (train-ID labels)."""
    split = CITYSCAPES_SPLITS[dataset_name]
    base = cityscapes_dir(root)
    require_dir(dataset_name, base, "cityscapes/ not found", DOWNLOAD_HINT)
    image_dir = os.path.join(base, "leftImg8bit", split)
    gt_dir = os.path.join(base, "gtFine", split)
    require_dir(dataset_name, image_dir, f"leftImg8bit/{split} not found", DOWNLOAD_HINT)
    require_dir(dataset_name, gt_dir, f"gtFine/{split} not found", DOWNLOAD_HINT)
    images = _walk_split(image_dir, IMAGE_SUFFIX)
    label_ids = _walk_split(gt_dir, LABEL_IDS_SUFFIX)
    train_ids = _walk_split(gt_dir, TRAIN_IDS_SUFFIX)
    if not images:
        raise DatasetNotReadyError(dataset_name, image_dir, f"no <city>/*{IMAGE_SUFFIX}", DOWNLOAD_HINT)
    without_labels = sorted(set(images) - set(label_ids))
    if without_labels:
        raise DatasetNotReadyError(
            dataset_name, gt_dir,
            f"half-prepared: {len(without_labels)} of {len(images)} images have no {LABEL_IDS_SUFFIX} "
            f"(e.g. {without_labels[0]})", DOWNLOAD_HINT)
    fix = f"run {PREPARE_COMMAND} (or cityscapesscripts' createTrainIdLabelImgs)"
    if not train_ids:
        raise DatasetNotReadyError(dataset_name, gt_dir, f"*{TRAIN_IDS_SUFFIX} not found", fix)
    missing = sorted(set(label_ids) - set(train_ids))
    if missing:
        raise DatasetNotReadyError(
            dataset_name, gt_dir,
            f"half-prepared: {len(missing)} of {len(label_ids)} *{TRAIN_IDS_SUFFIX} files are missing "
            f"(e.g. {missing[0]})", fix)
    refresh_metadata(dataset_name, image_dir=image_dir, gt_dir=gt_dir)
    return load_cityscapes_semantic(image_dir, gt_dir)


def register_all_cityscapes() -> None:
    """Register (or take over from Detectron2's builtin) the fine train/val splits; reads no file."""
    for dataset_name, split in CITYSCAPES_SPLITS.items():
        base = cityscapes_dir()
        metadata = dict(
            _get_builtin_metadata("cityscapes"),
            image_dir=os.path.join(base, "leftImg8bit", split),
            gt_dir=os.path.join(base, "gtFine", split),
            evaluator_type="cityscapes_sem_seg",
            **cityscapes_metadata(),
        )
        register_checked(dataset_name, load_cityscapes_fine_sem_seg, metadata, replace_builtin=True)


register_all_cityscapes()
