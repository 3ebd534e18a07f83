"""The posterior ``X⁻¹``: a (decoded, noisy) maskige back to class scores.

Every variant maps a maskige ``(N, 3, H, W)`` in [0, 1] to scores
``(N, K, H, W)`` whose argmax is the class map; ``trainable`` says whether it
learns (in ``MODEL.GSS.TRAIN_STAGE "posterior"``) or is fixed by the palette.
"""
from typing import Dict, Type

import torch
from detectron2.layers import Conv2d, get_norm
from einops import rearrange
from torch import nn
from torch.nn import functional as F

from gmmseg_d2.modeling.backbone.swin import BasicLayer

__all__ = [
    "INVERSES", "ConvInverse", "LeastSquaresInverse", "MaskigeInverse", "NearestColourInverse", "SwinInverse",
    "build_inverse",
]


class MaskigeInverse(nn.Module):
    """Base class: ``forward(maskige (N, 3, H, W)) -> scores (N, K, H, W)``."""

    trainable: bool = False

    def __init__(self, palette: torch.Tensor):
        """``palette``: ``(K + 1, 3)`` in [0, 1], the last row the ignore colour."""
        super().__init__()
        self.num_classes = palette.shape[0] - 1


class NearestColourInverse(MaskigeInverse):
    """GSS-FF as the official code runs it: each pixel takes the class of the nearest palette colour.

    The ignore colour is no candidate. Scores are the one-hot of that class
    (official), so resizing them afterwards averages votes, not distances.
    """

    def __init__(self, palette: torch.Tensor):
        super().__init__(palette)
        self.register_buffer("class_colours", palette[:-1].clone())

    def forward(self, maskige: torch.Tensor) -> torch.Tensor:
        # |x - c|² = |x|² - 2 x·c + |c|²; |x|² is the same for every class.
        cross = torch.einsum("nchw,kc->nkhw", maskige, self.class_colours)
        squared_norms = (self.class_colours ** 2).sum(1)[None, :, None, None]
        nearest = (squared_norms - 2 * cross).argmin(1)
        return F.one_hot(nearest, self.num_classes).permute(0, 3, 1, 2).to(maskige.dtype)


class LeastSquaresInverse(MaskigeInverse):
    """The paper's GSS-FF formula: scores ``x·β†`` with ``β†`` the pseudo-inverse of the ``K × 3`` palette.

    As printed, ``β† = βᵀ(ββᵀ)⁻¹``, which is singular for ``K > 3`` (``ββᵀ`` has
    rank 3); its least-squares reading is the Moore-Penrose pseudo-inverse,
    ``(3, K)``. The map has rank 3, so a clean maskige of class ``k`` scores
    ``(β β†)_k``, whose argmax need not be ``k``: its accuracy is measured
    (tests, BENCHMARKS.md), not assumed.
    """

    def __init__(self, palette: torch.Tensor):
        super().__init__(palette)
        self.register_buffer("pseudo_inverse", torch.linalg.pinv(palette[:-1].double()).float())  # (3, K)

    def forward(self, maskige: torch.Tensor) -> torch.Tensor:
        return torch.einsum("nchw,ck->nkhw", maskige, self.pseudo_inverse)


class ConvInverse(MaskigeInverse):
    """GSS-FT (the paper; the official code has none): 1×1, 3×3, 1×1 convolutions.

    ``3 → dim`` (norm + ReLU), ``dim → dim`` 3×3 (norm + ReLU), ``dim → K``.
    The paper names only the kernel sizes; the norms are ours (BN, as every
    other block of the model).
    """

    trainable = True

    def __init__(self, palette: torch.Tensor, dim: int = 128, norm: str = "BN"):
        super().__init__(palette)
        self.layers = nn.Sequential(
            Conv2d(3, dim, 1, bias=not norm, norm=get_norm(norm, dim), activation=nn.ReLU()),
            Conv2d(dim, dim, 3, padding=1, bias=not norm, norm=get_norm(norm, dim), activation=nn.ReLU()),
            Conv2d(dim, self.num_classes, 1),
        )

    def forward(self, maskige: torch.Tensor) -> torch.Tensor:
        return self.layers(maskige)


class SwinInverse(MaskigeInverse):
    """GSS-FT-W (official ``GenerativeSegHeadFTW``): 1×1 conv ``3 → dim`` (norm + ReLU), Swin blocks, LN, 1×1 to K.

    Swin blocks: ``depth`` of them, alternating plain and shifted windows,
    ``heads`` heads, FFN ``mlp_ratio·dim`` (official: 128 dims, 4 heads,
    window 7, FFN 256; depth 2 on ADE20K, 1 on Cityscapes).
    """

    trainable = True

    def __init__(self, palette: torch.Tensor, dim: int = 128, depth: int = 2, heads: int = 4, window: int = 7,
                 mlp_ratio: float = 2.0, norm: str = "BN"):
        super().__init__(palette)
        self.projection = Conv2d(3, dim, 1, bias=not norm, norm=get_norm(norm, dim), activation=nn.ReLU())
        self.blocks = BasicLayer(dim, depth, heads, window_size=window, mlp_ratio=mlp_ratio, qkv_bias=True)
        self.norm = nn.LayerNorm(dim)
        self.classifier = nn.Conv2d(dim, self.num_classes, 1)

    def forward(self, maskige: torch.Tensor) -> torch.Tensor:
        x = self.projection(maskige)
        height, width = x.shape[-2:]
        tokens = self.blocks(rearrange(x, "n c h w -> n (h w) c"), height, width)[0]
        x = rearrange(self.norm(tokens), "n (h w) c -> n c h w", h=height, w=width)
        return self.classifier(x)


INVERSES: Dict[str, Type[MaskigeInverse]] = {
    "nearest": NearestColourInverse,
    "least_squares": LeastSquaresInverse,
    "conv": ConvInverse,
    "swin": SwinInverse,
}


def build_inverse(cfg, palette: torch.Tensor) -> MaskigeInverse:
    """``MODEL.GSS.INVERSE`` → the posterior module (``palette``: ``(K + 1, 3)`` in [0, 1])."""
    spec = cfg.MODEL.GSS.INVERSE
    if spec.NAME not in INVERSES:
        raise ValueError(f"Unknown MODEL.GSS.INVERSE.NAME {spec.NAME!r}; choose one of {sorted(INVERSES)}")
    if spec.NAME == "conv":
        return ConvInverse(palette, dim=spec.DIM, norm=cfg.MODEL.GSS.PRIOR.NORM)
    if spec.NAME == "swin":
        return SwinInverse(palette, dim=spec.DIM, depth=spec.SWIN_DEPTH, heads=spec.SWIN_HEADS,
                           window=spec.SWIN_WINDOW, mlp_ratio=spec.SWIN_MLP_RATIO, norm=cfg.MODEL.GSS.PRIOR.NORM)
    return INVERSES[spec.NAME](palette)
