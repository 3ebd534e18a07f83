"""Fixed 2-D sinusoidal position encoding (DETR / Mask2Former flavour).

The pixel decoder adds it to every encoder level and the transformer decoder
adds it to the memory it cross-attends to. The arithmetic (cumulative-sum
coordinates, optional normalisation to ``[0, scale]``, interleaved sin/cos,
``y`` channels before ``x`` channels) matches the official Mask2Former module
so that pretrained checkpoints see the encoding they were trained with.
"""
from __future__ import annotations

import math
from typing import Optional

import torch
from torch import nn

__all__ = ["PositionEmbeddingSine"]


class PositionEmbeddingSine(nn.Module):
    """Sine/cosine encoding of pixel coordinates, generalised to images.

    Args:
        num_pos_feats: channels per axis; the output has ``2 * num_pos_feats``
            channels (``y`` first, then ``x``). Mask2Former uses ``hidden_dim // 2``.
        temperature: base of the geometric frequency progression.
        normalize: rescale the (1-based) coordinates so the last valid pixel of
            each row/column maps to ``scale``; makes the encoding resolution
            independent.
        scale: upper end of the normalised range, default ``2 * pi``. Only
            meaningful with ``normalize=True``.

    The module has no parameters and no buffers, so it contributes nothing to a
    state dict.
    """

    def __init__(
        self,
        num_pos_feats: int = 64,
        temperature: int = 10000,
        normalize: bool = False,
        scale: Optional[float] = None,
    ):
        super().__init__()
        if scale is not None and not normalize:
            raise ValueError(
                "PositionEmbeddingSine: `scale` is only used when normalize=True; "
                "pass normalize=True or drop `scale`."
            )
        if num_pos_feats <= 0:
            raise ValueError(f"PositionEmbeddingSine: num_pos_feats must be positive, got {num_pos_feats}.")
        self.num_pos_feats = num_pos_feats
        self.temperature = temperature
        self.normalize = normalize
        self.scale = 2 * math.pi if scale is None else scale

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """Encode the positions of a feature map.

        Args:
            x: features ``(N, C, H, W)``; only its shape and device are used.
            mask: optional padding mask ``(N, H, W)``, True where a pixel is
                padding. Padded pixels do not advance the coordinate counters.

        Returns:
            Float32 encoding ``(N, 2 * num_pos_feats, H, W)``.
        """
        if x.dim() != 4:
            raise ValueError(f"PositionEmbeddingSine expects (N, C, H, W) features, got shape {tuple(x.shape)}.")
        if mask is None:
            mask = torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool)
        valid = ~mask
        # 1-based row / column index of every valid pixel, counted in float32
        # regardless of the feature dtype (as the reference does).
        y_pos = valid.cumsum(1, dtype=torch.float32)
        x_pos = valid.cumsum(2, dtype=torch.float32)
        if self.normalize:
            eps = 1e-6
            y_pos = y_pos / (y_pos[:, -1:, :] + eps) * self.scale
            x_pos = x_pos / (x_pos[:, :, -1:] + eps) * self.scale

        # Channel pairs (2i, 2i+1) share the frequency temperature^(2i / F).
        channel = torch.arange(self.num_pos_feats, dtype=torch.float32, device=x.device)
        inv_freq_denominator = self.temperature ** (2 * (channel // 2) / self.num_pos_feats)

        angle_x = x_pos[..., None] / inv_freq_denominator  # (N, H, W, F)
        angle_y = y_pos[..., None] / inv_freq_denominator
        # Even channels take sin, odd channels cos, interleaved back in order.
        enc_x = torch.stack((angle_x[..., 0::2].sin(), angle_x[..., 1::2].cos()), dim=4).flatten(3)
        enc_y = torch.stack((angle_y[..., 0::2].sin(), angle_y[..., 1::2].cos()), dim=4).flatten(3)
        return torch.cat((enc_y, enc_x), dim=3).permute(0, 3, 1, 2)

    def extra_repr(self) -> str:
        return (
            f"num_pos_feats={self.num_pos_feats}, temperature={self.temperature}, "
            f"normalize={self.normalize}, scale={self.scale}"
        )
