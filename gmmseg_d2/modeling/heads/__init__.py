from .deeplab_head import DeepLabV3PlusClassifierHead, GMMSegDeepLabV3PlusHead
from .fcn_head import FCNHead
from .pixel_classifier import (
    PIXEL_CLASSIFIERS, build_pixel_classifier, classify_feature_map, gmm_em_loss,
    gmm_kwargs_from_config, pixel_anomaly_score,
)

__all__ = [
    "DeepLabV3PlusClassifierHead", "FCNHead", "GMMSegDeepLabV3PlusHead", "PIXEL_CLASSIFIERS",
    "build_pixel_classifier",
    "classify_feature_map", "gmm_em_loss", "gmm_kwargs_from_config", "pixel_anomaly_score",
]
