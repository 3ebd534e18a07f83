"""Pixel decoders for mask classification (Mask2Former's deformable-attention decoder).

Importing this package registers ``MSDeformAttnPixelDecoder`` in Detectron2's
``SEM_SEG_HEADS_REGISTRY``.

* :mod:`.deformable_attention_op`: the multi-scale deformable attention op
  (``MSDeformAttn``, its backends); formerly ``ms_deform_attn.py``, which
  still imports (an alias of the new module).
* :mod:`.msdeformattn`: Mask2Former's pixel decoder, under Mask2Former's file name.
"""
import sys

from . import deformable_attention_op
from .deformable_attention_op import (
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

# The op module's former name, next to msdeformattn.py; kept importable as an alias.
sys.modules.setdefault(f"{__name__}.ms_deform_attn", deformable_attention_op)

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
