"""Single-image inference for the demo tools: a thin :class:`DefaultPredictor`."""
from __future__ import annotations

import os
from typing import Dict

import numpy as np
import torch

from detectron2.config import CfgNode
from detectron2.engine import DefaultPredictor

__all__ = ["SemSegPredictor", "check_model_weights"]


def check_model_weights(weights: str, *, allow_random_weights: bool = False) -> None:
    """Refuse to run a demo on weights that are not there.

    A model built from a config alone has random weights and would draw
    meaningless pictures without complaint, so an empty ``MODEL.WEIGHTS`` is
    an error unless ``allow_random_weights`` (``--allow-random-weights``). A
    local path must exist; URLs (``detectron2://``, ``https://``, ...) are left
    to the checkpointer.

    Raises:
        ValueError: ``weights`` is empty and random weights are not allowed.
        FileNotFoundError: ``weights`` is a local path that does not exist.
    """
    if not weights:
        if allow_random_weights:
            return
        raise ValueError("MODEL.WEIGHTS is empty, so the model would have random weights. Pass a trained "
                         "checkpoint with `--opts MODEL.WEIGHTS path/to/model_final.pth` (tools/train_net.py "
                         "writes it to OUTPUT_DIR), or --allow-random-weights to draw an untrained model anyway.")
    if "://" not in weights and not os.path.isfile(weights):
        raise FileNotFoundError(f"MODEL.WEIGHTS file {weights!r} does not exist (looked in {os.getcwd()!r}); "
                                "pass the path of a checkpoint, e.g. OUTPUT_DIR/model_final.pth.")


class SemSegPredictor(DefaultPredictor):
    """:class:`DefaultPredictor` that takes the image in ``cfg.INPUT.FORMAT`` order.

    Builds the model and loads ``cfg.MODEL.WEIGHTS`` as Detectron2's predictor
    does, resizes with ``INPUT.MIN_SIZE_TEST``/``MAX_SIZE_TEST``, and returns
    the model's output for the image at its original size:
    ``{"sem_seg": (C, H, W), "anomaly_score": (H, W)}`` for gmmseg_d2's
    meta-architectures. Detectron2's predictor always expects BGR and flips
    it for RGB models; reading the file directly in the model's format (as
    the demo does) makes the flip unnecessary.
    """

    def __init__(self, cfg: CfgNode) -> None:
        super().__init__(cfg)
        self.device = torch.device(cfg.MODEL.DEVICE)

    def __call__(self, image: np.ndarray) -> Dict[str, torch.Tensor]:
        """
        Args:
            image: ``(H, W, 3)`` uint8 in ``cfg.INPUT.FORMAT`` channel order.
        Returns:
            the model's output dict for this image (tensors on the model's device).
        """
        if image.ndim != 3 or image.shape[2] != 3:
            raise ValueError(f"SemSegPredictor expects an (H, W, 3) image, got shape {image.shape}")
        with torch.no_grad():
            height, width = image.shape[:2]
            resized = self.aug.get_transform(image).apply_image(image)
            tensor = torch.as_tensor(np.ascontiguousarray(resized).astype("float32").transpose(2, 0, 1))
            inputs = {"image": tensor.to(self.device), "height": height, "width": width}
            return self.model([inputs])[0]
