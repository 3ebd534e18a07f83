"""SegFormer (MiT) sizes and inference time against FCN-R18, in one run.

* Parameters (encoder, head, total) of the mosaic models and of the
  paper-setting SegFormer configs (B0 / B5, built on CPU), for comparison with
  the SegFormer paper's B0 3.8 M and B5 84.7 M (ADE20K).
* Inference time per image of the mosaic models, whole-model forward
  (``PerPixelSegmentor``, eval mode, one image per call), the models
  interleaved round by round (minimum over ``--rounds``), at the mosaic's
  128x128 and at 512x512, with the ratio to ``fcn_R18_softmax``.

One JSON, ``benchmarks/recorded/segformer_cost/segformer_cost.json``; the
table is printed (``--table-only`` reprints it from the JSON).

    python benchmarks/segformer_cost.py            # run alone on the machine
    python benchmarks/segformer_cost.py --table-only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
from typing import Dict, List

import torch

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)

from measure import interleaved_min_times  # noqa: E402

RECORDED = os.path.join(REPO, "benchmarks", "recorded", "segformer_cost", "segformer_cost.json")
TIMED = ("fcn_R18_softmax", "fcn_R18_gmm", "segformer_mitb0_softmax", "segformer_mitb0_gmm")
#: Configs only counted (a small memory: its size does not change the parameter count).
COUNTED = {
    "ade20k segformer_mit-b0 (150 classes)": "configs/ade20k/segformer/segformer_mit-b0_512x512_160k_ade20k.yaml",
    "ade20k gmmseg_mit-b0 (150 classes)": "configs/ade20k/segformer/gmmseg_mit-b0_512x512_160k_ade20k.yaml",
    "ade20k segformer_mit-b5 (150 classes)": "configs/ade20k/segformer/segformer_mit-b5_512x512_160k_ade20k.yaml",
    "coco_stuff_10k gmmseg_mit-b5 (171 classes)":
        "configs/coco_stuff/segformer/gmmseg_mit-b5_512x512_80k_coco_stuff_10k.yaml",
}


def build(config: str, opts: List[str] = ()):
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model

    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    cfg.merge_from_list(["MODEL.DEVICE", "cpu", "MODEL.WEIGHTS", "", "MODEL.GMM.MEMORY_SIZE", 40,
                         "MODEL.SEM_SEG_HEAD.NORM", "BN", *opts])
    return build_model(cfg).eval()


def parameter_counts(model) -> Dict[str, float]:
    """Millions of parameters (memory and other buffers excluded)."""
    backbone = sum(p.numel() for p in model.backbone.parameters())
    head = sum(p.numel() for p in model.sem_seg_head.parameters())
    return {"backbone_M": backbone / 1e6, "head_M": head / 1e6, "total_M": (backbone + head) / 1e6}


def run(rounds: int, threads: int) -> Dict:
    torch.set_num_threads(threads)
    torch.manual_seed(0)
    record = {"machine": platform.processor() or platform.machine(), "threads": threads, "rounds": rounds,
              "torch": torch.__version__, "params": {}, "inference_s": {}}
    models = {name: build(f"configs/mosaic/{name}.yaml") for name in TIMED}
    for name, model in models.items():
        record["params"][f"mosaic {name}"] = parameter_counts(model)
    for label, config in COUNTED.items():
        record["params"][label] = parameter_counts(build(config))
    for size in (128, 512):
        image = torch.randint(0, 255, (3, size, size), dtype=torch.uint8).float()
        batch = [{"image": image, "height": size, "width": size}]

        def call(model):
            def fn():
                with torch.no_grad():
                    model(batch)
            return fn

        times = interleaved_min_times({name: call(m) for name, m in models.items()}, rounds, torch.device("cpu"))
        record["inference_s"][str(size)] = times
    return record


def table(record: Dict) -> str:
    lines = [f"Parameters (M) — {record['machine']}, torch {record['torch']}", "",
             "| model | encoder | head | total |", "|---|---|---|---|"]
    for name, p in record["params"].items():
        lines.append(f"| {name} | {p['backbone_M']:.2f} | {p['head_M']:.2f} | {p['total_M']:.2f} |")
    lines += ["", f"Inference, one image, {record['threads']} threads, min of {record['rounds']} interleaved rounds",
              "", "| model | 128² ms | ratio vs FCN-R18 softmax | 512² ms | ratio |", "|---|---|---|---|---|"]
    small, large = record["inference_s"]["128"], record["inference_s"]["512"]
    for name in small:
        lines.append(f"| {name} | {small[name] * 1e3:.1f} | {small[name] / small['fcn_R18_softmax']:.2f} "
                     f"| {large[name] * 1e3:.1f} | {large[name] / large['fcn_R18_softmax']:.2f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--rounds", type=int, default=20)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--force", action="store_true", help="measure again even if recorded")
    args = parser.parse_args()
    if args.table_only or (os.path.isfile(RECORDED) and not args.force):
        with open(RECORDED) as f:
            print(table(json.load(f)))
        return
    record = run(args.rounds, args.threads)
    os.makedirs(os.path.dirname(RECORDED), exist_ok=True)
    with open(RECORDED + ".tmp", "w") as f:
        json.dump(record, f, indent=2)
    os.replace(RECORDED + ".tmp", RECORDED)
    print(table(record))


if __name__ == "__main__":
    main()
