"""The MiT (SegFormer) backbone: shapes, sizes, stochastic depth, and every head on top of it.

Numerical parity with MMSegmentation's ``MixVisionTransformer`` is in
``tests/test_mmseg_parity.py``; the checkpoint layouts in
``tests/test_official_gmmseg_checkpoint.py``.
"""
import math
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.modeling import build_model

from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.modeling.backbone import MIT_VARIANTS, D2MixVisionTransformer, MixVisionTransformer
from gmmseg_d2.modeling.backbone.mit import EfficientSelfAttention, MiTBlock
from tests.conftest import REPO_ROOT

STAGES = ["res2", "res3", "res4", "res5"]


def b0(**kwargs):
    embed_dim, depths = MIT_VARIANTS["b0"]
    return D2MixVisionTransformer(out_features=STAGES, embed_dim=embed_dim, depths=depths, **kwargs)


def test_b0_outputs_strides_channels_and_any_input_size(one_torch_thread):
    model = b0().eval()
    assert {k: (s.channels, s.stride) for k, s in model.output_shape().items()} == {
        "res2": (32, 4), "res3": (64, 8), "res4": (160, 16), "res5": (256, 32)}
    for height, width in [(64, 96), (65, 97)]:
        with torch.no_grad():
            features = model(torch.randn(1, 3, height, width))
        for name, stride in zip(STAGES, (4, 8, 16, 32)):
            # Overlapping patch embeddings (kernel k, stride s, padding k // 2) give ceil sizes.
            expected = (math.ceil(height / stride), math.ceil(width / stride))
            assert tuple(features[name].shape[-2:]) == expected, (name, height, width)
    assert model.size_divisibility == 0


def test_variants_have_the_published_widths_and_depths():
    for name, (embed_dim, depths) in MIT_VARIANTS.items():
        widths = [embed_dim * heads for heads in (1, 2, 5, 8)]
        assert widths == ([32, 64, 160, 256] if name == "b0" else [64, 128, 320, 512]), name
    assert MIT_VARIANTS["b5"][1] == (3, 6, 40, 3) and MIT_VARIANTS["b0"][1] == (2, 2, 2, 2)
    # MiT-B0's encoder: 3.3 M parameters (SegFormer paper, Table 1: 3.4 M with rounding of its
    # ImageNet model); B1: 13.1 M.
    assert 3.2e6 < sum(p.numel() for p in b0().parameters()) < 3.45e6
    embed_dim, depths = MIT_VARIANTS["b1"]
    count = sum(p.numel() for p in MixVisionTransformer(embed_dim=embed_dim, depths=depths).parameters())
    assert 13.0e6 < count < 13.7e6


def test_stochastic_depth_rises_linearly_to_the_last_block():
    model = MixVisionTransformer(embed_dim=32, depths=(2, 2, 2, 2), drop_path_rate=0.7)
    rates = [0.0 if isinstance(block.drop_path, torch.nn.Identity) else block.drop_path.drop_prob
             for stage in model.stages for block in stage.blocks]
    assert rates == pytest.approx([0.7 * i / 7 for i in range(8)])


def test_attention_equals_an_explicit_softmax_on_the_reduced_map(one_torch_thread):
    torch.manual_seed(0)
    attention = EfficientSelfAttention(dim=16, num_heads=2, sr_ratio=2).eval()
    x = torch.randn(2, 6 * 8, 16)
    with torch.no_grad():
        out = attention(x, (6, 8))
        reduced = attention.sr(x.transpose(1, 2).reshape(2, 16, 6, 8)).flatten(2).transpose(1, 2)
        reduced = attention.norm(reduced)
        assert reduced.shape == (2, 12, 16)
        q = attention.q(x).view(2, 48, 2, 8).transpose(1, 2)
        k, v = attention.kv(reduced).view(2, 12, 2, 2, 8).permute(2, 0, 3, 1, 4)
        weights = torch.softmax(q @ k.transpose(-1, -2) / math.sqrt(8), dim=-1)
        expected = attention.proj((weights @ v).transpose(1, 2).reshape(2, 48, 16))
    torch.testing.assert_close(out, expected, rtol=1e-5, atol=1e-6)


def test_block_is_identity_plus_residuals_when_drop_path_drops_everything():
    torch.manual_seed(0)
    block = MiTBlock(dim=16, num_heads=2, sr_ratio=1, drop_path=0.999999).train()
    x = torch.randn(64, 4, 16)
    torch.manual_seed(1)
    out = block(x, (2, 2))
    # With drop probability ~1 almost every sample keeps only its identity path.
    kept = (out - x).abs().amax(dim=(1, 2)) > 0
    assert kept.float().mean() < 0.1


def _cfg(config, *opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.BACKBONE.NAME", "D2MixVisionTransformer",
                         "MODEL.MIT.EMBED_DIM", 32, "MODEL.MIT.DEPTHS", [2, 2, 2, 2], *opts])
    return cfg


@pytest.mark.parametrize("config,opts", [
    ("configs/mosaic/fcn_R18_gmm.yaml", ["MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res5"]]),
    ("configs/mosaic/deeplabv3plus_R18_softmax.yaml", ["MODEL.SEM_SEG_HEAD.IN_FEATURES", ["res2", "res5"],
                                                       "MODEL.SEM_SEG_HEAD.COMMON_STRIDE", 4]),
    ("configs/mosaic/maskformer2_R18_gmm.yaml", []),
])
def test_every_head_trains_and_predicts_on_mit(config, opts, one_torch_thread):
    torch.manual_seed(0)
    model = build_model(_cfg(config, *opts))
    image = torch.randint(0, 255, (3, 64, 64)).float()
    labels = torch.randint(0, 8, (64, 64))
    record = {"image": image, "sem_seg": labels, "height": 64, "width": 64}
    if "maskformer" in config:
        from detectron2.structures import Instances, BitMasks

        instances = Instances((64, 64))
        classes = labels.unique()
        instances.gt_classes = classes
        instances.gt_masks = BitMasks(torch.stack([labels == c for c in classes]))
        record["instances"] = instances
    model.train()
    losses = model([record, dict(record)])
    total = sum(losses.values())
    assert torch.isfinite(total)
    total.backward()
    assert model.backbone.stages[0].patch_embed.proj.weight.grad.abs().sum() > 0
    model.eval()
    with torch.no_grad():
        result = model([{"image": image, "height": 64, "width": 64}])[0]
    assert result["sem_seg"].shape == (8, 64, 64)
