"""Mask2Former's multi-scale masked-attention transformer decoder.

(Long on purpose: one port of one upstream file, kept in its layout so that the
module tree and parameter names match Mask2Former's checkpoints.)

``Q`` learnable queries are refined by ``L`` decoder layers. Layer ``i``
cross-attends to feature level ``i mod 3`` of the pixel decoder (coarsest
first), restricted by *masked attention* to the foreground of the mask the
query predicted after the previous layer; then the queries self-attend and go
through an FFN. Class logits and mask logits are predicted from the learnable
queries themselves and after every layer, which gives ``L + 1`` predictions
(the last is the output, the others feed deep supervision).

Module and parameter names, shapes, initialisation and the order of every
operation follow the official implementation
(facebookresearch/Mask2Former, ``MultiScaleMaskedTransformerDecoder``), so its
checkpoints load with no missing or unexpected keys and give the same outputs.
"""
from __future__ import annotations

import logging
from typing import Callable, Dict, List, Optional, Sequence, Tuple

import fvcore.nn.weight_init as weight_init
import torch
import torch.nn.functional as F
from einops import rearrange, repeat
from torch import Tensor, nn

from detectron2.config import configurable
from detectron2.layers import Conv2d
from detectron2.utils.registry import Registry

from .position_encoding import PositionEmbeddingSine
from ..classifiers import QUERY_IGNORE_LABEL, ClassifierOutput, LinearClassifier, build_classifier

__all__ = [
    "TRANSFORMER_DECODER_REGISTRY",
    "build_transformer_decoder",
    "SelfAttentionLayer",
    "CrossAttentionLayer",
    "FFNLayer",
    "MLP",
    "MultiScaleMaskedTransformerDecoder",
]

# Same registry name as the official code, so `TRANSFORMER_DECODER_NAME` values
# from official configs resolve here.
TRANSFORMER_DECODER_REGISTRY = Registry("TRANSFORMER_MODULE")
TRANSFORMER_DECODER_REGISTRY.__doc__ = """
Registry for the transformer decoders of mask-classification heads.

A registered class is called as ``cls(cfg, in_channels, mask_classification)``
and its ``forward(features, mask_features, mask=None)`` returns the prediction
dict described in :class:`MultiScaleMaskedTransformerDecoder`.
"""


def build_transformer_decoder(cfg, in_channels: int, mask_classification: bool = True) -> nn.Module:
    """Build the decoder named by ``cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME``.

    Args:
        cfg: a config holding Mask2Former's keys (``add_maskformer2_config``).
        in_channels: channels of every multi-scale feature given to the decoder.
        mask_classification: predict class logits as well as masks.
    """
    name = cfg.MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME
    if name not in TRANSFORMER_DECODER_REGISTRY:
        raise KeyError(
            f"MODEL.MASK_FORMER.TRANSFORMER_DECODER_NAME={name!r} is not a registered transformer "
            f"decoder; registered: {sorted(k for k, _ in TRANSFORMER_DECODER_REGISTRY)}."
        )
    return TRANSFORMER_DECODER_REGISTRY.get(name)(cfg, in_channels, mask_classification)


def _get_activation_fn(activation: str) -> Callable[[Tensor], Tensor]:
    functions = {"relu": F.relu, "gelu": F.gelu, "glu": F.glu}
    if activation not in functions:
        raise ValueError(f"activation must be one of {sorted(functions)}, got {activation!r}.")
    return functions[activation]


def _with_pos_embed(tensor: Tensor, pos: Optional[Tensor]) -> Tensor:
    return tensor if pos is None else tensor + pos


def _xavier_init_matrices(module: nn.Module) -> None:
    # Official init of the decoder layers: Xavier-uniform on every weight
    # matrix (including the packed q/k/v projection), default init elsewhere.
    for param in module.parameters():
        if param.dim() > 1:
            nn.init.xavier_uniform_(param)


class SelfAttentionLayer(nn.Module):
    """Residual multi-head self-attention among the queries.

    Post-norm (default): ``norm(tgt + attn(tgt + pos, tgt + pos, tgt))``.
    Pre-norm: ``tgt + attn(n + pos, n + pos, n)`` with ``n = norm(tgt)``.
    Tensors are sequence-first, ``(Q, B, d_model)``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.self_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        # Unused by attention; kept because the official layer validates it.
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        _xavier_init_matrices(self)

    def forward(
        self,
        tgt: Tensor,
        tgt_mask: Optional[Tensor] = None,
        tgt_key_padding_mask: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt: queries ``(Q, B, d_model)``.
            tgt_mask: optional attention mask ``(Q, Q)`` or ``(B * nhead, Q, Q)``,
                True where attention is forbidden.
            tgt_key_padding_mask: optional ``(B, Q)``, True for ignored keys.
            query_pos: query position embedding ``(Q, B, d_model)``, added to
                queries and keys, not to values.

        Returns:
            Updated queries ``(Q, B, d_model)``.
        """
        normed = self.norm(tgt) if self.normalize_before else tgt
        q = k = _with_pos_embed(normed, query_pos)
        attended = self.self_attn(q, k, value=normed, attn_mask=tgt_mask,
                                  key_padding_mask=tgt_key_padding_mask)[0]
        tgt = tgt + self.dropout(attended)
        return tgt if self.normalize_before else self.norm(tgt)


class CrossAttentionLayer(nn.Module):
    """Residual multi-head attention from the queries to image features.

    Post-norm (default): ``norm(tgt + attn(tgt + query_pos, memory + pos, memory))``;
    pre-norm normalises ``tgt`` first and adds the residual without a norm.
    Queries are ``(Q, B, d_model)``, memory ``(S, B, d_model)``.
    """

    def __init__(
        self,
        d_model: int,
        nhead: int,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.multihead_attn = nn.MultiheadAttention(d_model, nhead, dropout=dropout)
        self.norm = nn.LayerNorm(d_model)
        self.dropout = nn.Dropout(dropout)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        _xavier_init_matrices(self)

    def forward(
        self,
        tgt: Tensor,
        memory: Tensor,
        memory_mask: Optional[Tensor] = None,
        memory_key_padding_mask: Optional[Tensor] = None,
        pos: Optional[Tensor] = None,
        query_pos: Optional[Tensor] = None,
    ) -> Tensor:
        """
        Args:
            tgt: queries ``(Q, B, d_model)``.
            memory: flattened image features ``(S, B, d_model)``.
            memory_mask: optional boolean ``(B * nhead, Q, S)`` (batch-major,
                head-minor), True where a query may not attend to a position.
            memory_key_padding_mask: optional ``(B, S)``, True for ignored positions.
            pos: position encoding of the memory ``(S, B, d_model)``, added to keys only.
            query_pos: query position embedding ``(Q, B, d_model)``.

        Returns:
            Updated queries ``(Q, B, d_model)``.
        """
        normed = self.norm(tgt) if self.normalize_before else tgt
        attended = self.multihead_attn(
            query=_with_pos_embed(normed, query_pos),
            key=_with_pos_embed(memory, pos),
            value=memory,
            attn_mask=memory_mask,
            key_padding_mask=memory_key_padding_mask,
        )[0]
        tgt = tgt + self.dropout(attended)
        return tgt if self.normalize_before else self.norm(tgt)


class FFNLayer(nn.Module):
    """Residual two-layer feed-forward block, ``linear2(act(linear1(x)))``.

    Post-norm (default) applies ``norm`` after the residual sum, pre-norm to
    the block's input. Works on any ``(..., d_model)`` tensor.
    """

    def __init__(
        self,
        d_model: int,
        dim_feedforward: int = 2048,
        dropout: float = 0.0,
        activation: str = "relu",
        normalize_before: bool = False,
    ):
        super().__init__()
        self.linear1 = nn.Linear(d_model, dim_feedforward)
        self.dropout = nn.Dropout(dropout)
        self.linear2 = nn.Linear(dim_feedforward, d_model)
        self.norm = nn.LayerNorm(d_model)
        self.activation = _get_activation_fn(activation)
        self.normalize_before = normalize_before
        _xavier_init_matrices(self)

    def forward(self, tgt: Tensor) -> Tensor:
        """``(..., d_model) -> (..., d_model)``."""
        normed = self.norm(tgt) if self.normalize_before else tgt
        update = self.linear2(self.dropout(self.activation(self.linear1(normed))))
        tgt = tgt + self.dropout(update)
        return tgt if self.normalize_before else self.norm(tgt)


class MLP(nn.Module):
    """``num_layers`` linear layers with ReLU between them (none after the last).

    ``(..., input_dim) -> (..., output_dim)``; hidden layers have ``hidden_dim``
    channels. Parameters are ``layers.{i}.weight`` / ``layers.{i}.bias``.
    """

    def __init__(self, input_dim: int, hidden_dim: int, output_dim: int, num_layers: int):
        super().__init__()
        if num_layers < 1:
            raise ValueError(f"MLP needs at least one layer, got num_layers={num_layers}.")
        self.num_layers = num_layers
        in_dims = [input_dim] + [hidden_dim] * (num_layers - 1)
        out_dims = [hidden_dim] * (num_layers - 1) + [output_dim]
        self.layers = nn.ModuleList(nn.Linear(i, o) for i, o in zip(in_dims, out_dims))

    def forward(self, x: Tensor) -> Tensor:
        for index, layer in enumerate(self.layers):
            x = layer(x)
            if index < self.num_layers - 1:
                x = F.relu(x)
        return x


@TRANSFORMER_DECODER_REGISTRY.register()
class MultiScaleMaskedTransformerDecoder(nn.Module):
    """Masked-attention decoder over three feature levels (Mask2Former).

    The class head ``class_embed`` is used in exactly one place,
    :meth:`classify_queries`, on the normalised decoder output ``(B, Q, hidden_dim)``.
    It is a query-level :class:`~gmmseg_d2.modeling.classifiers.SegmentationClassifier`
    built from ``MODEL.CLASSIFIER.NAME`` (default: the softmax
    :class:`~gmmseg_d2.modeling.classifiers.LinearClassifier`, Mask2Former's
    ``nn.Linear(hidden_dim, C + 1)`` with the same keys). Every prediction dict
    (final and auxiliary) holds its class logits as ``pred_logits`` and its
    whole :class:`~gmmseg_d2.modeling.classifiers.ClassifierOutput` as
    ``pred_classifier``, which the criterion hands back to the classifier for
    its own losses. A plain module returning logits (e.g. an ``nn.Linear``)
    works too.
    """

    # Version 2 renamed the learnable query features ``static_query`` -> ``query_feat``.
    _version = 2

    #: The decoder always round-robins over three pixel-decoder levels.
    num_feature_levels = 3

    @configurable
    def __init__(
        self,
        in_channels: int,
        mask_classification: bool = True,
        *,
        num_classes: int,
        hidden_dim: int,
        num_queries: int,
        nheads: int,
        dim_feedforward: int,
        dec_layers: int,
        pre_norm: bool,
        mask_dim: int,
        enforce_input_project: bool,
        class_embed: Optional[nn.Module] = None,
    ):
        """
        Args:
            in_channels: channels of each multi-scale input feature.
            mask_classification: must be True (the decoder always classifies masks).
            num_classes: number of classes ``C``; the default class head predicts
                ``C + 1`` logits, the last one "no object".
            hidden_dim: transformer width; must be even (the sine encoding uses
                ``hidden_dim // 2`` channels per axis).
            num_queries: number of queries ``Q``.
            nheads: attention heads; must divide ``hidden_dim``.
            dim_feedforward: hidden width of the FFN blocks.
            dec_layers: number of decoder layers ``L`` actually built. (The
                config's ``DEC_LAYERS`` counts the prediction on the learnable
                queries too; ``from_config`` subtracts one, as the official code.)
            pre_norm: pre-LayerNorm layers instead of post-LayerNorm.
            mask_dim: channels of the per-pixel mask features.
            enforce_input_project: add the 1x1 input projections even when
                ``in_channels == hidden_dim``.
            class_embed: class head mapping ``(B, Q, hidden_dim)`` to a
                ``ClassifierOutput`` (or to logits) over ``K = num_classes + 1``
                classes; default the softmax ``LinearClassifier(hidden_dim,
                num_classes + 1, level="query")``.
        """
        super().__init__()
        if not mask_classification:
            raise ValueError(
                "MultiScaleMaskedTransformerDecoder only supports mask classification; "
                "build it with mask_classification=True."
            )
        if hidden_dim % 2 != 0:
            raise ValueError(f"hidden_dim must be even for the sine position encoding, got {hidden_dim}.")
        if hidden_dim % nheads != 0:
            raise ValueError(f"nheads={nheads} must divide hidden_dim={hidden_dim}.")
        if dec_layers < 0:
            raise ValueError(
                f"dec_layers must be >= 0, got {dec_layers} (MODEL.MASK_FORMER.DEC_LAYERS must be >= 1)."
            )
        self.mask_classification = mask_classification
        self.in_channels = in_channels
        self.mask_dim = mask_dim

        self.pe_layer = PositionEmbeddingSine(hidden_dim // 2, normalize=True)

        self.num_heads = nheads
        self.num_layers = dec_layers
        self.transformer_self_attention_layers = nn.ModuleList()
        self.transformer_cross_attention_layers = nn.ModuleList()
        self.transformer_ffn_layers = nn.ModuleList()
        for _ in range(dec_layers):
            # Dropout is fixed to 0 in every layer, as in the official decoder
            # (MASK_FORMER.DROPOUT only concerns the MaskFormer-v1 decoder).
            self.transformer_self_attention_layers.append(
                SelfAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_cross_attention_layers.append(
                CrossAttentionLayer(d_model=hidden_dim, nhead=nheads, dropout=0.0, normalize_before=pre_norm)
            )
            self.transformer_ffn_layers.append(
                FFNLayer(d_model=hidden_dim, dim_feedforward=dim_feedforward, dropout=0.0,
                         normalize_before=pre_norm)
            )
        self.decoder_norm = nn.LayerNorm(hidden_dim)

        self.num_queries = num_queries
        self.query_feat = nn.Embedding(num_queries, hidden_dim)  # learnable query features
        self.query_embed = nn.Embedding(num_queries, hidden_dim)  # learnable query positions

        self.level_embed = nn.Embedding(self.num_feature_levels, hidden_dim)
        self.input_proj = nn.ModuleList()
        for _ in range(self.num_feature_levels):
            if in_channels != hidden_dim or enforce_input_project:
                projection = Conv2d(in_channels, hidden_dim, kernel_size=1)
                weight_init.c2_xavier_fill(projection)
                self.input_proj.append(projection)
            else:
                # An empty Sequential is the identity and has no state-dict keys,
                # matching the official layout.
                self.input_proj.append(nn.Sequential())

        # Built here, not in from_config, so that the default head draws its
        # initial weights at the same point of the RNG stream as Mask2Former's.
        self.class_embed = (class_embed if class_embed is not None
                            else LinearClassifier(hidden_dim, num_classes + 1, level="query"))
        self.mask_embed = MLP(hidden_dim, hidden_dim, mask_dim, 3)

    @classmethod
    def from_config(cls, cfg, in_channels: int, mask_classification: bool) -> Dict:
        mask_former = cfg.MODEL.MASK_FORMER
        if mask_former.DEC_LAYERS < 1:
            raise ValueError(f"MODEL.MASK_FORMER.DEC_LAYERS must be >= 1, got {mask_former.DEC_LAYERS}.")
        kwargs = {
            "in_channels": in_channels,
            "mask_classification": mask_classification,
            "num_classes": cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES,
            "hidden_dim": mask_former.HIDDEN_DIM,
            "num_queries": mask_former.NUM_OBJECT_QUERIES,
            "nheads": mask_former.NHEADS,
            "dim_feedforward": mask_former.DIM_FEEDFORWARD,
            # DEC_LAYERS counts the prediction made on the learnable queries
            # before any layer, so the number of auxiliary outputs equals
            # DEC_LAYERS - 1 and the loss weights line up.
            "dec_layers": mask_former.DEC_LAYERS - 1,
            "pre_norm": mask_former.PRE_NORM,
            "enforce_input_project": mask_former.ENFORCE_INPUT_PROJ,
            "mask_dim": cfg.MODEL.SEM_SEG_HEAD.MASK_DIM,
        }
        # A config with Mask2Former's keys only (no MODEL.CLASSIFIER) keeps the linear head.
        classifier = cfg.MODEL.get("CLASSIFIER")
        if classifier is not None and classifier.NAME != "softmax":
            kwargs["class_embed"] = build_classifier(
                cfg, in_channels=mask_former.HIDDEN_DIM, num_classes=cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES + 1,
                level="query", ignore_value=QUERY_IGNORE_LABEL)
        return kwargs

    def _load_from_state_dict(
        self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
    ):
        version = local_metadata.get("version", None)
        if version is None or version < 2:
            # Checkpoints older than version 2 (and model-zoo .pkl files, which
            # carry no version) may name the query features `static_query`.
            renamed = False
            for key in [k for k in state_dict if k.startswith(prefix) and "static_query" in k]:
                state_dict[key.replace("static_query", "query_feat")] = state_dict.pop(key)
                renamed = True
            if renamed:
                logging.getLogger(__name__).warning(
                    f"{self.__class__.__name__}: renamed 'static_query' to 'query_feat' in an old checkpoint; "
                    "re-save it to upgrade."
                )
        super()._load_from_state_dict(
            state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys, error_msgs
        )

    def _check_inputs(self, features: Sequence[Tensor], mask_features: Tensor) -> None:
        if len(features) != self.num_feature_levels:
            raise ValueError(
                f"{self.__class__.__name__} expects {self.num_feature_levels} feature levels "
                f"(coarsest first), got {len(features)}."
            )
        for level, feature in enumerate(features):
            if feature.dim() != 4 or feature.shape[1] != self.in_channels:
                raise ValueError(
                    f"feature level {level} must be (B, {self.in_channels}, H, W), got {tuple(feature.shape)}."
                )
        if mask_features.dim() != 4 or mask_features.shape[1] != self.mask_dim:
            raise ValueError(
                f"mask_features must be (B, {self.mask_dim}, H, W), got {tuple(mask_features.shape)}."
            )
        if any(f.shape[0] != mask_features.shape[0] for f in features):
            raise ValueError("all features and mask_features must have the same batch size.")

    def forward(
        self, x: Sequence[Tensor], mask_features: Tensor, mask: Optional[Tensor] = None
    ) -> Dict[str, object]:
        """
        Args:
            x: three features ``(B, in_channels, H_l, W_l)``, coarsest first;
                layer ``i`` attends to ``x[i % 3]``.
            mask_features: per-pixel embeddings ``(B, mask_dim, H_m, W_m)``
                (stride 4 in Mask2Former).
            mask: padding mask; ignored, as in the official decoder (masking the
                padded region does not change the results).

        Returns:
            ``{"pred_logits": (B, Q, K), "pred_masks": (B, Q, H_m, W_m),
            "aux_outputs": [{"pred_logits", "pred_masks"}] * L}``, where ``K`` is
            ``num_classes + 1`` for the default head, the top level holds the
            prediction after the last layer and ``aux_outputs`` the ``L`` earlier
            ones (from the learnable queries, then after layers ``1 .. L-1``).
        """
        del mask
        self._check_inputs(x, mask_features)
        batch_size = mask_features.shape[0]

        memories: List[Tensor] = []
        memory_pos: List[Tensor] = []
        level_sizes: List[Tuple[int, int]] = []
        for level, feature in enumerate(x):
            level_sizes.append(tuple(feature.shape[-2:]))
            memory_pos.append(rearrange(self.pe_layer(feature, None), "b c h w -> (h w) b c"))
            projected = rearrange(self.input_proj[level](feature), "b c h w -> (h w) b c")
            memories.append(projected + self.level_embed.weight[level])

        # Sequence-first (Q, B, hidden) as nn.MultiheadAttention expects.
        query_pos = repeat(self.query_embed.weight, "q c -> q b c", b=batch_size)
        output = repeat(self.query_feat.weight, "q c -> q b c", b=batch_size)

        predictions_class: List[Tensor] = []
        predictions_mask: List[Tensor] = []

        outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
            output, mask_features, attn_mask_target_size=level_sizes[0]
        )
        predictions_class.append(outputs_class)
        predictions_mask.append(outputs_mask)

        for i in range(self.num_layers):
            level = i % self.num_feature_levels
            attn_mask = self.allow_full_attention_for_empty_masks(attn_mask)
            output = self.transformer_cross_attention_layers[i](
                output, memories[level],
                memory_mask=attn_mask,
                memory_key_padding_mask=None,
                pos=memory_pos[level], query_pos=query_pos,
            )
            output = self.transformer_self_attention_layers[i](
                output, tgt_mask=None, tgt_key_padding_mask=None, query_pos=query_pos
            )
            output = self.transformer_ffn_layers[i](output)

            outputs_class, outputs_mask, attn_mask = self.forward_prediction_heads(
                output, mask_features,
                attn_mask_target_size=level_sizes[(i + 1) % self.num_feature_levels],
            )
            predictions_class.append(outputs_class)
            predictions_mask.append(outputs_mask)

        return {
            **self._prediction(predictions_class[-1], predictions_mask[-1]),
            "aux_outputs": self._set_aux_loss(predictions_class, predictions_mask),
        }

    def classify_queries(self, decoder_output: Tensor) -> ClassifierOutput:
        """The classifier's output on the normalised queries ``(B, Q, hidden)``,
        logits ``(B, Q, K)``. The single use of ``class_embed``."""
        output = self.class_embed(decoder_output)
        return output if isinstance(output, ClassifierOutput) else ClassifierOutput(output)

    @staticmethod
    def _prediction(class_output: ClassifierOutput, masks: Tensor) -> Dict[str, object]:
        """One prediction dict: ``pred_logits``, ``pred_masks``, ``pred_classifier``."""
        return {"pred_logits": class_output.class_logits, "pred_masks": masks, "pred_classifier": class_output}

    def forward_prediction_heads(
        self, output: Tensor, mask_features: Tensor, attn_mask_target_size: Tuple[int, int]
    ) -> Tuple[ClassifierOutput, Tensor, Tensor]:
        """Predict classes and masks from the current queries.

        Args:
            output: queries ``(Q, B, hidden)``.
            mask_features: ``(B, mask_dim, H_m, W_m)``.
            attn_mask_target_size: ``(h, w)`` of the level the next layer attends to.

        Returns:
            ``(class_output, mask_logits (B, Q, H_m, W_m), attn_mask)``:
            :meth:`classify_queries`' output (logits ``(B, Q, K)``), with the boolean ``attn_mask (B * nheads, Q, h * w)`` True where the
            mask, bilinearly resized to ``(h, w)``, has probability below 0.5
            (attention forbidden there). It is detached: no gradient flows
            through the masking.
        """
        decoder_output = rearrange(self.decoder_norm(output), "q b c -> b q c")
        outputs_class = self.classify_queries(decoder_output)
        mask_embed = self.mask_embed(decoder_output)
        outputs_mask = torch.einsum("bqc,bchw->bqhw", mask_embed, mask_features)

        # The mask is predicted at the resolution of mask_features and resized
        # to the attended level; thresholding the probability (not the logit)
        # keeps the official tie-breaking at 0.5.
        resized = F.interpolate(outputs_mask, size=attn_mask_target_size, mode="bilinear", align_corners=False)
        background = resized.sigmoid().flatten(2) < 0.5  # (B, Q, h*w)
        # nn.MultiheadAttention wants one mask per (image, head), image-major.
        attn_mask = repeat(background, "b q s -> (b h) q s", h=self.num_heads).detach()
        return outputs_class, outputs_mask, attn_mask

    @staticmethod
    def allow_full_attention_for_empty_masks(attn_mask: Tensor) -> Tensor:
        """Let a query whose mask is empty attend everywhere.

        A row of ``attn_mask`` (B * nheads, Q, S) that forbids every position
        would make the attention softmax undefined (NaN); the official decoder
        clears such rows, so the query falls back to global attention.
        """
        return attn_mask & ~attn_mask.all(dim=-1, keepdim=True)

    @torch.jit.unused
    def _set_aux_loss(self, outputs_class: List[ClassifierOutput],
                      outputs_seg_masks: List[Tensor]) -> List[Dict[str, object]]:
        return [
            self._prediction(logits, masks)
            for logits, masks in zip(outputs_class[:-1], outputs_seg_masks[:-1])
        ]
