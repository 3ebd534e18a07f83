"""Anomaly scores of discriminative (softmax) classifiers: per-pixel and mask classification.

Every score follows one convention: **higher means more anomalous**, so the
anomaly evaluator can treat all of them alike. Generative (GMM) models score
by their class-conditional densities instead: per pixel with
``GaussianMixtureClassifier.anomaly_score`` (``modeling/gmm``), per mask with
:func:`mask_density_anomaly_score` below.
"""
import torch
import torch.nn.functional as F

__all__ = [
    "MASK_CLASSIFICATION_ANOMALY_SCORES", "MASK_DENSITY_ANOMALY_SCORES", "SOFTMAX_ANOMALY_SCORES",
    "mask_classification_anomaly_score", "mask_density_anomaly_score", "softmax_anomaly_score",
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


#: Names accepted by :func:`mask_density_anomaly_score` (GMM mask classifier
#: only) and ``MODEL.MASK_FORMER.TEST.ANOMALY_SCORE``.
MASK_DENSITY_ANOMALY_SCORES = ("density_mask_avg", "density_min", "density_max")

#: A query covers a pixel where ``(1 - p_q(no object)) * m_q(x)`` reaches this.
DENSITY_COVER_THRESHOLD = 0.5

#: Coverage weight of the fallback in ``density_mask_avg`` (see below).
DENSITY_AVG_FALLBACK_WEIGHT = 1e-4


def mask_density_anomaly_score(class_logits: torch.Tensor, query_anomaly: torch.Tensor,
                               mask_probs: torch.Tensor, method: str = "density_mask_avg") -> torch.Tensor:
    """Per-pixel anomaly score of a GMM mask classifier from per-query densities (one image).

    Each query ``q`` has a density score ``a_q = -max_c log p(e_q | c)`` over
    the ``C`` real classes (``query_anomaly``; high = its embedding is unlike
    every class), an objectness ``w_q = 1 - p_q(no object)`` (``p`` the
    softmax of its class logits) and a soft mask ``m_q(x)``; its coverage of
    pixel ``x`` is ``r_q(x) = w_q m_q(x)``. A pixel inherits the density of the
    queries that claim it:

    * ``"density_mask_avg"``: ``(sum_q r_q a_q + eps a_max) / (sum_q r_q + eps)``,
      the coverage-weighted mean of ``a_q``; ``eps = 1e-4``
      (:data:`DENSITY_AVG_FALLBACK_WEIGHT`) only matters where no object
      query covers the pixel, which then tends to ``a_max = max_q a_q``.
    * ``"density_min"``: ``min a_q`` over the queries with ``r_q(x) >= 0.5``
      (:data:`DENSITY_COVER_THRESHOLD`): normal as soon as one confident query
      that covers the pixel is a likely member of some class.
    * ``"density_max"``: ``max a_q`` over the same queries: anomalous as soon
      as one of them is unlike every class.

    For the last two a pixel no query covers gets ``a_max``: like the softmax
    scores (MSP gives 0, its maximum, where every ``m_q`` is 0), a pixel no
    object claims counts as the most anomalous.

    Args:
        class_logits: ``(Q, C + 1)`` query class logits, last = no object.
        query_anomaly: ``(Q,)`` ``a_q``.
        mask_probs: ``(Q, H, W)`` mask probabilities (after the sigmoid).
        method: one of :data:`MASK_DENSITY_ANOMALY_SCORES`.
    Returns:
        ``(H, W)``, higher = more anomalous.
    """
    class_logits, query_anomaly, mask_probs = class_logits.float(), query_anomaly.float(), mask_probs.float()
    objectness = 1.0 - F.softmax(class_logits, dim=-1)[:, -1]  # (Q,)
    fallback = query_anomaly.max()
    if method == "density_mask_avg":
        coverage = torch.einsum("q,qhw->hw", objectness, mask_probs)
        weighted = torch.einsum("q,qhw->hw", objectness * query_anomaly, mask_probs)
        eps = DENSITY_AVG_FALLBACK_WEIGHT
        return (weighted + eps * fallback) / (coverage + eps)
    if method in ("density_min", "density_max"):
        # One query at a time: O(H W) extra memory instead of O(Q H W).
        take_min = method == "density_min"
        score = mask_probs.new_full(mask_probs.shape[1:], float("inf") if take_min else float("-inf"))
        for q in range(mask_probs.shape[0]):
            covers = objectness[q] * mask_probs[q] >= DENSITY_COVER_THRESHOLD
            reduced = torch.minimum(score, query_anomaly[q]) if take_min else torch.maximum(score, query_anomaly[q])
            score = torch.where(covers, reduced, score)
        return torch.where(torch.isinf(score), fallback, score)
    raise ValueError(f"Unknown mask density anomaly score {method!r}; "
                     f"choose one of {MASK_DENSITY_ANOMALY_SCORES}")
