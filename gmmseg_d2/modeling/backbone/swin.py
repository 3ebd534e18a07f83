"""Swin Transformer (Liu et al., ICCV 2021) as a Detectron2 backbone.

(Long on purpose: one port of one upstream file, kept in its layout so that the
module tree and parameter names match its checkpoints.)

The module tree, parameter names and shapes, and the order of operations are
those of Mask2Former's ``D2SwinTransformer`` (itself the Swin variant of
Swin-Transformer-Semantic-Segmentation), so that

* Mask2Former model-zoo checkpoints load under ``backbone.`` with no missing
  or unexpected key, and give the same features;
* ImageNet Swin releases converted by ``tools/convert-pretrained-swin-model-to-d2.py``
  load with only the four output norms ``norm0..norm3`` missing (classification
  models have none; Mask2Former trains them from their default init too).

Differences from the classification Swin: inputs of any size (feature maps
are padded to whole windows, the shifted-window mask is built per input),
a LayerNorm on every output stage, no classification head.

Parameter tree (stage ``i``, block ``j``)::

    patch_embed.proj, patch_embed.norm      (norm only with PATCH_NORM)
    absolute_pos_embed                      (only with APE)
    layers.{i}.blocks.{j}.norm1 / .norm2
    layers.{i}.blocks.{j}.attn.relative_position_bias_table   ((2w-1)^2, heads)
    layers.{i}.blocks.{j}.attn.relative_position_index        (buffer, (w^2, w^2))
    layers.{i}.blocks.{j}.attn.qkv / .proj
    layers.{i}.blocks.{j}.mlp.fc1 / .fc2
    layers.{i}.downsample.norm / .reduction (stages 0..2)
    norm0 .. norm3                          (output norms of res2..res5)
"""
from typing import Dict, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
import torch.utils.checkpoint
from einops import rearrange
from timm.layers import DropPath, trunc_normal_
from torch import nn

from detectron2.config import configurable
from detectron2.layers import ShapeSpec
from detectron2.modeling import BACKBONE_REGISTRY
from detectron2.modeling.backbone import Backbone

__all__ = [
    "D2SwinTransformer",
    "SwinTransformer",
    "SwinTransformerBlock",
    "WindowAttention",
    "PatchMerging",
    "PatchEmbed",
    "window_partition",
    "window_reverse",
    "relative_position_index",
    "shifted_window_attention_mask",
]

#: Additive attention bias between tokens that a cyclic shift brought into the
#: same window from opposite borders (the official value; not -inf).
_SHIFT_MASK_VALUE = -100.0


def window_partition(x: torch.Tensor, window_size: int) -> torch.Tensor:
    """``(B, H, W, C)`` → ``(B * nH * nW, window_size**2, C)``, windows in row-major order.

    ``H`` and ``W`` must be multiples of ``window_size``. The window index is
    ``b * nH * nW + row * nW + col``, as the official code (the attention mask
    of shifted windows relies on that order).
    """
    return rearrange(x, "b (nh wh) (nw ww) c -> (b nh nw) (wh ww) c", wh=window_size, ww=window_size)


def window_reverse(windows: torch.Tensor, window_size: int, height: int, width: int) -> torch.Tensor:
    """Inverse of :func:`window_partition`: ``(B * nH * nW, window_size**2, C)`` → ``(B, H, W, C)``."""
    return rearrange(windows, "(b nh nw) (wh ww) c -> b (nh wh) (nw ww) c",
                     nh=height // window_size, nw=width // window_size, wh=window_size, ww=window_size)


def relative_position_index(window_size: Tuple[int, int]) -> torch.Tensor:
    """``(Wh*Ww, Wh*Ww)`` int64: row of the bias table for each (query, key) token pair.

    For tokens ``i`` and ``j`` at (row, col) offsets ``(dh, dw) = pos_i - pos_j``
    inside a window, the index is ``(dh + Wh - 1) * (2 Ww - 1) + (dw + Ww - 1)``.
    """
    wh, ww = window_size
    rows, cols = torch.meshgrid(torch.arange(wh), torch.arange(ww), indexing="ij")
    coords = torch.stack([rows.flatten(), cols.flatten()])  # (2, Wh*Ww)
    offsets = coords[:, :, None] - coords[:, None, :]  # (2, Wh*Ww, Wh*Ww), pos_i - pos_j
    return (offsets[0] + wh - 1) * (2 * ww - 1) + (offsets[1] + ww - 1)


def shifted_window_attention_mask(padded_height: int, padded_width: int, window_size: int,
                                  shift_size: int, device: Optional[torch.device] = None) -> torch.Tensor:
    """Additive attention mask of shifted windows, ``(nW, window_size**2, window_size**2)``.

    After rolling the feature map by ``-shift_size``, the last window row and
    column hold tokens from both image borders. Tokens are labelled by the
    region they come from (3 bands per axis in rolled coordinates: the
    unwrapped bulk, the unwrapped part of the last window, the wrapped part);
    pairs with different labels get ``-100``, others 0.
    """
    region = torch.zeros((1, padded_height, padded_width, 1), device=device)
    bands = (slice(0, -window_size), slice(-window_size, -shift_size), slice(-shift_size, None))
    label = 0
    for rows in bands:
        for cols in bands:
            region[:, rows, cols, :] = label
            label += 1
    region_windows = window_partition(region, window_size).squeeze(-1)  # (nW, N)
    differs = region_windows[:, None, :] != region_windows[:, :, None]  # (nW, N, N)
    return torch.zeros(differs.shape, device=device).masked_fill(differs, _SHIFT_MASK_VALUE)


class Mlp(nn.Module):
    """Token-wise feed-forward network ``fc2(drop(gelu(fc1(x))))`` then dropout."""

    def __init__(self, in_features: int, hidden_features: int, drop: float = 0.0):
        super().__init__()
        self.fc1 = nn.Linear(in_features, hidden_features)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, in_features)
        self.drop = nn.Dropout(drop)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.drop(self.fc2(self.drop(self.act(self.fc1(x)))))


class WindowAttention(nn.Module):
    """Multi-head self-attention inside windows, with a learned relative position bias.

    Args:
        dim: token channels ``C``.
        window_size: ``(Wh, Ww)``.
        num_heads: attention heads; must divide ``dim``.
        qkv_bias: learn a bias in the query/key/value projection.
        qk_scale: logit scale; ``None`` for ``head_dim ** -0.5``.
        attn_drop: dropout on the attention weights.
        proj_drop: dropout after the output projection.
    """

    def __init__(self, dim: int, window_size: Tuple[int, int], num_heads: int, qkv_bias: bool = True,
                 qk_scale: Optional[float] = None, attn_drop: float = 0.0, proj_drop: float = 0.0):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"Swin stage width {dim} is not divisible by its {num_heads} heads; "
                             "check MODEL.SWIN.EMBED_DIM and MODEL.SWIN.NUM_HEADS")
        self.dim = dim
        self.window_size = tuple(window_size)
        self.num_heads = num_heads
        self.scale = qk_scale or (dim // num_heads) ** -0.5

        num_offsets = (2 * window_size[0] - 1) * (2 * window_size[1] - 1)
        self.relative_position_bias_table = nn.Parameter(torch.zeros(num_offsets, num_heads))
        # Persistent: official checkpoints (classification and Mask2Former)
        # contain it, so it must be in the state dict for keys to match.
        self.register_buffer("relative_position_index", relative_position_index(self.window_size))

        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.attn_drop = nn.Dropout(attn_drop)
        self.proj = nn.Linear(dim, dim)
        self.proj_drop = nn.Dropout(proj_drop)
        trunc_normal_(self.relative_position_bias_table, std=0.02)

    def relative_position_bias(self) -> torch.Tensor:
        """``(heads, N, N)`` bias added to the attention logits, ``N = Wh * Ww``."""
        num_tokens = self.window_size[0] * self.window_size[1]
        bias = self.relative_position_bias_table[self.relative_position_index.view(-1)]
        return rearrange(bias, "(i j) h -> h i j", i=num_tokens, j=num_tokens)

    def forward(self, x: torch.Tensor, mask: Optional[torch.Tensor] = None) -> torch.Tensor:
        """
        Args:
            x: ``(B * nW, N, C)`` tokens of every window, windows of one image consecutive.
            mask: ``(nW, N, N)`` additive mask (0 / -100) or None.
        Returns:
            ``(B * nW, N, C)``.
        """
        qkv = rearrange(self.qkv(x), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        query, key, value = qkv[0], qkv[1], qkv[2]
        # Scale the queries before the product, as the official code.
        logits = (query * self.scale) @ key.transpose(-2, -1)  # (B*nW, heads, N, N)
        logits = logits + self.relative_position_bias().unsqueeze(0)
        if mask is not None:
            logits = rearrange(logits, "(b w) h i j -> b w h i j", w=mask.shape[0])
            logits = logits + mask[None, :, None]
            logits = rearrange(logits, "b w h i j -> (b w) h i j")
        attn = self.attn_drop(logits.softmax(dim=-1))
        out = rearrange(attn @ value, "b h n d -> b n (h d)")
        return self.proj_drop(self.proj(out))


class SwinTransformerBlock(nn.Module):
    """Pre-norm (shifted-)window attention and MLP, each with a residual.

    ``shift_size`` 0 gives W-MSA, ``0 < shift_size < window_size`` SW-MSA. The
    feature map is padded at the bottom/right to whole windows after ``norm1``
    (padded tokens are zeros there), as the official code.
    """

    def __init__(self, dim: int, num_heads: int, window_size: int = 7, shift_size: int = 0,
                 mlp_ratio: float = 4.0, qkv_bias: bool = True, qk_scale: Optional[float] = None,
                 drop: float = 0.0, attn_drop: float = 0.0, drop_path: float = 0.0):
        super().__init__()
        if not 0 <= shift_size < window_size:
            raise ValueError(f"shift_size must be in [0, window_size={window_size}), got {shift_size}")
        self.dim = dim
        self.num_heads = num_heads
        self.window_size = window_size
        self.shift_size = shift_size
        self.norm1 = nn.LayerNorm(dim)
        self.attn = WindowAttention(dim, (window_size, window_size), num_heads, qkv_bias=qkv_bias,
                                    qk_scale=qk_scale, attn_drop=attn_drop, proj_drop=drop)
        self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
        self.norm2 = nn.LayerNorm(dim)
        self.mlp = Mlp(dim, int(dim * mlp_ratio), drop=drop)

    def forward(self, x: torch.Tensor, height: int, width: int,
                shift_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """
        Args:
            x: ``(B, H*W, C)`` tokens in row-major order.
            height, width: ``H``, ``W``.
            shift_mask: ``(nW, N, N)`` mask of the padded map; used when shifted.
        Returns:
            ``(B, H*W, C)``.
        """
        batch, length, channels = x.shape
        if length != height * width:
            raise ValueError(f"Swin block got {length} tokens for a {height}x{width} map")
        shortcut = x
        x = self.norm1(x).view(batch, height, width, channels)
        pad_bottom = -height % self.window_size
        pad_right = -width % self.window_size
        x = F.pad(x, (0, 0, 0, pad_right, 0, pad_bottom))
        padded_height, padded_width = x.shape[1], x.shape[2]

        if self.shift_size > 0:
            x = torch.roll(x, shifts=(-self.shift_size, -self.shift_size), dims=(1, 2))
            mask = shift_mask
        else:
            mask = None
        windows = self.attn(window_partition(x, self.window_size), mask=mask)
        x = window_reverse(windows, self.window_size, padded_height, padded_width)
        if self.shift_size > 0:
            x = torch.roll(x, shifts=(self.shift_size, self.shift_size), dims=(1, 2))
        x = x[:, :height, :width, :].reshape(batch, height * width, channels)

        x = shortcut + self.drop_path(x)
        return x + self.drop_path(self.mlp(self.norm2(x)))


class PatchMerging(nn.Module):
    """2x2 token merging: ``(B, H*W, C)`` → ``(B, ceil(H/2)*ceil(W/2), 2C)``.

    The four tokens of each 2x2 cell are concatenated in the order (0,0),
    (1,0), (0,1), (1,1) as (row, col) offsets — the official order, which the
    ``reduction`` weights depend on — then LayerNorm and a linear map without
    bias. Odd sizes are zero-padded at the bottom/right.
    """

    def __init__(self, dim: int):
        super().__init__()
        self.dim = dim
        self.reduction = nn.Linear(4 * dim, 2 * dim, bias=False)
        self.norm = nn.LayerNorm(4 * dim)

    def forward(self, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
        batch, length, channels = x.shape
        if length != height * width:
            raise ValueError(f"PatchMerging got {length} tokens for a {height}x{width} map")
        x = x.view(batch, height, width, channels)
        x = F.pad(x, (0, 0, 0, width % 2, 0, height % 2))
        # Column offset outermost, then row offset: (0,0), (1,0), (0,1), (1,1).
        x = rearrange(x, "b (h dh) (w dw) c -> b (h w) (dw dh c)", dh=2, dw=2)
        return self.reduction(self.norm(x))


class PatchEmbed(nn.Module):
    """Non-overlapping ``patch_size`` patches → ``embed_dim`` channels, ``(B, C, H, W)`` → ``(B, D, H/p, W/p)``.

    Inputs are zero-padded at the bottom/right to a multiple of the patch size.
    """

    def __init__(self, patch_size: int = 4, in_chans: int = 3, embed_dim: int = 96, patch_norm: bool = True):
        super().__init__()
        self.patch_size = (patch_size, patch_size)
        self.in_chans = in_chans
        self.embed_dim = embed_dim
        self.proj = nn.Conv2d(in_chans, embed_dim, kernel_size=patch_size, stride=patch_size)
        self.norm = nn.LayerNorm(embed_dim) if patch_norm else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        height, width = x.shape[-2:]
        x = F.pad(x, (0, -width % self.patch_size[1], 0, -height % self.patch_size[0]))
        x = self.proj(x)
        if self.norm is not None:
            out_height, out_width = x.shape[-2:]
            x = self.norm(rearrange(x, "b c h w -> b (h w) c"))
            x = rearrange(x, "b (h w) c -> b c h w", h=out_height, w=out_width)
        return x


class BasicLayer(nn.Module):
    """One Swin stage: ``depth`` blocks alternating W-MSA / SW-MSA, then an optional PatchMerging."""

    def __init__(self, dim: int, depth: int, num_heads: int, window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop: float = 0.0,
                 attn_drop: float = 0.0, drop_path: Sequence[float] = (), downsample: bool = False,
                 use_checkpoint: bool = False):
        super().__init__()
        self.window_size = window_size
        self.shift_size = window_size // 2
        self.depth = depth
        self.use_checkpoint = use_checkpoint
        drop_path = list(drop_path) if len(drop_path) else [0.0] * depth
        self.blocks = nn.ModuleList([
            SwinTransformerBlock(dim, num_heads, window_size=window_size,
                                 shift_size=0 if index % 2 == 0 else self.shift_size,
                                 mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop,
                                 attn_drop=attn_drop, drop_path=drop_path[index])
            for index in range(depth)
        ])
        self.downsample = PatchMerging(dim) if downsample else None

    def forward(self, x: torch.Tensor, height: int, width: int):
        """``(B, H*W, C)`` → ``(stage output, H, W, downsampled, H', W')``.

        Without a downsample layer the stage output is returned twice.
        """
        padded_height = -(-height // self.window_size) * self.window_size
        padded_width = -(-width // self.window_size) * self.window_size
        shift_mask = shifted_window_attention_mask(padded_height, padded_width, self.window_size,
                                                   self.shift_size, device=x.device)
        for block in self.blocks:
            if self.use_checkpoint and x.requires_grad:
                x = torch.utils.checkpoint.checkpoint(block, x, height, width, shift_mask, use_reentrant=False)
            else:
                x = block(x, height, width, shift_mask)
        if self.downsample is None:
            return x, height, width, x, height, width
        return x, height, width, self.downsample(x, height, width), (height + 1) // 2, (width + 1) // 2


class SwinTransformer(nn.Module):
    """Hierarchical Swin Transformer returning ``{"res2".."res5": (B, C_i, H/2^(i+2), W/2^(i+2))}``.

    Args:
        pretrain_img_size: image size of pretraining, sets the absolute
            position embedding's grid (only with ``ape``).
        patch_size: patch size of the embedding (4 gives stride 4 at res2).
        in_chans: input channels.
        embed_dim: channels ``C`` of stage 0; stage ``i`` has ``C * 2**i``.
        depths: blocks per stage.
        num_heads: attention heads per stage.
        window_size: attention window side.
        mlp_ratio: MLP hidden width / channels.
        qkv_bias, qk_scale: see :class:`WindowAttention`.
        drop_rate: dropout after embeddings, in the MLPs and after attention.
        attn_drop_rate: dropout on attention weights.
        drop_path_rate: stochastic-depth rate, increasing linearly from 0 over all blocks.
        ape: add a learned absolute position embedding (bicubic-resized to the input).
        patch_norm: LayerNorm after the patch embedding.
        out_indices: stages that get an output norm ``norm{i}`` and an output.
        use_checkpoint: gradient checkpointing of every block (saves memory).
    """

    def __init__(self, pretrain_img_size: int = 224, patch_size: int = 4, in_chans: int = 3,
                 embed_dim: int = 96, depths: Sequence[int] = (2, 2, 6, 2),
                 num_heads: Sequence[int] = (3, 6, 12, 24), window_size: int = 7, mlp_ratio: float = 4.0,
                 qkv_bias: bool = True, qk_scale: Optional[float] = None, drop_rate: float = 0.0,
                 attn_drop_rate: float = 0.0, drop_path_rate: float = 0.2, ape: bool = False,
                 patch_norm: bool = True, out_indices: Sequence[int] = (0, 1, 2, 3),
                 use_checkpoint: bool = False):
        super().__init__()
        if len(depths) != len(num_heads):
            raise ValueError(f"MODEL.SWIN.DEPTHS {list(depths)} and NUM_HEADS {list(num_heads)} must have "
                             "one entry per stage")
        self.pretrain_img_size = pretrain_img_size
        self.num_layers = len(depths)
        self.embed_dim = embed_dim
        self.ape = ape
        self.patch_norm = patch_norm
        self.out_indices = tuple(out_indices)

        self.patch_embed = PatchEmbed(patch_size, in_chans, embed_dim, patch_norm=patch_norm)
        if ape:
            grid = (pretrain_img_size // patch_size, pretrain_img_size // patch_size)
            self.absolute_pos_embed = nn.Parameter(torch.zeros(1, embed_dim, *grid))
            trunc_normal_(self.absolute_pos_embed, std=0.02)
        self.pos_drop = nn.Dropout(p=drop_rate)

        block_drop_path = [rate.item() for rate in torch.linspace(0, drop_path_rate, sum(depths))]
        self.num_features = [int(embed_dim * 2 ** index) for index in range(self.num_layers)]
        self.layers = nn.ModuleList()
        for index in range(self.num_layers):
            first = sum(depths[:index])
            self.layers.append(BasicLayer(
                self.num_features[index], depths[index], num_heads[index], window_size=window_size,
                mlp_ratio=mlp_ratio, qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                attn_drop=attn_drop_rate, drop_path=block_drop_path[first:first + depths[index]],
                downsample=index < self.num_layers - 1, use_checkpoint=use_checkpoint))
        for index in self.out_indices:
            self.add_module(f"norm{index}", nn.LayerNorm(self.num_features[index]))
        # Linear layers keep PyTorch's default init: the official
        # D2SwinTransformer never applies its init_weights (only the bias
        # tables and the position embedding get truncated-normal init), and
        # pretrained weights replace everything that matters.

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """``(B, C_in, H, W)`` → ``{f"res{i+2}": (B, C_i, H_i, W_i)}`` for ``i`` in ``out_indices``."""
        x = self.patch_embed(x)
        height, width = x.shape[-2:]
        if self.ape:
            x = x + F.interpolate(self.absolute_pos_embed, size=(height, width), mode="bicubic")
        x = self.pos_drop(rearrange(x, "b c h w -> b (h w) c"))

        outputs = {}
        for index, layer in enumerate(self.layers):
            stage_out, out_height, out_width, x, height, width = layer(x, height, width)
            if index in self.out_indices:
                stage_out = getattr(self, f"norm{index}")(stage_out)
                outputs[f"res{index + 2}"] = rearrange(stage_out, "b (h w) c -> b c h w",
                                                       h=out_height, w=out_width).contiguous()
        return outputs


_STAGE_NAMES = ("res2", "res3", "res4", "res5")


@BACKBONE_REGISTRY.register()
class D2SwinTransformer(SwinTransformer, Backbone):
    """Swin Transformer backbone configured by ``MODEL.SWIN.*``.

    Outputs ``MODEL.SWIN.OUT_FEATURES`` among ``res2..res5`` (strides 4, 8, 16,
    32; channels ``EMBED_DIM * (1, 2, 4, 8)``). All four output norms exist
    whatever ``OUT_FEATURES`` is (as the official model, whose checkpoints hold
    them). ``MODEL.BACKBONE.FREEZE_AT`` is not read (nor is it officially).
    """

    @configurable
    def __init__(self, *, out_features: Sequence[str], **swin_kwargs):
        """
        Args:
            out_features: names among ``res2..res5`` to return.
            swin_kwargs: arguments of :class:`SwinTransformer` (``out_indices`` excluded).
        """
        unknown = [name for name in out_features if name not in _STAGE_NAMES]
        if unknown or not out_features:
            raise ValueError(f"MODEL.SWIN.OUT_FEATURES {list(out_features)}: choose a non-empty subset "
                             f"of {list(_STAGE_NAMES)}")
        if "out_indices" in swin_kwargs:
            raise ValueError("D2SwinTransformer always builds the output norms of all four stages; "
                             "select outputs with out_features")
        super().__init__(**swin_kwargs)
        if self.num_layers != len(_STAGE_NAMES):
            raise ValueError(f"D2SwinTransformer needs 4 stages (res2..res5), got MODEL.SWIN.DEPTHS of "
                             f"length {self.num_layers}")
        self._out_features = list(out_features)
        self._out_feature_strides = {name: 4 * 2 ** index for index, name in enumerate(_STAGE_NAMES)}
        self._out_feature_channels = dict(zip(_STAGE_NAMES, self.num_features))

    @classmethod
    def from_config(cls, cfg, input_shape: ShapeSpec):
        swin = cfg.MODEL.SWIN
        return {
            "pretrain_img_size": swin.PRETRAIN_IMG_SIZE,
            "patch_size": swin.PATCH_SIZE,
            "in_chans": input_shape.channels,
            "embed_dim": swin.EMBED_DIM,
            "depths": list(swin.DEPTHS),
            "num_heads": list(swin.NUM_HEADS),
            "window_size": swin.WINDOW_SIZE,
            "mlp_ratio": swin.MLP_RATIO,
            "qkv_bias": swin.QKV_BIAS,
            "qk_scale": swin.QK_SCALE,
            "drop_rate": swin.DROP_RATE,
            "attn_drop_rate": swin.ATTN_DROP_RATE,
            "drop_path_rate": swin.DROP_PATH_RATE,
            "ape": swin.APE,
            "patch_norm": swin.PATCH_NORM,
            "use_checkpoint": swin.USE_CHECKPOINT,
            "out_features": list(swin.OUT_FEATURES),
        }

    def forward(self, x: torch.Tensor) -> Dict[str, torch.Tensor]:
        """
        Args:
            x: ``(N, C, H, W)`` normalised images; any size works, multiples of
                :attr:`size_divisibility` give exact strides.
        Returns:
            ``{name: (N, C_name, H / stride, W / stride)}`` for ``out_features``.
        """
        if x.dim() != 4:
            raise ValueError(f"D2SwinTransformer takes (N, C, H, W) images, got shape {tuple(x.shape)}")
        features = super().forward(x)
        return {name: features[name] for name in self._out_features}

    def output_shape(self) -> Dict[str, ShapeSpec]:
        return {name: ShapeSpec(channels=self._out_feature_channels[name],
                                stride=self._out_feature_strides[name])
                for name in self._out_features}

    @property
    def size_divisibility(self) -> int:
        return 32
