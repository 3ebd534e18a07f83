"""Shared fixtures: a small generated mosaic dataset for the whole session."""
import os
import warnings

import pytest

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
DEMO_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "fcn_R18_softmax.yaml")

#: Size of the session's mosaic: big enough to learn something, small enough
#: to generate in a few seconds.
SMALL_MOSAIC = dict(num_train=400, num_val=32, num_anomaly=12, seed=0)


@pytest.fixture(scope="session")
def small_mosaic_root(tmp_path_factory):
    """``DETECTRON2_DATASETS`` root holding a small mosaic; set for the session."""
    from gmmseg_d2.data.datasets import ensure_mosaic_dataset

    root = str(tmp_path_factory.mktemp("d2_datasets"))
    ensure_mosaic_dataset(root, num_workers=1, **SMALL_MOSAIC)
    previous = os.environ.get("DETECTRON2_DATASETS")
    os.environ["DETECTRON2_DATASETS"] = root
    yield root
    if previous is None:
        os.environ.pop("DETECTRON2_DATASETS", None)
    else:
        os.environ["DETECTRON2_DATASETS"] = previous


@pytest.fixture
def demo_cfg():
    """A mutable copy of the demo config with gmmseg_d2's keys, on CPU."""
    from detectron2.config import get_cfg
    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(DEMO_CONFIG)
    cfg.MODEL.DEVICE = "cpu"
    return cfg


@pytest.fixture
def one_torch_thread():
    """Run a test with one intra-op thread (restored afterwards).

    Tests of small tensor kernels stall on OpenMP barriers when another job
    holds the machine's second core; one thread keeps them fast and stable.
    """
    import torch

    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
