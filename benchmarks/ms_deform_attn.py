"""Speed and peak memory of multi-scale deformable attention at Mask2Former's ADE20K shapes.

Shapes are those of the R50 pixel decoder's encoder on a 640x640 crop: three
levels at strides 8/16/32 (80x80, 40x40, 20x20, so ``S = Lq = 8400`` tokens),
``d_model = 256`` in 8 heads of 32 channels, 4 points per head and level.

Implementations of the core ``(value, locations, weights) -> (N, Lq, M*D)``:

* ``ours``: :func:`gmmseg_d2.modeling.pixel_decoder.ms_deform_attn_pytorch`,
  one ``grid_sample`` per level, weights applied and summed level by level;
* ``stacked`` (baseline): the same ``grid_sample`` calls, but all levels'
  samples stacked into one ``(N*M, D, Lq, L*P)`` tensor before weighting: the
  formulation of Deformable DETR's PyTorch reference, which is what the
  official Mask2Former runs when its CUDA op is not compiled (e.g. on CPU);
* ``fused``: the optional ``torch-ms-deform-attn`` kernels, when installed.

Each is timed forward and forward+backward (gradients w.r.t. value, locations
and weights); a further row times one whole :class:`MSDeformAttn` layer
(projections, softmax and core) with our core. Times are minima over rounds
that interleave the methods, so a concurrent load affects them alike; compare
ratios within one run. Peak memory is the growth of the peak during one
forward+backward call above the inputs: peak RSS on CPU (high-water mark reset
through /proc) or ``torch.cuda.max_memory_allocated`` on GPU.

Usage::

    python benchmarks/ms_deform_attn.py --threads 1          # CPU, full table
    python benchmarks/ms_deform_attn.py --quick --threads 1  # < 30 s smoke run
    python benchmarks/ms_deform_attn.py --device cuda        # on a GPU
"""
from __future__ import annotations

import argparse
from typing import Callable, Dict, Optional

import torch
import torch.nn.functional as F
from einops import rearrange

from gmmseg_d2.modeling.pixel_decoder import (
    MSDeformAttn,
    available_ms_deform_attn_backends,
    multi_scale_deformable_attention,
)
from measure import interleaved_min_times, peak_bytes  # benchmarks/measure.py

D_MODEL, HEADS, POINTS = 256, 8, 4
STRIDES = (8, 16, 32)


def stacked_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Baseline: sample every level, stack ``(N*M, D, Lq, L*P)``, then weight and sum."""
    n, _, m, d = value.shape
    sizes = [tuple(s) for s in spatial_shapes.tolist()]
    per_level = value.split([h * w for h, w in sizes], dim=1)
    grids = 2 * sampling_locations - 1
    samples = []
    for level, (h, w) in enumerate(sizes):
        v = rearrange(per_level[level], "n (h w) m d -> (n m) d h w", h=h, w=w)
        g = rearrange(grids[:, :, :, level], "n q m p xy -> (n m) q p xy")
        samples.append(F.grid_sample(v, g, mode="bilinear", padding_mode="zeros", align_corners=False))
    stacked = torch.stack(samples, dim=-2).flatten(-2)  # (N*M, D, Lq, L*P)
    weights = rearrange(attention_weights, "n q m l p -> (n m) 1 q (l p)")
    out = (stacked * weights).sum(-1)
    return rearrange(out, "(n m) d q -> n q (m d)", n=n, m=m)


# --------------------------------------------------------------- measurement


def make_problem(size: int, batch: int, device, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    shapes = torch.tensor([[-(-size // s), -(-size // s)] for s in STRIDES], dtype=torch.long)
    tokens = int(shapes.prod(1).sum())
    levels, head_dim = len(STRIDES), D_MODEL // HEADS
    value = torch.randn(batch, tokens, HEADS, head_dim, generator=g)
    # Locations as the encoder produces them: pixel centres plus offsets of a
    # few pixels, some falling outside the map.
    centres = torch.rand(batch, tokens, 1, 1, 1, 2, generator=g)
    offsets = torch.randn(batch, tokens, HEADS, levels, POINTS, 2, generator=g) * 0.05
    locations = centres + offsets
    weights = torch.randn(batch, tokens, HEADS, levels * POINTS, generator=g).softmax(-1)
    weights = weights.view(batch, tokens, HEADS, levels, POINTS)
    return shapes.to(device), value.to(device), locations.to(device), weights.to(device)


def core_functions(shapes, value, locations, weights, backward: bool) -> Dict[str, Callable[[], None]]:
    impls = {
        "ours": lambda v, l, w: multi_scale_deformable_attention(v, shapes, None, l, w, backend="pytorch"),
        "stacked": lambda v, l, w: stacked_ms_deform_attn(v, shapes, l, w),
    }
    if "torch_ms_deform_attn" in available_ms_deform_attn_backends():
        impls["fused"] = lambda v, l, w: multi_scale_deformable_attention(
            v, shapes, None, l, w, backend="torch_ms_deform_attn")

    def make(impl):
        if not backward:
            def run_forward():
                with torch.no_grad():
                    impl(value, locations, weights)
            return run_forward

        leaves = [t.detach().clone().requires_grad_(True) for t in (value, locations, weights)]

        def run_backward():
            out = impl(*leaves)
            out.backward(torch.ones_like(out))
            for t in leaves:
                t.grad = None
        return run_backward

    return {name: make(impl) for name, impl in impls.items()}


def check_agreement(shapes, value, locations, weights) -> str:
    with torch.no_grad():
        ref = stacked_ms_deform_attn(value, shapes, locations, weights)
        diffs = {"ours": multi_scale_deformable_attention(value, shapes, None, locations, weights, backend="pytorch")}
        if "torch_ms_deform_attn" in available_ms_deform_attn_backends():
            diffs["fused"] = multi_scale_deformable_attention(
                value, shapes, None, locations, weights, backend="torch_ms_deform_attn")
    scale = ref.abs().max().item()
    return ", ".join(f"{k} vs stacked: max |diff| / max |ref| = {(v - ref).abs().max().item() / scale:.1e}"
                     for k, v in diffs.items())


def module_function(shapes, batch, device) -> Callable[[], None]:
    layer = MSDeformAttn(D_MODEL, len(STRIDES), HEADS, POINTS).to(device)
    tokens = int(shapes.prod(1).sum())
    g = torch.Generator().manual_seed(1)
    src = torch.randn(batch, tokens, D_MODEL, generator=g).to(device).requires_grad_(True)
    ref = torch.rand(batch, tokens, len(STRIDES), 2, generator=g).to(device)
    starts = torch.cat([shapes.new_zeros(1), shapes.prod(1).cumsum(0)[:-1]])

    def run():
        out = layer(src, ref, src, shapes, starts)
        out.backward(torch.ones_like(out))
        src.grad = None
        layer.zero_grad(set_to_none=True)
    return run


def _ms(seconds: float) -> str:
    return f"{seconds * 1e3:.1f}"


def _mib(num_bytes: Optional[int]) -> str:
    return "n/a" if num_bytes is None else f"{num_bytes / 2**20:.0f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--size", type=int, default=640, help="square crop size (strides 8/16/32 of it)")
    parser.add_argument("--batch", type=int, default=1)
    parser.add_argument("--rounds", type=int, default=5, help="timing rounds after one warm-up call")
    parser.add_argument("--quick", action="store_true", help="1 round, no whole-layer row")
    parser.add_argument("--threads", type=int, default=None, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    rounds = 1 if args.quick else args.rounds

    shapes, value, locations, weights = make_problem(args.size, args.batch, device)
    print(f"torch {torch.__version__}, device {device}"
          + (f" ({torch.cuda.get_device_name(device)})" if device.type == "cuda" else "")
          + f", threads {torch.get_num_threads()}, batch {args.batch}, levels {shapes.tolist()}, "
          f"Lq = S = {value.shape[1]}, heads {HEADS} x {D_MODEL // HEADS}, points {POINTS}, rounds {rounds}")
    print(check_agreement(shapes, value, locations, weights))
    forward = interleaved_min_times(core_functions(shapes, value, locations, weights, backward=False), rounds, device)
    backward_fns = core_functions(shapes, value, locations, weights, backward=True)
    both = interleaved_min_times(backward_fns, rounds, device)
    memory = {name: peak_bytes(fn, device) for name, fn in backward_fns.items()}

    print("\n| method | forward (ms) | forward+backward (ms) | peak extra memory fwd+bwd (MiB) |")
    print("|---|---:|---:|---:|")
    for name in forward:
        print(f"| {name} | {_ms(forward[name])} | {_ms(both[name])} | {_mib(memory[name])} |")
    if not args.quick:
        layer_fn = module_function(shapes, args.batch, device)
        layer_time = interleaved_min_times({"layer": layer_fn}, rounds, device)["layer"]
        print(f"| MSDeformAttn layer (ours, incl. projections) | - | {_ms(layer_time)} | "
              f"{_mib(peak_bytes(layer_fn, device))} |")
    print(f"\nspeed-up of ours over stacked: forward {forward['stacked'] / forward['ours']:.2f}x, "
          f"forward+backward {both['stacked'] / both['ours']:.2f}x")


if __name__ == "__main__":
    main()
