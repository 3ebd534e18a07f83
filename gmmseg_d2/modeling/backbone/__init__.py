from .resnet_dilated import build_resnet_dilated_backbone, DilatedBasicBlock

__all__ = ["build_resnet_dilated_backbone", "DilatedBasicBlock"]
