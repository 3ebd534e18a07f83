from .build import build_optimizer, build_lr_scheduler, get_optimizer_param_groups

__all__ = ["build_optimizer", "build_lr_scheduler", "get_optimizer_param_groups"]
