#!/usr/bin/env python
"""Convert a torchvision ImageNet ResNet checkpoint into Detectron2's model-zoo ``.pkl``.

    wget https://download.pytorch.org/models/resnet50-0676ba61.pth -O r50.pth
    python tools/convert-torchvision-to-d2.py r50.pth R-50.pkl

Writes ``{"model": {name: ndarray}, "__author__": "torchvision",
"matching_heuristics": True}``, which ``DetectionCheckpointer`` loads into
Detectron2's ResNet (``build_resnet_backbone``; ResNet-18/34/50/101/152).
Configs using it need torchvision's conventions::

    MODEL:
      WEIGHTS: "R-50.pkl"
      PIXEL_MEAN: [123.675, 116.280, 103.530]
      PIXEL_STD: [58.395, 57.120, 57.375]
      RESNETS:
        STRIDE_IN_1X1: False   # torchvision strides in the 3x3 conv
    INPUT:
      FORMAT: "RGB"

Renaming (as Mask2Former's converter): ``conv1``/``bn1`` of the stem go under
``stem.``, ``layerN`` → ``res{N+1}``, ``bnK`` → ``convK.norm``,
``downsample.0``/``.1`` → ``shortcut``/``shortcut.norm``. Unlike it, the
classifier ``fc.*`` and BatchNorm's ``num_batches_tracked`` counters are left
out (the backbone has neither; keeping them only produced "unexpected key"
warnings), so the result loads with no missing or unexpected key.
"""
import argparse
import pickle
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


def torchvision_to_d2_name(name: str) -> str:
    """torchvision ResNet parameter name → Detectron2 ResNet parameter name."""
    if "layer" not in name:
        name = "stem." + name
    for stage in (1, 2, 3, 4):
        name = name.replace(f"layer{stage}", f"res{stage + 1}")
    for index in (1, 2, 3):
        name = name.replace(f"bn{index}", f"conv{index}.norm")
    return name.replace("downsample.0", "shortcut").replace("downsample.1", "shortcut.norm")


def convert_torchvision_resnet(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Rename a torchvision ResNet state dict to Detectron2's.

    Returns:
        (converted ``{d2_name: ndarray}``, torchvision names left out).
    """
    converted, dropped = {}, []
    for name, value in state_dict.items():
        if name.startswith("fc.") or name.endswith("num_batches_tracked"):
            dropped.append(name)
            continue
        if not torch.is_tensor(value):
            raise ValueError(f"Entry {name!r} is a {type(value).__name__}, not a tensor: the input is not "
                             "a torchvision ResNet state dict (torchvision.models.resnet*().state_dict())")
        converted[torchvision_to_d2_name(name)] = value.detach().cpu().numpy()
    if not any(name.startswith("res2.") for name in converted):
        raise ValueError("No 'layer1.*' weights found: the input is not a torchvision ResNet state dict")
    return converted, dropped


def load_checkpoint(path: str, trust_pickle: bool):
    """``torch.load`` on CPU, restricted to tensors and containers unless ``trust_pickle``."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise SystemExit(f"{path} holds Python objects other than tensors ({error}). If you trust the "
                         "file, rerun with --trust-pickle to load it with full unpickling.")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="torchvision ResNet checkpoint (.pth state dict)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in the input (only for trusted files)")
    args = parser.parse_args(argv)

    state_dict = load_checkpoint(args.input, args.trust_pickle)
    converted, dropped = convert_torchvision_resnet(state_dict)
    left_out = set(dropped)
    for name in state_dict:
        if name not in left_out:
            print(name, "->", torchvision_to_d2_name(name))
    if dropped:
        print("Left out (not part of the Detectron2 backbone):", ", ".join(dropped))
    with open(args.output, "wb") as f:
        pickle.dump({"model": converted, "__author__": "torchvision", "matching_heuristics": True}, f)
    print(f"Wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
