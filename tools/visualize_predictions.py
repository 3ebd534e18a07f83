#!/usr/bin/env python
"""Write one picture of a model's predictions: image | ground truth | prediction | anomaly.

    python tools/visualize_predictions.py --config-file CFG --output out.png \
        MODEL.WEIGHTS output/.../model_final.pth

Rows come from the config's first ``DATASETS.TEST`` entry with
``evaluator_type == "sem_seg"`` and from the first ``"anomaly"`` one (whose
ground-truth column shows anomalies in red and void in grey). Each row is
labelled with its dataset and file; a legend names the classes shown.

Every row's anomaly map uses ONE colour range, shown by the colour bar, so
that rows can be compared: ``--anomaly-range LO HI``, or by default
percentiles 1 and 99 of all rows' scores pooled. To run a model on your own
images, use ``demo/demo.py``.
"""
import argparse
import os
import warnings

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import gmmseg_d2  # noqa: E402,F401
from gmmseg_d2.engine import AtomicDetectionCheckpointer, Trainer, check_model_weights, setup_cfg  # noqa: E402
from gmmseg_d2.utils.visualization import (  # noqa: E402
    DEFAULT_ANOMALY_PERCENTILES, anomaly_range_from_scores, colorize_anomaly, colorize_labels, draw_colorbar,
    draw_label_column, draw_legend, draw_titles, imwrite_rgb, legend_entries, pad_to_width,
    segmentation_metadata,
)

#: Colours of the anomaly datasets' ground truth (label 1 = anomaly, 255 = void).
ANOMALY_GT_COLORS = {"anomaly": (220, 30, 30), "void": (128, 128, 128)}
#: Rows lower than this are enlarged by an integer factor, so that the
#: 64x64 texture images are legible next to the text.
MIN_ROW_HEIGHT = 128
LABEL_COLUMN_WIDTH = 170
COLUMNS = ["image", "ground truth", "prediction", "anomaly score"]


def anomaly_ground_truth(label: np.ndarray) -> np.ndarray:
    """Anomaly label ``(H, W)`` (0 / 1 / 255) → RGB: anomaly red, void grey, the rest black."""
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    out[label == 1] = ANOMALY_GT_COLORS["anomaly"]
    out[label == 255] = ANOMALY_GT_COLORS["void"]
    return out


def _enlarge(tile: np.ndarray, scale: int) -> np.ndarray:
    return tile if scale == 1 else cv2.resize(tile, None, fx=scale, fy=scale, interpolation=cv2.INTER_NEAREST)


def predict_rows(cfg, model, num_rows: int):
    """Up to ``num_rows`` predictions of each of the first sem_seg and anomaly test datasets.

    Returns a list of dicts: ``kind``, ``dataset``, ``file_name``, ``image``
    ``(H, W, 3)`` RGB, ``label`` ``(H, W)``, ``prediction`` ``(H, W)`` class
    ids and ``anomaly`` ``(H, W)`` float scores.
    """
    rows = []
    for kind in ("sem_seg", "anomaly"):
        names = [n for n in cfg.DATASETS.TEST if MetadataCatalog.get(n).get("evaluator_type") == kind]
        if not names:
            continue
        loader = Trainer.build_test_loader(cfg, names[0])
        for index, inputs in enumerate(loader):
            if index >= num_rows:
                break
            with torch.no_grad():
                output = model(inputs)[0]
            record = inputs[0]
            rows.append(dict(
                kind=kind, dataset=names[0], file_name=record["file_name"],
                image=utils.read_image(record["file_name"], format="RGB"),
                label=utils.read_image(record["sem_seg_file_name"], "L").squeeze(2),
                prediction=output["sem_seg"].argmax(dim=0).cpu().numpy().astype(np.uint8),
                anomaly=output["anomaly_score"].float().cpu().numpy()))
    return rows


def render_rows(rows, metadata, anomaly_range) -> np.ndarray:
    """The picture (RGB): titles, one labelled row per prediction, colour bar, legend.

    Args:
        rows: from :func:`predict_rows`.
        metadata: class names and colours (:func:`segmentation_metadata`).
        anomaly_range: ``(lo, hi)``, the one colour range of every row's anomaly map.
    """
    lo, hi = anomaly_range
    height = max(r["image"].shape[0] for r in rows)
    scale = max(1, -(-MIN_ROW_HEIGHT // height))
    tiles = []
    for row in rows:
        gt = (colorize_labels(row["label"], metadata.stuff_colors) if row["kind"] == "sem_seg"
              else anomaly_ground_truth(row["label"]))
        parts = [row["image"], gt, colorize_labels(row["prediction"], metadata.stuff_colors),
                 colorize_anomaly(row["anomaly"], lo, hi)]
        tiles.append([_enlarge(p, scale) for p in parts])
    tile_w = max(t.shape[1] for row in tiles for t in row)
    body = []
    for row, parts in zip(rows, tiles):
        row_h = max(p.shape[0] for p in parts)
        parts = [np.pad(pad_to_width(p, tile_w), ((0, row_h - p.shape[0]), (0, 0), (0, 0)), constant_values=255)
                 for p in parts]
        label = draw_label_column([row["dataset"], os.path.basename(row["file_name"])], row_h, LABEL_COLUMN_WIDTH)
        body.append(np.concatenate([label] + parts, axis=1))
    body = np.concatenate(body, axis=0)
    colorbar = draw_colorbar(body.shape[0], lo, hi)
    body = np.concatenate([body, colorbar], axis=1)
    # The range itself is on the colour bar; the column is too narrow for it.
    titles = draw_titles(["", *COLUMNS, ""], [LABEL_COLUMN_WIDTH] + [tile_w] * 4 + [colorbar.shape[1]])
    shown = np.concatenate([np.concatenate([r["prediction"].ravel(), r["label"].ravel()]) if r["kind"] == "sem_seg"
                            else r["prediction"].ravel() for r in rows])
    entries = legend_entries(shown, metadata)
    if any(r["kind"] == "anomaly" for r in rows):
        entries += [(f"GT: {name}", color) for name, color in ANOMALY_GT_COLORS.items()]
    return np.concatenate([titles, body, draw_legend(entries, body.shape[1])], axis=0)


def main(argv=None) -> np.ndarray:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--num-rows", type=int, default=3, help="rows per dataset")
    parser.add_argument("--anomaly-range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="one colour range for every row's anomaly map (default: percentiles "
                             f"{DEFAULT_ANOMALY_PERCENTILES[0]:g} and {DEFAULT_ANOMALY_PERCENTILES[1]:g} "
                             "of all rows' scores pooled)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even when MODEL.WEIGHTS is empty (an untrained model)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args(argv)
    setup_logger(name="gmmseg_d2")
    cfg = setup_cfg(args, default_setup_logging=False)
    try:
        check_model_weights(cfg.MODEL.WEIGHTS, allow_random_weights=args.allow_random_weights)
    except (ValueError, FileNotFoundError) as e:
        # The hint for this tool: overrides are positional here, not after --opts.
        parser.error(str(e).replace("`--opts MODEL.WEIGHTS", "`MODEL.WEIGHTS"))
    if args.anomaly_range and not args.anomaly_range[1] > args.anomaly_range[0]:
        parser.error(f"--anomaly-range LO HI needs LO < HI, got {args.anomaly_range}")

    model = Trainer.build_model(cfg)
    AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    rows = predict_rows(cfg, model, args.num_rows)
    if not rows:
        raise ValueError("DATASETS.TEST has no 'sem_seg' or 'anomaly' dataset to visualize")
    anomaly_range = (tuple(args.anomaly_range) if args.anomaly_range
                     else anomaly_range_from_scores([r["anomaly"] for r in rows]))
    metadata = segmentation_metadata(cfg.DATASETS.TRAIN[0] if len(cfg.DATASETS.TRAIN) else None,
                                     int(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES))
    picture = render_rows(rows, metadata, anomaly_range)
    imwrite_rgb(args.output, picture)
    print(f"Wrote {args.output} ({len(rows)} rows; anomaly colour range "
          f"[{anomaly_range[0]:.6g}, {anomaly_range[1]:.6g}])")
    return picture


if __name__ == "__main__":
    main()
