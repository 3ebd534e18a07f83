"""Dataset mapper for per-pixel semantic segmentation models."""
import copy
import logging
from typing import Dict, List, Optional, Sequence

import numpy as np
import torch

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T

from ...utils.io import read_image, read_label_map
from .color_aug import ColorAugSSDTransform

__all__ = ["PerPixelSemanticDatasetMapper", "validate_label_values"]


def validate_label_values(label: np.ndarray, allowed: Sequence[int], file_name: str) -> None:
    """Raise if ``label`` holds a value outside ``allowed``.

    A wrong label silently corrupts the loss and the metrics, so it must stop
    the run with the file and the value that is wrong.
    """
    if label.dtype != np.uint8:
        values = np.unique(label)
    else:
        values = np.flatnonzero(np.bincount(label.ravel(), minlength=256))
    unexpected = np.setdiff1d(values, np.asarray(allowed))
    if unexpected.size:
        raise ValueError(
            f"Label file {file_name} contains value(s) {unexpected.tolist()} outside the allowed "
            f"set {_describe_values(allowed)}. "
            "Check that the dataset was prepared for this model (e.g. its prepare script was "
            "run and MODEL.SEM_SEG_HEAD.NUM_CLASSES matches the dataset's classes)."
        )


def _describe_values(values: Sequence[int]) -> str:
    """``[0, 1, ..., 7, 255]`` → ``"{0..7, 255}"`` for error messages."""
    values = sorted(set(int(v) for v in values))
    parts, start = [], values[0]
    for prev, cur in zip(values, values[1:] + [None]):
        if cur != prev + 1 if cur is not None else True:
            parts.append(str(start) if start == prev else f"{start}..{prev}")
            start = cur
    return "{" + ", ".join(parts) + "}"


def flip_augmentations(cfg) -> List[T.Augmentation]:
    """The training flip that Detectron2's ``INPUT.RANDOM_FLIP`` asks for.

    ``"horizontal"`` (Detectron2's default), ``"vertical"`` or ``"none"``. Data
    whose classes differ by orientation (e.g. the procedural ``textures``
    benchmark, where a horizontal flip turns a 30-degree grating into a
    150-degree one) needs ``"none"``.
    """
    mode = cfg.INPUT.RANDOM_FLIP
    if mode == "none":
        return []
    if mode not in ("horizontal", "vertical"):
        raise ValueError(f"INPUT.RANDOM_FLIP must be 'horizontal', 'vertical' or 'none', got {mode!r}")
    return [T.RandomFlip(horizontal=mode == "horizontal", vertical=mode == "vertical")]


class PerPixelSemanticDatasetMapper:
    """Reads an image and its label map, augments both, validates the labels.

    Output per record: the input record plus ``"image"`` ``(3, H, W)`` uint8
    tensor and ``"sem_seg"`` ``(H, W)`` int64 tensor. ``sem_seg_file_name`` is
    kept so that evaluators can read the ground truth themselves.

    Training augmentation (Mask2Former's semantic recipe without padding):
    resize shortest edge → random crop with a single-category area limit →
    optional SSD colour distortion → horizontal flip.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        allowed_label_values: Sequence[int],
    ):
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.allowed_label_values = tuple(int(v) for v in allowed_label_values)
        logging.getLogger(__name__).info(
            f"[PerPixelSemanticDatasetMapper] {'train' if is_train else 'test'} "
            f"augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True, dataset_name: Optional[str] = None):
        ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        if is_train:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                         cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
            if cfg.INPUT.CROP.ENABLED:
                augs.append(T.RandomCrop_CategoryAreaConstraint(
                    cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE,
                    cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, ignore_label))
            if cfg.INPUT.COLOR_AUG_SSD:
                augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
            augs += flip_augmentations(cfg)
        else:
            augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TEST, cfg.INPUT.MAX_SIZE_TEST, "choice")]

        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        allowed = list(range(num_classes))
        if dataset_name is not None:
            meta = MetadataCatalog.get(dataset_name)
            ignore_label = meta.get("ignore_label", ignore_label)
            if meta.get("evaluator_type", None) == "anomaly":
                # Fishyscapes-style ground truth: 0 in-distribution, 1 anomaly.
                allowed = [0, 1]
            elif meta.get("stuff_classes", None) is not None:
                allowed = list(range(len(meta.stuff_classes)))
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "allowed_label_values": allowed + [ignore_label],
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        label_file = dataset_dict.get("sem_seg_file_name")
        if label_file is not None:
            sem_seg = read_label_map(label_file, dtype=None)
            validate_label_values(sem_seg, self.allowed_label_values, label_file)
        elif self.is_train:
            raise ValueError(f"Training record {dataset_dict['file_name']} has no "
                             "'sem_seg_file_name'; semantic training needs label maps")
        else:
            sem_seg = None

        aug_input = T.AugInput(image, sem_seg=sem_seg)
        self.augmentations(aug_input)
        image, sem_seg = aug_input.image, aug_input.sem_seg

        dataset_dict["image"] = torch.as_tensor(np.ascontiguousarray(image.transpose(2, 0, 1)))
        if sem_seg is not None:
            dataset_dict["sem_seg"] = torch.as_tensor(sem_seg.astype("long"))
        return dataset_dict
