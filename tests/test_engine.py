"""Mathematical tests of the engine: schedules, forward process and posterior, parameterisations,
exact Gaussian(-mixture) denoisers, and the Denoiser / Cond contract.

Reference values are computed independently of diffkit (numpy cumprods, Nichol's cosine
formula, closed-form Gaussian algebra, autograd of hand-written log densities, Monte Carlo).
"""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffkit as dk
from diffkit import param as P
from diffkit.errors import NonFiniteError, ShapeError, UnknownComponentError
from diffkit.process import posterior_coeffs

F64 = torch.float64


# ------------------------------------------------------------------------------------------
# independent references
# ------------------------------------------------------------------------------------------
def ref_linear_alpha_bar(T=1000, b0=1e-4, b1=0.02):
    """alpha_bar_n, n = 1..T, of Ho et al.'s linear schedule (numpy, independent of torch)."""
    return np.cumprod(1.0 - np.linspace(b0, b1, T))


def ref_cosine_alpha_bar(t, s=0.008):
    """Nichol & Dhariwal (2021), eq. 17: alpha_bar = f(t)/f(0), f = cos^2(((t+s)/(1+s)) pi/2)."""
    t = np.asarray(t, dtype=np.float64)
    f = lambda u: np.cos((u + s) / (1 + s) * np.pi / 2) ** 2
    return f(t) / f(0.0)


def ref_cosine_dlogsnr(t, s=0.008):
    """d/dt log(ab/(1-ab)) = (d log ab/dt) / (1 - ab), with d log ab/dt = -pi/(1+s) tan(theta)."""
    t = np.asarray(t, dtype=np.float64)
    theta = (t + s) / (1 + s) * np.pi / 2
    dlab = -np.pi / (1 + s) * np.tan(theta)
    return dlab / (1.0 - ref_cosine_alpha_bar(t, s))


SCHEDULES = {
    "linear": lambda: dk.linear(),
    "linear_T50": lambda: dk.linear(T=50),
    "cosine": lambda: dk.cosine(),
    "sigmoid": lambda: dk.sigmoid(),
    "alpha_bar": lambda: dk.from_alpha_bar(np.exp(-np.linspace(0.05, 9.0, 40))),
    "refiner": lambda: dk.get_schedule({"name": "refiner", "steps": 3, "sigma_min": 4e-7}),
}


@pytest.fixture(params=list(SCHEDULES), ids=list(SCHEDULES))
def schedule(request):
    return SCHEDULES[request.param]()


# ------------------------------------------------------------------------------------------
# 1. schedules
# ------------------------------------------------------------------------------------------
def test_alpha_bar_at_zero_is_one(schedule):
    t0 = torch.tensor(0.0, dtype=F64)
    assert float(schedule.alpha_bar(t0)) == 1.0
    a, s = schedule.coeffs(t0)
    assert float(a) == 1.0 and float(s) == 0.0
    assert math.isinf(float(schedule.logsnr(t0))) and float(schedule.logsnr(t0)) > 0


def test_marginal_identities(schedule):
    t = torch.linspace(0.0, 1.0, 101, dtype=F64)
    a, s = schedule.coeffs(t)
    torch.testing.assert_close(a, schedule.alpha(t), rtol=0, atol=0)
    torch.testing.assert_close(s, schedule.sigma(t), rtol=0, atol=0)
    torch.testing.assert_close(a**2 + s**2, torch.ones_like(t), rtol=0, atol=1e-14)
    torch.testing.assert_close(a**2, schedule.alpha_bar(t), rtol=1e-13, atol=0)
    tt = t[1:]
    aa, ss = schedule.coeffs(tt)
    torch.testing.assert_close(schedule.snr(tt), aa**2 / ss**2, rtol=1e-10, atol=0)
    torch.testing.assert_close(schedule.logsnr(tt), torch.log(aa**2 / ss**2), rtol=0, atol=1e-9)
    if schedule.T != 50:  # (linear betas over only 50 steps do not reach noise; that is the user's choice)
        assert 1.0 / (1.0 + float(schedule.snr(1.0))) > 0.99  # x_1 is close to pure noise


def test_transition_is_variance_preserving(schedule, gen):
    u = torch.rand(200, 2, generator=gen, dtype=F64)
    s, t = u.min(1).values, u.max(1).values
    lam, sig = schedule.transition(s, t)
    torch.testing.assert_close(lam**2 + sig**2, torch.ones_like(lam), rtol=0, atol=1e-13)
    assert bool(((lam > 0) & (lam <= 1)).all())
    # independent: lam = alpha_t / alpha_s, and q(x_t|x_0) = composition of q(x_s|x_0), q(x_t|x_s)
    a_s, s_s = schedule.coeffs(s)
    a_t, s_t = schedule.coeffs(t)
    torch.testing.assert_close(lam, a_t / a_s, rtol=1e-12, atol=0)
    torch.testing.assert_close(lam**2 * s_s**2 + sig**2, s_t**2, rtol=1e-10, atol=1e-14)


def test_transition_rejects_reversed_times(schedule):
    with pytest.raises(ValueError, match="s <= t"):
        schedule.transition(0.7, 0.3)


def test_product_of_step_lambdas_is_alpha_bar(schedule):
    # an irregular grid from 0 to 0.93
    grid = torch.tensor([0.0, 0.013, 0.05, 0.051, 0.2, 0.37, 0.5, 0.77, 0.9, 0.93], dtype=F64)
    lam, sig = schedule.transition(grid[:-1], grid[1:])
    prod = torch.cumprod(lam**2, 0)
    torch.testing.assert_close(prod, schedule.alpha_bar(grid[1:]), rtol=1e-12, atol=0)
    # and through 1 - sig^2
    torch.testing.assert_close(torch.cumprod(1 - sig**2, 0), schedule.alpha_bar(grid[1:]), rtol=1e-10, atol=0)


@pytest.mark.parametrize("T", [1, 10, 1000])
def test_linear_schedule_betas_and_alpha_bar(T):
    sch = dk.linear(T=T)
    betas_ref = np.linspace(1e-4, 0.02, T)
    np.testing.assert_allclose(sch.betas().numpy(), betas_ref, rtol=1e-10, atol=1e-15)
    grid = np.arange(1, T + 1) / T
    np.testing.assert_allclose(sch.alpha_bar(torch.tensor(grid)).numpy(), ref_linear_alpha_bar(T), rtol=1e-12)
    # per-step AR(1) coefficients are the paper's lambda_n = sqrt(1 - beta_n)
    lam, sig = sch.transition(torch.tensor(grid - 1.0 / T).clamp_min(0), torch.tensor(grid))
    np.testing.assert_allclose(lam.numpy() ** 2, 1 - betas_ref, rtol=1e-12)
    np.testing.assert_allclose(sig.numpy() ** 2, betas_ref, rtol=1e-8)
    assert sch.T == T


def test_linear_schedule_interpolates_log_alpha_bar_between_grid_points():
    sch, T = dk.linear(T=20), 20
    lab = np.log(ref_linear_alpha_bar(T))
    lab = np.concatenate([[0.0], lab])
    n = np.arange(T)
    w = 0.3
    t = (n + w) / T
    want = (1 - w) * lab[n] + w * lab[n + 1]
    np.testing.assert_allclose(sch.log_alpha_bar(torch.tensor(t)).numpy(), want, rtol=1e-10, atol=1e-14)


def test_cosine_matches_nichol_formula():
    for s in (0.008, 0.02):
        sch = dk.cosine(s=s)
        t = np.linspace(0, 0.995, 300)
        np.testing.assert_allclose(sch.alpha_bar(torch.tensor(t)).numpy(), ref_cosine_alpha_bar(t, s), rtol=1e-10, atol=1e-15)
    # log-SNR is clipped below at logsnr_min, so t = 1 is finite
    sch = dk.cosine(logsnr_min=-12.0)
    assert float(sch.logsnr(1.0)) == pytest.approx(-12.0, abs=1e-9)
    assert float(sch.logsnr(0.5)) == pytest.approx(math.log(ref_cosine_alpha_bar(0.5) / (1 - ref_cosine_alpha_bar(0.5))), rel=1e-10)


def test_logsnr_is_decreasing(schedule):
    t = torch.linspace(0.0, 1.0, 4001, dtype=F64)
    l = schedule.logsnr(t)
    assert bool((l[1:] <= l[:-1]).all()), "log-SNR must be non-increasing on [0, 1]"
    inner = t <= 0.995  # strictly decreasing away from the low-SNR clip at t ~ 1
    li = l[inner]
    assert bool((li[1:] < li[:-1]).all()), "log-SNR must be strictly decreasing before the clip"


def test_t_from_logsnr_inverts_logsnr(schedule):
    t = torch.linspace(0.02, 0.98, 49, dtype=F64)
    l = schedule.logsnr(t)
    t_back = schedule.t_from_logsnr(l)
    torch.testing.assert_close(t_back, t, rtol=0, atol=1e-10)
    torch.testing.assert_close(schedule.logsnr(t_back), l, rtol=0, atol=1e-8)
    # any value inside the range, not only values at grid points
    lvals = torch.linspace(float(schedule.logsnr(0.98)), float(schedule.logsnr(0.02)), 17, dtype=F64)
    torch.testing.assert_close(schedule.logsnr(schedule.t_from_logsnr(lvals)), lvals, rtol=0, atol=1e-8)


def test_dlogsnr_dt_matches_finite_difference(schedule):
    if schedule.T:  # piecewise-linear log alpha_bar: stay off the kinks at n/T
        T = schedule.T
        n = torch.tensor([0, 1, T // 7, T // 2, T - 2], dtype=F64)
        t = (n + 0.37) / T
        h = 1e-4 / T
    else:
        t = torch.tensor([0.01, 0.1, 0.3, 0.5, 0.7, 0.9, 0.98], dtype=F64)
        h = 1e-5
    fd = (schedule.logsnr(t + h) - schedule.logsnr(t - h)) / (2 * h)
    g = schedule.dlogsnr_dt(t)
    torch.testing.assert_close(g, fd, rtol=1e-6, atol=0)
    assert bool((g < 0).all())


def test_cosine_dlogsnr_matches_closed_form():
    t = np.array([0.001, 0.05, 0.3, 0.6, 0.9, 0.99])
    np.testing.assert_allclose(dk.cosine().dlogsnr_dt(torch.tensor(t)).numpy(), ref_cosine_dlogsnr(t), rtol=1e-9)


def test_from_alpha_bar_round_trips():
    base = dk.linear(T=64)
    grid = base.discrete_times()
    ab = base.alpha_bar(grid)
    sch = dk.from_alpha_bar(ab)
    assert sch.T == 64
    torch.testing.assert_close(sch.alpha_bar(grid), ab, rtol=1e-13, atol=0)
    torch.testing.assert_close(sch.betas(), base.betas(), rtol=1e-10, atol=0)
    t = torch.rand(50, dtype=F64, generator=torch.Generator().manual_seed(3))
    torch.testing.assert_close(sch.log_alpha_bar(t), base.log_alpha_bar(t), rtol=1e-12, atol=1e-15)
    # from a user list too
    vals = [0.9, 0.5, 0.1, 0.01]
    sch = dk.from_alpha_bar(vals)
    np.testing.assert_allclose(sch.alpha_bar(torch.tensor([0.25, 0.5, 0.75, 1.0])).numpy(), vals, rtol=1e-13)
    np.testing.assert_allclose(sch.betas().numpy(), 1 - np.array(vals) / np.array([1.0] + vals[:-1]), rtol=1e-12)


@pytest.mark.parametrize("bad", [-0.1, 1.1, float("nan"), [0.5, 2.0]])
def test_time_outside_unit_interval_raises(schedule, bad):
    for fn in (schedule.alpha_bar, schedule.coeffs, schedule.logsnr, schedule.sigma, schedule.dlogsnr_dt):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            fn(torch.tensor(bad, dtype=F64))


@pytest.mark.parametrize("ab, what", [
    ([0.5, 0.6, 0.1], "decreasing"),
    ([0.5, 0.5, 0.1], "decreasing"),
    ([1.0, 0.5], r"\(0, 1\)"),
    ([0.5, 0.0], r"\(0, 1\)"),
    ([0.5, float("nan")], r"\(0, 1\)"),
    ([], "empty"),
])
def test_from_alpha_bar_rejects_invalid(ab, what):
    with pytest.raises(ValueError, match=what):
        dk.from_alpha_bar(ab)


def test_schedule_constructor_errors():
    with pytest.raises(ValueError):
        dk.linear(T=0)
    with pytest.raises(ValueError):
        dk.sigmoid(start=1.0, end=-1.0)
    with pytest.raises(ValueError, match="continuous"):
        dk.cosine().discrete_times()


def test_schedules_accept_time_tensors_of_any_rank(schedule, shape):
    t = torch.rand(shape, dtype=F64, generator=torch.Generator().manual_seed(len(shape)))
    for fn in (schedule.alpha_bar, schedule.logsnr, schedule.dlogsnr_dt):
        out = fn(t)
        assert out.shape == t.shape and out.dtype == F64
        torch.testing.assert_close(out.flatten(), fn(t.flatten()), rtol=1e-14, atol=0)
    lam, sig = schedule.transition(t * 0.5, t)
    assert lam.shape == t.shape and sig.shape == t.shape
    # float32 input is computed in float64
    assert schedule.alpha_bar(t.float()).dtype == F64


def test_get_schedule_by_name_dict_and_errors():
    assert isinstance(dk.get_schedule("linear"), dk.Schedule) and dk.get_schedule("linear").T == 1000
    sch = dk.get_schedule({"name": "cosine", "s": 0.02})
    assert sch.s == 0.02
    inst = dk.cosine()
    assert dk.get_schedule(inst) is inst
    with pytest.raises(UnknownComponentError, match="cosine"):  # lists what is installed
        dk.get_schedule("cosin")
    with pytest.raises(ValueError, match="name"):
        dk.get_schedule({"s": 0.1})
    with pytest.raises(TypeError):
        dk.get_schedule(3)


# ------------------------------------------------------------------------------------------
# 2. q_sample
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# 3. posterior q(x_s | x_t, x_0)
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# 4. parameterisations
# ------------------------------------------------------------------------------------------
def _alpha_sigma(B, gen):
    a = 0.05 + 0.94 * torch.rand(B, generator=gen, dtype=F64)
    return a, (1 - a**2).sqrt()


def _b(v, like):
    return v[(...,) + (None,) * (like.ndim - 1)]


def test_parameterisation_round_trips(shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=F64)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    a, s = _alpha_sigma(shape[0], gen)
    x_t = _b(a, x0) * x0 + _b(s, x0) * eps
    v = _b(a, x0) * eps - _b(s, x0) * x0  # Salimans & Ho, by hand
    torch.testing.assert_close(P.v_target(x0, eps, a, s), v, rtol=1e-12, atol=1e-12)
    for p, out in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(P.target(p, x0, eps, a, s), out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(P.to_x0(p, out, x_t, a, s), x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(P.to_eps(p, out, x_t, a, s), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P.x0_to_eps(x0, x_t, a, s), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P.eps_to_x0(eps, x_t, a, s), x0, rtol=1e-9, atol=1e-9)
    # v identities: x0 = a x_t - s v, eps = s x_t + a v
    torch.testing.assert_close(_b(a, x0) * x_t - _b(s, x0) * v, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_b(s, x0) * x_t + _b(a, x0) * v, eps, rtol=1e-9, atol=1e-9)
    # scalar (0-d) alpha/sigma broadcast too
    a0, s0 = torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64)
    xt0 = 0.6 * x0 + 0.8 * eps
    torch.testing.assert_close(P.to_x0("v", P.target("v", x0, eps, a0, s0), xt0, a0, s0), x0, rtol=1e-9, atol=1e-9)


def test_eps_error_factor_identities(shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=F64)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    a, s = _alpha_sigma(shape[0], gen)
    x_t = _b(a, x0) * x0 + _b(s, x0) * eps
    sq = lambda e: (e**2).reshape(shape[0], -1).sum(1)
    for p in P.PARAMETERIZATIONS:
        delta = 0.1 * torch.randn(shape, generator=gen, dtype=F64)
        out_hat = P.target(p, x0, eps, a, s) + delta  # a wrong prediction in native space
        eps_hat = P.to_eps(p, out_hat, x_t, a, s)
        x0_hat = P.to_x0(p, out_hat, x_t, a, s)
        e_eps = sq(eps - eps_hat)
        torch.testing.assert_close(sq(delta), P.eps_error_factor(p, a, s) * e_eps, rtol=1e-8, atol=1e-14)
        # in any space: |x0 err|^2 = |eps err|^2 / SNR and |v err|^2 = |eps err|^2 / alpha^2
        torch.testing.assert_close(sq(x0 - x0_hat), e_eps * s**2 / a**2, rtol=1e-8, atol=1e-14)
        v_hat = P.v_target(x0_hat, eps_hat, a, s)
        torch.testing.assert_close(sq(P.v_target(x0, eps, a, s) - v_hat), e_eps / a**2, rtol=1e-8, atol=1e-14)
    assert float(P.eps_error_factor("x0", torch.tensor(0.6), torch.tensor(0.8))) == pytest.approx(0.64 / 0.36)
    assert float(P.eps_error_factor("v", torch.tensor(0.6), torch.tensor(0.8))) == pytest.approx(1 / 0.36)


def test_unknown_parameterisation_raises():
    with pytest.raises(ValueError, match="eps, x0, v"):
        P.check_parameterization("score")
    with pytest.raises(ValueError):
        P.to_x0("score", torch.zeros(2), torch.zeros(2), 0.5, 0.5)


# ------------------------------------------------------------------------------------------
# 5. exact denoisers
# ------------------------------------------------------------------------------------------
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


# ------------------------------------------------------------------------------------------
# 8. Denoiser and Cond
# ------------------------------------------------------------------------------------------
def _layout(**kw):
    base = dict(channels=("u", "v"), spatial=("x",), shape=(6,), cond_channels=("f",),
                scalars=("s1", "s2"), num_classes=3)
    base.update(kw)
    return dk.Layout(**base)


def _cond(B=4, L=6, gen=None):
    g = gen or torch.Generator().manual_seed(0)
    return dk.Cond(fields=torch.randn(B, 1, L, generator=g), scalars=torch.randn(B, 2, generator=g),
                   labels=torch.tensor([0, 1, 2, 1])[:B])


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
def test_denoiser_net_call_and_parameterisation(affine_net, p, gen):
    net = affine_net(out_channels=2, c=0.1, d=0.2)
    sch = dk.cosine()
    D = dk.Denoiser(net, sch, p, layout=_layout())
    x = torch.randn(4, 2, 6, generator=gen)
    cond = _cond(gen=gen)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=F64)
    x0, eps = D.predict(x, t, cond)
    # what the net saw: x with the conditioning field appended, c_noise = log-SNR (float32)
    seen = net.seen
    assert seen["x"].shape == (4, 3, 6)
    torch.testing.assert_close(seen["x"][:, 2:], cond.fields)
    torch.testing.assert_close(seen["x"][:, :2], x)
    assert seen["c_noise"].dtype == torch.float32 and seen["c_noise"].shape == (4,)
    ab = torch.tensor(ref_cosine_alpha_bar(t.numpy())).clamp_min(1 / (1 + math.exp(15)))
    torch.testing.assert_close(seen["c_noise"].double(), torch.log(ab / (1 - ab)), rtol=1e-5, atol=1e-5)
    assert seen["scalars"] is cond.scalars and torch.equal(seen["labels"], cond.labels)
    # the output, converted by hand
    a, s = ab.sqrt()[:, None, None], (1 - ab).sqrt()[:, None, None]
    out = 0.3 * x + 0.01 * seen["c_noise"][:, None, None] + 0.1 * cond.scalars.sum(1)[:, None, None] \
        + 0.2 * (cond.labels.float() + 1)[:, None, None]
    want_x0 = {"eps": (x - s * out) / a, "x0": out, "v": a * x - s * out}[p]
    want_eps = {"eps": out, "x0": (x - a * out) / s, "v": s * x + a * out}[p]
    torch.testing.assert_close(x0, want_x0.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps, want_eps.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(D(x, t, cond), x0)


def test_denoiser_clips_c_noise(affine_net):
    net = affine_net()
    D = dk.Denoiser(net, dk.cosine(), "eps", logsnr_clip=5.0)
    D.net_output(torch.zeros(3, 2), torch.tensor([1e-3, 0.5, 1.0], dtype=F64))
    l = dk.cosine().logsnr(torch.tensor([1e-3, 0.5, 1.0], dtype=F64)).clamp(-5, 5).float()
    torch.testing.assert_close(net.seen["c_noise"], l)
    assert float(net.seen["c_noise"][0]) == 5.0 and float(net.seen["c_noise"][2]) == -5.0


def test_denoiser_without_layout_accepts_any_rank(affine_net, shape, gen):
    sch = dk.linear()
    D = dk.Denoiser(affine_net(), sch, "v")
    x = torch.randn(shape, generator=gen, dtype=F64)
    t = torch.rand(shape[0], generator=gen, dtype=F64) * 0.9 + 0.05
    x0, eps = D.predict(x, t)
    a, s = sch.coeffs(t)
    bb = lambda v: v[(...,) + (None,) * (x.ndim - 1)]
    assert x0.shape == shape
    torch.testing.assert_close(bb(a) * x0 + bb(s) * eps, x, rtol=1e-9, atol=1e-9)


def test_denoiser_reads_layout_from_net(affine_net):
    net = affine_net()
    net.layout = _layout(cond_channels=(), scalars=())
    D = dk.Denoiser(net, dk.cosine())
    assert D.layout is net.layout
    with pytest.raises(ShapeError):
        D(torch.zeros(2, 3, 6), 0.5)


@pytest.mark.parametrize("x_shape, match", [((4, 3, 6), "channels"), ((4, 2), "rank"), ((4, 2, 6, 1), "rank")])
def test_denoiser_rejects_wrong_x(affine_net, x_shape, match):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    with pytest.raises(ShapeError, match=match):
        D(torch.zeros(x_shape), 0.5, _cond())


def test_denoiser_accepts_other_spatial_sizes(affine_net):
    """The layout check is on rank and channels only (backbones may pad and crop)."""
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout(cond_channels=(), scalars=()))
    assert D(torch.zeros(2, 2, 9), 0.5).shape == (2, 2, 9)


@pytest.mark.parametrize("change, match", [
    (dict(fields=torch.zeros(4, 1, 5)), "Cond.fields"),
    (dict(fields=torch.zeros(4, 2, 6)), "Cond.fields"),
    (dict(fields=None), "Cond.fields is None"),
    (dict(scalars=torch.zeros(4, 3)), "Cond.scalars"),
    (dict(scalars=torch.zeros(3, 2)), "Cond.scalars"),
    (dict(scalars=None), "Cond.scalars is None"),
    (dict(labels=torch.tensor([0, 1, 4, 1])), "labels must lie"),
    (dict(labels=torch.tensor([0, -1, 2, 1])), "labels must lie"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0, 1.0])), "integer"),
    (dict(labels=torch.tensor([0, 1, 2])), "Cond.labels has shape"),
    (dict(fields=torch.full((4, 1, 6), float("nan"))), "NaN"),
])
def test_cond_mismatch_raises_shape_error(affine_net, change, match):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    c = _cond()
    c = dk.Cond(**{**dict(fields=c.fields, scalars=c.scalars, labels=c.labels), **change})
    err = NonFiniteError if match == "NaN" else ShapeError
    with pytest.raises(err, match=match):
        D(torch.zeros(4, 2, 6), 0.5, c)


def test_cond_given_but_not_declared_raises(affine_net):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout(cond_channels=(), scalars=(), num_classes=0))
    x = torch.zeros(4, 2, 6)
    with pytest.raises(ShapeError, match="no cond_channels"):
        D(x, 0.5, dk.Cond(fields=torch.zeros(4, 1, 6)))
    with pytest.raises(ShapeError, match="no scalars"):
        D(x, 0.5, dk.Cond(scalars=torch.zeros(4, 2)))
    with pytest.raises(ShapeError, match="num_classes = 0"):
        D(x, 0.5, dk.Cond(labels=torch.zeros(4, dtype=torch.long)))


def test_null_label_is_accepted(affine_net):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    c = _cond()
    D(torch.zeros(4, 2, 6), 0.5, dk.Cond(c.fields, c.scalars, torch.full((4,), 3)))


@pytest.mark.parametrize("t", [0.0, -0.2, 1.0 + 1e-9, 1.5])
def test_denoiser_rejects_times_outside_0_1(affine_net, t):
    D = dk.Denoiser(affine_net(), dk.cosine())
    with pytest.raises(ValueError):
        D(torch.zeros(2, 3), t)
    with pytest.raises(ValueError):
        D(torch.zeros(2, 3), torch.tensor([0.5, t], dtype=F64))


def test_guidance_without_labels_raises(affine_net):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    c = _cond()
    with pytest.raises(ValueError, match="labels"):
        D(torch.zeros(4, 2, 6), 0.5, dk.Cond(c.fields, c.scalars), guidance=2.0)
    with pytest.raises(ValueError, match="labels"):
        D(torch.zeros(4, 2), 0.5, None, guidance=3.0)


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, -0.5])
def test_classifier_free_guidance(affine_net, p, w, gen):
    net = affine_net(out_channels=2, c=0.1, d=0.7)
    D = dk.Denoiser(net, dk.cosine(), p, layout=_layout())
    x = torch.randn(4, 2, 6, generator=gen)
    c = _cond(gen=gen)
    t = torch.tensor([0.2, 0.5, 0.6, 0.9], dtype=F64)
    out_c = D.net_output(x, t, c)
    out_u = D.net_output(x, t, dk.Cond(c.fields, c.scalars, torch.full((4,), 3)))
    assert not torch.allclose(out_c, out_u)  # the fake net does depend on labels
    calls = net.calls
    got = D(x, t, c, guidance=w)
    assert net.calls == calls + 1  # one (batched, for w != 1) forward pass
    if w != 1.0:
        assert net.seen["x"].shape[0] == 8
    a, s = D.schedule.coeffs(t)
    want = P.to_x0(p, out_u + w * (out_c - out_u), x, a, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # guidance is affine: also holds in x0 space
    x0_c, x0_u = D(x, t, c), P.to_x0(p, out_u, x, a, s)
    torch.testing.assert_close(got, x0_u + w * (x0_c - x0_u), rtol=1e-4, atol=1e-4)
    if w == 1.0:
        assert torch.equal(got, D(x, t, c))
    # bound denoisers carry cond and guidance
    bd = D.bind(c, w)
    assert bd.schedule is D.schedule
    torch.testing.assert_close(bd(x, t), got)


def test_cond_index_and_repeat():
    c = _cond()
    r = c.repeat_interleave(3)
    assert r.fields.shape == (12, 1, 6) and r.scalars.shape == (12, 2)
    assert r.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1]
    i = c.index(torch.tensor([2, 0]))
    assert i.labels.tolist() == [2, 0] and torch.equal(i.fields[0], c.fields[2])
    assert dk.Cond().index(slice(0, 1)) == dk.Cond()


def test_refiner_schedule_has_pde_refiner_noise_levels():
    """Lippe et al. 2023: a pure-noise level, then sigma_k = sigma_min^(k/K), k = 1..K."""
    s = dk.get_schedule({"name": "refiner", "steps": 4, "sigma_min": 1e-6})
    assert s.T == 5
    t = torch.arange(1, 6, dtype=torch.float64) / 5
    a, sg = s.coeffs(t)
    want = torch.tensor([1e-6, 1e-6 ** 0.75, 1e-6 ** 0.5, 1e-6 ** 0.25], dtype=torch.float64)
    assert torch.allclose(sg[:4] / a[:4], want, rtol=1e-9)
    assert float(s.logsnr(t[-1:])) == pytest.approx(-30.0)
    # training draws every level equally often; the ddpm sampler with nfe = T visits exactly them
    from diffkit.losses import sample_times

    n = (sample_times(s, 20000, generator=torch.Generator().manual_seed(0)) * 5).round().long()
    assert torch.bincount(n, minlength=6)[1:].min() > 3700
    assert torch.allclose(dk.timesteps(s, 5), torch.tensor([1.0, 0.8, 0.6, 0.4, 0.2, 0.0], dtype=torch.float64))
    with pytest.raises(ValueError, match="sigma_min"):
        dk.get_schedule({"name": "refiner", "sigma_min": 2.0})
    with pytest.raises(ValueError, match="logsnr_max_noise"):
        dk.get_schedule({"name": "refiner", "logsnr_max_noise": 40.0})


def test_discrete_schedule_looks_up_its_grid_on_the_device_of_t():
    """Training draws t on the model's device; a discrete schedule must index a copy of its grid
    there (indexing the CPU grid with CUDA indices fails).  The meta device stands in for CUDA:
    the result lives where t lives, and the CPU path is unchanged."""
    s = dk.linear()
    t = torch.rand(5, dtype=torch.float64)
    assert s._log_alpha_bar(t.to("meta")).device.type == "meta"
    torch.testing.assert_close(s._log_alpha_bar(t), s.log_alpha_bar(t), rtol=0, atol=0)
