"""CF coordinates and times of gridded files: which dim is latitude, longitude, level, time or
member (by ``standard_name``, ``units``, ``axis``, then common names), how a file's grid becomes
the model's orientation, decoded times in any CF calendar, the forcings of a time, and the ISO
time strings of the forecast's ``--init``.  No data are read here beyond coordinates."""
from __future__ import annotations

import datetime as _dt
import re
from typing import Any, Mapping

import numpy as np

from ._common import WeatherDataError, _attrs, _vals

ROLES = ("time", "latitude", "longitude", "level", "member")

_LAT_UNITS = {"degrees_north", "degree_north", "degree_n", "degrees_n", "degreen", "degreesn"}
_LON_UNITS = {"degrees_east", "degree_east", "degree_e", "degrees_e", "degreee", "degreese"}
_PRESSURE_UNITS = {"pa", "hpa", "kpa", "mbar", "millibar", "millibars", "mb", "bar", "atm"}
_VERTICAL_SN = {"air_pressure", "altitude", "height", "depth", "model_level_number",
                "atmosphere_hybrid_sigma_pressure_coordinate", "atmosphere_sigma_coordinate",
                "atmosphere_hybrid_height_coordinate", "geopotential_height", "air_potential_temperature"}
_NAMES = {
    "latitude": ("lat", "latitude", "nav_lat", "lats", "xlat"),
    "longitude": ("lon", "longitude", "nav_lon", "lons", "long", "xlon"),
    "level": ("level", "plev", "lev", "levels", "pressure_level", "isobaricinhpa", "pressure", "pres", "height", "depth"),
    "time": ("time", "valid_time", "timestep", "times", "date", "datetime"),
    "member": ("member", "number", "realization", "ensemble", "ens", "member_id"),
}
#: roles whose dims need coordinate values (a member dim may be plain index numbers)
_NEEDS_VALUES = {"latitude": "degrees of latitude", "longitude": "degrees of longitude",
                 "level": "level values", "time": "times"}
_VALUE_UNITS = {"latitude": "degrees_north", "longitude": "degrees_east", "level": "hPa",
                "time": "hours since 2000-01-01 00:00"}
#: the keyword of ``--init`` for every validation initialisation time
ALL_VAL = "all-val"


def _fmt_time(t) -> str:
    if isinstance(t, np.datetime64):
        return str(np.datetime_as_string(t, unit="m")).replace("T", " ")
    try:
        return t.strftime("%Y-%m-%d %H:%M")
    except Exception:
        return str(t)



def _role_of(name: str, attrs: Mapping) -> tuple[str, int] | None:
    """``(role, priority)`` of a dim from its coordinate variable: 0 standard_name, 1 units, 2 axis, 3 name."""
    sn = str(attrs.get("standard_name", "")).strip().lower()
    if sn in ("latitude", "grid_latitude"):
        return "latitude", 0
    if sn in ("longitude", "grid_longitude"):
        return "longitude", 0
    if sn == "time":
        return "time", 0
    if sn in _VERTICAL_SN:
        return "level", 0
    if sn == "realization":
        return "member", 0
    units = str(attrs.get("units", "")).strip().lower()
    if units in _LAT_UNITS:
        return "latitude", 1
    if units in _LON_UNITS:
        return "longitude", 1
    if re.match(r"^\s*\w+\s+since\s+\S", units):
        return "time", 1
    if units in _PRESSURE_UNITS:
        return "level", 1
    axis = str(attrs.get("axis", "")).strip().upper()
    metric = units in ("m", "km", "meters", "metres")
    if axis == "Y" and not metric:
        return "latitude", 2
    if axis == "X" and not metric:
        return "longitude", 2
    if axis == "Z" or str(attrs.get("positive", "")).lower() in ("up", "down"):
        return "level", 2
    if axis == "T":
        return "time", 2
    n = name.lower()
    for role, names in _NAMES.items():
        if n in names:
            return role, 3
    return None


def find_coords(ds, path="the file", dims: Mapping[str, str] | None = None) -> dict:
    """Roles of the dims of ``ds``: ``{"time": name, "latitude": .., "longitude": .., "member": ..,
    "level": [names]}`` (absent roles are missing; several vertical dims are allowed)."""
    dims = dict(dims or {})
    bad = [k for k in dims if k not in ROLES]
    if bad:
        raise WeatherDataError(f"dims option names unknown role(s) {bad}; roles are {', '.join(ROLES)}")
    best: dict[str, list[tuple[int, str]]] = {}
    forced = {v: k for k, v in dims.items()}
    for d in ds.dims:
        d = str(d)
        if d in forced:
            best.setdefault(forced[d], []).append((-1, d))
            continue
        var = ds.variables.get(d)
        r = _role_of(d, var.attrs if var is not None else {})
        if r is not None and r[0] not in dims:
            best.setdefault(r[0], []).append((r[1], d))
    out: dict[str, Any] = {}
    for role, cands in best.items():
        if role == "level":
            out["level"] = [d for _, d in sorted(cands)]
            continue
        cands.sort()
        if len(cands) > 1 and cands[0][0] == cands[1][0]:
            raise WeatherDataError(
                f"{path}: dims {cands[0][1]!r} and {cands[1][1]!r} both look like {role}; name the right one "
                f"with data.options.dims = {{{role} = \"...\"}}")
        out[role] = cands[0][1]
    for role, d in dims.items():
        if d not in ds.dims and role != "level":
            raise WeatherDataError(f"dims option maps {role} to {d!r}, which is not a dim of {path} "
                                   f"(dims: {', '.join(map(str, ds.dims))})")
        if d in ds.dims and d not in ds.variables and role in _NEEDS_VALUES:
            # index numbers 0, 1, 2, ... are not degrees, pressures or times: never take them as such
            raise WeatherDataError(
                f"dims option maps {role} to {d!r}, but {path} has no coordinate values for {d!r} (only index "
                f"numbers 0..{ds.sizes[d] - 1}, which are not {_NEEDS_VALUES[role]}); give the coordinates in the "
                f"file, e.g. ds.assign_coords({d}=(\"{d}\", values, {{\"units\": \"{_VALUE_UNITS[role]}\"}})) "
                f"and save it")
    for role in ("latitude", "longitude"):
        d = out.get(role)
        if d is not None and d not in dims.values() and d not in ds.variables:
            # recognised by its name alone: its index numbers are not degrees either
            raise WeatherDataError(
                f"dim {d!r} of {path} looks like {role} but has no coordinate values (only index numbers "
                f"0..{ds.sizes[d] - 1}, which are not degrees of {role}); give the coordinates in the file, e.g. "
                f"ds.assign_coords({d}=(\"{d}\", values, {{\"units\": \"{_VALUE_UNITS[role]}\"}})) and save it")
    return out


def decode_time(var, path="the file", time_units: str | None = None, calendar: str | None = None):
    """Decoded times (datetime64[ns], or cftime objects for non-standard calendars) of a time coordinate."""
    import xarray as xr

    vals = np.asarray(var.values)
    if np.issubdtype(vals.dtype, np.datetime64):
        return vals.astype("datetime64[ns]")
    units = time_units or var.attrs.get("units")
    cal = calendar or var.attrs.get("calendar", "standard")
    if not units or not re.match(r"^\s*\w+\s+since\s+\S", str(units)):
        raise WeatherDataError(
            f"time coordinate {var.name!r} of {path} has no CF units ('<unit> since <date>'; it has "
            f"{'no units attribute' if units is None else repr(str(units))}), so its values {_vals(vals)} cannot be "
            f"turned into dates. Pass "
            f"data.options.time_units, e.g. time_units = \"hours since 2000-01-01 00:00\".")
    tmp = xr.Dataset(coords={"t": ("t", vals, {"units": str(units), "calendar": str(cal)})})
    try:
        out = xr.decode_cf(tmp)["t"].values
    except Exception as e:
        raise WeatherDataError(f"cannot decode the time coordinate {var.name!r} of {path} with units {units!r} "
                               f"and calendar {cal!r} ({type(e).__name__}: {e}); fix its units or pass "
                               f"data.options.time_units") from None
    if np.issubdtype(out.dtype, np.datetime64):
        return out.astype("datetime64[ns]")
    if out.dtype == object and out.size and hasattr(out.flat[0], "calendar"):
        return out
    raise WeatherDataError(f"time coordinate {var.name!r} of {path} (units {units!r}) did not decode to dates; "
                           f"fix its units or pass data.options.time_units")


def decode_file_time(ds, tdim: str, name: str, time_units: str | None, how: str) -> np.ndarray:
    """:func:`decode_time` of the time dim ``tdim`` of the file ``ds``; an error names the file's text
    variables (the origin of the times may hide there) and ``how`` the time units are given."""
    try:
        return decode_time(ds[tdim], name, time_units)
    except WeatherDataError as e:
        tv = _text_vars(ds)
        more = (f" The file has text variable(s) {tv}; if the time values count from there, say so with "
                f"{how}." if tv else "")
        raise WeatherDataError(str(e) + more) from None


def one_calendar(times) -> None:
    """Raise unless the arrays of decoded times ``times`` are all in one calendar."""
    kinds = {"dt64" if np.issubdtype(np.asarray(t).dtype, np.datetime64) else "cf:" + t.flat[0].calendar
             for t in times}
    if len(kinds) > 1:
        raise WeatherDataError(f"the files use different calendars ({sorted(kinds)}); convert them to one calendar")


def _text_vars(ds) -> str:
    """Text variables (e.g. NCL's 'reftime') shown in time errors: the origin may hide there."""
    out = []
    for k, v in ds.data_vars.items():
        if v.dtype.kind in "SU" and v.size <= 64:
            try:
                a = np.asarray(v.values)
                s = b"".join(a.ravel().tolist()).decode("ascii", "replace") if a.dtype.kind == "S" else "".join(a.ravel())
                s = s.replace("\x00", "").strip()
                out.append(f"{k} = {s!r} ({_attrs(v.attrs)})")
            except Exception:
                continue
    return "; ".join(out)


def _hours(times) -> np.ndarray:
    """Times as float64 hours since 1970-01-01 in their calendar."""
    if np.issubdtype(np.asarray(times).dtype, np.datetime64):
        return (np.asarray(times, "datetime64[ns]") - np.datetime64("1970-01-01", "ns")) / np.timedelta64(1, "h")
    import cftime

    t = np.asarray(times)
    return np.asarray(cftime.date2num(list(t), "hours since 1970-01-01", t.flat[0].calendar), dtype=np.float64)


def time_forcings(times) -> dict[str, np.ndarray]:
    """Fraction of the day (UTC) and of the year of each time, in [0, 1)."""
    t = np.asarray(times)
    if np.issubdtype(t.dtype, np.datetime64):
        import pandas as pd

        ix = pd.DatetimeIndex(t)
        tod = (ix.hour + ix.minute / 60 + ix.second / 3600) / 24
        doy = (ix.day_of_year - 1 + tod) / np.where(ix.is_leap_year, 366.0, 365.0)
        return {"time_of_day": np.asarray(tod, np.float64), "day_of_year": np.asarray(doy, np.float64)}
    import cftime

    tod, doy = [], []
    for x in t.ravel():
        f = (x.hour + x.minute / 60 + x.second / 3600) / 24
        y0 = cftime.datetime(x.year, 1, 1, calendar=x.calendar)
        ny = (cftime.datetime(x.year + 1, 1, 1, calendar=x.calendar) - y0).days
        tod.append(f)
        doy.append((x.dayofyr - 1 + f) / ny)
    return {"time_of_day": np.asarray(tod), "day_of_year": np.asarray(doy)}


def _orientation(lat: np.ndarray, lon: np.ndarray, path) -> dict:
    """How the file's (lat, lon) become the model's: lat ascending, lon continuous and ascending."""
    if lat.ndim != 1 or lon.ndim != 1:
        raise WeatherDataError(f"{path} has {lat.ndim}-D latitude / {lon.ndim}-D longitude coordinates; the weather "
                               f"adapter needs a regular lat-lon grid (1-D latitude and longitude); regrid first")
    dl = np.diff(lat)
    if lat.size > 1 and (dl > 0).all():
        lat_flip = False
    elif lat.size > 1 and (dl < 0).all():
        lat_flip = True
    elif lat.size == 1:
        lat_flip = False
    else:
        i = int(np.argmax(~((dl > 0) if dl[0] > 0 else (dl < 0))))
        raise WeatherDataError(
            f"latitude of {path} is not monotonic (neither ascending nor descending): {lat[i]:g}, {lat[i + 1]:g}, "
            f"{lat[min(i + 2, lat.size - 1)]:g} at index {i}; sort the file by latitude (e.g. ds.sortby('latitude'))")
    lon_model = lon.astype(np.float64).copy()
    lon_flip = False
    if lon.size > 1:
        d = np.diff(lon_model)
        if (d < 0).sum() > (d > 0).sum():  # descending: flip, then handle the wrap as ascending
            lon_flip = True
            lon_model = lon_model[::-1].copy()
            d = np.diff(lon_model)
        drops = np.flatnonzero(d <= 0)
        if drops.size == 1 and d[drops[0]] < -180:  # crosses the wrap: relabel, keep the data order
            k = drops[0] + 1
            lon_model[:k] -= 360.0
            d = np.diff(lon_model)
        if not (d > 0).all():
            i = int(np.flatnonzero(d <= 0)[0])
            raise WeatherDataError(
                f"longitude of {path} is not monotonic: {lon[i]:g}, {lon[i + 1]:g} at index {i} (after handling a "
                f"descending axis and one wrap at 360 deg); sort the file by longitude")
    lat_model = lat.astype(np.float64)[::-1].copy() if lat_flip else lat.astype(np.float64).copy()
    if (np.abs(lat_model) > 90 + 1e-6).any():
        raise WeatherDataError(f"latitude of {path} has values outside [-90, 90] ({_vals(lat)}); is it a latitude?")
    periodic = False
    if lon_model.size > 2:
        step = np.diff(lon_model)
        uniform = np.allclose(step, step.mean(), rtol=1e-3, atol=1e-6)
        periodic = uniform and abs(lon_model[-1] - lon_model[0] + step.mean() - 360.0) < 1e-3 * step.mean() + 1e-6
    return dict(lat_flip=lat_flip, lon_flip=lon_flip, lat_model=lat_model, lon_model=lon_model, periodic=periodic)


def level_pos(values: np.ndarray, level: float) -> int | None:
    """Position of ``level`` in the level coordinate ``values`` (equal within 1e-6 of its magnitude), or None."""
    level = float(level)
    hit = np.flatnonzero(np.isclose(values, level, rtol=0, atol=1e-6 * max(1.0, abs(level))))
    return int(hit[0]) if hit.size else None


def _same_coord(v: np.ndarray, ref: np.ndarray, what: str, name: str, ref_name: str) -> None:
    if v.shape != ref.shape:
        raise WeatherDataError(f"grids differ: {what} of {name} has {v.size} values {_vals(v)}, {ref_name} has "
                               f"{ref.size} {_vals(ref)}; regrid the files to one grid (e.g. cdo remapbil, xesmf)")
    tol = 1e-5 * max(1.0, float(np.abs(ref).max()) if ref.size else 1.0)
    diff = np.abs(v - ref) > tol
    if diff.any():
        i = int(np.flatnonzero(diff)[0])
        raise WeatherDataError(f"grids differ: {what} of {name} is {v[i]:g} at index {i} where {ref_name} has "
                               f"{ref[i]:g} ({name}: {_vals(v)}, {ref_name}: {_vals(ref)}); regrid the files to one "
                               f"grid (e.g. cdo remapbil, xesmf)")



# ----------------------------------------------------------------------------- times as keys
def _keys(times) -> np.ndarray:
    """Hours since 1970 (rounded to 1e-6 h) of times: the exact-match key of a time."""
    return np.round(_hours(np.asarray(times)), 6)


def _shift(times, hours: float):
    """``times + hours`` for datetime64 or cftime arrays."""
    t = np.asarray(times)
    if np.issubdtype(t.dtype, np.datetime64):
        return t.astype("datetime64[ns]") + np.timedelta64(int(round(hours * 3600e9)), "ns")
    return np.array([x + _dt.timedelta(hours=float(hours)) for x in t.ravel()], dtype=object).reshape(t.shape)


_ISO = re.compile(r"\s*(-?\d{1,4})-(\d{1,2})-(\d{1,2})(?:[T ](\d{1,2})(?::(\d{1,2})(?::(\d{1,2}))?)?)?\s*")


def _parse_time(s: str, like):
    """An ISO time string as an element of the calendar of ``like`` (datetime64 or cftime)."""
    m = _ISO.fullmatch(str(s))
    if not m:
        raise WeatherDataError(f"init time {s!r} is not an ISO time such as 1996-01-06T00:00 (or {ALL_VAL!r})")
    y, mo, d, H, M, S = (int(x) if x else 0 for x in m.groups())
    try:
        if np.issubdtype(np.asarray(like).dtype, np.datetime64):
            return np.datetime64(f"{y:04d}-{mo:02d}-{d:02d}T{H:02d}:{M:02d}:{S:02d}", "ns")
        import cftime

        return cftime.datetime(y, mo, d, H, M, S, calendar=np.asarray(like).flat[0].calendar)
    except Exception as e:
        raise WeatherDataError(f"init time {s!r} is not a valid date ({e})") from None


def _as_time(x, like):
    if isinstance(x, str):
        return _parse_time(x, like)
    if isinstance(x, (_dt.datetime, _dt.date)) and not hasattr(x, "calendar"):
        return np.datetime64(x, "ns") if np.issubdtype(np.asarray(like).dtype, np.datetime64) else _parse_time(
            x.isoformat(), like)
    return x


def _nearest(keys: np.ndarray, times, key: float, n: int = 3) -> str:
    order = np.argsort(np.abs(keys - key), kind="stable")[:n]
    return ", ".join(_fmt_time(times[i]) for i in sorted(order))



def _fmt_keys(keys, like) -> str:
    """Time keys (:func:`_keys`) as text, in the calendar of the times ``like``."""
    base = np.datetime64("1970-01-01", "ns")
    like = np.asarray(like)
    out = []
    for k in keys:
        if np.issubdtype(like.dtype, np.datetime64) or not len(like):
            out.append(_fmt_time(base + np.timedelta64(int(round(k * 3600e9)), "ns")))
        else:
            import cftime

            out.append(_fmt_time(cftime.num2date(k, "hours since 1970-01-01", like.flat[0].calendar)))
    return ", ".join(out)
