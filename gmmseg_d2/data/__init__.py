"""Data: importing this package registers gmmseg_d2's datasets."""
from . import datasets  # noqa: F401  (registration side effects)
from .dataset_mappers import ColorAugSSDTransform, PerPixelSemanticDatasetMapper, validate_label_values

__all__ = ["ColorAugSSDTransform", "PerPixelSemanticDatasetMapper", "validate_label_values"]
