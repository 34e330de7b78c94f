"""A :func:`diffkit_weather.qg.simulate_qg` result as a CF-1.8 :class:`xarray.Dataset` on a labelled
lat-lon grid (:func:`to_dataset`), written atomically (:func:`write_netcdf`).  Importing this
module does not import xarray (the functions do).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import torch

KM_PER_DEG = 111.2


def to_dataset(result: dict, *, lat0: float = 45.0, lon0: float = -30.0,
               start: str = "2000-01-01T00:00:00"):
    """A CF-1.8 :class:`xarray.Dataset` of a :func:`~diffkit_weather.qg.simulate_qg` result on a labelled
    lat-lon grid.

    Dims ``("time", "level", "latitude", "longitude")`` for a single member; with
    ``n_members > 1`` a leading ``"member"`` dim (CF ``standard_name = "realization"``) is added.
    ``time`` holds datetimes (frame 0 = ``start``; encoded as "hours since 2000-01-01 00:00:00",
    standard calendar); ``level`` is the layer (1 = upper, 2 = lower; ``positive = "down"``, with
    auxiliary ``layer_thickness``, ``depth`` (layer mid-depth) and ``background_eastward_wind``
    U_n).  The square domain is placed with its centre at (``lat0``, ``lon0``): ``latitude =
    lat0 + (y - L/2) / 111.2 km`` and ``longitude = lon0 + (x - L/2) / (111.2 km cos(lat0))``
    (a local tangent-plane labelling, increasing northward/eastward; the model itself is a
    Cartesian beta-plane and *doubly periodic*: longitude and latitude both wrap over the domain,
    not the globe).  ``x``/``y`` in metres are kept as auxiliary coordinates.  Variables:
    ``streamfunction`` (m2 s-1), ``potential_vorticity`` (s-1, QG PV anomaly), ``eastward_wind``
    and ``northward_wind`` (m s-1, eddy velocities; add ``background_eastward_wind`` for the total
    zonal wind) -- those of them present in ``result``.  Model parameters become global attributes.
    """
    import xarray as xr  # lazy: importing the plugin must not import xarray

    from diffkit.adapters import netcdf_attrs

    p = dict(result["params"])
    cpu = lambda a: torch.as_tensor(a).detach().cpu().numpy()
    nm = int(p["n_members"])
    x, y = cpu(result["x"]).astype(np.float64), cpu(result["y"]).astype(np.float64)
    L = float(p["L"])
    lat = lat0 + (y - L / 2) / (KM_PER_DEG * 1e3)
    lon = lon0 + (x - L / 2) / (KM_PER_DEG * 1e3 * math.cos(math.radians(lat0)))
    t = cpu(result["t"]).astype(np.float64)
    times = np.datetime64(start, "ns") + np.round(t * 1e9).astype("timedelta64[ns]")
    H1, H2 = float(p["H1"]), float(p["H2"])
    coords: dict[str, Any] = {
        "time": ("time", times, {"standard_name": "time", "long_name": "time", "axis": "T"}),
        "level": ("level", np.array([1, 2], dtype=np.int32),
                  {"long_name": "layer", "units": "1", "positive": "down", "axis": "Z",
                   "comment": "1 = upper layer, 2 = lower layer"}),
        "latitude": ("latitude", lat, {"standard_name": "latitude", "long_name": "latitude",
                                       "units": "degrees_north", "axis": "Y"}),
        "longitude": ("longitude", lon, {"standard_name": "longitude", "long_name": "longitude",
                                         "units": "degrees_east", "axis": "X"}),
        "y": ("latitude", y, {"standard_name": "projection_y_coordinate", "long_name": "model y (northward)",
                              "units": "m"}),
        "x": ("longitude", x, {"standard_name": "projection_x_coordinate", "long_name": "model x (eastward)",
                               "units": "m"}),
        "layer_thickness": ("level", np.array([H1, H2]), {"long_name": "layer thickness", "units": "m"}),
        "depth": ("level", np.array([H1 / 2, H1 + H2 / 2]),
                  {"standard_name": "depth", "long_name": "layer mid-depth", "units": "m", "positive": "down"}),
        "background_eastward_wind": ("level", np.array([p["U1"], p["U2"]], dtype=np.float64),
                                     {"long_name": "background zonal velocity U_n of the layer", "units": "m s-1"}),
    }
    dims = ("time", "level", "latitude", "longitude")
    if nm > 1:
        dims = ("member",) + dims
        coords["member"] = ("member", np.arange(nm, dtype=np.int32),
                            {"standard_name": "realization", "long_name": "ensemble member", "units": "1"})
    spec = {
        "psi": ("streamfunction", {"long_name": "eddy streamfunction", "units": "m2 s-1"}),
        "q": ("potential_vorticity", {"long_name": "quasi-geostrophic potential vorticity anomaly",
                                      "units": "s-1"}),
        "u": ("eastward_wind", {"standard_name": "eastward_wind", "units": "m s-1",
                                "long_name": "eddy eastward velocity u = -d psi/dy",
                                "comment": "total zonal wind = eastward_wind + background_eastward_wind"}),
        "v": ("northward_wind", {"standard_name": "northward_wind", "units": "m s-1",
                                 "long_name": "eddy northward velocity v = d psi/dx"}),
    }
    dv = {}
    for key, (name, attrs) in spec.items():
        if key in result:
            a = cpu(result[key])
            dv[name] = (dims, a if nm > 1 else a[0], attrs)
    gattrs = {"Conventions": "CF-1.8", "source": "diffkit_weather.qg two-layer quasi-geostrophic model",
              "title": "two-layer quasi-geostrophic simulation (pyqg reference configuration)",
              "grid_note": ("doubly periodic square domain of side L: longitude and latitude both wrap "
                            "over the domain (not the globe); lat/lon label a local tangent plane centred "
                            f"at ({lat0}, {lon0}) with 111.2 km per degree of latitude and 111.2 km "
                            "cos(lat0) per degree of longitude; the dynamics are Cartesian (beta-plane)"),
              "lat0": float(lat0), "lon0": float(lon0),
              "periodic_axes": "latitude longitude",
              **netcdf_attrs(p)}
    ds = xr.Dataset(dv, coords=coords, attrs=gattrs)
    ds["time"].encoding.update(units="hours since 2000-01-01 00:00:00", calendar="standard")
    return ds


def write_netcdf(ds, path) -> Path:
    """Write ``ds`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    from diffkit.adapters import atomic_to_netcdf

    return atomic_to_netcdf(ds, path)
