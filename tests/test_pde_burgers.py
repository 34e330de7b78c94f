"""Tests of ``diffkit_pde.burgers``: the Burgers simulator against the Cole-Hopf exact solution
(fourth-order convergence in time, a steep front) and the Cole-Hopf helper's input check."""
from __future__ import annotations

import math

import pytest
import torch

from _pde_fixtures import P, _order


CH = dict(a0=2.0, amplitudes=[0.8, 0.5, 0.3], wavenumbers=[1, 2, 3], phases=[0.3, 1.1, 2.0])


def _burgers_errors(nu, dts, T=2.0, nx=128):
    x = torch.arange(nx, dtype=torch.float64) * 2 * math.pi / nx
    u0 = P.burgers_cole_hopf(x, 0.0, nu=nu, **CH)
    exact = P.burgers_cole_hopf(x, T, nu=nu, **CH)
    errs = []
    for dt in dts:
        r = P.simulate_burgers(1, 2, nx=nx, nu=nu, dt_out=T, dt=dt, u0=u0[None], burn_in=0)
        torch.testing.assert_close(r["u"][0, 0], u0, atol=1e-13, rtol=0)   # frame 0: the initial condition
        errs.append(float((r["u"][0, -1] - exact).norm() / exact.norm()))
    return errs


def test_burgers_matches_cole_hopf_with_fourth_order_convergence():
    dts = [0.2, 0.1, 0.05]
    errs = _burgers_errors(0.1, dts)
    p = _order(dts, errs)
    assert abs(p - 4.0) < 0.5, (p, errs)                    # measured 3.98 (errors 4.4e-7 .. 1.7e-9)
    fine = _burgers_errors(0.1, [0.0125])[0]
    assert fine < 1e-10, fine                                # measured 6.9e-12


def test_burgers_cole_hopf_steep_front():
    # phi close to zero -> a steep front (max|u| = 0.70, max|u_x| = 9.7)
    kw = dict(a0=1.01, amplitudes=[1.0], wavenumbers=[1])
    nu, nx, T = 0.05, 256, 1.0
    x = torch.arange(nx, dtype=torch.float64) * 2 * math.pi / nx
    u0 = P.burgers_cole_hopf(x, 0.0, nu=nu, **kw)
    exact = P.burgers_cole_hopf(x, T, nu=nu, **kw)
    r = P.simulate_burgers(1, 2, nx=nx, nu=nu, dt_out=T, dt=0.002, u0=u0[None], burn_in=0)
    err = float((r["u"][0, -1] - exact).norm() / exact.norm())
    assert u0.abs().max() > 0.5 and err < 1e-9, (float(u0.abs().max()), err)   # measured 1.5e-12


def test_cole_hopf_rejects_nonpositive_phi():
    with pytest.raises(ValueError, match="a0"):
        P.burgers_cole_hopf(torch.zeros(4), 0.0, nu=0.1, a0=1.0, amplitudes=[1.0], wavenumbers=[1])
