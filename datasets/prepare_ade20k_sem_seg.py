#!/usr/bin/env python
"""ADE20K-150: write annotations_detectron2/ (0 -> 255, k -> k - 1) from annotations/.

    python datasets/prepare_ade20k_sem_seg.py               # $DETECTRON2_DATASETS/ADEChallengeData2016
    python datasets/prepare_ade20k_sem_seg.py --root /data  # /data/ADEChallengeData2016

Expects ADEChallengeData2016.zip (http://sceneparsing.csail.mit.edu/) unzipped
under the root. Outputs are written atomically; a second run completes an
interrupted one and otherwise keeps the existing files (`--force` rewrites).
Registers nothing: `import gmmseg_d2` does (ade20k_sem_seg_train/_val).
"""
from __future__ import annotations

import os
import sys
from typing import List, Optional

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.ade20k import ade20k_dir, prepare_ade20k_sem_seg  # noqa: E402
from gmmseg_d2.data.datasets.common import prepare_argument_parser  # noqa: E402


def main(argv: Optional[List[str]] = None) -> None:
    parser = prepare_argument_parser(__doc__, force=True)
    args = parser.parse_args(argv)
    written = prepare_ade20k_sem_seg(args.root, force=args.force, num_workers=args.num_workers)
    print(f"ADE20K-150 at {os.path.abspath(ade20k_dir(args.root))}: label files written per split {written}")


if __name__ == "__main__":
    main()
