"""DeepLabV3+ head (softmax / GMM classifier behind the classifier seam) and the configs under configs/."""
import glob
import os

import pytest
import torch
import torch.nn.functional as F

from detectron2.config import get_cfg
from detectron2.layers import ShapeSpec
from detectron2.modeling import build_model, build_sem_seg_head
from detectron2.projects.deeplab import DeepLabV3PlusHead
from einops import rearrange

from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.modeling.classifiers import GMMClassifier, LinearClassifier
from gmmseg_d2.modeling.gmm import GaussianMixtureClassifier
from gmmseg_d2.modeling.heads import DeepLabV3PlusClassifierHead, GMMSegDeepLabV3PlusHead, pixel_classifier_builder
from tests.conftest import REPO_ROOT

CONFIG_DIR = os.path.join(REPO_ROOT, "configs")
INPUT_SHAPE = {"res2": ShapeSpec(channels=12, stride=4), "res5": ShapeSpec(channels=24, stride=16)}


def _decoder_args(**overrides):
    """Arguments shared by Detectron2's head and ours (small sizes)."""
    kwargs = dict(project_channels=[6], aspp_dilations=[1, 2, 3], aspp_dropout=0.0,
                  decoder_channels=[10, 16], common_stride=4, norm="BN")
    kwargs.update(overrides)
    return kwargs


def _head(**overrides):
    kwargs = dict(input_shape=INPUT_SHAPE, num_classes=5, **_decoder_args())
    kwargs.update(overrides)
    return DeepLabV3PlusClassifierHead(**kwargs)


def _features(batch=2, size=(6, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    h, w = size
    return {"res2": torch.randn(batch, 12, 4 * h, 4 * w, generator=generator),
            "res5": torch.randn(batch, 24, h, w, generator=generator)}


def _builder(classifier, **gmm_kwargs):
    """The head's ``classifier`` argument (``in_channels -> classifier``) for 5 classes."""
    if classifier == "softmax":
        return lambda in_channels: LinearClassifier(in_channels, 5)
    return lambda in_channels: GMMClassifier(level="pixel", in_channels=in_channels, num_classes=5,
                                             ignore_value=255, **gmm_kwargs)


def _cfg(path):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(path)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


# ------------------------------------------------------------ vs Detectron2
@pytest.mark.parametrize("aspp_pooling", ["global", "crop"])
def test_softmax_head_computes_detectron2_deeplabv3plus(aspp_pooling):
    """Same weights → same logits and loss as Detectron2's own DeepLabV3PlusHead."""
    torch.manual_seed(0)
    train_size = (96, 128) if aspp_pooling == "crop" else None
    reference = DeepLabV3PlusHead(INPUT_SHAPE, train_size=train_size, num_classes=5,
                                  loss_type="cross_entropy", ignore_value=255, **_decoder_args())
    head = _head(aspp_pooling=aspp_pooling, train_size=train_size, ignore_value=255)
    # Same parameter/buffer names: Detectron2's state dict loads as is.
    head.load_state_dict(reference.state_dict())
    # Random BN statistics so that eval mode is not a near-identity.
    for module in reference.modules():
        if isinstance(module, torch.nn.BatchNorm2d):
            module.running_mean.uniform_(-0.5, 0.5)
            module.running_var.uniform_(0.5, 2.0)
    head.load_state_dict(reference.state_dict())

    features = _features(size=(6, 8))  # 96x128 input at stride 16
    reference.eval(), head.eval()
    with torch.no_grad():
        expected, _ = reference(features)
        outputs, extra = head(features)
    assert extra == {}
    assert outputs["sem_seg"].shape == (2, 5, 96, 128)
    torch.testing.assert_close(outputs["sem_seg"], expected)

    targets = torch.randint(0, 5, (2, 96, 128), generator=torch.Generator().manual_seed(1))
    targets[:, :10] = 255
    reference.train(), head.train()
    _, expected_losses = reference(features, targets)
    _, losses = head(features, targets)
    assert set(losses) == {"loss_sem_seg"}
    torch.testing.assert_close(losses["loss_sem_seg"], expected_losses["loss_sem_seg"])


def test_crop_pooling_rejects_test_sizes_like_detectron2_but_global_does_not():
    crop = _head(aspp_pooling="crop", train_size=(96, 128)).eval()
    anywhere = _head().eval()
    odd = _features(batch=1, size=(5, 7))
    with pytest.raises(ValueError, match="pool_kernel_size"), torch.no_grad():
        crop(odd)
    with torch.no_grad():
        outputs, _ = anywhere(odd)
    assert outputs["sem_seg"].shape == (1, 5, 80, 112)


# ------------------------------------------------------------- both heads
@pytest.mark.parametrize("classifier", ["softmax", "gmm"])
def test_head_output_shapes(classifier):
    head = _head(classifier=_builder(classifier, embed_dim=8, num_components=3, memory_size=20),
                 dropout=0.1).eval()
    assert isinstance(head.predictor, GaussianMixtureClassifier) == (classifier == "gmm")
    assert isinstance(head.predictor, LinearClassifier) == (classifier == "softmax")
    assert head.predictor.in_channels == 10  # the channels of the decoder output (decoder_channels[0], res2)
    with torch.no_grad():
        outputs, _ = head(_features(batch=3, size=(3, 5)))
    assert outputs["sem_seg"].shape == (3, 5, 48, 80)
    assert outputs["anomaly_score"].shape == (3, 48, 80)
    assert torch.isfinite(outputs["anomaly_score"]).all()


def test_gmm_head_losses_and_density_score():
    torch.manual_seed(0)
    head = _head(classifier=_builder("gmm", embed_dim=8, num_components=3, memory_size=20,
                                     update_interval=1)).train()
    features = _features(size=(4, 4))
    targets = torch.randint(0, 5, (2, 64, 64))
    _, losses = head(features, targets)
    assert set(losses) == {"loss_sem_seg", "loss_gmm_component"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()
    assert int(head.predictor.iteration) == 1 and not head.predictor.memory.pending.any()  # the EM step ran

    head.eval()
    with torch.no_grad():
        outputs, _ = head(features)
        # The algorithm on the channels-last decoder features, independently of the seam.
        direct = GaussianMixtureClassifier.forward(
            head.predictor, rearrange(head.decoder_features(features), "b c h w -> b h w c"))
    density = -direct.class_log_likelihood.amax(dim=-1)
    torch.testing.assert_close(outputs["sem_seg"], F.interpolate(
        rearrange(direct.class_logits, "b h w k -> b k h w"), size=(64, 64), mode="bilinear", align_corners=False))
    expected = F.interpolate(density[:, None], size=(64, 64), mode="bilinear",
                             align_corners=False)[:, 0]
    torch.testing.assert_close(outputs["anomaly_score"], expected)


def test_hard_pixel_mining_loss():
    head = _head(loss_type="hard_pixel_mining").train()
    features = _features(size=(4, 4))
    targets = torch.randint(0, 5, (2, 64, 64))
    _, losses = head(features, targets)
    logits = F.interpolate(head.predictor(head.decoder_features(features)).class_logits, size=(64, 64),
                           mode="bilinear", align_corners=False)
    pixel_losses = F.cross_entropy(logits, targets, reduction="none").flatten()
    top = pixel_losses.topk(int(0.2 * pixel_losses.numel())).values
    torch.testing.assert_close(losses["loss_sem_seg"], top.mean())


def test_head_argument_errors():
    cfg = _cfg(os.path.join(CONFIG_DIR, "mosaic", "deeplabv3plus_R18_softmax.yaml"))
    with pytest.raises(ValueError, match="COMMON_STRIDE \\(8\\) must equal .* \\(4\\)"):
        _head(common_stride=8)
    with pytest.raises(ValueError, match="ASPP_POOLING 'image'"):
        _head(aspp_pooling="image")
    with pytest.raises(ValueError, match="'crop' needs the training crop size"):
        _head(aspp_pooling="crop")
    with pytest.raises(ValueError, match="LOSS_TYPE 'focal'"):
        _head(loss_type="focal")
    cfg.MODEL.CLASSIFIER.NAME = "linear"
    with pytest.raises(KeyError, match=r"MODEL.CLASSIFIER.NAME 'linear'; registered classifiers: .*'gmm'.*'softmax'"):
        _head(classifier=pixel_classifier_builder(cfg))
    cfg.MODEL.CLASSIFIER.NAME = "softmax"
    cfg.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE = "odin"
    with pytest.raises(ValueError, match="ANOMALY_SCORE 'odin'"):
        _head(classifier=pixel_classifier_builder(cfg))
    with pytest.raises(ValueError, match="not backbone outputs"):
        _head(in_features=["res2", "res4"])


# ---------------------------------------------------------------- configs
# Per-pixel configs only: Mask2Former ones (configs/*/semantic-segmentation/,
# configs/mosaic/*maskformer2*) are checked in test_official_configs.py and
# test_maskformer2_config.py.
ALL_CONFIGS = sorted(
    p for p in glob.glob(os.path.join(CONFIG_DIR, "**", "*.yaml"), recursive=True)
    if "semantic-segmentation" not in p.split(os.sep) and "maskformer2" not in os.path.basename(p))


def test_config_dirs_hold_the_paper_settings():
    names = {os.path.relpath(p, CONFIG_DIR) for p in ALL_CONFIGS}
    for dataset in ("ade20k", "cityscapes", "coco_stuff"):
        for variant in ("deeplabv3plus_R101_softmax", "deeplabv3plus_R101_gmm",
                        "fcn_R101_softmax", "fcn_R101_gmm"):
            assert f"{dataset}/{variant}.yaml" in names
    assert {"mosaic/deeplabv3plus_R18_softmax.yaml", "mosaic/deeplabv3plus_R18_gmm.yaml"} <= names
    assert {f"textures/{head}_R18_{kind}.yaml" for head in ("fcn", "deeplabv3plus")
            for kind in ("softmax", "gmm")} <= names


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=lambda p: os.path.relpath(p, CONFIG_DIR))
def test_every_config_parses(path):
    cfg = _cfg(path)
    cfg.freeze()
    assert cfg.MODEL.META_ARCHITECTURE == "PerPixelSegmentor"
    if not os.path.basename(path).startswith("Base-"):
        assert cfg.MODEL.SEM_SEG_HEAD.NAME in ("FCNHead", "DeepLabV3PlusClassifierHead", "SegFormerHead")
        assert cfg.MODEL.CLASSIFIER.NAME == ("gmm" if "gmm" in path else "softmax")
    assert "CLASSIFIER" not in cfg.MODEL.SEM_SEG_HEAD  # the former key
    # Weights are local paths: nothing is downloaded at run time.
    assert "://" not in cfg.MODEL.WEIGHTS


@pytest.mark.parametrize("classifier", ["softmax", "gmm"])
def test_mosaic_deeplab_models(classifier):
    cfg = _cfg(os.path.join(CONFIG_DIR, "mosaic", f"deeplabv3plus_R18_{classifier}.yaml"))
    torch.manual_seed(0)
    model = build_model(cfg).train()
    assert isinstance(model.sem_seg_head, DeepLabV3PlusClassifierHead)
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
               "sem_seg": torch.randint(0, 8, (64, 64))} for _ in range(2)]
    losses = model(inputs)
    expected = {"loss_sem_seg"} | ({"loss_gmm_component"} if classifier == "gmm" else set())
    assert set(losses) == expected
    assert all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        outputs = model([{"image": torch.randint(0, 255, (3, 72, 100), dtype=torch.uint8)}])
    assert outputs[0]["sem_seg"].shape == (8, 72, 100)
    assert outputs[0]["anomaly_score"].shape == (72, 100)


def test_paper_configs_build_with_their_class_counts():
    """One R101 model is built; every paper config's head is built on its feature shapes."""
    paper = [p for p in ALL_CONFIGS if os.path.basename(os.path.dirname(p)) not in ("mosaic", "textures", "own_data", "segformer")
             and not os.path.basename(p).startswith("Base-")]
    assert len(paper) == 12
    cfg = _cfg(os.path.join(CONFIG_DIR, "cityscapes", "deeplabv3plus_R101_gmm.yaml"))
    cfg.MODEL.GMM.MEMORY_SIZE = 8  # the default 32000 slots are 0.78 GB
    assert cfg.TEST.SLIDING_WINDOW.ENABLED and tuple(cfg.TEST.SLIDING_WINDOW.WINDOW) == (1024, 1024)
    # Small windows for the tiny test input: a 1024x1024 window on R101 takes ~20 s on CPU.
    cfg.TEST.SLIDING_WINDOW.WINDOW, cfg.TEST.SLIDING_WINDOW.STRIDE = (48, 48), (32, 32)
    model = build_model(cfg).eval()
    assert model.backbone.output_shape()["res5"].stride == 8  # dilated, output stride 8
    with torch.no_grad():
        outputs = model([{"image": torch.randint(0, 255, (3, 48, 80), dtype=torch.uint8)}])
    assert outputs[0]["sem_seg"].shape == (19, 48, 80)
    assert outputs[0]["anomaly_score"].shape == (48, 80)

    shapes = model.backbone.output_shape()
    for path in paper:
        cfg = _cfg(path)
        cfg.MODEL.GMM.MEMORY_SIZE = 8
        assert set(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES) <= set(cfg.MODEL.RESNETS.OUT_FEATURES)
        head = build_sem_seg_head(cfg, shapes)
        num_classes = {"ade20k": 150, "cityscapes": 19, "coco_stuff": 171}[
            os.path.basename(os.path.dirname(path))]
        predictor = head.predictor
        assert isinstance(predictor, GMMClassifier if cfg.MODEL.CLASSIFIER.NAME == "gmm" else LinearClassifier), path
        assert predictor.level == "pixel" and predictor.num_classes == num_classes, path
        if isinstance(predictor, LinearClassifier):
            assert predictor.weight.shape[0] == num_classes, path


def test_former_registry_name_builds_the_same_head():
    """Configs written before the rename name the head GMMSegDeepLabV3PlusHead: still the same class."""
    from detectron2.modeling import SEM_SEG_HEADS_REGISTRY

    assert GMMSegDeepLabV3PlusHead is DeepLabV3PlusClassifierHead
    assert SEM_SEG_HEADS_REGISTRY.get("GMMSegDeepLabV3PlusHead") is DeepLabV3PlusClassifierHead
    cfg = _cfg(os.path.join(CONFIG_DIR, "mosaic", "deeplabv3plus_R18_softmax.yaml"))
    cfg.MODEL.SEM_SEG_HEAD.NAME = "GMMSegDeepLabV3PlusHead"
    torch.manual_seed(0)
    old = build_model(cfg)
    cfg.MODEL.SEM_SEG_HEAD.NAME = "DeepLabV3PlusClassifierHead"
    torch.manual_seed(0)
    new = build_model(cfg)
    assert type(old.sem_seg_head) is DeepLabV3PlusClassifierHead
    # Same parameter names and values: a checkpoint of either loads into the other.
    old_state, new_state = old.state_dict(), new.state_dict()
    assert old_state.keys() == new_state.keys()
    assert all(torch.equal(old_state[k], new_state[k]) for k in old_state)

