#!/usr/bin/env python
"""Train and evaluate gmmseg_d2 models (Detectron2's standard entry point).

    python tools/train_net.py --config-file configs/mosaic/fcn_R18_softmax.yaml
    python tools/train_net.py --config-file CFG --num-gpus 8
    python tools/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python tools/train_net.py --config-file CFG --resume
"""
import sys
import warnings

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

from detectron2.engine import default_argument_parser, launch  # noqa: E402

import gmmseg_d2  # noqa: E402,F401  (registers datasets, models)
from gmmseg_d2.engine import run_train_net  # noqa: E402


def main(args):
    return run_train_net(args)


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
