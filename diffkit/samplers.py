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

The deterministic samplers integrate the probability-flow ODE.  Euler and Heun work in the
variance-exploding variables of Karras et al. (2022), ``x~ = x / alpha`` and
``sigma~ = sigma / alpha``, where the ODE is ``dx~/dsigma~ = (x~ - D) / sigma~``.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from ._shape import check_finite

#: sigma~ = sigma/alpha at which the noise-level spacings (karras, logsnr) stop and start by
#: default (Karras et al. 2022)
SIGMA_MIN = 0.002
SIGMA_MAX = 80.0


@dataclass(frozen=True)
class SamplerInfo:
    order: int
    stochastic: bool
    default_spacing: str
    plan: Callable[[int], tuple[int, dict]]
    """``plan(nfe) -> (n_steps, options)`` spending exactly ``nfe`` denoiser calls."""


def _one_per_step(nfe: int) -> tuple[int, dict]:
    return nfe, {}


def sampler_info(*, order: int, stochastic: bool, default_spacing: str = "uniform",
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
    only tensor work per step is on ``x``).  ``tb[i]`` is the per-sample time tensor that the
    denoiser receives.
    """

    __slots__ = ("t", "a", "s", "tb", "n")

    def __init__(self, schedule, ts, x: torch.Tensor):
        ts = torch.as_tensor(ts, dtype=torch.float64).flatten().cpu()
        self.t = ts.tolist()
        self.a, self.s = _grid_coeffs(schedule, tuple(self.t))
        self.n = len(self.t) - 1
        self.tb = ts.to(x.device)[:, None].expand(-1, x.shape[0])

    def sigma_tilde(self, i: int) -> float:
        """Karras et al.'s noise level ``sigma / alpha`` at grid point ``i``."""
        return self.s[i] / self.a[i]


@functools.lru_cache(maxsize=128)
def _grid_coeffs(schedule, t: tuple) -> tuple[list, list]:
    """Check a grid and return its ``(alpha, sigma)`` lists; cached, since grids are reused."""
    if len(t) < 2:
        raise ValueError("the time grid needs at least 2 points (one step); NFE must be >= 1")
    if any(b >= a for a, b in zip(t, t[1:])):
        raise ValueError("the time grid must be strictly decreasing")
    if t[0] > 1 or t[-1] < 0:
        raise ValueError(f"time grid values must lie in [0, 1], got {t[0]} .. {t[-1]}")
    a, s = schedule.coeffs(torch.tensor(t, dtype=torch.float64))  # (1, 0) exactly at t = 0
    return a.tolist(), s.tolist()


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _report(callback, g: _Grid, i, x, x0):
    if callback is not None:
        callback({"i": i, "n": g.n, "t": g.t[i], "t_next": g.t[i + 1], "x": x, "x0": x0})


# -- samplers ------------------------------------------------------------------------------
@sampler_info(order=1, stochastic=True, default_spacing="uniform")
def ddpm(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, variance: str = "small"):
    """Ancestral DDPM (Ho et al. 2020): draw from q(x_s | x_t, x0_hat) at every step.

    ``variance="small"`` uses the posterior variance (beta tilde), ``"large"`` the forward
    step variance (beta); both are Ho et al.'s choices.  No noise is added on the last step.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    g = _Grid(denoiser.schedule, ts, x)
    kw = extra_args or {}
    for i in range(g.n):
        x0 = denoiser(x, g.tb[i], **kw)
        a_t, s_t, a_s, s_s = g.a[i], g.s[i], g.a[i + 1], g.s[i + 1]
        lam = a_t / a_s  # AR(1) coefficient of q(x_t | x_s); posterior as in process.posterior_coeffs
        sig2 = max(1.0 - lam * lam, 0.0)
        x = (a_s * sig2 / s_t**2) * x0 + (lam * s_s**2 / s_t**2) * x
        if i < g.n - 1:
            var = sig2 * s_s**2 / s_t**2 if variance == "small" else sig2
            x = x + math.sqrt(var) * _noise(x, generator)
        _report(callback, g, i, x, x0)
    return x


@sampler_info(order=1, stochastic=False, default_spacing="uniform")  # stochastic only with eta > 0
def ddim(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021a).  ``eta = 0`` is deterministic (the probability-flow ODE's
    exponential-Euler step); ``eta = 1`` has the ancestral DDPM marginals."""
    g = _Grid(denoiser.schedule, ts, x)
    kw = extra_args or {}
    for i in range(g.n):
        x0 = denoiser(x, g.tb[i], **kw)
        a_t, s_t, a_s, s_s = g.a[i], g.s[i], g.a[i + 1], g.s[i + 1]
        c = 0.0
        if eta > 0 and s_s > 0:
            c = eta * math.sqrt((s_s**2 / s_t**2) * (1 - (a_t / a_s) ** 2))
        k = math.sqrt(max(s_s**2 - c**2, 0.0)) / s_t  # x_s = a_s x0 + k (x - a_t x0) [+ c z]
        x = torch.add(x0, x - a_t * x0, alpha=k / a_s).mul_(a_s) if k else a_s * x0
        if c > 0:
            x = x + c * _noise(x, generator)
        _report(callback, g, i, x, x0)
    return x


def _half_logsnr(g: _Grid, i: int) -> float:
    return math.log(g.a[i] / g.s[i])


@sampler_info(order=2, stochastic=False, default_spacing="uniform")
def dpmpp_2m(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver.

    The last step onto t = 0 is first order (it returns the x0 estimate)."""
    g = _Grid(denoiser.schedule, ts, x)
    kw = extra_args or {}
    x0_prev, h_prev = None, None
    for i in range(g.n):
        x0 = denoiser(x, g.tb[i], **kw)
        if g.s[i + 1] == 0:
            x = x0
        else:
            h = _half_logsnr(g, i + 1) - _half_logsnr(g, i)
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (g.s[i + 1] / g.s[i]) * x - (g.a[i + 1] * math.expm1(-h)) * d
            h_prev = h
        x0_prev = x0
        _report(callback, g, i, x, x0)
    return x


@sampler_info(order=3, stochastic=False, default_spacing="uniform")
def dpmpp_3m(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
    """DPM-Solver++(3M) (Lu et al. 2022), multistep third order in log-SNR.

    The data-prediction ODE solution is expanded to second order in the half-log-SNR step h
    with divided differences of the last three x0 estimates (phi_2, phi_3 of the exponential
    integrator).  Lower order on the first steps, order <= 2 on the step before the final
    one, and the final step onto t = 0 returns the x0 estimate."""
    g = _Grid(denoiser.schedule, ts, x)
    kw = extra_args or {}
    x0_1 = x0_2 = h_1 = h_2 = None
    for i in range(g.n):
        x0 = denoiser(x, g.tb[i], **kw)
        if g.s[i + 1] == 0:
            x = x0
        else:
            h = _half_logsnr(g, i + 1) - _half_logsnr(g, i)
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


def _churn(sched, g: _Grid, i, xt, n, churn, churn_tmin, churn_tmax, churn_noise, generator):
    """EDM stochastic churn (Karras et al. 2022, Alg. 2): raise the noise level of ``x~``
    from sigma~ to sigma^ = sigma~ (1 + gamma) by adding fresh noise.

    Returns ``(x~, t^ tensor, alpha^, sigma^)``."""
    sig = g.sigma_tilde(i)
    if churn <= 0 or not (churn_tmin <= sig <= churn_tmax):
        return xt, g.tb[i], g.a[i], sig
    gamma = min(churn / n, math.sqrt(2.0) - 1.0)
    a1, s1 = sched.coeffs(torch.tensor(1.0, dtype=torch.float64))
    sig_hat = min(sig * (1 + gamma), float(s1 / a1))
    if sig_hat <= sig:
        return xt, g.tb[i], g.a[i], sig
    xt = xt + (math.sqrt(sig_hat**2 - sig**2) * churn_noise) * _noise(xt, generator)
    t_hat = sched.t_from_logsnr(torch.tensor(-2.0 * math.log(sig_hat), dtype=torch.float64))
    t_hat = torch.clamp(t_hat, min=g.t[i], max=1.0)  # round-off must not move t below the grid point
    a_hat, s_hat = (float(v) for v in sched.coeffs(t_hat))
    return xt, t_hat.to(xt.device).expand(xt.shape[0]), a_hat, s_hat / a_hat


def _heun_plan(nfe: int) -> tuple[int, dict]:
    n = math.ceil((nfe + 1) / 2)
    return n, {"second_order_steps": nfe - n}


def _euler_family(denoiser, x, ts, extra_args, generator, callback, churn, churn_tmin, churn_tmax,
                  churn_noise, second_order_steps):
    sched = denoiser.schedule
    g = _Grid(sched, ts, x)
    kw = extra_args or {}
    xt = x / g.a[0]  # x~ = x / alpha
    for i in range(g.n):
        xt, tb_hat, a_hat, sig_hat = _churn(sched, g, i, xt, g.n, churn, churn_tmin, churn_tmax, churn_noise,
                                            generator)
        x0 = denoiser(a_hat * xt, tb_hat, **kw)
        a_s, sig_s = g.a[i + 1], g.sigma_tilde(i + 1)
        # Euler: x~' = x~ + (sig_s - sig) (x~ - x0) / sig = lerp(x0, x~, sig_s / sig)
        if x0.dtype != xt.dtype:  # follow type promotion, as the other samplers' arithmetic does
            dt = torch.promote_types(x0.dtype, xt.dtype)
            x0, xt = x0.to(dt), xt.to(dt)
        x_next = torch.lerp(x0, xt, sig_s / sig_hat)
        if sig_s > 0 and i < second_order_steps:
            x0_2 = denoiser(a_s * x_next, g.tb[i + 1], **kw)
            # Heun: x~ + (sig_s - sig)/2 (d + d'), d = (x~ - x0)/sig, d' = (x~' - x0')/sig_s
            half = 0.5 * (sig_s - sig_hat)
            x_next = torch.add(xt, xt - x0, alpha=half / sig_hat).add_(x_next - x0_2, alpha=half / sig_s)
        xt = x_next
        if callback is not None:
            _report(callback, g, i, a_s * xt, x0)
    return g.a[-1] * xt


@sampler_info(order=1, stochastic=False, default_spacing="karras")
def euler(denoiser, x, ts, *, extra_args=None, generator=None, callback=None,
          churn: float = 0.0, churn_tmin: float = 0.0, churn_tmax: float = float("inf"), churn_noise: float = 1.0):
    """Euler on the probability-flow ODE in Karras et al.'s variables, with optional EDM
    stochastic churn (``churn > 0``, applied where ``churn_tmin <= sigma~ <= churn_tmax``)."""
    return _euler_family(denoiser, x, ts, extra_args, generator, callback, churn, churn_tmin, churn_tmax,
                         churn_noise, second_order_steps=0)


@sampler_info(order=2, stochastic=False, default_spacing="karras", plan=_heun_plan)
def heun(denoiser, x, ts, *, extra_args=None, generator=None, callback=None,
         churn: float = 0.0, churn_tmin: float = 0.0, churn_tmax: float = float("inf"), churn_noise: float = 1.0,
         second_order_steps: int | None = None):
    """Heun's second-order method (Karras et al. 2022, Alg. 1/2), with optional stochastic churn.

    The first ``second_order_steps`` steps get the trapezoidal correction (default: all; a
    step landing on t = 0 never does), so a grid ending in 0 with ``n`` steps costs
    ``2n - 1`` denoiser calls.  :func:`sample` sets ``second_order_steps`` to spend an exact NFE."""
    n = len(torch.as_tensor(ts).flatten()) - 1
    k = n if second_order_steps is None else int(second_order_steps)
    return _euler_family(denoiser, x, ts, extra_args, generator, callback, churn, churn_tmin, churn_tmax,
                         churn_noise, second_order_steps=k)


BUILTIN_SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "dpmpp_3m": dpmpp_3m,
                    "euler": euler, "heun": heun}


# -- time grids ----------------------------------------------------------------------------
SPACINGS = ("uniform", "quadratic", "karras", "logsnr")


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
    ``sigma_min`` defaults to 0.002, or to the first training step ``t = 1/T`` of a discrete
    schedule if that is noisier.  Grids are cached: repeated calls cost nothing.
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
        if schedule.T:
            a, s = schedule.coeffs(torch.tensor(1.0 / schedule.T, dtype=dt))
            sigma_min = max(sigma_min, float(s / a))
    if sigma_max is not None:
        t_max = min(t_max, float(schedule.t_from_logsnr(torch.tensor(-2.0 * math.log(sigma_max), dtype=dt))))
    l_hi = float(schedule.logsnr(torch.tensor(t_max, dtype=dt)))
    l_lo_cap = -2.0 * math.log(sigma_min)
    if n == 1:
        return torch.tensor([t_max, 0.0], dtype=dt)
    if spacing == "karras":
        s_max, s_min = math.exp(-0.5 * l_hi), sigma_min
        if s_min >= s_max:
            raise ValueError(f"sigma_min {s_min} is not below sigma~ at t_max ({s_max})")
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


def sample(denoiser, shape, *, sampler="dpmpp_2m", nfe: int = 20, spacing: str | None = None,
           generator: torch.Generator | None = None, device=None, dtype=torch.float32,
           x_init: torch.Tensor | None = None, extra_args: dict | None = None,
           progress: bool = False, callback=None, t_max: float = 1.0, sigma_min: float | None = None,
           sigma_max: float | None = SIGMA_MAX, **options) -> torch.Tensor:
    """Draw samples of ``shape = (B, C, *spatial)`` with exactly ``nfe`` denoiser calls.

    ``sampler`` is a registered name or a sampler function; ``spacing`` defaults to the
    sampler's own (``sampler.info.default_spacing``); ``t_max``, ``sigma_min`` and
    ``sigma_max`` go to :func:`timesteps`.  ``x_init`` (default: standard normal noise) is
    the state at the grid's first time.  ``progress=True`` shows a tqdm bar; other keyword
    arguments are the sampler's options (e.g. ``eta``, ``churn``).
    """
    fn = get_sampler(sampler)
    info: SamplerInfo | None = getattr(fn, "info", None)
    if info is None:
        raise TypeError(f"sampler {fn!r} lacks .info; decorate it with diffkit.samplers.sampler_info")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    n, plan_opts = info.plan(nfe)
    ts = timesteps(denoiser.schedule, n, spacing or info.default_spacing, t_max=t_max, sigma_min=sigma_min,
                   sigma_max=sigma_max)
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
