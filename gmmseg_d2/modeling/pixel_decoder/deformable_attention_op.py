"""Multi-scale deformable attention (Deformable DETR, Zhu et al. 2021), pure PyTorch.

Every query looks at ``P`` learned sampling points around its reference point
on each of ``L`` feature levels, per head, reads the value there by bilinear
interpolation (zero outside the map) and returns the attention-weighted sum.

The functional core :func:`multi_scale_deformable_attention` is a dispatch
seam: implementations register under a name with
:func:`register_ms_deform_attn_backend` and are chosen per call or process-wide
with :func:`set_ms_deform_attn_backend`. The built-in ``"pytorch"`` backend
uses :func:`torch.nn.functional.grid_sample` and runs on any device and dtype;
a fused CUDA kernel with the same contract can be registered without touching
the modules that call the seam.

Sampling convention (matches the official CUDA kernel and its ``grid_sample``
reference): a location ``(x, y)`` in ``[0, 1]^2`` is normalised to the whole
map, ``(0, 0)`` the top-left *corner* of the top-left pixel, so pixel ``j`` has
its centre at ``(j + 0.5) / W`` (``align_corners=False``).
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

__all__ = [
    "MSDeformAttn",
    "multi_scale_deformable_attention",
    "ms_deform_attn_pytorch",
    "register_ms_deform_attn_backend",
    "set_ms_deform_attn_backend",
    "get_ms_deform_attn_backend",
    "available_ms_deform_attn_backends",
]

#: ``(value, spatial_shapes, level_start_index, sampling_locations, attention_weights) -> output``
MSDeformAttnFn = Callable[
    [torch.Tensor, torch.Tensor, Optional[torch.Tensor], torch.Tensor, torch.Tensor], torch.Tensor
]

_BACKENDS: Dict[str, MSDeformAttnFn] = {}
_DEFAULT_BACKEND = "pytorch"

SpatialShapes = Union[torch.Tensor, Sequence[Tuple[int, int]]]


def register_ms_deform_attn_backend(name: str, fn: Optional[MSDeformAttnFn] = None):
    """Register an implementation of the core under ``name`` (usable as a decorator).

    The function receives the arguments of :func:`multi_scale_deformable_attention`
    already validated (``spatial_shapes`` as an ``(L, 2)`` int64 tensor on the
    value's device, ``level_start_index`` possibly None) and must return
    ``(N, Lq, M * D)``, differentiable w.r.t. ``value``, ``sampling_locations``
    and ``attention_weights``.
    """

    def _register(func: MSDeformAttnFn) -> MSDeformAttnFn:
        if name in _BACKENDS and _BACKENDS[name] is not func:
            raise KeyError(f"A multi-scale deformable attention backend named {name!r} is already registered.")
        _BACKENDS[name] = func
        return func

    return _register if fn is None else _register(fn)


def available_ms_deform_attn_backends() -> List[str]:
    return sorted(_BACKENDS)


#: The optional fused-kernel backend and the package that provides it.
FUSED_BACKEND, FUSED_PACKAGE = "torch_ms_deform_attn", "torch-ms-deform-attn"


def _unavailable_backend_error(name: str) -> KeyError:
    """The error for a backend name that is not registered: what happened and what to do."""
    message = (f"The multi-scale deformable attention backend {name!r} is not available in this environment "
               f"(available: {available_ms_deform_attn_backends()}). ")
    if name == FUSED_BACKEND:
        message += (f"It is the optional fused CUDA kernel, registered only when the {FUSED_PACKAGE!r} package "
                    f"is installed (it is compiled against the local torch and CUDA when installed): install it "
                    f"with `.venv/bin/pip install --no-build-isolation {FUSED_PACKAGE}`, or do not select it and "
                    f"keep the default backend 'pytorch', which needs no compiled op, runs on CPU and GPU and gives "
                    f"the same results.")
    else:
        message += ("Register it first with register_ms_deform_attn_backend(name, fn), or use the default "
                    "backend 'pytorch'.")
    return KeyError(message)


def set_ms_deform_attn_backend(name: str) -> None:
    """Make ``name`` the backend used when a call does not pick one."""
    global _DEFAULT_BACKEND
    if name not in _BACKENDS:
        raise _unavailable_backend_error(name)
    _DEFAULT_BACKEND = name


def get_ms_deform_attn_backend() -> str:
    return _DEFAULT_BACKEND


def _level_sizes(spatial_shapes: torch.Tensor) -> List[Tuple[int, int]]:
    # One host sync for the whole call; the per-level loop needs Python ints.
    return [(int(h), int(w)) for h, w in spatial_shapes.tolist()]


@register_ms_deform_attn_backend("pytorch")
def ms_deform_attn_pytorch(
    value: torch.Tensor,
    spatial_shapes: torch.Tensor,
    level_start_index: Optional[torch.Tensor],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
) -> torch.Tensor:
    """Reference-semantics core built on ``grid_sample``; see :func:`multi_scale_deformable_attention`.

    One ``grid_sample`` per level over all heads (heads folded into the batch).
    The attention weights are applied per level and accumulated, instead of
    stacking all levels' samples first, so only one level's samples
    ``(N*M, D, Lq, P)`` are alive at a time besides those autograd keeps.
    ``level_start_index`` is implied by ``spatial_shapes`` and not needed here.
    """
    batch, _, num_heads, _ = value.shape
    sizes = _level_sizes(spatial_shapes)
    value_per_level = value.split([h * w for h, w in sizes], dim=1)
    # grid_sample's grid lives in [-1, 1] with align_corners=False corners.
    # Level-major, contiguous copies of grids and weights (one copy each, not
    # one per level): broadcasting against strided per-level slices is slower
    # on CPU (measured in BENCHMARKS.md, deformable attention).
    grids = rearrange(2 * sampling_locations - 1, "n q m l p xy -> l (n m) q p xy").contiguous()
    weights = rearrange(attention_weights, "n q m l p -> l (n m) 1 q p").contiguous()
    output = None
    for level, (height, width) in enumerate(sizes):
        level_value = rearrange(
            value_per_level[level], "n (h w) m d -> (n m) d h w", h=height, w=width
        )
        sampled = F.grid_sample(
            level_value, grids[level], mode="bilinear", padding_mode="zeros", align_corners=False
        )  # (N*M, D, Lq, P)
        contribution = (sampled * weights[level]).sum(-1)  # (N*M, D, Lq)
        output = contribution if output is None else output + contribution
    return rearrange(output, "(n m) d q -> n q (m d)", n=batch, m=num_heads).contiguous()


def _register_optional_fused_kernels() -> None:
    """Offer the ``torch-ms-deform-attn`` kernels as backend ``"torch_ms_deform_attn"`` when installed.

    Not a dependency (it is an sdist compiled against the local torch at install
    time); it has the same contract and sampling convention as the core here
    (checked to fp64 round-off, see tests), and is never the default.
    """
    if importlib.util.find_spec("torch_ms_deform_attn") is None:
        return

    def _fused(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        try:
            from torch_ms_deform_attn import ms_deform_attn
        except (ImportError, OSError) as e:  # e.g. built for another torch: undefined symbols
            raise RuntimeError(
                f"The {FUSED_BACKEND!r} deformable attention backend is selected, but the installed "
                f"{FUSED_PACKAGE!r} package cannot load its compiled op ({type(e).__name__}: {e}); it was most "
                f"likely built for another torch or CUDA version. Rebuild it for this environment "
                f"(`.venv/bin/pip install --force-reinstall --no-build-isolation {FUSED_PACKAGE}`), or switch "
                f"back to the default, which needs no compiled op: set_ms_deform_attn_backend('pytorch')."
            ) from e

        if level_start_index is None:
            level_start_index = torch.cat(
                (spatial_shapes.new_zeros((1,)), spatial_shapes.prod(1).cumsum(0)[:-1])
            )
        return ms_deform_attn(
            value, spatial_shapes, level_start_index.to(spatial_shapes), sampling_locations, attention_weights
        )

    register_ms_deform_attn_backend("torch_ms_deform_attn", _fused)


_register_optional_fused_kernels()


def multi_scale_deformable_attention(
    value: torch.Tensor,
    spatial_shapes: SpatialShapes,
    level_start_index: Optional[torch.Tensor],
    sampling_locations: torch.Tensor,
    attention_weights: torch.Tensor,
    backend: Optional[str] = None,
) -> torch.Tensor:
    """Sample multi-scale values at given locations and sum them with given weights.

    Args:
        value: per-head values of all levels, flattened and concatenated
            level by level, ``(N, S, M, D)`` with ``S = sum_l H_l * W_l``.
        spatial_shapes: ``(L, 2)`` sizes ``(H_l, W_l)`` of the levels (int tensor
            or list of pairs), in the order they are concatenated in ``value``.
        level_start_index: ``(L,)`` offset of each level in ``S``, or None (it
            follows from ``spatial_shapes``; kernels that want it get it computed).
        sampling_locations: ``(N, Lq, M, L, P, 2)`` locations ``(x, y)`` in the
            level's normalised ``[0, 1]`` frame; outside it values read as zero.
        attention_weights: ``(N, Lq, M, L, P)`` weights (normally a softmax
            over ``L * P``, but any values are accepted).
        backend: registered implementation to use; None = the process default
            (``"pytorch"`` unless changed with :func:`set_ms_deform_attn_backend`).

    Returns:
        ``(N, Lq, M * D)``: for each query and head,
        ``sum_{l,p} w[l,p] * bilinear(value_l, loc[l,p])``, heads concatenated.
    """
    if value.dim() != 4:
        raise ValueError(f"value must be (N, S, M, D), got shape {tuple(value.shape)}.")
    if sampling_locations.dim() != 6 or sampling_locations.shape[-1] != 2:
        raise ValueError(
            f"sampling_locations must be (N, Lq, M, L, P, 2), got shape {tuple(sampling_locations.shape)}."
        )
    batch, total_len, num_heads, _ = value.shape
    _, num_queries, loc_heads, num_levels, num_points, _ = sampling_locations.shape
    expected_weights = (batch, num_queries, num_heads, num_levels, num_points)
    if tuple(attention_weights.shape) != expected_weights or loc_heads != num_heads or sampling_locations.shape[0] != batch:
        raise ValueError(
            "Inconsistent shapes: value (N, S, M, D) = "
            f"{tuple(value.shape)}, sampling_locations (N, Lq, M, L, P, 2) = {tuple(sampling_locations.shape)}, "
            f"attention_weights should be (N, Lq, M, L, P) = {expected_weights}, got {tuple(attention_weights.shape)}."
        )
    spatial_shapes = torch.as_tensor(spatial_shapes, dtype=torch.long, device=value.device)
    if spatial_shapes.shape != (num_levels, 2):
        raise ValueError(
            f"spatial_shapes must be ({num_levels}, 2) = one (H, W) per level of sampling_locations, "
            f"got shape {tuple(spatial_shapes.shape)}."
        )
    sizes = _level_sizes(spatial_shapes)
    if sum(h * w for h, w in sizes) != total_len:
        raise ValueError(
            f"value has {total_len} positions but spatial_shapes {sizes} describe "
            f"{sum(h * w for h, w in sizes)}; value must hold all levels flattened and concatenated."
        )
    name = _DEFAULT_BACKEND if backend is None else backend
    if name not in _BACKENDS:
        raise _unavailable_backend_error(name)
    return _BACKENDS[name](value, spatial_shapes, level_start_index, sampling_locations, attention_weights)


def _is_power_of_2(n: int) -> bool:
    return n > 0 and (n & (n - 1)) == 0


class MSDeformAttn(nn.Module):
    """Multi-scale deformable attention layer (names and init as in Deformable DETR / Mask2Former).

    Parameters (official names, checkpoint compatible):
        ``sampling_offsets``: Linear ``d_model -> n_heads * n_levels * n_points * 2``
        ``attention_weights``: Linear ``d_model -> n_heads * n_levels * n_points``
        ``value_proj``, ``output_proj``: Linear ``d_model -> d_model``

    Args:
        d_model: channels ``C`` of queries and values; divisible by ``n_heads``.
        n_levels: feature levels ``L``.
        n_heads: attention heads ``M``.
        n_points: sampling points ``P`` per head and level.
        backend: core implementation (see :func:`multi_scale_deformable_attention`);
            None follows the process default.
    """

    def __init__(
        self,
        d_model: int = 256,
        n_levels: int = 4,
        n_heads: int = 8,
        n_points: int = 4,
        backend: Optional[str] = None,
    ):
        super().__init__()
        if d_model % n_heads != 0:
            raise ValueError(f"MSDeformAttn: d_model ({d_model}) must be divisible by n_heads ({n_heads}).")
        if not _is_power_of_2(d_model // n_heads):
            # Only fused kernels care (they vectorise over a power-of-two head dim).
            warnings.warn(
                f"MSDeformAttn: per-head dim {d_model // n_heads} is not a power of 2; "
                "fused CUDA kernels are slower in that case."
            )
        # Chunk size of the official CUDA kernel; kept so a fused backend can use it.
        self.im2col_step = 64
        self.d_model = d_model
        self.n_levels = n_levels
        self.n_heads = n_heads
        self.n_points = n_points
        self.backend = backend

        self.sampling_offsets = nn.Linear(d_model, n_heads * n_levels * n_points * 2)
        self.attention_weights = nn.Linear(d_model, n_heads * n_levels * n_points)
        self.value_proj = nn.Linear(d_model, d_model)
        self.output_proj = nn.Linear(d_model, d_model)
        self._reset_parameters()

    def _reset_parameters(self) -> None:
        # Offsets start as a fixed pattern: head h points along angle 2*pi*h/M,
        # scaled so the larger coordinate is 1, and point p sits p+1 pixels out.
        nn.init.constant_(self.sampling_offsets.weight, 0.0)
        angles = torch.arange(self.n_heads, dtype=torch.float32) * (2.0 * math.pi / self.n_heads)
        directions = torch.stack([angles.cos(), angles.sin()], -1)
        directions = directions / directions.abs().max(-1, keepdim=True)[0]
        point_scale = torch.arange(1, self.n_points + 1, dtype=torch.float32)
        bias = directions[:, None, None, :] * point_scale[None, None, :, None]
        bias = bias.expand(self.n_heads, self.n_levels, self.n_points, 2)
        with torch.no_grad():
            self.sampling_offsets.bias.copy_(bias.reshape(-1))
        # Zero logits = uniform attention over all L * P samples at start.
        nn.init.constant_(self.attention_weights.weight, 0.0)
        nn.init.constant_(self.attention_weights.bias, 0.0)
        nn.init.xavier_uniform_(self.value_proj.weight)
        nn.init.constant_(self.value_proj.bias, 0.0)
        nn.init.xavier_uniform_(self.output_proj.weight)
        nn.init.constant_(self.output_proj.bias, 0.0)

    def forward(
        self,
        query: torch.Tensor,
        reference_points: torch.Tensor,
        input_flatten: torch.Tensor,
        input_spatial_shapes: torch.Tensor,
        input_level_start_index: Optional[torch.Tensor],
        input_padding_mask: Optional[torch.Tensor] = None,
    ) -> torch.Tensor:
        """
        Args:
            query: ``(N, Lq, C)``.
            reference_points: ``(N, Lq, L, 2)`` points ``(x, y)`` in ``[0, 1]``
                (top-left 0, bottom-right 1, padding included), or
                ``(N, Lq, L, 4)`` boxes ``(cx, cy, w, h)``.
            input_flatten: values ``(N, S, C)``, levels flattened and concatenated.
            input_spatial_shapes: ``(L, 2)`` int64 ``(H_l, W_l)``.
            input_level_start_index: ``(L,)`` offsets of the levels in ``S`` (or None).
            input_padding_mask: ``(N, S)``, True at padding positions (their value is zeroed).

        Returns:
            ``(N, Lq, C)``.
        """
        # (The core checks that the level sizes add up to input_flatten's length.)
        if input_spatial_shapes.shape[0] != self.n_levels:
            raise ValueError(
                f"MSDeformAttn was built for {self.n_levels} levels but got {input_spatial_shapes.shape[0]}."
            )

        value = self.value_proj(input_flatten)
        if input_padding_mask is not None:
            value = value.masked_fill(input_padding_mask[..., None], 0.0)
        value = rearrange(value, "n s (m d) -> n s m d", m=self.n_heads)
        offsets = rearrange(
            self.sampling_offsets(query),
            "n q (m l p xy) -> n q m l p xy",
            m=self.n_heads, l=self.n_levels, p=self.n_points, xy=2,
        )
        # Softmax jointly over all levels and points of a head.
        weights = rearrange(self.attention_weights(query), "n q (m lp) -> n q m lp", m=self.n_heads)
        weights = rearrange(
            F.softmax(weights, -1), "n q m (l p) -> n q m l p", l=self.n_levels, p=self.n_points
        )
        if reference_points.shape[-1] == 2:
            # Offsets are in pixels of each level: divide by (W_l, H_l).
            offset_normalizer = torch.stack([input_spatial_shapes[..., 1], input_spatial_shapes[..., 0]], -1)
            sampling_locations = (
                reference_points[:, :, None, :, None, :]
                + offsets / offset_normalizer[None, None, None, :, None, :]
            )
        elif reference_points.shape[-1] == 4:
            # Offsets are relative to the box size, spread over n_points.
            sampling_locations = (
                reference_points[:, :, None, :, None, :2]
                + offsets / self.n_points * reference_points[:, :, None, :, None, 2:] * 0.5
            )
        else:
            raise ValueError(
                "MSDeformAttn: reference_points must end in 2 (points) or 4 (boxes), "
                f"got shape {tuple(reference_points.shape)}."
            )
        output = multi_scale_deformable_attention(
            value, input_spatial_shapes, input_level_start_index, sampling_locations, weights,
            backend=self.backend,
        )
        return self.output_proj(output)

    def extra_repr(self) -> str:
        return (
            f"d_model={self.d_model}, n_levels={self.n_levels}, n_heads={self.n_heads}, "
            f"n_points={self.n_points}, backend={self.backend or get_ms_deform_attn_backend()!r}"
        )
