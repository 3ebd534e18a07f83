"""Mix Transformer (MiT, the encoder of SegFormer; Xie et al., NeurIPS 2021) as a Detectron2 backbone.

Four stages; stage ``i`` is an overlapping patch embedding (a strided conv,
kernel ``patch_sizes[i]``, stride ``strides[i]``, padding ``kernel // 2``, then
LayerNorm), ``depths[i]`` transformer blocks and a LayerNorm. A block is
pre-norm self-attention whose keys and values are computed on a map reduced
``sr_ratios[i]`` times by a strided conv (+ LayerNorm), then a Mix-FFN (linear,
3x3 depthwise conv, GELU, linear), each with a drop-path residual. Stage
``i`` has ``embed_dim * num_heads[i]`` channels (64 per head, 32 for B0) and
outputs ``res{i+2}`` at stride 4, 8, 16, 32.

The numerics are those of MMSegmentation's ``MixVisionTransformer``, which
the official GMMSeg checkpoints were trained with: every LayerNorm has
``eps = 1e-6`` (the original SegFormer code and timm's PVTv2 blocks, the same
design otherwise, use 1e-5 in the patch embedding and the key/value
reduction, so timm's blocks are not used here), attention scaled by
``head_dim ** -0.5``, GELU (erf), and the stochastic-depth rate rising
linearly from 0 to ``drop_path_rate`` over all blocks.

Parameter tree (stage ``i``, block ``j``)::

    stages.{i}.patch_embed.proj / .norm
    stages.{i}.blocks.{j}.norm1 / .norm2
    stages.{i}.blocks.{j}.attn.q / .kv / .proj          (kv: keys then values, (2C, C))
    stages.{i}.blocks.{j}.attn.sr / .norm               (only where sr_ratio > 1)
    stages.{i}.blocks.{j}.mlp.fc1 / .dwconv / .fc2
    stages.{i}.norm

:mod:`gmmseg_d2.checkpoint_conversion` maps MMSegmentation's names
(``layers.{i}.0`` patch embedding, ``layers.{i}.1.{j}`` blocks with
``nn.MultiheadAttention``'s ``in_proj``, ``layers.{i}.2`` norm) and the
original SegFormer release's (``patch_embed{i}``, ``block{i}``, ``norm{i}``)
to these.
"""
from typing import Dict, List, Sequence, Tuple

import torch
import torch.nn.functional as F
from einops import rearrange
from timm.layers import DropPath, trunc_normal_
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone

__all__ = [
    "MIT_VARIANTS",
    "D2MixVisionTransformer",
    "MixVisionTransformer",
    "MiTBlock",
    "EfficientSelfAttention",
    "MixFFN",
    "OverlapPatchEmbed",
]

#: ``(embed_dim, depths)`` of MiT-B0 .. B5; all share ``num_heads (1, 2, 5, 8)``,
#: ``sr_ratios (8, 4, 2, 1)``, ``patch_sizes (7, 3, 3, 3)``, ``strides (4, 2, 2, 2)``, ``mlp_ratio 4``.
MIT_VARIANTS: Dict[str, Tuple[int, Tuple[int, int, int, int]]] = {
    "b0": (32, (2, 2, 2, 2)),
    "b1": (64, (2, 2, 2, 2)),
    "b2": (64, (3, 4, 6, 3)),
    "b3": (64, (3, 4, 18, 3)),
    "b4": (64, (3, 8, 27, 3)),
    "b5": (64, (3, 6, 40, 3)),
}

_STAGE_NAMES = ("res2", "res3", "res4", "res5")
_LAYER_NORM_EPS = 1e-6


class OverlapPatchEmbed(nn.Module):
    """Strided conv with overlapping windows, then LayerNorm: ``(N, C, H, W) -> (N, h*w, D)``."""

    def __init__(self, in_channels: int, embed_dim: int, patch_size: int, stride: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_channels, embed_dim, kernel_size=patch_size, stride=stride,
                              padding=patch_size // 2)
        self.norm = nn.LayerNorm(embed_dim, eps=_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> Tuple[torch.Tensor, Tuple[int, int]]:
        """Returns tokens ``(N, h*w, D)`` and the grid ``(h, w)``."""
        x = self.proj(x)
        size = (x.shape[2], x.shape[3])
        return self.norm(rearrange(x, "n d h w -> n (h w) d")), size


class EfficientSelfAttention(nn.Module):
    """Multi-head self-attention with keys and values on a spatially reduced map.

    With ``sr_ratio > 1`` the keys and values come from the token map
    reduced by a ``sr_ratio x sr_ratio`` conv of stride ``sr_ratio`` and a
    LayerNorm: ``(h*w) x (h*w / sr^2)`` attention instead of ``(h*w)^2``.
    """

    def __init__(self, dim: int, num_heads: int, sr_ratio: int = 1, qkv_bias: bool = True,
                 attn_drop: float = 0.0, proj_drop: float = 0.0) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"MiT attention: dim {dim} is not divisible by num_heads {num_heads}")
        self.num_heads = num_heads
        self.sr_ratio = sr_ratio
        self.q = nn.Linear(dim, dim, bias=qkv_bias)
        self.kv = nn.Linear(dim, 2 * dim, bias=qkv_bias)
        self.attn_drop = attn_drop
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        if sr_ratio > 1:
            self.sr = nn.Conv2d(dim, dim, kernel_size=sr_ratio, stride=sr_ratio)
            self.norm = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """``x (N, h*w, C)`` on the grid ``size = (h, w)`` -> ``(N, h*w, C)``."""
        q = rearrange(self.q(x), "n l (heads d) -> n heads l d", heads=self.num_heads)
        context = x
        if self.sr_ratio > 1:
            grid = rearrange(x, "n (h w) c -> n c h w", h=size[0], w=size[1])
            context = self.norm(rearrange(self.sr(grid), "n c h w -> n (h w) c"))
        k, v = rearrange(self.kv(context), "n l (two heads d) -> two n heads l d", two=2, heads=self.num_heads)
        out = F.scaled_dot_product_attention(q, k, v, dropout_p=self.attn_drop if self.training else 0.0)
        return self.proj_drop(self.proj(rearrange(out, "n heads l d -> n l (heads d)")))


class MixFFN(nn.Module):
    """Linear, 3x3 depthwise conv on the token grid (SegFormer's positional cue), GELU, linear."""

    def __init__(self, dim: int, hidden_dim: int, drop: float = 0.0) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden_dim)
        self.dwconv = nn.Conv2d(hidden_dim, hidden_dim, kernel_size=3, padding=1, groups=hidden_dim)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_dim, dim)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        """``x (N, h*w, C)`` on the grid ``size`` -> ``(N, h*w, C)``."""
        x = rearrange(self.fc1(x), "n (h w) c -> n c h w", h=size[0], w=size[1])
        x = rearrange(self.dwconv(x), "n c h w -> n (h w) c")
        return self.drop(self.fc2(self.drop(self.act(x))))


class MiTBlock(nn.Module):
    """Pre-norm transformer block: ``x + dp(attn(norm1(x)))``, then ``x + dp(mlp(norm2(x)))``."""

    def __init__(self, dim: int, num_heads: int, sr_ratio: int, mlp_ratio: float = 4.0, qkv_bias: bool = True,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0) -> None:
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.attn = EfficientSelfAttention(dim, num_heads, sr_ratio, qkv_bias, attn_drop, drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)
        self.mlp = MixFFN(dim, int(dim * mlp_ratio), drop)

    def forward(self, x: torch.Tensor, size: Tuple[int, int]) -> torch.Tensor:
        x = x + self.drop_path(self.attn(self.norm1(x), size))
        return x + self.drop_path(self.mlp(self.norm2(x), size))


class MiTStage(nn.Module):
    """Patch embedding, blocks, LayerNorm: ``(N, C_in, H, W) -> (N, C, H / stride, W / stride)``."""

    def __init__(self, in_channels: int, dim: int, depth: int, num_heads: int, patch_size: int, stride: int,
                 sr_ratio: int, mlp_ratio: float, qkv_bias: bool, drop: float, attn_drop: float,
                 drop_paths: Sequence[float]) -> None:
        super().__init__()
        self.patch_embed = OverlapPatchEmbed(in_channels, dim, patch_size, stride)
        self.blocks = nn.ModuleList([
            MiTBlock(dim, num_heads, sr_ratio, mlp_ratio, qkv_bias, drop, attn_drop, drop_paths[j])
            for j in range(depth)
        ])
        self.norm = nn.LayerNorm(dim, eps=_LAYER_NORM_EPS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x, size = self.patch_embed(x)
        for block in self.blocks:
            x = block(x, size)
        return rearrange(self.norm(x), "n (h w) c -> n c h w", h=size[0], w=size[1])


class MixVisionTransformer(nn.Module):
    """The MiT encoder: four :class:`MiTStage` s, returning every stage's map.

    Args:
        in_channels: image channels.
        embed_dim: channels per attention head (32 for B0, 64 for B1-B5);
            stage ``i`` has ``embed_dim * num_heads[i]`` channels.
        depths: blocks per stage (see :data:`MIT_VARIANTS`).
        num_heads: attention heads per stage.
        patch_sizes, strides: kernel and stride of each stage's patch embedding.
        sr_ratios: key/value reduction of each stage's attention.
        mlp_ratio: Mix-FFN hidden channels / channels.
        qkv_bias: bias of the query and key/value projections.
        drop_rate: dropout after the attention and in the Mix-FFN.
        attn_drop_rate: dropout of the attention weights.
        drop_path_rate: stochastic depth of the last block (linear from 0).
    """

    def __init__(
        self,
        in_channels: int = 3,
        embed_dim: int = 64,
        depths: Sequence[int] = (3, 6, 40, 3),
        num_heads: Sequence[int] = (1, 2, 5, 8),
        patch_sizes: Sequence[int] = (7, 3, 3, 3),
        strides: Sequence[int] = (4, 2, 2, 2),
        sr_ratios: Sequence[int] = (8, 4, 2, 1),
        mlp_ratio: float = 4.0,
        qkv_bias: bool = True,
        drop_rate: float = 0.0,
        attn_drop_rate: float = 0.0,
        drop_path_rate: float = 0.1,
    ) -> None:
        super().__init__()
        lengths = {len(depths), len(num_heads), len(patch_sizes), len(strides), len(sr_ratios)}
        if len(lengths) != 1:
            raise ValueError(f"MiT: depths {list(depths)}, num_heads {list(num_heads)}, patch_sizes "
                             f"{list(patch_sizes)}, strides {list(strides)} and sr_ratios {list(sr_ratios)} "
                             f"must have one entry per stage")
        self.widths: List[int] = [embed_dim * heads for heads in num_heads]
        self.strides: List[int] = [int(torch.tensor(strides[: i + 1]).prod()) for i in range(len(strides))]
        drop_paths = torch.linspace(0, drop_path_rate, sum(depths)).tolist()
        self.stages = nn.ModuleList()
        start, channels = 0, in_channels
        for i, depth in enumerate(depths):
            self.stages.append(MiTStage(
                channels, self.widths[i], depth, num_heads[i], patch_sizes[i], strides[i], sr_ratios[i],
                mlp_ratio, qkv_bias, drop_rate, attn_drop_rate, drop_paths[start:start + depth]))
            start, channels = start + depth, self.widths[i]
        self.apply(self._init_weights)

    @staticmethod
    def _init_weights(module: nn.Module) -> None:
        # MMSegmentation's MiT init (used when training from scratch; releases overwrite it).
        if isinstance(module, nn.Linear):
            trunc_normal_(module.weight, std=0.02)
            if module.bias is not None:
                nn.init.zeros_(module.bias)
        elif isinstance(module, nn.LayerNorm):
            nn.init.ones_(module.weight)
            nn.init.zeros_(module.bias)
        elif isinstance(module, nn.Conv2d):
            fan_out = module.kernel_size[0] * module.kernel_size[1] * module.out_channels // module.groups
            nn.init.normal_(module.weight, 0.0, (2.0 / fan_out) ** 0.5)
            if module.bias is not None:
                nn.init.zeros_(module.bias)

    def forward(self, x: torch.Tensor) -> List[torch.Tensor]:
        """``(N, C, H, W)`` -> one ``(N, widths[i], H_i, W_i)`` map per stage
        (``H_i = ceil(H / strides[i])`` for the default patch embeddings)."""
        outputs = []
        for stage in self.stages:
            x = stage(x)
            outputs.append(x)
        return outputs


@BACKBONE_REGISTRY.register()
class D2MixVisionTransformer(MixVisionTransformer, Backbone):
    """MiT configured by ``MODEL.MIT.*``, with outputs ``res2 .. res5`` (strides 4 .. 32).

    Works with every head: FCN / DeepLabV3+ / SegFormer on any of the outputs,
    Mask2Former's pixel decoder on ``res3 .. res5`` (+ ``res2`` for masks).
    ``size_divisibility`` is ``MODEL.MIT.SIZE_DIVISIBILITY``: 0 by default,
    since the encoder takes any size and MMSegmentation feeds images unpadded.
    """

    @configurable
    def __init__(self, *, out_features: Sequence[str], size_divisibility: int = 0, **mit_kwargs) -> None:
        """
        Args:
            out_features: names among ``res2 .. res5`` to return.
            size_divisibility: what Detectron2 pads inputs to a multiple of.
            mit_kwargs: :class:`MixVisionTransformer`'s arguments (four stages).
        """
        super().__init__(**mit_kwargs)
        if len(self.stages) != len(_STAGE_NAMES):
            raise ValueError(f"D2MixVisionTransformer needs 4 stages (res2..res5), got {len(self.stages)}")
        unknown = [name for name in out_features if name not in _STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"MODEL.MIT.OUT_FEATURES {list(out_features)}: choose a non-empty subset of "
                             f"{list(_STAGE_NAMES)}")
        self._out_features = list(out_features)
        self._out_feature_channels = dict(zip(_STAGE_NAMES, self.widths))
        self._out_feature_strides = dict(zip(_STAGE_NAMES, self.strides))
        self._size_divisibility = size_divisibility

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        mit = cfg.MODEL.MIT
        return {
            "in_channels": input_shape.channels,
            "embed_dim": mit.EMBED_DIM,
            "depths": list(mit.DEPTHS),
            "num_heads": list(mit.NUM_HEADS),
            "patch_sizes": list(mit.PATCH_SIZES),
            "strides": list(mit.STRIDES),
            "sr_ratios": list(mit.SR_RATIOS),
            "mlp_ratio": mit.MLP_RATIO,
            "qkv_bias": mit.QKV_BIAS,
            "drop_rate": mit.DROP_RATE,
            "attn_drop_rate": mit.ATTN_DROP_RATE,
            "drop_path_rate": mit.DROP_PATH_RATE,
            "out_features": list(mit.OUT_FEATURES),
            "size_divisibility": mit.SIZE_DIVISIBILITY,
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(N, C, H, W)`` normalised images -> ``{name: (N, C_name, H / stride, W / stride)}``."""
        if x.dim() != 4:
            raise ValueError(f"D2MixVisionTransformer takes (N, C, H, W) images, got shape {tuple(x.shape)}")
        features = dict(zip(_STAGE_NAMES, super().forward(x)))
        return {name: features[name] for name in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name], stride=self._out_feature_strides[name])
                for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return self._size_divisibility
