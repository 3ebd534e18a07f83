"""Reading the images and label maps of a dataset, with errors that name the file.

Every label PNG gmmseg_d2 reads (dataset mappers, evaluators, dataset
preparation, samplers, benchmarks) goes through :func:`read_label_map`, and
the dataset mappers read images with :func:`read_image`. A file that exists
but cannot be decoded (truncated by an interrupted copy or extraction,
corrupt) raises :class:`UnreadableImageError`, which names the file and says
how to fix it, instead of Pillow's bare "image file is truncated".
"""
from __future__ import annotations

from typing import Optional

import numpy as np
from PIL import Image

from detectron2.data import detection_utils
from detectron2.utils.file_io import PathManager

__all__ = ["UnreadableImageError", "read_image", "read_image_8bit", "read_label_map"]

#: What to do about an undecodable file (part of every UnreadableImageError).
_FIX = ("The file is truncated or corrupt (an interrupted download, copy or extraction?): re-extract or "
        "regenerate the dataset (datasets/prepare_*.py; see datasets/README.md), or remove the record.")
#: The same for a file a user hands a tool directly (demo inputs), not a dataset record.
_FIX_INPUT = "The file is truncated or corrupt: copy or save it again, or leave it out of the inputs."


class UnreadableImageError(OSError):
    """An image, label map or video cannot be decoded (truncated, corrupt, unsupported).

    ``UnreadableImageError(message)`` like any ``OSError``; the readers here
    build the message with :meth:`for_file`, which names the file and the fix.

    Attributes:
        path: the file that could not be read (None when not given).
    """

    def __init__(self, message: str, path: Optional[str] = None) -> None:
        super().__init__(message)
        self.path = path

    @classmethod
    def for_file(cls, path: str, kind: str, cause: BaseException, fix: str = _FIX) -> "UnreadableImageError":
        """The error for ``path`` (a ``kind``, e.g. "image"), caused by Pillow's ``cause``; ``fix`` says what to do."""
        return cls(f"Cannot read {kind} '{path}': {type(cause).__name__}: {cause}. {fix}", path)


def _is_decoding_error(error: BaseException) -> bool:
    """Pillow's failures on a bad file, not a missing one (which already names its path)."""
    if isinstance(error, FileNotFoundError):
        return False
    # OSError: truncated data / unidentified format; SyntaxError and ValueError:
    # broken PNG chunks or headers; EOFError: data ends inside a frame.
    return isinstance(error, (OSError, SyntaxError, ValueError, EOFError))


def read_label_map(filename: str, dtype=np.int64) -> np.ndarray:
    """Read a single-channel label PNG as an ``(H, W)`` array of ``dtype``.

    ``dtype=None`` keeps the file's own integer type (uint8 for 8-bit PNGs).

    The one label reader of gmmseg_d2. The values are the stored ones: palette
    (``P``) PNGs give their indices, 16-bit PNGs their full range.

    It has the signature of Detectron2's loader, so it can be passed as
    ``SemSegEvaluator(sem_seg_loading_fn=read_label_map)``; unlike that
    loader, it copies, which numpy >= 2 requires for PIL images.

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableImageError: the file cannot be decoded (truncated, corrupt).
        ValueError: the image is not a single-channel map of integers.
    """
    try:
        with PathManager.open(filename, "rb") as handle, Image.open(handle) as image:
            mode = image.mode
            array = np.array(image)
    except Exception as error:  # noqa: BLE001  (re-raised, wrapped only when it is a decoding failure)
        if _is_decoding_error(error):
            raise UnreadableImageError.for_file(filename, "label map", error) from error
        raise
    if array.ndim != 2 or not (np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_):
        raise ValueError(
            f"Label file {filename} has mode {mode!r} (array {array.dtype} of shape {array.shape}); a semantic "
            "label map must be a single-channel image of class ids (PNG mode L, P, I or I;16)")
    return array if dtype is None else array.astype(dtype, copy=False)


def read_image(filename: str, format: Optional[str] = None) -> np.ndarray:
    """Detectron2's :func:`~detectron2.data.detection_utils.read_image`, naming the file on failure.

    Returns an ``(H, W, C)`` uint8 array in ``format`` (e.g. ``"RGB"``,
    ``"BGR"``), exactly as Detectron2's function does.

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableImageError: the file cannot be decoded (truncated, corrupt).
    """
    try:
        image = detection_utils.read_image(filename, format=format)
        # Pillow decodes lazily; detection_utils converts to an array, so a
        # truncated file has failed by now.
    except Exception as error:  # noqa: BLE001
        if _is_decoding_error(error):
            raise UnreadableImageError.for_file(filename, "image", error) from error
        raise
    return image


def read_image_8bit(filename: str, format: Optional[str] = "RGB") -> np.ndarray:
    """An ``(H, W, 3)`` uint8 image in ``format`` ("RGB" or "BGR"), whatever the file's bit depth.

    Like :func:`read_image`, but 16-bit and 32-bit integer images (PNG modes
    ``I;16*``, ``I``), which Pillow's RGB conversion would clip to white, are
    rescaled to 8 bits first (16-bit: the top 8 bits; 32-bit: scaled by the
    image's maximum), and grey or palette images are expanded to 3 channels.

    Raises:
        FileNotFoundError: the file does not exist.
        UnreadableImageError: the file cannot be decoded (truncated, corrupt).
    """
    try:
        with PathManager.open(filename, "rb") as handle, Image.open(handle) as image:
            image = detection_utils._apply_exif_orientation(image)
            if image.mode.startswith("I;16") or image.mode == "I":
                pixels = np.array(image).astype(np.int64)
                if image.mode == "I":
                    peak = int(pixels.max(initial=0))
                    pixels = pixels * 255 // peak if peak > 255 else pixels
                else:
                    pixels = pixels >> 8
                image = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8), mode="L")
            array = np.asarray(image.convert("RGB")).copy()
    except Exception as error:  # noqa: BLE001
        if _is_decoding_error(error):
            raise UnreadableImageError.for_file(filename, "image", error, fix=_FIX_INPUT) from error
        raise
    if format == "BGR":
        return np.ascontiguousarray(array[:, :, ::-1])
    if format not in (None, "RGB"):
        raise ValueError(f"read_image_8bit reads RGB or BGR images, not {format!r} (reading {filename})")
    return array
