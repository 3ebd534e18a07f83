"""Models: importing this package registers backbones, heads, classifiers, pixel and
transformer decoders, and meta-architectures with Detectron2's registries."""
from . import backbone, classifiers, heads, meta_arch, pixel_decoder, transformer_decoder  # noqa: F401  (registration)
from .anomaly import (
    MASK_CLASSIFICATION_ANOMALY_SCORES, MASK_DENSITY_ANOMALY_SCORES, SOFTMAX_ANOMALY_SCORES,
    mask_classification_anomaly_score, mask_density_anomaly_score, softmax_anomaly_score,
)
from .classifiers import (
    CLASSIFIER_REGISTRY, ClassifierOutput, GMMClassifier, LinearClassifier, SegmentationClassifier, build_classifier,
)
from .criterion import SetCriterion, query_class_labels
from .matcher import HungarianMatcher

__all__ = [
    "CLASSIFIER_REGISTRY", "ClassifierOutput", "GMMClassifier", "HungarianMatcher", "LinearClassifier",
    "MASK_CLASSIFICATION_ANOMALY_SCORES", "MASK_DENSITY_ANOMALY_SCORES", "SOFTMAX_ANOMALY_SCORES",
    "SegmentationClassifier", "SetCriterion", "build_classifier", "mask_classification_anomaly_score",
    "mask_density_anomaly_score", "query_class_labels", "softmax_anomaly_score",
]
