#!/usr/bin/env python
"""COCO-Stuff-164k: write coco/stuffthingmaps_detectron2/ (classes 0..170, 255) from coco/stuffthingmaps/.

    python datasets/prepare_coco_stuff_164k_sem_seg.py               # $DETECTRON2_DATASETS/coco
    python datasets/prepare_coco_stuff_164k_sem_seg.py --root /data  # /data/coco

Expects COCO 2017 train2017/ and val2017/ and stuffthingmaps_trainval2017.zip
unzipped as coco/stuffthingmaps/{train2017,val2017}. Outputs are written
atomically; a second run completes an interrupted one (`--force` rewrites).
Registered names: coco_2017_train_stuff_sem_seg / coco_2017_val_stuff_sem_seg.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.coco_stuff import prepare_coco_stuff_164k_sem_seg  # noqa: E402
from gmmseg_d2.data.datasets.common import prepare_argument_parser  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__, force=True)
    args = parser.parse_args(argv)
    written = prepare_coco_stuff_164k_sem_seg(args.root, force=args.force, num_workers=args.num_workers)
    print(f"COCO-Stuff-164k: label files written per split {written}")


if __name__ == "__main__":
    main()
