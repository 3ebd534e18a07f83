#!/usr/bin/env python
"""Fishyscapes Static validation (30 images) -> $ROOT/fishyscapes/static_val.

    python datasets/prepare_fishyscapes_static.py \
        --overlays $DETECTRON2_DATASETS/fishyscapes/fs_val_v3 \
        --cityscapes-images $DETECTRON2_DATASETS/cityscapes/leftImg8bit

Inputs as published: the unzipped fs_val_v3.zip
(http://robotics.ethz.ch/~asl-datasets/Fishyscapes/fs_val_v3.zip:
<fs id>_<Cityscapes frame id>_labels.png and <fs id>_..._rgb.npz overlays) and
Cityscapes leftImg8bit. Each image is the Cityscapes frame plus its overlay,
clipped to 0..255 (Fishyscapes does not redistribute Cityscapes pixels).
Registered name: fishyscapes_static_val (evaluator_type "anomaly").
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.anomaly import prepare_fishyscapes_static  # noqa: E402
from gmmseg_d2.data.datasets.common import prepare_argument_parser  # noqa: E402
from gmmseg_d2.data.datasets.common import datasets_root  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__)
    parser.add_argument("--overlays", default=None,
                        help="unzipped fs_val_v3.zip (default: ROOT/fishyscapes/fs_val_v3)")
    parser.add_argument("--cityscapes-images", default=None,
                        help="Cityscapes leftImg8bit (default: ROOT/cityscapes/leftImg8bit)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    overlays = args.overlays or os.path.join(root, "fishyscapes", "fs_val_v3")
    images = args.cityscapes_images or os.path.join(root, "cityscapes", "leftImg8bit")
    out = prepare_fishyscapes_static(overlays, images, root, num_workers=args.num_workers)
    print(f"Fishyscapes Static validation written to {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
