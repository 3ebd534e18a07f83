from .checkpointer import AtomicDetectionCheckpointer
from .predictor import SemSegPredictor, check_model_weights
from .trainer import Trainer, setup_cfg, write_eval_results

__all__ = ["AtomicDetectionCheckpointer", "SemSegPredictor", "Trainer", "check_model_weights", "setup_cfg",
           "write_eval_results"]
