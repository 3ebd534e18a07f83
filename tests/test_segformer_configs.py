"""The SegFormer (MiT) configs: configs/*/segformer/ and configs/mosaic/segformer_mitb0_*.yaml.

The paper-scale ones reproduce the official GMMSeg SegFormer configs
(leonnnop/GMMSeg configs/_gmmseg/segformer_mit-b5_gmmseg_*.py and the B0 model
file): MiT-B5 / B0 encoder, SegFormer head (768 / 256 channels), AdamW with
lr 6e-5 for the backbone and 6e-4 for the head, weight decay 0.01 (none on
norms), poly(1.0) decay after a 1500-iteration linear warm-up from 1e-6,
batch 16; COCO-Stuff-10k and ADE20K with 512x512 crops (80k / 160k),
Cityscapes 768x768 crops, 80k, and a 768 / 512 sliding-window test; GMM
components 5 / 8 / 5. Every file merges with no unknown key and names
registered components; the B0 models and one B5 model are built on CPU and
have the SegFormer paper's sizes (B0: encoder 3.3 M, 3.8 M on ADE20K; B5:
encoder 81.4 M, 84.7 M on ADE20K).
"""
import glob
import math
import os

import pytest
import torch

from detectron2.config import get_cfg
from detectron2.data import DatasetCatalog
from detectron2.modeling import BACKBONE_REGISTRY, META_ARCH_REGISTRY, SEM_SEG_HEADS_REGISTRY

import gmmseg_d2  # noqa: F401  (registers datasets)
import gmmseg_d2.modeling  # noqa: F401  (registers models)
from gmmseg_d2.config import add_gmmseg_config
from gmmseg_d2.modeling.backbone.mit import MIT_VARIANTS
from gmmseg_d2.modeling.classifiers import CLASSIFIER_REGISTRY
from tests.conftest import REPO_ROOT

CONFIG_ROOT = os.path.join(REPO_ROOT, "configs")
MOSAIC_CONFIGS = ["mosaic/segformer_mitb0_softmax.yaml", "mosaic/segformer_mitb0_gmm.yaml"]
PAPER_CONFIGS = sorted(os.path.relpath(p, CONFIG_ROOT)
                       for p in glob.glob(os.path.join(CONFIG_ROOT, "*", "segformer", "*.yaml")))
ALL_CONFIGS = PAPER_CONFIGS + MOSAIC_CONFIGS

#: Dataset folder -> (file suffix, classes, crop, MAX_ITER, GMM components,
#: checkpoint / eval period, train and test dataset names).
DATASETS = {
    "coco_stuff": ("512x512_80k_coco_stuff_10k", 171, (512, 512), 80000, 5, 8000,
                   ("coco_2017_train_stuff_10k_sem_seg",), ("coco_2017_test_stuff_10k_sem_seg",)),
    "ade20k": ("512x512_160k_ade20k", 150, (512, 512), 160000, 8, 16000,
               ("ade20k_sem_seg_train",), ("ade20k_sem_seg_val",)),
    "cityscapes": ("768x768_80k_cityscapes", 19, (768, 768), 80000, 5, 8000,
                   ("cityscapes_fine_sem_seg_train",), ("cityscapes_fine_sem_seg_val",)),
}
#: MiT variant -> (SegFormer head channels, ImageNet weights file).
VARIANTS = {"b0": (256, "pretrained/mit_b0_mmseg.pth"), "b5": (768, "pretrained/mit_b5_mmseg.pth")}
STAGES = ["res2", "res3", "res4", "res5"]


def load(rel_path: str, *opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_ROOT, rel_path))  # KeyError on any unknown key
    cfg.merge_from_list(list(opts))
    return cfg


def build(rel_path: str, *opts):
    """The config's model on CPU with a 4-slot GMM memory (the configs' 32000
    slots are up to 9.8 GB per model), seeded."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    return build_model(load(rel_path, "MODEL.DEVICE", "cpu", "MODEL.GMM.MEMORY_SIZE", "4", *opts))


def num_params(module: torch.nn.Module) -> int:
    return sum(p.numel() for p in module.parameters())


def parse(rel_path: str):
    """``(dataset, variant, classifier)`` of a paper config (variant None for Base-)."""
    dataset, _, name = rel_path.split(os.sep)
    if name.startswith("Base-"):
        return dataset, None, "softmax"
    kind, variant = name.split("_")[:2]
    return dataset, variant.split("-")[1], "gmm" if kind == "gmmseg" else "softmax"


def test_every_dataset_has_the_four_models_and_a_base():
    expected = []
    for dataset, (suffix, *_rest) in DATASETS.items():
        expected.append(f"{dataset}/segformer/Base-{dataset}-segformer.yaml")
        expected += [f"{dataset}/segformer/{kind}_mit-{variant}_{suffix}.yaml"
                     for kind in ("segformer", "gmmseg") for variant in ("b0", "b5")]
    assert sorted(PAPER_CONFIGS) == sorted(expected)
    for rel_path in MOSAIC_CONFIGS:
        assert os.path.isfile(os.path.join(CONFIG_ROOT, rel_path)), rel_path


@pytest.mark.parametrize("rel_path", ALL_CONFIGS)
def test_config_merges_and_names_registered_components(rel_path):
    cfg = load(rel_path)
    assert cfg.MODEL.META_ARCHITECTURE == "PerPixelSegmentor" and "PerPixelSegmentor" in META_ARCH_REGISTRY
    assert cfg.MODEL.BACKBONE.NAME == "D2MixVisionTransformer" and "D2MixVisionTransformer" in BACKBONE_REGISTRY
    assert cfg.MODEL.SEM_SEG_HEAD.NAME == "SegFormerHead" and "SegFormerHead" in SEM_SEG_HEADS_REGISTRY
    assert cfg.MODEL.CLASSIFIER.NAME in CLASSIFIER_REGISTRY
    name = os.path.basename(rel_path)
    is_gmm = name.startswith("gmmseg_") or name.endswith("_gmm.yaml")
    assert cfg.MODEL.CLASSIFIER.NAME == ("gmm" if is_gmm else "softmax"), rel_path
    if is_gmm:
        assert cfg.MODEL.GMM.EMBEDDING == "conv_bn_relu"  # the official per-pixel projection
    assert cfg.INPUT.DATASET_MAPPER_NAME == "per_pixel_semantic"
    for dataset in cfg.DATASETS.TRAIN + cfg.DATASETS.TEST:
        assert dataset in DatasetCatalog.list(), dataset
    # Four stages into the head, finest first, as SegFormer.
    assert list(cfg.MODEL.MIT.OUT_FEATURES) == STAGES and list(cfg.MODEL.SEM_SEG_HEAD.IN_FEATURES) == STAGES
    assert "://" not in cfg.MODEL.WEIGHTS  # nothing is downloaded
    if not name.startswith("Base-"):
        assert cfg.OUTPUT_DIR == f"./output/{os.path.dirname(rel_path)}/{os.path.splitext(name)[0]}", rel_path


@pytest.mark.parametrize("rel_path", PAPER_CONFIGS)
def test_official_recipe(rel_path):
    from gmmseg_d2.solver import build_lr_scheduler

    dataset, variant, classifier = parse(rel_path)
    _, num_classes, crop, max_iter, components, period, train, test = DATASETS[dataset]
    cfg = load(rel_path)
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == num_classes
    assert (tuple(cfg.DATASETS.TRAIN), tuple(cfg.DATASETS.TEST)) == (train, test)

    # Model: MiT-B5 unless the file is a B0 one; head, norm, dropout, weights.
    embed_dim, depths = MIT_VARIANTS[variant or "b5"]
    mit = cfg.MODEL.MIT
    assert (mit.EMBED_DIM, tuple(mit.DEPTHS)) == (embed_dim, depths)
    assert (list(mit.NUM_HEADS), list(mit.SR_RATIOS), list(mit.PATCH_SIZES), list(mit.STRIDES)) == (
        [1, 2, 5, 8], [8, 4, 2, 1], [7, 3, 3, 3], [4, 2, 2, 2])
    assert (mit.MLP_RATIO, mit.QKV_BIAS, mit.DROP_RATE, mit.ATTN_DROP_RATE, mit.DROP_PATH_RATE) == (
        4.0, True, 0.0, 0.0, 0.1)
    assert mit.SIZE_DIVISIBILITY == 0
    channels, weights = VARIANTS[variant or "b5"]
    head = cfg.MODEL.SEM_SEG_HEAD
    assert (head.CONVS_DIM, head.DROPOUT, head.NORM, head.LOSS_WEIGHT) == (channels, 0.1, "SyncBN", 1.0)
    assert cfg.MODEL.WEIGHTS == weights
    assert list(cfg.MODEL.PIXEL_MEAN) == [123.675, 116.28, 103.53]
    assert list(cfg.MODEL.PIXEL_STD) == [58.395, 57.12, 57.375]
    assert cfg.INPUT.FORMAT == "RGB"

    # GMM (official decoder_params): only the component count depends on the dataset.
    if classifier == "gmm":
        gmm = cfg.MODEL.GMM
        assert (gmm.EMBED_DIM, gmm.NUM_COMPONENTS, gmm.MEMORY_SIZE, gmm.MAX_SAMPLES_PER_COMPONENT) == (
            64, components, 32000, 20)
        assert (gmm.UPDATE_INTERVAL, gmm.MEAN_MOMENTUM, gmm.STD_MOMENTUM, gmm.CONTRASTIVE_LOSS_WEIGHT) == (
            5, 0.999, 0.0, 0.01)

    # Data and test.
    assert cfg.INPUT.CROP.ENABLED and tuple(cfg.INPUT.CROP.SIZE) == crop
    assert cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA == 0.75 and cfg.INPUT.COLOR_AUG_SSD
    window = cfg.TEST.SLIDING_WINDOW
    if dataset == "cityscapes":
        assert window.ENABLED and tuple(window.WINDOW) == (768, 768) and tuple(window.STRIDE) == (512, 512)
        assert window.BLENDING == "uniform"
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (1024, 2048)
    else:
        assert not window.ENABLED
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (512, 2048)

    # Optimiser: AdamW, head 6e-4, backbone 6e-5, wd 0.01, none on norms, batch 16.
    solver = cfg.SOLVER
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.BACKBONE_MULTIPLIER) == ("ADAMW", 6e-4, 0.1)
    assert solver.BASE_LR * solver.BACKBONE_MULTIPLIER == pytest.approx(6e-5)
    assert (solver.WEIGHT_DECAY, solver.WEIGHT_DECAY_NORM, solver.IMS_PER_BATCH) == (0.01, 0.0, 16)
    assert not solver.CLIP_GRADIENTS.ENABLED and not solver.AMP.ENABLED
    assert (solver.MAX_ITER, solver.CHECKPOINT_PERIOD, cfg.TEST.EVAL_PERIOD) == (max_iter, period, period)

    # Schedule: mmcv's poly (power 1, min_lr 0) with linear warm-up
    # (1500 iterations, ratio 1e-6), computed here as mmcv does, against the
    # scheduler the trainer builds.
    assert (solver.LR_SCHEDULER_NAME, solver.POLY_LR_POWER, solver.POLY_LR_CONSTANT_ENDING) == (
        "WarmupPolyLR", 1.0, 0.0)
    assert (solver.WARMUP_METHOD, solver.WARMUP_ITERS, solver.WARMUP_FACTOR) == ("linear", 1500, 1e-6)

    def mmcv_lr(iteration: int) -> float:
        regular = solver.BASE_LR * (1 - iteration / max_iter) ** 1.0
        if iteration >= 1500:
            return regular
        return regular * (1 - (1 - iteration / 1500) * (1 - 1e-6))

    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=solver.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    for iteration in (0, 1, 750, 1499, 1500, max_iter // 2, max_iter - 1):
        scheduler.last_epoch = iteration
        assert math.isclose(scheduler.get_lr()[0], mmcv_lr(iteration), rel_tol=1e-9, abs_tol=1e-15), iteration


def test_ade20k_config_states_the_test_resize_it_cannot_express():
    with open(os.path.join(CONFIG_ROOT, "ade20k", "segformer", "Base-ade20k-segformer.yaml")) as f:
        text = f.read()
    assert "ResizeToMultiple" in text and "+0.5-1.0 mIoU" in text


def test_b0_ade20k_has_the_segformer_paper_size_and_optimizer_groups(one_torch_thread):
    from gmmseg_d2.solver import build_optimizer, get_optimizer_param_groups

    rel_path = "ade20k/segformer/segformer_mit-b0_512x512_160k_ade20k.yaml"
    model = build(rel_path)
    # SegFormer paper (Table 1 / Table 2): MiT-B0 encoder 3.4 M (3.32 M counted
    # exactly), SegFormer-B0 3.8 M on ADE20K.
    backbone = num_params(model.backbone) / 1e6
    assert 3.2 < backbone < 3.4, backbone
    total = num_params(model) / 1e6
    assert 3.7 < total < 3.8, total
    assert {name: (s.channels, s.stride) for name, s in model.backbone.output_shape().items()} == {
        "res2": (32, 4), "res3": (64, 8), "res4": (160, 16), "res5": (256, 32)}

    # The optimizer the trainer builds: AdamW (0.9, 0.999); backbone lr 6e-5,
    # head 6e-4; weight decay 0.01 except on norm layers.
    cfg = load(rel_path)
    optimizer = build_optimizer(cfg, model)
    assert isinstance(optimizer, torch.optim.AdamW) and optimizer.defaults["betas"] == (0.9, 0.999)
    groups = get_optimizer_param_groups(model, base_lr=cfg.SOLVER.BASE_LR, weight_decay=cfg.SOLVER.WEIGHT_DECAY,
                                        weight_decay_norm=cfg.SOLVER.WEIGHT_DECAY_NORM,
                                        weight_decay_embed=cfg.SOLVER.WEIGHT_DECAY_EMBED,
                                        backbone_multiplier=cfg.SOLVER.BACKBONE_MULTIPLIER)
    norms = {name for name, module in model.named_modules()
             if isinstance(module, (torch.nn.LayerNorm, torch.nn.modules.batchnorm._BatchNorm))}
    for group in groups:
        name = group["name"]
        assert group["lr"] == pytest.approx(6e-5 if name.startswith("backbone.") else 6e-4), name
        assert group["weight_decay"] == (0.0 if name.rsplit(".", 1)[0] in norms else 0.01), name
    assert sorted({round(g["lr"], 12) for g in groups}) == [6e-5, 6e-4]
    assert {g["weight_decay"] for g in groups} == {0.0, 0.01}


@pytest.mark.parametrize("dataset", sorted(DATASETS))
def test_b0_models_build_train_and_predict(dataset, one_torch_thread):
    suffix, num_classes, *_rest = DATASETS[dataset]
    softmax = build(f"{dataset}/segformer/segformer_mit-b0_{suffix}.yaml")
    gmm = build(f"{dataset}/segformer/gmmseg_mit-b0_{suffix}.yaml")
    assert 3.2e6 < num_params(softmax.backbone) < 3.4e6

    # The models differ only in the classifier (the GMM adds the 256 -> 64
    # conv-BN-ReLU projection and the LayerNorms).
    head = "sem_seg_head.predictor."
    softmax_shapes = {n: p.shape for n, p in softmax.named_parameters() if not n.startswith(head)}
    assert softmax_shapes == {n: p.shape for n, p in gmm.named_parameters() if not n.startswith(head)}
    assert dict(gmm.named_parameters())[head + "class_norm.weight"].shape == (num_classes,)
    assert dict(gmm.named_buffers())[head + "means"].shape == (num_classes, DATASETS[dataset][4], 64)

    # One training step on two 64x64 crops (SyncBN falls back to BatchNorm on one process).
    gmm.train()
    inputs = [{"image": torch.randint(0, 255, (3, 64, 64), dtype=torch.uint8),
               "sem_seg": torch.randint(0, num_classes, (64, 64))} for _ in range(2)]
    losses = gmm(inputs)
    assert set(losses) == {"loss_sem_seg", "loss_gmm_component"}
    assert all(torch.isfinite(v) for v in losses.values())
    sum(losses.values()).backward()

    # Inference; Cityscapes through its sliding window, shrunk to the test image (2 x 3 windows).
    for model in (softmax, gmm):
        model.eval()
        if dataset == "cityscapes":
            assert model.sliding_window and (model.window_size, model.window_stride) == ((768, 768), (512, 512))
            model.window_size, model.window_stride = (64, 64), (32, 32)
        else:
            assert not model.sliding_window
        with torch.no_grad():
            (out,) = model([{"image": torch.randint(0, 255, (3, 96, 128), dtype=torch.uint8),
                             "height": 48, "width": 64}])
        assert out["sem_seg"].shape == (num_classes, 48, 64) and out["anomaly_score"].shape == (48, 64)
        assert torch.isfinite(out["sem_seg"]).all() and torch.isfinite(out["anomaly_score"]).all()


def test_b5_ade20k_has_the_segformer_paper_size(one_torch_thread):
    # One B5 build (~3 s on one core); the SegFormer paper: MiT-B5 encoder
    # 81.4 M, SegFormer-B5 84.7 M on ADE20K.
    model = build("ade20k/segformer/segformer_mit-b5_512x512_160k_ade20k.yaml")
    assert abs(num_params(model.backbone) / 1e6 - 81.4) < 0.1
    assert abs(num_params(model) / 1e6 - 84.7) < 0.1
    assert {name: s.channels for name, s in model.backbone.output_shape().items()} == {
        "res2": 64, "res3": 128, "res4": 320, "res5": 512}


def test_mosaic_segformer_configs_share_the_mosaic_recipe():
    softmax, gmm = (load(p) for p in MOSAIC_CONFIGS)
    fcn_softmax, fcn_gmm = load("mosaic/fcn_R18_softmax.yaml"), load("mosaic/fcn_R18_gmm.yaml")
    for cfg in (softmax, gmm):
        # Same data and solver as the other mosaic models; their own lr and length (see the configs).
        solver = cfg.SOLVER.clone()
        solver.merge_from_list(["BASE_LR", fcn_gmm.SOLVER.BASE_LR, "MAX_ITER", fcn_gmm.SOLVER.MAX_ITER])
        assert (cfg.SOLVER.BASE_LR, cfg.SOLVER.MAX_ITER) == (0.001, 1000)
        assert solver == fcn_gmm.SOLVER and cfg.INPUT == fcn_gmm.INPUT and cfg.DATASETS == fcn_gmm.DATASETS
        assert tuple(cfg.INPUT.CROP.SIZE) == (128, 128)
        # MiT-B0 from scratch, 128-channel SegFormer head, BatchNorm.
        assert cfg.MODEL.WEIGHTS == ""
        assert (cfg.MODEL.MIT.EMBED_DIM, tuple(cfg.MODEL.MIT.DEPTHS)) == MIT_VARIANTS["b0"]
        assert (cfg.MODEL.SEM_SEG_HEAD.CONVS_DIM, cfg.MODEL.SEM_SEG_HEAD.NORM) == (128, "BN")
        assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == 8
    # The GMM keeps fcn_R18_gmm's short-schedule deviations, nothing else.
    assert gmm.MODEL.GMM == fcn_gmm.MODEL.GMM
    assert (gmm.MODEL.GMM.MEAN_MOMENTUM, gmm.MODEL.GMM.MEMORY_SIZE) == (0.9, 2000)
    assert softmax.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE == fcn_softmax.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE == "msp"


@pytest.mark.parametrize("rel_path", MOSAIC_CONFIGS)
def test_mosaic_segformer_models_train_and_predict(rel_path, one_torch_thread):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(load(rel_path, "MODEL.DEVICE", "cpu"))
    assert 3.2e6 < num_params(model.backbone) < 3.4e6
    model.train()
    inputs = [{"image": torch.randint(0, 255, (3, 128, 128), dtype=torch.uint8),
               "sem_seg": torch.randint(0, 8, (128, 128))} for _ in range(2)]
    losses = model(inputs)
    expected = {"loss_sem_seg"} | ({"loss_gmm_component"} if rel_path.endswith("_gmm.yaml") else set())
    assert set(losses) == expected and all(torch.isfinite(v) for v in losses.values())
    model.eval()
    with torch.no_grad():
        (out,) = model([{"image": torch.randint(0, 255, (3, 128, 160), dtype=torch.uint8)}])
    assert out["sem_seg"].shape == (8, 128, 160) and out["anomaly_score"].shape == (128, 160)
