"""Transformer decoders of mask-classification heads (Mask2Former layout)."""
from .mask2former_transformer_decoder import (
    MLP,
    TRANSFORMER_DECODER_REGISTRY,
    CrossAttentionLayer,
    FFNLayer,
    MultiScaleMaskedTransformerDecoder,
    SelfAttentionLayer,
    build_transformer_decoder,
)
from .position_encoding import PositionEmbeddingSine

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "MultiScaleMaskedTransformerDecoder",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
    "PositionEmbeddingSine",
]
