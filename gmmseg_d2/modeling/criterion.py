"""Set-prediction losses of Mask2Former.

After Hungarian matching (:class:`~gmmseg_d2.modeling.matcher.HungarianMatcher`):

* ``loss_ce``: cross-entropy of every query's class logits, target = the
  matched label or "no object" (the last class) for unmatched queries; the
  "no object" class is down-weighted by ``eos_coef`` through the
  ``empty_weight`` buffer, and the loss is the weighted mean.
* ``loss_mask``: sigmoid binary cross-entropy of the matched masks, averaged
  over ``num_points`` points per mask, summed over masks, divided by
  ``num_masks``.
* ``loss_dice``: Dice loss of the matched masks on the same points, summed
  and divided by ``num_masks``.

The points are chosen PointRend-style: ``oversample_ratio * num_points``
random candidates, of which the ``importance_sample_ratio`` fraction with the
most uncertain predictions (logit closest to 0) is kept, the rest drawn
uniformly. ``num_masks`` is the number of targets per image averaged over all
ranks (at least 1). With ``aux_outputs`` the losses are repeated on every
intermediate prediction, each with its own matching, under keys suffixed
``_{i}``. Weighting by ``weight_dict`` is left to the caller (the
meta-architecture), as in the official code.

The classifier's own losses (the GMM's component loss and EM step, the
prototypes' PPC/PPD and update): for a classifier with ``loss_names``, every
layer's queries are labelled from that layer's matching
(:func:`query_class_labels`) and the classifier, passed to :meth:`forward`
as an argument, gets ``classifier.losses(layer's pred_classifier, labels,
update=...)``: the final layer with ``update=True`` and, with deep
supervision, every auxiliary layer with ``update=False`` (keys suffixed
``_{i}``); or, with ``update_layers="all"``, all layers in one call. The
number of calls depends on the config only, never on the data, since a
classifier with state all-gathers inside each call.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.projects.point_rend.point_features import (
    get_uncertain_point_coords_with_randomness,
    point_sample,
)
from detectron2.utils.comm import get_world_size

from .classifiers import QUERY_IGNORE_LABEL, SegmentationClassifier, concatenate_outputs
from .matcher import HungarianMatcher

__all__ = [
    "QUERY_UPDATE_LAYERS", "SetCriterion", "calculate_uncertainty", "dice_loss", "query_class_labels",
    "sigmoid_ce_loss",
]

Indices = List[Tuple[Tensor, Tensor]]

#: Values of ``MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS``.
QUERY_UPDATE_LAYERS = ("last", "all")


def query_class_labels(indices: Indices, targets: Sequence[Dict[str, Tensor]], num_queries: int,
                       num_classes: int, no_object_ratio: float) -> Tensor:
    """Label of every query of one decoder layer for the classifier's own losses, ``(B, Q)`` int64 (CPU).

    Matched queries get their target's class; a random subset of the
    unmatched ones gets ``num_classes`` ("no object"): per image
    ``ceil(no_object_ratio x matched)`` of them, at least one and at most
    all (``no_object_ratio < 0``: all); the others get
    :data:`~gmmseg_d2.modeling.classifiers.QUERY_IGNORE_LABEL`. The subset is
    drawn from the global CPU generator, so seeding torch makes it reproducible.
    """
    labels = torch.full((len(indices), num_queries), QUERY_IGNORE_LABEL, dtype=torch.int64)
    for b, ((query_idx, target_idx), target) in enumerate(zip(indices, targets)):
        query_idx = query_idx.cpu()
        labels[b, query_idx] = target["labels"].cpu()[target_idx.cpu()]
        unmatched = torch.ones(num_queries, dtype=torch.bool)
        unmatched[query_idx] = False
        candidates = torch.nonzero(unmatched).squeeze(1)
        if no_object_ratio < 0:
            take = candidates.numel()
        else:
            take = min(candidates.numel(), max(1, math.ceil(no_object_ratio * query_idx.numel())))
        if take < candidates.numel():
            candidates = candidates[torch.randperm(candidates.numel())[:take]].sort().values
        labels[b, candidates] = num_classes
    return labels


def dice_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Dice loss of matched (prediction, target) pairs.

    Args:
        inputs: mask logits ``(N, P)``.
        targets: target values in ``[0, 1]``, ``(N, P)``.
        num_masks: normaliser.

    Returns:
        Scalar ``sum_n [1 - (2 Σ s t + 1) / (Σ s + Σ t + 1)] / num_masks``, ``s = sigmoid(inputs)``.
    """
    probs = inputs.sigmoid().flatten(1)
    numerator = 2 * (probs * targets).sum(-1)
    denominator = probs.sum(-1) + targets.sum(-1)
    loss = 1 - (numerator + 1) / (denominator + 1)
    return loss.sum() / num_masks


def sigmoid_ce_loss(inputs: Tensor, targets: Tensor, num_masks: float) -> Tensor:
    """Binary cross-entropy of matched pairs: per-mask mean over points, summed, / ``num_masks``.

    Args:
        inputs: mask logits ``(N, P)``.
        targets: target values in ``[0, 1]``, ``(N, P)``.
    """
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none")
    return loss.mean(1).sum() / num_masks


def calculate_uncertainty(logits: Tensor) -> Tensor:
    """Uncertainty of class-agnostic mask logits ``(R, 1, ...)``: ``-|logit|`` (highest at 0)."""
    if logits.shape[1] != 1:
        raise ValueError(f"calculate_uncertainty expects class-agnostic logits (R, 1, ...), got {tuple(logits.shape)}.")
    return -torch.abs(logits)


def _distributed_mean_num_masks(num_masks: int, device: torch.device) -> float:
    """Targets per rank, averaged over ranks (all-reduce when distributed), at least 1."""
    total = torch.as_tensor([num_masks], dtype=torch.float, device=device)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(total)
    return torch.clamp(total / get_world_size(), min=1).item()


class SetCriterion(nn.Module):
    """Matching-based losses for mask classification.

    Reads ``outputs["pred_logits"]`` ``(B, Q, num_classes + 1)`` and
    ``outputs["pred_masks"]`` ``(B, Q, H, W)`` (plus ``"aux_outputs"``), so the
    logits may come from any classifier, and, for a classifier with losses of
    its own, ``"pred_classifier"``. Subclasses add losses by extending
    :meth:`loss_functions`.
    """

    @configurable
    def __init__(
        self,
        num_classes: int,
        matcher: nn.Module,
        weight_dict: Dict[str, float],
        eos_coef: float,
        losses: Sequence[str],
        num_points: int,
        oversample_ratio: float,
        importance_sample_ratio: float,
        *,
        classifier_loss_names: Sequence[str] = (),
        no_object_ratio: float = 1.0,
        update_layers: str = "last",
        aux_classifier_losses: bool = True,
    ):
        """
        Args:
            num_classes: number of classes ``C``, without "no object".
            matcher: assigns queries to targets, e.g. :class:`HungarianMatcher`.
            weight_dict: loss name -> weight, applied by the caller; losses
                missing from it are meant to be dropped.
            eos_coef: weight of the "no object" class in ``loss_ce``.
            losses: which loss groups to compute, from ``"labels"`` and ``"masks"``.
            num_points: points per mask for ``loss_mask`` / ``loss_dice``.
            oversample_ratio: candidate points per kept point (>= 1).
            importance_sample_ratio: fraction of points chosen by uncertainty, in ``[0, 1]``.
            classifier_loss_names: the classifier's ``loss_names``; empty (the
                softmax head): no classifier losses, no query labelling.
            no_object_ratio: see :func:`query_class_labels`.
            update_layers: ``"last"`` or ``"all"`` (see the module docstring).
            aux_classifier_losses: with ``"last"``, also the classifier's
                losses (no update) on every auxiliary prediction.
        """
        super().__init__()
        if update_layers not in QUERY_UPDATE_LAYERS:
            raise ValueError(f"MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS must be one of {QUERY_UPDATE_LAYERS}, "
                             f"got {update_layers!r}")
        self.classifier_loss_names = tuple(classifier_loss_names)
        self.no_object_ratio = no_object_ratio
        self.update_layers = update_layers
        self.aux_classifier_losses = aux_classifier_losses
        unknown = [name for name in losses if name not in self.loss_functions()]
        if unknown:
            raise ValueError(f"SetCriterion: unknown losses {unknown}; available: {sorted(self.loss_functions())}.")
        if num_points <= 0:
            raise ValueError(f"SetCriterion: num_points must be positive, got {num_points}.")
        if oversample_ratio < 1:
            raise ValueError(f"SetCriterion: oversample_ratio must be >= 1, got {oversample_ratio}.")
        if not 0 <= importance_sample_ratio <= 1:
            raise ValueError(f"SetCriterion: importance_sample_ratio must be in [0, 1], got {importance_sample_ratio}.")
        self.num_classes = num_classes
        self.matcher = matcher
        self.weight_dict = dict(weight_dict)
        self.eos_coef = eos_coef
        self.losses = list(losses)
        empty_weight = torch.ones(num_classes + 1)
        empty_weight[-1] = eos_coef
        # Persistent: official checkpoints hold `criterion.empty_weight`.
        self.register_buffer("empty_weight", empty_weight)

        self.num_points = num_points
        self.oversample_ratio = oversample_ratio
        self.importance_sample_ratio = importance_sample_ratio

    @classmethod
    def from_config(cls, cfg, matcher: Optional[nn.Module] = None, classifier_loss_names: Sequence[str] = ()) -> Dict:
        """Arguments as the official ``MaskFormer.from_config`` builds them.

        The matching costs are the loss weights; with ``DEEP_SUPERVISION`` the
        weight dict also holds ``loss_*_{i}`` for the ``DEC_LAYERS - 1``
        auxiliary predictions. The classifier's own losses come weighted
        (their ``weight_dict`` entries are 1).
        """
        mask_former = cfg.MODEL.MASK_FORMER
        weight_dict = {
            "loss_ce": mask_former.CLASS_WEIGHT,
            "loss_mask": mask_former.MASK_WEIGHT,
            "loss_dice": mask_former.DICE_WEIGHT,
        }
        if mask_former.DEEP_SUPERVISION:
            main_weights = dict(weight_dict)
            for i in range(mask_former.DEC_LAYERS - 1):
                weight_dict.update({f"{name}_{i}": weight for name, weight in main_weights.items()})
        classifier = cfg.MODEL.get("CLASSIFIER")
        if classifier is None:
            # A config with Mask2Former's keys only: the softmax head, which has
            # no losses of its own; the query settings keep their defaults.
            if classifier_loss_names:
                raise KeyError(f"SetCriterion: the classifier's losses {tuple(classifier_loss_names)} need "
                               "MODEL.CLASSIFIER.QUERY (gmmseg_d2.config.add_gmmseg_config)")
            update_layers, no_object_ratio = "last", 1.0
        else:
            update_layers, no_object_ratio = classifier.QUERY.UPDATE_LAYERS, classifier.QUERY.NO_OBJECT_RATIO
        aux_classifier_losses = bool(mask_former.DEEP_SUPERVISION) and update_layers == "last"
        for name in classifier_loss_names:
            weight_dict[name] = 1.0
            if aux_classifier_losses:
                weight_dict.update({f"{name}_{i}": 1.0 for i in range(mask_former.DEC_LAYERS - 1)})
        return {
            "classifier_loss_names": tuple(classifier_loss_names),
            "no_object_ratio": no_object_ratio,
            "update_layers": update_layers,
            "aux_classifier_losses": aux_classifier_losses,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "matcher": matcher if matcher is not None else HungarianMatcher(cfg),
            "weight_dict": weight_dict,
            "eos_coef": mask_former.NO_OBJECT_WEIGHT,
            "losses": ["labels", "masks"],
            "num_points": mask_former.TRAIN_NUM_POINTS,
            "oversample_ratio": mask_former.OVERSAMPLE_RATIO,
            "importance_sample_ratio": mask_former.IMPORTANCE_SAMPLE_RATIO,
        }

    def loss_functions(self) -> Dict[str, Callable[..., Dict[str, Tensor]]]:
        """Loss group name -> ``fn(outputs, targets, indices, num_masks) -> {loss_name: scalar}``."""
        return {"labels": self.loss_labels, "masks": self.loss_masks}

    def loss_labels(
        self, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks: float
    ) -> Dict[str, Tensor]:
        """``loss_ce``: weighted cross-entropy over all queries (unmatched -> "no object")."""
        src_logits = outputs["pred_logits"].float()
        if src_logits.shape[-1] != self.num_classes + 1:
            raise ValueError(
                f"SetCriterion: pred_logits must have num_classes + 1 = {self.num_classes + 1} logits "
                f"(last = no object), got shape {tuple(src_logits.shape)}."
            )
        batch_idx, query_idx = self._get_src_permutation_idx(indices)
        matched_labels = torch.cat([t["labels"][target_idx] for t, (_, target_idx) in zip(targets, indices)])
        target_classes = torch.full(src_logits.shape[:2], self.num_classes, dtype=torch.int64,
                                    device=src_logits.device)
        target_classes[batch_idx, query_idx] = matched_labels.to(target_classes.device)
        # Class dimension second for F.cross_entropy: (B, K, Q).
        loss_ce = F.cross_entropy(src_logits.transpose(1, 2), target_classes, self.empty_weight)
        return {"loss_ce": loss_ce}

    def sample_point_coords(self, mask_logits: Tensor) -> Tensor:
        """Uncertainty-biased points for the mask losses.

        Args:
            mask_logits: matched predicted masks ``(N, 1, H, W)``.

        Returns:
            ``(N, num_points, 2)`` coordinates in ``[0, 1]``. Override (e.g. in
            tests) to make the mask losses deterministic.
        """
        return get_uncertain_point_coords_with_randomness(
            mask_logits, calculate_uncertainty, self.num_points, self.oversample_ratio, self.importance_sample_ratio
        )

    def loss_masks(
        self, outputs: Dict, targets: Sequence[Dict], indices: Indices, num_masks: float
    ) -> Dict[str, Tensor]:
        """``loss_mask`` (sigmoid BCE) and ``loss_dice`` of matched masks on sampled points."""
        src_masks = outputs["pred_masks"][self._get_src_permutation_idx(indices)]  # (N, H, W)
        target_masks = self._matched_target_masks(targets, indices).to(src_masks)  # (N, H_t, W_t)
        if src_masks.shape[0] == 0:
            # Nothing matched anywhere in the batch: both losses are empty sums.
            # Zero that still depends on the predictions, so every rank's
            # backward reaches the same parameters.
            zero = outputs["pred_masks"].sum() * 0.0
            return {"loss_mask": zero, "loss_dice": zero.clone()}

        # Points are in normalised coordinates, so predictions (stride 4) and
        # targets (input resolution) are compared without upsampling.
        src_masks = src_masks[:, None]
        target_masks = target_masks[:, None]
        with torch.no_grad():
            point_coords = self.sample_point_coords(src_masks)
            point_labels = point_sample(target_masks, point_coords, align_corners=False).squeeze(1)
        point_logits = point_sample(src_masks, point_coords, align_corners=False).squeeze(1)

        return {
            "loss_mask": sigmoid_ce_loss(point_logits, point_labels, num_masks),
            "loss_dice": dice_loss(point_logits, point_labels, num_masks),
        }

    @staticmethod
    def _matched_target_masks(targets: Sequence[Dict], indices: Indices) -> Tensor:
        """Matched target masks ``(N, H_max, W_max)``, zero-padded to the largest target size, in match order."""
        sizes = [t["masks"].shape[-2:] for t in targets]
        height = max(s[0] for s in sizes)
        width = max(s[1] for s in sizes)
        matched = []
        for target, (_, target_idx) in zip(targets, indices):
            masks = target["masks"][target_idx.to(target["masks"].device)]
            matched.append(F.pad(masks, (0, width - masks.shape[-1], 0, height - masks.shape[-2])))
        return torch.cat(matched)

    @staticmethod
    def _get_src_permutation_idx(indices: Indices) -> Tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(src, i) for i, (src, _) in enumerate(indices)])
        src_idx = torch.cat([src for (src, _) in indices])
        return batch_idx, src_idx

    @staticmethod
    def _get_tgt_permutation_idx(indices: Indices) -> Tuple[Tensor, Tensor]:
        batch_idx = torch.cat([torch.full_like(tgt, i) for i, (_, tgt) in enumerate(indices)])
        tgt_idx = torch.cat([tgt for (_, tgt) in indices])
        return batch_idx, tgt_idx

    def get_loss(self, loss: str, outputs: Dict, targets: Sequence[Dict], indices: Indices,
                 num_masks: float) -> Dict[str, Tensor]:
        functions = self.loss_functions()
        if loss not in functions:
            raise KeyError(f"SetCriterion: unknown loss {loss!r}; available: {sorted(functions)}.")
        return functions[loss](outputs, targets, indices, num_masks)

    def forward(self, outputs: Dict, targets: Sequence[Dict[str, Tensor]],
                classifier: Optional[SegmentationClassifier] = None) -> Dict[str, Tensor]:
        """Unweighted losses of the final prediction and of every ``aux_outputs`` entry.

        Args:
            outputs: ``"pred_logits"`` ``(B, Q, C + 1)``, ``"pred_masks"`` ``(B, Q, H, W)``,
                optionally ``"aux_outputs"``: a list of dicts with the same two keys;
                with classifier losses also ``"pred_classifier"`` in each.
            targets: ``B`` dicts with ``"labels"`` ``(T_b,)`` int64 in ``[0, C)`` and
                ``"masks"`` ``(T_b, H_t, W_t)`` binary.
            classifier: the decoder's class head; needed when
                ``classifier_loss_names`` is not empty.

        Returns:
            ``loss_ce``, ``loss_mask``, ``loss_dice``, the classifier's losses and,
            for auxiliary output ``i``, the same names suffixed ``_{i}``.
        """
        if targets is None:
            raise ValueError(
                "SetCriterion: no targets; training inputs need an 'instances' field with gt_classes and gt_masks "
                "(use MaskFormerSemanticDatasetMapper)."
            )
        if self.classifier_loss_names and classifier is None:
            raise ValueError(f"SetCriterion: the classifier's losses {self.classifier_loss_names} need the "
                             "classifier: call criterion(outputs, targets, classifier)")
        self._check_targets(targets)
        outputs_without_aux = {k: v for k, v in outputs.items() if k != "aux_outputs"}
        indices = self.matcher(outputs_without_aux, targets)

        num_masks = _distributed_mean_num_masks(
            sum(len(t["labels"]) for t in targets), device=outputs["pred_logits"].device
        )

        losses: Dict[str, Tensor] = {}
        for loss in self.losses:
            losses.update(self.get_loss(loss, outputs, targets, indices, num_masks))
        # (classifier output, query labels) per layer, final first. Labelled
        # right after each layer's losses: the labels draw from the same RNG
        # as the point sampling, and this keeps the order of draws fixed.
        labelled = [self._label_layer(outputs, targets, indices)] if self.classifier_loss_names else []

        for i, aux_outputs in enumerate(outputs.get("aux_outputs", [])):
            aux_indices = self.matcher(aux_outputs, targets)
            for loss in self.losses:
                aux_losses = self.get_loss(loss, aux_outputs, targets, aux_indices, num_masks)
                losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
            if self.classifier_loss_names:
                labelled.append(self._label_layer(aux_outputs, targets, aux_indices))
        if self.classifier_loss_names:
            losses.update(self.classifier_losses(classifier, labelled))
        return losses

    def _label_layer(self, outputs: Dict, targets: Sequence[Dict], indices: Indices):
        if "pred_classifier" not in outputs:
            raise KeyError("SetCriterion: the predictions have no 'pred_classifier' (the class head's whole "
                           "output), which the classifier's own losses need")
        labels = query_class_labels(indices, targets, outputs["pred_logits"].shape[1], self.num_classes,
                                    self.no_object_ratio)
        return outputs["pred_classifier"], labels.to(outputs["pred_logits"].device)

    def classifier_losses(self, classifier: SegmentationClassifier, labelled: Sequence) -> Dict[str, Tensor]:
        """The classifier's losses on ``[(output, labels (B, Q)), ...]``, final layer first.

        Always the same calls for a given config, whatever the data.
        """
        if self.update_layers == "all":
            merged = concatenate_outputs([output for output, _ in labelled])
            labels = torch.cat([labels for _, labels in labelled], dim=0)
            return classifier.losses(merged, labels, update=True)
        (final_output, final_labels), aux = labelled[0], labelled[1:]
        losses = dict(classifier.losses(final_output, final_labels, update=True))
        if self.aux_classifier_losses:
            for i, (output, labels) in enumerate(aux):
                aux_losses = classifier.losses(output, labels, update=False)
                losses.update({f"{name}_{i}": value for name, value in aux_losses.items()})
        return losses

    def _check_targets(self, targets: Sequence[Dict[str, Tensor]]) -> None:
        for b, target in enumerate(targets):
            if "labels" not in target or "masks" not in target:
                raise KeyError(f"SetCriterion: target {b} needs 'labels' and 'masks', has {sorted(target)}.")
            labels, masks = target["labels"], target["masks"]
            if labels.dim() != 1 or masks.dim() != 3 or masks.shape[0] != labels.shape[0]:
                raise ValueError(
                    f"SetCriterion: target {b} must hold labels (T,) and masks (T, H, W); "
                    f"got {tuple(labels.shape)} and {tuple(masks.shape)}."
                )
            if labels.numel() and (labels.min() < 0 or labels.max() >= self.num_classes):
                raise ValueError(
                    f"SetCriterion: target {b} has labels outside [0, {self.num_classes}): "
                    f"{labels.unique().tolist()}; ignore/void pixels must not become targets."
                )

    def extra_repr(self) -> str:
        return (
            f"num_classes={self.num_classes}, eos_coef={self.eos_coef}, losses={self.losses}, "
            f"num_points={self.num_points}, oversample_ratio={self.oversample_ratio}, "
            f"importance_sample_ratio={self.importance_sample_ratio},\nweight_dict={self.weight_dict}"
            + (f",\nclassifier_loss_names={self.classifier_loss_names}, update_layers={self.update_layers}, "
               f"no_object_ratio={self.no_object_ratio}, aux_classifier_losses={self.aux_classifier_losses}"
               if self.classifier_loss_names else "")
        )
