"""Noise schedules of the VP corruption process (Turner et al. 2024, steps 1 and 6).

The forward process is the Gaussian AR(1) chain ``x_t = lambda_t x_{t-1} + sigma_t eps`` with
``lambda_t^2 + sigma_t^2 = 1``.  Its marginals are ``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)``
with ``alpha_t^2 = alpha_bar_t = prod lambda^2`` and ``sigma_t^2 = 1 - alpha_bar_t``.

Time is continuous, ``t`` in ``[0, 1]``, and ``t = 0`` *is* the data (``alpha_bar(0) = 1``).
A discrete T-step schedule is the same object evaluated on the grid ``t = n / T``; between
grid points ``log alpha_bar`` is interpolated linearly, so discrete schedules can be used
with any sampler spacing.  A schedule only has to define :meth:`Schedule.log_alpha_bar`.

Naming: ``alpha`` here is the *cumulative* signal scale ``sqrt(alpha_bar)`` (VDM's alpha);
the paper's per-step AR(1) coefficient ``lambda_t`` is :meth:`Schedule.transition`.

Schedules are objects; a name (``"cosine"``, ``{"name": "refiner", "steps": 3}``) becomes one
through :func:`diffkit.registry.resolve` (or :func:`diffkit.get_schedule`), never here.
"""
from __future__ import annotations

import abc
import math

import torch

from .hookspecs import hookimpl

_DT = torch.float64  # schedule arithmetic is done in float64 and cast by the caller


def _t(t) -> torch.Tensor:
    t = torch.as_tensor(t)
    if not t.is_floating_point():
        t = t.to(_DT)
    t = t.to(_DT)
    if bool(((t < 0) | (t > 1) | torch.isnan(t)).any()):
        bad = t[(t < 0) | (t > 1) | torch.isnan(t)].flatten()[:3].tolist()
        raise ValueError(f"time t must lie in [0, 1], got values such as {bad}; "
                         "diffkit uses continuous time (a discrete step n of T is t = n/T)")
    return t


class Schedule(abc.ABC):
    """Base class.  Subclasses implement :meth:`_log_alpha_bar` on ``t`` in ``[0, 1]``.

    All methods accept floats or tensors of any shape and return float64 tensors.
    ``T`` is the number of discrete training steps (``None`` for continuous-time training).
    """

    T: int | None = None
    #: log-SNR at t=1 must be finite and low enough that x_1 is close to N(0, I)
    name: str = "schedule"
    #: the time spacing this schedule's levels are meant to be sampled on, used by
    #: :func:`diffkit.sample` in place of the sampler's default when no spacing is given
    #: (``None``: the sampler's default).  The ``refiner`` schedule sets ``"uniform"``: its few
    #: levels *are* the sampling grid, which ``nfe = T`` visits exactly.
    sample_spacing: str | None = None

    @abc.abstractmethod
    def _log_alpha_bar(self, t: torch.Tensor) -> torch.Tensor:
        """``log alpha_bar(t)`` on a float64 tensor ``t`` already checked to lie in ``[0, 1]``."""

    # -- marginals ---------------------------------------------------------------------
    def log_alpha_bar(self, t) -> torch.Tensor:
        """``log alpha_bar(t)``, with ``alpha_bar(0) = 1``."""
        return self._log_alpha_bar(_t(t))

    def alpha_bar(self, t) -> torch.Tensor:
        return self.log_alpha_bar(t).exp()

    def alpha(self, t) -> torch.Tensor:
        """Signal scale ``sqrt(alpha_bar(t))`` of ``q(x_t | x_0)``."""
        return (0.5 * self.log_alpha_bar(t)).exp()

    def sigma(self, t) -> torch.Tensor:
        """Noise scale ``sqrt(1 - alpha_bar(t))`` of ``q(x_t | x_0)``."""
        return (-torch.expm1(self.log_alpha_bar(t))).clamp_min(0).sqrt()

    def coeffs(self, t) -> tuple[torch.Tensor, torch.Tensor]:
        """``(alpha(t), sigma(t))`` computed together."""
        la = self.log_alpha_bar(t)
        return (0.5 * la).exp(), (-torch.expm1(la)).clamp_min(0).sqrt()

    def logsnr(self, t) -> torch.Tensor:
        """``log(alpha^2 / sigma^2)``; ``+inf`` at ``t = 0``."""
        la = self.log_alpha_bar(t)
        return la - torch.log(-torch.expm1(la))

    def snr(self, t) -> torch.Tensor:
        return self.logsnr(t).exp()

    def dlogsnr_dt(self, t) -> torch.Tensor:
        """Time derivative of the log-SNR (negative), by autograd unless overridden."""
        t = _t(t).detach().clone().requires_grad_(True)
        with torch.enable_grad():
            l = self.logsnr(t)
            (g,) = torch.autograd.grad(l.sum(), t)
        return g.detach()

    # -- AR(1) view (the paper's step 1) -----------------------------------------------
    def transition(self, s, t) -> tuple[torch.Tensor, torch.Tensor]:
        """AR(1) coefficients of ``q(x_t | x_s) = N(lam x_s, sig^2 I)`` for ``s < t``.

        ``lam^2 + sig^2 = 1``.  For a discrete schedule, ``transition((n-1)/T, n/T)`` is the
        paper's ``(lambda_n, sigma_n)``.
        """
        d = self.log_alpha_bar(t) - self.log_alpha_bar(s)
        if bool((d > 1e-12).any()):
            raise ValueError("transition(s, t) needs s <= t")
        return (0.5 * d).exp(), (-torch.expm1(d)).clamp_min(0).sqrt()

    def t_from_logsnr(self, logsnr, *, iters: int = 60) -> torch.Tensor:
        """Inverse of :meth:`logsnr`: the time at which the log-SNR equals ``logsnr``.

        Generic version: bisection on ``log alpha_bar`` (monotone in t) to ~1e-18; schedules
        with a closed-form inverse override it.  Values outside the schedule's range map to
        the ends of ``[0, 1]``."""
        target = torch.nn.functional.logsigmoid(torch.as_tensor(logsnr, dtype=_DT))  # log alpha_bar
        lo = torch.zeros_like(target)
        hi = torch.ones_like(target)
        for _ in range(iters):
            mid = 0.5 * (lo + hi)
            above = self._log_alpha_bar(mid) > target
            lo = torch.where(above, mid, lo)
            hi = torch.where(above, hi, mid)
        return 0.5 * (lo + hi)

    # -- discrete view -----------------------------------------------------------------
    def discrete_times(self, T: int | None = None) -> torch.Tensor:
        """The grid ``n / T`` for ``n = 1..T``."""
        T = T or self.T
        if not T:
            raise ValueError(f"{self!r} is continuous-time; pass T to get a discrete grid")
        return torch.arange(1, T + 1, dtype=_DT) / T

    def betas(self, T: int | None = None) -> torch.Tensor:
        """``beta_n = 1 - lambda_n^2`` on the discrete grid (Ho et al. 2020 notation)."""
        t = self.discrete_times(T)
        s = t - 1.0 / len(t)
        d = self.log_alpha_bar(t) - self.log_alpha_bar(s.clamp_min(0))
        return -torch.expm1(d)

    def __repr__(self) -> str:
        return f"{type(self).__name__}(T={self.T})"


class DiscreteSchedule(Schedule):
    """A schedule given by ``alpha_bar_n`` on ``n = 1..T`` (``alpha_bar_0 = 1``).

    ``log alpha_bar`` is interpolated linearly in ``t = n / T`` between grid points.
    """

    def __init__(self, alpha_bar, name: str = "alpha_bar"):
        ab = torch.as_tensor(alpha_bar, dtype=_DT).flatten()
        if ab.numel() < 1:
            raise ValueError("alpha_bar is empty; give at least one value")
        if bool(((ab <= 0) | (ab >= 1) | ~torch.isfinite(ab)).any()):
            raise ValueError("alpha_bar values must lie strictly in (0, 1)")
        if bool((ab[1:] >= ab[:-1]).any()):
            raise ValueError("alpha_bar must be strictly decreasing in n")
        self.T = int(ab.numel())
        self.name = name
        self._grid = torch.cat([torch.zeros(1, dtype=_DT), ab.log()])  # log alpha_bar at n = 0..T

    def _log_alpha_bar(self, t):
        x = t * self.T
        i = x.floor().clamp(0, self.T - 1).long()
        w = x - i
        g = self._grid_on(t.device)
        return g[i] * (1 - w) + g[i + 1] * w

    def _grid_on(self, device) -> torch.Tensor:
        """The log alpha_bar grid on ``device`` (training draws t on the model's device), cached."""
        if self._grid.device == device:
            return self._grid
        cache = self.__dict__.setdefault("_grids", {})
        if device not in cache:
            cache[device] = self._grid.to(device)
        return cache[device]

    def t_from_logsnr(self, logsnr, **_) -> torch.Tensor:
        """Exact inverse of the piecewise-linear ``log alpha_bar``."""
        la = torch.nn.functional.logsigmoid(torch.as_tensor(logsnr, dtype=_DT))
        g = self._grid  # decreasing
        la = la.clamp(min=float(g[-1]), max=0.0)
        idx = torch.searchsorted(-g, -la).clamp(1, self.T)
        lo, hi = g[idx - 1], g[idx]
        frac = torch.where(hi < lo, (la - lo) / (hi - lo), torch.zeros_like(la))
        return (idx - 1 + frac) / self.T

    def __repr__(self):
        return f"DiscreteSchedule(name={self.name!r}, T={self.T})"


def linear(T: int = 1000, beta_start: float = 1e-4, beta_end: float = 0.02) -> DiscreteSchedule:
    """Linear beta schedule of DDPM (Ho et al. 2020): beta from 1e-4 to 0.02 over T steps."""
    if T < 1:
        raise ValueError("T must be >= 1")
    betas = torch.linspace(beta_start, beta_end, T, dtype=_DT)
    return DiscreteSchedule(torch.cumprod(1 - betas, 0), name="linear")


def refiner(steps: int = 3, sigma_min: float = 4e-7, logsnr_max_noise: float = -30.0) -> DiscreteSchedule:
    """PDE-Refiner's noise levels (Lippe et al. 2023): one level of pure noise, then ``steps``
    refinement levels with noise std ``sigma_k = sigma_min^(k/steps)``, k = 1..steps.

    A ``T = steps + 1`` discrete schedule: level ``T`` has log-SNR ``logsnr_max_noise`` (the
    network sees no signal, so with x0/v-prediction it learns the one-step conditional mean,
    like the MSE model), levels ``T-1..1`` have ``sigma~ = sigma_k`` (Karras units).  With
    v-prediction and the ``native`` weighting, training is PDE-Refiner's (x0-MSE at the first
    level, eps-MSE at the small ones, levels drawn uniformly), and the ``ddpm`` sampler with
    ``nfe = T`` is its refinement loop: predict, add noise of std ``sigma_k``, denoise.
    """
    if steps < 1 or not 0 < sigma_min < 1:
        raise ValueError(f"refiner needs steps >= 1 and sigma_min in (0, 1), got {steps}, {sigma_min}")
    k = torch.arange(steps, 0, -1, dtype=_DT)                    # level n = 1..steps has k = steps..1
    logsnr = torch.cat([-2 * (k / steps) * math.log(sigma_min), torch.tensor([float(logsnr_max_noise)], dtype=_DT)])
    if bool((logsnr[1:] >= logsnr[:-1]).any()):
        raise ValueError(f"logsnr_max_noise = {logsnr_max_noise} must lie below the log-SNR of the largest "
                         f"refinement noise ({float(logsnr[-2]):.3g})")
    sched = DiscreteSchedule(torch.sigmoid(logsnr), name="refiner")
    sched.sample_spacing = "uniform"  # sample on the levels themselves (ddpm with nfe = T), not a logsnr grid
    return sched


def from_alpha_bar(alpha_bar) -> DiscreteSchedule:
    """Schedule built from user-given ``alpha_bar_n``, n = 1..T (strictly decreasing in (0,1))."""
    return DiscreteSchedule(alpha_bar, name="alpha_bar")


class CosineSchedule(Schedule):
    """Cosine schedule (Nichol & Dhariwal 2021): ``alpha_bar = f(t)/f(0)``,
    ``f(t) = cos^2(((t + s)/(1 + s)) pi/2)``, with log-SNR clipped below at ``logsnr_min``
    (Nichol's beta <= 0.999 clipping, in continuous form) so that ``t = 1`` is finite."""

    def __init__(self, s: float = 0.008, logsnr_min: float = -15.0, T: int | None = None):
        self.s, self.logsnr_min, self.T = float(s), float(logsnr_min), T
        self.name = "cosine"

    def _log_alpha_bar(self, t):
        s = self.s
        f = lambda u: torch.cos((u + s) / (1 + s) * (math.pi / 2))
        ab = (f(t) / f(torch.zeros_like(t))) ** 2
        ab_min = 1.0 / (1.0 + math.exp(-self.logsnr_min))
        ab = torch.where(t == 0, torch.ones_like(ab), ab.clamp(min=ab_min, max=1.0))
        return ab.log()

    def t_from_logsnr(self, logsnr, **_) -> torch.Tensor:
        """Closed-form inverse of :meth:`logsnr` (``t = 2(1+s)/pi arccos(f(0) sqrt(alpha_bar)) - s``);
        like the generic bisection, log-SNRs below ``logsnr_min`` map to ``t = 1``."""
        la = torch.nn.functional.logsigmoid(torch.as_tensor(logsnr, dtype=_DT))  # log alpha_bar
        f0 = math.cos(self.s / (1 + self.s) * (math.pi / 2))
        theta = torch.arccos((f0 * (0.5 * la).exp()).clamp(max=1.0))
        t = (theta * (2 * (1 + self.s) / math.pi) - self.s).clamp(0.0, 1.0)
        below = la < -math.log1p(math.exp(-self.logsnr_min))  # log alpha_bar at logsnr_min
        return torch.where(below, torch.ones_like(t), t)

    def __repr__(self):
        return f"CosineSchedule(s={self.s}, logsnr_min={self.logsnr_min}, T={self.T})"


class SigmoidSchedule(Schedule):
    """Sigmoid schedule (Jabri et al. 2023, Chen 2023): ``alpha_bar`` follows a shifted,
    rescaled ``1 - sigmoid((t (end - start) + start) / tau)``."""

    def __init__(self, start: float = -3.0, end: float = 3.0, tau: float = 1.0,
                 logsnr_min: float = -15.0, T: int | None = None):
        if end <= start or tau <= 0:
            raise ValueError("sigmoid schedule needs end > start and tau > 0")
        self.start, self.end, self.tau, self.logsnr_min, self.T = float(start), float(end), float(tau), float(logsnr_min), T
        self.name = "sigmoid"

    def _log_alpha_bar(self, t):
        sg = lambda u: torch.sigmoid(torch.as_tensor(u, dtype=_DT) / self.tau)
        v0, v1 = sg(self.start), sg(self.end)
        ab = (v1 - sg(t * (self.end - self.start) + self.start)) / (v1 - v0)
        ab_min = 1.0 / (1.0 + math.exp(-self.logsnr_min))
        ab = torch.where(t == 0, torch.ones_like(ab), ab.clamp(min=ab_min, max=1.0))
        return ab.log()

    def __repr__(self):
        return f"SigmoidSchedule(start={self.start}, end={self.end}, tau={self.tau}, T={self.T})"


def cosine(s: float = 0.008, logsnr_min: float = -15.0, T: int | None = None) -> CosineSchedule:
    """Cosine schedule (Nichol & Dhariwal 2021), continuous time; give T for discrete training."""
    return CosineSchedule(s=s, logsnr_min=logsnr_min, T=T)


def sigmoid(start: float = -3.0, end: float = 3.0, tau: float = 1.0, logsnr_min: float = -15.0,
            T: int | None = None) -> SigmoidSchedule:
    """Sigmoid schedule (Jabri et al. 2023), continuous time; give T for discrete training."""
    return SigmoidSchedule(start=start, end=end, tau=tau, logsnr_min=logsnr_min, T=T)


@hookimpl
def diffkit_schedules():
    """diffkit's own schedules, registered as a built-in plugin (:mod:`diffkit._builtins`)."""
    return {"linear": linear, "cosine": cosine, "sigmoid": sigmoid, "alpha_bar": from_alpha_bar, "refiner": refiner}
