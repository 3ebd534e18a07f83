"""Evaluation: Detectron2's SemSegEvaluator is reused as is; anomaly segmentation and the
Cityscapes evaluator choice here.

* :mod:`.anomaly_metrics`: AP, FPR95, AUROC (exact, from scores or ranked counts);
* :mod:`.histogram`: the bounded-memory :class:`AnomalyScoreHistogram`;
* :mod:`.anomaly_evaluation`: the Detectron2 :class:`AnomalyEvaluator`;
* :mod:`.cityscapes_evaluation`: Detectron2's Cityscapes evaluator, or SemSegEvaluator without cityscapesscripts.
"""

from .anomaly_evaluation import DEFAULT_EXACT_PIXEL_BUDGET, EVALUATION_MODES, AnomalyEvaluator
from .anomaly_metrics import (
    METRIC_NAMES,
    DegenerateAnomalySetWarning,
    anomaly_metrics,
    metrics_from_ranked_counts,
    tie_group_error_bounds,
)
from .cityscapes_evaluation import CityscapesSemSegEvaluatorNumpy2, build_cityscapes_sem_seg_evaluator
from .histogram import DEFAULT_MAX_BINS, AnomalyScoreHistogram

__all__ = [
    "DEFAULT_EXACT_PIXEL_BUDGET",
    "DEFAULT_MAX_BINS",
    "EVALUATION_MODES",
    "METRIC_NAMES",
    "AnomalyEvaluator",
    "AnomalyScoreHistogram",
    "CityscapesSemSegEvaluatorNumpy2",
    "DegenerateAnomalySetWarning",
    "build_cityscapes_sem_seg_evaluator",
    "anomaly_metrics",
    "metrics_from_ranked_counts",
    "tie_group_error_bounds",
]
