#!/usr/bin/env python
"""Road Anomaly (Lis et al., ICCV 2019; 60 images) -> $ROOT/road_anomaly/test.

    python datasets/prepare_road_anomaly.py --source $DETECTRON2_DATASETS/road_anomaly/RoadAnomaly_jpg

Input as published: the unzipped RoadAnomaly_jpg.zip (or RoadAnomaly.zip, webp
frames) from https://www.epfl.ch/labs/cvlab/data/road-anomaly/: frame_list.json,
frames/<name>.<ext> and frames/<name>.labels/labels_semantic.png. Labels become
1 for the anomaly class (2) and 0 for everything else (the set has no void).
Registered name: road_anomaly (evaluator_type "anomaly").
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.anomaly import prepare_road_anomaly  # noqa: E402
from gmmseg_d2.data.datasets.common import prepare_argument_parser  # noqa: E402
from gmmseg_d2.data.datasets.common import datasets_root  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__)
    parser.add_argument("--source", default=None,
                        help="unzipped RoadAnomaly_jpg folder (default: ROOT/road_anomaly/RoadAnomaly_jpg)")
    args = parser.parse_args(argv)
    root = args.root if args.root is not None else datasets_root()
    source = args.source or os.path.join(root, "road_anomaly", "RoadAnomaly_jpg")
    out = prepare_road_anomaly(source, root, num_workers=args.num_workers)
    print(f"Road Anomaly written to {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
