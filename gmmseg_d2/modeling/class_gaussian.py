"""A class-conditional Gaussian fitted post hoc on a trained model's features.

The control experiment for GMMSeg's density score: fit one Gaussian per class
on the pre-classifier features of a model trained with *any* classifier
(usually softmax), then score pixels by how unlike every class they are. If
this density separates anomalies as well as the GMM head's own, the gain comes
from "using a density", not from "training through a generative head".

Two covariance models, both standard in the OOD literature:

* ``"shared"``: one covariance pooled over classes (linear discriminant
  analysis); ``-max_c log p(x | c)`` then ranks pixels exactly like the
  minimum Mahalanobis distance of Lee et al. (NeurIPS 2018).
* ``"per_class"``: a full covariance per class (Gaussian discriminant
  analysis, as DDU, Mukhoti et al. CVPR 2023, fits on a softmax model).

Usage::

    gaussian = ClassConditionalGaussian(num_classes=C, dim=D, covariance="per_class")
    for features, labels in train_batches:        # (N, D), (N,); ignore_value skipped
        gaussian.accumulate(features, labels)
    gaussian.fit()
    log_density = gaussian.log_density(features)  # (N, C)
    score = gaussian.anomaly_score(features)      # (N,)  -max_c log p(x | c)

Sufficient statistics (count, sum, scatter) are accumulated in float64, so the
fit does not depend on how the training pixels were batched.
"""
from __future__ import annotations

import math

import torch

__all__ = ["ClassConditionalGaussian", "COVARIANCE_TYPES"]

#: Accepted values of ``covariance``.
COVARIANCE_TYPES = ("shared", "per_class")


class ClassConditionalGaussian:
    """One multivariate Gaussian per class on ``D``-dimensional features.

    Args:
        num_classes: ``C``.
        dim: ``D``.
        covariance: ``"shared"`` or ``"per_class"`` (see the module docstring).
        jitter: added to the covariance diagonal as a fraction of its mean
            eigenvalue (``trace / D``), so that features confined to a subspace
            (ReLU outputs with dead channels) still give a positive-definite
            matrix; ``1e-4`` changes well-conditioned fits negligibly.
        ignore_value: label of pixels that belong to no class.
    """

    def __init__(self, num_classes: int, dim: int, covariance: str = "shared", jitter: float = 1e-4,
                 ignore_value: int = 255) -> None:
        if covariance not in COVARIANCE_TYPES:
            raise ValueError(f"covariance must be one of {COVARIANCE_TYPES}, got {covariance!r}")
        if jitter < 0:
            raise ValueError(f"jitter must be >= 0, got {jitter}")
        self.num_classes, self.dim = num_classes, dim
        self.covariance, self.jitter, self.ignore_value = covariance, jitter, ignore_value
        self.count = torch.zeros(num_classes, dtype=torch.float64)
        self.total = torch.zeros(num_classes, dim, dtype=torch.float64)
        self.scatter = torch.zeros(num_classes, dim, dim, dtype=torch.float64)
        self.means = None  # (C, D) after fit()
        self._cholesky = None  # (C, D, D) lower-triangular factors (shared: C copies of one)
        self._log_det = None  # (C,)

    @torch.no_grad()
    def accumulate(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Add ``(N, D)`` features with ``(N,)`` labels to the statistics."""
        if features.ndim != 2 or features.shape[1] != self.dim:
            raise ValueError(f"features must be (N, {self.dim}), got {tuple(features.shape)}")
        labels = labels.reshape(-1).to(torch.long).cpu()
        if labels.shape[0] != features.shape[0]:
            raise ValueError(f"{labels.shape[0]} labels for {features.shape[0]} features")
        keep = labels != self.ignore_value
        features, labels = features.detach().cpu().to(torch.float64)[keep], labels[keep]
        if bool(((labels < 0) | (labels >= self.num_classes)).any()):
            raise ValueError(f"labels must be in [0, {self.num_classes}) or {self.ignore_value}, "
                             f"got values {torch.unique(labels).tolist()}")
        for c in torch.unique(labels).tolist():
            members = features[labels == c]
            self.count[c] += members.shape[0]
            self.total[c] += members.sum(dim=0)
            self.scatter[c] += members.T @ members

    @torch.no_grad()
    def fit(self) -> "ClassConditionalGaussian":
        """Means and covariances from the accumulated statistics; returns self."""
        missing = torch.nonzero(self.count == 0).flatten().tolist()
        if missing:
            raise ValueError(f"no training features for classes {missing}; cannot fit their Gaussians")
        means = self.total / self.count[:, None]
        # Scatter around each class mean: sum x x^T - n mu mu^T.
        centred = self.scatter - self.count[:, None, None] * torch.einsum("ci,cj->cij", means, means)
        if self.covariance == "shared":
            pooled = centred.sum(dim=0) / self.count.sum()
            covariances = pooled.expand(self.num_classes, self.dim, self.dim)
        else:
            covariances = centred / self.count[:, None, None]
        eye = torch.eye(self.dim, dtype=torch.float64)
        scale = torch.diagonal(covariances, dim1=-2, dim2=-1).mean(dim=-1).clamp_min(1e-12)
        covariances = covariances + self.jitter * scale[:, None, None] * eye
        cholesky = torch.linalg.cholesky(covariances)
        self.means = means
        self._cholesky = cholesky
        self._log_det = 2.0 * torch.log(torch.diagonal(cholesky, dim1=-2, dim2=-1)).sum(dim=-1)
        return self

    @property
    def covariances(self) -> torch.Tensor:
        """``(C, D, D)`` fitted covariances (jitter included)."""
        self._check_fitted()
        return self._cholesky @ self._cholesky.transpose(-1, -2)

    def _check_fitted(self) -> None:
        if self.means is None:
            raise RuntimeError("ClassConditionalGaussian.fit() must be called before scoring")

    @torch.no_grad()
    def log_density(self, features: torch.Tensor) -> torch.Tensor:
        """``(N, D)`` features -> ``(N, C)`` ``log N(x; mu_c, Sigma_c)`` (float64, on CPU)."""
        self._check_fitted()
        x = features.detach().cpu().to(torch.float64)
        out = torch.empty(x.shape[0], self.num_classes, dtype=torch.float64)
        constant = self.dim * math.log(2.0 * math.pi)
        for c in range(self.num_classes):
            # ||L^-1 (x - mu)||^2 is the Mahalanobis distance under L L^T.
            whitened = torch.linalg.solve_triangular(self._cholesky[c], (x - self.means[c]).T, upper=False)
            out[:, c] = -0.5 * (whitened.square().sum(dim=0) + self._log_det[c] + constant)
        return out

    def anomaly_score(self, features: torch.Tensor) -> torch.Tensor:
        """``(N,)`` ``-max_c log p(x | c)``: high means unlike every class."""
        return -self.log_density(features).amax(dim=1)
