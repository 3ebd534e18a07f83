#!/usr/bin/env python
"""Softmax vs GMM models on the embedded mosaic: accuracy, anomaly, speed.

Per-pixel families (fcn_R18, deeplabv3plus_R18) and the mask-classification
one (maskformer2_R18; its GMM runs are named gmmseg_maskformer2_R18).

For every (config, seed) this trains the model with ``tools/train_net.py``
(same schedule and seed for both classifiers), then evaluates the checkpoint
once per anomaly score the model offers — per-pixel: the density score for GMM
models, MSP, max-logit and entropy for softmax ones; Mask2Former: MSP,
max-logit, entropy and RbA, plus the three mask-level density rules for the GMM
model — and reports:

* mIoU / pixel accuracy on ``mosaic_sem_seg_val``,
* AP / FPR95 / AUROC on ``mosaic_anomaly_val`` for each anomaly score,
* median training step time (Detectron2's ``time`` in ``metrics.json``) and
  inference time per image, with the GMM/softmax ratio of the step time.

    python benchmarks/mosaic_models.py --configs fcn_R18 --seeds 0 \
        --output-dir output/benchmarks/mosaic

Resumable: with ``--recorded DIR`` each (model, seed) run is written to
``DIR/<run name>.json`` as soon as it finishes, runs already there are
skipped, and the table is rebuilt from the JSONs of the requested runs.

Runs are sequential (the machine's cores are shared by one run at a time), so
the step-time ratio compares runs made back to back on the same machine.
"""
import argparse
import json
import os
import re
import statistics
import subprocess
import sys
from typing import Dict, List, Optional

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
SOFTMAX_SCORES = ("msp", "max_logit", "entropy")
#: Mask-classification (Mask2Former) softmax models also offer RbA.
MASK_CLASSIFICATION_SCORES = SOFTMAX_SCORES + ("rba",)
#: GMM Mask2Former: the mask-level density rules, and the softmax-style scores
#: computed on its GMM class logits for comparison.
MASK_DENSITY_SCORES = ("density_mask_avg", "density_min", "density_max")
#: Run names that are not ``<family>_<classifier>`` (recorded before the
#: config file took the common ``<family>_<classifier>.yaml`` pattern).
RUN_PREFIXES = {("maskformer2_R18", "gmm"): "gmmseg_maskformer2_R18"}


def config_for(family: str, classifier: str) -> str:
    return os.path.join("configs", "mosaic", f"{family}_{classifier}.yaml")


def run(command: List[str], log_path: str) -> str:
    """Run ``command`` from the repo root, tee its output into ``log_path``."""
    with open(log_path, "w") as log:
        process = subprocess.run(command, cwd=REPO_ROOT, stdout=subprocess.PIPE,
                                 stderr=subprocess.STDOUT, text=True)
        log.write(process.stdout)
    if process.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed; see {log_path}")
    return process.stdout


def median_step_time(output_dir: str) -> float:
    with open(os.path.join(output_dir, "metrics.json")) as f:
        times = [json.loads(line)["time"] for line in f if '"time"' in line]
    if not times:
        raise ValueError(f"No step times in {output_dir}/metrics.json")
    return statistics.median(times)


def inference_seconds_per_image(log: str) -> Optional[float]:
    """Detectron2's 'Total inference pure compute time' line of the first dataset."""
    match = re.search(r"Total inference pure compute time: .*?\(([\d.]+) s / iter", log)
    return float(match.group(1)) if match else None


def train_and_evaluate(family: str, classifier: str, seed: int, output_root: str, python: str,
                       extra_opts: List[str]) -> Dict:
    config = config_for(family, classifier)
    name = f"{RUN_PREFIXES.get((family, classifier), f'{family}_{classifier}')}_seed{seed}"
    output_dir = os.path.join(output_root, name)
    os.makedirs(output_dir, exist_ok=True)
    train_cmd = [python, "tools/train_net.py", "--config-file", config,
                 "SEED", str(seed), "OUTPUT_DIR", output_dir, *extra_opts]
    print(f"[benchmark] training {name}", flush=True)
    run(train_cmd, os.path.join(output_dir, "train.log"))
    with open(os.path.join(output_dir, "eval_results.json")) as f:
        results = json.load(f)
    record = {
        "config": config, "family": family, "classifier": classifier, "seed": seed,
        "mIoU": results["mosaic_sem_seg_val"]["sem_seg"]["mIoU"],
        "pACC": results["mosaic_sem_seg_val"]["sem_seg"]["pACC"],
        "step_time": median_step_time(output_dir),
        "anomaly": {},
    }
    is_gmm = classifier == "gmm"
    is_mask_classification = "maskformer" in family
    if is_gmm and is_mask_classification:
        scores = list(MASK_DENSITY_SCORES + MASK_CLASSIFICATION_SCORES)
    elif is_gmm:
        scores = ["density"]  # the per-pixel GMM model's only score, its default
    else:
        scores = list(MASK_CLASSIFICATION_SCORES if is_mask_classification else SOFTMAX_SCORES)
    score_key = ("MODEL.MASK_FORMER.TEST.ANOMALY_SCORE" if is_mask_classification
                 else "MODEL.SEM_SEG_HEAD.ANOMALY_SCORE")
    weights = os.path.join(output_dir, "model_final.pth")
    for score in scores:
        eval_dir = os.path.join(output_dir, f"eval_{score}")
        opts = ["MODEL.WEIGHTS", weights, "OUTPUT_DIR", eval_dir, *extra_opts]
        if score != "density":
            opts += [score_key, score]
        log = run([python, "tools/train_net.py", "--config-file", config, "--eval-only", *opts],
                  os.path.join(output_dir, f"eval_{score}.log"))
        with open(os.path.join(eval_dir, "eval_results.json")) as f:
            record["anomaly"][score] = json.load(f)["mosaic_anomaly_val"]["anomaly"]
        record.setdefault("inference_time", inference_seconds_per_image(log))
    return record


def format_table(records: List[Dict]) -> str:
    lines = ["| model | seed | mIoU | pixel acc | anomaly score | AP | FPR95 | AUROC | "
             "step s | step ratio vs softmax | inference s/img |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    softmax_step = {(r["family"], r["seed"]): r["step_time"] for r in records if r["classifier"] == "softmax"}
    for r in records:
        base = softmax_step.get((r["family"], r["seed"]))
        ratio = f"{r['step_time'] / base:.2f}" if base else "-"
        for score, m in r["anomaly"].items():
            lines.append(
                f"| {os.path.basename(r['config'])} | {r['seed']} | {r['mIoU']:.2f} | {r['pACC']:.2f} "
                f"| {score} | {m['AP']:.2f} | {m['FPR95']:.2f} | {m['AUROC']:.2f} "
                f"| {r['step_time']:.3f} | {ratio} | {r['inference_time'] or float('nan'):.4f} |")
    return "\n".join(lines)


def _mean_sd(values: List[float]) -> str:
    if len(values) < 2:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def format_summary(records: List[Dict]) -> str:
    """Mean ± sd over seeds, one row per (config, anomaly score)."""
    lines = ["| model | seeds | mIoU | anomaly score | AP | FPR95 | AUROC | step s | inference s/img |",
             "|---|---|---|---|---|---|---|---|---|"]
    configs = list(dict.fromkeys(r["config"] for r in records))
    for config in configs:
        runs = [r for r in records if r["config"] == config]
        for score in runs[0]["anomaly"]:
            metric = {m: [r["anomaly"][score][m] for r in runs] for m in ("AP", "FPR95", "AUROC")}
            lines.append(
                f"| {os.path.basename(config)} | {len(runs)} | {_mean_sd([r['mIoU'] for r in runs])} | {score} "
                f"| {_mean_sd(metric['AP'])} | {_mean_sd(metric['FPR95'])} | {_mean_sd(metric['AUROC'])} "
                f"| {statistics.median(r['step_time'] for r in runs):.3f} "
                f"| {statistics.median(r['inference_time'] or float('nan') for r in runs):.4f} |")
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    parser.add_argument("--configs", nargs="+", default=["fcn_R18", "deeplabv3plus_R18"],
                        help="mosaic model families (fcn_R18, deeplabv3plus_R18, maskformer2_R18); each "
                             "runs as <name>_softmax and <name>_gmm (gmmseg_maskformer2_R18 for Mask2Former)")
    parser.add_argument("--classifiers", nargs="+", default=["softmax", "gmm"],
                        help="which of <name>_softmax / <name>_gmm to run")
    parser.add_argument("--seeds", nargs="+", type=int, default=[0])
    parser.add_argument("--output-dir", default="output/benchmarks/mosaic")
    parser.add_argument("--recorded", default=None,
                        help="folder of one JSON per run: recorded runs are skipped, new ones written there")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="KEY VALUE overrides for every run")
    args = parser.parse_args()
    records = []
    for family in args.configs:
        for seed in args.seeds:
            for kind in args.classifiers:
                name = f"{RUN_PREFIXES.get((family, kind), f'{family}_{kind}')}_seed{seed}"
                recorded = os.path.join(args.recorded, f"{name}.json") if args.recorded else None
                if recorded and os.path.isfile(recorded):
                    print(f"[benchmark] {name}: recorded in {recorded}, skipped", flush=True)
                    with open(recorded) as f:
                        records.append(json.load(f))
                    continue
                record = train_and_evaluate(family, kind, seed, args.output_dir, sys.executable, args.opts)
                records.append(record)
                if recorded:
                    os.makedirs(args.recorded, exist_ok=True)
                    with open(recorded + ".tmp", "w") as f:
                        json.dump(record, f, indent=2)
                    os.replace(recorded + ".tmp", recorded)
    os.makedirs(args.output_dir, exist_ok=True)
    with open(os.path.join(args.output_dir, "results.json"), "w") as f:
        json.dump(records, f, indent=2)
    print(format_table(records))
    print()
    print(format_summary(records))


if __name__ == "__main__":
    main()
