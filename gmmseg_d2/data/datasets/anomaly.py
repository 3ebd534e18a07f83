"""Road anomaly-segmentation benchmarks, for models trained on Cityscapes.

Every dataset is evaluated with ``evaluator_type="anomaly"`` (AP, FPR95,
AUROC over non-void pixels) on labels 0 = in-distribution, 1 = anomaly,
255 = void. Their metadata carries Cityscapes' 19 ``stuff_classes`` and
colours, so a Cityscapes model runs on them with no change.

Each has its own published form; ``datasets/prepare_*.py`` turns it into one
prepared layout::

    $DETECTRON2_DATASETS/<folder>/
        images/<stem>.{png,jpg,webp}
        labels/<stem>.png         uint8, 0 / 1 / 255
        manifest.json             written last: stems, source, label values

=================================  ==========================================  ======
registered name                    folder                                      images
=================================  ==========================================  ======
``fishyscapes_lost_and_found_val`` ``fishyscapes/lost_and_found_val``          100
``fishyscapes_static_val``         ``fishyscapes/static_val``                  30
``road_anomaly``                   ``road_anomaly/test``                       60
``smiyc_road_anomaly21_val``       ``segment_me_if_you_can/road_anomaly21_val``  10
``smiyc_road_obstacle21_val``      ``segment_me_if_you_can/road_obstacle21_val`` 30
=================================  ==========================================  ======

The output folder is replaced as a whole by each preparation, so the
published files must live outside it (the defaults are siblings).

Published forms (inputs of the prepare functions):

* Fishyscapes Lost & Found: ``fishyscapes_lostandfound.zip`` holds
  ``<fs id>_<LAF frame id>_labels.png`` (0 / 1 / 255); the images are the
  Lost and Found dataset's ``leftImg8bit/<split>/<scene>/<LAF frame
  id>_leftImg8bit.png``.
* Fishyscapes Static: ``fs_val_v3.zip`` holds ``<fs id>_<Cityscapes frame
  id>_labels.png`` and ``<fs id>_..._rgb.npz`` (array ``rgb``: an integer
  overlay added to the Cityscapes image and clipped to 0..255).
* Road Anomaly: ``RoadAnomaly_jpg.zip`` (or ``RoadAnomaly.zip`` with webp
  frames) holds ``frame_list.json``, ``frames/<name>.<ext>`` and
  ``frames/<name>.labels/labels_semantic.png`` (0 background, 1 road,
  2 anomaly; no void).
* SegmentMeIfYouCan: ``dataset_AnomalyTrack`` (RoadAnomaly21,
  ``images/*.jpg``) and ``dataset_ObstacleTrack`` (RoadObstacle21,
  ``images/*.webp``) with ``labels_masks/<stem>_labels_semantic.png`` (0 / 1 /
  255) for the validation frames: ``validation0000``..``validation0009`` for
  RoadAnomaly21 and the ``validation_*`` frames but ``validation_19`` and
  ``validation_21``..``validation_29`` for RoadObstacle21 (the benchmark's own
  ``*-validation`` splits).
"""
from __future__ import annotations

import json
import os
import shutil
from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from .cityscapes import cityscapes_metadata
from .common import (
    IMAGE_EXTENSIONS,
    DatasetNotReadyError,
    datasets_root,
    load_image_label_pairs,
    read_label_png,
    register_checked,
    refresh_metadata,
    require_dir,
    run_jobs,
    write_label_png,
)

__all__ = [
    "ANOMALY_DATASETS",
    "AnomalyDataset",
    "anomaly_dataset_dir",
    "prepare_fishyscapes_lost_and_found",
    "prepare_fishyscapes_static",
    "prepare_road_anomaly",
    "prepare_smiyc",
    "load_anomaly_dataset",
    "register_all_anomaly",
]

MANIFEST_NAME = "manifest.json"
IN_DISTRIBUTION, ANOMALY, VOID = 0, 1, 255


@dataclass(frozen=True)
class AnomalyDataset:
    """One registered anomaly benchmark split."""

    name: str
    folder: str  # prepared layout, relative to the datasets root
    prepare_command: str
    source_hint: str  # where users get the published files


ANOMALY_DATASETS: Dict[str, AnomalyDataset] = {
    d.name: d
    for d in (
        AnomalyDataset(
            "fishyscapes_lost_and_found_val", "fishyscapes/lost_and_found_val",
            "python datasets/prepare_fishyscapes_lost_and_found.py",
            "fishyscapes_lostandfound.zip (http://robotics.ethz.ch/~asl-datasets/Fishyscapes/) and the Lost and Found "
            "leftImg8bit images (http://www.6d-vision.com/lostandfounddataset)"),
        AnomalyDataset(
            "fishyscapes_static_val", "fishyscapes/static_val",
            "python datasets/prepare_fishyscapes_static.py",
            "fs_val_v3.zip (http://robotics.ethz.ch/~asl-datasets/Fishyscapes/fs_val_v3.zip) and "
            "Cityscapes leftImg8bit"),
        AnomalyDataset(
            "road_anomaly", "road_anomaly/test",
            "python datasets/prepare_road_anomaly.py",
            "RoadAnomaly_jpg.zip (https://www.epfl.ch/labs/cvlab/data/road-anomaly/)"),
        AnomalyDataset(
            "smiyc_road_anomaly21_val", "segment_me_if_you_can/road_anomaly21_val",
            "python datasets/prepare_smiyc.py --track anomaly",
            "dataset_AnomalyTrack.zip (https://segmentmeifyoucan.com)"),
        AnomalyDataset(
            "smiyc_road_obstacle21_val", "segment_me_if_you_can/road_obstacle21_val",
            "python datasets/prepare_smiyc.py --track obstacle",
            "dataset_ObstacleTrack.zip (https://segmentmeifyoucan.com)"),
    )
}

#: RoadObstacle21 validation frames left out of the benchmark's validation split.
_OBSTACLE_EXCLUDED_PREFIXES = ("validation_19",) + tuple(f"validation_{i}" for i in range(21, 30))


def anomaly_dataset_dir(dataset_name: str, root: Optional[str] = None) -> str:
    return os.path.join(root if root is not None else datasets_root(), ANOMALY_DATASETS[dataset_name].folder)


def anomaly_metadata(image_dir: str, label_dir: str) -> dict:
    return dict(
        cityscapes_metadata(),
        evaluator_type="anomaly",
        anomaly_classes=["in-distribution", "anomaly"],
        anomaly_colors=[[0, 0, 0], [255, 255, 255]],
        anomaly_label=ANOMALY,
        in_distribution_dataset="cityscapes_fine_sem_seg_train",
        image_root=image_dir,
        sem_seg_root=label_dir,
    )


# ---------------------------------------------------------------------------
# Writing the prepared layout
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Frame:
    """One frame to write: ``stem``, how to produce its image, and its converted label."""

    stem: str
    write_image: Callable[[str], str]  # images folder -> written file path
    label: Callable[[], np.ndarray]


def _copy_image(source: str, stem: str) -> Callable[[str], str]:
    """Writer of ``image_dir/<stem><source's extension>``, a byte copy of ``source``."""

    def write(image_dir: str) -> str:
        target = os.path.join(image_dir, stem + os.path.splitext(source)[1].lower())
        shutil.copyfile(source, target)
        return target

    return write


def _check_values(label: np.ndarray, allowed: Sequence[int], path: str, what: str) -> None:
    unexpected = np.setdiff1d(np.unique(label), allowed)
    if unexpected.size:
        raise ValueError(f"{path} contains value(s) {unexpected.tolist()}; {what}")


def _check_inputs_outside_output(dataset_name: str, root: Optional[str], folders: Sequence[str]) -> None:
    """Refuse inputs inside the output folder: preparation deletes the previous output."""
    target = os.path.abspath(anomaly_dataset_dir(dataset_name, root))
    for folder in folders:
        if os.path.commonpath([os.path.abspath(folder), target]) == target:
            raise ValueError(f"{dataset_name}: input folder '{folder}' lies inside the output folder "
                             f"'{target}', which preparation replaces; move the published files elsewhere")


def _write_prepared(dataset_name: str, root: Optional[str], frames: Sequence[_Frame], source: str,
                    num_workers: Optional[int], other_sources: Sequence[str] = ()) -> str:
    """Write ``frames`` into a fresh prepared folder, ``manifest.json`` last; returns the folder.

    The folder is built next to the final one and renamed into place (an
    older version is moved aside first), so the final path never holds a
    partly written dataset.
    """
    if not frames:
        raise FileNotFoundError(f"{dataset_name}: no labelled frame found in '{os.path.abspath(source)}'")
    target = anomaly_dataset_dir(dataset_name, root)
    _check_inputs_outside_output(dataset_name, root, [source, *other_sources])
    building = f"{target}.partial-{os.getpid()}"
    shutil.rmtree(building, ignore_errors=True)
    image_dir, label_dir = os.path.join(building, "images"), os.path.join(building, "labels")
    os.makedirs(image_dir)
    os.makedirs(label_dir)

    def work(frame: _Frame) -> dict:
        label = frame.label()
        image_path = frame.write_image(image_dir)
        with Image.open(image_path) as image:
            width, height = image.size
        if label.shape != (height, width):
            raise ValueError(f"{dataset_name}, frame {frame.stem}: label shape {label.shape} differs "
                             f"from the image's {(height, width)}")
        write_label_png(label, os.path.join(label_dir, frame.stem + ".png"))
        values, counts = np.unique(label, return_counts=True)
        return {"stem": frame.stem, "image": os.path.basename(image_path),
                "pixels": {str(int(v)): int(c) for v, c in zip(values, counts)}}

    try:
        entries = run_jobs(list(frames), work, num_workers)
    except BaseException:
        shutil.rmtree(building, ignore_errors=True)
        raise
    pixels = {str(v): sum(e["pixels"].get(str(v), 0) for e in entries) for v in (IN_DISTRIBUTION, ANOMALY, VOID)}
    manifest = {"dataset": dataset_name, "source": os.path.abspath(source), "num_images": len(entries),
                "pixels": pixels, "frames": entries}
    with open(os.path.join(building, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1)
    os.makedirs(os.path.dirname(target), exist_ok=True)
    previous = f"{target}.old-{os.getpid()}"
    if os.path.exists(target):
        os.replace(target, previous)
    os.replace(building, target)
    shutil.rmtree(previous, ignore_errors=True)
    return target


def _index_files(folder: str, suffix: str) -> Dict[str, str]:
    """``{name without suffix: path}`` of every file under ``folder`` (recursive) ending in ``suffix``."""
    if not os.path.isdir(folder):
        raise FileNotFoundError(f"folder not found: '{os.path.abspath(folder)}'")
    index = {}
    for directory, _, names in os.walk(folder):
        for name in names:
            if name.endswith(suffix):
                index[name[: -len(suffix)]] = os.path.join(directory, name)
    return index


def _fishyscapes_label(path: str) -> Callable[[], np.ndarray]:
    def read() -> np.ndarray:
        label = read_label_png(path)
        # The benchmark counts 0 and 1 and ignores everything above (void).
        return np.where(label <= ANOMALY, label, VOID).astype(np.uint8)

    return read


def _split_fishyscapes_stem(stem: str) -> Tuple[str, str]:
    """``'0000_04_Maurener_Weg_8_000000_000030'`` -> ``('0000', '04_Maurener_Weg_8_000000_000030')``."""
    fs_id, _, base_id = stem.partition("_")
    if not fs_id.isdigit() or not base_id:
        raise ValueError(f"unexpected Fishyscapes label name {stem}_labels.png (expected <number>_<frame id>)")
    return fs_id, base_id


# ---------------------------------------------------------------------------
# Prepare functions
# ---------------------------------------------------------------------------


def prepare_fishyscapes_lost_and_found(
    masks_dir: str, lost_and_found_dir: str, root: Optional[str] = None, *, num_workers: Optional[int] = None
) -> str:
    """Build ``fishyscapes_lost_and_found_val`` from the published masks and Lost and Found images.

    Args:
        masks_dir: the unzipped ``fishyscapes_lostandfound.zip`` (``*_labels.png``, searched recursively).
        lost_and_found_dir: the Lost and Found dataset (``*_leftImg8bit.png``, searched recursively).
    """
    _check_inputs_outside_output("fishyscapes_lost_and_found_val", root, [masks_dir, lost_and_found_dir])
    labels = _index_files(masks_dir, "_labels.png")
    images = _index_files(lost_and_found_dir, "_leftImg8bit.png")
    frames = []
    for stem in sorted(labels):
        _, frame_id = _split_fishyscapes_stem(stem)
        if frame_id not in images:
            raise FileNotFoundError(f"Lost and Found image {frame_id}_leftImg8bit.png (for {stem}_labels.png) "
                                    f"not found under '{os.path.abspath(lost_and_found_dir)}'")
        frames.append(_Frame(stem, _copy_image(images[frame_id], stem), _fishyscapes_label(labels[stem])))
    return _write_prepared("fishyscapes_lost_and_found_val", root, frames, masks_dir, num_workers,
                           [lost_and_found_dir])


def prepare_fishyscapes_static(
    overlays_dir: str, cityscapes_images_dir: str, root: Optional[str] = None, *,
    num_workers: Optional[int] = None,
) -> str:
    """Build ``fishyscapes_static_val`` by adding the published overlays to the Cityscapes images.

    Args:
        overlays_dir: the unzipped ``fs_val_v3.zip`` (``*_labels.png`` and ``*rgb.npz``).
        cityscapes_images_dir: Cityscapes ``leftImg8bit`` (searched recursively).
    """
    _check_inputs_outside_output("fishyscapes_static_val", root, [overlays_dir, cityscapes_images_dir])
    labels = _index_files(overlays_dir, "_labels.png")
    overlays = _index_files(overlays_dir, "rgb.npz")
    images = _index_files(cityscapes_images_dir, "_leftImg8bit.png")
    frames = []
    for stem in sorted(labels):
        fs_id, frame_id = _split_fishyscapes_stem(stem)
        matches = [path for name, path in overlays.items() if name.startswith(fs_id + "_")]
        if len(matches) != 1:
            raise FileNotFoundError(f"expected one {fs_id}_*rgb.npz overlay for {stem}_labels.png in "
                                    f"'{os.path.abspath(overlays_dir)}', found {len(matches)}")
        if frame_id not in images:
            raise FileNotFoundError(f"Cityscapes image {frame_id}_leftImg8bit.png (for {stem}_labels.png) "
                                    f"not found under '{os.path.abspath(cityscapes_images_dir)}'")

        def write_image(image_dir: str, base=images[frame_id], overlay=matches[0], stem=stem) -> str:
            with Image.open(base) as image:
                pixels = np.asarray(image.convert("RGB"), dtype=np.int32)
            with np.load(overlay) as archive:
                offset = np.asarray(archive["rgb"], dtype=np.int32)
            if offset.shape != pixels.shape:
                raise ValueError(f"overlay {overlay} has shape {offset.shape}, image {base} {pixels.shape}")
            target = os.path.join(image_dir, stem + ".png")
            Image.fromarray(np.clip(pixels + offset, 0, 255).astype(np.uint8)).save(target)
            return target

        frames.append(_Frame(stem, write_image, _fishyscapes_label(labels[stem])))
    return _write_prepared("fishyscapes_static_val", root, frames, overlays_dir, num_workers,
                           [cityscapes_images_dir])


def prepare_road_anomaly(source_dir: str, root: Optional[str] = None, *, num_workers: Optional[int] = None) -> str:
    """Build ``road_anomaly`` from the unzipped ``RoadAnomaly_jpg`` (or ``RoadAnomaly``) folder.

    Labels: 2 (anomaly) -> 1, 0 / 1 (background / road) -> 0; any other value
    is an error.
    """
    _check_inputs_outside_output("road_anomaly", root, [source_dir])
    list_file = os.path.join(source_dir, "frame_list.json")
    if not os.path.isfile(list_file):
        raise FileNotFoundError(f"Road Anomaly frame_list.json not found in '{os.path.abspath(source_dir)}'")
    with open(list_file) as f:
        frame_names = json.load(f)
    frames = []
    for name in frame_names:
        stem = os.path.splitext(name)[0]
        image = os.path.join(source_dir, "frames", name)
        label = os.path.join(source_dir, "frames", stem + ".labels", "labels_semantic.png")
        for path in (image, label):
            if not os.path.isfile(path):
                raise FileNotFoundError(f"Road Anomaly file listed in frame_list.json not found: '{path}'")

        def read(label=label) -> np.ndarray:
            values = read_label_png(label)
            _check_values(values, (0, 1, 2), label, "Road Anomaly labels are 0 / 1 (normal) and 2 (anomaly)")
            return (values == 2).astype(np.uint8)

        frames.append(_Frame(stem, _copy_image(image, stem), read))
    return _write_prepared("road_anomaly", root, frames, source_dir, num_workers)


def _smiyc_frames(track_dir: str, keep: Callable[[str], bool]) -> List[_Frame]:
    label_dir = os.path.join(track_dir, "labels_masks")
    image_dir = os.path.join(track_dir, "images")
    for folder in (label_dir, image_dir):
        if not os.path.isdir(folder):
            raise FileNotFoundError(f"SegmentMeIfYouCan folder not found: '{os.path.abspath(folder)}'")
    suffix = "_labels_semantic.png"
    images: Dict[str, str] = {}
    for name in os.listdir(image_dir):
        base, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            images[base] = os.path.join(image_dir, name)
    frames = []
    for name in sorted(os.listdir(label_dir)):
        if not name.endswith(suffix) or not keep(name[: -len(suffix)]):
            continue
        stem = name[: -len(suffix)]
        if stem not in images:
            raise FileNotFoundError(f"SegmentMeIfYouCan image for {name} not found in '{image_dir}'")
        path = os.path.join(label_dir, name)

        def read(path=path) -> np.ndarray:
            values = read_label_png(path)
            _check_values(values, (IN_DISTRIBUTION, ANOMALY, VOID), path, "SegmentMeIfYouCan labels are 0 / 1 / 255")
            return values

        frames.append(_Frame(stem, _copy_image(images[stem], stem), read))
    return frames


def prepare_smiyc(
    track: str, track_dir: str, root: Optional[str] = None, *, num_workers: Optional[int] = None
) -> str:
    """Build a SegmentMeIfYouCan validation set from its published track folder.

    Args:
        track: ``"anomaly"`` (``dataset_AnomalyTrack`` -> ``smiyc_road_anomaly21_val``) or
            ``"obstacle"`` (``dataset_ObstacleTrack`` -> ``smiyc_road_obstacle21_val``).
        track_dir: the unzipped track folder (``images/``, ``labels_masks/``).
    """
    if track in ("anomaly", "obstacle"):
        name = "smiyc_road_anomaly21_val" if track == "anomaly" else "smiyc_road_obstacle21_val"
        _check_inputs_outside_output(name, root, [track_dir])
    if track == "anomaly":
        frames = _smiyc_frames(track_dir, lambda stem: stem.startswith("validation"))
        return _write_prepared("smiyc_road_anomaly21_val", root, frames, track_dir, num_workers)
    if track == "obstacle":
        frames = _smiyc_frames(
            track_dir,
            lambda stem: stem.split("_")[0] == "validation" and not stem.startswith(_OBSTACLE_EXCLUDED_PREFIXES))
        return _write_prepared("smiyc_road_obstacle21_val", root, frames, track_dir, num_workers)
    raise ValueError(f"track must be 'anomaly' or 'obstacle', got {track!r}")


# ---------------------------------------------------------------------------
# Loading and registration
# ---------------------------------------------------------------------------


def load_anomaly_dataset(dataset_name: str, root: str) -> List[dict]:
    """Checked records of a prepared anomaly dataset."""
    spec = ANOMALY_DATASETS[dataset_name]
    base = anomaly_dataset_dir(dataset_name, root)
    fix = f"get {spec.source_hint}, then run {spec.prepare_command} (see --help for the input paths)"
    require_dir(dataset_name, base, "prepared folder not found", fix)
    manifest_path = os.path.join(base, MANIFEST_NAME)
    if not os.path.isfile(manifest_path):
        raise DatasetNotReadyError(dataset_name, manifest_path,
                                   f"half-prepared: {MANIFEST_NAME} (written last by the prepare script) missing",
                                   f"run {spec.prepare_command} again")
    with open(manifest_path) as f:
        expected = [entry["stem"] for entry in json.load(f)["frames"]]
    image_dir, label_dir = os.path.join(base, "images"), os.path.join(base, "labels")
    records = load_image_label_pairs(dataset_name, image_dir, label_dir, f"run {spec.prepare_command} again")
    found = [os.path.splitext(os.path.basename(r["sem_seg_file_name"]))[0] for r in records]
    if found != sorted(expected):
        missing = sorted(set(expected) - set(found)) or sorted(set(found) - set(expected))
        raise DatasetNotReadyError(
            dataset_name, label_dir,
            f"files differ from {MANIFEST_NAME}: {len(found)} labels found, {len(expected)} listed "
            f"(e.g. {missing[0]})", f"run {spec.prepare_command} again")
    refresh_metadata(dataset_name, image_root=image_dir, sem_seg_root=label_dir)
    return records


def register_all_anomaly() -> None:
    """Register every anomaly benchmark split; reads no file."""
    for dataset_name in ANOMALY_DATASETS:
        base = anomaly_dataset_dir(dataset_name)
        register_checked(dataset_name, load_anomaly_dataset,
                         anomaly_metadata(os.path.join(base, "images"), os.path.join(base, "labels")))


register_all_anomaly()
