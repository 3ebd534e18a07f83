"""The GMM at real-dataset shapes: memory kinds, M-step equivalence, step cost.

Four parts, each writing one JSON under ``benchmarks/recorded/gmm_memory_scale/``
(``--part``; a part already recorded is skipped unless ``--force``; the
markdown tables are rebuilt from the JSONs with ``--table-only``):

* ``memory``: bytes of the GMM memory (what every GPU holds and every
  checkpoint stores) for the ``ring`` memory in float32 and float16 and the
  ``stats`` memory, at ADE20K (C=150, M=8), COCO-Stuff (171, 5) and Cityscapes
  (19, 5), K = 32000, D = 64; counted from the buffers of memories built on
  the ``meta`` device, and checked against the size of a real ``torch.save``
  file at the Cityscapes shapes.
* ``equivalence``: the same stream of features into a ring and a stats memory
  (Cityscapes shapes, official K and per-step cap, >= 2000 steps; classes
  appear irregularly with any number of pixels), and at every M-step (every
  5 steps) the largest difference of the M-step's estimates (mean direction
  and ``sqrt(var + 1e-2)``) between the two. Also a constant-count stream
  (every component gets the cap of 20 at every step), where they must agree
  up to float rounding.
* ``step``: one training step's GMM work at ADE20K shapes (C=150, M=8,
  K=32000, D=64; batch 16 at 512x512) with features at stride 4 (SegFormer,
  262144 pixels) and stride 8 (DeepLabV3+/FCN, 65536 pixels): the E-step +
  memory update (every step) and the M-step (every 5 steps, all pending
  components refitted), per memory kind, against a whole training step of an
  FCN-R18 softmax model (forward, backward, optimizer) at the same shapes.
* ``maskformer``: a training step of Mask2Former-R18 with the GMM query head
  vs the softmax one at ADE20K shapes (150 classes, 100 queries, 512x512),
  per memory kind.

Usage::

    python benchmarks/gmm_memory_scale.py                      # every part not yet recorded
    python benchmarks/gmm_memory_scale.py --part step --batch 16
    python benchmarks/gmm_memory_scale.py --table-only

Times are the median of ``--repeats`` calls after one warm-up, on whatever
device ``--device`` names; ratios compare numbers measured in the same run.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import tempfile
import time
from typing import Callable, Dict, List

import torch
import torch.nn.functional as F

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the repository

from gmmseg_d2.modeling.gmm import (  # noqa: E402
    ClassComponentMemory,
    ClassComponentStatsMemory,
    GaussianMixtureClassifier,
    build_class_component_memory,
)

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
RECORDED = os.path.join(REPO, "benchmarks", "recorded", "gmm_memory_scale")
PARTS = ("memory", "equivalence", "step", "maskformer")
K, D, CAP = 32000, 64, 20
DATASETS = {"ADE20K": (150, 8), "COCO-Stuff": (171, 5), "Cityscapes": (19, 5)}
KINDS = {"ring-fp32": ("ring", torch.float32), "ring-fp16": ("ring", torch.float16), "stats": ("stats", torch.float32)}


def _environment(device: torch.device) -> dict:
    return {
        "torch": torch.__version__,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
        "threads": torch.get_num_threads(),
        "command": " ".join([os.path.basename(sys.executable), *sys.argv]),
    }


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def median_time(fn: Callable[[], None], device: torch.device, repeats: int, setup=None) -> float:
    """Median seconds of ``fn()`` over ``repeats`` calls after one warm-up; ``setup()`` untimed before each."""
    times = []
    for i in range(repeats + 1):
        if setup is not None:
            setup()
        _sync(device)
        start = time.perf_counter()
        fn()
        _sync(device)
        if i:
            times.append(time.perf_counter() - start)
    return statistics.median(times)


def buffer_bytes(module: torch.nn.Module) -> int:
    return sum(b.numel() * b.element_size() for b in module.buffers())


# ---------------------------------------------------------------------- memory


def part_memory(args) -> dict:
    rows = []
    for dataset, (num_classes, num_components) in DATASETS.items():
        for name, (kind, dtype) in KINDS.items():
            with torch.device("meta"):
                memory = build_class_component_memory(kind, num_classes, num_components, K, D, CAP, dtype,
                                                      init="empty")
            rows.append(dict(dataset=dataset, classes=num_classes, components=num_components, kind=name,
                             bytes=buffer_bytes(memory)))
    # A real checkpoint at the Cityscapes shapes, for the file-size overhead.
    files = {}
    num_classes, num_components = DATASETS["Cityscapes"]
    for name, (kind, dtype) in KINDS.items():
        memory = build_class_component_memory(kind, num_classes, num_components, K, D, CAP, dtype, init="empty")
        with tempfile.TemporaryDirectory(dir=args.scratch) as scratch:
            path = os.path.join(scratch, "memory.pth")
            torch.save(memory.state_dict(), path)
            files[name] = dict(file_bytes=os.path.getsize(path), buffer_bytes=buffer_bytes(memory))
        del memory
    return dict(rows=rows, cityscapes_files=files)


def table_memory(result: dict) -> str:
    lines = ["| dataset (C, M) | ring fp32 | ring fp16 | stats | stats / ring fp32 |", "|---|---|---|---|---|"]
    by = {(r["dataset"], r["kind"]): r for r in result["rows"]}
    for dataset, (c, m) in DATASETS.items():
        sizes = [by[(dataset, kind)]["bytes"] for kind in KINDS]
        lines.append(f"| {dataset} ({c}, {m}) | " + " | ".join(f"{b / 1e9:.2f} GB" for b in sizes)
                     + f" | {sizes[2] / sizes[0]:.3f} |")
    files = result["cityscapes_files"]
    lines.append("")
    lines.append("Checkpoint files at the Cityscapes shapes (`torch.save` of the memory's state dict): "
                 + ", ".join(f"{k} {v['file_bytes'] / 1e6:.1f} MB (buffers {v['buffer_bytes'] / 1e6:.1f} MB)"
                             for k, v in files.items()) + ".")
    return "\n".join(lines)


# ----------------------------------------------------------------- equivalence


def _stream_step(step: int, num_classes: int, num_components: int, generator: torch.Generator,
                 constant: bool):
    """Features and flat components of one step.

    ``constant``: every component gets exactly ``CAP`` features. Otherwise
    class ``c`` is present with probability ``0.05 + 0.9 c / C`` and brings a
    log-uniform number of pixels (1 to 5000), spread over its components
    unevenly (so that small classes leave some components with fewer than
    the cap); features drift slowly, so that the window matters.
    """
    if constant:
        components = torch.arange(num_classes * num_components).repeat_interleave(CAP)
    else:
        parts = []
        for c in range(num_classes):
            if torch.rand((), generator=generator) > 0.05 + 0.9 * c / num_classes:
                continue
            pixels = int(torch.exp(torch.rand((), generator=generator) * 8.5))
            weights = torch.rand(num_components, generator=generator) ** 2 + 1e-3
            parts.append(c * num_components + torch.multinomial(weights, pixels, True, generator=generator))
        components = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.long)
    centers = torch.randn(num_classes * num_components, D, generator=torch.Generator().manual_seed(0))
    drift = torch.randn(num_classes * num_components, D, generator=torch.Generator().manual_seed(1))
    phase = step / 500.0
    features = centers[components] + phase * drift[components] + 2.0 * torch.randn(
        components.numel(), D, generator=generator)
    return F.normalize(features, dim=-1), components


def _compare(ring, stats, floor: float = 1e-2) -> Dict[str, float]:
    """Largest differences of the window mean ``S1 / n`` and of the M-step estimates, over the pending components."""
    mask = ring.pending | stats.pending
    n_r, s1_r, s2_r = ring.moments(mask)
    n_s, s1_s, s2_s = stats.moments(mask)
    ring.clear_pending()
    stats.clear_pending()
    from gmmseg_d2.modeling.gmm import direction_and_variance

    direction_r, variance_r = direction_and_variance(n_r, s1_r, s2_r)
    direction_s, variance_s = direction_and_variance(n_s, s1_s, s2_s)
    std_r, std_s = (variance_r + floor).sqrt(), (variance_s + floor).sqrt()
    n = n_r.clamp_min(1)[..., None]
    # Components whose window holds real features only (the random start
    # pushed out): where the M-step estimates mean something. Elsewhere the
    # mean of mostly random unit vectors is short, and its direction moves
    # with any rounding.
    real = (mask & (ring.total_written >= ring.capacity))[..., None]
    direction_gap = (direction_r - direction_s).abs()
    std_gap = (std_r - std_s).abs()
    return dict(window_mean=float(((s1_r - s1_s) / n).abs().max()),
                direction=float(direction_gap.max()), std=float(std_gap.max()),
                direction_real=float(torch.where(real, direction_gap, 0.0).max()),
                std_real=float(torch.where(real, std_gap, 0.0).max()),
                refit=int(mask.sum()), refit_real=int(real.sum()))


#: Equivalence streams: (name, kind of stream, K). The short window (K = 2000,
#: the texture configs' is 1000) turns over many times in the run, so that
#: most refits read windows of real features only.
EQUIVALENCE_STREAMS = (("constant", "constant", K), ("irregular", "irregular", K),
                       ("irregular, K = 2000", "irregular", 2000))


def part_equivalence(args) -> dict:
    num_classes, num_components = DATASETS["Cityscapes"]
    result = {"classes": num_classes, "components": num_components, "cap": CAP,
              "steps": args.steps, "update_interval": 5}
    for name, stream, capacity in EQUIVALENCE_STREAMS:
        torch.manual_seed(0)
        ring = ClassComponentMemory(num_classes, num_components, capacity, D, CAP, init="random")
        torch.manual_seed(0)
        stats = ClassComponentStatsMemory(num_classes, num_components, capacity, D, CAP, init="random")
        generator = torch.Generator().manual_seed(2)
        worst = {"window_mean": 0.0, "direction": 0.0, "std": 0.0, "direction_real": 0.0, "std_real": 0.0}
        per_m_step = []
        written = 0
        for step in range(args.steps):
            features, components = _stream_step(step, num_classes, num_components, generator,
                                                stream == "constant")
            ring.push(features, components)
            stats.push(features, components)
            written += components.numel()
            if step % 5 == 0:
                diff = _compare(ring, stats)
                per_m_step.append(diff)
                worst = {k: max(worst[k], diff[k]) for k in worst}
        result[name] = dict(
            capacity=capacity,
            max_abs_window_mean=worst["window_mean"], max_abs_direction=worst["direction"],
            max_abs_std=worst["std"], max_abs_direction_real=worst["direction_real"],
            max_abs_std_real=worst["std_real"], real_refits=sum(d["refit_real"] for d in per_m_step),
            median_abs_direction=statistics.median(d["direction"] for d in per_m_step),
            median_abs_std=statistics.median(d["std"] for d in per_m_step),
            m_steps=len(per_m_step), exact_m_steps=sum(d["std"] < 1e-5 for d in per_m_step),
            features_offered=written, features_written=int(ring.total_written.sum()),
            min_written_per_component=int(ring.total_written.min()),
            bound_mean_per_dim=CAP / (2 * capacity),
        )
        print(name, result[name], flush=True)
        del ring, stats
    return result


def table_equivalence(result: dict) -> str:
    lines = ["| stream | K | M-steps | max abs diff of S1 / n (bound B / 2K) | mean direction: max (median) abs diff "
             "| sigma: max (median) abs diff | the same over refits of real-feature windows (refits) "
             "| M-steps equal (< 1e-5) |", "|---|---|---|---|---|---|---|---|"]
    for name, _, _ in EQUIVALENCE_STREAMS:
        r = result[name]
        real = (f"direction {r['max_abs_direction_real']:.1e}, sigma {r['max_abs_std_real']:.1e} ({r['real_refits']})"
                if r["real_refits"] else "none reached")
        lines.append(f"| {name} | {r['capacity']} | {r['m_steps']} | {r['max_abs_window_mean']:.1e} "
                     f"({r['bound_mean_per_dim']:.1e}) | {r['max_abs_direction']:.1e} "
                     f"({r['median_abs_direction']:.1e}) | {r['max_abs_std']:.1e} ({r['median_abs_std']:.1e}) | "
                     f"{real} | {r['exact_m_steps']} / {r['m_steps']} |")
    lines.append("")
    lines.append(f"Cityscapes shapes (C = {result['classes']}, M = {result['components']}), D = {D}, cap "
                 f"{result['cap']} features per component per step (= the chunk size B), {result['steps']} steps, "
                 f"an M-step every 5, both memories from the same random start.")
    return "\n".join(lines)


# ------------------------------------------------------------------------ step


def _ade_labels(batch: int, height: int, width: int, num_classes: int, generator: torch.Generator) -> torch.Tensor:
    """A blocky label map per image: ~15 of the classes in 16x16-cell regions, 5 % ignore."""
    labels = []
    for _ in range(batch):
        present = torch.randperm(num_classes, generator=generator)[:15]
        cells = present[torch.randint(0, 15, (16, 16), generator=generator)]
        image = cells.repeat_interleave(height // 16, 0).repeat_interleave(width // 16, 1)
        image[torch.rand(height, width, generator=generator) < 0.05] = 255
        labels.append(image)
    return torch.stack(labels)


def _gmm_work_times(kind: str, dtype, stride: int, args, device) -> dict:
    num_classes, num_components = DATASETS["ADE20K"]
    torch.manual_seed(0)
    classifier = GaussianMixtureClassifier(
        in_channels=256, num_classes=num_classes, embed_dim=D, num_components=num_components, memory_size=K,
        max_samples_per_component=CAP, memory_kind=kind, memory_dtype=dtype,
        # Real training classifies most pixels correctly; storing every
        # labelled pixel gives the memory update its full (worst-case) volume.
        memory_samples="all",
    ).to(device)
    side = args.size // stride
    generator = torch.Generator().manual_seed(0)
    labels = _ade_labels(args.batch, side, side, num_classes, generator).reshape(-1).to(device)
    x = torch.randn(labels.numel(), 256, generator=generator).to(device)
    classifier.train()
    with torch.no_grad():
        outputs = classifier(x)

    def estep_and_push():
        classifier.iteration.fill_(1)  # never an M-step here: timed on its own
        classifier.em_step(outputs, labels)

    def mark_all_pending():
        classifier.memory.pending.fill_(True)

    estep = median_time(estep_and_push, device, args.repeats)
    mstep = median_time(classifier.maximization_step, device, args.repeats, setup=mark_all_pending)
    result = dict(kind=kind if kind == "stats" else f"ring-{str(dtype).split('.')[-1].replace('float', 'fp')}",
                  stride=stride, pixels=labels.numel(), estep_push_s=estep, mstep_s=mstep,
                  per_step_s=estep + mstep / 5, memory_bytes=buffer_bytes(classifier.memory))
    del classifier, outputs
    return result


def _fcn_softmax_step_time(stride: int, args, device) -> float:
    """A whole training step of FCN-R18 softmax, 150 classes, batch at --size (output stride 8)."""
    from detectron2.config import get_cfg

    from gmmseg_d2.config import add_gmmseg_config

    cfg = get_cfg()
    add_gmmseg_config(cfg)
    cfg.merge_from_file(os.path.join(REPO, "configs", "textures", "fcn_R18_softmax.yaml"))
    cfg.merge_from_list(["MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150", "MODEL.SEM_SEG_HEAD.CONVS_DIM", "512",
                         "MODEL.DEVICE", str(device)])
    generator = torch.Generator().manual_seed(0)
    labels = _ade_labels(args.batch, args.size, args.size, 150, generator)
    batch = [{"image": torch.randint(0, 256, (3, args.size, args.size), generator=generator, dtype=torch.uint8)
              .float(), "sem_seg": labels[i], "height": args.size, "width": args.size} for i in range(args.batch)]
    seconds, _ = _training_step_time(cfg, batch, device, args.repeats)
    return seconds


def _training_step_time(cfg, batch: list, device: torch.device, repeats: int):
    """Median seconds of a whole training step (forward, backward, AdamW) of ``build_model(cfg)``; and the model."""
    from detectron2.modeling import build_model

    torch.manual_seed(0)
    model = build_model(cfg)
    model.train()
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

    def step():
        optimizer.zero_grad(set_to_none=True)
        losses = model(batch)
        sum(losses.values()).backward()
        optimizer.step()

    return median_time(step, device, repeats), model


def part_step(args) -> dict:
    device = torch.device(args.device)
    rows = []
    for stride in (4, 8):
        for name, (kind, dtype) in KINDS.items():
            row = _gmm_work_times(kind, dtype, stride, args, device)
            print(row, flush=True)
            rows.append(row)
    fcn = _fcn_softmax_step_time(8, args, device)
    print("fcn softmax step", fcn, flush=True)
    return dict(batch=args.batch, size=args.size, classes=150, components=8, capacity=K, rows=rows,
                fcn_r18_softmax_step_s=fcn)


def table_step(result: dict) -> str:
    fcn = result["fcn_r18_softmax_step_s"]
    lines = [f"| features | memory | E-step + memory update | M-step (all pending) | GMM work per step "
             f"(E + M/5) | / FCN-R18 softmax step ({fcn:.1f} s) |", "|---|---|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| stride {r['stride']} ({r['pixels']} px) | {r['kind']} | {r['estep_push_s']:.2f} s | "
                     f"{r['mstep_s']:.2f} s | {r['per_step_s']:.2f} s | {r['per_step_s'] / fcn:.2f} |")
    return "\n".join(lines)


# ------------------------------------------------------------------ maskformer


#: The texture configs' Mask2Former is shrunk for a CPU; these restore the
#: official ADE20K sizes (Mask2Former's R50 config) on its ResNet-18.
MASK2FORMER_OFFICIAL_SIZES = [
    "MODEL.SEM_SEG_HEAD.CONVS_DIM", "256", "MODEL.SEM_SEG_HEAD.MASK_DIM", "256",
    "MODEL.MASK_FORMER.HIDDEN_DIM", "256", "MODEL.MASK_FORMER.DIM_FEEDFORWARD", "2048",
    "MODEL.MASK_FORMER.DEC_LAYERS", "10", "MODEL.MASK_FORMER.TRAIN_NUM_POINTS", "12544",
]


def part_maskformer(args) -> dict:
    from detectron2.config import get_cfg

    from gmmseg_d2.config import add_gmmseg_config

    device = torch.device(args.device)
    configs = os.path.join(REPO, "configs", "textures")
    generator = torch.Generator().manual_seed(0)
    labels = _ade_labels(args.mf_batch, args.size, args.size, 150, generator)
    batch = []
    for i in range(args.mf_batch):
        # The semantic mapper's targets: one binary mask per class present.
        classes = [int(c) for c in torch.unique(labels[i]) if c != 255]
        from detectron2.structures import Instances

        instances = Instances((args.size, args.size))
        instances.gt_classes = torch.tensor(classes, dtype=torch.long)
        instances.gt_masks = torch.stack([labels[i] == c for c in classes])
        batch.append({"image": torch.randint(0, 256, (3, args.size, args.size), generator=generator,
                                             dtype=torch.uint8).float(),
                      "instances": instances, "sem_seg": labels[i], "height": args.size, "width": args.size})
    rows = []
    for name, config, opts in [
        ("softmax", "maskformer2_R18_softmax.yaml", []),
        ("gmm ring", "maskformer2_R18_gmm.yaml", ["MODEL.GMM.MEMORY_KIND", "ring"]),
        ("gmm stats", "maskformer2_R18_gmm.yaml", ["MODEL.GMM.MEMORY_KIND", "stats"]),
    ]:
        cfg = get_cfg()
        add_gmmseg_config(cfg)
        cfg.merge_from_file(os.path.join(configs, config))
        cfg.merge_from_list([*MASK2FORMER_OFFICIAL_SIZES,
                             "MODEL.SEM_SEG_HEAD.NUM_CLASSES", "150", "MODEL.MASK_FORMER.NUM_OBJECT_QUERIES", "100",
                             "MODEL.GMM.QUERY.MEMORY_SIZE", "5000", "MODEL.GMM.NUM_COMPONENTS", "8",
                             "MODEL.DEVICE", str(device), *opts])
        seconds, model = _training_step_time(cfg, batch, device, args.repeats)
        memory = [m for m in model.modules() if hasattr(m, "chunk_sum") or hasattr(m, "features")
                  and isinstance(getattr(m, "features"), torch.Tensor)]
        rows.append(dict(head=name, step_s=seconds,
                         memory_bytes=sum(buffer_bytes(m) for m in memory)))
        print(rows[-1], flush=True)
        del model
    return dict(batch=args.mf_batch, size=args.size, classes=150, queries=100, repeats=args.repeats, rows=rows)


def table_maskformer(result: dict) -> str:
    base = result["rows"][0]["step_s"]
    lines = ["| class head | training step | / softmax | query memory |", "|---|---|---|---|"]
    for r in result["rows"]:
        lines.append(f"| {r['head']} | {r['step_s']:.2f} s | {r['step_s'] / base:.2f} | "
                     f"{r['memory_bytes'] / 1e6:.0f} MB |")
    lines.append("")
    lines.append(f"Mask2Former on ResNet-18 at the official sizes (hidden 256, 10 decoder layers, FFN 2048, "
                 f"12544 points), 150 classes, 100 queries, M = 8, query memory K = 5000, "
                 f"batch {result['batch']} at {result['size']}x{result['size']}; median of "
                 f"{result.get('repeats', '?')} steps after a warm-up.")
    return "\n".join(lines)


# ------------------------------------------------------------------------ main

TABLES = {"memory": table_memory, "equivalence": table_equivalence, "step": table_step,
          "maskformer": table_maskformer}
RUNS = {"memory": part_memory, "equivalence": part_equivalence, "step": part_step, "maskformer": part_maskformer}


def main(argv: List[str] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--part", nargs="+", choices=PARTS, default=list(PARTS))
    parser.add_argument("--recorded", default=RECORDED)
    parser.add_argument("--force", action="store_true", help="rerun parts already recorded")
    parser.add_argument("--table-only", action="store_true")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--steps", type=int, default=2000, help="equivalence: stream length")
    parser.add_argument("--batch", type=int, default=16, help="step: images per batch")
    parser.add_argument("--mf-batch", type=int, default=4, help="maskformer: images per batch")
    parser.add_argument("--size", type=int, default=512)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--scratch", default=None, help="folder for the temporary checkpoint files")
    args = parser.parse_args(argv)
    os.makedirs(args.recorded, exist_ok=True)
    for part in args.part:
        path = os.path.join(args.recorded, f"{part}{'' if args.device == 'cpu' else '_' + args.device}.json")
        if not args.table_only and (args.force or not os.path.exists(path)):
            started = time.time()
            result = RUNS[part](args)
            result["environment"] = _environment(torch.device(args.device))
            result["seconds"] = time.time() - started
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
