"""Mask2Former's segmentation head: a pixel decoder followed by a transformer decoder.

Registered in Detectron2's ``SEM_SEG_HEADS_REGISTRY`` as ``MaskFormerHead``,
with Mask2Former's module names (``pixel_decoder``, ``predictor``), so its
checkpoints load under ``sem_seg_head.``.
"""
import logging
from typing import Dict, List, Optional

import torch
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..pixel_decoder import build_pixel_decoder
from ..transformer_decoder import build_transformer_decoder

__all__ = ["MaskFormerHead"]

#: Values of ``MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE`` and where each takes
#: the transformer decoder's input from.
_TRANSFORMER_INPUTS = ("multi_scale_pixel_decoder", "transformer_encoder", "pixel_embedding")


@SEM_SEG_HEADS_REGISTRY.register()
class MaskFormerHead(nn.Module):
    """Pixel decoder → transformer decoder; returns the decoder's prediction dict."""

    # Version 2 moved the pixel decoder's parameters under ``pixel_decoder.``;
    # older (MaskFormer v1) checkpoints are renamed on load.
    _version = 2

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        pixel_decoder: nn.Module,
        transformer_predictor: nn.Module,
        transformer_in_feature: str,
        loss_weight: float = 1.0,
        ignore_value: int = -1,
    ):
        """
        Args:
            input_shape: backbone features the pixel decoder reads.
            num_classes: number of classes ``C`` (without "no object").
            pixel_decoder: module with ``forward_features(features)`` returning
                ``(mask_features, transformer_encoder_features, multi_scale_features)``.
            transformer_predictor: the transformer decoder, called as
                ``predictor(x, mask_features, mask)``.
            transformer_in_feature: what the predictor reads: one of
                ``"multi_scale_pixel_decoder"`` (Mask2Former), ``"transformer_encoder"``,
                ``"pixel_embedding"``, or the name of a backbone feature.
            loss_weight, ignore_value: kept for config compatibility; the losses
                are the criterion's.
        """
        super().__init__()
        ordered = sorted(input_shape.items(), key=lambda item: item[1].stride)
        self.in_features: List[str] = [name for name, _ in ordered]
        self.num_classes = num_classes
        self.ignore_value = ignore_value
        self.loss_weight = loss_weight
        self.common_stride = 4
        self.pixel_decoder = pixel_decoder
        self.predictor = transformer_predictor
        self.transformer_in_feature = transformer_in_feature

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]) -> Dict:
        in_feature = cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE
        if in_feature in ("multi_scale_pixel_decoder", "transformer_encoder"):
            predictor_channels = cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM
        elif in_feature == "pixel_embedding":
            predictor_channels = cfg.MODEL.SEM_SEG_HEAD.MASK_DIM
        elif in_feature in input_shape:
            predictor_channels = input_shape[in_feature].channels
        else:
            raise ValueError(
                f"MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE={in_feature!r} is neither one of "
                f"{_TRANSFORMER_INPUTS} nor a backbone feature ({sorted(input_shape)})"
            )
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES},
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "pixel_decoder": build_pixel_decoder(cfg, input_shape),
            "transformer_predictor": build_transformer_decoder(cfg, predictor_channels, mask_classification=True),
            "transformer_in_feature": in_feature,
            "loss_weight": cfg.MODEL.SEM_SEG_HEAD.LOSS_WEIGHT,
            "ignore_value": cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE,
        }

    @property
    def classifier(self) -> nn.Module:
        """The transformer decoder's class head (``predictor.class_embed``)."""
        return self.predictor.class_embed

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys,
                              unexpected_keys, error_msgs):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            renamed = 0
            for key in list(state_dict):
                if key.startswith(prefix) and not key.startswith(prefix + "predictor") \
                        and not key.startswith(prefix + "pixel_decoder."):
                    state_dict[prefix + "pixel_decoder." + key[len(prefix):]] = state_dict.pop(key)
                    renamed += 1
            if renamed:
                logging.getLogger(__name__).warning(
                    f"{type(self).__name__}: renamed {renamed} parameters of a version-1 checkpoint "
                    "to the pixel_decoder.* layout"
                )
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys,
                                      unexpected_keys, error_msgs)

    def forward(self, features: Dict[str, torch.Tensor], mask: Optional[torch.Tensor] = None) -> Dict:
        """Backbone features → ``{"pred_logits": (B, Q, C+1), "pred_masks": (B, Q, H/4, W/4),
        "aux_outputs": [...]}``."""
        mask_features, encoder_features, multi_scale_features = self.pixel_decoder.forward_features(features)
        if self.transformer_in_feature == "multi_scale_pixel_decoder":
            return self.predictor(multi_scale_features, mask_features, mask)
        if self.transformer_in_feature == "transformer_encoder":
            if encoder_features is None:
                raise ValueError("TRANSFORMER_IN_FEATURE 'transformer_encoder' needs a pixel decoder "
                                 "with a transformer encoder")
            return self.predictor(encoder_features, mask_features, mask)
        if self.transformer_in_feature == "pixel_embedding":
            return self.predictor(mask_features, mask_features, mask)
        return self.predictor(features[self.transformer_in_feature], mask_features, mask)
