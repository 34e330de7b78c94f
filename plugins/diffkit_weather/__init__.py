"""diffkit's weather plugin (work in progress: the simulator, the metrics and the data command).

- :func:`simulate_qg`: two-layer quasi-geostrophic model in pyqg's reference configuration,
  batched ETDRK4 in torch, validated against the analytic baroclinic growth rate and its energy
  budget; :func:`to_dataset` places it on a labelled mid-latitude lat-lon grid as CF netCDF;
- :mod:`diffkit_weather.metrics`: WeatherBench-2 metrics (latitude-weighted RMSE, fair CRPS,
  spread, spread/skill with the (M+1)/M correction, rank histograms), tensors and xarray;
- the ``weather`` adapter (:class:`GriddedAdapter`): CF gridded data (any number of files,
  variables and levels) as forecast pairs with masks, area weights, lazy statistics and
  :func:`unstack` back onto the file's template;
- ``diffkit data weather qg``.
"""
from __future__ import annotations

from diffkit.hookspecs import hookimpl

from . import metrics
from .adapter import GriddedAdapter, WeatherDataError, check_grid, unstack
from .cli import register_data
from .qg import (NonFiniteStateError, StabilityError, energy_budget, linear_growth_rate, linear_modes,
                 normal_mode_pv, perturb_members, simulate_qg, to_dataset, write_netcdf)

__all__ = ["simulate_qg", "perturb_members", "linear_modes", "linear_growth_rate", "normal_mode_pv",
           "energy_budget", "to_dataset", "write_netcdf", "StabilityError", "NonFiniteStateError", "metrics",
           "GriddedAdapter", "WeatherDataError", "check_grid", "unstack"]


@hookimpl
def diffkit_adapters():
    return {"weather": GriddedAdapter}


@hookimpl
def diffkit_metrics():
    return dict(metrics.METRICS)


@hookimpl
def diffkit_commands():
    return {"data weather": register_data}
