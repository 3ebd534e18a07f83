"""The Mask2Former semantic-segmentation configs under configs/*/semantic-segmentation/.

Every YAML merges into our config with no unknown key (``merge_from_file``
raises on one), names only registered components and datasets, and the ADE20K
R50 and Swin-T models build on CPU with the parameter counts of Mask2Former's
model zoo (R50 44M, Swin-T 47M). Large Swin models are not built here.
"""
import glob
import os

import pytest

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog, MetadataCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

import gmmseg_d2  # noqa: F401  (registers datasets)
import gmmseg_d2.modeling  # noqa: F401  (registers models)
from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.modeling.transformer_decoder import TRANSFORMER_DECODER_REGISTRY
from tests.conftest import REPO_ROOT

CONFIG_ROOT = os.path.join(REPO_ROOT, "configs")
CONFIGS = sorted(glob.glob(os.path.join(CONFIG_ROOT, "*", "semantic-segmentation", "**", "*.yaml"),
                           recursive=True))
IDS = [os.path.relpath(p, CONFIG_ROOT) for p in CONFIGS]

#: Mask2Former's model zoo (ADE20K semantic segmentation), millions of parameters.
OFFICIAL_PARAMS_M = {
    "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml": 44.0,
    "ade20k/semantic-segmentation/swin/maskformer2_swin_tiny_bs16_160k.yaml": 47.0,
}

#: Dataset -> number of classes the configs must use.
EXPECTED_CLASSES = {"ade20k": 150, "cityscapes": 19, "coco_stuff": 171}


def load(path):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(path)  # KeyError on any key our config does not define
    return cfg


def test_the_expected_configs_exist():
    names = set(IDS)
    for dataset, files in {
        "ade20k": ["Base-ADE20K-SemanticSegmentation.yaml", "maskformer2_R50_bs16_160k.yaml",
                   "maskformer2_R101_bs16_90k.yaml", "swin/maskformer2_swin_tiny_bs16_160k.yaml",
                   "swin/maskformer2_swin_small_bs16_160k.yaml",
                   "swin/maskformer2_swin_base_384_bs16_160k_res640.yaml",
                   "swin/maskformer2_swin_base_IN21k_384_bs16_160k_res640.yaml",
                   "swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml"],
        "cityscapes": ["Base-Cityscapes-SemanticSegmentation.yaml", "maskformer2_R50_bs16_90k.yaml",
                       "maskformer2_R101_bs16_90k.yaml", "swin/maskformer2_swin_tiny_bs16_90k.yaml",
                       "swin/maskformer2_swin_small_bs16_90k.yaml",
                       "swin/maskformer2_swin_base_IN21k_384_bs16_90k.yaml",
                       "swin/maskformer2_swin_large_IN21k_384_bs16_90k.yaml"],
        "coco_stuff": ["Base-COCOStuff-SemanticSegmentation.yaml", "maskformer2_R50_bs16_80k_res640.yaml",
                       "swin/maskformer2_swin_large_IN21k_384_bs16_80k_res640.yaml"],
    }.items():
        for name in files:
            assert f"{dataset}/semantic-segmentation/{name}" in names, name


@pytest.mark.parametrize("path", CONFIGS, ids=IDS)
def test_config_merges_and_names_registered_components(path):
    cfg = load(path)
    dataset = os.path.relpath(path, CONFIG_ROOT).split(os.sep)[0]
    is_base = os.path.basename(path).startswith("Base-")

    assert cfg.MODEL.BACKBONE.NAME in BACKBONE_REGISTRY, cfg.MODEL.BACKBONE.NAME
    # Official MIN_SIZE_TRAIN: "!!python/object/apply:eval" lists, evaluated on load.
    assert isinstance(cfg.INPUT.MIN_SIZE_TRAIN, (list, tuple)) and len(cfg.INPUT.MIN_SIZE_TRAIN) == 16
    assert cfg.INPUT.DATASET_MAPPER_NAME == "mask_former_semantic"
    for name in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        assert name in DatasetCatalog.list(), name
        assert MetadataCatalog.get(name).evaluator_type in ("sem_seg", "cityscapes_sem_seg"), name
    if is_base:
        return
    assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
    assert cfg.MODEL.META_ARCHITECTURE in META_ARCH_REGISTRY
    assert cfg.MODEL.SEM_SEG_HEAD.NAME in SEM_SEG_HEADS_REGISTRY
    assert cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME in SEM_SEG_HEADS_REGISTRY
    assert cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME in TRANSFORMER_DECODER_REGISTRY
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == EXPECTED_CLASSES[dataset]
    # The official semantic-segmentation recipe (model zoo settings).
    assert cfg.MODEL.MASK_FORMER.DEC_LAYERS == 10 and cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES == 100
    assert cfg.SOLVER.OPTIMIZER == "ADAMW" and cfg.SOLVER.BASE_LR == 1e-4 and cfg.SOLVER.IMS_PER_BATCH == 16
    # Weights: relative file names from tools/convert-*.py, or Detectron2's torchvision R-50.
    weights = cfg.MODEL.WEIGHTS
    if cfg.MODEL.BACKBONE.NAME == "D2SwinTransformer":
        assert weights.startswith("swin_") and weights.endswith(".pkl"), weights
    else:
        assert weights in ("detectron2://ImageNetPretrained/torchvision/R-50.pkl", "R-101.pkl"), weights


def test_dataset_specific_settings():
    ade = load(os.path.join(CONFIG_ROOT, "ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml"))
    assert (ade.SOLVER.MAX_ITER, tuple(ade.INPUT.CROP.SIZE)) == (160000, (512, 512))
    assert tuple(ade.INPUT.MIN_SIZE_TRAIN) == tuple(int(x * 0.1 * 512) for x in range(5, 21))
    city = load(os.path.join(CONFIG_ROOT, "cityscapes/semantic-segmentation/maskformer2_R50_bs16_90k.yaml"))
    assert (city.SOLVER.MAX_ITER, tuple(city.INPUT.CROP.SIZE)) == (90000, (512, 1024))
    assert city.MODEL.RESNETS.NORM == "SyncBN"
    coco = load(os.path.join(
        CONFIG_ROOT, "coco_stuff/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_80k_res640.yaml"))
    assert (coco.SOLVER.MAX_ITER, tuple(coco.INPUT.CROP.SIZE)) == (80000, (640, 640))
    assert (coco.MODEL.SWIN.EMBED_DIM, coco.MODEL.SWIN.WINDOW_SIZE) == (192, 12)
    swin_l = load(os.path.join(
        CONFIG_ROOT, "ade20k/semantic-segmentation/swin/maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml"))
    assert swin_l.MODEL.SWIN.PRETRAIN_IMG_SIZE == 384 and swin_l.INPUT.SIZE_DIVISIBILITY == 640


@pytest.mark.parametrize("rel_path", sorted(OFFICIAL_PARAMS_M))
def test_model_builds_on_cpu_with_official_parameter_count(rel_path, one_torch_thread, capsys):
    import torch

    from detectron2.modeling import build_model

    cfg = load(os.path.join(CONFIG_ROOT, rel_path))
    cfg.MODEL.DEVICE = "cpu"
    model = build_model(cfg)
    millions = sum(p.numel() for p in model.parameters()) / 1e6
    with capsys.disabled():
        print(f"\n{rel_path}: {millions:.2f}M parameters")
    expected = OFFICIAL_PARAMS_M[rel_path]
    assert abs(millions - expected) <= 0.05 * expected, (millions, expected)

    # One small inference pass: the outputs the evaluators read.
    model.eval()
    with torch.no_grad():
        out = model([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8), "height": 64, "width": 96}])
    assert out[0]["sem_seg"].shape == (cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, 64, 96)
    assert out[0]["anomaly_score"].shape == (64, 96)
