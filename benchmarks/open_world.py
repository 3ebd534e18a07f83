#!/usr/bin/env python
"""Open-world evidence on the procedural texture benchmark: every score on the same checkpoint.

(Long on purpose: training, the one scoring pass over all scores and the
tables share the run records and must stay in step.)

For every (model, classifier, seed) this trains the model with
``tools/train_net.py`` (one schedule per architecture, shared by its softmax
and GMM variants; ``configs/textures/``), then loads the final checkpoint once
and computes, on the *same* predictions:

* closed-set accuracy on ``textures_sem_seg_test`` (mIoU, pixel accuracy);
* every applicable anomaly score on the near- and far-OOD splits:
  - softmax-style scores on the model's class logits (both classifiers):
    MSP, max logit, entropy, energy (per-pixel models) or MSP, max logit,
    entropy, RbA (Mask2Former);
  - the GMM head's own densities: ``density`` = ``-max_c log p(x|c)`` and
    ``density_lse`` = ``-logsumexp_c log p(x|c)`` (per-pixel); the prototype
    classifier's (projects/ProtoSeg) ``proto_cosine`` = the negative best
    cosine to any prototype; for Mask2Former the mask-level rules
    ``density_mask_avg`` / ``density_min`` / ``density_max`` on the
    classifier's per-query score (for prototypes: the negative best cosine);
  - the control: a class-conditional Gaussian fitted post hoc on the same
    model's pre-classifier features of the training split
    (``gaussian_shared``: pooled covariance = min-Mahalanobis ranking;
    ``gaussian_per_class``: one full covariance per class), at the feature
    resolution, upsampled like the GMM density. For Mask2Former the
    features are the pixel decoder's per-pixel mask features.
* AP / FPR95 / AUROC over all pixels, region-interior pixels, and pixels
  within ``--border`` px of a region boundary (from the generator's region map).

One raw JSON per run lands in ``--recorded`` (default
``benchmarks/recorded/open_world/``); runs already recorded are skipped, so
the command resumes where it stopped, and the tables (mean +- sd over seeds)
and the histogram figure are always rebuilt from all recorded JSONs::

    python benchmarks/open_world.py --seeds 0 1 2            # train + score what is missing
    python benchmarks/open_world.py --table-only             # rebuild tables/figure from JSONs

Settings are chosen on the ``*_val`` splits; the tables report ``*_test``.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import statistics
import subprocess
import sys
import time
from typing import Callable, Dict, Iterable, List, Optional, Tuple

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FAMILIES = ("fcn_R18", "deeplabv3plus_R18", "maskformer2_R18")
CLASSIFIERS = ("softmax", "gmm", "prototype")
#: Each classifier's own anomaly score, as the per-pixel tables name it.
CLASSIFIER_SCORES = {"gmm": "density", "prototype": "proto_cosine"}
#: The prototype classifier lives in a project (configs, train_net.py, package).
PROTOSEG_DIR = os.path.join("projects", "ProtoSeg")
#: Run names that are not ``<family>_<classifier>``: the GMM Mask2Former's
#: runs were recorded as gmmseg_maskformer2_R18_seed*, before its config
#: file took the common ``<family>_<classifier>.yaml`` pattern.
RUN_PREFIXES = {("maskformer2_R18", "gmm"): "gmmseg_maskformer2_R18"}
TEST_SEM_SEG = "textures_sem_seg_test"
TRAIN_SEM_SEG = "textures_sem_seg_train"
ANOMALY_SPLITS = ("near_val", "far_val", "near_test", "far_test")
REGIONS = ("all", "interior", "border")
#: Scores whose test histograms are kept in the JSON (for the figure).
HISTOGRAM_SCORES = ("density", "proto_cosine", "density_mask_avg", "msp", "gaussian_per_class")
HISTOGRAM_BINS = 60


def config_for(family: str, classifier: str) -> str:
    if classifier == "prototype":
        return os.path.join(PROTOSEG_DIR, "configs", "textures", f"{family}_proto.yaml")
    return os.path.join("configs", "textures", f"{family}_{classifier}.yaml")


def train_script(classifier: str) -> str:
    return os.path.join(PROTOSEG_DIR, "train_net.py") if classifier == "prototype" else "tools/train_net.py"


def extra_config(classifier: str):
    """The project's ``add_*_config`` (and its registration) for ``setup_cfg``."""
    if classifier != "prototype":
        return ()
    path = os.path.join(REPO_ROOT, PROTOSEG_DIR)
    if path not in sys.path:
        sys.path.insert(0, path)
    import protoseg

    return (protoseg.add_protoseg_config,)


def run_name(family: str, classifier: str, seed: int) -> str:
    return f"{RUN_PREFIXES.get((family, classifier), f'{family}_{classifier}')}_seed{seed}"


# --------------------------------------------------------------------- training


def train(config: str, seed: int, output_dir: str, extra_opts: List[str], script: str = "tools/train_net.py") -> float:
    """Train with ``script`` (tools/train_net.py or a project's); returns the wall-clock seconds."""
    os.makedirs(output_dir, exist_ok=True)
    command = [sys.executable, script, "--config-file", config,
               "SEED", str(seed), "OUTPUT_DIR", output_dir, *extra_opts]
    start = time.perf_counter()
    with open(os.path.join(output_dir, "train.log"), "w") as log:
        process = subprocess.run(command, cwd=REPO_ROOT, stdout=log, stderr=subprocess.STDOUT)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {output_dir}/train.log")
    return time.perf_counter() - start


def median_step_time(output_dir: str) -> float:
    with open(os.path.join(output_dir, "metrics.json")) as f:
        times = [json.loads(line)["time"] for line in f if '"time"' in line]
    return statistics.median(times) if times else float("nan")


# ---------------------------------------------------------------------- scoring


def border_band(regions, radius: int):
    """Boolean ``(H, W)``: pixels within ``radius`` px (Chebyshev) of a region boundary."""
    import cv2
    import numpy as np

    edge = np.zeros(regions.shape, dtype=np.uint8)
    edge[:, 1:] |= regions[:, 1:] != regions[:, :-1]
    edge[:, :-1] |= regions[:, 1:] != regions[:, :-1]
    edge[1:, :] |= regions[1:, :] != regions[:-1, :]
    edge[:-1, :] |= regions[1:, :] != regions[:-1, :]
    if radius > 1:
        edge = cv2.dilate(edge, np.ones((2 * radius - 1, 2 * radius - 1), np.uint8))
    return edge.astype(bool)


def read_png(path: str):
    """A label or region PNG as its stored integers (gmmseg_d2's one label reader)."""
    from gmmseg_d2.utils.io import read_label_map

    return read_label_map(path, dtype=None)


class Scorer:
    """Runs one trained model and returns every score map of each image.

    ``__call__(record) -> (sem_seg logits (K, H, W), {score name: (H, W)})``;
    ``features(record) -> ((N, D) pre-classifier features at feature
    resolution, (h, w))`` for fitting the post-hoc Gaussian.
    """

    def __init__(self, cfg, model) -> None:
        import torch

        self.cfg, self.model = cfg, model
        self.is_mask_classification = cfg.MODEL.META_ARCHITECTURE == "MaskFormer"
        self.captured: Dict[str, object] = {}
        if self.is_mask_classification:
            decoder = model.sem_seg_head.pixel_decoder
            original = decoder.forward_features

            def capture(features):
                outputs = original(features)
                self.captured["features"] = outputs[0]  # mask features (B, D, H/4, W/4)
                return outputs

            decoder.forward_features = capture
        else:
            def hook(module, inputs, output):
                self.captured["features"] = inputs[0]  # (B, C, h, w), whatever the classifier
                self.captured["predictor_output"] = output

            model.sem_seg_head.predictor.register_forward_hook(hook)
        self.classifier = cfg.MODEL.CLASSIFIER.NAME
        self.gaussians: Dict[str, object] = {}

    # -- feature extraction ------------------------------------------------

    def _forward(self, record: Dict):
        import torch

        with torch.no_grad():
            if self.is_mask_classification:
                images = self.model.preprocess_image([record])
                outputs = self.model.sem_seg_head(self.model.backbone(images.tensor))
                return outputs, images
            return self.model([record])[0], None

    def features(self, record: Dict):
        """``((h*w, D) features, (h, w))`` of one image."""
        self._forward(record)
        features = self.captured["features"][0]  # (D, h, w)
        return features.flatten(1).T, tuple(features.shape[1:])

    # -- scores --------------------------------------------------------------

    def _to_image(self, score_map, padded_size: Tuple[int, int], image_size: Tuple[int, int]):
        """``(h, w)`` map at feature resolution -> ``(H, W)``: bilinear to the padded
        input size, cropped to the image (as the models treat their logits)."""
        import torch.nn.functional as F

        up = F.interpolate(score_map[None, None].float(), size=padded_size, mode="bilinear", align_corners=False)
        return up[0, 0, :image_size[0], :image_size[1]]

    def _gaussian_scores(self, padded_size, image_size) -> Dict[str, object]:
        features = self.captured["features"][0]
        h, w = features.shape[1:]
        flat = features.flatten(1).T
        return {name: self._to_image(g.anomaly_score(flat).view(h, w).float(), padded_size, image_size)
                for name, g in self.gaussians.items()}

    def __call__(self, record: Dict):
        import torch
        import torch.nn.functional as F
        from detectron2.modeling.postprocessing import sem_seg_postprocess

        from gmmseg_d2.modeling.anomaly import (
            MASK_CLASSIFICATION_ANOMALY_SCORES, MASK_DENSITY_ANOMALY_SCORES, mask_classification_anomaly_score,
            mask_density_anomaly_score,
        )
        height, width = record["height"], record["width"]
        scores: Dict[str, torch.Tensor] = {}
        with torch.no_grad():
            if self.is_mask_classification:
                outputs, images = self._forward(record)
                padded = tuple(images.tensor.shape[-2:])
                image_size = images.image_sizes[0]
                if tuple(image_size) != (height, width):
                    raise ValueError("the benchmark expects test images at their original size")
                masks = F.interpolate(outputs["pred_masks"], size=padded, mode="bilinear", align_corners=False)[0]
                masks = sem_seg_postprocess(masks, image_size, height, width)
                class_logits = outputs["pred_logits"][0].float()
                mask_probs = masks.sigmoid()
                logits = torch.einsum("qc,qhw->chw", F.softmax(class_logits, dim=-1)[:, :-1], mask_probs)
                for method in MASK_CLASSIFICATION_ANOMALY_SCORES:
                    scores[method] = mask_classification_anomaly_score(class_logits, mask_probs, method)
                if self.classifier != "softmax":
                    # The mask-level rules on the classifier's per-query score
                    # (GMM: -max_c log p(e_q|c); prototypes: negative best cosine).
                    query_anomaly = self.model.query_anomaly_score(outputs)[0]
                    for method in MASK_DENSITY_ANOMALY_SCORES:
                        scores[method] = mask_density_anomaly_score(class_logits, query_anomaly, mask_probs, method)
                scores.update(self._gaussian_scores(padded, image_size))
            else:
                output = self._forward(record)[0]
                logits = output["sem_seg"].float()  # (K, H, W), the model's own logits at image size
                log_probs = F.log_softmax(logits, dim=0)
                scores["msp"] = -log_probs.exp().amax(dim=0)
                scores["max_logit"] = -logits.amax(dim=0)
                scores["entropy"] = -(log_probs.exp() * log_probs).sum(dim=0)
                scores["energy"] = -torch.logsumexp(logits, dim=0)
                features = self.captured["features"]
                stride = self.model.sem_seg_head.output_stride
                padded = (features.shape[2] * stride, features.shape[3] * stride)
                if logits.shape[-2:] != (height, width) or padded[0] < height or padded[1] < width:
                    raise ValueError("the benchmark expects test images at their original size")
                if self.classifier != "softmax":
                    scores[CLASSIFIER_SCORES[self.classifier]] = output["anomaly_score"].float()
                if self.classifier == "gmm":
                    gmm = self.captured["predictor_output"].details
                    lse = -torch.logsumexp(gmm.class_log_likelihood[0].float(), dim=-1)
                    scores["density_lse"] = self._to_image(lse, padded, (height, width))
                scores.update(self._gaussian_scores(padded, (height, width)))
        return logits, scores


def fit_posthoc_gaussians(scorer: Scorer, records: Iterable[Dict], num_classes: int) -> None:
    """Fit both post-hoc Gaussians on the training records' features (labels nearest-resized)."""
    import torch
    import torch.nn.functional as F

    from gmmseg_d2.modeling.class_gaussian import ClassConditionalGaussian

    gaussians = None
    for record in records:
        features, (h, w) = scorer.features(record)
        labels = torch.from_numpy(read_png(record["sem_seg_file_name"]).astype("int64"))
        labels = F.interpolate(labels[None, None].float(), size=(h, w), mode="nearest")[0, 0].long().flatten()
        if gaussians is None:
            gaussians = {f"gaussian_{kind}": ClassConditionalGaussian(num_classes, features.shape[1], kind)
                         for kind in ("shared", "per_class")}
        for gaussian in gaussians.values():
            gaussian.accumulate(features, labels)
    scorer.gaussians = {name: g.fit() for name, g in gaussians.items()}


def semantic_metrics(scorer: Scorer, records: Iterable[Dict], num_classes: int) -> Dict[str, float]:
    import numpy as np

    confusion = np.zeros((num_classes, num_classes), dtype=np.int64)
    for record in records:
        logits, _ = scorer(record)
        prediction = logits.argmax(dim=0).numpy().reshape(-1)
        truth = read_png(record["sem_seg_file_name"]).reshape(-1).astype(np.int64)
        keep = truth != 255
        confusion += np.bincount(truth[keep] * num_classes + prediction[keep],
                                 minlength=num_classes ** 2).reshape(num_classes, num_classes)
    intersection = np.diag(confusion).astype(float)
    union = confusion.sum(0) + confusion.sum(1) - intersection
    iou = np.where(union > 0, intersection / np.maximum(union, 1), np.nan)
    return {"mIoU": float(np.nanmean(iou) * 100), "pACC": float(intersection.sum() / confusion.sum() * 100),
            "IoU": [float(v * 100) for v in iou]}


def anomaly_results(scorer: Scorer, records: List[Dict], border: int, keep_histograms: bool) -> Dict:
    """``{score: {region: {AP, FPR95, AUROC}}}`` (+ ``"_histograms"``) for one anomaly split."""
    import numpy as np

    from gmmseg_d2.evaluation import anomaly_metrics

    collected: Dict[str, List[np.ndarray]] = {}
    labels, bands = [], []
    for record in records:
        _, scores = scorer(record)
        for name, value in scores.items():
            collected.setdefault(name, []).append(value.numpy().astype(np.float32).reshape(-1))
        labels.append(read_png(record["sem_seg_file_name"]).reshape(-1))
        bands.append(border_band(read_png(record["region_file_name"]), border).reshape(-1))
    label = np.concatenate(labels)
    band = np.concatenate(bands)
    valid = label != 255
    masks = {"all": valid, "interior": valid & ~band, "border": valid & band}
    out: Dict = {"_pixels": {region: {"anomaly": int((mask & (label == 1)).sum()),
                                      "inlier": int((mask & (label == 0)).sum())}
                             for region, mask in masks.items()}}
    histograms = {}
    for name, chunks in collected.items():
        score = np.concatenate(chunks)
        out[name] = {region: anomaly_metrics(score[mask], label[mask], ignore_label=None)
                     for region, mask in masks.items()}
        if keep_histograms and name in HISTOGRAM_SCORES:
            low, high = np.quantile(score[valid], [0.001, 0.999])
            edges = np.linspace(low, high, HISTOGRAM_BINS + 1)
            clipped = np.clip(score[valid], low, high)
            histograms[name] = {
                "edges": edges.tolist(),
                "inlier": np.histogram(clipped[label[valid] == 0], edges)[0].tolist(),
                "anomaly": np.histogram(clipped[label[valid] == 1], edges)[0].tolist(),
            }
    if histograms:
        out["_histograms"] = histograms
    return out


def records_with_images(dataset_name: str, image_format: str, limit: Optional[int] = None) -> List[Dict]:
    """The first ``limit`` records of a dataset with their ``"image"`` ``(3, H, W)`` uint8 tensor."""
    import torch
    from detectron2.data import DatasetCatalog
    from detectron2.data.detection_utils import read_image

    result = []
    for record in DatasetCatalog.get(dataset_name)[:limit]:
        image = read_image(record["file_name"], format=image_format)
        result.append(dict(record, image=torch.as_tensor(image.transpose(2, 0, 1).copy())))
    return result


def score_checkpoint(config: str, weights: str, output_dir: str, num_fit_images: int, border: int,
                     extra_opts: List[str], classifier: str = "gmm") -> Dict:
    from detectron2.checkpoint import DetectionCheckpointer

    import gmmseg_d2  # noqa: F401  (registers datasets and models)
    from gmmseg_d2.engine import Trainer, setup_cfg

    args = argparse.Namespace(config_file=os.path.join(REPO_ROOT, config),
                              opts=["OUTPUT_DIR", output_dir, *extra_opts])
    cfg = setup_cfg(args, default_setup_logging=False, extra_config=extra_config(classifier))
    model = Trainer.build_model(cfg)
    DetectionCheckpointer(model).load(weights)
    model.eval()
    scorer = Scorer(cfg, model)
    num_classes = cfg.MODEL.SEM_SEG_HEAD.NUM_CLASSES

    def records(name: str, limit: Optional[int] = None) -> List[Dict]:
        return records_with_images(name, cfg.INPUT.FORMAT, limit)

    timings = {}
    start = time.perf_counter()
    fit_posthoc_gaussians(scorer, records(TRAIN_SEM_SEG, num_fit_images), num_classes)
    timings["posthoc_fit_s"] = time.perf_counter() - start
    start = time.perf_counter()
    test_records = records(TEST_SEM_SEG)
    result = {"sem_seg_test": semantic_metrics(scorer, test_records, num_classes)}
    timings["inference_s_per_image"] = (time.perf_counter() - start) / len(test_records)
    result["anomaly"] = {}
    for split in ANOMALY_SPLITS:
        result["anomaly"][split] = anomaly_results(scorer, records(f"textures_anomaly_{split}"), border,
                                                   keep_histograms=split.endswith("test"))
    result["timings"] = timings
    return result


# ----------------------------------------------------------------------- tables


def _mean_sd(values: List[float], digits: int = 1) -> str:
    """Mean ± sd of the finite values (a run with a NaN timing is left out of that cell)."""
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.{digits}f}"
    return f"{statistics.mean(values):.{digits}f} ± {statistics.stdev(values):.{digits}f}"


def load_records(recorded_dir: str) -> List[Dict]:
    if not os.path.isdir(recorded_dir):
        return []
    records = []
    for name in sorted(os.listdir(recorded_dir)):
        if name.endswith(".json"):
            with open(os.path.join(recorded_dir, name)) as f:
                records.append(json.load(f))
    return records


def _groups(records: List[Dict]) -> Dict[Tuple[str, str], List[Dict]]:
    groups: Dict[Tuple[str, str], List[Dict]] = {}
    for family in FAMILIES:
        for classifier in CLASSIFIERS:
            runs = [r for r in records if r["family"] == family and r["classifier"] == classifier]
            if runs:
                groups[(family, classifier)] = sorted(runs, key=lambda r: r["seed"])
    return groups


def score_names(runs: List[Dict]) -> List[str]:
    first = runs[0]["anomaly"]["near_test"]
    return [name for name in first if not name.startswith("_")]


def format_tables(records: List[Dict], split_kind: str = "test") -> str:
    groups = _groups(records)
    lines = ["### Closed set (textures_sem_seg_test)", "",
             "| model | classifier | seeds | mIoU | pixel acc | train min | step s |", "|---|---|---|---|---|---|---|"]
    for (family, classifier), runs in groups.items():
        lines.append(
            f"| {family} | {classifier} | {','.join(str(r['seed']) for r in runs)} "
            f"| {_mean_sd([r['sem_seg_test']['mIoU'] for r in runs])} "
            f"| {_mean_sd([r['sem_seg_test']['pACC'] for r in runs])} "
            f"| {_mean_sd([r['train_seconds'] / 60 for r in runs])} "
            f"| {_mean_sd([r['step_time'] for r in runs], digits=3)} |")
    for region in REGIONS:
        lines += ["", f"### Anomaly, {region} pixels (textures_anomaly_{{near,far}}_{split_kind}; "
                      "AP / FPR95 / AUROC in %, mean ± sd over seeds)", "",
                  "| model | classifier | score | near AP | near FPR95 | near AUROC | far AP | far FPR95 | far AUROC |",
                  "|---|---|---|---|---|---|---|---|---|"]
        for (family, classifier), runs in groups.items():
            for score in score_names(runs):
                cells = []
                for kind in ("near", "far"):
                    for metric in ("AP", "FPR95", "AUROC"):
                        cells.append(_mean_sd([r["anomaly"][f"{kind}_{split_kind}"][score][region][metric]
                                               for r in runs]))
                lines.append(f"| {family} | {classifier} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


#: Scores shown by ``--summary``: the GMM's own density, MSP on the same
#: logits, and the post-hoc Gaussian control.
SUMMARY_SCORES = ("density", "proto_cosine", "density_mask_avg", "msp", "gaussian_per_class")


def format_summary(records: List[Dict], labels: List[str]) -> str:
    """One row per (run, score): test mIoU and near/far-OOD metrics over all pixels."""
    lines = ["| run | mIoU | score | near AP | near AUROC | near FPR95 | far AP | far AUROC | far FPR95 |",
             "|---|---|---|---|---|---|---|---|---|"]
    for record, label in zip(records, labels):
        for score in SUMMARY_SCORES:
            if score not in record["anomaly"]["near_test"]:
                continue
            cells = [f"{record['anomaly'][f'{kind}_test'][score]['all'][metric]:.1f}"
                     for kind in ("near", "far") for metric in ("AP", "AUROC", "FPR95")]
            lines.append(f"| {label} | {record['sem_seg_test']['mIoU']:.1f} | {score} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_sweep(records: List[Dict], family: str = "fcn_R18", seed: int = 0) -> str:
    """Settings sweep (``--tag`` runs) against the untagged run, on the *val* splits."""
    runs = [r for r in records if r["family"] == family and r["classifier"] == "gmm" and r["seed"] == seed]
    runs.sort(key=lambda r: (r.get("tag", "") != "", r.get("tag", "")))
    lines = [f"| {family} GMM, seed {seed} | val mIoU | density near AUROC | near AP | near FPR95 "
             "| far AUROC | far AP | far FPR95 | MSP near / far AUROC |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in runs:
        density = [r["anomaly"][f"{kind}_val"]["density"]["all"] for kind in ("near", "far")]
        msp = [r["anomaly"][f"{kind}_val"]["msp"]["all"]["AUROC"] for kind in ("near", "far")]
        lines.append(f"| {r.get('tag') or 'config defaults'} {' '.join(r.get('opts', []))} "
                     f"| {r['sem_seg_val']['mIoU']:.1f} "
                     f"| {density[0]['AUROC']:.1f} | {density[0]['AP']:.1f} | {density[0]['FPR95']:.1f} "
                     f"| {density[1]['AUROC']:.1f} | {density[1]['AP']:.1f} | {density[1]['FPR95']:.1f} "
                     f"| {msp[0]:.1f} / {msp[1]:.1f} |")
    return "\n".join(lines)


def write_figure(records: List[Dict], family: str, classifier: str, seed: int, path: str) -> Optional[str]:
    """Histograms of in-distribution vs anomaly scores, density vs MSP of one checkpoint."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    match = [r for r in records if (r["family"], r["classifier"], r["seed"]) == (family, classifier, seed)]
    if not match:
        return None
    record = match[0]
    density = ("density_mask_avg" if family.startswith("maskformer")
               else CLASSIFIER_SCORES.get(classifier, "density"))
    names = [n for n in (density, "msp", "gaussian_per_class")
             if n in record["anomaly"]["near_test"].get("_histograms", {})]
    figure, axes = plt.subplots(2, len(names), figsize=(4 * len(names), 6), squeeze=False)
    for row, kind in enumerate(("near", "far")):
        split = record["anomaly"][f"{kind}_test"]
        for col, name in enumerate(names):
            hist = split["_histograms"][name]
            edges = hist["edges"]
            centres = [(a + b) / 2 for a, b in zip(edges[:-1], edges[1:])]
            width = edges[1] - edges[0]
            for key, colour in (("inlier", "tab:blue"), ("anomaly", "tab:red")):
                total = max(sum(hist[key]), 1)
                axes[row][col].bar(centres, [v / total for v in hist[key]], width=width, alpha=0.55,
                                   color=colour, label=key)
            auroc = split[name]["all"]["AUROC"]
            axes[row][col].set_title(f"{kind}-OOD: {name} (AUROC {auroc:.1f})", fontsize=9)
            axes[row][col].set_xlabel("anomaly score (higher = more anomalous)", fontsize=8)
    axes[0][0].legend(fontsize=8)
    figure.suptitle(f"{family} {classifier}, seed {seed}: same checkpoint, textures_anomaly_*_test", fontsize=10)
    figure.tight_layout()
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


# ------------------------------------------------------------------------- main


def atomic_json(path: str, data: Dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    temporary = path + ".tmp"
    with open(temporary, "w") as f:
        json.dump(data, f, indent=1)
    os.replace(temporary, path)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--models", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    parser.add_argument("--classifiers", nargs="+", default=list(CLASSIFIERS), choices=CLASSIFIERS)
    parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
    parser.add_argument("--output-dir", default="output/benchmarks/open_world",
                        help="training outputs (checkpoints, logs)")
    parser.add_argument("--recorded", default="benchmarks/recorded/open_world", help="one raw JSON per run")
    parser.add_argument("--tag", default="", help="suffix of the run names (for setting sweeps)")
    parser.add_argument("--num-fit-images", type=int, default=500,
                        help="training images whose features fit the post-hoc Gaussians")
    parser.add_argument("--border", type=int, default=3, help="border band radius in pixels")
    parser.add_argument("--table-only", action="store_true", help="only rebuild the tables and the figure")
    parser.add_argument("--table", default=None, help="write the markdown tables here too")
    parser.add_argument("--figure", default="output/benchmarks/open_world/histograms.png")
    parser.add_argument("--figure-run", nargs=3, default=["fcn_R18", "gmm", "0"],
                        metavar=("MODEL", "CLASSIFIER", "SEED"))
    parser.add_argument("--score-only", action="store_true",
                        help="re-score existing checkpoints instead of training missing runs")
    parser.add_argument("--sweep-table", action="store_true",
                        help="print the settings sweep (all --tag runs of FCN-R18 GMM seed 0) on the val splits")
    parser.add_argument("--summary", action="store_true",
                        help="print only a short table of the runs asked for (density vs MSP vs post-hoc Gaussian)")
    parser.add_argument("--reference", default=None,
                        help="with --summary: a recorded dir whose runs of the same models and seeds are shown too")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args()
    recorded_dir = os.path.join(REPO_ROOT, args.recorded)
    if args.sweep_table:
        print(format_sweep(load_records(recorded_dir)))
        return
    if not args.table_only:
        for seed in args.seeds:
            for family in args.models:
                for classifier in args.classifiers:
                    name = run_name(family, classifier, seed) + args.tag
                    json_path = os.path.join(recorded_dir, f"{name}.json")
                    if os.path.exists(json_path):
                        print(f"[open_world] {name}: recorded, skipped", flush=True)
                        continue
                    config = config_for(family, classifier)
                    output_dir = os.path.join(REPO_ROOT, args.output_dir, name)
                    weights = os.path.join(output_dir, "model_final.pth")
                    if args.score_only and not os.path.exists(weights):
                        print(f"[open_world] {name}: no checkpoint, skipped", flush=True)
                        continue
                    if not os.path.exists(weights):
                        print(f"[open_world] {name}: training", flush=True)
                        train_seconds = train(config, seed, output_dir, args.opts, train_script(classifier))
                    else:
                        timing_path = os.path.join(output_dir, "train_seconds.json")
                        train_seconds = json.load(open(timing_path)) if os.path.exists(timing_path) else float("nan")
                    atomic_json(os.path.join(output_dir, "train_seconds.json"), train_seconds)
                    print(f"[open_world] {name}: scoring", flush=True)
                    record = {"family": family, "classifier": classifier, "seed": seed, "config": config,
                              "opts": args.opts, "tag": args.tag, "train_seconds": train_seconds,
                              "step_time": median_step_time(output_dir), "border_px": args.border,
                              "num_fit_images": args.num_fit_images}
                    with open(os.path.join(output_dir, "eval_results.json")) as f:
                        record["sem_seg_val"] = json.load(f)["textures_sem_seg_val"]["sem_seg"]
                    record.update(score_checkpoint(config, weights, output_dir, args.num_fit_images,
                                                   args.border, args.opts, classifier))
                    atomic_json(json_path, record)
                    print(f"[open_world] {name}: mIoU(test) {record['sem_seg_test']['mIoU']:.2f}", flush=True)
    records = [r for r in load_records(recorded_dir) if r.get("tag", "") == args.tag]
    if not records:
        print("[open_world] nothing recorded yet")
        return
    if args.summary:
        asked = [r for r in records if r["family"] in args.models and r["classifier"] in args.classifiers
                 and r["seed"] in args.seeds]
        labels = [f"{run_name(r['family'], r['classifier'], r['seed'])} (this run)" for r in asked]
        if args.reference:
            for r in load_records(os.path.join(REPO_ROOT, args.reference)):
                if r["family"] in args.models and r["seed"] in args.seeds and not r.get("tag"):
                    asked.append(r)
                    labels.append(f"{run_name(r['family'], r['classifier'], r['seed'])} (recorded)")
        print(format_summary(asked, labels))
    else:
        print(format_tables(records))
    tables = format_tables(records)
    if args.table:
        with open(args.table, "w") as f:
            f.write(tables + "\n")
    family, classifier, seed = args.figure_run
    figure_path = os.path.join(REPO_ROOT, args.figure)
    if args.tag:  # a settings sweep must not overwrite the main table's figure
        figure_path = f"{os.path.splitext(figure_path)[0]}{args.tag}.png"
    figure = write_figure(records, family, classifier, int(seed), figure_path)
    if figure:
        print(f"[open_world] figure: {figure}")


if __name__ == "__main__":
    main()
