"""The truth of a forecast: the verifying data read at each ``valid_time`` of a forecast dataset,
the forecast's way (its variables, the levels it forecasts, its grid, the time units, dims and
member choice it recorded), through the same :class:`~diffkit_weather.store.Store` that reads
the initial states.  :mod:`diffkit_weather.evaluate` scores against it."""
from __future__ import annotations

import json
from typing import Mapping

import numpy as np

from ._common import WeatherDataError
from .cf import _fmt_time, _keys, _same_coord, find_coords
from .store import ALL_MEMBERS, Store, _member_list

__all__ = ["read_truth", "forecast_levels"]


def _fc_roles(fc) -> dict:
    """Roles of the dims of a forecast dataset: latitude, longitude, level dims (by the adapter's rules)."""
    r = find_coords(fc.drop_dims([d for d in ("initial_member", "member", "init_time", "lead_time") if d in fc.dims]),
                    "the forecast")
    if "latitude" not in r or "longitude" not in r:
        raise WeatherDataError(f"the forecast has no latitude/longitude dims (dims {tuple(fc.dims)})")
    return r


def forecast_levels(fc, v: str, ld: str) -> list[float]:
    """The levels (values of the dim ``ld``) at which the forecast ``fc`` holds variable ``v``: those
    where it has a finite value.  Variables that share a level dim but not their levels are NaN at
    the levels they lack (:func:`~diffkit_weather.decode.shared_levels`, or ``xarray.merge`` of
    per-variable selections); such levels are not forecast, so they are neither read from the truth
    nor scored.  A variable with no finite value at all keeps every level (its scores are NaN)."""
    lv = [float(x) for x in np.asarray(fc[ld].values, np.float64)]
    da = fc[v]
    fin = np.isfinite(da).any([d for d in da.dims if d != ld]).values
    return [l for l, f in zip(lv, fin) if f] if fin.any() else lv


def _fc_options(fc) -> dict:
    try:
        return json.loads(str(fc.attrs.get("diffkit_data_options", "{}")) or "{}")
    except json.JSONDecodeError:
        return {}


class _Truth:
    """The truth files of a forecast dataset, read the forecast's way (its variables, levels and grid;
    the time units and dims it recorded); :meth:`at` reads values at given times."""

    def __init__(self, fc, truth, *, time_units: str | None = None, dims: Mapping[str, str] | None = None,
                 member=None):
        o = _fc_options(fc)
        time_units = time_units or o.get("time_units")
        dims = dims if dims is not None else o.get("dims")
        r = _fc_roles(fc)
        self.latn, self.lonn = r["latitude"], r["longitude"]
        self.variables = [str(v) for v in fc.data_vars]
        #: per variable: the levels it is forecast at (read from the truth) and all of its level dim's
        self.levels, self.level_dims, self.all_levels = {}, {}, {}
        for v in self.variables:
            ld = [d for d in fc[v].dims if d in r.get("level", [])]
            if ld:
                self.all_levels[v] = [float(x) for x in np.asarray(fc[ld[0]].values, np.float64)]
                self.levels[v] = forecast_levels(fc, v, ld[0])
                self.level_dims[v] = ld[0]
        self.files = files = Store.open(truth, self.variables, self.levels, level_dims=self.level_dims,
                                    time_units=time_units, dims=dims, member=member)
        #: several truth members (``member="all"`` or a list): a ``truth_member`` dim
        want = _member_list(member)
        self.several = files.member_dim is not None and (want == ALL_MEMBERS or len(want or []) > 1)
        lat, lon = files.lat_lon()
        _same_coord(lat, np.asarray(fc[self.latn].values, np.float64), "latitude", files.names, "the forecast")
        _same_coord(lon, np.asarray(fc[self.lonn].values, np.float64), "longitude", files.names, "the forecast")
        self.fc = fc

    def missing(self, v: str, keys: np.ndarray) -> list[float]:
        keys = np.asarray(keys, np.float64).ravel()
        return sorted({float(k) for k in keys[~self.files.has(v, keys)]})

    def at(self, v: str, keys: np.ndarray) -> tuple[np.ndarray, list[str]]:
        """``(T, *keys.shape, [level,] lat, lon)`` values of ``v`` (``T`` chosen members) at the time keys,
        in the forecast's dim order for level, lat and lon; and the names of those trailing dims."""
        keys = np.asarray(keys, np.float64)
        has_level = v in self.levels
        tail = ([self.level_dims[v]] if has_level else []) + [self.latn, self.lonn]
        dims_fc = [d for d in self.fc[v].dims if d in tail]
        out = []
        for i in range(len(self.files.members)):
            a = self.files.read(v, keys.ravel(), i)                # (n, L, lat, lon)
            if not has_level:
                a = a[:, 0]
            elif self.levels[v] != self.all_levels[v]:             # NaN at the levels v is not forecast at
                full = np.full((a.shape[0], len(self.all_levels[v]), *a.shape[2:]), np.nan)
                full[:, [self.all_levels[v].index(l) for l in self.levels[v]]] = a
                a = full
            a = np.transpose(a, [0] + [1 + tail.index(d) for d in dims_fc])
            out.append(a.reshape(*keys.shape, *a.shape[1:]))
        return np.stack(out), dims_fc


def read_truth(fc, truth, *, time_units: str | None = None, dims: Mapping[str, str] | None = None, member=None):
    """The truth of a forecast dataset: an :class:`xarray.Dataset` with the forecast's variables on
    dims ``([truth_member,] init_time, lead_time, [level,] lat, lon)`` and its coordinates, read from
    ``truth`` (files, a glob, a list, or a Dataset) at each ``valid_time``.  ``time_units``/``dims``
    default to those the forecast recorded (the run's ``data.options``).  ``member``: on truth with
    a member dim, the member to score against (a value), several (a list) or ``"all"`` -- then a
    ``truth_member`` dim holds them; without a choice, a member dim with more than one member is an
    error (the member the forecast's run was trained on is *not* assumed).  Grids must match; valid
    times the truth lacks are an error listing them.  Attributes ``source``, ``member_dim`` and
    ``members`` record what was read."""
    return _truth_dataset(_Truth(fc, truth, time_units=time_units, dims=dims, member=member), fc)


def _truth_dataset(T: _Truth, fc):
    """:func:`read_truth`'s dataset from a :class:`_Truth` reader."""
    import xarray as xr

    files = T.files
    vt = np.asarray(fc["valid_time"].transpose("init_time", "lead_time").values)
    keys = _keys(vt.ravel()).reshape(vt.shape)
    out = {}
    for v in T.variables:
        miss = T.missing(v, keys)
        if miss:
            raise WeatherDataError(
                f"the truth ({files.names}) does not cover the forecast: variable {v!r} lacks {len(miss)} of its "
                f"{len(np.unique(keys))} valid times: {files._fmt_keys(miss[:8])}{' ...' if len(miss) > 8 else ''}; "
                f"give truth files that span {_fmt_time(vt.min())} .. {_fmt_time(vt.max())}")
        a, tail = T.at(v, keys)                              # (T, N, K, [L,] lat, lon)
        dims_v = ["init_time", "lead_time", *tail]
        if T.several:
            dims_v = ["truth_member", *dims_v]
        else:
            a = a[0]
        coords = {k: c for k, c in fc[v].coords.items() if set(c.dims) <= set(dims_v)}
        if T.several:
            coords["truth_member"] = ("truth_member", np.asarray(files.members),
                                      {"long_name": f"member of the truth (its dim {files.member_dim!r})"})
        out[v] = xr.DataArray(a.astype(np.float64), dims=dims_v, coords=coords, attrs=dict(fc[v].attrs))
    return xr.Dataset(out, attrs={"source": files.names, "member_dim": files.member_dim or "",
                                  "members": ", ".join(map(str, files.members)) if files.member_dim else ""})
