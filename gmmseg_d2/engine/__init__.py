from .checkpointer import AtomicDetectionCheckpointer
from .predictor import SemSegPredictor, check_model_weights
from .trainer import Trainer, run_train_net, setup_cfg, write_eval_results

__all__ = ["AtomicDetectionCheckpointer", "SemSegPredictor", "Trainer", "check_model_weights", "run_train_net",
           "setup_cfg", "write_eval_results"]
