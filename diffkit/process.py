"""The forward (corruption) process and its posterior (Turner et al. 2024, steps 1 and 3).

``q(x_t | x_0) = N(alpha_t x_0, sigma_t^2 I)`` and, for ``s < t``, the Gaussian posterior
``q(x_s | x_t, x_0)``, whose mean ``E[x_s | x_t, x_0]`` is the paper's variance-reduced
regression target.  All functions take per-sample times of shape ``(B,)`` (or scalars) and
tensors of any rank.
"""
from __future__ import annotations

import torch

from ._shape import as_batch_time, bcast
from .schedules import Schedule


def q_sample(schedule: Schedule, x0: torch.Tensor, t, eps: torch.Tensor | None = None,
             generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Draw ``x_t ~ q(x_t | x_0)``; returns ``(x_t, eps)``."""
    t = as_batch_time(t, x0.shape[0], device=x0.device)
    if eps is None:
        eps = torch.randn(x0.shape, generator=generator, device=x0.device, dtype=x0.dtype)
    a, s = schedule.coeffs(t)
    return bcast(a, x0) * x0 + bcast(s, x0) * eps, eps


def posterior_coeffs(schedule: Schedule, s, t) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``(c_x0, c_xt, var)`` with ``q(x_s | x_t, x_0) = N(c_x0 x_0 + c_xt x_t, var I)``, ``s < t``.

    With ``lam, sig = transition(s, t)``: ``c_x0 = alpha_s sig^2 / sigma_t^2``,
    ``c_xt = lam sigma_s^2 / sigma_t^2``, ``var = sig^2 sigma_s^2 / sigma_t^2``.
    """
    a_s, s_s = schedule.coeffs(s)
    _, s_t = schedule.coeffs(t)
    lam, sig = schedule.transition(s, t)
    c_x0 = a_s * sig**2 / s_t**2
    c_xt = lam * s_s**2 / s_t**2
    var = sig**2 * s_s**2 / s_t**2
    return c_x0, c_xt, var


def posterior(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, s, t) -> tuple[torch.Tensor, torch.Tensor]:
    """Mean ``E[x_s | x_t, x_0]`` (same shape as ``x_t``) and per-sample variance ``(B,)``."""
    B = x_t.shape[0]
    s = as_batch_time(s, B, device=x_t.device)
    t = as_batch_time(t, B, device=x_t.device)
    c_x0, c_xt, var = posterior_coeffs(schedule, s, t)
    return bcast(c_x0, x_t) * x0 + bcast(c_xt, x_t) * x_t, var


def posterior_sample(schedule: Schedule, x0: torch.Tensor, x_t: torch.Tensor, s, t,
                     generator: torch.Generator | None = None) -> torch.Tensor:
    """Draw ``x_s ~ q(x_s | x_t, x_0)``."""
    mean, var = posterior(schedule, x0, x_t, s, t)
    z = torch.randn(x_t.shape, generator=generator, device=x_t.device, dtype=x_t.dtype)
    return mean + bcast(var.sqrt(), x_t) * z
