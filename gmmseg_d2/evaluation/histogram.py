"""Bounded-memory, mergeable accumulation of anomaly scores: :class:`AnomalyScoreHistogram`.

A per-class histogram over an order-preserving integer key of the float32
score, whose resolution adapts to a fixed bin budget. It is exact whenever the
scores take at most ``max_bins`` distinct float32 values, and it always
reports a certified bound on its own error (see the class docstring).
"""

from __future__ import annotations

import dataclasses
from typing import Dict, Tuple

import numpy as np

from .anomaly_metrics import (
    ArrayLike,
    _as_score_array,
    _check_no_nan,
    _to_numpy,
    metrics_from_ranked_counts,
    tie_group_error_bounds,
)

__all__ = ["DEFAULT_MAX_BINS", "AnomalyScoreHistogram"]

#: Default bin budget of :class:`AnomalyScoreHistogram`: 2**20 bins, i.e.
#: about 28 MiB of state (three uint32 keys and two int64 counts per bin).
DEFAULT_MAX_BINS: int = 1 << 20

_FLOAT32_SIGN_BIT = np.uint32(0x80000000)


def _float32_order_keys(scores: np.ndarray) -> np.ndarray:
    """Map float32 scores to uint32 keys with the same order (NaN-free input).

    IEEE-754 bit patterns of non-negative floats sort like unsigned integers;
    negative floats sort in reverse. Setting the sign bit of non-negatives and
    inverting all bits of negatives yields one monotone uint32 scale from -inf
    (smallest key) to +inf (largest). Adding +0.0 first turns -0.0 into +0.0,
    which compare equal as floats and so must share a key.
    """
    bits = (scores.astype(np.float32, copy=False) + np.float32(0.0)).view(np.uint32)
    is_negative = (bits & _FLOAT32_SIGN_BIT) != 0
    return np.where(is_negative, ~bits, bits | _FLOAT32_SIGN_BIT)


@dataclasses.dataclass
class _Bins:
    """Occupied histogram bins, sorted by key.

    ``starts`` are each bin's first float32 order key (bins are aligned
    dyadic runs of keys, so the start identifies the bin); ``counts`` is
    (num_bins, 2): in-distribution then anomaly pixels; ``lowest``/``highest``
    are the smallest/largest key actually seen in the bin, so a bin with
    ``lowest == highest`` is known to hold a single score value.
    """

    starts: np.ndarray
    counts: np.ndarray
    lowest: np.ndarray
    highest: np.ndarray

    @classmethod
    def empty(cls) -> "_Bins":
        no_keys = np.zeros(0, dtype=np.uint32)
        return cls(no_keys, np.zeros((0, 2), dtype=np.int64), no_keys.copy(), no_keys.copy())

    def __len__(self) -> int:
        return int(self.starts.size)

    def merged_with(self, other: "_Bins") -> "_Bins":
        """Union of two start-sorted bin sets on the same grid, equal bins summed."""
        if len(self) == 0:
            return other
        if len(other) == 0:
            return self
        starts = np.concatenate((self.starts, other.starts))
        # Two sorted runs: the stable sort (timsort) merges them in linear time.
        order = np.argsort(starts, kind="stable")
        return _Bins(
            starts[order],
            np.concatenate((self.counts, other.counts))[order],
            np.concatenate((self.lowest, other.lowest))[order],
            np.concatenate((self.highest, other.highest))[order],
        ).with_equal_starts_summed()

    def regridded(self, shift_of_bin: np.ndarray) -> "_Bins":
        """Move each bin to the aligned run of ``2**shift`` keys containing it.

        Only valid when every new run contains the old bin (coarsening).
        """
        shift = shift_of_bin.astype(np.uint32)
        return _Bins(
            (self.starts >> shift) << shift, self.counts, self.lowest, self.highest
        ).with_equal_starts_summed()

    def with_equal_starts_summed(self) -> "_Bins":
        """Collapse runs of equal (sorted) starts into one bin each."""
        if len(self) == 0:
            return self
        run_starts = np.flatnonzero(np.concatenate(([True], self.starts[1:] != self.starts[:-1])))
        if run_starts.size == len(self):
            return self
        # Column-wise 1-D reductions: much faster than reduceat along axis 0.
        summed_counts = np.stack(
            [np.add.reduceat(self.counts[:, column], run_starts) for column in range(2)], axis=1
        )
        return _Bins(
            self.starts[run_starts],
            summed_counts,
            np.minimum.reduceat(self.lowest, run_starts),
            np.maximum.reduceat(self.highest, run_starts),
        )


class AnomalyScoreHistogram:
    """Bounded-memory accumulator of anomaly scores, mergeable across ranks.

    **Design.** Each score is rounded to float32 and mapped to a 32-bit key
    that sorts like the float (:func:`_float32_order_keys`). The key space is
    the whole float32 line, -inf to +inf, so nothing is ever clipped and no
    data range must be known in advance. It is cut into ``2**region_bits``
    equal *regions* by the keys' top bits (with the default budget,
    ``region_bits = 16``: sign, exponent and 7 mantissa bits, so a region is
    1/128 of a power-of-two range of scores). Inside a region ``r``, a bin is
    an aligned run of ``2**shift[r]`` adjacent keys. The histogram stores, for
    each *occupied* bin, its start key, two counts (in-distribution, anomaly)
    and the lowest and highest key it has seen, in sorted arrays.

    Every shift starts at 0: each distinct float32 value has its own bin.
    Whenever more than ``max_bins`` bins are occupied, the regions whose bins
    hold the fewest pixels on average are coarsened by one step (adjacent
    bins merge pairwise) until 7/8 of the budget holds. Resolution is thus
    spent where the pixels are: a crowd of near-tied scores keeps fine bins
    while sparse tails merge (the measured comparison with one global
    resolution is in BENCHMARKS.md). Memory is bounded by ~``28 * max_bins`` bytes plus one byte per
    region (and transient copies while merging), whatever the number of
    pixels.

    **Error.** Metrics are computed by treating each bin as one tie group
    (:func:`metrics_from_ranked_counts`). Ordering across bins is always
    right, because the key map is monotone and bins are disjoint. So:

    * When every score was exactly representable in float32 (float32 and
      float16 inputs always are) and every bin holds a single value -- always
      the case before any coarsening -- the metrics are **exact**, identical
      to :func:`anomaly_metrics` (:attr:`is_lossless`). Discrete scores and
      near-tie clusters stay exact as long as the data has at most
      ``max_bins`` distinct float32 values.
    * Otherwise :meth:`error_bounds` returns a certified bound on the distance
      to the exact metrics, computed from the histogram itself (derivation in
      :func:`tie_group_error_bounds`; single-value bins, e.g. probabilities
      saturated at exactly 1.0, are true ties and add nothing). Roughly, the
      AUROC error is at most half the fraction of anomaly/inlier pairs that
      share a bin, and the FPR95 error the inlier fraction of one bin.
    * Being streaming, the scheme cannot re-split a bin: a region coarsened
      while sparse that later receives a crowd of both classes stays coarse.
      The bound then exposes it and
      :class:`~gmmseg_d2.evaluation.AnomalyEvaluator` warns. Measured errors
      and bounds are in BENCHMARKS.md.
    """

    #: Smallest accepted budget: it must exceed the number of regions.
    MIN_BINS = 16

    def __init__(self, max_bins: int = DEFAULT_MAX_BINS) -> None:
        if int(max_bins) < self.MIN_BINS:
            raise ValueError(f"max_bins must be >= {self.MIN_BINS}, got {max_bins}")
        self.max_bins = int(max_bins)
        # At most a quarter of the budget in regions, so that coarsening
        # every region fully always fits the budget; at most 2**16 of them.
        self.region_bits = min(16, self.max_bins.bit_length() - 3)
        self._region_shifts = np.zeros(1 << self.region_bits, dtype=np.uint8)
        self._bins = _Bins.empty()
        self._inputs_exact_in_float32 = True

    @property
    def max_shift(self) -> int:
        """The shift at which a region is a single bin."""
        return 32 - self.region_bits

    @property
    def region_shifts(self) -> np.ndarray:
        """Per region: log2 of the number of adjacent float32 keys per bin."""
        return self._region_shifts.copy()

    @property
    def coarsest_shift(self) -> int:
        """Largest region shift: 0 means no bin has ever been coarsened."""
        return int(self._region_shifts.max())

    @property
    def num_bins(self) -> int:
        """Number of occupied bins currently stored."""
        return len(self._bins)

    @property
    def num_anomaly(self) -> int:
        return int(self._bins.counts[:, 1].sum())

    @property
    def num_inlier(self) -> int:
        return int(self._bins.counts[:, 0].sum())

    @property
    def is_lossless(self) -> bool:
        """True when :meth:`metrics` equals the exact metrics (see class docstring)."""
        return self._inputs_exact_in_float32 and bool(
            np.all(self._bins.lowest == self._bins.highest)
        )

    def add(self, scores: ArrayLike, is_anomaly: ArrayLike) -> None:
        """Accumulate non-void pixels: scores and boolean (or 0/1) labels."""
        score_array = _as_score_array(scores).reshape(-1)
        label_array = _to_numpy(is_anomaly).reshape(-1)
        if score_array.shape != label_array.shape:
            raise ValueError(f"{score_array.size} scores but {label_array.size} labels were given")
        if score_array.size == 0:
            return
        if label_array.dtype != np.bool_:
            if np.setdiff1d(np.unique(label_array), [0, 1]).size:
                raise ValueError("labels given to AnomalyScoreHistogram.add must be 0 or 1")
            label_array = label_array == 1
        _check_no_nan(score_array, "AnomalyScoreHistogram.add")

        scores_float32 = score_array.astype(np.float32, copy=False)
        if score_array.dtype != np.float32 and self._inputs_exact_in_float32:
            self._inputs_exact_in_float32 = bool(
                np.array_equal(scores_float32.astype(score_array.dtype), score_array)
            )

        full_keys = _float32_order_keys(scores_float32)
        # One sort groups pixels by (score key, label): the label is the lowest bit.
        key_and_label = (full_keys.astype(np.uint64) << np.uint64(1)) | label_array.astype(np.uint64)
        distinct, pixel_counts = np.unique(key_and_label, return_counts=True)
        distinct_keys = (distinct >> np.uint64(1)).astype(np.uint32)
        counts = np.zeros((distinct.size, 2), dtype=np.int64)
        counts[np.arange(distinct.size), (distinct & np.uint64(1)).astype(np.intp)] = pixel_counts
        # A score shared by both classes is one tie group: collapse its two rows.
        batch = _Bins(distinct_keys, counts, distinct_keys, distinct_keys).with_equal_starts_summed()
        self._absorb(batch.regridded(self._shifts_of(batch)))

    def merge(self, other: "AnomalyScoreHistogram") -> None:
        """Add another histogram's counts (e.g. from another rank) to this one."""
        if other.region_bits != self.region_bits:
            raise ValueError(
                f"cannot merge histograms with max_bins {self.max_bins} and {other.max_bins}"
            )
        np.maximum(self._region_shifts, other._region_shifts, out=self._region_shifts)
        self._inputs_exact_in_float32 &= other._inputs_exact_in_float32
        self._bins = self._bins.regridded(self._shifts_of(self._bins))
        self._absorb(other._bins.regridded(self._shifts_of(other._bins)))

    def ranked_counts(self) -> Tuple[np.ndarray, np.ndarray]:
        """Per bin, highest scores first: (anomaly counts, in-distribution counts)."""
        return self._bins.counts[::-1, 1].copy(), self._bins.counts[::-1, 0].copy()

    def metrics(self) -> Dict[str, float]:
        """AP, FPR95, AUROC in percent (exact when :attr:`is_lossless`)."""
        return metrics_from_ranked_counts(*self.ranked_counts())

    def error_bounds(self) -> Dict[str, float]:
        """Certified max distance (points) of :meth:`metrics` from the exact values."""
        if self._inputs_exact_in_float32:
            single_value_bins = (self._bins.lowest == self._bins.highest)[::-1]
        else:
            # Rounding to float32 may have merged distinct scores: trust no bin.
            single_value_bins = None
        return tie_group_error_bounds(*self.ranked_counts(), exact_tie_groups=single_value_bins)

    def _regions_of(self, bins: _Bins) -> np.ndarray:
        return (bins.starts >> np.uint32(32 - self.region_bits)).astype(np.intp)

    def _shifts_of(self, bins: _Bins) -> np.ndarray:
        return self._region_shifts[self._regions_of(bins)]

    def _absorb(self, batch: _Bins) -> None:
        """Merge start-sorted bins already on the current grid, then enforce the budget."""
        self._bins = self._bins.merged_with(batch)
        if len(self._bins) <= self.max_bins:
            return
        # Shrink to 7/8 of the budget, not just under it, so that the next
        # few batches fit without another round of coarsening passes.
        target = self.max_bins - self.max_bins // 8
        while len(self._bins) > target:
            self._coarsen_lightest_regions(len(self._bins) - target)

    def _coarsen_lightest_regions(self, excess_bins: int) -> None:
        """Coarsen, by one step, the regions whose bins hold the fewest pixels.

        Equalising pixels per bin is what keeps the error bounds small: they
        grow with how many pixels share a bin. (A greedy rule that instead
        coarsened where the bound grew least on the data seen so far was
        tried and was far worse: it drove regions that were cheap early to
        full coarseness before the data that mattered arrived.) Enough regions
        are picked to remove about ``excess_bins`` bins (a step at most halves
        a region's bins); the caller repeats until the budget holds.
        """
        regions = self._regions_of(self._bins)
        num_regions = self._region_shifts.size
        bins_per_region = np.bincount(regions, minlength=num_regions)
        pixels_per_bin = self._bins.counts[:, 0] + self._bins.counts[:, 1]
        pixels_per_region = np.bincount(regions, weights=pixels_per_bin, minlength=num_regions)
        # A region with one bin cannot shrink; a fully coarse one cannot either.
        candidates = np.flatnonzero(
            (bins_per_region > 1) & (self._region_shifts < self.max_shift)
        )
        if candidates.size == 0:  # unreachable: regions <= max_bins / 4
            raise RuntimeError("histogram cannot shrink below its region count")
        mean_bin_mass = pixels_per_region[candidates] / bins_per_region[candidates]
        lightest_first = candidates[np.argsort(mean_bin_mass, kind="stable")]
        expected_removed = np.cumsum(bins_per_region[lightest_first] // 2)
        num_picked = int(np.searchsorted(expected_removed, excess_bins)) + 1
        self._region_shifts[lightest_first[:num_picked]] += 1
        self._bins = self._bins.regridded(self._shifts_of(self._bins))
