"""The ``MODEL.GSS.*`` keys of the generative segmentor (``META_ARCHITECTURE: "GenerativeSemanticSegmentor"``).

Call :func:`add_gss_config` after gmmseg_d2's ``add_gmmseg_config`` and before
merging a YAML file (``projects/GSS/train_net.py`` does). Defaults are the
official code's (fudan-zvg/GSS, ``GenerativeSegHeadFF`` / ``GenerativeSegHeadFTW``
and their ADE20K configs); where the paper differs, the comment says so and
the paper's variant is an option.
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_gss_config"]


def add_gss_config(cfg: CN) -> None:
    """Add ``MODEL.GSS.*`` to ``cfg`` in place."""
    cfg.MODEL.GSS = CN()
    # Number of classes K (the maskige palette has K + 1 colours, the last for
    # ignored pixels).
    cfg.MODEL.GSS.NUM_CLASSES = 150
    cfg.MODEL.GSS.IGNORE_VALUE = 255
    # Backbone features the latent prior and the auxiliary branch read, finest
    # first; the token grid is the size of the first one (stride 4 upstream).
    cfg.MODEL.GSS.IN_FEATURES = ["res2", "res3", "res4", "res5"]
    # "prior": stage II, the latent prior (and the unlabeled-area auxiliary)
    # learn the VQ-VAE tokens of the ground-truth maskige. "posterior": the
    # GSS-FT / GSS-FT-W stage: backbone, prior and VQ-VAE frozen (eval mode,
    # no gradient), only the learned inverse X^-1 trains, with cross-entropy
    # against the ground truth on the maskige decoded from the prior's argmax
    # tokens (official GenerativeSegHeadFTW.forward_train).
    cfg.MODEL.GSS.TRAIN_STAGE = "prior"
    # Ground-truth labels are upsampled by this factor (one-hot, bilinear,
    # argmax) before the maskige is built and encoded: with the VQ-VAE's
    # downsampling of 8, tokens lie at 1/4 of the input and the decoded
    # maskige at 2x the input (official).
    cfg.MODEL.GSS.LABEL_UPSAMPLE = 2
    cfg.MODEL.GSS.PRIOR_LOSS_WEIGHT = 0.8

    # The mask-to-maskige map X: colour c_k of class k (palette, 0-255).
    cfg.MODEL.GSS.MASKIGE = CN()
    # "fixed" (PALETTE below, K + 1 rows: the official way, one hand-edited
    # palette per dataset), "maximal_distance" (the paper's rule, seeded) or
    # "random" (the paper's GSS-FF-R ablation: uniform colours, seeded).
    cfg.MODEL.GSS.MASKIGE.PALETTE_KIND = "maximal_distance"
    cfg.MODEL.GSS.MASKIGE.PALETTE = []
    cfg.MODEL.GSS.MASKIGE.SEED = 0
    # maximal_distance: each channel's levels form an arithmetic sequence over
    # [LOW, HIGH]; the channels start at LOW, LOW + 1, LOW + 2 (misaligned),
    # every colour gets a uniform additive jitter in [-JITTER, JITTER] per
    # channel, and the grid points nearest the grey axis are the ones left out
    # (official ADE20K: R range(15, 240, 51), G range(16, 239, 40), B
    # range(17, 238, 45), jitter 15).
    cfg.MODEL.GSS.MASKIGE.LOW = 15
    cfg.MODEL.GSS.MASKIGE.HIGH = 240
    cfg.MODEL.GSS.MASKIGE.JITTER = 15

    # The VQ-VAE (frozen in stages II and III).
    cfg.MODEL.GSS.VQVAE = CN()
    # "dalle": the DALL-E dVAE (8192 codes, downsampling 8), from the
    # released encoder.pkl / decoder.pkl in WEIGHTS (a folder; official).
    # "maskige": the small VQ-VAE of this project, trained on a dataset's
    # maskiges by projects/GSS/tools/train_vqvae.py; WEIGHTS is its .pth.
    cfg.MODEL.GSS.VQVAE.NAME = "dalle"
    cfg.MODEL.GSS.VQVAE.WEIGHTS = ""
    # Only for "maskige" (the dVAE's are fixed by its files).
    cfg.MODEL.GSS.VQVAE.VOCAB_SIZE = 512
    cfg.MODEL.GSS.VQVAE.CODE_DIM = 32
    cfg.MODEL.GSS.VQVAE.HIDDEN_DIM = 64

    # The latent prior (stage II; the paper's MLA): per level 1x1 conv to
    # LEVEL_DIM (BN + ReLU), resize to the token grid, concat, 1x1 conv to
    # EMBED_DIM (BN + ReLU); Swin blocks, LayerNorm; 1x1 conv to HIDDEN_DIM
    # (BN + ReLU), Dropout2d, 1x1 conv to the VQ-VAE's code logits.
    cfg.MODEL.GSS.PRIOR = CN()
    cfg.MODEL.GSS.PRIOR.LEVEL_DIM = 384
    cfg.MODEL.GSS.PRIOR.EMBED_DIM = 512
    # Official: depth 2 with Swin backbones, 6 with ResNets.
    cfg.MODEL.GSS.PRIOR.SWIN_DEPTH = 2
    cfg.MODEL.GSS.PRIOR.SWIN_HEADS = 16
    cfg.MODEL.GSS.PRIOR.SWIN_WINDOW = 7
    # The Swin blocks' FFN width as a multiple of EMBED_DIM (official 1024 / 512).
    cfg.MODEL.GSS.PRIOR.SWIN_MLP_RATIO = 2.0
    cfg.MODEL.GSS.PRIOR.HIDDEN_DIM = 2048
    cfg.MODEL.GSS.PRIOR.DROPOUT = 0.1
    cfg.MODEL.GSS.PRIOR.NORM = "BN"

    # The unlabeled-area auxiliary: a pixel branch on the same features (1x1
    # conv per level to DIM, resize, concat, 1x1 conv to DIM, 1x1 conv to K);
    # its argmax labels the ignored pixels of the training maskige
    # (c~ = M_u c_bar + (1 - M_u) c). On by default as in the paper (+3.1 mIoU
    # on ADE20K, its Table 3); official GSS-FT-W configs remove it.
    cfg.MODEL.GSS.AUX = CN()
    cfg.MODEL.GSS.AUX.ENABLED = True
    cfg.MODEL.GSS.AUX.DIM = 384
    # Index in IN_FEATURES of the feature map whose size the branch fuses at
    # (official: the stride-4 level, as the prior's; pixel_channel_index 1 of
    # its reordered in_index [1, 0, 2, 3]); its logits are then upsampled to
    # the upsampled labels' size.
    cfg.MODEL.GSS.AUX.GRID_LEVEL = 0
    cfg.MODEL.GSS.AUX.LOSS_WEIGHT = 0.2

    # X^-1, maskige back to classes. "nearest" (GSS-FF, official: the nearest
    # palette colour, the ignore colour excluded), "least_squares" (the
    # paper's GSS-FF formula: the Moore-Penrose pseudo-inverse of the K x 3
    # palette, since beta beta^T as printed is singular for K > 3), "conv"
    # (GSS-FT, paper only: 1x1, 3x3, 1x1 convolutions) or "swin" (GSS-FT-W,
    # official: 1x1 conv 3 -> DIM with BN + ReLU, Swin blocks, LayerNorm, 1x1
    # conv to K). "conv" and "swin" are trained in TRAIN_STAGE "posterior".
    cfg.MODEL.GSS.INVERSE = CN()
    cfg.MODEL.GSS.INVERSE.NAME = "nearest"
    cfg.MODEL.GSS.INVERSE.DIM = 128
    # swin: official depth 2 on ADE20K, 1 on Cityscapes; 4 heads, window 7, FFN 256.
    cfg.MODEL.GSS.INVERSE.SWIN_DEPTH = 2
    cfg.MODEL.GSS.INVERSE.SWIN_HEADS = 4
    cfg.MODEL.GSS.INVERSE.SWIN_WINDOW = 7
    cfg.MODEL.GSS.INVERSE.SWIN_MLP_RATIO = 2.0
    # Sliding-window inference (official Cityscapes: 768 / 512) uses the core's
    # TEST.SLIDING_WINDOW.* keys, as every gmmseg_d2 meta-architecture does.
