"""The Detectron2 trainer of gmmseg_d2 and the config setup shared by the tools."""
import json
import logging
import os
import weakref
from collections import OrderedDict
from typing import Dict, Optional

import torch

from detectron2.config import CfgNode, get_cfg
from detectron2.data import MetadataCatalog, build_detection_test_loader, build_detection_train_loader
from detectron2.engine import DefaultTrainer, default_setup
from detectron2.evaluation import DatasetEvaluator, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_gmmseg_config
from ..data.dataset_mappers import PerPixelSemanticDatasetMapper
from ..evaluation import AnomalyEvaluator
from ..solver import build_lr_scheduler, build_optimizer
from ..utils import read_label_map
from .checkpointer import AtomicDetectionCheckpointer, atomic_write_bytes

__all__ = ["Trainer", "setup_cfg", "write_eval_results"]

EVAL_RESULTS_FILE = "eval_results.json"


def setup_cfg(args, *, default_setup_logging: bool = True) -> CfgNode:
    """Config from ``args.config_file`` and ``args.opts``, with gmmseg_d2's keys.

    Falls back to ``MODEL.DEVICE = "cpu"`` when no GPU is available, so the
    same YAML runs on a laptop and on a GPU node.
    """
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    if cfg.MODEL.DEVICE.startswith("cuda") and not torch.cuda.is_available():
        cfg.MODEL.DEVICE = "cpu"
    cfg.freeze()
    if default_setup_logging:
        default_setup(cfg, args)
        setup_logger(output=cfg.OUTPUT_DIR, distributed_rank=comm.get_rank(), name="gmmseg_d2")
    return cfg


def write_eval_results(results: Dict, output_dir: str) -> str:
    """Write ``{dataset: {task: {metric: value}}}`` to ``output_dir/eval_results.json``."""
    os.makedirs(output_dir, exist_ok=True)
    path = os.path.join(output_dir, EVAL_RESULTS_FILE)
    text = json.dumps(results, indent=2, sort_keys=False, default=float)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    return path


class Trainer(DefaultTrainer):
    """DefaultTrainer with gmmseg_d2's mappers, evaluators, optimizer and schedules."""

    def build_hooks(self):
        # DefaultTrainer builds a plain DetectionCheckpointer in __init__ just
        # before calling build_hooks; swap in the atomic one so the periodic
        # checkpoint hook and --resume both use it.
        self.checkpointer = AtomicDetectionCheckpointer(
            self.checkpointer.model, self.cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        return super().build_hooks()

    def train(self) -> Optional[Dict]:
        """Train, then return the final evaluation results.

        DefaultTrainer returns them only when ``TEST.EXPECTED_RESULTS`` is set;
        returning them always lets tools and tests use them directly.
        """
        super().train()
        return getattr(self, "_last_eval_results", None)

    @classmethod
    def build_evaluator(cls, cfg: CfgNode, dataset_name: str,
                        output_folder: Optional[str] = None) -> DatasetEvaluator:
        if output_folder is None:
            output_folder = os.path.join(cfg.OUTPUT_DIR, "inference", dataset_name)
        evaluator_type = MetadataCatalog.get(dataset_name).get("evaluator_type", None)
        if evaluator_type == "sem_seg":
            return SemSegEvaluator(dataset_name, distributed=True, output_dir=output_folder,
                                   sem_seg_loading_fn=read_label_map)
        if evaluator_type == "anomaly":
            return AnomalyEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            "gmmseg_d2 evaluates 'sem_seg' and 'anomaly' datasets")

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        if cfg.INPUT.DATASET_MAPPER_NAME != "per_pixel_semantic":
            raise ValueError(f"Unknown INPUT.DATASET_MAPPER_NAME {cfg.INPUT.DATASET_MAPPER_NAME!r}; "
                             "available: 'per_pixel_semantic'")
        return build_detection_train_loader(cfg, mapper=PerPixelSemanticDatasetMapper(cfg, True))

    @classmethod
    def build_test_loader(cls, cfg: CfgNode, dataset_name: str):
        mapper = PerPixelSemanticDatasetMapper(cfg, False, dataset_name=dataset_name)
        return build_detection_test_loader(cfg, dataset_name, mapper=mapper)

    @classmethod
    def build_optimizer(cls, cfg: CfgNode, model: torch.nn.Module):
        return build_optimizer(cfg, model)

    @classmethod
    def build_lr_scheduler(cls, cfg: CfgNode, optimizer):
        return build_lr_scheduler(cfg, optimizer)

    @classmethod
    def test(cls, cfg: CfgNode, model, evaluators=None) -> "OrderedDict[str, Dict]":
        """Evaluate on every ``DATASETS.TEST`` entry.

        Unlike DefaultTrainer, always returns ``{dataset: {task: {metric: value}}}``
        (also for a single dataset) and writes it to ``OUTPUT_DIR/eval_results.json``.
        """
        if isinstance(evaluators, DatasetEvaluator):
            evaluators = [evaluators]
        results = OrderedDict()
        for index, dataset_name in enumerate(cfg.DATASETS.TEST):
            single = cfg.clone()
            single.defrost()
            single.DATASETS.TEST = (dataset_name,)
            single.freeze()
            chosen = None if evaluators is None else [evaluators[index]]
            results[dataset_name] = super().test(single, model, chosen)
        if comm.is_main_process() and results:
            path = write_eval_results(results, cfg.OUTPUT_DIR)
            logging.getLogger(__name__).info(f"Wrote evaluation results to {path}")
        return results
