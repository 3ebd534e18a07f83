#!/usr/bin/env python
"""Generate the embedded mosaic dataset (texture mosaics from scikit-image photos).

    python datasets/prepare_mosaic.py                      # -> $DETECTRON2_DATASETS/mosaic or ./datasets/mosaic
    python datasets/prepare_mosaic.py --root /data --seed 1 --num-train 500

Deterministic: the same arguments give byte-identical files. By default an
existing complete dataset with the same parameters is kept; `--force` rewrites it.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.mosaic import (  # noqa: E402
    MOSAIC_CLASSES,
    MosaicParams,
    ensure_mosaic_dataset,
    generate_mosaic_dataset,
    is_mosaic_complete,
    mosaic_dir,
    read_manifest,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--num-train", type=int, default=2000)
    parser.add_argument("--num-val", type=int, default=200)
    parser.add_argument("--num-anomaly", type=int, default=100)
    parser.add_argument("--image-size", type=int, default=128)
    parser.add_argument("--num-workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    options = dict(
        num_train=args.num_train,
        num_val=args.num_val,
        num_anomaly=args.num_anomaly,
        image_size=args.image_size,
        seed=args.seed,
        num_workers=args.num_workers,
    )
    params = MosaicParams(**{k: v for k, v in options.items() if k != "num_workers"})
    kept = not args.force and is_mosaic_complete(mosaic_dir(args.root), params)
    start = time.perf_counter()
    if args.force:
        dataset_dir = generate_mosaic_dataset(args.root, **options)
    else:
        dataset_dir = ensure_mosaic_dataset(args.root, **options)
    seconds = time.perf_counter() - start
    manifest = read_manifest(dataset_dir) or {}
    counts = {split: len(names) for split, names in manifest.get("files", {}).items()}
    print(f"mosaic dataset at {os.path.abspath(dataset_dir)}")
    print(f"  splits: {counts}  classes ({len(MOSAIC_CLASSES)}): {', '.join(MOSAIC_CLASSES)}")
    print(f"  digest: {manifest.get('digest')}")
    if kept:
        print("  already complete with these parameters: kept as is (--force rewrites it)")
    else:
        print(f"  generated in {seconds:.1f} s")
    if args.root is not None:
        print(f"  use it with: export DETECTRON2_DATASETS={os.path.abspath(args.root)}")


if __name__ == "__main__":
    main()
