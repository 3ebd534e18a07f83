"""Classifiers behind one seam (:mod:`.base`): the segmenters build theirs from
``MODEL.CLASSIFIER.NAME`` through :data:`CLASSIFIER_REGISTRY`.

Registered here: ``"softmax"`` (:class:`LinearClassifier`) and ``"gmm"``
(:class:`GMMClassifier`). Projects register more on import (``projects/ProtoSeg``:
``"prototype"``).
"""
from .base import (
    CLASSIFIER_LEVELS, CLASSIFIER_REGISTRY, QUERY_IGNORE_LABEL, ClassifierOutput, SegmentationClassifier,
    build_classifier, check_level, concatenate_outputs,
)
from .gmm import QUERY_MEMORY_SAMPLES, GMMClassifier
from .linear import LinearClassifier

__all__ = [
    "CLASSIFIER_LEVELS", "CLASSIFIER_REGISTRY", "QUERY_IGNORE_LABEL", "QUERY_MEMORY_SAMPLES", "ClassifierOutput",
    "GMMClassifier", "LinearClassifier", "SegmentationClassifier", "build_classifier", "check_level",
    "concatenate_outputs",
]
