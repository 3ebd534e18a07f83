"""projects/GSS/configs: the official recipes' values, and a model built from the Swin wiring."""
import glob
import os

import pytest
import torch
from detectron2.config import get_cfg
from detectron2.modeling import build_model

from gmmseg_d2.config import add_gmmseg_config
from gss import add_gss_config, build_palette
from tests.projects.conftest import GSS_ROOT

CONFIGS = sorted(glob.glob(os.path.join(GSS_ROOT, "configs", "*", "gss_*.yaml")))


def _load(path, *opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    add_gss_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def _config(relative):
    return os.path.join(GSS_ROOT, "configs", relative)


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, GSS_ROOT) for p in CONFIGS])
def test_every_config_loads_with_a_valid_palette(path):
    cfg = _load(path)
    assert cfg.MODEL.META_ARCHITECTURE == "GenerativeSemanticSegmentor"
    gss = cfg.MODEL.GSS
    palette = build_palette(gss.MASKIGE.PALETTE_KIND, gss.NUM_CLASSES, gss.MASKIGE.PALETTE, seed=gss.MASKIGE.SEED)
    assert palette.shape == (gss.NUM_CLASSES + 1, 3)
    assert set(gss.IN_FEATURES) <= set(cfg.MODEL.SWIN.OUT_FEATURES if "Swin" in cfg.MODEL.BACKBONE.NAME
                                       else cfg.MODEL.RESNETS.OUT_FEATURES)
    if gss.TRAIN_STAGE == "posterior":
        assert gss.INVERSE.NAME in ("conv", "swin") and not gss.AUX.ENABLED
        assert cfg.MODEL.WEIGHTS.endswith("model_final.pth")  # the stage-II checkpoint
    else:
        assert gss.INVERSE.NAME == "nearest" and gss.AUX.ENABLED


@pytest.mark.parametrize("relative, lr, iters, batch, crop, classes, prior_depth", [
    ("ade20k/gss_ff_swin_large_160k.yaml", 1.2e-4, 160000, 32, 512, 150, 2),
    ("cityscapes/gss_ff_R101_80k.yaml", 1.5e-3, 80000, 16, 768, 19, 6),
    ("cityscapes/gss_ff_swin_large_80k.yaml", 1.5e-3, 80000, 16, 768, 19, 2),
])
def test_stage_two_recipes_are_the_official_ones(relative, lr, iters, batch, crop, classes, prior_depth):
    cfg = _load(_config(relative))
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.WEIGHT_DECAY == 0.01
    assert cfg.SOLVER.BASE_LR == pytest.approx(lr) and cfg.SOLVER.MAX_ITER == iters
    assert cfg.SOLVER.IMS_PER_BATCH == batch and tuple(cfg.INPUT.CROP.SIZE) == (crop, crop)
    assert cfg.SOLVER.LR_SCHEDULER_NAME == "WarmupPolyLR" and cfg.SOLVER.WARMUP_ITERS == 1500
    gss = cfg.MODEL.GSS
    assert gss.NUM_CLASSES == classes and gss.PRIOR.SWIN_DEPTH == prior_depth
    assert (gss.PRIOR.LEVEL_DIM, gss.PRIOR.EMBED_DIM, gss.PRIOR.HIDDEN_DIM) == (384, 512, 2048)
    assert (gss.PRIOR.SWIN_HEADS, gss.PRIOR.SWIN_WINDOW, gss.PRIOR.SWIN_MLP_RATIO) == (16, 7, 2.0)
    assert gss.PRIOR_LOSS_WEIGHT == 0.8 and gss.AUX.LOSS_WEIGHT == 0.2 and gss.LABEL_UPSAMPLE == 2
    assert gss.VQVAE.NAME == "dalle" and gss.MASKIGE.PALETTE_KIND == "fixed"
    if relative.startswith("cityscapes"):
        window = cfg.TEST.SLIDING_WINDOW
        assert window.ENABLED and tuple(window.WINDOW) == (768, 768) and tuple(window.STRIDE) == (512, 512)


@pytest.mark.parametrize("relative, depth", [
    ("ade20k/gss_ftw_swin_large_40k.yaml", 2), ("cityscapes/gss_ftw_swin_large_40k.yaml", 1),
    ("cityscapes/gss_ftw_R101_80k.yaml", 1),
])
def test_ftw_stages_use_the_official_swin_inverse(relative, depth):
    inverse = _load(_config(relative)).MODEL.GSS.INVERSE
    assert (inverse.NAME, inverse.DIM, inverse.SWIN_DEPTH, inverse.SWIN_HEADS, inverse.SWIN_WINDOW) == (
        "swin", 128, depth, 4, 7)


def test_ade20k_palette_is_the_official_one():
    palette = _load(_config("ade20k/gss_ff_swin_large_160k.yaml")).MODEL.GSS.MASKIGE.PALETTE
    # Spot checks of fudan-zvg/GSS's list: first, a middle one, the last three.
    assert list(palette[0]) == [222, 222, 145] and list(palette[75]) == [128, 110, 183]
    assert [list(colour) for colour in palette[-3:]] == [[0, 0, 0], [255, 255, 255], [215, 216, 196]]


def test_swin_config_builds_and_trains_a_step():
    """The Cityscapes Swin-L wiring at toy widths: Swin res2..res5 → prior grid at stride 4."""
    cfg = _load(
        _config("cityscapes/gss_ff_swin_large_80k.yaml"),
        "MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "",
        "MODEL.SWIN.EMBED_DIM", "16", "MODEL.SWIN.DEPTHS", "[1, 1, 1, 1]", "MODEL.SWIN.NUM_HEADS", "[1, 1, 2, 2]",
        "MODEL.SWIN.WINDOW_SIZE", "4",
        "MODEL.GSS.PRIOR.LEVEL_DIM", "8", "MODEL.GSS.PRIOR.EMBED_DIM", "16", "MODEL.GSS.PRIOR.SWIN_HEADS", "2",
        "MODEL.GSS.PRIOR.HIDDEN_DIM", "16", "MODEL.GSS.PRIOR.NORM", "BN", "MODEL.GSS.AUX.DIM", "8",
        # No DALL-E files here: the small VQ-VAE, untrained, behind the same interface.
        "MODEL.GSS.VQVAE.NAME", "maskige", "MODEL.GSS.VQVAE.VOCAB_SIZE", "64", "MODEL.GSS.VQVAE.HIDDEN_DIM", "16",
        "MODEL.GSS.VQVAE.CODE_DIM", "8", "MODEL.GSS.VQVAE.WEIGHTS", "",
        "TEST.SLIDING_WINDOW.WINDOW", "(64, 64)", "TEST.SLIDING_WINDOW.STRIDE", "(48, 48)")
    with pytest.raises(ValueError, match="train one first"):
        build_model(cfg)
    cfg.MODEL.WEIGHTS = "a stage-II checkpoint carrying the VQ-VAE"  # build_model does not load it
    torch.manual_seed(0)
    model = build_model(cfg).train()
    generator = torch.Generator().manual_seed(0)
    label = torch.randint(0, 19, (64, 96), generator=generator)
    label[:16] = 255
    records = [{"image": torch.rand(3, 64, 96, generator=generator) * 255, "sem_seg": label}]
    losses = model(records)
    assert set(losses) == {"loss_prior", "loss_aux"}
    sum(losses.values()).backward()
    assert model.prior.classifier.weight.grad is not None
    model.eval()
    output = model([{"image": records[0]["image"], "height": 64, "width": 96}])[0]
    assert output["sem_seg"].shape == (19, 64, 96) and output["anomaly_score"].shape == (64, 96)
