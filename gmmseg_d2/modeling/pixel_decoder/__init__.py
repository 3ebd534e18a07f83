"""Pixel decoders for mask classification (Mask2Former's deformable-attention decoder).

Importing this package registers ``MSDeformAttnPixelDecoder`` in Detectron2's
``SEM_SEG_HEADS_REGISTRY``.
"""
from .ms_deform_attn import (
    MSDeformAttn,
    available_ms_deform_attn_backends,
    get_ms_deform_attn_backend,
    ms_deform_attn_pytorch,
    multi_scale_deformable_attention,
    register_ms_deform_attn_backend,
    set_ms_deform_attn_backend,
)
from .msdeformattn import (
    MSDeformAttnPixelDecoder,
    MSDeformAttnTransformerEncoderOnly,
    build_pixel_decoder,
)

__all__ = [
    "MSDeformAttn",
    "MSDeformAttnPixelDecoder",
    "MSDeformAttnTransformerEncoderOnly",
    "available_ms_deform_attn_backends",
    "build_pixel_decoder",
    "get_ms_deform_attn_backend",
    "ms_deform_attn_pytorch",
    "multi_scale_deformable_attention",
    "register_ms_deform_attn_backend",
    "set_ms_deform_attn_backend",
]
