"""Exact --resume of GMMSeg-Mask2Former: N iterations straight == N/2, interruption, --resume, N/2 more.

Same protocol as tests/test_resume.py (per-pixel model), on the query-level GMM:
the memory, means, stds and step counter live in the decoder's class head and
the random "no object" subset is drawn from the per-step reseeded generator.
"""
import os

import pytest
import torch

from detectron2.engine import default_argument_parser

from gmmseg_d2.engine import Trainer
from tests.conftest import REPO_ROOT
from tests.test_resume import Interrupted, _InterruptAfter, _RecordLosses
from tests.test_train_net import _load_train_net

GMM_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "maskformer2_R18_gmm.yaml")
N = 12
PREFIX = "sem_seg_head.predictor.class_embed."
TINY_OPTS = [
    "INPUT.MIN_SIZE_TRAIN", "(64, 80, 96)", "INPUT.CROP.SIZE", "(64, 64)", "INPUT.SIZE_DIVISIBILITY", "64",
    "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "256",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(N), "SOLVER.WARMUP_ITERS", "4",
    "SOLVER.CHECKPOINT_PERIOD", str(N // 2),
    # A ring buffer that wraps, and M-steps every other step.
    "MODEL.GMM.QUERY.MEMORY_SIZE", "4", "MODEL.GMM.UPDATE_INTERVAL", "2",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
]


def _run(monkeypatch, output_dir, losses, *, resume=False, interrupt_after=None):
    original = Trainer.build_hooks

    def build_hooks(self):
        hooks = original(self) + [_RecordLosses(losses)]
        if interrupt_after is not None:
            hooks.append(_InterruptAfter(interrupt_after))
        return hooks

    monkeypatch.setattr(Trainer, "build_hooks", build_hooks)
    argv = ["--config-file", GMM_CONFIG, *(["--resume"] if resume else []), *TINY_OPTS, "OUTPUT_DIR", str(output_dir)]
    try:
        return _load_train_net().main(default_argument_parser().parse_args(argv))
    finally:
        monkeypatch.setattr(Trainer, "build_hooks", original)


def test_query_gmm_resumes_bit_for_bit(small_mosaic_root, tmp_path, monkeypatch, one_torch_thread):
    straight_dir, resumed_dir = tmp_path / "straight", tmp_path / "resumed"
    straight, first, second = {}, {}, {}
    _run(monkeypatch, straight_dir, straight)
    with pytest.raises(Interrupted):
        _run(monkeypatch, resumed_dir, first, interrupt_after=N // 2 - 1)
    _run(monkeypatch, resumed_dir, second, resume=True)

    assert sorted(first) == list(range(N // 2)) and sorted(second) == list(range(N // 2, N))
    assert {"loss_gmm_component", "loss_gmm_component_0", "loss_ce"} <= set(straight[0]), straight[0]
    for it in range(N):
        resumed = first[it] if it < N // 2 else second[it]
        assert resumed == straight[it], f"iteration {it}: {resumed} != {straight[it]}"

    a = torch.load(straight_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    b = torch.load(resumed_dir / "model_final.pth", map_location="cpu", weights_only=False)["model"]
    assert a.keys() == b.keys()
    for key, value in a.items():
        assert torch.equal(value, b[key]), key
    assert int(a[PREFIX + "iteration"]) == N
    assert int(a[PREFIX + "memory.count"].max()) == 4  # a ring buffer wrapped
