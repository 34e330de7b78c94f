"""diffkit's PDE plugin: built-in, batched pseudo-spectral simulators (CPU and GPU, no downloads).

- :func:`simulate_ks`: 1-D Kuramoto--Sivashinsky, LPSDA / PDE-Refiner setup (per-trajectory L);
- :func:`simulate_burgers`: 1-D viscous Burgers (exact solutions: :func:`burgers_cole_hopf`);
- :func:`simulate_kolmogorov`: 2-D Navier--Stokes, Kolmogorov flow (Shysheya et al. 2024);
- :func:`to_dataset` / :func:`write_netcdf`: CF-metadata xarray datasets, atomic netCDF files.

All time stepping is ETDRK4 (Kassam & Trefethen 2005).  Importing this package does not import
xarray; see :mod:`diffkit_pde.simulators` for the conventions and the stability checks.
"""
from __future__ import annotations

from .simulators import (NonFiniteStateError, ResolutionWarning, StabilityError, burgers_cole_hopf, etdrk4_coefficients,
                         kolmogorov_energy_budget, kolmogorov_initial_vorticity, simulate_burgers,
                         simulate_kolmogorov, simulate_ks, spectral_divergence, taylor_green_vorticity,
                         to_dataset, write_netcdf)

__all__ = [
    "StabilityError", "NonFiniteStateError", "ResolutionWarning",
    "simulate_ks", "simulate_burgers", "simulate_kolmogorov",
    "burgers_cole_hopf", "taylor_green_vorticity", "kolmogorov_initial_vorticity",
    "kolmogorov_energy_budget", "spectral_divergence", "etdrk4_coefficients",
    "to_dataset", "write_netcdf",
]
