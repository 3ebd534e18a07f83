"""The GMMSeg-Mask2Former configs under configs/*/semantic-segmentation/gmmseg/.

Each one is an official-layout Mask2Former config with the GMM class head and
the GMMSeg paper's recipe (the paper and the official code, "Training recipes"): AdamW
lr 1e-4, weight decay 0.05, batch 16, lr x0.1 at 0.9 and 0.95 of training;
ADE20K 160k, Cityscapes 90k (1024x1024 crops, 1024x1024 sliding-window test),
COCO-Stuff 80k. tests/test_official_configs.py checks that they merge and name
registered components, like every config of the folder.
"""
import os

import pytest
import torch

from detectron2.config import get_cfg

from gmmseg_d2.config import add_gmmseg_config
from tests.conftest import REPO_ROOT

CONFIG_ROOT = os.path.join(REPO_ROOT, "configs")

#: Config (relative to configs/) -> (NUM_CLASSES, MAX_ITER, crop size).
GMMSEG_CONFIGS = {
    # The paper's 640 crops for R50 too (the official R50 config uses 512).
    "ade20k/semantic-segmentation/gmmseg/gmmseg_maskformer2_R50_bs16_160k_res640.yaml": (150, 160000, (640, 640)),
    "ade20k/semantic-segmentation/gmmseg/gmmseg_maskformer2_swin_large_IN21k_384_bs16_160k_res640.yaml":
        (150, 160000, (640, 640)),
    "cityscapes/semantic-segmentation/gmmseg/gmmseg_maskformer2_R50_bs16_90k.yaml": (19, 90000, (1024, 1024)),
    "cityscapes/semantic-segmentation/gmmseg/gmmseg_maskformer2_swin_large_IN21k_384_bs16_90k.yaml":
        (19, 90000, (1024, 1024)),
    "coco_stuff/semantic-segmentation/gmmseg/gmmseg_maskformer2_R50_bs16_80k_res640.yaml": (171, 80000, (640, 640)),
    "coco_stuff/semantic-segmentation/gmmseg/gmmseg_maskformer2_swin_large_IN21k_384_bs16_80k_res640.yaml":
        (171, 80000, (640, 640)),
}

#: The GMM classifier's (GMMClassifier at query level) parameters and buffers,
#: relative to the decoder's class head.
CLASS_HEAD = "sem_seg_head.predictor.class_embed."
GMM_PARAMETERS = {"projection.weight", "projection.bias", "embedding_norm.weight", "embedding_norm.bias",
                  "class_norm.weight", "class_norm.bias"}
GMM_BUFFERS = {"means", "stds", "iteration", "memory.chunk_sum", "memory.chunk_square_sum", "memory.filled",
               "memory.count", "memory.pending", "memory.total_written"}
#: Mask2Former's linear class head.
SOFTMAX_PARAMETERS = {"weight", "bias"}


def load(rel_path, *opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(os.path.join(CONFIG_ROOT, rel_path))
    cfg.merge_from_list(list(opts))
    return cfg


def test_every_gmmseg_config_is_listed():
    folder = [os.path.relpath(os.path.join(root, name), CONFIG_ROOT)
              for dataset in ("ade20k", "cityscapes", "coco_stuff")
              for root, _, names in os.walk(os.path.join(CONFIG_ROOT, dataset, "semantic-segmentation", "gmmseg"))
              for name in names if name.endswith(".yaml")]
    assert sorted(folder) == sorted(GMMSEG_CONFIGS)


@pytest.mark.parametrize("rel_path", sorted(GMMSEG_CONFIGS))
def test_gmm_head_and_paper_recipe(rel_path):
    from gmmseg_d2.solver import build_lr_scheduler

    num_classes, max_iter, crop = GMMSEG_CONFIGS[rel_path]
    cfg = load(rel_path)
    assert cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
    assert cfg.MODEL.CLASSIFIER.NAME == "gmm"
    assert cfg.MODEL.MASK_FORMER.TEST.ANOMALY_SCORE == "density_mask_avg"
    assert cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES == num_classes
    # The paper's GMM: the defaults (D 64, M 5, ...) and the default query memory.
    assert (cfg.MODEL.GMM.EMBED_DIM, cfg.MODEL.GMM.NUM_COMPONENTS) == (64, 5)
    assert cfg.MODEL.GMM.QUERY.MEMORY_SIZE == 5000
    assert (cfg.MODEL.GMM.QUERY.MEMORY_SAMPLES, cfg.MODEL.GMM.QUERY.MEMORY_INIT, cfg.MODEL.GMM.QUERY.EMBEDDING) == (
        "labelled", "empty", "linear")
    assert (cfg.MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS, cfg.MODEL.CLASSIFIER.QUERY.NO_OBJECT_RATIO) == ("last", 1.0)

    solver = cfg.SOLVER
    assert (solver.OPTIMIZER, solver.BASE_LR, solver.WEIGHT_DECAY, solver.IMS_PER_BATCH) == ("ADAMW", 1e-4, 0.05, 16)
    assert solver.MAX_ITER == max_iter
    assert solver.LR_SCHEDULER_NAME == "WarmupMultiStepLR" and solver.GAMMA == 0.1
    assert tuple(solver.STEPS) == (int(0.9 * max_iter), int(0.95 * max_iter))
    assert tuple(solver.STEPS) == (max_iter * 9 // 10, max_iter * 19 // 20)  # exact, no rounding
    assert tuple(cfg.INPUT.CROP.SIZE) == crop and cfg.INPUT.CROP.ENABLED

    # The schedule the trainer builds from it: x1, then x0.1 from 0.9, x0.01 from 0.95.
    optimizer = torch.optim.AdamW([torch.nn.Parameter(torch.zeros(1))], lr=solver.BASE_LR)
    scheduler = build_lr_scheduler(cfg, optimizer)
    first, second = solver.STEPS
    for iteration, factor in [(0, 1.0), (first - 1, 1.0), (first, 0.1), (second - 1, 0.1), (second, 0.01),
                              (max_iter - 1, 0.01)]:
        scheduler.last_epoch = iteration
        assert scheduler.get_lr()[0] == pytest.approx(solver.BASE_LR * factor), iteration

    window = cfg.TEST.SLIDING_WINDOW
    if rel_path.startswith("cityscapes/"):
        assert window.ENABLED and tuple(window.WINDOW) == (1024, 1024)
        assert tuple(window.STRIDE) == (768, 768) and window.BLENDING == "uniform"
        assert (cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST) == (1024, 2048)
    else:
        assert not window.ENABLED


def test_ade20k_r50_gmm_model_differs_from_softmax_only_in_the_class_head(one_torch_thread):
    from detectron2.modeling import build_model

    # A 4-slot memory instead of 5000 (151 x 5 x 5000 x 64 floats = 0.97 GB).
    gmm_cfg = load("ade20k/semantic-segmentation/gmmseg/gmmseg_maskformer2_R50_bs16_160k_res640.yaml",
                   "MODEL.DEVICE", "cpu", "MODEL.GMM.QUERY.MEMORY_SIZE", "4")
    softmax_cfg = load("ade20k/semantic-segmentation/maskformer2_R50_bs16_160k.yaml", "MODEL.DEVICE", "cpu")
    torch.manual_seed(0)
    gmm = build_model(gmm_cfg)
    softmax = build_model(softmax_cfg)

    gmm_params = {name: p.shape for name, p in gmm.named_parameters()}
    softmax_params = {name: p.shape for name, p in softmax.named_parameters()}
    assert set(softmax_params) - set(gmm_params) == {CLASS_HEAD + n for n in SOFTMAX_PARAMETERS}
    assert set(gmm_params) - set(softmax_params) == {CLASS_HEAD + n for n in GMM_PARAMETERS}
    shared = set(gmm_params) & set(softmax_params)
    assert all(gmm_params[name] == softmax_params[name] for name in shared)
    assert not any(name.startswith(CLASS_HEAD) for name in shared)
    assert gmm_params[CLASS_HEAD + "projection.weight"] == (64, 256)  # HIDDEN_DIM 256 -> D 64
    assert gmm_params[CLASS_HEAD + "class_norm.weight"] == (151,)  # C + 1 mixtures

    gmm_buffers = {name for name, _ in gmm.named_buffers()}
    softmax_buffers = {name for name, _ in softmax.named_buffers()}
    assert gmm_buffers - softmax_buffers == {CLASS_HEAD + n for n in GMM_BUFFERS}
    assert softmax_buffers - gmm_buffers == set()
    # The default "stats" memory: K = 4 in chunks of min(20, K) = 4, so 2 chunk rows.
    assert dict(gmm.named_buffers())[CLASS_HEAD + "memory.chunk_sum"].shape == (151, 5, 2, 64)

    # A softmax checkpoint loads into the GMM model but for the class head.
    result = gmm.load_state_dict(softmax.state_dict(), strict=False)
    assert result.unexpected_keys == []
    assert set(result.missing_keys) == {CLASS_HEAD + n for n in GMM_PARAMETERS | GMM_BUFFERS}

    # Inference with the density anomaly score.
    gmm.eval()
    with torch.no_grad():
        (out,) = gmm([{"image": torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8)}])
    assert out["sem_seg"].shape == (150, 64, 96) and out["anomaly_score"].shape == (64, 96)
    assert torch.isfinite(out["anomaly_score"]).all()


def test_cityscapes_r50_gmm_model_reads_the_sliding_window(one_torch_thread):
    from detectron2.modeling import build_model

    cfg = load("cityscapes/semantic-segmentation/gmmseg/gmmseg_maskformer2_R50_bs16_90k.yaml",
               "MODEL.DEVICE", "cpu", "MODEL.GMM.QUERY.MEMORY_SIZE", "4")
    torch.manual_seed(0)
    model = build_model(cfg).eval()
    assert model.sliding_window and model.window_size == (1024, 1024) and model.window_stride == (768, 768)
    # The same model on a small image with small windows (1024x1024 windows
    # are too slow for a CPU test): 2 x 3 windows of 64x64 on 96x160.
    model.window_size, model.window_stride = (64, 64), (48, 48)
    with torch.no_grad():
        (out,) = model([{"image": torch.randint(0, 255, (3, 96, 160), dtype=torch.uint8), "height": 48, "width": 80}])
    assert out["sem_seg"].shape == (19, 48, 80) and out["anomaly_score"].shape == (48, 80)
    assert torch.isfinite(out["sem_seg"]).all() and torch.isfinite(out["anomaly_score"]).all()
