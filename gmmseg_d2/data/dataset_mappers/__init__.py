from .per_pixel_semantic_dataset_mapper import PerPixelSemanticDatasetMapper, validate_label_values
from .color_aug import ColorAugSSDTransform

__all__ = ["PerPixelSemanticDatasetMapper", "validate_label_values", "ColorAugSSDTransform"]
