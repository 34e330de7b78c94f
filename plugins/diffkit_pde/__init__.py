"""diffkit's PDE plugin: built-in, batched pseudo-spectral simulators (CPU and GPU, no downloads).

- :func:`simulate_ks`: 1-D Kuramoto--Sivashinsky, LPSDA / PDE-Refiner setup (per-trajectory L);
- :func:`simulate_burgers`: 1-D viscous Burgers (exact solutions: :func:`burgers_cole_hopf`);
- :func:`simulate_kolmogorov`: 2-D Navier--Stokes, Kolmogorov flow (Shysheya et al. 2024);
- :func:`to_dataset` / :func:`write_netcdf`: CF-metadata xarray datasets, atomic netCDF files;
- the ``pde`` adapter (:class:`TrajectoryAdapter`): history -> next-frame training pairs from this
  plugin's netCDF files or PDEBench HDF5 files (:func:`read_pdebench`);
- :func:`rollout`: batched, seeded ensemble rollouts of a trained surrogate (:func:`load_surrogate`);
- metrics (:mod:`diffkit_pde.metrics`: Pearson correlation per step, high-correlation time, nRMSE,
  energy spectra, ensemble spread) and plots (:mod:`diffkit_pde.plots`);
- commands ``diffkit data pde {ks,burgers,kolmogorov}`` and ``diffkit rollout``.

All time stepping is ETDRK4 (:mod:`diffkit.etdrk4`, Kassam & Trefethen 2005).  One module per
equation (:mod:`~diffkit_pde.ks`, :mod:`~diffkit_pde.burgers`, :mod:`~diffkit_pde.kolmogorov`),
the 1-D engine the first two share (:mod:`~diffkit_pde.periodic1d`), the conventions they follow
(:mod:`~diffkit_pde.conventions`), the stability and resolution checks
(:mod:`~diffkit_pde.stability`) and the netCDF output (:mod:`~diffkit_pde.netcdf`).  Importing
this package does not import xarray, h5py or matplotlib; docs/pde.md has the workflow.
"""
from __future__ import annotations

from diffkit.etdrk4 import etdrk4_coefficients
from diffkit.hookspecs import hookimpl

from . import metrics
from .adapter import PDEDataError, TrajectoryAdapter
from .burgers import burgers_cole_hopf, simulate_burgers
from .cli import register_data, register_rollout, simulator
from .kolmogorov import (kolmogorov_energy_budget, kolmogorov_initial_vorticity, simulate_kolmogorov,
                         spectral_divergence, taylor_green_vorticity)
from .ks import simulate_ks
from .netcdf import to_dataset, write_netcdf
from .pdebench import read_pdebench, write_pdebench
from .stability import NonFiniteStateError, ResolutionWarning, StabilityError
from .surrogate import (InitialCondition, Surrogate, initial_condition, load_surrogate, rollout, rollout_dataset,
                        rollout_report)

__all__ = [
    "StabilityError", "NonFiniteStateError", "ResolutionWarning",
    "simulate_ks", "simulate_burgers", "simulate_kolmogorov",
    "burgers_cole_hopf", "taylor_green_vorticity", "kolmogorov_initial_vorticity",
    "kolmogorov_energy_budget", "spectral_divergence", "etdrk4_coefficients",
    "to_dataset", "write_netcdf", "simulator",
    "TrajectoryAdapter", "PDEDataError", "read_pdebench", "write_pdebench",
    "Surrogate", "InitialCondition", "load_surrogate", "initial_condition", "rollout", "rollout_dataset",
    "rollout_report",
    "metrics",
]


@hookimpl
def diffkit_adapters():
    return {"pde": TrajectoryAdapter}


@hookimpl
def diffkit_metrics():
    return dict(metrics.METRICS)


@hookimpl
def diffkit_commands():
    return {"data pde": register_data, "rollout": register_rollout}


@hookimpl
def diffkit_evaluators():
    from .evaluate import PDEEvaluator

    return {"pde": PDEEvaluator}


@hookimpl
def diffkit_quickstarts():
    from .quickstart import quickstart

    return {"pde": quickstart}
