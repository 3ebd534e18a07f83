#!/usr/bin/env python
"""Train and evaluate GSS (generative semantic segmentation) models.

tools/train_net.py with the ``MODEL.GSS.*`` keys and the
``GenerativeSemanticSegmentor`` meta-architecture registered; run from the
repository root:

    python projects/GSS/train_net.py --config-file projects/GSS/configs/mosaic/gss_ff_R18.yaml
    python projects/GSS/train_net.py --config-file CFG --num-gpus 8
    python projects/GSS/train_net.py --config-file CFG --eval-only MODEL.WEIGHTS model_final.pth
    python projects/GSS/train_net.py --config-file CFG --resume

Stage III (GSS-FT / FT-W, MODEL.GSS.TRAIN_STAGE "posterior") is this script
with a posterior config and MODEL.WEIGHTS the stage-II checkpoint.
"""
import warnings

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

from detectron2.engine import default_argument_parser, launch  # noqa: E402

import gmmseg_d2  # noqa: E402,F401  (registers datasets, models)
# This script's directory is on sys.path (also in the processes `launch`
# spawns, which inherit it): importing the package registers the meta-architecture.
import gss  # noqa: E402
from gmmseg_d2.engine import run_train_net  # noqa: E402


def main(args):
    # MODEL.GSS.* is added after gmmseg_d2's keys and before the YAML merge.
    return run_train_net(args, extra_config=(gss.add_gss_config,))


if __name__ == "__main__":
    args = default_argument_parser().parse_args()
    print("Command Line Args:", args)
    launch(main, args.num_gpus, num_machines=args.num_machines, machine_rank=args.machine_rank,
           dist_url=args.dist_url, args=(args,))
