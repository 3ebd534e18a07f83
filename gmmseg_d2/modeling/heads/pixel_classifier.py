"""The part of a per-pixel head after its final feature map, shared by FCN and DeepLabV3+.

Heads keep their classifier under Detectron2's usual attribute name
``predictor``: a :class:`~gmmseg_d2.modeling.classifiers.SegmentationClassifier`
built from ``MODEL.CLASSIFIER.NAME`` (:func:`pixel_classifier_builder`), and
call :meth:`PixelClassifierHeadMixin.predict` on the final feature map. The
head knows nothing about the classifier beyond the seam's three methods.
"""
from functools import partial
from typing import Callable, Dict, Optional, Tuple

import torch
import torch.nn.functional as F

from ..classifiers import LinearClassifier, SegmentationClassifier, build_classifier

__all__ = ["PixelClassifierBuilder", "PixelClassifierHeadMixin", "pixel_classifier_builder", "labels_at"]

#: ``in_channels -> classifier``: what a head calls, with the channels of its
#: final feature map, to build its ``predictor``.
PixelClassifierBuilder = Callable[[int], SegmentationClassifier]


def pixel_classifier_builder(cfg) -> PixelClassifierBuilder:
    """The ``MODEL.CLASSIFIER.NAME`` classifier for ``MODEL.SEM_SEG_HEAD``'s classes and ignore value."""
    head = cfg.MODEL.SEM_SEG_HEAD
    return partial(_build_pixel_classifier, cfg, head.NUM_CLASSES, head.IGNORE_VALUE)


def _build_pixel_classifier(cfg, num_classes: int, ignore_value: int, in_channels: int) -> SegmentationClassifier:
    return build_classifier(cfg, in_channels=in_channels, num_classes=num_classes, level="pixel",
                            ignore_value=ignore_value)


def default_pixel_classifier(num_classes: int, anomaly_score: str = "msp") -> PixelClassifierBuilder:
    """A softmax 1x1 conv (the classifier of heads built without a config)."""
    return partial(_softmax_classifier, num_classes, anomaly_score)


def _softmax_classifier(num_classes: int, anomaly_score: str, in_channels: int) -> SegmentationClassifier:
    return LinearClassifier(in_channels, num_classes, level="pixel", anomaly_method=anomaly_score)


def labels_at(targets: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
    """``(B, H, W)`` labels nearest-resized to ``size`` ``(h, w)``: each feature gets
    the label under its centre (as the official GMMSeg and ProtoSeg heads do)."""
    return F.interpolate(targets[:, None].float(), size=size, mode="nearest")[:, 0].long()


class PixelClassifierHeadMixin:
    """The shared end of a per-pixel head.

    A head using it has ``self.predictor`` (a ``SegmentationClassifier`` at
    pixel level), ``self.output_stride`` (input size / feature map size),
    ``self.ignore_value`` and ``self.loss_weight``; :meth:`losses` is the
    plain cross-entropy (DeepLabV3+ overrides it with Detectron2's DeepLab loss).
    """

    def losses(self, logits: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Cross-entropy at the target resolution (logits bilinearly upsampled, as
        mmsegmentation's decode heads do); ``logits (B, C, h, w)``, ``targets (B, H, W)``."""
        logits = F.interpolate(logits.float(), size=targets.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(logits, targets, reduction="mean", ignore_index=self.ignore_value)
        return {"loss_sem_seg": loss * self.loss_weight}

    def predict(self, feature_map: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """Feature map ``(B, C_feat, h, w)`` → the head's ``(outputs, losses)`` pair.

        Training: ``(None, losses)``: the head's ``"loss_sem_seg"`` and the
        classifier's own losses (``loss_gmm_component`` for the GMM), on the
        targets nearest-resized to ``(h, w)``; the classifier's state update
        runs there. Inference: ``({"sem_seg": (B, K, H, W), "anomaly_score":
        (B, H, W)}, {})``.
        """
        outputs = self.predictor(feature_map)
        if self.training:
            losses = self.losses(outputs.class_logits, targets)
            if self.predictor.loss_names:
                labels = labels_at(targets, tuple(outputs.class_logits.shape[-2:]))
                losses.update(self.predictor.losses(outputs, labels, update=True))
            return None, losses
        return self.inference(outputs), {}

    def inference(self, outputs) -> Dict[str, torch.Tensor]:
        """Classifier outputs at ``(h, w)`` → logits and anomaly score at ``output_stride``
        times that size (the padded input size, up to rounding that
        ``sem_seg_postprocess`` crops away)."""
        logits = F.interpolate(outputs.class_logits.float(), scale_factor=self.output_stride, mode="bilinear",
                               align_corners=False)
        return {"sem_seg": logits,
                "anomaly_score": self.predictor.anomaly_score(outputs, output_size=tuple(logits.shape[-2:]))}
