"""diffkit.guidance (issue 15 item 1): observation operators, observations and the guidance methods.

The exact references (full-covariance Gaussian denoiser, closed-form Gaussian and mixture
posteriors, operator matrices) are the helpers of ``benchmarks/guidance_gmm.py``, which also
measures the methods' bias stated in docs/bench/guidance.md.
"""
from __future__ import annotations

import importlib.util
import math
import warnings
from pathlib import Path

import pytest
import torch
from torch import nn

import diffkit as dk
from diffkit import registry
from diffkit.errors import DiffkitError, ObservationError
from diffkit.guidance import (BlockAverage, IndexOperator, LinearOperator, MaskOperator, NonlinearOperator,
                              Observation, dps, mmps, reconstruction)
from diffkit.registry import get_guidance

ROOT = Path(__file__).resolve().parents[1]
DT = torch.float64
_spec = importlib.util.spec_from_file_location("bench_guidance_gmm", ROOT / "benchmarks" / "guidance_gmm.py")
bench = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(bench)

#: one sample shape (C, *spatial) per spatial rank 1..5
SAMPLE_SHAPES = [(2, 6), (1, 4, 6), (2, 2, 4, 2), (1, 2, 2, 4, 2), (1, 2, 2, 2, 2, 2)]


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _operators(shape, g):
    """One of each operator for samples of ``shape``."""
    d = math.prod(shape)
    mask = torch.rand(shape, generator=g) < 0.4
    mask.view(-1)[0] = True
    index = torch.randint(0, d, (7,), generator=g)  # with repeats, as stations may share a point
    W = torch.randn((5, d), generator=g, dtype=DT)
    return {
        "mask": MaskOperator(mask),
        "index": IndexOperator(index, in_shape=shape),
        "block_average": BlockAverage(2, in_shape=shape),
        "dense": LinearOperator(W, shape),
        "callable": LinearOperator(lambda x: 2.0 * x.flatten(1)[:, ::2] - x.flatten(1)[:, 1::2], shape),
    }


# -- operators --------------------------------------------------------------------------------------
@pytest.mark.parametrize("shape", SAMPLE_SHAPES, ids=[f"spatial_rank{len(s) - 1}" for s in SAMPLE_SHAPES])
def test_operator_transpose_is_the_adjoint_at_every_rank(shape):
    """<A x, v> = <x, A^T v> for every operator at spatial ranks 1..5, and each closed-form transpose
    equals autograd's vector-Jacobian product."""
    g = _gen(len(shape))
    for name, op in _operators(shape, g).items():
        x = torch.randn((3, *shape), generator=g, dtype=DT)
        ax = op(x)
        assert ax.shape[0] == 3 and tuple(ax.shape[1:]) == op.out_shape(), name
        v = torch.randn(ax.shape, generator=g, dtype=DT)
        atv = op.transpose(v, shape)
        assert atv.shape == x.shape, name
        torch.testing.assert_close((ax * v).sum(), (x * atv).sum(), rtol=1e-12, atol=1e-12, msg=name)
        with torch.enable_grad():
            xr = x.clone().requires_grad_(True)
            (auto,) = torch.autograd.grad(op(xr), xr, v)
        torch.testing.assert_close(atv, auto, rtol=1e-12, atol=1e-12, msg=name)
        torch.testing.assert_close(op.vjp(x, v), auto, msg=name)
        torch.testing.assert_close(op.jvp(x, x), ax, msg=name)  # linear: J w = A w


def test_block_average_matches_a_hand_computation():
    x1 = torch.tensor([[[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]]])
    torch.testing.assert_close(BlockAverage(2)(x1), torch.tensor([[[1.5, 3.5, 5.5]]]))
    torch.testing.assert_close(BlockAverage(3)(x1), torch.tensor([[[2.0, 5.0]]]))
    x2 = torch.arange(16.0).reshape(1, 1, 4, 4)  # rows 0..3, 4..7, 8..11, 12..15
    torch.testing.assert_close(BlockAverage(2)(x2), torch.tensor([[[[2.5, 4.5], [10.5, 12.5]]]]))
    torch.testing.assert_close(BlockAverage((1, 4))(x2), torch.tensor([[[[1.5], [5.5], [9.5], [13.5]]]]))
    two = torch.stack([x2[0, 0], -x2[0, 0]])[None]  # channels are averaged separately
    torch.testing.assert_close(BlockAverage((4, 4))(two), torch.tensor([[[[7.5]], [[-7.5]]]]))
    v = torch.tensor([[[1.0, 2.0]]])  # the transpose spreads each value over its block, divided by its size
    torch.testing.assert_close(BlockAverage(3).transpose(v), torch.tensor([[[1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3, 2 / 3]]]))


def test_nonlinear_operator_jacobian_products_match_autograd():
    shape = (2, 3, 4)
    op = NonlinearOperator(lambda x: torch.tanh(x).flatten(1)[:, ::2] ** 2, in_shape=shape)
    assert op.linear is False and op.out_shape() == (12,)
    g = _gen(3)
    x = torch.randn((2, *shape), generator=g, dtype=DT)
    w = torch.randn(x.shape, generator=g, dtype=DT)
    v = torch.randn((2, 12), generator=g, dtype=DT)
    eps = 1e-6  # the Jacobian by central differences, column by column (float64: error ~1e-10)
    cols = []
    for i in range(x[0].numel()):
        e = torch.zeros_like(x).flatten(1)
        e[:, i] = eps
        e = e.reshape(x.shape)
        cols.append((op(x + e) - op(x - e)) / (2 * eps))
    J = torch.stack(cols, dim=-1)  # (B, 12, d)
    torch.testing.assert_close(op.jvp(x, w), (J @ w.flatten(1)[..., None])[..., 0], rtol=1e-7, atol=1e-8)
    torch.testing.assert_close(op.vjp(x, v).flatten(1), (v[:, None] @ J)[:, 0], rtol=1e-7, atol=1e-8)
    with pytest.raises(TypeError, match="nonlinear"):
        op.transpose(v)


# -- exactness on a Gaussian prior -----------------------------------------------------------------
def _gaussian_prior(shape, g, scale=1.0):
    d = math.prod(shape)
    m = 0.5 * scale * torch.randn(d, generator=g, dtype=DT)
    L = torch.randn((d, d), generator=g, dtype=DT) / math.sqrt(d)
    C = scale**2 * (L @ L.T + 0.1 * torch.eye(d, dtype=DT))
    return m, C, bench.FullGaussianDenoiser(dk.cosine(), m, C, shape)


def _linear_cases(g):
    """(name, sample shape, operator): a mask (1-D), a coarsening (2-D), a random dense matrix (3-D)."""
    mask = torch.zeros((2, 8), dtype=torch.bool)
    mask[0, ::3] = mask[1, 1::4] = True
    return [("mask", (2, 8), MaskOperator(mask)),
            ("block_average", (1, 4, 4), BlockAverage(2)),
            ("dense", (1, 2, 2, 4), LinearOperator(torch.randn((6, 16), generator=g, dtype=DT), (1, 2, 2, 4)))]


def _observe(op, shape, m, C, g, sigma_y):
    A = bench.operator_matrix(op, shape)
    x = m + torch.linalg.cholesky(C) @ torch.randn(m.numel(), generator=g, dtype=DT)
    y = (A @ x + sigma_y * torch.randn(A.shape[0], generator=g, dtype=DT))
    out_shape = op(torch.zeros((1, *shape), dtype=DT)).shape[1:]
    return A, y, Observation(op, y.reshape(1, *out_shape), sigma_y)


def test_mmps_is_the_exact_conditional_mean_for_a_gaussian_prior():
    """One call of the MMPS denoiser equals the closed-form E[x0 | x_t, y] of a full-covariance
    Gaussian prior, at high, middle and low noise, for a mask, a coarsening and a dense matrix."""
    g = _gen(1)
    for name, shape, op in _linear_cases(g):
        m, C, den = _gaussian_prior(shape, g)
        A, y, obs = _observe(op, shape, m, C, g, 0.1)
        guided = mmps(den, obs, cg_iters=A.shape[0], cg_tol=0.0)
        for t in (0.05, 0.3, 0.6, 0.95):
            x = torch.randn((3, *shape), generator=g, dtype=DT)
            a, s = (float(v) for v in dk.cosine().coeffs(torch.tensor(t, dtype=DT)))
            want = torch.stack([bench.gaussian_conditional_mean(m, C, A, 0.1, y, xi.flatten(), a, s) for xi in x])
            got = guided(x, torch.full((3,), t, dtype=DT))
            torch.testing.assert_close(got.flatten(1), want, rtol=1e-9, atol=1e-9, msg=f"{name} t={t}")
        assert guided.nfe == 4 and guided.vjps == 4 * (A.shape[0] + 1)


def test_nonlinear_operator_path_is_exact_on_an_affine_map():
    """MMPS with a NonlinearOperator (Jacobian products by autograd, linearised at D) observing the
    affine map W x + 0.5 equals the closed-form E[x0 | x_t, y] for observations y - 0.5 of W x; DPS
    and reconstruction guidance give the same result through the nonlinear path as through
    LinearOperator(W) with y - 0.5."""
    g = _gen(11)
    shape = (1, 2, 2, 4)
    W = torch.randn((6, 16), generator=g, dtype=DT)
    m, C, den = _gaussian_prior(shape, g)
    A, y, lin_obs = _observe(LinearOperator(W, shape), shape, m, C, g, 0.1)
    aff = NonlinearOperator(lambda x: x.flatten(1) @ W.T + 0.5, in_shape=shape)
    obs = Observation(aff, (y + 0.5)[None], 0.1)
    x = torch.randn((3, *shape), generator=g, dtype=DT)
    for t in (0.1, 0.5, 0.9):
        a, s = (float(v) for v in dk.cosine().coeffs(torch.tensor(t, dtype=DT)))
        want = torch.stack([bench.gaussian_conditional_mean(m, C, A, 0.1, y, xi.flatten(), a, s) for xi in x])
        got = mmps(den, obs, cg_iters=6, cg_tol=0.0)(x, t)
        torch.testing.assert_close(got.flatten(1), want, rtol=1e-9, atol=1e-9)
        for method in (dps, reconstruction):
            torch.testing.assert_close(method(den, obs)(x, t), method(den, lin_obs)(x, t), rtol=1e-10, atol=1e-10)


def _whitened(x, pm, pc):
    """Samples mapped by the exact posterior to N(0, I): (x - mean) L^{-T}."""
    L = torch.linalg.cholesky(pc)
    return torch.linalg.solve_triangular(L, (x.flatten(1) - pm).T, upper=False).T


def _posterior_error(x, pm, pc):
    """(largest |mean| of the whitened samples, largest |cov - I| of the whitened samples)."""
    z = _whitened(x, pm, pc)
    return float(z.mean(0).abs().max()), float((torch.cov(z.T) - torch.eye(z.shape[1], dtype=DT)).abs().max())


N_MC = 4000
#: Monte-Carlo bounds for N_MC samples in d <= 16 whitened dims: the mean of a N(0, 1) coordinate has
#: std 1/sqrt(N) = 0.016 (5 sd: 0.08); a covariance entry has std <= sqrt(2/N) = 0.022 (5 sd: 0.11),
#: plus the sampler's own std error at NFE 30 (dpmpp_2m, <= 2 %, i.e. 0.04 on a variance)
MEAN_TOL, COV_TOL = 0.08, 0.15
#: The grid starts at sigma~ = 1000 instead of the default 80: the N(0, I) start then matches the
#: marginal at t_max.  From sigma~ = 80 the start is off by alpha(t_max) ~ 0.0125 times the posterior
#: mean, which the flow carries to a whitened mean offset of ~0.0125 |mean| (measured with 40 000
#: samples: 0.034-0.042 from sigma~ = 80, 0.009 -- the noise level -- from 1000, at NFE 30).
GRID = {"nfe": 30, "sigma_max": 1000.0}


@pytest.mark.parametrize("case", ["mask", "block_average", "dense"])
def test_mmps_reproduces_the_gaussian_posterior_mean_and_covariance(case):
    """MMPS samples (default sampler, NFE 30, grid from sigma~ = 1000) of a full-covariance Gaussian prior, observed through a
    mask / a 2x2 coarsening / a random dense matrix with sigma_y = 0.1, have the closed-form posterior
    mean and covariance within Monte-Carlo error (in whitened units).  Counter-checks: the prior's
    own samples and reconstruction guidance's fail the same bounds."""
    g = _gen(2)
    name, shape, op = next(c for c in _linear_cases(g) if c[0] == case)
    m, C, den = _gaussian_prior(shape, g)
    A, y, obs = _observe(op, shape, m, C, g, 0.1)
    pm, pc = bench.gaussian_posterior(m, C, A, 0.1, y)
    x = dk.sample(mmps(den, obs), (N_MC, *shape), dtype=DT, generator=_gen(3), **GRID)
    err_mean, err_cov = _posterior_error(x, pm, pc)
    assert err_mean < MEAN_TOL and err_cov < COV_TOL, (case, err_mean, err_cov)
    prior = dk.sample(den, (N_MC, *shape), dtype=DT, generator=_gen(3), **GRID)
    assert max(e / t for e, t in zip(_posterior_error(prior, pm, pc), (MEAN_TOL, COV_TOL))) > 3
    rec = dk.sample(reconstruction(den, obs), (N_MC, *shape), dtype=DT, generator=_gen(3), **GRID)
    assert max(e / t for e, t in zip(_posterior_error(rec, pm, pc), (MEAN_TOL, COV_TOL))) > 1.5


def test_mmps_narrow_prior_keeps_its_scale():
    """A prior of std 0.01 in model units (diffkit.GaussianDenoiser), half of it observed with
    sigma_y = 0.01: unobserved values come back with std 0.01 and observed ones with the posterior
    std 0.01/sqrt(2), each within 4 %, and the posterior means within Monte-Carlo error."""
    s = 0.01
    den, obs, mask, mean, post_mean, post_sd = bench.narrow_masked_problem(_gen(4), std=s, sigma_y=0.01)
    x = dk.sample(mmps(den, obs), (N_MC, *mask.shape), nfe=30, dtype=DT, generator=_gen(5))
    ratio_obs = x[:, mask].std(0) / post_sd
    ratio_free = x[:, ~mask].std(0) / s
    assert float((ratio_obs - 1).abs().max()) < 0.04, ratio_obs
    assert float((ratio_free - 1).abs().max()) < 0.04, ratio_free
    assert float((x[:, mask].mean(0) - post_mean).abs().max()) < 5 * post_sd / math.sqrt(N_MC)
    assert float((x[:, ~mask].mean(0) - mean[~mask]).abs().max()) < 5 * s / math.sqrt(N_MC)


def _jacobian_terms(den, x, t, op, y):
    """``(D, J^T A^T w -> ...)`` helpers for the closed forms below: D(x) and the residual."""
    D = den(x, t)
    return D, y - op(D)


@pytest.mark.parametrize("gamma", [0.5, 1.0, 3.0])
def test_reconstruction_matches_its_closed_form(gamma):
    """Reconstruction guidance on a Gaussian prior equals D + (sigma^2/alpha) J^T A^T (Sigma_y +
    gamma sigma^2/alpha^2 I)^{-1} (y - A D), with J = dD/dx_t in closed form."""
    g = _gen(6)
    _, shape, op = _linear_cases(g)[2]
    m, C, den = _gaussian_prior(shape, g)
    A, y, obs = _observe(op, shape, m, C, g, torch.linspace(0.05, 0.3, 6, dtype=DT))
    sy2 = obs.sigma_y[0] ** 2
    guided = reconstruction(den, obs, gamma=gamma)
    for t in (0.1, 0.5, 0.9):
        a, s = (float(v) for v in dk.cosine().coeffs(torch.tensor(t, dtype=DT)))
        J = a * C @ torch.linalg.inv(a * a * C + s * s * torch.eye(16, dtype=DT))
        x = torch.randn((2, *shape), generator=g, dtype=DT)
        D = den(x, t).flatten(1)
        r = y - D @ A.T
        want = D + (s * s / a) * (r / (sy2 + gamma * s * s / (a * a))) @ A @ J
        torch.testing.assert_close(guided(x, t).flatten(1), want, rtol=1e-10, atol=1e-10)


def test_dps_matches_its_closed_form():
    """DPS on a Gaussian prior equals D - (sigma^2/alpha) (zeta/||r||) grad_{x_t} ||r||^2 =
    D + (sigma^2/alpha) (2 zeta/||r||) J^T A^T r, and ignores sigma_y."""
    g = _gen(7)
    _, shape, op = _linear_cases(g)[1]
    m, C, den = _gaussian_prior(shape, g)
    A, y, obs = _observe(op, shape, m, C, g, 0.1)
    for t in (0.2, 0.7):
        a, s = (float(v) for v in dk.cosine().coeffs(torch.tensor(t, dtype=DT)))
        J = a * C @ torch.linalg.inv(a * a * C + s * s * torch.eye(16, dtype=DT))
        x = torch.randn((2, *shape), generator=g, dtype=DT)
        D = den(x, t).flatten(1)
        r = y - D @ A.T
        want = D + (s * s / a) * (2 * 0.7 / r.norm(dim=1, keepdim=True)) * (r @ A @ J)
        torch.testing.assert_close(dps(den, obs, zeta=0.7)(x, t).flatten(1), want, rtol=1e-10, atol=1e-10)
        other = Observation(obs.operator, obs.y, 5.0)
        torch.testing.assert_close(dps(den, other, zeta=0.7)(x, t).flatten(1), want, rtol=1e-10, atol=1e-10)


# -- Gaussian mixture: the posterior in closed form, each method's bias measured ------------------------
GMM_N, GMM_NFE = 2000, 20


@pytest.fixture(scope="module", params=["mask", "dense"])
def gmm_measurement(request):
    """Sliced W2 to exact posterior samples for each method and the prior, and the two-sample floor."""
    den, obs, exact = bench.gmm_problem(request.param, seed=0)
    fl = bench.floor(exact, GMM_N, 0)
    ref = exact(GMM_N, _gen(999))
    got = {}
    for method in (None, *bench.METHODS):
        x, _ = bench.guided_samples(method, den, obs, GMM_N, GMM_NFE, seed=1)
        got[method or "prior"] = bench.sw2(x, ref)
    return request.param, fl, got


def test_gmm_posterior_sliced_w2_is_measured_for_each_method(gmm_measurement):
    """The mixture posterior (closed form): every method's sliced W2 to exact posterior samples is
    computed and finite, and each method is closer to the posterior than the unguided prior.  The
    values, with the floor, are stated in docs/bench/guidance.md (benchmarks/guidance_gmm.py)."""
    op, fl, got = gmm_measurement
    assert math.isfinite(fl) and fl > 0
    for method in bench.METHODS:
        assert math.isfinite(got[method]) and got[method] > 0, (op, method, got)
        assert got[method] < got["prior"], (op, method, got)
    assert got["mmps"] < min(got["reconstruction"], got["dps"]), (op, got)


@pytest.mark.xfail(strict=True, reason="measured: MMPS is 3.7x (mask) and 17x (dense) the two-sample floor on "
                                       "this mixture at NFE 20 (its Gaussian approximation of p(y | x_t) is "
                                       "biased for a multimodal prior); twisted SMC over MMPS meets it "
                                       "(tests/test_smc.py); docs/bench/guidance.md")
def test_gmm_posterior_mmps_within_twice_the_floor(gmm_measurement):
    """Issue 15's target: MMPS within 2x the two-sample floor at NFE >= 20 on a mixture prior."""
    op, fl, got = gmm_measurement
    assert got["mmps"] <= 2.0 * fl, (op, got["mmps"] / fl)


# -- every sampler, every method ------------------------------------------------------------------
SAMPLERS = sorted(c.name for c in registry.components("sampler"))


@pytest.mark.parametrize("method", ["dps", "reconstruction", "mmps"])
@pytest.mark.parametrize("sampler", SAMPLERS)
def test_every_guidance_method_works_with_every_registered_sampler(method, sampler):
    """One short run of each registered sampler with each guided denoiser (float32, one observation
    for a batch of 6 members): the samples have the right shape, are finite, and fit the
    observations better than the unguided samples from the same noise."""
    shape = (2, 5, 3)
    g = _gen(8)
    den = dk.GaussianDenoiser(dk.cosine(), torch.zeros(shape), 1.0)
    mask = torch.rand(shape, generator=g) < 0.3
    y = 1.5 + 0.1 * torch.randn((1, int(mask.sum())), generator=g)
    obs = Observation(MaskOperator(mask), y, 0.1)
    guided = get_guidance(method)(den, obs)
    x = dk.sample(guided, (6, *shape), sampler=sampler, nfe=12, generator=_gen(9))
    prior = dk.sample(den, (6, *shape), sampler=sampler, nfe=12, generator=_gen(9))
    assert x.shape == (6, *shape) and x.dtype == torch.float32 and bool(torch.isfinite(x).all())
    err = (x[:, mask] - y).pow(2).mean()
    assert err < 0.75 * (prior[:, mask] - y).pow(2).mean(), (method, sampler, float(err))  # dps/heun: 0.54
    assert guided.nfe == 12 and guided.vjps >= 12


class _TinyEps(nn.Module):
    """A backbone with trainable parameters (requires_grad), to check that guidance differentiates
    through a real network under diffkit.sample's no_grad."""

    def __init__(self):
        super().__init__()
        self.conv = nn.Conv1d(1, 1, 3, padding=1, bias=False)

    def forward(self, x, c_noise, scalars=None, labels=None):
        return 0.5 * self.conv(x) * torch.sigmoid(c_noise)[:, None, None]


def test_guided_denoiser_wraps_a_bound_denoiser_without_the_fast_path():
    """Guided denoisers define no ``x0_at`` (so samplers call them plainly and the guidance is never
    bypassed), keep the wrapped denoiser's schedule, pass extra_args through, and differentiate
    through a Denoiser's network inside diffkit.sample (which runs under no_grad)."""
    torch.manual_seed(0)
    den = dk.Denoiser(_TinyEps(), dk.cosine(), "eps").bind()
    assert hasattr(den, "x0_at")
    obs = Observation(IndexOperator([0, 3, 5], in_shape=(1, 8)), torch.ones((1, 3)), 0.1)
    for method in ("dps", "reconstruction", "mmps"):
        guided = get_guidance(method)(den, obs)
        assert not hasattr(guided, "x0_at") and guided.schedule is den.schedule
        x = dk.sample(guided, (4, 1, 8), nfe=6, generator=_gen(1))
        assert bool(torch.isfinite(x).all()) and not x.requires_grad
        assert guided.nfe == 6 and guided.vjps >= 6
    seen = {}

    def probe(x, t, **kw):
        seen.update(kw)
        return den(x, t)

    probe.schedule = den.schedule
    dk.sample(mmps(probe, obs), (2, 1, 8), nfe=2, extra_args={"hint": 1})
    assert seen == {"hint": 1}
    with torch.inference_mode(), pytest.raises(RuntimeError, match=r"torch.no_grad\(\) instead"):
        mmps(den, obs)(torch.zeros((2, 1, 8)), 0.5)


def test_guidance_methods_register_through_the_hook():
    comps = {c.name: c for c in registry.components("guidance")}
    assert {"dps", "reconstruction", "mmps"} <= set(comps)
    for name, fn in (("dps", dps), ("reconstruction", reconstruction), ("mmps", mmps)):
        assert comps[name].plugin == "diffkit" and comps[name].obj is fn and get_guidance(name) is fn
        assert comps[name].description
    assert get_guidance(mmps) is mmps
    assert get_guidance({"name": "mmps", "cg_iters": 3})(dk.GaussianDenoiser(dk.cosine(), torch.zeros((1, 4)), 1.0),
                                                        Observation(IndexOperator([1]), torch.ones((1, 1)), 0.1)).cg_iters == 3
    with pytest.raises(dk.ConfigError, match="cg_itres"):
        get_guidance({"name": "mmps", "cg_itres": 3})
    with pytest.raises(dk.UnknownComponentError, match="unknown guidance 'nope'.*mmps"):
        get_guidance("nope")


def test_mmps_cg_stops_early_and_counts_its_products():
    """CG stops when the residual is below cg_tol (a mask observation of a Gaussian with identity
    covariance is solved in one iteration), and cg_iters caps it."""
    shape = (1, 10)
    den = dk.GaussianDenoiser(dk.cosine(), torch.zeros(shape, dtype=DT), 1.0)
    mask = torch.zeros(shape, dtype=torch.bool)
    mask[0, :4] = True
    obs = Observation(MaskOperator(mask), torch.ones((1, 4), dtype=DT), 0.2)
    guided = mmps(den, obs, cg_iters=10)
    guided(torch.randn((2, *shape), dtype=DT), 0.5)
    assert guided.last_cg_iters == 1 and guided.vjps == 2
    g2 = mmps(den, Observation(MaskOperator(mask), torch.ones((1, 4), dtype=DT), torch.tensor([0.1, 0.2, 0.3, 0.4])),
              cg_iters=2, cg_tol=0.0)
    g2(torch.randn((2, *shape), dtype=DT), 0.5)
    assert g2.last_cg_iters == 2 and g2.vjps == 3


def _plain_cg(matvec, b, iters, tol, radius=None):
    """The reference: textbook CG as MMPS ran it before the safeguard (no curvature test, no bound),
    with the safeguarded ``_cg``'s signature (it reports no event)."""
    from diffkit.guidance import _dot

    def e(v):
        return v.reshape(-1, *[1] * (b.ndim - 1))

    x, r = torch.zeros_like(b), b.clone()
    p, rs = r.clone(), _dot(r, r)
    tiny = torch.finfo(b.dtype).tiny
    n = 0
    for n in range(1, iters + 1):
        if bool((rs <= tol * tol * _dot(b, b)).all()):
            n -= 1
            break
        Ap = matvec(p)[0]
        pAp = _dot(p, Ap)
        alpha = torch.where(pAp.abs() > tiny, rs / pAp, torch.zeros_like(pAp))
        x, r = x + e(alpha) * p, r - e(alpha) * Ap
        rs_new = _dot(r, r)
        p, rs = r + e(torch.where(rs > tiny, rs_new / rs, torch.zeros_like(rs))) * p, rs_new
    none = torch.zeros(b.shape[0], dtype=torch.bool)
    return x, n, none, none, none


class _LinearDenoiser:
    """A "denoiser" D(x_t) = W x_t with a non-symmetric W whose symmetric part is indefinite: its
    Tweedie covariance (sigma^2/alpha) W is not a covariance, as a learned network's need not be."""

    def __init__(self, W):
        self.W, self.schedule = W, dk.cosine()

    def __call__(self, x, t, **extra_args):
        return (x.flatten(1) @ self.W.T).reshape(x.shape)


def test_mmps_safeguard_keeps_an_indefinite_denoiser_bounded(monkeypatch):
    """Issue 15 item 1, MMPS on learned denoisers: with a linear denoiser whose Jacobian is
    non-symmetric and indefinite, and sigma_y set so that Sigma_y + A Cov A^T is (nearly) singular,
    plain CG returns a guidance ~1e6 times the residual; the safeguarded CG stays finite and within
    its bound ||u|| <= 2 ||r|| / sigma_y^2, counts what it did and warns once."""
    import diffkit.guidance as G

    g = _gen(21)
    d = 8
    K = torch.randn((d, d), generator=g, dtype=DT)
    W = torch.diag(torch.linspace(1.0, -1.0, d, dtype=DT)) + 0.2 * (K - K.T)
    den = _LinearDenoiser(W)
    t = 0.5
    a, s = (float(v) for v in dk.cosine().coeffs(torch.tensor(t, dtype=DT)))
    c = s * s / a
    # the system is var I + c W^T (everything observed): make it singular along W's most negative real eigenvalue
    ev = torch.linalg.eigvals(W)
    mu = float(ev.real[ev.imag.abs() < 1e-12].min())
    assert mu < 0
    sigma_y = math.sqrt(-c * mu * (1 + 1e-9))
    x = torch.randn((16, 1, d), generator=g, dtype=DT)
    y = torch.randn((16, d), generator=g, dtype=DT)
    obs = Observation(MaskOperator(torch.ones((1, d), dtype=torch.bool)), y, sigma_y)
    D = den(x, t)
    r = (y - D.flatten(1)).norm(dim=1)
    bound = c * float(torch.linalg.matrix_norm(W, 2)) * 2 * r / sigma_y**2   # ||c W^T u|| for ||u|| <= 2 ||r|| / var

    with monkeypatch.context() as mp:
        mp.setattr(G, "_cg", _plain_cg)
        mp.setattr(G, "OVERSHOOT", math.inf)                                         # and no overshoot test
        old = mmps(den, obs, cg_iters=d, cg_tol=0.0)(x, t)
    old_step = (old - D).flatten(1).norm(dim=1)
    assert float((old_step / bound).max()) > 1e3, old_step / bound               # the old CG diverges

    guided = mmps(den, obs, cg_iters=d, cg_tol=0.0)
    with pytest.warns(RuntimeWarning, match="not positive definite") as caught:
        out = [guided(x, tt) for tt in (t, 0.3, 0.8)]
    assert sum("not positive definite" in str(w.message) for w in caught) == 1      # once per guided denoiser
    assert all(bool(torch.isfinite(o).all()) for o in out)
    step = (out[0] - D).flatten(1).norm(dim=1)
    assert bool((step <= bound * (1 + 1e-9)).all()), step / bound
    events = guided.negative_curvature + guided.radius_stops
    assert events > 0 and guided.fallbacks <= guided.negative_curvature <= 3 * 16
    # a sample whose first CG direction has negative curvature gets reconstruction guidance's step
    Wneg = -torch.eye(d, dtype=DT)                                                   # Cov = -c I: negative everywhere
    rec_like = mmps(_LinearDenoiser(Wneg), obs)
    with pytest.warns(RuntimeWarning, match="not positive definite"):
        got = rec_like(x, t)
    assert rec_like.fallbacks == rec_like.negative_curvature == 16 and rec_like.vjps == 2
    want = x.flatten(1) @ Wneg.T + c * (y - x.flatten(1) @ Wneg.T) / (sigma_y**2 + (s / a) ** 2) @ Wneg
    torch.testing.assert_close(got.flatten(1), want, rtol=1e-12, atol=1e-12)


def test_mmps_safeguard_leaves_the_exact_gaussian_case_unchanged(monkeypatch):
    """On a Gaussian prior with its exact denoiser (symmetric PSD covariance) the safeguarded CG
    never triggers and MMPS gives exactly what plain CG gives, for a mask, a coarsening and a dense
    matrix, at high to low noise, converged or capped at 3 iterations."""
    import diffkit.guidance as G

    g = _gen(22)
    for name, shape, op in _linear_cases(g):
        m, C, den = _gaussian_prior(shape, g)
        _, _, obs = _observe(op, shape, m, C, g, 0.1)
        x = torch.randn((4, *shape), generator=g, dtype=DT)
        for iters, tol in ((10, 1e-6), (3, 0.0)):
            for t in (0.02, 0.3, 0.6, 0.98):
                with monkeypatch.context() as mp:
                    mp.setattr(G, "_cg", _plain_cg)
                    ref = mmps(den, obs, cg_iters=iters, cg_tol=tol)
                    want = ref(x, t)
                guided = mmps(den, obs, cg_iters=iters, cg_tol=tol)
                with warnings.catch_warnings():
                    warnings.simplefilter("error")
                    got = guided(x, t)
                torch.testing.assert_close(got, want, rtol=1e-12, atol=1e-12, msg=f"{name} t={t} iters={iters}")
                assert guided.negative_curvature == guided.fallbacks == guided.radius_stops == 0, name
                assert guided.overshoots == 0 and guided.vjps == ref.vjps, name


def test_mmps_overshoot_falls_back_to_reconstruction_guidance(monkeypatch):
    """A sample whose MMPS update overshoots the observations (sigma_y-weighted ||A delta|| above
    OVERSHOOT x ||y - A D||, impossible for a PSD covariance) takes reconstruction guidance's update
    ``D + (sigma^2/alpha) J^T A^T (y - A D) / (sigma_y^2 + sigma^2/alpha^2)`` instead: checked in closed
    form for a linear denoiser (the test forced on every sample with OVERSHOOT = 0), counted, warned once;
    with the default factor the same symmetric PSD case never triggers it."""
    import diffkit.guidance as G

    g = _gen(23)
    d = 6
    K = torch.randn((d, d), generator=g, dtype=DT)
    W = K @ K.T / d + 0.1 * torch.eye(d, dtype=DT)                                   # symmetric PSD Jacobian
    den = _LinearDenoiser(W)
    mask = torch.zeros((1, d), dtype=torch.bool)
    mask[0, ::2] = True
    x = torch.randn((5, 1, d), generator=g, dtype=DT)
    y = torch.randn((5, int(mask.sum())), generator=g, dtype=DT)
    sigma_y = 0.05
    obs = Observation(MaskOperator(mask), y, sigma_y)
    t = 0.6
    a, s = (float(v) for v in dk.cosine().coeffs(torch.tensor(t, dtype=DT)))
    D = x.flatten(1) @ W.T
    r = y - D[:, mask[0]]
    full = torch.zeros_like(D)
    full[:, mask[0]] = r / (sigma_y ** 2 + (s / a) ** 2)
    want = D + (s * s / a) * full @ W                                                  # J^T A^T u, J = W
    plain = mmps(den, obs)
    plain(x, t)
    assert plain.overshoots == 0
    with monkeypatch.context() as mp:
        mp.setattr(G, "OVERSHOOT", 0.0)
        forced = mmps(den, obs)
        with pytest.warns(RuntimeWarning, match="overshot the observations") as caught:
            got = forced(x, t)
            forced(x, 0.3)
    assert sum("overshot" in str(w.message) for w in caught) == 1
    assert forced.overshoots == 10
    torch.testing.assert_close(got.flatten(1), want, rtol=1e-10, atol=1e-12)


# -- bad input: one-line errors naming the problem and the fix -------------------------------------------
_MASK = torch.zeros((1, 4, 4), dtype=torch.bool)
_MASK[0, 0, :3] = True

#: (what is wrong, the call, a fragment of the message)
BAD_INPUTS = [
    ("nan_in_y", lambda: Observation(MaskOperator(_MASK), torch.tensor([[1.0, float("nan"), 0.0]]), 0.1),
     "observations y hold 1 NaN"),
    ("inf_in_y", lambda: Observation(MaskOperator(_MASK), torch.tensor([[1.0, float("inf"), 0.0]]), 0.1),
     "1 inf values"),
    ("negative_sigma_y", lambda: Observation(MaskOperator(_MASK), torch.zeros((1, 3)), -0.1),
     "sigma_y must be >= 0"),
    ("negative_sigma_y_entry", lambda: Observation(MaskOperator(_MASK), torch.zeros((1, 3)), torch.tensor([0.1, -1, 0.1])),
     "sigma_y must be >= 0"),
    ("nan_sigma_y", lambda: Observation(MaskOperator(_MASK), torch.zeros((1, 3)), float("nan")),
     "sigma_y holds NaN or inf"),
    ("inf_sigma_y", lambda: Observation(MaskOperator(_MASK), torch.zeros((1, 3)), float("inf")),
     "sigma_y holds NaN or inf"),
    ("sigma_y_shape", lambda: Observation(MaskOperator(_MASK), torch.zeros((1, 3)), torch.ones(4)),
     "does not broadcast to y"),
    ("y_shape_vs_operator", lambda: Observation(MaskOperator(_MASK), torch.zeros((1, 5)), 0.1),
     "but the operator gives (n, 3)"),
    ("y_without_batch", lambda: Observation(MaskOperator(_MASK), torch.zeros(3), 0.1),
     "need a batch dim first"),
    ("y_shape_vs_coarsening", lambda: Observation(BlockAverage(2, in_shape=(1, 4, 4)), torch.zeros((1, 1, 4)), 0.1),
     "but the operator gives (n, 1, 2, 2)"),
    ("not_an_operator", lambda: Observation(torch.zeros(3), torch.zeros((1, 3)), 0.1),
     "must be callable with a `linear` attribute"),
    ("mask_not_bool", lambda: MaskOperator(torch.ones((1, 4))), "needs a boolean mask"),
    ("mask_without_channel", lambda: MaskOperator(torch.ones(4, dtype=torch.bool)), "add the channel dim"),
    ("mask_empty", lambda: MaskOperator(torch.zeros((1, 4), dtype=torch.bool)), "observes nothing"),
    ("index_float", lambda: IndexOperator(torch.tensor([0.5])), "integer tensor of flat indices"),
    ("index_out_of_range", lambda: IndexOperator([0, 16], in_shape=(1, 4, 4)), "must lie in [0, 16)"),
    ("index_negative", lambda: IndexOperator([-1, 2]), "must lie in [0,"),
    ("block_factor_zero", lambda: BlockAverage(0), "positive integers"),
    ("block_factor_not_dividing", lambda: BlockAverage(3, in_shape=(1, 4, 4)), "do not divide the spatial sizes"),
    ("block_factor_count", lambda: BlockAverage((2, 2, 2), in_shape=(1, 4, 4)), "give one factor per spatial axis"),
    ("matrix_shape", lambda: LinearOperator(torch.ones((3, 15)), (1, 4, 4)), "expected (n_obs, 16)"),
    ("matrix_nan", lambda: LinearOperator(torch.full((3, 16), float("nan")), (1, 4, 4)), "holds NaN or inf"),
    ("nonlinear_not_callable", lambda: NonlinearOperator(3), "needs a callable"),
    ("reconstruction_gamma0_exact_obs",
     lambda: reconstruction(dk.GaussianDenoiser(dk.cosine(), torch.zeros((1, 4, 4)), 1.0),
                            Observation(MaskOperator(_MASK), torch.zeros((1, 3)), 0.0), gamma=0.0),
     "needs sigma_y > 0"),
]


@pytest.mark.parametrize("case", BAD_INPUTS, ids=[c[0] for c in BAD_INPUTS])
def test_observation_bad_inputs_are_one_line_errors(case):
    _, call, fragment = case
    with pytest.raises(ObservationError) as e:
        call()
    msg = str(e.value)
    assert isinstance(e.value, DiffkitError) and "\n" not in msg and fragment in msg, msg


def test_observation_mismatch_found_at_sampling_is_a_one_line_error():
    """Shapes the operator could not check up front (no in_shape) and batches that do not match are
    reported when sampling starts, in one line."""
    den = dk.GaussianDenoiser(dk.cosine(), torch.zeros((1, 4, 4)), 1.0)
    obs = Observation(BlockAverage(2), torch.zeros((1, 1, 3, 3)), 0.1)  # 4x4 coarsens to 2x2, not 3x3
    with pytest.raises(ObservationError, match=r"maps samples of shape \(2, 1, 4, 4\) to \(2, 1, 2, 2\)"):
        dk.sample(mmps(den, obs), (2, 1, 4, 4), nfe=2)
    obs = Observation(MaskOperator(_MASK), torch.zeros((2, 3)), 0.1)
    with pytest.raises(ObservationError, match="batch 2 but the samples have batch 3"):
        dk.sample(dps(den, obs), (3, 1, 4, 4), nfe=2)
    obs = Observation(MaskOperator(_MASK), torch.zeros((1, 3)), 0.1)
    any_shape = dk.GaussianDenoiser(dk.cosine(), torch.tensor(0.0), 1.0)
    with pytest.raises(ObservationError, match=r"expects samples of shape \(1, 4, 4\)"):
        dk.sample(reconstruction(any_shape, obs), (2, 1, 4, 5), nfe=2)
    with pytest.raises(ValueError, match="zeta must be"):
        dps(den, obs, zeta=-1)
    with pytest.raises(ValueError, match="gamma must be"):
        reconstruction(den, obs, gamma=float("nan"))
    with pytest.raises(ValueError, match="cg_iters must be"):
        mmps(den, obs, cg_iters=0)
