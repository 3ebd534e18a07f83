"""D2SwinTransformer: official parameter names/shapes, output geometry, and the
(shifted-)window attention against a direct per-token computation."""
import math
from typing import Dict, Sequence, Tuple

import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone

from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.modeling.backbone.swin import (
    D2SwinTransformer,
    PatchMerging,
    SwinTransformerBlock,
    relative_position_index,
    shifted_window_attention_mask,
    window_partition,
    window_reverse,
)

#: Tiny Swin: 4 stages of 2 blocks, widths 24..192, windows of 4 (shift 2).
TINY = dict(EMBED_DIM=24, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[2, 2, 4, 4], WINDOW_SIZE=4)


def official_swin_shapes(embed_dim: int, depths: Sequence[int], num_heads: Sequence[int], window: int,
                         patch: int = 4, mlp_ratio: int = 4) -> Dict[str, Tuple[int, ...]]:
    """State-dict names and shapes of Mask2Former's D2SwinTransformer (APE off, patch norm on).

    Written out from the official module tree (mask2former/modeling/backbone/swin.py),
    independently of gmmseg_d2's implementation.
    """
    shapes = {
        "patch_embed.proj.weight": (embed_dim, 3, patch, patch),
        "patch_embed.proj.bias": (embed_dim,),
        "patch_embed.norm.weight": (embed_dim,),
        "patch_embed.norm.bias": (embed_dim,),
    }
    for stage, (depth, heads) in enumerate(zip(depths, num_heads)):
        dim = embed_dim * 2 ** stage
        for block in range(depth):
            p = f"layers.{stage}.blocks.{block}."
            shapes.update({
                p + "norm1.weight": (dim,), p + "norm1.bias": (dim,),
                p + "attn.relative_position_bias_table": ((2 * window - 1) ** 2, heads),
                p + "attn.relative_position_index": (window * window, window * window),
                p + "attn.qkv.weight": (3 * dim, dim), p + "attn.qkv.bias": (3 * dim,),
                p + "attn.proj.weight": (dim, dim), p + "attn.proj.bias": (dim,),
                p + "norm2.weight": (dim,), p + "norm2.bias": (dim,),
                p + "mlp.fc1.weight": (mlp_ratio * dim, dim), p + "mlp.fc1.bias": (mlp_ratio * dim,),
                p + "mlp.fc2.weight": (dim, mlp_ratio * dim), p + "mlp.fc2.bias": (dim,),
            })
        if stage < len(depths) - 1:
            shapes[f"layers.{stage}.downsample.reduction.weight"] = (2 * dim, 4 * dim)
            shapes[f"layers.{stage}.downsample.norm.weight"] = (4 * dim,)
            shapes[f"layers.{stage}.downsample.norm.bias"] = (4 * dim,)
        shapes[f"norm{stage}.weight"] = (dim,)
        shapes[f"norm{stage}.bias"] = (dim,)
    return shapes


def swin_cfg(**swin):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.MODEL.BACKBONE.NAME = "D2SwinTransformer"
    for key, value in swin.items():
        setattr(cfg.MODEL.SWIN, key, value)
    return cfg


def test_swin_tiny_state_dict_matches_official_names_and_shapes(one_torch_thread):
    # MODEL.SWIN defaults are Swin-T (96, [2, 2, 6, 2], [3, 6, 12, 24], window 7).
    backbone = build_backbone(swin_cfg())
    assert isinstance(backbone, D2SwinTransformer)
    ours = {name: tuple(value.shape) for name, value in backbone.state_dict().items()}
    expected = official_swin_shapes(96, [2, 2, 6, 2], [3, 6, 12, 24], 7)
    assert len(expected) == 189
    assert sorted(set(ours) - set(expected)) == [] and sorted(set(expected) - set(ours)) == []
    assert ours == expected
    assert sum(p.numel() for p in backbone.parameters()) == pytest.approx(27.5e6, rel=0.01)


def test_optional_parameters_follow_config():
    with_ape = build_backbone(swin_cfg(**TINY, APE=True, PRETRAIN_IMG_SIZE=64, PATCH_NORM=False))
    names = with_ape.state_dict().keys()
    assert with_ape.absolute_pos_embed.shape == (1, 24, 16, 16)  # 64 / patch 4
    assert "patch_embed.norm.weight" not in names
    no_bias = build_backbone(swin_cfg(**TINY, QKV_BIAS=False))
    assert "layers.0.blocks.0.attn.qkv.bias" not in no_bias.state_dict()


@pytest.mark.parametrize("size", [(64, 96), (50, 70)])
def test_output_shapes_and_strides_on_non_square_input(size, one_torch_thread):
    torch.manual_seed(0)
    backbone = build_backbone(swin_cfg(**TINY)).eval()
    assert backbone.size_divisibility == 32
    shapes = backbone.output_shape()
    assert {n: (s.channels, s.stride) for n, s in shapes.items()} == {
        "res2": (24, 4), "res3": (48, 8), "res4": (96, 16), "res5": (192, 32)}
    with torch.no_grad():
        out = backbone(torch.randn(2, 3, *size))
    # Patch embedding pads to a multiple of 4, each merging rounds up.
    height, width = math.ceil(size[0] / 4), math.ceil(size[1] / 4)
    for name in ("res2", "res3", "res4", "res5"):
        assert out[name].shape == (2, shapes[name].channels, height, width), name
        assert torch.isfinite(out[name]).all()
        height, width = (height + 1) // 2, (width + 1) // 2
    if size[0] % 32 == 0 and size[1] % 32 == 0:
        for name, spec in shapes.items():
            assert out[name].shape[-2:] == (size[0] // spec.stride, size[1] // spec.stride)


def test_out_features_select_outputs_and_are_validated():
    backbone = build_backbone(swin_cfg(**TINY, OUT_FEATURES=["res3", "res5"])).eval()
    assert list(backbone.output_shape()) == ["res3", "res5"]
    # The four output norms exist regardless, as in official checkpoints.
    assert {f"norm{i}.weight" for i in range(4)} <= set(backbone.state_dict())
    with torch.no_grad():
        assert set(backbone(torch.randn(1, 3, 64, 64))) == {"res3", "res5"}
    with pytest.raises(ValueError, match="OUT_FEATURES"):
        build_backbone(swin_cfg(**TINY, OUT_FEATURES=["res6"]))
    with pytest.raises(ValueError, match="NUM_HEADS"):
        build_backbone(swin_cfg(**{**TINY, "NUM_HEADS": [5, 2, 4, 4]}))


def test_window_partition_order_and_inverse():
    x = torch.arange(2 * 4 * 6, dtype=torch.float32).view(2, 4, 6, 1)
    windows = window_partition(x, 2)  # (2 * 2 * 3, 4, 1)
    assert windows.shape == (12, 4, 1)
    # Window (b=1, row=1, col=2) is number 1*6 + 1*3 + 2 = 11, tokens row-major.
    assert windows[11, :, 0].tolist() == x[1, 2:4, 4:6, 0].flatten().tolist()
    assert torch.equal(window_reverse(windows, 2, 4, 6), x)


def test_relative_position_index_closed_form():
    index = relative_position_index((2, 3))
    assert index.shape == (6, 6) and index.dtype == torch.int64
    tokens = [(r, c) for r in range(2) for c in range(3)]
    for i, (ri, ci) in enumerate(tokens):
        for j, (rj, cj) in enumerate(tokens):
            assert index[i, j] == (ri - rj + 1) * 5 + (ci - cj + 2)
    assert index.max() == 3 * 5 - 1  # every table row used


def test_patch_merging_concatenation_order():
    torch.manual_seed(0)
    merge = PatchMerging(3).double()
    x = torch.randn(2, 5, 7, 3, dtype=torch.float64)  # odd sizes are zero-padded
    out = merge(x.reshape(2, 35, 3), 5, 7)
    padded = F.pad(x, (0, 0, 0, 1, 0, 1))
    # Official order: (row, col) offsets (0,0), (1,0), (0,1), (1,1).
    cat = torch.cat([padded[:, 0::2, 0::2], padded[:, 1::2, 0::2],
                     padded[:, 0::2, 1::2], padded[:, 1::2, 1::2]], dim=-1).reshape(2, 12, 12)
    torch.testing.assert_close(out, merge.reduction(merge.norm(cat)))


def reference_block(block: SwinTransformerBlock, x: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """The Swin block computed token by token, straight from its definition.

    Each token of the (zero-padded, after norm1) map attends to the tokens of
    its window in the cyclically shifted map, except tokens that wrapped
    around the image border a different way than itself (a token wrapped iff
    its coordinate is below the shift), with the bias of their in-window offset.
    """
    ws, shift, heads = block.window_size, block.shift_size, block.num_heads
    batch, _, channels = x.shape
    head_dim = channels // heads
    padded_h, padded_w = -(-height // ws) * ws, -(-width // ws) * ws
    normed = torch.zeros(batch, padded_h, padded_w, channels, dtype=x.dtype)
    normed[:, :height, :width] = block.norm1(x).view(batch, height, width, channels)
    qkv = block.attn.qkv(normed)
    query, key, value = qkv[..., :channels], qkv[..., channels:2 * channels], qkv[..., 2 * channels:]
    table = block.attn.relative_position_bias_table
    scale = head_dim ** -0.5

    def rolled(r, c):
        return (r - shift) % padded_h, (c - shift) % padded_w

    attended = torch.zeros(batch, height, width, channels, dtype=x.dtype)
    for r in range(height):
        for c in range(width):
            rr, rc = rolled(r, c)
            keys = []
            for r2 in range(padded_h):
                for c2 in range(padded_w):
                    kr, kc = rolled(r2, c2)
                    same_window = (kr // ws, kc // ws) == (rr // ws, rc // ws)
                    same_wrap = shift == 0 or ((r < shift) == (r2 < shift) and (c < shift) == (c2 < shift))
                    if same_window and same_wrap:
                        offset = ((rr % ws) - (kr % ws) + ws - 1) * (2 * ws - 1) + (rc % ws) - (kc % ws) + ws - 1
                        keys.append((r2, c2, offset))
            for h in range(heads):
                sl = slice(h * head_dim, (h + 1) * head_dim)
                logits = torch.stack([(query[:, r, c, sl] * key[:, r2, c2, sl]).sum(-1) * scale + table[off, h]
                                      for r2, c2, off in keys], dim=-1)
                weights = logits.softmax(-1)
                attended[:, r, c, sl] = sum(weights[:, n, None] * value[:, r2, c2, sl]
                                            for n, (r2, c2, _) in enumerate(keys))
    y = x + block.attn.proj(attended.view(batch, height * width, channels))
    return y + block.mlp(block.norm2(y))


@pytest.mark.parametrize("shift", [0, 1])
def test_window_attention_block_equals_direct_computation(shift):
    torch.manual_seed(0)
    block = SwinTransformerBlock(8, num_heads=2, window_size=3, shift_size=shift).double().eval()
    with torch.no_grad():
        for module in (block.norm1, block.norm2):  # non-trivial affine norms
            module.weight.normal_()
            module.bias.normal_()
        block.attn.relative_position_bias_table.normal_()
    height, width = 5, 7  # padded to 6 x 9: windows cover padding and wrap
    x = torch.randn(2, height * width, 8, dtype=torch.float64)
    # The mask a stage builds for its shifted blocks (window 3, shift 1) on the 6 x 9 map.
    layer_mask = shifted_window_attention_mask(6, 9, 3, 1).double()
    with torch.no_grad():
        ours = block(x, height, width, layer_mask)
        expected = reference_block(block, x, height, width)
    torch.testing.assert_close(ours, expected, rtol=1e-10, atol=1e-10)


def test_gradient_checkpointing_gives_same_outputs_and_gradients(one_torch_thread):
    torch.manual_seed(0)
    plain = build_backbone(swin_cfg(**TINY)).train()
    checkpointed = build_backbone(swin_cfg(**TINY, USE_CHECKPOINT=True)).train()
    checkpointed.load_state_dict(plain.state_dict())
    x = torch.randn(1, 3, 32, 48)
    outputs = []
    for model in (plain, checkpointed):
        torch.manual_seed(1)  # same stochastic depth draws
        out = model(x)
        sum(v.square().mean() for v in out.values()).backward()
        outputs.append((out, model.patch_embed.proj.weight.grad.clone()))
    for name in outputs[0][0]:
        torch.testing.assert_close(outputs[0][0][name], outputs[1][0][name])
    torch.testing.assert_close(outputs[0][1], outputs[1][1])


def test_builds_from_input_shape_channels():
    cfg = swin_cfg(**TINY)
    backbone = D2SwinTransformer(cfg, ShapeSpec(channels=1))
    assert backbone.patch_embed.proj.weight.shape == (24, 1, 4, 4)


@pytest.mark.parametrize("shift", [0, 3])
def test_block_equals_timm_swin_block(shift, one_torch_thread):
    """Cross-check with timm's independent Swin block (same parameter names within a block)."""
    timm_swin = pytest.importorskip("timm.models.swin_transformer")
    torch.manual_seed(0)
    ours = SwinTransformerBlock(32, 4, window_size=7, shift_size=shift).double().eval()
    with torch.no_grad():
        ours.attn.relative_position_bias_table.normal_()
    theirs = timm_swin.SwinTransformerBlock(32, (14, 21), num_heads=4, window_size=7, shift_size=shift)
    theirs = theirs.double().eval()
    # timm keeps relative_position_index as a non-persistent buffer.
    incompatible = theirs.load_state_dict(ours.state_dict(), strict=False)
    assert incompatible.missing_keys == [] and incompatible.unexpected_keys == ["attn.relative_position_index"]
    x = torch.randn(2, 14, 21, 32, dtype=torch.float64)
    with torch.no_grad():
        mask = shifted_window_attention_mask(14, 21, 7, 3).double()
        ours_out = ours(x.reshape(2, 14 * 21, 32), 14, 21, mask)
        theirs_out = theirs(x).reshape(2, 14 * 21, 32)
    torch.testing.assert_close(ours_out, theirs_out, rtol=1e-12, atol=1e-12)
