"""``diffkit.sampling.sample_posterior``: posterior samples of a single-state model given observations.

Exact references: the denoiser is the closed-form one of a Gaussian prior (``diffkit.GaussianDenoiser``),
the operators are linear (a mask, a 2x2 block average), so the posterior is Gaussian with a closed-form
mean and covariance, and MMPS with the exact denoiser samples it (up to the sampler's discretisation).
Measured (seed 2 / 3, 2000 members): pooled variance ratios 0.98-1.03 at prior std 1 and 0.01; with the
samplers' usual last noise level 1e-3 instead of :func:`posterior_sigma_min` the observed points' spread
at prior std 0.01 came back 4-6 % low (0.939-0.964).
"""
from __future__ import annotations

import math

import pytest
import torch

import diffkit as dk
from diffkit.assimilate import model_space
from diffkit.errors import UnknownComponentError
from diffkit.guidance import BlockAverage, MaskOperator, Observation
from diffkit.layout import Layout
from diffkit.observations import StepObservations
from diffkit.sampling import posterior_sigma_min, sample_posterior

DT = torch.float64
N = 1500          # members per observation
NFE = 30


def _gen(seed):
    return torch.Generator().manual_seed(seed)


def _masked_problem(shape, s, seed=0, n=2):
    """A Gaussian prior N(mean, s^2 I) of samples ``shape``, about half of it observed with sigma_y = s/2,
    ``n`` independent observations; returns what the closed form needs."""
    g = _gen(seed)
    mean = 0.3 + s * torch.randn(shape, generator=g, dtype=DT)
    mask = torch.rand(shape, generator=g) < 0.5
    mask.view(-1)[0], mask.view(-1)[-1] = True, False
    sy = 0.5 * s
    truth = mean + s * torch.randn((n, *shape), generator=g, dtype=DT)
    y = truth[:, mask] + sy * torch.randn((n, int(mask.sum())), generator=g, dtype=DT)
    return mean, mask, sy, y


def _check_masked(x, mean, mask, s, sy, y, n_members):
    """Observed points: the posterior N((mu/s^2 + y/sy^2) v, v), v = 1/(1/s^2 + 1/sy^2); unobserved: the prior."""
    v = 1.0 / (1.0 / s**2 + 1.0 / sy**2)
    pm = (mean[mask] / s**2 + y / sy**2) * v
    xo, xu = x[:, :, mask], x[:, :, ~mask]
    z_obs = ((xo.mean(1) - pm) / math.sqrt(v / n_members)).abs().max()
    z_free = ((xu.mean(1) - mean[~mask]) / (s / math.sqrt(n_members))).abs().max()
    r_obs, r_free = xo.var(1) / v, xu.var(1) / s**2
    return float(z_obs), float(z_free), r_obs, r_free


@pytest.mark.parametrize("shape,s", [((1, 12), 1.0), ((1, 12), 0.01), ((2, 3, 4), 0.01), ((1, 2, 3, 4), 1.0),
                                     ((1, 2, 3, 4), 0.01)])
def test_mmps_samples_are_the_gaussian_posterior_at_every_rank_and_scale(shape, s):
    """Spatial rank 1..3, prior std 1 and 0.01 (model units): posterior means within 5 Monte-Carlo
    standard errors, variances (pooled over points) within 6 % and per point within 20 %, observed and
    unobserved points alike.  Counter-check: the prior's samples (method=None) miss the observed means."""
    mean, mask, sy, y = _masked_problem(shape, s)
    den = dk.GaussianDenoiser(dk.cosine(), mean, s)
    obs = Observation(MaskOperator(mask), y, sy)
    x = sample_posterior(den, obs, shape, members=N, method="mmps", nfe=NFE, seed=1, dtype=DT)
    assert x.shape == (2, N, *shape)
    z_obs, z_free, r_obs, r_free = _check_masked(x, mean, mask, s, sy, y, N)
    assert z_obs < 5 and z_free < 5, (z_obs, z_free)
    assert abs(float(r_obs.mean()) - 1) < 0.06 and abs(float(r_free.mean()) - 1) < 0.06, (r_obs.mean(), r_free.mean())
    assert float((r_obs - 1).abs().max()) < 0.2 and float((r_free - 1).abs().max()) < 0.2
    prior = sample_posterior(den, obs, shape, members=N, method=None, nfe=NFE, seed=1, dtype=DT)
    assert _check_masked(prior, mean, mask, s, sy, y, N)[0] > 10


def test_physical_observations_are_mapped_through_the_layout():
    """StepObservations in physical units (x = mean_c + std_c z per channel, std_c = 50 and 0.2) with the
    layout, mapped by diffkit.assimilate.model_space: the de-standardised samples have the physical
    closed-form posterior; the sample shape comes from the layout."""
    shape, s = (2, 6), 0.01
    lay = Layout(channels=("a", "b"), spatial=("x",), shape=(6,), mean=torch.tensor([[280.0], [-3.0]]),
                 std=torch.tensor([[50.0], [0.2]]))
    zmean, mask, sy, _ = _masked_problem(shape, s, seed=3, n=1)
    pmean = lay.denormalize(zmean[None].float()).to(DT)[0]
    pstd = lay.std.to(DT).expand(shape)
    g = _gen(4)
    truth = pmean + s * pstd * torch.randn(shape, generator=g, dtype=DT)
    sig = sy * pstd[mask]
    y = truth[mask] + sig * torch.randn(sig.shape, generator=g, dtype=DT)
    den = dk.GaussianDenoiser(dk.cosine(), zmean, s)
    z = sample_posterior(den, model_space(StepObservations(y, sig, mask=mask), lay), members=N, layout=lay, nfe=NFE,
                         seed=5, dtype=DT)
    x = pmean + pstd * (z - zmean)                       # physical, exactly as layout.denormalize
    ps = s * pstd[mask]
    v = 1.0 / (1.0 / ps**2 + 1.0 / sig**2)
    pm = (pmean[mask] / ps**2 + y / sig**2) * v
    xo = x[0][:, mask]
    assert float(((xo.mean(0) - pm) / (v / N).sqrt()).abs().max()) < 5
    assert abs(float((xo.var(0) / v).mean()) - 1) < 0.06
    free = x[0][:, ~mask]
    assert abs(float((free.var(0) / (s * pstd[~mask]) ** 2).mean()) - 1) < 0.06


def test_block_average_super_resolution_posterior():
    """2x2 block means of a 4x4 field (sigma_y 0.1, prior std 1): mean and marginal variances of the
    dense closed form ``C = (I/s^2 + A^T A/sy^2)^-1``, ``m = C (mu/s^2 + A^T y/sy^2)``."""
    shape, s, sy = (1, 4, 4), 1.0, 0.1
    g = _gen(6)
    mu = torch.randn(shape, generator=g, dtype=DT)
    op = BlockAverage((2, 2), shape)
    A = torch.stack([op(e.reshape(1, *shape))[0].reshape(-1) for e in torch.eye(16, dtype=DT)], 1)  # (4, 16)
    truth = mu + s * torch.randn(shape, generator=g, dtype=DT)
    y = op(truth[None]) + sy * torch.randn((1, 2, 2), generator=g, dtype=DT).reshape(op(truth[None]).shape)
    den = dk.GaussianDenoiser(dk.cosine(), mu, s)
    x = sample_posterior(den, Observation(op, y, sy), shape, members=N, method={"name": "mmps", "cg_iters": 4},
                         nfe=NFE, seed=7, dtype=DT)[0].reshape(N, -1)
    C = torch.linalg.inv(torch.eye(16, dtype=DT) / s**2 + A.T @ A / sy**2)
    m = C @ (mu.reshape(-1) / s**2 + A.T @ y.reshape(-1) / sy**2)
    sd = C.diagonal().sqrt()
    assert float(((x.mean(0) - m) / (sd / math.sqrt(N))).abs().max()) < 5
    assert abs(float((x.var(0) / C.diagonal()).mean()) - 1) < 0.06
    # the block means are pinned down: their spread is the posterior's, far below the prior's
    means = (x @ A.T).var(0)
    assert float(means.max()) < 2 * float((A @ C @ A.T).diagonal().max())


def test_posterior_sigma_min_follows_the_smallest_observation_noise():
    mask = torch.ones((1, 3), dtype=torch.bool)
    assert posterior_sigma_min(Observation(MaskOperator(mask), torch.zeros((1, 3)), 1.0)) == 1e-3
    assert posterior_sigma_min(Observation(MaskOperator(mask), torch.zeros((1, 3)), [[0.5, 0.002, 0.1]])) \
        == pytest.approx(2e-4)
    assert posterior_sigma_min(Observation(MaskOperator(mask), torch.zeros((1, 3)), 1e-9)) == 1e-5
    assert posterior_sigma_min(Observation(MaskOperator(mask), torch.zeros((1, 3)), 0.0)) == 1e-3


def test_same_seed_same_samples_and_bad_arguments_are_one_line_errors():
    shape = (1, 4)
    den = dk.GaussianDenoiser(dk.cosine(), torch.zeros(shape), 1.0)
    obs = Observation(MaskOperator(torch.tensor([[True, False, True, False]])), torch.zeros((1, 2)), 0.1)
    a = sample_posterior(den, obs, shape, members=3, nfe=5, seed=0)
    assert torch.equal(a, sample_posterior(den, obs, shape, members=3, nfe=5, seed=0))
    assert not torch.equal(a, sample_posterior(den, obs, shape, members=3, nfe=5, seed=1))
    with pytest.raises(ValueError, match="members must be an integer >= 1"):
        sample_posterior(den, obs, shape, members=0)
    with pytest.raises(UnknownComponentError):
        sample_posterior(den, obs, shape, method="nope")
    with pytest.raises(TypeError, match="diffkit.assimilate.model_space"):
        sample_posterior(den, StepObservations(torch.zeros(2), torch.ones(2), mask=obs.operator.mask), shape)
    with pytest.raises(TypeError, match="give shape"):
        sample_posterior(den, obs)
    with pytest.raises(TypeError, match="observation must be"):
        sample_posterior(den, torch.zeros(2), shape)
