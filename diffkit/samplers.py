"""Samplers: stateless functions with one signature (after k-diffusion).

Every sampler is

    sampler(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, **options) -> x

- ``denoiser(x, t, **extra_args)`` returns an estimate of x0 and has a ``schedule``;
- ``x`` is the starting point at time ``ts[0]`` (usually pure noise at t = 1);
- ``ts`` is a decreasing 1-D grid of times ending in ``0`` (the data), so ``len(ts) - 1``
  steps are taken; :func:`timesteps` builds the usual spacings;
- ``generator`` makes stochastic samplers reproducible;
- ``callback(info)`` is called after every step with a dict (``i``, ``n``, ``t``, ``t_next``,
  ``x``, ``x0``); the progress bar of :func:`sample` is such a callback.

Multistep history lives in local variables; nothing is stored between calls.  Each sampler
declares its order, whether it is stochastic, and how many denoiser evaluations (NFE) a grid
costs, through :func:`sampler_info`.

The deterministic samplers integrate the probability-flow ODE.  Euler, Heun and DPM-Solver++(2S)
work in the variance-exploding variables of Karras et al. (2022), ``x~ = x / alpha`` and
``sigma~ = sigma / alpha``, where the ODE is ``dx~/dsigma~ = (x~ - D) / sigma~``.

**Default grids resolve small noise levels.**  Every built-in sampler defaults to the ``logsnr``
spacing from ``sigma~ = 80`` down to ``sigma~ = SIGMA_MIN = 1e-3``.  The last denoiser call is
made at ``sigma_min``, and its x0 estimate is the sample: data whose conditional spread ``s``
is below the smallest noise level on the grid collapse to the conditional mean (for Gaussian
data the final call shrinks the spread by ``s / sqrt(s^2 + sigma_min^2)``).  Measured with the
exact denoiser (:class:`diffkit.GaussianDenoiser`, 4000 x 64 samples, float64), the former
default, DPM-Solver++(2M) on a grid uniform in t, returned std ratios 1.00/0.74/0.32/0.11 for
data std 1/0.1/0.03/0.01 at NFE 20, because its last call was at ``sigma~ ~ 0.2``; with the
``logsnr`` grid to 1e-3 it returns 1.019/1.019/1.018/1.010 at NFE 20 and 1.042/1.034/1.017/0.977
at NFE 10, on the cosine, linear and sigmoid schedules alike (``benchmarks/samplers.py`` and
``tests/test_noise_levels.py``; ``docs/engine.md`` has the table).

**Optional fast path.**  A denoiser may define
``x0_at(x, t, alpha, sigma, logsnr, **extra_args)``: the same result as
``denoiser(x, t, **extra_args)``, given the schedule's ``alpha``, ``sigma`` and log-SNR at
``t`` as Python floats (every sample of the batch is at the same time), which the sampler has
computed once for its whole grid.  :class:`diffkit.Denoiser` and its ``bind()`` result define
it and so skip the per-call schedule arithmetic and range checks; any other callable gets the
plain ``denoiser(x, t, **extra_args)`` call.
"""
from __future__ import annotations

import functools
import math
import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from ._shape import check_finite
from .constants import MAX_NFE, SPACINGS  # torch-free, shared with diffkit.config

#: sigma~ = sigma/alpha at which the noise-level spacings (karras, logsnr) stop and start by
#: default.  SIGMA_MAX is Karras et al.'s (2022) 80; SIGMA_MIN is half of their 0.002, chosen by
#: measurement so that data with a conditional spread of 0.01 keep 99.5 % of it (see the module
#: docstring and :func:`timesteps`).
SIGMA_MIN = 1e-3
SIGMA_MAX = 80.0
#: Heun's method is unstable below this NFE: on a two-component mixture (means +-1, std 0.05 or
#: 0.3, d = 4) samples at NFE 3..11 are 1.7x to 500x too spread, with max|x| up to 170 instead
#: of ~1.2 (logsnr and karras grids alike); at NFE 12 the spread excess falls below 2.4x, at
#: NFE 19 to 1.2x.  :func:`heun` warns below it.
HEUN_MIN_NFE = 12


@dataclass(frozen=True)
class SamplerInfo:
    order: int
    stochastic: bool
    default_spacing: str
    plan: Callable[[int], tuple[int, dict]]
    """``plan(nfe) -> (n_steps, options)`` spending exactly ``nfe`` denoiser calls."""


def _one_per_step(nfe: int) -> tuple[int, dict]:
    return nfe, {}


def sampler_info(*, order: int, stochastic: bool, default_spacing: str = "logsnr",
                 plan: Callable[[int], tuple[int, dict]] = _one_per_step):
    """Decorator declaring a sampler's order, stochasticity, default spacing and NFE plan."""

    def deco(fn):
        fn.info = SamplerInfo(order, stochastic, default_spacing, plan)
        return fn

    return deco


# -- helpers -------------------------------------------------------------------------------
class _Grid:
    """Everything a sampler needs about its time grid, computed once per call.

    Per-step coefficients are Python floats, so the loop does no schedule arithmetic (the
    only tensor work per step is on ``x``).  ``a``, ``s`` and ``lam`` are alpha, sigma and the
    log-SNR at every grid time, from one vectorised evaluation of the schedule (cached);
    ``tb[i]`` is the per-sample time tensor that the denoiser receives, and :meth:`call`
    hands all of these to the denoiser's optional fast path ``x0_at``.
    """

    __slots__ = ("t", "a", "s", "lam", "tb", "n", "fast", "den")

    def __init__(self, denoiser, ts, x: torch.Tensor):
        ts = torch.as_tensor(ts, dtype=torch.float64).flatten().cpu()
        self.t = ts.tolist()
        self.a, self.s, self.lam = _grid_coeffs(denoiser.schedule, tuple(self.t))
        self.n = len(self.t) - 1
        self.tb = ts.to(x.device)[:, None].expand(-1, x.shape[0])
        self.den = denoiser
        self.fast = getattr(denoiser, "x0_at", None)

    def sigma_tilde(self, i: int) -> float:
        """Karras et al.'s noise level ``sigma / alpha`` at grid point ``i``."""
        return self.s[i] / self.a[i]

    def call(self, x, i: int, kw: dict) -> torch.Tensor:
        """The denoiser at grid point ``i``."""
        if self.fast is not None:
            return self.fast(x, self.tb[i], self.a[i], self.s[i], self.lam[i], **kw)
        return self.den(x, self.tb[i], **kw)

    def call_at(self, x, tb, a: float, s: float, lam: float, kw: dict) -> torch.Tensor:
        """The denoiser at an off-grid time ``tb`` with precomputed coefficients."""
        if self.fast is not None:
            return self.fast(x, tb, a, s, lam, **kw)
        return self.den(x, tb, **kw)


@functools.lru_cache(maxsize=128)
def _grid_coeffs(schedule, t: tuple) -> tuple[list, list, list]:
    """Check a grid and return its ``(alpha, sigma, logsnr)`` lists; cached, since grids are reused."""
    if len(t) < 2:
        raise ValueError("the time grid needs at least 2 points (one step); NFE must be >= 1")
    if any(b >= a for a, b in zip(t, t[1:])):
        raise ValueError("the time grid must be strictly decreasing")
    if t[0] > 1 or t[-1] < 0:
        raise ValueError(f"time grid values must lie in [0, 1], got {t[0]} .. {t[-1]}")
    tt = torch.tensor(t, dtype=torch.float64)
    a, s = schedule.coeffs(tt)  # (1, 0) exactly at t = 0
    return a.tolist(), s.tolist(), schedule.logsnr(tt).tolist()


def _levels(schedule, sig) -> tuple[torch.Tensor, list, list, list]:
    """Times, alpha, sigma and log-SNR at noise levels ``sig`` (sigma~, a 1-D float64 tensor), in
    one vectorised call: for the off-grid evaluations of churn and of DPM-Solver++(2S)."""
    t = schedule.t_from_logsnr(-2.0 * sig.log()).clamp(0.0, 1.0)
    a, s = schedule.coeffs(t)
    return t, a.tolist(), s.tolist(), schedule.logsnr(t).tolist()


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _report(callback, g: _Grid, i, x, x0):
    if callback is not None:
        callback({"i": i, "n": g.n, "t": g.t[i], "t_next": g.t[i + 1], "x": x, "x0": x0})


# -- samplers ------------------------------------------------------------------------------
def _check_noise(churn_noise) -> float:
    v = float(churn_noise)
    if not (v >= 0 and math.isfinite(v)):
        raise ValueError(f"churn_noise must be a finite number >= 0, got {churn_noise!r}")
    return v


@sampler_info(order=1, stochastic=True)
def ddpm(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, variance: str = "small",
         churn_noise: float = 1.0):
    """Ancestral DDPM (Ho et al. 2020): draw from q(x_s | x_t, x0_hat) at every step.

    ``variance="small"`` uses the posterior variance (beta tilde), ``"large"`` the forward
    step variance (beta); both are Ho et al.'s choices.  No noise is added on the last step.
    ``churn_noise`` scales the std of the fresh noise (EDM's S_noise; 1 is the exact posterior).

    First order: on Gaussian data (exact denoiser) the sample std comes out 23 % low at NFE 20
    and within 10 % only from NFE 100 (0.94 at NFE 100, default logsnr grid), whatever the data std.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    churn_noise = _check_noise(churn_noise)
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    for i in range(g.n):
        x0 = g.call(x, i, kw)
        a_t, s_t, a_s, s_s = g.a[i], g.s[i], g.a[i + 1], g.s[i + 1]
        lam = a_t / a_s  # AR(1) coefficient of q(x_t | x_s); posterior as in process.posterior_coeffs
        sig2 = max(1.0 - lam * lam, 0.0)
        x = (a_s * sig2 / s_t**2) * x0 + (lam * s_s**2 / s_t**2) * x
        if i < g.n - 1:
            var = sig2 * s_s**2 / s_t**2 if variance == "small" else sig2
            x = x + (math.sqrt(var) * churn_noise) * _noise(x, generator)
        _report(callback, g, i, x, x0)
    return x


@sampler_info(order=1, stochastic=False)  # stochastic only with eta > 0
def ddim(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, eta: float = 0.0,
         churn_noise: float = 1.0):
    """DDIM (Song et al. 2021a).  ``eta = 0`` is deterministic (the probability-flow ODE's
    exponential-Euler step); ``eta = 1`` has the ancestral DDPM marginals.  ``churn_noise``
    scales the std of the fresh noise of ``eta > 0`` (EDM's S_noise).

    First order: on Gaussian data the sample std comes out 13 % low at NFE 20 and within 10 %
    from NFE 50 (0.95 at NFE 50, 0.97 at NFE 100; default logsnr grid), whatever the data std;
    with ``eta = 1`` it is DDPM: 0.77 at NFE 20, 0.94 at NFE 100."""
    churn_noise = _check_noise(churn_noise)
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    for i in range(g.n):
        x0 = g.call(x, i, kw)
        a_t, s_t, a_s, s_s = g.a[i], g.s[i], g.a[i + 1], g.s[i + 1]
        c = 0.0
        if eta > 0 and s_s > 0:
            c = eta * math.sqrt((s_s**2 / s_t**2) * (1 - (a_t / a_s) ** 2))
        k = math.sqrt(max(s_s**2 - c**2, 0.0)) / s_t  # x_s = a_s x0 + k (x - a_t x0) [+ c z]
        x = torch.add(x0, x - a_t * x0, alpha=k / a_s).mul_(a_s) if k else a_s * x0
        if c > 0:
            x = x + (c * churn_noise) * _noise(x, generator)
        _report(callback, g, i, x, x0)
    return x


def _half_logsnr(g: _Grid, i: int) -> float:
    return math.log(g.a[i] / g.s[i])


#: Zero-length steps.  A grid strictly decreasing in t can still repeat a noise level where the
#: schedule is flat: the cosine and sigmoid schedules clip the log-SNR at ``logsnr_min`` near
#: t = 1, so a fine grid uniform in t (``spacing="uniform"``, NFE in the thousands) has several
#: points there with the same alpha and sigma.  Such a step has half-log-SNR length h = 0 and
#: its exact solution is the identity: the multistep samplers (dpmpp_2m, dpmpp_3m, unipc) take
#: it as such and keep their history from the last distinct noise level (their step ratios
#: divided by zero there: "float division by zero" at NFE 5000); the one-step samplers'
#: formulas are the identity there already.  The denoiser call at the start of such a step is
#: still made, so NFE stays exact.  A history point whose step is shorter than
#: ``_MIN_STEP_RATIO`` times the current one (a grid point just past the flat part) is not used
#: for a higher-order correction: a divided difference over so short a step would amplify the
#: denoiser's round-off by ``h / h_prev``.  Grids from :func:`timesteps` otherwise have step
#: ratios between ~0.5 and 2, so this changes nothing else.
_MIN_STEP_RATIO = 1e-2


@sampler_info(order=2, stochastic=False)
def dpmpp_2m(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver.

    The last step onto t = 0 is first order (it returns the x0 estimate).  The default sampler
    of :func:`sample`: on Gaussian data of std 1, 0.1, 0.03, 0.01 (exact denoiser, default
    logsnr grid) it returns the std to within 2 % at NFE 20 and 5 % at NFE 10."""
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    x0_prev, h_prev = None, None
    for i in range(g.n):
        x0 = g.call(x, i, kw)
        if g.s[i + 1] == 0:
            x = x0
        else:
            h = _half_logsnr(g, i + 1) - _half_logsnr(g, i)
            if h == 0:  # coincident noise levels: the exact step is the identity (see _MIN_STEP_RATIO)
                _report(callback, g, i, x, x0)
                continue
            d = x0
            if x0_prev is not None and h_prev >= _MIN_STEP_RATIO * h:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (g.s[i + 1] / g.s[i]) * x - (g.a[i + 1] * math.expm1(-h)) * d
            h_prev = h
        x0_prev = x0
        _report(callback, g, i, x, x0)
    return x


@sampler_info(order=3, stochastic=False)
def dpmpp_3m(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
    """DPM-Solver++(3M) (Lu et al. 2022), multistep third order in log-SNR.

    The data-prediction ODE solution is expanded to second order in the half-log-SNR step h
    with divided differences of the last three x0 estimates (phi_2, phi_3 of the exponential
    integrator).  Lower order on the first steps, order <= 2 on the step before the final
    one, and the final step onto t = 0 returns the x0 estimate.

    Needs NFE >= 20 on the default logsnr grid: on Gaussian data the std comes out within 2 %
    at NFE 20 (1.007/1.006/1.007/1.026 for data std 1/0.1/0.03/0.01) but up to 27 % too high
    at NFE 10 (where dpmpp_2m is within 5 %)."""
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    x0_1 = x0_2 = h_1 = h_2 = None
    for i in range(g.n):
        x0 = g.call(x, i, kw)
        if g.s[i + 1] == 0:
            x = x0
        else:
            h = _half_logsnr(g, i + 1) - _half_logsnr(g, i)
            if h == 0:  # coincident noise levels: the identity (see _MIN_STEP_RATIO)
                _report(callback, g, i, x, x0)
                continue
            if h_1 is not None and h_1 < _MIN_STEP_RATIO * h:  # too short to difference over
                x0_1 = x0_2 = h_1 = h_2 = None
            elif h_2 is not None and h_2 < _MIN_STEP_RATIO * h:
                x0_2 = h_2 = None
            a_s = g.a[i + 1]
            em = math.expm1(-h)
            x = (g.s[i + 1] / g.s[i]) * x - (a_s * em) * x0
            phi2 = em / h + 1.0  # int_0^h e^{u-h} u du / h
            last_before_final = g.s[-1] == 0 and i == g.n - 2
            if h_2 is not None and not last_before_final:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))  # ~ h x0'    (quadratic fit)
                d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0'' / 2
                phi3 = 0.5 - phi2 / h  # int_0^h e^{u-h} u^2/2 du / h^2
                x = x + (a_s * phi2) * d1 + (2.0 * a_s * phi3) * d2
            elif h_1 is not None:
                x = x + (a_s * phi2 * h / h_1) * (x0 - x0_1)
            h_2, h_1 = h_1, h
        x0_2, x0_1 = x0_1, x0
        _report(callback, g, i, x, x0)
    return x


class _Churn:
    """EDM stochastic churn (Karras et al. 2022, Alg. 2), planned once per sampling call: at
    step ``i`` the noise level of ``x~`` is raised from sigma~ to sigma^ = sigma~ (1 + gamma)
    by adding fresh noise of std ``sqrt(sigma^2 - sigma~^2) * churn_noise``, with
    ``gamma = min(churn / n, sqrt(2) - 1)`` where ``churn_tmin <= sigma~ <= churn_tmax``.

    The raised levels, their times and coefficients come from one vectorised schedule
    evaluation (no per-step bisection)."""

    __slots__ = ("on", "sig", "add", "tb", "a", "s", "lam")

    def __init__(self, g: _Grid, churn, churn_tmin, churn_tmax, churn_noise):
        n = g.n
        self.on = [False] * n
        self.sig = [g.s[i] / g.a[i] for i in range(n)]
        self.add = [0.0] * n
        if churn <= 0:
            return
        sched = g.den.schedule
        gamma = min(churn / n, math.sqrt(2.0) - 1.0)
        a1, s1 = (float(v) for v in sched.coeffs(torch.tensor(1.0, dtype=torch.float64)))
        idx, hats = [], []
        for i in range(n):
            sig = self.sig[i]
            if churn_tmin <= sig <= churn_tmax:
                hat = min(sig * (1 + gamma), s1 / a1)
                if hat > sig:
                    idx.append(i)
                    hats.append(hat)
        if not idx:
            return
        t_hat, a_h, s_h, l_h = _levels(sched, torch.tensor(hats, dtype=torch.float64))
        t_hat = torch.maximum(t_hat, torch.tensor([g.t[i] for i in idx], dtype=torch.float64))  # round-off
        dev = g.tb.device
        self.tb, self.a, self.s, self.lam = {}, {}, {}, {}
        for k, i in enumerate(idx):
            self.on[i] = True
            self.add[i] = math.sqrt(hats[k] ** 2 - self.sig[i] ** 2) * churn_noise
            self.sig[i] = s_h[k] / a_h[k]
            self.tb[i] = t_hat[k].to(dev).expand(g.tb.shape[1])
            self.a[i], self.s[i], self.lam[i] = a_h[k], s_h[k], l_h[k]

    def apply(self, g: _Grid, i: int, xt, generator, kw):
        """``(x^~, x0 at x^~)`` at step ``i``: fresh noise (if churned), then one denoiser call."""
        if not self.on[i]:
            return xt, g.call(g.a[i] * xt, i, kw)
        xt = xt + self.add[i] * _noise(xt, generator)
        return xt, g.call_at(self.a[i] * xt, self.tb[i], self.a[i], self.s[i], self.lam[i], kw)


def _heun_plan(nfe: int) -> tuple[int, dict]:
    n = math.ceil((nfe + 1) / 2)
    return n, {"second_order_steps": nfe - n}


def _promote(x0, xt):
    if x0.dtype != xt.dtype:  # follow type promotion, as the other samplers' arithmetic does
        dt = torch.promote_types(x0.dtype, xt.dtype)
        x0, xt = x0.to(dt), xt.to(dt)
    return x0, xt


def _churn_args(churn, churn_tmin, churn_tmax, churn_noise):
    churn_noise = _check_noise(churn_noise)
    if not (float(churn) >= 0 and math.isfinite(float(churn))):
        raise ValueError(f"churn must be a finite number >= 0, got {churn!r}")
    return float(churn), float(churn_tmin), float(churn_tmax), churn_noise


def _euler_family(denoiser, x, ts, extra_args, generator, callback, churn, churn_tmin, churn_tmax,
                  churn_noise, second_order_steps):
    churn, churn_tmin, churn_tmax, churn_noise = _churn_args(churn, churn_tmin, churn_tmax, churn_noise)
    g = _Grid(denoiser, ts, x)
    ch = _Churn(g, churn, churn_tmin, churn_tmax, churn_noise)
    kw = extra_args or {}
    xt = x / g.a[0]  # x~ = x / alpha
    for i in range(g.n):
        xt, x0 = ch.apply(g, i, xt, generator, kw)
        sig_hat = ch.sig[i]
        a_s, sig_s = g.a[i + 1], g.sigma_tilde(i + 1)
        # Euler: x~' = x~ + (sig_s - sig) (x~ - x0) / sig = lerp(x0, x~, sig_s / sig)
        x0, xt = _promote(x0, xt)
        x_next = torch.lerp(x0, xt, sig_s / sig_hat)
        if sig_s > 0 and i < second_order_steps:
            x0_2 = g.call(a_s * x_next, i + 1, kw)
            # Heun: x~ + (sig_s - sig)/2 (d + d'), d = (x~ - x0)/sig, d' = (x~' - x0')/sig_s
            half = 0.5 * (sig_s - sig_hat)
            x_next = torch.add(xt, xt - x0, alpha=half / sig_hat).add_(x_next - x0_2, alpha=half / sig_s)
        xt = x_next
        if callback is not None:
            _report(callback, g, i, a_s * xt, x0)
    return g.a[-1] * xt


@sampler_info(order=1, stochastic=False)
def euler(denoiser, x, ts, *, extra_args=None, generator=None, callback=None,
          churn: float = 0.0, churn_tmin: float = 0.0, churn_tmax: float = float("inf"), churn_noise: float = 1.0):
    """Euler on the probability-flow ODE in Karras et al.'s variables, with optional EDM
    stochastic churn (``churn > 0``, applied where ``churn_tmin <= sigma~ <= churn_tmax``;
    ``churn_noise`` is EDM's S_noise).

    The Euler step in ``x~`` is DDIM's step, so it shares DDIM's first-order under-dispersion:
    on Gaussian data the std comes out 13 % low at NFE 20 and within 10 % from NFE 50.  Churn
    lengthens every step (it restarts from sigma^ > sigma~) and so adds to it: with
    ``churn=2.5`` the std is 0.84 at NFE 20, 0.93 at NFE 50, 0.97 at NFE 100 (default logsnr
    grid, any data std); use Heun or ``dpmpp_2s`` with churn at low NFE."""
    return _euler_family(denoiser, x, ts, extra_args, generator, callback, churn, churn_tmin, churn_tmax,
                         churn_noise, second_order_steps=0)


@sampler_info(order=2, stochastic=False, plan=_heun_plan)
def heun(denoiser, x, ts, *, extra_args=None, generator=None, callback=None,
         churn: float = 0.0, churn_tmin: float = 0.0, churn_tmax: float = float("inf"), churn_noise: float = 1.0,
         second_order_steps: int | None = None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1/2), with optional stochastic churn.

    The first ``second_order_steps`` steps get the trapezoidal correction (default: all; a
    step landing on t = 0 never does), so a grid ending in 0 with ``n`` steps costs
    ``2n - 1`` denoiser calls.  :func:`sample` sets ``second_order_steps`` to spend an exact NFE.

    Where it holds: the trapezoidal rule in sigma~ over-shoots the exact contraction of a
    step that crosses the data's scale (for Gaussian data of std ``s`` the ODE gives
    ``x~ ~ sqrt(s^2 + sigma~^2)``; a Heun step from sigma~ = s to s/2.9 keeps 0.769 of x~
    where the exact flow keeps 0.748), so at low NFE Heun over-disperses, for every data std:
    std ratio 1.22 at NFE 21, 1.07 at NFE 35, 1.03 at NFE 51 on the default logsnr grid (the
    karras grid is worse at small std: 1.64 at NFE 21, 1.19 at NFE 35 for data std 0.01,
    because its last steps have sigma ratios of 5 to 8).  Churn does not cure it (1.29 at NFE 21
    with ``churn=2.5``, 1.09 at NFE 35, 1.04 at NFE 51).  Use NFE >= 35, or ``dpmpp_2m`` / ``dpmpp_2s``.  Below NFE
    ``HEUN_MIN_NFE`` = 12 Heun is unstable (samples many times too spread, or divergent) and
    a ``UserWarning`` says so."""
    n = len(torch.as_tensor(ts).flatten()) - 1
    k = n if second_order_steps is None else int(second_order_steps)
    ends_at_zero = float(torch.as_tensor(ts).flatten()[-1]) == 0.0
    corrected = min(k, n - 1 if ends_at_zero else n)
    if corrected > 0 and n + corrected < HEUN_MIN_NFE:
        warnings.warn(f"heun with NFE {n + corrected} is unstable (samples can be many times too spread or "
                      f"diverge); use NFE >= {HEUN_MIN_NFE}, or dpmpp_2m at low NFE", UserWarning, stacklevel=2)
    return _euler_family(denoiser, x, ts, extra_args, generator, callback, churn, churn_tmin, churn_tmax,
                         churn_noise, second_order_steps=k)


@sampler_info(order=2, stochastic=False, plan=_heun_plan)
def dpmpp_2s(denoiser, x, ts, *, extra_args=None, generator=None, callback=None,
             churn: float = 0.0, churn_tmin: float = 0.0, churn_tmax: float = float("inf"),
             churn_noise: float = 1.0, second_order_steps: int | None = None):
    """DPM-Solver++(2S) (Lu et al. 2022), the single-step second-order data-prediction solver,
    with optional EDM stochastic churn -- GenCast's sampler (Price et al. 2024: ``churn=2.5``,
    ``churn_noise=1.05``, 20 noise levels).

    Each step from sigma^ (after churn) to sigma_s evaluates the denoiser at x~ and at the
    midpoint ``sqrt(sigma^ sigma_s)`` in log sigma~ (r = 1/2), and takes the exponential-
    integrator step ``x~' = lerp(D_mid, x~, sigma_s / sigma^)``.  Like :func:`heun`, the first
    ``second_order_steps`` steps are second order (default: all but the one onto t = 0), so a
    grid of ``n`` steps ending in 0 costs ``2n - 1`` calls, and :func:`sample` spends an exact
    NFE.

    Where it holds: it under-disperses slightly at low NFE instead of over-dispersing like
    Heun.  On Gaussian data (exact denoiser, default logsnr grid, any data std from 1 to 0.01)
    the std ratio is 0.81 at NFE 11, 0.94 at NFE 21, 0.97 at NFE 31; with GenCast's
    ``churn=2.5, churn_noise=1.05`` it is 0.96 at NFE 21 and 1.00 at NFE 31 (``churn_noise > 1``
    compensates the solver's contraction; ``churn=2.5`` alone gives 0.92 at NFE 21)."""
    churn, churn_tmin, churn_tmax, churn_noise = _churn_args(churn, churn_tmin, churn_tmax, churn_noise)
    g = _Grid(denoiser, ts, x)
    ch = _Churn(g, churn, churn_tmin, churn_tmax, churn_noise)
    k = g.n if second_order_steps is None else int(second_order_steps)
    kw = extra_args or {}
    # midpoints of the second-order steps, from one vectorised schedule evaluation
    steps = [i for i in range(min(k, g.n)) if g.s[i + 1] > 0]
    mid = {}
    if steps:
        sm = torch.tensor([math.sqrt(ch.sig[i] * g.sigma_tilde(i + 1)) for i in steps], dtype=torch.float64)
        t_m, a_m, s_m, l_m = _levels(g.den.schedule, sm)
        for j, i in enumerate(steps):
            mid[i] = (t_m[j].to(g.tb.device).expand(g.tb.shape[1]), a_m[j], s_m[j], l_m[j], float(sm[j]))
    xt = x / g.a[0]
    for i in range(g.n):
        xt, x0 = ch.apply(g, i, xt, generator, kw)
        x0, xt = _promote(x0, xt)
        sig_hat, a_s, sig_s = ch.sig[i], g.a[i + 1], g.sigma_tilde(i + 1)
        if i in mid:
            tb_m, a_m, s_m, l_m, sig_m = mid[i]
            x_mid = torch.lerp(x0, xt, sig_m / sig_hat)
            d = g.call_at(a_m * x_mid, tb_m, a_m, s_m, l_m, kw)
            d, xt = _promote(d, xt)
            x_next = torch.lerp(d, xt, sig_s / sig_hat)
        else:
            x_next = torch.lerp(x0, xt, sig_s / sig_hat)
        xt = x_next
        if callback is not None:
            _report(callback, g, i, a_s * xt, x0)
    return g.a[-1] * xt


def _solve(a: list, b: list) -> list:
    """Solve the small dense system ``a y = b`` (Gaussian elimination with partial pivoting,
    Python floats: UniPC's systems are at most 3 x 3)."""
    n = len(b)
    m = [list(row) + [v] for row, v in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    y = [0.0] * n
    for r in reversed(range(n)):
        y[r] = (m[r][n] - sum(m[r][k] * y[k] for k in range(r + 1, n))) / m[r][r]
    return y


def _unipc_coeffs(h: float, rks: list, variant: str) -> tuple[float, float, list, list]:
    """``(phi1, B, R, b)`` of one UniPC step of half-log-SNR length ``h`` in data prediction.

    ``rks`` are the step-length ratios ``r_k = (lambda_{i-k} - lambda_i) / h`` of the older
    estimates, followed by 1 (the new point).  ``phi1 = expm1(-h)``; ``B`` is the variant's
    ``B(h)`` (``bh1``: ``-h``, ``bh2``: ``expm1(-h)``); ``R[p][k] = r_k^p`` and
    ``b[p] = h phi_{p+2}(-h) (p + 1)! / B(h)``, the Vandermonde system of the paper's
    Theorem 3.1 (``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``, ``phi_1(z) = (e^z - 1) / z``)."""
    hh = -h
    phi1 = math.expm1(hh)
    bh = hh if variant == "bh1" else phi1
    phi = phi1 / hh - 1.0  # h phi_2 scaled: (e^z - 1 - z) / z with z = -h, i.e. z phi_2(z)
    fact, b = 1, []
    for p in range(1, len(rks) + 1):
        b.append(phi * fact / bh)
        fact *= p + 1
        phi = phi / hh - 1.0 / fact
    R = [[r ** p for r in rks] for p in range(len(rks))]
    return phi1, bh, R, b


@sampler_info(order=3, stochastic=False)
def unipc(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, order: int = 2,
          variant: str = "bh2", lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models"): the multistep predictor UniP-``order`` with the corrector
    UniC, in data-prediction (x0) form in the half-log-SNR ``lambda = log(alpha / sigma)``.

    Step ``i`` (``h = lambda_{i+1} - lambda_i``) starts from the denoiser's estimate ``m_i`` at
    ``x_i``:

    - *corrector* (UniC, on every step's result except the last one's): once ``m_i`` is known,
      the step ``i-1 -> i`` is redone from ``x_{i-1}`` with ``m_i`` as one more point of the x0
      polynomial, which raises its order by one at no extra call (``m_i`` is not re-evaluated
      at the corrected point, so NFE = number of steps);
    - *predictor* (UniP): ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi1 m_i
      - alpha_{i+1} B(h) sum_k rho_k D_k`` with ``phi1 = e^{-h} - 1``, the divided differences
      ``D_k = (m_{i-k} - m_i) / r_k`` of the older estimates, ``r_k = (lambda_{i-k} - lambda_i) / h``,
      and ``rho`` from the Vandermonde system of the paper's Theorem 3.1 (``B(h) = e^{-h} - 1``
      for ``variant="bh2"``, ``-h`` for ``"bh1"``; the two-point predictor and the one-point
      corrector take ``rho = 1/2``, as the paper's bh2 does).

    ``order`` (1, 2 or 3) is the predictor's order.  The first steps use the older estimates
    there are, and with ``lower_order_final`` on a grid ending in 0 the last steps drop to
    ... 3, 2, 1 (diffusers' ``lower_order_final``); the final step onto t = 0 returns the x0
    estimate.  With the corrector the global error is of order ``order + 1``: measured on
    Gaussian data (exact denoiser, 64..512 steps uniform in log-SNR from t = 1 to 0.05) 2.0,
    3.0, and 3.8-4.6 for ``order`` 1, 2, 3; the declared order is the default's, 3.

    The default ``order=2`` holds at NFE 10 on the default logsnr grid: on Gaussian data of std
    1/0.1/0.03/0.01 (exact denoiser) the std ratio is 1.058/1.060/1.052/1.019 at NFE 10 and
    1.015/1.015/1.014/1.012 at NFE 20 (cosine, linear and sigmoid schedules alike).  ``order=3``
    is diffusers' ``UniPCMultistepScheduler(solver_order=3)``: 1.002/1.003/1.001/1.008 at NFE 20
    but up to 24 % too spread at NFE 10 (1.033/1.176/1.235/1.158), like ``dpmpp_3m``."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    lam = [_half_logsnr(g, i) if g.s[i] > 0 else math.inf for i in range(g.n + 1)]
    ends_at_zero = g.s[-1] == 0
    ms: list = []  # x0 estimates m_i, m_{i-1}, ... (newest first), at most `order` of them
    ls: list = []  # the half-log-SNR of each estimate in ms
    x_prev, k_prev, i_prev = None, 0, 0
    for i in range(g.n):
        m = g.call(x, i, kw)
        if x_prev is not None and g.s[i + 1] > 0:  # UniC on the step i_prev -> i (useless before the x0 step)
            x = _unipc_step(g, i_prev, i, x_prev, ms, ls, k_prev, variant, m_new=m)
        x_prev = None
        if g.s[i + 1] > 0 and lam[i + 1] == lam[i]:
            # coincident noise levels: the identity, and no duplicate in the history (see _MIN_STEP_RATIO)
            _report(callback, g, i, x, m)
            continue
        ms.insert(0, m)
        ls.insert(0, lam[i])
        del ms[order:], ls[order:]
        if g.s[i + 1] == 0:
            x_next = m
        else:
            h = lam[i + 1] - lam[i]
            k = 1  # the older estimates, down to the first one too close to its successor
            while k < min(order, len(ms)) and ls[k - 1] - ls[k] >= _MIN_STEP_RATIO * h:
                k += 1
            if lower_order_final and ends_at_zero:
                k = min(k, g.n - i)
            x_next = _unipc_step(g, i, i + 1, x, ms, ls, k, variant)
            x_prev, k_prev, i_prev = x, k, i
        x = x_next
        _report(callback, g, i, x, m)
    return x


def _unipc_step(g: _Grid, i: int, j: int, x, ms: list, ls: list, k: int, variant: str, m_new=None):
    """One UniPC step from grid point ``i`` (state ``x``, estimates ``ms = [m_i, m_{i-1}, ...]``
    at half-log-SNRs ``ls``) to grid point ``j`` with ``k`` points: the predictor UniP-k, or with
    ``m_new`` (the estimate at the predicted point) the corrector UniC-k."""
    lam_j = _half_logsnr(g, j)
    h = lam_j - ls[0]
    m0 = ms[0]
    rks = [(ls[q] - ls[0]) / h for q in range(1, k)]
    a_s = g.a[j]
    phi1, bh, R, b = _unipc_coeffs(h, rks + [1.0], variant)
    out = (g.s[j] / g.s[i]) * x - (a_s * phi1) * m0
    if m_new is None:  # predictor: the older estimates only
        if k == 1:
            return out
        rhos = [0.5] if k == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    else:  # corrector: the older estimates and the new one
        rhos = [0.5] if k == 1 else _solve(R, b)
    corr = 0
    for j in range(1, k):
        corr = corr + (rhos[j - 1] / rks[j - 1]) * (ms[j] - m0)
    if m_new is not None:
        corr = corr + rhos[-1] * (m_new - m0)
    return out - (a_s * bh) * corr


BUILTIN_SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "dpmpp_2s": dpmpp_2s, "dpmpp_3m": dpmpp_3m,
                    "euler": euler, "heun": heun, "unipc": unipc}


# -- time grids ----------------------------------------------------------------------------
def timesteps(schedule, n: int, spacing: str = "uniform", *, t_max: float = 1.0,
              sigma_min: float | None = None, sigma_max: float | None = SIGMA_MAX,
              rho: float = 7.0) -> torch.Tensor:
    """A decreasing grid of ``n + 1`` times ending in ``0``.

    - ``uniform``: equal steps in t from ``t_max`` (DDIM's "trailing" spacing);
    - ``quadratic``: ``t = t_max (i/n)^2`` (Song et al. 2021a);
    - ``karras``: ``sigma~^(1/rho)`` uniform from ``sigma_max`` to ``sigma_min``
      (Karras et al. 2022), then 0;
    - ``logsnr``: uniform in log-SNR from ``sigma_max`` to ``sigma_min`` (Lu et al. 2022), then 0.

    Noise levels are in Karras et al.'s units, sigma~ = sigma/alpha.  The noise-level spacings
    start at ``min(t_max, t(sigma_max))``: schedules whose sigma~ at t = 1 is far above EDM's
    80 (cosine: ~1800) otherwise spend their first steps where nothing happens, which makes
    Heun unstable at low NFE.  The prior N(0, I) differs from the true marginal at sigma~ = 80
    by ``alpha ~ 0.0125`` times the data.  ``sigma_max=None`` starts at ``t_max``.

    ``sigma_min`` defaults to ``SIGMA_MIN = 1e-3`` for every schedule, discrete ones included.
    The last denoiser call is made there, and data spread finer than ``sigma_min`` is lost
    (Gaussian data of std ``s`` keep ``s / sqrt(s^2 + sigma_min^2)`` of it).  Earlier versions
    clamped ``sigma_min`` to the first training step ``t = 1/T`` of a discrete schedule
    (sigma~ ~ 0.01 for DDPM's linear T = 1000), which kept only 71 % of a 0.01 spread.  Calling
    an eps- or v-network slightly below its smallest training noise level is benign: its x0
    estimate is ``(x - sigma eps_hat) / alpha`` or ``alpha x - sigma v_hat``, so whatever the
    network outputs at the unseen noise level enters x0 multiplied by ``sigma <= 0.01``, and its
    input there is as close to clean data as at the smallest trained level (the log-SNR it is
    conditioned on, 13.8 at 1e-3 against 9.2 at ``t = 1/T``, is within ``Denoiser.logsnr_clip``).
    An x0-network has no such damping; pass ``sigma_min`` explicitly if yours extrapolates badly.
    Grids are cached: repeated calls cost nothing.
    """
    return _timesteps(schedule, n, spacing, float(t_max), sigma_min, sigma_max, float(rho)).clone()


@functools.lru_cache(maxsize=128)
def _timesteps(schedule, n, spacing, t_max, sigma_min, sigma_max, rho) -> torch.Tensor:
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"number of steps must be an integer >= 1, got {n!r}; NFE must be >= 1")
    if not 0 < t_max <= 1:
        raise ValueError(f"t_max must lie in (0, 1], got {t_max}")
    dt = torch.float64
    if spacing == "uniform":
        return torch.linspace(t_max, 0.0, n + 1, dtype=dt)
    if spacing == "quadratic":
        return t_max * torch.linspace(1.0, 0.0, n + 1, dtype=dt) ** 2
    if spacing not in SPACINGS:
        raise ValueError(f"unknown spacing {spacing!r}; choose one of {', '.join(SPACINGS)}")
    if sigma_min is None:
        sigma_min = SIGMA_MIN
    if not (sigma_min > 0 and math.isfinite(sigma_min)):
        raise ValueError(f"sigma_min must be a finite number > 0, got {sigma_min!r}")
    if sigma_max is not None:
        t_max = min(t_max, float(schedule.t_from_logsnr(torch.tensor(-2.0 * math.log(sigma_max), dtype=dt))))
    l_hi = float(schedule.logsnr(torch.tensor(t_max, dtype=dt)))
    l_lo_cap = -2.0 * math.log(sigma_min)
    if n == 1:
        return torch.tensor([t_max, 0.0], dtype=dt)
    s_max, s_min = math.exp(-0.5 * l_hi), sigma_min
    if s_min >= s_max:
        raise ValueError(f"sigma_min {s_min} is not below sigma~ at t_max ({s_max})")
    if spacing == "karras":
        r = torch.linspace(0, 1, n, dtype=dt)
        sig = (s_max ** (1 / rho) + r * (s_min ** (1 / rho) - s_max ** (1 / rho))) ** rho
        lsnr = -2.0 * sig.log()
    else:
        lsnr = torch.linspace(l_hi, l_lo_cap, n, dtype=dt)
    t = schedule.t_from_logsnr(lsnr)
    t[0] = t_max
    t = torch.cummin(t, 0).values  # guard bisection round-off
    return torch.cat([t, torch.zeros(1, dtype=dt)])


# -- high-level entry point ------------------------------------------------------------------
def get_sampler(name_or_fn):
    if callable(name_or_fn):
        return name_or_fn
    from . import registry

    return registry.get("sampler", name_or_fn)


#: the defaults of :func:`sample` and of the ``[sample]`` config section (measured; see the module docstring)
DEFAULT_SAMPLER, DEFAULT_NFE = "dpmpp_2m", 20


def sample(denoiser, shape, *, sampler=DEFAULT_SAMPLER, nfe: int = DEFAULT_NFE, spacing: str | None = None,
           generator: torch.Generator | None = None, device=None, dtype=torch.float32,
           x_init: torch.Tensor | None = None, extra_args: dict | None = None,
           progress: bool = False, callback=None, t_max: float = 1.0, sigma_min: float | None = None,
           sigma_max: float | None = SIGMA_MAX, **options) -> torch.Tensor:
    """Draw samples of ``shape = (B, C, *spatial)`` with exactly ``nfe`` denoiser calls.

    ``sampler`` is a registered name or a sampler function; ``spacing`` defaults to the
    schedule's ``sample_spacing`` if it sets one (the ``refiner`` schedule: ``uniform``, its own
    levels), else to the sampler's own (``sampler.info.default_spacing``: ``logsnr`` for every
    built-in one);
    ``t_max``, ``sigma_min`` and ``sigma_max`` go to :func:`timesteps`.  The defaults,
    DPM-Solver++(2M) with 20 calls on the logsnr grid from sigma~ = 80 to 1e-3, reproduce the
    std of Gaussian data of std 1 to 0.01 within 2 % (exact denoiser; module docstring).  ``x_init`` (default: standard normal noise) is
    the state at the grid's first time.  ``progress=True`` shows a tqdm bar; other keyword
    arguments are the sampler's options (e.g. ``eta``, ``churn``).
    """
    fn = get_sampler(sampler)
    info: SamplerInfo | None = getattr(fn, "info", None)
    if info is None:
        raise TypeError(f"sampler {fn!r} lacks .info; decorate it with diffkit.samplers.sampler_info")
    if not isinstance(nfe, int) or isinstance(nfe, bool) or not 1 <= nfe <= MAX_NFE:
        raise ValueError(f"nfe must be an integer in 1..{MAX_NFE} (the number of denoiser calls), got {nfe!r}")
    n, plan_opts = info.plan(nfe)
    spacing = spacing or getattr(denoiser.schedule, "sample_spacing", None) or info.default_spacing
    ts = timesteps(denoiser.schedule, n, spacing, t_max=t_max, sigma_min=sigma_min, sigma_max=sigma_max)
    if x_init is None:
        x_init = torch.randn(tuple(shape), generator=generator, device=device, dtype=dtype)
    else:
        check_finite(x_init, "x_init")
    cbs = [c for c in (callback,) if c is not None]
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=n, desc=f"sampling ({getattr(fn, '__name__', 'sampler')}, NFE {nfe})", leave=False)
        cbs.append(lambda info_: bar.update(1))
    cb = (lambda d: [c(d) for c in cbs]) if cbs else None
    try:
        with torch.no_grad():
            return fn(denoiser, x_init, ts, extra_args=extra_args, generator=generator, callback=cb,
                      **{**plan_opts, **options})
    finally:
        if bar is not None:
            bar.close()
