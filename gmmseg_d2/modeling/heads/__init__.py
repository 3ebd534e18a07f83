from .deeplab_head import DeepLabV3PlusClassifierHead, GMMSegDeepLabV3PlusHead
from .fcn_head import FCNHead
from .pixel_classifier import PixelClassifierHeadMixin, labels_at, pixel_classifier_builder
from .segformer_head import SegFormerHead

__all__ = [
    "DeepLabV3PlusClassifierHead", "FCNHead", "GMMSegDeepLabV3PlusHead", "PixelClassifierHeadMixin", "labels_at",
    "pixel_classifier_builder", "SegFormerHead",
]
