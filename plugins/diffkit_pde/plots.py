"""Figures for PDE rollouts: space-time diagrams, 2-D snapshots, correlation curves and spectra.

matplotlib is imported inside the functions, and only its object-oriented API is used
(:class:`matplotlib.figure.Figure` drawn by the Agg canvas): pyplot is never imported, so no
global figure state is created and a backend the user already chose is left alone; the plots
work headless.  Every function writes its file atomically (a temporary file in the same folder,
then :func:`os.replace`) and returns the :class:`~pathlib.Path` written; the format follows the
suffix (``.png`` by default).  Inputs may be torch tensors or numpy arrays.

Times follow :mod:`diffkit_pde.metrics`: row/step ``k = 1..K`` of a rollout is at ``t0 + (k-1)*dt``
with ``t0 = dt`` by default, i.e. at the *lead time* ``k*dt`` since the initial condition (which is
not part of a rollout); the time axes are then labelled "lead time", as in :func:`plot_correlation`.
Pass ``t0`` (and a ``tlabel``) to plot absolute times instead.

Each ``plot_*`` function has a ``*_figure`` twin that returns the
:class:`matplotlib.figure.Figure` without writing it, so that labels and ticks can be checked.
"""
from __future__ import annotations

from diffkit.figures import new_figure, save_figure

from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

from diffkit.errors import ShapeError

__all__ = ["plot_space_time", "plot_snapshots", "plot_correlation", "plot_spectra", "space_time_figure",
           "snapshots_figure", "correlation_figure", "axis_label"]


# ----------------------------------------------------------------------------- helpers
def _np(x) -> np.ndarray:
    """A float64 numpy copy of a torch tensor or array-like."""
    import torch

    if isinstance(x, torch.Tensor):
        return x.detach().to(device="cpu", dtype=torch.float64).numpy()
    return np.asarray(x, dtype=np.float64)


def _figure(width: float, height: float):
    return new_figure(width, height)


def _save(fig, path, dpi: int = 120) -> Path:
    return save_figure(fig, path, dpi)


def axis_label(name: str, units: str | None = None) -> str:
    """``name`` with its units for an axis or colour bar: ``"x [m]"``; units ``"1"`` (CF's
    dimensionless) read ``"x (nondimensional)"``; a CF time unit ``"s since ..."`` gives ``"[s]"``."""
    u = "" if units is None else str(units).strip()
    if " since " in u:
        u = u.split(" since ", 1)[0].strip()
    if not u:
        return name
    if u == "1":
        return f"{name} (nondimensional)"
    return f"{name} [{u}]"


def _time_label(tlabel: str | None, t0: float | None) -> str:
    """The time axis' label: lead time unless ``t0`` moved the axis to absolute time."""
    if tlabel is not None:
        return tlabel
    return "lead time" if t0 is None else "time"


def _absmax(*arrays: np.ndarray) -> float:
    """Largest finite |value| (1 when there is none or it is 0): a symmetric colour limit."""
    vals = [np.abs(a[np.isfinite(a)]).max() for a in arrays if np.isfinite(a).any()]
    v = float(max(vals)) if vals else 0.0
    return v if v > 0 else 1.0


def _fields(truth, rollouts, ndim: int, what: str, names) -> tuple[np.ndarray, dict[str, np.ndarray]]:
    """Truth and rollouts as numpy arrays of rank ``ndim`` (a singleton channel dim 1 is dropped)."""
    def fix(a, label):
        a = _np(a)
        if a.ndim == ndim + 1 and a.shape[1] == 1:
            a = a[:, 0]
        if a.ndim != ndim:
            layout = "(K, nx)" if ndim == 2 else "(K, nx, ny)"
            raise ShapeError(f"{what}: {label} has shape {a.shape}, expected {layout} (or with a channel dim of size 1)")
        return a

    t = fix(truth, "truth")
    if not isinstance(rollouts, Mapping):
        rollouts = {"rollout": rollouts}
    keys = list(rollouts) if names is None else list(names)
    missing = [k for k in keys if k not in rollouts]
    if missing:
        raise KeyError(f"{what}: names {missing} are not keys of rollouts {list(rollouts)}")
    r = {k: fix(rollouts[k], repr(k)) for k in keys}
    for k, a in r.items():
        if a.shape != t.shape:
            raise ShapeError(f"{what}: rollout {k!r} has shape {a.shape} but truth has shape {t.shape}; they must match")
    return t, r


def _times(K: int, dt: float, t0: float | None) -> np.ndarray:
    dt = float(dt)
    if not dt > 0:
        raise ValueError(f"dt must be positive, got {dt}")
    return (dt if t0 is None else float(t0)) + dt * np.arange(K)


# ----------------------------------------------------------------------------- fields
def space_time_figure(truth, rollouts, *, dt: float = 1.0, x=None, names: Sequence[str] | None = None,
                      title: str | None = None, t0: float | None = None, xlabel: str | None = None,
                      tlabel: str | None = None, clabel: str = "value"):
    """The figure of :func:`plot_space_time`, not written: a ``matplotlib.figure.Figure``."""
    t, r = _fields(truth, rollouts, 2, "plot_space_time", names)
    K, nx = t.shape
    times = _times(K, dt, t0)
    xs = np.arange(nx, dtype=np.float64) if x is None else _np(x)
    if xs.shape != (nx,):
        raise ShapeError(f"plot_space_time: x has shape {xs.shape}, expected ({nx},)")
    if xlabel is None:
        xlabel = "grid index" if x is None else "x"
    errs = {k: a - t for k, a in r.items()}
    vf = _absmax(t, *r.values())
    ve = _absmax(*errs.values()) if errs else 1.0
    panels = [("truth", t, False)] + [(k, a, False) for k, a in r.items()] + [(f"{k} - truth", e, True) for k, e in errs.items()]

    fig = _figure(2.4 * len(panels) + 1.6, 4.2)
    axes = fig.subplots(1, len(panels), sharey=True, squeeze=False)[0]
    field_axes, err_axes, mf, me = [], [], None, None
    for ax, (label, a, is_err) in zip(axes, panels):
        v = ve if is_err else vf
        m = ax.pcolormesh(xs, times, np.ma.masked_invalid(a), cmap="RdBu_r", vmin=-v, vmax=v,
                          shading="nearest", rasterized=True)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel(xlabel)
        (err_axes if is_err else field_axes).append(ax)
        if is_err:
            me = m
        else:
            mf = m
    axes[0].set_ylabel(_time_label(tlabel, t0))
    fig.colorbar(mf, ax=field_axes, label=clabel, shrink=0.9)
    if me is not None:
        fig.colorbar(me, ax=err_axes, label=f"error in {clabel}", shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def plot_space_time(truth, rollouts, path, *, dt: float = 1.0, x=None, names: Sequence[str] | None = None,
                    title: str | None = None, t0: float | None = None, xlabel: str | None = None,
                    tlabel: str | None = None, clabel: str = "value") -> Path:
    """Space-time diagrams of 1-D rollouts: truth, each rollout and each rollout's error, side by side.

    ``truth`` is ``(K, nx)`` and ``rollouts`` maps a name to a ``(K, nx)`` rollout (e.g.
    ``{"DDPM member 0": ..., "MSE": ...}``; a bare tensor is named "rollout"); ``names`` selects
    and orders the rollouts shown (default: all, in dict order).  Time runs up the vertical axis
    (row ``k`` at ``t0 + k*dt``; by default ``t0 = dt``, the lead time, labelled "lead time"),
    ``x`` (grid coordinates; default the grid index, labelled "grid index") along the horizontal
    one.  ``xlabel``, ``tlabel`` and ``clabel`` label the x axis, the time axis and the field's
    colour bar (:func:`axis_label` makes ``"u [m/s]"`` from a name and units); the error bar
    reads "error in" ``clabel``.  Fields share one symmetric ``RdBu_r`` colour scale, errors
    (rollout - truth) another; non-finite values are left blank.
    """
    return _save(space_time_figure(truth, rollouts, dt=dt, x=x, names=names, title=title, t0=t0, xlabel=xlabel,
                                   tlabel=tlabel, clabel=clabel), path)


def snapshots_figure(truth, rollouts, *, times_idx: Sequence[int] | None = None, dt: float = 1.0,
                     names: Sequence[str] | None = None, title: str | None = None, t0: float | None = None,
                     tlabel: str | None = None, clabel: str = "value"):
    """The figure of :func:`plot_snapshots`, not written: a ``matplotlib.figure.Figure``."""
    t, r = _fields(truth, rollouts, 3, "plot_snapshots", names)
    K = t.shape[0]
    times = _times(K, dt, t0)
    if times_idx is None:
        idx = sorted(set(np.linspace(0, K - 1, min(4, K)).round().astype(int).tolist()))
    else:
        idx = [int(i) for i in times_idx]
        bad = [i for i in idx if not -K <= i < K]
        if bad or not idx:
            raise ValueError(f"plot_snapshots: times_idx {list(times_idx)} must be non-empty indices into K = {K} steps")
        idx = [i % K for i in idx]
    tl = _time_label(tlabel, t0)
    cols = [("truth", t)] + list(r.items())
    v = _absmax(t, *r.values())
    fig = _figure(2.3 * len(cols) + 1.0, 2.2 * len(idx) + 0.4)
    axes = fig.subplots(len(idx), len(cols), squeeze=False)
    m = None
    for i, ti in enumerate(idx):
        for j, (label, a) in enumerate(cols):
            ax = axes[i, j]
            m = ax.imshow(np.ma.masked_invalid(a[ti]).T, origin="lower", cmap="RdBu_r", vmin=-v, vmax=v,
                          interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(label, fontsize=9)
            if j == 0:
                ax.set_ylabel(f"{tl} {times[ti]:.4g}")
    fig.colorbar(m, ax=axes.ravel().tolist(), label=clabel, shrink=0.9)
    if title:
        fig.suptitle(title)
    return fig


def plot_snapshots(truth, rollouts, path, *, times_idx: Sequence[int] | None = None, dt: float = 1.0,
                   names: Sequence[str] | None = None, title: str | None = None, t0: float | None = None,
                   tlabel: str | None = None, clabel: str = "value") -> Path:
    """Snapshots of 2-D rollouts: one row per selected time, columns truth | each rollout.

    ``truth`` is ``(K, nx, ny)`` and ``rollouts`` maps a name to a ``(K, nx, ny)`` rollout;
    ``times_idx`` are row indices into ``K`` (default: up to 4 evenly spaced, first and last
    included; negative indices count from the end).  Each row is labelled with its time (the lead
    time ``k*dt`` by default; ``t0`` and ``tlabel`` as in :func:`plot_space_time`).  Fields are
    drawn with ``x`` horizontal and ``y`` up on one shared symmetric ``RdBu_r`` scale with a
    colour bar labelled ``clabel``.
    """
    return _save(snapshots_figure(truth, rollouts, times_idx=times_idx, dt=dt, names=names, title=title, t0=t0,
                                  tlabel=tlabel, clabel=clabel), path)


# ----------------------------------------------------------------------------- curves
def plot_correlation(curves, path, *, dt: float = 1.0, threshold: float | None = 0.8,
                     ylabel: str = "Pearson correlation", xlabel: str = "lead time") -> Path:
    """Correlation (or any per-step metric) against lead time, with each curve's high-correlation time.

    ``curves`` maps a name to a ``(K,)`` curve or an ``(N, K)`` set of curves (then their mean
    is drawn with a band of +-1 standard error of the mean across ``N``).  Step ``k = 1..K`` is
    at lead time ``k*dt`` (the x axis, labelled ``xlabel``).  The threshold is drawn as a
    horizontal line and each curve's :func:`~diffkit_pde.metrics.high_correlation_time` (of the
    mean curve; NaN counts as a drop) as a vertical dotted line in the curve's colour, labelled
    ">=" when censored at the horizon.  ``threshold=None`` draws neither (for error curves).
    """
    return _save(correlation_figure(curves, dt=dt, threshold=threshold, ylabel=ylabel, xlabel=xlabel), path)


def correlation_figure(curves, *, dt: float = 1.0, threshold: float | None = 0.8,
                       ylabel: str = "Pearson correlation", xlabel: str = "lead time"):
    """The figure of :func:`plot_correlation`, not written: a ``matplotlib.figure.Figure``."""
    import torch

    from .metrics import high_correlation_time, never_dropped

    if not isinstance(curves, Mapping) or not curves:
        raise ValueError("plot_correlation: curves must be a non-empty dict name -> (K,) or (N, K)")
    fig = _figure(6.4, 4.0)
    ax = fig.subplots()
    for i, (name, c) in enumerate(curves.items()):
        a = _np(c)
        if a.ndim not in (1, 2) or a.shape[-1] == 0:
            raise ShapeError(f"plot_correlation: curve {name!r} has shape {a.shape}, expected (K,) or (N, K)")
        if a.ndim == 2:
            n = a.shape[0]
            mean = a.mean(0)
            se = a.std(0, ddof=1) / np.sqrt(n) if n > 1 else None
        else:
            mean, se = a, None
        tt = dt * np.arange(1, mean.shape[0] + 1)
        color = f"C{i % 10}"
        label = name
        if threshold is not None:
            tc = torch.as_tensor(mean)
            thc = float(high_correlation_time(tc, dt=dt, threshold=threshold))
            cens = bool(never_dropped(tc, threshold=threshold))
            rel = "\u2265" if cens else "="  # censored at the horizon: at least K*dt
            label = f"{name} (t {rel} {thc:.4g})"
            ax.axvline(thc, color=color, linestyle=":", linewidth=1.2)
        ax.plot(tt, mean, color=color, label=label)
        if se is not None:
            ax.fill_between(tt, mean - se, mean + se, color=color, alpha=0.25, linewidth=0)
    if threshold is not None:
        ax.axhline(threshold, color="0.4", linestyle="--", linewidth=1.0, label=f"threshold {threshold:g}")
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
    return fig


def plot_spectra(spectra, path, *, xlabel: str = "wavenumber k", ylabel: str = "E(k)") -> Path:
    """Energy spectra on log-log axes: ``spectra`` maps a name to ``(k, E)`` (as from
    :func:`~diffkit_pde.metrics.energy_spectrum`; an ``E`` with leading dims is averaged over
    them).  ``k = 0`` and non-positive ``E`` cannot be drawn on log axes and are skipped."""
    if not isinstance(spectra, Mapping) or not spectra:
        raise ValueError("plot_spectra: spectra must be a non-empty dict name -> (k, E)")
    fig = _figure(6.0, 4.2)
    ax = fig.subplots()
    for name, ke in spectra.items():
        try:
            k, E = ke
        except (TypeError, ValueError):
            raise ValueError(f"plot_spectra: spectra[{name!r}] must be a pair (k, E)") from None
        k, E = _np(k), _np(E)
        if k.ndim > 1:
            k = k.reshape(-1, k.shape[-1]).mean(0)
        if E.ndim > 1:
            E = E.reshape(-1, E.shape[-1]).mean(0)
        if k.shape != E.shape:
            raise ShapeError(f"plot_spectra: spectra[{name!r}] has k of shape {k.shape} and E of shape {E.shape}")
        ok = (k > 0) & (E > 0) & np.isfinite(E)
        ax.loglog(k[ok], E[ok], label=name)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    return _save(fig, path)
