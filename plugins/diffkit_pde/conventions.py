"""Conventions shared by the PDE simulators (:mod:`diffkit_pde.ks`, :mod:`diffkit_pde.burgers`,
:mod:`diffkit_pde.kolmogorov`), and the helpers that implement them.

All three equations are periodic, pseudo-spectral and stepped with ETDRK4
(:mod:`diffkit.etdrk4`: Cox & Matthews 2002, Kassam & Trefethen 2005 contour-integral phi
functions; the linear part exact, the advective nonlinearity explicit).

- ``device``/``dtype`` follow the inputs: given an initial condition tensor, its device and dtype
  are used unless overridden; otherwise CPU/float64.  Scheme coefficients are computed once in
  float64 on the CPU and then moved; nothing leaves the device inside the time loop except one
  scalar per *output* step (the stability check of :mod:`diffkit_pde.stability`).
- Randomness is drawn per trajectory from ``numpy.random.default_rng([seed, i])``: trajectory
  ``i`` is the same whatever ``n_traj`` is, and a batched run equals the single runs.
- Output frame 0 is the state at the end of the burn-in (``t = burn_in``); frame ``k`` is
  ``k*dt_out`` later.  The internal step is ``dt_out / n_sub`` with ``n_sub = ceil(dt_out/dt)``,
  so the effective step never exceeds the requested ``dt``.
- Every result holds ``spectral_tail`` (the resolution monitor) and ``params`` (all settings,
  for :func:`diffkit_pde.netcdf.to_dataset`).
"""
from __future__ import annotations

import math

import numpy as np


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    """One independent generator per trajectory (trajectory i is the same for every n_traj)."""
    return [np.random.default_rng([int(seed), i]) for i in range(n)]


def _n_sub(dt_out_max: float, dt: float) -> int:
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive finite number, got {dt}")
    return max(1, math.ceil(dt_out_max / dt - 1e-9))


def _n_burn(burn_in, dt_out):
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    return math.ceil(float(burn_in) / float(dt_out) - 1e-9)


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)
