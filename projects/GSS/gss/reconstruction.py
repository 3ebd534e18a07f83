"""Maskige round trips: labels → maskige → VQ-VAE tokens → decoded maskige → X⁻¹ → labels, and their mIoU.

This is the paper's "reconstruction mIoU" (its Table 1): how much of a
ground-truth mask survives the VQ-VAE and the chosen inverse, with no image
model involved.
"""
from typing import Dict, Iterable

import numpy as np
import torch
from torch.nn import functional as F

from .inverse import MaskigeInverse
from .maskige import Maskige, upsample_labels
from .vqvae import MaskigeAutoencoder

__all__ = ["ConfusionMatrix", "pad_labels", "reconstruct_labels"]


def pad_labels(labels: torch.Tensor, multiple: int, ignore_value: int) -> torch.Tensor:
    """Pad ``(N, H, W)`` labels at the bottom / right with ``ignore_value`` to multiples of ``multiple``."""
    height, width = labels.shape[-2:]
    pad_h, pad_w = -height % multiple, -width % multiple
    if pad_h or pad_w:
        labels = F.pad(labels, (0, pad_w, 0, pad_h), value=ignore_value)
    return labels


@torch.no_grad()
def reconstruct_labels(labels: torch.Tensor, vqvae: MaskigeAutoencoder, maskige: Maskige, inverse: MaskigeInverse,
                       label_upsample: int = 2, ignore_value: int = 255) -> torch.Tensor:
    """Labels ``(N, H, W)`` → their reconstruction ``(N, H, W)`` through the maskige and the VQ-VAE.

    As in training: upsample ×``label_upsample``, paint, encode, decode; then
    the inverse's scores, resized to ``H × W`` (bilinear), argmax.
    """
    height, width = labels.shape[-2:]
    padded = pad_labels(labels, vqvae.downsample // label_upsample, ignore_value)
    upsampled = upsample_labels(padded, label_upsample, maskige.num_classes, ignore_value)
    decoded = vqvae.decode(vqvae.encode(maskige(upsampled)))
    scores = F.interpolate(inverse(decoded), size=padded.shape[-2:], mode="bilinear", align_corners=False)
    return scores.argmax(1)[:, :height, :width]


class ConfusionMatrix:
    """Accumulates a ``(K, K)`` confusion matrix (rows: truth) over non-ignored pixels; reports mIoU."""

    def __init__(self, num_classes: int, ignore_value: int = 255):
        self.num_classes, self.ignore_value = num_classes, ignore_value
        self.matrix = np.zeros((num_classes, num_classes), dtype=np.int64)

    def update(self, predictions: torch.Tensor, labels: torch.Tensor) -> None:
        valid = labels != self.ignore_value
        truth = labels[valid].long().cpu().numpy()
        predicted = predictions[valid].long().cpu().numpy()
        if truth.size and (truth.min() < 0 or truth.max() >= self.num_classes):
            raise ValueError(f"label values {np.unique(truth[(truth < 0) | (truth >= self.num_classes)])[:5]} are "
                             f"neither classes 0..{self.num_classes - 1} nor the ignore value {self.ignore_value}")
        np.add.at(self.matrix, (truth, predicted), 1)

    def update_all(self, pairs: Iterable) -> "ConfusionMatrix":
        for predictions, labels in pairs:
            self.update(predictions, labels)
        return self

    def metrics(self) -> Dict[str, float]:
        """``{"mIoU", "pACC"}`` in %, mIoU over the classes present in the truth or the predictions."""
        true_positive = np.diag(self.matrix).astype(np.float64)
        union = self.matrix.sum(0) + self.matrix.sum(1) - true_positive
        present = union > 0
        total = self.matrix.sum()
        return {
            "mIoU": float(100 * (true_positive[present] / union[present]).mean()) if present.any() else float("nan"),
            "pACC": float(100 * true_positive.sum() / total) if total else float("nan"),
        }
