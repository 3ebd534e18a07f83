#!/usr/bin/env python
"""Train and evaluate gmmseg_d2 models with ProtoSeg's prototype classifier.

tools/train_net.py with the ``MODEL.PROTO.*`` keys and the ``"prototype"``
classifier registered; run from the repository root:

    python projects/ProtoSeg/train_net.py --config-file projects/ProtoSeg/configs/mosaic/fcn_R18_proto.yaml
    python projects/ProtoSeg/train_net.py --config-file CFG --num-gpus 8
    python projects/ProtoSeg/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python projects/ProtoSeg/train_net.py --config-file CFG --resume
"""
import warnings

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

from detectron2.engine import default_argument_parser, launch  # noqa: E402

import gmmseg_d2  # noqa: E402,F401  (registers datasets, models)
# This script's directory is on sys.path (also in the processes `launch`
# spawns, which inherit it): importing the package registers "prototype".
import protoseg  # noqa: E402
from gmmseg_d2.engine import run_train_net  # noqa: E402


def main(args):
    # MODEL.PROTO.* is added after gmmseg_d2's keys and before the YAML merge.
    return run_train_net(args, extra_config=(protoseg.add_protoseg_config,))


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
