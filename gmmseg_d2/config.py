"""Every config key gmmseg_d2 adds to Detectron2's defaults, with its default.

Call :func:`add_gmmseg_config` on a fresh ``get_cfg()`` before merging a YAML
file. Keys that Mask2Former or Detectron2's DeepLab project also define keep
their names and defaults there, so their YAML files merge unchanged.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_gmmseg_config"]


def add_gmmseg_config(cfg: CN) -> None:
    """Add gmmseg_d2's keys to ``cfg`` in place."""
    # DeepLab keys: RESNETS.RES4_DILATION / RES5_MULTI_GRID / STEM_TYPE,
    # SEM_SEG_HEAD.ASPP_* / PROJECT_* / LOSS_TYPE, SOLVER.POLY_LR_*.
    add_deeplab_config(cfg)

    # ---------------------------------------------------------------- input
    # Same names and defaults as Mask2Former's add_maskformer2_config.
    cfg.INPUT.DATASET_MAPPER_NAME = "per_pixel_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    cfg.INPUT.SIZE_DIVISIBILITY = -1

    # --------------------------------------------------------------- solver
    # Same names and defaults as Mask2Former.
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "SGD" | "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0

    # ------------------------------------------------------ per-pixel heads
    # "softmax": a 1x1 conv classifier; "gmm": the Gaussian-mixture classifier.
    cfg.MODEL.SEM_SEG_HEAD.CLASSIFIER = "softmax"
    # FCN head (mmseg's FCNHead shape): NUM_CONVS 3x3 convs of CONVS_DIM
    # channels, optional concatenation of the input, dropout, classifier.
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2
    cfg.MODEL.SEM_SEG_HEAD.CONCAT_INPUT = True
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    # Anomaly score of softmax models: "msp" (negative max softmax
    # probability), "max_logit" (negative max logit), "entropy".
    cfg.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE = "msp"

    # ---------------------------------------------------- the GMM classifier
    # Defaults are the paper's / official code's (shared/DESIGN.md §1.1).
    cfg.MODEL.GMM = CN()
    cfg.MODEL.GMM.EMBED_DIM = 64
    cfg.MODEL.GMM.NUM_COMPONENTS = 5
    # Per (class, component) ring buffer length.
    cfg.MODEL.GMM.MEMORY_SIZE = 32000
    # At most this many new features per component per step enter the memory
    # (an evenly spaced subsample of the Sinkhorn-assigned ones).
    cfg.MODEL.GMM.MAX_SAMPLES_PER_COMPONENT = 20
    cfg.MODEL.GMM.MEAN_MOMENTUM = 0.999
    cfg.MODEL.GMM.STD_MOMENTUM = 0.0
    cfg.MODEL.GMM.VARIANCE_FLOOR = 1e-2
    # M-step every this many training steps.
    cfg.MODEL.GMM.UPDATE_INTERVAL = 5
    cfg.MODEL.GMM.SINKHORN_EPSILON = 0.05
    cfg.MODEL.GMM.SINKHORN_ITERATIONS = 3
    # Weight of the component-level CE over the C*M component scores.
    cfg.MODEL.GMM.CONTRASTIVE_LOSS_WEIGHT = 0.01
    # Class score from component log-likelihoods: "max" (official code) or
    # "logsumexp" (the mixture sum the paper writes).
    cfg.MODEL.GMM.COMPONENT_REDUCTION = "max"
    # Which samples of a class the Sinkhorn E-step assigns: "correct" (the
    # ones the model currently classifies correctly, as DESIGN §1.1 states) or
    # "all" (every labelled sample: what the official code does). Only
    # correctly classified samples enter the memory either way; in "correct"
    # mode the others get their closest own-class component as contrastive
    # target.
    cfg.MODEL.GMM.E_STEP_SAMPLES = "correct"
    # Storage dtype of the memory: "float32" (official) or "float16". The
    # memory is C*M*K*D floats (6.1 GB in float32 for ADE20K's 150 classes at
    # K=32000), on every GPU and in every checkpoint; float16 halves that at a
    # ~1e-3 relative rounding of the stored unit-norm features.
    cfg.MODEL.GMM.MEMORY_DTYPE = "float32"

    # ------------------------------------------- DeepLabV3+ head (GMMSegDeepLabV3PlusHead)
    # Otherwise it reads Detectron2's DeepLab keys (ASPP_*, PROJECT_CHANNELS,
    # CONVS_DIM, COMMON_STRIDE, USE_DEPTHWISE_SEPARABLE_CONV, LOSS_TYPE) and
    # the shared CLASSIFIER / ANOMALY_SCORE / DROPOUT (dropout before the
    # classifier) above. ASPP image pooling: "global" (global average pooling,
    # as mmsegmentation; any test size) or "crop" (Detectron2's
    # DeepLabV3PlusHead: an average pool the size of the INPUT.CROP.SIZE
    # feature map, which test feature maps must be multiples of).
    cfg.MODEL.SEM_SEG_HEAD.ASPP_POOLING = "global"

    # ------------------------------------------------------------------ test
    # Which anomaly scores the demo/benchmarks report (in addition to the
    # model's default ``anomaly_score`` output).
    cfg.TEST.VISUALIZE = True

    # ---------------------------------------------- sliding-window inference
    # PerPixelSegmentor at test time: whole-image inference by default; when
    # ENABLED, each image is cut into WINDOW-sized (h, w) windows every STRIDE
    # (h, w) pixels, the last window of each row/column aligned to the image
    # border (images smaller than WINDOW are padded, the padding cropped from
    # the result). Logits and anomaly scores of overlapping windows are
    # blended per pixel with weights: "uniform" (plain average) or "gaussian"
    # (a 2-D Gaussian peaked at the window centre, std GAUSSIAN_SIGMA x the
    # window size in each dimension, as nnU-Net's 1/8).
    cfg.TEST.SLIDING_WINDOW = CN()
    cfg.TEST.SLIDING_WINDOW.ENABLED = False
    cfg.TEST.SLIDING_WINDOW.WINDOW = (512, 512)
    # ~2/3 of the window, as mmsegmentation's slide configs (512/341, 769/513).
    cfg.TEST.SLIDING_WINDOW.STRIDE = (341, 341)
    cfg.TEST.SLIDING_WINDOW.BLENDING = "uniform"
    cfg.TEST.SLIDING_WINDOW.GAUSSIAN_SIGMA = 0.125
    # Windows of one image that go through the model together (memory bound).
    cfg.TEST.SLIDING_WINDOW.WINDOWS_PER_BATCH = 8
