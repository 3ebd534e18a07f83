"""Sinkhorn-Knopp E-step: marginals, equivariance, agreement with a NumPy transcription."""
import numpy as np
import pytest
import torch

from gmmseg_d2.modeling.gmm import (
    segmented_sinkhorn_assignment,
    segmented_sinkhorn_transport_plan,
    sinkhorn_assignment,
    sinkhorn_transport_plan,
)


# Small kernels are timing-sensitive to a shared second core; see conftest.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def numpy_sinkhorn(scores: np.ndarray, iterations: int, epsilon: float) -> np.ndarray:
    """the paper step by step, on a (components x samples) matrix as the paper's SwAV-style code does."""
    scaled = scores / np.abs(scores).max()
    q = np.exp(scaled / epsilon).T  # (M, N)
    num_components, num_samples = q.shape
    q /= q.sum()
    for _ in range(iterations):
        q /= q.sum(axis=1, keepdims=True)
        q /= num_components
        q /= q.sum(axis=0, keepdims=True)
        q /= num_samples
    return (q * num_samples).T


def random_scores(n, m, seed=0, scale=300.0):
    # Log-likelihood-like scores: large, negative, spread out.
    g = torch.Generator().manual_seed(seed)
    return -scale * torch.rand(n, m, generator=g, dtype=torch.float64) - 50.0


@pytest.mark.parametrize("iterations", [1, 3, 10])
def test_plan_matches_numpy_transcription(iterations):
    scores = random_scores(200, 5)
    ours = sinkhorn_transport_plan(scores, iterations=iterations, epsilon=0.05)
    expected = numpy_sinkhorn(scores.numpy(), iterations, 0.05)
    np.testing.assert_allclose(ours.numpy(), expected, rtol=1e-9, atol=1e-12)


def test_marginals():
    scores = random_scores(300, 5, seed=1).float()
    plan = sinkhorn_transport_plan(scores, iterations=3, epsilon=0.05).double()
    # The sample constraint is applied last: every row sums to 1 exactly.
    np.testing.assert_allclose(plan.sum(1).numpy(), 1.0, rtol=1e-6)
    # The component constraint holds approximately after 3 rounds ...
    raw = torch.softmax(scores.double() / scores.abs().max() / 0.05, dim=1)
    target = 300 / 5
    assert (plan.sum(0) - target).abs().max() < (raw.sum(0) - target).abs().max()
    # ... and exactly in the limit.
    converged = sinkhorn_transport_plan(scores, iterations=500, epsilon=0.05).double()
    np.testing.assert_allclose(converged.sum(0).numpy(), target, rtol=1e-4)
    np.testing.assert_allclose(converged.sum(1).numpy(), 1.0, rtol=1e-6)


def test_balances_a_lopsided_preference():
    # Every sample prefers component 0; a plain argmax puts them all there,
    # the Sinkhorn assignment spreads them over the components.
    g = torch.Generator().manual_seed(2)
    scores = torch.randn(600, 3, generator=g)
    scores[:, 0] += 2.0
    assert (scores.argmax(1) == 0).float().mean() > 0.7
    _, index = sinkhorn_assignment(scores, iterations=50, epsilon=0.05)
    counts = torch.bincount(index, minlength=3)
    assert counts.min() >= 150, counts


def test_permutation_equivariance():
    scores = random_scores(100, 5, seed=3).float()
    one_hot, index = sinkhorn_assignment(scores)
    rows = torch.randperm(100, generator=torch.Generator().manual_seed(0))
    cols = torch.tensor([3, 0, 4, 1, 2])
    permuted_one_hot, permuted_index = sinkhorn_assignment(scores[rows][:, cols])
    assert torch.equal(permuted_one_hot, one_hot[rows][:, cols])
    # Component j of the permuted problem is component cols[j] of the original.
    assert torch.equal(cols[permuted_index], index[rows])
    plan = sinkhorn_transport_plan(scores)
    torch.testing.assert_close(sinkhorn_transport_plan(scores[rows][:, cols]), plan[rows][:, cols])


def test_scale_invariance_from_max_abs_scaling():
    scores = random_scores(80, 4, seed=4)
    torch.testing.assert_close(sinkhorn_transport_plan(scores), sinkhorn_transport_plan(scores * 37.5))


def test_output_format_and_degenerate_inputs():
    scores = random_scores(10, 4, seed=5).float()
    one_hot, index = sinkhorn_assignment(scores)
    assert one_hot.shape == (10, 4) and one_hot.dtype == torch.float32
    assert index.shape == (10,) and index.dtype == torch.long
    assert torch.equal(one_hot.argmax(1), index) and torch.equal(one_hot.sum(1), torch.ones(10))
    # M = 1: everything in the only component.
    one_hot, index = sinkhorn_assignment(scores[:, :1])
    assert torch.equal(index, torch.zeros(10, dtype=torch.long)) and torch.equal(one_hot, torch.ones(10, 1))
    # Fewer samples than components, a single sample, no samples, all-zero scores.
    for n in (3, 1, 0):
        one_hot, index = sinkhorn_assignment(scores[:n])
        assert one_hot.shape == (n, 4) and index.shape == (n,)
    plan = sinkhorn_transport_plan(torch.zeros(6, 3))
    assert torch.isfinite(plan).all()
    np.testing.assert_allclose(plan.numpy(), 1.0 / 3, rtol=1e-6)


def test_small_epsilon_stays_finite():
    # exp(1 / 0.005) overflows float32; the float64, max-shifted computation does not.
    plan = sinkhorn_transport_plan(random_scores(50, 5, seed=6).float(), epsilon=0.005)
    assert torch.isfinite(plan).all()
    np.testing.assert_allclose(plan.double().sum(1).numpy(), 1.0, rtol=1e-6)


def test_segmented_equals_per_segment_runs():
    g = torch.Generator().manual_seed(7)
    scores = random_scores(400, 5, seed=7)
    segments = torch.randint(0, 6, (400,), generator=g) * 3  # sparse ids, interleaved
    segments[segments == 9] = 12  # one id absent, another bigger
    plan = segmented_sinkhorn_transport_plan(scores, segments)
    index = segmented_sinkhorn_assignment(scores, segments)
    for s in segments.unique():
        members = segments == s
        torch.testing.assert_close(plan[members], sinkhorn_transport_plan(scores[members]), rtol=1e-12, atol=1e-12)
        assert torch.equal(index[members], sinkhorn_assignment(scores[members])[1])


def test_rejects_bad_arguments():
    with pytest.raises(ValueError):
        sinkhorn_assignment(torch.randn(5))
    with pytest.raises(ValueError):
        sinkhorn_assignment(torch.randn(5, 2), iterations=0)
    with pytest.raises(ValueError):
        sinkhorn_assignment(torch.randn(5, 2), epsilon=0.0)
