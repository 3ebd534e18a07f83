from .checkpointer import AtomicDetectionCheckpointer
from .trainer import Trainer, setup_cfg, write_eval_results

__all__ = ["AtomicDetectionCheckpointer", "Trainer", "setup_cfg", "write_eval_results"]
