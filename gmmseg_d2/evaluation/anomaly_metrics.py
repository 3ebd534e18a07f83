"""Pixel-level anomaly-segmentation metrics: AP, FPR at 95 % TPR and AUROC.

Protocol (Fishyscapes / SegmentMeIfYouCan): every non-void pixel is one binary
sample, label 1 = anomaly (the positive class) and label 0 = in-distribution;
a higher score means "more anomalous". Metrics are reported in percent.

Metric definitions (``P`` anomaly pixels, ``N`` in-distribution pixels; the
thresholds are the distinct score values taken in descending order, so tied
pixels always enter together):

* **AP** -- ``sum_k (R_k - R_{k-1}) * P_k`` with ``R_0 = 0``, recall ``R_k`` and
  precision ``P_k`` after admitting every pixel scoring ``>=`` the k-th
  threshold. This is exactly ``sklearn.metrics.average_precision_score``.
* **AUROC** -- trapezoidal area under the ROC curve through ``(0, 0)`` and
  every threshold's ``(FPR_k, TPR_k)``, i.e. ``sklearn.metrics.roc_auc_score``
  (a positive/negative tie counts one half).
* **FPR95** -- the FPR at the *first* threshold (scanning from the highest
  score down) at which ``TPR >= 0.95``, with no interpolation between
  thresholds. This is how the SegmentMeIfYouCan benchmark code computes it
  (``searchsorted(tpr, 0.95)`` on the ascending TPR curve). With scikit-learn:
  ``fpr, tpr, _ = roc_curve(y, s, drop_intermediate=False)`` then
  ``fpr[np.argmax(tpr >= 0.95)]``. ``drop_intermediate`` must be ``False``:
  the default drops collinear ROC points, and the first point reaching 95 %
  can be one of them.

Degenerate sets (no anomaly pixel or no in-distribution pixel) make every
metric undefined: the functions emit a :class:`DegenerateAnomalySetWarning`
and return NaN.

:func:`anomaly_metrics` computes them exactly from scores and labels;
:func:`metrics_from_ranked_counts` from per-threshold counts (what the
bounded-memory :class:`~gmmseg_d2.evaluation.histogram.AnomalyScoreHistogram`
stores), and :func:`tie_group_error_bounds` bounds the error of treating
groups of distinct scores as ties.
"""

from __future__ import annotations

import warnings
from typing import Dict, Optional, Sequence, Tuple, Union

import numpy as np
import torch

__all__ = [
    "METRIC_NAMES",
    "DegenerateAnomalySetWarning",
    "anomaly_metrics",
    "metrics_from_ranked_counts",
    "tie_group_error_bounds",
]

ArrayLike = Union[np.ndarray, torch.Tensor, Sequence[float]]

#: Keys of the metric dictionaries, in reporting order.
METRIC_NAMES: Tuple[str, str, str] = ("AP", "FPR95", "AUROC")

_TPR_TARGET = 0.95


class DegenerateAnomalySetWarning(UserWarning):
    """The evaluated pixels lack one of the two classes; metrics are NaN."""


def _nan_metrics() -> Dict[str, float]:
    return {name: float("nan") for name in METRIC_NAMES}


def _warn_if_degenerate(num_anomaly: int, num_inlier: int) -> bool:
    """Warn and return True when a metric would be undefined."""
    if num_anomaly > 0 and num_inlier > 0:
        return False
    warnings.warn(
        f"Anomaly metrics are undefined: {num_anomaly} anomaly and {num_inlier} "
        "in-distribution (non-void) pixels; AP, FPR95 and AUROC need both "
        "classes. Returning NaN.",
        DegenerateAnomalySetWarning,
        stacklevel=3,
    )
    return True


def _as_count_array(counts: ArrayLike, name: str) -> np.ndarray:
    array = np.asarray(counts)
    if array.ndim != 1:
        raise ValueError(f"{name} must be 1-D, got shape {array.shape}")
    if array.size and (not np.issubdtype(array.dtype, np.integer) or array.min() < 0):
        raise ValueError(f"{name} must hold non-negative integers, got dtype {array.dtype}")
    return array.astype(np.int64, copy=False)


def _validated_ranked_counts(
    positive_counts: ArrayLike, negative_counts: ArrayLike
) -> Tuple[np.ndarray, np.ndarray]:
    """Check the per-group counts and drop groups that hold no pixel at all."""
    positives = _as_count_array(positive_counts, "positive_counts")
    negatives = _as_count_array(negative_counts, "negative_counts")
    if positives.shape != negatives.shape:
        raise ValueError(
            f"positive_counts {positives.shape} and negative_counts "
            f"{negatives.shape} must have the same length"
        )
    # An empty group adds no threshold; removing it keeps precision well defined.
    occupied = (positives + negatives) > 0
    return positives[occupied], negatives[occupied]


def metrics_from_ranked_counts(
    positive_counts: ArrayLike, negative_counts: ArrayLike
) -> Dict[str, float]:
    """AP, FPR95 and AUROC (percent) from per-threshold pixel counts.

    Args:
        positive_counts, negative_counts: for each group of tied scores, in
            **descending** score order, how many anomaly (positive) and
            in-distribution (negative) pixels it holds. Groups are treated as
            ties: all their pixels enter the prediction at the same threshold.

    Returns:
        ``{"AP": ..., "FPR95": ..., "AUROC": ...}`` in percent; NaN values (and
        a :class:`DegenerateAnomalySetWarning`) when a class is absent.
    """
    positives, negatives = _validated_ranked_counts(positive_counts, negative_counts)
    true_positives = np.cumsum(positives)
    false_positives = np.cumsum(negatives)
    num_anomaly = int(true_positives[-1]) if positives.size else 0
    num_inlier = int(false_positives[-1]) if negatives.size else 0
    if _warn_if_degenerate(num_anomaly, num_inlier):
        return _nan_metrics()

    tpr = true_positives / num_anomaly
    fpr = false_positives / num_inlier
    precision = true_positives / (true_positives + false_positives)

    recall_gain = np.diff(tpr, prepend=0.0)
    average_precision = float(np.sum(recall_gain * precision))

    # Trapezoids between consecutive ROC points, starting from (0, 0).
    fpr_step = np.diff(fpr, prepend=0.0)
    tpr_with_origin = np.concatenate(([0.0], tpr))
    auroc = float(np.sum(fpr_step * (tpr_with_origin[1:] + tpr_with_origin[:-1]) / 2.0))

    # The last threshold admits every pixel (TPR = 1), so the target is reached.
    first_at_target = int(np.argmax(tpr >= _TPR_TARGET))
    fpr_at_target = float(fpr[first_at_target])

    return {
        "AP": 100.0 * average_precision,
        "FPR95": 100.0 * fpr_at_target,
        "AUROC": 100.0 * auroc,
    }


def tie_group_error_bounds(
    positive_counts: ArrayLike,
    negative_counts: ArrayLike,
    exact_tie_groups: Optional[ArrayLike] = None,
) -> Dict[str, float]:
    """How far (in points) the true metrics can be from the grouped ones.

    :func:`metrics_from_ranked_counts` treats each group as one tie. If a group
    really covers an interval of distinct scores whose order inside it is
    unknown (a histogram bin), the metric of the underlying pixels, for *any*
    order or ties inside the groups, lies within these distances of the
    grouped value (``b`` indexes groups; ``p_b``/``n_b`` its positive/negative
    counts; ``TP_b``/``FP_b`` cumulative counts up to and including it):

    * AUROC: the only pairs whose order is unknown are a positive and a
      negative in the same group, which the grouped value counts as one half
      and the truth counts as 0, 1/2 or 1: ``|err| <= sum_b p_b n_b / (2 P N)``.
    * FPR95: the true crossing of TPR = 95 % happens inside the first group
      ``b*`` whose cumulative TPR reaches it, so the true FPR lies in
      ``[FP_{b*-1}, FP_{b*}] / N`` while the grouped value is the upper end:
      ``0 <= err <= n_{b*} / N``.
    * AP: group ``b`` adds recall ``p_b / P``; every precision at a true
      threshold inside it has ``tp`` in ``[TP_{b-1} + 1, TP_b]`` and ``fp`` in
      ``[FP_{b-1}, FP_b]``, so it and the grouped ``TP_b / (TP_b + FP_b)``
      both lie in ``[(TP_{b-1}+1) / (TP_{b-1}+1+FP_b), TP_b / (TP_b+FP_{b-1})]``:
      ``|err| <= sum_b (p_b / P) * (width of that interval)``.

    Args:
        positive_counts, negative_counts: as for :func:`metrics_from_ranked_counts`.
        exact_tie_groups: optional boolean mask (same order) of groups known
            to hold a single score value; they are true ties, add no
            uncertainty, and are skipped in the sums above.

    Returns NaN bounds for degenerate counts (no warning: the metrics
    function already warns).
    """
    positives = _as_count_array(positive_counts, "positive_counts")
    negatives = _as_count_array(negative_counts, "negative_counts")
    if positives.shape != negatives.shape:
        raise ValueError("positive_counts and negative_counts must have the same length")
    uncertain = np.ones(positives.shape, dtype=bool)
    if exact_tie_groups is not None:
        uncertain = ~np.asarray(exact_tie_groups, dtype=bool).reshape(positives.shape)
    occupied = (positives + negatives) > 0
    positives, negatives, uncertain = positives[occupied], negatives[occupied], uncertain[occupied]
    num_anomaly = int(positives.sum())
    num_inlier = int(negatives.sum())
    if num_anomaly == 0 or num_inlier == 0:
        return _nan_metrics()
    # float64 products: p_b * n_b can overflow int64 for huge bins.
    positives_f = positives.astype(np.float64)
    negatives_f = negatives.astype(np.float64)
    true_positives = np.cumsum(positives_f)
    false_positives = np.cumsum(negatives_f)

    auroc_bound = float(np.sum((positives_f * negatives_f)[uncertain])) / (
        2.0 * num_anomaly * num_inlier
    )

    first_at_target = int(np.argmax(true_positives / num_anomaly >= _TPR_TARGET))
    fpr95_bound = (
        float(negatives_f[first_at_target]) / num_inlier if uncertain[first_at_target] else 0.0
    )

    contributes = (positives > 0) & uncertain
    tp_after = true_positives[contributes]
    fp_after = false_positives[contributes]
    tp_before = tp_after - positives_f[contributes]
    fp_before = fp_after - negatives_f[contributes]
    precision_high = tp_after / (tp_after + fp_before)
    precision_low = (tp_before + 1.0) / (tp_before + 1.0 + fp_after)
    ap_bound = float(
        np.sum(positives_f[contributes] / num_anomaly * (precision_high - precision_low))
    )

    return {"AP": 100.0 * ap_bound, "FPR95": 100.0 * fpr95_bound, "AUROC": 100.0 * auroc_bound}


def _to_numpy(values: ArrayLike) -> np.ndarray:
    """A NumPy view/copy of a tensor (any device) or array-like."""
    if isinstance(values, torch.Tensor):
        values = values.detach().to("cpu")
        # NumPy has no bfloat16; half-precision scores are exact in float32.
        if values.dtype in (torch.float16, torch.bfloat16):
            values = values.float()
        return values.numpy()
    return np.asarray(values)


def _as_score_array(scores: ArrayLike) -> np.ndarray:
    """Scores as a float32/float64 array (float16 widened, integers to float64)."""
    array = _to_numpy(scores)
    if array.dtype == np.float32 or array.dtype == np.float64:
        return array
    if np.issubdtype(array.dtype, np.floating):
        return array.astype(np.float32)
    if np.issubdtype(array.dtype, np.integer) or array.dtype == np.bool_:
        return array.astype(np.float64)
    raise TypeError(f"anomaly scores must be real numbers, got dtype {array.dtype}")


def _check_no_nan(scores: np.ndarray, source: str) -> None:
    if np.isnan(scores).any():
        raise ValueError(
            f"{source}: {int(np.isnan(scores).sum())} anomaly scores are NaN; "
            "a NaN has no rank, so AP/FPR95/AUROC would be meaningless"
        )


def _ranked_counts_of_scores(
    scores: np.ndarray, is_anomaly: np.ndarray
) -> Tuple[np.ndarray, np.ndarray]:
    """Per distinct score (descending): number of anomaly and inlier pixels."""
    distinct_scores, group_of_pixel = np.unique(scores, return_inverse=True)
    num_groups = distinct_scores.size
    group_of_pixel = group_of_pixel.reshape(-1)
    positives = np.bincount(group_of_pixel[is_anomaly], minlength=num_groups)
    negatives = np.bincount(group_of_pixel[~is_anomaly], minlength=num_groups)
    return positives[::-1], negatives[::-1]


def anomaly_metrics(
    scores: ArrayLike, labels: ArrayLike, ignore_label: Optional[int] = 255
) -> Dict[str, float]:
    """Exact AP, FPR95 and AUROC (percent) of anomaly scores against labels.

    Args:
        scores: anomaly scores, any shape; higher = more anomalous. ``+-inf``
            are allowed (they rank first/last); NaN raises ``ValueError``.
        labels: same shape; 1 = anomaly, 0 = in-distribution, ``ignore_label``
            = void (skipped). Any other value raises ``ValueError``.
        ignore_label: the void value, or None if there is none.

    Returns:
        ``{"AP", "FPR95", "AUROC"}`` in percent; definitions in the module
        docstring. NaN plus a :class:`DegenerateAnomalySetWarning` when the
        non-void pixels lack a class.
    """
    score_array = _as_score_array(scores)
    label_array = _to_numpy(labels)
    if score_array.shape != label_array.shape:
        raise ValueError(
            f"scores {score_array.shape} and labels {label_array.shape} must have the same shape"
        )
    score_array = score_array.reshape(-1)
    label_array = label_array.reshape(-1)
    if ignore_label is not None:
        non_void = label_array != ignore_label
        score_array, label_array = score_array[non_void], label_array[non_void]
    unexpected = np.setdiff1d(np.unique(label_array), [0, 1])
    if unexpected.size:
        raise ValueError(
            f"labels must be 0 (in-distribution), 1 (anomaly) or the ignore label "
            f"{ignore_label}; found {unexpected.tolist()}"
        )
    _check_no_nan(score_array, "anomaly_metrics")
    positives, negatives = _ranked_counts_of_scores(score_array, label_array == 1)
    return metrics_from_ranked_counts(positives, negatives)
