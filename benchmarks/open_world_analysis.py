#!/usr/bin/env python
"""Why does (or doesn't) the GMM density flag anomalies? Diagnostics of trained texture models.

For checkpoints trained by ``benchmarks/open_world.py`` (per-pixel models) this
measures, on ``textures_*_val`` (settings are chosen on val, never on test):

* per anomaly texture (which near-OOD held-out band, which far-OOD family):
  AUROC of each score against the split's in-distribution pixels, region
  interiors only — which kinds of novelty a score can see at all;
* GMM checkpoints only, at the feature resolution:
  - ``gaussian_on_gmm_embedding``: a full-covariance Gaussian per class fitted
    post hoc on the GMM's own embeddings, scored like the others;
  - embedding geometry: mean cosine of a pixel's embedding to the nearest
    component mean of its own class (spread) vs the largest cosine between
    component means of different classes (separation);
  - where anomaly pixels land: the class they are assigned to, and their
    ``max_c log p(x|c)`` against in-distribution pixels' (quantiles);
  - the stds: median and the fraction of dimensions at the floor
    ``sqrt(VARIANCE_FLOOR)`` (within 1 %).

    python benchmarks/open_world_analysis.py output/benchmarks/open_world/fcn_R18_gmm_seed0 \
        output/benchmarks/open_world/fcn_R18_softmax_seed0 --json out.json

Each argument is a training output folder holding ``config.yaml`` and
``model_final.pth``.
"""
from __future__ import annotations

import argparse
import json
import os
import re
import sys
from typing import Dict, List

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import open_world  # noqa: E402

SPLITS = ("near_val", "far_val")
SCORES = ("density", "density_lse", "msp", "max_logit", "energy", "gaussian_per_class", "gaussian_shared",
          "gaussian_on_gmm_embedding")


def _texture_of_pixels(record: Dict, params) -> "np.ndarray":
    """``(H, W)`` object array: the texture name of every pixel's region."""
    import numpy as np

    from gmmseg_d2.data.datasets.textures import scene_textures

    match = re.search(r"textures_(anomaly_\w+?)_(\d+)\.png$", os.path.basename(record["file_name"]))
    split, index = match.group(1), int(match.group(2))
    names = np.array([spec.name for spec in scene_textures(params, split, index)], dtype=object)
    return names[open_world.read_png(record["region_file_name"])]


def analyse(run_dir: str, border: int, num_fit_images: int) -> Dict:
    import numpy as np
    import torch
    import torch.nn.functional as F
    from detectron2.checkpoint import DetectionCheckpointer
    from detectron2.data import DatasetCatalog

    import gmmseg_d2  # noqa: F401
    from gmmseg_d2.data.datasets.textures import (
        FAR_OOD_TEXTURES, NEAR_OOD_TEXTURES, TexturesParams, read_textures_manifest,
    )
    from gmmseg_d2.engine import Trainer, setup_cfg
    from gmmseg_d2.evaluation import anomaly_metrics

    args = argparse.Namespace(config_file=os.path.join(run_dir, "config.yaml"), opts=[])
    cfg = setup_cfg(args, default_setup_logging=False)
    if cfg.MODEL.META_ARCHITECTURE == "MaskFormer":
        raise ValueError(f"{run_dir}: the analysis covers the per-pixel models")
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(os.path.join(run_dir, "model_final.pth"))
    model.eval()
    scorer = open_world.Scorer(cfg, model)

    def records(name: str, limit=None) -> List[Dict]:
        return open_world.records_with_images(name, cfg.INPUT.FORMAT, limit)

    open_world.fit_posthoc_gaussians(scorer, records(open_world.TRAIN_SEM_SEG, num_fit_images),
                                     cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES)
    embedding_gaussian = None
    if scorer.is_gmm:
        # The control the GMM itself suggests: one full-covariance Gaussian per
        # class fitted post hoc on the GMM's own embeddings (unit sphere, 64-d),
        # i.e. the same space without the diagonal, floored, 5-component model.
        from gmmseg_d2.modeling.class_gaussian import ClassConditionalGaussian

        embedding_gaussian = ClassConditionalGaussian(cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES, cfg.MODEL.GMM.EMBED_DIM,
                                                      "per_class")
        for record in records(open_world.TRAIN_SEM_SEG, num_fit_images):
            scorer.features(record)
            embeddings = scorer.captured["predictor_output"].embeddings[0]  # (h, w, D)
            h, w = embeddings.shape[:2]
            labels = torch.from_numpy(open_world.read_png(record["sem_seg_file_name"]).astype("int64"))
            labels = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
            embedding_gaussian.accumulate(embeddings.reshape(h * w, -1), labels.flatten())
        embedding_gaussian.fit()
    dataset_dir = os.path.dirname(os.path.dirname(os.path.dirname(DatasetCatalog.get("textures_anomaly_near_val")[0]
                                                                   ["file_name"])))
    params = TexturesParams(**read_textures_manifest(dataset_dir)["params"])
    held_out = {spec.name: "+".join(spec.held_out) for spec in NEAR_OOD_TEXTURES}
    held_out.update({spec.name: f"far:{spec.family}" for spec in FAR_OOD_TEXTURES})
    classifier = model.sem_seg_head.predictor
    is_gmm = scorer.is_gmm
    result: Dict = {"run": run_dir, "by_texture": {}, "by_kind": {}}
    geometry = {"own_cosine": [], "class": [], "split_loglik": {}, "assigned": {}}
    for split in SPLITS:
        scores: Dict[str, List] = {}
        textures, labels, bands = [], [], []
        for record in records(f"textures_anomaly_{split}"):
            _, maps = scorer(record)
            if embedding_gaussian is not None:
                embeddings = scorer.captured["predictor_output"].embeddings[0]
                h, w = embeddings.shape[:2]
                stride = model.sem_seg_head.output_stride
                score = embedding_gaussian.anomaly_score(embeddings.reshape(h * w, -1)).view(h, w).float()
                maps["gaussian_on_gmm_embedding"] = scorer._to_image(score, (h * stride, w * stride),
                                                                     (record["height"], record["width"]))
            for name in SCORES:
                if name in maps:
                    scores.setdefault(name, []).append(maps[name].numpy().reshape(-1))
            textures.append(_texture_of_pixels(record, params).reshape(-1))
            labels.append(open_world.read_png(record["sem_seg_file_name"]).reshape(-1))
            bands.append(open_world.border_band(open_world.read_png(record["region_file_name"]), border).reshape(-1))
            if is_gmm:
                out = scorer.captured["predictor_output"]
                h, w = out.class_log_likelihood.shape[1:3]
                class_map = torch.from_numpy(open_world.read_png(record["class_file_name"]).astype("int64"))
                small = F.interpolate(class_map[None, None].float(), size=(h, w), mode="nearest")[0, 0].long()
                loglik = out.class_log_likelihood[0].reshape(h * w, -1)
                flat = small.reshape(-1)
                geometry["split_loglik"].setdefault(split, {"inlier": [], "anomaly": []})
                geometry["split_loglik"][split]["inlier"].append(loglik.amax(1)[flat != 255].numpy())
                geometry["split_loglik"][split]["anomaly"].append(loglik.amax(1)[flat == 255].numpy())
                geometry["assigned"].setdefault(split, []).append(loglik.argmax(1)[flat == 255].numpy())
                embeddings = out.embeddings[0].reshape(h * w, -1)[flat != 255]
                own = classifier.means[flat[flat != 255]]  # (n, M, D)
                geometry["own_cosine"].append(torch.einsum("nd,nmd->nm", embeddings, own).amax(1).numpy())
                geometry["class"].append(flat[flat != 255].numpy())
        texture = np.concatenate(textures)
        label = np.concatenate(labels)
        interior = ~np.concatenate(bands)
        inlier = interior & (label == 0)
        for name, chunks in scores.items():
            value = np.concatenate(chunks)
            keep = interior
            result.setdefault("pooled_interior_auroc", {}).setdefault(split, {})[name] = anomaly_metrics(
                value[keep], label[keep], ignore_label=None)["AUROC"]
            for kind in sorted(set(texture[label == 1])):
                pick = interior & (texture == kind) & (label == 1)
                keep = inlier | pick
                auroc = anomaly_metrics(value[keep], label[keep], ignore_label=None)["AUROC"]
                result["by_texture"].setdefault(kind, {"held_out": held_out[kind]})[name] = auroc
    for kind, row in result["by_texture"].items():
        bucket = result["by_kind"].setdefault(row["held_out"], {})
        for name, value in row.items():
            if name != "held_out":
                bucket.setdefault(name, []).append(value)
    result["by_kind"] = {kind: {name: float(np.mean(v)) for name, v in row.items()}
                         for kind, row in result["by_kind"].items()}
    if is_gmm:
        means = classifier.means  # (C, M, D), unit norm
        num_classes = means.shape[0]
        cosine = torch.einsum("cmd,knd->cmkn", means, means)
        other = ~torch.eye(num_classes, dtype=torch.bool)[:, None, :, None].expand_as(cosine)
        own_cosine = np.concatenate(geometry["own_cosine"])
        floor = float(np.sqrt(cfg.MODEL.GMM.VARIANCE_FLOOR))
        stds = classifier.stds.numpy()
        result["gmm"] = {
            "own_class_cosine_mean": float(own_cosine.mean()),
            "own_class_cosine_p10": float(np.quantile(own_cosine, 0.1)),
            "max_between_class_mean_cosine": float(cosine[other].max()),
            "mean_between_class_mean_cosine": float(cosine[other].mean()),
            "std_median": float(np.median(stds)),
            "std_fraction_at_floor": float((stds <= floor * 1.01).mean()),
            "loglik": {split: {part: [float(q) for q in np.quantile(np.concatenate(v), [0.05, 0.5, 0.95])]
                               for part, v in parts.items()}
                       for split, parts in geometry["split_loglik"].items()},
            "anomaly_assigned_class_share": {
                split: np.bincount(np.concatenate(v), minlength=num_classes).tolist()
                for split, v in geometry["assigned"].items()},
        }
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("runs", nargs="+")
    parser.add_argument("--border", type=int, default=3)
    parser.add_argument("--num-fit-images", type=int, default=500)
    parser.add_argument("--json", default=None)
    args = parser.parse_args()
    results = [analyse(run, args.border, args.num_fit_images) for run in args.runs]
    for result in results:
        print(f"\n## {result['run']}")
        names = [n for n in SCORES if any(n in row for row in result["by_kind"].values())]
        print("| novelty | " + " | ".join(names) + " |")
        print("|---|" + "---|" * len(names))
        for kind, row in sorted(result["by_kind"].items()):
            print(f"| {kind} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
        for split, row in result["pooled_interior_auroc"].items():
            print(f"| all of {split} | " + " | ".join(f"{row[n]:.1f}" for n in names) + " |")
        if "gmm" in result:
            print(json.dumps(result["gmm"], indent=1))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
