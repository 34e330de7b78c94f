"""Tests of :mod:`diffkit.process`: the forward process q_sample and the posterior q(x_s | x_t, x_0),
against closed-form Gaussian algebra and Monte Carlo."""
from __future__ import annotations

import math

import pytest
import torch

import diffkit as dk
from diffkit.errors import ShapeError
from diffkit.process import posterior_coeffs

from _references import F64, ref_cosine_alpha_bar, ref_linear_alpha_bar


@pytest.mark.parametrize("which", ["linear", "cosine"])
def test_q_sample_monte_carlo_moments(shape, which, gen):
    N = 20000
    if which == "linear":
        sch, n = dk.linear(), 300
        t = n / 1000
        ab = ref_linear_alpha_bar()[n - 1]
    else:
        sch, t = dk.cosine(), 0.62
        ab = float(ref_cosine_alpha_bar(t))
    a, s = math.sqrt(ab), math.sqrt(1 - ab)
    template = torch.randn(shape[1:], generator=gen, dtype=F64) * 2.0
    x0 = template.expand(N, *shape[1:])
    x_t, eps = dk.q_sample(sch, x0, t, generator=gen)
    assert x_t.shape == x0.shape and eps.shape == x0.shape and x_t.dtype == F64
    mean, var = x_t.mean(0), x_t.var(0)
    z_mean = (mean - a * template) / (s / math.sqrt(N))
    z_var = (var - s**2) / (s**2 * math.sqrt(2.0 / (N - 1)))
    assert float(z_mean.abs().max()) < 5.0, float(z_mean.abs().max())
    assert float(z_var.abs().max()) < 5.0, float(z_var.abs().max())
    # the returned eps is the noise that was used
    torch.testing.assert_close(x_t, a * x0 + s * eps, rtol=1e-12, atol=1e-12)


def test_q_sample_per_sample_times_and_given_eps(shape, gen):
    sch = dk.cosine()
    x0 = torch.randn(shape, generator=gen, dtype=F64)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    t = torch.linspace(0.05, 0.95, shape[0], dtype=F64)
    x_t, eps_out = dk.q_sample(sch, x0, t, eps=eps)
    assert eps_out is eps
    ab = torch.tensor(ref_cosine_alpha_bar(t.numpy()))
    for i in range(shape[0]):
        want = ab[i].sqrt() * x0[i] + (1 - ab[i]).sqrt() * eps[i]
        torch.testing.assert_close(x_t[i], want, rtol=1e-10, atol=1e-12)
    # float32 data stays float32
    x32, _ = dk.q_sample(sch, x0.float(), t)
    assert x32.dtype == torch.float32
    with pytest.raises(ShapeError):
        dk.q_sample(sch, x0, torch.full((shape[0] + 1,), 0.5))


@pytest.mark.parametrize("which, s, t", [("linear", 0.2, 0.5), ("cosine", 0.05, 0.1), ("cosine", 0.4, 0.9),
                                         ("linear", 0.499, 0.5)])
def test_posterior_matches_monte_carlo_regression(which, s, t, gen):
    """For fixed x0, (x_s, x_t) is jointly Gaussian; E[x_s|x_t,x0] is the linear regression of
    x_s on x_t and Var[x_s|x_t,x0] its residual variance."""
    sch = dk.linear() if which == "linear" else dk.cosine()
    N, x0v = 400000, 0.8
    if which == "linear":
        abr = ref_linear_alpha_bar()
        ab_s, ab_t = abr[round(s * 1000) - 1], abr[round(t * 1000) - 1]
    else:
        ab_s, ab_t = ref_cosine_alpha_bar(s), ref_cosine_alpha_bar(t)
    a_s, s_s = math.sqrt(ab_s), math.sqrt(1 - ab_s)
    lam = math.sqrt(ab_t / ab_s)
    sig = math.sqrt(1 - lam**2)
    x_s = a_s * x0v + s_s * torch.randn(N, generator=gen, dtype=F64)
    x_t = lam * x_s + sig * torch.randn(N, generator=gen, dtype=F64)
    # least squares x_s ~ c + b x_t
    xm, ym = x_t.mean(), x_s.mean()
    vx = ((x_t - xm) ** 2).mean()
    b = (((x_t - xm) * (x_s - ym)).mean() / vx).item()
    c = (ym - b * xm).item()
    resid = x_s - (c + b * x_t)
    rv = float((resid**2).sum() / (N - 2))
    se_b = math.sqrt(rv / (N * float(vx)))
    se_c = math.sqrt(rv / N * (1 + float(xm) ** 2 / float(vx)))
    se_v = rv * math.sqrt(2.0 / N)

    x0 = torch.full((2,), x0v, dtype=F64)
    mean, var = dk.posterior(sch, x0, torch.tensor([0.0, 1.0], dtype=F64), s, t)
    c_hat, b_hat = float(mean[0]), float(mean[1] - mean[0])
    assert abs(b_hat - b) < 5 * se_b, (b_hat, b, se_b)
    assert abs(c_hat - c) < 5 * se_c, (c_hat, c, se_c)
    assert abs(float(var[0]) - rv) < 5 * se_v, (float(var[0]), rv, se_v)
    # and the closed form (Turner et al. eq. for the posterior), computed by hand
    s_t2 = 1 - ab_t
    assert b_hat == pytest.approx(lam * s_s**2 / s_t2, rel=1e-9)
    assert c_hat == pytest.approx(a_s * sig**2 / s_t2 * x0v, rel=1e-9)
    assert float(var[0]) == pytest.approx(sig**2 * s_s**2 / s_t2, rel=1e-9)


def test_posterior_any_rank_per_sample_times(shape, gen):
    sch = dk.cosine()
    x0 = torch.randn(shape, generator=gen, dtype=F64)
    x_t = torch.randn(shape, generator=gen, dtype=F64)
    t = torch.linspace(0.1, 0.9, shape[0], dtype=F64)
    s = t * 0.6
    mean, var = dk.posterior(sch, x0, x_t, s, t)
    assert mean.shape == shape and var.shape == (shape[0],)
    ab_s, ab_t = (torch.tensor(ref_cosine_alpha_bar(v.numpy())) for v in (s, t))
    for i in range(shape[0]):
        lam2 = ab_t[i] / ab_s[i]
        want = (ab_s[i].sqrt() * (1 - lam2) * x0[i] + lam2.sqrt() * (1 - ab_s[i]) * x_t[i]) / (1 - ab_t[i])
        torch.testing.assert_close(mean[i], want, rtol=1e-9, atol=1e-12)
        assert float(var[i]) == pytest.approx(float((1 - lam2) * (1 - ab_s[i]) / (1 - ab_t[i])), rel=1e-9)


def test_posterior_limits():
    sch = dk.linear()
    x0 = torch.tensor([1.5, -2.0], dtype=F64)
    x_t = torch.tensor([0.3, 0.7], dtype=F64)
    # s = 0: the posterior is the data itself
    m, v = dk.posterior(sch, x0, x_t, 0.0, 0.4)
    torch.testing.assert_close(m, x0, rtol=0, atol=1e-12)
    assert float(v.max()) < 1e-20
    # s -> t: the posterior collapses onto x_t
    m, v = dk.posterior(sch, x0, x_t, 0.4, 0.4)
    torch.testing.assert_close(m, x_t, rtol=0, atol=1e-12)
    assert float(v.max()) < 1e-20


def test_posterior_sample_moments(shape, gen):
    sch = dk.cosine()
    N = 20000
    x0_1 = torch.randn(shape[1:], generator=gen, dtype=F64)
    xt_1 = torch.randn(shape[1:], generator=gen, dtype=F64)
    x0, x_t = x0_1.expand(N, *shape[1:]), xt_1.expand(N, *shape[1:])
    s, t = 0.3, 0.55
    draws = dk.posterior_sample(sch, x0, x_t, s, t, generator=gen)
    mean, var = dk.posterior(sch, x0[:1], x_t[:1], s, t)
    v = float(var[0])
    z_m = (draws.mean(0) - mean[0]) / math.sqrt(v / N)
    z_v = (draws.var(0) - v) / (v * math.sqrt(2.0 / (N - 1)))
    assert float(z_m.abs().max()) < 5 and float(z_v.abs().max()) < 5
    # reproducible with a generator
    a = dk.posterior_sample(sch, x0[:4], x_t[:4], s, t, generator=torch.Generator().manual_seed(0))
    b = dk.posterior_sample(sch, x0[:4], x_t[:4], s, t, generator=torch.Generator().manual_seed(0))
    assert torch.equal(a, b)


def test_posterior_coeffs_reproduce_marginal_of_x_s():
    """Averaging the posterior over x_t ~ q(x_t|x0) must give q(x_s|x0) = N(a_s x0, s_s^2):
    c_x0 + c_xt a_t = a_s and c_xt^2 s_t^2 + var = s_s^2."""
    for sch in (dk.linear(), dk.cosine(), dk.sigmoid()):
        t = torch.linspace(0.05, 1.0, 20, dtype=F64)
        s = t * torch.linspace(0.0, 0.99, 20, dtype=F64)
        c_x0, c_xt, var = posterior_coeffs(sch, s, t)
        a_s, s_s = sch.coeffs(s)
        a_t, s_t = sch.coeffs(t)
        torch.testing.assert_close(c_x0 + c_xt * a_t, a_s, rtol=1e-10, atol=1e-12)
        torch.testing.assert_close(c_xt**2 * s_t**2 + var, s_s**2, rtol=1e-10, atol=1e-12)
