"""The weather tests' oracle file (issue 16: one copy, shared by test_weather_forecast, _decode,
_evaluate, _truth, _evaluate_checks and _levels; conftest.py's module-scoped ``shift`` fixture
writes it): a synthetic global file (two variables on two pressure levels, latitude descending
like ERA5, "hours since" times, a polar row always missing in one variable) whose one-step map
is a zonal shift by one grid point, the truth after any init time, and a backbone implementing
the map exactly."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
import xarray as xr
from torch import nn

from diffkit_weather import decode as D

LAT = np.arange(70.0, -71.0, -20.0)       # 8 rows, descending (ERA5 order)
LON = np.arange(0.0, 360.0, 15.0)         # 24 columns: global, periodic
LEVELS = np.array([500, 850], np.int32)
NT = 28                                   # 6-hourly from 2000-01-01 00:00


def shift_fields(seed: int = 0) -> dict:
    """``x(t) = roll(f, t)`` along longitude (one grid point east per 6 h), per variable ``(T, L, lat, lon)``;
    z is missing (NaN) on the northernmost row at every time."""
    g = np.random.default_rng(seed)
    base = {"t": g.normal(size=(2, 8, 24)) * 2 + 5, "z": g.normal(size=(2, 8, 24)) * 0.5 - 1}
    out = {v: np.stack([np.roll(f, t, axis=-1) for t in range(NT)]).astype(np.float32) for v, f in base.items()}
    out["z"][:, :, 0] = np.nan
    return out


def write_shift(path) -> Path:
    x = shift_fields()
    ds = xr.Dataset(
        {"t": (("time", "level", "latitude", "longitude"), x["t"], {"units": "K", "long_name": "temperature"}),
         "z": (("time", "level", "latitude", "longitude"), x["z"], {"units": "m2 s-2", "long_name": "geopotential"}),
         "orog": (("latitude", "longitude"), np.add.outer(LAT / 10, np.cos(np.deg2rad(LON))).astype(np.float32),
                  {"units": "m", "long_name": "a static field"})},
        coords={"time": ("time", 6 * np.arange(NT), {"units": "hours since 2000-01-01 00:00"}),
                "level": ("level", LEVELS, {"units": "hPa", "standard_name": "air_pressure"}),
                "latitude": ("latitude", LAT, {"units": "degrees_north"}),
                "longitude": ("longitude", LON, {"units": "degrees_east"})},
        attrs={"title": "zonal shift"})
    ds.to_netcdf(path)
    return Path(path)


def truth_model(i0: np.ndarray, K: int) -> np.ndarray:
    """The truth ``(N, K, C, lat, lon)`` after the init time indices ``i0``, in the model's orientation."""
    x = shift_fields()
    both = np.concatenate([x["t"], x["z"]], 1)[..., ::-1, :]            # latitude ascending
    return np.stack([both[i + 1: i + K + 1] for i in i0])


class ShiftOracle(nn.Module):
    """The exact one-step map of the shift file in the standardised space, from the *oldest* history
    state (``x(t + lead) = roll(x(t - h + 1), h)``), so a wrongly ordered or updated history breaks it.
    Records the scalars and the mask channel it was given."""

    def __init__(self, layout):
        super().__init__()
        a = layout.autoregressive
        self.w = nn.Parameter(torch.zeros(()))
        self.h, self.C, self.target = a.history, layout.num_channels, a.target
        self.sm = torch.tensor(a.state_mean).reshape(-1, 1, 1)
        self.ss = torch.tensor(a.state_std).reshape(-1, 1, 1)
        self.tm, self.ts = layout.mean, layout.std
        self.seen: list[tuple] = []

    def forward(self, x, c_noise, scalars=None, labels=None):
        B, C, h = x.shape[0], self.C, self.h
        f = x[:, C:]
        hist = f[:, : h * C].reshape(B, h, C, *x.shape[2:]) * self.ss + self.sm
        nxt = torch.roll(hist[:, 0], h, dims=-1)
        y = nxt - hist[:, -1] if self.target == "residual" else nxt
        self.seen.append((B, scalars.clone(), f.clone()))
        return (y - self.tm) / self.ts + 0 * self.w


def _close_nan(a, b, atol=1e-5):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    assert a.shape == b.shape
    np.testing.assert_array_equal(np.isnan(a), np.isnan(b))
    np.testing.assert_allclose(a, b, rtol=0, atol=atol, equal_nan=True)


def _fc_from(pred, layout, times):
    return D.forecast_dataset(torch.as_tensor(pred, dtype=torch.float32), layout, times)
