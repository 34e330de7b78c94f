"""The QG model's spectral operators (``diffkit_weather.qg_model``): the stored ``psi``, ``u``, ``v``
and ``q`` of a finite-amplitude run are related as the equations say (``u = -psi_y``, ``v = psi_x``,
``q_n = Lap psi_n + F_n (psi_m - psi_n)``), computed here with full complex FFTs, independently of
the model's real-FFT operators.
"""
from __future__ import annotations

import math

import pytest
import torch

from _qg_fixtures import L, finite_amplitude_run  # noqa: F401  (a fixture)


def test_fields_are_consistent(finite_amplitude_run):
    r = finite_amplitude_run
    p = r["params"]
    n = p["nx"]
    k = 2 * math.pi / L * torch.fft.fftfreq(n, 1.0 / n, dtype=torch.float64)
    kx, ky = k[None, :], k[:, None]              # arrays are (y, x)
    d = lambda f, kk: torch.fft.ifft2(1j * kk * torch.fft.fft2(f)).real
    psi = r["psi"][0, -1]
    torch.testing.assert_close(r["u"][0, -1], -d(psi, ky), atol=1e-12, rtol=0)
    torch.testing.assert_close(r["v"][0, -1], d(psi, kx), atol=1e-12, rtol=0)
    lap = torch.fft.ifft2(-(kx ** 2 + ky ** 2) * torch.fft.fft2(psi)).real
    q1 = lap[0] + p["F1"] * (psi[1] - psi[0])
    q2 = lap[1] + p["F2"] * (psi[0] - psi[1])
    scale = float(r["q"][0, -1].abs().max())
    torch.testing.assert_close(r["q"][0, -1], torch.stack((q1, q2)), atol=1e-10 * scale, rtol=0)
    torch.testing.assert_close(r["q_final"][0], r["q"][0, -1], atol=0, rtol=0)
    assert r["x"][0] == pytest.approx(L / n / 2) and float(r["x"][1] - r["x"][0]) == pytest.approx(L / n)
