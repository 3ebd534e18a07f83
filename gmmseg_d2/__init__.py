"""gmmseg_d2: GMMSeg (generative semantic segmentation) as a Detectron2 project.

Importing the package registers its datasets, backbones, heads and
meta-architectures with Detectron2's catalogs and registries.
"""
import warnings

# fvcore (nn.focal_loss) and Detectron2 (modeling.box_regression), which our
# imports pull in, call `torch.jit.script` at module level, and this torch
# warns "`torch.jit.script` is deprecated" (FutureWarning) for each: noise at
# the top of every log that is not ours to fix. Exactly that warning is
# ignored, and only while these imports run: a later torch.jit.script call,
# ours or the user's, still warns.
with warnings.catch_warnings():
    warnings.filterwarnings("ignore", message=r"`torch\.jit\.script` is deprecated", category=FutureWarning)
    from . import data, evaluation, modeling  # noqa: F401,E402  (registration side effects)
    from .config import add_gmmseg_config  # noqa: E402

__version__ = "0.1.0"
__all__ = ["add_gmmseg_config"]
