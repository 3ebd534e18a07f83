"""COCO-Stuff semantic segmentation, 171 classes (80 things + 91 stuff).

The 171 classes are the COCO-Stuff ids actually used, in increasing id order:
the 80 COCO thing ids (1..90 with 11 gaps) then the 91 stuff ids 92..182;
class ``k`` is the ``k``-th of them (MaskFormer's
``stuff_dataset_id_to_contiguous_id``). Label 255 is ignored.

COCO-Stuff-164k (MaskFormer's layout)::

    $DETECTRON2_DATASETS/coco/
        {train,val}2017/*.jpg                            COCO 2017 images
        stuffthingmaps/{train,val}2017/*.png             stuffthingmaps_trainval2017.zip: value = id - 1, 255 unlabeled
        stuffthingmaps_detectron2/{train,val}2017/*.png  written by prepare: 0..170, 255

registered as ``coco_2017_train_stuff_sem_seg`` (118k) and
``coco_2017_val_stuff_sem_seg`` (5k).

COCO-Stuff-10k (MaskFormer's layout)::

    $DETECTRON2_DATASETS/coco/coco_stuff_10k/
        images/*.jpg, annotations/*.mat, imageLists/{train,test}.txt   cocostuff-10k-v1.1.zip
        images_detectron2/{train,test}/*.jpg                           written by prepare
        annotations_detectron2/{train,test}/*.png                      written by prepare: 0..170, 255

registered as ``coco_2017_train_stuff_10k_sem_seg`` (9k) and
``coco_2017_test_stuff_10k_sem_seg`` (1k). The ``.mat`` label ``S`` is read
as published by either release: v1.1 (``S`` = COCO-Stuff id, 0 unlabeled;
MATLAB v5 files) or v1.0 (``S`` = 1 unlabeled, then the 171 classes in id
order from 2; the release MaskFormer's script reads with h5py).
"""
from __future__ import annotations

import os
import shutil
from typing import Dict, List, Optional

import numpy as np
from PIL import Image

from detectron2.data.datasets import load_sem_seg
from detectron2.data.datasets.builtin_meta import COCO_CATEGORIES

from .common import (
    DatasetNotReadyError,
    convert_label_files,
    datasets_root,
    list_stems,
    lookup_table,
    register_checked,
    refresh_metadata,
    require_complete_conversion,
    require_dir,
    run_jobs,
    write_label_png,
)

__all__ = [
    "COCO_STUFF_CLASSES",
    "COCO_STUFF_DATASET_IDS",
    "COCO_STUFF_164K_SPLITS",
    "COCO_STUFF_10K_SPLITS",
    "COCO_STUFF_10K_VERSIONS",
    "convert_stuffthingmap",
    "convert_coco_stuff_10k_label",
    "read_mat_label",
    "prepare_coco_stuff_164k_sem_seg",
    "prepare_coco_stuff_10k_sem_seg",
    "register_all_coco_stuff",
]

_THINGS = [c for c in COCO_CATEGORIES if c["isthing"] == 1]
#: COCO-Stuff's 91 stuff classes, ids 92..182 in order.
_STUFF_NAMES = [
    "banner", "blanket", "branch", "bridge", "building-other", "bush", "cabinet", "cage",
    "cardboard", "carpet", "ceiling-other", "ceiling-tile", "cloth", "clothes", "clouds",
    "counter", "cupboard", "curtain", "desk-stuff", "dirt", "door-stuff", "fence",
    "floor-marble", "floor-other", "floor-stone", "floor-tile", "floor-wood", "flower", "fog",
    "food-other", "fruit", "furniture-other", "grass", "gravel", "ground-other", "hill",
    "house", "leaves", "light", "mat", "metal", "mirror-stuff", "moss", "mountain", "mud",
    "napkin", "net", "paper", "pavement", "pillow", "plant-other", "plastic", "platform",
    "playingfield", "railing", "railroad", "river", "road", "rock", "roof", "rug", "salad",
    "sand", "sea", "shelf", "sky-other", "skyscraper", "snow", "solid-other", "stairs", "stone",
    "straw", "structural-other", "table", "tent", "textile-other", "towel", "tree", "vegetable",
    "wall-brick", "wall-concrete", "wall-other", "wall-panel", "wall-stone", "wall-tile",
    "wall-wood", "water-other", "waterdrops", "window-blind", "window-other", "wood",
]
#: The 171 COCO-Stuff ids in use, increasing; class k has id COCO_STUFF_DATASET_IDS[k].
COCO_STUFF_DATASET_IDS: List[int] = [c["id"] for c in _THINGS] + list(range(92, 92 + len(_STUFF_NAMES)))
COCO_STUFF_CLASSES: List[str] = [c["name"] for c in _THINGS] + list(_STUFF_NAMES)
COCO_STUFF_COLORS: List[List[int]] = [list(c["color"]) for c in _THINGS] + [
    # Stuff has no official palette: a fixed pseudo-random one keeps plots stable.
    [int(v) for v in row] for row in np.random.default_rng(171).integers(0, 256, (len(_STUFF_NAMES), 3))
]
assert len(COCO_STUFF_CLASSES) == 171 and COCO_STUFF_DATASET_IDS[-1] == 182

#: stuffthingmaps value (= id - 1) -> class; unused ids and 255 -> 255.
_STUFFTHINGMAP_TABLE = lookup_table({i - 1: k for k, i in enumerate(COCO_STUFF_DATASET_IDS)})
#: COCO-Stuff-10k v1.1 ``S`` (= id, 0 unlabeled) -> class.
_V11_TABLE = lookup_table({i: k for k, i in enumerate(COCO_STUFF_DATASET_IDS)})

COCO_STUFF_164K_SPLITS: Dict[str, str] = {
    "coco_2017_train_stuff_sem_seg": "train2017",
    "coco_2017_val_stuff_sem_seg": "val2017",
}
COCO_STUFF_10K_SPLITS: Dict[str, str] = {
    "coco_2017_train_stuff_10k_sem_seg": "train",
    "coco_2017_test_stuff_10k_sem_seg": "test",
}
COCO_STUFF_10K_VERSIONS = ("1.1", "1.0")
PREPARE_164K = "python datasets/prepare_coco_stuff_164k_sem_seg.py"
PREPARE_10K = "python datasets/prepare_coco_stuff_10k_sem_seg.py"
DOWNLOAD_164K = (
    "put COCO 2017 train2017/ and val2017/ and stuffthingmaps_trainval2017.zip "
    "(http://calvin.inf.ed.ac.uk/wp-content/uploads/data/cocostuffdataset/stuffthingmaps_trainval2017.zip, "
    f"unzipped as coco/stuffthingmaps/) under $DETECTRON2_DATASETS/coco, then run {PREPARE_164K}"
)
DOWNLOAD_10K = (
    "unzip cocostuff-10k-v1.1.zip (https://github.com/nightrome/cocostuff10k) into "
    f"$DETECTRON2_DATASETS/coco/coco_stuff_10k, then run {PREPARE_10K}"
)


def _metadata(image_dir: str, label_dir: str) -> dict:
    return dict(
        stuff_classes=list(COCO_STUFF_CLASSES),
        stuff_colors=[list(c) for c in COCO_STUFF_COLORS],
        stuff_dataset_id_to_contiguous_id={i: k for k, i in enumerate(COCO_STUFF_DATASET_IDS)},
        image_root=image_dir,
        sem_seg_root=label_dir,
        evaluator_type="sem_seg",
        ignore_label=255,
    )


# ---------------------------------------------------------------------------
# Label conversion
# ---------------------------------------------------------------------------


def convert_stuffthingmap(label: np.ndarray, path: str = "<array>") -> np.ndarray:
    """``stuffthingmaps`` PNG (value = COCO-Stuff id - 1, 255 unlabeled) to classes 0..170 / 255."""
    del path  # every uint8 value maps (unused ids to 255)
    return _STUFFTHINGMAP_TABLE[label]


def convert_coco_stuff_10k_label(label: np.ndarray, version: str, path: str = "<array>") -> np.ndarray:
    """COCO-Stuff-10k ``S`` map to classes 0..170 / 255.

    Args:
        label: ``(H, W)`` integer map as stored in the ``.mat`` file.
        version: ``"1.1"`` (``S`` = id, 0 unlabeled) or ``"1.0"`` (``S`` = 1
            unlabeled, classes from 2 in id order).
    """
    if version not in COCO_STUFF_10K_VERSIONS:
        raise ValueError(f"COCO-Stuff-10k version must be one of {COCO_STUFF_10K_VERSIONS}, got {version!r}")
    label = np.asarray(label)
    top = 182 if version == "1.1" else 172
    if label.size and (label.min() < 0 or label.max() > top):
        raise ValueError(
            f"{path}: values {int(label.min())}..{int(label.max())} are outside COCO-Stuff-10k v{version}'s "
            f"0..{top}; is --version right (v1.1: ids 0..182, v1.0: 1..172)?"
        )
    label = label.astype(np.uint8)
    if version == "1.1":
        return _V11_TABLE[label]
    # v1.0: 2 + class; 1 (unlabeled) and 0 (not used by the release) are ignored.
    return np.where(label >= 2, label - np.uint8(2), np.uint8(255)).astype(np.uint8)


def read_mat_label(path: str) -> np.ndarray:
    """The ``S`` label map of a COCO-Stuff ``.mat`` file as an ``(H, W)`` array.

    MATLAB v5 files are read with scipy; v7.3 files (HDF5) need ``h5py`` and
    are stored column-major, hence the transpose.
    """
    with open(path, "rb") as f:
        header = f.read(128)
    if b"MATLAB 7.3" in header:
        try:
            import h5py
        except ImportError:
            raise ImportError(f"{path} is a MATLAB v7.3 (HDF5) file: `pip install h5py` to read it") from None
        with h5py.File(path, "r") as mat:
            return np.array(mat["S"]).T
    from scipy.io import loadmat

    mat = loadmat(path, variable_names=["S"])
    if "S" not in mat:
        raise KeyError(f"{path}: no variable 'S' (the COCO-Stuff label map)")
    return np.asarray(mat["S"])


# ---------------------------------------------------------------------------
# Preparation
# ---------------------------------------------------------------------------


def _coco_dir(root: Optional[str]) -> str:
    return os.path.join(root if root is not None else datasets_root(), "coco")


def _coco_stuff_10k_dir(root: Optional[str]) -> str:
    return os.path.join(_coco_dir(root), "coco_stuff_10k")


def prepare_coco_stuff_164k_sem_seg(
    root: Optional[str] = None, *, force: bool = False, num_workers: Optional[int] = None
) -> Dict[str, int]:
    """Write ``stuffthingmaps_detectron2/`` from ``stuffthingmaps/``; returns files written per split."""
    base = _coco_dir(root)
    written = {}
    for split in COCO_STUFF_164K_SPLITS.values():
        source = os.path.join(base, "stuffthingmaps", split)
        if not os.path.isdir(source):
            raise FileNotFoundError(f"COCO-Stuff maps not found at '{os.path.abspath(source)}': {DOWNLOAD_164K}")
        target = os.path.join(base, "stuffthingmaps_detectron2", split)
        os.makedirs(target, exist_ok=True)
        names = sorted(list_stems(source, (".png",)).values())
        pairs = [(os.path.join(source, n), os.path.join(target, n)) for n in names]
        written[split] = convert_label_files(pairs, convert_stuffthingmap, force=force, num_workers=num_workers)
    return written


def _read_image_list(path: str) -> List[str]:
    with open(path) as f:
        return [os.path.splitext(line.strip())[0] for line in f if line.strip()]


def _link_or_copy(source: str, target: str) -> None:
    """Hard-link (no extra space) where the file system allows it, else copy; atomic."""
    partial = f"{target}.partial-{os.getpid()}"
    try:
        os.link(source, partial)
    except OSError:
        shutil.copyfile(source, partial)
    os.replace(partial, target)


def prepare_coco_stuff_10k_sem_seg(
    root: Optional[str] = None, *, version: str = "1.1", force: bool = False, num_workers: Optional[int] = None
) -> Dict[str, int]:
    """Write ``images_detectron2/`` and ``annotations_detectron2/`` from the published 10k release.

    Returns the number of images per split. Existing outputs are kept unless
    ``force``.
    """
    if version not in COCO_STUFF_10K_VERSIONS:
        raise ValueError(f"version must be one of {COCO_STUFF_10K_VERSIONS}, got {version!r}")
    base = _coco_stuff_10k_dir(root)
    counts = {}
    for split in COCO_STUFF_10K_SPLITS.values():
        list_file = os.path.join(base, "imageLists", f"{split}.txt")
        if not os.path.isfile(list_file):
            raise FileNotFoundError(f"COCO-Stuff-10k image list not found at '{os.path.abspath(list_file)}': "
                                    f"{DOWNLOAD_10K}")
        image_dir = os.path.join(base, "images_detectron2", split)
        label_dir = os.path.join(base, "annotations_detectron2", split)
        os.makedirs(image_dir, exist_ok=True)
        os.makedirs(label_dir, exist_ok=True)

        def work(stem: str, image_dir=image_dir, label_dir=label_dir) -> None:
            source_image = os.path.join(base, "images", stem + ".jpg")
            source_label = os.path.join(base, "annotations", stem + ".mat")
            for path in (source_image, source_label):
                if not os.path.isfile(path):
                    raise FileNotFoundError(f"COCO-Stuff-10k file listed in {split}.txt not found: '{path}'")
            target_label = os.path.join(label_dir, stem + ".png")
            if force or not os.path.exists(target_label):
                label = convert_coco_stuff_10k_label(read_mat_label(source_label), version, source_label)
                with Image.open(source_image) as image:
                    width, height = image.size
                if label.shape != (height, width):
                    raise ValueError(f"{source_label}: label shape {label.shape} differs from the image's "
                                     f"{(height, width)}")
                write_label_png(label, target_label)
            target_image = os.path.join(image_dir, stem + ".jpg")
            if force or not os.path.exists(target_image):
                _link_or_copy(source_image, target_image)

        stems = _read_image_list(list_file)
        run_jobs(stems, work, num_workers)
        counts[split] = len(stems)
    return counts


# ---------------------------------------------------------------------------
# Loading and registration
# ---------------------------------------------------------------------------


def _check_pairs(dataset_name: str, image_dir: str, label_dir: str, fix: str) -> None:
    labels = set(list_stems(label_dir, (".png",)))
    images = set(list_stems(image_dir, (".jpg",)))
    if not labels:
        raise DatasetNotReadyError(dataset_name, label_dir, "no label PNG found", fix)
    unpaired = sorted(labels - images)
    if unpaired:
        raise DatasetNotReadyError(
            dataset_name, image_dir,
            f"half-prepared: {len(unpaired)} of {len(labels)} labels have no image (e.g. {unpaired[0]}.jpg)", fix)


def load_coco_stuff_164k(dataset_name: str, root: str) -> List[dict]:
    split = COCO_STUFF_164K_SPLITS[dataset_name]
    base = _coco_dir(root)
    require_dir(dataset_name, base, "coco/ not found", DOWNLOAD_164K)
    image_dir = os.path.join(base, split)
    label_dir = os.path.join(base, "stuffthingmaps_detectron2", split)
    require_dir(dataset_name, image_dir, f"COCO {split}/ images not found", DOWNLOAD_164K)
    require_dir(dataset_name, label_dir, f"stuffthingmaps_detectron2/{split} not found", f"run {PREPARE_164K}")
    raw_dir = os.path.join(base, "stuffthingmaps", split)
    if os.path.isdir(raw_dir):
        require_complete_conversion(dataset_name, raw_dir, label_dir, ".png", f"run {PREPARE_164K}")
    _check_pairs(dataset_name, image_dir, label_dir, DOWNLOAD_164K)
    refresh_metadata(dataset_name, image_root=image_dir, sem_seg_root=label_dir)
    # load_sem_seg keeps the labelled images only (COCO 2017 has unlabelled ones too).
    return load_sem_seg(label_dir, image_dir, gt_ext="png", image_ext="jpg")


def load_coco_stuff_10k(dataset_name: str, root: str) -> List[dict]:
    split = COCO_STUFF_10K_SPLITS[dataset_name]
    base = _coco_stuff_10k_dir(root)
    require_dir(dataset_name, base, "coco/coco_stuff_10k not found", DOWNLOAD_10K)
    image_dir = os.path.join(base, "images_detectron2", split)
    label_dir = os.path.join(base, "annotations_detectron2", split)
    fix = f"run {PREPARE_10K}"
    require_dir(dataset_name, label_dir, f"annotations_detectron2/{split} not found", fix)
    require_dir(dataset_name, image_dir, f"images_detectron2/{split} not found", fix)
    list_file = os.path.join(base, "imageLists", f"{split}.txt")
    if os.path.isfile(list_file):
        listed = _read_image_list(list_file)
        converted = set(list_stems(label_dir, (".png",)))
        missing = [s for s in listed if s not in converted]
        if missing:
            raise DatasetNotReadyError(
                dataset_name, label_dir,
                f"half-prepared: {len(missing)} of {len(listed)} images of imageLists/{split}.txt have no "
                f"converted label (e.g. {missing[0]}.png)", fix)
    _check_pairs(dataset_name, image_dir, label_dir, fix)
    refresh_metadata(dataset_name, image_root=image_dir, sem_seg_root=label_dir)
    return load_sem_seg(label_dir, image_dir, gt_ext="png", image_ext="jpg")


def register_all_coco_stuff() -> None:
    """Register COCO-Stuff-164k and -10k train/eval splits; reads no file."""
    base = _coco_dir(None)
    for dataset_name, split in COCO_STUFF_164K_SPLITS.items():
        register_checked(dataset_name, load_coco_stuff_164k, _metadata(
            os.path.join(base, split), os.path.join(base, "stuffthingmaps_detectron2", split)))
    base = _coco_stuff_10k_dir(None)
    for dataset_name, split in COCO_STUFF_10K_SPLITS.items():
        register_checked(dataset_name, load_coco_stuff_10k, _metadata(
            os.path.join(base, "images_detectron2", split), os.path.join(base, "annotations_detectron2", split)))


register_all_coco_stuff()
