"""Scores of an ensemble forecast against the truth, WeatherBench-2 style.

:func:`evaluate` takes a forecast dataset (as :func:`~diffkit_weather.decode.forecast_dataset`
writes it: dims ``member, init_time, lead_time, [level,] latitude, longitude``) and the truth (files
or a dataset on the same grid), reads the truth at each ``valid_time`` (with the time units and
dims the forecast recorded from its run; a valid time the truth lacks is an error listing them),
and computes per channel (variable and level) and lead time every registered ensemble metric
(:func:`diffkit.ensemble.registered`: ``fn.kind == "ensemble"``), latitude-weighted over the grid and
averaged over inits (:func:`diffkit_weather.metrics.metric_da`).  The core's are the columns

- ``rmse`` (``ensemble_mean_rmse``): latitude-weighted RMSE of the ensemble mean (per init, then
  averaged over inits);
- ``crps`` (``ensemble_crps``): the fair ensemble CRPS (Ferro 2014; needs two members);
- ``spread`` (``ensemble_spread``): the ensemble spread, square root of the area-mean member
  variance (ddof 1);
- ``spread_skill_ratio`` (``ensemble_spread_skill_ratio``): spread / RMSE times ``sqrt((M + 1) / M)``
  (1 for a reliable ensemble);

and a plugin's ensemble metric becomes a column under its registered name.  Besides,
``rank_histogram``: counts of the truth's rank among the members (``M + 1`` bins, ties broken
at random with a seeded generator), over all inits and grid points.

Missing values -- NaN in the truth (e.g. masked points, missing frames) or in any member (the
fixed mask) -- are masked: they get weight 0, and an init with no valid point is left out.
A metric that needs more members than the forecast has (``fn.min_members``; CRPS, spread and the
ratio need two) is NaN.

The results are an :class:`xarray.Dataset` (dims ``channel``, ``lead_time``, ``rank``; coordinates
``variable``, ``level``, ``units``, ``lead_hours``) and a tidy table (one row per channel and lead:
``variable, level, channel, units, lead_hours, rmse, crps, spread, spread_skill_ratio, members,
n_init, rank_0 .. rank_M``), written by :func:`write_scores` as ``scores.nc`` and ``scores.csv``
(atomically) with the figures of :mod:`diffkit_weather.plots`.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np
import torch

from diffkit.adapters import cf_encode, cf_output
from diffkit.ensemble import dispersion_verdict, format_rank_bins, rank_summary

from ._common import WeatherDataError, _fmt_level
from .cf import _fmt_time, _keys, _shift
from .truth import _fc_roles, _Truth, _truth_dataset, read_truth  # noqa: F401  (read_truth: re-exported)

__all__ = ["Evaluation", "evaluate", "open_forecast", "open_scores", "scores_table", "summarise", "write_scores",
           "format_table", "calibration", "format_calibration", "METRICS"]

#: the core's per-lead scores, in table order (any other registered ensemble metric follows)
METRICS = ("rmse", "crps", "spread", "spread_skill_ratio")
#: the registered core ensemble metrics behind the columns of :data:`METRICS`
CORE_COLUMNS = {"ensemble_mean_rmse": "rmse", "ensemble_crps": "crps", "ensemble_spread": "spread",
                "ensemble_spread_skill_ratio": "spread_skill_ratio"}


def _metric_columns() -> dict:
    """``{column: (registered name, fn)}`` of the registered ensemble metrics: the core's first."""
    from diffkit.ensemble import registered

    reg = registered()
    cols = {CORE_COLUMNS[n]: (n, f) for n, f in reg.items() if n in CORE_COLUMNS}
    missing = [c for c in METRICS if c not in cols]
    if missing:
        raise RuntimeError(f"the core ensemble metrics behind {', '.join(missing)} are not registered "
                           f"(is DIFFKIT_PLUGINS excluding diffkit's own?)")
    out = {c: cols[c] for c in METRICS}
    out.update({n: (n, f) for n, f in reg.items() if n not in CORE_COLUMNS})
    return out


def _metric_vars(scores) -> list[str]:
    """The per-(channel, lead) scores of a score dataset, in table order."""
    return [m for m in scores.data_vars if scores[m].dims == ("channel", "lead_time")]


@dataclass
class Evaluation:
    """What :func:`evaluate` returns."""

    scores: Any          # xarray.Dataset (channel, lead_time[, rank])
    table: Any           # pandas.DataFrame, one row per channel and lead time
    truth: Any           # xarray.Dataset: the truth on the forecast's (init_time, lead_time, ...) grid
    files: list = field(default_factory=list)   # paths written (with out=)


def open_forecast(path):
    """A forecast netCDF (from ``diffkit forecast``) loaded into memory, times and lead times decoded."""
    import xarray as xr

    try:
        with xr.open_dataset(path, decode_timedelta=True) as ds:
            return ds.load()
    except FileNotFoundError:
        raise FileNotFoundError(f"forecast file {path} does not exist") from None
    except Exception as e:
        raise WeatherDataError(f"cannot read the forecast {path} ({type(e).__name__}: {e})") from None


#: the forecast dims before the grid, in the order evaluate scores them
_FC_DIMS = ("initial_member", "member", "init_time", "lead_time")


def _is_time(a) -> bool:
    a = np.asarray(a)
    return np.issubdtype(a.dtype, np.datetime64) or (a.dtype == object and a.size > 0 and
                                                     hasattr(a.flat[0], "calendar"))


def _check_forecast(fc):
    """The forecast checked and put in evaluate's order: every variable ``([initial_member,] member,
    init_time, lead_time, [level,] lat, lon)`` (transposed where needed), ``valid_time`` ``(init_time,
    lead_time)`` equal to ``init_time + lead_time``.  Anything else is an error naming the dim or time."""

    # an analysis's ensemble mean / spread (cell_methods "member: ...", diffkit assimilate) are not members: not scored
    fc = fc.drop_vars([v for v in fc.data_vars if "member:" in str(fc[v].attrs.get("cell_methods", ""))])
    need = ("member", "init_time", "lead_time")
    miss = [d for d in need if d not in fc.dims]
    lacks = ([f"the dim(s) {', '.join(miss)}"] if miss else []) + \
        (["the coordinate valid_time"] if "valid_time" not in fc.coords else [])
    if lacks:
        raise WeatherDataError(f"the forecast lacks {' and '.join(lacks)}; give a file written by `diffkit forecast` "
                               f"(dims member, init_time, lead_time, ...)")
    if not fc.data_vars:
        raise WeatherDataError("the forecast holds no variable")
    r = _fc_roles(fc)
    lat, lon, levels = r["latitude"], r["longitude"], r.get("level", [])
    fc = fc.copy()
    for v in list(fc.data_vars):
        d = [str(x) for x in fc[v].dims]
        absent = [x for x in (*need, lat, lon) if x not in d]
        if absent:
            raise WeatherDataError(f"forecast variable {v!r} lacks the dim(s) {', '.join(map(repr, absent))} (its dims "
                                   f"{tuple(d)}); every variable needs member, init_time, lead_time, {lat}, {lon}")
        lev = [x for x in d if x in levels]
        extra = [x for x in d if x not in (*_FC_DIMS, lat, lon, *lev[:1])]
        if extra:
            x = extra[0]
            raise WeatherDataError(
                f"forecast variable {v!r} has the dim {x!r} (size {fc.sizes[x]}), which evaluate cannot score (its "
                f"dims {tuple(d)}); a forecast variable has the dims [initial_member,] member, init_time, lead_time, "
                f"[one level dim,] {lat}, {lon} in any order: select one {x!r} first (ds.isel({x}=0)) or drop it")
        order = [x for x in _FC_DIMS if x in d] + lev[:1] + [lat, lon]
        if d != order:
            fc[v] = fc[v].transpose(*order)
    vt = fc["valid_time"]
    if set(vt.dims) != {"init_time", "lead_time"}:
        raise WeatherDataError(f"the forecast's valid_time has the dims {tuple(vt.dims)}; it must be "
                               f"valid_time(init_time, lead_time)")
    vt = np.asarray(vt.transpose("init_time", "lead_time").values)
    init, lead = np.asarray(fc["init_time"].values), np.asarray(fc["lead_time"].values)
    if not _is_time(init) or not _is_time(vt):
        raise WeatherDataError(f"the forecast's init_time / valid_time are not dates (dtypes {init.dtype}, "
                               f"{vt.dtype}); give them CF time units ('hours since ...')")
    if not np.issubdtype(lead.dtype, np.timedelta64):
        raise WeatherDataError(f"the forecast's lead_time is not a time interval (dtype {lead.dtype}); give it "
                               f"units such as units = 'hours'")
    lead_h = lead / np.timedelta64(1, "h")
    want = _keys(init)[:, None] + lead_h[None, :]
    got = _keys(vt.ravel()).reshape(vt.shape)
    bad = np.abs(got - want) > 1e-6
    if bad.any():
        n, k = (int(q[0]) for q in np.nonzero(bad))
        exp = np.asarray(fc["init_time"].values)[n:n + 1]
        raise WeatherDataError(
            f"the forecast's valid_time disagrees with init_time + lead_time: at init_time {_fmt_time(init[n])}, "
            f"lead_time {lead_h[k]:g} h it is {_fmt_time(vt[n, k])}, expected {_fmt_time(_shift(exp, lead_h[k])[0])} "
            f"({int(bad.sum())} of {bad.size} valid times disagree); fix valid_time (or init_time / lead_time)")
    return fc


def _check_infinite(x: np.ndarray, what: str, v: str, dims: Sequence[str], coords: Mapping) -> None:
    """Raise naming the first point of ``x`` (dims ``dims``) that is +-inf."""
    inf = np.isinf(x)
    if not inf.any():
        return
    first = [int(q[0]) for q in np.nonzero(inf)]
    where = []
    for d, i in zip(dims, first):
        if d in ("init_time", "lead_time", "member", "initial_member", "truth_member") and d in coords:
            val = np.asarray(coords[d])[i]
            if isinstance(val, np.timedelta64):
                val = f"{val / np.timedelta64(1, 'h'):g} h"
            elif isinstance(val, np.datetime64):
                val = str(val)[:16]
            where.append(f"{d} {val}")
    sign = "+inf" if x[tuple(first)] > 0 else "-inf"
    raise WeatherDataError(f"the {what} holds infinite values ({int(inf.sum())} value(s); the first, {sign}, in "
                           f"variable {v!r} at {', '.join(where) or 'a grid point'}); infinite values cannot be "
                           f"scored: fix them, or set them to NaN to leave those points out")


def evaluate(fc, truth, *, out=None, plots: bool = True, time_units: str | None = None,
             dims: Mapping[str, str] | None = None, member=None, seed: int = 0, max_maps: int = 12,
             command: str | None = None) -> Evaluation:
    """Score the ensemble forecast ``fc`` (a dataset or a netCDF path) against ``truth`` (files, a
    glob, a list, or a dataset; read at each valid time, see :func:`~diffkit_weather.truth.read_truth`).

    The forecast is checked first: its variables' dims (transposed into evaluate's order; any dim
    besides ``[initial_member,] member, init_time, lead_time, [level,] lat, lon`` is an error naming
    it) and ``valid_time == init_time + lead_time`` (else an error naming the first mismatch);
    ``+-inf`` in forecast or truth is an error (NaN is missing and left out).

    ``member``: on truth with a member dim, the member to score against (a value), or ``"all"``:
    every truth member is a separate case.  Cases are what the scores average over (with equal
    weight): the init times, times the forecast's ``initial_member`` ensembles (a forecast made with
    ``--member all``), times the truth members.  A truth with several members and no ``member`` is
    an error.

    Besides the ensemble scores, two reference RMSEs per channel and lead (as ``rmse``:
    latitude-weighted, square root per case, then the mean over cases, over the same valid points):
    ``persistence_rmse``, the truth at the init time as the forecast of the truth at the valid
    time (NaN, with a note in the attribute ``persistence``, when the truth lacks an init time), and
    ``climatology_rmse``, the per-grid-point mean of the truth over the distinct valid times scored
    (and the truth members) as the forecast -- a sample climatology of the verifying data, so
    slightly optimistic.

    The score dataset is CF-1.8 (:func:`diffkit.adapters.cf_output`: ``title``, ``source``, the
    forecast's ``history`` extended by a line naming ``command`` -- by default the ``diffkit
    evaluate`` command line of these arguments --, a ``long_name`` on every variable, int32 counts).

    Returns an :class:`Evaluation`; with ``out`` (a folder) also writes ``scores.csv``,
    ``scores.nc`` and, unless ``plots=False``, ``lead_curves.png``, ``rank_histograms.png`` and
    ``maps_<channel>.png`` (ensemble mean, spread and error of the first init at a few leads; the
    first ``max_maps`` channels).  ``seed`` seeds the tie-breaking of the rank histograms.
    """
    import xarray as xr

    from . import metrics as M

    if command is None:
        command = _command(fc, truth, out=out, plots=plots, time_units=time_units, member=member, seed=seed)
    if not hasattr(fc, "data_vars"):
        fc = open_forecast(fc)
    fc = _check_forecast(fc)
    reader = _Truth(fc, truth, time_units=time_units, dims=dims, member=member)
    tr = _truth_dataset(reader, fc)
    r = _fc_roles(fc)
    latn, lonn = r["latitude"], r["longitude"]
    Mm = int(fc.sizes["member"])
    N = int(fc.sizes["init_time"])
    K = int(fc.sizes["lead_time"])
    I = int(fc.sizes.get("initial_member", 1))
    T = int(tr.sizes.get("truth_member", 1))
    init_keys = _keys(np.asarray(fc["init_time"].values))
    vt = np.asarray(fc["valid_time"].values)
    uniq = np.unique(_keys(vt.ravel()))
    g = torch.Generator().manual_seed(int(seed))
    names, variables, levels, units = [], [], [], []
    columns = _metric_columns()
    res = {m: [] for m in columns}
    refs = {"persistence_rmse": [], "climatology_rmse": []}
    pers_note = ""
    ranks = []
    not_forecast: list[str] = []
    nan = np.full(K, np.nan)
    for v in fc.data_vars:
        f = fc[v]
        t = tr[v]
        fv = np.asarray(f.values, np.float64)
        tv = np.asarray(t.values, np.float64)
        _check_infinite(fv, "forecast", v, f.dims, f.coords)
        _check_infinite(tv, "truth", v, t.dims, t.coords)
        rest = list(f.dims[f.dims.index("lead_time"):])                 # lead_time, [level,] lat, lon
        fv = fv if "initial_member" in f.dims else fv[None]              # (I, M, N, K, ...)
        tv = tv if "truth_member" in t.dims else tv[None]                # (T, N, K, ...)
        # cases (I, T, N): the forecast repeated per truth member, the truth per initial member
        fcase = np.broadcast_to(fv[:, None], (I, T, *fv.shape[1:]))
        fcase = np.moveaxis(fcase, 2, 0).reshape(Mm, I * T * N, *fv.shape[3:])
        tcase = np.broadcast_to(tv[None], (I, *tv.shape)).reshape(I * T * N, *tv.shape[2:])
        coords = {d: fc[d].values for d in rest if d in fc.coords}
        fda = xr.DataArray(fcase, dims=("member", "case", *rest), coords=coords)
        tda = xr.DataArray(tcase, dims=("case", *rest), coords=coords)
        valid = np.isfinite(tda) & np.isfinite(fda).all("member")
        kw = dict(mask=valid, member_dim="member", lat_dim=latn, lon_dim=lonn, init_dim="case")
        out_v = {}
        for col, (name, fn) in columns.items():
            if Mm < getattr(fn, "min_members", 1):
                continue
            out_v[col] = M.metric_da(fn, fda, tda, **kw)
        rh = M.rank_histogram_da(fda, tda, mask=valid, member_dim="member", lat_dim=latn, lon_dim=lonn,
                                 init_dim="case", generator=g)
        # references: persistence (the truth at the init time) and climatology (the truth's mean over the valid times)
        miss = reader.missing(v, init_keys)
        if miss:
            pers = None
            pers_note = (f"not computed: the truth lacks {len(miss)} init time(s) "
                         f"({reader.files._fmt_keys(miss[:3])}{' ...' if len(miss) > 3 else ''}); give truth "
                         f"files that include the init times")
        else:
            p0, _ = reader.at(v, init_keys)                               # (T, N, [L,] lat, lon)
            pers = np.broadcast_to(p0[None, :, :, None], (I, T, N, K, *p0.shape[2:])).reshape(tcase.shape)
        cv, _ = reader.at(v, uniq)                                        # (T, U, [L,] lat, lon)
        with np.errstate(all="ignore"):
            import warnings

            with warnings.catch_warnings():
                warnings.simplefilter("ignore", RuntimeWarning)
                clim = np.nanmean(cv.reshape(-1, *cv.shape[2:]), axis=0)  # ([L,] lat, lon)
        climc = np.broadcast_to(clim[None, None], tcase.shape)
        ref_v = {}
        for key, ref in (("persistence_rmse", pers), ("climatology_rmse", climc)):
            if ref is None:
                continue
            rda = xr.DataArray(np.ascontiguousarray(ref), dims=("case", *rest), coords=coords)
            ref_v[key] = M.rmse_da(rda, tda, mask=valid & np.isfinite(rda), lat_dim=latn, lon_dim=lonn,
                                   init_dim="case")
        ld = [d for d in f.dims if d in r.get("level", [])]
        lv = [None] if not ld else list(np.asarray(fc[ld[0]].values))
        for i, l in enumerate(lv):
            if l is not None and float(l) not in reader.levels[v]:
                not_forecast.append(f"{v}@{_fmt_level(l)}")             # NaN padding of a shared level dim
                continue
            sel = {} if l is None else {ld[0]: i}
            names.append(str(v) if l is None else f"{v}@{_fmt_level(l)}")
            variables.append(str(v))
            levels.append(np.nan if l is None else float(l))
            units.append(str(fc[v].attrs.get("units", "")))
            for m in columns:
                res[m].append(out_v[m].isel(sel).transpose("lead_time").values if m in out_v else nan)
            for m in refs:
                refs[m].append(ref_v[m].isel(sel).transpose("lead_time").values if m in ref_v else nan)
            ranks.append(rh.isel(sel).transpose("lead_time", "rank").values)
    lead = fc["lead_time"]
    lead_h = lead.values / np.timedelta64(1, "h")
    attrs_m = {
        "rmse": {"long_name": "latitude-weighted RMSE of the ensemble mean (sqrt per case, then mean over cases)"},
        "crps": {"long_name": "fair ensemble CRPS, latitude-weighted, mean over cases"},
        "spread": {"long_name": "ensemble spread: sqrt of the latitude-weighted mean member variance (ddof 1)"},
        "spread_skill_ratio": {"long_name": "spread / RMSE of the ensemble mean times sqrt((M+1)/M)",
                               "units": "1"},
    }
    for m, (name, fn) in columns.items():
        if m not in attrs_m:
            attrs_m[m] = {"long_name": " ".join((fn.__doc__ or name).strip().split("\n\n")[0].split()),
                          "metric": name}
    dv = {m: (("channel", "lead_time"), np.asarray(res[m], np.float64).reshape(len(names), K), attrs_m[m])
          for m in columns}
    dv["persistence_rmse"] = (("channel", "lead_time"), np.asarray(refs["persistence_rmse"], np.float64).reshape(
        len(names), K), {"long_name": "RMSE of persistence: the truth at the init time as the forecast (reference)",
                         "reference": "persistence"})
    dv["climatology_rmse"] = (("channel", "lead_time"), np.asarray(refs["climatology_rmse"], np.float64).reshape(
        len(names), K), {"long_name": "RMSE of climatology: the per-grid-point mean of the truth over the valid "
                                      "times scored as the forecast (reference)", "reference": "climatology"})
    rank = np.asarray(ranks, np.int64).reshape(len(names), K, Mm + 1)
    dv["rank_histogram"] = (("channel", "lead_time", "rank"), rank,
                            {"long_name": "counts of the rank of the truth among the members (ties at random)"})
    tmd = str(tr.attrs.get("member_dim", ""))
    if not tmd:
        truth_member, t_choice = "none", "the truth has no member dim"
    elif "truth_member" in tr.dims:
        truth_member = "all"
        t_choice = (f"every member of {tmd!r} ({tr.attrs.get('members', '')}), each a separate case"
                    f"{'' if member is None else f' (--member {member})'}")
    else:
        truth_member = str(tr.attrs.get("members", ""))
        t_choice = (f"member {truth_member} of {tmd!r} "
                    f"({'the only member' if member is None else f'--member {member}'})")
    parts = [f"{N} init time(s)"] + ([f"{I} initial member(s)"] if "initial_member" in fc.dims else []) + \
        ([f"{T} truth member(s)"] if "truth_member" in tr.dims else [])
    scores = xr.Dataset(dv, coords={
        "channel": ("channel", np.asarray(names, dtype=object),
                    {"long_name": "channel: variable, or variable@level"}),
        "variable": ("channel", np.asarray(variables, dtype=object), {"long_name": "forecast variable"}),
        "level": ("channel", np.asarray(levels, np.float64),
                  {"long_name": "level of the channel, in its variable's level units (NaN: no level)"}),
        "units": ("channel", np.asarray(units, dtype=object), {"long_name": "units of the variable"}),
        "lead_time": ("lead_time", lead.values, {"standard_name": "forecast_period", "long_name": "lead time"}),
        "lead_hours": ("lead_time", lead_h, {"long_name": "lead time in hours", "units": "h"}),
        "rank": ("rank", np.arange(Mm + 1, dtype=np.int32),
                 {"long_name": "rank of the truth among the members (0: below every member)", "units": "1"}),
    }, attrs={"source": "diffkit evaluate", "members": Mm, "n_init": N,
              "n_cases": N * I * T, "cases": " x ".join(parts),
              "init_times": f"{str(fc['init_time'].values[0])[:16]} .. {str(fc['init_time'].values[-1])[:16]}",
              "truth": str(tr.attrs.get("source", "")), "truth_member": truth_member,
              "truth_member_dim": tmd, "truth_member_choice": t_choice, "rank_histogram_seed": int(seed),
              "weights": "cell-area latitude weights (diffkit_weather.metrics.latitude_weights)",
              **({"levels_not_forecast": (f"{', '.join(not_forecast)}: NaN in the forecast at every point (levels "
                                          f"of a shared level dim that the variable lacks); not scored")}
                 if not_forecast else {}),
              "persistence": pers_note or "persistence_rmse: the truth at the init time as the forecast of every lead",
              "climatology": (f"climatology_rmse: the per-grid-point mean of the truth over the {len(uniq)} distinct "
                              f"valid times scored{' and the truth members' if T > 1 else ''} as the forecast (a "
                              f"sample climatology of the verifying data)"),
              **{f"forecast_{k}": v for k, v in fc.attrs.items() if k in ("checkpoint", "seed", "sampler", "nfe",
                                                                          "perturb", "objective", "initial_member",
                                                                          "initial_member_dim",
                                                                          "initial_member_choice")}})
    scores["lead_time"].encoding.update(units="hours", dtype="float64")
    cf_output(scores, title="diffkit evaluate: ensemble scores", command=command, history=fc.attrs.get("history"))
    ev = Evaluation(scores, scores_table(scores), tr)
    if out is not None:
        ev.files = write_scores(ev, out, fc=fc if plots else None, max_maps=max_maps)
    return ev


def _command(fc, truth, *, out, plots, time_units, member, seed) -> str:
    """The ``diffkit evaluate`` command line of these arguments (for the ``history`` of ``scores.nc``)."""
    if hasattr(fc, "data_vars"):
        return "diffkit_weather.evaluate (Python; forecast and truth given as datasets)" if hasattr(
            truth, "data_vars") else "diffkit_weather.evaluate (Python; forecast given as a dataset)"
    tr = ["a dataset"] if hasattr(truth, "data_vars") else \
        [str(t) for t in ([truth] if isinstance(truth, (str, Path)) else truth)]
    parts = ["diffkit evaluate", str(fc), "--truth", *tr]
    parts += ["--out", str(out)] if out is not None else []
    parts += ["--member", str(member)] if member is not None else []
    parts += ["--time-units", repr(time_units)] if time_units else []
    parts += ["--seed", str(seed)] if seed else []
    parts += ["--no-plots"] if not plots else []
    return " ".join(parts)


#: the name of the channel labels in ``scores.nc``: CF coordinate variables are numeric, so the
#: string coordinate ``channel`` is stored as the label variable ``channel_name(channel)`` (CF §6.1)
CHANNEL_LABEL = "channel_name"


def open_scores(path):
    """A ``scores.nc`` written by :func:`write_scores`, loaded, with ``channel`` its coordinate again
    (the file stores the channel names as the label variable :data:`CHANNEL_LABEL`)."""
    import xarray as xr

    with xr.open_dataset(path, decode_timedelta=True) as ds:
        ds = ds.load()
    if CHANNEL_LABEL in ds.variables and "channel" not in ds.variables:
        lab = ds[CHANNEL_LABEL]
        ds = ds.drop_vars(CHANNEL_LABEL).assign_coords(
            channel=("channel", np.asarray(lab.values, dtype=object), dict(lab.attrs)))
    return ds


def _scores_file(scores):
    """The score dataset as ``scores.nc`` holds it: the string coordinate ``channel`` becomes the
    label variable :data:`CHANNEL_LABEL` (``compliance-checker`` and CF want numeric coordinate
    variables), the dim keeps its name."""
    ds = scores.copy()
    ds = ds.drop_vars("channel").assign_coords(
        {CHANNEL_LABEL: ("channel", np.asarray(scores["channel"].values, dtype=object),
                         dict(scores["channel"].attrs))})
    for name in ds.variables:
        ds.variables[name].encoding = dict(scores[name].encoding) if name in scores.variables else {}
    return cf_encode(ds)


def scores_table(scores):
    """The tidy table (:class:`pandas.DataFrame`) of a score dataset: one row per channel and lead time."""
    import pandas as pd

    rows = []
    M = scores.sizes["rank"] - 1
    for c in range(scores.sizes["channel"]):
        for k in range(scores.sizes["lead_time"]):
            row = {"variable": str(scores["variable"].values[c]),
                   "level": float(scores["level"].values[c]),
                   "channel": str(scores["channel"].values[c]),
                   "units": str(scores["units"].values[c]),
                   "lead_hours": float(scores["lead_hours"].values[k])}
            for m in _metric_vars(scores):
                row[m] = float(scores[m].values[c, k])
            row["members"] = M
            row["n_init"] = int(scores.attrs.get("n_init", 0))
            for j in range(M + 1):
                row[f"rank_{j}"] = int(scores["rank_histogram"].values[c, k, j])
            rows.append(row)
    return pd.DataFrame(rows)


def summarise(scores) -> dict:
    """Plain per-channel lists of the scores, for JSON reports: ``{channel: {lead_hours, rmse,
    crps, spread, spread_skill_ratio, ...}}`` (every per-lead score; non-finite values become None).
    With the rank histogram (as :func:`evaluate` writes it), also ``rank_histogram_vs_uniform`` (each
    bin over all leads / uniform), ``dispersion`` (the verdict: under-dispersive, well-dispersed,
    over-dispersive or undetermined) and ``calibration`` (its line), from :func:`calibration`."""
    out = {}
    cal = calibration(scores) if "rank_histogram" in scores and "spread_skill_ratio" in scores else {}
    for c, name in enumerate(scores["channel"].values):
        row = {"lead_hours": [float(x) for x in scores["lead_hours"].values]}
        for m in _metric_vars(scores):
            row[m] = [None if not np.isfinite(x) else float(x) for x in scores[m].values[c]]
        if str(name) in cal:
            d = cal[str(name)]
            rel, _ = rank_summary(scores["rank_histogram"].values[c])
            row["rank_histogram_vs_uniform"] = [None if not np.isfinite(x) else float(x) for x in rel]
            row["dispersion"] = d.verdict
            row["calibration"] = str(d)
        out[str(name)] = row
    return out


def calibration(scores) -> dict:
    """``{channel: Dispersion}``: the verdict of :func:`diffkit.ensemble.dispersion_verdict` (under-,
    well- or over-dispersive) from the channel's spread/skill at every lead and its rank histogram
    summed over the leads."""
    out = {}
    for c, name in enumerate(scores["channel"].values):
        out[str(name)] = dispersion_verdict(scores["spread_skill_ratio"].values[c],
                                            scores["rank_histogram"].values[c])
    return out


def format_calibration(scores) -> str:
    """The calibration report of a score dataset, per channel: the rank histogram (summed over leads)
    as multiples of uniform (1 everywhere for a reliable ensemble) and the one-line verdict."""
    lines = ["calibration (spread/skill per lead in the table above; rank histogram over all leads, each bin / "
             "uniform):"]
    cal = calibration(scores)
    for c, name in enumerate(scores["channel"].values):
        lines.append(f"{str(name):<16} rank histogram / uniform: {format_rank_bins(scores['rank_histogram'].values[c])}")
        lines.append(f"{str(name):<16} verdict: {cal[str(name)]}")
    return "\n".join(lines)


def _atomic_text(path: Path, text: str) -> Path:
    from diffkit._io import atomic_write

    return atomic_write(path, lambda f: f.write(text))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("@", "-"))


def write_scores(ev: Evaluation, out, *, fc=None, max_maps: int = 12) -> list[Path]:
    """Write ``out/scores.csv`` and ``out/scores.nc`` (atomically; CF-1.8, the channel names in the
    label variable ``channel_name(channel)``: read it back with :func:`open_scores`) and, with the
    forecast ``fc``, the figures: ``lead_curves.png``, ``rank_histograms.png`` and
    ``maps_<channel>.png`` (first init)."""
    from diffkit.adapters import atomic_to_netcdf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [_atomic_text(out / "scores.csv", ev.table.to_csv(index=False, float_format="%.8g")),
             atomic_to_netcdf(_scores_file(ev.scores), out / "scores.nc")]
    if fc is not None:
        from . import plots

        s = ev.scores
        files.append(plots.plot_lead_curves(s, out / "lead_curves.png",
                                            title=f"{s.attrs['members']} member(s), {s.attrs['n_init']} init(s)"))
        files.append(plots.plot_rank_histograms(s, out / "rank_histograms.png"))
        r = _fc_roles(fc)
        # maps: the first initial member's ensemble against the first truth member
        fm = fc.isel(initial_member=0) if "initial_member" in fc.dims else fc
        tm = ev.truth.isel(truth_member=0) if "truth_member" in ev.truth.dims else ev.truth
        for c in range(min(max_maps, s.sizes["channel"])):
            v = str(s["variable"].values[c])
            lv = float(s["level"].values[c])
            files.append(plots.plot_maps(fm, tm, v, out / f"maps_{_safe(str(s['channel'].values[c]))}.png",
                                         level=None if np.isnan(lv) else lv, lat_dim=r["latitude"],
                                         lon_dim=r["longitude"]))
    return files


def format_table(scores, max_leads: int = 6) -> str:
    """A short text table: per channel, RMSE / CRPS / spread / spread-skill at up to ``max_leads`` leads."""
    K = scores.sizes["lead_time"]
    idx = sorted(set(np.linspace(0, K - 1, min(max_leads, K)).round().astype(int).tolist()))
    head = f"{'channel':<16} {'lead_h':>7} {'rmse':>11} {'crps':>11} {'spread':>11} {'spread/skill':>12}"
    lines = [head]
    fmt = lambda x: f"{x:11.4g}" if np.isfinite(x) else f"{'-':>11}"
    for c in range(scores.sizes["channel"]):
        for k in idx:
            v = [float(scores[m].values[c, k]) for m in METRICS]
            lines.append(f"{str(scores['channel'].values[c]):<16} {float(scores['lead_hours'].values[k]):7g} "
                         f"{fmt(v[0])} {fmt(v[1])} {fmt(v[2])} {fmt(v[3]).rjust(12)}")
    return "\n".join(lines)
