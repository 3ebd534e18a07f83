"""gmmseg_d2: GMMSeg (generative semantic segmentation) as a Detectron2 project.

Importing the package registers its datasets, backbones, heads and
meta-architectures with Detectron2's catalogs and registries.
"""
from . import data, evaluation, modeling  # noqa: F401  (registration side effects)
from .config import add_gmmseg_config

__version__ = "0.1.0"
__all__ = ["add_gmmseg_config"]
