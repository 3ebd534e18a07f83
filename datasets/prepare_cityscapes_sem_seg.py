#!/usr/bin/env python
"""Cityscapes: write *_gtFine_labelTrainIds.png (19 train IDs, 255 ignored) from *_gtFine_labelIds.png.

    python datasets/prepare_cityscapes_sem_seg.py               # $DETECTRON2_DATASETS/cityscapes
    python datasets/prepare_cityscapes_sem_seg.py --root /data  # /data/cityscapes

Expects gtFine_trainvaltest.zip and leftImg8bit_trainvaltest.zip
(https://www.cityscapes-dataset.com/downloads/) unzipped into cityscapes/.
Needs no cityscapesscripts; its createTrainIdLabelImgs gives the same files.
Outputs are written atomically; a second run completes an interrupted one
(`--force` rewrites everything). Registered names: cityscapes_fine_sem_seg_train/_val.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.cityscapes import cityscapes_dir, prepare_cityscapes_sem_seg  # noqa: E402
from gmmseg_d2.data.datasets.common import prepare_argument_parser  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__, force=True)
    args = parser.parse_args(argv)
    written = prepare_cityscapes_sem_seg(args.root, force=args.force, num_workers=args.num_workers)
    print(f"Cityscapes at {os.path.abspath(cityscapes_dir(args.root))}: labelTrainIds written per split {written}")


if __name__ == "__main__":
    main()
