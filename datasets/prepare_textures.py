#!/usr/bin/env python
"""Generate the procedural "textures" open-world segmentation benchmark.

    python datasets/prepare_textures.py                       # -> $DETECTRON2_DATASETS/textures or ./datasets/textures
    python datasets/prepare_textures.py --root /data --num-train 4000 --size 64 --workers 2

Deterministic: the same arguments give byte-identical files, whatever
``--workers``. An existing complete dataset with the same parameters is kept
(``--force`` rewrites it). Prints the generation speed in images/s.
"""

from __future__ import annotations

import argparse
import os
import sys
import time

# Runnable from a checkout without `pip install -e .`.
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.data.datasets.textures import (  # noqa: E402
    TEXTURES_CLASSES,
    TEXTURES_SPLITS,
    TexturesParams,
    ensure_textures_dataset,
    generate_textures_dataset,
    is_textures_complete,
    read_textures_manifest,
    textures_dir,
)


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    defaults = TexturesParams()
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=None, help="datasets root (default: $DETECTRON2_DATASETS or ./datasets)")
    parser.add_argument("--num-train", type=int, default=defaults.num_train)
    parser.add_argument("--num-val", type=int, default=defaults.num_val)
    parser.add_argument("--num-test", type=int, default=defaults.num_test)
    parser.add_argument("--num-anomaly-val", type=int, default=defaults.num_anomaly_val,
                        help="images of each of anomaly_{near,far}_val")
    parser.add_argument("--num-anomaly-test", type=int, default=defaults.num_anomaly_test,
                        help="images of each of anomaly_{near,far}_test")
    parser.add_argument("--size", type=int, default=defaults.image_size, help="image side in pixels")
    parser.add_argument("--seed", type=int, default=defaults.seed)
    parser.add_argument("--workers", type=int, default=None, help="processes (default: all cores)")
    parser.add_argument("--force", action="store_true", help="regenerate even if a matching dataset exists")
    return parser.parse_args(argv)


def main(argv: list[str] | None = None) -> None:
    args = parse_args(argv)
    params = TexturesParams(
        num_train=args.num_train,
        num_val=args.num_val,
        num_test=args.num_test,
        num_anomaly_val=args.num_anomaly_val,
        num_anomaly_test=args.num_anomaly_test,
        image_size=args.size,
        seed=args.seed,
    )
    kept = not args.force and is_textures_complete(textures_dir(args.root), params)
    start = time.perf_counter()
    if args.force:
        dataset_dir = generate_textures_dataset(args.root, params, num_workers=args.workers)
    else:
        dataset_dir = ensure_textures_dataset(args.root, params, num_workers=args.workers)
    seconds = time.perf_counter() - start
    manifest = read_textures_manifest(dataset_dir) or {}
    counts = {split: len(manifest.get("files", {}).get(split, {})) for split in TEXTURES_SPLITS}
    print(f"textures dataset at {os.path.abspath(dataset_dir)}")
    print(f"  splits: {counts}")
    print(f"  classes ({len(TEXTURES_CLASSES)}): {', '.join(TEXTURES_CLASSES)}")
    print(f"  digest: {manifest.get('digest')}")
    if kept:
        print("  already complete with these parameters: kept as is (--force rewrites it)")
    else:
        total = sum(counts.values())
        print(f"  generated {total} images in {seconds:.1f} s: {total / max(seconds, 1e-9):.0f} images/s")
    if args.root is not None:
        print(f"  use it with: export DETECTRON2_DATASETS={os.path.abspath(args.root)}")


if __name__ == "__main__":
    main()
