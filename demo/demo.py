#!/usr/bin/env python
"""Run a trained gmmseg_d2 model on your own images or a video.

    python demo/demo.py --config-file configs/textures/maskformer2_R18_gmm.yaml \\
        --input photos/ --output out/ --opts MODEL.WEIGHTS output/.../model_final.pth

Each output picture shows the predicted semantic segmentation over the image
(Detectron2's Visualizer, with the class names and colours of the config's
first DATASETS.TEST dataset, or "class <id>" when it has none) and, for
models that return an "anomaly_score" map (all gmmseg_d2 models do: the GMM
density for GMM heads, the softmax score otherwise), the anomaly map with its
colour bar; a legend below names the classes present.

The anomaly colours use ONE fixed range for every image of a run, so that a
colour means the same score everywhere: --anomaly-range LO HI, or by default
percentiles 1 and 99 of the FIRST image's scores, then held fixed. Put a
typical in-distribution image first, or pass the range. The range, the
per-image times and the files written are recorded in a JSON summary
(OUTPUT/demo_summary.json for a folder, OUTPUT with .json for a single file).
"""
from __future__ import annotations

import argparse
import glob
import json
import os
import sys
import time
import warnings
from typing import Dict, List, Optional, Sequence, Tuple

warnings.filterwarnings("ignore", message=".*torch.jit.script.*deprecated", category=FutureWarning)

import matplotlib  # noqa: E402

matplotlib.use("Agg")  # Detectron2's Visualizer draws with matplotlib; never open a window

import cv2  # noqa: E402
import numpy as np  # noqa: E402

from detectron2.utils.visualizer import Visualizer  # noqa: E402

import gmmseg_d2  # noqa: E402,F401  (registers datasets, models)
from gmmseg_d2.engine import SemSegPredictor, check_model_weights, setup_cfg  # noqa: E402
from gmmseg_d2.utils import UnreadableImageError, read_image_8bit  # noqa: E402
from gmmseg_d2.utils.visualization import (  # noqa: E402
    DEFAULT_ANOMALY_PERCENTILES, anomaly_range_from_scores, colorize_anomaly, draw_colorbar, draw_legend,
    draw_titles, format_ticks, imwrite_rgb, legend_entries, pad_to_width, segmentation_metadata,
)

#: Extensions taken from a folder given to --input.
IMAGE_EXTENSIONS = (".jpg", ".jpeg", ".png", ".bmp", ".tif", ".tiff", ".webp", ".ppm", ".pgm")
VIDEO_EXTENSIONS = {".mp4": "mp4v", ".avi": "MJPG", ".mkv": "mp4v"}
SUMMARY_NAME = "demo_summary.json"
#: Opacity of the class colours over the image.
OVERLAY_ALPHA = 0.6


def get_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, metavar="FILE", help="path to the model's config file")
    source = parser.add_mutually_exclusive_group(required=True)
    source.add_argument("--input", nargs="+", metavar="PATH",
                        help="image files, glob patterns (quote them) or folders (their images, sorted)")
    source.add_argument("--video-input", metavar="FILE", help="a video file that OpenCV can read")
    parser.add_argument("--output", required=True, metavar="PATH",
                        help="a file when there is one input image (or a video), else a folder "
                             "(created; one <image name>.png per input)")
    parser.add_argument("--anomaly-range", nargs=2, type=float, metavar=("LO", "HI"),
                        help="fixed colour range of the anomaly map for every image (default: percentiles "
                             f"{DEFAULT_ANOMALY_PERCENTILES[0]:g} and {DEFAULT_ANOMALY_PERCENTILES[1]:g} "
                             "of the first image's scores, then held fixed for the rest of the run)")
    parser.add_argument("--min-panel-size", type=int, default=256, metavar="PX",
                        help="enlarge images whose height is below PX by an integer factor so that the "
                             "overlay is legible (default: %(default)s; 1 keeps every input's size)")
    parser.add_argument("--allow-random-weights", action="store_true",
                        help="run even when MODEL.WEIGHTS is empty (an untrained model: for testing only)")
    parser.add_argument("--opts", nargs=argparse.REMAINDER, default=[], metavar="KEY VALUE",
                        help="config overrides as KEY VALUE pairs, e.g. --opts MODEL.WEIGHTS model_final.pth")
    return parser


# ---------------------------------------------------------------- inputs and outputs


def expand_inputs(items: Sequence[str]) -> List[str]:
    """Files, glob patterns and folders → the list of image paths, in order, without repeats.

    A plain path that does not exist is kept, so that reading it fails with its name.
    """
    paths: List[str] = []
    for item in items:
        item = os.path.expanduser(item)
        if os.path.isdir(item):
            found = sorted(os.path.join(item, name) for name in os.listdir(item)
                           if name.lower().endswith(IMAGE_EXTENSIONS))
        elif glob.has_magic(item):
            found = sorted(p for p in glob.glob(item) if os.path.isfile(p))
        else:
            found = [item]
        paths.extend(p for p in found if p not in paths)
    return paths


def output_paths(inputs: Sequence[str], output: str) -> Tuple[List[str], str]:
    """Where each input's picture goes, and the summary's path.

    One input and an ``output`` with an extension that is not a folder: that
    file (summary beside it, same name with ``.json``). Otherwise ``output``
    is a folder, each picture ``<input name without extension>.png``.

    Raises:
        ValueError: several inputs would write the same file.
    """
    if len(inputs) == 1 and not os.path.isdir(output) and os.path.splitext(output)[1]:
        return [output], os.path.splitext(output)[0] + ".json"
    targets = [os.path.join(output, os.path.splitext(os.path.basename(p))[0] + ".png") for p in inputs]
    clashes: Dict[str, List[str]] = {}
    for source, target in zip(inputs, targets):
        clashes.setdefault(target, []).append(source)
    clashes = {t: s for t, s in clashes.items() if len(s) > 1}
    if clashes:
        target, sources = next(iter(clashes.items()))
        raise ValueError(f"Inputs {sources} would all be written to {target!r}; rename them or run them "
                         "separately")
    return targets, os.path.join(output, SUMMARY_NAME)


def write_json(path: str, data: Dict) -> None:
    folder = os.path.dirname(os.path.abspath(path))
    os.makedirs(folder, exist_ok=True)
    with open(path, "w") as f:
        json.dump(data, f, indent=2)


# ---------------------------------------------------------------- rendering


def display_scale(height: int, min_panel_size: int) -> int:
    """Integer enlargement making a panel at least ``min_panel_size`` pixels high."""
    return max(1, -(-int(min_panel_size) // int(height))) if min_panel_size > 1 else 1


def render_prediction(image_rgb: np.ndarray, prediction: Dict, metadata,
                      anomaly_range: Optional[Tuple[float, float]], scale: int = 1) -> Tuple[np.ndarray, Dict]:
    """The demo's picture of one prediction.

    Layout (RGB)::

        | title                    | title                     |          |
        | overlay (sH, sW)         | anomaly map (sH, sW)      | colorbar |
        | legend of the classes present (full width)                      |

    Args:
        image_rgb: ``(H, W, 3)`` uint8 RGB.
        prediction: the model's output: ``"sem_seg"`` ``(C, H, W)`` and optionally
            ``"anomaly_score"`` ``(H, W)`` (tensors).
        metadata: with ``stuff_classes``/``stuff_colors`` for all ``C`` classes.
        anomaly_range: the fixed ``(lo, hi)`` of the anomaly colours (required
            when the prediction has an anomaly score).
        scale: integer enlargement of the panels.
    Returns:
        the picture, and ``{"classes": [names present], "anomaly_panel": bool,
        "panel_size": [sH, sW]}``.
    """
    labels = prediction["sem_seg"].argmax(dim=0).cpu().numpy()
    overlay = Visualizer(image_rgb, metadata, scale=scale).draw_sem_seg(labels, alpha=OVERLAY_ALPHA).get_image()
    panel_h, panel_w = overlay.shape[:2]
    panels, titles = [overlay], ["prediction"]
    has_anomaly = "anomaly_score" in prediction
    if has_anomaly:
        lo, hi = anomaly_range
        score = prediction["anomaly_score"].float().cpu().numpy()
        anomaly = cv2.resize(colorize_anomaly(score, lo, hi), (panel_w, panel_h), interpolation=cv2.INTER_NEAREST)
        colorbar = draw_colorbar(panel_h, lo, hi)
        panels += [anomaly, colorbar]
        lo_text, _, hi_text = format_ticks([lo, (lo + hi) / 2, hi])  # the colour bar's labels
        titles += [f"anomaly score, fixed range [{lo_text}, {hi_text}]", ""]
    body = np.concatenate(panels, axis=1)
    widths = [p.shape[1] for p in panels]
    entries = legend_entries(labels, metadata)
    legend = draw_legend(entries, body.shape[1])
    picture = np.concatenate([draw_titles(titles, widths), body, legend], axis=0)
    return picture, {"classes": [name for name, _ in entries], "anomaly_panel": has_anomaly,
                     "panel_size": [panel_h, panel_w]}


class DemoRun:
    """Prediction + rendering with the run's fixed anomaly range (set by the first image)."""

    def __init__(self, cfg, anomaly_range: Optional[Sequence[float]], min_panel_size: int) -> None:
        self.cfg = cfg
        self.predictor = SemSegPredictor(cfg)
        self.dataset_name = cfg.DATASETS.TEST[0] if len(cfg.DATASETS.TEST) else None
        self.anomaly_range = tuple(float(v) for v in anomaly_range) if anomaly_range else None
        self.range_source = "--anomaly-range" if anomaly_range else None
        self.min_panel_size = min_panel_size
        self._metadata = {}

    def metadata(self, num_classes: int):
        if num_classes not in self._metadata:
            self._metadata[num_classes] = segmentation_metadata(self.dataset_name, num_classes)
        return self._metadata[num_classes]

    def __call__(self, image: np.ndarray, source: str) -> Tuple[np.ndarray, Dict]:
        """``image`` in ``cfg.INPUT.FORMAT`` → (RGB picture, info for the summary)."""
        start = time.perf_counter()
        prediction = self.predictor(image)
        if "anomaly_score" in prediction and self.anomaly_range is None:
            self.anomaly_range = anomaly_range_from_scores(prediction["anomaly_score"].float().cpu().numpy())
            low, high = DEFAULT_ANOMALY_PERCENTILES
            self.range_source = f"percentiles {low:g}-{high:g} of the first image, {source}"
            print(f"Anomaly colour range [{self.anomaly_range[0]:.6g}, {self.anomaly_range[1]:.6g}] "
                  f"({self.range_source}); held fixed for every image", flush=True)
        image_rgb = image[:, :, ::-1] if self.cfg.INPUT.FORMAT == "BGR" else image
        picture, info = render_prediction(
            image_rgb, prediction, self.metadata(int(prediction["sem_seg"].shape[0])),
            self.anomaly_range, display_scale(image.shape[0], self.min_panel_size))
        info.update(input_size=list(image.shape[:2]), output_size=list(picture.shape[:2]),
                    anomaly_range=list(self.anomaly_range) if info["anomaly_panel"] else None,
                    seconds=round(time.perf_counter() - start, 4))
        return picture, info


# ---------------------------------------------------------------- main


def run_images(run: DemoRun, inputs: List[str], targets: List[str]) -> List[Dict]:
    records = []
    for index, (source, target) in enumerate(zip(inputs, targets)):
        image = read_image_8bit(source, format=run.cfg.INPUT.FORMAT)
        picture, info = run(image, source)
        os.makedirs(os.path.dirname(os.path.abspath(target)), exist_ok=True)
        imwrite_rgb(target, picture)
        info.update(input=source, output=target)
        records.append(info)
        print(f"[{index + 1}/{len(inputs)}] {source}: {info['input_size'][1]}x{info['input_size'][0]}, "
              f"classes {', '.join(info['classes']) or '-'}; {info['seconds']:.2f} s -> {target}", flush=True)
    return records


def run_video(run: DemoRun, video: str, output: str) -> Tuple[List[Dict], str, str]:
    capture = cv2.VideoCapture(video)
    if not capture.isOpened():
        raise UnreadableImageError(f"OpenCV cannot open the video {video!r}; is it a video file in a format "
                                   "this OpenCV build reads (try converting it to .mp4)?")
    extension = os.path.splitext(output)[1].lower()
    if os.path.isdir(output) or not extension:
        output = os.path.join(output, os.path.splitext(os.path.basename(video))[0] + ".mp4")
        extension = ".mp4"
    if extension not in VIDEO_EXTENSIONS:
        raise ValueError(f"--output {output!r}: a video output must end in one of {sorted(VIDEO_EXTENSIONS)}")
    fps = capture.get(cv2.CAP_PROP_FPS) or 30.0
    total = int(capture.get(cv2.CAP_PROP_FRAME_COUNT)) or None
    writer, records = None, []
    try:
        while True:
            ok, frame = capture.read()
            if not ok:
                break
            image = frame if run.cfg.INPUT.FORMAT == "BGR" else np.ascontiguousarray(frame[:, :, ::-1])
            picture, info = run(image, f"{video} frame 0")
            if writer is None:
                os.makedirs(os.path.dirname(os.path.abspath(output)), exist_ok=True)
                writer = cv2.VideoWriter(output, cv2.VideoWriter_fourcc(*VIDEO_EXTENSIONS[extension]), fps,
                                         (picture.shape[1], picture.shape[0]))
                if not writer.isOpened():
                    raise OSError(f"Could not open {output!r} for writing a video (cv2.VideoWriter failed); "
                                  "check the folder and try an .mp4 or .avi name")
                size = picture.shape[:2]
            # A video's frames all have one size, but the legend may need another
            # line for a frame with more classes: pad or crop to the first frame's size.
            picture = pad_to_width(picture[: size[0], : size[1]], size[1])
            if picture.shape[0] < size[0]:
                picture = np.pad(picture, ((0, size[0] - picture.shape[0]), (0, 0), (0, 0)), constant_values=255)
            writer.write(np.ascontiguousarray(picture[:, :, ::-1]))
            info.update(input=f"{video}#{len(records)}", output=output)
            records.append(info)
            print(f"[frame {len(records)}/{total or '?'}] {info['seconds']:.2f} s", flush=True)
    finally:
        capture.release()
        if writer is not None:
            writer.release()
    if not records:
        raise UnreadableImageError(f"OpenCV read no frame from the video {video!r}")
    return records, output, os.path.splitext(output)[0] + ".json"


def main(argv: Optional[Sequence[str]] = None) -> Dict:
    """Run the demo; returns the summary that it also writes as JSON."""
    parser = get_parser()
    args = parser.parse_args(argv)
    cfg = setup_cfg(args, default_setup_logging=False)
    try:
        check_model_weights(cfg.MODEL.WEIGHTS, allow_random_weights=args.allow_random_weights)
    except (ValueError, FileNotFoundError) as e:
        parser.error(str(e))
    if args.anomaly_range and not args.anomaly_range[1] > args.anomaly_range[0]:
        parser.error(f"--anomaly-range LO HI needs LO < HI, got {args.anomaly_range}")
    if args.input:
        inputs = expand_inputs(args.input)
        if not inputs:
            parser.error(f"--input {' '.join(args.input)} matched no image")
        try:
            targets, summary_path = output_paths(inputs, args.output)
        except ValueError as e:
            parser.error(str(e))

    run = DemoRun(cfg, args.anomaly_range, args.min_panel_size)
    print(f"Model {cfg.MODEL.META_ARCHITECTURE} from {cfg.MODEL.WEIGHTS or 'random weights'} "
          f"on {cfg.MODEL.DEVICE}; classes from {run.dataset_name or 'none (generic names)'}", flush=True)
    if args.input:
        records = run_images(run, inputs, targets)
    else:
        records, output, summary_path = run_video(run, args.video_input, args.output)
    summary = {
        "config_file": args.config_file,
        "weights": cfg.MODEL.WEIGHTS,
        "anomaly_range": list(run.anomaly_range) if run.anomaly_range else None,
        "anomaly_range_source": run.range_source,
        "images": records,
    }
    write_json(summary_path, summary)
    seconds = sum(r["seconds"] for r in records)
    what = ("picture" if len(records) == 1 else "pictures") if args.input else f"frames to {output}"
    print(f"Wrote {len(records)} {what} "
          f"({seconds / len(records):.2f} s per image); summary: {summary_path}", flush=True)
    return summary


if __name__ == "__main__":
    try:
        main()
    except (UnreadableImageError, OSError) as e:
        sys.exit(f"demo.py: error: {e}")
