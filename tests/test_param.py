"""Tests of :mod:`diffkit.param`: the eps / x0 / v parameterisations, their conversions and error
factors, against the identities written out by hand."""
from __future__ import annotations

import pytest
import torch

from diffkit import param as P

from _references import F64


def _alpha_sigma(B, gen):
    a = 0.05 + 0.94 * torch.rand(B, generator=gen, dtype=F64)
    return a, (1 - a**2).sqrt()


def _b(v, like):
    return v[(...,) + (None,) * (like.ndim - 1)]


def test_parameterisation_round_trips(shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=F64)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    a, s = _alpha_sigma(shape[0], gen)
    x_t = _b(a, x0) * x0 + _b(s, x0) * eps
    v = _b(a, x0) * eps - _b(s, x0) * x0  # Salimans & Ho, by hand
    torch.testing.assert_close(P.v_target(x0, eps, a, s), v, rtol=1e-12, atol=1e-12)
    for p, out in (("eps", eps), ("x0", x0), ("v", v)):
        torch.testing.assert_close(P.target(p, x0, eps, a, s), out, rtol=1e-12, atol=1e-12)
        torch.testing.assert_close(P.to_x0(p, out, x_t, a, s), x0, rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(P.to_eps(p, out, x_t, a, s), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P.x0_to_eps(x0, x_t, a, s), eps, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(P.eps_to_x0(eps, x_t, a, s), x0, rtol=1e-9, atol=1e-9)
    # v identities: x0 = a x_t - s v, eps = s x_t + a v
    torch.testing.assert_close(_b(a, x0) * x_t - _b(s, x0) * v, x0, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(_b(s, x0) * x_t + _b(a, x0) * v, eps, rtol=1e-9, atol=1e-9)
    # scalar (0-d) alpha/sigma broadcast too
    a0, s0 = torch.tensor(0.6, dtype=F64), torch.tensor(0.8, dtype=F64)
    xt0 = 0.6 * x0 + 0.8 * eps
    torch.testing.assert_close(P.to_x0("v", P.target("v", x0, eps, a0, s0), xt0, a0, s0), x0, rtol=1e-9, atol=1e-9)


def test_eps_error_factor_identities(shape, gen):
    x0 = torch.randn(shape, generator=gen, dtype=F64)
    eps = torch.randn(shape, generator=gen, dtype=F64)
    a, s = _alpha_sigma(shape[0], gen)
    x_t = _b(a, x0) * x0 + _b(s, x0) * eps
    sq = lambda e: (e**2).reshape(shape[0], -1).sum(1)
    for p in P.PARAMETERIZATIONS:
        delta = 0.1 * torch.randn(shape, generator=gen, dtype=F64)
        out_hat = P.target(p, x0, eps, a, s) + delta  # a wrong prediction in native space
        eps_hat = P.to_eps(p, out_hat, x_t, a, s)
        x0_hat = P.to_x0(p, out_hat, x_t, a, s)
        e_eps = sq(eps - eps_hat)
        torch.testing.assert_close(sq(delta), P.eps_error_factor(p, a, s) * e_eps, rtol=1e-8, atol=1e-14)
        # in any space: |x0 err|^2 = |eps err|^2 / SNR and |v err|^2 = |eps err|^2 / alpha^2
        torch.testing.assert_close(sq(x0 - x0_hat), e_eps * s**2 / a**2, rtol=1e-8, atol=1e-14)
        v_hat = P.v_target(x0_hat, eps_hat, a, s)
        torch.testing.assert_close(sq(P.v_target(x0, eps, a, s) - v_hat), e_eps / a**2, rtol=1e-8, atol=1e-14)
    assert float(P.eps_error_factor("x0", torch.tensor(0.6), torch.tensor(0.8))) == pytest.approx(0.64 / 0.36)
    assert float(P.eps_error_factor("v", torch.tensor(0.6), torch.tensor(0.8))) == pytest.approx(1 / 0.36)


def test_unknown_parameterisation_raises():
    with pytest.raises(ValueError, match="eps, x0, v"):
        P.check_parameterization("score")
    with pytest.raises(ValueError):
        P.to_x0("score", torch.zeros(2), torch.zeros(2), 0.5, 0.5)
