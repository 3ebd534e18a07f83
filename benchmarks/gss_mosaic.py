#!/usr/bin/env python
"""GSS (projects/GSS) on the embedded mosaic: maskige reconstruction, end-to-end accuracy, cost.

Parts (``--parts``, all by default), each resumable: one JSON per result
under ``--recorded`` (default ``benchmarks/recorded/gss_mosaic``), recorded
results are skipped, and the tables are rebuilt from the JSONs:

* ``vqvae``: stage I, the small maskige VQ-VAE trained by
  ``projects/GSS/tools/train_vqvae.py`` for the maximal-distance palette
  (the one the models use) and for a random one (FF-R).
* ``reconstruction``: the paper's Table 1 on ``mosaic_sem_seg_val``: mIoU
  of ground-truth masks after maskige → VQ-VAE → X⁻¹, for FF-R (random
  palette, nearest colour), FF (nearest colour; least squares), FT and FT-W
  (inverses trained on the VQ-VAE's round trips of training masks, once per seed).
* ``models``: GSS-FF (stage II), then GSS-FT and GSS-FT-W (stage III on it) per seed,
  trained with ``projects/GSS/train_net.py`` on the mosaic FCN models'
  data and optimiser, GSS-FF for ``--ff-iters`` iterations (chosen so that
  its training time matches the FCN's 300 iterations, see ``cost``); mIoU on
  ``mosaic_sem_seg_val``, the token-MSP anomaly score on ``mosaic_anomaly_val``.
  The FCN rows are ``benchmarks/mosaic_models.py --configs fcn_R18``'s runs.
* ``cost``: one training step and one inference of GSS-FF / GSS-FT against
  the softmax FCN-R18, same batch, interleaved in one process.

    DETECTRON2_DATASETS=./datasets .venv/bin/python benchmarks/gss_mosaic.py --seeds 0 1 2
    .venv/bin/python benchmarks/gss_mosaic.py --table-only
"""
import argparse
import json
import os
import statistics
import sys
import time
from typing import Dict, List, Optional

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GSS_ROOT = os.path.join(REPO_ROOT, "projects", "GSS")
sys.path.insert(0, GSS_ROOT)
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from mosaic_models import inference_seconds_per_image, median_step_time, run  # noqa: E402

FF_CONFIG = "projects/GSS/configs/mosaic/gss_ff_R18.yaml"
FT_CONFIG = "projects/GSS/configs/mosaic/gss_ft_R18.yaml"
FTW_CONFIG = "projects/GSS/configs/mosaic/gss_ftw_R18.yaml"
PALETTES = ("maximal_distance", "random")
PARTS = ("vqvae", "reconstruction", "models", "cost")
#: The mosaic FCN models' schedule (configs/mosaic/Base-mosaic-per-pixel.yaml).
FCN_ITERS = 300
#: The reconstruction table's rows: (palette, X⁻¹, name), as in the paper's Table 1.
RECONSTRUCTION_ROWS = (("random", "nearest", "GSS-FF-R"), ("maximal_distance", "nearest", "GSS-FF"),
                       ("maximal_distance", "least_squares", "GSS-FF, least squares"),
                       ("maximal_distance", "conv", "GSS-FT"), ("maximal_distance", "swin", "GSS-FT-W"))
LEARNED_INVERSES = ("conv", "swin")
#: Stage III of GSS-FT and GSS-FT-W (gss_ft_R18.yaml, gss_ftw_R18.yaml).
STAGE_THREE_ITERS = 80


def _load_json(path: str) -> Optional[Dict]:
    if not os.path.isfile(path):
        return None
    with open(path) as handle:
        return json.load(handle)


def _write_json(path: str, record: Dict) -> None:
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path + ".tmp", "w") as handle:
        json.dump(record, handle, indent=1)
    os.replace(path + ".tmp", path)
    print(f"[gss benchmark] recorded {path}", flush=True)


def vqvae_path(output_root: str, palette: str) -> str:
    return os.path.join(output_root, f"vqvae_{palette}.pth")


def train_vqvaes(args) -> None:
    """Stage I per palette; the weights stay under --output-dir (rebuilt when missing)."""
    for palette in PALETTES:
        weights = vqvae_path(args.output_dir, palette)
        recorded = os.path.join(args.recorded, f"vqvae_{palette}.json")
        if os.path.isfile(weights) and os.path.isfile(recorded):
            continue
        print(f"[gss benchmark] training the VQ-VAE, palette {palette}", flush=True)
        os.makedirs(args.output_dir, exist_ok=True)
        run([args.python, "projects/GSS/tools/train_vqvae.py", "--config-file", FF_CONFIG, "--output", weights,
             "--iters", str(args.vqvae_iters), "MODEL.GSS.MASKIGE.PALETTE_KIND", palette],
            weights + ".log")
        metrics = _load_json(weights + ".json")
        if not os.path.isfile(recorded):
            _write_json(recorded, {"palette": palette, "iters": args.vqvae_iters, **metrics})


def _gss_config(palette: str = "maximal_distance", *opts):
    from detectron2.config import get_cfg
    from gmmseg_d2.config import add_gmmseg_config

    from gss import add_gss_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    add_gss_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, FF_CONFIG))
    cfg.merge_from_list(["MODEL.GSS.MASKIGE.PALETTE_KIND", palette, *opts])
    return cfg


def _stage_three_config(inverse_name: str):
    """The mosaic GSS-FT ("conv") or GSS-FT-W ("swin") config."""
    from detectron2.config import get_cfg
    from gmmseg_d2.config import add_gmmseg_config

    from gss import add_gss_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    add_gss_config(cfg)
    cfg.merge_from_file(os.path.join(REPO_ROOT, FT_CONFIG if inverse_name == "conv" else FTW_CONFIG))
    return cfg


def _train_inverse(inverse, vqvae, maskige, train_maps, cfg, iters: int, seed: int, random_crops):
    """Fit a learned X⁻¹ on the VQ-VAE's round trips of random training crops (CE at label size)."""
    import torch.nn.functional as F

    from gss import upsample_labels

    gss = cfg.MODEL.GSS
    generator = torch.Generator().manual_seed(seed)
    optimizer = torch.optim.AdamW(inverse.parameters(), lr=1e-3, weight_decay=0.01)
    inverse.train()
    for _ in range(iters):
        labels = random_crops(train_maps, 16, 64, gss.IGNORE_VALUE, generator)
        with torch.no_grad():
            upsampled = upsample_labels(labels, gss.LABEL_UPSAMPLE, gss.NUM_CLASSES, gss.IGNORE_VALUE)
            decoded = vqvae.decode(vqvae.encode(maskige(upsampled)))
        scores = F.interpolate(inverse(decoded), size=labels.shape[-2:], mode="bilinear", align_corners=False)
        loss = F.cross_entropy(scores, labels.long(), ignore_index=gss.IGNORE_VALUE)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    return inverse.eval()


def reconstruction(args) -> None:
    """Table 1 on the mosaic: one JSON per (palette, inverse), and per seed for the learned inverses."""
    import importlib.util

    from gss import LeastSquaresInverse, Maskige, NearestColourInverse, build_inverse, build_palette
    from gss import load_vqvae_weights
    from gss.reconstruction import ConfusionMatrix, reconstruct_labels

    spec = importlib.util.spec_from_file_location("gss_train_vqvae", os.path.join(GSS_ROOT, "tools", "train_vqvae.py"))
    tool = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(tool)
    for palette, inverse_name, row_name in RECONSTRUCTION_ROWS:
        # The rule-based inverses have no seed; a learned one is trained once per seed (its init and crops).
        seeds = args.seeds if inverse_name in LEARNED_INVERSES else [None]
        for seed in seeds:
            recorded = os.path.join(args.recorded, _reconstruction_name(palette, inverse_name, seed) + ".json")
            if os.path.isfile(recorded):
                continue
            cfg = _gss_config(palette)
            gss = cfg.MODEL.GSS
            maskige = Maskige(build_palette(palette, gss.NUM_CLASSES, seed=gss.MASKIGE.SEED))
            vqvae = load_vqvae_weights(vqvae_path(args.output_dir, palette)).eval()
            start = time.perf_counter()
            if inverse_name == "nearest":
                inverse = NearestColourInverse(maskige.palette)
            elif inverse_name == "least_squares":
                inverse = LeastSquaresInverse(maskige.palette)
            else:
                torch.manual_seed(seed)
                # The sizes of the mosaic stage-III configs (gss_ft_R18.yaml, gss_ftw_R18.yaml).
                inverse = build_inverse(_stage_three_config(inverse_name), maskige.palette)
                train_maps = tool.load_label_maps(cfg.DATASETS.TRAIN[0])
                inverse = _train_inverse(inverse, vqvae, maskige, train_maps, cfg, args.inverse_iters, seed=seed,
                                         random_crops=tool.random_crops)
            confusion = ConfusionMatrix(gss.NUM_CLASSES, gss.IGNORE_VALUE)
            clean = ConfusionMatrix(gss.NUM_CLASSES, gss.IGNORE_VALUE)
            for label in tool.load_label_maps(cfg.DATASETS.TEST[0]):
                label = label[None]
                confusion.update(reconstruct_labels(label, vqvae, maskige, inverse, gss.LABEL_UPSAMPLE,
                                                    gss.IGNORE_VALUE), label)
                with torch.no_grad():  # the inverse alone, on the clean maskige
                    clean.update(inverse(maskige(label)).argmax(1), label)
            _write_json(recorded, {"model": row_name, "palette": palette, "inverse": inverse_name, "seed": seed,
                                   "mIoU": confusion.metrics()["mIoU"], "pACC": confusion.metrics()["pACC"],
                                   "clean_mIoU": clean.metrics()["mIoU"], "seconds": time.perf_counter() - start,
                                   "inverse_iters": args.inverse_iters if inverse_name in LEARNED_INVERSES else 0})


def _reconstruction_name(palette: str, inverse_name: str, seed: Optional[int]) -> str:
    name = f"reconstruction_{palette}_{inverse_name}"
    return name if seed is None else f"{name}_seed{seed}"


def _model_record(name: str, config: str, seed: int, output_dir: str, log: str, extra: Dict) -> Dict:
    results = _load_json(os.path.join(output_dir, "eval_results.json"))
    return {
        "name": name, "config": config, "seed": seed,
        "mIoU": results["mosaic_sem_seg_val"]["sem_seg"]["mIoU"],
        "pACC": results["mosaic_sem_seg_val"]["sem_seg"]["pACC"],
        "anomaly": {"token_msp": results["mosaic_anomaly_val"]["anomaly"]},
        "step_time": median_step_time(output_dir),
        "inference_time": inference_seconds_per_image(log),
        **extra,
    }


def ff_iterations(args) -> int:
    """GSS-FF's iterations: --ff-iters, or the FCN's 300 scaled by the measured train-step ratio (``cost``)."""
    if args.ff_iters:
        return args.ff_iters
    record = _load_json(os.path.join(args.recorded, "cost.json"))
    if record is None:
        raise ValueError("GSS-FF's iterations come from the cost part's step times: run --parts cost first, "
                         "or give --ff-iters")
    steps = record["train_step_s"]
    return max(1, round(FCN_ITERS * steps["fcn_softmax"] / steps["gss_ff"]))


def models(args) -> None:
    weights = vqvae_path(args.output_dir, "maximal_distance")
    ff_iters = ff_iterations(args)
    for seed in args.seeds:
        ff_name, ft_name = f"gss_ff_R18_seed{seed}", f"gss_ft_R18_seed{seed}"
        ff_dir = os.path.join(args.output_dir, ff_name)
        ff_recorded = os.path.join(args.recorded, f"{ff_name}.json")
        if not os.path.isfile(ff_recorded) or not os.path.isfile(os.path.join(ff_dir, "model_final.pth")):
            print(f"[gss benchmark] training {ff_name}", flush=True)
            os.makedirs(ff_dir, exist_ok=True)
            start = time.perf_counter()
            log = run([args.python, "projects/GSS/train_net.py", "--config-file", FF_CONFIG, "SEED", str(seed),
                       "SOLVER.MAX_ITER", str(ff_iters), "MODEL.GSS.VQVAE.WEIGHTS", weights,
                       "OUTPUT_DIR", ff_dir], os.path.join(ff_dir, "train.log"))
            if not os.path.isfile(ff_recorded):
                _write_json(ff_recorded, _model_record(ff_name, FF_CONFIG, seed, ff_dir, log, {
                    "iters": ff_iters, "wall_seconds": time.perf_counter() - start}))
        for name, config in ((ft_name, FT_CONFIG), (f"gss_ftw_R18_seed{seed}", FTW_CONFIG)):
            _stage_three(args, name, config, seed, os.path.join(ff_dir, "model_final.pth"))


def _stage_three(args, name: str, config: str, seed: int, stage_two_weights: str) -> None:
    """Trains and records one stage-III inverse (GSS-FT or GSS-FT-W) on a frozen stage-II checkpoint."""
    recorded = os.path.join(args.recorded, f"{name}.json")
    if os.path.isfile(recorded):
        return
    print(f"[gss benchmark] training {name}", flush=True)
    output_dir = os.path.join(args.output_dir, name)
    os.makedirs(output_dir, exist_ok=True)
    start = time.perf_counter()
    log = run([args.python, "projects/GSS/train_net.py", "--config-file", config, "SEED", str(seed),
               "MODEL.WEIGHTS", stage_two_weights, "MODEL.GSS.VQVAE.WEIGHTS", "",
               "OUTPUT_DIR", output_dir], os.path.join(output_dir, "train.log"))
    _write_json(recorded, _model_record(name, config, seed, output_dir, log, {
        "iters": STAGE_THREE_ITERS, "wall_seconds": time.perf_counter() - start}))


def cost(args) -> None:
    """Train-step and inference seconds of GSS-FF / FT vs the softmax FCN-R18 (batch 16, 128², interleaved)."""
    recorded = os.path.join(args.recorded, "cost.json")
    if os.path.isfile(recorded):
        return
    from detectron2.config import get_cfg
    from detectron2.modeling import build_model
    from gmmseg_d2.config import add_gmmseg_config
    from measure import interleaved_min_times

    import gss  # noqa: F401  (registers the meta-architecture)

    torch.set_num_threads(args.threads)

    def build(config: str, *opts):
        cfg = get_cfg()
        add_gmmseg_config(cfg)
        gss.add_gss_config(cfg)
        cfg.merge_from_file(os.path.join(REPO_ROOT, config))
        cfg.merge_from_list(["MODEL.DEVICE", "cpu", *opts])
        torch.manual_seed(0)
        return build_model(cfg)

    weights = vqvae_path(args.output_dir, "maximal_distance")
    models_ = {
        "fcn_softmax": build("configs/mosaic/fcn_R18_softmax.yaml"),
        "gss_ff": build(FF_CONFIG, "MODEL.GSS.VQVAE.WEIGHTS", weights),
        "gss_ft": build(FT_CONFIG, "MODEL.GSS.VQVAE.WEIGHTS", weights),
    }
    generator = torch.Generator().manual_seed(0)
    batch = [{"image": torch.rand(3, 128, 128, generator=generator) * 255,
              "sem_seg": torch.randint(0, 8, (128, 128), generator=generator)} for _ in range(16)]
    test_batch = [{"image": record["image"]} for record in batch[:1]]
    optimizers = {name: torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4)
                  for name, model in models_.items()}

    def train_step(name):
        def step():
            model = models_[name].train()
            losses = model(batch)
            optimizers[name].zero_grad()
            sum(losses.values()).backward()
            optimizers[name].step()
        return step

    def inference(name):
        def infer():
            with torch.no_grad():
                models_[name].eval()(test_batch)
        return infer

    train_times = interleaved_min_times({name: train_step(name) for name in ("fcn_softmax", "gss_ff")},
                                        rounds=args.rounds, device=torch.device("cpu"))
    inference_times = interleaved_min_times({name: inference(name) for name in models_}, rounds=3 * args.rounds,
                                            device=torch.device("cpu"))
    _write_json(recorded, {"threads": args.threads, "rounds": args.rounds, "batch": 16, "size": 128,
                           "train_step_s": train_times, "inference_s": inference_times,
                           "parameters_M": {name: sum(p.numel() for p in m.parameters()) / 1e6
                                            for name, m in models_.items()}})


def _mean_sd(values: List[float]) -> str:
    if not values:
        return "-"
    if len(values) == 1:
        return f"{values[0]:.2f}"
    return f"{statistics.mean(values):.2f} ± {statistics.stdev(values):.2f}"


def tables(args) -> str:
    lines = []
    rows = []
    for palette, inverse_name, row_name in RECONSTRUCTION_ROWS:
        seeds = args.seeds if inverse_name in LEARNED_INVERSES else [None]
        records = [r for r in (_load_json(os.path.join(args.recorded, _reconstruction_name(palette, inverse_name, s)
                                                       + ".json")) for s in seeds) if r]
        if records:
            rows.append(f"| {row_name} | {palette} | {len(records) if inverse_name in LEARNED_INVERSES else '-'} "
                        f"| {_mean_sd([r['mIoU'] for r in records])} | {_mean_sd([r['pACC'] for r in records])} "
                        f"| {_mean_sd([r['clean_mIoU'] for r in records])} |")
    if rows:
        lines += ["| X⁻¹ | palette | inverse seeds | reconstruction mIoU | pixel acc "
                  "| X⁻¹ alone on clean maskiges, mIoU |", "|---|---|---|---|---|---|", *rows, ""]
    mosaic_models = os.path.join(REPO_ROOT, "benchmarks", "recorded", "mosaic_models")
    families = [("FCN-R18 softmax", mosaic_models, "fcn_R18_softmax_seed{}", "msp"),
                ("FCN-R18 GMM", mosaic_models, "fcn_R18_gmm_seed{}", "density"),
                ("GSS-FF-R18", args.recorded, "gss_ff_R18_seed{}", "token_msp"),
                ("GSS-FT-R18", args.recorded, "gss_ft_R18_seed{}", "token_msp"),
                ("GSS-FT-W-R18", args.recorded, "gss_ftw_R18_seed{}", "token_msp")]
    table = []
    for label, folder, pattern, score in families:
        records = [r for r in (_load_json(os.path.join(folder, pattern.format(s) + ".json")) for s in args.seeds)
                   if r]
        if not records:
            continue
        anomaly = [r["anomaly"][score] for r in records]
        table.append(f"| {label} | {len(records)} | {_mean_sd([r['mIoU'] for r in records])} "
                     f"| {_mean_sd([r['pACC'] for r in records])} | {score} "
                     f"| {_mean_sd([a['AUROC'] for a in anomaly])} | {_mean_sd([a['FPR95'] for a in anomaly])} |")
    if table:
        lines += ["| model | seeds | mIoU (val) | pixel acc | anomaly score | AUROC | FPR95 |",
                  "|---|---|---|---|---|---|---|", *table, ""]
    record = _load_json(os.path.join(args.recorded, "cost.json"))
    if record:
        train, infer = record["train_step_s"], record["inference_s"]
        lines += ["| model | train step s (batch 16) | ratio | inference s (1 image) | ratio |",
                  "|---|---|---|---|---|"]
        for name in ("fcn_softmax", "gss_ff", "gss_ft"):
            step = f"{train[name]:.3f} | {train[name] / train['fcn_softmax']:.2f}" if name in train else "- | -"
            lines.append(f"| {name} | {step} | {infer[name]:.4f} | {infer[name] / infer['fcn_softmax']:.2f} |")
    return "\n".join(lines)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--parts", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--recorded", default=os.path.join(REPO_ROOT, "benchmarks", "recorded", "gss_mosaic"))
    parser.add_argument("--output-dir", default=os.path.join(REPO_ROOT, "output", "benchmarks", "gss_mosaic"))
    parser.add_argument("--python", default=sys.executable)
    parser.add_argument("--vqvae-iters", type=int, default=1000)
    parser.add_argument("--inverse-iters", type=int, default=300)
    parser.add_argument("--ff-iters", type=int, default=0,
                        help="GSS-FF iterations (default: the FCN's 300 x its train-step time / GSS-FF's)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--table-only", action="store_true")
    args = parser.parse_args(argv)
    if not args.table_only:
        if "vqvae" in args.parts or {"reconstruction", "models", "cost"} & set(args.parts):
            train_vqvaes(args)
        # Timed first, while nothing else of this script runs.
        if "cost" in args.parts:
            cost(args)
        if "reconstruction" in args.parts:
            reconstruction(args)
        if "models" in args.parts:
            models(args)
    print(tables(args))


if __name__ == "__main__":
    main()
