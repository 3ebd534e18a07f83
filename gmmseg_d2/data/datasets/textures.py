"""The procedural "textures" benchmark: learnable, controllable open-world
segmentation scenes generated from parametric texture families.

(Long on purpose: the declarative class table, the renderer, the writer and
the registration share one parameter set and one ``GENERATOR_VERSION``, which
fixes the bytes on disk; the table and its disjointness check read best next
to the renderer that interprets them.)

A scene partitions a square canvas (default 64x64) into 2-4 large regions
(a Voronoi tessellation with straight or mildly wavy edges, sometimes with a
pasted blob/polygon on top). Every region is filled with a *stationary*
procedural texture, rendered over the whole canvas and then hard-masked: no
blur or antialiasing crosses a region border, so each pixel belongs to exactly
one region and needs no void band.

In-distribution classes (:data:`TEXTURE_CLASSES`) are boxes in parameter
space: a family (grating, square-wave stripes, dot lattice, checkerboard,
pink noise) plus ranges of orientation, period (1 / spatial frequency), hue,
contrast and family-specific shape parameters. Anomalies are

* near-OOD (:data:`NEAR_OOD_TEXTURES`): the classes' own families with one or
  two parameters taken from a band no class of that family uses (recorded in
  ``held_out``), and
* far-OOD (:data:`FAR_OOD_TEXTURES`): families no class uses (Gabor noise,
  brown noise, concentric rings, scribbles) and photo patches of the mosaic
  dataset's held-out skimage photographs.

:func:`check_texture_table` asserts the held-out bands are disjoint from
every same-family class band (periodic orientation mod 180 or 90, hue mod
360); it runs at import.

Layout (ADE20K-style, under ``$DETECTRON2_DATASETS/textures/``)::

    images/<split>/textures_<split>_<index>.png                RGB
    annotations/<split>/textures_<split>_<index>.png           labels
    regions/<split>/textures_<split>_<index>.png               region index per pixel
    annotations_semantic/<anomaly split>/textures_<...>.png    class id, 255 on anomaly
    manifest.json                                               written last

Every image comes from its own random stream seeded by ``(seed, split,
index)``: generation is order- and worker-count-independent and byte-identical
for the same parameters. Importing the module registers the datasets (see
:data:`TEXTURES_SPLITS`) and touches no file.
"""

from __future__ import annotations

import colorsys
import functools
import hashlib
import itertools
import json
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Optional, Sequence

import cv2
import numpy as np

from .common import DatasetNotReadyError, datasets_root, refresh_metadata, register_checked
from .mosaic import _chunks, _replace_dir, _starmap, read_manifest
from .mosaic_generator import (
    MOSAIC_ANOMALY_SOURCES,
    _random_shape,
    _render_texture,
    _smooth_noise,
    _texture_bank,
)

__all__ = [
    "Range",
    "TextureSpec",
    "TexturesParams",
    "TEXTURE_CLASSES",
    "TEXTURES_CLASSES",
    "TEXTURES_COLORS",
    "NEAR_OOD_TEXTURES",
    "FAR_OOD_TEXTURES",
    "CLASS_FAMILIES",
    "ORIENTATION_PERIOD",
    "TEXTURES_SPLITS",
    "intervals_overlap",
    "check_texture_table",
    "render_texture_scene",
    "scene_textures",
    "render_layout",
    "textures_dir",
    "generate_textures_dataset",
    "ensure_textures_dataset",
    "is_textures_complete",
    "read_textures_manifest",
    "load_textures_split",
    "register_all_textures",
]

#: Bump whenever the output changes for the same parameters (stale on disk then).
GENERATOR_VERSION = 2
MANIFEST_NAME = "manifest.json"
IGNORE_LABEL = 255
IN_DISTRIBUTION_LABEL = 0
ANOMALY_LABEL = 1
#: Regions smaller than this (at 64x64; scaled with the area) are redrawn.
MIN_REGION_PIXELS_64 = 300
#: Fraction of the pixels the anomaly regions of one anomaly image cover.
ANOMALY_COVERAGE = (0.15, 0.40)

# ---------------------------------------------------------------------------
# Declarative parameter table
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class Range:
    """A closed interval ``[lo, hi]``; a periodic parameter may have ``lo < 0``
    (e.g. hue ``Range(-8, 8)`` is 352..8 degrees)."""

    lo: float
    hi: float

    def __post_init__(self) -> None:
        if not self.hi >= self.lo:
            raise ValueError(f"empty range {self}")

    def sample(self, rng: np.random.Generator) -> float:
        return float(rng.uniform(self.lo, self.hi))


def intervals_overlap(a: Range, b: Range, period: Optional[float] = None) -> bool:
    """Whether closed intervals intersect (on the circle of ``period`` if given)."""
    if period is None:
        return a.lo <= b.hi and b.lo <= a.hi
    if a.hi - a.lo >= period or b.hi - b.lo >= period:
        return True
    shift = (b.lo - a.lo) // period * period  # move b next to a, then try neighbours
    for k in (-1, 0, 1, 2):
        lo, hi = b.lo - shift + k * period, b.hi - shift + k * period
        if a.lo <= hi and lo <= a.hi:
            return True
    return False


#: Period of the orientation of each family (degrees); None: isotropic.
ORIENTATION_PERIOD: dict[str, Optional[float]] = {
    "grating": 180.0,
    "stripes": 180.0,
    "dots": 90.0,  # square lattice
    "checker": 90.0,
    "pink_noise": None,
    "gabor_noise": 180.0,
    "brown_noise": None,
    "rings": None,
    "scribbles": None,
    "photo": None,
}
HUE_PERIOD = 360.0

#: Parameters compared for near-OOD disjointness: field -> (held-out name, periodic?).
PARAMETERS = {
    "orientation": "orientation",
    "period": "frequency",
    "hue": "hue",
    "duty": "duty",
    "radius": "radius",
    "beta": "frequency",
}


@dataclass(frozen=True)
class TextureSpec:
    """One box of texture-parameter space.

    orientation: degrees, counter-clockwise from horizontal, of the bars
        (grating/stripes) or the lattice axes (dots/checker/Gabor kernels).
    period: pixels per cycle (grating/stripes/rings/Gabor), lattice spacing
        (dots) or cell side (checker).
    hue: HSV hue in degrees of the colour pair; the pair is a dark and a light
        colour of that hue, ``contrast`` sets how far apart (0..1).
    duty: stripes' fraction of the period in the light colour.
    radius: dots' radius as a fraction of the spacing.
    beta: 1/f^beta noise's exponent of the power spectrum.
    held_out / reference: near-OOD only, which parameters are taken from a
        band no class of the family uses, and the nearest class (which
        differs in exactly those parameters).
    """

    name: str
    family: str
    hue: Optional[Range]
    contrast: Range = Range(0.55, 0.9)
    orientation: Optional[Range] = None
    period: Optional[Range] = None
    duty: Optional[Range] = None
    radius: Optional[Range] = None
    beta: Optional[Range] = None
    held_out: tuple[str, ...] = ()
    reference: Optional[str] = None


R = Range
#: The in-distribution classes, in label order.
TEXTURE_CLASSES: tuple[TextureSpec, ...] = (
    TextureSpec("grating_horizontal_red", "grating", hue=R(-8, 8), orientation=R(-15, 15), period=R(9, 13)),
    TextureSpec("grating_vertical_blue", "grating", hue=R(217, 233), orientation=R(75, 105), period=R(9, 13)),
    TextureSpec("grating_diagonal_fine_green", "grating", hue=R(107, 123), orientation=R(33, 57), period=R(4.5, 6.5)),
    TextureSpec("stripes_antidiagonal_magenta", "stripes", hue=R(307, 323), orientation=R(123, 147),
                period=R(10, 14), duty=R(0.3, 0.45)),
    TextureSpec("dots_sparse_yellow", "dots", hue=R(52, 68), orientation=R(0, 90), period=R(9, 12),
                radius=R(0.22, 0.3)),
    TextureSpec("dots_dense_violet", "dots", hue=R(262, 278), orientation=R(0, 90), period=R(5, 6.5),
                radius=R(0.3, 0.38)),
    TextureSpec("checker_cyan", "checker", hue=R(172, 188), orientation=R(-10, 10), period=R(5, 8)),
    TextureSpec("pink_noise_orange", "pink_noise", hue=R(27, 43), beta=R(0.8, 1.2), contrast=R(0.7, 1.0)),
)

#: Near-OOD: class families with held-out bands (see ``held_out``/``reference``).
NEAR_OOD_TEXTURES: tuple[TextureSpec, ...] = (
    TextureSpec("grating_oblique_red", "grating", hue=R(-8, 8), orientation=R(125, 145), period=R(9, 13),
                held_out=("orientation",), reference="grating_horizontal_red"),
    TextureSpec("grating_vertical_coarse_blue", "grating", hue=R(217, 233), orientation=R(75, 105),
                period=R(16, 20), held_out=("frequency",), reference="grating_vertical_blue"),
    TextureSpec("grating_horizontal_teal", "grating", hue=R(150, 162), orientation=R(-15, 15), period=R(9, 13),
                held_out=("hue",), reference="grating_horizontal_red"),
    TextureSpec("grating_oblique_coarse_green", "grating", hue=R(107, 123), orientation=R(125, 145),
                period=R(16, 20), held_out=("orientation", "frequency"), reference="grating_diagonal_fine_green"),
    TextureSpec("stripes_diagonal_magenta", "stripes", hue=R(307, 323), orientation=R(33, 57), period=R(10, 14),
                duty=R(0.3, 0.45), held_out=("orientation",), reference="stripes_antidiagonal_magenta"),
    TextureSpec("dots_sparse_red", "dots", hue=R(-8, 8), orientation=R(0, 90), period=R(9, 12),
                radius=R(0.22, 0.3), held_out=("hue",), reference="dots_sparse_yellow"),
    TextureSpec("dots_medium_violet", "dots", hue=R(262, 278), orientation=R(0, 90), period=R(7.3, 8.3),
                radius=R(0.3, 0.38), held_out=("frequency",), reference="dots_dense_violet"),
    TextureSpec("checker_rotated_cyan", "checker", hue=R(172, 188), orientation=R(37, 53), period=R(5, 8),
                held_out=("orientation",), reference="checker_cyan"),
    TextureSpec("checker_coarse_cyan", "checker", hue=R(172, 188), orientation=R(-10, 10), period=R(11, 15),
                held_out=("frequency",), reference="checker_cyan"),
    TextureSpec("pink_noise_azure", "pink_noise", hue=R(195, 207), beta=R(0.8, 1.2), contrast=R(0.7, 1.0),
                held_out=("hue",), reference="pink_noise_orange"),
)

#: Far-OOD: families no class uses, any hue, and photo patches.
FAR_OOD_TEXTURES: tuple[TextureSpec, ...] = (
    TextureSpec("gabor_noise", "gabor_noise", hue=R(0, 360), orientation=R(0, 180), period=R(5, 12)),
    TextureSpec("brown_noise", "brown_noise", hue=R(0, 360), beta=R(1.8, 2.2), contrast=R(0.7, 1.0)),
    TextureSpec("rings", "rings", hue=R(0, 360), period=R(5, 12)),
    TextureSpec("scribbles", "scribbles", hue=R(0, 360)),
    TextureSpec("photo", "photo", hue=None),
)
del R

TEXTURES_CLASSES: list[str] = [spec.name for spec in TEXTURE_CLASSES]
CLASS_FAMILIES: frozenset[str] = frozenset(spec.family for spec in TEXTURE_CLASSES)


def _hsv_rgb(hue: float, saturation: float, value: float) -> np.ndarray:
    return np.array(colorsys.hsv_to_rgb((hue % 360.0) / 360.0, saturation, value), np.float32)


#: Visualisation colour of each class: its hue centre.
TEXTURES_COLORS: list[list[int]] = [
    [int(round(255 * c)) for c in _hsv_rgb((s.hue.lo + s.hue.hi) / 2, 0.75, 0.85)] for s in TEXTURE_CLASSES
]


def check_texture_table() -> None:
    """Assert the table's promises (raises AssertionError otherwise).

    * class names unique, every near/far name unique;
    * each near-OOD texture's family is a class family, its ``reference``
      class is of that family and differs from it in exactly the ``held_out``
      parameters, and each held-out band is disjoint from that parameter's
      band in *every* class of the family (orientation modulo the family's
      period, hue modulo 360);
    * no far-OOD family is a class family.
    """
    names = [s.name for s in TEXTURE_CLASSES + NEAR_OOD_TEXTURES + FAR_OOD_TEXTURES]
    assert len(names) == len(set(names)), "duplicate texture names"
    by_name = {s.name: s for s in TEXTURE_CLASSES}
    for near in NEAR_OOD_TEXTURES:
        assert near.family in CLASS_FAMILIES, f"{near.name}: family {near.family} is not a class family"
        assert near.held_out, f"{near.name}: no held-out parameter"
        reference = by_name.get(near.reference or "")
        assert reference is not None and reference.family == near.family, f"{near.name}: bad reference"
        differing = {PARAMETERS[f] for f in PARAMETERS if getattr(near, f) != getattr(reference, f)}
        assert differing == set(near.held_out), f"{near.name}: differs from {reference.name} in {differing}"
        assert 1 <= len(near.held_out) <= 2
        for field_name, kind in PARAMETERS.items():
            if kind not in near.held_out or getattr(near, field_name) == getattr(reference, field_name):
                continue
            period = ORIENTATION_PERIOD[near.family] if field_name == "orientation" else (
                HUE_PERIOD if field_name == "hue" else None
            )
            for cls in TEXTURE_CLASSES:
                if cls.family != near.family:
                    continue
                assert not intervals_overlap(getattr(near, field_name), getattr(cls, field_name), period), (
                    f"{near.name}: held-out {field_name} {getattr(near, field_name)} overlaps class {cls.name}"
                )
    for far in FAR_OOD_TEXTURES:
        assert far.family not in CLASS_FAMILIES, f"far-OOD {far.name} uses class family {far.family}"


check_texture_table()

# ---------------------------------------------------------------------------
# Parameters and splits
# ---------------------------------------------------------------------------

#: split -> (registered name, seed stream, kind: "sem_seg" / "near" / "far")
TEXTURES_SPLITS: dict[str, tuple[str, int, str]] = {
    "train": ("textures_sem_seg_train", 0, "sem_seg"),
    "val": ("textures_sem_seg_val", 1, "sem_seg"),
    "test": ("textures_sem_seg_test", 2, "sem_seg"),
    "anomaly_near_val": ("textures_anomaly_near_val", 3, "near"),
    "anomaly_far_val": ("textures_anomaly_far_val", 4, "far"),
    "anomaly_near_test": ("textures_anomaly_near_test", 5, "near"),
    "anomaly_far_test": ("textures_anomaly_far_test", 6, "far"),
}


@dataclass(frozen=True)
class TexturesParams:
    """Everything that determines the generated files (stored in the manifest)."""

    num_train: int = 24000
    num_val: int = 500
    num_test: int = 500
    num_anomaly_val: int = 200
    num_anomaly_test: int = 300
    image_size: int = 64
    seed: int = 0
    min_regions: int = 2
    max_regions: int = 4
    generator_version: int = GENERATOR_VERSION

    def count(self, split: str) -> int:
        if split in ("train", "val", "test"):
            return getattr(self, f"num_{split}")
        return self.num_anomaly_val if split.endswith("_val") else self.num_anomaly_test

    @property
    def min_region_pixels(self) -> int:
        return int(round(MIN_REGION_PIXELS_64 * (self.image_size / 64.0) ** 2))


# ---------------------------------------------------------------------------
# Texture rendering
# ---------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _grid(size: int) -> tuple[np.ndarray, np.ndarray]:
    """(x, y) pixel coordinates, y pointing *up* so angles read counter-clockwise."""
    rows, cols = np.mgrid[0:size, 0:size].astype(np.float32)
    return cols, (size - 1) - rows


@functools.lru_cache(maxsize=8)
def _radial_frequency(size: int) -> np.ndarray:
    fy = np.fft.fftfreq(size)[:, None]
    fx = np.fft.rfftfreq(size)[None, :]
    radius = np.hypot(fy, fx).astype(np.float32)
    radius[0, 0] = 1.0
    return radius


def _rotated(size: int, degrees: float, rng: np.random.Generator, period: float) -> tuple[np.ndarray, np.ndarray]:
    """Coordinates (u along the orientation, v across it) with a random offset."""
    x, y = _grid(size)
    theta = np.deg2rad(degrees)
    c, s = np.float32(np.cos(theta)), np.float32(np.sin(theta))
    du, dv = rng.uniform(0, period, size=2).astype(np.float32)
    return x * c + y * s + du, -x * s + y * c + dv


def _power_law_noise(rng: np.random.Generator, size: int, beta: float) -> np.ndarray:
    """Periodic (stationary) Gaussian noise with power spectrum 1/f^beta, unit std."""
    spectrum = np.fft.rfft2(rng.standard_normal((size, size)).astype(np.float32))
    spectrum *= _radial_frequency(size) ** np.float32(-beta / 2.0)
    spectrum[0, 0] = 0
    field_ = np.fft.irfft2(spectrum, s=(size, size)).astype(np.float32)
    return field_ / np.float32(max(float(field_.std()), 1e-6))


def _noise_mix(z: np.ndarray) -> np.ndarray:
    return np.clip(np.float32(0.5) + np.float32(0.25) * z, 0.0, 1.0)


def _texture_mix(rng: np.random.Generator, spec: TextureSpec, size: int) -> np.ndarray:
    """(size, size) float32 in [0, 1]: 0 the dark colour, 1 the light one."""
    family = spec.family
    orientation = spec.orientation.sample(rng) if spec.orientation is not None else 0.0
    period = spec.period.sample(rng) if spec.period is not None else 1.0
    two_pi = np.float32(2 * np.pi)
    if family in ("grating", "stripes"):
        _, v = _rotated(size, orientation, rng, period)  # v across the bars
        if family == "grating":
            return np.float32(0.5) + np.float32(0.5) * np.sin(v * (two_pi / np.float32(period)))
        duty = spec.duty.sample(rng)
        return ((v / np.float32(period)) % 1.0 < duty).astype(np.float32)
    if family == "checker":
        u, v = _rotated(size, orientation, rng, 2 * period)
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if family == "dots":
        u, v = _rotated(size, orientation, rng, period)
        half = np.float32(period / 2)
        du, dv = (u % period) - half, (v % period) - half
        radius = spec.radius.sample(rng) * period
        return (du * du + dv * dv <= radius * radius).astype(np.float32)
    if family in ("pink_noise", "brown_noise"):
        return _noise_mix(_power_law_noise(rng, size, spec.beta.sample(rng)))
    if family == "gabor_noise":
        # Sparse random impulses convolved (circularly) with one Gabor kernel.
        impulses = np.zeros((size, size), np.float32)
        count = int(rng.integers(size * size // 64, size * size // 24))
        rows, cols = rng.integers(0, size, size=(2, count))
        np.add.at(impulses, (rows, cols), rng.choice(np.array([-1.0, 1.0], np.float32), size=count))
        sigma = period * rng.uniform(0.45, 0.7)
        x, y = _grid(size)
        dx, dy = x - np.float32(size // 2), y - np.float32((size - 1) - size // 2)
        theta = np.deg2rad(orientation)
        across = -dx * np.float32(np.sin(theta)) + dy * np.float32(np.cos(theta))
        kernel = np.exp(-(dx * dx + dy * dy) / np.float32(2 * sigma * sigma)) * np.cos(across * (two_pi / np.float32(period)))
        kernel = np.fft.ifftshift(kernel)
        field_ = np.fft.irfft2(np.fft.rfft2(impulses) * np.fft.rfft2(kernel), s=(size, size)).astype(np.float32)
        return _noise_mix(field_ / np.float32(max(float(field_.std()), 1e-6)))
    if family == "rings":
        x, y = _grid(size)
        cx, cy = rng.uniform(-0.25 * size, 1.25 * size, size=2)
        radius = np.hypot(x - np.float32(cx), y - np.float32(cy))
        return np.float32(0.5) + np.float32(0.5) * np.sin(radius * (two_pi / np.float32(period)) + np.float32(rng.uniform(0, 2 * np.pi)))
    if family == "scribbles":
        canvas = np.zeros((size, size), np.uint8)
        for _ in range(int(rng.integers(6, 15))):
            start = rng.uniform(-0.2 * size, 1.2 * size, size=2)
            angle, length = rng.uniform(0, 2 * np.pi), rng.uniform(0.3, 1.0) * size
            end = start + length * np.array([np.cos(angle), np.sin(angle)])
            cv2.line(canvas, tuple(int(v) for v in np.rint(start)), tuple(int(v) for v in np.rint(end)), 1,
                     thickness=int(rng.integers(1, 3)), lineType=cv2.LINE_8)
        return canvas.astype(np.float32)
    raise ValueError(f"unknown texture family {family!r}")


def _texture_rgb(rng: np.random.Generator, spec: TextureSpec, size: int) -> np.ndarray:
    """(size, size, 3) float32 texture in [0, 1], over the whole canvas."""
    if spec.family == "photo":
        bank = _texture_bank(0.25)["anomaly"]
        source_id = int(rng.integers(len(bank)))
        texture = _render_texture(rng, bank[source_id], size, 2.5, (0, 0, size, size))
        level = rng.uniform(0.4, 0.6)
        return np.float32(level) + np.float32(rng.uniform(0.15, 0.22)) * texture
    mix = _texture_mix(rng, spec, size)
    hue = spec.hue.sample(rng)
    saturation = rng.uniform(0.6, 0.8)
    value = rng.uniform(0.47, 0.57)  # per-region brightness jitter
    half = 0.32 * spec.contrast.sample(rng)
    dark, light = _hsv_rgb(hue, saturation, value - half), _hsv_rgb(hue, saturation, value + half)
    return dark + mix[:, :, None] * (light - dark)


def render_layout(
    rng: np.random.Generator, regions: np.ndarray, textures: Sequence[TextureSpec], noise_sigma: float = 3.0
) -> np.ndarray:
    """Paint region ``i`` of ``regions`` with ``textures[i]``: RGB uint8 image.

    Each texture is rendered over the whole canvas and hard-masked; then
    Gaussian pixel noise of ``noise_sigma`` (0..255 scale) is added.
    """
    size = regions.shape[0]
    image = np.zeros((size, size, 3), np.float32)
    for index, spec in enumerate(textures):
        mask = regions == index
        if mask.any():
            np.copyto(image, _texture_rgb(rng, spec, size), where=mask[:, :, None])
    image *= np.float32(255.0)
    if noise_sigma > 0:
        image += rng.standard_normal(image.shape, dtype=np.float32) * np.float32(noise_sigma)
    return np.clip(np.rint(image), 0, 255).astype(np.uint8)


# ---------------------------------------------------------------------------
# Layouts
# ---------------------------------------------------------------------------


def _voronoi(rng: np.random.Generator, size: int, num_cells: int) -> np.ndarray:
    """Cell index per pixel; straight edges, or mildly wavy ones half of the time."""
    cols, rows = _grid(size)
    rows = (size - 1) - rows
    if rng.random() < 0.5:
        amplitude = np.float32(rng.uniform(0.03, 0.08) * size)
        grid = int(rng.integers(3, 6))
        rows = rows + amplitude * _smooth_noise(rng, size, grid)
        cols = cols + amplitude * _smooth_noise(rng, size, grid)
    while True:  # well-separated seeds make large cells
        seeds = rng.uniform(0, size, size=(num_cells, 2)).astype(np.float32)
        gaps = np.hypot(*(seeds[:, None, :] - seeds[None, :, :]).transpose(2, 0, 1))
        if num_cells == 1 or gaps[np.triu_indices(num_cells, 1)].min() >= 0.3 * size:
            break
    distances = (rows[None] - seeds[:, 0, None, None]) ** 2 + (cols[None] - seeds[:, 1, None, None]) ** 2
    return np.argmin(distances, axis=0).astype(np.uint8)


def _sample_layout(
    rng: np.random.Generator, params: TexturesParams, num_anomalies: int
) -> tuple[np.ndarray, int, list[int]]:
    """(region map, number of regions, indices of the anomaly regions).

    Regions are Voronoi cells plus at most ``num_anomalies`` or one pasted
    blob/polygon (index after the cells). Redrawn until every region has at
    least ``min_region_pixels`` pixels and, with anomalies, the anomaly
    regions cover ANOMALY_COVERAGE of the image.
    """
    size = params.image_size
    min_pixels = params.min_region_pixels
    total = size * size
    for _ in range(1000):
        num_regions = int(rng.integers(max(params.min_regions, num_anomalies + 1), params.max_regions + 1))
        if num_anomalies:
            num_blobs = int(rng.binomial(num_anomalies, 0.5))
        else:
            num_blobs = int(num_regions >= 3 and rng.random() < 0.3)
        num_cells = num_regions - num_blobs
        regions = _voronoi(rng, size, num_cells)
        for blob in range(num_blobs):
            shape = _random_shape(rng, size, 0.17 * size, 0.3 * size)
            regions[shape] = num_cells + blob
        counts = np.bincount(regions.ravel(), minlength=num_regions)
        if counts.min() < min_pixels:
            continue
        if not num_anomalies:
            return regions, num_regions, []
        # The blobs are anomalies; whole cells complete the count, chosen
        # among the combinations that give an admissible coverage.
        blobs = list(range(num_cells, num_regions))
        candidates = []
        for cells in itertools.combinations(range(num_cells), num_anomalies - num_blobs):
            coverage = counts[blobs + list(cells)].sum() / total
            if ANOMALY_COVERAGE[0] <= coverage <= ANOMALY_COVERAGE[1]:
                candidates.append(sorted(blobs + list(cells)))
        if candidates:
            return regions, num_regions, candidates[int(rng.integers(len(candidates)))]
    raise RuntimeError(f"could not draw a valid layout for {params}")


def _scene_plan(
    params: TexturesParams,
    split: str,
    index: int,
    layout: Optional[tuple[np.ndarray, Sequence[Any]]] = None,
) -> tuple[np.random.Generator, np.ndarray, list, np.ndarray]:
    """``(rng, regions, textures, region_class)`` of a scene: its geometry, the
    :class:`TextureSpec` of every region and the class id of every region
    (255 for anomalies); ``rng`` is left where rendering continues."""
    if split not in TEXTURES_SPLITS:
        raise ValueError(f"unknown textures split {split!r}; expected one of {sorted(TEXTURES_SPLITS)}")
    _, stream, kind = TEXTURES_SPLITS[split]
    rng = np.random.default_rng(np.random.SeedSequence(params.seed, spawn_key=(stream, index)))
    num_classes = len(TEXTURE_CLASSES)
    textures: list[TextureSpec] = []
    region_class = np.full(256, IGNORE_LABEL, np.uint8)
    if layout is None:
        num_anomalies = 0 if kind == "sem_seg" else int(rng.integers(1, 3))
        regions, num_regions, anomalies = _sample_layout(rng, params, num_anomalies)
        classes = rng.choice(num_classes, size=num_regions, replace=False)
        pool = NEAR_OOD_TEXTURES if kind == "near" else FAR_OOD_TEXTURES
        for region in range(num_regions):
            if region in anomalies:
                textures.append(pool[int(rng.integers(len(pool)))])
            else:
                textures.append(TEXTURE_CLASSES[int(classes[region])])
                region_class[region] = classes[region]
    else:
        regions = np.asarray(layout[0], np.uint8)
        for region, item in enumerate(layout[1]):
            spec = TEXTURE_CLASSES[int(item)] if isinstance(item, (int, np.integer)) else item
            if spec in TEXTURE_CLASSES:
                region_class[region] = TEXTURE_CLASSES.index(spec)
            elif kind == "sem_seg":
                raise ValueError(f"anomaly texture {spec.name!r} in in-distribution split {split!r}")
            textures.append(spec)
    return rng, regions, textures, region_class


def scene_textures(params: TexturesParams, split: str, index: int) -> list[TextureSpec]:
    """The :class:`TextureSpec` of each region of a scene, by region index
    (which near/far-OOD texture an anomaly region shows, for analyses)."""
    return _scene_plan(params, split, index)[2]


def render_texture_scene(
    params: TexturesParams,
    split: str,
    index: int,
    layout: Optional[tuple[np.ndarray, Sequence[Any]]] = None,
) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """One scene: (image uint8 HxWx3, label HxW, regions HxW, class_map HxW).

    ``label`` holds class ids (sem_seg splits) or 0 / 1 (anomaly splits);
    ``class_map`` the class id of in-distribution pixels and 255 on anomaly
    pixels (equal to ``label`` in sem_seg splits). A pure function of
    ``(params, split, index)`` -- what the files hold.

    ``layout=(regions, assignment)`` fixes the geometry and each region's
    texture instead: ``regions`` a uint8 map of region indices ``0..R-1`` and
    ``assignment[i]`` a class id or a :class:`TextureSpec` (near/far ones are
    anomalies; only allowed in anomaly splits). Texture parameters are still
    drawn from the scene's random stream.
    """
    rng, regions, textures, region_class = _scene_plan(params, split, index, layout)
    image = render_layout(rng, regions, textures, noise_sigma=float(rng.uniform(2.0, 4.0)))
    class_map = region_class[regions]
    if TEXTURES_SPLITS[split][2] == "sem_seg":
        label = class_map
    else:
        label = np.where(class_map == IGNORE_LABEL, ANOMALY_LABEL, IN_DISTRIBUTION_LABEL).astype(np.uint8)
    return image, label, regions, class_map


# ---------------------------------------------------------------------------
# Writing
# ---------------------------------------------------------------------------

_FOLDERS = ("images", "annotations", "regions", "annotations_semantic")


def textures_dir(root: str | os.PathLike[str] | None = None) -> str:
    """The ``textures/`` folder under a datasets root (default ``$DETECTRON2_DATASETS``)."""
    return os.path.join(os.fspath(root) if root is not None else datasets_root(), "textures")


def _folders(split: str) -> tuple[str, ...]:
    return _FOLDERS if TEXTURES_SPLITS[split][2] != "sem_seg" else _FOLDERS[:3]


def _file_name(split: str, index: int) -> str:
    return f"textures_{split}_{index:06d}.png"


def _encode_png(array: np.ndarray) -> bytes:
    """PNG bytes (BGR order for colour, as OpenCV expects), fixed settings, no metadata.

    OpenCV's encoder at level 1 is about twice as fast as Pillow's here.
    """
    ok, data = cv2.imencode(".png", array, [cv2.IMWRITE_PNG_COMPRESSION, 1])
    if not ok:
        raise RuntimeError("PNG encoding failed")
    return data.tobytes()


def _write_scenes(dataset_dir: str, split: str, indices: Sequence[int], params: TexturesParams) -> list:
    """Render and write scenes: [(file name, sha256 of its PNGs, label histogram)]."""
    folders = _folders(split)
    records = []
    for index in indices:
        image, label, regions, class_map = render_texture_scene(params, split, index)
        name = _file_name(split, index)
        digest = hashlib.sha256()
        for folder, array in zip(folders, (image[:, :, ::-1], label, regions, class_map)):
            data = _encode_png(array)
            digest.update(data)
            with open(os.path.join(dataset_dir, folder, split, name), "wb") as f:
                f.write(data)
        records.append((name, digest.hexdigest(), np.bincount(label.ravel(), minlength=256).tolist()))
    return records


def _check_params(params: TexturesParams) -> None:
    if min(params.count(split) for split in TEXTURES_SPLITS) < 1:
        raise ValueError(f"need at least one image per split, got {params}")
    if params.image_size < 16 or not 2 <= params.min_regions <= params.max_regions <= 6:
        raise ValueError(f"need image_size >= 16 and 2 <= min_regions <= max_regions <= 6, got {params}")


def generate_textures_dataset(
    root: str | os.PathLike[str] | None = None,
    params: TexturesParams = TexturesParams(),
    *,
    num_workers: Optional[int] = None,
) -> str:
    """Generate ``<root>/textures`` (replacing any previous one); returns the folder.

    Files go to a hidden sibling folder renamed into place after the manifest
    is written. ``num_workers`` (default: all cores; 1 for small sets) never
    changes the output.
    """
    _check_params(params)
    final_dir = textures_dir(root)
    parent = os.path.dirname(os.path.abspath(final_dir))
    os.makedirs(parent, exist_ok=True)
    staging = os.path.join(parent, f".textures-partial-{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    start = time.perf_counter()
    try:
        for split in TEXTURES_SPLITS:
            for folder in _folders(split):
                os.makedirs(os.path.join(staging, folder, split))
        _texture_bank(0.25)  # photos loaded once, before forking
        total = sum(params.count(split) for split in TEXTURES_SPLITS)
        if num_workers is None:
            num_workers = 1 if total < 500 else (os.cpu_count() or 1)
        jobs = [
            (staging, split, chunk, params)
            for split in TEXTURES_SPLITS
            for chunk in _chunks(params.count(split), max(1, num_workers) * 4)
        ]
        results = _starmap(_write_scenes, jobs, num_workers)  # forked workers inherit the loaded photos
        seconds = time.perf_counter() - start
        _write_manifest(staging, params, jobs, results, seconds, total)
        _replace_dir(staging, final_dir)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    return final_dir


def _spec_dict(spec: TextureSpec) -> dict:
    return {k: v for k, v in asdict(spec).items() if v not in (None, ())}


def _write_manifest(dataset_dir: str, params: TexturesParams, jobs, results, seconds: float, total: int) -> None:
    files: dict[str, dict[str, str]] = {split: {} for split in TEXTURES_SPLITS}
    counts = {split: np.zeros(256, np.int64) for split in TEXTURES_SPLITS}
    for (_, split, _, _), records in zip(jobs, results):
        for name, digest, histogram in records:
            files[split][name] = digest
            counts[split] += np.asarray(histogram, np.int64)
    manifest = {
        "params": asdict(params),
        "stuff_classes": TEXTURES_CLASSES,
        "classes": [_spec_dict(s) for s in TEXTURE_CLASSES],
        "near_ood": [_spec_dict(s) for s in NEAR_OOD_TEXTURES],
        "far_ood": [_spec_dict(s) for s in FAR_OOD_TEXTURES],
        "photo_sources": [f"skimage.data.{s.skimage_function}" for s in MOSAIC_ANOMALY_SOURCES],
        "label_pixel_counts": {
            split: {str(v): int(c) for v, c in enumerate(hist) if c} for split, hist in counts.items()
        },
        "digest": hashlib.sha256(json.dumps(files, sort_keys=True).encode()).hexdigest(),
        "files": files,
        # informational, not part of `digest`
        "generation_seconds": round(seconds, 2),
        "images_per_second": round(total / max(seconds, 1e-9), 1),
    }
    with open(os.path.join(dataset_dir, MANIFEST_NAME), "w") as f:
        json.dump(manifest, f, sort_keys=True)


def read_textures_manifest(dataset_dir: str) -> Optional[dict]:
    """The manifest of a textures folder, or None if absent or unreadable."""
    return read_manifest(dataset_dir)


def _missing_files(dataset_dir: str, manifest: dict, splits: Sequence[str]) -> list[str]:
    missing = []
    for split in splits:
        for folder in _folders(split):
            present = set(os.listdir(os.path.join(dataset_dir, folder, split))) if os.path.isdir(
                os.path.join(dataset_dir, folder, split)) else set()
            missing += [os.path.join(folder, split, n) for n in manifest["files"].get(split, {}) if n not in present]
    return missing


def is_textures_complete(dataset_dir: str, params: Optional[TexturesParams] = None) -> bool:
    """Whether ``dataset_dir`` holds a finished generation (with ``params``, if given)."""
    manifest = read_textures_manifest(dataset_dir)
    if manifest is None or "files" not in manifest:
        return False
    if params is not None and manifest.get("params") != asdict(params):
        return False
    if manifest.get("params", {}).get("generator_version") != GENERATOR_VERSION:
        return False
    return not _missing_files(dataset_dir, manifest, list(TEXTURES_SPLITS))


def ensure_textures_dataset(
    root: str | os.PathLike[str] | None = None,
    params: TexturesParams = TexturesParams(),
    *,
    num_workers: Optional[int] = None,
) -> str:
    """Generate unless a complete dataset with ``params`` exists (then a no-op)."""
    dataset_dir = textures_dir(root)
    if is_textures_complete(dataset_dir, params):
        return dataset_dir
    return generate_textures_dataset(root, params, num_workers=num_workers)


# ---------------------------------------------------------------------------
# Detectron2 registration
# ---------------------------------------------------------------------------

LAYOUT_TEXT = (
    "expected textures/images/<split>/*.png, textures/annotations/<split>/*.png, "
    "textures/regions/<split>/*.png, textures/annotations_semantic/<anomaly split>/*.png "
    f"and textures/{MANIFEST_NAME} (written last), splits {', '.join(TEXTURES_SPLITS)}"
)


def _fix_text(root: str) -> str:
    return (
        f"python datasets/prepare_textures.py --root {os.path.abspath(root)}"
        f"  (then DETECTRON2_DATASETS={os.path.abspath(root)}); {LAYOUT_TEXT}"
    )


def _metadata(split: str, dataset_dir: str) -> dict[str, Any]:
    fields: dict[str, Any] = dict(
        stuff_classes=list(TEXTURES_CLASSES),
        stuff_colors=[list(c) for c in TEXTURES_COLORS],
        ignore_label=IGNORE_LABEL,
        image_root=os.path.join(dataset_dir, "images", split),
        sem_seg_root=os.path.join(dataset_dir, "annotations", split),
        region_root=os.path.join(dataset_dir, "regions", split),
        evaluator_type="sem_seg",
        textures_split=split,
    )
    kind = TEXTURES_SPLITS[split][2]
    if kind != "sem_seg":
        fields.update(
            evaluator_type="anomaly",
            anomaly_classes=["in-distribution", "anomaly"],
            anomaly_colors=[[0, 0, 0], [255, 255, 255]],
            anomaly_label=ANOMALY_LABEL,
            anomaly_kind=kind,
            class_root=os.path.join(dataset_dir, "annotations_semantic", split),
        )
    return fields


def load_textures_split(dataset_name: str, root: Optional[str] = None) -> list[dict]:
    """Records of one registered split (``root`` default: ``$DETECTRON2_DATASETS`` now)."""
    split = next(s for s, (name, _, _) in TEXTURES_SPLITS.items() if name == dataset_name)
    root = datasets_root() if root is None else os.fspath(root)
    dataset_dir = textures_dir(root)
    if not os.path.isdir(dataset_dir):
        raise DatasetNotReadyError(dataset_name, dataset_dir, "textures dataset not found", _fix_text(root))
    manifest = read_textures_manifest(dataset_dir)
    if manifest is None or "files" not in manifest:
        raise DatasetNotReadyError(
            dataset_name, os.path.join(dataset_dir, MANIFEST_NAME),
            "incomplete textures dataset (no valid manifest: interrupted generation?)", _fix_text(root))
    version = manifest.get("params", {}).get("generator_version")
    if version != GENERATOR_VERSION:
        raise DatasetNotReadyError(
            dataset_name, dataset_dir, f"stale textures dataset (generator {version}, need {GENERATOR_VERSION})",
            _fix_text(root))
    missing = _missing_files(dataset_dir, manifest, [split])
    if missing:
        raise DatasetNotReadyError(
            dataset_name, os.path.join(dataset_dir, missing[0]),
            f"half-prepared textures dataset: {len(missing)} listed files missing", _fix_text(root))
    refresh_metadata(dataset_name, **_metadata(split, dataset_dir))
    size = int(manifest["params"]["image_size"])
    anomaly = TEXTURES_SPLITS[split][2] != "sem_seg"
    records = []
    for name in sorted(manifest["files"][split]):
        record = {
            "file_name": os.path.join(dataset_dir, "images", split, name),
            "sem_seg_file_name": os.path.join(dataset_dir, "annotations", split, name),
            "region_file_name": os.path.join(dataset_dir, "regions", split, name),
            "height": size,
            "width": size,
        }
        if anomaly:
            record["class_file_name"] = os.path.join(dataset_dir, "annotations_semantic", split, name)
        records.append(record)
    return records


def _load(dataset_name: str, root: str) -> list[dict]:
    return load_textures_split(dataset_name, root)


def register_all_textures() -> None:
    """Register the seven textures datasets (idempotent; touches no file)."""
    for split, (dataset_name, _, _) in TEXTURES_SPLITS.items():
        register_checked(dataset_name, _load, _metadata(split, textures_dir()))


register_all_textures()
