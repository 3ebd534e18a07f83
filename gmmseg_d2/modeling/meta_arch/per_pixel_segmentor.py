"""Per-pixel semantic segmentor that also reports a per-pixel anomaly score."""
from typing import Dict, List

import torch

from detectron2.modeling import META_ARCH_REGISTRY, SemanticSegmentor
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

__all__ = ["PerPixelSegmentor"]


@META_ARCH_REGISTRY.register()
class PerPixelSegmentor(SemanticSegmentor):
    """Detectron2's :class:`SemanticSegmentor` with an anomaly-score output.

    Same construction (backbone + ``SEM_SEG_HEAD``) and training behaviour.
    The head's inference output must be a dict with ``"sem_seg"``
    ``(B, C, H, W)`` and ``"anomaly_score"`` ``(B, H, W)`` at the padded input
    size. Each image's result is::

        {"sem_seg": (C, height, width), "anomaly_score": (height, width)}

    resized to the record's ``height``/``width`` (the original image size).
    """

    def forward(self, batched_inputs: List[Dict]) -> List[Dict[str, torch.Tensor]]:
        images = [x["image"].to(self.device) for x in batched_inputs]
        images = [(x - self.pixel_mean) / self.pixel_std for x in images]
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
        results = []
        for index, (record, image_size) in enumerate(zip(batched_inputs, images.image_sizes)):
            height = record.get("height", image_size[0])
            width = record.get("width", image_size[1])
            sem_seg = sem_seg_postprocess(outputs["sem_seg"][index], image_size, height, width)
            anomaly = sem_seg_postprocess(outputs["anomaly_score"][index][None], image_size,
                                          height, width)[0]
            results.append({"sem_seg": sem_seg, "anomaly_score": anomaly})
        return results
