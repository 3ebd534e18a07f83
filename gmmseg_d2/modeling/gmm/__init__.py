"""GMMSeg's Gaussian-mixture classifier and its building blocks.

See :mod:`.classifier` for how a head uses :class:`GaussianMixtureClassifier`.
"""
from .classifier import EMBEDDINGS, ConvBNReLUProjection, GaussianMixtureClassifier, GMMClassifierOutput
from .distributed import all_gather_rows
from .likelihood import diagonal_gaussian_log_likelihood
from .memory import MEMORY_INITS, ClassComponentMemory, evenly_spaced_ranks
from .sinkhorn import (
    segmented_sinkhorn_assignment,
    segmented_sinkhorn_transport_plan,
    sinkhorn_assignment,
    sinkhorn_transport_plan,
)

__all__ = [
    "EMBEDDINGS",
    "MEMORY_INITS",
    "ConvBNReLUProjection",
    "GaussianMixtureClassifier",
    "GMMClassifierOutput",
    "ClassComponentMemory",
    "all_gather_rows",
    "diagonal_gaussian_log_likelihood",
    "evenly_spaced_ranks",
    "segmented_sinkhorn_assignment",
    "segmented_sinkhorn_transport_plan",
    "sinkhorn_assignment",
    "sinkhorn_transport_plan",
]
