"""Post-hoc class-conditional Gaussian against scipy/numpy closed forms."""
import numpy as np
import pytest
import torch
from scipy.stats import multivariate_normal

from gmmseg_d2.modeling.class_gaussian import ClassConditionalGaussian


def _blobs(seed=0, n=(300, 500, 400), dim=5):
    rng = np.random.default_rng(seed)
    features, labels = [], []
    for c, count in enumerate(n):
        mixing = rng.normal(size=(dim, dim))
        features.append(rng.normal(size=(count, dim)) @ mixing + 3.0 * c)
        labels.append(np.full(count, c))
    return np.concatenate(features), np.concatenate(labels)


@pytest.mark.parametrize("covariance", ["shared", "per_class"])
def test_log_density_matches_scipy(covariance):
    x, y = _blobs()
    gaussian = ClassConditionalGaussian(3, x.shape[1], covariance=covariance, jitter=0.0)
    # Batched accumulation must not matter.
    for chunk in np.array_split(np.arange(len(x)), 7):
        gaussian.accumulate(torch.from_numpy(x[chunk]).float(), torch.from_numpy(y[chunk]))
    gaussian.fit()
    xf = x.astype(np.float32).astype(np.float64)
    means = [xf[y == c].mean(axis=0) for c in range(3)]
    if covariance == "per_class":
        covs = [np.cov(xf[y == c].T, bias=True) for c in range(3)]
    else:
        pooled = sum(((xf[y == c] - means[c]).T @ (xf[y == c] - means[c])) for c in range(3)) / len(xf)
        covs = [pooled] * 3
    queries = np.random.default_rng(1).normal(size=(50, x.shape[1])) * 4
    expected = np.stack([multivariate_normal(means[c], covs[c]).logpdf(queries) for c in range(3)], axis=1)
    got = gaussian.log_density(torch.from_numpy(queries)).numpy()
    np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(gaussian.anomaly_score(torch.from_numpy(queries)).numpy(), -expected.max(axis=1),
                               rtol=1e-6, atol=1e-6)


def test_shared_score_ranks_like_min_mahalanobis():
    x, y = _blobs(seed=2)
    gaussian = ClassConditionalGaussian(3, x.shape[1], covariance="shared")
    gaussian.accumulate(torch.from_numpy(x), torch.from_numpy(y))
    gaussian.fit()
    precision = np.linalg.inv(gaussian.covariances[0].numpy())
    means = gaussian.means.numpy()
    queries = np.random.default_rng(3).normal(size=(200, x.shape[1])) * 5
    distance = np.stack([np.einsum("ni,ij,nj->n", queries - m, precision, queries - m) for m in means], 1).min(1)
    score = gaussian.anomaly_score(torch.from_numpy(queries)).numpy()
    assert np.array_equal(np.argsort(score), np.argsort(distance))


def test_far_points_score_higher_and_ignore_is_skipped():
    x, y = _blobs(seed=4)
    y_with_void = y.copy()
    y_with_void[::10] = 255
    gaussian = ClassConditionalGaussian(3, x.shape[1], covariance="per_class")
    gaussian.accumulate(torch.from_numpy(x), torch.from_numpy(y_with_void))
    gaussian.fit()
    assert gaussian.count.sum().item() == (y_with_void != 255).sum()
    inliers = gaussian.anomaly_score(torch.from_numpy(x[:100])).mean()
    outliers = gaussian.anomaly_score(torch.from_numpy(x[:100] + 50.0)).mean()
    assert outliers > inliers + 100


def test_errors_name_the_problem():
    gaussian = ClassConditionalGaussian(3, 2)
    with pytest.raises(ValueError, match=r"\(N, 2\)"):
        gaussian.accumulate(torch.zeros(4, 3), torch.zeros(4))
    with pytest.raises(ValueError, match="labels must be in"):
        gaussian.accumulate(torch.zeros(4, 2), torch.tensor([0, 1, 7, 2]))
    gaussian.accumulate(torch.randn(10, 2), torch.zeros(10))
    with pytest.raises(ValueError, match=r"classes \[1, 2\]"):
        gaussian.fit()
    with pytest.raises(RuntimeError, match="fit"):
        ClassConditionalGaussian(1, 2).log_density(torch.zeros(1, 2))


def test_degenerate_features_still_fit():
    # ReLU features with a dead channel: singular scatter, jitter makes it PD.
    x = np.abs(np.random.default_rng(5).normal(size=(200, 4)))
    x[:, 2] = 0.0
    gaussian = ClassConditionalGaussian(1, 4, covariance="per_class")
    gaussian.accumulate(torch.from_numpy(x), torch.zeros(200, dtype=torch.long))
    gaussian.fit()
    assert torch.isfinite(gaussian.anomaly_score(torch.from_numpy(x))).all()
