"""Mask2Former's pixel decoder: a deformable-attention encoder over the coarse
backbone levels, then an FPN-style top-down path to the mask-feature stride.

Module and parameter names follow the official implementation so its
checkpoints load under ``sem_seg_head.pixel_decoder.`` unchanged:

- ``input_proj.{i}.{0,1}``: 1x1 conv + GroupNorm(32) per encoder level, ``i = 0``
  the *coarsest* level;
- ``transformer.level_embed`` and ``transformer.encoder.layers.{k}.*``
  (``self_attn`` = :class:`MSDeformAttn`, ``norm1``, ``linear1``, ``linear2``, ``norm2``);
- ``adapter_{j}`` / ``layer_{j}``: lateral 1x1 and output 3x3 convs of the extra
  FPN levels, ``j = 1`` the finest backbone level;
- ``mask_features``: the final 1x1 conv.
"""
from __future__ import annotations

import contextlib
import copy
import math
from typing import Callable, Dict, List, Optional, Tuple, Union

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from detectron2.config import configurable
from detectron2.layers import Conv2d, ShapeSpec, get_norm
from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

from ..transformer_decoder.position_encoding import PositionEmbeddingSine
from .deformable_attention_op import MSDeformAttn

__all__ = [
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "MSDeformAttnTransformerEncoderLayer",
    "MSDeformAttnTransformerEncoder",
    "build_pixel_decoder",
]


def build_pixel_decoder(cfg, input_shape: Dict[str, ShapeSpec]) -> nn.Module:
    """Build ``cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME`` from ``SEM_SEG_HEADS_REGISTRY``.

    A pixel decoder must provide ``forward_features(features) ->
    (mask_features, transformer_encoder_features, multi_scale_features)``.
    """
    name = cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME
    model = SEM_SEG_HEADS_REGISTRY.get(name)(cfg, input_shape)
    if not callable(getattr(model, "forward_features", None)):
        raise ValueError(
            f"MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME={name!r} has no forward_features() method; "
            "only heads returning (mask_features, encoder_features, multi_scale_features) "
            "from forward_features can serve as pixel decoders."
        )
    return model


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    functions = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if name not in functions:
        raise ValueError(f"Unknown activation {name!r}; choose one of {sorted(functions)}.")
    return functions[name]


class MSDeformAttnTransformerEncoderLayer(nn.Module):
    """Post-norm encoder layer: deformable self-attention, then a 2-layer FFN.

    Args:
        d_model: token channels ``C``.
        d_ffn: hidden width of the FFN.
        dropout: dropout after attention, inside and after the FFN.
        activation: FFN non-linearity ("relu", "gelu" or "glu").
        n_levels, n_heads, n_points: see :class:`MSDeformAttn`.
    """

    def __init__(
        self,
        d_model: int = 256,
        d_ffn: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
    ):
        super().__init__()
        self.self_attn = MSDeformAttn(d_model, n_levels, n_heads, n_points)
        self.dropout1 = nn.Dropout(dropout)
        self.norm1 = nn.LayerNorm(d_model)

        self.linear1 = nn.Linear(d_model, d_ffn)
        self.activation = _activation(activation)
        self.dropout2 = nn.Dropout(dropout)
        self.linear2 = nn.Linear(d_ffn, d_model)
        self.dropout3 = nn.Dropout(dropout)
        self.norm2 = nn.LayerNorm(d_model)

    def forward(
        self,
        src: torch.Tensor,
        pos: Optional[torch.Tensor],
        reference_points: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``src``/``pos``: ``(N, S, C)``; ``reference_points``: ``(N, S, L, 2)``. Returns ``(N, S, C)``."""
        # Positions go into the query only; the values are the raw tokens.
        query = src if pos is None else src + pos
        attended = self.self_attn(query, reference_points, src, spatial_shapes, level_start_index, padding_mask)
        src = self.norm1(src + self.dropout1(attended))
        hidden = self.linear2(self.dropout2(self.activation(self.linear1(src))))
        return self.norm2(src + self.dropout3(hidden))


class MSDeformAttnTransformerEncoder(nn.Module):
    """``num_layers`` deep copies of ``encoder_layer`` applied in sequence."""

    def __init__(self, encoder_layer: MSDeformAttnTransformerEncoderLayer, num_layers: int):
        super().__init__()
        self.layers = nn.ModuleList([copy.deepcopy(encoder_layer) for _ in range(num_layers)])
        self.num_layers = num_layers

    @staticmethod
    def get_reference_points(
        spatial_shapes: Union[torch.Tensor, List[Tuple[int, int]]], valid_ratios: torch.Tensor, device
    ) -> torch.Tensor:
        """Pixel centres of every level as normalised ``(x, y)``, replicated per level.

        Args:
            spatial_shapes: ``(L, 2)`` level sizes ``(H_l, W_l)``.
            valid_ratios: ``(N, L, 2)`` fraction ``(w, h)`` of each level that is
                not padding.

        Returns:
            ``(N, S, L, 2)``: for each token, its centre normalised by the valid
            extent of its own level, then rescaled to every level's valid extent.
        """
        per_level = []
        for level, (height, width) in enumerate(spatial_shapes):
            height, width = int(height), int(width)
            centre_y, centre_x = torch.meshgrid(
                torch.linspace(0.5, height - 0.5, height, dtype=torch.float32, device=device),
                torch.linspace(0.5, width - 0.5, width, dtype=torch.float32, device=device),
                indexing="ij",
            )
            ref_y = centre_y.reshape(-1)[None] / (valid_ratios[:, None, level, 1] * height)
            ref_x = centre_x.reshape(-1)[None] / (valid_ratios[:, None, level, 0] * width)
            per_level.append(torch.stack((ref_x, ref_y), -1))
        reference_points = torch.cat(per_level, 1)
        return reference_points[:, :, None] * valid_ratios[:, None]

    def forward(
        self,
        src: torch.Tensor,
        spatial_shapes: torch.Tensor,
        level_start_index: torch.Tensor,
        valid_ratios: torch.Tensor,
        pos: Optional[torch.Tensor] = None,
        padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """``src``/``pos``: ``(N, S, C)``; ``valid_ratios``: ``(N, L, 2)``. Returns ``(N, S, C)``."""
        reference_points = self.get_reference_points(spatial_shapes, valid_ratios, device=src.device)
        output = src
        for layer in self.layers:
            output = layer(output, pos, reference_points, spatial_shapes, level_start_index, padding_mask)
        return output


class MSDeformAttnTransformerEncoderOnly(nn.Module):
    """Deformable DETR's encoder over a list of feature maps (no decoder).

    Args:
        d_model: channels of the (already projected) inputs.
        nhead, num_encoder_layers, dim_feedforward, dropout, activation: encoder shape.
        num_feature_levels: number of input maps ``L``.
        enc_n_points: sampling points per head and level.
    """

    def __init__(
        self,
        d_model: int = 256,
        nhead: int = 8,
        num_encoder_layers: int = 6,
        dim_feedforward: int = 1024,
        dropout: float = 0.1,
        activation: str = "relu",
        num_feature_levels: int = 4,
        enc_n_points: int = 4,
    ):
        super().__init__()
        self.d_model = d_model
        self.nhead = nhead
        layer = MSDeformAttnTransformerEncoderLayer(
            d_model, dim_feedforward, dropout, activation, num_feature_levels, nhead, enc_n_points
        )
        self.encoder = MSDeformAttnTransformerEncoder(layer, num_encoder_layers)
        self.level_embed = nn.Parameter(torch.empty(num_feature_levels, d_model))
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Xavier for every matrix first, then MSDeformAttn's own scheme wins for
        # its layers (the xavier pass would otherwise erase the offset pattern).
        for p in self.parameters():
            if p.dim() > 1:
                nn.init.xavier_uniform_(p)
        for m in self.modules():
            if isinstance(m, MSDeformAttn):
                m._reset_parameters()
        nn.init.normal_(self.level_embed)

    @staticmethod
    def get_valid_ratio(mask: torch.Tensor) -> torch.Tensor:
        """``(N, H, W)`` padding mask -> ``(N, 2)`` valid fractions ``(w, h)``."""
        _, height, width = mask.shape
        valid_h = torch.sum(~mask[:, :, 0], 1)
        valid_w = torch.sum(~mask[:, 0, :], 1)
        return torch.stack([valid_w.float() / width, valid_h.float() / height], -1)

    def forward(
        self, srcs: List[torch.Tensor], pos_embeds: List[torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """
        Args:
            srcs: ``L`` maps ``(N, C, H_l, W_l)``.
            pos_embeds: their position encodings, same shapes.

        Returns:
            memory ``(N, S, C)`` (levels flattened in input order),
            spatial_shapes ``(L, 2)`` int64, level_start_index ``(L,)`` int64.
        """
        if len(srcs) != self.level_embed.shape[0]:
            raise ValueError(
                f"Encoder built for {self.level_embed.shape[0]} feature levels, got {len(srcs)} maps."
            )
        # Inputs are never padded here (the backbone sees padded images already),
        # so the padding masks are all False and the valid ratios all 1.
        masks = [torch.zeros((x.size(0), x.size(2), x.size(3)), device=x.device, dtype=torch.bool) for x in srcs]
        tokens, token_pos, token_masks, shapes = [], [], [], []
        for level, (src, mask, pos) in enumerate(zip(srcs, masks, pos_embeds)):
            shapes.append(tuple(src.shape[-2:]))
            tokens.append(rearrange(src, "n c h w -> n (h w) c"))
            token_masks.append(mask.flatten(1))
            token_pos.append(rearrange(pos, "n c h w -> n (h w) c") + self.level_embed[level].view(1, 1, -1))
        src_flatten = torch.cat(tokens, 1)
        mask_flatten = torch.cat(token_masks, 1)
        pos_flatten = torch.cat(token_pos, 1)
        spatial_shapes = torch.as_tensor(shapes, dtype=torch.long, device=src_flatten.device)
        level_start_index = torch.cat((spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1]))
        valid_ratios = torch.stack([self.get_valid_ratio(m) for m in masks], 1)

        memory = self.encoder(src_flatten, spatial_shapes, level_start_index, valid_ratios, pos_flatten, mask_flatten)
        return memory, spatial_shapes, level_start_index


@SEM_SEG_HEADS_REGISTRY.register()
class MSDeformAttnPixelDecoder(nn.Module):
    """Multi-scale deformable-attention pixel decoder of Mask2Former.

    The ``transformer_in_features`` (e.g. res3..res5) are projected to
    ``conv_dim`` and refined jointly by the deformable encoder; the remaining
    finer inputs (down to ``common_stride``) are merged top-down FPN-style
    (lateral 1x1 conv + bilinear upsampling + 3x3 conv); a 1x1 conv on the
    finest map gives the mask features.
    """

    @configurable
    def __init__(
        self,
        input_shape: Dict[str, ShapeSpec],
        *,
        transformer_dropout: float,
        transformer_nheads: int,
        transformer_dim_feedforward: int,
        transformer_enc_layers: int,
        conv_dim: int,
        mask_dim: int,
        norm: Optional[Union[str, Callable]] = None,
        transformer_in_features: List[str],
        common_stride: int,
    ):
        """
        Args:
            input_shape: channels and stride of every backbone feature used.
            transformer_dropout: dropout in the encoder layers.
            transformer_nheads: attention heads of the encoder.
            transformer_dim_feedforward: FFN width of the encoder layers.
            transformer_enc_layers: number of encoder layers.
            conv_dim: channels of the encoder and the FPN convs (multiple of 32,
                the input projections use GroupNorm(32)).
            mask_dim: channels of the mask features.
            norm: normalisation of the FPN convs ("GN" in Mask2Former, "" for none).
            transformer_in_features: the inputs the encoder attends over
                (a subset of ``input_shape``).
            common_stride: stride of the mask features; FPN levels are added
                from the encoder's finest stride down to this one.
        """
        super().__init__()
        missing = [f for f in transformer_in_features if f not in input_shape]
        if missing:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: encoder inputs {missing} are not among the decoder inputs "
                f"{sorted(input_shape)}; check MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES "
                "against MODEL.SEM_SEG_HEAD.IN_FEATURES."
            )
        if conv_dim % 32 != 0:
            raise ValueError(f"MSDeformAttnPixelDecoder: conv_dim must be a multiple of 32 (GroupNorm(32)), got {conv_dim}.")

        # All inputs and the encoder inputs, each ordered fine -> coarse.
        by_stride = sorted(input_shape.items(), key=lambda kv: kv[1].stride)
        self.in_features = [name for name, _ in by_stride]
        self.feature_strides = [spec.stride for _, spec in by_stride]
        self.feature_channels = [spec.channels for _, spec in by_stride]
        encoder_inputs = [(name, spec) for name, spec in by_stride if name in transformer_in_features]
        self.transformer_in_features = [name for name, _ in encoder_inputs]
        encoder_in_channels = [spec.channels for _, spec in encoder_inputs]
        self.transformer_feature_strides = [spec.stride for _, spec in encoder_inputs]
        self.transformer_num_feature_levels = len(self.transformer_in_features)

        # One projection per encoder level, coarse -> fine (index 0 = coarsest).
        self.input_proj = nn.ModuleList(
            nn.Sequential(nn.Conv2d(in_channels, conv_dim, kernel_size=1), nn.GroupNorm(32, conv_dim))
            for in_channels in encoder_in_channels[::-1]
        )
        for proj in self.input_proj:
            nn.init.xavier_uniform_(proj[0].weight, gain=1)
            nn.init.constant_(proj[0].bias, 0)

        self.transformer = MSDeformAttnTransformerEncoderOnly(
            d_model=conv_dim,
            dropout=transformer_dropout,
            nhead=transformer_nheads,
            dim_feedforward=transformer_dim_feedforward,
            num_encoder_layers=transformer_enc_layers,
            num_feature_levels=self.transformer_num_feature_levels,
        )
        self.pe_layer = PositionEmbeddingSine(conv_dim // 2, normalize=True)

        self.mask_dim = mask_dim
        self.mask_features = Conv2d(conv_dim, mask_dim, kernel_size=1, stride=1, padding=0)
        weight_init.c2_xavier_fill(self.mask_features)

        # The transformer decoder always consumes the 3 coarsest outputs.
        self.maskformer_num_feature_levels = 3
        self.common_stride = common_stride

        finest_encoder_stride = min(self.transformer_feature_strides)
        self.num_fpn_levels = int(round(math.log2(finest_encoder_stride) - math.log2(common_stride)))
        if self.num_fpn_levels < 0 or self.num_fpn_levels > len(self.in_features) - self.transformer_num_feature_levels:
            raise ValueError(
                f"MSDeformAttnPixelDecoder: common_stride {common_stride} needs {self.num_fpn_levels} FPN levels "
                f"below the encoder's finest stride {finest_encoder_stride}, but the inputs are "
                f"{dict(zip(self.in_features, self.feature_strides))}."
            )

        # Norm layers carry the affine shift, so the convs drop their bias.
        use_bias = norm == ""
        lateral_convs, output_convs = [], []
        for idx, in_channels in enumerate(self.feature_channels[: self.num_fpn_levels]):
            lateral_conv = Conv2d(in_channels, conv_dim, kernel_size=1, bias=use_bias, norm=get_norm(norm, conv_dim))
            output_conv = Conv2d(
                conv_dim, conv_dim, kernel_size=3, stride=1, padding=1, bias=use_bias,
                norm=get_norm(norm, conv_dim), activation=F.relu,
            )
            weight_init.c2_xavier_fill(lateral_conv)
            weight_init.c2_xavier_fill(output_conv)
            self.add_module(f"adapter_{idx + 1}", lateral_conv)
            self.add_module(f"layer_{idx + 1}", output_conv)
            lateral_convs.append(lateral_conv)
            output_convs.append(output_conv)
        # Plain lists on purpose: the convs are registered once above, under the
        # checkpoint names; a ModuleList would add a second set of state-dict keys.
        # Ordered coarse -> fine for the top-down pass.
        self.lateral_convs = lateral_convs[::-1]
        self.output_convs = output_convs[::-1]

    @classmethod
    def from_config(cls, cfg, input_shape: Dict[str, ShapeSpec]):
        head = cfg.MODEL.SEM_SEG_HEAD
        return {
            "input_shape": {k: v for k, v in input_shape.items() if k in head.IN_FEATURES},
            "conv_dim": head.CONVS_DIM,
            "mask_dim": head.MASK_DIM,
            "norm": head.NORM,
            "transformer_dropout": cfg.MODEL.MASK_FORMER.DROPOUT,
            "transformer_nheads": cfg.MODEL.MASK_FORMER.NHEADS,
            # Fixed in the official code; MASK_FORMER.DIM_FEEDFORWARD is the
            # transformer *decoder's* width and does not apply here.
            "transformer_dim_feedforward": 1024,
            "transformer_enc_layers": head.TRANSFORMER_ENC_LAYERS,
            "transformer_in_features": list(head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES),
            "common_stride": head.COMMON_STRIDE,
        }

    def forward_features(
        self, features: Dict[str, torch.Tensor]
    ) -> Tuple[torch.Tensor, torch.Tensor, List[torch.Tensor]]:
        """
        Args:
            features: backbone maps ``name -> (N, C_name, H_name, W_name)``.

        Returns:
            mask_features ``(N, mask_dim, H_c, W_c)`` at ``common_stride``;
            the encoder output of the coarsest level ``(N, conv_dim, H, W)``;
            the 3 coarsest outputs ``(N, conv_dim, H_k, W_k)``, coarse -> fine.
        """
        missing = [f for f in self.in_features if f not in features]
        if missing:
            raise KeyError(f"MSDeformAttnPixelDecoder needs backbone features {missing}; got {sorted(features)}.")
        device_type = features[self.in_features[0]].device.type
        # Deformable attention runs in fp32 even under AMP (as in the official
        # model, whose kernel has no half-precision path).
        with _autocast_disabled(device_type):
            return self._forward_fp32(features)

    def _forward_fp32(self, features: Dict[str, torch.Tensor]):
        srcs, pos = [], []
        for idx, name in enumerate(self.transformer_in_features[::-1]):  # coarse -> fine
            x = features[name].float()
            srcs.append(self.input_proj[idx](x))
            pos.append(self.pe_layer(x))

        memory, _, _ = self.transformer(srcs, pos)
        sizes = [tuple(src.shape[-2:]) for src in srcs]
        per_level = torch.split(memory, [h * w for h, w in sizes], dim=1)
        out = [
            rearrange(tokens, "n (h w) c -> n c h w", h=h, w=w)
            for tokens, (h, w) in zip(per_level, sizes)
        ]

        # Top-down over the finer inputs the encoder does not see.
        for idx, name in enumerate(self.in_features[: self.num_fpn_levels][::-1]):
            x = features[name].float()
            lateral = self.lateral_convs[idx](x)
            merged = lateral + F.interpolate(out[-1], size=lateral.shape[-2:], mode="bilinear", align_corners=False)
            out.append(self.output_convs[idx](merged))

        multi_scale_features = out[: self.maskformer_num_feature_levels]
        return self.mask_features(out[-1]), out[0], multi_scale_features

    def forward(self, features: Dict[str, torch.Tensor]):
        """Same as :meth:`forward_features` (heads call that one)."""
        return self.forward_features(features)


def _autocast_disabled(device_type: str):
    if device_type in ("cuda", "cpu"):
        return torch.autocast(device_type=device_type, enabled=False)
    return contextlib.nullcontext()
