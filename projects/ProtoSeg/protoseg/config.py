"""The ``MODEL.PROTO.*`` keys of the prototype classifier (``MODEL.CLASSIFIER.NAME: "prototype"``).

Call :func:`add_protoseg_config` after gmmseg_d2's ``add_gmmseg_config`` and
before merging a YAML file (``projects/ProtoSeg/train_net.py`` does, through
``setup_cfg(args, extra_config=(add_protoseg_config,))``).
"""
from detectron2.config import CfgNode as CN

__all__ = ["add_protoseg_config"]


def add_protoseg_config(cfg: CN) -> None:
    """Add ``MODEL.PROTO.*`` to ``cfg`` in place (defaults: the official code, the paper where noted)."""
    # Defaults are those of the official code (tfzhou/ProtoSeg,
    # configs/cityscapes/H_48_D_4_proto.json and HRNet_W48_Proto), except
    # PPD_WEIGHT (the paper's) and the options marked "difference", whose
    # default is the method as the paper describes it.
    cfg.MODEL.PROTO = CN()
    # M, non-learnable prototypes per class (official "num_prototype": 10).
    cfg.MODEL.PROTO.NUM_PROTOTYPES = 10
    # D, dimension of the embeddings and prototypes. The official model has
    # D = 720, the width of the HRNet-W48 features it projects (720 -> 720).
    cfg.MODEL.PROTO.EMBED_DIM = 720
    # The projection before the L2 / LayerNorm / L2 steps: "conv_relu" (1x1
    # conv -> ReLU -> 1x1 conv: the ProjectionHead that HRNet_W48_Proto runs,
    # lib/models/modules/contrast.py) or "conv_bn_relu" (1x1 conv -> BN ->
    # ReLU -> 1x1 conv: the "convmlp" of lib/models/modules/projection.py,
    # which hrnet.py imports first and then shadows by contrast.py's). The
    # BatchNorm takes its statistics over all pixels (or all B x Q queries) of
    # the batch, per rank.
    cfg.MODEL.PROTO.PROJECTION = "conv_relu"
    # Difference (official: "width"). The axis of the L2 normalisation right
    # after the projection: "channels" (each embedding, as the paper means)
    # or "width" (per-pixel level only: the official ProjectionHead applies
    # F.normalize(dim=-1) to the (B, D, H, W) map, i.e. over the image width).
    # LayerNorm -> L2 over channels ("feat_norm") follows either way.
    cfg.MODEL.PROTO.L2_AXIS = "channels"
    # gamma of the prototype momentum update
    # p <- normalise(gamma p + (1 - gamma) normalise(sum of assigned features)).
    cfg.MODEL.PROTO.GAMMA = 0.999
    # kappa, the entropic regularisation of the Sinkhorn online clustering
    # (Algorithm 1 of the paper: L = exp(P^T X / kappa)).
    cfg.MODEL.PROTO.SINKHORN_EPSILON = 0.05
    # Sinkhorn normalisation rounds (prototypes, then samples).
    cfg.MODEL.PROTO.SINKHORN_ITERATIONS = 3
    # Weight of the pixel-prototype contrastive loss (CE over the K x M
    # cosine similarities against the assigned prototype).
    cfg.MODEL.PROTO.PPC_WEIGHT = 0.01
    # Weight of the pixel-prototype distance loss (1 - cos to the assigned
    # prototype)^2. The paper's 0.01; the official Cityscapes config has
    # 0.001, which the Cityscapes configs here set.
    cfg.MODEL.PROTO.PPD_WEIGHT = 0.01
    # Training steps (counted by the classifier's `iteration` buffer) without
    # PPC / PPD and without prototype updates at the start (official
    # "warmup_iters" / "pretrain_prototype": 0). The official model also
    # trains its prototypes by gradient during that phase; here they stay
    # fixed (see projects/ProtoSeg/README.md).
    cfg.MODEL.PROTO.WARMUP_ITERS = 0
    # Difference (official: "gumbel"). Which prototype a correctly classified
    # sample moves: "argmax" (the Sinkhorn plan's argmax, the one PPC / PPD
    # target) or "gumbel" (F.gumbel_softmax(plan, tau=0.5, hard=True), the
    # plan's probabilities used as logits, as the official code does; that
    # sample agrees with the argmax for only about a fifth of the samples at
    # M = 10). PPC / PPD always use the argmax.
    cfg.MODEL.PROTO.UPDATE_ASSIGNMENT = "argmax"
