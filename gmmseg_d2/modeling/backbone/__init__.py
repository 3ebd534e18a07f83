from .mit import MIT_VARIANTS, D2MixVisionTransformer, MixVisionTransformer
from .resnet_dilated import build_resnet_dilated_backbone, DilatedBasicBlock
from .swin import D2SwinTransformer, SwinTransformer

__all__ = [
    "build_resnet_dilated_backbone", "DilatedBasicBlock", "D2MixVisionTransformer", "D2SwinTransformer",
    "MIT_VARIANTS", "MixVisionTransformer", "SwinTransformer",
]
