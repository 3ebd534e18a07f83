"""Sliding-window inference, shared by the meta-architectures (``TEST.SLIDING_WINDOW.*``).

:class:`~gmmseg_d2.modeling.meta_arch.PerPixelSegmentor` and
:class:`~gmmseg_d2.modeling.meta_arch.MaskFormer` validate their settings with
:func:`validated_sliding_window_settings` and blend the windows of one image
with :func:`blend_sliding_windows`; each supplies only its own ``predict``
(crops -> per-crop scores and anomaly maps).
"""
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

__all__ = ["SLIDING_WINDOW_BLENDINGS", "sliding_window_starts", "sliding_window_weights",
           "sliding_window_args_from_config", "validated_sliding_window_settings", "blend_sliding_windows"]

#: Values of ``TEST.SLIDING_WINDOW.BLENDING``.
SLIDING_WINDOW_BLENDINGS = ("uniform", "gaussian")


def _pair(value: Union[int, Sequence[int]], name: str) -> Tuple[int, int]:
    """``n`` or ``(h, w)`` → ``(h, w)`` of positive ints."""
    pair = (value, value) if isinstance(value, int) else tuple(value)
    if len(pair) != 2 or not all(isinstance(v, int) and not isinstance(v, bool) and v > 0
                                 for v in pair):
        raise ValueError(f"TEST.SLIDING_WINDOW.{name} must be two positive integers (h, w), "
                         f"got {value!r}")
    return pair


def validated_sliding_window_settings(
    window_size: Union[int, Sequence[int]], window_stride: Union[int, Sequence[int]], blending: str,
    gaussian_sigma: float, windows_per_batch: int,
) -> Tuple[Tuple[int, int], Tuple[int, int]]:
    """Check ``TEST.SLIDING_WINDOW`` settings; returns ``(window (h, w), stride (h, w))``.

    Shared by every meta-architecture that offers sliding-window inference.
    """
    window, stride = _pair(window_size, "WINDOW"), _pair(window_stride, "STRIDE")
    if any(s > w for s, w in zip(stride, window)):
        raise ValueError(f"TEST.SLIDING_WINDOW.STRIDE {stride} exceeds WINDOW "
                         f"{window}: windows would leave pixels uncovered")
    if blending not in SLIDING_WINDOW_BLENDINGS:
        raise ValueError(f"Unknown TEST.SLIDING_WINDOW.BLENDING {blending!r}; "
                         f"choose one of {SLIDING_WINDOW_BLENDINGS}")
    if not gaussian_sigma > 0:
        raise ValueError(f"TEST.SLIDING_WINDOW.GAUSSIAN_SIGMA must be > 0, got {gaussian_sigma}")
    if not (isinstance(windows_per_batch, int) and windows_per_batch > 0):
        raise ValueError("TEST.SLIDING_WINDOW.WINDOWS_PER_BATCH must be a positive integer, "
                         f"got {windows_per_batch!r}")
    return window, stride


def sliding_window_args_from_config(cfg) -> Dict[str, object]:
    """The meta-architectures' sliding-window constructor arguments from ``cfg.TEST.SLIDING_WINDOW``."""
    window = cfg.TEST.SLIDING_WINDOW
    return {
        "sliding_window": window.ENABLED,
        "window_size": tuple(window.WINDOW),
        "window_stride": tuple(window.STRIDE),
        "window_blending": window.BLENDING,
        "gaussian_sigma": window.GAUSSIAN_SIGMA,
        "windows_per_batch": window.WINDOWS_PER_BATCH,
    }


def sliding_window_starts(length: int, window: int, stride: int) -> List[int]:
    """Start offsets of windows covering ``[0, length)``.

    Windows start every ``stride`` pixels; the last one is moved back to end at
    ``length`` (so no window leaves the image and none is added only to
    cover a sliver). ``length <= window`` gives the single offset 0.
    """
    if length <= window:
        return [0]
    count = -(-(length - window) // stride) + 1  # ceil((length - window) / stride) + 1
    return [min(i * stride, length - window) for i in range(count)]


def sliding_window_weights(window: Tuple[int, int], blending: str, gaussian_sigma: float = 0.125,
                           device=None) -> torch.Tensor:
    """Per-pixel blending weights ``(h, w)`` of one window (all > 0).

    "uniform": ones. "gaussian": ``exp(-d_y²/2σ_y² - d_x²/2σ_x²)`` with ``d``
    the offset from the window centre ``((h-1)/2, (w-1)/2)`` and
    ``σ = gaussian_sigma * (h, w)``.
    """
    height, width = window
    if blending == "uniform":
        return torch.ones(height, width, device=device)
    if blending == "gaussian":
        def profile(size: int) -> torch.Tensor:
            offsets = torch.arange(size, dtype=torch.float64, device=device) - (size - 1) / 2
            return torch.exp(-0.5 * (offsets / (gaussian_sigma * size)) ** 2)

        return (profile(height)[:, None] * profile(width)[None, :]).float()
    raise ValueError(f"Unknown TEST.SLIDING_WINDOW.BLENDING {blending!r}; "
                     f"choose one of {SLIDING_WINDOW_BLENDINGS}")


def blend_sliding_windows(
    image: torch.Tensor,
    predict: Callable[[List[torch.Tensor]], List[Tuple[torch.Tensor, torch.Tensor]]],
    window_size: Tuple[int, int], window_stride: Tuple[int, int], blending: str, gaussian_sigma: float,
    windows_per_batch: int,
) -> Dict[str, torch.Tensor]:
    """Sliding-window prediction of one normalised image ``(3, H, W)``.

    An image smaller than the window is zero-padded (the mean colour, as batch
    padding) to the window size first; windows then lie inside the (padded)
    image every ``window_stride``, the last of each row and column aligned to
    its border. ``predict`` maps up to ``windows_per_batch`` crops ``(3, h, w)``
    to one ``((C, h, w) scores, (h, w) anomaly)`` pair per crop. Each output
    pixel is ``Σ_k w_k(p) y_k(p) / Σ_k w_k(p)`` over the windows ``k`` covering
    it, with ``w_k`` the window's blending weights at ``p``'s position in it.

    Returns ``{"sem_seg": (C, H, W), "anomaly_score": (H, W)}`` (float32).
    """
    height, width = image.shape[-2:]
    win_h, win_w = window_size
    pad_h, pad_w = max(win_h - height, 0), max(win_w - width, 0)
    if pad_h or pad_w:
        image = F.pad(image, (0, pad_w, 0, pad_h))
    full_h, full_w = image.shape[-2:]
    boxes = [(y, x)
             for y in sliding_window_starts(full_h, win_h, window_stride[0])
             for x in sliding_window_starts(full_w, win_w, window_stride[1])]
    weights = sliding_window_weights((win_h, win_w), blending, gaussian_sigma, device=image.device)
    weight_sum = weights.new_zeros(full_h, full_w)
    score_sum, anomaly_sum = None, weights.new_zeros(full_h, full_w)
    for first in range(0, len(boxes), windows_per_batch):
        chunk = boxes[first:first + windows_per_batch]
        predictions = predict([image[:, y:y + win_h, x:x + win_w] for y, x in chunk])
        for (y, x), (scores, anomaly) in zip(chunk, predictions):
            if score_sum is None:
                score_sum = weights.new_zeros(scores.shape[0], full_h, full_w)
            score_sum[:, y:y + win_h, x:x + win_w] += scores.float() * weights
            anomaly_sum[y:y + win_h, x:x + win_w] += anomaly.float() * weights
            weight_sum[y:y + win_h, x:x + win_w] += weights
    return {
        "sem_seg": (score_sum / weight_sum)[:, :height, :width],
        "anomaly_score": (anomaly_sum / weight_sum)[:height, :width],
    }
