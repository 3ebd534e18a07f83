"""Scene generator of the embedded "mosaic" dataset: texture mosaics cut from
photographs that ship inside scikit-image.

A scene partitions a square canvas into a noisy Voronoi tessellation (wavy
boundaries), optionally with one extra blob or polygon on top; every region is
filled with a crop of one texture photograph (one photograph per class), with
its own scale, rotation, flip, blur, brightness, contrast and colour jitter.
Region brightness and colour are drawn independently of the class, so a pixel's
class has to be read from the texture, not from its colour.

* ``train`` / ``val``: labels are class ids ``0..C-1``.  Train crops come from
  the first 75 % of each source photograph (along its longer side), val crops
  from the remaining 25 %, so val measures generalisation to unseen texture,
  not memorisation of the pixels seen in training.
* ``anomaly_val``: val-style scenes with 1-3 pasted objects textured by
  photographs that no training class uses.  Labels follow Fishyscapes:
  0 in-distribution, 1 anomaly, 255 void (a 2-pixel band on object borders,
  where the pixel mixes both).

Every scene is drawn from its own random stream seeded by ``(seed, split,
index)`` (:func:`render_scene` is a pure function of them). Writing the scenes
to disk and registering them with Detectron2 is :mod:`.mosaic`'s job; the
texture benchmark (:mod:`.textures`) reuses the texture sampling here.
"""

from __future__ import annotations

import functools
from dataclasses import dataclass

import cv2
import numpy as np

__all__ = [
    "MOSAIC_CLASSES",
    "MOSAIC_COLORS",
    "MOSAIC_TEXTURES",
    "MOSAIC_ANOMALY_SOURCES",
    "MOSAIC_SPLITS",
    "MosaicTexture",
    "MosaicParams",
    "render_scene",
]

# Bump whenever the generator's output changes for the same parameters, so an
# old dataset on disk is recognised as stale by `ensure_mosaic_dataset`.
GENERATOR_VERSION = 1

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
