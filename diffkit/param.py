"""Parameterisations: every conversion between eps, x0 and v lives here (Turner et al. 2024, step 5).

With ``x_t = alpha x0 + sigma eps`` and ``alpha^2 + sigma^2 = 1``:

- eps-prediction (Ho et al. 2020):    ``x0 = (x_t - sigma eps) / alpha``
- x0-prediction:                      ``eps = (x_t - alpha x0) / sigma``
- v-prediction (Salimans & Ho 2022):  ``v = alpha eps - sigma x0``; ``x0 = alpha x_t - sigma v``,
  ``eps = sigma x_t + alpha v``

``alpha`` and ``sigma`` are per-sample tensors of shape ``(B,)`` (or 0-d); they are broadcast
with :func:`diffkit._shape.bcast`, so every function works on tensors of any rank.

For a prediction error in one space, the squared error in another is a per-sample multiple
(:func:`eps_error_factor`), which lets losses weight in any space without ill-conditioned
division: ``|x0 - x0_hat|^2 = |eps - eps_hat|^2 / SNR`` and
``|v - v_hat|^2 = |eps - eps_hat|^2 / alpha^2``.

Karras et al.'s (EDM) preconditioning with ``sigma_data = 1`` is v-prediction: in their variables
``y = x_t / alpha``, ``sigma~ = sigma / alpha``, ``c_in = alpha``, ``c_skip = alpha^2``,
``c_out = sigma``, and ``D = c_skip y + c_out F`` is ``to_x0("v", -F, x_t, alpha, sigma)``; their
loss ``lambda |D - x0|^2`` is the v-MSE (docs/design.md; tested in tests/test_noise_training.py).
"""
from __future__ import annotations

import torch

from ._shape import bcast

PARAMETERIZATIONS = ("eps", "x0", "v")


def check_parameterization(p: str) -> str:
    if p not in PARAMETERIZATIONS:
        raise ValueError(f"unknown parameterisation {p!r}; choose one of {', '.join(PARAMETERIZATIONS)}")
    return p


def target(p: str, x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Regression target of a network with parameterisation ``p``."""
    check_parameterization(p)
    if p == "eps":
        return eps
    if p == "x0":
        return x0
    return bcast(alpha, x0) * eps - bcast(sigma, x0) * x0


def to_x0(p: str, out: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Clean-data estimate from a network output ``out`` in parameterisation ``p``."""
    check_parameterization(p)
    if p == "x0":
        return out
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    if p == "eps":
        return (x_t - s * out) / a
    return a * x_t - s * out


def to_eps(p: str, out: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """Noise estimate from a network output ``out`` in parameterisation ``p``."""
    check_parameterization(p)
    if p == "eps":
        return out
    a, s = bcast(alpha, x_t), bcast(sigma, x_t)
    if p == "x0":
        return (x_t - a * out) / s
    return s * x_t + a * out


def x0_to_eps(x0: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """``eps = (x_t - alpha x0) / sigma``."""
    return to_eps("x0", x0, x_t, alpha, sigma)


def eps_to_x0(eps: torch.Tensor, x_t: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """``x0 = (x_t - sigma eps) / alpha``."""
    return to_x0("eps", eps, x_t, alpha, sigma)


def v_target(x0: torch.Tensor, eps: torch.Tensor, alpha, sigma) -> torch.Tensor:
    """``v = alpha eps - sigma x0``."""
    return target("v", x0, eps, alpha, sigma)


def eps_error_factor(p: str, alpha, sigma) -> torch.Tensor:
    """``c`` such that ``|native error|^2 = c * |eps error|^2`` for parameterisation ``p``.

    eps: 1; x0: ``sigma^2/alpha^2 = 1/SNR``; v: ``1/alpha^2``.
    """
    check_parameterization(p)
    alpha = torch.as_tensor(alpha)
    sigma = torch.as_tensor(sigma)
    if p == "eps":
        return torch.ones_like(alpha)
    if p == "x0":
        return sigma**2 / alpha**2
    return 1.0 / alpha**2
