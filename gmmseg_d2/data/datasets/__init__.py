"""Dataset registrations. Importing this package registers every dataset with
Detectron2's `DatasetCatalog`/`MetadataCatalog`; no file is read or written.
A dataset's files are looked up (under `$DETECTRON2_DATASETS`, read then) and
checked only when it is requested; see datasets/README.md for the layouts."""

from . import mosaic  # noqa: F401  (registers mosaic_sem_seg_{train,val}, mosaic_anomaly_val)
from . import textures  # noqa: F401  (registers textures_sem_seg_*, textures_anomaly_{near,far}_*)
from . import ade20k, anomaly, cityscapes, coco_stuff  # noqa: F401  (real datasets, lazily checked)
from .anomaly import ANOMALY_DATASETS
from .common import DatasetNotReadyError
from .folder import FolderDatasetError, register_sem_seg_folder, register_sem_seg_folder_splits  # noqa: F401  (your own data)
from .mosaic import (
    MOSAIC_CLASSES,
    MOSAIC_COLORS,
    ensure_mosaic_dataset,
    generate_mosaic_dataset,
    load_mosaic_split,
)

#: Every real dataset name gmmseg_d2 registers (or takes over from Detectron2).
REAL_DATASET_NAMES = (
    list(ade20k.ADE20K_SPLITS)
    + list(cityscapes.CITYSCAPES_SPLITS)
    + list(coco_stuff.COCO_STUFF_164K_SPLITS)
    + list(coco_stuff.COCO_STUFF_10K_SPLITS)
    + list(ANOMALY_DATASETS)
)

__all__ = [
    "ANOMALY_DATASETS",
    "DatasetNotReadyError",
    "MOSAIC_CLASSES",
    "MOSAIC_COLORS",
    "REAL_DATASET_NAMES",
    "ensure_mosaic_dataset",
    "generate_mosaic_dataset",
    "load_mosaic_split",
]
