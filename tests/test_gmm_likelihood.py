"""diagonal_gaussian_log_likelihood against torch.distributions and a direct formula."""
import math

import pytest
import torch
import torch.nn.functional as F
from torch.distributions import Normal
from torch.utils._python_dispatch import TorchDispatchMode

from gmmseg_d2.modeling.gmm import diagonal_gaussian_log_likelihood


# Small kernels are timing-sensitive to a shared second core; see conftest.
pytestmark = pytest.mark.usefixtures("one_torch_thread")


def reference(x: torch.Tensor, means: torch.Tensor, stds: torch.Tensor) -> torch.Tensor:
    """(N, C, M) log-densities from torch.distributions, by broadcasting."""
    normal = Normal(means[None], stds[None])  # (1, C, M, D)
    return normal.log_prob(x[:, None, None, :]).sum(-1)


def random_problem(n, c, m, d, dtype, std_low, std_high, seed=0):
    g = torch.Generator().manual_seed(seed)
    x = F.normalize(torch.randn(n, d, generator=g, dtype=dtype), dim=-1)
    means = F.normalize(torch.randn(c, m, d, generator=g, dtype=dtype), dim=-1)
    # log-uniform stds in [std_low, std_high]
    log_std = math.log(std_low) + (math.log(std_high) - math.log(std_low)) * torch.rand(
        c, m, d, generator=g, dtype=dtype
    )
    # Put some features right on a component mean: the worst case for the
    # cancellation of the expanded quadratic form.
    x[: c * m] = means.reshape(-1, d)[: min(n, c * m)] + 1e-3 * torch.randn(min(n, c * m), d, generator=g, dtype=dtype)
    return x, means, log_std.exp()


def assert_relative_close(actual, expected, rtol):
    scale = expected.abs().clamp_min(1.0)
    err = ((actual - expected).abs() / scale).max().item()
    assert err <= rtol, f"max relative error {err:.2e} > {rtol:.0e}"


@pytest.mark.parametrize("num_classes,num_components", [(19, 5), (3, 1), (1, 4)])
def test_matches_torch_distributions_fp32(num_classes, num_components):
    x, means, stds = random_problem(500, num_classes, num_components, 64, torch.float32, 0.1, 2.0)
    ours = diagonal_gaussian_log_likelihood(x, means, stds)
    assert ours.shape == (500, num_classes, num_components) and ours.dtype == torch.float32
    assert_relative_close(ours, reference(x, means, stds), 1e-4)


def test_matches_torch_distributions_fp64():
    x, means, stds = random_problem(400, 7, 5, 64, torch.float64, 0.1, 2.0)
    ours = diagonal_gaussian_log_likelihood(x, means, stds)
    assert ours.dtype == torch.float64
    assert_relative_close(ours, reference(x, means, stds), 1e-12)


def test_extreme_stds_fp32():
    # sigma from 1e-2 (10x below GMMSeg's floor of 0.1) to 1e2.
    x, means, stds = random_problem(300, 6, 5, 64, torch.float32, 1e-2, 1e2, seed=1)
    ours = diagonal_gaussian_log_likelihood(x, means, stds)
    expected = reference(x.double(), means.double(), stds.double())
    assert torch.isfinite(ours).all()
    assert_relative_close(ours.double(), expected, 1e-4)


def test_extreme_stds_fp64():
    x, means, stds = random_problem(300, 6, 5, 64, torch.float64, 1e-4, 1e4, seed=2)
    assert_relative_close(diagonal_gaussian_log_likelihood(x, means, stds), reference(x, means, stds), 1e-9)


def test_gradient_matches_direct_formula():
    x, means, stds = random_problem(50, 4, 3, 16, torch.float64, 0.1, 1.0, seed=3)
    x1 = x.clone().requires_grad_(True)
    x2 = x.clone().requires_grad_(True)
    weights = torch.randn(50, 4, 3, dtype=torch.float64)
    (diagonal_gaussian_log_likelihood(x1, means, stds) * weights).sum().backward()
    (reference(x2, means, stds) * weights).sum().backward()
    torch.testing.assert_close(x1.grad, x2.grad, rtol=1e-10, atol=1e-10)


def test_half_inputs_and_autocast_compute_in_fp32():
    x, means, stds = random_problem(200, 5, 5, 64, torch.float32, 0.1, 1.0, seed=4)
    exact = diagonal_gaussian_log_likelihood(x, means, stds)
    with torch.autocast(device_type="cpu", dtype=torch.bfloat16):
        under_autocast = diagonal_gaussian_log_likelihood(x, means, stds)
    assert under_autocast.dtype == torch.float32
    torch.testing.assert_close(under_autocast, exact, rtol=1e-6, atol=1e-5)
    # Half inputs are upcast, not computed in half: the result equals the fp32
    # computation on the (rounded) half values.
    from_half = diagonal_gaussian_log_likelihood(x.half(), means.half(), stds.bfloat16())
    assert from_half.dtype == torch.float32
    torch.testing.assert_close(
        from_half, diagonal_gaussian_log_likelihood(x.half().float(), means.half().float(), stds.bfloat16().float())
    )


class _LargestOutput(TorchDispatchMode):
    """Records the largest tensor any ATen op produces."""

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else [out]:
            if isinstance(t, torch.Tensor):
                self.largest = max(self.largest, t.numel())
        return out


def test_no_n_by_components_by_dim_intermediate():
    n, c, m, d = 256, 10, 5, 64
    x, means, stds = random_problem(n, c, m, d, torch.float32, 0.1, 1.0)
    x.requires_grad_(True)
    with _LargestOutput() as mode:
        diagonal_gaussian_log_likelihood(x, means, stds).sum().backward()
    # The output (N*C*M) and the (N, 2D) features are the largest tensors; a
    # broadcast would produce N*C*M*D elements.
    assert mode.largest <= max(n * c * m, n * 2 * d)


def test_shape_errors():
    x = torch.randn(4, 8)
    with pytest.raises(ValueError):
        diagonal_gaussian_log_likelihood(x, torch.randn(2, 3, 7), torch.ones(2, 3, 7))
    with pytest.raises(ValueError):
        diagonal_gaussian_log_likelihood(x, torch.randn(2, 3, 8), torch.ones(2, 8))
