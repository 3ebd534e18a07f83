"""The Detectron2 trainer of gmmseg_d2 and the config setup shared by the tools."""
import json
import logging
import os
import weakref
from collections import OrderedDict
from typing import Callable, Dict, Optional, Sequence

import torch
import torch.distributed as dist

from detectron2.config import CfgNode, get_cfg
from detectron2.data import (
    MetadataCatalog,
    build_detection_test_loader,
    build_detection_train_loader,
    get_detection_dataset_dicts,
)
from detectron2.engine import AMPTrainer, DefaultTrainer, SimpleTrainer, TrainerBase, create_ddp_model, default_setup
from detectron2.evaluation import DatasetEvaluator, SemSegEvaluator
from detectron2.utils import comm
from detectron2.utils.logger import setup_logger

from ..config import add_gmmseg_config
from ..data.dataset_mappers import MaskFormerSemanticDatasetMapper, PerPixelSemanticDatasetMapper
from ..data.datasets.folder import configure_folder_dataset
from ..evaluation import AnomalyEvaluator, build_cityscapes_sem_seg_evaluator
from ..solver import build_lr_scheduler, build_optimizer
from ..utils import format_results_table, read_label_map
from .checkpointer import AtomicDetectionCheckpointer, atomic_write_bytes, remove_orphan_temporaries
from ..data.samplers import WEIGHTED_SAMPLERS, build_weighted_training_stream
from ..data.training_stream import ResumableTrainingStream, find_stream
from .resumable import IterationSeedHook

__all__ = ["Trainer", "run_train_net", "setup_cfg", "training_seed", "write_eval_results"]

EVAL_RESULTS_FILE = "eval_results.json"


def setup_cfg(args, *, default_setup_logging: bool = True,
              extra_config: Sequence[Callable[[CfgNode], None]] = ()) -> CfgNode:
    """Config from ``args.config_file`` and ``args.opts``, with gmmseg_d2's keys.

    ``extra_config``: functions adding further keys (a project's
    ``add_*_config``), applied after gmmseg_d2's, before the merge.
    Falls back to ``MODEL.DEVICE = "cpu"`` when no GPU is available, so the
    same YAML runs on a laptop and on a GPU node.
    """
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    for add_config in extra_config:
        add_config(cfg)
    if args.config_file:
        cfg.merge_from_file(args.config_file)
    cfg.merge_from_list(args.opts)
    # DATASETS.FOLDER: register the folder's splits and point DATASETS.TRAIN/TEST
    # and NUM_CLASSES at them, before any loader is built (in every process).
    configure_folder_dataset(cfg)
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
    # What an evaluation killed mid-write left behind (see atomic_write_bytes).
    remove_orphan_temporaries(output_dir, (EVAL_RESULTS_FILE,))
    path = os.path.join(output_dir, EVAL_RESULTS_FILE)
    text = json.dumps(results, indent=2, sort_keys=False, default=float)
    atomic_write_bytes(path, lambda f: f.write(text.encode()))
    return path


def training_seed(cfg: CfgNode) -> int:
    """``cfg.SEED``, or a random seed shared by all ranks when it is negative.

    With a negative seed every rank must call this (it all-gathers).
    """
    return int(cfg.SEED) if cfg.SEED >= 0 else int(comm.shared_random_seed())


def broadcast_buffers_from_main_process(model: torch.nn.Module) -> None:
    """Copy every buffer of ``model`` from rank 0 to all ranks (once; a no-op in one process)."""
    if comm.get_world_size() == 1:
        return
    with torch.no_grad():
        for buffer in model.buffers():
            # gloo has no bool collectives; a same-size byte view is bit-identical.
            dist.broadcast(buffer.view(torch.uint8) if buffer.dtype == torch.bool else buffer, src=0)


class Trainer(DefaultTrainer):
    """DefaultTrainer with gmmseg_d2's mappers, evaluators, optimizer and schedules.

    Training resumes bit-for-bit (see :mod:`gmmseg_d2.engine.resumable`): the
    train loader is a :class:`ResumableTrainingStream` that starts at the
    resumed iteration, and :class:`IterationSeedHook` reseeds the RNGs before
    every step; the seed travels in the checkpoint with the trainer state, the
    model's buffers (BN statistics, the GMM's means/stds/memory/iteration)
    with the model, optimizer and LR scheduler states as in Detectron2.
    """

    def __init__(self, cfg: CfgNode) -> None:
        # DefaultTrainer.__init__, except for the DDP wrapper: Detectron2 always
        # passes device_ids=[local_rank], which DistributedDataParallel rejects
        # for a CPU model, so multi-process training on CPU (gloo) failed.
        TrainerBase.__init__(self)
        logger = logging.getLogger("detectron2")
        if not logger.isEnabledFor(logging.INFO):  # setup_logger is not called for d2
            setup_logger()
        cfg = DefaultTrainer.auto_scale_workers(cfg, comm.get_world_size())

        model = self.build_model(cfg)
        optimizer = self.build_optimizer(cfg, model)
        data_loader = self.build_train_loader(cfg)

        on_cpu = next(model.parameters()).device.type == "cpu"
        # broadcast_buffers=False: the GMM's buffers (memory included) are kept
        # equal on all ranks by construction, see GaussianMixtureClassifier,
        # provided they start equal. DDP broadcasts the parameters at
        # construction but, with broadcast_buffers=False, not the buffers, and
        # Detectron2 seeds each rank differently, so the randomly initialised
        # GMM means would differ between ranks: broadcast the buffers once.
        broadcast_buffers_from_main_process(model)
        model = create_ddp_model(model, broadcast_buffers=False, **({"device_ids": None} if on_cpu else {}))
        self._trainer = (AMPTrainer if cfg.SOLVER.AMP.ENABLED else SimpleTrainer)(model, data_loader, optimizer)

        self.scheduler = self.build_lr_scheduler(cfg, optimizer)
        self.checkpointer = AtomicDetectionCheckpointer(model, cfg.OUTPUT_DIR, trainer=weakref.proxy(self))
        self.start_iter = 0
        self.max_iter = cfg.SOLVER.MAX_ITER
        self.cfg = cfg

        self.register_hooks(self.build_hooks())

    def build_hooks(self):
        # self.checkpointer is the atomic one (see __init__), so the periodic
        # checkpoint hook and --resume both use it.
        stream = find_stream(self._trainer.data_loader)
        seed = stream.seed if stream is not None else training_seed(self.cfg)
        # First, so that every other hook's before_step already sees the step's RNG state.
        return [IterationSeedHook(seed, stream)] + super().build_hooks()

    def resume_or_load(self, resume: bool = True) -> None:
        super().resume_or_load(resume=resume)
        stream = find_stream(self._trainer.data_loader)
        if stream is not None:
            # Before the loader's first iter(), which copies the stream to its workers.
            stream.start_iteration = self.start_iter

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
        if evaluator_type == "cityscapes_sem_seg":
            # The official cityscapesscripts protocol when installed, else SemSegEvaluator on train IDs.
            return build_cityscapes_sem_seg_evaluator(dataset_name, output_folder)
        if evaluator_type == "anomaly":
            return AnomalyEvaluator(dataset_name, distributed=True, output_dir=output_folder)
        raise NotImplementedError(
            f"No evaluator for dataset {dataset_name!r} with evaluator_type {evaluator_type!r}; "
            "gmmseg_d2 evaluates 'sem_seg', 'cityscapes_sem_seg' and 'anomaly' datasets")

    @classmethod
    def build_train_loader(cls, cfg: CfgNode):
        mappers = {"per_pixel_semantic": PerPixelSemanticDatasetMapper,
                   "mask_former_semantic": MaskFormerSemanticDatasetMapper}
        if cfg.INPUT.DATASET_MAPPER_NAME not in mappers:
            raise ValueError(f"Unknown INPUT.DATASET_MAPPER_NAME {cfg.INPUT.DATASET_MAPPER_NAME!r}; "
                             f"available: {sorted(mappers)}")
        mapper = mappers[cfg.INPUT.DATASET_MAPPER_NAME](cfg, True)
        if cfg.DATALOADER.SAMPLER_TRAIN not in ("TrainingSampler",) + WEIGHTED_SAMPLERS:
            logging.getLogger(__name__).warning(
                f"DATALOADER.SAMPLER_TRAIN {cfg.DATALOADER.SAMPLER_TRAIN!r}: using Detectron2's train "
                "loader, whose data order is not restored exactly by --resume")
            return build_detection_train_loader(cfg, mapper=mapper)
        dataset = get_detection_dataset_dicts(
            cfg.DATASETS.TRAIN, filter_empty=cfg.DATALOADER.FILTER_EMPTY_ANNOTATIONS)
        # Batches are consecutive samples of the stream: ASPECT_RATIO_GROUPING
        # does not apply (crops and ImageList padding make it moot here).
        if cfg.DATALOADER.SAMPLER_TRAIN in WEIGHTED_SAMPLERS:  # class-balanced, as resumable as the default
            stream = build_weighted_training_stream(cfg, dataset, mapper, seed=training_seed(cfg))
        else:
            stream = ResumableTrainingStream(dataset, mapper, cfg.SOLVER.IMS_PER_BATCH, seed=training_seed(cfg))
        return stream.build_loader(num_workers=cfg.DATALOADER.NUM_WORKERS)

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


def run_train_net(args, *, extra_config: Sequence[Callable[[CfgNode], None]] = ()) -> Optional[Dict]:
    """What a ``train_net.py`` does in each process: train (and evaluate) or, with
    ``--eval-only``, evaluate ``MODEL.WEIGHTS``; prints the results table.

    Shared by ``tools/train_net.py`` and the projects' scripts, which pass
    their ``add_*_config`` as ``extra_config``.
    """
    cfg = setup_cfg(args, extra_config=extra_config)
    if args.eval_only:
        model = Trainer.build_model(cfg)
        AtomicDetectionCheckpointer(model, save_dir=cfg.OUTPUT_DIR).resume_or_load(
            cfg.MODEL.WEIGHTS, resume=args.resume)
        results = Trainer.test(cfg, model)
    else:
        trainer = Trainer(cfg)
        trainer.resume_or_load(resume=args.resume)
        # DefaultTrainer's EvalHook evaluates after the last iteration (via
        # Trainer.test, which also writes eval_results.json).
        results = trainer.train()
    if comm.is_main_process() and results:
        print(format_results_table({cfg.OUTPUT_DIR: results}), flush=True)
    return results
