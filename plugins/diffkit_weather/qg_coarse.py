"""Observing the QG model on a coarser grid: sharp spectral truncation and its inverse.

The benchmark's state is the fine model's state coarse-grained onto a coarser grid
(:func:`coarse_grain`), so the sub-grid scales are unseen and the next observed state is uncertain
given the current one.  :func:`split_scales` separates resolved and sub-grid scales on the fine
grid; :func:`refine` evaluates a coarse field on a finer grid.  Pure spectral operations on
``(..., n, n)`` tensors; no model dynamics here (those are in :mod:`diffkit_weather.qg`).
"""
from __future__ import annotations

import math

import torch


# ----------------------------------------------------------------------------- observation: coarse-graining
def _signed(n: int) -> torch.Tensor:
    """Signed integer wavenumbers of an ``n``-point FFT axis (0, 1, ..., -1)."""
    return torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)


def _check_coarse(n_fine: int, n_coarse, what: str = "n_coarse") -> int:
    try:
        nc = int(n_coarse)
    except (TypeError, ValueError):
        raise ValueError(f"{what} must be an even integer, got {n_coarse!r}") from None
    if nc != n_coarse or nc < 4 or nc % 2 or nc > n_fine:
        raise ValueError(f"{what} must be an even integer between 4 and the simulated grid {n_fine}, "
                         f"got {n_coarse!r}")
    return nc


def resolved_mask(n_fine: int, n_coarse: int, device=None) -> torch.Tensor:
    """(n_fine, n_fine//2 + 1) bool: the ``rfft2`` modes of an ``n_fine^2`` grid that an
    ``n_coarse^2`` grid resolves, ``|kx| < n_coarse/2`` and ``|ky| < n_coarse/2`` (integer
    wavenumbers; the coarse grid's Nyquist row and column are excluded, as in the model itself)."""
    h = n_coarse // 2
    ky = _signed(n_fine).abs()[:, None]
    kx = torch.arange(n_fine // 2 + 1, dtype=torch.float64)[None, :]
    return ((ky < h) & (kx < h)).to(device)


def split_scales(f, n_coarse: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``f`` (..., n, n) on an ``n^2`` grid as ``(resolved, subgrid)``, both on the same grid, with
    ``resolved + subgrid = f``: ``resolved`` keeps the modes ``|kx|, |ky| < n_coarse/2`` of
    ``f``'s ``rfft2`` (see :func:`coarse_grain`), ``subgrid`` is the rest (including the domain
    mean only if ``f`` has one: the model's PV has none)."""
    f = torch.as_tensor(f)
    n = f.shape[-1]
    if f.ndim < 2 or f.shape[-2] != n:
        raise ValueError(f"split_scales needs square fields (..., n, n), got shape {tuple(f.shape)}")
    nc = _check_coarse(n, n_coarse)
    c = torch.fft.rfft2(f, norm="forward") * resolved_mask(n, nc, f.device)
    res = torch.fft.irfft2(c, s=(n, n), norm="forward").to(f.dtype)
    return res, f - res


def coarse_grain(f, n_coarse: int) -> torch.Tensor:
    """Observe ``f`` (..., n, n), a field on the cell centres ``x_i = (i + 1/2) L/n`` of an
    ``n^2`` grid, on the cell centres ``X_j = (j + 1/2) L/n_coarse`` of an ``n_coarse^2`` grid by
    a sharp spectral truncation (de-aliased):

        c_k = rfft2(f, norm="forward")                          (Fourier amplitudes)
        F(X) = sum_{|kx|, |ky| < n_coarse/2} c_k exp(i k . (X - x_0) 2 pi / L)

    i.e. the Fourier series of ``f`` cut to the wavenumbers the coarse grid resolves (its
    Nyquist row and column excluded, so nothing above the cut is folded back: no aliasing),
    evaluated exactly at the coarse grid's points.  The grids' first points differ (``x_0 =
    L/2n`` vs ``L/2n_coarse``), which is the phase factor ``exp(i pi k (1/n_coarse - 1/n))``
    per axis.  Linear, so it commutes with the PV inversion and the velocities (the coarse
    ``psi`` of the coarse ``q`` equals the coarse-grained ``psi``); the result is a valid state
    of the ``n_coarse^2`` model (same mask), and ``coarse_grain(f, n)`` returns ``f`` without
    its Nyquist modes.  No smoothing other than the cut; the domain mean is kept.  Returns
    (..., n_coarse, n_coarse) in ``f``'s dtype/device (float64 inside).
    """
    f = torch.as_tensor(f)
    n = f.shape[-1]
    if f.ndim < 2 or f.shape[-2] != n:
        raise ValueError(f"coarse_grain needs square fields (..., n, n), got shape {tuple(f.shape)}")
    return _resample(f, _check_coarse(n, n_coarse))


def refine(f, n_fine: int) -> torch.Tensor:
    """The inverse of :func:`coarse_grain`'s grid change: ``f`` (..., n, n) evaluated on the cell
    centres of an ``n_fine^2`` grid (``n_fine >= n``, even) by its Fourier series (modes
    ``|kx|, |ky| < n/2``; zero above), so ``coarse_grain(refine(f, m), n) == f`` for a model
    state ``f``.  E.g. to spin a fine model up cheaply: equilibrate on a coarse grid, refine,
    then let the small scales adjust for a few months on the fine grid."""
    f = torch.as_tensor(f)
    n = f.shape[-1]
    if f.ndim < 2 or f.shape[-2] != n:
        raise ValueError(f"refine needs square fields (..., n, n), got shape {tuple(f.shape)}")
    if int(n_fine) != n_fine or n_fine % 2 or n_fine < n:
        raise ValueError(f"n_fine must be an even integer >= the grid {n}, got {n_fine!r}")
    return _resample(f, int(n_fine))


def _resample(f: torch.Tensor, m: int) -> torch.Tensor:
    """``f`` (..., n, n) on cell centres, as its Fourier series cut to ``|k| < min(n, m)/2``,
    evaluated on the cell centres of an ``m^2`` grid."""
    n = f.shape[-1]
    h = min(n, m) // 2
    c = torch.fft.rfft2(f.to(torch.float64), norm="forward")
    s = 1.0 / m - 1.0 / n
    ky = torch.cat((torch.arange(h), torch.arange(-h + 1, 0)))               # kept rows, signed
    shift_y = torch.exp(1j * math.pi * s * ky.to(torch.float64))[:, None]
    shift_x = torch.exp(1j * math.pi * s * torch.arange(h, dtype=torch.float64))[None, :]
    out = torch.zeros(*c.shape[:-2], m, m // 2 + 1, dtype=c.dtype, device=c.device)
    out[..., (ky % m).to(c.device), :h] = c[..., (ky % n).to(c.device), :h] * (shift_y * shift_x).to(c.device)
    return torch.fft.irfft2(out, s=(m, m), norm="forward").to(f.dtype)
