"""Tests of ``diffkit_pde.kolmogorov``: Kolmogorov flow against Taylor-Green decay and its energy
budget, a divergence-free velocity matching the vorticity, time convergence and block coarsening,
and a resolution-independent initial condition.  The small grids under-resolve Re = 1000 on
purpose (``coarse_ns``): the checks are of the discrete system."""
from __future__ import annotations

import math

import pytest
import torch

from _pde_fixtures import P, _order, coarse_ns


def test_taylor_green_decays_exactly():
    nu, n = 1e-3, 32
    om0 = P.taylor_green_vorticity(n, nu=nu)
    for drag in (0.0, 0.1):
        r = P.simulate_kolmogorov(1, 2, n_sim=n, n_out=n, dt_out=1.0, omega0=om0[None], nu=nu,
                                  drag=drag, forcing_amplitude=0.0, burn_in=0)
        exact = P.taylor_green_vorticity(n, 1.0, nu=nu, drag=drag)   # 2 cos x cos y exp(-(2 nu + drag) t)
        assert float((r["omega"][0, -1] - exact).abs().max()) < 1e-12
        x = torch.arange(n, dtype=torch.float64) * 2 * math.pi / n
        decay = math.exp(-(2 * nu + drag))
        torch.testing.assert_close(r["u"][0, -1], -torch.cos(x)[:, None] * torch.sin(x)[None, :] * decay,
                                   atol=1e-12, rtol=0)
        torch.testing.assert_close(r["v"][0, -1], torch.sin(x)[:, None] * torch.cos(x)[None, :] * decay,
                                   atol=1e-12, rtol=0)


@pytest.fixture(scope="module")
def kolmogorov_short():
    # n_sim = 96 -> n_out = 64 keeps every dealiased mode (|k| < 32): the budget is exact
    return P.simulate_kolmogorov(2, 41, n_sim=96, n_out=64, dt_out=0.01, burn_in=0.0, seed=1,
                                 rms_velocity=2.0, resolution_tol=None)


def test_kolmogorov_energy_budget_closes(kolmogorov_short):
    r = kolmogorov_short
    b = P.kolmogorov_energy_budget(r)
    E, tau = b["energy"], r["dt"]
    scale = torch.stack([b["forcing_power"], b["dissipation"], b["drag_loss"]]).abs().amax(0)
    assert float(b["forcing_power"].abs().min()) > 0.01 and float(b["dissipation"].min()) > 0.01
    dE2 = (E[:, 2:] - E[:, :-2]) / (2 * tau)                 # centred difference, O(tau^2)
    rel2 = float(((dE2 - b["dEdt"][:, 1:-1]).abs() / scale[:, 1:-1]).max())
    dE4 = (-E[:, 4:] + 8 * E[:, 3:-1] - 8 * E[:, 1:-3] + E[:, :-4]) / (12 * tau)   # O(tau^4)
    rel4 = float(((dE4 - b["dEdt"][:, 2:-2]).abs() / scale[:, 2:-2]).max())
    assert rel2 < 1e-3 and rel4 < 1e-5, (rel2, rel4)        # measured 1.4e-4 and 2.8e-7
    # the budget terms agree with their physical-space definitions
    yy = r["y"]
    P_phys = (r["u"] * torch.sin(4 * yy)).mean((-2, -1))
    torch.testing.assert_close(b["forcing_power"], P_phys, atol=1e-12, rtol=0)
    torch.testing.assert_close(E, 0.5 * (r["u"] ** 2 + r["v"] ** 2).mean((-2, -1)), atol=1e-12, rtol=0)
    torch.testing.assert_close(b["dissipation"], r["params"]["nu"] * (r["omega"] ** 2).mean((-2, -1)),
                               atol=1e-12, rtol=0)


def test_kolmogorov_velocity_is_divergence_free_and_matches_vorticity(kolmogorov_short):
    r = kolmogorov_short
    assert r["state"].shape == (2, 41, 2, 64, 64)
    div = P.spectral_divergence(r["u"], r["v"])
    assert float(div.abs().max()) < 1e-12 * max(1.0, float(r["u"].abs().max()))
    # omega = dv/dx - du/dy
    n = 64
    k = torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    kx, ky = k[:, None], torch.fft.rfftfreq(n, 1.0 / n, dtype=torch.float64)[None, :]
    curl = torch.fft.irfft2(1j * kx * torch.fft.rfft2(r["v"]) - 1j * ky * torch.fft.rfft2(r["u"]), s=(n, n))
    torch.testing.assert_close(curl, r["omega"], atol=1e-11, rtol=0)


@coarse_ns
def test_kolmogorov_time_convergence_and_block_coarsening():
    om0 = P.kolmogorov_initial_vorticity(1, 32, seed=5, rms_velocity=1.0)
    run = lambda dt, **kw: P.simulate_kolmogorov(1, 2, n_sim=32, n_out=32, dt_out=0.5, dt=dt, omega0=om0,
                                                 burn_in=0, **kw)["omega"][0, -1]
    ref = run(0.04 / 32)
    dts = [0.04, 0.02, 0.01]
    errs = [float((run(dt) - ref).norm() / ref.norm()) for dt in dts]
    assert abs(_order(dts, errs) - 4.0) < 0.5, errs
    rb = P.simulate_kolmogorov(1, 2, n_sim=64, n_out=32, dt_out=0.1, omega0=om0, burn_in=0, coarsen="block")
    rs = P.simulate_kolmogorov(1, 2, n_sim=64, n_out=32, dt_out=0.1, omega0=om0, burn_in=0)
    # the block mean of a smooth field is close to the field at the block centre
    assert float((rb["x"][1] - rb["x"][0]) - 2 * math.pi / 32) < 1e-12 and float(rb["x"][0]) > 0
    assert rb["state"].shape == rs["state"].shape == (1, 2, 2, 32, 32)


@coarse_ns
def test_kolmogorov_initial_condition_is_resolution_independent():
    a = P.kolmogorov_initial_vorticity(2, 64, seed=7)
    b = P.kolmogorov_initial_vorticity(2, 128, seed=7)
    torch.testing.assert_close(a, b[:, ::2, ::2], atol=1e-12, rtol=0)
    u = P.simulate_kolmogorov(2, 1, n_sim=64, n_out=64, seed=7, burn_in=0, rms_velocity=1.0)
    assert float((u["u"] ** 2 + u["v"] ** 2).mean().sqrt()) == pytest.approx(1.0, rel=1e-9)
