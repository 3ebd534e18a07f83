"""GMMSeg-Mask2Former trained by tools/train_net.py --num-gpus 2 on CPU (gloo): query-level GMM state
identical on both ranks (same driver as tests/test_distributed_training.py)."""
import os

import torch

from tests.conftest import REPO_ROOT
from tests.test_distributed_training import train_on_two_cpu_processes

GMM_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_gmm.yaml")
MAX_ITER = 6

OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.CROP.SIZE", "(64, 64)", "INPUT.SIZE_DIVISIBILITY", "64",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "2",
    "MODEL.GMM.QUERY.MEMORY_SIZE", "16", "MODEL.GMM.UPDATE_INTERVAL", "2",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
]
PREFIX = "sem_seg_head.predictor.class_embed."


def test_two_cpu_processes_keep_the_query_gmm_identical(small_mosaic_root, tmp_path):
    rank0, rank1 = train_on_two_cpu_processes(GMM_CONFIG, OPTS, MAX_ITER, small_mosaic_root, tmp_path)
    assert rank0.keys() == rank1.keys()
    buffers = ["means", "stds", "iteration", "memory.chunk_sum", "memory.chunk_square_sum", "memory.filled",
               "memory.count", "memory.pending", "memory.total_written"]  # the default "stats" memory
    for name in buffers:
        assert torch.equal(rank0[PREFIX + name], rank1[PREFIX + name]), f"{name} differs between ranks"
    # The EM ran once per step on the queries of both ranks.
    assert int(rank0[PREFIX + "iteration"]) == MAX_ITER
    count = rank0[PREFIX + "memory.count"]
    assert int(count[-1].sum()) > 0 and int(count[:-1].sum()) > 0  # "no object" and real classes
    assert not torch.all(rank0[PREFIX + "stds"] == 1.0)
    for key, value in rank0.items():
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(value, rank1[key]), key
