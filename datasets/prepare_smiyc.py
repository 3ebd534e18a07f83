#!/usr/bin/env python
"""SegmentMeIfYouCan validation sets -> $ROOT/segment_me_if_you_can/road_{anomaly,obstacle}21_val.

    python datasets/prepare_smiyc.py                     # both tracks, default input folders
    python datasets/prepare_smiyc.py --track anomaly --source /data/dataset_AnomalyTrack

Inputs as published (https://segmentmeifyoucan.com): the unzipped
dataset_AnomalyTrack (RoadAnomaly21) and dataset_ObstacleTrack (RoadObstacle21)
folders, images/ and labels_masks/<frame>_labels_semantic.png (0 / 1 / 255,
public for the validation frames only). Keeps the benchmark's validation
splits: 10 RoadAnomaly21 frames, 30 RoadObstacle21 frames.
Registered names: smiyc_road_anomaly21_val, smiyc_road_obstacle21_val.
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.anomaly import prepare_smiyc  # noqa: E402
from gmmseg_d2.data.datasets.common import datasets_root, prepare_argument_parser  # noqa: E402

TRACK_FOLDERS = {"anomaly": "dataset_AnomalyTrack", "obstacle": "dataset_ObstacleTrack"}


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__)
    parser.add_argument("--track", choices=["anomaly", "obstacle", "both"], default="both")
    parser.add_argument("--source", default=None, help="the track's unzipped folder (only with one --track; "
                        "default: ROOT/segment_me_if_you_can/dataset_{Anomaly,Obstacle}Track)")
    args = parser.parse_args(argv)
    if args.source and args.track == "both":
        parser.error("--source needs --track anomaly or --track obstacle")
    root = args.root if args.root is not None else datasets_root()
    tracks = ["anomaly", "obstacle"] if args.track == "both" else [args.track]
    for track in tracks:
        source = args.source or os.path.join(root, "segment_me_if_you_can", TRACK_FOLDERS[track])
        out = prepare_smiyc(track, source, root, num_workers=args.num_workers)
        print(f"SegmentMeIfYouCan {track} track validation written to {os.path.abspath(out)}")


if __name__ == "__main__":
    main()
