"""Tests of :mod:`diffkit.schedules`: alpha_bar, log-SNR, transitions and the built-in schedules
(linear, cosine, sigmoid, alpha_bar, refiner) against independent references (numpy cumprods,
Nichol's cosine formula, finite differences)."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

import diffkit as dk
from diffkit.errors import UnknownComponentError

from _references import F64, ref_cosine_alpha_bar, ref_linear_alpha_bar


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
