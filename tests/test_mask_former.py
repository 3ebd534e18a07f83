"""Mask2Former meta-architecture: anomaly scores, semantic inference, head wiring, training."""
import math

import pytest
import torch
import torch.nn.functional as F

from gmmseg_d2.modeling.anomaly import MASK_CLASSIFICATION_ANOMALY_SCORES, mask_classification_anomaly_score


def test_mask_classification_anomaly_scores_match_hand_computed_values():
    # Two queries, two classes (+ no object), one pixel fully covered by query
    # 0 and half by query 1, one pixel covered by nothing.
    class_logits = torch.tensor([[2.0, 0.0, 0.0], [0.0, 1.0, -1.0]])
    mask_probs = torch.tensor([[[1.0, 0.0]], [[0.5, 0.0]]])  # (Q=2, H=1, W=2)
    p0 = [math.exp(2) / (math.exp(2) + 2), 1 / (math.exp(2) + 2)]
    p1 = [1 / (1 + math.e + math.exp(-1)), math.e / (1 + math.e + math.exp(-1))]
    semantic = [p0[0] + 0.5 * p1[0], p0[1] + 0.5 * p1[1]]
    evidence = [2.0 + 0.5 * 0.0, 0.0 + 0.5 * 1.0]

    msp = mask_classification_anomaly_score(class_logits, mask_probs, "msp")
    assert msp[0, 0].item() == pytest.approx(-max(semantic), rel=1e-6)
    assert msp[0, 1].item() == 0.0
    max_logit = mask_classification_anomaly_score(class_logits, mask_probs, "max_logit")
    assert max_logit[0, 0].item() == pytest.approx(-2.0)
    entropy = mask_classification_anomaly_score(class_logits, mask_probs, "entropy")
    q = [s / sum(semantic) for s in semantic]
    assert entropy[0, 0].item() == pytest.approx(-sum(v * math.log(v) for v in q), rel=1e-6)
    rba = mask_classification_anomaly_score(class_logits, mask_probs, "rba")
    assert rba[0, 0].item() == pytest.approx(-(math.tanh(evidence[0]) + math.tanh(evidence[1])), rel=1e-6)
    # A pixel no query covers has no evidence for any class: RbA's maximum
    # among non-negative evidence, 0.
    assert rba[0, 1].item() == 0.0
    with pytest.raises(ValueError, match="rba"):
        mask_classification_anomaly_score(class_logits, mask_probs, "energy")
    assert set(MASK_CLASSIFICATION_ANOMALY_SCORES) == {"msp", "max_logit", "entropy", "rba"}
