"""The embedded "mosaic" dataset on disk, and its Detectron2 registration.

The scenes come from :mod:`.mosaic_generator` (photographs that ship inside
scikit-image), so the project can train and evaluate a real model on a fresh
machine with no download.

Splits (written once as PNGs, Detectron2 ADE20K-style layout)::

    $DETECTRON2_DATASETS/mosaic/
        images/{train,val,anomaly_val}/mosaic_<split>_<index>.png       RGB
        annotations/{train,val,anomaly_val}/mosaic_<split>_<index>.png  uint8 labels
        manifest.json                                                    written last

Generation is order-independent and can run on several processes;
regenerating with the same parameters gives byte-identical files.
``manifest.json`` records the parameters and a digest of every file and is
written last; a folder without it is an interrupted generation.

Importing this module registers ``mosaic_sem_seg_train``,
``mosaic_sem_seg_val`` and ``mosaic_anomaly_val`` with Detectron2 (through
:func:`~.common.register_checked`, like every dataset); nothing is generated
or read until a dataset is requested. The generator's public names
(``MOSAIC_CLASSES``, ``MosaicParams``, ``render_scene``, ...) are importable
from here too.
"""

from __future__ import annotations

import functools
import hashlib
import io
import json
import multiprocessing
import os
import shutil
import time
from dataclasses import asdict
from typing import Any, Callable, Sequence

import numpy as np
from PIL import Image

from detectron2.data.datasets import load_sem_seg

from .common import DatasetNotReadyError, datasets_root, refresh_metadata, register_checked
from .mosaic_generator import (  # noqa: F401  (the generator's names, importable from here)
    ANOMALY_LABEL,
    GENERATOR_VERSION,
    IGNORE_LABEL,
    IN_DISTRIBUTION_LABEL,
    MOSAIC_ANOMALY_SOURCES,
    MOSAIC_CLASSES,
    MOSAIC_COLORS,
    MOSAIC_SPLITS,
    MOSAIC_TEXTURES,
    MosaicParams,
    MosaicTexture,
    _texture_bank,
    render_scene,
)

__all__ = [
    "MOSAIC_CLASSES",
    "MOSAIC_COLORS",
    "MOSAIC_TEXTURES",
    "MOSAIC_ANOMALY_SOURCES",
    "MOSAIC_SPLITS",
    "MosaicTexture",
    "MosaicParams",
    "default_datasets_root",
    "mosaic_dir",
    "generate_mosaic_dataset",
    "ensure_mosaic_dataset",
    "is_mosaic_complete",
    "read_manifest",
    "load_mosaic_split",
    "register_all_mosaic",
    "render_scene",
]

MANIFEST_NAME = "manifest.json"

#: Former name of :func:`~.common.datasets_root` (``$DETECTRON2_DATASETS`` read now, or ``./datasets``).
default_datasets_root = datasets_root


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


def mosaic_dir(root: str | os.PathLike[str] | None = None) -> str:
    """The `mosaic/` folder under a datasets root (default: :func:`~.common.datasets_root`)."""
    return os.path.join(os.fspath(root) if root is not None else datasets_root(), "mosaic")


def _split_dirs(dataset_dir: str, split: str) -> tuple[str, str]:
    """(image folder, annotation folder) of one split."""
    return (
        os.path.join(dataset_dir, "images", split),
        os.path.join(dataset_dir, "annotations", split),
    )


def _file_name(split: str, index: int) -> str:
    return f"mosaic_{split}_{index:06d}.png"


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding with fixed settings and no metadata (deterministic bytes).

    Level 1: the noisy images barely compress further at higher (slower) levels.
    """
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def _write_scenes(
    dataset_dir: str, split: str, indices: Sequence[int], params: MosaicParams
) -> list[tuple[str, str, str, list[int]]]:
    """Render and write scenes; returns (file name, image sha256, label sha256, label histogram)."""
    image_dir, label_dir = _split_dirs(dataset_dir, split)
    records = []
    for index in indices:
        image, label = render_scene(split, index, params)
        name = _file_name(split, index)
        image_png, label_png = _png_bytes(image), _png_bytes(label)
        with open(os.path.join(image_dir, name), "wb") as f:
            f.write(image_png)
        with open(os.path.join(label_dir, name), "wb") as f:
            f.write(label_png)
        histogram = np.bincount(label.ravel(), minlength=256)
        records.append(
            (
                name,
                hashlib.sha256(image_png).hexdigest(),
                hashlib.sha256(label_png).hexdigest(),
                [int(c) for c in histogram],
            )
        )
    return records


def _chunks(count: int, num_chunks: int) -> list[list[int]]:
    """Split range(count) into contiguous, roughly equal, non-empty chunks."""
    bounds = np.linspace(0, count, num_chunks + 1).round().astype(int)
    return [list(range(a, b)) for a, b in zip(bounds[:-1], bounds[1:]) if b > a]


def _starmap(function: Callable, jobs: Sequence[tuple], num_workers: int) -> list:
    """``[function(*job) for job in jobs]``, on ``num_workers`` forked processes when more than one.

    Also used by the textures dataset. Fork, not spawn: workers inherit the
    loaded photos and skip re-importing torch/detectron2. A fork-context Pool
    forks all its workers before starting any helper thread
    (ProcessPoolExecutor forks on demand while its feeder thread runs).
    Workers must not call cv2.setNumThreads: in a forked child that hung
    under pytest.
    """
    if num_workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
        return [function(*job) for job in jobs]
    with multiprocessing.get_context("fork").Pool(num_workers) as pool:
        return pool.starmap(function, jobs)


def generate_mosaic_dataset(
    root: str | os.PathLike[str] | None = None,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    num_anomaly: int = 100,
    image_size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.25,
    num_workers: int | None = None,
) -> str:
    """Generate the mosaic dataset under `<root>/mosaic` and return that folder.

    `root` defaults to `$DETECTRON2_DATASETS` (or `./datasets`). Any previous
    `mosaic/` is replaced. Files are written into a hidden sibling folder
    that is renamed into place only after the manifest is written, so an
    interrupted run never leaves a folder that looks complete. `num_workers`
    (default: all cores, 1 for small sets) never changes the output.
    """
    params = MosaicParams(
        num_train=num_train,
        num_val=num_val,
        num_anomaly=num_anomaly,
        image_size=image_size,
        seed=seed,
        val_fraction=val_fraction,
    )
    return _generate(params, root, num_workers)


def _generate(params: MosaicParams, root: str | os.PathLike[str] | None, num_workers: int | None) -> str:
    """`generate_mosaic_dataset` with the parameters already gathered."""
    if min(params.num_train, params.num_val, params.num_anomaly) < 1 or params.image_size < 32:
        raise ValueError(f"Need at least one image per split and image_size >= 32, got {params}")
    final_dir = mosaic_dir(root)
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    staging_dir = os.path.join(parent, f".mosaic-partial-{os.getpid()}")
    shutil.rmtree(staging_dir, ignore_errors=True)
    start = time.perf_counter()
    try:
        for split in MOSAIC_SPLITS:
            for folder in _split_dirs(staging_dir, split):
                os.makedirs(folder)
        _texture_bank(params.val_fraction)  # load once here so forked workers inherit it
        total = params.num_train + params.num_val + params.num_anomaly
        if num_workers is None:
            num_workers = 1 if total < 200 else (os.cpu_count() or 1)
        jobs = [
            (split, chunk)
            for split in MOSAIC_SPLITS
            for chunk in _chunks(params.count(split), max(1, num_workers) * 4)
        ]
        results = _starmap(_write_scenes, [(staging_dir, split, chunk, params) for split, chunk in jobs], num_workers)
        _write_manifest(staging_dir, params, jobs, results, time.perf_counter() - start)
        _replace_dir(staging_dir, final_dir)
    except BaseException:
        shutil.rmtree(staging_dir, ignore_errors=True)
        raise
    return final_dir


def _write_manifest(
    dataset_dir: str,
    params: MosaicParams,
    jobs: Sequence[tuple[str, Sequence[int]]],
    results: Sequence[Sequence[tuple[str, str, str, list[int]]]],
    seconds: float,
) -> None:
    """Write manifest.json: parameters, classes, sources, per-file digests, pixel counts."""
    files: dict[str, dict[str, list[str]]] = {split: {} for split in MOSAIC_SPLITS}
    pixel_counts: dict[str, np.ndarray] = {split: np.zeros(256, np.int64) for split in MOSAIC_SPLITS}
    for (split, _), records in zip(jobs, results):
        for name, image_sha, label_sha, histogram in records:
            files[split][name] = [image_sha, label_sha]
            pixel_counts[split] += np.asarray(histogram, np.int64)
    digest = hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest()
    manifest: dict[str, Any] = {
        "params": asdict(params),
        "stuff_classes": MOSAIC_CLASSES,
        "class_sources": {t.name: f"skimage.data.{t.skimage_function}" for t in MOSAIC_TEXTURES},
        "anomaly_sources": {t.name: f"skimage.data.{t.skimage_function}" for t in MOSAIC_ANOMALY_SOURCES},
        "label_pixel_counts": {
            split: {str(v): int(c) for v, c in enumerate(counts) if c} for split, counts in pixel_counts.items()
        },
        "digest": digest,
        "files": files,
        # Informational only; deliberately not part of `digest`.
        "generation_seconds": round(seconds, 2),
    }
    with open(os.path.join(dataset_dir, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, indent=1, sort_keys=True)


def _replace_dir(new_dir: str, final_dir: str) -> None:
    """Move `new_dir` to `final_dir`, replacing any old folder there (also used by the textures dataset)."""
    old_dir = None
    if os.path.lexists(final_dir):
        old_dir = os.path.join(os.path.dirname(final_dir), f".{os.path.basename(final_dir)}-old-{os.getpid()}")
        shutil.rmtree(old_dir, ignore_errors=True)
        os.rename(final_dir, old_dir)
    os.rename(new_dir, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def read_manifest(dataset_dir: str) -> dict[str, Any] | None:
    """The manifest of a generated dataset folder (mosaic, textures), or None if absent or unreadable."""
    try:
        with open(os.path.join(dataset_dir, MANIFEST_NAME)) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def is_mosaic_complete(dataset_dir: str, params: MosaicParams | None = None) -> bool:
    """Whether `dataset_dir` holds a finished generation (with `params`, if given).

    Checks the manifest and that every file it lists exists; it does not
    re-hash the files (that is what `digest` in the manifest is for).
    """
    manifest = read_manifest(dataset_dir)
    if manifest is None:
        return False
    if params is not None and manifest.get("params") != asdict(params):
        return False
    for split, names in manifest.get("files", {}).items():
        image_dir, label_dir = _split_dirs(dataset_dir, split)
        for name in names:
            if not (os.path.isfile(os.path.join(image_dir, name)) and os.path.isfile(os.path.join(label_dir, name))):
                return False
    return True


def ensure_mosaic_dataset(
    root: str | os.PathLike[str] | None = None,
    *,
    num_train: int = 2000,
    num_val: int = 200,
    num_anomaly: int = 100,
    image_size: int = 128,
    seed: int = 0,
    val_fraction: float = 0.25,
    num_workers: int | None = None,
) -> str:
    """Generate the dataset unless a complete one with these parameters exists.

    Returns the `mosaic/` folder. A missing, interrupted, or differently
    parameterised (or older-generator) dataset is regenerated; otherwise this
    is a cheap no-op.
    """
    params = MosaicParams(
        num_train=num_train,
        num_val=num_val,
        num_anomaly=num_anomaly,
        image_size=image_size,
        seed=seed,
        val_fraction=val_fraction,
    )
    dataset_dir = mosaic_dir(root)
    if is_mosaic_complete(dataset_dir, params):
        return dataset_dir
    return _generate(params, root, num_workers)


# ---------------------------------------------------------------------------
# Detectron2 registration
# ---------------------------------------------------------------------------


#: The layout, for the errors of a missing or incomplete dataset.
LAYOUT_TEXT = (
    "expected mosaic/images/{train,val,anomaly_val}/*.png, mosaic/annotations/{train,val,anomaly_val}/*.png "
    f"and mosaic/{MANIFEST_NAME} (written last; marks a complete generation)"
)


def _fix_text(root: str) -> str:
    return (f"python datasets/prepare_mosaic.py --root {os.path.abspath(root)}"
            f"  (then DETECTRON2_DATASETS={os.path.abspath(root)}); {LAYOUT_TEXT}")


def _metadata_fields(split: str, dataset_dir: str) -> dict[str, Any]:
    image_dir, label_dir = _split_dirs(dataset_dir, split)
    fields: dict[str, Any] = dict(
        stuff_classes=list(MOSAIC_CLASSES),
        stuff_colors=[list(c) for c in MOSAIC_COLORS],
        ignore_label=IGNORE_LABEL,
        image_root=image_dir,
        sem_seg_root=label_dir,
        evaluator_type="sem_seg",
    )
    if split == "anomaly_val":
        fields.update(
            evaluator_type="anomaly",
            anomaly_classes=["in-distribution", "anomaly"],
            anomaly_colors=[[0, 0, 0], [255, 255, 255]],
            anomaly_label=ANOMALY_LABEL,
        )
    return fields


def load_mosaic_split(split: str, root: str | os.PathLike[str] | None = None) -> list[dict]:
    """Detectron2 records of one split, via the standard `load_sem_seg`.

    `root` defaults to `$DETECTRON2_DATASETS`, read now. Raises
    :class:`~.common.DatasetNotReadyError` (a ``FileNotFoundError`` saying
    where it looked and how to generate the data) if the dataset is missing
    or incomplete.
    """
    dataset_name = MOSAIC_SPLITS[split][0]
    root = datasets_root() if root is None else os.fspath(root)
    dataset_dir = mosaic_dir(root)
    if not os.path.isdir(dataset_dir):
        raise DatasetNotReadyError(dataset_name, dataset_dir, "mosaic dataset not found", _fix_text(root))
    if not is_mosaic_complete(dataset_dir):
        raise DatasetNotReadyError(
            dataset_name, dataset_dir,
            f"incomplete mosaic dataset (no valid {MANIFEST_NAME} or files missing: interrupted generation?)",
            _fix_text(root))
    refresh_metadata(dataset_name, **_metadata_fields(split, dataset_dir))
    image_dir, label_dir = _split_dirs(dataset_dir, split)
    return load_sem_seg(label_dir, image_dir, gt_ext="png", image_ext="png")


_SPLIT_OF_DATASET = {dataset_name: split for split, (dataset_name, _) in MOSAIC_SPLITS.items()}


def _load(dataset_name: str, root: str) -> list[dict]:
    return load_mosaic_split(_SPLIT_OF_DATASET[dataset_name], root)


def _load_from_fixed_root(fixed_root: str, dataset_name: str, _current_root: str) -> list[dict]:
    return load_mosaic_split(_SPLIT_OF_DATASET[dataset_name], fixed_root)


def register_all_mosaic(root: str | os.PathLike[str] | None = None) -> None:
    """Register the three mosaic datasets (idempotent; touches no file).

    With `root=None` the loaders read `$DETECTRON2_DATASETS` when called; the
    metadata roots set here are refreshed to the actual root on loading.
    """
    for split, (dataset_name, _) in MOSAIC_SPLITS.items():
        load = _load if root is None else functools.partial(_load_from_fixed_root, os.fspath(root))
        register_checked(dataset_name, load, _metadata_fields(split, mosaic_dir(root)))


register_all_mosaic()
