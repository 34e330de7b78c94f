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

import math
from dataclasses import dataclass
from typing import Callable

import torch

from ._shape import bcast, check_finite
from .process import posterior_coeffs

#: sigma~ = sigma/alpha at which spacings that need a lower end (karras, logsnr) stop by default
SIGMA_MIN = 0.002


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
def _bt(t: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Per-sample time tensor ``(B,)`` (float64) from a 0-d grid entry."""
    return t.to(device=x.device, dtype=torch.float64).expand(x.shape[0])


def _coeffs(schedule, t: torch.Tensor) -> tuple[float, float]:
    """``(alpha, sigma)`` at a grid time, as Python floats; ``(1, 0)`` at ``t = 0``."""
    if float(t) == 0.0:
        return 1.0, 0.0
    a, s = schedule.coeffs(t)
    return float(a), float(s)


def _check_grid(ts: torch.Tensor) -> torch.Tensor:
    ts = torch.as_tensor(ts, dtype=torch.float64).flatten().cpu()
    if ts.numel() < 2:
        raise ValueError("the time grid needs at least 2 points (one step); NFE must be >= 1")
    if bool((ts[1:] >= ts[:-1]).any()):
        raise ValueError("the time grid must be strictly decreasing")
    if float(ts[0]) > 1 or float(ts[-1]) < 0:
        raise ValueError(f"time grid values must lie in [0, 1], got {float(ts[0])} .. {float(ts[-1])}")
    return ts


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _call(denoiser, x, t, extra_args):
    return denoiser(x, _bt(t, x), **(extra_args or {}))


def _report(callback, i, n, t, t_next, x, x0):
    if callback is not None:
        callback({"i": i, "n": n, "t": float(t), "t_next": float(t_next), "x": x, "x0": x0})


# -- samplers ------------------------------------------------------------------------------
@sampler_info(order=1, stochastic=True, default_spacing="uniform")
def ddpm(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, variance: str = "small"):
    """Ancestral DDPM (Ho et al. 2020): draw from q(x_s | x_t, x0_hat) at every step.

    ``variance="small"`` uses the posterior variance (beta tilde), ``"large"`` the forward
    step variance (beta); both are Ho et al.'s choices.  No noise is added on the last step.
    """
    if variance not in ("small", "large"):
        raise ValueError(f"variance must be 'small' or 'large', got {variance!r}")
    ts = _check_grid(ts)
    sched, n = denoiser.schedule, len(ts) - 1
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        x0 = _call(denoiser, x, t, extra_args)
        c_x0, c_xt, var = posterior_coeffs(sched, s, t)
        if variance == "large":
            var = 1.0 - sched.transition(s, t)[0] ** 2
        x = float(c_x0) * x0 + float(c_xt) * x
        if i < n - 1:
            x = x + math.sqrt(float(var)) * _noise(x, generator)
        _report(callback, i, n, t, s, x, x0)
    return x


@sampler_info(order=1, stochastic=False, default_spacing="uniform")  # stochastic only with eta > 0
def ddim(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, eta: float = 0.0):
    """DDIM (Song et al. 2021a).  ``eta = 0`` is deterministic (the probability-flow ODE's
    exponential-Euler step); ``eta = 1`` has the ancestral DDPM marginals."""
    ts = _check_grid(ts)
    sched, n = denoiser.schedule, len(ts) - 1
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        x0 = _call(denoiser, x, t, extra_args)
        a_t, s_t = _coeffs(sched, t)
        a_s, s_s = _coeffs(sched, s)
        eps = (x - a_t * x0) / s_t
        c = 0.0
        if eta > 0 and s_s > 0:
            c = eta * math.sqrt((s_s**2 / s_t**2) * (1 - (a_t / a_s) ** 2))
        x = a_s * x0 + math.sqrt(max(s_s**2 - c**2, 0.0)) * eps
        if c > 0:
            x = x + c * _noise(x, generator)
        _report(callback, i, n, t, s, x, x0)
    return x


@sampler_info(order=2, stochastic=False, default_spacing="logsnr")
def dpmpp_2m(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver.

    The last step onto t = 0 is first order (it returns the x0 estimate)."""
    ts = _check_grid(ts)
    sched, n = denoiser.schedule, len(ts) - 1
    x0_prev, h_prev = None, None
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        x0 = _call(denoiser, x, t, extra_args)
        a_t, s_t = _coeffs(sched, t)
        a_s, s_s = _coeffs(sched, s)
        if s_s == 0:
            x = x0
        else:
            lam_t, lam_s = math.log(a_t / s_t), math.log(a_s / s_s)
            h = lam_s - lam_t
            d = x0
            if x0_prev is not None:
                r = h_prev / h
                d = (1 + 1 / (2 * r)) * x0 - (1 / (2 * r)) * x0_prev
            x = (s_s / s_t) * x - a_s * math.expm1(-h) * d
            h_prev = h
        x0_prev = x0
        _report(callback, i, n, t, s, x, x0)
    return x


def _sigma_tilde(sched, t) -> float:
    a, s = _coeffs(sched, t)
    return s / a


def _churn(sched, x, t, sigma_t, n, churn, churn_tmin, churn_tmax, churn_noise, generator):
    """EDM stochastic churn (Karras et al. 2022, Alg. 2): raise the noise level of ``x~``
    from sigma~ to sigma^ = sigma~ (1 + gamma) by adding fresh noise.  Returns ``(x~, t^, sigma^)``."""
    if churn <= 0 or not (churn_tmin <= sigma_t <= churn_tmax):
        return x, t, sigma_t
    gamma = min(churn / n, math.sqrt(2.0) - 1.0)
    sigma_max = _sigma_tilde(sched, torch.tensor(1.0, dtype=torch.float64))
    sigma_hat = min(sigma_t * (1 + gamma), sigma_max)
    if sigma_hat <= sigma_t:
        return x, t, sigma_t
    x = x + math.sqrt(sigma_hat**2 - sigma_t**2) * churn_noise * _noise(x, generator)
    t_hat = sched.t_from_logsnr(torch.tensor(-2.0 * math.log(sigma_hat), dtype=torch.float64))
    t_hat = torch.maximum(t_hat, t)  # bisection round-off must not move t below the grid point
    return x, t_hat, _sigma_tilde(sched, t_hat)


def _heun_plan(nfe: int) -> tuple[int, dict]:
    n = math.ceil((nfe + 1) / 2)
    return n, {"second_order_steps": nfe - n}


def _euler_family(denoiser, x, ts, extra_args, generator, callback, churn, churn_tmin, churn_tmax,
                  churn_noise, second_order_steps):
    ts = _check_grid(ts)
    sched, n = denoiser.schedule, len(ts) - 1
    a0, _ = _coeffs(sched, ts[0])
    xt = x / a0  # x~ = x / alpha
    for i in range(n):
        t, s = ts[i], ts[i + 1]
        sig_t = _sigma_tilde(sched, t)
        xt, t_hat, sig_hat = _churn(sched, xt, t, sig_t, n, churn, churn_tmin, churn_tmax, churn_noise, generator)
        a_hat, _ = _coeffs(sched, t_hat)
        x0 = _call(denoiser, a_hat * xt, t_hat, extra_args)
        a_s, s_s = _coeffs(sched, s)
        sig_s = s_s / a_s
        d = (xt - x0) / sig_hat
        x_next = xt + (sig_s - sig_hat) * d
        if sig_s > 0 and i < second_order_steps:
            x0_2 = _call(denoiser, a_s * x_next, s, extra_args)
            d2 = (x_next - x0_2) / sig_s
            x_next = xt + (sig_s - sig_hat) * 0.5 * (d + d2)
        xt = x_next
        _report(callback, i, n, t, s, a_s * xt, x0)
    a_end, _ = _coeffs(sched, ts[-1])
    return a_end * xt


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


BUILTIN_SAMPLERS = {"ddpm": ddpm, "ddim": ddim, "dpmpp_2m": dpmpp_2m, "euler": euler, "heun": heun}


# -- time grids ----------------------------------------------------------------------------
SPACINGS = ("uniform", "quadratic", "karras", "logsnr")


def timesteps(schedule, n: int, spacing: str = "uniform", *, t_max: float = 1.0,
              sigma_min: float | None = None, rho: float = 7.0) -> torch.Tensor:
    """A decreasing grid of ``n + 1`` times from ``t_max`` to ``0``.

    - ``uniform``: equal steps in t (DDIM's "trailing" spacing);
    - ``quadratic``: ``t = t_max (i/n)^2`` (Song et al. 2021a);
    - ``karras``: ``sigma~^(1/rho)`` uniform from sigma~(t_max) to ``sigma_min``
      (Karras et al. 2022), then 0;
    - ``logsnr``: uniform in log-SNR from t_max to ``sigma_min`` (Lu et al. 2022), then 0.

    ``sigma_min`` (in sigma~ = sigma/alpha units) defaults to 0.002, or to the first
    training step ``t = 1/T`` of a discrete schedule if that is noisier.
    """
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
           progress: bool = False, callback=None, t_max: float = 1.0, **options) -> torch.Tensor:
    """Draw samples of ``shape = (B, C, *spatial)`` with exactly ``nfe`` denoiser calls.

    ``sampler`` is a registered name or a sampler function; ``spacing`` defaults to the
    sampler's own (``sampler.info.default_spacing``).  ``progress=True`` shows a tqdm bar.
    """
    fn = get_sampler(sampler)
    info: SamplerInfo | None = getattr(fn, "info", None)
    if info is None:
        raise TypeError(f"sampler {fn!r} lacks .info; decorate it with diffkit.samplers.sampler_info")
    if not isinstance(nfe, int) or nfe < 1:
        raise ValueError(f"nfe must be an integer >= 1, got {nfe!r}")
    n, plan_opts = info.plan(nfe)
    ts = timesteps(denoiser.schedule, n, spacing or info.default_spacing, t_max=t_max)
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
