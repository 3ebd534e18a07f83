"""Per-pixel semantic segmentor that also reports a per-pixel anomaly score."""
from typing import Dict, List, Sequence, Tuple, Union

import torch

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

# Re-exported: the sliding-window functions lived here before gmmseg_d2.modeling.sliding_window.
from ..sliding_window import (  # noqa: F401
    SLIDING_WINDOW_BLENDINGS,
    blend_sliding_windows,
    sliding_window_args_from_config,
    sliding_window_starts,
    sliding_window_weights,
    validated_sliding_window_settings,
)

__all__ = ["PerPixelSegmentor", "per_pixel_outputs_for_record"]


def per_pixel_outputs_for_record(record: Dict, sem_seg: torch.Tensor, anomaly: torch.Tensor,
                                 image_size: Tuple[int, int]) -> Dict[str, torch.Tensor]:
    """One image's result: ``(C, H', W')`` scores and ``(H', W')`` anomaly at the padded size
    → ``{"sem_seg": (C, height, width), "anomaly_score": (height, width)}``, padding cropped
    and resized to the record's ``height``/``width`` (its original size).

    Shared by the per-pixel meta-architectures (also the projects').
    """
    height = record.get("height", image_size[0])
    width = record.get("width", image_size[1])
    return {
        "sem_seg": sem_seg_postprocess(sem_seg, image_size, height, width),
        "anomaly_score": sem_seg_postprocess(anomaly[None], image_size, height, width)[0],
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
        ret.update(sliding_window_args_from_config(cfg))
        return ret

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]

        if not self.training and self.sliding_window:
            results = []
            for record, image in zip(batched_inputs, images):
                outputs = self.sliding_window_inference(image)
                results.append(per_pixel_outputs_for_record(record, outputs["sem_seg"], outputs["anomaly_score"],
                                                            image.shape[-2:]))
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
            per_pixel_outputs_for_record(record, outputs["sem_seg"][index], outputs["anomaly_score"][index],
                                         image_size)
            for index, (record, image_size) in enumerate(zip(batched_inputs, images.image_sizes))
        ]


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
