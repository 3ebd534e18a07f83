"""DeepLabV3+ head (Chen et al. 2018) with any registered pixel classifier (softmax, GMM, ...).

The decoder is Detectron2's own :class:`~detectron2.projects.deeplab.DeepLabV3PlusHead`
built in its decoder-only mode (``num_classes=None``): ASPP on the
largest-stride input feature, then, towards the smallest stride, a 1x1
projection of each low-level feature (``res2``) fused with the upsampled
decoder output. This class only adds what follows the decoder: optional
dropout, the classifier selected by ``MODEL.CLASSIFIER.NAME`` (kept as
``self.predictor``, as in Detectron2's head), the losses and the anomaly
score. Parameter names are Detectron2's (``decoder.*``, ``predictor.*``), so a
softmax head loads a ``DeepLabV3PlusHead`` state dict as is.

Differences from Detectron2's head, both opt-in through arguments:

* ``aspp_pooling``: Detectron2 sizes the ASPP image-pooling window from the
  training crop (``pool_kernel_size = crop / stride``, stride 1), which
  requires every test feature map to be a multiple of that window. The default
  here is global average pooling (mmsegmentation's ASPP), valid at any input
  size; ``"crop"`` restores Detectron2's behaviour. The image-pooling branch has
  no normalization in either case (as in Detectron2), so training with a batch
  of one image is fine.
* ``dropout``: dropout before the classifier, as mmsegmentation's decode heads
  have (``dropout_ratio``); Detectron2's head has none (0 reproduces it).
"""
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY
from detectron2.projects.deeplab.loss import DeepLabCE
from detectron2.projects.deeplab.semantic_seg import DeepLabV3PlusHead

from .pixel_classifier import (
    PixelClassifierBuilder, PixelClassifierHeadMixin, default_pixel_classifier, pixel_classifier_builder,
)

__all__ = ["DeepLabV3PlusClassifierHead", "GMMSegDeepLabV3PlusHead", "ASPP_POOLING_MODES", "DEEPLAB_LOSS_TYPES"]

#: Values of ``MODEL.SEM_SEG_HEAD.ASPP_POOLING``.
ASPP_POOLING_MODES = ("global", "crop")
#: Values of ``MODEL.SEM_SEG_HEAD.LOSS_TYPE`` (Detectron2's DeepLab options).
DEEPLAB_LOSS_TYPES = ("cross_entropy", "hard_pixel_mining")


@SEM_SEG_HEADS_REGISTRY.register()
class DeepLabV3PlusClassifierHead(PixelClassifierHeadMixin, DeepLabV3PlusHead):
    """DeepLabV3+ decoder (Detectron2's) + a classifier from ``MODEL.CLASSIFIER.NAME``.

    Registered as ``DeepLabV3PlusClassifierHead`` (Detectron2's own head holds
    the name ``DeepLabV3PlusHead``) and, for configs and checkpoints written
    before the rename, under its former name ``GMMSegDeepLabV3PlusHead``.

    Same contract as :class:`FCNHead`: training returns ``(None, losses)``
    with ``"loss_sem_seg"`` and the classifier's own losses (``"loss_gmm_component"`` for the GMM);
    inference returns ``({"sem_seg": (B, C, H, W), "anomaly_score": (B, H, W)}, {})``
    at ``common_stride`` times the decoder resolution, i.e. the padded input size.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        num_classes: int,
        project_channels: List[int],
        aspp_dilations: List[int],
        aspp_dropout: float,
        decoder_channels: List[int],
        common_stride: int,
        norm: Union[str, Callable],
        in_features: Optional[Sequence[str]] = None,
        aspp_pooling: str = "global",
        train_size: Optional[Tuple[int, int]] = None,
        dropout: float = 0.0,
        classifier: Optional[PixelClassifierBuilder] = None,
        loss_weight: float = 1.0,
        loss_type: str = "cross_entropy",
        ignore_value: int = 255,
        use_depthwise_separable_conv: bool = False,
    ):
        """
        Args:
            input_shape: backbone output shapes. The features in ``in_features``
                are ordered by stride; the largest-stride one feeds the ASPP,
                the others are the decoder's low-level skips.
            num_classes: number of classes ``C``.
            project_channels, aspp_dilations, aspp_dropout, decoder_channels,
            common_stride, norm, use_depthwise_separable_conv: as in
                Detectron2's ``DeepLabV3PlusHead``. ``common_stride`` must be the
                smallest input stride (the decoder's output stride).
            in_features: the features to use (default: every entry of ``input_shape``).
            aspp_pooling: "global" (global average pooling in the ASPP image
                branch) or "crop" (Detectron2: an average pool the size of
                ``train_size / stride``; needs ``train_size``).
            train_size: ``(height, width)`` of the training crops, for "crop".
            dropout: dropout probability on the decoder output, before the classifier.
            classifier: called with the decoder's channels, returns the
                ``predictor`` (see :func:`pixel_classifier_builder`); None: a
                softmax 1x1 conv scoring anomalies by MSP.
            loss_weight: weight of the classification loss.
            loss_type: "cross_entropy" or "hard_pixel_mining" (Detectron2's
                ``DeepLabCE`` on the top 20 % hardest pixels).
            ignore_value: target value excluded from the losses.
        """
        if in_features is not None:
            missing = [f for f in in_features if f not in input_shape]
            if missing:
                raise ValueError(f"{type(self).__name__} input features {missing} are not backbone "
                                 f"outputs; available: {sorted(input_shape)}")
            input_shape = {f: input_shape[f] for f in in_features}
        if len(input_shape) < 1:
            raise ValueError(f"{type(self).__name__} needs at least one input feature")
        if aspp_pooling not in ASPP_POOLING_MODES:
            raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.ASPP_POOLING {aspp_pooling!r}; "
                             f"choose one of {ASPP_POOLING_MODES}")
        if aspp_pooling == "crop" and train_size is None:
            raise ValueError("ASPP_POOLING 'crop' needs the training crop size "
                             "(INPUT.CROP.ENABLED with an absolute INPUT.CROP.SIZE)")
        if loss_type not in DEEPLAB_LOSS_TYPES:
            raise ValueError(f"Unknown MODEL.SEM_SEG_HEAD.LOSS_TYPE {loss_type!r}; "
                             f"choose one of {DEEPLAB_LOSS_TYPES}")
        min_stride = min(shape.stride for shape in input_shape.values())
        if common_stride != min_stride:
            raise ValueError(f"MODEL.SEM_SEG_HEAD.COMMON_STRIDE ({common_stride}) must equal the "
                             f"stride of the decoder's output, the smallest input stride "
                             f"({min_stride})")

        # Detectron2's decoder: ASPP + low-level fusion, no predictor, no loss.
        super().__init__(
            input_shape,
            project_channels=list(project_channels),
            aspp_dilations=list(aspp_dilations),
            aspp_dropout=aspp_dropout,
            decoder_channels=list(decoder_channels),
            common_stride=common_stride,
            norm=norm,
            train_size=tuple(train_size) if aspp_pooling == "crop" else None,
            loss_weight=loss_weight,
            loss_type=loss_type,
            ignore_value=ignore_value,
            num_classes=None,
            use_depthwise_separable_conv=use_depthwise_separable_conv,
        )
        self.num_classes = num_classes
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        # Decoder features are at the smallest input stride (checked above).
        self.output_stride = common_stride
        classifier = classifier if classifier is not None else default_pixel_classifier(num_classes)
        self.predictor = classifier(decoder_channels[0])
        if loss_type == "cross_entropy":
            self.loss = nn.CrossEntropyLoss(reduction="mean", ignore_index=ignore_value)
        else:
            self.loss = DeepLabCE(ignore_label=ignore_value, top_k_percent_pixels=0.2)

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        if cfg.INPUT.CROP.ENABLED and cfg.INPUT.CROP.TYPE == "absolute":
            train_size = tuple(cfg.INPUT.CROP.SIZE)
        else:
            train_size = None
        # As Detectron2: CONVS_DIM channels for each low-level fusion stage,
        # ASPP_CHANNELS for the ASPP.
        decoder_channels = [head.CONVS_DIM] * (len(head.IN_FEATURES) - 1) + [head.ASPP_CHANNELS]
        return {
            "input_shape": input_shape,
            "in_features": list(head.IN_FEATURES),
            "num_classes": head.NUM_CLASSES,
            "project_channels": list(head.PROJECT_CHANNELS),
            "aspp_dilations": list(head.ASPP_DILATIONS),
            "aspp_dropout": head.ASPP_DROPOUT,
            "aspp_pooling": head.ASPP_POOLING,
            "train_size": train_size,
            "decoder_channels": decoder_channels,
            "common_stride": head.COMMON_STRIDE,
            "norm": head.NORM,
            "dropout": head.DROPOUT,
            "classifier": pixel_classifier_builder(cfg),
            "loss_weight": head.LOSS_WEIGHT,
            "loss_type": head.LOSS_TYPE,
            "ignore_value": head.IGNORE_VALUE,
            "use_depthwise_separable_conv": head.USE_DEPTHWISE_SEPARABLE_CONV,
        }

    def decoder_features(self, features: Dict[str, torch.Tensor]) -> torch.Tensor:
        """The decoder's output ``(B, decoder_channels[0], h, w)`` before dropout and classifier."""
        # Detectron2's ``layers`` in decoder-only mode returns the decoder feature.
        return super().layers(features)

    def forward(self, features: Dict[str, torch.Tensor], targets: Optional[torch.Tensor] = None
                ) -> Tuple[Optional[Dict[str, torch.Tensor]], Dict[str, torch.Tensor]]:
        """
        Args:
            features: backbone outputs, ``{name: (B, C_i, h_i, w_i)}``.
            targets: ``(B, H, W)`` int64 labels at the padded input size (training).
        """
        return self.predict(self.dropout(self.decoder_features(features)), targets)

    def losses(self, predictions: torch.Tensor, targets: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Classification loss of logits ``(B, C, h, w)`` upsampled to ``targets (B, H, W)``."""
        predictions = F.interpolate(predictions.float(), size=targets.shape[-2:], mode="bilinear",
                                    align_corners=False)
        return {"loss_sem_seg": self.loss(predictions, targets) * self.loss_weight}


#: Former name (configs' ``MODEL.SEM_SEG_HEAD.NAME: "GMMSegDeepLabV3PlusHead"``):
#: the same class, registered under both names.
GMMSegDeepLabV3PlusHead = DeepLabV3PlusClassifierHead
# fvcore's Registry.register() takes the name from __name__; the alias needs _do_register.
SEM_SEG_HEADS_REGISTRY._do_register("GMMSegDeepLabV3PlusHead", DeepLabV3PlusClassifierHead)
