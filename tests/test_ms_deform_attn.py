"""Multi-scale deformable attention: the pure-PyTorch core against an
independent per-point bilinear reference, and the MSDeformAttn module's
parameters, initialisation and closed-form behaviour."""

import pytest
import torch

from gmmseg_d2.modeling.pixel_decoder import ms_deform_attn as ms_deform_attn_module
from gmmseg_d2.modeling.pixel_decoder.deformable_attention_op import (
    MSDeformAttn,
    available_ms_deform_attn_backends,
    get_ms_deform_attn_backend,
    multi_scale_deformable_attention,
    register_ms_deform_attn_backend,
    set_ms_deform_attn_backend,
)


def naive_ms_deform_attn(value, spatial_shapes, sampling_locations, attention_weights):
    """Per-point bilinear interpolation written out by hand (no grid_sample).

    A location ``(x, y)`` in [0, 1] maps to continuous pixel coordinates
    ``(x * W - 0.5, y * H - 0.5)`` (pixel centres at integers, i.e.
    align_corners=False); the four neighbouring pixels get the usual bilinear
    weights and pixels outside the map contribute zero.
    value (N, S, M, D), locations (N, Q, M, L, P, 2), weights (N, Q, M, L, P) -> (N, Q, M*D).
    """
    n, _, m, d = value.shape
    q = sampling_locations.shape[1]
    out = value.new_zeros(n, q, m, d)
    start = 0
    for level, (h, w) in enumerate(spatial_shapes.tolist()):
        level_value = value[:, start:start + h * w]  # (N, h*w, M, D)
        start += h * w
        px = sampling_locations[:, :, :, level, :, 0] * w - 0.5  # (N, Q, M, P)
        py = sampling_locations[:, :, :, level, :, 1] * h - 0.5
        x0, y0 = torch.floor(px), torch.floor(py)
        fx, fy = px - x0, py - y0
        for dx, dy in ((0, 0), (1, 0), (0, 1), (1, 1)):
            cx, cy = x0 + dx, y0 + dy
            corner_weight = (fx if dx else 1 - fx) * (fy if dy else 1 - fy)
            inside = (cx >= 0) & (cx <= w - 1) & (cy >= 0) & (cy <= h - 1)
            flat = (cy.clamp(0, h - 1) * w + cx.clamp(0, w - 1)).long()  # (N, Q, M, P)
            # Gather value[n, flat[n,q,m,p], m, :] for every point.
            idx = flat.permute(0, 2, 1, 3).reshape(n, m, -1)  # (N, M, Q*P)
            per_head = level_value.permute(0, 2, 1, 3)  # (N, M, h*w, D)
            gathered = torch.gather(per_head, 2, idx[..., None].expand(-1, -1, -1, d))
            gathered = gathered.reshape(n, m, q, -1, d).permute(0, 2, 1, 3, 4)  # (N, Q, M, P, D)
            coeff = attention_weights[:, :, :, level] * corner_weight * inside
            out = out + (coeff[..., None] * gathered).sum(3)
    return out.reshape(n, q, m * d)


def _random_inputs(dtype=torch.float64, shapes=((5, 7), (3, 4), (2, 1)), n=2, q=6, m=2, d=3, p=3, seed=0,
                   spread=0.3):
    g = torch.Generator().manual_seed(seed)
    spatial_shapes = torch.tensor(shapes, dtype=torch.long)
    s = int(spatial_shapes.prod(1).sum())
    num_levels = len(shapes)
    value = torch.randn(n, s, m, d, generator=g, dtype=dtype)
    # Locations reach outside [0, 1] on purpose to exercise zero padding.
    locations = torch.rand(n, q, m, num_levels, p, 2, generator=g, dtype=dtype) * (1 + 2 * spread) - spread
    weights = torch.rand(n, q, m, num_levels, p, generator=g, dtype=dtype)
    level_start = torch.cat([spatial_shapes.new_zeros(1), spatial_shapes.prod(1).cumsum(0)[:-1]])
    return value, spatial_shapes, level_start, locations, weights


def test_core_matches_naive_reference_values_and_gradients(one_torch_thread):
    value, shapes, starts, loc, weights = _random_inputs(dtype=torch.float64)
    inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    ref_inputs = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    out = multi_scale_deformable_attention(inputs[0], shapes, starts, inputs[1], inputs[2])
    ref = naive_ms_deform_attn(ref_inputs[0], shapes, ref_inputs[1], ref_inputs[2])
    assert out.shape == (2, 6, 2 * 3)
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    # A fixed random cotangent gives a non-trivial vector-Jacobian product.
    cot = torch.randn(out.shape, generator=torch.Generator().manual_seed(1), dtype=out.dtype)
    grads = torch.autograd.grad((out * cot).sum(), inputs)
    ref_grads = torch.autograd.grad((ref * cot).sum(), ref_inputs)
    for name, got, want in zip(("value", "locations", "weights"), grads, ref_grads):
        assert want.abs().sum() > 0, name
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11, msg=f"gradient w.r.t. {name}")


def test_core_float32_matches_reference(one_torch_thread):
    value, shapes, starts, loc, weights = _random_inputs(dtype=torch.float32, n=1, q=20, m=4, d=8, p=4, seed=3)
    out = multi_scale_deformable_attention(value, shapes, None, loc, weights)
    ref = naive_ms_deform_attn(value.double(), shapes, loc.double(), weights.double())
    torch.testing.assert_close(out.double(), ref, rtol=1e-5, atol=1e-5)


def test_core_gradcheck_fp64(one_torch_thread):
    value, shapes, starts, loc, weights = _random_inputs(dtype=torch.float64, shapes=((3, 4), (2, 2)), n=1, q=2,
                                                         m=2, d=2, p=2, seed=5, spread=0.2)

    def fn(v, l, w):
        return multi_scale_deformable_attention(v, shapes, starts, l, w)

    assert torch.autograd.gradcheck(fn, tuple(t.requires_grad_(True) for t in (value, loc, weights)),
                                    eps=1e-6, atol=1e-6)


def test_core_closed_form_single_pixel():
    # A 1x1 map holding v: its centre is (0.5, 0.5). At x = 0.25 the continuous
    # pixel coordinate is -0.25, so the only pixel gets bilinear weight 0.75;
    # at x = -0.1 (pixel coordinate -0.6) it gets 0.4; beyond one pixel, zero.
    v = torch.tensor([[[[2.0]]]])  # (N=1, S=1, M=1, D=1)
    xs = torch.tensor([0.5, 0.25, -0.1, 1.6])
    loc = torch.stack([xs, torch.full_like(xs, 0.5)], -1).view(1, 4, 1, 1, 1, 2)
    w = torch.ones(1, 4, 1, 1, 1)
    out = multi_scale_deformable_attention(v, [(1, 1)], None, loc, w)
    torch.testing.assert_close(out.flatten(), torch.tensor([2.0, 1.5, 0.8, 0.0]))


def test_core_rejects_inconsistent_shapes():
    value, shapes, starts, loc, weights = _random_inputs(dtype=torch.float32)
    with pytest.raises(ValueError, match="positions"):
        multi_scale_deformable_attention(value[:, 1:], shapes, starts, loc, weights)
    with pytest.raises(ValueError, match="attention_weights"):
        multi_scale_deformable_attention(value, shapes, starts, loc, weights[..., :-1])
    with pytest.raises(ValueError, match="spatial_shapes"):
        multi_scale_deformable_attention(value, shapes[:2], starts, loc, weights)
    with pytest.raises(KeyError, match="backend"):
        multi_scale_deformable_attention(value, shapes, starts, loc, weights, backend="no-such-kernel")


def test_backend_seam_dispatches_to_registered_kernel():
    calls = []

    def fake_kernel(value, spatial_shapes, level_start_index, sampling_locations, attention_weights):
        calls.append((spatial_shapes.dtype, tuple(spatial_shapes.shape)))
        return value.new_full((value.shape[0], sampling_locations.shape[1], value.shape[2] * value.shape[3]), 7.0)

    register_ms_deform_attn_backend("test-fake", fake_kernel)
    assert "test-fake" in available_ms_deform_attn_backends()
    value, shapes, starts, loc, weights = _random_inputs(dtype=torch.float32)
    out = multi_scale_deformable_attention(value, shapes.tolist(), starts, loc, weights, backend="test-fake")
    assert calls == [(torch.long, (3, 2))] and torch.all(out == 7.0)
    previous = get_ms_deform_attn_backend()
    set_ms_deform_attn_backend("test-fake")
    try:
        module = MSDeformAttn(d_model=8, n_levels=3, n_heads=2, n_points=3)
        query = torch.randn(2, int(shapes.prod(1).sum()), 8)
        ref = torch.rand(2, query.shape[1], 3, 2)
        expected = module.output_proj(torch.full((2, query.shape[1], 8), 7.0))
        torch.testing.assert_close(module(query, ref, query, shapes, starts), expected)
        with pytest.raises(KeyError, match="already registered"):
            register_ms_deform_attn_backend("pytorch", fake_kernel)
    finally:
        set_ms_deform_attn_backend(previous)
        ms_deform_attn_module._BACKENDS.pop("test-fake", None)


# --------------------------------------------------------------------- module
def test_module_parameter_names_and_shapes_match_official():
    # Official (Deformable DETR / Mask2Former ops/modules/ms_deform_attn.py):
    # sampling_offsets Linear(C, M*L*P*2), attention_weights Linear(C, M*L*P),
    # value_proj / output_proj Linear(C, C); nothing else in the state dict.
    c, l, m, p = 32, 3, 4, 2
    module = MSDeformAttn(d_model=c, n_levels=l, n_heads=m, n_points=p)
    got = {k: tuple(v.shape) for k, v in module.state_dict().items()}
    assert got == {
        "sampling_offsets.weight": (m * l * p * 2, c), "sampling_offsets.bias": (m * l * p * 2,),
        "attention_weights.weight": (m * l * p, c), "attention_weights.bias": (m * l * p,),
        "value_proj.weight": (c, c), "value_proj.bias": (c,),
        "output_proj.weight": (c, c), "output_proj.bias": (c,),
    }
    assert module.im2col_step == 64


def test_module_init_offset_pattern():
    m, l, p = 8, 2, 3
    module = MSDeformAttn(d_model=16, n_levels=l, n_heads=m, n_points=p)
    assert torch.all(module.sampling_offsets.weight == 0)
    assert torch.all(module.attention_weights.weight == 0) and torch.all(module.attention_weights.bias == 0)
    assert torch.all(module.value_proj.bias == 0) and torch.all(module.output_proj.bias == 0)
    bias = module.sampling_offsets.bias.detach().view(m, l, p, 2)
    # Head h points along angle 2*pi*h/8 scaled so max(|x|,|y|) = 1: the 8
    # compass directions of the unit square; point k is k+1 times further out.
    directions = torch.tensor([[1, 0], [1, 1], [0, 1], [-1, 1], [-1, 0], [-1, -1], [0, -1], [1, -1]],
                              dtype=torch.float32)
    expected = directions[:, None, None, :] * torch.arange(1, p + 1, dtype=torch.float32)[None, None, :, None]
    # float32 cos/sin of 45-degree multiples are not exactly equal, hence the tolerance.
    torch.testing.assert_close(bias, expected.expand(m, l, p, 2), atol=1e-5, rtol=0)


def test_module_rejects_bad_configuration():
    with pytest.raises(ValueError, match="divisible"):
        MSDeformAttn(d_model=30, n_heads=8)
    with pytest.warns(UserWarning, match="power of 2"):
        MSDeformAttn(d_model=24, n_heads=2)


def _level_centres(shapes):
    refs = []
    for h, w in shapes.tolist():
        ys, xs = torch.meshgrid((torch.arange(h, dtype=torch.float64) + 0.5) / h,
                                (torch.arange(w, dtype=torch.float64) + 0.5) / w, indexing="ij")
        refs.append(torch.stack([xs.flatten(), ys.flatten()], -1))
    return torch.cat(refs, 0)


def test_module_zero_offsets_at_pixel_centres_is_projection(one_torch_thread):
    # Single level, offsets forced to 0, every point at its own pixel centre:
    # uniform softmax over identical samples returns the value itself, so the
    # layer reduces to output_proj(value_proj(x)).
    torch.manual_seed(0)
    module = MSDeformAttn(d_model=8, n_levels=1, n_heads=2, n_points=3).double()
    with torch.no_grad():
        module.sampling_offsets.bias.zero_()
        module.attention_weights.weight.normal_()  # non-uniform weights: still sum to 1
    shapes = torch.tensor([[3, 5]])
    x = torch.randn(2, 15, 8, dtype=torch.float64)
    ref = _level_centres(shapes)[None, :, None, :].expand(2, -1, 1, -1)
    out = module(x, ref, x, shapes, torch.tensor([0]))
    torch.testing.assert_close(out, module.output_proj(module.value_proj(x)))


def test_module_forward_matches_manual_composition(one_torch_thread):
    torch.manual_seed(1)
    c, l, m, p = 8, 2, 2, 2
    module = MSDeformAttn(d_model=c, n_levels=l, n_heads=m, n_points=p).double()
    with torch.no_grad():
        for param in module.parameters():
            param.normal_(0, 0.5)
    shapes = torch.tensor([[4, 3], [2, 2]])
    s = int(shapes.prod(1).sum())
    query = torch.randn(1, 5, c, dtype=torch.float64)
    x = torch.randn(1, s, c, dtype=torch.float64)
    ref = torch.rand(1, 5, l, 2, dtype=torch.float64)
    padding = torch.zeros(1, s, dtype=torch.bool)
    padding[0, 3] = True
    # Spelled out: projections, per-level pixel normalisation of the offsets,
    # joint softmax over levels and points, naive sampling.
    value = module.value_proj(x).masked_fill(padding[..., None], 0).view(1, s, m, c // m)
    offsets = module.sampling_offsets(query).view(1, 5, m, l, p, 2)
    normaliser = torch.stack([shapes[:, 1], shapes[:, 0]], -1).double()  # (W, H)
    loc = ref[:, :, None, :, None, :] + offsets / normaliser[None, None, None, :, None, :]
    weights = module.attention_weights(query).view(1, 5, m, l * p).softmax(-1).view(1, 5, m, l, p)
    expected = module.output_proj(naive_ms_deform_attn(value, shapes, loc, weights))
    out = module(query, ref, x, shapes, torch.tensor([0, 12]), padding)
    torch.testing.assert_close(out, expected)

    # Box references (cx, cy, w, h): offsets scale with half the box over P.
    boxes = torch.cat([ref, torch.rand(1, 5, l, 2, dtype=torch.float64)], -1)
    loc_box = boxes[:, :, None, :, None, :2] + offsets / p * boxes[:, :, None, :, None, 2:] * 0.5
    expected_box = module.output_proj(naive_ms_deform_attn(value, shapes, loc_box, weights))
    torch.testing.assert_close(module(query, boxes, x, shapes, None, padding), expected_box)
    with pytest.raises(ValueError, match="end in 2"):
        module(query, ref[..., :1], x, shapes, None)


def test_module_rejects_wrong_level_count():
    module = MSDeformAttn(d_model=8, n_levels=2, n_heads=2, n_points=1)
    x = torch.randn(1, 6, 8)
    with pytest.raises(ValueError, match="2 levels"):
        module(x, torch.rand(1, 6, 1, 2), x, torch.tensor([[2, 3]]), None)
    with pytest.raises(ValueError, match="positions"):
        module(x, torch.rand(1, 6, 2, 2), x, torch.tensor([[2, 3], [1, 1]]), None)


def test_optional_fused_backend_agrees_when_installed(one_torch_thread):
    if "torch_ms_deform_attn" not in available_ms_deform_attn_backends():
        pytest.skip("torch-ms-deform-attn is not installed (optional fused kernel)")
    value, shapes, starts, loc, weights = _random_inputs(dtype=torch.float64, spread=0.4)
    ins = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    ref_ins = [t.clone().requires_grad_(True) for t in (value, loc, weights)]
    out = multi_scale_deformable_attention(ins[0], shapes, None, ins[1], ins[2], backend="torch_ms_deform_attn")
    ref = multi_scale_deformable_attention(ref_ins[0], shapes, starts, ref_ins[1], ref_ins[2], backend="pytorch")
    torch.testing.assert_close(out, ref, rtol=1e-10, atol=1e-12)
    for got, want in zip(torch.autograd.grad(out.sum(), ins), torch.autograd.grad(ref.sum(), ref_ins)):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-11)


def test_unavailable_fused_backend_says_what_happened_and_what_to_do(monkeypatch):
    import importlib.util
    import sys
    import types

    value, shapes, starts, loc, weights = _random_inputs(dtype=torch.float32)
    if "torch_ms_deform_attn" not in available_ms_deform_attn_backends():
        with pytest.raises(KeyError, match=r"optional fused CUDA kernel.*pip install.*torch-ms-deform-attn.*'pytorch'"):
            set_ms_deform_attn_backend("torch_ms_deform_attn")
    with pytest.raises(KeyError, match=r"'no-such-kernel' is not available.*register_ms_deform_attn_backend"):
        set_ms_deform_attn_backend("no-such-kernel")
    # Installed but unloadable (built for another torch): a RuntimeError naming the fix, at the first call.
    backends = dict(ms_deform_attn_module._BACKENDS)
    monkeypatch.setitem(sys.modules, "torch_ms_deform_attn", types.ModuleType("torch_ms_deform_attn"))
    real_find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec",
                        lambda name, *a: object() if name == "torch_ms_deform_attn" else real_find_spec(name, *a))
    try:
        ms_deform_attn_module._BACKENDS.pop("torch_ms_deform_attn", None)
        ms_deform_attn_module._register_optional_fused_kernels()
        with pytest.raises(RuntimeError, match=r"cannot load its compiled op.*--force-reinstall.*'pytorch'"):
            multi_scale_deformable_attention(value, shapes, starts, loc, weights, backend="torch_ms_deform_attn")
    finally:
        ms_deform_attn_module._BACKENDS.clear()
        ms_deform_attn_module._BACKENDS.update(backends)
