"""tools/train_net.py --num-gpus 2 on CPU (gloo): GMM buffers identical on both ranks.

The test runs the real entry point in a subprocess through a small driver that
adds one hook before handing over to ``train_net``'s ``__main__`` code: after
training, every rank dumps its GMM buffers (and all other model state) to
``OUTPUT_DIR/rank{r}_state.pth``. Spawned workers re-import the driver, so they
get the hook too (the path of train_net.py comes by environment variable,
since the workers see the parent's ``sys.argv``).
"""
import os
import subprocess
import sys
import textwrap

import torch

from tests.conftest import REPO_ROOT

GMM_CONFIG = os.path.join(REPO_ROOT, "configs", "mosaic", "fcn_R18_gmm.yaml")
MAX_ITER = 6

OPTS = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "32",
    "INPUT.MIN_SIZE_TRAIN", "(64, 80)", "INPUT.CROP.SIZE", "(64, 64)",
    "SOLVER.IMS_PER_BATCH", "4", "SOLVER.MAX_ITER", str(MAX_ITER), "SOLVER.WARMUP_ITERS", "2",
    "MODEL.GMM.MEMORY_SIZE", "48", "MODEL.GMM.UPDATE_INTERVAL", "2",
    "DATALOADER.NUM_WORKERS", "0", "DATASETS.TEST", "()", "TEST.EVAL_PERIOD", "0",
]

DRIVER = textwrap.dedent('''
    import importlib.util, os
    import torch
    from detectron2.engine import HookBase
    from detectron2.utils import comm

    spec = importlib.util.spec_from_file_location("train_net", os.environ["GMMSEG_TRAIN_NET"])
    train_net = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(train_net)

    from gmmseg_d2.engine import Trainer

    class DumpRankState(HookBase):
        def after_train(self):
            model = self.trainer.model
            model = getattr(model, "module", model)
            state = {k: v.detach().clone() for k, v in model.state_dict().items()}
            path = os.path.join(self.trainer.cfg.OUTPUT_DIR, f"rank{comm.get_rank()}_state.pth")
            torch.save({"world_size": comm.get_world_size(), "iter": self.trainer.iter, "state": state}, path)

    _build_hooks = Trainer.build_hooks
    Trainer.build_hooks = lambda self: _build_hooks(self) + [DumpRankState()]

    def main(args):
        return train_net.main(args)

    if __name__ == "__main__":
        args = train_net.default_argument_parser().parse_args()
        train_net.launch(main, args.num_gpus, num_machines=args.num_machines,
                         machine_rank=args.machine_rank, dist_url=args.dist_url, args=(args,))
''')


def train_on_two_cpu_processes(config_file, opts, max_iter, datasets_root, tmp_path):
    """Run tools/train_net.py --num-gpus 2 (gloo, CPU) through DRIVER, writing to
    ``tmp_path / "out"``; returns both ranks' final model state dicts after
    checking they ran ``max_iter`` steps."""
    driver = tmp_path / "driver.py"
    driver.write_text(DRIVER)
    output_dir = tmp_path / "out"
    env = dict(os.environ, DETECTRON2_DATASETS=datasets_root, OMP_NUM_THREADS="1",
               PYTHONPATH=os.pathsep.join([REPO_ROOT, os.environ.get("PYTHONPATH", "")]),
               CUDA_VISIBLE_DEVICES="", GMMSEG_TRAIN_NET=os.path.join(REPO_ROOT, "tools", "train_net.py"))
    command = [sys.executable, str(driver), "--num-gpus", "2", "--config-file", config_file, *opts,
               "OUTPUT_DIR", str(output_dir)]
    proc = subprocess.run(command, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=240)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]

    dumps = [torch.load(output_dir / f"rank{r}_state.pth", weights_only=False) for r in range(2)]
    assert [d["world_size"] for d in dumps] == [2, 2]
    assert [d["iter"] for d in dumps] == [max_iter, max_iter]
    return dumps[0]["state"], dumps[1]["state"]


def test_two_cpu_processes_keep_gmm_buffers_identical(small_mosaic_root, tmp_path):
    rank0, rank1 = train_on_two_cpu_processes(GMM_CONFIG, OPTS, MAX_ITER, small_mosaic_root, tmp_path)
    assert rank0.keys() == rank1.keys()
    gmm = [k for k in rank0 if k.startswith("sem_seg_head.predictor.")
           and not any(part in k for part in ("projection", "embedding_norm", "class_norm"))]
    assert sorted(k.rsplit("predictor.", 1)[1] for k in gmm) == sorted(
        ["means", "stds", "iteration", "memory.chunk_sum", "memory.chunk_square_sum", "memory.filled",
         "memory.count", "memory.pending", "memory.total_written"])  # the default "stats" memory
    for key in gmm:
        assert torch.equal(rank0[key], rank1[key]), f"{key} differs between ranks"
    # The EM really ran: steps counted, memory filled, components moved off their init.
    assert int(rank0["sem_seg_head.predictor.iteration"]) == MAX_ITER
    assert int(rank0["sem_seg_head.predictor.memory.total_written"].sum()) > 0
    assert not torch.all(rank0["sem_seg_head.predictor.stds"] == 1.0)
    # DDP keeps the weights in sync too; the saved checkpoint is rank 0's state.
    for key, value in rank0.items():
        if "running_" not in key and "num_batches_tracked" not in key:
            assert torch.equal(value, rank1[key]), key
    final = torch.load(tmp_path / "out" / "model_final.pth", weights_only=False)["model"]
    for key in gmm:
        assert torch.equal(final[key], rank0[key]), key
