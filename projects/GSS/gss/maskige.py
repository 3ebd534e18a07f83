"""Maskige: a segmentation mask written as an RGB image, ``x = c·β``.

Class ``k`` is painted with colour ``β_k`` (the palette, ``(K + 1, 3)``, the
last row for ignored pixels), so that a frozen image VQ-VAE can encode masks.
Three palettes:

* :func:`maximal_distance_palette`: the paper's rule (its Table 9), seeded;
* :func:`random_palette`: uniform colours (the paper's GSS-FF-R ablation);
* a fixed list (the official code's way: one palette per dataset, in its config).
"""
import itertools
import math
from typing import Sequence, Tuple

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "PALETTE_KINDS", "Maskige", "build_palette", "maximal_distance_palette", "maximal_distance_guarantee",
    "random_palette", "upsample_labels",
]

PALETTE_KINDS = ("fixed", "maximal_distance", "random")


def _levels_per_channel(num_colours: int) -> Tuple[int, int, int]:
    """The most balanced ``(n_r, n_g, n_b)`` grid with ``n_r·n_g·n_b ≥ num_colours`` (one spare at least).

    A spare grid point lets the rule leave out the colour nearest the grey axis.
    """
    side = max(2, math.ceil(round((num_colours + 1) ** (1 / 3), 6)))
    best = None
    for counts in itertools.product(range(2, side + 1), repeat=3):
        size = math.prod(counts)
        if size <= num_colours:
            continue
        key = (size, max(counts) - min(counts))
        if best is None or key < best[0]:
            best = (key, counts)
    return best[1]


def maximal_distance_guarantee(num_colours: int, low: int = 15, high: int = 240, jitter: int = 15) -> float:
    """The smallest pairwise Euclidean distance :func:`maximal_distance_palette` guarantees (0-255 units).

    Two grid points differ by at least one channel step ``s_min``; jitter moves
    each coordinate by at most ``jitter``, so they stay ``≥ s_min - 2·jitter`` apart.
    """
    counts = _levels_per_channel(num_colours)
    steps = [(high - low - 2) / (count - 1) for count in counts]
    return min(steps) - 2 * jitter


def maximal_distance_palette(num_colours: int, seed: int = 0, low: int = 15, high: int = 240,
                             jitter: int = 15) -> np.ndarray:
    """``num_colours`` colours far apart and away from grey: ``(num_colours, 3)`` uint8.

    The paper's rule: each channel takes an arithmetic sequence of levels over
    ``[low, high]``, the channels' sequences start at ``low``, ``low + 1``,
    ``low + 2`` (misaligned, so no two channels share a level and no colour
    is exactly grey), the colours are their Cartesian product, each gets a
    random additive jitter in ``[-jitter, jitter]`` per channel (seeded), and
    the spare grid points nearest the grey axis ``r = g = b`` are left out.
    The official ADE20K palette was built this way (5 x 6 x 5 levels) and then
    edited by hand. Pairwise distances are at least
    :func:`maximal_distance_guarantee`.
    """
    if num_colours < 2:
        raise ValueError(f"a palette needs at least 2 colours (K classes + ignore), got {num_colours}")
    if not 0 <= low < high - 2 <= 253:
        raise ValueError(f"need 0 <= LOW < HIGH - 2 <= 253, got LOW {low}, HIGH {high}")
    counts = _levels_per_channel(num_colours)
    levels = [np.linspace(low + channel, high - 2 + channel, count) for channel, count in enumerate(counts)]
    grid = np.array(list(itertools.product(*levels)))  # (n_r·n_g·n_b, 3)
    # Distance to the grey axis: the norm of the colour minus its projection on (1, 1, 1).
    grey_distance = np.linalg.norm(grid - grid.mean(axis=1, keepdims=True), axis=1)
    keep = np.sort(np.argsort(-grey_distance, kind="stable")[:num_colours])
    rng = np.random.default_rng(seed)
    colours = grid[keep] + rng.integers(-jitter, jitter + 1, size=(num_colours, 3))
    return np.clip(np.rint(colours), 0, 255).astype(np.uint8)


def random_palette(num_colours: int, seed: int = 0) -> np.ndarray:
    """Uniform random colours ``(num_colours, 3)`` uint8 (GSS-FF-R), redrawn until all are distinct."""
    rng = np.random.default_rng(seed)
    while True:
        colours = rng.integers(0, 256, size=(num_colours, 3)).astype(np.uint8)
        if len(np.unique(colours, axis=0)) == num_colours:
            return colours


def build_palette(kind: str, num_classes: int, palette: Sequence[Sequence[int]] = (), seed: int = 0,
                  low: int = 15, high: int = 240, jitter: int = 15) -> np.ndarray:
    """The ``(K + 1, 3)`` uint8 palette of ``MODEL.GSS.MASKIGE`` (last row: the ignore colour)."""
    if kind == "fixed":
        colours = np.asarray(palette, dtype=np.int64)
        if colours.shape != (num_classes + 1, 3):
            raise ValueError(f"MODEL.GSS.MASKIGE.PALETTE must list K + 1 = {num_classes + 1} [r, g, b] colours "
                             f"(K classes, then the ignore colour); got shape {tuple(colours.shape)}")
        if colours.min() < 0 or colours.max() > 255:
            raise ValueError("MODEL.GSS.MASKIGE.PALETTE values must lie in 0..255")
        if len(np.unique(colours[:-1], axis=0)) != num_classes:
            raise ValueError("MODEL.GSS.MASKIGE.PALETTE gives two classes the same colour: "
                             "the nearest-colour inverse could not tell them apart")
        return colours.astype(np.uint8)
    if kind == "maximal_distance":
        return maximal_distance_palette(num_classes + 1, seed=seed, low=low, high=high, jitter=jitter)
    if kind == "random":
        return random_palette(num_classes + 1, seed=seed)
    raise ValueError(f"Unknown MODEL.GSS.MASKIGE.PALETTE_KIND {kind!r}; choose one of {PALETTE_KINDS}")


def upsample_labels(labels: torch.Tensor, scale: int, num_classes: int, ignore_value: int) -> torch.Tensor:
    """Labels ``(N, H, W)`` → ``(N, scale·H, scale·W)``: one-hot, bilinear, argmax (official).

    The ignore value takes part as one more class, so ignored regions grow
    and shrink like the others; returns the same dtype with ``ignore_value`` kept.
    """
    if scale == 1:
        return labels
    labels = labels.long()
    valid = (labels >= 0) & (labels < num_classes)
    if (~valid & (labels != ignore_value)).any():
        bad = labels[~valid & (labels != ignore_value)].unique()[:5].tolist()
        raise ValueError(f"labels {bad} are neither classes 0..{num_classes - 1} nor the ignore value {ignore_value}")
    indices = torch.where(valid, labels, torch.full_like(labels, num_classes))
    one_hot = F.one_hot(indices, num_classes + 1).permute(0, 3, 1, 2).float()
    height, width = labels.shape[-2:]
    upsampled = F.interpolate(one_hot, size=(scale * height, scale * width), mode="bilinear",
                              align_corners=False).argmax(1)
    return torch.where(upsampled == num_classes, torch.full_like(upsampled, ignore_value), upsampled)


class Maskige(nn.Module):
    """The map ``X``: labels ``(N, H, W)`` → maskige ``(N, 3, H, W)`` in [0, 1] (``palette / 255``).

    Ignored pixels (any value outside ``0..K-1``) get the last palette colour.
    """

    def __init__(self, palette: np.ndarray):
        super().__init__()
        palette = torch.as_tensor(np.asarray(palette), dtype=torch.float32)
        if palette.ndim != 2 or palette.shape[1] != 3 or palette.shape[0] < 2:
            raise ValueError(f"palette must be (K + 1, 3), got {tuple(palette.shape)}")
        # (K + 1, 3) in [0, 1]; a buffer, so that checkpoints keep the palette a model was trained with.
        self.register_buffer("palette", palette / 255.0)

    @property
    def num_classes(self) -> int:
        return self.palette.shape[0] - 1

    def forward(self, labels: torch.Tensor) -> torch.Tensor:
        labels = labels.long()
        indices = torch.where((labels >= 0) & (labels < self.num_classes), labels,
                              torch.full_like(labels, self.num_classes))
        return self.palette[indices].permute(0, 3, 1, 2).contiguous()
