"""Generative Semantic Segmentation (GSS, CVPR 2023) for gmmseg_d2 (``projects/GSS``).

Importing this package registers ``GenerativeSemanticSegmentor`` in
Detectron2's ``META_ARCH_REGISTRY``; add its keys with :func:`add_gss_config`
before merging a config that sets ``MODEL.GSS.*``.
"""
from .config import add_gss_config
from .inverse import (
    INVERSES, ConvInverse, LeastSquaresInverse, MaskigeInverse, NearestColourInverse, SwinInverse, build_inverse,
)
from .latent_prior import LatentPrior, UnlabeledAreaHead
from .maskige import (
    PALETTE_KINDS, Maskige, build_palette, maximal_distance_guarantee, maximal_distance_palette, random_palette,
    upsample_labels,
)
from .meta_arch import TRAIN_STAGES, GenerativeSemanticSegmentor, fill_unlabelled
from .vqvae import DalleDVAE, MaskigeAutoencoder, MaskigeVQVAE, build_vqvae, load_vqvae_weights, save_vqvae

__all__ = [
    "INVERSES", "PALETTE_KINDS", "TRAIN_STAGES", "ConvInverse", "DalleDVAE", "GenerativeSemanticSegmentor",
    "LatentPrior", "LeastSquaresInverse", "Maskige", "MaskigeAutoencoder", "MaskigeInverse", "MaskigeVQVAE",
    "NearestColourInverse", "SwinInverse", "UnlabeledAreaHead", "add_gss_config", "build_inverse", "build_palette",
    "build_vqvae", "fill_unlabelled", "load_vqvae_weights", "maximal_distance_guarantee", "maximal_distance_palette",
    "random_palette", "save_vqvae", "upsample_labels",
]
