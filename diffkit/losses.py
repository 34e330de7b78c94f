"""Training objectives (Turner et al. 2024, step 2 and its two training paths).

Fitting the reverse Gaussians by maximum likelihood is a sequence of regressions onto the
variance-reduced target ``E[x_{t-1} | x_t, x_0]``; written in the noise, each is a weighted
eps-regression.  Every weighting below is therefore expressed as a per-time weight
``w(t)`` on ``|eps - eps_hat|^2``:

=============  ======================================  ====================================
``simple``     1                                       Ho et al. 2020, the "simple" loss
``vdm``        ``-1/2 d logSNR/dt``, t ~ U(0, 1]       Kingma et al. 2021 (continuous-time
                                                       VLB; the SNR-weighted path)
``min_snr``    ``min(SNR, gamma) / SNR``               Hang et al. 2023 (min-SNR-gamma)
``native``     MSE in the network's own space          e.g. plain v-MSE
=============  ======================================  ====================================

The error is computed in the network's native space and converted with
:func:`diffkit.param.eps_error_factor`, which avoids dividing by a vanishing sigma or alpha.
Optional per-element weights (area weights, masks) enter the per-sample weighted mean, and
the loss is returned per sample, shape ``(B,)``.
"""
from __future__ import annotations

import torch

from . import param as P
from ._shape import as_batch_time, check_finite, reduce_per_sample
from .denoiser import Cond, Denoiser, Regressor
from .process import q_sample

WEIGHTINGS = ("simple", "vdm", "min_snr", "native")


def sample_times(schedule, batch: int, *, continuous: bool = False, generator=None, device=None) -> torch.Tensor:
    """Training times: ``n/T`` with ``n ~ U{1..T}`` for a discrete schedule, else ``t ~ U(0, 1]``."""
    if schedule.T and not continuous:
        n = torch.randint(1, schedule.T + 1, (batch,), generator=generator, device=device)
        return n.to(torch.float64) / schedule.T
    u = torch.rand(batch, generator=generator, device=device, dtype=torch.float64)
    return 1.0 - u  # in (0, 1]


def eps_weight(weighting: str, schedule, t: torch.Tensor, parameterization: str, *, gamma: float = 5.0) -> torch.Tensor:
    """Per-sample weight ``w(t)`` on the eps-MSE of each weighting (float64, shape of ``t``)."""
    if weighting == "simple":
        return torch.ones_like(t)
    if weighting == "vdm":
        return -0.5 * schedule.dlogsnr_dt(t)
    if weighting == "min_snr":
        snr = schedule.snr(t)
        return torch.clamp(snr, max=gamma) / snr
    if weighting == "native":
        a, s = schedule.coeffs(t)
        return P.eps_error_factor(parameterization, a, s)
    raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")


def diffusion_loss(denoiser: Denoiser, x0: torch.Tensor, *, cond: Cond | None = None,
                   weighting: str = "simple", weight: torch.Tensor | None = None,
                   gamma: float = 5.0, p_uncond: float = 0.0,
                   t: torch.Tensor | None = None, eps: torch.Tensor | None = None,
                   generator: torch.Generator | None = None, check: bool = True) -> torch.Tensor:
    """Per-sample diffusion loss, shape ``(B,)``.

    ``weight`` holds per-element weights broadcastable to ``x0`` (e.g. the layout's area
    weights times a missing-value mask); the reduction is ``sum(w e^2) / sum(w)``.  With
    ``p_uncond > 0`` class labels are replaced by the null label with that probability
    (classifier-free guidance training).  ``t`` and ``eps`` may be given to fix the draw.
    """
    if weighting not in WEIGHTINGS:
        raise ValueError(f"unknown loss weighting {weighting!r}; choose one of {', '.join(WEIGHTINGS)}")
    if check:
        check_finite(x0, "training data x0")
    schedule = denoiser.schedule
    B = x0.shape[0]
    if t is None:
        t = sample_times(schedule, B, continuous=(weighting == "vdm"), generator=generator, device=x0.device)
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
    w = eps_weight(weighting, schedule, t, p, gamma=gamma) / P.eps_error_factor(p, a, s)
    return per_sample * w.to(per_sample)


def regression_loss(model: Regressor, x0: torch.Tensor, *, cond: Cond | None = None,
                    weight: torch.Tensor | None = None, check: bool = True) -> torch.Tensor:
    """Per-sample MSE of the deterministic baseline, ``sum(w (f(cond) - x0)^2) / sum(w)``, shape ``(B,)``."""
    if check:
        check_finite(x0, "training data x0")
    out = model.net_output(cond, x0.shape[0], device=x0.device, dtype=x0.dtype)
    acc = torch.promote_types(out.dtype, torch.float32)
    return reduce_per_sample((out.to(acc) - x0.to(acc)) ** 2, weight)
