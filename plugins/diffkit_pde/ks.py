"""Kuramoto--Sivashinsky ``u_t + u u_x + u_xx + u_xxxx = 0`` (LPSDA / PDE-Refiner setup), ETDRK4.

``L = 64`` varied by +-10 % per trajectory, ``nx = 256``, output every ``0.2``, random-sine
initial conditions, burn-in discarded.  Conventions: :mod:`diffkit_pde.conventions`; stability
check: :mod:`diffkit_pde.stability`.
"""
from __future__ import annotations

from typing import Sequence

import torch

from .conventions import _n_burn
from .periodic1d import _finish_1d, _prep_1d, _simulate_1d


def simulate_ks(n_traj: int, n_steps: int, *, nx: int = 256, L: float | Sequence[float] = 64.0,
                L_jitter: float = 0.1, dt_out: float = 0.2, dt_jitter: float = 0.0, dt: float = 0.05,
                burn_in: float = 100.0, seed: int = 0, u0: torch.Tensor | None = None,
                n_modes: int = 10, l_min: int = 1, l_max: int = 3, amplitude: float = 0.5,
                dealias: bool = False, cfl_max: float | None = None, n_contour: int = 32,
                resolution_tol: float | None = 1e-3, device=None, dtype=None,
                progress: bool = False) -> dict:
    """Kuramoto--Sivashinsky ``u_t + u u_x + u_xx + u_xxxx = 0`` on ``[0, L_i)``, periodic, ETDRK4.

    LPSDA / PDE-Refiner setup: per trajectory ``L_i = L (1 + L_jitter U[-1, 1])`` (scalar ``L``;
    pass a sequence to fix them), ``nx`` points, output every ``dt_out_i = dt_out (1 + dt_jitter
    U[-1,1])`` (LPSDA also jitters the time span by +-10 %; default 0 here) with internal step
    ``dt_out_i / ceil(dt_out/dt)``; initial condition ``sum_{j<n_modes} A_j sin(2 pi l_j x/L_i +
    phi_j)``, ``A ~ U[-amplitude, amplitude]``, ``phi ~ U[0, 2 pi)``, integer ``l`` in
    ``[l_min, l_max]``; the first ``burn_in`` time units are discarded.  ``u0`` (n_traj, nx)
    replaces the random initial condition (then give ``L`` explicitly or ``L_jitter=0``).

    Returns a dict: ``u`` (n_traj, n_steps, nx); per trajectory ``x`` (n_traj, nx), ``t``
    (n_traj, n_steps; absolute time, frame 0 at the end of the burn-in), ``L``, ``dt`` (output
    interval), ``dx``, ``dt_sim`` (internal step); ``u0`` (the initial condition before burn-in)
    and ``params`` (all settings, for :func:`to_dataset`).
    """
    device, dtype, Ls, dto, u0_, ic = _prep_1d(
        n_traj, u0, L, L_jitter, dt_out, dt_jitter, seed, device, dtype, nx,
        dict(n_modes=n_modes, l_min=l_min, l_max=l_max, amplitude=amplitude))
    nb = _n_burn(burn_in, dt_out)
    out, h, n_sub, chk = _simulate_1d("Kuramoto-Sivashinsky", u0_, Ls, lambda k: k ** 2 - k ** 4,
                                 dt_out=dto, dt=dt, n_steps=n_steps, n_burn=nb, dealias=dealias,
                                 cfl_max=cfl_max, stride=1, progress=progress, device=device,
                                 dtype=dtype, n_contour=n_contour)
    params = dict(equation="u_t + u u_x + u_xx + u_xxxx = 0", name="Kuramoto-Sivashinsky", nx=nx,
                  L_nominal=(float(L) if isinstance(L, (int, float)) else float("nan")),
                  L_jitter=float(L_jitter if isinstance(L, (int, float)) else 0.0),
                  dt_out=float(dt_out), dt_jitter=float(dt_jitter), dt_requested=float(dt),
                  seed=int(seed), dealias=bool(dealias), cfl_max=("auto" if cfl_max is None else float(cfl_max)),
                  initial_condition=("user-supplied" if u0 is not None else
                                     f"sum of {n_modes} sines, A~U[-{amplitude},{amplitude}], "
                                     f"phase~U[0,2pi), integer wavenumber l in [{l_min},{l_max}]"))
    res = _finish_1d("ks", out, Ls, dto, h, n_sub, nb, n_steps, nx, params, chk, resolution_tol,
                     "Increase nx (KS needs about 2 grid points per unit length of L).")
    res["u0"] = u0_
    res["ic_params"] = ic   # per-trajectory amplitudes, phases, wavenumbers (numpy; {} for a given u0)
    return res
