"""Training objectives (Turner et al. 2024, step 2 and its two training paths).

Fitting the reverse Gaussians by maximum likelihood is a sequence of regressions onto the
variance-reduced target ``E[x_{t-1} | x_t, x_0]``; written in the noise, each is a weighted
eps-regression.  A training objective is therefore two choices: *where* the noise levels are
drawn (:class:`NoiseDistribution`) and a per-level weight ``w`` on ``|eps - eps_hat|^2``
(:func:`eps_weight`).  Below ``sigma~ = sigma/alpha = exp(-logSNR/2)`` is the noise level in
Karras et al.'s units (``x_t / alpha = x0 + sigma~ eps``).

Noise distributions (``noise=``):

==================  ==============================================  ==============================
``uniform_t``       ``t ~ U(0, 1]`` (``n ~ U{1..T}`` on a discrete  Ho et al. 2020, Kingma et al.
                    schedule)                                       2021
``lognormal``       ``log sigma~ ~ N(p_mean, p_std^2)``             Karras et al. 2022 (EDM),
                                                                    default (-1.2, 1.2)
``logsnr_uniform``  ``logSNR ~ U[-2 log sigma_max, -2 log           uniform in log-SNR
                    sigma_min]``
==================  ==============================================  ==============================

``lognormal`` and ``logsnr_uniform`` draw a log-SNR and map it to the time ``t = schedule.t_from_logsnr(logSNR)``
(continuous ``t``, also for a discrete schedule: the network is conditioned on the log-SNR, and
a discrete schedule's log-SNR between grid points is that of its interpolated ``log alpha_bar``).
Draws are restricted to the schedule's range ``[logSNR(1), LOGSNR_MAX]``: the log-normal is
*truncated* there (inverse-CDF sampling of the truncated normal, so no point mass piles up at
``t = 1``), and ``[sigma_min, sigma_max]`` is intersected with it.  Beyond ``sigma~(t = 1)``
there is nothing to train: the schedule never reaches those noise levels.

Weightings (``weighting=``), as the weight ``w`` on the eps-MSE:

=============  ===========================================  ====================================
``simple``     1                                            Ho et al. 2020, the "simple" loss
``vdm``        ``-1/2 dlogSNR/dt`` for ``uniform_t``;       Kingma et al. 2021 (continuous-time
               ``1 / (2 p(logSNR))`` for the others         ELBO), importance-weighted
``min_snr``    ``min(SNR, gamma) / SNR``                    Hang et al. 2023 (min-SNR-gamma)
``edm``        ``1 + sigma~^2 / sigma_data^2``              Karras et al. 2022: ``lambda(sigma)
                                                            |D - x0|^2``, ``lambda = (sigma^2 +
                                                            sigma_d^2) / (sigma sigma_d)^2``
``native``     MSE in the network's own space               e.g. plain v-MSE
=============  ===========================================  ====================================

``vdm`` estimates the continuous-time ELBO ``1/2 int |eps - eps_hat|^2 dlogSNR`` whatever the
noise distribution: its weight is the ELBO's ``-1/2 dlogSNR/dt`` divided by the density of the
drawn ``t`` (``1/2`` over the density of the drawn log-SNR).  With ``logsnr_uniform`` the integral
runs over ``[sigma_min, sigma_max]`` only.  ``edm`` with ``sigma_data = 1`` equals ``native`` for
v-prediction (``|v - v_hat|^2 = |eps - eps_hat|^2 / alpha^2`` and ``1/alpha^2 = 1 + sigma~^2``):
EDM's preconditioned loss *is* the v-MSE (docs/design.md).

The error is computed in the network's native space and converted with
:func:`diffkit.param.eps_error_factor`, which avoids dividing by a vanishing sigma or alpha.
Optional per-element weights (area weights, masks) enter the per-sample weighted mean, and
the loss is returned per sample, shape ``(B,)``.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import param as P
from ._shape import as_batch_time, check_finite, reduce_per_sample
from .denoiser import Cond, Denoiser, Regressor
from .process import q_sample

WEIGHTINGS = ("simple", "vdm", "min_snr", "edm", "native")
NOISES = ("uniform_t", "lognormal", "logsnr_uniform")
#: largest log-SNR a drawn noise level may have (sigma~ = e^-15 ~ 3e-7); the Denoiser clips the
#: network's log-SNR input at 30 too, so smaller noise levels would all look alike to it
LOGSNR_MAX = 30.0
_DT = torch.float64


@dataclass(frozen=True)
class NoiseDistribution:
    """Where training draws its noise levels (see the module docstring).

    ``kind`` is one of :data:`NOISES`; ``p_mean`` and ``p_std`` parameterise ``lognormal`` (the
    mean and standard deviation of ``log sigma~``), ``sigma_min`` and ``sigma_max`` the range of
    ``logsnr_uniform`` (in ``sigma~ = sigma/alpha`` units).
    """

    kind: str = "uniform_t"
    p_mean: float = -1.2
    p_std: float = 1.2
    sigma_min: float = 0.002
    sigma_max: float = 80.0

    def __post_init__(self):
        if self.kind not in NOISES:
            raise ValueError(f"unknown noise distribution {self.kind!r}; choose one of {', '.join(NOISES)}")
        if not (math.isfinite(self.p_mean) and 0 < self.p_std < math.inf):
            raise ValueError(f"lognormal noise needs a finite p_mean and 0 < p_std < inf, "
                             f"got p_mean={self.p_mean}, p_std={self.p_std}")
        if not 0 < self.sigma_min < self.sigma_max < math.inf:
            raise ValueError(f"logsnr_uniform noise needs 0 < sigma_min < sigma_max < inf, "
                             f"got sigma_min={self.sigma_min}, sigma_max={self.sigma_max}")

    @classmethod
    def of(cls, spec: "str | NoiseDistribution | None") -> "NoiseDistribution":
        """A distribution from a name (default parameters), an instance, or None (uniform_t)."""
        if spec is None:
            return cls()
        if isinstance(spec, cls):
            return spec
        if isinstance(spec, str):
            return cls(spec)
        raise TypeError(f"noise must be a name ({', '.join(NOISES)}) or a NoiseDistribution, got {spec!r}")

    # -- the log-SNR range and density ------------------------------------------------------
    def logsnr_range(self, schedule) -> tuple[float, float]:
        """``(lo, hi)``: the log-SNRs that can be drawn (``lognormal``, ``logsnr_uniform``)."""
        lo, hi = float(schedule.logsnr(1.0)), LOGSNR_MAX
        if self.kind == "logsnr_uniform":
            want = (-2 * math.log(self.sigma_max), -2 * math.log(self.sigma_min))
            lo, hi = max(lo, want[0]), min(hi, want[1])
            if not lo < hi:
                raise ValueError(f"logsnr_uniform: [sigma_min, sigma_max] = [{self.sigma_min:g}, {self.sigma_max:g}] "
                                 f"lies outside the schedule's noise levels (sigma/alpha up to "
                                 f"{math.exp(-float(schedule.logsnr(1.0)) / 2):.3g}); choose a range inside it")
        return lo, hi

    def _z_range(self, schedule) -> tuple[float, float]:
        """Standardised ``log sigma~`` bounds ``(a, b)`` of the truncated log-normal."""
        lo, hi = self.logsnr_range(schedule)
        return (-hi / 2 - self.p_mean) / self.p_std, (-lo / 2 - self.p_mean) / self.p_std

    def logsnr_density(self, schedule, logsnr: torch.Tensor) -> torch.Tensor:
        """Density ``p(logSNR)`` of the drawn log-SNR (float64), for ``lognormal`` and ``logsnr_uniform``.

        For ``uniform_t`` it is ``1 / |dlogSNR/dt|`` at the corresponding time (continuous ``t``)."""
        lam = torch.as_tensor(logsnr, dtype=_DT)
        if self.kind == "uniform_t":
            return 1.0 / (-schedule.dlogsnr_dt(schedule.t_from_logsnr(lam)))
        lo, hi = self.logsnr_range(schedule)
        inside = (lam >= lo) & (lam <= hi)
        if self.kind == "logsnr_uniform":
            p = torch.full_like(lam, 1.0 / (hi - lo))
        else:
            a, b = self._z_range(schedule)
            mass = float(torch.special.ndtr(torch.tensor(b, dtype=_DT)) - torch.special.ndtr(torch.tensor(a, dtype=_DT)))
            z = (-lam / 2 - self.p_mean) / self.p_std
            # log sigma~ = -logSNR/2 is N(p_mean, p_std^2) truncated; the Jacobian of -1/2 gives the 0.5
            p = 0.5 * torch.exp(-0.5 * z**2) / (math.sqrt(2 * math.pi) * self.p_std * mass)
        return torch.where(inside, p, torch.zeros_like(p))

    # -- drawing ------------------------------------------------------------------------------
    def sample_logsnr(self, schedule, batch: int, *, generator=None, device=None) -> torch.Tensor:
        """``batch`` log-SNRs from the distribution (``lognormal`` or ``logsnr_uniform``), float64.

        One uniform number per draw (inverse-CDF sampling), so the generator advances by exactly
        ``batch`` draws whatever the distribution, which exact resume relies on."""
        if self.kind == "uniform_t":
            raise ValueError("uniform_t draws times, not log-SNRs; use sample()")
        u = torch.rand(batch, generator=generator, device=device, dtype=_DT)
        lo, hi = self.logsnr_range(schedule)
        if self.kind == "logsnr_uniform":
            lam = hi - u * (hi - lo)
        else:
            a, b = self._z_range(schedule)
            ca, cb = torch.special.ndtr(torch.tensor(a, dtype=_DT)), torch.special.ndtr(torch.tensor(b, dtype=_DT))
            z = torch.special.ndtri(ca.to(u.device) + u * (cb - ca).to(u.device)).clamp(a, b)
            lam = -2 * (self.p_mean + self.p_std * z)
        return lam.clamp(lo, hi)

    def sample(self, schedule, batch: int, *, continuous: bool = False, generator=None, device=None) -> torch.Tensor:
        """``batch`` training times in ``(0, 1]``, float64.

        ``uniform_t``: ``n/T`` with ``n ~ U{1..T}`` for a discrete schedule (unless ``continuous``),
        else ``t ~ U(0, 1]``.  The others: ``t = schedule.t_from_logsnr(logSNR)`` of a drawn log-SNR,
        continuous ``t`` for every schedule."""
        if self.kind == "uniform_t":
            if schedule.T and not continuous:
                n = torch.randint(1, schedule.T + 1, (batch,), generator=generator, device=device)
                return n.to(_DT) / schedule.T
            u = torch.rand(batch, generator=generator, device=device, dtype=_DT)
            return 1.0 - u  # in (0, 1]
        lam = self.sample_logsnr(schedule, batch, generator=generator, device=device)
        # inverted on the CPU (a discrete schedule's grid lives there), then moved back
        t = schedule.t_from_logsnr(lam.cpu()).to(lam.device)
        return t.clamp(min=torch.finfo(_DT).tiny, max=1.0)


def noise_distribution(lc) -> NoiseDistribution:
    """The :class:`NoiseDistribution` of a ``[loss]`` config section (anything with its attributes)."""
    return NoiseDistribution(lc.noise or "uniform_t", lc.p_mean, lc.p_std, lc.sigma_min, lc.sigma_max)


def sample_times(schedule, batch: int, *, continuous: bool = False, generator=None, device=None,
                 noise: "str | NoiseDistribution | None" = None) -> torch.Tensor:
    """Training times from ``noise`` (default ``uniform_t``: ``n/T`` with ``n ~ U{1..T}`` for a
    discrete schedule, else ``t ~ U(0, 1]``); see :meth:`NoiseDistribution.sample`."""
    return NoiseDistribution.of(noise).sample(schedule, batch, continuous=continuous, generator=generator,
                                              device=device)


def eps_weight(weighting: str, schedule, t: torch.Tensor, parameterization: str, *, gamma: float = 5.0,
               sigma_data: float = 1.0, noise: "str | NoiseDistribution | None" = None) -> torch.Tensor:
    """Per-sample weight ``w(t)`` on the eps-MSE of each weighting (float64, shape of ``t``).

    ``noise`` matters for ``vdm`` only, whose weight is divided by the density of the drawn noise
    level so that the loss estimates the continuous-time ELBO under any noise distribution."""
    if weighting == "simple":
        return torch.ones_like(t, dtype=_DT)
    if weighting == "vdm":
        nd = NoiseDistribution.of(noise)
        if nd.kind == "uniform_t":
            return -0.5 * schedule.dlogsnr_dt(t)
        return 0.5 / nd.logsnr_density(schedule, schedule.logsnr(t))
    if weighting == "min_snr":
        snr = schedule.snr(t)
        return torch.clamp(snr, max=gamma) / snr
    if weighting == "edm":
        return 1.0 + torch.exp(-schedule.logsnr(t)) / sigma_data**2  # 1 + sigma~^2 / sigma_data^2
    if weighting == "native":
        a, s = schedule.coeffs(t)
        return P.eps_error_factor(parameterization, a, s)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, *, cond: Cond | None = None,
                   weighting: str = "simple", weight: torch.Tensor | None = None,
                   gamma: float = 5.0, p_uncond: float = 0.0,
                   t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, check: bool = True,
                   noise: "str | NoiseDistribution | None" = None, sigma_data: float = 1.0) -> torch.Tensor:
    """Per-sample diffusion loss, shape ``(B,)``.

    ``weight`` holds per-element weights broadcastable to ``x0`` (e.g. the layout's area
    weights times a missing-value mask); the reduction is ``sum(w e^2) / sum(w)``.  With
    ``p_uncond > 0`` class labels are replaced by the null label with that probability
    (classifier-free guidance training).  ``t`` and ``eps`` may be given to fix the draw;
    otherwise ``t`` comes from ``noise`` (a :class:`NoiseDistribution` or its name; default
    ``uniform_t``), which ``vdm`` also uses to importance-weight.  ``sigma_data`` is the data
    scale of the ``edm`` weighting.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if check:
        check_finite(x0, "training data x0")
    schedule = denoiser.schedule
    B = x0.shape[0]
    if t is None:
        t = sample_times(schedule, B, continuous=(weighting == "vdm"), generator=generator, device=x0.device,
                         noise=noise)
    else:
        t = as_batch_time(t, B, device=x0.device)
    if cond is not None and p_uncond > 0 and cond.labels is not None:
        if denoiser.layout is None or not denoiser.layout.num_classes:
            raise ValueError("label dropout (p_uncond > 0) needs a layout with num_classes > 0; "
                             "pass layout= to Denoiser")
        drop = torch.rand(B, generator=generator, device=x0.device) < p_uncond
        null = torch.full_like(cond.labels, denoiser.layout.num_classes)
        cond = Cond(cond.fields, cond.scalars, torch.where(drop, null, cond.labels))
    x_t, eps = q_sample(schedule, x0, t, eps=eps, generator=generator)
    out = denoiser.net_output(x_t, t, cond)
    a, s = schedule.coeffs(t)
    p = denoiser.parameterization
    acc = torch.promote_types(out.dtype, torch.float32)  # bf16/fp16 outputs are reduced in fp32
    err = (out.to(acc) - P.target(p, x0, eps, a, s).to(acc)) ** 2
    per_sample = reduce_per_sample(err, weight)
    w = eps_weight(weighting, schedule, t, p, gamma=gamma, sigma_data=sigma_data, noise=noise) / P.eps_error_factor(p, a, s)
    return per_sample * w.to(per_sample)


def regression_loss(model: Regressor, x0: torch.Tensor, *, cond: Cond | None = None,
                    weight: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Per-sample MSE of the deterministic baseline, ``sum(w (f(cond) - x0)^2) / sum(w)``, shape ``(B,)``."""
    if check:
        check_finite(x0, "training data x0")
    out = model.net_output(cond, x0.shape[0], device=x0.device, dtype=x0.dtype)
    acc = torch.promote_types(out.dtype, torch.float32)
    return reduce_per_sample((out.to(acc) - x0.to(acc)) ** 2, weight)
