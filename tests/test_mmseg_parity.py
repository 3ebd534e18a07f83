"""Our MiT + SegFormer decoder against MMSegmentation 0.22.1's, through the converter.

MMSegmentation's ``MixVisionTransformer`` and ``SegformerHead`` (the code the
official GMMSeg checkpoints were trained with) are built with random weights,
saved as an MMSegmentation ``EncoderDecoder`` checkpoint, loaded into our
``PerPixelSegmentor`` (``D2MixVisionTransformer`` + ``SegFormerHead``) by the
checkpointer, which converts it, and run on the same input: every stage's
features and the logits agree to 1e-4 relative, with no missing or unexpected
key. The reference is optional (``tests/official_mmseg.py``): without it these
tests skip with the reason.
"""
import pytest
import torch

from detectron2.modeling import build_model

from tests.official_mmseg import official_mit_class, official_segformer_head_class
from tests.test_official_gmmseg_checkpoint import load_through_checkpointer, small_cfg

NUM_CLASSES, CHANNELS = 5, 64


def _randomize(module, generator):
    """Random values everywhere, so that a swapped or transposed tensor shows."""
    with torch.no_grad():
        for name, tensor in module.state_dict().items():
            if not tensor.is_floating_point():
                continue
            if "running_var" in name:
                tensor.copy_(torch.rand(tensor.shape, generator=generator) + 0.5)
            elif name.endswith("weight") and tensor.dim() == 1:
                tensor.copy_(1 + 0.2 * torch.randn(tensor.shape, generator=generator))
            else:
                tensor.copy_(0.1 * torch.randn(tensor.shape, generator=generator))


def _relative_difference(ours, reference):
    return float((ours - reference).abs().max() / reference.abs().max())


@pytest.fixture(scope="module")
def reference_model():
    generator = torch.Generator().manual_seed(0)
    backbone = official_mit_class()(
        embed_dims=32, num_layers=[2, 2, 2, 2], num_heads=[1, 2, 5, 8], patch_sizes=[7, 3, 3, 3],
        sr_ratios=[8, 4, 2, 1], out_indices=(0, 1, 2, 3), mlp_ratio=4, qkv_bias=True, drop_rate=0.0,
        attn_drop_rate=0.0, drop_path_rate=0.1)
    head = official_segformer_head_class()(
        in_channels=[32, 64, 160, 256], in_index=[0, 1, 2, 3], channels=CHANNELS, dropout_ratio=0.1,
        num_classes=NUM_CLASSES, norm_cfg=dict(type="BN", requires_grad=True), align_corners=False)
    _randomize(backbone, generator)
    _randomize(head, generator)
    return backbone.eval(), head.eval()


@pytest.fixture(scope="module")
def converted_model(reference_model, tmp_path_factory):
    backbone, head = reference_model
    state = {**{f"backbone.{k}": v for k, v in backbone.state_dict().items()},
             **{f"decode_head.{k}": v for k, v in head.state_dict().items()}}
    path = str(tmp_path_factory.mktemp("mmseg") / "segformer_b0.pth")
    torch.save({"meta": {"mmseg_version": "0.22.1"}, "state_dict": state}, path)
    cfg = small_cfg(classifier="softmax")
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.CONVS_DIM", CHANNELS, "MODEL.SEM_SEG_HEAD.NUM_CLASSES", NUM_CLASSES])
    model = build_model(cfg)
    incompatible = load_through_checkpointer(model, path)
    return model.eval(), incompatible


def test_checkpoint_loads_with_no_missing_or_unexpected_key(converted_model):
    _, incompatible = converted_model
    assert not incompatible.missing_keys
    assert not incompatible.unexpected_keys
    assert not incompatible.incorrect_shapes


@pytest.mark.parametrize("size", [(64, 96), (65, 97)])
def test_features_and_logits_match_mmsegmentation(reference_model, converted_model, size, one_torch_thread):
    backbone, head = reference_model
    model, _ = converted_model
    torch.manual_seed(1)
    image = torch.randn(2, 3, *size)
    with torch.no_grad():
        reference_features = backbone(image)
        reference_logits = head(reference_features)
        features = model.backbone(image)
        logits = model.sem_seg_head.predictor(model.sem_seg_head.layers(features)).class_logits
    for name, reference in zip(["res2", "res3", "res4", "res5"], reference_features):
        assert features[name].shape == reference.shape
        assert _relative_difference(features[name], reference) < 1e-4, name
    assert logits.shape == reference_logits.shape
    assert _relative_difference(logits, reference_logits) < 1e-4
