"""GMMSeg's Gaussian-mixture classifier and its building blocks.

See :mod:`.classifier` for how a head uses :class:`GaussianMixtureClassifier`.
"""
from .classifier import EMBEDDINGS, ConvBNReLUProjection, GaussianMixtureClassifier, GMMClassifierOutput
from .distributed import all_gather_rows
from .likelihood import diagonal_gaussian_log_likelihood
from .memory import (
    MEMORY_INITS,
    MEMORY_KINDS,
    ClassComponentMemory,
    ClassComponentStatsMemory,
    build_class_component_memory,
    direction_and_variance,
    evenly_spaced_ranks,
)
from .sinkhorn import (
    segmented_sinkhorn_assignment,
    segmented_sinkhorn_transport_plan,
    sinkhorn_assignment,
    sinkhorn_transport_plan,
)

__all__ = [
    "EMBEDDINGS",
    "MEMORY_INITS",
    "MEMORY_KINDS",
    "ConvBNReLUProjection",
    "GaussianMixtureClassifier",
    "GMMClassifierOutput",
    "ClassComponentMemory",
    "ClassComponentStatsMemory",
    "build_class_component_memory",
    "direction_and_variance",
    "all_gather_rows",
    "diagonal_gaussian_log_likelihood",
    "evenly_spaced_ranks",
    "segmented_sinkhorn_assignment",
    "segmented_sinkhorn_transport_plan",
    "sinkhorn_assignment",
    "sinkhorn_transport_plan",
]
