"""Tiny fake trees of the real datasets, in the form their publishers distribute them.

Each builder writes a few small images and label maps under a datasets root
and returns the raw label arrays it wrote, keyed so tests can check what the
prepare scripts and loaders make of them. Names follow each dataset's real
naming scheme, since loaders and evaluators parse them.
"""
from __future__ import annotations

import hashlib
import json
import os
from typing import Dict, Tuple

import numpy as np
from PIL import Image

SIZE = (6, 8)  # (H, W) of every fake image


def _rng(name: str) -> np.random.Generator:
    """A generator seeded by ``name`` (stable across processes, unlike ``hash``)."""
    return np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))


def _write_image(path: str, size: Tuple[int, int] = SIZE, seed: str = "") -> np.ndarray:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    pixels = _rng(seed or path).integers(0, 256, size + (3,), dtype=np.uint8)
    ext = os.path.splitext(path)[1].lower()
    if ext == ".webp":
        Image.fromarray(pixels).save(path, lossless=True)
    else:
        Image.fromarray(pixels).save(path)
    return pixels


def _write_label(path: str, label: np.ndarray) -> np.ndarray:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    Image.fromarray(label).save(path)
    return label


def _label(values, seed: str, size: Tuple[int, int] = SIZE, dtype=np.uint8) -> np.ndarray:
    """A label map holding every value of ``values`` at least once (if it has room), then random ones."""
    values = np.asarray(values)
    flat = _rng(seed).choice(values, size=size[0] * size[1])
    flat[: min(values.size, flat.size)] = values[: flat.size]
    return _rng(seed + "perm").permutation(flat).reshape(size).astype(dtype)


# --------------------------------------------------------------------- ADE20K


def make_ade20k(root: str, counts=(("training", 3), ("validation", 2))) -> Dict[str, Dict[str, np.ndarray]]:
    """``ADEChallengeData2016/{images,annotations}/<split>/`` as unzipped; returns raw labels per split."""
    base = os.path.join(root, "ADEChallengeData2016")
    raw: Dict[str, Dict[str, np.ndarray]] = {}
    for split, count in counts:
        raw[split] = {}
        for i in range(count):
            stem = f"ADE_{'train' if split == 'training' else 'val'}_{i + 1:08d}"
            _write_image(os.path.join(base, "images", split, stem + ".jpg"))
            values = [0, 1, 150, 7 + i] if i == 0 else [1, 2, 3 + i]
            raw[split][stem] = _write_label(os.path.join(base, "annotations", split, stem + ".png"),
                                            _label(values, stem))
    return raw


# ----------------------------------------------------------------- Cityscapes

CITYSCAPES_FRAMES = {
    "train": [("aachen", 0, 19), ("aachen", 1, 19), ("bochum", 0, 302)],
    "val": [("frankfurt", 0, 294), ("lindau", 0, 0)],
}


def cityscapes_frame_id(city: str, sequence: int, frame: int) -> str:
    return f"{city}_{sequence:06d}_{frame:06d}"


def make_cityscapes(root: str, frames=CITYSCAPES_FRAMES) -> Dict[str, Dict[str, np.ndarray]]:
    """``cityscapes/{leftImg8bit,gtFine}/<split>/<city>/`` with labelIds, instanceIds and polygons."""
    base = os.path.join(root, "cityscapes")
    raw: Dict[str, Dict[str, np.ndarray]] = {}
    for split, split_frames in frames.items():
        raw[split] = {}
        for city, sequence, frame in split_frames:
            frame_id = cityscapes_frame_id(city, sequence, frame)
            _write_image(os.path.join(base, "leftImg8bit", split, city, frame_id + "_leftImg8bit.png"))
            gt = os.path.join(base, "gtFine", split, city, frame_id + "_gtFine_")
            # road, sidewalk, car (an instance class), parking (ignored), unlabeled.
            label_ids = _write_label(gt + "labelIds.png", _label([7, 8, 26, 9, 0, 24 + len(raw[split])], frame_id))
            instances = np.where(label_ids >= 24, label_ids.astype(np.uint16) * 1000 + 1, label_ids)
            Image.fromarray(instances.astype(np.uint16)).save(gt + "instanceIds.png")
            with open(gt + "polygons.json", "w") as f:
                json.dump({"imgHeight": SIZE[0], "imgWidth": SIZE[1], "objects": []}, f)
            raw[split][frame_id] = label_ids
    return raw


# ----------------------------------------------------------------- COCO-Stuff

#: stuffthingmaps values (COCO-Stuff id - 1) worth checking: person, unused id 12,
#: stop sign, toothbrush, banner, wood, unlabeled.
COCO_164K_VALUES = [0, 11, 12, 89, 91, 181, 255]


def make_coco_stuff_164k(root: str, counts=(("train2017", 2), ("val2017", 1))) -> Dict[str, Dict[str, np.ndarray]]:
    """``coco/{train2017,val2017}/*.jpg`` and ``coco/stuffthingmaps/<split>/*.png`` as unzipped."""
    base = os.path.join(root, "coco")
    raw: Dict[str, Dict[str, np.ndarray]] = {}
    for split, count in counts:
        raw[split] = {}
        for i in range(count):
            stem = f"{(1 + i) * 139 + (0 if split == 'val2017' else 7):012d}"
            _write_image(os.path.join(base, split, stem + ".jpg"))
            raw[split][stem] = _write_label(os.path.join(base, "stuffthingmaps", split, stem + ".png"),
                                            _label(COCO_164K_VALUES + [40 + i], stem))
    # A stray image without a stuff map must not break the pairing.
    _write_image(os.path.join(base, "train2017", "000000999999.jpg"))
    return raw


def make_coco_stuff_10k(root: str, version: str, counts=(("train", 2), ("test", 1))) -> Dict[str, Dict[str, np.ndarray]]:
    """``coco/coco_stuff_10k/{images,annotations,imageLists}`` of release ``version`` (v5 .mat files)."""
    from scipy.io import savemat

    base = os.path.join(root, "coco", "coco_stuff_10k")
    os.makedirs(os.path.join(base, "imageLists"), exist_ok=True)
    # v1.1: ids (0 unlabeled, 12 unused, 1 person, 13 stop sign, 92 banner, 182 wood);
    # v1.0: 1 unlabeled (0 unused), 2 + class (2 person, 13 stop sign, 82 banner, 172 wood).
    values = [0, 1, 12, 13, 92, 182] if version == "1.1" else [0, 1, 2, 13, 82, 172]
    raw: Dict[str, Dict[str, np.ndarray]] = {}
    for split, count in counts:
        raw[split] = {}
        stems = [f"COCO_train2014_{(i + 1) * 77 + (5 if split == 'test' else 0):012d}" for i in range(count)]
        for stem in stems:
            _write_image(os.path.join(base, "images", stem + ".jpg"))
            label = _label(values, stem, dtype=np.uint16)
            os.makedirs(os.path.join(base, "annotations"), exist_ok=True)
            savemat(os.path.join(base, "annotations", stem + ".mat"), {"S": label, "names": ["x"]})
            raw[split][stem] = label
        with open(os.path.join(base, "imageLists", f"{split}.txt"), "w") as f:
            f.write("\n".join(stems) + "\n")
    return raw


# ------------------------------------------------------------- anomaly sets


def make_fishyscapes_lost_and_found(root: str) -> Dict[str, np.ndarray]:
    """The unzipped masks zip and a Lost and Found image tree; returns raw labels by output stem."""
    masks = os.path.join(root, "fishyscapes", "fishyscapes_lostandfound")
    images = os.path.join(root, "lost_and_found", "leftImg8bit")
    raw = {}
    for fs_id, split, scene, seq, frame in [(0, "test", "04_Maurener_Weg_8", 0, 30),
                                            (1, "test", "04_Maurener_Weg_8", 2, 60),
                                            (2, "train", "01_Hanns_Klemm_Str_45", 1, 90)]:
        frame_id = f"{scene}_{seq:06d}_{frame:06d}"
        _write_image(os.path.join(images, split, scene, frame_id + "_leftImg8bit.png"))
        stem = f"{fs_id:04d}_{frame_id}"
        raw[stem] = _write_label(os.path.join(masks, stem + "_labels.png"), _label([0, 1, 255], stem))
    # A Lost and Found frame Fishyscapes does not use.
    _write_image(os.path.join(images, "test", "02_Hanns_Klemm_Str_44", "02_Hanns_Klemm_Str_44_000000_000010_leftImg8bit.png"))
    return raw


def make_fishyscapes_static(root: str) -> Dict[str, Tuple[np.ndarray, np.ndarray, np.ndarray]]:
    """fs_val_v3-style overlays and labels plus the Cityscapes images they apply to.

    Returns ``{stem: (label, cityscapes pixels, overlay)}``.
    """
    overlays = os.path.join(root, "fishyscapes", "fs_val_v3")
    os.makedirs(overlays, exist_ok=True)
    out = {}
    for fs_id, city, seq, frame in [(0, "frankfurt", 0, 294), (1, "munster", 3, 7)]:
        frame_id = f"{city}_{seq:06d}_{frame:06d}"
        pixels = _write_image(os.path.join(root, "cityscapes", "leftImg8bit", "val", city, frame_id + "_leftImg8bit.png"))
        stem = f"{fs_id:04d}_{frame_id}"
        label = _write_label(os.path.join(overlays, stem + "_labels.png"), _label([0, 1, 255], stem))
        # Large offsets so clipping at both ends happens.
        offset = _rng(stem + "overlay").integers(-300, 300, SIZE + (3,)).astype(np.int16)
        np.savez(os.path.join(overlays, f"{fs_id:04d}_{frame_id}_rgb.npz"), rgb=offset)
        out[stem] = (label, pixels, offset)
    return out


def make_road_anomaly(root: str) -> Dict[str, np.ndarray]:
    """The unzipped ``RoadAnomaly_jpg`` folder; returns raw labels by frame stem."""
    base = os.path.join(root, "road_anomaly", "RoadAnomaly_jpg")
    names = ["animals01_Guiguinto_railway_station_Calves.jpg", "cones03_road_works.jpg"]
    raw = {}
    for name in names:
        stem = os.path.splitext(name)[0]
        _write_image(os.path.join(base, "frames", name))
        raw[stem] = _write_label(os.path.join(base, "frames", stem + ".labels", "labels_semantic.png"),
                                 _label([0, 1, 2], stem))
    with open(os.path.join(base, "frame_list.json"), "w") as f:
        json.dump(names, f)
    return raw


def make_smiyc(root: str) -> Dict[str, Dict[str, np.ndarray]]:
    """``dataset_AnomalyTrack`` and ``dataset_ObstacleTrack`` with test and validation frames.

    Returns the labels of the frames each validation split must keep.
    """
    base = os.path.join(root, "segment_me_if_you_can")
    tracks = {
        "dataset_AnomalyTrack": (".jpg", ["validation0000", "validation0001"], ["sheep0000"]),
        # validation_19 and validation_21 are labelled but outside the benchmark's validation split.
        "dataset_ObstacleTrack": (".webp", ["validation_1", "validation_2", "validation_19", "validation_21"],
                                  ["curvy-street_bottle_1"]),
    }
    kept: Dict[str, Dict[str, np.ndarray]] = {}
    for track, (ext, labelled, unlabelled) in tracks.items():
        kept[track] = {}
        for stem in labelled + unlabelled:
            _write_image(os.path.join(base, track, "images", stem + ext))
        for stem in labelled:
            label = _write_label(os.path.join(base, track, "labels_masks", stem + "_labels_semantic.png"),
                                 _label([0, 1, 255], stem))
            if stem not in ("validation_19", "validation_21"):
                kept[track][stem] = label
    return kept
