#!/usr/bin/env python
"""Train the small maskige VQ-VAE (MODEL.GSS.VQVAE.NAME "maskige") on a dataset's label maps.

Stage I of GSS when the DALL-E dVAE's weights are not at hand. From the
repository root:

    python projects/GSS/tools/train_vqvae.py --config-file projects/GSS/configs/mosaic/gss_ff_R18.yaml \
        --output output/mosaic/gss_vqvae/vqvae.pth

It reads the config's palette (MODEL.GSS.MASKIGE), LABEL_UPSAMPLE and the
VQ-VAE's sizes, trains on random crops of DATASETS.TRAIN's label maps
(upsampled and painted as in stage II), then reports the reconstruction mIoU
of DATASETS.TEST[0] with the nearest-colour inverse and the codebook usage.
The weights, the metrics and the arguments are written to --output; the
metrics also to ``<output>.json``.
"""
import argparse
import json
import logging
import os
import sys
import time

import numpy as np
import torch

PROJECT_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if PROJECT_ROOT not in sys.path:
    sys.path.insert(0, PROJECT_ROOT)

import gmmseg_d2  # noqa: E402,F401  (registers the datasets)
from detectron2.config import get_cfg  # noqa: E402
from detectron2.data import DatasetCatalog  # noqa: E402
from detectron2.utils.logger import setup_logger  # noqa: E402
from gmmseg_d2.config import add_gmmseg_config  # noqa: E402
from gmmseg_d2.utils.io import read_label_map  # noqa: E402

from gss import (  # noqa: E402
    Maskige, MaskigeVQVAE, NearestColourInverse, add_gss_config, build_palette, save_vqvae, upsample_labels,
)
from gss.reconstruction import ConfusionMatrix, pad_labels, reconstruct_labels  # noqa: E402
from gss.vqvae import vqvae_training_losses  # noqa: E402

logger = logging.getLogger("gss.train_vqvae")


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--config-file", required=True, help="a GSS config (its MODEL.GSS.* and DATASETS)")
    parser.add_argument("--output", required=True, help="where to write the weights (.pth)")
    parser.add_argument("--iters", type=int, default=1500)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--crop", type=int, default=64, help="label crop size before upsampling (multiple of 4)")
    parser.add_argument("--lr", type=float, default=2e-3)
    parser.add_argument("--restart-every", type=int, default=100,
                        help="steps between re-seeding unused codes from encoder outputs (0: never)")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--eval-images", type=int, default=0, help="images of DATASETS.TEST[0] to score (0: all)")
    parser.add_argument("opts", nargs=argparse.REMAINDER, help="config overrides KEY VALUE ...")
    return parser.parse_args(argv)


def load_config(config_file: str, opts):
    cfg = get_cfg()
    add_gmmseg_config(cfg)
    add_gss_config(cfg)
    cfg.merge_from_file(config_file)
    cfg.merge_from_list(opts)
    cfg.freeze()
    return cfg


def load_label_maps(dataset_name: str, limit: int = 0):
    records = DatasetCatalog.get(dataset_name)
    if limit:
        records = records[:limit]
    maps = []
    for record in records:
        if "sem_seg_file_name" not in record:
            raise ValueError(f"dataset {dataset_name} has no sem_seg_file_name: a VQ-VAE of masks needs label maps")
        maps.append(torch.from_numpy(read_label_map(record["sem_seg_file_name"])))
    return maps


def random_crops(label_maps, batch_size: int, crop: int, ignore_value: int, generator: torch.Generator):
    """``(batch_size, crop, crop)`` crops of random label maps (padded with ignore if smaller)."""
    crops = []
    for index in torch.randint(len(label_maps), (batch_size,), generator=generator).tolist():
        label = pad_labels(label_maps[index][None], crop, ignore_value)[0] if min(label_maps[index].shape) < crop \
            else label_maps[index]
        top = int(torch.randint(label.shape[0] - crop + 1, (1,), generator=generator))
        left = int(torch.randint(label.shape[1] - crop + 1, (1,), generator=generator))
        crop_ = label[top:top + crop, left:left + crop]
        if torch.rand((), generator=generator) < 0.5:
            crop_ = crop_.flip(-1)
        crops.append(crop_)
    return torch.stack(crops)


def train(cfg, args):
    gss = cfg.MODEL.GSS
    if args.crop % (8 // gss.LABEL_UPSAMPLE):
        raise ValueError(f"--crop {args.crop} must be a multiple of {8 // gss.LABEL_UPSAMPLE} "
                         "(the token stride in label pixels)")
    torch.manual_seed(args.seed)
    generator = torch.Generator().manual_seed(args.seed)
    palette = build_palette(gss.MASKIGE.PALETTE_KIND, gss.NUM_CLASSES, gss.MASKIGE.PALETTE, seed=gss.MASKIGE.SEED,
                            low=gss.MASKIGE.LOW, high=gss.MASKIGE.HIGH, jitter=gss.MASKIGE.JITTER)
    maskige = Maskige(palette)
    model = MaskigeVQVAE(gss.VQVAE.VOCAB_SIZE, gss.VQVAE.CODE_DIM, gss.VQVAE.HIDDEN_DIM)
    optimizer = torch.optim.Adam(model.parameters(), lr=args.lr)
    scheduler = torch.optim.lr_scheduler.CosineAnnealingLR(optimizer, args.iters)
    train_maps = load_label_maps(cfg.DATASETS.TRAIN[0])
    logger.info("training on %d label maps of %s, %d iterations", len(train_maps), cfg.DATASETS.TRAIN[0], args.iters)
    used = torch.zeros(model.vocab_size, dtype=torch.bool)
    start = time.perf_counter()
    for step in range(1, args.iters + 1):
        labels = random_crops(train_maps, args.batch_size, args.crop, gss.IGNORE_VALUE, generator)
        batch = maskige(upsample_labels(labels, gss.LABEL_UPSAMPLE, gss.NUM_CLASSES, gss.IGNORE_VALUE))
        losses, tokens = vqvae_training_losses(model, batch)
        loss = sum(losses.values())
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()
        used[tokens.unique()] = True
        if args.restart_every and step % args.restart_every == 0 and step < 0.8 * args.iters:
            # Codes no encoder output chose since the last restart would never
            # learn: move them onto random encoder outputs of this batch.
            with torch.no_grad():
                dead = (~used).nonzero()[:, 0]
                if len(dead):
                    codes = model.encoder_output(batch).permute(0, 2, 3, 1).reshape(-1, model.codebook.embedding_dim)
                    picks = torch.randint(len(codes), (len(dead),), generator=generator)
                    model.codebook.weight[dead] = codes[picks]
            used.zero_()
        if step % 100 == 0 or step == args.iters:
            logger.info("step %d/%d  %s  %.1f s", step, args.iters,
                        "  ".join(f"{name} {value.item():.4f}" for name, value in losses.items()),
                        time.perf_counter() - start)
    return model.eval(), maskige, time.perf_counter() - start


@torch.no_grad()
def evaluate(cfg, model, maskige, limit: int = 0):
    """Reconstruction mIoU of DATASETS.TEST[0] (nearest colour) and the share of codes its tokens use."""
    gss = cfg.MODEL.GSS
    inverse = NearestColourInverse(maskige.palette)
    confusion = ConfusionMatrix(gss.NUM_CLASSES, gss.IGNORE_VALUE)
    codes_used = torch.zeros(model.vocab_size, dtype=torch.bool)
    for label in load_label_maps(cfg.DATASETS.TEST[0], limit):
        label = label[None]
        confusion.update(reconstruct_labels(label, model, maskige, inverse, gss.LABEL_UPSAMPLE, gss.IGNORE_VALUE),
                         label)
        padded = pad_labels(label, 8 // gss.LABEL_UPSAMPLE, gss.IGNORE_VALUE)
        tokens = model.encode(maskige(upsample_labels(padded, gss.LABEL_UPSAMPLE, gss.NUM_CLASSES, gss.IGNORE_VALUE)))
        codes_used[tokens.unique()] = True
    metrics = confusion.metrics()
    metrics["codebook_usage"] = float(codes_used.float().mean() * 100)
    return metrics


def main(argv=None):
    args = parse_args(argv)
    setup_logger(name="gss")
    cfg = load_config(args.config_file, args.opts)
    if cfg.MODEL.GSS.VQVAE.NAME != "maskige":
        raise ValueError(f"{args.config_file} sets MODEL.GSS.VQVAE.NAME {cfg.MODEL.GSS.VQVAE.NAME!r}; this command "
                         "trains the 'maskige' VQ-VAE (override: MODEL.GSS.VQVAE.NAME maskige)")
    model, maskige, seconds = train(cfg, args)
    metrics = evaluate(cfg, model, maskige, args.eval_images)
    metrics.update(train_seconds=seconds, dataset=cfg.DATASETS.TEST[0])
    logger.info("reconstruction on %s: mIoU %.2f, pixel accuracy %.2f, codebook usage %.1f %%",
                cfg.DATASETS.TEST[0], metrics["mIoU"], metrics["pACC"], metrics["codebook_usage"])
    os.makedirs(os.path.dirname(os.path.abspath(args.output)), exist_ok=True)
    save_vqvae(model, args.output, extra={"metrics": metrics, "args": {k: v for k, v in vars(args).items()
                                                                        if k != "opts"},
                                          "palette": (maskige.palette * 255).round().to(torch.uint8)})
    with open(args.output + ".json", "w") as handle:
        json.dump(metrics, handle, indent=1)
    print(json.dumps(metrics, indent=1))
    return metrics


if __name__ == "__main__":
    np.set_printoptions(precision=3)
    main()
