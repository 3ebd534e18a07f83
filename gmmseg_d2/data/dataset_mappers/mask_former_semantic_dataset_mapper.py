"""Training dataset mapper of Mask2Former-style (mask classification) semantic segmentation."""
import copy
import logging
from typing import Dict, List, Sequence

import numpy as np
import torch
from torch.nn import functional as F

from detectron2.config import configurable
from detectron2.data import MetadataCatalog
from detectron2.data import detection_utils as utils
from detectron2.data import transforms as T
from detectron2.structures import Instances

from ...utils.io import read_image, read_label_map
from .color_aug import ColorAugSSDTransform
from .per_pixel_semantic_dataset_mapper import flip_augmentations, validate_label_values

__all__ = ["MaskFormerSemanticDatasetMapper"]


class MaskFormerSemanticDatasetMapper:
    """Turns a semantic-segmentation record into mask-classification targets.

    Behaves as Mask2Former's mapper of the same name (training only):

    1. read the image and its label map (the labels are validated: a value
       outside ``allowed_label_values`` stops with the file named);
    2. augment: resize shortest edge → random crop with a single-category area
       limit → optional SSD colour distortion → horizontal flip;
    3. pad image and label at the bottom/right to a multiple of
       ``size_divisibility`` (image with ``image_pad_value``, label with
       ``ignore_label``), so that all images of a batch share one size;
    4. build one binary mask per class present in the label map.

    Output per record: the input record (without ``sem_seg_file_name``) plus
    ``"image"`` ``(3, H, W)`` uint8, ``"sem_seg"`` ``(H, W)`` int64, and
    ``"instances"``: :class:`Instances` of size ``(H, W)`` with ``gt_classes``
    ``(K,)`` int64 (the classes present, ascending, ignore label excluded) and
    ``gt_masks`` ``(K, H, W)`` bool (``gt_masks[k] = sem_seg == gt_classes[k]``;
    a float ``(0, H, W)`` tensor when every pixel is ignored, as the official
    mapper).

    Padding: the official mapper pads to exactly ``size_divisibility`` (its
    configs always crop to that size, so the crop never exceeds it; a larger
    image would be cut by its negative padding). Here the size is rounded up
    to the next multiple, which gives the same result whenever the official
    one is defined and never drops pixels. The image padding value 128 is the
    official one.
    """

    @configurable
    def __init__(
        self,
        is_train: bool = True,
        *,
        augmentations: List,
        image_format: str,
        ignore_label: int,
        size_divisibility: int,
        allowed_label_values: Sequence[int],
        image_pad_value: int = 128,
    ):
        """
        Args:
            is_train: must be True; evaluation uses the per-pixel mapper
                (Mask2Former evaluates with Detectron2's default mapper).
            augmentations: Detectron2 augmentations applied to image and label.
            image_format: format for :func:`detection_utils.read_image`.
            ignore_label: label value excluded from the masks; pads the label.
            size_divisibility: pad height and width to a multiple of it (<= 0: no padding).
            allowed_label_values: every value a label map may contain (the
                class ids and the ignore label).
            image_pad_value: value of the padded image pixels.
        """
        if not is_train:
            raise ValueError(
                "MaskFormerSemanticDatasetMapper builds training targets only; evaluate with "
                "PerPixelSemanticDatasetMapper(cfg, is_train=False) as the Trainer does")
        self.is_train = is_train
        self.augmentations = T.AugmentationList(augmentations)
        self.image_format = image_format
        self.ignore_label = int(ignore_label)
        self.size_divisibility = int(size_divisibility)
        self.allowed_label_values = tuple(int(v) for v in allowed_label_values)
        self.image_pad_value = image_pad_value
        logging.getLogger(__name__).info(
            f"[MaskFormerSemanticDatasetMapper] training augmentations: {augmentations}")

    @classmethod
    def from_config(cls, cfg, is_train: bool = True):
        augs = [T.ResizeShortestEdge(cfg.INPUT.MIN_SIZE_TRAIN, cfg.INPUT.MAX_SIZE_TRAIN,
                                     cfg.INPUT.MIN_SIZE_TRAIN_SAMPLING)]
        if cfg.INPUT.CROP.ENABLED:
            # The crop constraint counts classes with the model's ignore value
            # (as the official mapper); the masks use the dataset's below.
            augs.append(T.RandomCrop_CategoryAreaConstraint(
                cfg.INPUT.CROP.TYPE, cfg.INPUT.CROP.SIZE,
                cfg.INPUT.CROP.SINGLE_CATEGORY_MAX_AREA, cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE))
        if cfg.INPUT.COLOR_AUG_SSD:
            augs.append(ColorAugSSDTransform(img_format=cfg.INPUT.FORMAT))
        augs += flip_augmentations(cfg)

        # Like the official mapper, the first training set's metadata decides
        # the ignore label (falling back to the model's when it has none).
        ignore_label = cfg.MODEL.SEM_SEG_HEAD.IGNORE_VALUE
        num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
        if len(cfg.DATASETS.TRAIN):
            meta = MetadataCatalog.get(cfg.DATASETS.TRAIN[0])
            ignore_label = meta.get("ignore_label", ignore_label)
            if meta.get("stuff_classes", None) is not None:
                num_classes = len(meta.stuff_classes)
        return {
            "is_train": is_train,
            "augmentations": augs,
            "image_format": cfg.INPUT.FORMAT,
            "ignore_label": ignore_label,
            "size_divisibility": cfg.INPUT.SIZE_DIVISIBILITY,
            "allowed_label_values": list(range(num_classes)) + [ignore_label],
        }

    def __call__(self, dataset_dict: Dict) -> Dict:
        dataset_dict = copy.deepcopy(dataset_dict)
        image = read_image(dataset_dict["file_name"], format=self.image_format)
        utils.check_image_size(dataset_dict, image)

        label_file = dataset_dict.pop("sem_seg_file_name", None)
        if label_file is None:
            raise ValueError(f"Training record {dataset_dict['file_name']} has no "
                             "'sem_seg_file_name'; semantic training needs label maps")
        if "annotations" in dataset_dict:
            raise ValueError(
                f"Record {dataset_dict['file_name']} has 'annotations': this mapper is for "
                "semantic segmentation datasets (label maps only)")
        label = read_label_map(label_file, dtype=None)  # raises for a multi-channel file, naming it
        validate_label_values(label, self.allowed_label_values, label_file)
        # float64 as the official mapper: the resize then goes through torch's
        # nearest interpolation, which also handles uint16 label maps.
        aug_input = T.AugInput(image, sem_seg=label.astype(np.float64))
        self.augmentations(aug_input)

        image = torch.as_tensor(np.ascontiguousarray(aug_input.image.transpose(2, 0, 1)))
        sem_seg = torch.as_tensor(aug_input.sem_seg.astype(np.int64))
        if self.size_divisibility > 0:
            height, width = sem_seg.shape
            pad_bottom = -height % self.size_divisibility
            pad_right = -width % self.size_divisibility
            image = F.pad(image, (0, pad_right, 0, pad_bottom), value=self.image_pad_value)
            sem_seg = F.pad(sem_seg, (0, pad_right, 0, pad_bottom), value=self.ignore_label)

        dataset_dict["image"] = image.contiguous()
        dataset_dict["sem_seg"] = sem_seg.contiguous()
        dataset_dict["instances"] = self._per_class_masks(sem_seg)
        return dataset_dict

    def _per_class_masks(self, sem_seg: torch.Tensor) -> Instances:
        """``(H, W)`` label map → Instances with one binary mask per present class."""
        classes = torch.unique(sem_seg)
        classes = classes[classes != self.ignore_label]
        instances = Instances(tuple(sem_seg.shape))
        instances.gt_classes = classes.to(torch.int64)
        if classes.numel() == 0:
            # Everything ignored: the official mapper gives an empty float tensor.
            instances.gt_masks = torch.zeros((0, *sem_seg.shape))
        else:
            instances.gt_masks = sem_seg[None] == classes[:, None, None]  # (K, H, W)
        return instances
