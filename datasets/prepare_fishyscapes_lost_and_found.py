#!/usr/bin/env python
"""Fishyscapes Lost & Found validation (100 images) -> $ROOT/fishyscapes/lost_and_found_val.

    python datasets/prepare_fishyscapes_lost_and_found.py \
        --masks $DETECTRON2_DATASETS/fishyscapes/fishyscapes_lostandfound \
        --lost-and-found $DETECTRON2_DATASETS/lost_and_found

Inputs as published: the unzipped fishyscapes_lostandfound.zip
(<fs id>_<frame id>_labels.png: 0 in-distribution, 1 anomaly, 255 void) and the
Lost and Found images (leftImg8bit/{train,test}/<scene>/<frame id>_leftImg8bit.png,
http://www.6d-vision.com/lostandfounddataset). Both are searched recursively.
The output folder is built aside and renamed into place, manifest.json last.
Registered name: fishyscapes_lost_and_found_val (evaluator_type "anomaly").
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.anomaly import prepare_fishyscapes_lost_and_found  # noqa: E402
from gmmseg_d2.data.datasets.common import prepare_argument_parser  # noqa: E402
from gmmseg_d2.data.datasets.common import datasets_root  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__)
    parser.add_argument("--masks", default=None, help="unzipped fishyscapes_lostandfound.zip "
                        "(default: ROOT/fishyscapes/fishyscapes_lostandfound)")
    parser.add_argument("--lost-and-found", default=None,
                        help="Lost and Found dataset with leftImg8bit/ (default: ROOT/lost_and_found)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    masks = args.masks or os.path.join(root, "fishyscapes", "fishyscapes_lostandfound")
    images = args.lost_and_found or os.path.join(root, "lost_and_found")
    out = prepare_fishyscapes_lost_and_found(masks, images, root, num_workers=args.num_workers)
    print(f"Fishyscapes Lost & Found validation written to {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
