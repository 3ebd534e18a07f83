"""Dataset registrations. Importing this package registers every dataset with
Detectron2's `DatasetCatalog`/`MetadataCatalog`; no file is read or written."""

from . import mosaic  # noqa: F401  (registers mosaic_sem_seg_{train,val}, mosaic_anomaly_val)
from .mosaic import (
    MOSAIC_CLASSES,
    MOSAIC_COLORS,
    ensure_mosaic_dataset,
    generate_mosaic_dataset,
    load_mosaic_split,
)

__all__ = [
    "MOSAIC_CLASSES",
    "MOSAIC_COLORS",
    "ensure_mosaic_dataset",
    "generate_mosaic_dataset",
    "load_mosaic_split",
]
