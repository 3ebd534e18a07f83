"""Anomaly scores of discriminative (softmax) classifiers: per-pixel and mask classification.

Every score follows one convention: **higher means more anomalous**, so the
anomaly evaluator can treat all of them alike. Generative (GMM) models score
by their class-conditional densities instead (see ``modeling/gmm``).
"""
import torch
import torch.nn.functional as F

__all__ = [
    "MASK_CLASSIFICATION_ANOMALY_SCORES", "SOFTMAX_ANOMALY_SCORES", "mask_classification_anomaly_score",
    "softmax_anomaly_score",
]

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


#: Names accepted by :func:`mask_classification_anomaly_score` and
#: ``MODEL.MASK_FORMER.TEST.ANOMALY_SCORE``.
MASK_CLASSIFICATION_ANOMALY_SCORES = ("msp", "max_logit", "entropy", "rba")


def mask_classification_anomaly_score(class_logits: torch.Tensor, mask_probs: torch.Tensor,
                                      method: str = "msp") -> torch.Tensor:
    """Per-pixel anomaly score of a mask-classification model (one image).

    The per-query class evidence is spread over each query's soft mask:
    ``S_c = sum_q p(c|q) m_q`` (Mask2Former's semantic output, ``p`` the softmax
    over the ``C + 1`` classes with "no object" dropped) and
    ``L_c = sum_q l_qc m_q`` (the same with raw logits ``l``).

    Args:
        class_logits: ``(Q, C + 1)`` query class logits, last = no object.
        mask_probs: ``(Q, H, W)`` mask probabilities (after the sigmoid).
        method: ``"msp"`` ``-max_c S_c``; ``"max_logit"`` ``-max_c L_c``;
            ``"entropy"`` entropy of ``S`` normalised over classes; ``"rba"``
            ``-sum_c tanh(L_c)``, "Rejected by All" (Nayal et al., ICCV 2023):
            a pixel that every class rejects scores high.
    Returns:
        ``(H, W)``, higher = more anomalous.
    """
    class_logits, mask_probs = class_logits.float(), mask_probs.float()
    if method in ("msp", "entropy"):
        semantic = torch.einsum("qc,qhw->chw", F.softmax(class_logits, dim=-1)[:, :-1], mask_probs)
        if method == "msp":
            return -semantic.amax(dim=0)
        distribution = semantic / semantic.sum(dim=0, keepdim=True).clamp_min(1e-12)
        return -(distribution * distribution.clamp_min(1e-12).log()).sum(dim=0)
    if method in ("max_logit", "rba"):
        evidence = torch.einsum("qc,qhw->chw", class_logits[:, :-1], mask_probs)
        return -evidence.amax(dim=0) if method == "max_logit" else -torch.tanh(evidence).sum(dim=0)
    raise ValueError(f"Unknown mask-classification anomaly score {method!r}; "
                     f"choose one of {MASK_CLASSIFICATION_ANOMALY_SCORES}")
