"""Sliding-window inference of PerPixelSegmentor (TEST.SLIDING_WINDOW)."""
import math
import os

import numpy as np
import pytest
import torch
from torch import nn

from detectron2.layers import ShapeSpec
from detectron2.modeling import Backbone, build_model

from gmmseg_d2.modeling.meta_arch import PerPixelSegmentor
from gmmseg_d2.modeling.sliding_window import (
    sliding_window_starts, sliding_window_weights,
)
from tests.conftest import REPO_ROOT


class _IdentityBackbone(Backbone):
    """Hands the normalized image to the head as feature "image"."""

    def forward(self, x):
        return {"image": x}

    def output_shape(self):
        return {"image": ShapeSpec(channels=3, stride=1)}


class _StubHead(nn.Module):
    """Logits ``(k + 1) * x_0 + m_1`` for class k, anomaly ``x_2 + m_2``, where
    ``x_c`` is the pixel's channel c and ``m_c`` the mean of channel c over the
    whole input the head sees (a window): pointwise plus one value per window."""

    ignore_value = 255

    def __init__(self, num_classes=3, window_dependent=True):
        super().__init__()
        self.num_classes = num_classes
        self.window_dependent = window_dependent
        self.calls = []

    def forward(self, features, targets=None):
        x = features["image"]
        self.calls.append(tuple(x.shape))
        means = (x.mean(dim=(2, 3), keepdim=True) if self.window_dependent
                 else torch.zeros_like(x[:, :, :1, :1]))
        scale = torch.arange(1, self.num_classes + 1, dtype=x.dtype).view(1, -1, 1, 1)
        logits = scale * x[:, :1] + means[:, 1:2]
        anomaly = (x[:, 2:3] + means[:, 2:3])[:, 0]
        return {"sem_seg": logits, "anomaly_score": anomaly}, {}


def _stub_model(window_dependent=True, **window_kwargs):
    return PerPixelSegmentor(backbone=_IdentityBackbone(),
                             sem_seg_head=_StubHead(window_dependent=window_dependent),
                             pixel_mean=[0.0, 0.0, 0.0], pixel_std=[1.0, 1.0, 1.0],
                             **window_kwargs).eval()


def _image(height, width, seed=0):
    return torch.randn(3, height, width, generator=torch.Generator().manual_seed(seed))


# ------------------------------------------------------------------ helpers
def test_window_starts_cover_and_align_to_the_border():
    assert sliding_window_starts(10, 6, 4) == [0, 4]
    assert sliding_window_starts(13, 8, 4) == [0, 4, 5]  # last window moved back to end at 13
    assert sliding_window_starts(16, 8, 4) == [0, 4, 8]
    assert sliding_window_starts(8, 8, 3) == [0]
    assert sliding_window_starts(5, 8, 4) == [0]  # smaller than the window (padded by the caller)
    assert sliding_window_starts(2048, 1024, 683) == [0, 683, 1024]
    for length, window, stride in [(37, 10, 7), (100, 33, 33), (50, 20, 1)]:
        covered = np.zeros(length, bool)
        for start in sliding_window_starts(length, window, stride):
            assert 0 <= start and start + window <= length
            covered[start:start + window] = True
        assert covered.all()


def test_window_weights():
    torch.testing.assert_close(sliding_window_weights((3, 4), "uniform"), torch.ones(3, 4))
    weights = sliding_window_weights((5, 8), "gaussian", gaussian_sigma=0.25)
    y, x = 1, 6
    expected = math.exp(-0.5 * ((y - 2) / 1.25) ** 2 - 0.5 * ((x - 3.5) / 2.0) ** 2)
    assert weights[y, x].item() == pytest.approx(expected, rel=1e-6)
    assert weights.max().item() == pytest.approx(math.exp(-0.5 * (0.5 / 2.0) ** 2))  # centre
    torch.testing.assert_close(weights, weights.flip(0).flip(1))  # symmetric about the centre
    assert (weights > 0).all()
    with pytest.raises(ValueError, match="BLENDING 'median'"):
        sliding_window_weights((3, 3), "median")


# ------------------------------------------------------------- validation
@pytest.mark.parametrize("kwargs, message", [
    (dict(window_size=(8, 8), window_stride=(4, 9)), "STRIDE \\(4, 9\\) exceeds WINDOW"),
    (dict(window_size=(0, 8)), "WINDOW must be two positive integers"),
    (dict(window_size=(8, 8, 8)), "WINDOW must be two positive integers"),
    (dict(window_size=(8.0, 8)), "WINDOW must be two positive integers"),
    (dict(window_stride=(-1, 4)), "STRIDE must be two positive integers"),
    (dict(window_blending="max"), "Unknown TEST.SLIDING_WINDOW.BLENDING 'max'"),
    (dict(gaussian_sigma=0.0), "GAUSSIAN_SIGMA must be > 0"),
    (dict(windows_per_batch=0), "WINDOWS_PER_BATCH must be a positive integer"),
])
def test_invalid_window_arguments(kwargs, message):
    with pytest.raises(ValueError, match=message):
        _stub_model(**kwargs)


def test_invalid_window_config(demo_cfg):
    demo_cfg.TEST.SLIDING_WINDOW.WINDOW = (64, 64)
    demo_cfg.TEST.SLIDING_WINDOW.STRIDE = (64, 96)
    with pytest.raises(ValueError, match="exceeds WINDOW"):
        build_model(demo_cfg)


# ------------------------------------------------------------- stub model
def _hand_blended(image, boxes, window, weight_fn):
    """Σ_k w_k(p) y_k(p) / Σ_k w_k(p) with the stub head's per-window outputs."""
    x = image.numpy().astype(np.float64)
    _, height, width = x.shape
    win_h, win_w = window
    logits = np.zeros((3, height, width))
    anomaly = np.zeros((height, width))
    total = np.zeros((height, width))
    for y0, x0 in boxes:
        crop = x[:, y0:y0 + win_h, x0:x0 + win_w]
        m1, m2 = crop[1].mean(), crop[2].mean()
        for i in range(win_h):
            for j in range(win_w):
                w = weight_fn(i, j)
                for k in range(3):
                    logits[k, y0 + i, x0 + j] += w * ((k + 1) * crop[0, i, j] + m1)
                anomaly[y0 + i, x0 + j] += w * (crop[2, i, j] + m2)
                total[y0 + i, x0 + j] += w
    assert (total > 0).all()
    return logits / total, anomaly / total


@pytest.mark.parametrize("blending", ["uniform", "gaussian"])
def test_overlapping_windows_blend_as_computed_by_hand(blending):
    image = _image(10, 13)
    # 10 = windows at y 0, 4; 13 = windows at x 0, 4, 5 (the last aligned to the border).
    boxes = [(0, 0), (0, 4), (0, 5), (4, 0), (4, 4), (4, 5)]
    sigma = 0.125

    def weight_fn(i, j):
        if blending == "uniform":
            return 1.0
        return math.exp(-0.5 * ((i - 2.5) / (sigma * 6)) ** 2
                        - 0.5 * ((j - 3.5) / (sigma * 8)) ** 2)

    model = _stub_model(sliding_window=True, window_size=(6, 8), window_stride=(4, 4),
                        window_blending=blending, gaussian_sigma=sigma, windows_per_batch=4)
    with torch.no_grad():
        output = model([{"image": image}])[0]
    # 6 windows in chunks of at most 4.
    assert model.sem_seg_head.calls == [(4, 3, 6, 8), (2, 3, 6, 8)]
    expected_logits, expected_anomaly = _hand_blended(image, boxes, (6, 8), weight_fn)
    assert output["sem_seg"].shape == (3, 10, 13)
    np.testing.assert_allclose(output["sem_seg"].numpy(), expected_logits, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(output["anomaly_score"].numpy(), expected_anomaly, rtol=1e-5,
                               atol=1e-5)


@pytest.mark.parametrize("blending", ["uniform", "gaussian"])
def test_translation_equivariant_model_is_unchanged_by_windows(blending):
    """A pointwise model gives the whole-image result under any windows and weights."""
    image = _image(11, 17, seed=3)
    whole = _stub_model(window_dependent=False)
    windowed = _stub_model(window_dependent=False, sliding_window=True, window_size=(5, 6),
                           window_stride=(3, 2), window_blending=blending)
    with torch.no_grad():
        expected = whole([{"image": image}])[0]
        output = windowed([{"image": image}])[0]
    torch.testing.assert_close(output["sem_seg"], expected["sem_seg"])
    torch.testing.assert_close(output["anomaly_score"], expected["anomaly_score"])


def test_image_smaller_than_window_is_padded_and_cropped():
    image = _image(5, 7, seed=1)
    model = _stub_model(sliding_window=True, window_size=(8, 8), window_stride=(4, 4))
    with torch.no_grad():
        output = model([{"image": image, "height": 10, "width": 14}])[0]
        direct = model.sliding_window_inference(image)
    assert model.sem_seg_head.calls[0] == (1, 3, 8, 8)  # one window, padded to 8x8
    assert direct["sem_seg"].shape == (3, 5, 7) and direct["anomaly_score"].shape == (5, 7)
    # The window mean includes the zero padding (the mean colour after normalization).
    padded = torch.zeros(3, 8, 8)
    padded[:, :5, :7] = image
    torch.testing.assert_close(direct["sem_seg"][1], 2 * image[0] + padded[1].mean())
    torch.testing.assert_close(direct["anomaly_score"], image[2] + padded[2].mean())
    # The record's height/width still apply after blending.
    assert output["sem_seg"].shape == (3, 10, 14) and output["anomaly_score"].shape == (10, 14)


# ------------------------------------------------------------- real models
@pytest.mark.parametrize("config", ["fcn_R18_softmax.yaml", "deeplabv3plus_R18_gmm.yaml"])
def test_window_covering_the_image_equals_whole_image_inference(demo_cfg, config):
    demo_cfg.merge_from_file(os.path.join(REPO_ROOT, "configs", "mosaic", config))
    torch.manual_seed(0)
    model = build_model(demo_cfg).eval()
    assert not model.sliding_window  # whole-image by default
    images = [torch.randint(0, 255, (3, 64, 96), dtype=torch.uint8,
                            generator=torch.Generator().manual_seed(i)) for i in range(2)]
    inputs = [{"image": images[0], "height": 128, "width": 192}, {"image": images[1]}]
    with torch.no_grad():
        expected = model(inputs)
        model.sliding_window, model.window_size, model.window_stride = True, (64, 96), (32, 48)
        output = model(inputs)
    # Whole-image inference runs both images in one batch, the windows one
    # image at a time: the same computation up to float32 rounding of the
    # batched matrix products (~1e-5 relative).
    for got, want in zip(output, expected):
        assert got["sem_seg"].shape == want["sem_seg"].shape
        torch.testing.assert_close(got["sem_seg"], want["sem_seg"], rtol=1e-4, atol=2e-4)
        torch.testing.assert_close(got["anomaly_score"], want["anomaly_score"], rtol=1e-4,
                                   atol=2e-4)
