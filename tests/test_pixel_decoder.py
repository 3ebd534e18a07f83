"""MSDeformAttnPixelDecoder and PositionEmbeddingSine: checkpoint names and
shapes of the official model, output shapes on odd-sized inputs, the FPN and
encoder wiring against manual recomputation, and numerical parity with the
official Mask2Former code (fetched by tools/setup_env.sh; see
tests/official_mask2former.py).
"""
import math

import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec

from gmmseg_d2.modeling.pixel_decoder import MSDeformAttnPixelDecoder, build_pixel_decoder
from gmmseg_d2.modeling.transformer_decoder.position_encoding import PositionEmbeddingSine
from tests.official_mask2former import import_official_mask2former_module

# R50-like strides with reduced channels.
SMALL_SHAPES = {
    "res2": ShapeSpec(channels=32, stride=4),
    "res3": ShapeSpec(channels=64, stride=8),
    "res4": ShapeSpec(channels=96, stride=16),
    "res5": ShapeSpec(channels=128, stride=32),
}
SMALL_ARGS = dict(
    transformer_dropout=0.0, transformer_nheads=4, transformer_dim_feedforward=64, transformer_enc_layers=2,
    conv_dim=32, mask_dim=16, norm="GN", transformer_in_features=["res3", "res4", "res5"], common_stride=4,
)


def _small_decoder(**overrides):
    return MSDeformAttnPixelDecoder(SMALL_SHAPES, **{**SMALL_ARGS, **overrides})


def _features(height, width, batch=2, seed=0, shapes=SMALL_SHAPES):
    # Sizes as a D2 ResNet produces them: every stride-2 step rounds up.
    g = torch.Generator().manual_seed(seed)
    feats = {}
    for name, spec in shapes.items():
        h, w = height, width
        for _ in range(int(math.log2(spec.stride))):
            h, w = math.ceil(h / 2), math.ceil(w / 2)
        feats[name] = torch.randn(batch, spec.channels, h, w, generator=g)
    return feats


def official_state_dict_shapes(channels, conv_dim, mask_dim, enc_layers, ffn, nheads, n_points=4, num_fpn=1):
    """Key -> shape of the official MSDeformAttnPixelDecoder, written from its source.

    ``channels``: input channels fine -> coarse; the last ``len - num_fpn`` go to
    the encoder. input_proj is coarse -> fine, adapter_/layer_ numbering fine -> coarse,
    FPN convs have no bias under a norm, lateral/output conv lists are not modules.
    """
    enc_channels = channels[num_fpn:]
    levels = len(enc_channels)
    shapes = {}
    for i, c in enumerate(enc_channels[::-1]):
        shapes[f"input_proj.{i}.0.weight"] = (conv_dim, c, 1, 1)
        shapes[f"input_proj.{i}.0.bias"] = (conv_dim,)
        shapes[f"input_proj.{i}.1.weight"] = (conv_dim,)
        shapes[f"input_proj.{i}.1.bias"] = (conv_dim,)
    shapes["transformer.level_embed"] = (levels, conv_dim)
    for k in range(enc_layers):
        p = f"transformer.encoder.layers.{k}."
        sampled = nheads * levels * n_points
        shapes.update({
            p + "self_attn.sampling_offsets.weight": (sampled * 2, conv_dim),
            p + "self_attn.sampling_offsets.bias": (sampled * 2,),
            p + "self_attn.attention_weights.weight": (sampled, conv_dim),
            p + "self_attn.attention_weights.bias": (sampled,),
            p + "self_attn.value_proj.weight": (conv_dim, conv_dim), p + "self_attn.value_proj.bias": (conv_dim,),
            p + "self_attn.output_proj.weight": (conv_dim, conv_dim), p + "self_attn.output_proj.bias": (conv_dim,),
            p + "norm1.weight": (conv_dim,), p + "norm1.bias": (conv_dim,),
            p + "linear1.weight": (ffn, conv_dim), p + "linear1.bias": (ffn,),
            p + "linear2.weight": (conv_dim, ffn), p + "linear2.bias": (conv_dim,),
            p + "norm2.weight": (conv_dim,), p + "norm2.bias": (conv_dim,),
        })
    shapes["mask_features.weight"] = (mask_dim, conv_dim, 1, 1)
    shapes["mask_features.bias"] = (mask_dim,)
    for j, c in enumerate(channels[:num_fpn], start=1):
        shapes[f"adapter_{j}.weight"] = (conv_dim, c, 1, 1)
        shapes[f"adapter_{j}.norm.weight"] = (conv_dim,)
        shapes[f"adapter_{j}.norm.bias"] = (conv_dim,)
        shapes[f"layer_{j}.weight"] = (conv_dim, conv_dim, 3, 3)
        shapes[f"layer_{j}.norm.weight"] = (conv_dim,)
        shapes[f"layer_{j}.norm.bias"] = (conv_dim,)
    return shapes


def test_state_dict_names_and_shapes_match_official():
    decoder = _small_decoder()
    got = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    assert got == official_state_dict_shapes([32, 64, 96, 128], 32, 16, 2, 64, 4)
    # Full-size R50 layout, as in the model zoo (1024 FFN, 8 heads, 6 layers).
    r50 = {k: ShapeSpec(channels=c, stride=s) for k, c, s in
           [("res2", 256, 4), ("res3", 512, 8), ("res4", 1024, 16), ("res5", 2048, 32)]}
    full = MSDeformAttnPixelDecoder(r50, **{**SMALL_ARGS, "conv_dim": 256, "mask_dim": 256,
                                            "transformer_nheads": 8, "transformer_enc_layers": 6,
                                            "transformer_dim_feedforward": 1024})
    got = {k: tuple(v.shape) for k, v in full.state_dict().items()}
    assert got == official_state_dict_shapes([256, 512, 1024, 2048], 256, 256, 6, 1024, 8)
    assert sum(v.numel() for v in full.state_dict().values()) == sum(
        math.prod(s) for s in official_state_dict_shapes([256, 512, 1024, 2048], 256, 256, 6, 1024, 8).values())


@pytest.mark.parametrize("height,width", [(64, 96), (70, 100), (33, 47)])
def test_forward_features_shapes_on_odd_sizes(one_torch_thread, height, width):
    decoder = _small_decoder().eval()
    feats = _features(height, width)
    with torch.no_grad():
        mask_features, encoder_features, multi_scale = decoder.forward_features(feats)
    n = 2
    assert mask_features.shape == (n, 16) + tuple(feats["res2"].shape[-2:])
    assert encoder_features.shape == (n, 32) + tuple(feats["res5"].shape[-2:])
    assert [tuple(f.shape) for f in multi_scale] == [
        (n, 32) + tuple(feats[k].shape[-2:]) for k in ("res5", "res4", "res3")
    ]
    # The coarsest multi-scale output is the encoder output itself.
    assert torch.equal(multi_scale[0], encoder_features)
    assert all(torch.isfinite(t).all() for t in [mask_features, *multi_scale])


def test_zero_encoder_layers_is_input_projection_and_fpn_recomputes(one_torch_thread):
    # With no encoder layers the memory is the projected input, so every level
    # can be recomputed by hand; the FPN level then follows the official
    # top-down rule: layer_1(adapter_1(res2) + bilinear_up(res3 level)).
    decoder = _small_decoder(transformer_enc_layers=0).eval()
    feats = _features(70, 100, seed=1)
    with torch.no_grad():
        mask_features, encoder_features, multi_scale = decoder.forward_features(feats)
        for idx, name in enumerate(["res5", "res4", "res3"]):
            torch.testing.assert_close(multi_scale[idx], decoder.input_proj[idx](feats[name]))
        lateral = decoder.adapter_1(feats["res2"])
        fpn = decoder.layer_1(lateral + F.interpolate(multi_scale[2], size=lateral.shape[-2:], mode="bilinear",
                                                      align_corners=False))
        torch.testing.assert_close(mask_features, decoder.mask_features(fpn))


def test_encoder_layers_change_features_and_all_parameters_learn(one_torch_thread):
    torch.manual_seed(0)
    decoder = _small_decoder().train()
    feats = _features(40, 56, seed=2)
    mask_features, _, multi_scale = decoder.forward_features(feats)
    (mask_features.square().mean() + sum(f.square().mean() for f in multi_scale)).backward()
    no_grad = [k for k, p in decoder.named_parameters() if p.grad is None or p.grad.abs().sum() == 0]
    # Positions (and level embeddings) reach the output only through the query
    # projections, whose weights the official init zeroes: no gradient yet.
    assert no_grad == ["transformer.level_embed"]
    decoder.zero_grad()
    with torch.no_grad():
        for layer in decoder.transformer.encoder.layers:
            layer.self_attn.attention_weights.weight.normal_(0, 0.1)
    mask_features, _, multi_scale = decoder.forward_features(feats)
    (mask_features.square().mean() + sum(f.square().mean() for f in multi_scale)).backward()
    assert decoder.transformer.level_embed.grad.abs().sum() > 0
    with torch.no_grad():
        assert not torch.allclose(multi_scale[0], decoder.input_proj[0](feats["res5"]), atol=1e-3)


def test_runs_in_fp32_under_autocast(one_torch_thread):
    decoder = _small_decoder().eval()
    feats = {k: v.bfloat16() for k, v in _features(32, 48, batch=1).items()}
    with torch.no_grad():
        with torch.autocast("cpu", dtype=torch.bfloat16):
            amp_out = decoder.forward_features(feats)
        fp32_out = decoder.forward_features({k: v.float() for k, v in feats.items()})
    assert amp_out[0].dtype == torch.float32
    torch.testing.assert_close(amp_out[0], fp32_out[0])


def test_bad_configuration_is_explained():
    with pytest.raises(ValueError, match="DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES"):
        _small_decoder(transformer_in_features=["res3", "res6"])
    with pytest.raises(ValueError, match="multiple of 32"):
        _small_decoder(conv_dim=48)
    with pytest.raises(ValueError, match="FPN levels"):
        _small_decoder(common_stride=2)
    with pytest.raises(KeyError, match="res2"):
        feats = _features(32, 32)
        feats.pop("res2")
        _small_decoder().forward_features(feats)


def _mask2former_cfg():
    from detectron2.config import CfgNode as CN, get_cfg

    cfg = get_cfg()
    try:  # official keys, once gmmseg_d2.config provides them
        from gmmseg_d2.config import add_maskformer2_config
        add_maskformer2_config(cfg)
    except ImportError:
        cfg.MODEL.MASK_FORMER = CN()
        cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
        cfg.MODEL.MASK_FORMER.NHEADS = 8
    head = cfg.MODEL.SEM_SEG_HEAD
    head.PIXEL_DECODER_NAME = "MSDeformAttnPixelDecoder"
    head.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    head.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    head.CONVS_DIM, head.MASK_DIM, head.NORM = 32, 16, "GN"
    head.TRANSFORMER_ENC_LAYERS, head.COMMON_STRIDE = 1, 4
    cfg.MODEL.MASK_FORMER.NHEADS, cfg.MODEL.MASK_FORMER.DROPOUT = 4, 0.0
    return cfg


def test_from_config_and_build_pixel_decoder():
    cfg = _mask2former_cfg()
    extra = dict(SMALL_SHAPES, res6=ShapeSpec(channels=8, stride=64))  # not in IN_FEATURES: ignored
    decoder = build_pixel_decoder(cfg, extra)
    assert isinstance(decoder, MSDeformAttnPixelDecoder)
    assert decoder.in_features == ["res2", "res3", "res4", "res5"]
    assert decoder.transformer_in_features == ["res3", "res4", "res5"]
    assert decoder.num_fpn_levels == 1 and len(decoder.transformer.encoder.layers) == 1
    # The encoder FFN width is fixed to 1024 in the official from_config.
    assert decoder.transformer.encoder.layers[0].linear1.out_features == 1024
    assert decoder.transformer.encoder.layers[0].self_attn.n_heads == 4
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "SemSegFPNHead"  # a head without forward_features
    cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES = 3
    with pytest.raises(ValueError, match="forward_features"):
        build_pixel_decoder(cfg, SMALL_SHAPES)


# ---------------------------------------------------------------- position encoding
def test_position_embedding_closed_form():
    # 1x2 map, 2 features per axis: frequencies are 10000^0 = 1 for both channels.
    # Normalised coordinates: y = 1 * 2pi, x = (1/2, 2/2) * 2pi.
    pe = PositionEmbeddingSine(num_pos_feats=2, normalize=True)
    out = pe(torch.zeros(1, 5, 1, 2))
    two_pi = 2 * math.pi
    y, xs = two_pi, torch.tensor([math.pi, two_pi])
    expected = torch.stack([
        torch.full((2,), math.sin(y)), torch.full((2,), math.cos(y)), xs.sin(), xs.cos(),
    ]).view(1, 4, 1, 2)
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=0)


def test_position_embedding_frequencies_and_mask():
    f = 6
    pe = PositionEmbeddingSine(num_pos_feats=f, temperature=100)
    out = pe(torch.zeros(2, 3, 4, 5))
    assert out.shape == (2, 2 * f, 4, 5) and out.dtype == torch.float32
    # Unnormalised: x = column index + 1, channel c uses frequency 100^(2*(c//2)/f).
    x = torch.arange(1, 6, dtype=torch.float32)
    for c in range(f):
        angle = x / 100 ** (2 * (c // 2) / f)
        torch.testing.assert_close(out[0, f + c, 2], angle.sin() if c % 2 == 0 else angle.cos())
    # Padded columns do not advance the counter; normalisation uses the last column.
    mask = torch.zeros(1, 2, 5, dtype=torch.bool)
    mask[:, :, 3:] = True
    masked = PositionEmbeddingSine(num_pos_feats=f, temperature=100)(torch.zeros(1, 3, 2, 5), mask)
    torch.testing.assert_close(masked[0, f:, :, 4], masked[0, f:, :, 2])
    with pytest.raises(ValueError, match="normalize"):
        PositionEmbeddingSine(scale=1.0)
    assert len(pe.state_dict()) == 0


# ---------------------------------------------------------------- official parity
@pytest.fixture(scope="module")
def official_msdeformattn():
    return import_official_mask2former_module("mask2former.modeling.pixel_decoder.msdeformattn")


def test_matches_official_pixel_decoder(official_msdeformattn, one_torch_thread):
    torch.manual_seed(0)
    ours = _small_decoder().eval()
    with torch.no_grad():  # make every parameter non-trivial (e.g. GN affine, attention logits)
        for p in ours.parameters():
            p.add_(0.05 * torch.randn_like(p))
    official = official_msdeformattn.MSDeformAttnPixelDecoder(SMALL_SHAPES, **SMALL_ARGS).eval()
    result = official.load_state_dict(ours.state_dict(), strict=True)
    assert not result.missing_keys and not result.unexpected_keys
    feats = _features(70, 100, seed=4)
    with torch.no_grad():
        got = ours.forward_features(feats)
        want = official.forward_features(feats)
    torch.testing.assert_close(got[0], want[0], rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(got[1], want[1], rtol=1e-5, atol=1e-5)
    for a, b in zip(got[2], want[2]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
