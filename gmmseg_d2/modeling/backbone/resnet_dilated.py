"""Detectron2 ResNet with DeepLab-style dilation, for every depth.

Detectron2's DeepLab project builds dilated ResNets only for the bottleneck
depths (50/101/152). Per-pixel segmentation on small inputs (the mosaic
demo) wants dilated ResNet-18/34 too, so this builder adds them with
:class:`DilatedBasicBlock` and delegates the bottleneck depths to
``detectron2.projects.deeplab.build_resnet_deeplab_backbone`` unchanged.
Parameter names are Detectron2's, so its converted ImageNet checkpoints load.
"""
from typing import List

from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.backbone.resnet import BasicBlock, BasicStem, ResNet
from detectron2.projects.deeplab.resnet import DeepLabStem, build_resnet_deeplab_backbone

__all__ = ["DilatedBasicBlock", "build_resnet_dilated_backbone"]

_BASIC_BLOCKS_PER_STAGE = {18: [2, 2, 2, 2], 34: [3, 4, 6, 3]}


class DilatedBasicBlock(BasicBlock):
    """Detectron2's :class:`BasicBlock` with both 3x3 convs dilated.

    Padding equals the dilation so the spatial size only changes by ``stride``.
    The module tree is exactly ``BasicBlock``'s (``conv1``, ``conv2``,
    ``shortcut``), which keeps checkpoints interchangeable.
    """

    def __init__(self, in_channels: int, out_channels: int, *, stride: int = 1,
                 norm: str = "BN", dilation: int = 1):
        super().__init__(in_channels, out_channels, stride=stride, norm=norm)
        for conv in (self.conv1, self.conv2):
            conv.dilation = (dilation, dilation)
            conv.padding = (dilation, dilation)


def _stage_dilations(res4_dilation: int, res5_dilation: int, last_stage: int) -> List[int]:
    if res4_dilation not in (1, 2):
        raise ValueError(f"MODEL.RESNETS.RES4_DILATION must be 1 or 2, got {res4_dilation}")
    if res5_dilation not in (1, 2, 4):
        raise ValueError(f"MODEL.RESNETS.RES5_DILATION must be 1, 2 or 4, got {res5_dilation}")
    if res4_dilation == 2 and res5_dilation != 4 and last_stage == 5:
        # As Detectron2's DeepLab builder: a dilated res4 needs res5 dilated
        # by 4 to keep the output stride at 8. Without res5 there is no conflict.
        raise ValueError("RES4_DILATION=2 requires RES5_DILATION=4 (output stride 8)")
    return [1, 1, res4_dilation, res5_dilation]


@BACKBONE_REGISTRY.register()
def build_resnet_dilated_backbone(cfg, input_shape: ShapeSpec) -> Backbone:
    """ResNet-18/34/50/101/152 with optional dilation of res4/res5.

    Reads the same keys as Detectron2's ResNet and DeepLab builders
    (``MODEL.RESNETS.DEPTH``, ``RES4_DILATION``, ``RES5_DILATION``,
    ``STEM_TYPE``, ``NORM``, ``OUT_FEATURES``, ``MODEL.BACKBONE.FREEZE_AT``).
    """
    depth = cfg.MODEL.RESNETS.DEPTH
    if depth not in _BASIC_BLOCKS_PER_STAGE:
        return build_resnet_deeplab_backbone(cfg, input_shape)

    norm = cfg.MODEL.RESNETS.NORM
    stem_cls = {"basic": BasicStem, "deeplab": DeepLabStem}.get(cfg.MODEL.RESNETS.STEM_TYPE)
    if stem_cls is None:
        raise ValueError(f"Unknown MODEL.RESNETS.STEM_TYPE {cfg.MODEL.RESNETS.STEM_TYPE!r}; "
                         "use 'basic' or 'deeplab'")
    stem = stem_cls(in_channels=input_shape.channels,
                    out_channels=cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, norm=norm)
    if cfg.MODEL.RESNETS.RES2_OUT_CHANNELS != 64:
        raise ValueError("ResNet-18/34 need MODEL.RESNETS.RES2_OUT_CHANNELS = 64")
    if any(cfg.MODEL.RESNETS.DEFORM_ON_PER_STAGE):
        raise ValueError("Deformable convolutions need detectron2._C and are not supported")

    out_features = cfg.MODEL.RESNETS.OUT_FEATURES
    last_stage = max({"res2": 2, "res3": 3, "res4": 4, "res5": 5}[f] for f in out_features)
    dilations = _stage_dilations(cfg.MODEL.RESNETS.RES4_DILATION, cfg.MODEL.RESNETS.RES5_DILATION,
                                 last_stage)

    stages = []
    in_channels, out_channels = cfg.MODEL.RESNETS.STEM_OUT_CHANNELS, 64
    for index, stage in enumerate(range(2, last_stage + 1)):
        dilation = dilations[index]
        # The first stage keeps the stem's stride; dilated stages replace
        # their stride by the dilation.
        first_stride = 1 if index == 0 or dilation > 1 else 2
        num_blocks = _BASIC_BLOCKS_PER_STAGE[depth][index]
        stages.append(ResNet.make_stage(
            block_class=DilatedBasicBlock, num_blocks=num_blocks,
            stride_per_block=[first_stride] + [1] * (num_blocks - 1),
            in_channels=in_channels, out_channels=out_channels, norm=norm, dilation=dilation,
        ))
        in_channels, out_channels = out_channels, out_channels * 2
    return ResNet(stem, stages, out_features=out_features).freeze(cfg.MODEL.BACKBONE.FREEZE_AT)
