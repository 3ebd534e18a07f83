"""Mask2Former's config keys: same names and defaults as the official
add_maskformer2_config, official-style YAML files merge, our configs still load."""
import argparse
import glob
import os

import pytest

from detectron2.config import CfgNode, get_cfg
from detectron2.projects.deeplab import add_deeplab_config

from gmmseg_d2.config import add_gmmseg_config, add_maskformer2_config
from gmmseg_d2.engine import setup_cfg
from tests.conftest import REPO_ROOT

#: Every key of facebookresearch/Mask2Former mask2former/config.py with its default.
OFFICIAL_MASKFORMER2_DEFAULTS = {
    "INPUT.DATASET_MAPPER_NAME": "mask_former_semantic",
    "INPUT.COLOR_AUG_SSD": False,
    "INPUT.CROP.SINGLE_CATEGORY_MAX_AREA": 1.0,
    "INPUT.SIZE_DIVISIBILITY": -1,
    "SOLVER.WEIGHT_DECAY_EMBED": 0.0,
    "SOLVER.OPTIMIZER": "ADAMW",
    "SOLVER.BACKBONE_MULTIPLIER": 0.1,
    "MODEL.MASK_FORMER.DEEP_SUPERVISION": True,
    "MODEL.MASK_FORMER.NO_OBJECT_WEIGHT": 0.1,
    "MODEL.MASK_FORMER.CLASS_WEIGHT": 1.0,
    "MODEL.MASK_FORMER.DICE_WEIGHT": 1.0,
    "MODEL.MASK_FORMER.MASK_WEIGHT": 20.0,
    "MODEL.MASK_FORMER.NHEADS": 8,
    "MODEL.MASK_FORMER.DROPOUT": 0.1,
    "MODEL.MASK_FORMER.DIM_FEEDFORWARD": 2048,
    "MODEL.MASK_FORMER.ENC_LAYERS": 0,
    "MODEL.MASK_FORMER.DEC_LAYERS": 6,
    "MODEL.MASK_FORMER.PRE_NORM": False,
    "MODEL.MASK_FORMER.HIDDEN_DIM": 256,
    "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES": 100,
    "MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE": "res5",
    "MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ": False,
    "MODEL.MASK_FORMER.TEST.SEMANTIC_ON": True,
    "MODEL.MASK_FORMER.TEST.INSTANCE_ON": False,
    "MODEL.MASK_FORMER.TEST.PANOPTIC_ON": False,
    "MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD": 0.0,
    "MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD": 0.0,
    "MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE": False,
    "MODEL.MASK_FORMER.SIZE_DIVISIBILITY": 32,
    "MODEL.SEM_SEG_HEAD.MASK_DIM": 256,
    "MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS": 0,
    "MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME": "BasePixelDecoder",
    "MODEL.SWIN.PRETRAIN_IMG_SIZE": 224,
    "MODEL.SWIN.PATCH_SIZE": 4,
    "MODEL.SWIN.EMBED_DIM": 96,
    "MODEL.SWIN.DEPTHS": [2, 2, 6, 2],
    "MODEL.SWIN.NUM_HEADS": [3, 6, 12, 24],
    "MODEL.SWIN.WINDOW_SIZE": 7,
    "MODEL.SWIN.MLP_RATIO": 4.0,
    "MODEL.SWIN.QKV_BIAS": True,
    "MODEL.SWIN.QK_SCALE": None,
    "MODEL.SWIN.DROP_RATE": 0.0,
    "MODEL.SWIN.ATTN_DROP_RATE": 0.0,
    "MODEL.SWIN.DROP_PATH_RATE": 0.3,
    "MODEL.SWIN.APE": False,
    "MODEL.SWIN.PATCH_NORM": True,
    "MODEL.SWIN.OUT_FEATURES": ["res2", "res3", "res4", "res5"],
    "MODEL.SWIN.USE_CHECKPOINT": False,
    "MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME": "MultiScaleMaskedTransformerDecoder",
    "INPUT.IMAGE_SIZE": 1024,
    "INPUT.MIN_SCALE": 0.1,
    "INPUT.MAX_SCALE": 2.0,
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES": ["res3", "res4", "res5"],
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS": 4,
    "MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS": 8,
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS": 12544,
    "MODEL.MASK_FORMER.OVERSAMPLE_RATIO": 3.0,
    "MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO": 0.75,
}


def _flatten(node: CfgNode, prefix: str = "") -> dict:
    flat = {}
    for key, value in node.items():
        if isinstance(value, CfgNode):
            flat.update(_flatten(value, f"{prefix}{key}."))
        else:
            flat[prefix + key] = value
    return flat


def _same(a, b) -> bool:
    return type(a) is type(b) and a == b


def test_add_maskformer2_config_has_the_official_keys_and_defaults_and_ours():
    # Mask2Former's train_net.py: add_deeplab_config, then add_maskformer2_config.
    base = get_cfg()
    add_deeplab_config(base)
    cfg = base.clone()
    add_maskformer2_config(cfg)
    flat, flat_base = _flatten(cfg), _flatten(base)
    for key, value in OFFICIAL_MASKFORMER2_DEFAULTS.items():
        assert key in flat, key
        assert _same(flat[key], value), (key, flat[key], value)
    # No default of Detectron2 or its DeepLab project changes, except those
    # the official function sets itself.
    changed = {k for k in flat_base if not _same(flat[k], flat_base[k])}
    assert changed <= set(OFFICIAL_MASKFORMER2_DEFAULTS), changed
    # Beyond the official keys, exactly gmmseg_d2's: the config is
    # add_gmmseg_config's, key for key and value for value (with or without
    # the DeepLab keys added first).
    ours = get_cfg()
    add_gmmseg_config(ours)
    alone = get_cfg()
    add_maskformer2_config(alone)
    assert _flatten(ours) == flat == _flatten(alone)
    assert {"MODEL.MASK_FORMER.TEST.ANOMALY_SCORE", "MODEL.CLASSIFIER.NAME", "MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS",
            "MODEL.GMM.EMBED_DIM", "MODEL.GMM.QUERY.MEMORY_SIZE",
            "TEST.SLIDING_WINDOW.ENABLED"} <= set(flat) - set(OFFICIAL_MASKFORMER2_DEFAULTS) - set(flat_base)
    # The keys the classifier seam replaced are gone; merging one names its successor (test_classifier_seam.py).
    assert not {"MODEL.MASK_FORMER.CLASSIFIER", "MODEL.SEM_SEG_HEAD.CLASSIFIER",
                "MODEL.MASK_FORMER.GMM_MEMORY_SIZE"} & set(flat)


def test_add_gmmseg_config_keeps_the_official_defaults():
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    flat = _flatten(cfg)
    for key, value in OFFICIAL_MASKFORMER2_DEFAULTS.items():
        assert _same(flat[key], value), (key, flat[key], value)


# An official-style semantic-segmentation config pair (layout of Mask2Former's
# configs/ade20k/semantic-segmentation/Base-ADE20K-SemanticSegmentation.yaml,
# maskformer2_R50_bs16_160k.yaml and swin/maskformer2_swin_tiny_bs16_160k.yaml).
OFFICIAL_STYLE_BASE = """\
MODEL:
  BACKBONE:
    FREEZE_AT: 0
    NAME: "build_resnet_backbone"
  WEIGHTS: "detectron2://ImageNetPretrained/torchvision/R-50.pkl"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
  RESNETS:
    DEPTH: 50
    STEM_TYPE: "basic"
    STEM_OUT_CHANNELS: 64
    STRIDE_IN_1X1: False
    OUT_FEATURES: ["res2", "res3", "res4", "res5"]
    RES5_MULTI_GRID: [1, 1, 1]
DATASETS:
  TRAIN: ("ade20k_sem_seg_train",)
  TEST: ("ade20k_sem_seg_val",)
SOLVER:
  IMS_PER_BATCH: 16
  BASE_LR: 0.0001
  MAX_ITER: 160000
  WARMUP_FACTOR: 1.0
  WARMUP_ITERS: 0
  WEIGHT_DECAY: 0.05
  OPTIMIZER: "ADAMW"
  LR_SCHEDULER_NAME: "WarmupPolyLR"
  BACKBONE_MULTIPLIER: 0.1
  CLIP_GRADIENTS:
    ENABLED: True
    CLIP_TYPE: "full_model"
    CLIP_VALUE: 0.01
    NORM_TYPE: 2.0
  AMP:
    ENABLED: True
INPUT:
  MIN_SIZE_TRAIN: !!python/object/apply:eval ["[int(x * 0.1 * 512) for x in range(5, 21)]"]
  MIN_SIZE_TRAIN_SAMPLING: "choice"
  MIN_SIZE_TEST: 512
  MAX_SIZE_TRAIN: 2048
  MAX_SIZE_TEST: 2048
  CROP:
    ENABLED: True
    TYPE: "absolute"
    SIZE: (512, 512)
    SINGLE_CATEGORY_MAX_AREA: 1.0
  COLOR_AUG_SSD: True
  SIZE_DIVISIBILITY: 512
  FORMAT: "RGB"
  DATASET_MAPPER_NAME: "mask_former_semantic"
TEST:
  EVAL_PERIOD: 5000
  AUG:
    ENABLED: False
    MIN_SIZES: [256, 384, 512, 640, 768, 896]
    MAX_SIZE: 3584
    FLIP: True
DATALOADER:
  FILTER_EMPTY_ANNOTATIONS: True
  NUM_WORKERS: 4
VERSION: 2
"""

OFFICIAL_STYLE_R50 = """\
_BASE_: Base-ADE20K-SemanticSegmentation.yaml
MODEL:
  META_ARCHITECTURE: "MaskFormer"
  SEM_SEG_HEAD:
    NAME: "MaskFormerHead"
    IGNORE_VALUE: 255
    NUM_CLASSES: 150
    LOSS_WEIGHT: 1.0
    CONVS_DIM: 256
    MASK_DIM: 256
    NORM: "GN"
    PIXEL_DECODER_NAME: "MSDeformAttnPixelDecoder"
    IN_FEATURES: ["res2", "res3", "res4", "res5"]
    DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES: ["res3", "res4", "res5"]
    COMMON_STRIDE: 4
    TRANSFORMER_ENC_LAYERS: 6
  MASK_FORMER:
    TRANSFORMER_DECODER_NAME: "MultiScaleMaskedTransformerDecoder"
    TRANSFORMER_IN_FEATURE: "multi_scale_pixel_decoder"
    DEEP_SUPERVISION: True
    NO_OBJECT_WEIGHT: 0.1
    CLASS_WEIGHT: 2.0
    MASK_WEIGHT: 5.0
    DICE_WEIGHT: 5.0
    HIDDEN_DIM: 256
    NUM_OBJECT_QUERIES: 100
    NHEADS: 8
    DROPOUT: 0.0
    DIM_FEEDFORWARD: 2048
    ENC_LAYERS: 0
    PRE_NORM: False
    ENFORCE_INPUT_PROJ: False
    SIZE_DIVISIBILITY: 32
    DEC_LAYERS: 10
    TRAIN_NUM_POINTS: 12544
    OVERSAMPLE_RATIO: 3.0
    IMPORTANCE_SAMPLE_RATIO: 0.75
    TEST:
      SEMANTIC_ON: True
      INSTANCE_ON: False
      PANOPTIC_ON: False
      OVERLAP_THRESHOLD: 0.8
      OBJECT_MASK_THRESHOLD: 0.8
"""

OFFICIAL_STYLE_SWIN_T = """\
_BASE_: ../maskformer2_R50_bs16_160k.yaml
MODEL:
  BACKBONE:
    NAME: "D2SwinTransformer"
  SWIN:
    EMBED_DIM: 96
    DEPTHS: [2, 2, 6, 2]
    NUM_HEADS: [3, 6, 12, 24]
    WINDOW_SIZE: 7
    APE: False
    DROP_PATH_RATE: 0.3
    PATCH_NORM: True
  WEIGHTS: "swin_tiny_patch4_window7_224.pkl"
  PIXEL_MEAN: [123.675, 116.280, 103.530]
  PIXEL_STD: [58.395, 57.120, 57.375]
"""


@pytest.fixture
def official_style_configs(tmp_path):
    (tmp_path / "swin").mkdir()
    (tmp_path / "Base-ADE20K-SemanticSegmentation.yaml").write_text(OFFICIAL_STYLE_BASE)
    (tmp_path / "maskformer2_R50_bs16_160k.yaml").write_text(OFFICIAL_STYLE_R50)
    (tmp_path / "swin" / "maskformer2_swin_tiny_bs16_160k.yaml").write_text(OFFICIAL_STYLE_SWIN_T)
    return tmp_path


def _setup(config_file, *opts):
    args = argparse.Namespace(config_file=str(config_file), opts=list(opts))
    return setup_cfg(args, default_setup_logging=False)


def test_official_style_yaml_merges(official_style_configs):
    cfg = _setup(official_style_configs / "maskformer2_R50_bs16_160k.yaml", "MODEL.DEVICE", "cpu")
    assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_semantic"
    assert tuple(cfg.INPUT.MIN_SIZE_TRAIN) == tuple(int(x * 0.1 * 512) for x in range(5, 21))
    assert cfg.INPUT.SIZE_DIVISIBILITY == 512
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10
    assert cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD == 0.8
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME == "MSDeformAttnPixelDecoder"
    # Keys the YAML does not set keep the official defaults.
    assert cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE is False
    assert cfg.SOLVER.WEIGHT_DECAY_EMBED == 0.0


def test_official_style_swin_yaml_builds_the_backbone(official_style_configs, one_torch_thread):
    from detectron2.modeling import build_backbone

    import gmmseg_d2.modeling  # noqa: F401  (registers D2SwinTransformer)

    cfg = _setup(official_style_configs / "swin" / "maskformer2_swin_tiny_bs16_160k.yaml", "MODEL.DEVICE", "cpu")
    assert cfg.MODEL.WEIGHTS == "swin_tiny_patch4_window7_224.pkl"
    assert cfg.MODEL.MASK_FORMER.CLASS_WEIGHT == 2.0  # inherited through two _BASE_ levels
    backbone = build_backbone(cfg)
    assert {n: (s.channels, s.stride) for n, s in backbone.output_shape().items()} == {
        "res2": (96, 4), "res3": (192, 8), "res4": (384, 16), "res5": (768, 32)}


CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "*", "*.yaml")))
#: Every shipped config, the paper-scale ones under */semantic-segmentation/ included.
ALL_CONFIGS = sorted(glob.glob(os.path.join(REPO_ROOT, "configs", "**", "*.yaml"), recursive=True))
#: The CPU-sized configs (ResNet-18 at 64-128 px), small enough to build each in well under a second.
SMALL_CONFIGS = [p for p in ALL_CONFIGS
                 if os.path.basename(os.path.dirname(p)) in ("mosaic", "textures")
                 and not os.path.basename(p).startswith("Base-")]


@pytest.mark.parametrize("path", CONFIGS, ids=[os.path.relpath(p, REPO_ROOT) for p in CONFIGS])
def test_repository_configs_load_and_per_pixel_ones_pick_their_mapper(path):
    cfg = _setup(path)
    if cfg.MODEL.META_ARCHITECTURE == "PerPixelSegmentor":
        assert cfg.INPUT.DATASET_MAPPER_NAME == "per_pixel_semantic", path


def _mask2former_recipe_cfg(path: str, *opts) -> CfgNode:
    """The config a script written for Mask2Former builds: get_cfg, the DeepLab
    keys, add_maskformer2_config, then the YAML file; no gmmseg_d2 call besides."""
    cfg = get_cfg()
    add_deeplab_config(cfg)
    add_maskformer2_config(cfg)
    cfg.merge_from_file(path)
    cfg.merge_from_list(list(opts))
    return cfg


def test_config_lists_cover_both_meta_architectures():
    assert len(ALL_CONFIGS) > len(CONFIGS) > len(SMALL_CONFIGS) >= 12
    archs = {_mask2former_recipe_cfg(p).MODEL.META_ARCHITECTURE for p in SMALL_CONFIGS}
    assert archs == {"MaskFormer", "PerPixelSegmentor"}


@pytest.mark.parametrize("path", ALL_CONFIGS, ids=[os.path.relpath(p, REPO_ROOT) for p in ALL_CONFIGS])
def test_every_config_merges_with_add_maskformer2_config_alone(path):
    alone = get_cfg()
    add_maskformer2_config(alone)  # no add_deeplab_config, no add_gmmseg_config
    alone.merge_from_file(path)  # a key it lacked would raise KeyError here
    ours = get_cfg()
    add_gmmseg_config(ours)
    ours.merge_from_file(path)
    flat = _flatten(alone)
    assert flat == _flatten(ours), path
    # The YAML's own values arrived, not just the defaults.
    defaults = get_cfg()
    add_maskformer2_config(defaults)
    assert flat != _flatten(defaults), path


@pytest.mark.parametrize("path", SMALL_CONFIGS, ids=[os.path.relpath(p, REPO_ROOT) for p in SMALL_CONFIGS])
def test_mask2former_recipe_builds_the_same_model_as_setup_cfg(path):
    from detectron2.modeling import build_model

    import gmmseg_d2.modeling  # noqa: F401  (registers MaskFormer, PerPixelSegmentor, ...)

    model = build_model(_mask2former_recipe_cfg(path, "MODEL.DEVICE", "cpu"))
    reference = build_model(_setup(path, "MODEL.DEVICE", "cpu"))
    assert type(model) is type(reference)
    assert type(model).__name__ in ("MaskFormer", "PerPixelSegmentor")
    shapes = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    assert shapes == {k: tuple(v.shape) for k, v in reference.state_dict().items()}
    # The class head the YAML asks for: the GMM classifier exactly in the gmm configs.
    from gmmseg_d2.modeling.gmm import GaussianMixtureClassifier

    heads = {type(m).__name__ for m in model.modules() if isinstance(m, GaussianMixtureClassifier)}
    assert bool(heads) == ("gmm" in os.path.basename(path)), (path, heads)
