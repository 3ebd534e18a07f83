"""Evaluation of ``evaluator_type="cityscapes_sem_seg"`` datasets (Cityscapes fine, 19 train IDs).

Detectron2's ``CityscapesSemSegEvaluator`` (the official cityscapesscripts
protocol: IoU and iIoU over the 19 classes, against ``*_gtFine_labelIds.png``)
when ``cityscapesscripts`` is installed, else ``SemSegEvaluator`` on the 19
train IDs (same IoU, no iIoU).
"""
from __future__ import annotations

import importlib.util
import logging
from typing import Optional

from detectron2.evaluation import CityscapesSemSegEvaluator, DatasetEvaluator, SemSegEvaluator

from ..utils.io import read_label_map
from ..utils.numpy_compat import numpy_in1d_alias

__all__ = ["CityscapesSemSegEvaluatorNumpy2", "build_cityscapes_sem_seg_evaluator", "cityscapesscripts_available"]

logger = logging.getLogger(__name__)


def cityscapesscripts_available() -> bool:
    """Whether the official ``cityscapesscripts`` package can be imported."""
    return importlib.util.find_spec("cityscapesscripts") is not None


class CityscapesSemSegEvaluatorNumpy2(CityscapesSemSegEvaluator):
    """Detectron2's ``CityscapesSemSegEvaluator``, runnable with numpy >= 2.4.

    cityscapesscripts calls ``np.in1d``, which numpy 2.4 removed; the
    evaluation runs inside :func:`~gmmseg_d2.utils.numpy_compat.numpy_in1d_alias`.
    """

    def evaluate(self):
        with numpy_in1d_alias():
            return super().evaluate()


def build_cityscapes_sem_seg_evaluator(
    dataset_name: str, output_dir: Optional[str] = None, distributed: bool = True
) -> DatasetEvaluator:
    """The evaluator of an ``evaluator_type="cityscapes_sem_seg"`` dataset (see the module docstring)."""
    if cityscapesscripts_available():
        return CityscapesSemSegEvaluatorNumpy2(dataset_name)
    logger.info(
        f"cityscapesscripts is not installed: evaluating {dataset_name} with SemSegEvaluator on the 19 "
        "train IDs (same IoU; `pip install cityscapesscripts` for the official evaluation with iIoU)"
    )
    return SemSegEvaluator(dataset_name, distributed=distributed, output_dir=output_dir,
                           sem_seg_loading_fn=read_label_map)
