"""A third-party-style plugin for the tests of ``diffkit assimilate``'s hooks (issue 15): the adapter
``stations``, the PDE trajectory adapter under another name, whose domain reads its observations from
a CSV of point observations -- one row per observation, the columns ``variable``, ``time``, one per
spatial axis of the model and ``value``, ``sigma_y`` -- through :meth:`Assimilation.read_times` /
:meth:`~diffkit.assimilate.Assimilation.read` (and CF netCDF like the pde domain for other files).

Register it by hand: ``registry.register_plugin(StationsPlugin(), "stations_plugin")``.
"""
from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from diffkit import hookimpl
from diffkit.errors import ObservationError
from diffkit.observations import point_observations
from diffkit_pde import TrajectoryAdapter
from diffkit_pde.observe import PDEAssimilation


def _rows(path) -> list[dict]:
    try:
        with open(path, newline="") as f:
            return list(csv.DictReader(f))
    except FileNotFoundError:
        raise ObservationError(f"observation file {path} does not exist") from None


def _is_csv(path) -> bool:
    return Path(path).suffix.lower() == ".csv"


class StationsAssimilation(PDEAssimilation):
    """The pde domain's rollouts, observations also from a CSV of stations."""

    name = "stations"

    @classmethod
    def read_times(cls, path, grid):
        if not _is_csv(path):
            return super().read_times(path, grid)
        return np.unique(np.asarray(grid.time_key(np.array([float(r["time"]) for r in _rows(path)])), dtype=np.float64))

    @classmethod
    def metadata(cls, path):
        return {} if _is_csv(path) else super().metadata(path)

    @classmethod
    def read(cls, path, grid):
        if not _is_csv(path):
            return super().read(path, grid)
        rows = _rows(path)
        col = lambda name: np.array([float(r[name]) for r in rows])  # noqa: E731
        return point_observations(path, grid, variable=[r["variable"] for r in rows], time=col("time"),
                                  position={a.name: col(a.name) for a in grid.axes}, value=col("value"),
                                  sigma=col("sigma_y"))


class StationsAdapter(TrajectoryAdapter):
    """The pde trajectory adapter whose domain also reads a CSV of stations (a test plugin)."""

    assimilation = StationsAssimilation


class StationsPlugin:
    @hookimpl
    def diffkit_adapters(self):
        return {"stations": StationsAdapter}


def write_csv(points_nc, out, axes) -> Path:
    """The CSV of a points-form netCDF observation file (rows in the file's order, variable by
    variable; every number written so that it reads back exactly)."""
    import xarray as xr

    with xr.open_dataset(points_nc, decode_timedelta=False) as ds:
        names = [v for v in ds.data_vars if not str(v).endswith("_sigma_y")]
        with open(out, "w", newline="") as f:
            w = csv.writer(f)
            w.writerow(["variable", "time", *axes, "value", "sigma_y"])
            for v in names:
                cols = [ds["time"].values, *(ds[a].values for a in axes), ds[v].values,
                        np.broadcast_to(ds[f"{v}_sigma_y"].values, ds[v].shape)]
                for row in zip(*cols):
                    w.writerow([v, *(repr(float(x)) for x in row)])
    return Path(out)
