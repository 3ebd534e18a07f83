from .per_pixel_segmentor import PerPixelSegmentor

__all__ = ["PerPixelSegmentor"]
