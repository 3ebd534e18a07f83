"""SegFormer's all-MLP decoder (Xie et al., NeurIPS 2021) with any registered pixel classifier.

Every input level (``res2 .. res5`` of a MiT) goes through its own 1x1
conv-norm-ReLU to ``CONVS_DIM`` channels and is bilinearly resized to the
first (finest, stride 4) level; the concatenation is fused by a 1x1
conv-norm-ReLU, then dropout and the classifier of ``MODEL.CLASSIFIER.NAME``
(``self.predictor``). This is MMSegmentation's ``SegformerHead`` and, with
``MODEL.CLASSIFIER.NAME: "gmm"`` and ``MODEL.GMM.EMBEDDING: "conv_bn_relu"``,
the official ``SegformerGMMSegHead`` (whose ``projection``, ``feat_norm`` and
``mask_norm`` are the GMM classifier's ``projection``, ``embedding_norm`` and
``class_norm``).

Parameter names: ``convs.{i}`` and ``fusion_conv`` (Detectron2 ``Conv2d``
with ``.norm``), ``predictor.*``; see
:func:`gmmseg_d2.checkpoint_conversion.convert_mmseg_segformer` for
MMSegmentation's (``.conv``, ``.bn``, ``conv_seg``).
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from .pixel_classifier import (
    PixelClassifierBuilder, PixelClassifierHeadMixin, default_pixel_classifier, pixel_classifier_builder,
)

__all__ = ["SegFormerHead"]


def _conv1x1_norm_relu(in_channels: int, out_channels: int, norm: str) -> Conv2d:
    # MMSegmentation's ConvModule drops the conv bias when a norm follows ("auto").
    return Conv2d(in_channels, out_channels, kernel_size=1, bias=not norm, norm=get_norm(norm, out_channels),
                  activation=F.relu)


@SEM_SEG_HEADS_REGISTRY.register()
class SegFormerHead(PixelClassifierHeadMixin, nn.Module):
    """All-MLP decoder on several backbone levels, then a pixel classifier.

    Same contract as :class:`~gmmseg_d2.modeling.heads.FCNHead`: training
    returns ``(None, losses)`` (``"loss_sem_seg"``, the cross-entropy of the
    logits upsampled to the padded input size, plus the classifier's own
    losses); inference ``({"sem_seg": (B, C, H, W), "anomaly_score": (B, H, W)}, {})``.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        in_features: Sequence[str],
        channels: int = 256,
        dropout: float = 0.1,
        norm: str = "BN",
        classifier: Optional[PixelClassifierBuilder] = None,
        loss_weight: float = 1.0,
        ignore_value: int = 255,
    ):
        """
        Args:
            input_shape: backbone output shapes.
            num_classes: number of classes ``C``.
            in_features: backbone features to decode, finest first (their
                maps are resized to the first one's).
            channels: channels of every level's projection and of the fusion
                (official: 256 for MiT-B0/B1, 768 for B2-B5).
            dropout: dropout probability before the classifier.
            norm: normalization of the 1x1 convs ("BN", "SyncBN", "" for none).
            classifier: ``in_channels -> classifier`` (see
                :func:`~gmmseg_d2.modeling.heads.pixel_classifier_builder`);
                None: a softmax 1x1 conv scoring anomalies by MSP.
            loss_weight: weight of the cross-entropy loss.
            ignore_value: target value excluded from the loss.
        """
        super().__init__()
        missing = [name for name in in_features if name not in input_shape]
        if missing or not in_features:
            raise ValueError(f"SegFormerHead input features {list(in_features)}: {missing or 'none given'} "
                             f"not among the backbone outputs {sorted(input_shape)}")
        self.in_features = list(in_features)
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.output_stride = input_shape[self.in_features[0]].stride
        self.convs = nn.ModuleList([
            _conv1x1_norm_relu(input_shape[name].channels, channels, norm) for name in self.in_features
        ])
        self.fusion_conv = _conv1x1_norm_relu(channels * len(self.in_features), channels, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        classifier = classifier if classifier is not None else default_pixel_classifier(num_classes)
        self.predictor = classifier(channels)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": input_shape,
            "num_classes": head.NUM_CLASSES,
            "in_features": list(head.IN_FEATURES),
            "channels": head.CONVS_DIM,
            "dropout": head.DROPOUT,
            "norm": head.NORM,
            "classifier": pixel_classifier_builder(cfg),
            "loss_weight": head.LOSS_WEIGHT,
            "ignore_value": head.IGNORE_VALUE,
        }

    def layers(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The fused map ``(B, channels, h, w)`` at the first feature's resolution, after dropout."""
        size = features[self.in_features[0]].shape[-2:]
        levels = []
        for name, conv in zip(self.in_features, self.convs):
            x = conv(features[name])
            if x.shape[-2:] != size:
                x = F.interpolate(x, size=size, mode="bilinear", align_corners=False)
            levels.append(x)
        return self.dropout(self.fusion_conv(torch.cat(levels, dim=1)))

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """
        Args:
            features: backbone outputs, ``{name: (B, C_i, h_i, w_i)}``.
            targets: ``(B, H, W)`` int64 labels at the padded input size (training).
        """
        return self.predict(self.layers(features), targets)
