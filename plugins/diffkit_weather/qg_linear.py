"""Linear theory of the two-layer QG model: the normal modes of the linearised equations (the
Phillips problem with beta, bottom drag and, given a grid, pyqg's filter), their growth rates (the
baroclinic instability) and PV fields made of them, which :func:`diffkit_weather.qg.simulate_qg`
evolves at those rates while they are small (the tests check it).
"""
from __future__ import annotations

import math
from typing import Sequence

import numpy as np
import torch

from .qg_model import _filter_rate, _params


def linear_modes(k, l, *, beta: float = 1.5e-11, rd: float = 15e3, delta: float = 0.25,
                 U1: float = 0.025, U2: float = 0.0, rek: float = 5.787e-7, nx: int | None = None,
                 L: float = 1e6, filterfac: float = 23.6, filter_timescale: float = 7200.0) -> dict:
    """Normal modes ``psi_n = Re[psi_hat_n exp(i(k x + l y) + lam t)]`` of the linearised model.

    Per wavenumber (``k``, ``l`` in rad/m, broadcast) the generalised 2x2 eigenproblem
    ``lam M psi = B psi`` with ``M = [[-K^2 - F1, F1], [F2, -K^2 - F2]]`` (so ``q = M psi``) and
    ``B = -i k diag(U) M - i k diag(Qy) + diag(0, rek K^2)``, minus the filter rate
    ``sigma(K)`` when ``nx`` is given (the grid spacing ``L/nx`` enters pyqg's filter).  The
    bottom drag is included (``rek=0`` gives the inviscid Phillips/Flierl problem, whose
    eigenvalues are ``-i k c`` with the classic phase speeds ``c``).
    Returns a dict with ``eigenvalues`` (..., 2) complex (s^-1, the faster-growing first),
    ``growth_rate`` = ``Re lam`` of the first, ``phase_speed`` ``c = i lam / k`` (m/s; its
    imaginary part times ``k`` is the growth rate) and ``psi`` (..., 2) the layer structure of the
    fastest mode (normalised to ``|psi_1| = 1`` when possible).
    """
    k, l = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(l, dtype=np.float64))
    K2 = k ** 2 + l ** 2
    F1 = 1.0 / (rd ** 2 * (1.0 + delta))
    F2 = delta * F1
    Qy = np.array([beta + F1 * (U1 - U2), beta - F2 * (U1 - U2)])
    U = np.array([U1, U2])
    ok = K2 > 0
    K2s = np.where(ok, K2, 1.0)
    M = np.empty(k.shape + (2, 2))
    M[..., 0, 0], M[..., 0, 1] = -K2s - F1, F1
    M[..., 1, 0], M[..., 1, 1] = F2, -K2s - F2
    B = -1j * k[..., None, None] * (U[:, None] * M + np.diag(Qy))
    B[..., 1, 1] += rek * K2s
    A = np.linalg.solve(M, B)
    if nx is not None:
        sig = _filter_rate(np.sqrt(K2s), L / nx, filterfac, filter_timescale)
        A = A - sig[..., None, None] * np.eye(2)
    lam, vec = np.linalg.eig(A)
    order = np.argsort(-lam.real, axis=-1)
    lam = np.take_along_axis(lam, order, -1)
    vec = np.take_along_axis(vec, order[..., None, :], -1)
    v = vec[..., :, 0]
    v = v / np.where(np.abs(v[..., :1]) > 1e-300, v[..., :1], 1.0)
    lam = np.where(ok[..., None], lam, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(k != 0, 1j * lam[..., 0] / np.where(k != 0, k, 1.0), np.nan + 0j)
    return {"eigenvalues": lam, "growth_rate": lam[..., 0].real, "phase_speed": c, "psi": v}


def normal_mode_pv(nx: int, modes: Sequence[tuple[int, int]], amplitude: float | Sequence[float] = 1.0, *,
                   phase: float | Sequence[float] = 0.0, L: float = 1e6, **kw) -> torch.Tensor:
    """PV (2, nx, nx) (float64, axes layer, y, x) of a sum of fastest-growing normal modes.

    ``modes``: integer wavenumber pairs ``(i, j)`` (``k = 2 pi i / L``, ``l = 2 pi j / L``,
    ``|i|, |j| < nx/2``); mode ``m`` has upper-layer streamfunction ``amplitude_m cos(k x' + l y'
    + phase_m)`` (m^2/s; ``x'``, ``y'`` measured from grid point 0) and the layer structure of
    :func:`linear_modes` (``kw``: its model parameters).  Each grows as ``exp(growth_rate t)``
    under :func:`~diffkit_weather.qg.simulate_qg` with the same parameters while the amplitude is
    small.
    """
    n = int(nx)
    amps = np.broadcast_to(np.asarray(amplitude, dtype=np.float64), (len(modes),))
    phs = np.broadcast_to(np.asarray(phase, dtype=np.float64), (len(modes),))
    p = _params(n, L, kw.get("beta", 1.5e-11), kw.get("rd", 15e3), kw.get("delta", 0.25), 500.0,
                kw.get("U1", 0.025), kw.get("U2", 0.0), kw.get("rek", 5.787e-7),
                kw.get("filterfac", 23.6), kw.get("filter_timescale", 7200.0))
    F1, F2 = p["F1"], p["F2"]
    qh = torch.zeros(2, n, n // 2 + 1, dtype=torch.complex128)
    for (i, j), a, ph in zip(modes, amps, phs):
        i, j = int(i), int(j)
        if i < 0 or (i == 0 and j < 0):
            i, j = -i, -j                      # the same real mode
        if (i, j) == (0, 0) or abs(i) >= n // 2 or abs(j) >= n // 2:
            raise ValueError(f"mode {(i, j)} must be nonzero with |i|, |j| < nx/2 = {n // 2}")
        k, l = 2 * math.pi * i / p["L"], 2 * math.pi * j / p["L"]
        psi = linear_modes(k, l, nx=n, L=p["L"], **kw)["psi"]
        K2 = k * k + l * l
        q = np.array([(-K2 - F1) * psi[0] + F1 * psi[1], F2 * psi[0] + (-K2 - F2) * psi[1]])
        c = torch.as_tensor(0.5 * a * np.exp(1j * ph) * q)
        qh[:, j % n, i] += c
        if i == 0:
            qh[:, (-j) % n, 0] += c.conj()
    return torch.fft.irfft2(qh, s=(n, n), norm="forward")


def linear_growth_rate(k, l, **kw) -> np.ndarray:
    """Growth rate (s^-1) of the linear baroclinic instability at wavenumber (``k``, ``l``) rad/m:
    ``max Re lam`` over the two normal modes, i.e. ``k max Im c`` (see :func:`linear_modes` for the
    keywords; drag included by default, the filter when ``nx`` is given).  Negative when stable
    with drag, 0 where neutral and inviscid."""
    return linear_modes(k, l, **kw)["growth_rate"]
