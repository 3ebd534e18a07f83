"""FCN segmentation head (Long et al.; the shape of mmsegmentation's FCNHead).

``NUM_CONVS`` 3x3 conv-norm-ReLU blocks on one backbone feature, an optional
3x3 fusion of their output with the input (``CONCAT_INPUT``), dropout, then a
per-pixel classifier selected by ``MODEL.CLASSIFIER.NAME``.
"""
from typing import Dict, Optional, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .pixel_classifier import (
    PixelClassifierBuilder, PixelClassifierHeadMixin, default_pixel_classifier, pixel_classifier_builder,
)

__all__ = ["FCNHead"]


def _conv_norm_relu(in_channels: int, out_channels: int, norm: str) -> Conv2d:
    conv = Conv2d(in_channels, out_channels, kernel_size=3, padding=1, bias=not norm,
                  norm=get_norm(norm, out_channels), activation=F.relu)
    weight_init.c2_msra_fill(conv)
    return conv


@SEM_SEG_HEADS_REGISTRY.register()
class FCNHead(PixelClassifierHeadMixin, nn.Module):
    """Fully convolutional head on a single backbone feature.

    Training returns ``(None, losses)``: ``"loss_sem_seg"``, the cross-entropy
    of the logits upsampled to the (padded) input size, and the classifier's
    own losses (the GMM's ``"loss_gmm_component"``: its EM step runs as part
    of computing it).
    Inference returns ``(outputs, {})`` where ``outputs`` holds, at the padded
    input size, ``"sem_seg"``: logits ``(B, C, H, W)`` and ``"anomaly_score"``:
    ``(B, H, W)`` (higher = more anomalous).
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_feature: str,
        conv_dims: int = 512,
        num_convs: int = 2,
        concat_input: bool = True,
        dropout: float = 0.1,
        norm: str = "BN",
        classifier: Optional[PixelClassifierBuilder] = None,
        loss_weight: float = 1.0,
        ignore_value: int = 255,
    ):
        """
        Args:
            input_shape: backbone output shapes; only ``in_feature`` is used.
            num_classes: number of classes ``C``.
            in_feature: name of the backbone feature to segment from (e.g. "res5").
            conv_dims: channels of the 3x3 convs.
            num_convs: number of 3x3 conv blocks (0 = classifier on the input).
            concat_input: fuse the convs' output with the input by a 3x3 conv.
            dropout: dropout probability before the classifier.
            norm: normalization of the convs ("" for none).
            classifier: called with the channels of the final feature map,
                returns the ``predictor`` (a ``SegmentationClassifier``, see
                :func:`pixel_classifier_builder`); None: a softmax 1x1 conv
                scoring anomalies by MSP.
            loss_weight: weight of the cross-entropy loss.
            ignore_value: target value excluded from the loss.
        """
        super().__init__()
        if in_feature not in input_shape:
            raise ValueError(f"FCNHead input feature {in_feature!r} is not a backbone output; "
                             f"available: {sorted(input_shape)}")
        self.in_feature = in_feature
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight

        in_channels = input_shape[in_feature].channels
        self.output_stride = input_shape[in_feature].stride
        self.convs = nn.Sequential(*[
            _conv_norm_relu(in_channels if i == 0 else conv_dims, conv_dims, norm)
            for i in range(num_convs)
        ])
        out_channels = conv_dims if num_convs > 0 else in_channels
        self.conv_cat = (_conv_norm_relu(in_channels + out_channels, conv_dims, norm)
                         if concat_input and num_convs > 0 else None)
        if self.conv_cat is not None:
            out_channels = conv_dims
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        classifier = classifier if classifier is not None else default_pixel_classifier(num_classes)
        self.predictor = classifier(out_channels)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        if len(head.IN_FEATURES) != 1:
            raise ValueError(f"FCNHead takes exactly one MODEL.SEM_SEG_HEAD.IN_FEATURES entry, "
                             f"got {list(head.IN_FEATURES)}")
        return {
            "input_shape": input_shape,
            "num_classes": head.NUM_CLASSES,
            "in_feature": head.IN_FEATURES[0],
            "conv_dims": head.CONVS_DIM,
            "num_convs": head.NUM_CONVS,
            "concat_input": head.CONCAT_INPUT,
            "dropout": head.DROPOUT,
            "norm": head.NORM,
            "classifier": pixel_classifier_builder(cfg),
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The head's final feature map ``(B, C_feat, h, w)`` before the classifier."""
        x = features[self.in_feature]
        y = self.convs(x)
        if self.conv_cat is not None:
            y = self.conv_cat(torch.cat([x, y], dim=1))
        return self.dropout(y)

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """
        Args:
            features: backbone outputs, ``{name: (B, C_i, h_i, w_i)}``.
            targets: ``(B, H, W)`` int64 labels at the padded input size (training).
        """
        return self.predict(self.layers(features), targets)
