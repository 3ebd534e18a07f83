"""Per-pixel semantic segmentor that also reports a per-pixel anomaly score."""
from typing import Callable, Dict, List, Sequence, Tuple, Union

import torch
import torch.nn.functional as F

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

__all__ = ["PerPixelSegmentor", "SLIDING_WINDOW_BLENDINGS", "sliding_window_starts",
           "sliding_window_weights", "validated_sliding_window_settings", "blend_sliding_windows"]

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


@META_ARCH_REGISTRY.register()
class PerPixelSegmentor(SemanticSegmentor):
    """Detectron2's :class:`SemanticSegmentor` with an anomaly-score output.

    Same construction (backbone + ``SEM_SEG_HEAD``) and training behaviour.
    The head's inference output must be a dict with ``"sem_seg"``
    ``(B, C, H, W)`` and ``"anomaly_score"`` ``(B, H, W)`` at the padded input
    size. Each image's result is::

        {"sem_seg": (C, height, width), "anomaly_score": (height, width)}

    resized to the record's ``height``/``width`` (the original image size).

    Inference runs on the whole (padded) batch by default, or, with
    ``sliding_window``, image by image on overlapping windows whose logits and
    anomaly scores are blended (see :meth:`sliding_window_inference`).
    """

    @configurable
    def __init__(
        self,
        *,
        sliding_window: bool = False,
        window_size: Union[int, Sequence[int]] = (512, 512),
        window_stride: Union[int, Sequence[int]] = (341, 341),
        window_blending: str = "uniform",
        gaussian_sigma: float = 0.125,
        windows_per_batch: int = 8,
        **kwargs,
    ):
        """
        Args:
            sliding_window: sliding-window inference instead of whole-image.
            window_size: window ``(h, w)`` (or one int for both).
            window_stride: offset ``(h, w)`` between neighbouring windows; at
                most the window size, so that windows cover the image.
            window_blending: "uniform" or "gaussian" weights for overlapping windows.
            gaussian_sigma: std of the Gaussian weights as a fraction of the window size.
            windows_per_batch: at most this many windows go through the model at once.
            kwargs: :class:`SemanticSegmentor`'s arguments (backbone,
                sem_seg_head, pixel_mean, pixel_std).
        """
        super().__init__(**kwargs)
        self.window_size, self.window_stride = validated_sliding_window_settings(
            window_size, window_stride, window_blending, gaussian_sigma, windows_per_batch)
        self.sliding_window = sliding_window
        self.windows_per_batch = windows_per_batch
        self.window_blending = window_blending
        self.gaussian_sigma = gaussian_sigma

    @classmethod
    def from_config(cls, cfg):
        ret = super().from_config(cfg)
        window = cfg.TEST.SLIDING_WINDOW
        ret.update(
            sliding_window=window.ENABLED,
            window_size=tuple(window.WINDOW),
            window_stride=tuple(window.STRIDE),
            window_blending=window.BLENDING,
            gaussian_sigma=window.GAUSSIAN_SIGMA,
            windows_per_batch=window.WINDOWS_PER_BATCH,
        )
        return ret

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]

        if not self.training and self.sliding_window:
            results = []
            for record, image in zip(batched_inputs, images):
                outputs = self.sliding_window_inference(image)
                results.append(self._postprocess(record, outputs["sem_seg"],
                                                 outputs["anomaly_score"], image.shape[-2:]))
            return results

        images = ImageList.from_tensors(images, self.backbone.size_divisibility,
                                        padding_constraints=self.backbone.padding_constraints)
        features = self.backbone(images.tensor)

        if self.training:
            if "sem_seg" not in batched_inputs[0]:
                raise ValueError("Training inputs need a 'sem_seg' target; use a dataset "
                                 "with sem_seg_file_name and a semantic dataset mapper")
            targets = [x["sem_seg"].to(self.device) for x in batched_inputs]
            targets = ImageList.from_tensors(targets, self.backbone.size_divisibility,
                                             self.sem_seg_head.ignore_value,
                                             self.backbone.padding_constraints).tensor
            _, losses = self.sem_seg_head(features, targets)
            return losses

        outputs, _ = self.sem_seg_head(features)
        return [
            self._postprocess(record, outputs["sem_seg"][index], outputs["anomaly_score"][index],
                              image_size)
            for index, (record, image_size) in enumerate(zip(batched_inputs, images.image_sizes))
        ]

    @staticmethod
    def _postprocess(record: Dict, sem_seg: torch.Tensor, anomaly: torch.Tensor,
                     image_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
        """Crop padding off ``(C, H', W')`` / ``(H', W')`` outputs; resize to the record's size."""
        height = record.get("height", image_size[0])
        width = record.get("width", image_size[1])
        return {
            "sem_seg": sem_seg_postprocess(sem_seg, image_size, height, width),
            "anomaly_score": sem_seg_postprocess(anomaly[None], image_size, height, width)[0],
        }

    @torch.no_grad()
    def sliding_window_inference(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Blended window predictions for one normalized image ``(3, H, W)``:
        ``{"sem_seg": (C, H, W) logits, "anomaly_score": (H, W)}`` at the image's
        size (see :func:`blend_sliding_windows` for window placement and blending).
        """
        def predict(crops: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
            win_h, win_w = crops[0].shape[-2:]
            batch = ImageList.from_tensors(crops, self.backbone.size_divisibility,
                                           padding_constraints=self.backbone.padding_constraints)
            outputs, _ = self.sem_seg_head(self.backbone(batch.tensor))
            # The head's outputs are at the (possibly size-divisibility padded) crop size.
            return [(outputs["sem_seg"][index, :, :win_h, :win_w], outputs["anomaly_score"][index, :win_h, :win_w])
                    for index in range(len(crops))]

        return blend_sliding_windows(image, predict, self.window_size, self.window_stride, self.window_blending,
                                     self.gaussian_sigma, self.windows_per_batch)
