"""Anomaly scores of discriminative (softmax) per-pixel classifiers.

Every score follows one convention: **higher means more anomalous**, so the
anomaly evaluator can treat all of them alike. Generative (GMM) models score
by their class-conditional densities instead (see ``modeling/gmm``).
"""
import torch
import torch.nn.functional as F

__all__ = ["SOFTMAX_ANOMALY_SCORES", "softmax_anomaly_score"]

#: Names accepted by :func:`softmax_anomaly_score` and
#: ``MODEL.SEM_SEG_HEAD.ANOMALY_SCORE``.
SOFTMAX_ANOMALY_SCORES = ("msp", "max_logit", "entropy")


def softmax_anomaly_score(logits: torch.Tensor, method: str = "msp", dim: int = 1) -> torch.Tensor:
    """Anomaly score from class logits, reduced over ``dim``.

    Args:
        logits: class logits, e.g. ``(N, C, H, W)`` with ``dim=1``.
        method: ``"msp"`` — negative maximum softmax probability (Hendrycks &
            Gimpel); ``"max_logit"`` — negative maximum logit; ``"entropy"`` —
            entropy of the softmax distribution (nats).
    Returns:
        ``logits`` with ``dim`` removed, e.g. ``(N, H, W)``.
    """
    logits = logits.float()
    if method == "msp":
        return -F.softmax(logits, dim=dim).amax(dim=dim)
    if method == "max_logit":
        return -logits.amax(dim=dim)
    if method == "entropy":
        log_probs = F.log_softmax(logits, dim=dim)
        return -(log_probs.exp() * log_probs).sum(dim=dim)
    raise ValueError(f"Unknown softmax anomaly score {method!r}; "
                     f"choose one of {SOFTMAX_ANOMALY_SCORES}")
