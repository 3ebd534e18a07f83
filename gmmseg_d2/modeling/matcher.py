"""Hungarian matching of predicted masks to ground-truth masks (Mask2Former).

For every image, the cost of assigning query ``q`` to target ``t`` is

    cost_class * (-p_q(label_t)) + cost_mask * BCE(mask_q, mask_t) + cost_dice * Dice(mask_q, mask_t)

with ``p_q`` the softmax of the query's class logits and both mask costs
evaluated on ``num_points`` random points shared by all masks of the image
(no upsampling to the target resolution is needed: points are in normalised
coordinates). The one-to-one assignment of least total cost is found with
``scipy.optimize.linear_sum_assignment``; unmatched queries are "no object".
The arithmetic, the point sampling and the order of random draws follow the
official implementation.
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from scipy.optimize import linear_sum_assignment
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import point_sample

__all__ = ["HungarianMatcher", "batch_dice_cost", "batch_sigmoid_ce_cost"]


def batch_dice_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise Dice loss between every prediction and every target.

    Args:
        inputs: mask logits ``(N, P)`` at ``P`` points.
        targets: binary (or soft) target values ``(M, P)`` at the same points.

    Returns:
        ``(N, M)``: ``1 - (2 |s ∩ t| + 1) / (|s| + |t| + 1)`` with ``s = sigmoid(inputs)``.
    """
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * torch.einsum("np,mp->nm", probs, targets)
    denominator = probs.sum(-1)[:, None] + targets.sum(-1)[None, :]
    return 1 - (numerator + 1) / (denominator + 1)


def batch_sigmoid_ce_cost(inputs: Tensor, targets: Tensor) -> Tensor:
    """Pairwise mean binary cross-entropy between every prediction and target.

    Args:
        inputs: mask logits ``(N, P)``.
        targets: target values in ``[0, 1]``, ``(M, P)``.

    Returns:
        ``(N, M)``: ``mean_p BCE(inputs[n, p], targets[m, p])``, computed as two
        matrix products of the positive and negative log-likelihoods.
    """
    num_points = inputs.shape[1]
    loss_if_positive = F.binary_cross_entropy_with_logits(inputs, torch.ones_like(inputs), reduction="none")
    loss_if_negative = F.binary_cross_entropy_with_logits(inputs, torch.zeros_like(inputs), reduction="none")
    cost = torch.einsum("np,mp->nm", loss_if_positive, targets) + torch.einsum(
        "np,mp->nm", loss_if_negative, 1 - targets
    )
    return cost / num_points


class HungarianMatcher(nn.Module):
    """One-to-one assignment between queries and ground-truth masks.

    Only ``outputs["pred_logits"]`` and ``outputs["pred_masks"]`` are read, so
    any classifier producing ``(B, Q, K)`` logits (softmax head or GMM) can be
    matched; the last logit is the "no object" class and never a target.
    """

    @configurable
    def __init__(self, cost_class: float = 1.0, cost_mask: float = 1.0, cost_dice: float = 1.0,
                 num_points: int = 112 * 112):
        """
        Args:
            cost_class: weight of the classification cost ``-p(label)``.
            cost_mask: weight of the sigmoid binary cross-entropy cost.
            cost_dice: weight of the Dice cost.
            num_points: points sampled per image to evaluate the mask costs.
        """
        super().__init__()
        if cost_class == 0 and cost_mask == 0 and cost_dice == 0:
            raise ValueError("HungarianMatcher: cost_class, cost_mask and cost_dice cannot all be 0.")
        if num_points <= 0:
            raise ValueError(
                f"HungarianMatcher: num_points must be positive, got {num_points} "
                "(MODEL.MASK_FORMER.TRAIN_NUM_POINTS)."
            )
        self.cost_class = cost_class
        self.cost_mask = cost_mask
        self.cost_dice = cost_dice
        self.num_points = num_points

    @classmethod
    def from_config(cls, cfg) -> Dict:
        # Matching costs reuse the loss weights, as the official MaskFormer does.
        mask_former = cfg.MODEL.MASK_FORMER
        return {
            "cost_class": mask_former.CLASS_WEIGHT,
            "cost_mask": mask_former.MASK_WEIGHT,
            "cost_dice": mask_former.DICE_WEIGHT,
            "num_points": mask_former.TRAIN_NUM_POINTS,
        }

    def sample_point_coords(self, device: torch.device) -> Tensor:
        """Points at which one image's masks are compared: ``(1, num_points, 2)`` in ``[0, 1]``.

        Uniformly random, one set shared by all queries and targets of the
        image. Override (e.g. in tests) to make matching deterministic.
        """
        return torch.rand(1, self.num_points, 2, device=device)

    @torch.no_grad()
    def cost_matrix(self, pred_logits: Tensor, pred_masks: Tensor, labels: Tensor, target_masks: Tensor) -> Tensor:
        """Matching cost of one image.

        Args:
            pred_logits: ``(Q, K)`` class logits.
            pred_masks: ``(Q, H, W)`` mask logits.
            labels: ``(T,)`` int64 target classes in ``[0, K - 1)``.
            target_masks: ``(T, H_t, W_t)`` binary target masks (any resolution).

        Returns:
            ``(Q, T)`` float32 cost on the device of the predictions.
        """
        # -p(label) stands in for the NLL: same ordering of costs, bounded.
        cost_class = -pred_logits.softmax(-1)[:, labels]

        target_masks = target_masks.to(pred_masks)
        point_coords = self.sample_point_coords(pred_masks.device)
        target_points = point_sample(
            target_masks[:, None], point_coords.repeat(target_masks.shape[0], 1, 1), align_corners=False
        ).squeeze(1)
        pred_points = point_sample(
            pred_masks[:, None], point_coords.repeat(pred_masks.shape[0], 1, 1), align_corners=False
        ).squeeze(1)

        # Mask costs in fp32 even under mixed precision: BCE of fp16 logits
        # loses the small differences the assignment depends on.
        with torch.autocast(device_type=pred_points.device.type, enabled=False):
            pred_points = pred_points.float()
            target_points = target_points.float()
            cost_mask = batch_sigmoid_ce_cost(pred_points, target_points)
            cost_dice = batch_dice_cost(pred_points, target_points)

        return self.cost_mask * cost_mask + self.cost_class * cost_class + self.cost_dice * cost_dice

    @torch.no_grad()
    def forward(self, outputs: Dict[str, Tensor], targets: Sequence[Dict[str, Tensor]]) -> List[Tuple[Tensor, Tensor]]:
        """Match the queries of every image to its targets.

        Args:
            outputs: ``"pred_logits"`` ``(B, Q, K)`` and ``"pred_masks"`` ``(B, Q, H, W)``
                (other keys are ignored).
            targets: ``B`` dicts with ``"labels"`` ``(T_b,)`` int64 and ``"masks"``
                ``(T_b, H_t, W_t)``.

        Returns:
            ``B`` pairs ``(query_indices, target_indices)``, int64 CPU tensors of
            length ``min(Q, T_b)``, query indices in increasing order.
        """
        pred_logits, pred_masks = outputs["pred_logits"], outputs["pred_masks"]
        batch_size, num_queries = pred_logits.shape[:2]
        if len(targets) != batch_size:
            raise ValueError(f"HungarianMatcher: got {len(targets)} targets for a batch of {batch_size} predictions.")
        indices = []
        for b, target in enumerate(targets):
            labels, masks = target["labels"], target["masks"]
            if masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"HungarianMatcher: target {b} must hold labels (T,) and masks (T, H, W) with the same T; "
                    f"got labels {tuple(labels.shape)} and masks {tuple(masks.shape)}."
                )
            cost = self.cost_matrix(pred_logits[b], pred_masks[b], labels, masks)
            cost = cost.reshape(num_queries, -1).cpu()
            if not torch.isfinite(cost).all():
                raise ValueError(
                    f"HungarianMatcher: the matching cost of image {b} is not finite; the model's "
                    "pred_logits or pred_masks contain NaN/Inf (diverged training?)."
                )
            query_idx, target_idx = linear_sum_assignment(cost.numpy())
            indices.append((torch.as_tensor(query_idx, dtype=torch.int64),
                            torch.as_tensor(target_idx, dtype=torch.int64)))
        return indices

    def extra_repr(self) -> str:
        return (f"cost_class={self.cost_class}, cost_mask={self.cost_mask}, cost_dice={self.cost_dice}, "
                f"num_points={self.num_points}")
