"""Tests of :mod:`diffkit.analytic`: the exact Gaussian and Gaussian-mixture denoisers, against the
closed form, Tweedie's formula with an autograd score, and importance sampling."""
from __future__ import annotations

import math

import pytest
import torch

import diffkit as dk

from _references import F64, ref_cosine_alpha_bar


def test_gaussian_denoiser_closed_form(shape, gen):
    sch = dk.cosine()
    mu = torch.randn(shape[1:], generator=gen, dtype=F64)
    sd = 0.7
    D = dk.GaussianDenoiser(sch, mu, sd)
    x = torch.randn(shape, generator=gen, dtype=F64) * 1.5
    t = torch.linspace(0.02, 1.0, shape[0], dtype=F64)
    out = D(x, t)
    assert out.shape == shape and out.dtype == F64
    ab = torch.tensor(ref_cosine_alpha_bar(t.numpy())).clamp_min(1 / (1 + math.exp(15)))
    a, s2 = ab.sqrt(), 1 - ab
    for i in range(shape[0]):
        want = mu + a[i] * sd**2 / (a[i] ** 2 * sd**2 + s2[i]) * (x[i] - a[i] * mu)
        torch.testing.assert_close(out[i], want, rtol=1e-9, atol=1e-10)
    # float32 input -> float32 output
    assert D(x.float(), t).dtype == torch.float32
    # sample_data moments
    data = D.sample_data(20000, generator=gen)
    assert data.shape == (20000, *shape[1:])
    assert float(((data.mean(0) - mu) / (sd / math.sqrt(20000))).abs().max()) < 5
    assert float(((data.std(0) - sd) / (sd / math.sqrt(40000))).abs().max()) < 5


def test_mixture_with_one_component_is_gaussian(shape, gen):
    sch = dk.linear()
    mu = torch.randn(shape[1:], generator=gen, dtype=F64)
    G = dk.GaussianDenoiser(sch, mu, 0.4)
    M = dk.GaussianMixtureDenoiser(sch, mu[None], [0.4], weights=[3.0])
    x = torch.randn(shape, generator=gen, dtype=F64)
    t = torch.rand(shape[0], generator=gen, dtype=F64) * 0.98 + 0.01
    torch.testing.assert_close(M(x, t), G(x, t), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("mean_shape", [(), (1, 1), (2, 1), (4,), (1, 4)], ids=str)
def test_mixture_means_broadcast_against_one_sample(mean_shape, request, gen):
    """analytic.py: "mu_k broadcasts against one sample x[0]"."""
    sch = dk.cosine()
    mean = torch.randn(mean_shape, generator=gen, dtype=F64)
    x = torch.randn(3, 2, 4, generator=gen, dtype=F64)
    t = torch.tensor([0.2, 0.5, 0.8], dtype=F64)
    full = dk.GaussianDenoiser(sch, mean.expand(2, 4).clone(), 0.6)(x, t)
    torch.testing.assert_close(dk.GaussianDenoiser(sch, mean, 0.6)(x, t), full, rtol=1e-12, atol=1e-12)


def _log_marginal(x, a, s, means, stds, weights):
    """log p_t(x) of the mixture data, written out by hand (per sample, summed over elements)."""
    B = x.shape[0]
    flat = x.reshape(B, -1)
    d = flat.shape[1]
    mf = means.reshape(means.shape[0], -1)
    var = a[:, None] ** 2 * stds[None] ** 2 + s[:, None] ** 2  # (B, K)
    sq = ((flat[:, None, :] - a[:, None, None] * mf[None]) ** 2).sum(-1)
    logn = -0.5 * sq / var - 0.5 * d * torch.log(2 * math.pi * var)
    return torch.logsumexp(torch.log(weights / weights.sum())[None] + logn, dim=1)


def test_mixture_denoiser_satisfies_tweedie(shape, gen):
    """E[x0|x_t] = (x_t + sigma^2 grad log p_t(x_t)) / alpha, with the score by autograd."""
    sch = dk.cosine()
    K = 3
    means = 1.5 * torch.randn(K, *shape[1:], generator=gen, dtype=F64)
    stds = torch.tensor([0.3, 0.6, 0.15], dtype=F64)
    weights = torch.tensor([0.5, 0.3, 0.2], dtype=F64)
    D = dk.GaussianMixtureDenoiser(sch, means, stds, weights)
    t = torch.linspace(0.1, 0.8, shape[0], dtype=F64)
    a, s = sch.coeffs(t)
    x = torch.randn(shape, generator=gen, dtype=F64)
    x = x.requires_grad_(True)
    lp = _log_marginal(x, a, s, means, stds, weights).sum()
    (score,) = torch.autograd.grad(lp, x)
    bb = lambda v: v[(...,) + (None,) * (x.ndim - 1)]
    tweedie = (x.detach() + bb(s) ** 2 * score) / bb(a)
    torch.testing.assert_close(D(x.detach(), t), tweedie, rtol=1e-8, atol=1e-8)
    assert D.nfe == 1


def test_mixture_denoiser_matches_importance_sampling(gen):
    """Self-normalised importance sampling of E[x0|x_t] with the prior as proposal."""
    sch = dk.linear()
    means = torch.tensor([[-1.0, 0.5], [1.2, -0.3]], dtype=F64)
    stds = torch.tensor([0.4, 0.25], dtype=F64)
    D = dk.GaussianMixtureDenoiser(sch, means, stds, weights=[0.35, 0.65])
    M = 400000
    x0s = D.sample_data(M, generator=gen)  # (M, 2)
    for t in (0.2, 0.5):
        a, s = (float(v) for v in sch.coeffs(t))
        x_t = torch.tensor([[0.3, -0.1], [-0.5, 0.4]], dtype=F64)
        est = D(x_t, t)
        for i in range(2):
            logw = -0.5 * ((x_t[i] - a * x0s) ** 2).sum(1) / s**2
            w = torch.softmax(logw, 0)
            ess = 1.0 / float((w**2).sum())
            mc = (w[:, None] * x0s).sum(0)
            sd = ((w[:, None] * (x0s - mc) ** 2).sum(0)).sqrt()
            assert ess > 1000
            assert bool(((est[i] - mc).abs() < 5 * sd / math.sqrt(ess) + 1e-3).all()), (est[i], mc)


def test_mixture_sample_data_weights(gen):
    D = dk.GaussianMixtureDenoiser(dk.cosine(), torch.tensor([-5.0, 5.0], dtype=F64), [0.1, 0.1], weights=[1, 3])
    d = D.sample_data(40000, generator=gen)
    frac = float((d > 0).double().mean())
    assert abs(frac - 0.75) < 5 * math.sqrt(0.75 * 0.25 / 40000)
