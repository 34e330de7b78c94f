"""The ``weather`` adapter: real gridded lat-lon data as GenCast-style forecast pairs.

Reads CF netCDF files (one file, a glob or a list; variables may live in different files and
times may be split over files, e.g. one file per variable or per year) and turns them into
``(state at t [and earlier states] + forcings) -> state at t + lead`` training pairs.

Conventions
-----------
- **Coordinates** are recognised the CF way, in this order: ``standard_name`` (latitude,
  longitude, time, air_pressure, ..., realization), ``units`` (degrees_north/east, "<unit>
  since <date>", hPa/Pa/mbar), ``axis`` (X/Y/Z/T), ``positive``; then common names (lat,
  latitude, lon, longitude, level, plev, lev, pressure_level, isobaricInhPa, time, valid_time,
  timestep, member, number, ...).  ``dims={"time": "step"}`` names a dim explicitly.
- **Orientation**: the model sees latitude *ascending*; a descending file is flipped and the
  decoder flips back.  Longitude keeps the file's data order: a grid that crosses the wrap
  (``[350, 355, 0, 5]`` or ``[180 .. 359, 0 .. 179]``) is relabelled continuously
  (``[-10, -5, 0, 5]``) instead of rolled, so regional grids stay contiguous; a descending
  longitude is flipped.  Any other non-monotonic coordinate is an error.
- **Periodic axes** (``layout.periodic``, where the backbone pads circularly): the ``periodic``
  option (``["latitude", "longitude"]``, ``["longitude"]`` or ``[]``); else a file's global
  attribute ``periodic_axes`` (``"latitude longitude"``: the QG simulator writes it, its domain is
  doubly periodic); else longitude alone when the grid covers 360 degrees.
- **Channels** are ``"var"`` (no level) or ``"var@level"`` (``"t@500"``; level in the file's
  units), variables in the order given, levels in the file's order.  Conditioning fields are
  the history states ``"t@500@t-1"``, ``"t@500@t"`` (oldest first, ``lead`` apart;
  :func:`diffkit.layout.history_channels`),
  standardised with the state statistics, then static fields, then ``"mask"`` (only when the
  data have missing values anywhere).
- **Forcings** (``layout.scalars``) are sin/cos of the UTC time of day and of the fraction of
  the year, of the *initialisation* time ``t`` (the valid time of the latest input state; the
  target time is ``t + lead`` with a fixed lead, so either carries the same information, and
  the init time is what a forecast is started from).  Day of year is ``(doy - 1 + hour / 24) /
  days_in_year`` (365 or 366; calendar-aware for cftime calendars).
- **Missing values** (NaN after CF decoding of ``_FillValue``/``missing_value``): the *fixed
  mask* of a channel is the set of points missing at every training time; they are masked
  everywhere (also in validation times).  Targets are never filled: ``item["weight"]`` is 0
  where the target is missing.  Inputs are filled with 0 (the normalised mean) and the
  ``"mask"`` channel is 0 where any input channel is missing.  A point missing only sometimes is
  an error naming variable, time and point count, unless ``allow_missing=True``.
- **Statistics**: per channel (variable and level) NaN-skipping mean and population std over
  the training times (and members), accumulated in float64 over blocks of ``stats_block`` time
  steps (Chan et al.'s pairwise update), so memory does not grow with the number of steps; with
  ``target="residual"`` also those of ``x(t + lead) - x(t)`` over the training pairs.  The
  layout's ``mean``/``std`` are those of the target; the state statistics of the inputs, with the
  history, lead (``step``, in hours) and target, are the layout's
  :class:`~diffkit.layout.AutoregressiveSpec` (``layout.autoregressive``).  Everything the decoder needs (names, attributes, units, levels, coordinates
  in the file's order, fixed masks) is in ``layout.attrs``: a checkpoint alone can decode.
- **Splits** are by time: the last ``val_fraction`` of the times (or ``train_slice`` /
  ``val_slice``, ISO dates, inclusive) are validation; a pair belongs to a split only if *all*
  its times do, so validation pairs never touch a training time.
- **Memory**: files are opened lazily (netCDF backend, no dask needed; zarr stores through dask)
  by :class:`~diffkit_weather.store.Store`, the reader the forecaster shares; an item reads only
  its time slices with ``isel``, the statistics pass reads bounded time blocks.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffkit.adapters import Adapter, cf_attrs, split_of
from diffkit.layout import TARGETS, AutoregressiveSpec, Layout, history_channels

from ._common import WeatherDataError, _attrs, _fmt_level, _plain, _vals
from .cf import (_fmt_time, _hours, _keys, _orientation, _same_coord, decode_file_time, find_coords, level_pos,
                 one_calendar, time_forcings)
from .decode import _rle, cf_grid_attrs, unstack, write_samples
from .store import Store, field_segment, open_lazy, resolve_paths

FORCINGS = ("time_of_day", "day_of_year")
#: elements of one statistics read (float32 ~ 21 bytes each with the float64 temporaries)
_STATS_ELEMENTS = 1 << 22


# ----------------------------------------------------------------------------- datasets
class _Pairs(Dataset):
    """Forecast pairs of one split; item ``i`` is pair ``i // members`` of member ``i % members``."""

    def __init__(self, adapter: "GriddedAdapter", pairs: np.ndarray):
        self.a = adapter
        self.pairs = pairs
        self.members = adapter.members

    def __len__(self):
        return len(self.pairs) * len(self.members)

    def times(self, i: int) -> tuple:
        """``(init time, target time)`` of item ``i``."""
        p = self.pairs[i // len(self.members)]
        return self.a.times[p[-2]], self.a.times[p[-1]]

    def __getitem__(self, i):
        if not 0 <= i < len(self):
            raise IndexError(f"item {i} out of range for {len(self)} pairs")
        p = self.pairs[i // len(self.members)]
        u = self.a._read_state(p, i % len(self.members))  # (history + 1, C, H, W), NaN where missing
        return self.a._make_item(u, int(p[-2]))


# ----------------------------------------------------------------------------- adapter
class GriddedAdapter(Adapter):
    """Gridded lat-lon netCDF (ERA5 / WeatherBench-2 layouts, NCL sample files, ...) as forecast pairs.

    Options: ``path`` (a file, a glob or a list; variables may be in different files),
    ``variables`` (default: every variable with time, latitude and longitude dims),
    ``levels`` (list of level values for every variable with a level dim, or ``{var: [..]}``;
    default all), ``lead`` (hours; default the time step; a positive multiple of it),
    ``history`` (input states, ``lead`` apart, 1), ``target`` (``"state"`` or ``"residual"``),
    ``val_fraction`` (last fraction of the times, 0.1), ``train_slice`` / ``val_slice`` (ISO date
    pairs ``[start, end]`` or ``"start/end"``, inclusive; override ``val_fraction``),
    ``allow_missing`` (NaN outside the fixed mask gets weight 0 instead of an error),
    ``allow_gaps`` (drop pairs spanning gaps of the time axis instead of an error),
    ``forcings`` (``"time_of_day"``, ``"day_of_year"``), ``static`` (time-independent variables
    given as conditioning fields, e.g. orography), ``member`` (``None``: all members of a
    member/realization dim as separate trajectories; or the member value(s) to use),
    ``stats_block`` (time steps per statistics read, 64), ``time_units`` (for time coordinates
    without CF units, e.g. ``"hours since 1996-01-05 00:00"``), ``dims`` (``{role: dim}`` for
    dims that cannot be recognised, roles time/latitude/longitude/level/member), ``periodic``
    (the periodic axes; see the module docstring).
    """

    name = "weather"

    def __init__(self, path, variables: Sequence[str] | str | None = None,
                 levels: Sequence[float] | Mapping[str, Sequence[float]] | None = None,
                 lead: float | None = None, history: int = 1, target: str = "state", val_fraction: float = 0.1,
                 train_slice=None, val_slice=None, allow_missing: bool = False, allow_gaps: bool = False,
                 forcings: Sequence[str] = FORCINGS, static: Sequence[str] | str = (), member=None,
                 stats_block: int = 64, time_units: str | None = None, dims: Mapping[str, str] | None = None,
                 periodic: Sequence[str] | str | None = None):
        if not isinstance(history, int) or isinstance(history, bool) or history < 1:
            raise WeatherDataError(f"data.options.history must be an integer >= 1, got {history!r}")
        if target not in TARGETS:
            raise WeatherDataError(f"data.options.target must be one of {', '.join(TARGETS)}, got {target!r}")
        if not 0 <= val_fraction < 1:
            raise WeatherDataError(f"data.options.val_fraction must be in [0, 1), got {val_fraction}")
        if not isinstance(stats_block, int) or stats_block < 1:
            raise WeatherDataError(f"data.options.stats_block must be an integer >= 1, got {stats_block!r}")
        forcings = [forcings] if isinstance(forcings, str) else list(forcings)
        unknown = [f for f in forcings if f not in FORCINGS]
        if unknown:
            raise WeatherDataError(f"unknown forcing(s) {unknown}; available: {', '.join(FORCINGS)}")
        self.history, self.target, self.forcings = history, target, forcings
        self.allow_missing, self.allow_gaps = bool(allow_missing), bool(allow_gaps)
        self.stats_block = stats_block
        self.paths = resolve_paths(path)
        self.static_names = [static] if isinstance(static, str) else list(static)

        self._open_files(variables, levels, member, time_units, dims)
        self.periodic = self._periodic_axes(periodic)
        self._time_axis(lead)
        self._split(val_fraction, train_slice, val_slice)
        self._scan()
        self._static_fields()
        if target == "residual":
            self._residual_stats()
        self._layout = self._make_layout()

    def _periodic_axes(self, periodic) -> tuple[str, ...]:
        """The layout's periodic axes: the option, else the file's ``periodic_axes`` attribute,
        else longitude when the grid covers 360 degrees."""
        src = "data.options.periodic"
        if periodic is None:
            found = [(p, ds.attrs["periodic_axes"]) for p, ds, _ in self._files if "periodic_axes" in ds.attrs]
            if not found:
                return ("longitude",) if self.orient["periodic"] else ()
            periodic, src = str(found[0][1]), f"the global attribute periodic_axes of {found[0][0].name}"
        names = periodic.replace(",", " ").split() if isinstance(periodic, str) else list(periodic)
        bad = [a for a in names if a not in ("latitude", "longitude")]
        if bad:
            raise WeatherDataError(f"{src} names {bad}; the periodic axes can only be 'latitude' and/or "
                                   f"'longitude' (e.g. periodic = [\"latitude\", \"longitude\"] for a doubly "
                                   f"periodic domain, [] for none)")
        return tuple(a for a in ("latitude", "longitude") if a in names)

    # -- files, grid, variables ------------------------------------------------------------
    def _open_files(self, variables, levels, member, time_units, dims):
        files = []
        for i, p in enumerate(self.paths):
            ds = open_lazy(p)
            roles = find_coords(ds, p, dims)
            files.append((p, ds, roles))
        # the grid: every file with latitude and longitude must agree with the first one
        grid_files = [f for f in files if "latitude" in f[2] and "longitude" in f[2]]
        if not grid_files:
            raise WeatherDataError(
                f"no latitude/longitude dims found in {', '.join(p.name for p in self.paths)} (dims: "
                f"{'; '.join(f'{p.name}: ' + ', '.join(map(str, ds.dims)) for p, ds, _ in files)}); name them with "
                f"data.options.dims = {{latitude = \"...\", longitude = \"...\"}}")
        p0, ds0, r0 = grid_files[0]
        lat0 = np.asarray(ds0[r0["latitude"]].values, dtype=np.float64)
        lon0 = np.asarray(ds0[r0["longitude"]].values, dtype=np.float64)
        for p, ds, r in grid_files[1:]:
            for role, ref in (("latitude", lat0), ("longitude", lon0)):
                v = np.asarray(ds[r[role]].values, dtype=np.float64)
                _same_coord(v, ref, role, f"{p.name}", f"{p0.name}")
        self.orient = _orientation(lat0, lon0, p0.name)
        self.coord_dtypes = {r0[k]: str(ds0[r0[k]].dtype) for k in ("latitude", "longitude")}
        self.grid = dict(lat_name=r0["latitude"], lon_name=r0["longitude"], lat=lat0, lon=lon0,
                         lat_attrs=_attrs(ds0[r0["latitude"]].attrs), lon_attrs=_attrs(ds0[r0["longitude"]].attrs))

        # candidate variables: (time, lat, lon [, level] [, member])
        avail: dict[str, list] = {}
        statics: dict[str, tuple] = {}
        for fi, (p, ds, r) in enumerate(files):
            for v in ds.data_vars:
                seg, big = field_segment(ds, v, r, fi, p.name)
                if seg is None or big:
                    continue  # not a plain gridded field (extra dims of size > 1)
                if seg["time"] is None:
                    statics.setdefault(str(v), (fi, seg))
                else:
                    avail.setdefault(str(v), []).append(seg)
        self._files = files
        if variables is None:
            variables = [v for v in avail if v not in self.static_names]
            if not variables:
                raise WeatherDataError(
                    f"{', '.join(p.name for p in self.paths)} hold no variable with time, latitude and longitude "
                    f"dims; they have {self._describe_vars()}")
        variables = [variables] if isinstance(variables, str) else list(variables)
        missing = [v for v in variables if v not in avail]
        if missing:
            raise WeatherDataError(
                f"variable(s) {', '.join(map(repr, missing))} not found in {', '.join(p.name for p in self.paths)}; "
                f"the gridded variables with a time dim are {', '.join(sorted(avail)) or 'none'} "
                f"(all variables: {self._describe_vars()})")
        bad_static = [v for v in self.static_names if v not in statics and v not in avail]
        if bad_static:
            raise WeatherDataError(f"static field(s) {bad_static} not found; time-independent gridded variables: "
                                   f"{', '.join(sorted(statics)) or 'none'}")
        self.variables = variables
        self._avail, self._statics = avail, statics

        # members
        mdims = {seg["member"] for v in variables for seg in avail[v]}
        if len(mdims - {None}) and None in mdims:
            raise WeatherDataError(f"some variables have a member dim and others not ({variables}); use variables of "
                                   f"one kind or select one member per file first")
        self.member_values: list = []
        if mdims - {None}:
            seg = avail[variables[0]][0]
            md, vals = seg["member"], seg["member_values"]
            if member is None:
                self.members = list(range(len(vals)))
            else:
                want = [member] if np.ndim(member) == 0 else list(member)
                idx = []
                for w in want:
                    hit = np.flatnonzero(vals == w)
                    if not hit.size:
                        raise WeatherDataError(f"member {w!r} not in {md!r} of {files[seg['file']][0].name}; "
                                               f"members: {_vals(vals)}")
                    idx.append(int(hit[0]))
                self.members = idx
            self.member_values = [_plain(vals[i]) for i in self.members]
        else:
            if member is not None:
                raise WeatherDataError(f"data.options.member = {member!r}, but the variables have no member / "
                                       f"realization dim")
            self.members = [None]

        # levels per variable
        self.levels: dict[str, list[float]] = {}
        self.level_info: dict[str, dict] = {}
        for v in variables:
            segs = avail[v]
            ld = segs[0]["level"]
            if any(s["level"] != ld for s in segs):
                raise WeatherDataError(f"variable {v!r} has different level dims in different files")
            for s in segs:
                s["level_index"] = None
            if ld is not None:
                ds = files[segs[0]["file"]][1]
                lv = (np.asarray(ds[ld].values, dtype=np.float64) if ld in ds.variables
                      else np.arange(ds.sizes[ld], dtype=np.float64))
                for s in segs[1:]:
                    dso = files[s["file"]][1]
                    _same_coord(np.asarray(dso[ld].values, dtype=np.float64), lv, f"level {ld!r} of {v!r}",
                                files[s["file"]][0].name, files[segs[0]["file"]][0].name)
                want = levels.get(v) if isinstance(levels, Mapping) else levels
                if want is None:
                    idx = list(range(len(lv)))
                else:
                    want = [want] if np.ndim(want) == 0 else list(want)
                    idx = [level_pos(lv, w) for w in want]
                    if None in idx:
                        raise WeatherDataError(f"level {want[idx.index(None)]!r} of variable {v!r} not in {ld!r}; its "
                                               f"levels are {_vals(lv, 20)}")
                for s in segs:
                    s["level_index"] = idx
                self.levels[v] = [float(lv[i]) for i in idx]
                self.level_info[v] = dict(dim=ld, attrs=_attrs(ds[ld].attrs) if ld in ds.variables else {},
                                          descending=bool(len(lv) > 1 and (np.diff(lv) < 0).all()))
                if ld in ds.variables:
                    self.coord_dtypes[ld] = str(ds[ld].dtype)
        self.channels = [f"{v}@{_fmt_level(l)}" if v in self.levels else v
                         for v in variables for l in (self.levels.get(v) or [None])]
        dup = sorted({c for c in self.channels if self.channels.count(c) > 1})
        if dup:
            raise WeatherDataError(f"channel(s) {dup} appear twice; list each variable and level once")
        self.ch_slices = {}
        c = 0
        for v in variables:
            n = len(self.levels.get(v) or [None])
            self.ch_slices[v] = slice(c, c + n)
            c += n
        self._time_units = time_units

    def _describe_vars(self) -> str:
        out = []
        for p, ds, r in self._files:
            have = ", ".join(f"{k}{tuple(map(str, v.dims))}" for k, v in ds.data_vars.items())
            out.append(f"{p.name}: {have or 'none'}")
        return "; ".join(out)

    # -- time axis -------------------------------------------------------------------------
    def _time_axis(self, lead):
        files = self._files
        decoded: dict[int, np.ndarray] = {}
        for v in self.variables:
            for seg in self._avail[v]:
                fi = seg["file"]
                if fi not in decoded:
                    p, ds, r = files[fi]
                    decoded[fi] = decode_file_time(ds, seg["time"], p.name, self._time_units, how="time_units")
                    t = decoded[fi]
                    h = _hours(t)
                    if h.size > 1 and not (np.diff(h) > 0).all():
                        i = int(np.flatnonzero(np.diff(h) <= 0)[0])
                        raise WeatherDataError(
                            f"time axis of {p.name} is not strictly increasing: {_fmt_time(t[i])} is followed by "
                            f"{_fmt_time(t[i + 1])}; sort the file by time (ds.sortby('time')) and drop duplicates")
        one_calendar(decoded.values())
        allh = np.unique(np.concatenate([np.round(_hours(t), 6) for t in decoded.values()]))
        # global axis: union of all times; every variable must hold every time exactly once
        first = {}
        for fi, t in decoded.items():
            for hv, tv in zip(np.round(_hours(t), 6), t):
                first.setdefault(hv, tv)
        self.hours = allh
        self.times = np.array([first[h] for h in allh], dtype=next(iter(decoded.values())).dtype)
        T = len(allh)
        for v in self.variables:
            for seg in self._avail[v]:
                seg["times"], seg["keys"] = decoded[seg["file"]], _keys(decoded[seg["file"]])
                seg["member_index"] = self.members if seg["member"] is not None else None
        # static fields: a time-independent field, else the first time of one; the first member of a member dim
        static = {v: dict(self._statics[v][1] if v in self._statics else self._avail[v][0], member_index=[0])
                  for v in self.static_names}
        self.store = Store([(p.name, p, ds) for p, ds, _ in files], {v: self._avail[v] for v in self.variables},
                           static=static, orient=self.orient, dtype=np.float32)
        for v in self.variables:
            if v in self.store.clash:
                key, first_seg, again = self.store.clash[v]
                other, seg = self._avail[v][first_seg], self._avail[v][again]
                raise WeatherDataError(
                    f"variable {v!r} appears at the same time {_fmt_time(self.times[np.searchsorted(allh, key)])} in "
                    f"{files[other['file']][0].name} and {files[seg['file']][0].name}; give each time once")
            absent = ~self.store.has(v, allh)
            if absent.any():
                i = int(np.flatnonzero(absent)[0])
                raise WeatherDataError(
                    f"variable {v!r} has no data at {_fmt_time(self.times[i])} ({int(absent.sum())} of {T} times "
                    f"missing), which other variables have; every variable needs the same times (files: "
                    f"{', '.join(files[s['file']][0].name for s in self._avail[v])})")

        if T < 2:
            raise WeatherDataError(f"{', '.join(p.name for p in self.paths)} hold {T} time(s); forecast pairs need "
                                   f"at least 2")
        d = np.diff(allh)
        self.step_hours = float(d.min())
        if lead is None:
            lead = self.step_hours
        lead = float(lead)
        k = lead / self.step_hours
        if not lead > 0 or abs(k - round(k)) > 1e-6 or round(k) < 1:
            raise WeatherDataError(
                f"lead {lead:g} h is not a positive multiple of the time step of the data ({self.step_hours:g} h); "
                f"use lead = {self.step_hours:g}, {2 * self.step_hours:g}, ...")
        self.lead_hours = lead
        gaps = np.flatnonzero(np.abs(d - self.step_hours) > 1e-6)
        self.gaps = gaps
        if gaps.size and not self.allow_gaps:
            i = int(gaps[0])
            prev = _fmt_time(self.times[i - 1]) + ", " if i > 0 else ""
            nxt = ", " + _fmt_time(self.times[i + 2]) if i + 2 < T else ""
            raise WeatherDataError(
                f"the time axis has a gap: {_fmt_time(self.times[i])} is followed by {_fmt_time(self.times[i + 1])} "
                f"({d[i]:g} h; the step is {self.step_hours:g} h; neighbours: {prev}{_fmt_time(self.times[i])}, "
                f"{_fmt_time(self.times[i + 1])}{nxt}); {gaps.size} gap(s) in all. Fill the missing times, or pass "
                f"allow_gaps=True to drop the pairs that span a gap")
        fr = time_forcings(self.times)
        cols = []
        self.scalar_names = []
        for f in self.forcings:
            cols += [np.sin(2 * np.pi * fr[f]), np.cos(2 * np.pi * fr[f])]
            self.scalar_names += [f"sin_{f}", f"cos_{f}"]
        self._scalars = torch.as_tensor(np.stack(cols, 1) if cols else np.zeros((T, 0)), dtype=torch.float32)

    # -- splits and pairs ------------------------------------------------------------------
    def _bounds(self, s, what):
        import pandas as pd

        if s is None:
            return None
        if isinstance(s, str):
            s = s.split("/")
        s = list(s)
        if len(s) != 2:
            raise WeatherDataError(f"data.options.{what} must be [start, end] or 'start/end' (ISO dates), got {s!r}")
        if not np.issubdtype(self.times.dtype, np.datetime64):
            raise WeatherDataError(f"data.options.{what} needs a standard calendar; these files use "
                                   f"{self.times.flat[0].calendar!r}; use val_fraction")
        try:
            lo = -np.inf if s[0] in (None, "") else _hours(np.array([pd.Period(str(s[0])).start_time.to_datetime64()]))[0]
            hi = np.inf if s[1] in (None, "") else _hours(np.array([pd.Period(str(s[1])).end_time.to_datetime64()]))[0]
        except Exception as e:
            raise WeatherDataError(f"data.options.{what} = {s!r}: cannot read ISO dates ({e})") from None
        return lo, hi

    def _split(self, val_fraction, train_slice, val_slice):
        T = len(self.hours)
        if train_slice is not None or val_slice is not None:
            tb, vb = self._bounds(train_slice, "train_slice"), self._bounds(val_slice, "val_slice")
            if tb is None:
                tb = (-np.inf, vb[0] - 1e-9)
            if vb is None:
                vb = (tb[1] + 1e-9, np.inf)
            if tb[0] <= vb[1] and vb[0] <= tb[1]:
                raise WeatherDataError(f"train_slice {train_slice!r} and val_slice {val_slice!r} overlap; validation "
                                       f"times must not be training times")
            train = (self.hours >= tb[0]) & (self.hours <= tb[1])
            val = (self.hours >= vb[0]) & (self.hours <= vb[1])
        else:
            n_val = 0 if val_fraction == 0 else max(1, int(round(T * val_fraction)))
            train = np.arange(T) < T - n_val
            val = ~train
        self.train_times, self.val_times = train, val
        self.train_pairs, self.val_pairs = self._pairs(train), self._pairs(val)
        if not len(self.train_pairs):
            raise WeatherDataError(
                f"no training pair: {int(train.sum())} training time(s) do not hold history {self.history} + lead "
                f"{self.lead_hours:g} h (step {self.step_hours:g} h); use more times, a shorter lead or less history")
        if val.any() and not len(self.val_pairs):
            raise WeatherDataError(
                f"the validation split ({int(val.sum())} time(s)) holds no complete pair for history {self.history} "
                f"and lead {self.lead_hours:g} h; raise val_fraction (or widen val_slice), or set val_fraction = 0")

    def _pairs(self, allowed: np.ndarray) -> np.ndarray:
        """``(n, history + 1)`` global time indices: history (oldest first, the last is t), then t + lead."""
        H, T = self.hours, len(self.hours)
        offs = np.array([-(self.history - 1 - j) * self.lead_hours for j in range(self.history)] + [self.lead_hours])
        want = H[:, None] + offs[None, :]
        pos = np.clip(np.searchsorted(H, want - 1e-6), 0, T - 1)
        ok = (np.abs(H[pos] - want) < 1e-6).all(1)
        ok &= allowed[pos].all(1)
        return pos[ok]

    # -- statistics and missing values ----------------------------------------------------
    def _block(self, per_step: int) -> int:
        return max(1, min(self.stats_block, _STATS_ELEMENTS // max(1, per_step)))

    def _scan(self):
        C = len(self.channels)
        H, W = len(self.grid["lat"]), len(self.grid["lon"])
        n = np.zeros(C)
        mean = np.zeros(C)
        m2 = np.zeros(C)
        nan_train = np.zeros((C, H, W), np.int64)
        nan_all = np.zeros((C, H, W), np.int64)
        first_nan = np.full((C, H, W), -1, np.int64)
        train = self.train_times
        maxL = max(len(self.levels.get(v) or [None]) for v in self.variables)
        nb = self._block(maxL * H * W)
        used = np.flatnonzero(train | self.val_times)  # times outside both splits are never read (a time slice
        for m in range(len(self.members)):             # of a 1959-2023 store reads that slice only)
            for s in range(0, used.size, nb):
                tidx = used[s: s + nb]
                tr = train[tidx]
                for v in self.variables:
                    a = self.store.read(v, self.hours[tidx], m)
                    cs = self.ch_slices[v]
                    if not np.isfinite(a[~np.isnan(a)]).all():
                        self._infinite(v, a, tidx, m)
                    nan = np.isnan(a)
                    nan_all[cs] += nan.sum(0)
                    if tr.any():
                        nan_train[cs] += nan[tr].sum(0)
                    anynan = nan.any(0)
                    if anynan.any():
                        f = tidx[np.argmax(nan, axis=0)]
                        fn = first_nan[cs]
                        upd = anynan & (fn < 0)
                        fn[upd] = f[upd]
                        first_nan[cs] = fn
                    if tr.any():
                        _chan_update(a[tr], n, mean, m2, cs)
                    del a, nan
        ntr = int(train.sum()) * len(self.members)
        fixed = nan_train == ntr
        bad = (nan_all > 0) & ~fixed
        if bad.any() and not self.allow_missing:
            fb = np.where(bad, first_nan, np.iinfo(np.int64).max)
            c = int(np.argmin(fb.reshape(C, -1).min(1)))
            t = int(fb[c].min())
            v = next(v for v in self.variables if self.ch_slices[v].start <= c < self.ch_slices[v].stop)
            count = 0
            for mm in range(len(self.members)):
                a = self.store.read(v, self.hours[[t]], mm)[0, c - self.ch_slices[v].start]
                count = max(count, int((np.isnan(a) & ~fixed[c]).sum()))
            seg = self.store.segment(v, self.hours[t])
            raise WeatherDataError(
                f"variable {v!r} (channel {self.channels[c]!r}, file {self._files[seg['file']][0].name}) is missing "
                f"(NaN) at {count} grid point(s) at {_fmt_time(self.times[t])} outside its fixed mask (the "
                f"{int(fixed[c].sum())} points missing at every training time); {int(bad.any(0).sum())} point(s) are "
                f"missing only sometimes. Pass allow_missing=True to give them loss weight 0 (and mask them in the "
                f"inputs), or fill / drop those times")
        empty = [self.channels[c] for c in range(C) if n[c] == 0]
        if empty:
            raise WeatherDataError(f"channel(s) {empty} have no valid value at the training times; drop them "
                                   f"(data.options.variables / levels)")
        std = np.sqrt(m2 / n)
        const = [self.channels[c] for c in range(C) if not std[c] > 1e-12 * max(1.0, abs(mean[c]))]
        if const:
            raise WeatherDataError(f"channel(s) {const} are constant over the training times (std 0) and cannot be "
                                   f"standardised; drop them (data.options.variables / levels)")
        self.state_mean, self.state_std = mean, std
        self.fixed_mask = fixed  # (C, H, W) bool
        self.has_missing = bool(nan_all.any())
        self.n_train_samples = n

    def _infinite(self, v: str, a: np.ndarray, tidx: np.ndarray, m: int) -> None:
        """Raise naming the variable, channel, time, member and count of the first infinite values of a block
        ``a`` (``(nt, L, lat, lon)`` of variable ``v`` at the times ``tidx``, member position ``m``)."""
        inf = np.isinf(a)
        i = int(np.flatnonzero(inf.any(axis=(1, 2, 3)))[0])
        li = int(np.flatnonzero(inf[i].any(axis=(1, 2)))[0])
        c = self.ch_slices[v].start + li
        signs = sorted({"+inf" if x > 0 else "-inf" for x in a[i][inf[i]].ravel()[:1000]})
        seg = self.store.segment(v, self.hours[tidx[i]])
        mem = ""
        if self.members[m] is not None:
            md = seg["member"] or "member"
            mem = f", member {self.member_values[m]!r} of {md!r}"
        raise WeatherDataError(
            f"variable {v!r} (channel {self.channels[c]!r}, file {self._files[seg['file']][0].name}{mem}) holds "
            f"infinite values ({' and '.join(signs)}) at {int(inf[i, li].sum())} grid point(s) at "
            f"{_fmt_time(self.times[tidx[i]])} ({int(inf.sum())} in this block of {len(tidx)} time(s)); infinite "
            f"values cannot be standardised: fix them, or set them to NaN to mark them missing")

    def _residual_stats(self):
        C = len(self.channels)
        n, mean, m2 = np.zeros(C), np.zeros(C), np.zeros(C)
        P = self.train_pairs
        H, W = len(self.grid["lat"]), len(self.grid["lon"])
        maxL = max(len(self.levels.get(v) or [None]) for v in self.variables)
        nb = max(1, self._block(2 * maxL * H * W))
        for m in range(len(self.members)):
            for s in range(0, len(P), nb):
                blk = P[s: s + nb]
                need = np.unique(np.concatenate([blk[:, -2], blk[:, -1]]))
                i0 = np.searchsorted(need, blk[:, -2])
                i1 = np.searchsorted(need, blk[:, -1])
                for v in self.variables:
                    a = self.store.read(v, self.hours[need], m)
                    cs = self.ch_slices[v]
                    d = a[i1] - a[i0]
                    d[:, self.fixed_mask[cs]] = np.nan
                    _chan_update(d, n, mean, m2, cs)
        std = np.sqrt(m2 / np.maximum(n, 1))
        const = [self.channels[c] for c in range(C) if not std[c] > 0]
        if const:
            raise WeatherDataError(f"channel(s) {const} do not change over {self.lead_hours:g} h; use target='state'")
        self.target_mean, self.target_std = mean, std

    def _static_fields(self):
        self.static_channels: list[str] = []
        arrs = []
        for v in self.static_names:
            seg = self.store.static[v]
            a = self.store.read_static(v)          # (L, lat, lon) float64, the model's orientation
            if seg["level"] is None:
                names = [v]
            else:
                ds = self.store.ds(seg["file"])
                lv = ds[seg["level"]].values if seg["level"] in ds.variables else np.arange(a.shape[0])
                names = [f"{v}@{_fmt_level(x)}" for x in lv]
            arrs.append(a)
            self.static_channels += names
        if arrs:
            a = np.concatenate(arrs, 0)
            m = np.nanmean(a, axis=(1, 2))
            s = np.nanstd(a, axis=(1, 2))
            s = np.where(s > 0, s, 1.0)
            self.static_mean, self.static_std = m, s
            z = (a - m[:, None, None]) / s[:, None, None]
            self.static_valid = np.isfinite(z).all(0)
            self._static = torch.as_tensor(np.nan_to_num(z, nan=0.0), dtype=torch.float32)
            self.has_missing = self.has_missing or not bool(self.static_valid.all())
        else:
            self.static_mean = self.static_std = np.zeros(0)
            self.static_valid = None
            self._static = None

    # -- items -----------------------------------------------------------------------------
    def _read_state(self, pair: np.ndarray, member) -> np.ndarray:
        order = np.argsort(pair, kind="stable")
        out = np.empty((len(pair), len(self.channels), len(self.grid["lat"]), len(self.grid["lon"])), np.float32)
        for v in self.variables:
            a = self.store.read(v, self.hours[pair[order]], member)
            out[order, self.ch_slices[v]] = a
        if self.fixed_mask.any():
            out[:, self.fixed_mask] = np.nan
        return out

    def _make_item(self, u: np.ndarray, t_init: int) -> dict:
        spec = self._layout.autoregressive
        h = spec.history
        hist = u[:h]
        tgt = spec.target_from(hist[-1], u[h])
        tm = (self.target_mean if self.target == "residual" else self.state_mean)[:, None, None]
        ts = (self.target_std if self.target == "residual" else self.state_std)[:, None, None]
        x = ((tgt - tm) / ts).astype(np.float32)
        fields = spec.standardize(hist, 2).astype(np.float32).reshape(-1, *u.shape[2:])
        item: dict[str, torch.Tensor] = {}
        if self.has_missing:
            valid_t = np.isfinite(x)
            item["weight"] = torch.from_numpy(valid_t.astype(np.float32))
            x = np.where(valid_t, x, np.float32(0))
            valid_in = np.isfinite(hist).all(axis=(0, 1))
            if self.static_valid is not None:
                valid_in &= self.static_valid
            fields = np.nan_to_num(fields, nan=0.0)
        parts = [torch.from_numpy(fields)]
        if self._static is not None:
            parts.append(self._static)
        if self.has_missing:
            parts.append(torch.from_numpy(valid_in.astype(np.float32))[None])
        item["x"] = torch.from_numpy(np.ascontiguousarray(x))
        item["fields"] = torch.cat(parts, 0)
        if self.scalar_names:
            item["scalars"] = self._scalars[t_init]
        return item

    # -- layout ----------------------------------------------------------------------------
    def _make_layout(self) -> Layout:
        C = len(self.channels)
        lat_m, lon_m = self.orient["lat_model"], self.orient["lon_model"]
        from .metrics import latitude_weights

        w = latitude_weights(torch.as_tensor(lat_m)).to(torch.float32).reshape(1, -1, 1)
        cond = list(history_channels(self.channels, self.history)) + list(self.static_channels)
        if self.has_missing:
            cond.append("mask")
        tm = self.target_mean if self.target == "residual" else self.state_mean
        ts = self.target_std if self.target == "residual" else self.state_std
        var_attrs, fills, dtypes, var_dims, units, long_names = {}, {}, {}, {}, {}, {}
        for v in self.variables:
            seg = self._avail[v][0]
            da = self._files[seg["file"]][1][v]
            var_attrs[v] = _attrs(da.attrs)
            enc = da.encoding
            fv = enc.get("_FillValue", enc.get("missing_value"))
            if fv is not None and np.ndim(fv) == 0:
                fills[v] = float(fv)
            dtypes[v] = str(np.dtype(da.dtype)) if np.dtype(da.dtype).kind == "f" else "float32"
            var_dims[v] = [str(d) for d in da.dims if d in (seg["level"], seg["lat"], seg["lon"])]
            u = str(da.attrs.get("units", ""))
            ln = str(da.attrs.get("long_name", v))
            for ch in self.channels[self.ch_slices[v]]:
                units[ch] = u
                long_names[ch] = ln
        gattrs = {}
        for p, ds, r in self._files:
            for k, val in ds.attrs.items():
                gattrs.setdefault(str(k), _plain(val))
        fixed = {self.channels[c]: _rle(self.fixed_mask[c]) for c in range(C) if self.fixed_mask[c].any()}
        g = self.grid
        attrs: dict[str, Any] = dict(
            adapter=self.name, variables=list(self.variables), channels=list(self.channels),
            levels={v: list(l) for v, l in self.levels.items()},
            level_dims={v: i["dim"] for v, i in self.level_info.items()},
            level_attrs={v: i["attrs"] for v, i in self.level_info.items()},
            level_descending={i["dim"]: i["descending"] for i in self.level_info.values()},
            var_attrs=var_attrs, var_dims=var_dims, fill_values=fills, dtypes=dtypes, units=units, long_names=long_names,
            lat_name=g["lat_name"], lon_name=g["lon_name"], lat_values=g["lat"].tolist(), lon_values=g["lon"].tolist(),
            lat_attrs=g["lat_attrs"], lon_attrs=g["lon_attrs"], coord_dtypes=dict(self.coord_dtypes),
            lat_flipped=int(self.orient["lat_flip"]), lon_flipped=int(self.orient["lon_flip"]),
            global_grid=int(self.orient["periodic"]),
            step_hours=self.step_hours, forcings=list(self.forcings), forcing_time="init",
            static=list(self.static_names), static_channels=list(self.static_channels),
            static_mean=np.asarray(self.static_mean).tolist(), static_std=np.asarray(self.static_std).tolist(),
            mask_channel=int(self.has_missing), fixed_mask=fixed,
            members=list(self.member_values),
            train_times=[_fmt_time(self.times[self.train_times][0]), _fmt_time(self.times[self.train_times][-1])]
            if self.train_times.any() else [],
            source=[p.name for p in self.paths], global_attrs=gattrs,
        )
        return Layout(channels=tuple(self.channels), spatial=("latitude", "longitude"), shape=(len(lat_m), len(lon_m)),
                      periodic=self.periodic,
                      coords={"latitude": tuple(lat_m.tolist()), "longitude": tuple(lon_m.tolist())},
                      weights=w, cond_channels=tuple(cond), scalars=tuple(self.scalar_names),
                      mean=torch.as_tensor(tm, dtype=torch.float32).reshape(C, 1, 1),
                      std=torch.as_tensor(ts, dtype=torch.float32).reshape(C, 1, 1), attrs=attrs,
                      autoregressive=AutoregressiveSpec(
                          variables=tuple(self.channels), history=self.history, horizon=1, step=self.lead_hours,
                          step_units="hours", target=self.target, state_mean=self.state_mean.tolist(),
                          state_std=self.state_std.tolist()),
                      # CF metadata of the outputs: the recognised grid's, and the CF subset of each variable's
                      coord_attrs={"latitude": cf_grid_attrs("latitude", g["lat_attrs"]),
                                   "longitude": cf_grid_attrs("longitude", g["lon_attrs"])},
                      channel_attrs={ch: {k: (x if isinstance(x, (int, float, str)) else str(x))
                                          for k, x in cf_attrs(var_attrs[v]).items()}
                                     for v in self.variables for ch in self.channels[self.ch_slices[v]]})

    # -- protocol --------------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return self._layout

    def dataset(self, split: str) -> Dataset:
        return _Pairs(self, split_of(split, self.train_pairs, self.val_pairs))

    @staticmethod
    def unstack(x, layout: Layout, **kw):
        """See :func:`~diffkit_weather.decode.unstack`."""
        return unstack(x, layout, **kw)

    @classmethod
    def decode(cls, x: torch.Tensor, layout: Layout, path, *, attrs: dict | None = None) -> Path:
        """Write standardised samples ``(N, C, lat, lon)`` as CF netCDF on the data file's grid,
        atomically (:func:`~diffkit_weather.decode.write_samples`)."""
        return write_samples(x, layout, path, attrs=attrs)


def _chan_update(a: np.ndarray, n: np.ndarray, mean: np.ndarray, m2: np.ndarray, cs: slice) -> None:
    """Merge ``a`` (``(nt, L, H, W)``, NaN skipped) into per-channel running (count, mean, M2) (Chan et al.)."""
    for j in range(a.shape[1]):
        x = a[:, j].astype(np.float64).ravel()
        x = x[~np.isnan(x)]
        if not x.size:
            continue
        c = cs.start + j
        nb = x.size
        mb = x.mean()
        m2b = float(((x - mb) ** 2).sum())
        na = n[c]
        tot = na + nb
        delta = mb - mean[c]
        mean[c] += delta * nb / tot
        m2[c] += m2b + delta * delta * na * nb / tot
        n[c] = tot
