"""Scores of an ensemble forecast against the truth, WeatherBench-2 style.

:func:`evaluate` takes a forecast dataset (as :func:`~diffkit_weather.forecast.forecast_dataset`
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
from typing import Any, Mapping

import numpy as np
import torch

from .adapter import WeatherDataError, _fmt_level
from .forecast import _fc_roles, read_truth

__all__ = ["Evaluation", "evaluate", "open_forecast", "scores_table", "summarise", "write_scores", "format_table",
           "METRICS"]

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


def _check_forecast(fc) -> None:
    need = ("member", "init_time", "lead_time")
    miss = [d for d in need if d not in fc.dims]
    lacks = ([f"the dim(s) {', '.join(miss)}"] if miss else []) + \
        (["the coordinate valid_time"] if "valid_time" not in fc.coords else [])
    if lacks:
        raise WeatherDataError(f"the forecast lacks {' and '.join(lacks)}; give a file written by `diffkit forecast` "
                               f"(dims member, init_time, lead_time, ...)")
    if not fc.data_vars:
        raise WeatherDataError("the forecast holds no variable")


def evaluate(fc, truth, *, out=None, plots: bool = True, time_units: str | None = None,
             dims: Mapping[str, str] | None = None, member=None, seed: int = 0, max_maps: int = 12) -> Evaluation:
    """Score the ensemble forecast ``fc`` (a dataset or a netCDF path) against ``truth`` (files, a
    glob, a list, or a dataset; read at each valid time, see :func:`~diffkit_weather.forecast.read_truth`).

    Returns an :class:`Evaluation`; with ``out`` (a folder) also writes ``scores.csv``,
    ``scores.nc`` and, unless ``plots=False``, ``lead_curves.png``, ``rank_histograms.png`` and
    ``maps_<channel>.png`` (ensemble mean, spread and error of the first init at a few leads; the
    first ``max_maps`` channels).  ``seed`` seeds the tie-breaking of the rank histograms.
    """
    import xarray as xr

    from . import metrics as M

    if not hasattr(fc, "data_vars"):
        fc = open_forecast(fc)
    _check_forecast(fc)
    tr = read_truth(fc, truth, time_units=time_units, dims=dims, member=member)
    r = _fc_roles(fc)
    latn, lonn = r["latitude"], r["longitude"]
    Mm = int(fc.sizes["member"])
    N = int(fc.sizes["init_time"])
    K = int(fc.sizes["lead_time"])
    g = torch.Generator().manual_seed(int(seed))
    names, variables, levels, units = [], [], [], []
    columns = _metric_columns()
    res = {m: [] for m in columns}
    ranks = []
    nan = np.full(K, np.nan)
    for v in fc.data_vars:
        f = fc[v].astype(np.float64)
        t = tr[v]
        valid = np.isfinite(t) & np.isfinite(f).all("member")
        kw = dict(mask=valid, member_dim="member", lat_dim=latn, lon_dim=lonn)
        out_v = {}
        for col, (name, fn) in columns.items():
            if Mm < getattr(fn, "min_members", 1):
                continue
            out_v[col] = M.metric_da(fn, f, t, **kw)
        rh = M.rank_histogram_da(f, t, mask=valid, member_dim="member", lat_dim=latn, lon_dim=lonn, generator=g)
        ld = [d for d in f.dims if d in r.get("level", [])]
        lv = [None] if not ld else list(np.asarray(fc[ld[0]].values))
        for i, l in enumerate(lv):
            sel = {} if l is None else {ld[0]: i}
            names.append(str(v) if l is None else f"{v}@{_fmt_level(l)}")
            variables.append(str(v))
            levels.append(np.nan if l is None else float(l))
            units.append(str(fc[v].attrs.get("units", "")))
            for m in columns:
                res[m].append(out_v[m].isel(sel).transpose("lead_time").values if m in out_v else nan)
            ranks.append(rh.isel(sel).transpose("lead_time", "rank").values)
    lead = fc["lead_time"]
    lead_h = lead.values / np.timedelta64(1, "h") if np.issubdtype(lead.dtype, np.timedelta64) else \
        np.asarray(lead.values, np.float64)
    attrs_m = {
        "rmse": {"long_name": "latitude-weighted RMSE of the ensemble mean (sqrt per init, then mean over inits)"},
        "crps": {"long_name": "fair ensemble CRPS, latitude-weighted, mean over inits"},
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
    rank = np.asarray(ranks, np.int64).reshape(len(names), K, Mm + 1)
    dv["rank_histogram"] = (("channel", "lead_time", "rank"), rank,
                            {"long_name": "counts of the rank of the truth among the members (ties at random)"})
    scores = xr.Dataset(dv, coords={
        "channel": ("channel", np.asarray(names, dtype=object)),
        "variable": ("channel", np.asarray(variables, dtype=object)),
        "level": ("channel", np.asarray(levels, np.float64)),
        "units": ("channel", np.asarray(units, dtype=object)),
        "lead_time": ("lead_time", lead.values, {"standard_name": "forecast_period"}),
        "lead_hours": ("lead_time", lead_h, {"units": "h"}),
        "rank": ("rank", np.arange(Mm + 1, dtype=np.int32)),
    }, attrs={"Conventions": "CF-1.8", "source": "diffkit evaluate", "members": Mm, "n_init": N,
              "init_times": f"{str(fc['init_time'].values[0])[:16]} .. {str(fc['init_time'].values[-1])[:16]}",
              "truth": str(tr.attrs.get("source", "")), "rank_histogram_seed": int(seed),
              "weights": "cell-area latitude weights (diffkit_weather.metrics.latitude_weights)",
              **{f"forecast_{k}": v for k, v in fc.attrs.items() if k in ("checkpoint", "seed", "sampler", "nfe",
                                                                          "perturb", "objective")}})
    if np.issubdtype(lead.dtype, np.timedelta64):
        scores["lead_time"].encoding.update(units="hours", dtype="float64")
    ev = Evaluation(scores, scores_table(scores), tr)
    if out is not None:
        ev.files = write_scores(ev, out, fc=fc if plots else None, max_maps=max_maps)
    return ev


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
    crps, spread, spread_skill_ratio, ...}}`` (every per-lead score; non-finite values become None)."""
    out = {}
    for c, name in enumerate(scores["channel"].values):
        row = {"lead_hours": [float(x) for x in scores["lead_hours"].values]}
        for m in _metric_vars(scores):
            row[m] = [None if not np.isfinite(x) else float(x) for x in scores[m].values[c]]
        out[str(name)] = row
    return out


def _atomic_text(path: Path, text: str) -> Path:
    from diffkit._io import atomic_write

    return atomic_write(path, lambda f: f.write(text))


def _safe(name: str) -> str:
    return re.sub(r"[^A-Za-z0-9._-]+", "_", name.replace("@", "-"))


def write_scores(ev: Evaluation, out, *, fc=None, max_maps: int = 12) -> list[Path]:
    """Write ``out/scores.csv`` and ``out/scores.nc`` (atomically) and, with the forecast ``fc``, the
    figures: ``lead_curves.png``, ``rank_histograms.png`` and ``maps_<channel>.png`` (first init)."""
    from diffkit.adapters import atomic_to_netcdf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    files = [_atomic_text(out / "scores.csv", ev.table.to_csv(index=False, float_format="%.8g")),
             atomic_to_netcdf(ev.scores, out / "scores.nc")]
    if fc is not None:
        from . import plots

        s = ev.scores
        files.append(plots.plot_lead_curves(s, out / "lead_curves.png",
                                            title=f"{s.attrs['members']} member(s), {s.attrs['n_init']} init(s)"))
        files.append(plots.plot_rank_histograms(s, out / "rank_histograms.png"))
        r = _fc_roles(fc)
        for c in range(min(max_maps, s.sizes["channel"])):
            v = str(s["variable"].values[c])
            lv = float(s["level"].values[c])
            files.append(plots.plot_maps(fc, ev.truth, v, out / f"maps_{_safe(str(s['channel'].values[c]))}.png",
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
