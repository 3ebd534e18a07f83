from .mask_former import MaskFormer
from .mask_former_head import MaskFormerHead
from .per_pixel_segmentor import PerPixelSegmentor

__all__ = ["MaskFormer", "MaskFormerHead", "PerPixelSegmentor"]
