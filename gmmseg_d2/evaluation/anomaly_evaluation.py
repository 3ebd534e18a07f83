"""Detectron2 evaluator for pixel-level anomaly segmentation: :class:`AnomalyEvaluator`.

The metrics (AP, FPR95, AUROC in percent over the non-void pixels) are defined
in :mod:`gmmseg_d2.evaluation.anomaly_metrics`. Two ways to accumulate pixels:

* **exact** -- keep every non-void score and label, compute at the end.
  Memory grows with the data (5-9 bytes a pixel).
* **bounded** -- :class:`~gmmseg_d2.evaluation.histogram.AnomalyScoreHistogram`,
  whose memory is fixed by its bin budget and which reports a certified
  bound on its own error.

By default (``mode="auto"``) the evaluator starts exact and switches to the
histogram once the pixel count passes ``exact_pixel_budget``.

The names this module exported before the metrics and the histogram moved to
their own modules are still importable from here.
"""

from __future__ import annotations

import json
import logging
import math
import os
from collections import OrderedDict
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import numpy as np

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.evaluation import DatasetEvaluator
from detectron2.utils import comm
from detectron2.utils.file_io import PathManager
from detectron2.utils.logger import create_small_table

from ..utils.io import read_label_map
from .anomaly_metrics import (  # noqa: F401  (re-exported: the former home of the metrics)
    METRIC_NAMES,
    DegenerateAnomalySetWarning,
    _as_score_array,
    _check_no_nan,
    _ranked_counts_of_scores,
    anomaly_metrics,
    metrics_from_ranked_counts,
    tie_group_error_bounds,
)
from .histogram import DEFAULT_MAX_BINS, AnomalyScoreHistogram

__all__ = [
    "METRIC_NAMES",
    "EVALUATION_MODES",
    "DEFAULT_MAX_BINS",
    "DEFAULT_EXACT_PIXEL_BUDGET",
    "DegenerateAnomalySetWarning",
    "anomaly_metrics",
    "metrics_from_ranked_counts",
    "tie_group_error_bounds",
    "AnomalyScoreHistogram",
    "AnomalyEvaluator",
]

#: Accepted values of ``AnomalyEvaluator(mode=...)``.
EVALUATION_MODES: Tuple[str, str, str] = ("auto", "exact", "bounded")
#: Default number of non-void pixels ``mode="auto"`` keeps exactly before it
#: switches to the histogram: 2**24 pixels (~1000 images of 128x128, or 8
#: Cityscapes frames), at most ~150 MiB of float32 scores and bool labels.
DEFAULT_EXACT_PIXEL_BUDGET: int = 1 << 24


class AnomalyEvaluator(DatasetEvaluator):
    """Detectron2 evaluator for pixel-level anomaly segmentation.

    Ground truth: each record's ``sem_seg_file_name`` (taken from the input
    dict, or looked up in ``DatasetCatalog`` by ``file_name`` since
    Detectron2's test-time mapper drops it), a PNG with 0 = in-distribution,
    1 = anomaly and ``MetadataCatalog.get(dataset_name).ignore_label`` (default
    255) = void. Prediction: ``output["anomaly_score"]``, a ``(H, W)`` tensor
    at the ground truth's resolution, higher = more anomalous.

    ``evaluate()`` returns ``{"anomaly": {"AP", "FPR95", "AUROC"}}`` in percent
    on the main process and ``{}`` elsewhere; with ``output_dir`` it also
    writes ``anomaly_evaluation.json`` there.

    Args:
        dataset_name: registered dataset to evaluate.
        distributed: gather every rank's pixels/histogram to rank 0.
        output_dir: where to write the metrics JSON (optional).
        mode: ``"exact"`` keeps every non-void pixel (memory grows with the
            data); ``"bounded"`` accumulates an :class:`AnomalyScoreHistogram`
            (at most ~``28 * max_bins`` bytes); ``"auto"`` (default) is exact
            until more than ``exact_pixel_budget`` pixels have been seen, then
            folds them into a histogram. Being a plain string, it maps directly
            onto a config value (e.g. a ``TEST`` key) in the trainer.
        exact_pixel_budget: the pixel count at which ``"auto"`` switches
            (shared across ranks: each rank switches at ``budget / world size``).
        max_bins: bin budget of the histogram.
        bound_warning_points: warn when the bounded result's certified error
            bound exceeds this many points on any metric.
    """

    def __init__(
        self,
        dataset_name: str,
        distributed: bool = True,
        output_dir: Optional[str] = None,
        *,
        mode: str = "auto",
        exact_pixel_budget: int = DEFAULT_EXACT_PIXEL_BUDGET,
        max_bins: int = DEFAULT_MAX_BINS,
        bound_warning_points: float = 0.1,
    ) -> None:
        if mode not in EVALUATION_MODES:
            raise ValueError(f"mode must be one of {EVALUATION_MODES}, got {mode!r}")
        self._logger = logging.getLogger(__name__)
        self._dataset_name = dataset_name
        self._distributed = distributed
        self._output_dir = output_dir
        self._mode = mode
        self._exact_pixel_budget = int(exact_pixel_budget)
        self._max_bins = int(max_bins)
        AnomalyScoreHistogram(self._max_bins)  # validates the budget now, not mid-evaluation
        self._bound_warning_points = float(bound_warning_points)
        self._ignore_label = int(MetadataCatalog.get(dataset_name).get("ignore_label", 255))
        self._ground_truth_by_image: Optional[Dict[str, str]] = None
        self.reset()

    # ----------------------------------------------------------------- state
    def reset(self) -> None:
        self._exact_scores: List[np.ndarray] = []
        self._exact_labels: List[np.ndarray] = []
        self._num_exact_pixels = 0
        self._histogram: Optional[AnomalyScoreHistogram] = (
            AnomalyScoreHistogram(self._max_bins) if self._mode == "bounded" else None
        )

    def _rank_pixel_budget(self) -> int:
        world_size = comm.get_world_size() if self._distributed else 1
        return max(1, self._exact_pixel_budget // world_size)

    def _add_pixels(self, scores: np.ndarray, is_anomaly: np.ndarray) -> None:
        if self._histogram is not None:
            self._histogram.add(scores, is_anomaly)
            return
        self._exact_scores.append(scores)
        self._exact_labels.append(is_anomaly)
        self._num_exact_pixels += scores.size
        if self._mode == "auto" and self._num_exact_pixels > self._rank_pixel_budget():
            self._fold_exact_pixels_into_histogram()

    def _fold_exact_pixels_into_histogram(self) -> None:
        self._logger.info(
            f"AnomalyEvaluator({self._dataset_name}): more than {self._exact_pixel_budget} "
            "pixels; switching from exact to bounded-memory (histogram) accumulation."
        )
        histogram = AnomalyScoreHistogram(self._max_bins)
        for scores, labels in zip(self._exact_scores, self._exact_labels):
            histogram.add(scores, labels)
        self._histogram = histogram
        self._exact_scores, self._exact_labels, self._num_exact_pixels = [], [], 0

    # --------------------------------------------------------------- process
    def _ground_truth_path(self, record: Mapping[str, Any]) -> str:
        if "sem_seg_file_name" in record:
            return record["sem_seg_file_name"]
        if self._ground_truth_by_image is None:
            self._ground_truth_by_image = {
                item["file_name"]: item["sem_seg_file_name"]
                for item in DatasetCatalog.get(self._dataset_name)
            }
        try:
            return self._ground_truth_by_image[record["file_name"]]
        except KeyError:
            raise KeyError(
                f"no sem_seg_file_name for image {record.get('file_name')!r} in the input "
                f"or in dataset {self._dataset_name!r}"
            ) from None

    def _check_ground_truth_values(self, ground_truth: np.ndarray, path: str) -> None:
        unexpected = np.setdiff1d(np.unique(ground_truth), [0, 1, self._ignore_label])
        if unexpected.size:
            raise ValueError(
                f"anomaly ground truth {path} contains value(s) {unexpected.tolist()}; "
                f"expected 0 (in-distribution), 1 (anomaly) or {self._ignore_label} (void)"
            )

    def process(self, inputs: Sequence[Mapping[str, Any]], outputs: Sequence[Mapping[str, Any]]) -> None:
        """Accumulate the non-void pixels of a batch.

        Raises ValueError for a ground-truth value outside {0, 1, ignore}, a
        score map whose shape differs from the ground truth's, or NaN scores.
        """
        for record, output in zip(inputs, outputs):
            path = self._ground_truth_path(record)
            ground_truth = read_label_map(path)
            self._check_ground_truth_values(ground_truth, path)
            if "anomaly_score" not in output:
                raise KeyError(
                    f"model output for {path} has no 'anomaly_score' (keys: {sorted(output)})"
                )
            scores = _as_score_array(output["anomaly_score"])
            if scores.shape != ground_truth.shape:
                raise ValueError(
                    f"anomaly_score has shape {tuple(scores.shape)} but ground truth {path} "
                    f"has shape {tuple(ground_truth.shape)}; scores must be (H, W) at the "
                    "ground truth's resolution"
                )
            non_void = ground_truth != self._ignore_label
            valid_scores = scores[non_void]
            _check_no_nan(valid_scores, f"anomaly_score for {path}")
            self._add_pixels(valid_scores, ground_truth[non_void] == 1)

    # -------------------------------------------------------------- evaluate
    def _local_state(self) -> Dict[str, Any]:
        """What this rank contributes: its exact pixels or its histogram."""
        if self._histogram is not None:
            return {"histogram": self._histogram}
        scores = (
            np.concatenate(self._exact_scores) if self._exact_scores else np.zeros(0, np.float32)
        )
        labels = np.concatenate(self._exact_labels) if self._exact_labels else np.zeros(0, bool)
        return {"scores": scores, "labels": labels}

    def _combine(self, states: Sequence[Mapping[str, Any]]) -> Tuple[Dict[str, float], Dict[str, Any]]:
        """Metrics and a description of how they were computed, from all ranks."""
        exact_pixels = sum(state["scores"].size for state in states if "scores" in state)
        stays_exact = self._mode == "exact" or (
            self._mode == "auto"
            and all("scores" in state for state in states)
            and exact_pixels <= self._exact_pixel_budget
        )
        if stays_exact:
            scores = np.concatenate([state["scores"] for state in states])
            labels = np.concatenate([state["labels"] for state in states])
            positives, negatives = _ranked_counts_of_scores(scores, labels)
            details = {
                "mode": "exact",
                "num_anomaly_pixels": int(labels.sum()),
                "num_inlier_pixels": int(labels.size - labels.sum()),
            }
            return metrics_from_ranked_counts(positives, negatives), details

        histogram = AnomalyScoreHistogram(self._max_bins)
        for state in states:
            if "histogram" in state:
                histogram.merge(state["histogram"])
            else:
                histogram.add(state["scores"], state["labels"])
        bounds = histogram.error_bounds()
        details = {
            "mode": "bounded",
            "num_anomaly_pixels": histogram.num_anomaly,
            "num_inlier_pixels": histogram.num_inlier,
            "histogram_bins": histogram.num_bins,
            "histogram_coarsest_shift": histogram.coarsest_shift,
            "error_bound": bounds,
        }
        if any(bound > self._bound_warning_points for bound in bounds.values()):
            self._logger.warning(
                f"Anomaly metrics of {self._dataset_name} may be off by up to "
                f"{ {name: round(bound, 4) for name, bound in bounds.items()} } points "
                "(histogram resolution); use mode='exact' or a larger max_bins."
            )
        return histogram.metrics(), details

    def evaluate(self) -> Dict[str, Dict[str, float]]:
        """AP, FPR95 and AUROC (percent) on rank 0; ``{}`` on other ranks."""
        state = self._local_state()
        if self._distributed:
            states = comm.gather(state, dst=0)
            if not comm.is_main_process():
                return {}
        else:
            states = [state]

        metrics, details = self._combine(states)
        if any(math.isnan(value) for value in metrics.values()):
            self._logger.warning(
                f"Anomaly metrics of {self._dataset_name} are NaN: the non-void pixels hold "
                f"{details['num_anomaly_pixels']} anomaly and {details['num_inlier_pixels']} "
                "in-distribution pixels, and every metric needs both."
            )
        self._logger.info(
            f"Anomaly evaluation of {self._dataset_name} ({details['mode']}, "
            f"{details['num_anomaly_pixels']} anomaly / {details['num_inlier_pixels']} "
            f"in-distribution pixels):\n" + create_small_table(metrics)
        )
        if self._output_dir:
            self._write_json(metrics, details)
        return OrderedDict(anomaly=metrics)

    def _write_json(self, metrics: Mapping[str, float], details: Mapping[str, Any]) -> None:
        def finite_or_none(value: float) -> Optional[float]:
            # Strict JSON has no NaN.
            return None if math.isnan(value) else value

        payload = {
            "dataset": self._dataset_name,
            "anomaly": {name: finite_or_none(value) for name, value in metrics.items()},
            **{key: value for key, value in details.items() if key != "error_bound"},
        }
        if "error_bound" in details:
            payload["error_bound"] = {
                name: finite_or_none(value) for name, value in details["error_bound"].items()
            }
        PathManager.mkdirs(self._output_dir)
        path = os.path.join(self._output_dir, "anomaly_evaluation.json")
        with PathManager.open(path, "w") as handle:
            json.dump(payload, handle, indent=2)
