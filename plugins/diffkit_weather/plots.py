"""Figures of forecast scores: lead-time curves, rank histograms and maps.

As :mod:`diffkit_pde.plots`: matplotlib is imported inside the functions and only its
object-oriented API is used (:class:`matplotlib.figure.Figure` drawn by the Agg canvas; pyplot is
never imported, so no global figure state and headless use); every function writes its file
atomically (a temporary file in the same folder, then :func:`os.replace`) and returns the
:class:`~pathlib.Path` written; the format follows the suffix (``.png`` by default).

Inputs are the score dataset of :func:`diffkit_weather.evaluate.evaluate` (dims ``channel``,
``lead_time``, ``rank``) and forecast / truth datasets (dims ``member``, ``init_time``,
``lead_time``, ``[level]``, latitude, longitude in the file's names and order).
"""
from __future__ import annotations

from diffkit.figures import new_figure, save_figure

from pathlib import Path
from typing import Sequence

import numpy as np

__all__ = ["plot_lead_curves", "plot_rank_histograms", "plot_maps", "METRIC_LABELS", "REFERENCES"]

#: the lead-time panels, in order: score variable -> axis label
METRIC_LABELS = {
    "rmse": "RMSE of the ensemble mean",
    "crps": "CRPS (fair)",
    "spread": "ensemble spread",
    "spread_skill_ratio": "spread / skill (x sqrt((M+1)/M))",
}


#: reference lines of the RMSE panel: score variable, line style, legend label
REFERENCES = (("persistence_rmse", "--", "persistence (truth at init)"),
              ("climatology_rmse", ":", "climatology (mean truth)"))


def _figure(width: float, height: float):
    return new_figure(width, height)


def _save(fig, path, dpi: int = 110) -> Path:
    return save_figure(fig, path, dpi, tight=False)


def _hours(scores) -> np.ndarray:
    lt = scores["lead_time"].values
    if np.issubdtype(lt.dtype, np.timedelta64):
        return lt / np.timedelta64(1, "h")
    return np.asarray(lt, np.float64)


def _label(scores, c: int) -> str:
    name = str(scores["channel"].values[c])
    u = str(scores["units"].values[c]) if "units" in scores.coords else ""
    return f"{name} [{u}]" if u else name


def plot_lead_curves(scores, path, *, metrics: Sequence[str] | None = None, title: str | None = None) -> Path:
    """One panel per metric (RMSE, CRPS, spread, spread/skill) against lead time in hours, one line
    per channel (variable and level; units in the legend).  The RMSE panel has the reference
    RMSEs of :func:`~diffkit_weather.evaluate.evaluate` in the channel's colour: persistence
    (``persistence_rmse``, dashed) and climatology (``climatology_rmse``, dotted), when the scores
    hold them.  The spread/skill panel has the reliable value 1 as a dashed grey line.  Metrics
    that are all NaN (e.g. CRPS with one member) are drawn as empty panels with a note."""
    metrics = [m for m in (metrics or METRIC_LABELS) if m in scores.data_vars]
    if not metrics:
        raise ValueError(f"plot_lead_curves: scores hold none of the metrics {list(METRIC_LABELS)}")
    x = _hours(scores)
    nc = scores.sizes["channel"]
    ncol = min(2, len(metrics))
    nrow = -(-len(metrics) // ncol)
    fig = _figure(5.2 * ncol + 1.8, 3.4 * nrow)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    for ax, m in zip(axes, metrics):
        v = np.asarray(scores[m].values, np.float64)
        if not np.isfinite(v).any():
            ax.text(0.5, 0.5, "not defined (one member)", ha="center", va="center", transform=ax.transAxes)
        for c in range(nc):
            ax.plot(x, v[c], marker="o", markersize=3, color=f"C{c % 10}", label=_label(scores, c))
        if m == "rmse":
            for ref, style, what in REFERENCES:
                if ref not in scores.data_vars:
                    continue
                rv = np.asarray(scores[ref].values, np.float64)
                if not np.isfinite(rv).any():
                    continue
                for c in range(nc):
                    ax.plot(x, rv[c], linestyle=style, linewidth=1.2, color=f"C{c % 10}", gid=f"{ref}:{c}")
                ax.plot([], [], linestyle=style, linewidth=1.2, color="0.3", label=what)   # legend entry
        if m == "spread_skill_ratio":
            ax.axhline(1.0, color="0.4", linestyle="--", linewidth=1.0)
        ax.set_title(METRIC_LABELS.get(m, m), fontsize=10)
        ax.set_xlabel("lead time (h)")
        ax.grid(alpha=0.3)
    for ax in axes[len(metrics):]:
        ax.set_visible(False)
    handles, labels = axes[0].get_legend_handles_labels()
    fig.legend(handles, labels, loc="outside right upper", fontsize=8)
    if title:
        fig.suptitle(title)
    return _save(fig, path)


def plot_rank_histograms(scores, path, *, leads: Sequence[int] | None = None) -> Path:
    """Rank histograms (normalised frequency of the truth's rank among the members), one panel per
    channel, bars for up to three lead times (default first, middle, last); the flat line ``1 /
    (M + 1)`` is a reliable ensemble."""
    rh = np.asarray(scores["rank_histogram"].values, np.float64)      # (channel, lead, rank)
    nc, K, R = rh.shape
    idx = sorted(set(np.linspace(0, K - 1, min(3, K)).round().astype(int).tolist())) if leads is None else \
        [int(i) % K for i in leads]
    x = _hours(scores)
    ncol = min(3, nc)
    nrow = -(-nc // ncol)
    fig = _figure(3.6 * ncol + 0.4, 2.8 * nrow + 0.3)
    axes = fig.subplots(nrow, ncol, squeeze=False).ravel()
    w = 0.8 / len(idx)
    for c in range(nc):
        ax = axes[c]
        for j, k in enumerate(idx):
            tot = rh[c, k].sum()
            f = rh[c, k] / tot if tot > 0 else np.zeros(R)
            ax.bar(np.arange(R) + (j - (len(idx) - 1) / 2) * w, f, width=w, color=f"C{j}", label=f"{x[k]:g} h")
        ax.axhline(1.0 / R, color="0.3", linestyle="--", linewidth=1.0)
        ax.set_title(str(scores["channel"].values[c]), fontsize=9)
        ax.set_xlabel("rank of the truth")
        ax.set_xticks(np.arange(R))
        if c % ncol == 0:
            ax.set_ylabel("frequency")
    for ax in axes[nc:]:
        ax.set_visible(False)
    axes[0].legend(fontsize=7, title="lead", title_fontsize=7)
    return _save(fig, path)


def _grid(lat: np.ndarray, lon: np.ndarray):
    """Plot coordinates (latitude ascending, longitude continuous) and how to reorder the data."""
    from .cf import _orientation

    o = _orientation(np.asarray(lat, np.float64), np.asarray(lon, np.float64), "the forecast")
    return o["lat_model"], o["lon_model"], o["lat_flip"], o["lon_flip"]


def plot_maps(fc, truth, variable: str, path, *, level=None, init: int = 0, leads: Sequence[int] | None = None,
              lat_dim: str | None = None, lon_dim: str | None = None) -> Path:
    """Maps of one initialisation: rows are lead times (default up to three: first, middle, last),
    columns the ensemble mean, the ensemble spread (member standard deviation, ddof 1; blank with
    one member) and the error of the ensemble mean (mean - truth).  Means share one colour scale,
    errors a symmetric one; missing points are blank.  ``fc`` / ``truth`` are the forecast and truth
    datasets (or DataArrays of ``variable``); ``level`` selects a level by value."""
    f = fc[variable] if hasattr(fc, "data_vars") else fc
    t = truth[variable] if hasattr(truth, "data_vars") else truth
    lat_dim = lat_dim or next(d for d in f.dims if d in ("latitude", "lat"))
    lon_dim = lon_dim or next(d for d in f.dims if d in ("longitude", "lon"))
    other = [d for d in f.dims if d not in ("member", "init_time", "lead_time", lat_dim, lon_dim)]
    sel = {}
    if other:
        ld = other[0]
        if level is None:
            sel[ld] = 0
        else:
            vals = np.asarray(f[ld].values, np.float64)
            hit = np.flatnonzero(np.isclose(vals, float(level)))
            if not hit.size:
                raise ValueError(f"plot_maps: level {level} not in {ld} {vals.tolist()}")
            sel[ld] = int(hit[0])
    f = f.isel(init_time=init, **sel).transpose("member", "lead_time", lat_dim, lon_dim)
    t = t.isel(init_time=init, **sel).transpose("lead_time", lat_dim, lon_dim)
    K = f.sizes["lead_time"]
    idx = sorted(set(np.linspace(0, K - 1, min(3, K)).round().astype(int).tolist())) if leads is None else \
        [int(i) % K for i in leads]
    fv = np.asarray(f.values, np.float64)
    tv = np.asarray(t.values, np.float64)
    mean = fv.mean(0)
    spread = fv.std(0, ddof=1) if fv.shape[0] > 1 else np.full_like(mean, np.nan)
    err = mean - tv
    lat, lon, flat, flon = _grid(f[lat_dim].values, f[lon_dim].values)

    def orient(a):
        if flat:
            a = a[..., ::-1, :]
        if flon:
            a = a[..., ::-1]
        return a

    mean, spread, err = orient(mean), orient(spread), orient(err)
    fin = lambda a: a[np.isfinite(a)]
    lo_hi = (fin(mean).min(), fin(mean).max()) if fin(mean).size else (0.0, 1.0)
    smax = float(fin(spread).max()) if fin(spread).size else 1.0
    emax = float(np.abs(fin(err)).max()) if fin(err).size else 1.0
    emax = emax if emax > 0 else 1.0
    smax = smax if smax > 0 else 1.0
    lead_h = f["lead_time"].values
    lead_h = lead_h / np.timedelta64(1, "h") if np.issubdtype(lead_h.dtype, np.timedelta64) else lead_h
    aspect = (lon.max() - lon.min() + 1e-9) / (lat.max() - lat.min() + 1e-9)
    wpan = 3.2
    hpan = max(1.6, min(3.6, wpan / max(aspect, 0.3)))
    fig = _figure(3 * wpan + 1.2, hpan * len(idx) + 0.6)
    axes = fig.subplots(len(idx), 3, squeeze=False)
    cols = [("ensemble mean", mean, dict(cmap="viridis", vmin=lo_hi[0], vmax=lo_hi[1])),
            ("spread", spread, dict(cmap="magma", vmin=0.0, vmax=smax)),
            ("error (mean - truth)", err, dict(cmap="RdBu_r", vmin=-emax, vmax=emax))]
    ms = [None] * 3
    for i, k in enumerate(idx):
        for j, (name, a, kw) in enumerate(cols):
            ax = axes[i, j]
            ms[j] = ax.pcolormesh(lon, lat, np.ma.masked_invalid(a[k]), shading="nearest", rasterized=True, **kw)
            if i == 0:
                ax.set_title(name, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"+{lead_h[k]:g} h\nlatitude", fontsize=8)
            ax.tick_params(labelsize=7)
    for j in range(3):
        fig.colorbar(ms[j], ax=axes[:, j].tolist(), shrink=0.85)
    units = str(f.attrs.get("units", ""))
    lv = f" at {other[0]} = {np.asarray(fc[variable][other[0]].values)[sel[other[0]]]:g}" if other else ""
    init_t = np.asarray(fc["init_time"].values)[init] if "init_time" in getattr(fc, "coords", {}) else init
    fig.suptitle(f"{variable}{lv}{f' [{units}]' if units else ''}, init {str(init_t)[:16]}", fontsize=10)
    return _save(fig, path)
