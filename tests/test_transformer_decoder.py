"""MultiScaleMaskedTransformerDecoder: official parameter layout, computations, masked-attention semantics."""
import math
from collections import OrderedDict

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import CfgNode as CN

from gmmseg_d2.modeling.transformer_decoder import (
    TRANSFORMER_DECODER_REGISTRY,
    MultiScaleMaskedTransformerDecoder,
    build_transformer_decoder,
)

pytestmark = pytest.mark.usefixtures("one_torch_thread")

IN_CHANNELS, HIDDEN, NHEADS, FFN, QUERIES, CLASSES, MASK_DIM = 8, 16, 2, 24, 5, 4, 12
# Non-square levels (coarsest first) and stride-4 mask features, so that any
# H/W mix-up changes the result.
LEVEL_SIZES = [(2, 4), (4, 8), (8, 16)]
MASK_SIZE = (16, 32)


def make_decoder(dec_layers=3, pre_norm=False, in_channels=IN_CHANNELS, enforce_input_project=False, **kwargs):
    return MultiScaleMaskedTransformerDecoder(
        in_channels, True, num_classes=CLASSES, hidden_dim=HIDDEN, num_queries=QUERIES, nheads=NHEADS,
        dim_feedforward=FFN, dec_layers=dec_layers, pre_norm=pre_norm, mask_dim=MASK_DIM,
        enforce_input_project=enforce_input_project, **kwargs,
    )


def make_inputs(batch=2, in_channels=IN_CHANNELS, mask_dim=MASK_DIM, dtype=torch.float32, seed=1):
    g = torch.Generator().manual_seed(seed)
    features = [torch.randn(batch, in_channels, h, w, generator=g, dtype=dtype) for h, w in LEVEL_SIZES]
    mask_features = torch.randn(batch, mask_dim, *MASK_SIZE, generator=g, dtype=dtype)
    return features, mask_features


def small_cfg(dec_layers=4):
    cfg = CN()
    cfg.MODEL = CN()
    cfg.MODEL.SEM_SEG_HEAD = CN({"NUM_CLASSES": CLASSES, "MASK_DIM": MASK_DIM})
    cfg.MODEL.MASK_FORMER = CN({
        "TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
        "HIDDEN_DIM": HIDDEN, "NUM_OBJECT_QUERIES": QUERIES, "NHEADS": NHEADS, "DIM_FEEDFORWARD": FFN,
        "DEC_LAYERS": dec_layers, "PRE_NORM": False, "ENFORCE_INPUT_PROJ": False,
    })
    return cfg


def official_state_dict_shapes(dec_layers, with_input_proj=True):
    """Parameter names and shapes of the official decoder, written out from its source."""
    h, f = HIDDEN, FFN
    shapes = OrderedDict()
    attention = {"in_proj_weight": (3 * h, h), "in_proj_bias": (3 * h,), "out_proj.weight": (h, h),
                 "out_proj.bias": (h,)}
    for i in range(dec_layers):
        for name, shape in attention.items():
            shapes[f"transformer_self_attention_layers.{i}.self_attn.{name}"] = shape
        shapes[f"transformer_self_attention_layers.{i}.norm.weight"] = (h,)
        shapes[f"transformer_self_attention_layers.{i}.norm.bias"] = (h,)
    for i in range(dec_layers):
        for name, shape in attention.items():
            shapes[f"transformer_cross_attention_layers.{i}.multihead_attn.{name}"] = shape
        shapes[f"transformer_cross_attention_layers.{i}.norm.weight"] = (h,)
        shapes[f"transformer_cross_attention_layers.{i}.norm.bias"] = (h,)
    for i in range(dec_layers):
        shapes[f"transformer_ffn_layers.{i}.linear1.weight"] = (f, h)
        shapes[f"transformer_ffn_layers.{i}.linear1.bias"] = (f,)
        shapes[f"transformer_ffn_layers.{i}.linear2.weight"] = (h, f)
        shapes[f"transformer_ffn_layers.{i}.linear2.bias"] = (h,)
        shapes[f"transformer_ffn_layers.{i}.norm.weight"] = (h,)
        shapes[f"transformer_ffn_layers.{i}.norm.bias"] = (h,)
    shapes["decoder_norm.weight"] = (h,)
    shapes["decoder_norm.bias"] = (h,)
    shapes["query_feat.weight"] = (QUERIES, h)
    shapes["query_embed.weight"] = (QUERIES, h)
    shapes["level_embed.weight"] = (3, h)
    if with_input_proj:
        for level in range(3):
            shapes[f"input_proj.{level}.weight"] = (h, IN_CHANNELS, 1, 1)
            shapes[f"input_proj.{level}.bias"] = (h,)
    shapes["class_embed.weight"] = (CLASSES + 1, h)
    shapes["class_embed.bias"] = (CLASSES + 1,)
    shapes["mask_embed.layers.0.weight"] = (h, h)
    shapes["mask_embed.layers.0.bias"] = (h,)
    shapes["mask_embed.layers.1.weight"] = (h, h)
    shapes["mask_embed.layers.1.bias"] = (h,)
    shapes["mask_embed.layers.2.weight"] = (MASK_DIM, h)
    shapes["mask_embed.layers.2.bias"] = (MASK_DIM,)
    return shapes


# ----------------------------------------------------------------------------- layout


@pytest.mark.parametrize("in_channels,enforce,with_proj", [(IN_CHANNELS, False, True), (HIDDEN, False, False),
                                                          (HIDDEN, True, True)])
def test_state_dict_names_and_shapes_equal_official(in_channels, enforce, with_proj):
    decoder = make_decoder(dec_layers=2, in_channels=in_channels, enforce_input_project=enforce)
    got = {k: tuple(v.shape) for k, v in decoder.state_dict().items()}
    expected = official_state_dict_shapes(2, with_input_proj=with_proj)
    if in_channels == HIDDEN and with_proj:
        expected = {k: ((HIDDEN, HIDDEN, 1, 1) if k.endswith("weight") and "input_proj" in k else v)
                    for k, v in expected.items()}
    assert got == dict(expected)


def test_registry_and_from_config_count_the_query_prediction_as_a_layer():
    assert TRANSFORMER_DECODER_REGISTRY._name == "TRANSFORMER_MODULE"
    decoder = build_transformer_decoder(small_cfg(dec_layers=4), IN_CHANNELS, mask_classification=True)
    assert isinstance(decoder, MultiScaleMaskedTransformerDecoder)
    # DEC_LAYERS = 4 -> 3 transformer layers, 4 predictions, 3 auxiliary outputs.
    assert decoder.num_layers == 3 and len(decoder.transformer_cross_attention_layers) == 3
    features, mask_features = make_inputs()
    with torch.no_grad():
        assert len(decoder(features, mask_features)["aux_outputs"]) == 3

    cfg = small_cfg()
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "NoSuchDecoder"
    with pytest.raises(KeyError, match="NoSuchDecoder"):
        build_transformer_decoder(cfg, IN_CHANNELS)
    with pytest.raises(ValueError, match="DEC_LAYERS"):
        build_transformer_decoder(small_cfg(dec_layers=0), IN_CHANNELS)


def test_old_static_query_checkpoints_load_into_query_feat():
    source = make_decoder()
    state = OrderedDict((k.replace("query_feat", "static_query"), v) for k, v in source.state_dict().items())
    assert "static_query.weight" in state  # no _metadata: version unknown, as in a model-zoo .pkl
    target = make_decoder()
    target.load_state_dict(state, strict=True)
    torch.testing.assert_close(target.query_feat.weight, source.query_feat.weight, rtol=0, atol=0)


def test_bad_inputs_are_rejected_with_a_clear_message():
    with pytest.raises(ValueError, match="mask classification"):
        MultiScaleMaskedTransformerDecoder(
            IN_CHANNELS, False, num_classes=CLASSES, hidden_dim=HIDDEN, num_queries=QUERIES, nheads=NHEADS,
            dim_feedforward=FFN, dec_layers=1, pre_norm=False, mask_dim=MASK_DIM, enforce_input_project=False)
    decoder = make_decoder(dec_layers=1)
    features, mask_features = make_inputs()
    with pytest.raises(ValueError, match="3 feature levels"):
        decoder(features[:2], mask_features)
    with pytest.raises(ValueError, match="feature level 1"):
        decoder([features[0], features[1][:, :3], features[2]], mask_features)
    with pytest.raises(ValueError, match="mask_features"):
        decoder(features, mask_features[:, :5])


# ----------------------------------------------------------------------------- computations


def reference_attention(query, key, value, params, prefix, mask=None):
    """Multi-head attention from the packed projection weights; sequence-first (L, B, C) inputs."""
    c = query.shape[-1]
    w, b = params[prefix + "in_proj_weight"], params[prefix + "in_proj_bias"]
    q, k, v = (t @ w[i * c:(i + 1) * c].T + b[i * c:(i + 1) * c] for i, t in enumerate((query, key, value)))

    def split(t):  # (L, B, C) -> (B, heads, L, C / heads)
        return t.reshape(t.shape[0], t.shape[1], NHEADS, c // NHEADS).permute(1, 2, 0, 3)

    q, k, v = split(q), split(k), split(v)
    scores = q @ k.transpose(-1, -2) / math.sqrt(c // NHEADS)
    if mask is not None:  # (B, heads, Q, S), True = forbidden
        scores = scores.masked_fill(mask, float("-inf"))
    out = (scores.softmax(-1) @ v).permute(2, 0, 1, 3).reshape(query.shape)
    return out @ params[prefix + "out_proj.weight"].T + params[prefix + "out_proj.bias"]


def reference_decoder(decoder, features, mask_features, pre_norm):
    """Independent re-statement of the official forward, from raw parameters."""
    p = decoder.state_dict()
    batch = mask_features.shape[0]

    def norm(t, name):
        return F.layer_norm(t, (HIDDEN,), p[name + ".weight"], p[name + ".bias"])

    memories, positions = [], []
    for level, feature in enumerate(features):
        proj = F.conv2d(feature, p[f"input_proj.{level}.weight"], p[f"input_proj.{level}.bias"])
        memories.append(proj.flatten(2).permute(2, 0, 1) + p["level_embed.weight"][level])
        positions.append(decoder.pe_layer(feature).to(feature.dtype).flatten(2).permute(2, 0, 1))

    def heads(out):
        d = norm(out, "decoder_norm").transpose(0, 1)
        logits = d @ p["class_embed.weight"].T + p["class_embed.bias"]
        e = d
        for i in range(3):
            e = e @ p[f"mask_embed.layers.{i}.weight"].T + p[f"mask_embed.layers.{i}.bias"]
            e = F.relu(e) if i < 2 else e
        masks = torch.einsum("bqc,bchw->bqhw", e, mask_features)
        return logits, masks

    def attention_mask(masks, size):
        forbidden = F.interpolate(masks, size=size, mode="bilinear", align_corners=False).sigmoid().flatten(2) < 0.5
        forbidden[forbidden.all(-1)] = False  # an empty mask attends everywhere
        return forbidden[:, None].expand(-1, NHEADS, -1, -1)

    out = p["query_feat.weight"][:, None].expand(-1, batch, -1)
    query_pos = p["query_embed.weight"][:, None].expand(-1, batch, -1)
    predictions = [heads(out)]
    for i in range(decoder.num_layers):
        level = i % 3
        mask = attention_mask(predictions[-1][1], LEVEL_SIZES[level])
        name = f"transformer_cross_attention_layers.{i}"
        t = norm(out, name + ".norm") if pre_norm else out
        out = out + reference_attention(t + query_pos, memories[level] + positions[level], memories[level],
                                        p, name + ".multihead_attn.", mask)
        out = out if pre_norm else norm(out, name + ".norm")
        name = f"transformer_self_attention_layers.{i}"
        t = norm(out, name + ".norm") if pre_norm else out
        out = out + reference_attention(t + query_pos, t + query_pos, t, p, name + ".self_attn.")
        out = out if pre_norm else norm(out, name + ".norm")
        name = f"transformer_ffn_layers.{i}"
        t = norm(out, name + ".norm") if pre_norm else out
        hidden = F.relu(t @ p[name + ".linear1.weight"].T + p[name + ".linear1.bias"])
        out = out + hidden @ p[name + ".linear2.weight"].T + p[name + ".linear2.bias"]
        out = out if pre_norm else norm(out, name + ".norm")
        predictions.append(heads(out))
    return predictions


@pytest.mark.parametrize("pre_norm", [False, True])
def test_forward_equals_independent_reference(pre_norm):
    torch.manual_seed(0)
    # 4 layers: the level round-robin wraps around (levels 0, 1, 2, 0).
    decoder = make_decoder(dec_layers=4, pre_norm=pre_norm).double().eval()
    features, mask_features = make_inputs(dtype=torch.float64)
    with torch.no_grad():
        out = decoder(features, mask_features)
        expected = reference_decoder(decoder, features, mask_features, pre_norm)

    assert set(out) == {"pred_logits", "pred_masks", "pred_classifier", "aux_outputs"}
    assert out["pred_logits"].shape == (2, QUERIES, CLASSES + 1)
    # The class head's whole output rides along; its logits are pred_logits.
    for prediction in [out] + out["aux_outputs"]:
        assert prediction["pred_classifier"].class_logits is prediction["pred_logits"]
        assert prediction["pred_classifier"].details is None  # the softmax head has no details
    assert out["pred_masks"].shape == (2, QUERIES, *MASK_SIZE)
    assert len(out["aux_outputs"]) == 4
    got = [(a["pred_logits"], a["pred_masks"]) for a in out["aux_outputs"]]
    got.append((out["pred_logits"], out["pred_masks"]))
    for (logits, masks), (ref_logits, ref_masks) in zip(got, expected):
        torch.testing.assert_close(logits, ref_logits, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(masks, ref_masks, rtol=1e-9, atol=1e-9)
    # The test would be vacuous if masked attention never masked anything.
    first_mask = F.interpolate(expected[0][1], size=LEVEL_SIZES[0], mode="bilinear", align_corners=False) < 0
    assert first_mask.any() and not first_mask.all()


def test_first_prediction_comes_from_the_learnable_queries_alone():
    torch.manual_seed(0)
    decoder = make_decoder(dec_layers=2).eval()
    features, mask_features = make_inputs()
    with torch.no_grad():
        first = decoder(features, mask_features)["aux_outputs"][0]
        normed = decoder.decoder_norm(decoder.query_feat.weight)  # (Q, hidden), same for every image
        logits = decoder.class_embed(normed).class_logits
        masks = torch.einsum("qc,bchw->bqhw", decoder.mask_embed(normed), mask_features)
    torch.testing.assert_close(first["pred_logits"], logits.expand(2, -1, -1))
    torch.testing.assert_close(first["pred_masks"], masks)


def test_gradients_reach_every_parameter_but_not_through_the_attention_mask():
    torch.manual_seed(0)
    decoder = make_decoder(dec_layers=3)
    features, mask_features = make_inputs()
    out = decoder(features, mask_features)
    loss = out["pred_logits"].sum() + out["pred_masks"].sum()
    loss = loss + sum(a["pred_logits"].sum() + a["pred_masks"].sum() for a in out["aux_outputs"])
    loss.backward()
    for name, param in decoder.named_parameters():
        assert param.grad is not None and torch.isfinite(param.grad).all(), name
    _, _, attn_mask = decoder.forward_prediction_heads(
        decoder.query_feat.weight[:, None].expand(-1, 2, -1), mask_features, LEVEL_SIZES[0])
    assert attn_mask.dtype == torch.bool and not attn_mask.requires_grad


# ----------------------------------------------------------------------------- masked attention


class FixedMaskEmbedding(nn.Module):
    """Stands in for ``mask_embed``: the same chosen embedding per query, whatever the decoder state."""

    def __init__(self, table):
        super().__init__()
        self.register_buffer("table", table)

    def forward(self, decoder_output):  # (B, Q, hidden) -> (B, Q, mask_dim)
        return self.table.expand(decoder_output.shape[0], -1, -1)


def test_empty_mask_query_attends_everywhere_and_others_only_inside_their_mask():
    torch.manual_seed(0)
    decoder = make_decoder(dec_layers=1).eval()
    # mask_features: channel 0 is 1 everywhere; channel 1 is a horizontal ramp,
    # negative on the left half and positive on the right half (mirrored for image 1).
    height, width = MASK_SIZE
    ramp = (torch.arange(width) + 0.5 - width / 2).expand(height, width)
    mask_features = torch.zeros(2, MASK_DIM, height, width)
    mask_features[:, 0] = 1
    mask_features[0, 1], mask_features[1, 1] = ramp, -ramp
    table = torch.zeros(QUERIES, MASK_DIM)
    table[0, 0] = -1.0  # logits -1 everywhere: empty mask
    table[1, 1] = 1.0   # right half (image 0) / left half (image 1)
    table[2, 0] = 1.0   # full mask
    table[3, 0] = -1.0  # empty as well
    table[4, 1] = -1.0  # the complement of query 1
    decoder.mask_embed = FixedMaskEmbedding(table)
    features, _ = make_inputs()

    captured = {}

    def capture(module, args, kwargs, output):
        captured.update(tgt=args[0], memory=args[1], output=output, **kwargs)

    layer = decoder.transformer_cross_attention_layers[0]
    handle = layer.register_forward_hook(capture, with_kwargs=True)
    with torch.no_grad():
        decoder(features, mask_features)
    handle.remove()

    mask = captured["memory_mask"]
    h, w = LEVEL_SIZES[0]
    assert mask.shape == (2 * NHEADS, QUERIES, h * w) and mask.dtype == torch.bool
    left = (torch.arange(w) < w / 2).expand(h, w).flatten()
    expected = torch.zeros(2, QUERIES, h * w, dtype=torch.bool)
    expected[0, 1], expected[1, 1] = left, ~left   # query 1 may not look at its background
    expected[0, 4], expected[1, 4] = ~left, left
    # Rows of queries 0 and 3 (empty masks) and 2 (full mask) allow everything.
    for b in range(2):
        for head in range(NHEADS):  # image-major, head-minor layout of nn.MultiheadAttention
            assert torch.equal(mask[b * NHEADS + head], expected[b])

    with torch.no_grad():
        args = dict(pos=captured["pos"], query_pos=captured["query_pos"])
        unmasked = layer(captured["tgt"], captured["memory"], memory_mask=None, **args)
        torch.testing.assert_close(captured["output"][[0, 2, 3]], unmasked[[0, 2, 3]])
        # Query 1 of image 0 sees exactly the right half: same as attending to that half alone.
        right = ~left
        restricted = layer(captured["tgt"][:, :1], captured["memory"][right][:, :1],
                           pos=captured["pos"][right][:, :1], query_pos=captured["query_pos"][:, :1])
        torch.testing.assert_close(captured["output"][1, 0], restricted[1, 0])
        assert not torch.allclose(captured["output"][1, 0], unmasked[1, 0])


def test_allow_full_attention_clears_exactly_the_all_forbidden_rows():
    g = torch.Generator().manual_seed(0)
    mask = torch.rand(6, 5, 7, generator=g) < 0.6
    mask[0, 1] = True
    mask[3, 4] = True
    fixed = MultiScaleMaskedTransformerDecoder.allow_full_attention_for_empty_masks(mask)
    reference = mask.clone()
    reference[torch.where(mask.sum(-1) == mask.shape[-1])] = False  # the official statement
    assert torch.equal(fixed, reference)
    assert not fixed[0, 1].any() and not fixed[3, 4].any()


# ----------------------------------------------------------------------------- class-head seam


def test_injected_class_head_receives_normalised_queries_and_sets_pred_logits():
    class RecordingHead(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(HIDDEN, 7)
            self.inputs = []

        def forward(self, x):
            self.inputs.append(x)
            return self.proj(x)

    head = RecordingHead()
    torch.manual_seed(0)
    decoder = make_decoder(dec_layers=2, class_embed=head)
    assert decoder.class_embed is head
    features, mask_features = make_inputs()
    with torch.no_grad():
        out = decoder(features, mask_features)
    assert out["pred_logits"].shape == (2, QUERIES, 7)
    assert len(head.inputs) == 3  # one call per prediction
    for x in head.inputs:
        assert x.shape == (2, QUERIES, HIDDEN)
        # Output of decoder_norm (a fresh LayerNorm): zero mean, unit variance per query.
        torch.testing.assert_close(x.mean(-1), torch.zeros(2, QUERIES), atol=1e-5, rtol=0)
        torch.testing.assert_close(x.var(-1, unbiased=False), torch.ones(2, QUERIES), atol=1e-3, rtol=0)
    torch.testing.assert_close(out["pred_logits"], head.proj(head.inputs[-1]))

    # The same seam works through a config: extra kwargs reach __init__.
    cfg_decoder = MultiScaleMaskedTransformerDecoder(small_cfg(), IN_CHANNELS, True, class_embed=nn.Identity())
    assert isinstance(cfg_decoder.class_embed, nn.Identity)
