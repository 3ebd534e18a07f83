"""Train on your own data: a folder of images and label PNGs as Detectron2 datasets.

(Long on purpose: discovery, the checks and the registration of one folder
layout stay together, since every error names a file of that layout.)

Layout (see datasets/README.md, "Train on your own data")::

    my_data/
      classes.txt  or  classes.json
      images/train/*.jpg|png     labels/train/*.png      split folders (any names), or
      images/*.jpg|png           labels/*.png            a flat folder, split by
      splits/train.txt, splits/val.txt                   optional lists of stems

A flat folder without ``splits/`` is a single split named ``all``. An image
``images/<split>/<stem>.<ext>`` pairs with ``labels/<split>/<stem>.png``, a
single-channel PNG of class ids ``0..K-1`` and the ignore value (default
255): 8-bit grey (mode ``L``), or palette (``P``) whose indices are the ids
(labels are read as stored, palettes are not applied); 16-bit works too.
``classes.txt`` has one class name per line; ``classes.json`` is a list of
names or ``{"classes": [...], "ignore_label": 255, "colors": [[r, g, b], ...]}``.

Two entry points:

* :func:`register_sem_seg_folder` (one split) / :func:`register_sem_seg_folder_splits`
  (every split) register ``DatasetCatalog`` / ``MetadataCatalog`` entries
  (records with ``file_name``, ``sem_seg_file_name``, ``height``, ``width``;
  metadata ``stuff_classes``, ``stuff_colors``, ``ignore_label``,
  ``evaluator_type="sem_seg"``, ``image_root``, ``sem_seg_root``).
* The config key ``DATASETS.FOLDER`` (:func:`configure_folder_dataset`, called
  by :func:`gmmseg_d2.engine.setup_cfg`): registers the folder's splits and
  sets ``DATASETS.TRAIN`` / ``DATASETS.TEST``, ``MODEL.SEM_SEG_HEAD.NUM_CLASSES``
  and ``MODEL.SEM_SEG_HEAD.IGNORE_VALUE`` from it.

Checks. Registration always does the cheap ones, which only list folders:
the classes file, the layout, every image paired with exactly one label and
every label with one image, split lists naming existing pairs, no empty split.
The per-file ones open every image header and read every label PNG: one
channel of integers, values in ``0..K-1`` or the ignore value, the label the
size of its image. ``validate`` decides when they run: ``"eager"`` at
registration, ``"lazy"`` when the dataset is first loaded (``DatasetCatalog.get``,
i.e. when a loader or evaluator is built), ``"auto"`` (default) eagerly for
splits of at most :data:`EAGER_VALIDATION_MAX_IMAGES` images and lazily
above, ``"off"`` never (the training mapper still rejects out-of-range
values, one sample at a time). Loaded records are cached per registration
and reused while no file's size or modification time changes, so the
evaluator's second ``DatasetCatalog.get`` does not read the labels again.

Every problem raises one :class:`FolderDatasetError` that lists each bad file
with what is wrong and what is expected.
"""
from __future__ import annotations

import json
import logging
import os
import re
import threading
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional, Sequence, Tuple

import numpy as np
from PIL import Image

from detectron2.config import CfgNode
from detectron2.data import DatasetCatalog, MetadataCatalog

from .common import IMAGE_EXTENSIONS, run_jobs

__all__ = [
    "ALL_SPLIT",
    "EAGER_VALIDATION_MAX_IMAGES",
    "FOLDER_IMAGE_EXTENSIONS",
    "FolderClasses",
    "FolderDatasetError",
    "FolderLoader",
    "configure_folder_dataset",
    "folder_dataset_name",
    "folder_splits",
    "load_sem_seg_folder",
    "read_folder_classes",
    "register_sem_seg_folder",
    "register_sem_seg_folder_splits",
]

logger = logging.getLogger(__name__)

#: Split name of a flat folder that has no ``splits/`` lists.
ALL_SPLIT = "all"
#: ``validate="auto"`` reads every label at registration up to this many images per split.
EAGER_VALIDATION_MAX_IMAGES = 1000
#: Image formats accepted in ``images/`` (case-insensitive).
FOLDER_IMAGE_EXTENSIONS = tuple(IMAGE_EXTENSIONS) + (".bmp", ".tif", ".tiff")
#: How many bad files one error message lists in full.
MAX_LISTED_PROBLEMS = 20
VALIDATE_MODES = ("auto", "eager", "lazy", "off")

CLASSES_FILES = ("classes.txt", "classes.json")
LAYOUT_TEXT = """expected layout:
  <root>/classes.txt  (one class name per line)  or  <root>/classes.json
  <root>/images/<split>/<stem>.jpg|png   with   <root>/labels/<split>/<stem>.png
  or, flat:  <root>/images/<stem>.jpg|png  with  <root>/labels/<stem>.png
             and optional <root>/splits/<split>.txt (one stem per line)
Labels are single-channel PNGs (8-bit grey, or palette whose indices are the ids)
of class ids 0..K-1 (K = number of classes) and the ignore value (default 255).
See datasets/README.md, "Train on your own data"."""


class FolderDatasetError(ValueError):
    """A folder dataset does not follow the layout, or some of its files are wrong.

    Attributes:
        root: the dataset folder.
        problems: ``[(path, what is wrong)]``, every problem found (the message
            lists the first :data:`MAX_LISTED_PROBLEMS`).
    """

    def __init__(self, root: str, problems: Sequence[Tuple[str, str]], context: str = "") -> None:
        self.root = os.path.abspath(root)
        self.problems = [(os.path.abspath(p), text) for p, text in problems]
        where = f"Folder dataset '{self.root}'{f' ({context})' if context else ''}"
        if len(self.problems) == 1:
            path, text = self.problems[0]
            message = f"{where}: {path}: {text}"
        else:
            lines = [f"- {path}: {text}" for path, text in self.problems[:MAX_LISTED_PROBLEMS]]
            if len(self.problems) > MAX_LISTED_PROBLEMS:
                lines.append(f"- ... and {len(self.problems) - MAX_LISTED_PROBLEMS} more")
            message = f"{where}: {len(self.problems)} problems:\n" + "\n".join(lines)
        super().__init__(message)


# ---------------------------------------------------------------------------
# Classes file
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class FolderClasses:
    """The classes of a folder dataset, from its classes file.

    Attributes:
        names: ``K`` class names; label value ``i`` is ``names[i]``.
        colors: ``K`` RGB colours (for visualisation).
        ignore_label: the label value that is neither trained nor evaluated.
        path: the classes file they were read from.
    """

    names: Tuple[str, ...]
    colors: Tuple[Tuple[int, int, int], ...]
    ignore_label: int
    path: str

    def allowed_values_text(self) -> str:
        return f"class ids 0..{len(self.names) - 1} ({len(self.names)} classes in {self.path}) " \
               f"and the ignore value {self.ignore_label}"


def _default_colors(num_classes: int) -> List[Tuple[int, int, int]]:
    """Detectron2's colormap, cycled: distinct, and the same on every run."""
    from detectron2.utils.colormap import colormap

    palette = colormap(rgb=True, maximum=255).astype(int)
    return [tuple(int(c) for c in palette[i % len(palette)]) for i in range(num_classes)]


def _check_class_names(names: Any, path: str) -> List[str]:
    if not isinstance(names, list) or not all(isinstance(n, str) for n in names):
        raise FolderDatasetError(os.path.dirname(path), [(path, "the classes must be a list of strings")])
    problems = [(path, f"class {i} has an empty name") for i, n in enumerate(names) if not n.strip()]
    duplicates = sorted({n for n in names if names.count(n) > 1})
    if duplicates:
        problems.append((path, f"duplicate class names {duplicates}"))
    if not names:
        problems.append((path, "no class listed (one class name per line / a list of names expected)"))
    if problems:
        raise FolderDatasetError(os.path.dirname(path), problems)
    return [n.strip() for n in names]


def read_folder_classes(root: str) -> FolderClasses:
    """Read ``<root>/classes.txt`` or ``<root>/classes.json``.

    Raises:
        FolderDatasetError: no or both files, a malformed file, duplicate or
            empty names, a bad ignore value or colour list.
    """
    root = os.path.abspath(os.path.expanduser(root))
    if not os.path.isdir(root):
        raise FolderDatasetError(root, [(root, f"folder not found; {LAYOUT_TEXT}")])
    present = [os.path.join(root, f) for f in CLASSES_FILES if os.path.isfile(os.path.join(root, f))]
    if not present:
        raise FolderDatasetError(root, [(os.path.join(root, CLASSES_FILES[0]),
                                         f"no classes file (classes.txt or classes.json); {LAYOUT_TEXT}")])
    if len(present) > 1:
        raise FolderDatasetError(root, [(present[1], f"both {present[0]} and this file exist; keep one")])
    path = present[0]
    ignore_label, colors = 255, None
    if path.endswith(".txt"):
        with open(path, encoding="utf-8") as f:
            lines = f.read().splitlines()
        while lines and not lines[-1].strip():  # trailing blank lines are not classes
            lines.pop()
        blank = [i + 1 for i, line in enumerate(lines) if not line.strip()]
        if blank:
            raise FolderDatasetError(root, [(path, f"blank line(s) {blank}: every line is one class "
                                                   "(line i+1 names class id i), so a blank line would "
                                                   "shift the ids; remove it")])
        names = _check_class_names(lines, path)
    else:
        try:
            with open(path, encoding="utf-8") as f:
                content = json.load(f)
        except ValueError as e:
            raise FolderDatasetError(root, [(path, f"not valid JSON ({e})")]) from None
        if isinstance(content, dict):
            unknown = sorted(set(content) - {"classes", "ignore_label", "colors"})
            if "classes" not in content or unknown:
                raise FolderDatasetError(root, [(path, 'expected a list of names or {"classes": [...], '
                                                       '"ignore_label": 255, "colors": [[r, g, b], ...]}'
                                                       + (f"; unknown keys {unknown}" if unknown else ""))])
            names = _check_class_names(content["classes"], path)
            ignore_label = content.get("ignore_label", 255)
            colors = content.get("colors")
        else:
            names = _check_class_names(content, path)
    if isinstance(ignore_label, bool) or not isinstance(ignore_label, int) or not 0 <= ignore_label <= 65535:
        raise FolderDatasetError(root, [(path, f"ignore_label must be an integer in 0..65535 (255 for 8-bit "
                                               f"labels), got {ignore_label!r}")])
    if ignore_label < len(names):
        raise FolderDatasetError(root, [(path, f"ignore_label {ignore_label} is a class id (0..{len(names) - 1}); "
                                               f"use a value >= {len(names)}, e.g. 255")])
    if colors is None:
        colors = _default_colors(len(names))
    else:
        valid = isinstance(colors, list) and len(colors) == len(names) and all(
            isinstance(c, list) and len(c) == 3 and all(isinstance(v, int) and 0 <= v <= 255 for v in c)
            for c in colors)
        if not valid:
            raise FolderDatasetError(root, [(path, f"colors must be {len(names)} [r, g, b] lists of integers "
                                                   "0..255, one per class")])
    return FolderClasses(tuple(names), tuple(tuple(c) for c in colors), int(ignore_label), path)


# ---------------------------------------------------------------------------
# Layout and pairing (cheap: folder listings only)
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class _Split:
    """Where one split's files are: its folders and, for split lists, its stems."""

    name: str
    image_dir: str
    label_dir: str
    list_file: Optional[str] = None  # splits/<name>.txt of a flat folder
    stems: Optional[Tuple[str, ...]] = None  # in list order; None: every file of the folders
    lines: Tuple[int, ...] = ()  # the line of list_file each stem is on


def _visible(folder: str) -> List[str]:
    return sorted(n for n in os.listdir(folder) if not n.startswith("."))


def _discover_splits(root: str) -> Dict[str, _Split]:
    root = os.path.abspath(os.path.expanduser(root))
    image_root, label_root = os.path.join(root, "images"), os.path.join(root, "labels")
    missing = [(p, f"folder not found; {LAYOUT_TEXT}") for p in (image_root, label_root) if not os.path.isdir(p)]
    if missing:
        raise FolderDatasetError(root, missing)
    subdirs = [n for n in _visible(image_root) if os.path.isdir(os.path.join(image_root, n))]
    if subdirs:  # split folders
        stray = [n for n in _visible(image_root) if os.path.isfile(os.path.join(image_root, n))
                 and os.path.splitext(n)[1].lower() in FOLDER_IMAGE_EXTENSIONS]
        problems = [(os.path.join(image_root, n), f"image next to the split folders {subdirs}; "
                                                  "move it into one of them") for n in stray]
        label_subdirs = [n for n in _visible(label_root) if os.path.isdir(os.path.join(label_root, n))]
        problems += [(os.path.join(label_root, n), f"label folder without an image folder images/{n}")
                     for n in label_subdirs if n not in subdirs]
        problems += [(os.path.join(label_root, n), f"label folder missing for images/{n}")
                     for n in subdirs if n not in label_subdirs]
        if problems:
            raise FolderDatasetError(root, problems)
        if os.path.isdir(os.path.join(root, "splits")):
            logger.warning(f"{root}/splits is ignored: images/ has split folders {subdirs}")
        return {n: _Split(n, os.path.join(image_root, n), os.path.join(label_root, n)) for n in subdirs}
    label_subdirs = [n for n in _visible(label_root) if os.path.isdir(os.path.join(label_root, n))]
    if label_subdirs:
        raise FolderDatasetError(root, [(label_root, f"has split folders {label_subdirs} but {image_root} has "
                                                     "none; use images/<split>/ as well, or a flat labels/")])
    list_dir = os.path.join(root, "splits")
    if not os.path.isdir(list_dir):
        return {ALL_SPLIT: _Split(ALL_SPLIT, image_root, label_root)}
    splits = {}
    for name in _visible(list_dir):
        if not name.endswith(".txt"):
            continue
        path = os.path.join(list_dir, name)
        with open(path, encoding="utf-8") as f:
            entries = [(i + 1, line.strip()) for i, line in enumerate(f) if line.strip()]
        # An entry may be a stem or a file name ("a", "a.jpg", "a.png").
        stems = [os.path.splitext(e)[0] if os.path.splitext(e)[1].lower() in FOLDER_IMAGE_EXTENSIONS else e
                 for _, e in entries]
        seen: Dict[str, int] = {}
        problems = []
        for (line, _), stem in zip(entries, stems):
            if stem in seen:
                problems.append((path, f"line {line}: {stem!r} already listed on line {seen[stem]}"))
            seen.setdefault(stem, line)
        if not entries:
            problems.append((path, "empty split list (one image stem per line expected)"))
        if problems:
            raise FolderDatasetError(root, problems)
        splits[name[:-4]] = _Split(name[:-4], image_root, label_root, path, tuple(stems),
                                   tuple(line for line, _ in entries))
    if not splits:
        raise FolderDatasetError(root, [(list_dir, "no <split>.txt list in it (one image stem per line)")])
    return splits


def folder_splits(root: str) -> List[str]:
    """The split names of the folder dataset at ``root`` (sorted); lists folders only."""
    return sorted(_discover_splits(root))


def _pair_files(root: str, split: _Split) -> List[Tuple[str, str]]:
    """``[(image path, label path)]`` of a split, sorted by stem (list order for split lists).

    Raises :class:`FolderDatasetError` for every unpaired, ambiguous or
    non-PNG label file, and for an empty split.
    """
    context = f"split {split.name!r}"
    problems: List[Tuple[str, str]] = []
    images: Dict[str, List[str]] = {}
    for name in _visible(split.image_dir):
        stem, ext = os.path.splitext(name)
        if ext.lower() in FOLDER_IMAGE_EXTENSIONS and os.path.isfile(os.path.join(split.image_dir, name)):
            images.setdefault(stem, []).append(name)
    labels: Dict[str, str] = {}
    for name in _visible(split.label_dir):
        stem, ext = os.path.splitext(name)
        if ext.lower() == ".png":
            labels[stem] = name
        elif ext.lower() in FOLDER_IMAGE_EXTENSIONS:
            problems.append((os.path.join(split.label_dir, name),
                             "labels must be PNG (lossless; JPEG/WebP compression changes class ids)"))
    if not images and not labels:
        raise FolderDatasetError(root, [(split.image_dir, f"empty: no image ({'/'.join(FOLDER_IMAGE_EXTENSIONS)}) "
                                                          f"and no label PNG in {split.label_dir}")], context)
    for stem, names in sorted(images.items()):
        if len(names) > 1:
            problems.append((os.path.join(split.image_dir, names[0]),
                             f"several images with the stem {stem!r}: {names}; keep one"))
    wanted = split.stems if split.stems is not None else sorted(set(images) | set(labels))
    if split.stems is not None:
        for line, stem in zip(split.lines, split.stems):
            if stem not in images and stem not in labels:
                problems.append((split.list_file, f"line {line}: no image and no label named {stem!r} in "
                                                  f"{split.image_dir} / {split.label_dir}"))
    pairs = []
    for stem in wanted:
        if stem in images and stem not in labels:
            problems.append((os.path.join(split.image_dir, images[stem][0]),
                             f"no label for this image (expected {os.path.join(split.label_dir, stem + '.png')})"))
        elif stem in labels and stem not in images:
            problems.append((os.path.join(split.label_dir, labels[stem]),
                             f"no image for this label (expected {os.path.join(split.image_dir, stem)}"
                             f".jpg/.png)"))
        elif stem in labels:
            pairs.append((os.path.join(split.image_dir, images[stem][0]), os.path.join(split.label_dir, labels[stem])))
    if problems:
        raise FolderDatasetError(root, problems, context)
    if not pairs:
        raise FolderDatasetError(root, [(split.image_dir, "empty split: no image/label pair")], context)
    return pairs


# ---------------------------------------------------------------------------
# Per-file checks (reads every label)
# ---------------------------------------------------------------------------

#: EXIF orientations that swap width and height (Detectron2's read_image applies them).
_TRANSPOSING_ORIENTATIONS = (5, 6, 7, 8)


def _image_size(path: str) -> Tuple[int, int, int]:
    """``(width, height, exif orientation)`` as Detectron2's ``read_image`` will see it (header only)."""
    with Image.open(path) as image:
        width, height = image.size
        try:
            orientation = int(image.getexif().get(0x0112, 1))
        except Exception:  # a broken EXIF block: read_image ignores it as well
            orientation = 1
    if orientation in _TRANSPOSING_ORIENTATIONS:
        width, height = height, width
    return width, height, orientation


#: Single-channel integer PNG modes (8-bit grey, palette, 16/32-bit, 1-bit).
_LABEL_MODES = ("L", "P", "1", "I", "I;16", "I;16B", "I;16L")


def _label_problem(image: Image.Image) -> Optional[str]:
    """Why a label PNG cannot be read as class ids, or None.

    gmmseg_d2 reads labels as the stored array (``gmmseg_d2.utils.read_label_map``,
    in the mappers and the evaluator alike): palette (``P``) PNGs give their
    indices, 16-bit PNGs their values. So any single-channel integer mode
    works (the values are checked separately); colour masks do not.
    """
    if image.mode in _LABEL_MODES:
        return None
    expected = "expected a single-channel PNG of class ids (mode 'L', or 'P' whose indices are the ids)"
    bands = len(image.getbands())
    if bands > 1:
        return (f"{bands} channels (mode {image.mode!r}); {expected}. A colour-coded mask must be "
                "converted to class ids first (one id per pixel)")
    return f"mode {image.mode!r} is not an integer label map; {expected}"


def _label_values(array: np.ndarray) -> np.ndarray:
    """The distinct values of a label map (a histogram for uint8, which is faster)."""
    if array.dtype == np.uint8:
        return np.flatnonzero(np.bincount(array.ravel(), minlength=256))
    return np.unique(array)


def _check_pair(
    image_path: str, label_path: str, classes: Optional[FolderClasses]
) -> Tuple[int, int, List[Tuple[str, str]]]:
    """``(height, width, problems)`` of one pair; ``classes=None`` reads only the image header."""
    try:
        width, height, orientation = _image_size(image_path)
    except Exception as e:  # PIL raises several types for unreadable files
        return 0, 0, [(image_path, f"cannot read the image ({type(e).__name__}: {e})")]
    if classes is None:
        return height, width, []
    try:
        with Image.open(label_path) as label:
            problem = _label_problem(label)
            if problem is not None:
                return height, width, [(label_path, problem)]
            array = np.array(label)  # the stored values, as read_label_map gives them
    except Exception as e:
        return height, width, [(label_path, f"cannot read the label PNG ({type(e).__name__}: {e})")]
    problems = []
    label_height, label_width = array.shape
    if (label_width, label_height) != (width, height):
        hint = (f" (the image's EXIF orientation {orientation} swaps its stored size)"
                if orientation in _TRANSPOSING_ORIENTATIONS else "")
        problems.append((label_path, f"label is {label_width}x{label_height} (WxH) but its image "
                                     f"{image_path} is {width}x{height}{hint}; they must be the same size"))
    allowed = set(range(len(classes.names))) | {classes.ignore_label}
    bad = [int(v) for v in _label_values(array) if int(v) not in allowed]
    if bad:
        listed = bad if len(bad) <= 10 else bad[:10] + ["..."]
        problems.append((label_path, f"label values {listed} outside the {classes.allowed_values_text()}"))
    return height, width, problems


def load_sem_seg_folder(
    root: str,
    split: str = "train",
    *,
    validate: bool = True,
    classes: Optional[FolderClasses] = None,
    num_workers: Optional[int] = None,
) -> List[dict]:
    """Records of one split of the folder dataset at ``root``.

    Args:
        root: the dataset folder (layout in the module docstring).
        split: a split name (:func:`folder_splits`).
        validate: read every label PNG and check its mode, values and size
            (else only the image headers are opened, for ``height``/``width``).
        classes: the classes to check the values against (default: read from
            ``root``).
        num_workers: threads for reading files (default: all cores).

    Returns:
        ``[{"file_name", "sem_seg_file_name", "height", "width"}]``, sorted by
        stem (in list order for split lists). ``height``/``width`` are the
        image's after its EXIF orientation, as Detectron2's ``read_image``
        returns it.

    Raises:
        FolderDatasetError: listing every problem found, each with its file.
    """
    root = os.path.abspath(os.path.expanduser(root))
    classes = read_folder_classes(root) if classes is None else classes
    pairs = _pair_files(root, _get_split(root, split))
    results = run_jobs(pairs, lambda pair: _check_pair(pair[0], pair[1], classes if validate else None),
                       num_workers)
    problems = [p for _, _, found in results for p in found]
    if problems:
        raise FolderDatasetError(root, problems, f"split {split!r}")
    return [
        {"file_name": image, "sem_seg_file_name": label, "height": height, "width": width}
        for (image, label), (height, width, _) in zip(pairs, results)
    ]


def _get_split(root: str, split: str) -> _Split:
    splits = _discover_splits(root)
    if split not in splits:
        raise FolderDatasetError(root, [(root, f"no split {split!r}; this folder has {sorted(splits)} "
                                               f"(a flat folder without splits/ is the one split {ALL_SPLIT!r})")])
    return splits[split]


# ---------------------------------------------------------------------------
# Catalog registration
# ---------------------------------------------------------------------------


def _fingerprint(pairs: Sequence[Tuple[str, str]]) -> Tuple:
    stats = []
    for pair in pairs:
        for path in pair:
            st = os.stat(path)
            stats.append((path, st.st_size, st.st_mtime_ns))
    return tuple(stats)


@dataclass
class FolderLoader:
    """The ``DatasetCatalog`` function of one registered folder split.

    Caches its records; they are reused while the listing and every file's
    size and modification time are unchanged (one ``stat`` per file, no read).
    """

    root: str
    split: str
    classes: FolderClasses
    validate: bool
    _cache: Optional[Tuple[Tuple, List[dict]]] = field(default=None, repr=False, compare=False)
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def __call__(self) -> List[dict]:
        with self._lock:
            pairs = _pair_files(self.root, _get_split(self.root, self.split))
            key = _fingerprint(pairs)
            if self._cache is None or self._cache[0] != key:
                records = load_sem_seg_folder(self.root, self.split, validate=self.validate, classes=self.classes)
                self._cache = (key, records)
            return [dict(r) for r in self._cache[1]]

    def __getstate__(self) -> Dict[str, Any]:
        state = dict(self.__dict__)
        state.pop("_lock")
        return state

    def __setstate__(self, state: Dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()


def register_sem_seg_folder(
    name: str,
    root: str,
    split: str = "train",
    *,
    validate: str = "auto",
    classes: Optional[FolderClasses] = None,
) -> str:
    """Register one split of a folder dataset as ``name``; returns ``name``.

    Args:
        name: the ``DatasetCatalog`` name (e.g. ``"my_data_train"``). A name
            registered earlier by this function is replaced (re-running a
            notebook cell works); one registered by anything else is an error.
        root: the dataset folder (layout in the module docstring).
        split: a split of the folder (``folder_splits(root)``).
        validate: when the per-file checks run: ``"eager"`` (now),
            ``"lazy"`` (at the first ``DatasetCatalog.get``), ``"auto"``
            (eager up to :data:`EAGER_VALIDATION_MAX_IMAGES` images, else
            lazy) or ``"off"``. The cheap checks (classes file, layout,
            pairing) always run now.
        classes: override the folder's classes file.

    Raises:
        FolderDatasetError: the folder is malformed (every problem listed).
        ValueError: a bad ``validate`` or a name taken by another dataset.
    """
    if validate not in VALIDATE_MODES:
        raise ValueError(f"validate must be one of {VALIDATE_MODES}, got {validate!r}")
    root = os.path.abspath(os.path.expanduser(root))
    classes = read_folder_classes(root) if classes is None else classes
    pairs = _pair_files(root, _get_split(root, split))
    loader = FolderLoader(root, split, classes, validate != "off")
    if validate == "eager" or (validate == "auto" and len(pairs) <= EAGER_VALIDATION_MAX_IMAGES):
        loader()  # raises now; the records stay cached for the loaders
    if name in DatasetCatalog.list():
        if not isinstance(DatasetCatalog[name], FolderLoader):
            raise ValueError(f"Dataset name {name!r} is already registered by another module; "
                             f"choose another name for the folder {root}")
        DatasetCatalog.remove(name)
        MetadataCatalog.remove(name)
    DatasetCatalog.register(name, loader)
    image_dir, label_dir = os.path.dirname(pairs[0][0]), os.path.dirname(pairs[0][1])
    MetadataCatalog.get(name).set(
        stuff_classes=list(classes.names),
        stuff_colors=[list(c) for c in classes.colors],
        ignore_label=classes.ignore_label,
        evaluator_type="sem_seg",
        image_root=image_dir,
        sem_seg_root=label_dir,
        folder_root=root,
        folder_split=split,
        classes_file=classes.path,
    )
    return name


def folder_dataset_name(root: str, split: str) -> str:
    """The name ``DATASETS.FOLDER`` registers a split under: ``folder_<folder name>_<split>``."""
    base = re.sub(r"[^0-9A-Za-z]+", "_", os.path.basename(os.path.abspath(os.path.expanduser(root)))).strip("_")
    return f"folder_{base or 'data'}_{split}"


def register_sem_seg_folder_splits(
    root: str, *, prefix: Optional[str] = None, validate: str = "auto"
) -> Dict[str, str]:
    """Register every split of the folder at ``root``; returns ``{split: name}``.

    Names are ``<prefix>_<split>``, by default :func:`folder_dataset_name`'s.
    """
    classes = read_folder_classes(root)
    names = {}
    for split in folder_splits(root):
        name = f"{prefix}_{split}" if prefix else folder_dataset_name(root, split)
        names[split] = register_sem_seg_folder(name, root, split, validate=validate, classes=classes)
    return names


def _check_config_matches(cfg: CfgNode) -> None:
    """Stop a run whose model does not fit the folder datasets it names."""
    head = cfg.MODEL.SEM_SEG_HEAD
    for name in list(cfg.DATASETS.TRAIN) + list(cfg.DATASETS.TEST):
        if name not in DatasetCatalog.list() or not isinstance(DatasetCatalog[name], FolderLoader):
            continue
        meta = MetadataCatalog.get(name)
        if head.NUM_CLASSES != len(meta.stuff_classes):
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.NUM_CLASSES is {head.NUM_CLASSES} but dataset {name!r} has "
                f"{len(meta.stuff_classes)} classes ({meta.classes_file}); set NUM_CLASSES "
                f"{len(meta.stuff_classes)}, or use DATASETS.FOLDER, which sets it")
        if head.IGNORE_VALUE != meta.ignore_label:
            raise ValueError(
                f"MODEL.SEM_SEG_HEAD.IGNORE_VALUE is {head.IGNORE_VALUE} but dataset {name!r} ignores "
                f"{meta.ignore_label} ({meta.classes_file}); set IGNORE_VALUE {meta.ignore_label}")


def configure_folder_dataset(cfg: CfgNode) -> None:
    """Apply ``DATASETS.FOLDER`` to an unfrozen ``cfg``, in place.

    With ``DATASETS.FOLDER`` set: registers its train and test splits
    (:func:`folder_dataset_name`), sets ``DATASETS.TRAIN`` / ``DATASETS.TEST``
    to them (replacing the config's), and ``MODEL.SEM_SEG_HEAD.NUM_CLASSES`` /
    ``IGNORE_VALUE`` from the classes file. Splits: ``DATASETS.FOLDER_TRAIN_SPLIT``
    (empty: ``train``, or the folder's only split) and
    ``DATASETS.FOLDER_TEST_SPLITS`` (empty: ``val`` if the folder has one, else
    the training split, with a warning). Per-file checks follow
    ``DATASETS.FOLDER_VALIDATE``.

    Always (also without the key): raises if a folder dataset named in
    ``DATASETS.TRAIN/TEST`` disagrees with ``NUM_CLASSES`` or ``IGNORE_VALUE``.
    Must run before the trainer builds its loaders; every process of a
    multi-GPU run calls it (``setup_cfg`` does).
    """
    folder = cfg.DATASETS.get("FOLDER", "")
    if folder:
        root = os.path.abspath(os.path.expanduser(folder))
        if not os.path.isdir(root):
            raise FolderDatasetError(root, [(root, f"DATASETS.FOLDER: folder not found; {LAYOUT_TEXT}")])
        classes = read_folder_classes(root)
        splits = folder_splits(root)
        train_split = cfg.DATASETS.FOLDER_TRAIN_SPLIT
        if not train_split:
            if "train" in splits:
                train_split = "train"
            elif len(splits) == 1:
                train_split = splits[0]
            else:
                raise FolderDatasetError(root, [(root, f"no 'train' split among {splits}; set "
                                                       "DATASETS.FOLDER_TRAIN_SPLIT")])
        test_splits = tuple(cfg.DATASETS.FOLDER_TEST_SPLITS)
        if not test_splits:
            test_splits = ("val",) if "val" in splits else (train_split,)
            if "val" not in splits:
                logger.warning(f"{root} has no 'val' split: evaluating on the training split {train_split!r}, "
                               "which measures fit, not generalisation (add images/val + labels/val)")
        unknown = [s for s in (train_split,) + test_splits if s not in splits]
        if unknown:
            raise FolderDatasetError(root, [(root, f"split(s) {unknown} not in this folder's {splits} "
                                                   "(DATASETS.FOLDER_TRAIN_SPLIT / FOLDER_TEST_SPLITS)")])
        names = {
            split: register_sem_seg_folder(folder_dataset_name(root, split), root, split,
                                           validate=cfg.DATASETS.FOLDER_VALIDATE, classes=classes)
            for split in dict.fromkeys((train_split,) + test_splits)
        }
        cfg.DATASETS.TRAIN = (names[train_split],)
        cfg.DATASETS.TEST = tuple(names[s] for s in test_splits)
        if cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES != len(classes.names):
            logger.info(f"MODEL.SEM_SEG_HEAD.NUM_CLASSES: {cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES} -> "
                        f"{len(classes.names)} ({classes.path})")
        cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = len(classes.names)
        cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE = classes.ignore_label
    elif not cfg.DATASETS.TRAIN:
        # configs/own_data/*.yaml name no dataset; only a hint, since a config
        # without one is fine to load, inspect or use with --eval-only.
        logger.warning("DATASETS.TRAIN is empty: to train on your own folder of images and labels, "
                       "pass DATASETS.FOLDER /path/to/my_data (datasets/README.md, 'Train on your own data')")
    _check_config_matches(cfg)
