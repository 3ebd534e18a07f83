"""Sliding-window inference of MaskFormer (TEST.SLIDING_WINDOW), semantic outputs only.

Tiny mosaic Mask2Former-R18 models (softmax and GMM class heads), untrained,
in eval mode on 64x96 images: whole-image inference is the reference.
"""
import os

import pytest
import torch

from tests.conftest import REPO_ROOT

SOFTMAX_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_softmax.yaml")
GMM_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_gmm.yaml")
HEIGHT, WIDTH = 64, 96


def _model(config, *opts):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(config)
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
    torch.manual_seed(0)
    return build_model(cfg).eval()


def _image(seed=1, height=HEIGHT, width=WIDTH):
    generator = torch.Generator().manual_seed(seed)
    return torch.randint(0, 255, (3, height, width), dtype=torch.uint8, generator=generator)


def _run(model, records, sliding):
    previous = model.sliding_window
    model.sliding_window = sliding
    try:
        with torch.no_grad():
            return model(records)
    finally:
        model.sliding_window = previous


def test_off_by_default_and_read_from_config():
    model = _model(SOFTMAX_CONFIG)
    assert model.sliding_window is False
    model = _model(SOFTMAX_CONFIG, "TEST.SLIDING_WINDOW.ENABLED", "True", "TEST.SLIDING_WINDOW.WINDOW", "(48, 64)",
                   "TEST.SLIDING_WINDOW.STRIDE", "(16, 32)", "TEST.SLIDING_WINDOW.BLENDING", "gaussian",
                   "TEST.SLIDING_WINDOW.GAUSSIAN_SIGMA", "0.25", "TEST.SLIDING_WINDOW.WINDOWS_PER_BATCH", "3")
    assert model.sliding_window is True
    assert (model.window_size, model.window_stride) == ((48, 64), (16, 32))
    assert (model.window_blending, model.gaussian_sigma, model.windows_per_batch) == ("gaussian", 0.25, 3)
    with pytest.raises(ValueError, match="exceeds WINDOW"):
        _model(SOFTMAX_CONFIG, "TEST.SLIDING_WINDOW.WINDOW", "(32, 32)", "TEST.SLIDING_WINDOW.STRIDE", "(48, 16)")
    with pytest.raises(ValueError, match="BLENDING"):
        _model(SOFTMAX_CONFIG, "TEST.SLIDING_WINDOW.BLENDING", "max")


@pytest.mark.parametrize("config, anomaly_score", [(SOFTMAX_CONFIG, "msp"), (GMM_CONFIG, "density_mask_avg")],
                         ids=["softmax", "gmm"])
@pytest.mark.parametrize("blending", ["uniform", "gaussian"])
def test_one_window_covering_the_image_equals_whole_image_inference(config, anomaly_score, blending,
                                                                   one_torch_thread):
    model = _model(config, "TEST.SLIDING_WINDOW.ENABLED", "True", "TEST.SLIDING_WINDOW.WINDOW", f"({HEIGHT}, {WIDTH})",
                   "TEST.SLIDING_WINDOW.STRIDE", "(32, 32)", "TEST.SLIDING_WINDOW.BLENDING", blending)
    assert model.anomaly_score_method == anomaly_score
    # Outputs resized to a different original size, as for a test-time resized image.
    records = [{"image": _image(), "height": 48, "width": 72}]
    (whole,) = _run(model, records, sliding=False)
    (sliding,) = _run(model, records, sliding=True)
    assert sliding["sem_seg"].shape == (8, 48, 72) and sliding["anomaly_score"].shape == (48, 72)
    torch.testing.assert_close(sliding["sem_seg"], whole["sem_seg"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sliding["anomaly_score"], whole["anomaly_score"], atol=1e-5, rtol=1e-5)


def test_window_larger_than_the_image_is_zero_padded_like_a_batch(one_torch_thread):
    # A 64x96 image in a batch with a 96x128 one is padded (zeros after
    # normalisation) to 96x128: what a 96x128 window does to it.
    model = _model(SOFTMAX_CONFIG, "TEST.SLIDING_WINDOW.WINDOW", "(96, 128)", "TEST.SLIDING_WINDOW.STRIDE", "(64, 64)")
    record = {"image": _image()}
    whole = _run(model, [record, {"image": _image(seed=2, height=96, width=128)}], sliding=False)[0]
    (sliding,) = _run(model, [record], sliding=True)
    assert sliding["sem_seg"].shape == (8, HEIGHT, WIDTH) and sliding["anomaly_score"].shape == (HEIGHT, WIDTH)
    torch.testing.assert_close(sliding["sem_seg"], whole["sem_seg"], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(sliding["anomaly_score"], whole["anomaly_score"], atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("config", [SOFTMAX_CONFIG, GMM_CONFIG], ids=["softmax", "gmm"])
def test_overlapping_windows_blend_the_per_crop_results(config, one_torch_thread):
    from gmmseg_d2.modeling.sliding_window import sliding_window_weights

    # 48x64 windows every (16, 32) on 64x96: rows start at 0 and 16, columns at
    # 0 and 32, 2x2 windows; 3 per batch, so the two chunks hold 3 and 1.
    model = _model(config, "TEST.SLIDING_WINDOW.ENABLED", "True", "TEST.SLIDING_WINDOW.WINDOW", "(48, 64)",
                   "TEST.SLIDING_WINDOW.STRIDE", "(16, 32)", "TEST.SLIDING_WINDOW.WINDOWS_PER_BATCH", "3")
    image = _image()
    boxes = [(0, 0), (0, 32), (16, 0), (16, 32)]
    # Windows batched by three and a crop alone round differently in the
    # batched GEMMs (the GMM head's ~60-nat log-likelihoods: ~2e-5 apart;
    # bit-identical with WINDOWS_PER_BATCH 1), hence the relative tolerance.
    close = dict(atol=1e-4, rtol=1e-4)
    # Reference: each crop through the whole-image path on its own.
    crops = {box: _run(model, [{"image": image[:, box[0]:box[0] + 48, box[1]:box[1] + 64]}], sliding=False)[0]
             for box in boxes}
    assert crops[(0, 0)]["sem_seg"].shape == (8, 48, 64)

    for blending in ("uniform", "gaussian"):
        model.window_blending = blending
        (sliding,) = _run(model, [{"image": image}], sliding=True)
        assert sliding["sem_seg"].shape == (8, HEIGHT, WIDTH) and sliding["anomaly_score"].shape == (HEIGHT, WIDTH)
        for key in ("sem_seg", "anomaly_score"):
            if blending == "uniform":
                # Pixels of only one window: that window's own result.
                torch.testing.assert_close(sliding[key][..., :16, :32], crops[(0, 0)][key][..., :16, :32],
                                           **close)
                torch.testing.assert_close(sliding[key][..., 48:, 64:], crops[(16, 32)][key][..., 32:, 32:],
                                           **close)
                # Rows 0-15 x columns 32-63 lie in the two top windows: their mean.
                torch.testing.assert_close(
                    sliding[key][..., :16, 32:64],
                    (crops[(0, 0)][key][..., :16, 32:64] + crops[(0, 32)][key][..., :16, :32]) / 2,
                    **close)
            # Everywhere: the weighted mean of the covering windows.
            weights = sliding_window_weights((48, 64), blending, model.gaussian_sigma)
            total = torch.zeros_like(sliding[key])
            weight_sum = torch.zeros(HEIGHT, WIDTH)
            for y, x in boxes:
                total[..., y:y + 48, x:x + 64] += crops[(y, x)][key] * weights
                weight_sum[y:y + 48, x:x + 64] += weights
            torch.testing.assert_close(sliding[key], total / weight_sum, **close)
