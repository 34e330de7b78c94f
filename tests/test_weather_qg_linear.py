"""QG linear theory (``diffkit_weather.qg_linear``): Phillips' closed form and the critical shear of
the baroclinic instability, the fastest mode of the default configuration.  (That the nonlinear
model grows normal modes at these rates is tested in test_weather_qg.py.)
"""
from __future__ import annotations

import numpy as np
import pytest

from _qg_fixtures import L, QL


def test_linear_modes_match_phillips_closed_form():
    # beta = 0, equal layers, no drag: c = U_mean +- dU/2 sqrt((K^2 - 2F)/(K^2 + 2F)), F = 1/(2 rd^2)
    rd, dU = 15e3, 0.025
    F = 1.0 / (2 * rd ** 2)
    k = np.linspace(1e-6, 1.3 / rd, 9)
    l = 0.3 * k
    K2 = k ** 2 + l ** 2
    m = QL.linear_modes(k, l, beta=0.0, delta=1.0, rek=0.0, U1=dU, U2=0.0)
    exact = k * dU / 2 * np.sqrt(np.clip((2 * F - K2) / (K2 + 2 * F), 0, None))
    np.testing.assert_allclose(m["growth_rate"], exact, rtol=1e-10, atol=1e-20)
    unstable = exact > 0
    np.testing.assert_allclose(m["phase_speed"][unstable].real, dU / 2, rtol=1e-10)
    np.testing.assert_allclose(m["phase_speed"].imag * k, m["growth_rate"], rtol=1e-12, atol=1e-20)


def test_instability_needs_supercritical_shear():
    # inviscid two-layer model: unstable iff the lower-layer PV gradient beta - F2 dU changes sign
    beta, rd, delta = 1.5e-11, 15e3, 0.25
    F2 = delta / (rd ** 2 * (1 + delta))
    k = np.linspace(1e-7, 3e-4, 20001)
    for f, unstable in ((0.97, False), (0.995, False), (1.005, True), (1.03, True)):
        g = QL.linear_growth_rate(k, 0 * k, rek=0.0, U1=f * beta / F2)
        assert (g.max() > 1e-9) == unstable, (f, g.max())
    # the default (pyqg) configuration is 1.48 x critical; the fastest mode on the L = 1e6 m
    # domain is zonal wavenumber 7 (wavelength 143 km), e-folding in ~150 days with drag
    n = np.arange(1, 32)
    g = QL.linear_growth_rate(2 * np.pi * n[None, :] / L, 2 * np.pi * np.arange(-31, 32)[:, None] / L, nx=64)
    j, i = np.unravel_index(np.argmax(g), g.shape)
    assert (n[i], j - 31) == (7, 0)
    assert g.max() == pytest.approx(7.795e-8, rel=1e-3)
    # drag and the filter only damp: the inviscid rate is larger
    assert QL.linear_growth_rate(2 * np.pi * 7 / L, 0.0, rek=0.0) > g.max()
