"""SSD-style photometric distortion as a Detectron2 transform."""
import random

import cv2
import numpy as np
from fvcore.transforms.transform import Transform

__all__ = ["ColorAugSSDTransform"]


class ColorAugSSDTransform(Transform):
    """Random brightness, contrast, saturation and hue changes (Liu et al., SSD).

    Each distortion is applied with probability 1/2, contrast either before or
    after the HSV distortions. Only the image changes; segmentation maps and
    coordinates pass through. Works on ``uint8`` RGB or BGR images ``(H, W, 3)``.
    """

    def __init__(self, img_format: str, brightness_delta: int = 32,
                 contrast_range=(0.5, 1.5), saturation_range=(0.5, 1.5), hue_delta: int = 18):
        super().__init__()
        if img_format not in ("RGB", "BGR"):
            raise ValueError(f"ColorAugSSDTransform needs an RGB or BGR image, got {img_format!r}")
        self._set_attributes(locals())

    def apply_coords(self, coords):
        return coords

    def apply_segmentation(self, segmentation):
        return segmentation

    def inverse(self):
        raise NotImplementedError("Photometric distortions are not invertible")

    def apply_image(self, img: np.ndarray, interp=None) -> np.ndarray:
        rgb = img if self.img_format == "RGB" else img[:, :, ::-1]
        out = rgb.astype(np.float32)
        if random.random() < 0.5:
            out += random.uniform(-self.brightness_delta, self.brightness_delta)
        contrast_first = random.random() < 0.5
        if contrast_first:
            out = self._contrast(out)
        hsv = cv2.cvtColor(np.clip(out, 0, 255).astype(np.uint8), cv2.COLOR_RGB2HSV).astype(np.int32)
        if random.random() < 0.5:
            hsv[:, :, 1] = np.clip(hsv[:, :, 1] * random.uniform(*self.saturation_range), 0, 255)
        if random.random() < 0.5:
            # OpenCV's uint8 hue lives in [0, 180).
            hsv[:, :, 0] = (hsv[:, :, 0] + random.randint(-self.hue_delta, self.hue_delta)) % 180
        out = cv2.cvtColor(hsv.astype(np.uint8), cv2.COLOR_HSV2RGB).astype(np.float32)
        if not contrast_first:
            out = self._contrast(out)
        out = np.clip(out, 0, 255).astype(np.uint8)
        return out if self.img_format == "RGB" else np.ascontiguousarray(out[:, :, ::-1])

    def _contrast(self, img: np.ndarray) -> np.ndarray:
        if random.random() < 0.5:
            return img * random.uniform(*self.contrast_range)
        return img
