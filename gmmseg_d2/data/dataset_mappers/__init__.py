from .per_pixel_semantic_dataset_mapper import PerPixelSemanticDatasetMapper, validate_label_values
from .mask_former_semantic_dataset_mapper import MaskFormerSemanticDatasetMapper
from .color_aug import ColorAugSSDTransform

__all__ = ["PerPixelSemanticDatasetMapper", "MaskFormerSemanticDatasetMapper", "validate_label_values",
           "ColorAugSSDTransform"]
