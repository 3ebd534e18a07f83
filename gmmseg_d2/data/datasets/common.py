"""Shared machinery of the real-dataset registrations.

Every real dataset is registered at import time with a loader that does no
work until the dataset is requested. The loader then

1. resolves ``$DETECTRON2_DATASETS`` *now* (not at import), so tests and
   notebooks can point it elsewhere after ``import gmmseg_d2``;
2. checks the tree and raises one :class:`DatasetNotReadyError` that names
   the dataset, the path it looked at, what is missing and the command that
   fixes it (typically a ``datasets/prepare_*.py`` script);
3. refreshes the metadata roots (``image_root``/``sem_seg_root`` or
   Cityscapes' ``image_dir``/``gt_dir``) to the tree actually loaded;
4. lists the records with Detectron2's loading function.

Names that Detectron2 registers itself (``ade20k_sem_seg_*``,
``cityscapes_fine_sem_seg_*``) keep Detectron2's metadata; only their loader
is swapped for the checked one, which ends in the same Detectron2 function.
"""
from __future__ import annotations

import argparse
import logging
import os
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence

import numpy as np
from PIL import Image

from detectron2.data import DatasetCatalog, MetadataCatalog

from ...utils.io import read_label_map

__all__ = [
    "DatasetNotReadyError",
    "IMAGE_EXTENSIONS",
    "CheckedLoader",
    "datasets_root",
    "describe_root",
    "register_checked",
    "refresh_metadata",
    "require_dir",
    "list_stems",
    "require_complete_conversion",
    "load_image_label_pairs",
    "read_label_png",
    "write_label_png",
    "run_jobs",
    "convert_label_files",
    "lookup_table",
    "prepare_argument_parser",
]

logger = logging.getLogger(__name__)

#: Image formats an anomaly dataset may ship (searched in this order).
IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg", ".webp")


def datasets_root() -> str:
    """``$DETECTRON2_DATASETS`` read now, or Detectron2's default ``./datasets``."""
    return os.path.expanduser(os.getenv("DETECTRON2_DATASETS", "datasets"))


def describe_root() -> str:
    value = os.getenv("DETECTRON2_DATASETS")
    if value is None:
        return "DETECTRON2_DATASETS is unset, so the default './datasets' is used"
    return f"DETECTRON2_DATASETS={value!r}"


class DatasetNotReadyError(FileNotFoundError):
    """A registered dataset is missing or only partly prepared.

    Attributes:
        dataset_name: the registered name that was requested.
        path: the file or folder that was looked at.
        missing: what is missing there, in words.
        fix: the command or step that makes the dataset usable.
    """

    def __init__(self, dataset_name: str, path: str, missing: str, fix: str) -> None:
        self.dataset_name, self.path, self.missing, self.fix = dataset_name, path, missing, fix
        super().__init__(
            f"Dataset {dataset_name!r}: {missing} at '{os.path.abspath(path)}' ({describe_root()}).\n"
            f"Fix: {fix}\nSee datasets/README.md for the expected layout."
        )


def require_dir(dataset_name: str, path: str, missing: str, fix: str) -> None:
    """Raise :class:`DatasetNotReadyError` unless ``path`` is a folder."""
    if not os.path.isdir(path):
        raise DatasetNotReadyError(dataset_name, path, missing, fix)


def list_stems(folder: str, extensions: Sequence[str], suffix: str = "") -> Dict[str, str]:
    """``{stem: file name}`` of the files in ``folder`` named ``<stem><suffix><ext>``.

    Extensions are compared case-insensitively; a file matching none is skipped.
    """
    stems: Dict[str, str] = {}
    for name in os.listdir(folder):
        base, ext = os.path.splitext(name)
        if ext.lower() not in extensions or not base.endswith(suffix):
            continue
        stems[base[: len(base) - len(suffix)] if suffix else base] = name
    return stems


def require_complete_conversion(
    dataset_name: str, source_dir: str, converted_dir: str, extension: str, fix: str
) -> None:
    """Check that every ``*<extension>`` file of ``source_dir`` has a converted twin.

    A conversion that was interrupted (or a copy that was cut short) leaves
    fewer converted files than sources; training on that subset silently
    would change the dataset, so it is an error.
    """
    sources = set(list_stems(source_dir, (extension,)))
    converted = set(list_stems(converted_dir, (extension,)))
    missing = sorted(sources - converted)
    if missing:
        raise DatasetNotReadyError(
            dataset_name,
            converted_dir,
            f"half-prepared: {len(missing)} of {len(sources)} converted label files are missing "
            f"(e.g. {missing[0]}{extension})",
            fix,
        )


def load_image_label_pairs(
    dataset_name: str, image_dir: str, label_dir: str, fix: str, label_suffix: str = ""
) -> List[dict]:
    """Records pairing ``label_dir/<stem><label_suffix>.png`` with ``image_dir/<stem>.<ext>``.

    Every label must have exactly one image (any of :data:`IMAGE_EXTENSIONS`);
    images without a label are ignored (the benchmarks ship unlabelled test
    images next to the labelled validation ones). Sorted by stem.
    """
    require_dir(dataset_name, image_dir, "image folder not found", fix)
    require_dir(dataset_name, label_dir, "label folder not found", fix)
    labels = list_stems(label_dir, (".png",), label_suffix)
    if not labels:
        raise DatasetNotReadyError(dataset_name, label_dir, "no label PNG found", fix)
    images: Dict[str, List[str]] = {}
    for name in os.listdir(image_dir):
        base, ext = os.path.splitext(name)
        if ext.lower() in IMAGE_EXTENSIONS:
            images.setdefault(base, []).append(name)
    records = []
    for stem in sorted(labels):
        candidates = images.get(stem, [])
        if len(candidates) != 1:
            problem = "no image" if not candidates else f"several images {sorted(candidates)}"
            raise DatasetNotReadyError(
                dataset_name, image_dir, f"half-prepared: {problem} for label {labels[stem]}", fix
            )
        records.append(
            {
                "file_name": os.path.join(image_dir, candidates[0]),
                "sem_seg_file_name": os.path.join(label_dir, labels[stem]),
            }
        )
    return records


def read_label_png(path: str) -> np.ndarray:
    """An ``(H, W)`` label PNG as uint8 (:func:`~gmmseg_d2.utils.io.read_label_map`, range-checked)."""
    array = read_label_map(path)
    if array.max(initial=0) > 255 or array.min(initial=0) < 0:
        raise ValueError(f"{path}: label values outside 0..255 (min {array.min()}, max {array.max()})")
    return array.astype(np.uint8)


def write_label_png(array: np.ndarray, path: str) -> None:
    """Write an ``(H, W)`` uint8 label map atomically (temporary file, then rename).

    A prepare script killed mid-way therefore never leaves a truncated PNG
    under the final name; the loaders' completeness checks see it as missing.
    """
    if array.dtype != np.uint8 or array.ndim != 2:
        raise ValueError(f"label maps are (H, W) uint8, got {array.dtype} {array.shape}")
    os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
    partial = f"{path}.partial-{os.getpid()}"
    Image.fromarray(array).save(partial, format="PNG")
    os.replace(partial, path)


def run_jobs(jobs: Sequence[Any], work: Callable[[Any], Any], num_workers: Optional[int] = None) -> List[Any]:
    """``[work(job) for job in jobs]``, on ``num_workers`` threads (default: all cores).

    Threads suffice: the work is PNG/JPEG decoding and encoding, which Pillow
    does with the GIL released, and no process pool has to pickle anything.
    """
    workers = (os.cpu_count() or 1) if num_workers is None else max(1, int(num_workers))
    if workers == 1 or len(jobs) <= 1:
        return [work(job) for job in jobs]
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=workers) as pool:
        return list(pool.map(work, jobs))


def convert_label_files(
    pairs: Sequence[tuple],
    convert: Callable[[np.ndarray, str], np.ndarray],
    *,
    force: bool = False,
    num_workers: Optional[int] = None,
) -> int:
    """Write ``convert(read_label_png(src), src)`` to ``dst`` for every ``(src, dst)``.

    Existing outputs are kept unless ``force``: outputs are written
    atomically, so an interrupted run is completed by running it again.
    Returns the number of files written.
    """

    def work(pair: tuple) -> int:
        source, target = pair
        if not force and os.path.exists(target):
            return 0
        write_label_png(convert(read_label_png(source), source), target)
        return 1

    return sum(run_jobs(list(pairs), work, num_workers))


def prepare_argument_parser(description: str, *, force: bool = False) -> argparse.ArgumentParser:
    """The options every ``datasets/prepare_*.py`` script shares: ``--root``, ``--num-workers`` (and ``--force``).

    The script adds its own options to the returned parser.
    """
    parser = argparse.ArgumentParser(description=description, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)")
    if force:
        parser.add_argument("--force", action="store_true", help="rewrite existing outputs")
    parser.add_argument("--num-workers", type=int, default=None, help="threads (default: all cores)")
    return parser


def lookup_table(mapping: Dict[int, int], default: int = 255) -> np.ndarray:
    """A 256-entry uint8 table: ``table[v] = mapping.get(v, default)``."""
    table = np.full(256, default, dtype=np.uint8)
    for source, target in mapping.items():
        table[source] = target
    return table


# ---------------------------------------------------------------------------
# Catalog registration
# ---------------------------------------------------------------------------


@dataclass(frozen=True)
class CheckedLoader:
    """Picklable loader of one registered dataset: ``load(name, datasets_root())``.

    Being a distinct type lets a second registration pass recognise (and
    replace) loaders of its own, while leaving third-party ones alone.
    """

    dataset_name: str
    load: Callable[[str, str], List[dict]]

    def __call__(self) -> List[dict]:
        return self.load(self.dataset_name, datasets_root())


def refresh_metadata(dataset_name: str, **fields: Any) -> None:
    """Set metadata fields, changing the value of those already set.

    Detectron2's ``Metadata`` refuses to change a field once set, yet the data
    roots in the metadata must follow ``$DETECTRON2_DATASETS`` when it changes
    after import. A changed field is deleted and set again on the same object
    (not a re-created catalog entry), since evaluators keep the object they
    were built with. Fields not named here are kept.
    """
    metadata = MetadataCatalog.get(dataset_name)
    for key, value in fields.items():
        if key in metadata.as_dict() and metadata.get(key) != value:
            delattr(metadata, key)
        setattr(metadata, key, value)


def register_checked(
    dataset_name: str,
    load: Callable[[str, str], List[dict]],
    metadata: Dict[str, Any],
    *,
    replace_builtin: bool = False,
) -> None:
    """Register ``dataset_name`` with a :class:`CheckedLoader` and its metadata.

    * Not registered yet: registered.
    * Registered by a previous call of this function: replaced (re-import safe).
    * Registered by Detectron2's builtin module and ``replace_builtin``: its
      loader is replaced, its metadata kept and completed with ``metadata``.
    * Registered by anyone else: left alone (never registered twice).
    """
    loader = CheckedLoader(dataset_name, load)
    if dataset_name in DatasetCatalog.list():
        existing = DatasetCatalog[dataset_name]
        if not isinstance(existing, CheckedLoader) and not replace_builtin:
            logger.debug(f"{dataset_name!r} is already registered by another module; keeping it")
            return
        DatasetCatalog.remove(dataset_name)
    DatasetCatalog.register(dataset_name, loader)
    refresh_metadata(dataset_name, **metadata)

