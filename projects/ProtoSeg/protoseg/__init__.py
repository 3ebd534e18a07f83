"""ProtoSeg's prototype classifier for gmmseg_d2 (``projects/ProtoSeg``).

Importing this package registers ``"prototype"`` in gmmseg_d2's
``CLASSIFIER_REGISTRY`` (``MODEL.CLASSIFIER.NAME: "prototype"``); add its keys
with :func:`add_protoseg_config` before merging a config that sets
``MODEL.PROTO.*``.
"""
from .classifier import (
    L2_AXES, PROJECTIONS, UPDATE_ASSIGNMENTS, ProjectionHead, PrototypeClassifier, PrototypeDetails,
)
from .config import add_protoseg_config

__all__ = [
    "L2_AXES", "PROJECTIONS", "UPDATE_ASSIGNMENTS", "ProjectionHead", "PrototypeClassifier", "PrototypeDetails",
    "add_protoseg_config",
]
