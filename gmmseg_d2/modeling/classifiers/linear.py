"""The softmax classifier: a linear map to class logits (``MODEL.CLASSIFIER.NAME: "softmax"``)."""
from __future__ import annotations

import math
from typing import Optional, Tuple

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from ..anomaly import SOFTMAX_ANOMALY_SCORES, softmax_anomaly_score
from .base import CLASSIFIER_REGISTRY, ClassifierOutput, SegmentationClassifier, check_level

__all__ = ["LinearClassifier"]


@CLASSIFIER_REGISTRY.register("softmax")
class LinearClassifier(SegmentationClassifier):
    """Class logits by one linear map; no losses of its own, no state.

    Pixel level: a 1x1 convolution, ``weight (K, D, 1, 1)``, initialised
    N(0, 0.01) with zero bias (mmsegmentation's ``conv_seg``, Detectron2's
    ``predictor``). Query level: Mask2Former's ``nn.Linear(D, K)``, ``weight
    (K, D)`` with PyTorch's default initialisation. The two layouts are the
    checkpoints' (per-pixel heads' ``predictor.weight``, Mask2Former's
    ``class_embed.weight``), so both load unchanged.

    Args:
        in_channels: ``D``.
        num_classes: ``K`` (query level: the classes + "no object").
        level: ``"pixel"`` or ``"query"``.
        anomaly_method: ``"msp"``, ``"max_logit"`` or ``"entropy"`` for
            :meth:`anomaly_score`.
    """

    def __init__(self, in_channels: int, num_classes: int, *, level: str = "pixel",
                 anomaly_method: str = "msp") -> None:
        super().__init__()
        check_level(level)
        if anomaly_method not in SOFTMAX_ANOMALY_SCORES:
            raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.ANOMALY_SCORE {anomaly_method!r}; "
                             f"choose one of {SOFTMAX_ANOMALY_SCORES}")
        self.level = level
        self.in_channels = in_channels
        self.num_classes = num_classes
        self.anomaly_method = anomaly_method
        shape = (num_classes, in_channels, 1, 1) if level == "pixel" else (num_classes, in_channels)
        self.weight = nn.Parameter(torch.empty(shape))
        self.bias = nn.Parameter(torch.empty(num_classes))
        if level == "pixel":
            nn.init.normal_(self.weight, std=0.01)
            nn.init.zeros_(self.bias)
        else:
            # nn.Linear's own initialisation (and the same draws), as Mask2Former's class head.
            nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
            bound = 1.0 / math.sqrt(in_channels) if in_channels > 0 else 0.0
            nn.init.uniform_(self.bias, -bound, bound)

    @classmethod
    def from_config(cls, cfg, *, in_channels: int, num_classes: int, level: str, ignore_value: int) -> dict:
        del ignore_value
        return {"in_channels": in_channels, "num_classes": num_classes, "level": level,
                "anomaly_method": cfg.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE}

    def extra_repr(self) -> str:
        return f"in_channels={self.in_channels}, num_classes={self.num_classes}, level={self.level}"

    def forward(self, features: Tensor) -> ClassifierOutput:
        """``(N, D, H, W) -> (N, K, H, W)`` or ``(B, Q, D) -> (B, Q, K)`` logits."""
        if self.level == "pixel":
            return ClassifierOutput(F.conv2d(features, self.weight, self.bias))
        return ClassifierOutput(F.linear(features, self.weight, self.bias))

    def anomaly_score(self, outputs: ClassifierOutput, output_size: Optional[Tuple[int, int]] = None) -> Tensor:
        """The softmax score ``anomaly_method`` of the logits.

        Pixel level: on the logits bilinearly resized to ``output_size`` (the
        score of the interpolated logits, as the head's prediction is taken).
        Query level ``(B, Q)``: on the logits of the ``C`` real classes.
        """
        logits = outputs.class_logits
        if self.level == "query":
            return softmax_anomaly_score(logits[..., :-1], self.anomaly_method, dim=-1)
        if output_size is not None and tuple(logits.shape[-2:]) != tuple(output_size):
            logits = F.interpolate(logits.float(), size=output_size, mode="bilinear", align_corners=False)
        return softmax_anomaly_score(logits, self.anomaly_method, dim=1)
