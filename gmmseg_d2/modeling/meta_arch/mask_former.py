"""Mask2Former's meta-architecture for semantic segmentation.

Registered in ``META_ARCH_REGISTRY`` as ``MaskFormer`` (the official name),
so Mask2Former's semantic-segmentation YAML files select it unchanged. The
model is backbone → ``sem_seg_head`` (:class:`MaskFormerHead`) → per-query
class logits and mask logits; training matches queries to per-class target
masks (:class:`SetCriterion`), inference combines them into per-class maps.
"""
from typing import Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn

from detectron2.config import configurable
from detectron2.modeling import META_ARCH_REGISTRY, build_backbone, build_sem_seg_head
from detectron2.modeling.backbone import Backbone
from detectron2.modeling.postprocessing import sem_seg_postprocess
from detectron2.structures import ImageList

from ..anomaly import (
    MASK_CLASSIFICATION_ANOMALY_SCORES, MASK_DENSITY_ANOMALY_SCORES, mask_classification_anomaly_score,
    mask_density_anomaly_score,
)
from ..criterion import SetCriterion
from ..sliding_window import (
    blend_sliding_windows,
    sliding_window_args_from_config,
    validated_sliding_window_settings,
)

__all__ = ["MaskFormer"]


@META_ARCH_REGISTRY.register()
class MaskFormer(nn.Module):
    """Mask classification for semantic segmentation (Mask2Former).

    Inference output per image: ``{"sem_seg": (C, H, W), "anomaly_score": (H, W)}``
    at the image's original size, where ``sem_seg = Σ_q softmax(cls_q)[:C] ·
    sigmoid(mask_q)`` and the anomaly score is one of
    :data:`~gmmseg_d2.modeling.anomaly.MASK_CLASSIFICATION_ANOMALY_SCORES` or, with
    a classifier other than softmax (``MODEL.CLASSIFIER.NAME``, e.g. "gmm", see
    :mod:`gmmseg_d2.modeling.classifiers.gmm`), one of
    :data:`~gmmseg_d2.modeling.anomaly.MASK_DENSITY_ANOMALY_SCORES`: functions of
    the classifier's per-query anomaly score (:meth:`query_anomaly_score`).

    Inference runs on the whole (padded) batch by default, or, with
    ``sliding_window`` (``TEST.SLIDING_WINDOW.*``, as
    :class:`~gmmseg_d2.modeling.meta_arch.PerPixelSegmentor`), image by image
    on overlapping windows whose ``sem_seg`` and ``anomaly_score`` maps are
    blended (see :meth:`sliding_window_inference`).
    """

    @configurable
    def __init__(
        self,
        *,
        backbone: Backbone,
        sem_seg_head: nn.Module,
        criterion: nn.Module,
        num_queries: int,
        size_divisibility: int,
        sem_seg_postprocess_before_inference: bool,
        pixel_mean: Sequence[float],
        pixel_std: Sequence[float],
        anomaly_score: str = "msp",
        object_mask_threshold: float = 0.8,
        overlap_threshold: float = 0.8,
        metadata=None,
        semantic_on: bool = True,
        panoptic_on: bool = False,
        instance_on: bool = False,
        test_topk_per_image: int = 100,
        sliding_window: bool = False,
        window_size: Union[int, Sequence[int]] = (512, 512),
        window_stride: Union[int, Sequence[int]] = (341, 341),
        window_blending: str = "uniform",
        gaussian_sigma: float = 0.125,
        windows_per_batch: int = 8,
    ):
        """
        Args:
            backbone: a Detectron2 backbone.
            sem_seg_head: returns ``{"pred_logits", "pred_masks", "aux_outputs"}``
                from the backbone features.
            criterion: training losses from those predictions and the targets;
                its ``weight_dict`` weights them, losses missing from it are dropped.
            num_queries: number of queries ``Q``.
            size_divisibility: pad images to a multiple of this; ``< 0`` takes
                the backbone's.
            sem_seg_postprocess_before_inference: resize the masks to the
                original image size before combining them with the classes
                (exact, more memory) instead of after.
            pixel_mean, pixel_std: per-channel input normalisation.
            anomaly_score: the ``anomaly_score`` output's rule; see
                :func:`~gmmseg_d2.modeling.anomaly.mask_classification_anomaly_score`.
            object_mask_threshold, overlap_threshold, metadata,
            test_topk_per_image: panoptic / instance inference settings, kept
                for config compatibility.
            semantic_on, panoptic_on, instance_on: which outputs to produce;
                this project implements semantic segmentation only.
            sliding_window, window_size, window_stride, window_blending,
                gaussian_sigma, windows_per_batch: sliding-window inference
                (``TEST.SLIDING_WINDOW.*``), as in
                :class:`~gmmseg_d2.modeling.meta_arch.PerPixelSegmentor`.
        """
        super().__init__()
        if panoptic_on or instance_on:
            raise NotImplementedError(
                "gmmseg_d2's MaskFormer implements semantic segmentation only; set "
                "MODEL.MASK_FORMER.TEST.PANOPTIC_ON and INSTANCE_ON to False"
            )
        if not semantic_on:
            raise ValueError("MODEL.MASK_FORMER.TEST.SEMANTIC_ON is False: the model would output nothing")
        if anomaly_score not in MASK_CLASSIFICATION_ANOMALY_SCORES + MASK_DENSITY_ANOMALY_SCORES:
            raise ValueError(f"Unknown MODEL.MASK_FORMER.TEST.ANOMALY_SCORE {anomaly_score!r}; "
                             f"choose one of {MASK_CLASSIFICATION_ANOMALY_SCORES + MASK_DENSITY_ANOMALY_SCORES}")
        self.backbone = backbone
        self.sem_seg_head = sem_seg_head
        self.criterion = criterion
        self.num_queries = num_queries
        self.size_divisibility = backbone.size_divisibility if size_divisibility < 0 else size_divisibility
        self.sem_seg_postprocess_before_inference = sem_seg_postprocess_before_inference
        self.register_buffer("pixel_mean", torch.tensor(pixel_mean).view(-1, 1, 1), False)
        self.register_buffer("pixel_std", torch.tensor(pixel_std).view(-1, 1, 1), False)
        self.anomaly_score_method = anomaly_score
        self.object_mask_threshold = object_mask_threshold
        self.overlap_threshold = overlap_threshold
        self.metadata = metadata
        self.test_topk_per_image = test_topk_per_image

        self.window_size, self.window_stride = validated_sliding_window_settings(
            window_size, window_stride, window_blending, gaussian_sigma, windows_per_batch)
        self.sliding_window = sliding_window
        self.window_blending = window_blending
        self.gaussian_sigma = gaussian_sigma
        self.windows_per_batch = windows_per_batch

    @classmethod
    def from_config(cls, cfg) -> Dict:
        from detectron2.data import MetadataCatalog

        backbone = build_backbone(cfg)
        test = cfg.MODEL.MASK_FORMER.TEST
        if test.ANOMALY_SCORE in MASK_DENSITY_ANOMALY_SCORES and cfg.MODEL.CLASSIFIER.NAME == "softmax":
            raise ValueError(f"MODEL.MASK_FORMER.TEST.ANOMALY_SCORE {test.ANOMALY_SCORE!r} needs a per-query "
                             "anomaly score of a generative classifier (MODEL.CLASSIFIER.NAME 'gmm', or "
                             "'prototype' from projects/ProtoSeg); with softmax use one of "
                             f"{MASK_CLASSIFICATION_ANOMALY_SCORES}")
        sem_seg_head = build_sem_seg_head(cfg, backbone.output_shape())
        return {
            "backbone": backbone,
            "sem_seg_head": sem_seg_head,
            "criterion": SetCriterion(cfg, classifier_loss_names=sem_seg_head.classifier.loss_names),
            "num_queries": cfg.MODEL.MASK_FORMER.NUM_OBJECT_QUERIES,
            "size_divisibility": cfg.MODEL.MASK_FORMER.SIZE_DIVISIBILITY,
            "sem_seg_postprocess_before_inference": (
                test.SEM_SEG_POSTPROCESSING_BEFORE_INFERENCE or test.PANOPTIC_ON or test.INSTANCE_ON
            ),
            "pixel_mean": cfg.MODEL.PIXEL_MEAN,
            "pixel_std": cfg.MODEL.PIXEL_STD,
            "anomaly_score": test.ANOMALY_SCORE,
            "object_mask_threshold": test.OBJECT_MASK_THRESHOLD,
            "overlap_threshold": test.OVERLAP_THRESHOLD,
            "metadata": MetadataCatalog.get(cfg.DATASETS.TRAIN[0]) if cfg.DATASETS.TRAIN else None,
            "semantic_on": test.SEMANTIC_ON,
            "panoptic_on": test.PANOPTIC_ON,
            "instance_on": test.INSTANCE_ON,
            "test_topk_per_image": cfg.TEST.DETECTIONS_PER_IMAGE,
            **sliding_window_args_from_config(cfg),
        }

    @property
    def device(self) -> torch.device:
        return self.pixel_mean.device

    def normalize(self, image: torch.Tensor) -> torch.Tensor:
        """``(3, H, W)`` input image → normalised float image on the model's device."""
        return (image.to(self.device) - self.pixel_mean) / self.pixel_std

    def preprocess_image(self, batched_inputs: List[Dict]) -> ImageList:
        images = [self.normalize(record["image"]) for record in batched_inputs]
        return ImageList.from_tensors(images, self.size_divisibility)

    def forward(self, batched_inputs: List[Dict]):
        """Training: a dict of weighted losses. Inference: one output dict per image.

        Each input record holds ``"image"`` ``(3, H, W)`` and, for training,
        ``"instances"`` with ``gt_classes`` and ``gt_masks`` (as the
        ``mask_former_semantic`` dataset mapper makes them).
        """
        if not self.training and self.sliding_window:
            return [self.sliding_window_record(record) for record in batched_inputs]
        images = self.preprocess_image(batched_inputs)
        outputs = self.sem_seg_head(self.backbone(images.tensor))
        if self.training:
            if "instances" not in batched_inputs[0]:
                raise ValueError("MaskFormer training needs per-class mask targets ('instances'); use "
                                 "INPUT.DATASET_MAPPER_NAME 'mask_former_semantic'")
            targets = self.prepare_targets([r["instances"].to(self.device) for r in batched_inputs], images)
            losses = self.criterion(outputs, targets, self.sem_seg_head.classifier)
            weights = self.criterion.weight_dict
            return {name: loss * weights[name] for name, loss in losses.items() if name in weights}
        return self.inference(outputs, batched_inputs, images)

    @staticmethod
    def prepare_targets(instances, images: ImageList) -> List[Dict[str, torch.Tensor]]:
        """Per image ``{"labels": (T,), "masks": (T, H_pad, W_pad)}``, masks zero-padded to the batch size."""
        padded_height, padded_width = images.tensor.shape[-2:]
        targets = []
        for per_image in instances:
            masks = per_image.gt_masks
            masks = masks.tensor if hasattr(masks, "tensor") else masks
            padded = masks.new_zeros((masks.shape[0], padded_height, padded_width))
            padded[:, :masks.shape[1], :masks.shape[2]] = masks
            targets.append({"labels": per_image.gt_classes, "masks": padded})
        return targets

    def inference(self, outputs: Dict, batched_inputs: List[Dict], images: ImageList) -> List[Dict]:
        mask_logits = F.interpolate(outputs["pred_masks"], size=images.tensor.shape[-2:], mode="bilinear",
                                    align_corners=False)
        query_anomaly = self.query_anomaly_for_rule(outputs)
        results = []
        for b, (class_logits, masks, record, image_size) in enumerate(
                zip(outputs["pred_logits"], mask_logits, batched_inputs, images.image_sizes)):
            height, width = record.get("height", image_size[0]), record.get("width", image_size[1])
            if self.sem_seg_postprocess_before_inference:
                masks = sem_seg_postprocess(masks, image_size, height, width)
                class_logits = class_logits.to(masks)
            sem_seg, anomaly = self.semantic_inference(
                class_logits, masks, None if query_anomaly is None else query_anomaly[b])
            if not self.sem_seg_postprocess_before_inference:
                sem_seg = sem_seg_postprocess(sem_seg, image_size, height, width)
                anomaly = sem_seg_postprocess(anomaly[None], image_size, height, width)[0]
            results.append({"sem_seg": sem_seg, "anomaly_score": anomaly})
        return results

    def sliding_window_record(self, record: Dict) -> Dict[str, torch.Tensor]:
        """One input record's output by :meth:`sliding_window_inference`, resized
        to the record's ``height``/``width`` as the whole-image path does."""
        image = self.normalize(record["image"])
        image_size = tuple(image.shape[-2:])
        height, width = record.get("height", image_size[0]), record.get("width", image_size[1])
        outputs = self.sliding_window_inference(image)
        return {
            "sem_seg": sem_seg_postprocess(outputs["sem_seg"], image_size, height, width),
            "anomaly_score": sem_seg_postprocess(outputs["anomaly_score"][None], image_size, height, width)[0],
        }

    @torch.no_grad()
    def sliding_window_inference(self, image: torch.Tensor) -> Dict[str, torch.Tensor]:
        """Blended window predictions for one normalised image ``(3, H, W)``.

        Returns ``{"sem_seg": (C, H, W), "anomaly_score": (H, W)}`` (float32) at
        the image's size; windows are placed and blended by
        :func:`~gmmseg_d2.modeling.sliding_window.blend_sliding_windows`. Each window
        ``(3, h, w)`` goes through backbone and ``sem_seg_head`` (padded to
        ``size_divisibility`` like a batch) and :meth:`semantic_inference` turns
        its queries into ``(C, h, w)`` scores and an ``(h, w)`` anomaly map
        exactly as for a whole image (including the per-query scores of
        :meth:`query_anomaly_score`).

        The masks are combined with the classes at the window's input
        resolution whatever ``sem_seg_postprocess_before_inference`` says: the
        blend needs every window on the common pixel grid of the input image;
        the caller resizes the blended maps to the original size.
        """
        def predict(crops: List[torch.Tensor]) -> List[Tuple[torch.Tensor, torch.Tensor]]:
            win_h, win_w = crops[0].shape[-2:]
            batch = ImageList.from_tensors(crops, self.size_divisibility)
            outputs = self.sem_seg_head(self.backbone(batch.tensor))
            query_anomaly = self.query_anomaly_for_rule(outputs)
            predictions = []
            for index in range(len(crops)):
                # One window's masks at a time: (Q, h, w) at full resolution is
                # the memory peak (100 x 1024 x 1024 floats = 0.4 GB), so the
                # batch's windows are not upsampled together.
                masks = F.interpolate(outputs["pred_masks"][index:index + 1], size=batch.tensor.shape[-2:],
                                      mode="bilinear", align_corners=False)[0, :, :win_h, :win_w]
                predictions.append(self.semantic_inference(
                    outputs["pred_logits"][index], masks, None if query_anomaly is None else query_anomaly[index]))
            return predictions

        return blend_sliding_windows(image, predict, self.window_size, self.window_stride, self.window_blending,
                                     self.gaussian_sigma, self.windows_per_batch)

    def query_anomaly_score(self, outputs: Dict) -> torch.Tensor:
        """``(B, Q)`` per-query anomaly score of the decoder's classifier (the GMM:
        ``-max_c log p(e_q | c)`` over the real classes, not "no object")."""
        return self.sem_seg_head.classifier.anomaly_score(outputs["pred_classifier"]).float()

    def query_anomaly_for_rule(self, outputs: Dict) -> Optional[torch.Tensor]:
        """:meth:`query_anomaly_score` when the anomaly rule needs it, else None."""
        if self.anomaly_score_method not in MASK_DENSITY_ANOMALY_SCORES:
            return None
        return self.query_anomaly_score(outputs)

    def semantic_inference(self, class_logits: torch.Tensor, mask_logits: torch.Tensor,
                           query_anomaly: Optional[torch.Tensor] = None
                           ) -> Tuple[torch.Tensor, torch.Tensor]:
        """``(Q, C+1)`` class logits, ``(Q, H, W)`` mask logits → ``(C, H, W)`` scores, ``(H, W)`` anomaly.

        ``query_anomaly`` ``(Q,)`` (:meth:`query_anomaly_score`) is needed by
        the per-query-score rules (``density_*``).
        """
        mask_probs = mask_logits.sigmoid()
        sem_seg = torch.einsum("qc,qhw->chw", F.softmax(class_logits, dim=-1)[:, :-1], mask_probs)
        if self.anomaly_score_method in MASK_DENSITY_ANOMALY_SCORES:
            if query_anomaly is None:
                raise ValueError(f"anomaly score {self.anomaly_score_method!r} needs the classifier's "
                                 "per-query anomaly scores (query_anomaly)")
            anomaly = mask_density_anomaly_score(class_logits, query_anomaly, mask_probs, self.anomaly_score_method)
        else:
            anomaly = mask_classification_anomaly_score(class_logits, mask_probs, self.anomaly_score_method)
        return sem_seg, anomaly
