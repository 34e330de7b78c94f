"""diffkit.smc.twisted_smc: twisted sequential Monte Carlo over a guided denoiser.

Exact references: the closed-form likelihood p(y | x_t) of a Gaussian prior (the twisting functions),
the closed-form posterior mixture of a Gaussian-mixture prior (its modes' weights), the Gaussian
posterior at std 0.01.  The helpers are those of ``benchmarks/guidance_gmm.py``.
"""
from __future__ import annotations

import importlib.util
import math
from pathlib import Path

import pytest
import torch

import diffkit as dk
from diffkit.errors import ObservationError
from diffkit.guidance import GuidedDenoiser, LinearOperator, MaskOperator, Observation, dps, mmps, reconstruction
from diffkit.smc import systematic_resample, twisted_smc

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
_spec = importlib.util.spec_from_file_location("bench_guidance_gmm_smc", ROOT / "benchmarks" / "guidance_gmm.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _gaussian_problem(g, shape=(1, 2, 3), n_obs=4, sigma_y=0.1):
    d = math.prod(shape)
    m = 0.5 * torch.randn(d, generator=g, dtype=DT)
    L = torch.randn((d, d), generator=g, dtype=DT) / math.sqrt(d)
    C = L @ L.T + 0.1 * torch.eye(d, dtype=DT)
    den = bench.FullGaussianDenoiser(dk.cosine(), m, C, shape)
    W = torch.randn((n_obs, d), generator=g, dtype=DT)
    y = W @ (m + torch.linalg.cholesky(C) @ torch.randn(d, generator=g, dtype=DT)) + sigma_y * torch.randn(n_obs, generator=g, dtype=DT)
    return m, C, W, den, Observation(LinearOperator(W, shape), y[None], sigma_y)


def _exact_log_p_y_given_xt(m, C, W, sigma_y, y, x, a, s):
    """log N(y; W E[x0 | x_t], sigma_y^2 I + W Cov[x0 | x_t] W^T): exact for a Gaussian prior."""
    d = m.numel()
    cov_post = torch.linalg.inv(torch.linalg.inv(C) + (a * a / (s * s)) * torch.eye(d, dtype=DT))
    S = W @ cov_post @ W.T + sigma_y**2 * torch.eye(W.shape[0], dtype=DT)
    out = []
    for xi in x.flatten(1):
        mean = cov_post @ (torch.linalg.solve(C, m) + (a / (s * s)) * xi)
        out.append(torch.distributions.MultivariateNormal(W @ mean, S).log_prob(y))
    return torch.stack(out)


def test_the_twisting_functions_are_the_methods_likelihoods():
    """twisted() returns the guided x0 of __call__, the denoiser's own D(x_t), and log p~(y | x_t):
    for MMPS on a Gaussian prior the exact log p(y | x_t) (up to one constant for the batch), for
    reconstruction guidance its Gaussian, for DPS -2 zeta ||y - A D||."""
    g = _gen(1)
    m, C, W, den, obs = _gaussian_problem(g)
    y = obs.y[0]
    x = torch.randn((5, 1, 2, 3), generator=g, dtype=DT)
    for t in (0.2, 0.6, 0.9):
        a, s = (float(v) for v in dk.cosine().coeffs(torch.tensor(t, dtype=DT)))
        want = _exact_log_p_y_given_xt(m, C, W, 0.1, y, x, a, s)
        guided = mmps(den, obs, cg_iters=4, cg_tol=0.0)
        x0g, x0p, lt = guided.twisted(x, t)
        torch.testing.assert_close(x0g, guided(x, t), rtol=0, atol=0)
        torch.testing.assert_close(x0p, den(x, t), rtol=0, atol=0)
        off = lt - want  # the constant n_obs/2 log(2 pi) the twist leaves out
        torch.testing.assert_close(off, torch.full_like(off, 2 * math.log(2 * math.pi)), rtol=1e-9, atol=1e-9)
        D = den(x, t).flatten(1)
        r = y - D @ W.T
        v = 0.01 + 0.5 * s * s / (a * a)
        rec = reconstruction(den, obs, gamma=0.5).twisted(x, t)[2]
        torch.testing.assert_close(rec, (-0.5 * (r * r / v + math.log(v))).sum(1), rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(dps(den, obs, zeta=0.3).twisted(x, t)[2], -0.6 * r.norm(dim=1), rtol=1e-12, atol=1e-12)


def test_log_likelihood_is_the_exact_gaussian_and_refuses_noise_free_observations():
    g = _gen(2)
    m, C, W, den, obs = _gaussian_problem(g)
    x0 = torch.randn((3, 1, 2, 3), generator=g, dtype=DT)
    want = torch.distributions.Normal(x0.flatten(1) @ W.T, 0.1).log_prob(obs.y).sum(1)
    torch.testing.assert_close(mmps(den, obs).log_likelihood(x0), want, rtol=1e-12, atol=1e-12)
    exact_obs = Observation(obs.operator, obs.y, 0.0)
    with pytest.raises(ObservationError, match="sigma_y > 0"):
        dk.sample(mmps(den, exact_obs), (8, 1, 2, 3), sampler=twisted_smc, nfe=4, dtype=DT)


def _bimodal_problem(y=0.0):
    """Two well-separated components (weights 0.7 / 0.3, stds 0.2 / 0.6) observed through one dense
    row with sigma_y = 0.1: at y = 0 the posterior has two modes of weight 0.50 / 0.50, which plain
    MMPS gives 0.69 / 0.31."""
    means = torch.tensor([[-2.0, 0.0], [2.0, 0.5]], dtype=DT).reshape(2, 1, 2)
    stds = torch.tensor([0.2, 0.6], dtype=DT)
    weights = torch.tensor([0.7, 0.3], dtype=DT)
    den = dk.GaussianMixtureDenoiser(dk.cosine(), means, stds, weights)
    A = torch.tensor([[0.3, 1.0]], dtype=DT)
    post = bench.gmm_posterior(means.reshape(2, 2), stds, weights, A, 0.1, torch.tensor([y], dtype=DT))
    return den, Observation(LinearOperator(A, (1, 2)), torch.tensor([[y]], dtype=DT), 0.1), post


@pytest.mark.parametrize("problem, nfe", [("bimodal", 400), ("gmm_dense", 100)])
def test_smc_gives_the_mixture_posterior_its_modes_weights(problem, nfe):
    """The posterior of a Gaussian-mixture prior is a mixture in closed form.  Plain MMPS misplaces its
    modes' weights (its single Gaussian for p(y | x_t)); twisted SMC over the same MMPS denoiser puts
    each mode's share of 4000 members within 0.04 of the exact weight (exact samples: within 0.03,
    4 binomial sd), where plain MMPS is off by more than 0.15 (bimodal: 0.69 / 0.31 for 0.50 / 0.50;
    the benchmark's dense problem: 0.69 / 0.29 for 0.98 / 0.02).  SMC is exact for the DDPM chain on
    its grid, so the grid must resolve the prior: on the bimodal problem the chain at NFE 20 gives the
    narrow component a std 22 % low along the observed direction, and SMC's shares follow that chain
    (0.28 / 0.72); at NFE 100 0.42-0.47, at NFE 400 0.49-0.50 (docs/assimilation.md)."""
    if problem == "bimodal":
        den, obs, post = _bimodal_problem()
        shape = (1, 2)
    else:
        den, obs, exact = bench.gmm_problem("dense", seed=0)
        post, shape = exact.posterior, bench.SHAPE
    w = torch.softmax(post[0], 0)
    exact_x = bench.sample_mixture(post[0], post[1], post[2], 4000, _gen(3)).reshape(4000, *shape)
    share_exact = bench.mode_fractions(exact_x, post)
    assert float((share_exact - w).abs().max()) < 0.03, (share_exact, w)  # the classifier is sharp
    if problem == "bimodal":
        assert 0.2 < float(w.min()) and float(w.max()) < 0.8, w  # two modes that matter
    share = bench.mode_fractions(dk.sample(mmps(den, obs), (4000, *shape), sampler=twisted_smc, nfe=nfe, dtype=DT,
                                           generator=_gen(4)), post)
    plain = bench.mode_fractions(dk.sample(mmps(den, obs), (4000, *shape), nfe=20, dtype=DT, generator=_gen(4)), post)
    assert float((share - w).abs().max()) < 0.04, (share, w)
    assert float((plain - w).abs().max()) > 0.15, (plain, w)


def test_smc_keeps_a_narrow_posterior_at_its_scale():
    """A prior of std 0.01 in model units, half of it observed with sigma_y = 0.01: twisted SMC (NFE
    200, 4000 members) gives the unobserved values std 0.01 and the observed ones the posterior std
    0.01/sqrt(2): within 4.5 % on average over the values, each within 8 %, and the posterior means
    within 8 Monte-Carlo sd (about 2000 effective members).  The margins are the DDPM chain's: its
    own std at NFE 200 is 2-3.5 % low (measured over 5 seeds: mean ratios 0.97-0.99, means within
    5.2 sd), which the weights do not correct -- they correct the guidance, not the chain."""
    s = 0.01
    den, obs, mask, mean, post_mean, post_sd = bench.narrow_masked_problem(_gen(5), std=s, sigma_y=0.01)
    x = dk.sample(mmps(den, obs), (4000, *mask.shape), sampler=twisted_smc, nfe=200, dtype=DT, generator=_gen(6))
    for ratio in (x[:, mask].std(0) / post_sd, x[:, ~mask].std(0) / s):
        assert abs(float(ratio.mean()) - 1) < 0.045 and float((ratio - 1).abs().max()) < 0.08, ratio
    assert float((x[:, mask].mean(0) - post_mean).abs().max()) < 8 * post_sd / math.sqrt(2000)
    assert float((x[:, ~mask].mean(0) - mean[~mask]).abs().max()) < 8 * s / math.sqrt(2000)


def test_each_observation_weights_its_own_particles():
    """Two observations (y batch of 2) and 2 x 2000 members (NFE 400): each group is resampled on its own and
    follows its own observation's posterior (mode weights 0.50 / 0.50 at y = 0, 0.27 / 0.73 at
    y = 0.4; the callback's ess has one value per group)."""
    den, obs, _ = _bimodal_problem()
    ys = torch.tensor([[0.0], [0.4]], dtype=DT)
    ess = []
    x = dk.sample(mmps(den, Observation(obs.operator, ys, 0.1)), (4000, 1, 2), sampler=twisted_smc, nfe=400, dtype=DT,
                  generator=_gen(7), callback=lambda d: ess.append(d["ess"]))
    for k, y in enumerate(ys):
        post = _bimodal_problem(float(y))[2]
        w = torch.softmax(post[0], 0)
        share = bench.mode_fractions(x[2000 * k:2000 * (k + 1)], post)
        assert float((share - w).abs().max()) < 0.05, (k, share, w)
    assert float(torch.softmax(_bimodal_problem(0.4)[2][0], 0)[0]) < 0.35  # the groups' posteriors differ
    assert all(e.shape == (2,) for e in ess)


@pytest.mark.parametrize("shape", [(2, 6), (1, 4, 6), (2, 2, 4, 2), (1, 2, 2, 4, 2), (1, 2, 2, 2, 2, 2)],
                         ids=lambda s: f"spatial_rank{len(s) - 1}")
def test_smc_runs_at_every_rank_and_is_reproducible(shape):
    """Shape-agnostic: spatial ranks 1-5, float32; same generator, same members; finite and closer
    to the observations than the prior."""
    g = _gen(8)
    den = dk.GaussianDenoiser(dk.cosine(), torch.zeros(shape), 1.0)
    mask = torch.rand(shape, generator=g) < 0.3
    mask.view(-1)[0] = True
    y = 1.5 + 0.1 * torch.randn((1, int(mask.sum())), generator=g)
    guided = mmps(den, Observation(MaskOperator(mask), y, 0.1))
    a = dk.sample(guided, (16, *shape), sampler=twisted_smc, nfe=8, generator=_gen(9))
    b = dk.sample(guided, (16, *shape), sampler=twisted_smc, nfe=8, generator=_gen(9))
    assert a.shape == (16, *shape) and a.dtype == torch.float32 and bool(torch.isfinite(a).all())
    torch.testing.assert_close(a, b, rtol=0, atol=0)
    prior = dk.sample(den, (16, *shape), sampler="ddpm", nfe=8, generator=_gen(9))
    assert (a[:, mask] - y).pow(2).mean() < 0.5 * (prior[:, mask] - y).pow(2).mean()


def test_ess_threshold_sets_when_groups_are_resampled():
    """ess_threshold = 1 resamples at every step, 0 never before the end; the callback says so."""
    den, obs, _ = _bimodal_problem()
    for thr, check in ((1.0, lambda r: all(v == 1 for v in r[1:])), (0.0, lambda r: not any(r))):
        seen = []
        dk.sample(mmps(den, obs), (64, 1, 2), sampler=twisted_smc, nfe=10, dtype=DT, generator=_gen(10),
                  ess_threshold=thr, callback=lambda d: seen.append(d["resampled"]))
        assert len(seen) == 10 and check(seen), (thr, seen)


def test_systematic_resampling_keeps_expected_counts():
    """Each index is drawn floor(P w) or ceil(P w) times (systematic resampling's defining property)."""
    w = torch.tensor([[0.5, 0.25, 0.125, 0.125, 0.0], [0.05, 0.05, 0.3, 0.3, 0.3]], dtype=DT)
    for seed in range(20):
        idx = systematic_resample(w.log(), _gen(seed))
        for row in range(2):
            counts = torch.bincount(idx[row], minlength=5).to(DT)
            expected = 5 * w[row]
            assert bool(((counts >= expected.floor()) & (counts <= expected.ceil())).all()), (counts, expected)


def test_twisted_smc_errors_are_one_line_and_name_the_fix():
    den = dk.GaussianDenoiser(dk.cosine(), torch.zeros((1, 4), dtype=DT), 1.0)
    obs = Observation(MaskOperator(torch.tensor([[True, False, True, False]])), torch.ones((1, 2), dtype=DT), 0.1)
    with pytest.raises(TypeError, match=r"guidance\.mmps\(denoiser, obs\)"):
        dk.sample(den, (4, 1, 4), sampler=twisted_smc, nfe=4, dtype=DT)
    with pytest.raises(ValueError, match="ess_threshold must be in"):
        dk.sample(mmps(den, obs), (4, 1, 4), sampler=twisted_smc, nfe=4, dtype=DT, ess_threshold=1.5)
    two = Observation(obs.operator, torch.ones((2, 2), dtype=DT), 0.1)
    with pytest.raises(ValueError, match="multiple of 2"):
        dk.sample(mmps(den, two), (5, 1, 4), sampler=twisted_smc, nfe=4, dtype=DT)

    class NoTwist(GuidedDenoiser):
        method = "plain"

        def _guide(self, xr, x0, a, s, a_b, s_b, y, var):
            return x0.detach()

    with pytest.raises(TypeError, match="gives no log p"):
        dk.sample(NoTwist(den, obs), (4, 1, 4), sampler=twisted_smc, nfe=4, dtype=DT)

    def nan_den(x, t):
        return den(x, t) * float("nan")

    nan_den.schedule = den.schedule
    with pytest.raises(dk.NonFiniteError, match="non-finite weight"):
        dk.sample(mmps(nan_den, obs), (4, 1, 4), sampler=twisted_smc, nfe=4, dtype=DT)


def test_members_with_their_own_conditioning_are_refused():
    """Resampling moves x alone: a denoiser bound to per-member conditioning (an autoregressive
    rollout's histories) is refused with a one-line error; conditioning shared by the members is not."""
    from torch import nn

    class Net(nn.Module):
        def forward(self, x, c_noise, scalars=None, labels=None):
            return 0.1 * x[:, :1]

    layout = dk.Layout(channels=("u",), spatial=("x",), shape=(4,), cond_channels=("c",))
    model = dk.Denoiser(Net(), dk.cosine(), "eps", layout)
    obs = Observation(MaskOperator(torch.tensor([[True, False, True, False]])), torch.ones((1, 2)), 0.1)
    own = dk.Cond(fields=torch.randn((6, 1, 4)))
    with pytest.raises(ValueError, match="their own cond.fields"):
        dk.sample(mmps(model.bind(own), obs), (6, 1, 4), sampler=twisted_smc, nfe=3)
    shared = dk.Cond(fields=torch.randn((1, 1, 4)).expand(6, 1, 4).clone())
    x = dk.sample(mmps(model.bind(shared), obs), (6, 1, 4), sampler=twisted_smc, nfe=3)
    assert x.shape == (6, 1, 4) and bool(torch.isfinite(x).all())


@pytest.mark.parametrize("operator", ["mask", "dense"])
def test_smc_over_mmps_is_within_twice_the_floor_on_the_benchmark_mixture(operator):
    """Issue 15's mixture target, met by twisted SMC over MMPS: on the benchmark's first draw
    (docs/bench/guidance.md) 2000 members at NFE 400 are within 2x the two-sample floor in sliced W2
    (measured with sampler seeds 1 / 2 / 3: mask 1.14 / 1.65 / 1.86, dense 1.17 / 1.57 / 1.44; plain
    MMPS: 3.7 and 17).  Part of what remains is the duplicates resampling leaves: exact samples with
    the same multiplicities are 1.7x (mask) and 0.9x (dense) the floor.  On the other three draws (x 3
    sampler seeds x 2 operators) 16 of 18 runs are within 2x, the others at 2.04 and 2.53."""
    from diffkit.smc import twisted_smc

    den, obs, exact = bench.gmm_problem(operator, seed=0)
    fl = bench.floor(exact, 2000, 0)
    ref = exact(2000, _gen(999))
    x = dk.sample(mmps(den, obs), (2000, *bench.SHAPE), sampler=twisted_smc, nfe=400, dtype=DT, generator=_gen(1))
    assert bench.sw2(x, ref) <= 2.0 * fl, (operator, bench.sw2(x, ref) / fl)
