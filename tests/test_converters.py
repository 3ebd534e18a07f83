"""tools/convert-*-to-d2.py: published checkpoint formats → Detectron2 .pkl → backbones."""
import importlib.util
import os
import pickle

import numpy as np
import pytest
import torch
import torchvision

from detectron2.checkpoint import DetectionCheckpointer
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_backbone
from detectron2.modeling.backbone.resnet import build_resnet_backbone

from tests.conftest import REPO_ROOT
from tests.test_swin_backbone import official_swin_shapes, swin_cfg


def _load_tool(file_name):
    spec = importlib.util.spec_from_file_location(file_name.replace("-", "_")[:-3],
                                                  os.path.join(REPO_ROOT, "tools", file_name))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _load_pkl(model, path):
    """Load ``path`` as DetectionCheckpointer does; return its incompatible keys."""
    checkpointer = DetectionCheckpointer(model)
    return checkpointer._load_model(checkpointer._load_file(path))


def _randomize_batch_norms(model):
    with torch.no_grad():
        for module in model.modules():
            if isinstance(module, torch.nn.BatchNorm2d):
                module.weight.uniform_(0.5, 1.5)
                module.bias.normal_(0, 0.1)
                module.running_mean.normal_(0, 0.1)
                module.running_var.uniform_(0.5, 1.5)


@pytest.mark.parametrize("depth,norm", [(50, "FrozenBN"), (18, "BN")])
def test_torchvision_resnet_converts_loads_and_matches(demo_cfg, tmp_path, depth, norm, one_torch_thread):
    torch.manual_seed(0)
    reference = getattr(torchvision.models, f"resnet{depth}")(weights=None)
    _randomize_batch_norms(reference)
    reference.eval()
    pth, pkl = str(tmp_path / "resnet.pth"), str(tmp_path / "resnet.pkl")
    torch.save(reference.state_dict(), pth)
    _load_tool("convert-torchvision-to-d2.py").main([pth, pkl])

    with open(pkl, "rb") as f:
        written = pickle.load(f)
    assert written["__author__"] == "torchvision" and written["matching_heuristics"] is True
    assert all(isinstance(v, np.ndarray) for v in written["model"].values())

    cfg = demo_cfg.clone()
    cfg.MODEL.RESNETS.DEPTH = depth
    cfg.MODEL.RESNETS.RES2_OUT_CHANNELS = 256 if depth >= 50 else 64
    cfg.MODEL.RESNETS.STRIDE_IN_1X1 = False  # torchvision strides in the 3x3 conv
    cfg.MODEL.RESNETS.RES4_DILATION = 1
    cfg.MODEL.RESNETS.RES5_DILATION = 1
    cfg.MODEL.RESNETS.NORM = norm
    cfg.MODEL.BACKBONE.FREEZE_AT = 0
    cfg.MODEL.RESNETS.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    backbone = build_resnet_backbone(cfg, ShapeSpec(channels=3)).eval()
    incompatible = _load_pkl(backbone, pkl)
    assert incompatible.missing_keys == []
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []

    x = torch.randn(2, 3, 64, 96)
    with torch.no_grad():
        ours = backbone(x)
        y = reference.maxpool(reference.relu(reference.bn1(reference.conv1(x))))
        for stage in range(1, 5):
            y = getattr(reference, f"layer{stage}")(y)
            torch.testing.assert_close(ours[f"res{stage + 1}"], y, rtol=1e-4, atol=1e-4)


def test_torchvision_renaming_rules():
    rename = _load_tool("convert-torchvision-to-d2.py").torchvision_to_d2_name
    assert rename("conv1.weight") == "stem.conv1.weight"
    assert rename("bn1.running_var") == "stem.conv1.norm.running_var"
    assert rename("layer1.0.bn3.bias") == "res2.0.conv3.norm.bias"
    assert rename("layer4.2.conv2.weight") == "res5.2.conv2.weight"
    assert rename("layer2.0.downsample.0.weight") == "res3.0.shortcut.weight"
    assert rename("layer3.0.downsample.1.running_mean") == "res4.0.shortcut.norm.running_mean"


def _official_swin_release(embed_dim, depths, heads, window, num_classes=10):
    """A random state dict in the layout of Microsoft's ImageNet Swin releases."""
    generator = torch.Generator().manual_seed(0)
    shapes = official_swin_shapes(embed_dim, depths, heads, window)
    state = {}
    for name, shape in shapes.items():
        if name.startswith("norm") and name[4].isdigit():
            continue  # classification models have a single final norm instead
        if name.endswith("relative_position_index"):
            state[name] = torch.randint(0, (2 * window - 1) ** 2, shape, generator=generator)
        else:
            state[name] = torch.randn(shape, generator=generator)
    width = embed_dim * 2 ** (len(depths) - 1)
    state.update({"norm.weight": torch.randn(width), "norm.bias": torch.randn(width),
                  "head.weight": torch.randn(num_classes, width), "head.bias": torch.randn(num_classes)})
    for stage, depth in enumerate(depths[:-1]):  # shifted blocks of the fixed-size model
        for block in range(1, depth, 2):
            state[f"layers.{stage}.blocks.{block}.attn_mask"] = torch.zeros(4, window ** 2, window ** 2)
    return state


def test_swin_release_converts_and_loads(tmp_path, one_torch_thread):
    # Swin-T's layout (depths 2-2-6-2, window 7) at a smaller width.
    dims = dict(EMBED_DIM=32, DEPTHS=[2, 2, 6, 2], NUM_HEADS=[1, 2, 4, 8], WINDOW_SIZE=7)
    release = _official_swin_release(32, [2, 2, 6, 2], [1, 2, 4, 8], 7)
    pth, pkl = str(tmp_path / "swin.pth"), str(tmp_path / "swin.pkl")
    torch.save({"model": release}, pth)
    _load_tool("convert-pretrained-swin-model-to-d2.py").main([pth, pkl])

    with open(pkl, "rb") as f:
        written = pickle.load(f)
    assert written["__author__"] == "third_party" and written["matching_heuristics"] is True
    dropped = {k for k in release if k.startswith(("head.", "norm.")) or k.endswith("attn_mask")}
    assert len(dropped) == 2 + 2 + 5  # head, final norm, attn_mask of 5 shifted blocks
    assert set(written["model"]) == set(release) - dropped

    backbone = build_backbone(swin_cfg(**dims))
    incompatible = _load_pkl(backbone, pkl)
    assert incompatible.unexpected_keys == []
    assert incompatible.incorrect_shapes == []
    # Only the output norms, which ImageNet classifiers do not have.
    assert sorted(incompatible.missing_keys) == sorted(f"norm{i}.{p}" for i in range(4) for p in ("weight", "bias"))
    loaded = backbone.state_dict()
    for name, value in release.items():
        if name not in dropped:
            assert torch.equal(loaded[name], value), name


def test_mask2former_swin_backbone_keys_load_strictly(tmp_path):
    """Official D2SwinTransformer names (norm0..3 included) load with nothing left over."""
    dims = dict(EMBED_DIM=24, DEPTHS=[2, 2, 2, 2], NUM_HEADS=[2, 2, 4, 4], WINDOW_SIZE=4)
    backbone = build_backbone(swin_cfg(**dims))
    shapes = official_swin_shapes(24, [2, 2, 2, 2], [2, 2, 4, 4], 4)
    state = {name: torch.randn(shape) for name, shape in shapes.items()}
    state = {name: (backbone.state_dict()[name] if name.endswith("index") else value)
             for name, value in state.items()}
    backbone.load_state_dict(state, strict=True)


def test_swin_converter_rejects_other_layouts(tmp_path):
    tool = _load_tool("convert-pretrained-swin-model-to-d2.py")
    timm_like = {"patch_embed.proj.weight": torch.zeros(1), "layers.1.downsample.reduction.weight": torch.zeros(1)}
    with pytest.raises(ValueError, match="timm"):
        tool.convert_swin_state_dict(timm_like)
    path = str(tmp_path / "other.pth")
    torch.save({"state": {"a": torch.zeros(1)}, "epoch": 3}, path)
    with pytest.raises(ValueError, match="no 'model' entry"):
        tool.load_state_dict(path, trust_pickle=False)
    with pytest.raises(ValueError, match="patch_embed"):
        tool.convert_swin_state_dict({"a": torch.zeros(1)})
