"""diffkit.metrics: the sliced Wasserstein distance and the mean / std errors, against exact references."""
from __future__ import annotations

import pytest
import torch

from diffkit import registry
from diffkit.metrics import BUILTIN_METRICS, mean_std_error, sliced_wasserstein


@pytest.mark.parametrize("p", [1, 2])
@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_one_dimensional_samples_give_the_exact_wasserstein_distance(p, scale):
    """In 1-D every projection is +-1: SW_p is the W_p of the sorted samples, at any scale."""
    g = torch.Generator().manual_seed(0)
    x = scale * torch.randn(500, 1, generator=g, dtype=torch.float64)
    y = scale * (0.5 + 2.0 * torch.randn(500, 1, generator=g, dtype=torch.float64))
    exact = ((x[:, 0].sort().values - y[:, 0].sort().values).abs() ** p).mean() ** (1 / p)
    got = sliced_wasserstein(x, y, n_projections=7, p=p)
    assert torch.allclose(got, exact, rtol=1e-12, atol=0)


@pytest.mark.parametrize("shape", [(3,), (2, 4), (2, 3, 2), (1, 2, 2, 2)])
def test_a_shift_moves_every_projection_by_its_dot_product(shape):
    """y = x + c: each sorted projection moves by theta . c, so SW_2^2 = mean_theta (theta . c)^2 exactly
    (the directions drawn from the same generator seed), on samples of any rank."""
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, *shape, generator=g, dtype=torch.float64)
    c = torch.randn(*shape, generator=g, dtype=torch.float64)
    got = sliced_wasserstein(x, x + c, n_projections=32, generator=torch.Generator().manual_seed(5))
    theta = torch.randn(c.numel(), 32, generator=torch.Generator().manual_seed(5), dtype=torch.float64)
    theta = theta / theta.norm(dim=0, keepdim=True)
    exact = ((theta.T @ c.reshape(-1)) ** 2).mean().sqrt()
    assert torch.allclose(got, exact, rtol=1e-10)
    # and the Monte-Carlo mean over directions tends to |c| / sqrt(d)
    many = sliced_wasserstein(x, x + c, n_projections=20000, generator=torch.Generator().manual_seed(2))
    assert abs(float(many) / float(c.norm() / c.numel() ** 0.5) - 1) < 0.05


def test_identical_sets_are_at_distance_zero_and_sizes_may_differ():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(40, 5, generator=g)
    assert float(sliced_wasserstein(x, x[torch.randperm(40, generator=g)])) < 1e-12   # round-off of the matmul
    d = sliced_wasserstein(x, torch.cat([x, x]), generator=torch.Generator().manual_seed(0))
    assert 0 <= float(d) < 0.1          # quantile matching of N = 40 against M = 80 samples of one set
    with pytest.raises(ValueError, match="sample sizes differ: 5 vs 4 values per sample"):
        sliced_wasserstein(x, torch.randn(3, 4))


def test_mean_std_error_is_the_largest_elementwise_error():
    x = torch.tensor([[1.0, 2.0], [3.0, 6.0]])          # means 2, 4; stds (ddof 1) sqrt(2), sqrt(8)
    em, es = mean_std_error(x, [2.5, 4.0], [1.0, 2.0])
    assert float(em) == pytest.approx(0.5)
    assert float(es) == pytest.approx(8 ** 0.5 - 2.0)
    small = 0.01 * torch.randn(20000, 3, generator=torch.Generator().manual_seed(4))
    em, es = mean_std_error(small, 0.0, 0.01)          # std 0.01 comes back as 0.01
    assert float(em) < 3e-4 and float(es) < 3e-4


def test_sliced_wasserstein_is_registered_as_a_metric():
    assert BUILTIN_METRICS["sliced_wasserstein"] is sliced_wasserstein
    assert registry.resolve("metric", "sliced_wasserstein") is sliced_wasserstein
