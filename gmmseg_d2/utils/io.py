"""Small file helpers."""
import numpy as np
from PIL import Image

from detectron2.utils.file_io import PathManager

__all__ = ["read_label_map"]


def read_label_map(filename: str, dtype=np.int64) -> np.ndarray:
    """Read a label PNG as an ``(H, W)`` array of ``dtype``.

    Detectron2's default loader for ``SemSegEvaluator`` asks numpy for a
    no-copy conversion, which numpy >= 2 refuses for PIL images; this one
    copies, and has the same signature, so it can be passed as
    ``SemSegEvaluator(sem_seg_loading_fn=read_label_map)``.
    """
    with PathManager.open(filename, "rb") as f:
        return np.asarray(Image.open(f), dtype=dtype)
