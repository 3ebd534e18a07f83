"""Evaluation: Detectron2's SemSegEvaluator is reused as is; anomaly segmentation here."""

from .anomaly_evaluation import (
    DEFAULT_EXACT_PIXEL_BUDGET,
    DEFAULT_MAX_BINS,
    EVALUATION_MODES,
    METRIC_NAMES,
    AnomalyEvaluator,
    AnomalyScoreHistogram,
    DegenerateAnomalySetWarning,
    anomaly_metrics,
    metrics_from_ranked_counts,
    tie_group_error_bounds,
)

__all__ = [
    "DEFAULT_EXACT_PIXEL_BUDGET",
    "DEFAULT_MAX_BINS",
    "EVALUATION_MODES",
    "METRIC_NAMES",
    "AnomalyEvaluator",
    "AnomalyScoreHistogram",
    "DegenerateAnomalySetWarning",
    "anomaly_metrics",
    "metrics_from_ranked_counts",
    "tie_group_error_bounds",
]
