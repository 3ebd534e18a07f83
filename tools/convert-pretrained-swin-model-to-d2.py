#!/usr/bin/env python
"""Convert an ImageNet Swin Transformer release (Microsoft's ``.pth``) into Detectron2's ``.pkl``.

    wget https://github.com/SwinTransformer/storage/releases/download/v1.0.0/swin_tiny_patch4_window7_224.pth
    python tools/convert-pretrained-swin-model-to-d2.py swin_tiny_patch4_window7_224.pth swin_tiny_patch4_window7_224.pkl

The releases hold ``{"model": state_dict}`` with the names that
``gmmseg_d2.modeling.backbone.D2SwinTransformer`` (and Mask2Former's) uses,
so names are kept. Written: ``{"model": {name: ndarray}, "__author__":
"third_party", "matching_heuristics": True}``; use it with
``MODEL.WEIGHTS: "swin_tiny_patch4_window7_224.pkl"`` and ``INPUT.FORMAT: "RGB"``.

Unlike Mask2Former's converter, the classification-only entries — the head
``head.*``, the final ``norm.*`` and the fixed-resolution ``*.attn_mask``
buffers (the backbone builds its masks per input size) — are left out, so
loading reports no unexpected key. Missing on load are only the backbone's
output norms ``norm0..norm3``, which no classification model has (Mask2Former
trains them from their default init as well).
"""
import argparse
import pickle
import sys
from typing import Dict, List, Optional, Tuple

import numpy as np
import torch


def is_classification_only(name: str) -> bool:
    """Entries of a classification Swin that the detection backbone has no place for."""
    return name.startswith("head.") or name in ("norm.weight", "norm.bias") or name.endswith(".attn_mask")


def convert_swin_state_dict(state_dict: Dict[str, torch.Tensor]) -> Tuple[Dict[str, np.ndarray], List[str]]:
    """Keep the backbone entries of an official Swin state dict, as ndarrays.

    Returns:
        (``{name: ndarray}``, names left out).
    """
    if "layers.0.downsample.reduction.weight" not in state_dict and any(
            name.startswith("layers.1.downsample.") for name in state_dict):
        # timm >= 0.9 moves PatchMerging to the start of the next stage: the
        # same tensors under other names, which would silently not load.
        raise ValueError("This looks like a timm Swin checkpoint (downsampling at the start of each stage); "
                         "convert Microsoft's release (github.com/SwinTransformer/storage) instead")
    if "patch_embed.proj.weight" not in state_dict:
        raise ValueError("No 'patch_embed.proj.weight' found: the input is not an official Swin Transformer "
                         "state dict")
    converted, dropped = {}, []
    for name, value in state_dict.items():
        if is_classification_only(name):
            dropped.append(name)
            continue
        if not torch.is_tensor(value):
            raise ValueError(f"Entry {name!r} is a {type(value).__name__}, not a tensor")
        converted[name] = value.detach().cpu().numpy()
    return converted, dropped


def load_state_dict(path: str, trust_pickle: bool) -> Dict[str, torch.Tensor]:
    """The state dict of a Swin release: ``checkpoint["model"]`` (a bare state dict is accepted too)."""
    try:
        checkpoint = torch.load(path, map_location="cpu", weights_only=not trust_pickle)
    except pickle.UnpicklingError as error:
        raise SystemExit(f"{path} holds Python objects other than tensors ({error}). If you trust the "
                         "file, rerun with --trust-pickle to load it with full unpickling.")
    if not isinstance(checkpoint, dict):
        raise ValueError(f"{path} holds a {type(checkpoint).__name__}, expected a dict with a 'model' entry")
    if "model" in checkpoint:
        return checkpoint["model"]
    if all(torch.is_tensor(value) for value in checkpoint.values()):
        return checkpoint
    raise ValueError(f"{path} has no 'model' entry (keys: {sorted(checkpoint)[:10]}); expected an official "
                     "Swin Transformer release")


def main(argv: Optional[List[str]] = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("input", help="official Swin checkpoint (.pth with a 'model' state dict)")
    parser.add_argument("output", help="Detectron2 weights to write (.pkl)")
    parser.add_argument("--trust-pickle", action="store_true",
                        help="allow arbitrary pickled objects in the input (only for trusted files)")
    args = parser.parse_args(argv)

    converted, dropped = convert_swin_state_dict(load_state_dict(args.input, args.trust_pickle))
    if dropped:
        print("Left out (classification only):", ", ".join(dropped))
    with open(args.output, "wb") as f:
        pickle.dump({"model": converted, "__author__": "third_party", "matching_heuristics": True}, f)
    print(f"Wrote {len(converted)} tensors to {args.output}")


if __name__ == "__main__":
    main(sys.argv[1:])
