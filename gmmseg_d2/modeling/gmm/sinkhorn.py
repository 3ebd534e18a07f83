"""Sinkhorn-Knopp assignment of samples to mixture components (the E-step).

GMMSeg's E-step gives every sample of a class one of the class's ``M``
components, under the constraint that the components are used equally (the
uniform mixture weights ``pi = 1/M``). Following the official code:

1. the ``(N, M)`` component scores of the class are divided by their largest
   absolute value, so they lie in ``[-1, 1]`` whatever the log-density scale;
2. ``Q = exp(scores / epsilon)``, normalised to total mass 1;
3. ``iterations`` times: scale every component (column) to mass ``1/M``, then
   every sample (row) to mass ``1/N``;
4. multiply by ``N`` so that each sample's row sums to 1, and take the argmax of
   each row as its hard assignment.

Step 1 is GMMSeg's; ProtoSeg's online clustering (the prototype classifier
of ``projects/ProtoSeg``) is the same algorithm on cosine similarities
without it: pass ``scale_by_max_abs=False``.

The sample constraint is applied last, so the returned plan has rows summing
to exactly 1 and columns summing to ``N/M`` only approximately (exactly in the
limit of many iterations).

:func:`segmented_sinkhorn_assignment` runs the same algorithm independently for
many classes at once (no Python loop over classes): samples are grouped by a
segment id and every sum is a per-segment sum. It computes in float64, which
keeps ``exp(score / epsilon)`` representable for any ``epsilon >= 0.003``, and
uses only order-deterministic reductions, so every rank of a distributed job
that runs it on the same gathered data gets the same assignment bit for bit.
"""
from __future__ import annotations

from typing import Tuple

import torch
import torch.nn.functional as F

__all__ = [
    "sinkhorn_transport_plan",
    "sinkhorn_assignment",
    "segmented_sinkhorn_transport_plan",
    "segmented_sinkhorn_assignment",
]

# Smallest denominator used when normalising: a component that receives no
# mass at all (possible only for epsilon far below the default) keeps zero mass
# instead of turning into 0/0.
_TINY = 1e-300


def _check_scores(scores: torch.Tensor, iterations: int, epsilon: float) -> None:
    if scores.dim() != 2:
        raise ValueError(f"scores must be (N, M), got shape {tuple(scores.shape)}")
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    if not epsilon > 0:
        raise ValueError(f"epsilon must be > 0, got {epsilon}")


@torch.no_grad()
def segmented_sinkhorn_transport_plan(
    scores: torch.Tensor,
    segments: torch.Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    *,
    scale_by_max_abs: bool = True,
) -> torch.Tensor:
    """Sinkhorn-Knopp transport plans of several independent groups of samples.

    Args:
        scores: ``(N, M)`` raw component scores (e.g. log-likelihoods of each
            sample under the ``M`` components of its class). Must be finite.
        segments: ``(N,)`` integer group of every sample (e.g. its class); the
            plan of each group is computed as if the group were alone.
        iterations: number of (component, sample) normalisation rounds.
        epsilon: entropic regularisation; smaller is closer to a hard matching.
        scale_by_max_abs: divide each group's scores by their largest absolute
            value first (GMMSeg); False uses them as they are (ProtoSeg).

    Returns:
        ``(N, M)`` plan in ``scores``' dtype (float32 at least): each row sums to
        1, each column of a group of ``n`` samples sums to about ``n / M``.
    """
    _check_scores(scores, iterations, epsilon)
    if segments.shape != scores.shape[:1]:
        raise ValueError(f"segments must be ({scores.shape[0]},), got {tuple(segments.shape)}")
    num_samples, num_components = scores.shape
    out_dtype = torch.promote_types(scores.dtype, torch.float32)
    if num_samples == 0:
        return scores.new_zeros((0, num_components), dtype=out_dtype)

    # Per-segment reductions need the members of a segment to be contiguous.
    # A stable sort keeps the input order inside each segment.
    order = torch.sort(segments, stable=True).indices
    q = scores[order].to(torch.float64)
    _, lengths = torch.unique_consecutive(segments[order], return_counts=True)
    member_of = torch.repeat_interleave(torch.arange(lengths.numel(), device=q.device), lengths)
    group_size = lengths.to(torch.float64)[member_of, None]  # (N, 1)

    def segment_sum(v: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(v, "sum", lengths=lengths, axis=0)

    def segment_max(v: torch.Tensor) -> torch.Tensor:
        return torch.segment_reduce(v, "max", lengths=lengths, axis=0)

    # Max-abs scaling per group puts the scores in [-1, 1] whatever the scale of
    # the log-densities, so epsilon has the same meaning for every class.
    if scale_by_max_abs:
        scale = segment_max(q.abs().amax(dim=1)).clamp_min(_TINY)  # (S,)
        q = q / scale[member_of, None]
    q = q / epsilon
    # Subtracting each group's maximum leaves the normalised plan unchanged and
    # keeps exp() in range.
    q = torch.exp(q - segment_max(q.amax(dim=1))[member_of, None])
    q = q / segment_sum(q.sum(dim=1))[member_of, None]
    for _ in range(iterations):
        component_mass = segment_sum(q).clamp_min(_TINY)  # (S, M)
        q = q / component_mass[member_of] / num_components
        q = q / q.sum(dim=1, keepdim=True).clamp_min(_TINY) / group_size
    q = q * group_size

    plan = torch.empty_like(q)
    plan[order] = q
    return plan.to(out_dtype)


@torch.no_grad()
def segmented_sinkhorn_assignment(
    scores: torch.Tensor,
    segments: torch.Tensor,
    iterations: int = 3,
    epsilon: float = 0.05,
    *,
    scale_by_max_abs: bool = True,
) -> torch.Tensor:
    """Hard Sinkhorn assignment of every sample within its own group.

    Args:
        scores: ``(N, M)`` finite component scores.
        segments: ``(N,)`` integer group (class) of every sample.
        scale_by_max_abs: see :func:`segmented_sinkhorn_transport_plan`.

    Returns:
        ``(N,)`` int64 index of the assigned component.
    """
    plan = segmented_sinkhorn_transport_plan(scores, segments, iterations, epsilon,
                                             scale_by_max_abs=scale_by_max_abs)
    return plan.argmax(dim=1)


@torch.no_grad()
def sinkhorn_transport_plan(
    scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05
) -> torch.Tensor:
    """Soft Sinkhorn-Knopp plan of one class's samples over its components.

    Args:
        scores: ``(N, M)`` raw component scores of one class, finite.

    Returns:
        ``(N, M)`` plan whose rows sum to 1 and columns to about ``N / M``.
    """
    segments = torch.zeros(scores.shape[0], dtype=torch.long, device=scores.device)
    return segmented_sinkhorn_transport_plan(scores, segments, iterations, epsilon)


@torch.no_grad()
def sinkhorn_assignment(
    scores: torch.Tensor, iterations: int = 3, epsilon: float = 0.05
) -> Tuple[torch.Tensor, torch.Tensor]:
    """Hard, balanced assignment of one class's samples to its components.

    Args:
        scores: ``(N, M)`` raw component scores of one class (the max-abs
            scaling happens inside), finite.
        iterations: Sinkhorn normalisation rounds (official: 3).
        epsilon: entropic regularisation (official: 0.05).

    Returns:
        ``(one_hot, index)``: ``(N, M)`` one-hot assignment in the scores'
        dtype (float32 at least) and the ``(N,)`` int64 component indices.
    """
    index = sinkhorn_transport_plan(scores, iterations, epsilon).argmax(dim=1)
    one_hot = F.one_hot(index, num_classes=scores.shape[1])
    return one_hot.to(torch.promote_types(scores.dtype, torch.float32)), index
