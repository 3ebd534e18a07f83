"""Stage II of GSS: the latent prior (image features → VQ-VAE code logits) and the unlabeled-area branch."""
from typing import List, Sequence

import torch
from detectron2.layers import Conv2d, get_norm
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from gmmseg_d2.modeling.backbone.swin import BasicLayer

__all__ = ["LatentPrior", "UnlabeledAreaHead", "fuse_levels"]


def _conv_norm_relu(in_dim: int, out_dim: int, norm: str) -> Conv2d:
    return Conv2d(in_dim, out_dim, 1, bias=not norm, norm=get_norm(norm, out_dim), activation=nn.ReLU())


def fuse_levels(features: Sequence[torch.Tensor], projections: nn.ModuleList, fusion: nn.Module,
                grid_level: int) -> torch.Tensor:
    """Project each level ``(N, C_l, H_l, W_l)``, resize to level ``grid_level``'s size, concatenate, fuse."""
    size = features[grid_level].shape[-2:]
    projected = [F.interpolate(projection(feature), size=size, mode="bilinear", align_corners=False)
                 for projection, feature in zip(projections, features)]
    return fusion(torch.cat(projected, dim=1))


class LatentPrior(nn.Module):
    """Backbone features → code logits ``(N, vocab, H_0, W_0)`` on the finest level's grid (the paper's MLA).

    Each level: 1×1 conv to ``level_dim`` (norm + ReLU), resized to level 0
    (stride 4), concatenated, 1×1 conv to ``embed_dim`` (norm + ReLU); Swin
    blocks (alternating plain / shifted windows) and a LayerNorm; 1×1 conv to
    ``hidden_dim`` (norm + ReLU), Dropout2d, 1×1 conv to the VQ-VAE's codes
    (official ``GenerativeSegHeadFF``: 384, 512, 16 heads, window 7, FFN 1024, 2048, 0.1).
    """

    def __init__(self, in_channels: Sequence[int], vocab_size: int, level_dim: int = 384, embed_dim: int = 512,
                 swin_depth: int = 2, swin_heads: int = 16, swin_window: int = 7, swin_mlp_ratio: float = 2.0,
                 hidden_dim: int = 2048, dropout: float = 0.1, norm: str = "BN"):
        super().__init__()
        self.projections = nn.ModuleList([_conv_norm_relu(dim, level_dim, norm) for dim in in_channels])
        self.fusion = _conv_norm_relu(level_dim * len(in_channels), embed_dim, norm)
        self.blocks = BasicLayer(embed_dim, swin_depth, swin_heads, window_size=swin_window,
                                 mlp_ratio=swin_mlp_ratio, qkv_bias=True)
        self.norm = nn.LayerNorm(embed_dim)
        self.hidden = _conv_norm_relu(embed_dim, hidden_dim, norm)
        self.dropout = nn.Dropout2d(dropout) if dropout > 0 else nn.Identity()
        self.classifier = nn.Conv2d(hidden_dim, vocab_size, 1)
        nn.init.normal_(self.classifier.weight, std=0.01)  # official conv_seg init
        nn.init.zeros_(self.classifier.bias)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        x = fuse_levels(features, self.projections, self.fusion, grid_level=0)
        height, width = x.shape[-2:]
        tokens = self.blocks(rearrange(x, "n c h w -> n (h w) c"), height, width)[0]
        x = rearrange(self.norm(tokens), "n (h w) c -> n c h w", h=height, w=width)
        return self.classifier(self.dropout(self.hidden(x)))


class UnlabeledAreaHead(nn.Module):
    """The unlabeled-area auxiliary: features → class logits ``(N, K, H_g, W_g)`` on level ``grid_level``'s grid.

    1×1 conv per level to ``dim`` (norm + ReLU), resize, concatenate, 1×1 conv
    to ``dim`` (norm + ReLU), 1×1 conv to K (official ``convs_pixel``,
    ``fusion_conv_pixel``, ``conv_seg_pixel``).
    """

    def __init__(self, in_channels: Sequence[int], num_classes: int, dim: int = 384, grid_level: int = 0,
                 norm: str = "BN"):
        super().__init__()
        if not 0 <= grid_level < len(in_channels):
            raise ValueError(f"MODEL.GSS.AUX.GRID_LEVEL {grid_level} is not an index of the "
                             f"{len(in_channels)} features of MODEL.GSS.IN_FEATURES")
        self.grid_level = grid_level
        self.projections = nn.ModuleList([_conv_norm_relu(in_dim, dim, norm) for in_dim in in_channels])
        self.fusion = _conv_norm_relu(dim * len(in_channels), dim, norm)
        self.classifier = nn.Conv2d(dim, num_classes, 1)

    def forward(self, features: List[torch.Tensor]) -> torch.Tensor:
        return self.classifier(fuse_levels(features, self.projections, self.fusion, self.grid_level))
