"""The embedded "mosaic" dataset: texture-mosaic scenes built from photographs
that ship inside scikit-image, so the project can train and evaluate a real
model on a fresh machine with no download.

A scene partitions a square canvas into a noisy Voronoi tessellation (wavy
boundaries), optionally with one extra blob or polygon on top; every region is
filled with a crop of one texture photograph (one photograph per class), with
its own scale, rotation, flip, blur, brightness, contrast and colour jitter.
Region brightness and colour are drawn independently of the class, so a pixel's
class has to be read from the texture, not from its colour.

Splits (written once as PNGs, Detectron2 ADE20K-style layout)::

    $DETECTRON2_DATASETS/mosaic/
        images/{train,val,anomaly_val}/mosaic_<split>_<index>.png       RGB
        annotations/{train,val,anomaly_val}/mosaic_<split>_<index>.png  uint8 labels
        manifest.json                                                    written last

* ``train`` / ``val``: labels are class ids ``0..C-1``.  Train crops come from
  the first 75 % of each source photograph (along its longer side), val crops
  from the remaining 25 %, so val measures generalisation to unseen texture,
  not memorisation of the pixels seen in training.
* ``anomaly_val``: val-style scenes with 1-3 pasted objects textured by
  photographs that no training class uses.  Labels follow Fishyscapes:
  0 in-distribution, 1 anomaly, 255 void (a 2-pixel band on object borders,
  where the pixel mixes both).

Every image is drawn from its own random stream seeded by ``(seed, split,
index)``, so generation is order-independent, can run on several processes, and
regenerating with the same parameters gives byte-identical files.
``manifest.json`` records the parameters and a digest of every file and is
written last; a folder without it is an interrupted generation.

Importing this module registers ``mosaic_sem_seg_train``,
``mosaic_sem_seg_val`` and ``mosaic_anomaly_val`` with Detectron2; nothing is
generated or read until a dataset is requested.
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
from dataclasses import asdict, dataclass
from typing import Any, Sequence

import cv2
import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.data.datasets import load_sem_seg

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

# Bump whenever the generator's output changes for the same parameters, so an
# old dataset on disk is recognised as stale by `ensure_mosaic_dataset`.
GENERATOR_VERSION = 1

MANIFEST_NAME = "manifest.json"
IGNORE_LABEL = 255
ANOMALY_LABEL = 1
IN_DISTRIBUTION_LABEL = 0

#: split name -> (Detectron2 dataset name, number used in the per-image seed)
MOSAIC_SPLITS: dict[str, tuple[str, int]] = {
    "train": ("mosaic_sem_seg_train", 0),
    "val": ("mosaic_sem_seg_val", 1),
    "anomaly_val": ("mosaic_anomaly_val", 2),
}


@dataclass(frozen=True)
class MosaicTexture:
    """One texture class: a `skimage.data` photograph and how to sample it."""

    name: str
    skimage_function: str
    # Source pixels per output pixel before the per-region scale jitter;
    # chosen so a 128-pixel crop shows several texture elements (bricks,
    # stones, coins, letters) and the classes are tellable apart at 128².
    base_scale: float


#: The in-distribution classes, in label order.
MOSAIC_TEXTURES: tuple[MosaicTexture, ...] = (
    MosaicTexture("brick", "brick", 1.0),
    MosaicTexture("grass", "grass", 1.0),
    MosaicTexture("gravel", "gravel", 1.0),
    MosaicTexture("moon", "moon", 1.5),
    MosaicTexture("coins", "coins", 1.0),
    MosaicTexture("handwriting", "text", 0.8),
    MosaicTexture("tissue", "immunohistochemistry", 1.0),
    MosaicTexture("galaxies", "hubble_deep_field", 1.5),
)
MOSAIC_CLASSES: list[str] = [t.name for t in MOSAIC_TEXTURES]
MOSAIC_COLORS: list[list[int]] = [
    [178, 34, 34],  # brick: firebrick
    [34, 139, 34],  # grass: forest green
    [128, 128, 128],  # gravel: grey
    [240, 230, 140],  # moon: khaki
    [255, 165, 0],  # coins: orange
    [30, 144, 255],  # handwriting: dodger blue
    [199, 21, 133],  # tissue: violet red
    [72, 61, 139],  # galaxies: slate blue
]

#: Photographs used only for anomalous objects; none is a training source.
MOSAIC_ANOMALY_SOURCES: tuple[MosaicTexture, ...] = (
    MosaicTexture("astronaut", "astronaut", 1.0),
    MosaicTexture("cat", "chelsea", 0.8),
    MosaicTexture("coffee", "coffee", 1.0),
    MosaicTexture("rocket", "rocket", 1.0),
    MosaicTexture("motorcycle", "stereo_motorcycle", 1.2),
    MosaicTexture("cameraman", "camera", 1.0),
)


@dataclass(frozen=True)
class MosaicParams:
    """Everything that determines the generated files (stored in the manifest)."""

    num_train: int = 2000
    num_val: int = 200
    num_anomaly: int = 100
    image_size: int = 128
    seed: int = 0
    # Fraction of each training photograph (along its longer side) reserved
    # for val/anomaly_val crops.
    val_fraction: float = 0.25
    generator_version: int = GENERATOR_VERSION

    def count(self, split: str) -> int:
        return {"train": self.num_train, "val": self.num_val, "anomaly_val": self.num_anomaly}[
            split
        ]


# ---------------------------------------------------------------------------
# Paths
# ---------------------------------------------------------------------------


def default_datasets_root() -> str:
    """`$DETECTRON2_DATASETS` (read now, not at import) or Detectron2's default `./datasets`."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def mosaic_dir(root: str | os.PathLike[str] | None = None) -> str:
    """The `mosaic/` folder under a datasets root (default: `default_datasets_root()`)."""
    return os.path.join(os.fspath(root) if root is not None else default_datasets_root(), "mosaic")


def _split_dirs(dataset_dir: str, split: str) -> tuple[str, str]:
    """(image folder, annotation folder) of one split."""
    return (
        os.path.join(dataset_dir, "images", split),
        os.path.join(dataset_dir, "annotations", split),
    )


def _file_name(split: str, index: int) -> str:
    return f"mosaic_{split}_{index:06d}.png"


# ---------------------------------------------------------------------------
# Texture sources
# ---------------------------------------------------------------------------


def _load_skimage_photo(function_name: str) -> np.ndarray:
    """An RGB uint8 photograph from `skimage.data` (all chosen ones ship offline)."""
    import skimage.data

    photo = getattr(skimage.data, function_name)()
    if isinstance(photo, tuple):  # stereo_motorcycle -> (left, right, disparity)
        photo = photo[0]
    photo = np.asarray(photo)
    if photo.ndim == 2:
        photo = np.repeat(photo[:, :, None], 3, axis=2)
    return np.ascontiguousarray(photo[:, :, :3]).astype(np.uint8)


def _standardise(photo: np.ndarray) -> np.ndarray:
    """Float32 texture with zero mean per channel and unit luminance std.

    Removing each photograph's own brightness, tint and contrast means the
    per-region appearance jitter alone sets those, identically for all classes.
    Per-channel deviations are kept, so colour *structure* (brown membranes vs
    blue nuclei in the tissue photo) survives.
    """
    pixels = photo.astype(np.float32) / 255.0
    centred = pixels - pixels.reshape(-1, 3).mean(axis=0)
    luminance_std = float(centred.mean(axis=2).std())
    return np.ascontiguousarray(centred / max(luminance_std, 1e-3), dtype=np.float32)


def _split_photo(photo: np.ndarray, val_fraction: float) -> dict[str, np.ndarray]:
    """Cut a photo along its longer side: first part for train, rest for val."""
    height, width = photo.shape[:2]
    if height >= width:
        cut = int(round(height * (1.0 - val_fraction)))
        train, val = photo[:cut], photo[cut:]
    else:
        cut = int(round(width * (1.0 - val_fraction)))
        train, val = photo[:, :cut], photo[:, cut:]
    return {"train": np.ascontiguousarray(train), "val": np.ascontiguousarray(val)}


@functools.lru_cache(maxsize=4)
def _texture_bank(val_fraction: float) -> dict[str, list[np.ndarray]]:
    """Standardised source crops for each split, computed once per process.

    `train` and `val` hold one array per class (disjoint parts of the same
    photo); `anomaly` holds one array per anomaly photograph (used whole:
    no model ever trains on them).
    """
    bank: dict[str, list[np.ndarray]] = {"train": [], "val": [], "anomaly": []}
    for texture in MOSAIC_TEXTURES:
        parts = _split_photo(_standardise(_load_skimage_photo(texture.skimage_function)), val_fraction)
        bank["train"].append(parts["train"])
        bank["val"].append(parts["val"])
    for texture in MOSAIC_ANOMALY_SOURCES:
        bank["anomaly"].append(_standardise(_load_skimage_photo(texture.skimage_function)))
    return bank


# ---------------------------------------------------------------------------
# Scene rendering
# ---------------------------------------------------------------------------


def _smooth_noise(rng: np.random.Generator, size: int, grid: int) -> np.ndarray:
    """A (size, size) smooth random field of roughly unit amplitude."""
    coarse = rng.standard_normal((grid, grid)).astype(np.float32)
    return cv2.resize(coarse, (size, size), interpolation=cv2.INTER_CUBIC)


def _noisy_voronoi(rng: np.random.Generator, size: int, num_cells: int) -> np.ndarray:
    """Cell index per pixel of a Voronoi tessellation with wavy borders.

    Distances are measured from displaced pixel coordinates; the smooth
    displacement bends the straight Voronoi edges into organic boundaries.
    """
    seeds = rng.uniform(0, size, size=(num_cells, 2)).astype(np.float32)
    amplitude = rng.uniform(0.05, 0.15) * size
    grid = int(rng.integers(3, 7))
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    rows = rows + amplitude * _smooth_noise(rng, size, grid)
    cols = cols + amplitude * _smooth_noise(rng, size, grid)
    distances = (rows[None] - seeds[:, 0, None, None]) ** 2 + (cols[None] - seeds[:, 1, None, None]) ** 2
    return np.argmin(distances, axis=0)


def _random_shape(rng: np.random.Generator, size: int, min_radius: float, max_radius: float) -> np.ndarray:
    """Boolean mask of a blob or polygon covering at least ~a third of a `min_radius` disc.

    Thin slivers (random polygons can be nearly degenerate) are redrawn, so
    every pasted object keeps an interior once its border is voided.
    """
    min_area = 0.35 * np.pi * min_radius**2
    while True:
        shape = _draw_shape(rng, size, min_radius, max_radius)
        if shape.sum() >= min_area:
            return shape


def _draw_shape(rng: np.random.Generator, size: int, min_radius: float, max_radius: float) -> np.ndarray:
    """Boolean mask of a smooth star-shaped blob or a random polygon."""
    radius = rng.uniform(min_radius, max_radius)
    margin = radius * 0.5  # the shape may run off the canvas, but not vanish
    center_row, center_col = rng.uniform(margin, size - margin, size=2)
    if rng.random() < 0.5:
        # Blob: radius modulated by a few low-frequency harmonics of the angle.
        rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
        angle = np.arctan2(rows - center_row, cols - center_col)
        boundary = np.ones_like(angle)
        for harmonic in (2, 3, 4):
            boundary += rng.uniform(0.0, 0.3 / harmonic * 2) * np.cos(harmonic * angle + rng.uniform(0, 2 * np.pi))
        return np.hypot(rows - center_row, cols - center_col) <= radius * boundary
    num_vertices = int(rng.integers(3, 8))
    angles = np.sort(rng.uniform(0, 2 * np.pi, num_vertices))
    radii = radius * rng.uniform(0.55, 1.0, num_vertices)
    # cv2 takes (x, y) points; 4 fractional bits keep the vertices sub-pixel.
    points = np.stack([center_col + radii * np.cos(angles), center_row + radii * np.sin(angles)], axis=1)
    mask = np.zeros((size, size), np.uint8)
    cv2.fillPoly(mask, [np.round(points * 16).astype(np.int32)], 1, lineType=cv2.LINE_8, shift=4)
    return mask.astype(bool)


def _render_texture(
    rng: np.random.Generator, source: np.ndarray, size: int, base_scale: float, window: tuple[int, int, int, int]
) -> np.ndarray:
    """Part `window` = (top, left, height, width) of a (size, size, 3) crop of `source`.

    The crop is randomly scaled, rotated and flipped, and centred anywhere in
    the source; pixels falling outside the source are mirrored back inside,
    so a crop never reads pixels of another split. Only the window is
    computed because a region rarely covers the whole canvas.
    """
    scale = base_scale * float(np.exp(rng.uniform(np.log(0.7), np.log(1.4))))
    angle = rng.uniform(0, 2 * np.pi)
    flip = -1.0 if rng.random() < 0.5 else 1.0
    height, width = source.shape[:2]
    center = np.array([rng.uniform(0, width), rng.uniform(0, height)])
    # Canvas pixel (x, y) reads source pixel center + linear @ ((x, y) - size/2);
    # the window's pixel (0, 0) is canvas pixel (left, top).
    cos_a, sin_a = np.cos(angle) * scale, np.sin(angle) * scale
    linear = np.array([[cos_a * flip, -sin_a], [sin_a * flip, cos_a]])
    top, left, window_height, window_width = window
    offset = center + linear @ np.array([left - size / 2.0, top - size / 2.0])
    window_to_source = np.hstack([linear, offset[:, None]]).astype(np.float64)
    return cv2.warpAffine(
        source,
        window_to_source,
        (window_width, window_height),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_REFLECT_101,
    )


def _jitter_appearance(rng: np.random.Generator, texture: np.ndarray) -> np.ndarray:
    """Give a standardised texture a random blur, brightness, contrast and tint.

    All draws are independent of the class, which is what makes mean colour
    useless as a cue (tests check this).
    """
    if rng.random() < 0.3:
        texture = cv2.GaussianBlur(texture, (0, 0), sigmaX=rng.uniform(0.5, 1.2))
    luminance = rng.uniform(0.25, 0.75)
    tint = rng.normal(0.0, 0.06, size=3)
    base_colour = (luminance + tint - tint.mean()).astype(np.float32)
    contrast = float(np.exp(rng.uniform(np.log(0.07), np.log(0.2))))
    channel_gains = (contrast * np.exp(rng.normal(0.0, 0.15, size=3))).astype(np.float32)
    return base_colour + channel_gains * texture


def _paint_region(
    rng: np.random.Generator, image: np.ndarray, region: np.ndarray, source: np.ndarray, base_scale: float
) -> None:
    """Fill `region` (bool mask) of `image` in place with a jittered crop of `source`."""
    rows, cols = np.nonzero(region.any(axis=1))[0], np.nonzero(region.any(axis=0))[0]
    if rows.size == 0:
        return
    size = image.shape[0]
    margin = 3  # context for the optional blur
    top, bottom = max(int(rows[0]) - margin, 0), min(int(rows[-1]) + 1 + margin, size)
    left, right = max(int(cols[0]) - margin, 0), min(int(cols[-1]) + 1 + margin, size)
    texture = _render_texture(rng, source, size, base_scale, (top, left, bottom - top, right - left))
    patch = _jitter_appearance(rng, texture)
    np.copyto(image[top:bottom, left:right], patch, where=region[top:bottom, left:right, None])


def render_scene(
    split: str, index: int, params: MosaicParams = MosaicParams()
) -> tuple[np.ndarray, np.ndarray]:
    """Render one scene of a split: (RGB uint8 image (S,S,3), uint8 label map (S,S)).

    Pure function of `(params, split, index)`; this is what the files hold.
    """
    if split not in MOSAIC_SPLITS:
        raise ValueError(f"Unknown mosaic split {split!r}; expected one of {sorted(MOSAIC_SPLITS)}")
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(MOSAIC_SPLITS[split][1], index)))
    bank = _texture_bank(params.val_fraction)
    sources = bank["train"] if split == "train" else bank["val"]
    size = params.image_size
    num_classes = len(MOSAIC_TEXTURES)

    # Distinct classes per cell (sampling without replacement) keeps the
    # classes balanced and makes every region border a class border.
    num_cells = int(rng.integers(2, 7))
    cell_classes = rng.choice(num_classes, size=num_cells + 1, replace=False)
    class_map = cell_classes[:num_cells][_noisy_voronoi(rng, size, num_cells)]
    if rng.random() < 0.5:  # an island of one more class, so not all regions are convex-ish cells
        class_map[_random_shape(rng, size, 0.12 * size, 0.3 * size)] = cell_classes[num_cells]

    image = np.zeros((size, size, 3), np.float32)
    for class_id in np.unique(class_map):
        _paint_region(rng, image, class_map == class_id, sources[class_id], MOSAIC_TEXTURES[class_id].base_scale)
    label = class_map.astype(np.uint8)

    if split == "anomaly_val":
        anomaly_mask = np.zeros((size, size), bool)
        for _ in range(int(rng.integers(1, 4))):
            source_id = int(rng.integers(len(MOSAIC_ANOMALY_SOURCES)))
            source = MOSAIC_ANOMALY_SOURCES[source_id]
            shape = _random_shape(rng, size, 0.1 * size, 0.25 * size)
            _paint_region(rng, image, shape, bank["anomaly"][source_id], source.base_scale)
            anomaly_mask |= shape
        label = np.full((size, size), IN_DISTRIBUTION_LABEL, np.uint8)
        label[anomaly_mask] = ANOMALY_LABEL
        # Border pixels mix object and background: void, as in Fishyscapes.
        kernel = np.ones((3, 3), np.uint8)
        mask_u8 = anomaly_mask.astype(np.uint8)
        border = cv2.dilate(mask_u8, kernel) != cv2.erode(mask_u8, kernel)
        label[border] = IGNORE_LABEL

    # Sensor-like noise over the whole image, so no region is perfectly smooth.
    image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(rng.uniform(0.0, 0.02))
    image_u8 = np.clip(np.rint(image * 255.0), 0, 255).astype(np.uint8)
    return image_u8, label


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------


def _png_bytes(array: np.ndarray) -> bytes:
    """PNG encoding with fixed settings and no metadata (deterministic bytes).

    Level 1: the noisy images barely compress further, and it is ~2x faster than 6.
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
        if num_workers <= 1 or "fork" not in multiprocessing.get_all_start_methods():
            results = [_write_scenes(staging_dir, split, chunk, params) for split, chunk in jobs]
        else:
            # Fork, not spawn: workers inherit the loaded photos and skip
            # re-importing torch/detectron2. A fork-context Pool forks all its
            # workers before starting any helper thread (ProcessPoolExecutor
            # forks on demand while its feeder thread runs). Workers must not
            # call cv2.setNumThreads: in a forked child that hung under pytest.
            with multiprocessing.get_context("fork").Pool(num_workers) as pool:
                results = pool.starmap(_write_scenes, [(staging_dir, split, chunk, params) for split, chunk in jobs])
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
    """Move `new_dir` to `final_dir`, replacing any old folder there."""
    old_dir = None
    if os.path.lexists(final_dir):
        old_dir = os.path.join(os.path.dirname(final_dir), f".mosaic-old-{os.getpid()}")
        shutil.rmtree(old_dir, ignore_errors=True)
        os.rename(final_dir, old_dir)
    os.rename(new_dir, final_dir)
    if old_dir is not None:
        shutil.rmtree(old_dir, ignore_errors=True)


def read_manifest(dataset_dir: str) -> dict[str, Any] | None:
    """The manifest of a mosaic folder, or None if it is absent or unreadable."""
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


def _missing_dataset_error(dataset_dir: str, reason: str) -> FileNotFoundError:
    env_value = os.getenv("DETECTRON2_DATASETS")
    env_text = f"DETECTRON2_DATASETS={env_value!r}" if env_value is not None else "DETECTRON2_DATASETS is unset, so the default './datasets' is used"
    return FileNotFoundError(
        f"Mosaic dataset {reason} at '{os.path.abspath(dataset_dir)}' ({env_text}).\n"
        "Expected layout:\n"
        "  <DETECTRON2_DATASETS>/mosaic/images/{train,val,anomaly_val}/*.png\n"
        "  <DETECTRON2_DATASETS>/mosaic/annotations/{train,val,anomaly_val}/*.png\n"
        f"  <DETECTRON2_DATASETS>/mosaic/{MANIFEST_NAME}  (written last; marks a complete generation)\n"
        "Generate it with:  python datasets/prepare_mosaic.py"
        " (or `--root DIR`, then set DETECTRON2_DATASETS=DIR)"
    )


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


def _set_metadata(dataset_name: str, split: str, dataset_dir: str) -> None:
    """Set the metadata, re-creating it when the data root changed since registration.

    Detectron2 refuses to overwrite a metadata field with a different value, yet
    `$DETECTRON2_DATASETS` may change after import (tests, notebooks); the
    roots in the metadata must then follow the data actually loaded.
    """
    fields = _metadata_fields(split, dataset_dir)
    if dataset_name in MetadataCatalog.list():
        current = MetadataCatalog.get(dataset_name)
        if getattr(current, "image_root", fields["image_root"]) != fields["image_root"]:
            MetadataCatalog.remove(dataset_name)
    MetadataCatalog.get(dataset_name).set(**fields)


def load_mosaic_split(split: str, root: str | os.PathLike[str] | None = None) -> list[dict]:
    """Detectron2 records of one split, via the standard `load_sem_seg`.

    `root` defaults to `$DETECTRON2_DATASETS`, read now. Raises
    `FileNotFoundError` (saying where it looked and how to generate the data)
    if the dataset is missing or incomplete.
    """
    dataset_dir = mosaic_dir(root)
    if not os.path.isdir(dataset_dir):
        raise _missing_dataset_error(dataset_dir, "not found")
    if not is_mosaic_complete(dataset_dir):
        raise _missing_dataset_error(dataset_dir, f"incomplete (no valid {MANIFEST_NAME} or files missing)")
    _set_metadata(MOSAIC_SPLITS[split][0], split, dataset_dir)
    image_dir, label_dir = _split_dirs(dataset_dir, split)
    return load_sem_seg(label_dir, image_dir, gt_ext="png", image_ext="png")


def register_all_mosaic(root: str | os.PathLike[str] | None = None) -> None:
    """Register the three mosaic datasets (idempotent; touches no file).

    With `root=None` the loaders read `$DETECTRON2_DATASETS` when called; the
    metadata roots set here are refreshed to the actual root on loading.
    """
    for split, (dataset_name, _) in MOSAIC_SPLITS.items():
        if dataset_name not in DatasetCatalog.list():
            DatasetCatalog.register(dataset_name, functools.partial(load_mosaic_split, split, root))
        _set_metadata(dataset_name, split, mosaic_dir(root))


register_all_mosaic()
