"""The dilated ResNet builder against Detectron2's own ResNet."""
import pytest
import torch
import torch.nn.functional as F

from detectron2.layers import ShapeSpec
from detectron2.modeling.backbone.resnet import BottleneckBlock, build_resnet_backbone

from gmmseg_d2.modeling.backbone import DilatedBasicBlock, build_resnet_dilated_backbone


def _resnet_cfg(demo_cfg, depth, res4_dilation=1, res5_dilation=1, out_features=("res2", "res5")):
    cfg = demo_cfg.clone()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 64 if depth < 50 else 256
    cfg.MODEL.RESNETS.RES4_DILATION = res4_dilation
    cfg.MODEL.RESNETS.RES5_DILATION = res5_dilation
    cfg.MODEL.RESNETS.OUT_FEATURES = list(out_features)
    cfg.MODEL.RESNETS.NORM = "FrozenBN"
    return cfg


@pytest.mark.parametrize("depth", [18, 34])
def test_undilated_equals_detectron2_resnet(demo_cfg, depth):
    cfg = _resnet_cfg(demo_cfg, depth)
    ours = build_resnet_dilated_backbone(cfg, ShapeSpec(channels=3)).eval()
    reference = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    # Same parameter names and shapes, so Detectron2 checkpoints load as is.
    ours_shapes = {k: v.shape for k, v in ours.state_dict().items()}
    assert ours_shapes == {k: v.shape for k, v in reference.state_dict().items()}
    ours.load_state_dict(reference.state_dict())
    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        a, b = ours(x), reference(x)
    for name in ("res2", "res5"):
        torch.testing.assert_close(a[name], b[name], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("res4,res5,stride", [(1, 1, 32), (1, 2, 16), (2, 4, 8)])
def test_output_stride(demo_cfg, res4, res5, stride):
    cfg = _resnet_cfg(demo_cfg, 18, res4, res5, out_features=("res5",))
    backbone = build_resnet_dilated_backbone(cfg, ShapeSpec(channels=3)).eval()
    assert backbone.output_shape()["res5"].stride == stride
    with torch.no_grad():
        out = backbone(torch.randn(1, 3, 128, 128))["res5"]
    assert out.shape == (1, 512, 128 // stride, 128 // stride)


def test_res4_only_may_be_dilated_alone(demo_cfg):
    cfg = _resnet_cfg(demo_cfg, 18, 2, 1, out_features=("res4",))
    backbone = build_resnet_dilated_backbone(cfg, ShapeSpec(channels=3))
    assert backbone.output_shape()["res4"].stride == 8
    with pytest.raises(ValueError, match="RES5_DILATION=4"):
        build_resnet_dilated_backbone(_resnet_cfg(demo_cfg, 18, 2, 2, ("res5",)), ShapeSpec(channels=3))


def test_dilated_block_matches_manual_convolution():
    torch.manual_seed(0)
    block = DilatedBasicBlock(8, 8, stride=1, norm="", dilation=2).eval()
    x = torch.randn(1, 8, 20, 20)
    c1, c2 = block.conv1, block.conv2
    expected = F.relu(F.conv2d(x, c1.weight, c1.bias, padding=2, dilation=2))
    expected = F.relu(F.conv2d(expected, c2.weight, c2.bias, padding=2, dilation=2) + x)
    with torch.no_grad():
        torch.testing.assert_close(block(x), expected)


def test_bottleneck_depths_delegate_to_deeplab_builder(demo_cfg):
    cfg = _resnet_cfg(demo_cfg, 50, 2, 4, out_features=("res2", "res5"))
    backbone = build_resnet_dilated_backbone(cfg, ShapeSpec(channels=3))
    assert isinstance(backbone.res5[0], BottleneckBlock)
    assert backbone.output_shape()["res5"].stride == 8
    assert backbone.output_shape()["res2"].channels == 256
