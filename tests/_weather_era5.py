"""A synthetic file in the ERA5 / WeatherBench-2 layout (latitude 90 .. -90, longitude 0 .. 350,
pressure levels, "hours since 1979-01-01"), shared by the weather tests of the adapter, cf, store
and decode modules (issue 16: one copy; conftest.py's ``era5_path`` fixture writes one)."""
from __future__ import annotations

import numpy as np
import xarray as xr


LAT = np.arange(90.0, -90.1, -10.0)   # 19, descending like ERA5


LON = np.arange(0.0, 360.0, 10.0)     # 36, 0 .. 350: global


LEVELS = np.array([500, 850], np.int32)


def era5(nt: int = 12, *, lat=LAT, lon=LON, t0: int = 0, seed: int = 0, drop=(), cf_names=False, members=0):
    """An ERA5 / WB2-layout dataset (raw numbers, encoded time) with z, t, u on levels and t2m."""
    g = np.random.default_rng(seed)
    hours = (t0 + 6 * np.arange(nt + len(drop))).astype(np.int64)
    keep = np.setdiff1d(np.arange(hours.size), np.asarray(drop, int))
    hours = hours[keep]
    nlat, nlon = len(lat), len(lon)
    la, lo = np.meshgrid(np.deg2rad(lat), np.deg2rad(lon), indexing="ij")
    tt = hours[:, None, None] / 24.0
    lead = (members,) if members else ()

    def field(base, amp, lev=None):
        shape = (*lead, hours.size, *(() if lev is None else (len(LEVELS),)), nlat, nlon)
        wave = np.cos(la) * np.sin(lo - 0.3 * tt)
        if lev is not None:
            wave = wave[:, None] * (LEVELS[None, :, None, None] / 850.0) + LEVELS[None, :, None, None] * 0.01 * base / 500
        return (base + amp * wave + 0.1 * amp * g.standard_normal(shape)).astype(np.float32)

    names = dict(time="time", level="level", latitude="latitude", longitude="longitude")
    if cf_names:  # odd dim names: only the CF attributes say what they are
        names = dict(time="valid", level="p", latitude="yy", longitude="xx")
    T, Z, Y, X = (names[k] for k in ("time", "level", "latitude", "longitude"))
    mdim = ("ens",) if members else ()
    coords = {
        T: (T, hours, {"units": "hours since 1979-01-01", "calendar": "gregorian", "long_name": "time"}),
        Z: (Z, LEVELS, {"units": "millibars", "long_name": "pressure_level", **({} if cf_names else {"standard_name": "air_pressure"})}),
        Y: (Y, np.asarray(lat, np.float32), {"units": "degrees_north", "long_name": "latitude",
                                             **({} if cf_names else {"standard_name": "latitude"})}),
        X: (X, np.asarray(lon, np.float32), {"units": "degrees_east", "long_name": "longitude"}),
    }
    if members:
        coords["ens"] = ("ens", np.arange(members, dtype=np.int32), {"standard_name": "realization"})
    ds = xr.Dataset(
        {"z": ((*mdim, T, Z, Y, X), field(50000.0, 800.0, LEVELS), {"units": "m**2 s**-2", "long_name": "Geopotential",
                                                                  "standard_name": "geopotential"}),
         "t": ((*mdim, T, Z, Y, X), field(260.0, 15.0, LEVELS), {"units": "K", "long_name": "Temperature",
                                                               "standard_name": "air_temperature"}),
         "u": ((*mdim, T, Z, Y, X), field(5.0, 10.0, LEVELS), {"units": "m s**-1", "long_name": "U component of wind"}),
         "t2m": ((*mdim, T, Y, X), field(285.0, 20.0), {"units": "K", "long_name": "2 metre temperature"})},
        coords=coords, attrs={"Conventions": "CF-1.6", "title": "synthetic ERA5 layout"})
    return ds


def write(ds, path) -> str:
    ds.to_netcdf(path)
    return str(path)
