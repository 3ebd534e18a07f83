"""Models: importing this package registers backbones, heads and architectures."""
from . import backbone, heads, meta_arch  # noqa: F401  (registration side effects)
from .anomaly import SOFTMAX_ANOMALY_SCORES, softmax_anomaly_score

__all__ = ["SOFTMAX_ANOMALY_SCORES", "softmax_anomaly_score"]
