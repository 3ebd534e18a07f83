"""The embedding step the feature-space classifiers share (GMM, prototypes)."""
import torch
import torch.nn.functional as F
from torch import Tensor, nn

__all__ = ["layer_norm_l2"]


def layer_norm_l2(x: Tensor, layer_norm: nn.Module) -> Tensor:
    """``(*, D)`` -> ``layer_norm`` then L2-normalised over the last dim, in float32.

    The GMM's ``embedding_norm`` step and the prototype classifier's
    ``feat_norm`` step. Autocast is off: the scores built on these unit
    vectors are large differences of log-densities or sharp softmaxes of
    cosines.
    """
    with torch.autocast(device_type=x.device.type, enabled=False):
        return F.normalize(layer_norm(x.float()), dim=-1)
