#!/usr/bin/env python
"""COCO-Stuff-10k: write images_detectron2/ and annotations_detectron2/ (0..170, 255) from the release.

    python datasets/prepare_coco_stuff_10k_sem_seg.py                 # release v1.1 (current)
    python datasets/prepare_coco_stuff_10k_sem_seg.py --version 1.0   # release v1.0 (MaskFormer's link)
    python datasets/prepare_coco_stuff_10k_sem_seg.py --root /data    # /data/coco/coco_stuff_10k

Expects the release unzipped into coco/coco_stuff_10k/ (images/, annotations/*.mat,
imageLists/{train,test}.txt). v1.1 stores COCO-Stuff ids (0 = unlabeled);
v1.0 stores 1 = unlabeled and the 171 classes from 2 (MATLAB v7.3 files: needs
`pip install h5py`). Images are hard-linked where possible, else copied.
Registered names: coco_2017_train_stuff_10k_sem_seg / coco_2017_test_stuff_10k_sem_seg.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.coco_stuff import (  # noqa: E402
    COCO_STUFF_10K_VERSIONS,
    prepare_coco_stuff_10k_sem_seg,
)
from gmmseg_d2.data.datasets.common import prepare_argument_parser  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__, force=True)
    parser.add_argument("--version", choices=COCO_STUFF_10K_VERSIONS, default="1.1",
                        help="release of the .mat annotations (default: 1.1)")
    args = parser.parse_args(argv)
    counts = prepare_coco_stuff_10k_sem_seg(args.root, version=args.version, force=args.force,
                                            num_workers=args.num_workers)
    print(f"COCO-Stuff-10k (v{args.version}): images per split {counts}")


if __name__ == "__main__":
    main()
