"""Observing the QG model on a coarser grid (``diffkit_weather.qg_coarse``): coarse-graining is a
sharp spectral truncation without aliasing, scale splitting and refinement, and the simulator's
``observe`` / ``fine_frames``.
"""
from __future__ import annotations

import math

import pytest
import torch

from _qg_fixtures import L, Q, QC, QE


def test_coarse_grain_is_a_spectral_truncation():
    """coarse_grain keeps exactly the Fourier modes |kx|, |ky| < n_coarse/2 of the fine field,
    evaluated on the coarse cell centres; nothing above the cut folds back (no aliasing)."""
    n, nc = 64, 16
    x = (torch.arange(n, dtype=torch.float64) + 0.5) / n          # cell centres in units of L
    X = (torch.arange(nc, dtype=torch.float64) + 0.5) / nc
    wave = lambda xx, yy, i, j, ph: torch.cos(2 * math.pi * (i * xx[None, :] + j * yy[:, None]) + ph)
    kept = [(3, -5, 0.3), (7, 7, 1.1), (0, 2, 2.0), (-7, 1, 0.7)]
    cut = [(8, 0, 0.4), (0, -8, 0.2), (20, 4, 1.3), (12, -12, 0.9), (2, 8, 0.1), (3, 24, 0.5)]
    fine = sum(wave(x, x, *m) for m in kept + cut) + 0.25                  # + a domain mean
    exact = sum(wave(X, X, *m) for m in kept) + 0.25
    out = QC.coarse_grain(fine[None, None], nc)
    assert out.shape == (1, 1, nc, nc) and out.dtype == torch.float64
    torch.testing.assert_close(out[0, 0], exact, atol=1e-13, rtol=0)
    # (20, 4) sampled on the coarse grid would alias onto (4, 4): the result has no (4, 4) mode
    assert float(torch.fft.rfft2(out[0, 0], norm="forward")[4, 4].abs()) < 1e-15
    # split_scales: the same cut on the fine grid; the sub-grid part coarse-grains to zero
    res, sub = QC.split_scales(fine, nc)
    torch.testing.assert_close(res, sum(wave(x, x, *m) for m in kept) + 0.25, atol=1e-13, rtol=0)
    torch.testing.assert_close(res + sub, fine, atol=1e-14, rtol=0)
    assert float(QC.coarse_grain(sub, nc).abs().max()) < 1e-13
    # refine is its right inverse; coarse-graining onto the same grid drops only the Nyquist modes
    torch.testing.assert_close(QC.refine(exact, n), res, atol=1e-13, rtol=0)
    torch.testing.assert_close(QC.coarse_grain(QC.refine(exact, 48), nc), exact, atol=1e-13, rtol=0)
    torch.testing.assert_close(QC.coarse_grain(exact, nc), exact, atol=1e-13, rtol=0)
    for bad in (15, 2, 128, 12.5):
        with pytest.raises(ValueError, match="n_coarse must be an even integer between 4 and the simulated grid 64"):
            QC.coarse_grain(fine, bad)
    # in the simulator: the stored fields are the coarse-grained fields of the full run (q, psi and
    # u alike: the truncation commutes with the PV inversion), q_fine the full state at fine_frames
    kw = dict(nx=32, spin_up_years=0, ic_amplitude=1e-5, seed=4)
    full = Q.simulate_qg(1, 5, **kw)
    obs = Q.simulate_qg(1, 5, observe=16, fine_frames=[4, 0], **kw)
    for f in ("q", "psi", "u", "v"):
        scale = float(full[f].abs().max())
        assert obs[f].shape == (1, 5, 2, 16, 16)
        torch.testing.assert_close(obs[f], QC.coarse_grain(full[f], 16), atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(obs["q_fine"], full["q"][:, [4, 0]], atol=0, rtol=0)
    torch.testing.assert_close(obs["x"], (torch.arange(16, dtype=torch.float64) + 0.5) * L / 16)
    p = obs["params"]
    assert (p["nx"], p["nx_sim"], p["observe"], p["dx"]) == (16, 32, 16, L / 16) and "|kx|, |ky| < 8" in p["observation"]
    with pytest.raises(ValueError, match="coarse-grained"):
        QE.energy_budget(obs)
    with pytest.raises(ValueError, match="observe must be an even integer between 4 and the simulated grid 32"):
        Q.simulate_qg(1, 2, observe=64, **kw)
    with pytest.raises(ValueError, match=r"fine_frames must be recorded frame indices in \[0, 2\)"):
        Q.simulate_qg(1, 2, fine_frames=[2], **kw)
