"""The two-layer QG model's equations on the grid: its parameters, pyqg's filter as a damping rate
and the spectral operators (PV inversion, the linear terms, the dealiased Jacobian).

The equations, units, conventions and the time stepping are described in :mod:`diffkit_weather.qg`
(the simulator); the linear theory (:mod:`~diffkit_weather.qg_linear`) and the energy budget
(:mod:`~diffkit_weather.qg_energy`) use the same parameters and operators.

- **Space**: Fourier pseudo-spectral; PV inversion by the exact 2x2 solve per wavenumber; the
  Nyquist row/column are zero.  The Jacobian is computed in advective form ``u q_x + v q_y`` on a
  zero-padded ``3/2 nx`` grid (the 3/2 rule), so it is free of aliasing: the discrete model is a
  Galerkin truncation that conserves energy and enstrophy exactly under the Jacobian, which makes
  the energy budget (:func:`~diffkit_weather.qg_energy.energy_budget`) close with no "numerical"
  term other than the filter.
  (pyqg does not dealias; it relies on its filter.  The 3/2 rule keeps all of pyqg's modes.)
- **Small-scale dissipation**: pyqg's exponential spectral filter, ``filtr(K) =
  exp(-filterfac (K dx - 0.65 pi)^4)`` for ``K dx > 0.65 pi`` (``filterfac = 23.6``), which
  pyqg multiplies into ``q`` after every ``dt = 7200 s`` step.  Here it is the equivalent linear
  damping rate ``sigma(K) = -ln(filtr(K)) / filter_timescale`` (``filter_timescale = 7200 s``):
  the same damping per 2 h as pyqg, but a property of the equations rather than of the step, so
  results converge as ``dt -> 0`` and the filter's energy loss is a well-defined budget term.
  ``filterfac=0`` switches it off.
"""
from __future__ import annotations

import math

import numpy as np
import torch

CPHI = 0.65 * math.pi          # pyqg's filter cut-off (in K dx)

#: pyqg's two-layer reference configuration (``pyqg.QGModel`` defaults), SI units
DEFAULTS: dict[str, float] = dict(nx=64, L=1e6, beta=1.5e-11, rd=15e3, delta=0.25, H1=500.0,
                                  U1=0.025, U2=0.0, rek=5.787e-7, filterfac=23.6,
                                  filter_timescale=7200.0)


def _cdtype(dtype):
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _params(nx, L, beta, rd, delta, H1, U1, U2, rek, filterfac, filter_timescale) -> dict:
    p = dict(nx=int(nx), L=float(L), beta=float(beta), rd=float(rd), delta=float(delta), H1=float(H1),
             U1=float(U1), U2=float(U2), rek=float(rek), filterfac=float(filterfac),
             filter_timescale=float(filter_timescale))
    if p["nx"] < 8 or p["nx"] % 2:
        raise ValueError(f"nx must be an even integer >= 8, got {nx}")
    for k in ("L", "rd", "delta", "H1", "filter_timescale"):
        if not (p[k] > 0 and math.isfinite(p[k])):
            raise ValueError(f"{k} must be positive and finite, got {p[k]}")
    for k in ("rek", "filterfac"):
        if not p[k] >= 0:
            raise ValueError(f"{k} must be >= 0, got {p[k]}")
    p["H2"] = p["H1"] / p["delta"]
    p["H"] = p["H1"] + p["H2"]
    p["F1"] = 1.0 / (p["rd"] ** 2 * (1.0 + p["delta"]))
    p["F2"] = p["delta"] * p["F1"]
    p["Qy1"] = p["beta"] + p["F1"] * (p["U1"] - p["U2"])
    p["Qy2"] = p["beta"] - p["F2"] * (p["U1"] - p["U2"])
    p["dx"] = p["L"] / p["nx"]
    return p


def _filter_rate(K: torch.Tensor | np.ndarray, dx: float, filterfac: float, filter_timescale: float):
    """pyqg's filter as a damping rate: ``filterfac (K dx - 0.65 pi)^4 / filter_timescale`` above
    ``K dx = 0.65 pi``, else 0 (``exp(-rate * filter_timescale)`` is pyqg's ``filtr``)."""
    lib = torch if isinstance(K, torch.Tensor) else np
    x = lib.clip(K * dx - CPHI, 0.0, None) if lib is np else torch.clamp(K * dx - CPHI, min=0.0)
    return filterfac * x ** 4 / filter_timescale


def _rfft_weights(n: int) -> torch.Tensor:
    """Parseval weights over the last (rfft) axis: 1 at kx = 0 and Nyquist, 2 elsewhere."""
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    w[-1] = 1.0
    return w


class _Spectral:
    """Wavenumbers, PV inversion, linear operators and the dealiased Jacobian on an ``nx^2`` grid.

    Spectral arrays are ``rfft2`` over (y, x) with ``norm="forward"`` (coefficients are Fourier
    amplitudes), shape ``(..., 2, nx, nx//2 + 1)``: rows ``ky``, columns ``kx >= 0``.
    """

    def __init__(self, p: dict, device, dtype):
        n = p["nx"]
        self.n, self.m, self.h = n, 3 * n // 2, n // 2
        self.device, self.dtype, self.cdt = device, dtype, _cdtype(dtype)
        c = 2 * math.pi / p["L"]
        kx = c * torch.arange(n // 2 + 1, dtype=torch.float64)[None, :]
        ky = c * torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
        iy = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
        mask = (torch.arange(n // 2 + 1)[None, :] < n // 2) & (iy.abs() < n // 2)    # no Nyquist
        K2 = kx ** 2 + ky ** 2
        F1, F2 = p["F1"], p["F2"]
        det = K2 * (K2 + F1 + F2)
        inv = torch.where(K2 > 0, 1.0 / torch.where(K2 > 0, det, torch.ones_like(det)), torch.zeros_like(det))
        inv = inv * mask
        self.kx64, self.ky64, self.K2_64, self.mask64 = kx, ky, K2, mask
        self.sigma64 = _filter_rate(K2.sqrt(), p["dx"], p["filterfac"], p["filter_timescale"]) * mask
        # psi = A q with A = M^-1, M = [[-K2 - F1, F1], [F2, -K2 - F2]]
        self.A64 = torch.stack((torch.stack((-(K2 + F2) * inv, -F1 * inv)),
                                torch.stack((-F2 * inv, -(K2 + F1) * inv))))          # (2, 2, n, nk)
        U = torch.tensor([p["U1"], p["U2"]], dtype=torch.float64)[:, None, None]
        Qy = torch.tensor([p["Qy1"], p["Qy2"]], dtype=torch.float64)[:, None, None]
        drag = torch.stack((torch.zeros_like(K2), p["rek"] * K2))                    # + rek K2 psi2
        self.Lq64 = -1j * kx * U                                                     # times q
        self.Lbg64 = -1j * kx * Qy                                                   # times psi
        self.Lpsi64 = self.Lbg64 + drag                                              # times psi
        self.drag64 = drag
        to = lambda t: t.to(device=device, dtype=self.cdt if t.is_complex() else dtype)
        self.A = to(self.A64)
        self.Lq, self.Lpsi = to(self.Lq64 * mask), to(self.Lpsi64 * mask)
        self.mask = mask.to(device)
        self.ikx = to(1j * kx + 0j)
        self.iky = to(1j * ky + 0j)
        self.weights = _rfft_weights(n)

    # -- transforms
    def fft(self, f: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(f, norm="forward") * self.mask

    def ifft(self, fh: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(fh, s=(self.n, self.n), norm="forward")

    def psi(self, qh: torch.Tensor) -> torch.Tensor:
        A = self.A
        q1, q2 = qh[..., 0, :, :], qh[..., 1, :, :]
        return torch.stack((A[0, 0] * q1 + A[0, 1] * q2, A[1, 0] * q1 + A[1, 1] * q2), -3)

    def _resize(self, a: torch.Tensor, m: int) -> torch.Tensor:
        """The modes ``|kx|, |ky| < h`` of a half spectrum ``a`` (``n`` or ``3n/2`` grid) on an ``m``
        grid: zero-padding (``m = 3n/2``) or truncation (``m = n``) for the 3/2 rule."""
        n, h = a.shape[-2], self.h
        out = a.new_zeros(*a.shape[:-2], m, m // 2 + 1)
        out[..., :h, :h] = a[..., :h, :h]
        out[..., m - h + 1:, :h] = a[..., n - h + 1:, :h]
        return out

    def jacobian(self, qh: torch.Tensor, ph: torch.Tensor) -> torch.Tensor:
        """``J(psi, q) = u q_x + v q_y`` (spectral, dealiased by the 3/2 rule)."""
        spec = torch.stack((-self.iky * ph, self.ikx * ph, self.ikx * qh, self.iky * qh))
        f = torch.fft.irfft2(self._resize(spec, self.m), s=(self.m, self.m), norm="forward")
        return self._resize(torch.fft.rfft2(f[0] * f[2] + f[1] * f[3], norm="forward"), self.n)

    def rhs(self, qh: torch.Tensor) -> torch.Tensor:
        """Everything but the filter: ``-J - U q_x - Qy psi_x + drag`` (spectral)."""
        ph = self.psi(qh)
        return self.Lq * qh + self.Lpsi * ph - self.jacobian(qh, ph)

    def velocities(self, ph: torch.Tensor) -> torch.Tensor:
        """(2, ..., 2, n, n): eddy ``u = -psi_y`` and ``v = psi_x`` in physical space."""
        return self.ifft(torch.stack((-self.iky * ph, self.ikx * ph)))
