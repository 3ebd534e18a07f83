"""Optimizer and LR-schedule construction with Mask2Former's options.

Options (all existing Detectron2/Mask2Former keys):
``SOLVER.OPTIMIZER`` ("SGD" | "ADAMW"), ``SOLVER.BACKBONE_MULTIPLIER`` (LR factor
for parameters under ``backbone.``), ``SOLVER.WEIGHT_DECAY_NORM`` (norm
layers), ``SOLVER.WEIGHT_DECAY_EMBED`` (embeddings and position tables), and
``SOLVER.CLIP_GRADIENTS`` with ``CLIP_TYPE: "full_model"`` clipping the norm of
all gradients together (Detectron2 itself clips per parameter).
"""
import itertools
from typing import Any, Dict, List, Type

import torch
from torch import nn

from detectron2.solver.build import maybe_add_gradient_clipping
from detectron2.projects.deeplab import build_lr_scheduler as _build_deeplab_lr_scheduler

__all__ = ["build_optimizer", "build_lr_scheduler", "get_optimizer_param_groups"]

_NORM_TYPES = (
    nn.BatchNorm1d, nn.BatchNorm2d, nn.BatchNorm3d, nn.SyncBatchNorm, nn.GroupNorm,
    nn.InstanceNorm1d, nn.InstanceNorm2d, nn.InstanceNorm3d, nn.LayerNorm, nn.LocalResponseNorm,
)
# Parameters that act as learned embeddings although they are not nn.Embedding.
_EMBEDDING_PARAM_NAMES = ("relative_position_bias_table", "absolute_pos_embed")


def get_optimizer_param_groups(
    model: nn.Module,
    *,
    base_lr: float,
    weight_decay: float,
    weight_decay_norm: float,
    weight_decay_embed: float,
    backbone_multiplier: float,
) -> List[Dict[str, Any]]:
    """One param group per trainable parameter, with its own lr and weight decay.

    Shared parameters appear once. ``backbone.*`` parameters get
    ``base_lr * backbone_multiplier``.
    """
    groups: List[Dict[str, Any]] = []
    seen = set()
    for module_name, module in model.named_modules():
        for param_name, param in module.named_parameters(recurse=False):
            if not param.requires_grad or param in seen:
                continue
            seen.add(param)
            lr, decay = base_lr, weight_decay
            if module_name.startswith("backbone") or module_name == "backbone":
                lr = base_lr * backbone_multiplier
            if isinstance(module, _NORM_TYPES):
                decay = weight_decay_norm
            if isinstance(module, nn.Embedding) or param_name in _EMBEDDING_PARAM_NAMES:
                decay = weight_decay_embed
            groups.append({"params": [param], "lr": lr, "weight_decay": decay,
                           "name": f"{module_name}.{param_name}" if module_name else param_name})
    return groups


def _with_full_model_gradient_clipping(optimizer_cls: Type[torch.optim.Optimizer], max_norm: float):
    """Subclass of ``optimizer_cls`` whose ``step`` first clips the global grad norm."""

    class FullModelGradientClippingOptimizer(optimizer_cls):
        def step(self, closure=None):
            all_params = itertools.chain(*[group["params"] for group in self.param_groups])
            torch.nn.utils.clip_grad_norm_(all_params, max_norm)
            return super().step(closure=closure)

    FullModelGradientClippingOptimizer.__name__ = f"{optimizer_cls.__name__}WithFullModelClipping"
    return FullModelGradientClippingOptimizer


def build_optimizer(cfg, model: nn.Module) -> torch.optim.Optimizer:
    """Build the optimizer named by ``SOLVER.OPTIMIZER`` with per-parameter groups."""
    solver = cfg.SOLVER
    groups = get_optimizer_param_groups(
        model,
        base_lr=solver.BASE_LR,
        weight_decay=solver.WEIGHT_DECAY,
        weight_decay_norm=solver.WEIGHT_DECAY_NORM,
        weight_decay_embed=solver.WEIGHT_DECAY_EMBED,
        backbone_multiplier=solver.BACKBONE_MULTIPLIER,
    )
    # The "name" entries help debugging but optimizers reject unknown keys
    # in some versions; keep them out of the real groups.
    for group in groups:
        group.pop("name")

    name = solver.OPTIMIZER.upper()
    if name == "SGD":
        optimizer_cls, kwargs = torch.optim.SGD, {"momentum": solver.MOMENTUM,
                                                  "nesterov": solver.NESTEROV}
    elif name == "ADAMW":
        optimizer_cls, kwargs = torch.optim.AdamW, {}
    else:
        raise ValueError(f"Unknown SOLVER.OPTIMIZER {solver.OPTIMIZER!r}; use 'SGD' or 'ADAMW'")

    clip = solver.CLIP_GRADIENTS
    full_model_clipping = clip.ENABLED and clip.CLIP_TYPE == "full_model"
    if full_model_clipping:
        optimizer_cls = _with_full_model_gradient_clipping(optimizer_cls, clip.CLIP_VALUE)
    optimizer = optimizer_cls(groups, lr=solver.BASE_LR, **kwargs)
    if not full_model_clipping:
        # Detectron2's per-parameter "value"/"norm" clipping, or nothing.
        optimizer = maybe_add_gradient_clipping(cfg, optimizer)
    return optimizer


def build_lr_scheduler(cfg, optimizer: torch.optim.Optimizer):
    """Detectron2's schedules plus ``WarmupPolyLR`` (``SOLVER.LR_SCHEDULER_NAME``)."""
    return _build_deeplab_lr_scheduler(cfg, optimizer)
