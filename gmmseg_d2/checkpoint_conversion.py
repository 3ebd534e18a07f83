"""MMSegmentation checkpoints (the official GMMSeg releases, MiT ImageNet weights) -> gmmseg_d2 state dicts.

The official GMMSeg models were trained in an MMSegmentation 0.2x fork
(leonnnop/GMMSeg): a ``MixVisionTransformer`` backbone and a
``SegformerGMMSegHead``. Their checkpoints are ``torch.save`` d dicts with
``meta``, ``state_dict`` (and ``optimizer``). This module maps every key of
such a ``state_dict`` to the names of ``PerPixelSegmentor`` with
``D2MixVisionTransformer`` + ``SegFormerHead`` + the ``gmm`` (or ``softmax``)
classifier, so that Detectron2's checkpointer loads the result with no missing
or unexpected key:

==============================================  =====================================================
official (``backbone.`` / ``decode_head.``)     gmmseg_d2 (``backbone.`` / ``sem_seg_head.``)
==============================================  =====================================================
``layers.{i}.0.projection`` / ``.0.norm``       ``stages.{i}.patch_embed.proj`` / ``.norm``
``layers.{i}.1.{j}.norm1`` / ``norm2``           ``stages.{i}.blocks.{j}.norm1`` / ``norm2``
``layers.{i}.1.{j}.attn.attn.in_proj_*``        ``...attn.q`` (first third), ``...attn.kv`` (the rest)
``layers.{i}.1.{j}.attn.attn.out_proj``         ``...attn.proj``
``layers.{i}.1.{j}.attn.sr`` / ``attn.norm``    the same
``layers.{i}.1.{j}.ffn.layers.0 / 1 / 4``       ``...mlp.fc1`` (1x1 conv -> linear) / ``dwconv`` / ``fc2``
``layers.{i}.2``                                ``stages.{i}.norm``
``convs.{i}.conv`` / ``.bn``                    ``convs.{i}`` / ``convs.{i}.norm`` (same for ``fusion_conv``)
``projection.conv`` / ``.bn``                   ``predictor.projection.conv`` (1x1 conv -> linear) / ``.bn``
``feat_norm`` / ``mask_norm``                   ``predictor.embedding_norm`` / ``predictor.class_norm``
``means`` ``(C, M, D)``                         ``predictor.means`` (L2-normalised, as every official
                                                forward does before using them)
``diagonal`` ``(C, M, D)``                      ``predictor.stds`` (the official ``scale_diag``)
``iteration_counter`` ``(1,)`` float            ``predictor.iteration`` (int64 scalar)
``queue`` ``(C*M, D, K)``, ``queue_ptr``        ``predictor.memory.*`` (see :func:`official_memory_state`)
``conv_seg`` (softmax head)                     ``predictor.weight`` / ``.bias``
==============================================  =====================================================

Dropped, and listed in :attr:`ConvertedCheckpoint.dropped`: the GMM head's
``conv_seg`` (MMSegmentation's base head always builds it; the GMM head never
calls it) and ``eye_matrix`` (a constant vector of ones used as the variance
floor's shape).

MiT ImageNet weights are accepted as backbone initialisation in both
releases' layouts: MMSegmentation's ``mit_b*_mmseg.pth`` (the keys above
without ``backbone.``) and the original SegFormer ``mit_b*.pth``
(``patch_embed{n}``, ``block{n}.{j}``, ``norm{n}``; its classification
``head`` is dropped).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.nn.functional as F

from .modeling.gmm.memory import ring_chunk_sums

__all__ = [
    "ConvertedCheckpoint",
    "MEMORY_OPTIONS",
    "convert_mit_imagenet",
    "convert_mmseg_mit",
    "convert_mmseg_segformer",
    "convert_original_mit",
    "detect_mmseg_checkpoint",
    "official_memory_state",
]

#: Values of the converters' ``memory`` argument (``tools/convert_gmmseg_official.py --memory``).
MEMORY_OPTIONS = ("ring", "stats", "drop")

StateDict = Dict[str, torch.Tensor]


@dataclass
class ConvertedCheckpoint:
    """A converted state dict and what the conversion did."""

    #: gmmseg_d2 names -> tensors.
    model: StateDict
    #: Source keys deliberately not converted (never used by the official model).
    dropped: List[str] = field(default_factory=list)
    #: What kind of source it was (``"gmmseg_segformer"``, ``"mmseg_segformer"``, ``"mit_mmseg"``, ``"mit_original"``).
    source: str = ""


def _conv1x1_to_linear(weight: torch.Tensor) -> torch.Tensor:
    if weight.dim() != 4 or weight.shape[-2:] != (1, 1):
        raise ValueError(f"expected a 1x1 conv weight (out, in, 1, 1), got shape {tuple(weight.shape)}")
    return weight[:, :, 0, 0]


# ----------------------------------------------------------------------- MiT

_MMSEG_MIT_RULES: List[Tuple[re.Pattern, Callable[[re.Match, torch.Tensor], Dict[str, torch.Tensor]]]] = []


def _rule(pattern: str):
    def register(fn):
        _MMSEG_MIT_RULES.append((re.compile(pattern + r"$"), fn))
        return fn
    return register


@_rule(r"layers\.(\d+)\.0\.projection\.(weight|bias)")
def _patch_proj(m, t):
    return {f"stages.{m[1]}.patch_embed.proj.{m[2]}": t}


@_rule(r"layers\.(\d+)\.0\.norm\.(weight|bias)")
def _patch_norm(m, t):
    return {f"stages.{m[1]}.patch_embed.norm.{m[2]}": t}


@_rule(r"layers\.(\d+)\.1\.(\d+)\.(norm1|norm2)\.(weight|bias)")
def _block_norm(m, t):
    return {f"stages.{m[1]}.blocks.{m[2]}.{m[3]}.{m[4]}": t}


@_rule(r"layers\.(\d+)\.1\.(\d+)\.attn\.attn\.in_proj_(weight|bias)")
def _in_proj(m, t):
    # nn.MultiheadAttention stacks the query, key and value projections.
    dim = t.shape[0] // 3
    prefix = f"stages.{m[1]}.blocks.{m[2]}.attn"
    return {f"{prefix}.q.{m[3]}": t[:dim], f"{prefix}.kv.{m[3]}": t[dim:]}


@_rule(r"layers\.(\d+)\.1\.(\d+)\.attn\.attn\.out_proj\.(weight|bias)")
def _out_proj(m, t):
    return {f"stages.{m[1]}.blocks.{m[2]}.attn.proj.{m[3]}": t}


@_rule(r"layers\.(\d+)\.1\.(\d+)\.attn\.(sr|norm)\.(weight|bias)")
def _reduction(m, t):
    return {f"stages.{m[1]}.blocks.{m[2]}.attn.{m[3]}.{m[4]}": t}


_FFN_LAYERS = {"0": "fc1", "1": "dwconv", "4": "fc2"}


@_rule(r"layers\.(\d+)\.1\.(\d+)\.ffn\.layers\.([014])\.(weight|bias)")
def _ffn(m, t):
    name = _FFN_LAYERS[m[3]]
    if name != "dwconv" and m[4] == "weight":
        t = _conv1x1_to_linear(t)
    return {f"stages.{m[1]}.blocks.{m[2]}.mlp.{name}.{m[4]}": t}


@_rule(r"layers\.(\d+)\.2\.(weight|bias)")
def _stage_norm(m, t):
    return {f"stages.{m[1]}.norm.{m[2]}": t}


def convert_mmseg_mit(state_dict: Mapping[str, torch.Tensor], src_prefix: str = "",
                      dst_prefix: str = "") -> StateDict:
    """MMSegmentation ``MixVisionTransformer`` keys under ``src_prefix`` -> ours under ``dst_prefix``.

    Raises ``ValueError`` naming any key under ``src_prefix`` that is not a MiT parameter.
    """
    converted: StateDict = {}
    unknown = []
    for key, tensor in state_dict.items():
        if not key.startswith(src_prefix):
            continue
        name = key[len(src_prefix):]
        for pattern, fn in _MMSEG_MIT_RULES:
            match = pattern.match(name)
            if match:
                converted.update({dst_prefix + k: v for k, v in fn(match, tensor).items()})
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Not MMSegmentation MiT parameters (unexpected layout or a newer model?): "
                         f"{unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return converted


def convert_original_mit(state_dict: Mapping[str, torch.Tensor], dst_prefix: str = ""
                         ) -> Tuple[StateDict, List[str]]:
    """The original SegFormer release (``mit_b*.pth``: ``patch_embed{n}``, ``block{n}.{j}``,
    ``norm{n}``, ``n = 1..4``) -> ours. Returns ``(state_dict, dropped keys)`` (its
    classification ``head``)."""
    converted: StateDict = {}
    dropped, unknown = [], []
    patterns = [
        (re.compile(r"patch_embed(\d)\.(proj|norm)\.(weight|bias)$"),
         lambda m: f"stages.{int(m[1]) - 1}.patch_embed.{m[2]}.{m[3]}"),
        (re.compile(r"block(\d)\.(\d+)\.mlp\.dwconv\.dwconv\.(weight|bias)$"),
         lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.mlp.dwconv.{m[3]}"),
        (re.compile(r"block(\d)\.(\d+)\.(.+)$"), lambda m: f"stages.{int(m[1]) - 1}.blocks.{m[2]}.{m[3]}"),
        (re.compile(r"norm(\d)\.(weight|bias)$"), lambda m: f"stages.{int(m[1]) - 1}.norm.{m[2]}"),
    ]
    for key, tensor in state_dict.items():
        if key.startswith("head."):
            dropped.append(key)
            continue
        for pattern, rename in patterns:
            match = pattern.match(key)
            if match:
                converted[dst_prefix + rename(match)] = tensor
                break
        else:
            unknown.append(key)
    if unknown:
        raise ValueError(f"Not SegFormer MiT parameters: {unknown[:10]}{' ...' if len(unknown) > 10 else ''}")
    return converted, dropped


def convert_mit_imagenet(state_dict: Mapping[str, torch.Tensor], dst_prefix: str = "backbone."
                         ) -> ConvertedCheckpoint:
    """A MiT ImageNet checkpoint in either release's layout -> our backbone keys under ``dst_prefix``."""
    if any(key.startswith("layers.0.0.projection") for key in state_dict):
        return ConvertedCheckpoint(convert_mmseg_mit(state_dict, "", dst_prefix), [], "mit_mmseg")
    if any(key.startswith("patch_embed1.") for key in state_dict):
        converted, dropped = convert_original_mit(state_dict, dst_prefix)
        return ConvertedCheckpoint(converted, dropped, "mit_original")
    raise ValueError("Not a MiT checkpoint: expected MMSegmentation's 'layers.0.0.projection.*' (mit_b*_mmseg.pth) "
                     "or the original SegFormer 'patch_embed1.*' (mit_b*.pth) keys")


# ---------------------------------------------------------- GMMSeg SegFormer

def official_memory_state(queue: torch.Tensor, queue_ptr: torch.Tensor, num_classes: int, memory: str = "ring",
                          chunk_size: int = 20) -> StateDict:
    """The official memory as one of our memories' buffers (names relative to ``memory.``).

    The official ``queue (C*M, D, K)`` is a ring of ``K`` features per
    component that starts full of random unit vectors and is always entirely
    used by the M-step, ``queue_ptr (C*M,)`` the next slot. So every
    component counts ``K`` valid samples; ``total_written`` (features ever
    written, which the checkpoint does not record) is set to ``K`` too,
    meaning "holds data"; nothing is pending (the official M-step refits from
    the memory at every interval anyway).

    Args:
        memory: ``"ring"`` (``features (C, M, K, D)``, a transposed view of
            ``queue``, and ``pointer``; exact, the official size; a stats
            memory converts it exactly when it loads it) or ``"stats"`` (``chunk_sum`` etc. for
            ``MODEL.GMM.MEMORY_KIND stats`` with chunk size ``chunk_size`` =
            ``MODEL.GMM.MAX_SAMPLES_PER_COMPONENT``: the moments are exactly
            the ring's, at ``2 / chunk_size`` of its size).
    """
    num_slots, dim, capacity = queue.shape
    if num_slots % num_classes:
        raise ValueError(f"official queue of shape {tuple(queue.shape)} does not hold C*M rows for C={num_classes}")
    components = num_slots // num_classes
    shape = (num_classes, components)
    features = queue.view(num_classes, components, dim, capacity).transpose(2, 3)  # a view: no copy
    pointer = queue_ptr.view(shape).long()
    count = torch.full(shape, capacity, dtype=torch.long)
    state = {"count": count, "total_written": count.clone(), "pending": torch.zeros(shape, dtype=torch.bool)}
    if memory == "ring":
        state.update(features=features, pointer=pointer)
    elif memory == "stats":
        chunk_sum, chunk_square_sum = ring_chunk_sums(features, pointer, count, chunk_size)
        state.update(chunk_sum=chunk_sum, chunk_square_sum=chunk_square_sum, filled=count.clone())
    else:
        raise ValueError(f"memory must be 'ring' or 'stats' here, got {memory!r}")
    return state


def _head_conv(prefix_in: str, prefix_out: str, state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """An MMSegmentation ConvModule (``.conv``, ``.bn``) -> a Detectron2 Conv2d (``weight``, ``.norm``)."""
    out = {}
    for key, tensor in state_dict.items():
        if not key.startswith(prefix_in):
            continue
        rest = key[len(prefix_in):]
        if rest.startswith("conv."):
            out[prefix_out + rest[len("conv."):]] = tensor
        elif rest.startswith("bn."):
            out[prefix_out + "norm." + rest[len("bn."):]] = tensor
        else:
            raise ValueError(f"unexpected ConvModule key {key}")
    return out


def convert_mmseg_segformer(state_dict: Mapping[str, torch.Tensor], memory: str = "ring",
                            chunk_size: int = 20) -> ConvertedCheckpoint:
    """An official GMMSeg SegFormer (or MMSegmentation SegFormer) ``state_dict`` -> ours.

    Args:
        state_dict: the checkpoint's ``state_dict`` (``backbone.*``, ``decode_head.*``).
        memory: the GMM memory as ``"ring"`` (exact, large: ``C*M*K*D`` floats,
            7 GB for COCO-Stuff), ``"stats"`` (exact moments for
            ``MODEL.GMM.MEMORY_KIND stats``, 10x smaller at chunk size 20) or
            ``"drop"`` (evaluation only: the memory is not needed to predict;
            the model keeps the memory it was built with, and the checkpointer
            reports its keys as missing).
        chunk_size: the stats memory's chunk size (``MODEL.GMM.MAX_SAMPLES_PER_COMPONENT``).
    """
    if memory not in MEMORY_OPTIONS:
        raise ValueError(f"memory must be one of {MEMORY_OPTIONS}, got {memory!r}")
    keys = set(state_dict)
    unknown = [k for k in keys if not k.startswith(("backbone.", "decode_head."))]
    if unknown:
        raise ValueError(f"Not an MMSegmentation EncoderDecoder state dict (keys outside backbone./decode_head.): "
                         f"{sorted(unknown)[:10]}")
    out = convert_mmseg_mit(state_dict, "backbone.", "backbone.")
    head_in, head_out = "decode_head.", "sem_seg_head."
    dropped: List[str] = []
    num_levels = len({int(m[1]) for k in keys if (m := re.match(r"decode_head\.convs\.(\d+)\.", k))})
    for i in range(num_levels):
        out.update(_head_conv(f"{head_in}convs.{i}.", f"{head_out}convs.{i}.", state_dict))
    out.update(_head_conv(f"{head_in}fusion_conv.", f"{head_out}fusion_conv.", state_dict))
    handled = {k for k in keys if k.startswith(("backbone.", f"{head_in}convs.", f"{head_in}fusion_conv."))}

    predictor = head_out + "predictor."
    is_gmm = f"{head_in}means" in keys
    if is_gmm:
        means = state_dict[f"{head_in}means"]
        num_classes = means.shape[0]
        for key in sorted(keys - handled):
            if not key.startswith(head_in):
                continue
            name = key[len(head_in):]
            tensor = state_dict[key]
            if name == "projection.conv.weight":
                out[predictor + "projection.conv.weight"] = _conv1x1_to_linear(tensor)
            elif name.startswith("projection.bn."):
                out[predictor + "projection.bn." + name[len("projection.bn."):]] = tensor
            elif name.startswith("projection."):
                raise ValueError(f"unexpected GMMSeg projection key {key} (expected a conv+BN ConvModule)")
            elif name.startswith("feat_norm."):
                out[predictor + "embedding_norm." + name[len("feat_norm."):]] = tensor
            elif name.startswith("mask_norm."):
                out[predictor + "class_norm." + name[len("mask_norm."):]] = tensor
            elif name == "means":
                out[predictor + "means"] = F.normalize(tensor.float(), dim=-1)
            elif name == "diagonal":
                out[predictor + "stds"] = tensor.float()
            elif name == "iteration_counter":
                out[predictor + "iteration"] = torch.tensor(int(round(float(tensor.reshape(-1)[0]))))
            elif name.startswith("conv_seg.") or name == "eye_matrix":
                dropped.append(key)
            elif name in ("queue", "queue_ptr"):
                continue
            else:
                raise ValueError(f"unexpected GMMSeg head key {key}")
            handled.add(key)
        if f"{head_in}queue" in keys and memory != "drop":
            memory_state = official_memory_state(state_dict[f"{head_in}queue"], state_dict[f"{head_in}queue_ptr"],
                                                 num_classes, memory, chunk_size)
            out.update({predictor + "memory." + k: v for k, v in memory_state.items()})
        elif memory == "drop":
            dropped += [k for k in (f"{head_in}queue", f"{head_in}queue_ptr") if k in keys]
        handled |= {f"{head_in}queue", f"{head_in}queue_ptr"} & keys
        source = "gmmseg_segformer"
    else:
        for name in ("weight", "bias"):
            key = f"{head_in}conv_seg.{name}"
            if key in keys:
                out[predictor + name] = state_dict[key]
                handled.add(key)
        source = "mmseg_segformer"
    leftover = sorted(keys - handled - set(dropped))
    if leftover:
        raise ValueError(f"Keys of the MMSegmentation checkpoint this converter does not know: {leftover[:10]}")
    return ConvertedCheckpoint(out, sorted(dropped), source)


def detect_mmseg_checkpoint(obj) -> Optional[str]:
    """What an object loaded from a ``.pth`` file is: ``"segformer"`` (an MMSegmentation
    EncoderDecoder with a MiT backbone: ``state_dict`` with ``backbone.layers.*`` and
    ``decode_head.*``), ``"mit"`` (MiT ImageNet weights in either layout) or None."""
    if not isinstance(obj, Mapping):
        return None
    state = obj.get("state_dict", obj)
    if not isinstance(state, Mapping) or "model" in obj:
        return None
    keys = list(state)
    if any(k.startswith("backbone.layers.0.0.projection") for k in keys) and \
            any(k.startswith("decode_head.") for k in keys):
        return "segformer"
    if any(k.startswith(("layers.0.0.projection", "patch_embed1.proj")) for k in keys) and \
            not any(k.startswith(("backbone.", "sem_seg_head.")) for k in keys):
        return "mit"
    return None
