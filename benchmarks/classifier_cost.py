"""What each classifier behind the seam costs: training steps and ProtoSeg's clustering.

Two parts, each writing one JSON under ``benchmarks/recorded/classifier_cost/``
(``--part``; a recorded part is skipped unless ``--force``; ``--table-only``
rebuilds the tables from the JSONs):

* ``step``: a whole training step (forward, backward, AdamW) of the same
  segmenter with the softmax, GMM and prototype classifiers, the three
  interleaved round by round (minimum over ``--rounds``), on the same batch:
  - the texture benchmark's models as trained there (configs/textures and
    projects/ProtoSeg/configs/textures; batch 16 at 64x64, 8 classes);
  - FCN-R18 at larger shapes (``--size``, ``--batch``; 150 classes, head
    width 512, the paper's GMM D = 64 / M = 5 and ProtoSeg's D = the head's
    width / M = 10), where the classifiers' per-pixel work is no longer
    small against the backbone.
* ``clustering``: ProtoSeg's online clustering (Algorithm 1: cosines, Sinkhorn,
  argmax) of 10K pixels into 10 prototypes, as the supplement times it
  (~2.5 ms on a GPU), here on ``--device``; and the same with the cosine
  computation of D = 720 embeddings included.

    python benchmarks/classifier_cost.py                 # every part not yet recorded
    python benchmarks/classifier_cost.py --table-only
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from typing import Dict, List

import torch
import torch.nn.functional as F

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, REPO)
sys.path.insert(0, os.path.join(REPO, "projects", "ProtoSeg"))

from measure import interleaved_min_times  # noqa: E402

RECORDED = os.path.join(REPO, "benchmarks", "recorded", "classifier_cost")
PARTS = ("step", "clustering")
CLASSIFIERS = ("softmax", "gmm", "prototype")


def _cfg(config: str, opts: List[str]):
    from detectron2.config import get_cfg

    import protoseg
    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    protoseg.add_protoseg_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, config))
    cfg.merge_from_list(opts)
    return cfg


def _texture_config(family: str, classifier: str) -> str:
    if classifier == "prototype":
        return os.path.join("projects", "ProtoSeg", "configs", "textures", f"{family}_proto.yaml")
    return os.path.join("configs", "textures", f"{family}_{classifier}.yaml")


def _batch(batch: int, size: int, num_classes: int, mask_former: bool, seed: int = 0) -> List[Dict]:
    """Images with a few rectangular class regions per image (labels and mask targets)."""
    from detectron2.structures import Instances

    generator = torch.Generator().manual_seed(seed)
    records = []
    for _ in range(batch):
        labels = torch.full((size, size), int(torch.randint(num_classes, (1,), generator=generator)))
        for _ in range(3):
            y, x = torch.randint(0, size // 2, (2,), generator=generator).tolist()
            labels[y:y + size // 2, x:x + size // 2] = int(torch.randint(num_classes, (1,), generator=generator))
        record = {"image": torch.randint(0, 256, (3, size, size), generator=generator, dtype=torch.uint8).float(),
                  "sem_seg": labels, "height": size, "width": size}
        if mask_former:
            classes = labels.unique()
            instances = Instances((size, size))
            instances.gt_classes = classes
            instances.gt_masks = torch.stack([labels == c for c in classes])
            record["instances"] = instances
        records.append(record)
    return records


def _step_fn(cfg, batch):
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg).train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        sum(model(batch).values()).backward()
        optimizer.step()

    return step


def part_step(args) -> dict:
    device = torch.device(args.device)
    settings = []
    for family in ("fcn_R18", "deeplabv3plus_R18", "maskformer2_R18"):
        mask_former = family.startswith("maskformer")
        batch = _batch(16, 64, 8, mask_former)
        fns = {c: _step_fn(_cfg(_texture_config(family, c), ["MODEL.DEVICE", str(device)]), batch)
               for c in CLASSIFIERS}
        times = interleaved_min_times(fns, args.rounds, device)
        settings.append({"setting": f"textures {family} (batch 16, 64x64, 8 classes)", "seconds": times})
        print(settings[-1], flush=True)
    large = ["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "512",
             "MODEL.PROTO.EMBED_DIM", "512", "MODEL.PROTO.NUM_PROTOTYPES", "10", "MODEL.GMM.EMBED_DIM", "64",
             "MODEL.GMM.NUM_COMPONENTS", "5", "MODEL.GMM.MEMORY_SIZE", "32000", "MODEL.DEVICE", str(device)]
    batch = _batch(args.batch, args.size, 150, False)
    fns = {c: _step_fn(_cfg(_texture_config("fcn_R18", c), large), batch) for c in CLASSIFIERS}
    times = interleaved_min_times(fns, args.rounds, device)
    settings.append({"setting": f"FCN-R18, batch {args.batch} at {args.size}x{args.size}, 150 classes, head 512",
                     "seconds": times})
    print(settings[-1], flush=True)
    return {"rounds": args.rounds, "settings": settings}


def table_step(result: dict) -> str:
    lines = ["| setting | softmax step | GMM step | / softmax | prototype step | / softmax |",
             "|---|---|---|---|---|---|"]
    for row in result["settings"]:
        t = row["seconds"]
        lines.append(f"| {row['setting']} | {t['softmax']:.3f} s | {t['gmm']:.3f} s | {t['gmm'] / t['softmax']:.2f} "
                     f"| {t['prototype']:.3f} s | {t['prototype'] / t['softmax']:.2f} |")
    lines += ["", f"Minimum over {result['rounds']} rounds, the three classifiers interleaved in each round."]
    return "\n".join(lines)


def part_clustering(args) -> dict:
    from gmmseg_d2.modeling.gmm.sinkhorn import segmented_sinkhorn_transport_plan

    device = torch.device(args.device)
    generator = torch.Generator().manual_seed(0)
    pixels, prototypes, dim = 10000, 10, 720
    embeddings = F.normalize(torch.randn(pixels, dim, generator=generator), dim=1).to(device)
    centres = F.normalize(torch.randn(prototypes, dim, generator=generator), dim=1).to(device)
    cosines = embeddings @ centres.T
    segments = torch.zeros(pixels, dtype=torch.long, device=device)

    def sinkhorn_only():
        segmented_sinkhorn_transport_plan(cosines, segments, 3, 0.05, scale_by_max_abs=False).argmax(dim=1)

    def with_cosines():
        segmented_sinkhorn_transport_plan(embeddings @ centres.T, segments, 3, 0.05,
                                          scale_by_max_abs=False).argmax(dim=1)

    times = interleaved_min_times({"sinkhorn": sinkhorn_only, "cosines+sinkhorn": with_cosines}, args.rounds * 10,
                                  device)
    return {"pixels": pixels, "prototypes": prototypes, "dim": dim, "rounds": args.rounds * 10, "seconds": times}


def table_clustering(result: dict) -> str:
    t = result["seconds"]
    return "\n".join([
        "| work | time |", "|---|---|",
        f"| Sinkhorn (3 iterations, float64) + argmax, {result['pixels']} x {result['prototypes']} | "
        f"{t['sinkhorn'] * 1e3:.2f} ms |",
        f"| the same with the cosines of D = {result['dim']} embeddings | {t['cosines+sinkhorn'] * 1e3:.2f} ms |",
        "", f"Minimum over {result['rounds']} calls.",
    ])


TABLES = {"step": table_step, "clustering": table_clustering}
RUNS = {"step": part_step, "clustering": part_clustering}


def _environment(device: torch.device) -> dict:
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    return {"device": name, "threads": torch.get_num_threads(), "torch": torch.__version__}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--recorded", default=RECORDED)
    parser.add_argument("--force", action="store_true")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--rounds", type=int, default=5)
    args = parser.parse_args(argv)
    os.makedirs(args.recorded, exist_ok=True)
    for part in args.part:
        path = os.path.join(args.recorded, f"{part}{'' if args.device == 'cpu' else '_' + args.device}.json")
        if not args.table_only and (args.force or not os.path.exists(path)):
            started = time.time()
            result = RUNS[part](args)
            result["environment"] = _environment(torch.device(args.device))
            result["seconds_total"] = time.time() - started
            with open(path + ".tmp", "w") as f:
                json.dump(result, f, indent=1)
            os.replace(path + ".tmp", path)
        if os.path.exists(path):
            with open(path) as f:
                result = json.load(f)
            print(f"\n### {part} ({result['environment']['device']}, {result['environment']['threads']} threads)\n")
            print(TABLES[part](result))


if __name__ == "__main__":
    main()
