"""Time grids: the spacings of :func:`timesteps`, what a sampler declares about its grid
(:func:`sampler_info`), and the per-call coefficient table every sampler steps through.

A grid is a decreasing 1-D tensor of times in ``[0, 1]`` ending in ``0`` (the data).  The noise-level
spacings (``karras``, ``logsnr``) run from ``sigma~ = SIGMA_MAX`` down to ``SIGMA_MIN`` in Karras et
al.'s units ``sigma~ = sigma / alpha``; :mod:`diffkit.samplers` explains why (its module docstring).
The samplers (:mod:`diffkit.samplers`, :mod:`diffkit.multistep`) import everything here; users
reach it as ``diffkit.samplers.timesteps`` / ``diffkit.timesteps`` as before.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch

from .constants import SPACINGS

__all__ = ["SIGMA_MAX", "SIGMA_MIN", "SPACINGS", "SamplerInfo", "sampler_info", "timesteps"]

#: sigma~ = sigma/alpha at which the noise-level spacings (karras, logsnr) stop and start by
#: default.  SIGMA_MAX is Karras et al.'s (2022) 80; SIGMA_MIN is half of their 0.002, chosen by
#: measurement so that data with a conditional spread of 0.01 keep 99.5 % of it (see the module
#: docstring and :func:`timesteps`).
SIGMA_MIN = 1e-3
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


def sampler_info(*, order: int, stochastic: bool, default_spacing: str = "logsnr",
                 plan: Callable[[int], tuple[int, dict]] = _one_per_step):
    """Decorator declaring a sampler's order, stochasticity, default spacing and NFE plan."""

    def deco(fn):
        fn.info = SamplerInfo(order, stochastic, default_spacing, plan)
        return fn

    return deco


# -- the per-call grid -------------------------------------------------------------------------------
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


def _coef(rows: list, x: torch.Tensor, capturable: bool) -> list:
    """A sampler's per-step coefficients, computed before its loop: ``rows[i]`` is the tuple of step ``i``.

    By default they stay Python floats (on CPU a multiply by a Python float is the cheapest kernel).
    Neither reads a value back from the device inside the loop (the floats come from the schedule, on
    the host, before it), so both loops can be captured whole as a CUDA graph.  ``capturable=True`` makes
    them one float64 tensor on ``x``'s device, copied there once, and hands each step its row as 0-d
    tensors, which the kernels read from device memory instead of taking as constants.  The arithmetic
    is the same: a 0-d float64 operand is cast to ``x``'s dtype as a Python float is (bit for bit on CPU
    for the plain products; the Euler family's ``alpha=`` additions become a multiply and an add)."""
    if not capturable:
        return rows
    if not rows:
        return rows
    table = torch.tensor(rows, dtype=torch.float64).to(x.device)
    return [tuple(r.unbind(0)) for r in table]


def _noise(x, generator):
    return torch.randn(x.shape, generator=generator, device=x.device, dtype=x.dtype)


def _report(callback, g: _Grid, i, x, x0):
    if callback is not None:
        callback({"i": i, "n": g.n, "t": g.t[i], "t_next": g.t[i + 1], "x": x, "x0": x0})



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
