"""The per-pixel classifier of a segmentation head: softmax (1x1 conv) or GMM.

Heads keep the classifier under Detectron2's usual attribute name
``predictor``, whichever kind it is, and use the functions here so that
everything downstream of the classifier is shared:

* :func:`build_pixel_classifier` — ``nn.Conv2d`` for ``"softmax"``,
  :class:`GaussianMixtureClassifier` for ``"gmm"``.
* :func:`classify_feature_map` — class logits ``(B, K, h, w)`` (and the GMM's
  full output, needed by its EM step and anomaly score).
* :func:`gmm_em_loss` — the GMM's EM step on labels resized (nearest) to the
  feature resolution, as the official code does; returns its component loss.
* :func:`pixel_anomaly_score` — the density score ``-max_c log p(x|c)`` for the
  GMM, or a softmax score (MSP / max-logit / entropy), at the output size.
"""
from typing import Dict, Optional, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..anomaly import SOFTMAX_ANOMALY_SCORES, softmax_anomaly_score
from ..gmm import GaussianMixtureClassifier, GMMClassifierOutput

__all__ = [
    "PIXEL_CLASSIFIERS", "PixelClassifierHeadMixin", "build_pixel_classifier", "check_pixel_head_settings",
    "gmm_kwargs_from_config", "classify_feature_map", "gmm_em_loss",
    "pixel_anomaly_score",
]

#: Values of ``MODEL.SEM_SEG_HEAD.CLASSIFIER``.
PIXEL_CLASSIFIERS = ("softmax", "gmm")


def check_pixel_head_settings(classifier: str, anomaly_score: str) -> None:
    """Raise for an unknown ``MODEL.SEM_SEG_HEAD.CLASSIFIER`` or ``ANOMALY_SCORE`` (shared by the heads)."""
    if classifier not in PIXEL_CLASSIFIERS:
        raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.CLASSIFIER {classifier!r}; "
                         f"choose one of {PIXEL_CLASSIFIERS}")
    if anomaly_score not in SOFTMAX_ANOMALY_SCORES:
        raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.ANOMALY_SCORE {anomaly_score!r}; "
                         f"choose one of {SOFTMAX_ANOMALY_SCORES}")


def gmm_kwargs_from_config(cfg) -> Dict:
    """:class:`GaussianMixtureClassifier` arguments from ``cfg.MODEL.GMM``, minus the sizes."""
    kwargs = GaussianMixtureClassifier.from_config(cfg, in_channels=0, num_classes=0)
    return {k: v for k, v in kwargs.items() if k not in ("in_channels", "num_classes")}


def build_pixel_classifier(kind: str, in_channels: int, num_classes: int,
                           gmm_kwargs: Optional[Dict] = None) -> nn.Module:
    """A softmax 1x1 conv or a GMM classifier from ``in_channels`` to ``num_classes``.

    ``gmm_kwargs`` go to :class:`GaussianMixtureClassifier` (its defaults are
    the paper's and the official per-pixel head's: conv -> BN -> ReLU ->
    LayerNorm -> L2 embedding, random memory start, Sinkhorn on every labelled
    pixel); see :func:`gmm_kwargs_from_config`. The embedding's BatchNorm
    takes its statistics over the ``B*h*w`` pixels of a training batch.
    """
    if kind == "softmax":
        predictor = nn.Conv2d(in_channels, num_classes, kernel_size=1)
        nn.init.normal_(predictor.weight, std=0.01)
        nn.init.zeros_(predictor.bias)
        return predictor
    if kind == "gmm":
        return GaussianMixtureClassifier(in_channels=in_channels, num_classes=num_classes,
                                         **(gmm_kwargs or {}))
    raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.CLASSIFIER {kind!r}; "
                     f"choose one of {PIXEL_CLASSIFIERS}")


def classify_feature_map(predictor: nn.Module, features: torch.Tensor
                         ) -> Tuple[torch.Tensor, Optional[GMMClassifierOutput]]:
    """Features ``(B, C_feat, h, w)`` → logits ``(B, K, h, w)`` and the GMM output or None.

    The GMM output keeps the pixel grid: ``component_log_likelihood`` is
    ``(B, h, w, K, M)``.
    """
    if isinstance(predictor, GaussianMixtureClassifier):
        output = predictor(rearrange(features, "b c h w -> b h w c"))
        return rearrange(output.class_logits, "b h w k -> b k h w"), output
    return predictor(features), None


def gmm_em_loss(predictor: GaussianMixtureClassifier, output: GMMClassifierOutput,
                targets: torch.Tensor) -> torch.Tensor:
    """Run the GMM's EM step for one batch; returns its weighted component loss.

    Args:
        output: :func:`classify_feature_map`'s GMM output on a ``(B, h, w)`` grid.
        targets: ``(B, H, W)`` labels at the input size; nearest-resized to
            ``(h, w)`` so each feature gets the label under its centre.
    """
    grid = output.class_logits.shape[1:3]
    labels = F.interpolate(targets[:, None].float(), size=grid, mode="nearest")[:, 0].long()
    return predictor.em_step(output, labels)


def pixel_anomaly_score(predictor: nn.Module, logits: torch.Tensor,
                        gmm_output: Optional[GMMClassifierOutput], softmax_method: str
                        ) -> torch.Tensor:
    """Per-pixel anomaly score ``(B, H, W)``, higher = more anomalous.

    Args:
        logits: class logits ``(B, K, H, W)`` already at the output size.
        gmm_output: the GMM output at feature resolution (GMM classifiers).
        softmax_method: "msp", "max_logit" or "entropy" (softmax classifiers).
    """
    if gmm_output is None:
        return softmax_anomaly_score(logits, softmax_method, dim=1)
    # The density score lives at feature resolution; interpolating the score
    # (not the densities' arguments) keeps it a smooth map of -log p(x|c).
    score = predictor.anomaly_score(gmm_output)[:, None]
    return F.interpolate(score, size=logits.shape[-2:], mode="bilinear", align_corners=False)[:, 0]


class PixelClassifierHeadMixin:
    """The part of a per-pixel head after its final feature map, shared by all heads.

    A head using it has ``self.predictor`` (from :func:`build_pixel_classifier`),
    ``self.output_stride`` (input size / feature map size),
    ``self.anomaly_score_method`` and a ``losses(logits, targets)`` method with
    its own classification loss; it calls :meth:`predict` from ``forward``.
    """

    def predict(self, feature_map: torch.Tensor, targets: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """Feature map ``(B, C_feat, h, w)`` → the head's ``(outputs, losses)`` pair.

        Training: ``(None, losses)`` with ``"loss_sem_seg"`` and, for the GMM,
        ``"loss_gmm_component"`` (its EM step runs here). Inference:
        ``({"sem_seg": (B, K, H, W), "anomaly_score": (B, H, W)}, {})``.
        """
        logits, gmm_output = classify_feature_map(self.predictor, feature_map)
        if self.training:
            losses = self.losses(logits, targets)
            if gmm_output is not None:
                losses["loss_gmm_component"] = gmm_em_loss(self.predictor, gmm_output, targets)
            return None, losses
        return self.inference(logits, gmm_output), {}

    def inference(self, logits: torch.Tensor, gmm_output: Optional[GMMClassifierOutput] = None
                  ) -> Dict[str, torch.Tensor]:
        """Logits ``(B, K, h, w)`` → outputs at ``output_stride`` times their size (the
        padded input size, up to rounding that ``sem_seg_postprocess`` crops away)."""
        logits = F.interpolate(logits.float(), scale_factor=self.output_stride, mode="bilinear",
                               align_corners=False)
        return {
            "sem_seg": logits,
            "anomaly_score": pixel_anomaly_score(self.predictor, logits, gmm_output,
                                                 self.anomaly_score_method),
        }
