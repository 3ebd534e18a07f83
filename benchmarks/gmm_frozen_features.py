#!/usr/bin/env python
"""Diagnostic: softmax vs GMM classifiers trained on *frozen* features.

Why: on the mosaic's 300-iteration schedule the GMM per-pixel model trails the
softmax one (BENCHMARKS.md). That gap mixes two things: how well each
classifier can separate a given feature space, and how fast the backbone
learns through it. This script removes the second: it takes a trained
per-pixel model, freezes everything up to the classifier, extracts the head's
final feature map on the mosaic's train and val images (labels nearest-resized
to the feature grid), and trains fresh classifiers on those fixed features:

* ``linear``          a linear softmax classifier (what the softmax model has);
* ``gmm``             the GMM classifier as configured (class LayerNorm, "max");
* ``gmm_no_class_ln`` the same with the LayerNorm over class scores removed
                      (logits = class log-likelihoods), to measure what that
                      normalisation costs when there are only C = 8 classes;
* ``gmm_estep_all``   the GMM with ``E_STEP_SAMPLES = "all"``.

It reports the training CE and val pixel accuracy / mIoU (at feature
resolution) after several step counts.

    python benchmarks/gmm_frozen_features.py \
        --run-dir output/benchmarks/mosaic/fcn_R18_softmax_seed0 --steps 1500
"""
import argparse
import json
import os
import sys
import time
from typing import Dict, List, Tuple

import torch
import torch.nn.functional as F
from torch import nn

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO_ROOT)

from detectron2.checkpoint import DetectionCheckpointer  # noqa: E402
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.modeling import build_model  # noqa: E402
from einops import rearrange  # noqa: E402

import gmmseg_d2  # noqa: E402,F401  (registers the datasets and models)
from gmmseg_d2.config import add_gmmseg_config  # noqa: E402
from gmmseg_d2.modeling.gmm import GaussianMixtureClassifier  # noqa: E402
from gmmseg_d2.utils import read_label_map  # noqa: E402
from detectron2.data.detection_utils import read_image  # noqa: E402


def extract_features(model, cfg, dataset: str, limit: int) -> Tuple[torch.Tensor, torch.Tensor]:
    """``(N, C_feat)`` head features and ``(N,)`` labels of every feature-grid cell."""
    records = DatasetCatalog.get(dataset)[:limit]
    features, labels = [], []
    mean = torch.tensor(cfg.MODEL.PIXEL_MEAN).view(3, 1, 1)
    std = torch.tensor(cfg.MODEL.PIXEL_STD).view(3, 1, 1)
    with torch.no_grad():
        for start in range(0, len(records), 32):
            chunk = records[start:start + 32]
            images = torch.stack([
                torch.from_numpy(read_image(r["file_name"], format=cfg.INPUT.FORMAT).copy()).permute(2, 0, 1).float()
                for r in chunk])
            feature_map = model.sem_seg_head.layers(model.backbone((images - mean) / std))
            label_maps = torch.stack([torch.from_numpy(read_label_map(r["sem_seg_file_name"]).astype("int64"))
                                      for r in chunk])
            small = F.interpolate(label_maps[:, None].float(), size=feature_map.shape[-2:], mode="nearest")[:, 0]
            features.append(rearrange(feature_map, "b c h w -> (b h w) c"))
            labels.append(small.long().flatten())
    return torch.cat(features), torch.cat(labels)


def evaluate(logits: torch.Tensor, labels: torch.Tensor, num_classes: int) -> Dict[str, float]:
    valid = labels != 255
    predictions, labels = logits.argmax(dim=1)[valid], labels[valid]
    confusion = torch.bincount(labels * num_classes + predictions, minlength=num_classes ** 2)
    confusion = confusion.view(num_classes, num_classes).double()
    iou = confusion.diag() / (confusion.sum(0) + confusion.sum(1) - confusion.diag()).clamp_min(1)
    return {"pACC": 100 * float(confusion.diag().sum() / confusion.sum()), "mIoU": 100 * float(iou.mean())}


def build_classifier(kind: str, cfg, in_channels: int, num_classes: int) -> nn.Module:
    if kind == "linear":
        return nn.Linear(in_channels, num_classes)
    kwargs = GaussianMixtureClassifier.from_config(cfg, in_channels=in_channels, num_classes=num_classes)
    if kind == "gmm_estep_all":
        kwargs["estep_samples"] = "all"
    classifier = GaussianMixtureClassifier(**kwargs)
    if kind == "gmm_no_class_ln":
        classifier.class_norm = nn.Identity()
    return classifier


def train_classifier(kind: str, cfg, train: Tuple[torch.Tensor, torch.Tensor],
                     val: Tuple[torch.Tensor, torch.Tensor], steps: int, report_at: List[int],
                     batch_size: int, lr: float, seed: int) -> List[Dict]:
    torch.manual_seed(seed)
    features, labels = train
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES
    classifier = build_classifier(kind, cfg, features.shape[1], num_classes)
    optimizer = torch.optim.Adam(classifier.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    rows, recent_losses, started = [], [], time.perf_counter()
    for step in range(1, steps + 1):
        classifier.train()
        batch = torch.randint(0, len(features), (batch_size,), generator=generator)
        x, y = features[batch], labels[batch]
        if isinstance(classifier, GaussianMixtureClassifier):
            output = classifier(x)
            loss = F.cross_entropy(output.class_logits, y, ignore_index=255)
            total = loss + classifier.em_step(output, y)
        else:
            loss = total = F.cross_entropy(classifier(x), y, ignore_index=255)
        optimizer.zero_grad()
        total.backward()
        optimizer.step()
        recent_losses.append(loss.item())
        if step in report_at:
            classifier.eval()
            with torch.no_grad():
                logits = classifier(val[0])
                logits = logits.class_logits if isinstance(classifier, GaussianMixtureClassifier) else logits
            window = recent_losses[-50:]
            rows.append({"classifier": kind, "step": step, "train_CE": sum(window) / len(window),
                         **evaluate(logits, val[1], num_classes),
                         "seconds": time.perf_counter() - started})
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--run-dir", required=True, help="a per-pixel training output (config.yaml, model_final.pth)")
    parser.add_argument("--classifiers", nargs="+", default=["linear", "gmm", "gmm_no_class_ln", "gmm_estep_all"])
    parser.add_argument("--steps", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=4096)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--train-images", type=int, default=400)
    parser.add_argument("--val-images", type=int, default=200)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", default=None, help="JSON file for the rows (default: RUN_DIR/frozen_features.json)")
    args = parser.parse_args()

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(os.path.join(args.run_dir, "config.yaml"))
    cfg.MODEL.DEVICE = "cpu"
    # The GMM classifiers trained here get the GMM settings of the mosaic GMM
    # configs (the run may be a softmax one).
    cfg.merge_from_list(["MODEL.GMM.MEAN_MOMENTUM", "0.9", "MODEL.GMM.MEMORY_SIZE", "2000"])
    model = build_model(cfg).eval()
    DetectionCheckpointer(model).load(os.path.join(args.run_dir, "model_final.pth"))
    train = extract_features(model, cfg, cfg.DATASETS.TRAIN[0], args.train_images)
    val = extract_features(model, cfg, cfg.DATASETS.TEST[0], args.val_images)
    print(f"features: train {tuple(train[0].shape)}, val {tuple(val[0].shape)}", flush=True)

    report_at = sorted({s for s in (100, 300, 1000, args.steps) if s <= args.steps})
    rows = []
    for kind in args.classifiers:
        rows += train_classifier(kind, cfg, train, val, args.steps, report_at, args.batch_size, args.lr, args.seed)
    output = args.output or os.path.join(args.run_dir, "frozen_features.json")
    with open(output, "w") as f:
        json.dump({"run_dir": args.run_dir, "args": vars(args), "rows": rows}, f, indent=1)
    print(f"wrote {output}")


if __name__ == "__main__":
    main()
