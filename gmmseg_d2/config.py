"""Every config key gmmseg_d2 adds to Detectron2's defaults, with its default.

Call :func:`add_gmmseg_config` (or its alias for Mask2Former-style scripts,
:func:`add_maskformer2_config`) on a fresh ``get_cfg()`` before merging a YAML
file. Keys that Mask2Former or Detectron2's DeepLab project also define keep
their names and defaults there, so their YAML files merge unchanged.
"""
from detectron2.config import CfgNode as CN
from detectron2.projects.deeplab import add_deeplab_config

__all__ = ["add_folder_dataset_config", "add_gmmseg_config", "add_maskformer2_config"]

#: Keys that ``MODEL.CLASSIFIER`` and ``MODEL.GMM.QUERY`` replaced, and their
#: new names; a config that sets an old one fails to merge, naming the new one.
_RENAMED_CLASSIFIER_KEYS = {
    "MODEL.SEM_SEG_HEAD.CLASSIFIER": "MODEL.CLASSIFIER.NAME",
    "MODEL.MASK_FORMER.CLASSIFIER": "MODEL.CLASSIFIER.NAME",
    "MODEL.MASK_FORMER.GMM_MEMORY_SIZE": "MODEL.GMM.QUERY.MEMORY_SIZE",
    "MODEL.MASK_FORMER.GMM_MEMORY_SAMPLES": "MODEL.GMM.QUERY.MEMORY_SAMPLES",
    "MODEL.MASK_FORMER.GMM_MEMORY_INIT": "MODEL.GMM.QUERY.MEMORY_INIT",
    "MODEL.MASK_FORMER.GMM_BOOTSTRAP_EMPTY_CLASSES": "MODEL.GMM.QUERY.BOOTSTRAP_EMPTY_CLASSES",
    "MODEL.MASK_FORMER.GMM_MEMORY_LAYERS": "MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS",
    "MODEL.MASK_FORMER.GMM_NO_OBJECT_RATIO": "MODEL.CLASSIFIER.QUERY.NO_OBJECT_RATIO",
}


def add_maskformer2_config(cfg: CN) -> None:
    """Add Mask2Former's config keys to ``cfg`` in place, with those gmmseg_d2's models read.

    The drop-in for the official ``mask2former.config.add_maskformer2_config``:
    a script written for Mask2Former (``cfg = get_cfg()``,
    ``add_deeplab_config(cfg)``, ``add_maskformer2_config(cfg)``, then
    ``merge_from_file``) loads and builds every config shipped under
    ``configs/``, MaskFormer and per-pixel alike. Mask2Former's keys keep its
    names and defaults exactly, so its YAML files merge unchanged; gmmseg_d2's
    own keys come with them, because our ``MaskFormer`` reads some whatever
    the YAML says (``MODEL.MASK_FORMER.TEST.ANOMALY_SCORE``,
    ``MODEL.CLASSIFIER.*``, ``MODEL.GMM.*``, ``TEST.SLIDING_WINDOW.*``). It is therefore
    the same as :func:`add_gmmseg_config` (which also adds Detectron2's DeepLab
    keys; adding them twice, before any merge, changes nothing). Like the
    official function, call it on a fresh config, before merging or setting
    values: it resets the keys it adds to their defaults.
    """
    add_gmmseg_config(cfg)


def _add_official_maskformer2_keys(cfg: CN) -> None:
    """Add exactly the keys and defaults of the official
    ``mask2former.config.add_maskformer2_config`` (facebookresearch/Mask2Former)."""
    # ------------------------------------------------------------ data
    # Which dataset mapper the trainer builds for training.
    cfg.INPUT.DATASET_MAPPER_NAME = "mask_former_semantic"
    cfg.INPUT.COLOR_AUG_SSD = False
    # Random crops are retried until no single category covers more than
    # this fraction of the (non-ignored) crop.
    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA = 1.0
    # The semantic mask-classification mapper pads image and label to this
    # size (-1: no padding in the mapper).
    cfg.INPUT.SIZE_DIVISIBILITY = -1

    # ---------------------------------------------------------- solver
    cfg.SOLVER.WEIGHT_DECAY_EMBED = 0.0
    cfg.SOLVER.OPTIMIZER = "ADAMW"  # "SGD" | "ADAMW"
    cfg.SOLVER.BACKBONE_MULTIPLIER = 0.1

    # --------------------------------------------- mask classification
    cfg.MODEL.MASK_FORMER = CN()
    # Loss terms and weights (matching costs use the same weights).
    cfg.MODEL.MASK_FORMER.DEEP_SUPERVISION = True
    cfg.MODEL.MASK_FORMER.NO_OBJECT_WEIGHT = 0.1
    cfg.MODEL.MASK_FORMER.CLASS_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.DICE_WEIGHT = 1.0
    cfg.MODEL.MASK_FORMER.MASK_WEIGHT = 20.0
    # Transformer decoder.
    cfg.MODEL.MASK_FORMER.NHEADS = 8
    cfg.MODEL.MASK_FORMER.DROPOUT = 0.1
    cfg.MODEL.MASK_FORMER.DIM_FEEDFORWARD = 2048
    cfg.MODEL.MASK_FORMER.ENC_LAYERS = 0
    cfg.MODEL.MASK_FORMER.DEC_LAYERS = 6
    cfg.MODEL.MASK_FORMER.PRE_NORM = False
    cfg.MODEL.MASK_FORMER.HIDDEN_DIM = 256
    cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES = 100
    cfg.MODEL.MASK_FORMER.TRANSFORMER_IN_FEATURE = "res5"
    cfg.MODEL.MASK_FORMER.ENFORCE_INPUT_PROJ = False
    # Inference.
    cfg.MODEL.MASK_FORMER.TEST = CN()
    cfg.MODEL.MASK_FORMER.TEST.SEMANTIC_ON = True
    cfg.MODEL.MASK_FORMER.TEST.INSTANCE_ON = False
    cfg.MODEL.MASK_FORMER.TEST.PANOPTIC_ON = False
    cfg.MODEL.MASK_FORMER.TEST.OBJECT_MASK_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.OVERLAP_THRESHOLD = 0.0
    cfg.MODEL.MASK_FORMER.TEST.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE = False
    # Padding of the batched images in the model; overrides the backbone's
    # size_divisibility, which is 0 for Detectron2's ResNet.
    cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY = 32

    # ----------------------------------------------------- pixel decoder
    cfg.MODEL.SEM_SEG_HEAD.MASK_DIM = 256
    cfg.MODEL.SEM_SEG_HEAD.TRANSFORMER_ENC_LAYERS = 0
    cfg.MODEL.SEM_SEG_HEAD.PIXEL_DECODER_NAME = "BasePixelDecoder"

    # ----------------------------------------------------- Swin backbone
    cfg.MODEL.SWIN = CN()
    cfg.MODEL.SWIN.PRETRAIN_IMG_SIZE = 224
    cfg.MODEL.SWIN.PATCH_SIZE = 4
    cfg.MODEL.SWIN.EMBED_DIM = 96
    cfg.MODEL.SWIN.DEPTHS = [2, 2, 6, 2]
    cfg.MODEL.SWIN.NUM_HEADS = [3, 6, 12, 24]
    cfg.MODEL.SWIN.WINDOW_SIZE = 7
    cfg.MODEL.SWIN.MLP_RATIO = 4.0
    cfg.MODEL.SWIN.QKV_BIAS = True
    cfg.MODEL.SWIN.QK_SCALE = None
    cfg.MODEL.SWIN.DROP_RATE = 0.0
    cfg.MODEL.SWIN.ATTN_DROP_RATE = 0.0
    cfg.MODEL.SWIN.DROP_PATH_RATE = 0.3
    cfg.MODEL.SWIN.APE = False
    cfg.MODEL.SWIN.PATCH_NORM = True
    cfg.MODEL.SWIN.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    cfg.MODEL.SWIN.USE_CHECKPOINT = False

    # ------------------------------------------------- Mask2Former extras
    cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME = "MultiScaleMaskedTransformerDecoder"
    # Large-scale jitter (instance/panoptic recipes; unused by semantic configs).
    cfg.INPUT.IMAGE_SIZE = 1024
    cfg.INPUT.MIN_SCALE = 0.1
    cfg.INPUT.MAX_SCALE = 2.0
    # Multi-scale deformable-attention encoder of the pixel decoder.
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_IN_FEATURES = ["res3", "res4", "res5"]
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_POINTS = 4
    cfg.MODEL.SEM_SEG_HEAD.DEFORMABLE_TRANSFORMER_ENCODER_N_HEADS = 8
    # Point-sampled mask losses (PointRend-style importance sampling):
    # points per mask, oversampling factor k and importance ratio beta.
    cfg.MODEL.MASK_FORMER.TRAIN_NUM_POINTS = 112 * 112
    cfg.MODEL.MASK_FORMER.OVERSAMPLE_RATIO = 3.0
    cfg.MODEL.MASK_FORMER.IMPORTANCE_SAMPLE_RATIO = 0.75


def add_gmmseg_config(cfg: CN) -> None:
    """Add gmmseg_d2's keys to ``cfg`` in place."""
    # DeepLab keys: RESNETS.RES4_DILATION / RES5_MULTI_GRID / STEM_TYPE,
    # SEM_SEG_HEAD.ASPP_* / PROJECT_* / LOSS_TYPE, SOLVER.POLY_LR_*.
    add_deeplab_config(cfg)

    # Mask2Former's keys with its defaults (INPUT.DATASET_MAPPER_NAME,
    # COLOR_AUG_SSD, SIZE_DIVISIBILITY, SOLVER.OPTIMIZER / BACKBONE_MULTIPLIER /
    # WEIGHT_DECAY_EMBED, MODEL.MASK_FORMER.*, MODEL.SWIN.*, ...), in the same
    # order as Mask2Former's train_net.py: DeepLab's keys first, then these.
    # Note the mapper default is Mask2Former's "mask_former_semantic"; the
    # per-pixel configs select "per_pixel_semantic" explicitly.
    _add_official_maskformer2_keys(cfg)

    # --------------------------------------------------- mask classification
    # The ``anomaly_score`` output of MaskFormer: "msp", "max_logit",
    # "entropy" (on the per-class maps built from queries and masks) or "rba"
    # (Rejected by All: -sum_c tanh of the mask-weighted class logits); see
    # gmmseg_d2.modeling.anomaly.mask_classification_anomaly_score.
    cfg.MODEL.MASK_FORMER.TEST.ANOMALY_SCORE = "msp"
    # Three rules on the classifier's per-query anomaly score a_q (for the GMM
    # a_q = -max_c log p(e_q | c) over the C real classes; for prototypes the
    # negative best cosine; needs a classifier other than softmax):
    # "density_mask_avg" (average of a_q weighted by (1 - p_q(no object)) x
    # mask probability), "density_min" / "density_max" (min / max of a_q over
    # the queries covering the pixel); see
    # gmmseg_d2.modeling.anomaly.mask_density_anomaly_score.

    # ------------------------------------------------------------ classifier
    # The classifier at the end of every segmenter (FCN, DeepLabV3+: per
    # pixel; Mask2Former: per query, over C + 1 classes, the last "no
    # object"), by its name in gmmseg_d2.modeling.classifiers.CLASSIFIER_REGISTRY:
    # "softmax" (a linear map: the 1x1 conv of per-pixel heads, Mask2Former's
    # linear class head) or "gmm" (GMMSeg's Gaussian mixtures, MODEL.GMM.*).
    # Projects register more: "prototype" (projects/ProtoSeg, MODEL.PROTO.*).
    cfg.MODEL.CLASSIFIER = CN()
    cfg.MODEL.CLASSIFIER.NAME = "softmax"
    # Mask2Former: how the criterion labels the queries for the classifier's
    # own losses and state update (the GMM's EM step, the prototypes'
    # clustering), after the Hungarian matching. A matched query gets its
    # target's class; unmatched ones get "no object", at most
    # ceil(NO_OBJECT_RATIO x matched) of them per image (at least one, a
    # random subset; < 0: all of them), the others are ignored (they still
    # get Mask2Former's "no object" cross-entropy). 1.0 keeps "no object"
    # from outnumbering the classes (Q = 100 queries, ~10 matched per ADE20K
    # image). Classifiers without losses of their own (softmax) ignore this.
    cfg.MODEL.CLASSIFIER.QUERY = CN()
    cfg.MODEL.CLASSIFIER.QUERY.NO_OBJECT_RATIO = 1.0
    # Which decoder layers feed the update: "last" (the final prediction;
    # with deep supervision every auxiliary layer also gets the classifier's
    # losses, suffixed _{i}, without a state update) or "all" (the queries of
    # every layer in one update, one loss).
    cfg.MODEL.CLASSIFIER.QUERY.UPDATE_LAYERS = "last"
    # The keys the classifier name and the query-level GMM settings had
    # before this node: merging a config that still sets one fails with the
    # new name.
    for old_key, new_key in _RENAMED_CLASSIFIER_KEYS.items():
        if not cfg.key_is_renamed(old_key):  # add_*_config may run twice on one config
            cfg.register_renamed_key(old_key, new_key, "the classifier seam moved it (gmmseg_d2/config.py)")

    # ------------------------------------------------------ per-pixel heads
    # FCN head (mmseg's FCNHead shape): NUM_CONVS 3x3 convs of CONVS_DIM
    # channels, optional concatenation of the input, dropout, classifier.
    cfg.MODEL.SEM_SEG_HEAD.NUM_CONVS = 2
    cfg.MODEL.SEM_SEG_HEAD.CONCAT_INPUT = True
    cfg.MODEL.SEM_SEG_HEAD.DROPOUT = 0.1
    # Anomaly score of softmax models: "msp" (negative max softmax
    # probability), "max_logit" (negative max logit), "entropy".
    cfg.MODEL.SEM_SEG_HEAD.ANOMALY_SCORE = "msp"

    # SegFormer head (SegFormerHead, MMSegmentation's SegformerHead shape):
    # IN_FEATURES (finest first) each 1x1 conv-norm-ReLU to CONVS_DIM
    # channels, resized to the first, concatenated, fused by a 1x1
    # conv-norm-ReLU, DROPOUT, classifier. Reads only existing keys.

    # ------------------------------------------------ MiT (SegFormer) backbone
    # MODEL.BACKBONE.NAME "D2MixVisionTransformer". Defaults: MiT-B5 as in the
    # official configs; B0 is EMBED_DIM 32, DEPTHS [2, 2, 2, 2] (all variants:
    # gmmseg_d2.modeling.backbone.MIT_VARIANTS). Stage i has EMBED_DIM x
    # NUM_HEADS[i] channels.
    cfg.MODEL.MIT = CN()
    cfg.MODEL.MIT.EMBED_DIM = 64
    cfg.MODEL.MIT.DEPTHS = [3, 6, 40, 3]
    cfg.MODEL.MIT.NUM_HEADS = [1, 2, 5, 8]
    cfg.MODEL.MIT.PATCH_SIZES = [7, 3, 3, 3]
    cfg.MODEL.MIT.STRIDES = [4, 2, 2, 2]
    cfg.MODEL.MIT.SR_RATIOS = [8, 4, 2, 1]
    cfg.MODEL.MIT.MLP_RATIO = 4.0
    cfg.MODEL.MIT.QKV_BIAS = True
    cfg.MODEL.MIT.DROP_RATE = 0.0
    cfg.MODEL.MIT.ATTN_DROP_RATE = 0.0
    cfg.MODEL.MIT.DROP_PATH_RATE = 0.1
    cfg.MODEL.MIT.OUT_FEATURES = ["res2", "res3", "res4", "res5"]
    # Inputs are padded to a multiple of this (0: not padded; the encoder
    # takes any size, and MMSegmentation feeds the official models unpadded).
    cfg.MODEL.MIT.SIZE_DIVISIBILITY = 0

    # ---------------------------------------------------- the GMM classifier
    # Defaults are the paper's / official code's (the paper and the official code).
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
    # LayerNorm over the C class scores gives the logits (official
    # `mask_norm`). False: the raw log-likelihoods are the logits (ablation).
    cfg.MODEL.GMM.CLASS_NORM = True
    # Which samples of a class the Sinkhorn E-step assigns: "all" (every
    # labelled sample, each gets its Sinkhorn component as contrastive
    # target: the official code's rule, the default) or "correct" (only the
    # ones the model currently classifies correctly, as the paper states;
    # the others get their closest own-class component as target). Only
    # correctly classified samples enter the memory either way; "correct"
    # exists so that the balanced Sinkhorn split is computed on exactly the
    # samples that are stored, not skewed by the misclassified ones.
    cfg.MODEL.GMM.E_STEP_SAMPLES = "all"
    # How the memory starts: "random" (the official code: every slot of every
    # component a random unit vector, a normal draw L2-normalised over D,
    # counted by the M-step until real features overwrite it; the first
    # M-step fits every component to that noise, sigma_d^2 ~ 1/D + f_d^2 +
    # 1e-2 around the fitted direction f, ~0.2 at D 64, so no class starts
    # far below the others) or "empty" (no stored feature until a real one
    # arrives; a class keeps stds 1 until then, which with the correctness
    # gate locks it out unless BOOTSTRAP_EMPTY_CLASSES is on). Drawn from
    # torch's global RNG when the model is built, so seeding makes it
    # reproducible.
    cfg.MODEL.GMM.MEMORY_INIT = "random"
    # True: while a class has never stored a real feature, all its labelled
    # samples count as correctly classified (they seed its memory). The
    # remedy for MEMORY_INIT "empty", where such a class is never fitted and
    # never classified correctly, i.e. never stored (pair "empty" with True).
    # False (default, the official code, which has no such rule): the plain
    # gate, fine with MEMORY_INIT "random", which fits every class from the
    # start. Works with either start ("never stored" is tracked apart from the
    # random slots).
    cfg.MODEL.GMM.BOOTSTRAP_EMPTY_CLASSES = False
    # The embedding before LayerNorm -> L2: "conv_bn_relu" (the official
    # per-pixel head: a bias-free 1x1 conv -> BatchNorm -> ReLU, state-dict
    # keys projection.conv.weight, projection.bn.*; BatchNorm is per GPU
    # under DDP, where the official configs use SyncBN) or "linear" (linear
    # with bias, keys projection.weight / projection.bias, as checkpoints
    # from before this key). Per-pixel heads only: the Mask2Former query head
    # always uses "linear".
    cfg.MODEL.GMM.EMBEDDING = "conv_bn_relu"
    # Storage dtype of the "ring" memory: "float32" (official) or "float16". The
    # memory is C*M*K*D floats (6.1 GB in float32 for ADE20K's 150 classes at
    # K=32000), on every GPU and in every checkpoint; float16 halves that at a
    # ~1e-3 relative rounding of the stored unit-norm features.
    cfg.MODEL.GMM.MEMORY_DTYPE = "float32"
    # What the memory keeps of the last MEMORY_SIZE features of a component:
    # "stats" (default: the window as chunk sums of MEMORY_CHUNK_SIZE
    # consecutive features, S1 and S2, all the M-step reads: 2/MEMORY_CHUNK_SIZE
    # of the float32 ring, 0.98 instead of 9.8 GB for ADE20K at M 8; exact up
    # to the oldest chunk straddling the window edge, see
    # gmmseg_d2.modeling.gmm.memory) or "ring" (the official code's layout:
    # the features themselves, C*M*K*D floats). Same M-step, and models
    # trained with either reach the same accuracy (BENCHMARKS.md), hence the
    # smaller default. Also the Mask2Former query head's. A ring checkpoint
    # (every one written before this key) loads into either kind; a stats one
    # only into "stats".
    cfg.MODEL.GMM.MEMORY_KIND = "stats"
    # Features per chunk of the "stats" memory; 0: MAX_SAMPLES_PER_COMPONENT,
    # so that a step at the per-step cap fills exactly one chunk.
    cfg.MODEL.GMM.MEMORY_CHUNK_SIZE = 0
    # The Mask2Former query head's values, where they differ from the
    # per-pixel ones above (every other MODEL.GMM key applies to both); the
    # reasons are in gmmseg_d2.modeling.classifiers.gmm.
    cfg.MODEL.GMM.QUERY = CN()
    # Per (class, component). A class gets at most one matched query per
    # image (semantic targets are one mask per class): at batch 16 a frequent
    # class brings ~16 / M = 3 features per component per step, against the
    # 20 per step that fill the per-pixel 32000 in 1600 iterations; 5000 keep
    # about that window for the frequent classes (ADE20K: 0.97 GB in a
    # float32 ring instead of 6.2 GB).
    cfg.MODEL.GMM.QUERY.MEMORY_SIZE = 5000
    cfg.MODEL.GMM.QUERY.MAX_SAMPLES_PER_COMPONENT = 20
    # Which labelled queries go through the Sinkhorn E-step and into the
    # memory: "labelled" (every matched query and every sampled unmatched
    # one, correct or not) or "correct" (as per pixel: MODEL.GMM.E_STEP_SAMPLES
    # decides the E-step, only correctly classified queries are stored; this
    # can lock a class out for good at query level).
    cfg.MODEL.GMM.QUERY.MEMORY_SAMPLES = "labelled"
    # "empty" (few matched queries per step: random slots would dominate the
    # memory and bias the M-step for thousands of iterations) or "random".
    cfg.MODEL.GMM.QUERY.MEMORY_INIT = "empty"
    # The remedy that goes with "empty"; matters only with MEMORY_SAMPLES "correct".
    cfg.MODEL.GMM.QUERY.BOOTSTRAP_EMPTY_CLASSES = True
    # linear -> LayerNorm -> L2 (the paper's query head; a BatchNorm over the
    # B x Q queries, mostly "no object", is no per-pixel statistic).
    cfg.MODEL.GMM.QUERY.EMBEDDING = "linear"

    # --------------------------------------- DeepLabV3+ head (DeepLabV3PlusClassifierHead)
    # Otherwise it reads Detectron2's DeepLab keys (ASPP_*, PROJECT_CHANNELS,
    # CONVS_DIM, COMMON_STRIDE, USE_DEPTHWISE_SEPARABLE_CONV, LOSS_TYPE) and
    # the shared CLASSIFIER / ANOMALY_SCORE / DROPOUT (dropout before the
    # classifier) above. ASPP image pooling: "global" (global average pooling,
    # as mmsegmentation; any test size) or "crop" (Detectron2's
    # DeepLabV3PlusHead: an average pool the size of the INPUT.CROP.SIZE
    # feature map, which test feature maps must be multiples of).
    cfg.MODEL.SEM_SEG_HEAD.ASPP_POOLING = "global"

    # TEST.VISUALIZE was never read; the config.yaml that earlier runs dumped
    # still holds it, so merging one ignores it (with a warning) instead of failing.
    if not cfg.key_is_deprecated("TEST.VISUALIZE"):
        cfg.register_deprecated_key("TEST.VISUALIZE")

    # ---------------------------------------------- sliding-window inference
    # PerPixelSegmentor and MaskFormer at test time: whole-image inference by
    # default; when ENABLED, each image is cut into WINDOW-sized (h, w) windows every STRIDE
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

    add_folder_dataset_config(cfg)


def add_folder_dataset_config(cfg: CN) -> None:
    """Add the ``DATASETS.FOLDER*`` keys (train on your own data) to ``cfg`` in place.

    Applied by ``gmmseg_d2.data.datasets.folder.configure_folder_dataset``,
    which ``gmmseg_d2.engine.setup_cfg`` calls; see datasets/README.md,
    "Train on your own data".
    """
    # A folder of images/, labels/ and classes.txt|json. Set: its splits are
    # registered as folder_<folder name>_<split> and replace DATASETS.TRAIN /
    # TEST, and MODEL.SEM_SEG_HEAD.NUM_CLASSES / IGNORE_VALUE follow its
    # classes file. "" (default): off.
    cfg.DATASETS.FOLDER = ""
    # The split to train on; "": "train", or the folder's only split.
    cfg.DATASETS.FOLDER_TRAIN_SPLIT = ""
    # The splits to evaluate on; (): ("val",) when the folder has it, else the
    # training split (with a warning).
    cfg.DATASETS.FOLDER_TEST_SPLITS = ()
    # When every label PNG is read and checked (mode, values, size against its
    # image): "auto" (at registration up to 1000 images per split, else when
    # the dataset is first loaded), "eager", "lazy" or "off".
    cfg.DATASETS.FOLDER_VALIDATE = "auto"
