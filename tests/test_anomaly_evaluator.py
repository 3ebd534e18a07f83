"""Tests of the anomaly-segmentation metrics, histogram and Detectron2 evaluator.

The reference values come from scikit-learn, computed independently:
AP = ``average_precision_score``, AUROC = ``roc_auc_score`` and FPR95 = the
FPR at the first ROC point (``roc_curve(..., drop_intermediate=False)``) whose
TPR reaches 0.95.
"""

from __future__ import annotations

import json
import math
import re
import uuid
from typing import Dict, Iterator, List, Tuple

import numpy as np
import pytest
import torch
from PIL import Image
from sklearn.metrics import average_precision_score, roc_auc_score, roc_curve

from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.utils import comm

from gmmseg_d2.evaluation import (
    AnomalyEvaluator,
    AnomalyScoreHistogram,
    DegenerateAnomalySetWarning,
    anomaly_metrics,
    metrics_from_ranked_counts,
)

METRICS = ("AP", "FPR95", "AUROC")
EXACT_TOLERANCE = 1e-6
BOUNDED_TOLERANCE_POINTS = 0.1


def sklearn_metrics(scores: np.ndarray, is_anomaly: np.ndarray) -> Dict[str, float]:
    """Reference metrics in percent, from scikit-learn only."""
    scores = np.asarray(scores, dtype=np.float64).ravel()
    is_anomaly = np.asarray(is_anomaly).ravel().astype(int)
    fpr, tpr, _ = roc_curve(is_anomaly, scores, drop_intermediate=False)
    return {
        "AP": 100.0 * average_precision_score(is_anomaly, scores),
        "FPR95": 100.0 * float(fpr[np.argmax(tpr >= 0.95)]),
        "AUROC": 100.0 * roc_auc_score(is_anomaly, scores),
    }


def assert_metrics_close(actual: Dict[str, float], expected: Dict[str, float], tolerance: float) -> None:
    assert set(actual) == set(METRICS)
    for name in METRICS:
        assert abs(actual[name] - expected[name]) <= tolerance, (name, actual, expected)


# --------------------------------------------------------------------------
# Exact metrics against scikit-learn
# --------------------------------------------------------------------------


def _random_case(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    labels = (rng.random(5000) < 0.2).astype(np.uint8)
    scores = rng.normal(size=5000) + 0.8 * labels
    return scores, labels


def _heavy_ties_case(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    labels = (rng.random(5000) < 0.3).astype(np.uint8)
    # Four distinct values, anomalies skewed upwards: every threshold is a big tie.
    scores = rng.integers(0, 3, size=5000) + (rng.random(5000) < 0.5) * labels
    return scores.astype(np.float32), labels


def _separated_case(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    labels = (rng.random(2000) < 0.1).astype(np.uint8)
    scores = np.where(labels == 1, rng.uniform(2, 3, 2000), rng.uniform(0, 1, 2000))
    return scores, labels


def _inverted_case(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    scores, labels = _separated_case(rng)
    return -scores, labels


def _diagonal_ties_at_target_case(rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    # 18 anomalies, then two tie groups of (1 anomaly, 1 inlier), then 18
    # inliers: TPR first reaches 0.95 in the middle of a straight diagonal
    # run of the ROC curve, a point roc_curve's default drop_intermediate drops.
    scores = np.concatenate([np.arange(100, 82, -1), [50, 50, 49, 49], np.arange(0, -18, -1)])
    labels = np.array([1] * 18 + [1, 0, 1, 0] + [0] * 18, dtype=np.uint8)
    return scores.astype(np.float64), labels


EXACT_CASES = {
    "random": _random_case,
    "heavy_ties": _heavy_ties_case,
    "perfectly_separated": _separated_case,
    "perfectly_inverted": _inverted_case,
    "diagonal_ties_at_target": _diagonal_ties_at_target_case,
}


@pytest.mark.parametrize("case", sorted(EXACT_CASES))
def test_exact_metrics_match_sklearn(case: str) -> None:
    scores, labels = EXACT_CASES[case](np.random.default_rng(7))
    assert_metrics_close(anomaly_metrics(scores, labels), sklearn_metrics(scores, labels), EXACT_TOLERANCE)


def test_separated_and_inverted_scores_hit_the_extremes() -> None:
    scores, labels = _separated_case(np.random.default_rng(1))
    perfect = anomaly_metrics(scores, labels)
    assert perfect == pytest.approx({"AP": 100.0, "FPR95": 0.0, "AUROC": 100.0})
    inverted = anomaly_metrics(-scores, labels)
    assert inverted["AUROC"] == pytest.approx(0.0)
    assert inverted["FPR95"] == pytest.approx(100.0)


def test_void_pixels_are_ignored() -> None:
    rng = np.random.default_rng(3)
    scores, labels = _random_case(rng)
    labels_with_void = labels.astype(np.int64)
    void = rng.random(labels.size) < 0.25
    labels_with_void[void] = 255
    # Void pixels get extreme scores: counting them would move every metric.
    scores_with_void = np.where(void, 1e6 * rng.choice([-1, 1], labels.size), scores)
    expected = sklearn_metrics(scores[~void], labels[~void])
    actual = anomaly_metrics(scores_with_void.reshape(50, 100), labels_with_void.reshape(50, 100))
    assert_metrics_close(actual, expected, EXACT_TOLERANCE)


def test_hand_computed_small_example() -> None:
    # Ranking: anomaly, inlier, anomaly, inlier.
    metrics = anomaly_metrics(np.array([0.9, 0.8, 0.7, 0.6]), np.array([1, 0, 1, 0]))
    assert metrics["AP"] == pytest.approx(100 * (0.5 * 1.0 + 0.5 * 2 / 3))
    assert metrics["AUROC"] == pytest.approx(75.0)
    assert metrics["FPR95"] == pytest.approx(50.0)


def test_fpr95_uses_every_roc_point() -> None:
    scores, labels = _diagonal_ties_at_target_case(np.random.default_rng(0))
    assert anomaly_metrics(scores, labels)["FPR95"] == pytest.approx(100 * 1 / 20)
    # Why the reference passes drop_intermediate=False: the default skips the point.
    fpr, tpr, _ = roc_curve(labels, scores)
    assert fpr[np.argmax(tpr >= 0.95)] == pytest.approx(2 / 20)


def test_fpr95_takes_first_threshold_reaching_target_without_interpolation() -> None:
    # 18 anomalies on top (TPR 0.9), then one tie group of 2 anomalies and 10
    # inliers (TPR 1.0, FPR 0.5), then 10 more inliers. Interpolating at
    # TPR = 0.95 would give 25 %; the protocol's first threshold gives 50 %.
    positives = np.array([18, 2, 0])
    negatives = np.array([0, 10, 10])
    assert metrics_from_ranked_counts(positives, negatives)["FPR95"] == pytest.approx(50.0)


@pytest.mark.parametrize("present_label", [0, 1])
def test_single_class_gives_nan_and_warning(present_label: int) -> None:
    labels = np.full(100, present_label)
    labels[:10] = 255  # void does not count as the missing class
    with pytest.warns(DegenerateAnomalySetWarning, match="undefined"):
        metrics = anomaly_metrics(np.linspace(0, 1, 100), labels)
    assert all(math.isnan(metrics[name]) for name in METRICS)


def test_infinite_scores_rank_at_the_ends() -> None:
    rng = np.random.default_rng(5)
    scores, labels = _random_case(rng)
    with_infinities = scores.copy()
    with_infinities[:50] = np.inf
    with_infinities[50:100] = -np.inf
    finite_stand_ins = scores.copy()
    finite_stand_ins[:50] = 1e9
    finite_stand_ins[50:100] = -1e9
    assert_metrics_close(
        anomaly_metrics(with_infinities, labels), sklearn_metrics(finite_stand_ins, labels), EXACT_TOLERANCE
    )


def test_invalid_inputs_raise() -> None:
    with pytest.raises(ValueError, match=r"found \[2\]"):
        anomaly_metrics(np.zeros(3), np.array([0, 1, 2]))
    with pytest.raises(ValueError, match="NaN"):
        anomaly_metrics(np.array([0.0, np.nan, 1.0]), np.array([0, 1, 1]))
    with pytest.raises(ValueError, match="same shape"):
        anomaly_metrics(np.zeros(3), np.zeros(4))


# --------------------------------------------------------------------------
# Bounded-memory histogram
# --------------------------------------------------------------------------


def _histogram_of(scores: np.ndarray, labels: np.ndarray, max_bins: int, chunk: int = 200_000) -> AnomalyScoreHistogram:
    histogram = AnomalyScoreHistogram(max_bins)
    for start in range(0, scores.size, chunk):
        histogram.add(scores[start : start + chunk], labels[start : start + chunk])
    return histogram


def test_histogram_is_exact_for_few_distinct_float32_values() -> None:
    rng = np.random.default_rng(11)
    scores, labels = _heavy_ties_case(rng)
    # -0.0 and +0.0 compare equal, so they must form one tie group.
    scores = np.where(scores == 0, rng.choice(np.array([-0.0, 0.0], np.float32), scores.size), scores)
    scores = scores.astype(np.float32)
    assert np.signbit(scores[scores == 0]).any()
    expected = sklearn_metrics(scores, labels)
    for chunk in (scores.size, 777):  # one add, and many adds merged together
        histogram = _histogram_of(scores, labels, max_bins=64, chunk=chunk)
        assert histogram.is_lossless and histogram.coarsest_shift == 0
        assert histogram.num_bins == np.unique(scores).size
        assert histogram.num_anomaly == int(labels.sum())
        assert histogram.num_inlier == int((labels == 0).sum())
        assert_metrics_close(histogram.metrics(), expected, EXACT_TOLERANCE)
        assert histogram.error_bounds() == {"AP": 0.0, "FPR95": 0.0, "AUROC": 0.0}


LARGE_PIXELS = 1_000_000
LARGE_KINDS = ["logits", "log_likelihoods", "probabilities", "negated_max_softmax", "near_ties"]


def _large_scores(kind: str, rng: np.random.Generator) -> Tuple[np.ndarray, np.ndarray]:
    labels = rng.random(LARGE_PIXELS) < 0.08
    noise = rng.normal(size=LARGE_PIXELS)
    if kind == "logits":
        scores = np.clip(np.where(labels, 8 + 15 * noise, -4 + 15 * noise), -50, 50)
    elif kind == "log_likelihoods":
        scores = np.where(labels, -1000 + 40 * noise, -1060 + 40 * noise)
    elif kind == "probabilities":
        scores = 1 / (1 + np.exp(-np.where(labels, 1 + 3 * noise, -2 + 3 * noise)))
    elif kind == "negated_max_softmax":
        # -MSP: most inliers crowd within 1e-4 of -1, anomalies spread lower.
        scores = -(1 - np.exp(np.minimum(np.where(labels, -4 + 3 * noise, -9 + 3 * noise), 0)))
    elif kind == "near_ties":
        scores = 0.25 + 1e-6 * np.where(labels, 0.7 + noise, noise)
    else:
        raise AssertionError(kind)
    return scores.astype(np.float32), labels


@pytest.mark.parametrize("max_bins", [1 << 16, 1 << 17])
@pytest.mark.parametrize("kind", LARGE_KINDS)
def test_histogram_within_tolerance_of_exact_on_large_sets(kind: str, max_bins: int) -> None:
    scores, labels = _large_scores(kind, np.random.default_rng(LARGE_KINDS.index(kind)))
    exact = anomaly_metrics(scores, labels)
    histogram = _histogram_of(scores, labels, max_bins)
    assert histogram.num_bins <= max_bins
    if kind == "near_ties":
        # A few hundred distinct float32 values: the histogram never coarsens.
        assert histogram.is_lossless
    else:
        # The budget is far below the number of distinct values, so the bins
        # really are coarse: this exercises the approximation, not a copy.
        assert histogram.coarsest_shift > 0 and not histogram.is_lossless
    approximate = histogram.metrics()
    bounds = histogram.error_bounds()
    for name in METRICS:
        error = abs(approximate[name] - exact[name])
        assert error < BOUNDED_TOLERANCE_POINTS, (name, error)
        assert error <= bounds[name] + 1e-9, (name, error, bounds[name])


def test_error_bound_exposes_a_crowded_bin() -> None:
    # Negated max-softmax probabilities crowding just below -1 while others
    # spread over many binades: a tiny budget merges the crowd into one bin.
    rng = np.random.default_rng(2)
    labels = rng.random(300_000) < 0.1
    log_residual = np.where(labels, rng.normal(-4, 3, labels.size), rng.normal(-9, 3, labels.size))
    scores = (-(1 - np.exp(np.minimum(log_residual, 0)))).astype(np.float32)
    exact = anomaly_metrics(scores, labels)
    histogram = _histogram_of(scores, labels, max_bins=1 << 10)
    approximate, bounds = histogram.metrics(), histogram.error_bounds()
    errors = {name: abs(approximate[name] - exact[name]) for name in METRICS}
    assert max(errors.values()) > BOUNDED_TOLERANCE_POINTS  # the case really is hard
    for name in METRICS:
        assert errors[name] <= bounds[name] + 1e-9


def test_histogram_merge_combines_ranks_with_different_resolutions() -> None:
    rng = np.random.default_rng(4)
    scores, labels = _large_scores("logits", rng)
    scores, labels = scores[:300_000], labels[:300_000]
    first = _histogram_of(scores[:2_000], labels[:2_000], max_bins=1 << 12)
    second = _histogram_of(scores[2_000:], labels[2_000:], max_bins=1 << 12)
    assert first.is_lossless and not second.is_lossless  # resolutions differ
    shifts_before = np.maximum(first.region_shifts, second.region_shifts)
    first.merge(second)
    assert np.all(first.region_shifts >= shifts_before)
    assert first.num_bins <= 1 << 12
    assert (first.num_anomaly, first.num_inlier) == (int(labels.sum()), int((~labels).sum()))
    exact, merged, bounds = anomaly_metrics(scores, labels), first.metrics(), first.error_bounds()
    for name in METRICS:
        assert abs(merged[name] - exact[name]) <= bounds[name] + 1e-9
    with pytest.raises(ValueError, match="merge"):
        first.merge(AnomalyScoreHistogram(1 << 20))


def test_float64_scores_not_representable_in_float32_are_not_called_lossless() -> None:
    rng = np.random.default_rng(8)
    labels = rng.random(20_000) < 0.5
    # Distinct in float64, identical after rounding to float32.
    scores = 1.0 + np.where(labels, 2e-9, 1e-9) * rng.random(20_000)
    histogram = _histogram_of(scores, labels, max_bins=1 << 16)
    assert not histogram.is_lossless
    exact = anomaly_metrics(scores, labels)
    bounds = histogram.error_bounds()
    for name in METRICS:
        assert abs(histogram.metrics()[name] - exact[name]) <= bounds[name] + 1e-9


# --------------------------------------------------------------------------
# The Detectron2 evaluator, end to end
# --------------------------------------------------------------------------

IMAGE_SHAPES = [(20, 30), (16, 16), (25, 12)]


class RegisteredAnomalySet:
    """A temporary dataset of ground-truth PNGs and matching score maps."""

    def __init__(self, directory, ground_truths: List[np.ndarray], ignore_label: int = 255) -> None:
        self.name = f"test_anomaly_{uuid.uuid4().hex}"
        self.records = []
        for index, ground_truth in enumerate(ground_truths):
            path = directory / f"gt_{index}.png"
            Image.fromarray(ground_truth.astype(np.uint8)).save(path)
            self.records.append(
                {
                    "file_name": str(directory / f"image_{index}.jpg"),
                    "sem_seg_file_name": str(path),
                    "height": ground_truth.shape[0],
                    "width": ground_truth.shape[1],
                }
            )
        self.ground_truths = ground_truths
        DatasetCatalog.register(self.name, lambda: [dict(record) for record in self.records])
        MetadataCatalog.get(self.name).set(ignore_label=ignore_label, evaluator_type="anomaly")

    def remove(self) -> None:
        DatasetCatalog.remove(self.name)
        MetadataCatalog.remove(self.name)


def _random_ground_truths(rng: np.random.Generator, void_value: int = 255) -> List[np.ndarray]:
    ground_truths = []
    for shape in IMAGE_SHAPES:
        ground_truth = (rng.random(shape) < 0.3).astype(np.int64)
        ground_truth[rng.random(shape) < 0.15] = void_value
        ground_truths.append(ground_truth)
    return ground_truths


def _scores_for(ground_truths: List[np.ndarray], rng: np.random.Generator) -> List[torch.Tensor]:
    # Continuous scores plus a block of exact ties, correlated with the labels.
    scores = []
    for ground_truth in ground_truths:
        score = rng.normal(size=ground_truth.shape) + 1.2 * (ground_truth == 1)
        score[:4] = np.round(score[:4])
        scores.append(torch.from_numpy(score.astype(np.float32)))
    return scores


def _expected_metrics(dataset: RegisteredAnomalySet, scores: List[torch.Tensor], ignore_label: int = 255) -> Dict[str, float]:
    labels = np.concatenate([gt.ravel() for gt in dataset.ground_truths])
    flat_scores = np.concatenate([score.numpy().ravel() for score in scores])
    valid = labels != ignore_label
    return sklearn_metrics(flat_scores[valid], labels[valid] == 1)


def _feed(evaluator: AnomalyEvaluator, dataset: RegisteredAnomalySet, scores: List[torch.Tensor], keep_gt_path: bool = True) -> None:
    evaluator.reset()
    for record, score in zip(dataset.records, scores):
        record_input = dict(record)
        if not keep_gt_path:
            # Detectron2's test-time DatasetMapper drops sem_seg_file_name.
            del record_input["sem_seg_file_name"]
        evaluator.process([record_input], [{"anomaly_score": score, "sem_seg": torch.zeros(2, *score.shape)}])


@pytest.fixture
def anomaly_set(tmp_path) -> Iterator[RegisteredAnomalySet]:
    dataset = RegisteredAnomalySet(tmp_path, _random_ground_truths(np.random.default_rng(0)))
    yield dataset
    dataset.remove()


@pytest.mark.parametrize("keep_gt_path", [True, False])
def test_evaluator_exact_matches_direct_computation(anomaly_set, tmp_path, keep_gt_path: bool) -> None:
    scores = _scores_for(anomaly_set.ground_truths, np.random.default_rng(1))
    output_dir = tmp_path / "eval"
    evaluator = AnomalyEvaluator(anomaly_set.name, output_dir=str(output_dir), mode="exact")
    _feed(evaluator, anomaly_set, scores, keep_gt_path)
    results = evaluator.evaluate()
    expected = _expected_metrics(anomaly_set, scores)
    assert list(results) == ["anomaly"]
    assert_metrics_close(results["anomaly"], expected, EXACT_TOLERANCE)

    written = json.loads((output_dir / "anomaly_evaluation.json").read_text())
    assert written["mode"] == "exact"
    assert_metrics_close(written["anomaly"], expected, EXACT_TOLERANCE)
    valid_labels = np.concatenate([gt[gt != 255] for gt in anomaly_set.ground_truths])
    assert written["num_anomaly_pixels"] == int((valid_labels == 1).sum())


def test_evaluator_bounded_and_auto_modes(anomaly_set, tmp_path) -> None:
    rng = np.random.default_rng(2)
    scores = _scores_for(anomaly_set.ground_truths, rng)
    expected = _expected_metrics(anomaly_set, scores)

    bounded = AnomalyEvaluator(anomaly_set.name, mode="bounded", max_bins=64, output_dir=str(tmp_path / "b"))
    _feed(bounded, anomaly_set, scores)
    bounded_results = bounded.evaluate()["anomaly"]
    written = json.loads((tmp_path / "b" / "anomaly_evaluation.json").read_text())
    assert written["mode"] == "bounded" and written["histogram_coarsest_shift"] > 0
    for name in METRICS:
        error = abs(bounded_results[name] - expected[name])
        assert error <= written["error_bound"][name] + 1e-9

    # "auto" with a tiny budget switches to the histogram after the first
    # image; with a generous bin budget that histogram is still exact.
    auto = AnomalyEvaluator(anomaly_set.name, mode="auto", exact_pixel_budget=100, output_dir=str(tmp_path / "a"))
    _feed(auto, anomaly_set, scores)
    assert_metrics_close(auto.evaluate()["anomaly"], expected, EXACT_TOLERANCE)
    written = json.loads((tmp_path / "a" / "anomaly_evaluation.json").read_text())
    assert written["mode"] == "bounded"
    assert written["error_bound"] == {"AP": 0.0, "FPR95": 0.0, "AUROC": 0.0}

    under_budget = AnomalyEvaluator(anomaly_set.name, output_dir=str(tmp_path / "u"))
    _feed(under_budget, anomaly_set, scores)
    assert_metrics_close(under_budget.evaluate()["anomaly"], expected, EXACT_TOLERANCE)
    assert json.loads((tmp_path / "u" / "anomaly_evaluation.json").read_text())["mode"] == "exact"


@pytest.mark.parametrize("mode", ["exact", "bounded", "auto"])
def test_evaluator_gathers_all_ranks_on_the_main_process(anomaly_set, monkeypatch, mode: str) -> None:
    scores = _scores_for(anomaly_set.ground_truths, np.random.default_rng(3))
    # Rank 1 sees the first image, rank 0 the others; an "auto" rank 1 has
    # already switched to a histogram while rank 0 is still exact.
    other_rank = AnomalyEvaluator(anomaly_set.name, mode=mode, exact_pixel_budget=100)
    other_rank.reset()
    other_rank.process(anomaly_set.records[:1], [{"anomaly_score": scores[0]}])
    main_rank = AnomalyEvaluator(anomaly_set.name, mode=mode)
    main_rank.reset()
    main_rank.process(anomaly_set.records[1:], [{"anomaly_score": s} for s in scores[1:]])
    if mode == "auto":
        assert "histogram" in other_rank._local_state() and "scores" in main_rank._local_state()

    monkeypatch.setattr(comm, "gather", lambda data, dst=0: [other_rank._local_state(), data])
    results = main_rank.evaluate()
    assert_metrics_close(results["anomaly"], _expected_metrics(anomaly_set, scores), EXACT_TOLERANCE)

    monkeypatch.setattr(comm, "is_main_process", lambda: False)
    assert other_rank.evaluate() == {}


def test_evaluator_honours_metadata_ignore_label(tmp_path) -> None:
    ground_truths = _random_ground_truths(np.random.default_rng(4), void_value=254)
    dataset = RegisteredAnomalySet(tmp_path, ground_truths, ignore_label=254)
    try:
        scores = _scores_for(ground_truths, np.random.default_rng(5))
        evaluator = AnomalyEvaluator(dataset.name, distributed=False)
        _feed(evaluator, dataset, scores)
        expected = _expected_metrics(dataset, scores, ignore_label=254)
        assert_metrics_close(evaluator.evaluate()["anomaly"], expected, EXACT_TOLERANCE)
    finally:
        dataset.remove()


def test_evaluator_rejects_unknown_ground_truth_value(tmp_path) -> None:
    ground_truths = _random_ground_truths(np.random.default_rng(6))
    ground_truths[1][3, 5] = 7
    dataset = RegisteredAnomalySet(tmp_path, ground_truths)
    try:
        evaluator = AnomalyEvaluator(dataset.name)
        evaluator.reset()
        evaluator.process(dataset.records[:1], [{"anomaly_score": torch.zeros(IMAGE_SHAPES[0])}])
        with pytest.raises(ValueError, match=re.escape(dataset.records[1]["sem_seg_file_name"]) + r".*\[7\]"):
            evaluator.process(dataset.records[1:2], [{"anomaly_score": torch.zeros(IMAGE_SHAPES[1])}])
    finally:
        dataset.remove()


def test_evaluator_rejects_score_shape_mismatch(anomaly_set) -> None:
    evaluator = AnomalyEvaluator(anomaly_set.name)
    evaluator.reset()
    wrong_shape = torch.zeros(IMAGE_SHAPES[0][1], IMAGE_SHAPES[0][0])
    path = anomaly_set.records[0]["sem_seg_file_name"]
    expected_message = rf"\(30, 20\).*{re.escape(path)}.*\(20, 30\)"
    with pytest.raises(ValueError, match=expected_message):
        evaluator.process(anomaly_set.records[:1], [{"anomaly_score": wrong_shape}])


def test_evaluator_without_anomalies_warns_and_returns_nan(tmp_path) -> None:
    ground_truths = [np.where(gt == 1, 0, gt) for gt in _random_ground_truths(np.random.default_rng(9))]
    dataset = RegisteredAnomalySet(tmp_path, ground_truths)
    try:
        scores = _scores_for(ground_truths, np.random.default_rng(10))
        evaluator = AnomalyEvaluator(dataset.name, output_dir=str(tmp_path / "out"))
        _feed(evaluator, dataset, scores)
        with pytest.warns(DegenerateAnomalySetWarning):
            results = evaluator.evaluate()
        assert all(math.isnan(results["anomaly"][name]) for name in METRICS)
        written = json.loads((tmp_path / "out" / "anomaly_evaluation.json").read_text())
        assert written["anomaly"] == {"AP": None, "FPR95": None, "AUROC": None}
    finally:
        dataset.remove()


def test_evaluator_rejects_unknown_mode(anomaly_set) -> None:
    with pytest.raises(ValueError, match="mode"):
        AnomalyEvaluator(anomaly_set.name, mode="approximate")
