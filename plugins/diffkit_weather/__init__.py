"""diffkit's weather plugin (work in progress: the simulator, the metrics and the data command).

- :func:`simulate_qg`: two-layer quasi-geostrophic model in pyqg's reference configuration,
  batched ETDRK4 in torch, validated against the analytic baroclinic growth rate and its energy
  budget; :func:`to_dataset` places it on a labelled mid-latitude lat-lon grid as CF netCDF;
- :mod:`diffkit_weather.metrics`: WeatherBench-2 metrics (latitude-weighted RMSE, fair CRPS,
  spread, spread/skill with the (M+1)/M correction, rank histograms), tensors and xarray;
- the ``weather`` adapter (:class:`GriddedAdapter`): CF gridded data (any number of files,
  variables and levels) as forecast pairs with masks, area weights, lazy statistics and
  :func:`unstack` back onto the file's template;
- :func:`forecast.forecast <diffkit_weather.forecast.forecast>`: batched, seeded autoregressive
  ensemble forecasts of a trained model (:func:`load_forecaster`, :func:`initial_states`), written
  as CF netCDF by :func:`forecast_dataset`; :func:`evaluate.evaluate
  <diffkit_weather.evaluate.evaluate>` scores them against the truth (tables and figures,
  :mod:`diffkit_weather.plots`);
- ``diffkit data weather qg``, ``diffkit forecast`` and ``diffkit evaluate``.
"""
from __future__ import annotations

from diffkit.hookspecs import hookimpl

from . import metrics
from .adapter import GriddedAdapter, WeatherDataError
from .decode import forecast_dataset, unstack
from .store import check_grid
from .cli import WeatherEvaluator, register_data, register_forecast
from . import evaluate, forecast  # the modules: forecast.forecast(...), evaluate.evaluate(...)
from .evaluate import Evaluation
from .forecast import Forecaster, InitialStates, initial_states, load_forecaster
from .truth import read_truth
from .qg import NonFiniteStateError, StabilityError, perturb_members, simulate_qg
from .qg_energy import energy_budget
from .qg_linear import linear_growth_rate, linear_modes, normal_mode_pv
from .qg_netcdf import to_dataset, write_netcdf
from .qg_coarse import coarse_grain, refine, split_scales
from .qg_oracle import format_stationarity, oracle_ensemble, stationarity_report, subgrid_draws

__all__ = ["simulate_qg", "perturb_members", "linear_modes", "linear_growth_rate", "normal_mode_pv",
           "energy_budget", "to_dataset", "write_netcdf", "StabilityError", "NonFiniteStateError", "metrics",
           "coarse_grain", "refine", "split_scales", "subgrid_draws", "oracle_ensemble", "stationarity_report",
           "format_stationarity",
           "GriddedAdapter", "WeatherDataError", "check_grid", "unstack",
           "forecast", "evaluate", "Forecaster", "InitialStates", "load_forecaster", "initial_states",
           "forecast_dataset", "read_truth", "Evaluation"]


@hookimpl
def diffkit_adapters():
    return {"weather": GriddedAdapter}


@hookimpl
def diffkit_metrics():
    return dict(metrics.METRICS)


@hookimpl
def diffkit_commands():
    return {"data weather": register_data, "forecast": register_forecast}


@hookimpl
def diffkit_evaluators():
    return {"weather": WeatherEvaluator}


@hookimpl
def diffkit_quickstarts():
    from .quickstart import quickstart

    return {"weather": quickstart}
