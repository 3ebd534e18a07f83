#!/usr/bin/env python
"""Convert an official GMMSeg (MMSegmentation) checkpoint, or MiT ImageNet weights, to Detectron2's ``.pkl``.

    python tools/convert_gmmseg_official.py segformer_mit-b5_gmmseg_cocostuff10k.pth gmmseg_b5_coco10k.pkl
    python tools/train_net.py --config-file configs/coco_stuff/segformer/gmmseg_mit-b5_512x512_80k_coco_stuff_10k.yaml \\
        --eval-only MODEL.WEIGHTS gmmseg_b5_coco10k.pkl

    python tools/convert_gmmseg_official.py mit_b5_mmseg.pth mit_b5.pkl     # backbone initialisation

Every key of the official ``state_dict`` is mapped (see
``gmmseg_d2.checkpoint_conversion`` for the table); keys the official model
never uses (``decode_head.conv_seg``, ``decode_head.eye_matrix``) are dropped
and listed. The GMM memory (``decode_head.queue``, ``C*M*D*K`` floats: 7 GB
for COCO-Stuff's 171 classes x 5 components x 64 x 32000) is kept by
default, for fine-tuning:

* ``--memory stats`` (default): as the chunk sums of ``MODEL.GMM.MEMORY_KIND
  stats`` (the default kind) at ``--chunk-size`` =
  ``MODEL.GMM.MAX_SAMPLES_PER_COMPONENT`` (20): the M-step's moments are
  exactly the official memory's, in a tenth of the size (0.7 GB).
* ``--memory ring``: the features themselves, for ``MEMORY_KIND ring`` (also
  loads into a stats memory, converted on load).
* ``--drop-memory`` (= ``--memory drop``): an evaluation-only file; the
  memory is not needed to predict.

The checkpointer also reads the official ``.pth`` directly
(``MODEL.WEIGHTS official.pth``), converting it on load with the ring layout;
this tool writes the converted file once.

Writes ``{"model": {name: ndarray}, "__author__": "mmsegmentation:<kind>",
"matching_heuristics": False}``.
"""
import argparse
import os
import pickle
import sys
from typing import List, Optional

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from gmmseg_d2.checkpoint_conversion import (  # noqa: E402
    MEMORY_OPTIONS, convert_mit_imagenet, convert_mmseg_segformer, detect_mmseg_checkpoint,
)
from gmmseg_d2.engine.checkpointer import atomic_write_bytes  # noqa: E402


def load_checkpoint(path: str, trust_pickle: bool):
    """``torch.load`` on CPU, restricted to tensors and containers unless ``trust_pickle``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise SystemExit(f"{path} holds Python objects other than tensors (MMSegmentation keeps some in its "
                         f"'meta': {str(error).splitlines()[0]}). If you trust the file, rerun with --trust-pickle.")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="official GMMSeg / MMSegmentation SegFormer checkpoint, or MiT ImageNet "
                                      "weights (mit_b*_mmseg.pth or mit_b*.pth)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument("--memory", choices=MEMORY_OPTIONS, default="stats",
                        help="how to keep the GMM memory (default: stats, for MODEL.GMM.MEMORY_KIND stats)")
    parser.add_argument("--drop-memory", action="store_true", help="same as --memory drop (evaluation only)")
    parser.add_argument("--chunk-size", type=int, default=20,
                        help="chunk size of the stats memory: MODEL.GMM.MAX_SAMPLES_PER_COMPONENT (default 20)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="load the input with full unpickling (needed when its 'meta' holds Python objects)")
    args = parser.parse_args(argv)
    if not args.output.endswith(".pkl"):
        parser.error(f"output must be a .pkl file (Detectron2's converted-weights format), got {args.output!r}")
    memory = "drop" if args.drop_memory else args.memory

    loaded = load_checkpoint(args.input, args.trust_pickle)
    kind = detect_mmseg_checkpoint(loaded)
    if kind is None:
        raise SystemExit(f"{args.input} is neither an MMSegmentation SegFormer checkpoint (a 'state_dict' with "
                         f"backbone.layers.* and decode_head.*) nor MiT ImageNet weights (layers.0.0.projection.* "
                         f"or patch_embed1.*)")
    state = loaded.get("state_dict", loaded)
    if kind == "segformer":
        converted = convert_mmseg_segformer(state, memory=memory, chunk_size=args.chunk_size)
    else:
        converted = convert_mit_imagenet(state)
    data = {"model": {name: tensor.detach().cpu().numpy() for name, tensor in converted.model.items()},
            "__author__": f"mmsegmentation:{converted.source}", "matching_heuristics": False}
    atomic_write_bytes(args.output, lambda f: pickle.dump(data, f, protocol=4))
    size = sum(array.nbytes for array in data["model"].values())
    print(f"Wrote {args.output}: {converted.source}, {len(data['model'])} tensors, {size / 2**20:.1f} MiB"
          f"{'' if kind == 'mit' else f', memory {memory}'}")
    if converted.dropped:
        print(f"Dropped (never used by the official model): {', '.join(converted.dropped)}")


if __name__ == "__main__":
    main()
