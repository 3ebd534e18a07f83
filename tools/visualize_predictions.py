#!/usr/bin/env python
"""Write one picture of a model's predictions: image | ground truth | prediction | anomaly.

    python tools/visualize_predictions.py --config-file CFG --output out.png \
        MODEL.WEIGHTS output/.../model_final.pth

Rows come from the config's first ``DATASETS.TEST`` entry with
``evaluator_type == "sem_seg"`` and from the first ``"anomaly"`` one (whose
ground-truth column shows anomalies in red and void in grey).
"""
import argparse
import warnings

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

import cv2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

from detectron2.data import MetadataCatalog  # noqa: E402
from detectron2.data import detection_utils as utils  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402

import gmmseg_d2  # noqa: E402,F401
from gmmseg_d2.engine import AtomicDetectionCheckpointer, Trainer, setup_cfg  # noqa: E402


def colorize(label: np.ndarray, colors) -> np.ndarray:
    """``(H, W)`` class ids → ``(H, W, 3)`` RGB; ids without a colour are black."""
    palette = np.zeros((256, 3), dtype=np.uint8)
    palette[: len(colors)] = np.asarray(colors, dtype=np.uint8)
    return palette[label]


def heatmap(score: np.ndarray) -> np.ndarray:
    """Anomaly score ``(H, W)`` → RGB heatmap, min-max scaled per image."""
    lo, hi = float(score.min()), float(score.max())
    scaled = np.zeros_like(score) if hi <= lo else (score - lo) / (hi - lo)
    bgr = cv2.applyColorMap((scaled * 255).astype(np.uint8), cv2.COLORMAP_INFERNO)
    return bgr[:, :, ::-1]


def anomaly_ground_truth(label: np.ndarray) -> np.ndarray:
    out = np.zeros(label.shape + (3,), dtype=np.uint8)
    out[label == 1] = (220, 30, 30)
    out[label == 255] = (128, 128, 128)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--config-file", required=True)
    parser.add_argument("--output", required=True, help="PNG file to write")
    parser.add_argument("--num-rows", type=int, default=3, help="rows per dataset")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE config overrides")
    args = parser.parse_args()
    setup_logger(name="gmmseg_d2")
    cfg = setup_cfg(args, default_setup_logging=False)

    model = Trainer.build_model(cfg)
    AtomicDetectionCheckpointer(model).load(cfg.MODEL.WEIGHTS)
    model.eval()
    stuff_colors = MetadataCatalog.get(cfg.DATASETS.TRAIN[0]).stuff_colors

    rows = []
    for kind in ("sem_seg", "anomaly"):
        names = [n for n in cfg.DATASETS.TEST if MetadataCatalog.get(n).get("evaluator_type") == kind]
        if not names:
            continue
        loader = Trainer.build_test_loader(cfg, names[0])
        for index, inputs in enumerate(loader):
            if index >= args.num_rows:
                break
            with torch.no_grad():
                output = model(inputs)[0]
            record = inputs[0]
            image = utils.read_image(record["file_name"], format="RGB")
            label = utils.read_image(record["sem_seg_file_name"], "L").squeeze(2)
            prediction = output["sem_seg"].argmax(dim=0).cpu().numpy().astype(np.uint8)
            gt = colorize(label, stuff_colors) if kind == "sem_seg" else anomaly_ground_truth(label)
            rows.append(np.concatenate([image, gt, colorize(prediction, stuff_colors),
                                        heatmap(output["anomaly_score"].cpu().numpy())], axis=1))
    if not rows:
        raise ValueError("DATASETS.TEST has no 'sem_seg' or 'anomaly' dataset to visualize")
    width = max(r.shape[1] for r in rows)
    rows = [np.pad(r, ((0, 0), (0, width - r.shape[1]), (0, 0))) for r in rows]
    header = np.full((24, width, 3), 255, dtype=np.uint8)
    tile = width // 4
    for column, title in enumerate(["image", "ground truth", "prediction", "anomaly score"]):
        cv2.putText(header, title, (column * tile + 4, 17), cv2.FONT_HERSHEY_SIMPLEX, 0.45,
                    (0, 0, 0), 1, cv2.LINE_AA)
    picture = np.concatenate([header] + rows, axis=0)
    cv2.imwrite(args.output, picture[:, :, ::-1])
    print(f"Wrote {args.output}")


if __name__ == "__main__":
    main()
