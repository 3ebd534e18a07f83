"""Rendering helpers shared by ``demo/demo.py`` and ``tools/visualize_predictions.py``.

Everything here works on RGB ``uint8`` arrays ``(H, W, 3)`` and draws with
OpenCV and numpy only (no matplotlib figure, so no GUI backend is involved):

* :func:`colorize_labels` — class ids to the dataset's colours;
* :func:`anomaly_range_from_scores` / :func:`colorize_anomaly` — anomaly maps
  coloured on one **fixed** range ``[lo, hi]``, so that the same colour means
  the same score in every image (a per-image min-max scaling would paint the
  most normal pixel of an anomaly-free image as bright as a real anomaly);
* :func:`draw_colorbar`, :func:`draw_legend`, :func:`draw_titles`,
  :func:`draw_label_column` — the colour bar, the class legend and text strips;
* :func:`segmentation_metadata` — class names and colours, with generic ones
  when a dataset has none;
* :func:`imwrite_rgb` — ``cv2.imwrite`` that raises instead of returning ``False``.
"""
from __future__ import annotations

import os
from typing import List, Optional, Sequence, Tuple

import cv2
import numpy as np

from detectron2.data import MetadataCatalog
from detectron2.data.catalog import Metadata
from detectron2.utils.colormap import colormap

__all__ = [
    "ANOMALY_COLORMAP", "DEFAULT_ANOMALY_PERCENTILES", "NON_FINITE_COLOR", "anomaly_range_from_scores",
    "colorize_anomaly", "colorize_labels", "draw_colorbar", "draw_label_column", "draw_legend", "draw_titles",
    "format_score", "format_ticks", "imwrite_rgb", "legend_entries", "pad_to_width", "segmentation_metadata",
    "text_size",
]

#: OpenCV colour map of anomaly scores (dark = normal, bright = anomalous).
ANOMALY_COLORMAP = cv2.COLORMAP_INFERNO
#: Percentiles of the scores that span the default fixed range: robust to a
#: few extreme pixels, which would otherwise squash every other score into
#: one colour.
DEFAULT_ANOMALY_PERCENTILES = (1.0, 99.0)
#: Colour of pixels whose score is NaN or infinite.
NON_FINITE_COLOR = (128, 128, 128)

_FONT = cv2.FONT_HERSHEY_SIMPLEX
_FONT_SCALE = 0.4
_FONT_THICKNESS = 1
_TEXT_COLOR = (0, 0, 0)
_BACKGROUND = 255
_PAD = 4


# ---------------------------------------------------------------- classes


def segmentation_metadata(dataset_name: Optional[str], num_classes: int) -> Metadata:
    """Class names and colours for ``num_classes`` classes, never missing.

    Uses ``MetadataCatalog.get(dataset_name)``'s ``stuff_classes`` and
    ``stuff_colors`` where it has them; classes beyond them (or all classes,
    for an unknown dataset or ``dataset_name=None``) get the names
    ``"class <id>"`` and Detectron2's fixed colour map, cycled. A fresh
    :class:`Metadata` is returned (the catalog's entry is not modified).

    Colours must exist for every class: Detectron2's ``Visualizer.draw_sem_seg``
    draws a class without one in a *random* colour, which would not match the
    legend.
    """
    names: List[str] = []
    colors: List[List[int]] = []
    if dataset_name and dataset_name in MetadataCatalog.list():
        catalog = MetadataCatalog.get(dataset_name)
        names = list(catalog.get("stuff_classes", None) or [])
        colors = [list(map(int, c)) for c in (catalog.get("stuff_colors", None) or [])]
    generic = (colormap(rgb=True, maximum=255)).astype(int).tolist()
    total = max(num_classes, len(names))
    names = names + [f"class {i}" for i in range(len(names), total)]
    colors = colors + [generic[i % len(generic)] for i in range(len(colors), total)]
    return Metadata(name=dataset_name or "generic", stuff_classes=names[:total], stuff_colors=colors[:total])


def colorize_labels(label: np.ndarray, colors: Sequence[Sequence[int]]) -> np.ndarray:
    """``(H, W)`` class ids in 0..255 → ``(H, W, 3)`` RGB; ids without a colour are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: min(len(colors), 256)] = np.asarray(colors[:256], dtype=np.uint8).reshape(-1, 3)
    return palette[np.asarray(label, dtype=np.uint8)]


def legend_entries(class_ids, metadata: Metadata) -> List[Tuple[str, Tuple[int, int, int]]]:
    """``(name, rgb)`` for each id in ``class_ids`` (sorted, unique) that ``metadata`` names."""
    ids = sorted({int(i) for i in np.asarray(class_ids).ravel()})
    return [(metadata.stuff_classes[i], tuple(int(v) for v in metadata.stuff_colors[i]))
            for i in ids if 0 <= i < len(metadata.stuff_classes)]


# ---------------------------------------------------------------- anomaly maps


def anomaly_range_from_scores(scores, percentiles: Tuple[float, float] = DEFAULT_ANOMALY_PERCENTILES
                              ) -> Tuple[float, float]:
    """A fixed colour range ``(lo, hi)`` from anomaly scores (any shape, or a list of maps).

    ``lo``/``hi`` are the given percentiles of the finite scores. A constant map
    gets a range of width 1 centred on its value, so that it still colours.

    Raises:
        ValueError: no finite score at all.
    """
    if isinstance(scores, (list, tuple)):
        scores = np.concatenate([np.asarray(s, dtype=np.float64).ravel() for s in scores])
    values = np.asarray(scores, dtype=np.float64).ravel()
    values = values[np.isfinite(values)]
    if values.size == 0:
        raise ValueError("The anomaly scores have no finite value; cannot choose a colour range "
                         "(pass one explicitly, e.g. --anomaly-range LO HI)")
    lo, hi = (float(v) for v in np.percentile(values, percentiles))
    if not hi > lo:
        lo, hi = lo - 0.5, lo + 0.5
    return lo, hi


def _check_range(lo: float, hi: float) -> None:
    if not (np.isfinite(lo) and np.isfinite(hi) and hi > lo):
        raise ValueError(f"Anomaly colour range must be finite with LO < HI, got LO={lo} HI={hi}")


def colorize_anomaly(score: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """Anomaly score ``(H, W)`` → ``(H, W, 3)`` RGB on the fixed range ``[lo, hi]``.

    Scores are clipped to the range (the colour bar's ends); NaN/inf pixels are grey.
    """
    _check_range(lo, hi)
    score = np.asarray(score, dtype=np.float64)
    finite = np.isfinite(score)
    scaled = np.clip((np.where(finite, score, lo) - lo) / (hi - lo), 0.0, 1.0)
    rgb = cv2.applyColorMap(np.round(scaled * 255).astype(np.uint8), ANOMALY_COLORMAP)[:, :, ::-1].copy()
    rgb[~finite] = NON_FINITE_COLOR
    return rgb


def format_score(value: float, digits: int = 3) -> str:
    """Short label for a score (``digits`` significant digits)."""
    return f"{value:.{digits}g}"


def format_ticks(values: Sequence[float]) -> List[str]:
    """Labels for increasing ``values``, with the fewest significant digits (3 to 8) that tell them apart."""
    for digits in range(3, 9):
        labels = [format_score(v, digits) for v in values]
        if len(set(labels)) == len(labels):
            return labels
    return labels


# ---------------------------------------------------------------- text and strips


def text_size(text: str) -> Tuple[int, int]:
    """``(width, height)`` in pixels of ``text`` in the helpers' font (height includes descenders)."""
    (w, h), baseline = cv2.getTextSize(text, _FONT, _FONT_SCALE, _FONT_THICKNESS)
    return w, h + baseline


def _put_text(canvas: np.ndarray, text: str, x: int, y_top: int) -> None:
    """Draw ``text`` with its top-left corner at ``(x, y_top)``."""
    (_, h), _ = cv2.getTextSize(text, _FONT, _FONT_SCALE, _FONT_THICKNESS)
    cv2.putText(canvas, text, (int(x), int(y_top + h)), _FONT, _FONT_SCALE, _TEXT_COLOR,
                _FONT_THICKNESS, cv2.LINE_AA)


def _fit(text: str, width: int) -> str:
    """``text`` shortened with "..." in the middle so that it fits ``width`` pixels."""
    if text_size(text)[0] <= width or len(text) <= 4:
        return text
    keep = len(text)
    while keep > 4 and text_size(text[: keep // 2] + "..." + text[len(text) - keep // 2:])[0] > width:
        keep -= 1
    return text[: keep // 2] + "..." + text[len(text) - keep // 2:]


def draw_titles(titles: Sequence[str], widths: Sequence[int]) -> np.ndarray:
    """A white strip with one title per column, each column ``widths[i]`` pixels wide."""
    if len(titles) != len(widths):
        raise ValueError(f"{len(titles)} titles for {len(widths)} columns")
    height = text_size("Ag")[1] + 2 * _PAD
    strip = np.full((height, int(sum(widths)), 3), _BACKGROUND, dtype=np.uint8)
    x = 0
    for title, width in zip(titles, widths):
        _put_text(strip, _fit(title, width - 2 * _PAD), x + _PAD, _PAD)
        x += width
    return strip


def draw_label_column(lines: Sequence[str], height: int, width: int) -> np.ndarray:
    """A white ``(height, width, 3)`` block with ``lines`` of text from the top (row labels)."""
    block = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    line_height = text_size("Ag")[1] + 2
    for index, line in enumerate(lines):
        y = _PAD + index * line_height
        if y + line_height > height:
            break
        _put_text(block, _fit(line, width - 2 * _PAD), _PAD, y)
    return block


def draw_colorbar(height: int, lo: float, hi: float, *, bar_width: int = 14,
                  label: str = "anomaly") -> np.ndarray:
    """Vertical colour bar for :func:`colorize_anomaly`'s fixed range, ``hi`` at the top.

    Returns an RGB ``(height, W, 3)`` block: the gradient, and tick labels for
    ``hi``, the middle and ``lo`` to its right; ``label`` above the ticks. The
    block's width depends on the labels' text.
    """
    _check_range(lo, hi)
    ticks = list(zip((0.0, 0.5, 1.0), format_ticks([hi, (lo + hi) / 2, lo])))
    label_width = max(text_size(text)[0] for _, text in ticks)
    width = _PAD + bar_width + _PAD + max(label_width, text_size(label)[0]) + _PAD
    block = np.full((height, width, 3), _BACKGROUND, dtype=np.uint8)
    text_h = text_size("0")[1]
    top, bottom = _PAD + text_h + _PAD, height - _PAD - text_h // 2
    if bottom - top < 8:  # too short for ticks: gradient only
        top, bottom = 0, height
    gradient = np.linspace(hi, lo, bottom - top)[:, None].repeat(bar_width, axis=1)
    block[top:bottom, _PAD:_PAD + bar_width] = colorize_anomaly(gradient, lo, hi)
    if bottom - top < height:
        _put_text(block, label, _PAD, _PAD // 2)
        x = _PAD + bar_width + _PAD
        for fraction, text in ticks:
            y = top + int(round(fraction * (bottom - top - 1)))
            _put_text(block, text, x, max(0, min(height - text_h, y - text_h // 2)))
    return block


def draw_legend(entries: Sequence[Tuple[str, Sequence[int]]], width: int, *,
                swatch: int = 12) -> np.ndarray:
    """Class legend: a colour swatch and the class name per entry, wrapped to ``width``.

    Args:
        entries: ``(name, (r, g, b))`` pairs, e.g. from :func:`legend_entries`.
        width: width of the returned block in pixels.
    Returns:
        RGB ``(H, width, 3)``; ``H`` grows with the number of lines needed.
    """
    line_height = max(swatch, text_size("Ag")[1]) + _PAD
    items = []
    for name, color in entries:
        name = _fit(name, width - swatch - 4 * _PAD)
        items.append((name, color, swatch + _PAD + text_size(name)[0] + 3 * _PAD))
    # Greedy line breaking.
    lines: List[List[Tuple[str, Sequence[int], int]]] = [[]]
    used = _PAD
    for item in items:
        if lines[-1] and used + item[2] > width:
            lines.append([])
            used = _PAD
        lines[-1].append(item)
        used += item[2]
    block = np.full((_PAD + line_height * len(lines), width, 3), _BACKGROUND, dtype=np.uint8)
    for row, line in enumerate(lines):
        x, y = _PAD, _PAD + row * line_height
        for name, color, item_width in line:
            cv2.rectangle(block, (x, y), (x + swatch - 1, y + swatch - 1), tuple(int(c) for c in color), -1)
            cv2.rectangle(block, (x, y), (x + swatch - 1, y + swatch - 1), (80, 80, 80), 1)
            _put_text(block, name, x + swatch + _PAD, y + max(0, (swatch - text_size(name)[1]) // 2))
            x += item_width
    return block


def pad_to_width(block: np.ndarray, width: int) -> np.ndarray:
    """Pad an RGB block on the right with white up to ``width`` pixels."""
    if block.shape[1] >= width:
        return block
    return np.pad(block, ((0, 0), (0, width - block.shape[1]), (0, 0)), constant_values=_BACKGROUND)


def imwrite_rgb(path: str, rgb: np.ndarray) -> None:
    """Write an RGB ``uint8`` image with ``cv2.imwrite``; raise if it fails.

    ``cv2.imwrite`` reports a missing folder, a read-only location or an
    unknown extension by returning ``False`` (or raising ``cv2.error``);
    both become an :class:`OSError` naming ``path``.
    """
    rgb = np.ascontiguousarray(rgb)
    try:
        ok = cv2.imwrite(path, rgb[:, :, ::-1] if rgb.ndim == 3 else rgb)
    except cv2.error as e:
        raise OSError(f"Could not write image {path!r}: {e}. Use a file name ending in .png or .jpg.") from e
    if not ok:
        folder = os.path.dirname(os.path.abspath(path))
        hint = ("its folder does not exist" if not os.path.isdir(folder)
                else "check that the folder is writable and the extension is an image format (.png, .jpg)")
        raise OSError(f"Could not write image {path!r} (cv2.imwrite failed): {hint}")
