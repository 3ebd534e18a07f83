"""Exact --resume: N iterations straight == N/2, interruption, --resume, N/2 more.

The suite runs N = 20 (three short trainings, ~1 min on 2 cores);
``GMMSEG_RESUME_TEST_ITERS=2000 pytest tests/test_resume.py`` runs the issue's
2k-iteration version of the same test (~25 min on 2 cores).

The interruption is a real one: both runs use the same config (MAX_ITER N, so
the same LR schedule); the interrupted run writes its periodic checkpoint
after iteration N/2 - 1 and a hook then raises, as a crash would.
"""
import os

import numpy as np
import pytest
import torch

from detectron2.engine import HookBase, default_argument_parser
from detectron2.utils.events import get_event_storage

from gmmseg_d2.engine import Trainer
from gmmseg_d2.data.training_stream import ResumableTrainingStream
from tests.conftest import REPO_ROOT
from tests.test_train_net import _load_train_net

GMM_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "fcn_R18_gmm.yaml")
N = int(os.environ.get("GMMSEG_RESUME_TEST_ITERS", 20))
if N < 4 or N % 2:
    raise ValueError(f"GMMSEG_RESUME_TEST_ITERS must be an even number >= 4, got {N}")

TINY_OPTS = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64, 80, 96)", "INPUT.CROP.SIZE", "(64, 64)",
    "SOLVER.IMS_PER_BATCH", "2", "SOLVER.MAX_ITER", str(N), "SOLVER.WARMUP_ITERS", "4",
    "SOLVER.CHECKPOINT_PERIOD", str(N // 2),
    # A ring buffer that wraps several times, and M-steps every other step.
    "MODEL.GMM.MEMORY_SIZE", "16", "MODEL.GMM.UPDATE_INTERVAL", "2",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
]


class Interrupted(Exception):
    pass


class _RecordLosses(HookBase):
    def __init__(self, sink):
        self.sink = sink

    def after_step(self):
        storage = get_event_storage()
        self.sink[self.trainer.iter] = {
            name: value for name, (value, it) in storage.latest().items()
            if it == self.trainer.iter and ("loss" in name or name == "lr")
        }


class _InterruptAfter(HookBase):
    def __init__(self, iteration):
        self.iteration = iteration

    def after_step(self):
        if self.trainer.iter == self.iteration:
            raise Interrupted(f"interrupted after iteration {self.iteration}")


def _run(monkeypatch, output_dir, losses, *, resume=False, interrupt_after=None):
    original = Trainer.build_hooks

    def build_hooks(self):
        hooks = original(self) + [_RecordLosses(losses)]
        if interrupt_after is not None:
            hooks.append(_InterruptAfter(interrupt_after))  # after the PeriodicCheckpointer
        return hooks

    monkeypatch.setattr(Trainer, "build_hooks", build_hooks)
    argv = ["--config-file", GMM_CONFIG, *(["--resume"] if resume else []),
            *TINY_OPTS, "OUTPUT_DIR", str(output_dir)]
    try:
        return _load_train_net().main(default_argument_parser().parse_args(argv))
    finally:
        monkeypatch.setattr(Trainer, "build_hooks", original)


def _checkpoint(path):
    return torch.load(path, map_location="cpu", weights_only=False)


@pytest.fixture(scope="module")
def runs(small_mosaic_root, tmp_path_factory):
    monkeypatch = pytest.MonkeyPatch()
    straight_dir = tmp_path_factory.mktemp("straight")
    resumed_dir = tmp_path_factory.mktemp("resumed")
    straight_losses, first_half_losses, second_half_losses = {}, {}, {}
    try:
        _run(monkeypatch, straight_dir, straight_losses)
        with pytest.raises(Interrupted):
            _run(monkeypatch, resumed_dir, first_half_losses, interrupt_after=N // 2 - 1)
        assert not os.path.exists(resumed_dir / "model_final.pth")
        _run(monkeypatch, resumed_dir, second_half_losses, resume=True)
    finally:
        monkeypatch.undo()
    return dict(straight_dir=straight_dir, resumed_dir=resumed_dir, straight=straight_losses,
                first_half=first_half_losses, second_half=second_half_losses)


def test_resumed_run_continues_at_the_checkpoint(runs):
    assert (runs["resumed_dir"] / "last_checkpoint").read_text() == "model_final.pth"
    assert sorted(runs["first_half"]) == list(range(N // 2))
    assert sorted(runs["second_half"]) == list(range(N // 2, N))
    halfway = _checkpoint(runs["resumed_dir"] / f"model_{N // 2 - 1:07d}.pth")
    assert halfway["iteration"] == N // 2 - 1
    assert "IterationSeedHook" in halfway["trainer"]["hooks"]


def test_losses_identical_at_every_step(runs):
    straight, first, second = runs["straight"], runs["first_half"], runs["second_half"]
    assert set(straight[0]) >= {"total_loss", "loss_sem_seg"}, straight[0]
    assert any(name.startswith("loss_") and name != "loss_sem_seg" for name in straight[0]), straight[0]
    for it in range(N):
        resumed = first[it] if it < N // 2 else second[it]
        assert resumed == straight[it], f"iteration {it}: {resumed} != {straight[it]}"
    # The data did not replay: the second half sees other batches than the first.
    assert [second[it]["total_loss"] for it in range(N // 2, N)] != \
        [first[it]["total_loss"] for it in range(N // 2)]


def test_final_state_bit_identical(runs):
    straight = _checkpoint(runs["straight_dir"] / "model_final.pth")
    resumed = _checkpoint(runs["resumed_dir"] / "model_final.pth")
    assert straight["iteration"] == resumed["iteration"] == N - 1
    assert straight["model"].keys() == resumed["model"].keys()
    gmm_keys = [k for k in straight["model"] if k.startswith("sem_seg_head.predictor.")]
    # The default "stats" memory (its chunk sums and fill counter).
    for suffix in ("means", "stds", "iteration", "memory.chunk_sum", "memory.chunk_square_sum", "memory.filled",
                   "memory.count", "memory.pending", "memory.total_written", "projection.bn.running_mean"):
        assert any(k.endswith(suffix) for k in gmm_keys), (suffix, gmm_keys)
    for key, value in straight["model"].items():
        assert torch.equal(value, resumed["model"][key]), key
    assert int(straight["model"]["sem_seg_head.predictor.iteration"]) == N
    assert int(straight["model"]["sem_seg_head.predictor.memory.total_written"].max()) > 16  # the window wrapped
    # Optimizer moments and the scheduler's position too.
    straight_optimizer = straight["trainer"]["_trainer"]["optimizer"]
    resumed_optimizer = resumed["trainer"]["_trainer"]["optimizer"]
    assert straight_optimizer["state"].keys() == resumed_optimizer["state"].keys()
    for index, state in straight_optimizer["state"].items():
        for name, value in state.items():
            assert torch.equal(torch.as_tensor(value), torch.as_tensor(resumed_optimizer["state"][index][name])), name
    assert straight["trainer"]["hooks"] == resumed["trainer"]["hooks"]


def test_stream_resumes_and_ignores_worker_count():
    """Starting at iteration k gives the batches a full stream gives from k, with or without workers."""

    def mapper(record):
        # Randomness from all three global RNGs, as augmentations and dropout draw.
        return (record["i"], float(np.random.rand()), float(torch.rand(())), __import__("random").random())

    dataset = [{"i": i} for i in range(7)]
    full = ResumableTrainingStream(dataset, mapper, 3, seed=5)
    loader = iter(full.build_loader(num_workers=0))
    batches = [next(loader) for _ in range(8)]
    # Every epoch is a permutation of the dataset.
    indices = [s[0] for b in batches for s in b]
    assert sorted(indices[:7]) == list(range(7)) and sorted(indices[7:14]) == list(range(7))
    resumed = ResumableTrainingStream(dataset, mapper, 3, seed=5)
    resumed.start_iteration = 5
    with_workers = iter(resumed.build_loader(num_workers=2))
    assert [next(with_workers) for _ in range(3)] == batches[5:]
    # Mapping leaves the caller's RNG streams where they were.
    torch.manual_seed(1)
    expected = torch.rand(3)
    torch.manual_seed(1)
    next(iter(full.build_loader(num_workers=0)))
    assert torch.equal(torch.rand(3), expected)
