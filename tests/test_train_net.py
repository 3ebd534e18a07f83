"""End to end through tools/train_net.py: train, evaluate, reload and re-evaluate."""
import importlib.util
import json
import os

import pytest
import torch

from detectron2.engine import default_argument_parser

from gmmseg_d2.engine import AtomicDetectionCheckpointer
from tests.conftest import DEMO_CONFIG, REPO_ROOT

# Small enough for ~1 minute of CPU training, large enough to learn textures.
FAST_TRAINING_OPTS = [
    "SOLVER.MAX_ITER", "250", "SOLVER.IMS_PER_BATCH", "8", "SOLVER.WARMUP_ITERS", "10",
    "DATALOADER.NUM_WORKERS", "0",
]


def _load_train_net():
    spec = importlib.util.spec_from_file_location(
        "train_net", os.path.join(REPO_ROOT, "tools", "train_net.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def trained_run(small_mosaic_root, tmp_path_factory):
    """Train the demo model briefly; returns (output_dir, results)."""
    output_dir = str(tmp_path_factory.mktemp("train_net"))
    args = default_argument_parser().parse_args(
        ["--config-file", DEMO_CONFIG, *FAST_TRAINING_OPTS, "OUTPUT_DIR", output_dir])
    torch.manual_seed(0)
    results = _load_train_net().main(args)
    return output_dir, results


def test_training_learns_and_writes_results(trained_run):
    output_dir, results = trained_run
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        written = json.load(f)
    assert set(written) == {"mosaic_sem_seg_val", "mosaic_anomaly_val"}
    sem_seg = written["mosaic_sem_seg_val"]["sem_seg"]
    anomaly = written["mosaic_anomaly_val"]["anomaly"]
    assert sem_seg["mIoU"] == pytest.approx(results["mosaic_sem_seg_val"]["sem_seg"]["mIoU"])
    # 8 balanced classes: chance pixel accuracy is 12.5 % and a constant
    # prediction scores ~1.6 % mIoU. 250 steps from scratch reach ~15 % mIoU
    # and ~29 % pixel accuracy (seed 0); the thresholds leave a margin.
    assert sem_seg["mIoU"] > 10.0, sem_seg
    assert sem_seg["pACC"] > 22.0, sem_seg
    with open(os.path.join(output_dir, "metrics.json")) as f:
        losses = [json.loads(line)["total_loss"] for line in f if '"total_loss"' in line]
    assert losses[-1] < losses[0] - 0.2, losses
    assert set(anomaly) == {"AP", "FPR95", "AUROC"}
    assert all(0.0 <= v <= 100.0 for v in anomaly.values()), anomaly
    assert os.path.isfile(os.path.join(output_dir, "model_final.pth"))
    with open(os.path.join(output_dir, "last_checkpoint")) as f:
        assert f.read() == "model_final.pth"


def test_eval_only_reproduces_metrics(trained_run):
    output_dir, results = trained_run
    eval_dir = os.path.join(output_dir, "eval_only")
    args = default_argument_parser().parse_args(
        ["--config-file", DEMO_CONFIG, "--eval-only", "DATALOADER.NUM_WORKERS", "0",
         "MODEL.WEIGHTS", os.path.join(output_dir, "model_final.pth"), "OUTPUT_DIR", eval_dir])
    reproduced = _load_train_net().main(args)
    for dataset, tasks in results.items():
        for task, metrics in tasks.items():
            for name, value in metrics.items():
                assert reproduced[dataset][task][name] == pytest.approx(value, abs=1e-6), name
    assert os.path.isfile(os.path.join(eval_dir, "eval_results.json"))


def test_checkpoint_write_is_atomic(tmp_path, monkeypatch):
    model = torch.nn.Linear(3, 2)
    checkpointer = AtomicDetectionCheckpointer(model, save_dir=str(tmp_path))
    checkpointer.save("model_0000009")
    good = torch.load(tmp_path / "model_0000009.pth", weights_only=False)["model"]

    def crash_mid_write(obj, f, *args, **kwargs):
        f.write(b"partial bytes")
        raise RuntimeError("disk full")

    with torch.no_grad():
        model.weight.add_(1.0)
    monkeypatch.setattr(torch, "save", crash_mid_write)
    with pytest.raises(RuntimeError, match="disk full"):
        checkpointer.save("model_0000009")
    monkeypatch.undo()
    # The previous complete file survives, the tag is unchanged, no temp file is left.
    survived = torch.load(tmp_path / "model_0000009.pth", weights_only=False)["model"]
    torch.testing.assert_close(survived["weight"], good["weight"])
    assert (tmp_path / "last_checkpoint").read_text() == "model_0000009.pth"
    assert sorted(os.listdir(tmp_path)) == ["last_checkpoint", "model_0000009.pth"]
