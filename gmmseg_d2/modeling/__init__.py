"""Models: importing this package registers backbones, heads, pixel and transformer
decoders, and meta-architectures with Detectron2's registries."""
from . import backbone, heads, meta_arch, pixel_decoder, transformer_decoder  # noqa: F401  (registration)
from .anomaly import (
    MASK_CLASSIFICATION_ANOMALY_SCORES, MASK_DENSITY_ANOMALY_SCORES, SOFTMAX_ANOMALY_SCORES,
    mask_classification_anomaly_score, mask_density_anomaly_score, softmax_anomaly_score,
)
from .criterion import SetCriterion
from .gmm_mask_classification import GMMSetCriterion, QueryGaussianMixtureClassifier
from .matcher import HungarianMatcher

__all__ = [
    "GMMSetCriterion", "HungarianMatcher", "MASK_CLASSIFICATION_ANOMALY_SCORES", "MASK_DENSITY_ANOMALY_SCORES",
    "QueryGaussianMixtureClassifier", "SOFTMAX_ANOMALY_SCORES", "SetCriterion",
    "mask_classification_anomaly_score", "mask_density_anomaly_score", "softmax_anomaly_score",
]
