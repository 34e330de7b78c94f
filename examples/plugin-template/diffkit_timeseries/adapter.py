"""The ``timeseries`` adapter: windows of a multivariate time series as diffkit samples.

A series holds T time steps of C named channels (the variables of a weather station, the state
of a chaotic system, a sensor array, ...).  A sample is a window of ``window`` consecutive
steps, a tensor of shape ``(C, window)``: channels first, then the one spatial axis ``"time"``.
That is diffkit's ``(channel, *spatial)`` layout, so the engine, the samplers, the checkpoints and
``diffkit sample`` need nothing new.

Where the series comes from (option ``path``):

- ``None`` (the default): a seeded Lorenz-96 series computed here (:func:`lorenz96`), so that
  everything runs without a file;
- ``*.csv``: a header row of channel names, then one row per time step; a first column named
  ``time``, ``date``, ``datetime`` or ``t`` is a time stamp, not a channel;
- ``*.nc``: netCDF; every numeric variable whose only dim is ``time`` (option ``dim``) is a channel.

Normalisation: each channel is standardised with the mean and std of the *training* part of the
series.  The statistics go into the layout, hence into every checkpoint, which is all
:meth:`TimeSeriesAdapter.decode` needs to write samples back in physical units.

Split: by time.  The last ``val_fraction`` of the series is validation, and windows never
straddle the split, so no validation value is seen in training.
"""
from __future__ import annotations

import csv
import os
from pathlib import Path
from typing import Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffkit import Layout
from diffkit.adapters import Adapter

__all__ = ["TimeSeriesAdapter", "lorenz96", "read_csv", "read_netcdf", "read_series", "read_samples", "write_csv"]

TIME_COLUMNS = ("time", "date", "datetime", "t")
NETCDF_SUFFIXES = (".nc", ".nc4", ".cdf", ".netcdf")


# ----------------------------------------------------------------------------- data sources
def lorenz96(n_steps: int, *, n_channels: int = 8, forcing: float = 8.0, dt: float = 0.05,
             spin_up: int = 500, noise: float = 0.1, seed: int = 0) -> np.ndarray:
    """A Lorenz-96 series of shape ``(n_steps, n_channels)``.

    ``dx_k/dt = (x_{k+1} - x_{k-2}) x_{k-1} - x_k + F`` with k periodic, integrated by classic
    RK4 with step ``dt`` (0.05 time units, about 6 hours in Lorenz's scaling).  The first
    ``spin_up`` steps are dropped so that the series lies on the attractor, and Gaussian
    observation noise of std ``noise`` is added.  The same ``seed`` gives the same series.
    """
    if n_channels < 4:
        raise ValueError(f"Lorenz-96 needs at least 4 channels, got n_channels={n_channels}")
    if n_steps < 1:
        raise ValueError(f"n_steps must be >= 1, got {n_steps}")
    rng = np.random.default_rng(seed)

    def tendency(x):
        return (np.roll(x, -1) - np.roll(x, 2)) * np.roll(x, 1) - x + forcing

    x = forcing + 0.01 * rng.standard_normal(n_channels)
    out = np.empty((n_steps, n_channels))
    for i in range(spin_up + n_steps):
        k1 = tendency(x)
        k2 = tendency(x + 0.5 * dt * k1)
        k3 = tendency(x + 0.5 * dt * k2)
        k4 = tendency(x + dt * k3)
        x = x + dt / 6.0 * (k1 + 2.0 * k2 + 2.0 * k3 + k4)
        if i >= spin_up:
            out[i - spin_up] = x
    return out + noise * rng.standard_normal(out.shape)


def read_csv(path) -> tuple[list[str], np.ndarray]:
    """``(channel names, values (T, C))`` of a CSV file with a header row."""
    path = Path(path)
    with open(path, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.reader(f) if r and not r[0].lstrip().startswith("#")]
    if len(rows) < 2:
        raise ValueError(f"{path} needs a header row of channel names and at least one row of values")
    header = [h.strip() for h in rows[0]]
    skip = 1 if header[0].lower() in TIME_COLUMNS else 0
    names = header[skip:]
    if not names:
        raise ValueError(f"{path} has no channel columns besides {header[0]!r}")
    values = np.empty((len(rows) - 1, len(names)))
    for i, row in enumerate(rows[1:], start=2):
        if len(row) != len(header):
            raise ValueError(f"{path}, line {i}: {len(row)} values for {len(header)} columns")
        for j, v in enumerate(row[skip:]):
            try:
                values[i - 2, j] = float(v)
            except ValueError:
                raise ValueError(f"{path}, line {i}, column {names[j]!r}: {v!r} is not a number") from None
    return names, values


def read_netcdf(path, dim: str = "time") -> tuple[list[str], np.ndarray]:
    """``(channel names, values (T, C))``: the numeric variables of a netCDF file with dims ``(dim,)``."""
    import xarray as xr  # imported here: only netCDF users pay for it

    with xr.open_dataset(path) as ds:
        names = [str(v) for v, da in ds.data_vars.items() if da.dims == (dim,) and da.dtype.kind in "fiu"]
        if not names:
            raise ValueError(f"{path} has no numeric variable with the single dim {dim!r}; its variables are "
                             f"{', '.join(f'{k}{tuple(v.dims)}' for k, v in ds.data_vars.items()) or 'none'}")
        values = np.stack([np.asarray(ds[v].values, dtype=np.float64) for v in names], axis=1)
    return names, values


def read_series(path, dim: str = "time") -> tuple[list[str], np.ndarray]:
    """``(channel names, values (T, C))`` of a CSV or netCDF file (chosen by the suffix)."""
    path = Path(path)
    if not path.exists():
        raise FileNotFoundError(f"time-series file {path} does not exist")
    if path.suffix.lower() == ".csv":
        return read_csv(path)
    if path.suffix.lower() in NETCDF_SUFFIXES:
        return read_netcdf(path, dim)
    raise ValueError(f"{path}: unknown file type {path.suffix!r}; give a .csv or a netCDF file ({', '.join(NETCDF_SUFFIXES)})")


# ----------------------------------------------------------------------------- the adapter
class _Windows(Dataset):
    """Items ``{"x": series[:, s : s + window]}`` for the window starts ``s``."""

    def __init__(self, series: torch.Tensor, starts: range, window: int):
        self.series, self.starts, self.window = series, starts, window

    def __len__(self) -> int:
        return len(self.starts)

    def __getitem__(self, i: int) -> dict:
        s = self.starts[i]
        return {"x": self.series[:, s: s + self.window].clone()}


class TimeSeriesAdapter(Adapter):
    """Multivariate time series (CSV, netCDF or a built-in Lorenz-96 series) as fixed-length windows.

    Options: ``path`` (a .csv or netCDF file; None: the synthetic series), ``channels`` (the
    channels to use, in order; default all), ``window`` (steps per sample, 64), ``stride``
    (steps between window starts; default window // 4), ``val_fraction`` (the last fraction of
    the series, 0.1), ``dim`` (the time dim of netCDF files, "time"), ``dt`` (time between
    steps, for the coordinates; default 1, or 0.05 for the synthetic series); for the synthetic
    series ``n_steps`` (4000), ``n_channels`` (8), ``noise`` (0.1) and ``seed`` (0).
    """

    name = "timeseries"

    def __init__(self, path: str | None = None, channels: Sequence[str] | None = None, window: int = 64,
                 stride: int | None = None, val_fraction: float = 0.1, dim: str = "time", dt: float | None = None,
                 n_steps: int = 4000, n_channels: int = 8, noise: float = 0.1, seed: int = 0):
        if not isinstance(window, int) or isinstance(window, bool) or window < 2:
            raise ValueError(f"data.options.window must be an integer >= 2, got {window!r}")
        stride = max(1, window // 4) if stride is None else stride
        if not isinstance(stride, int) or stride < 1:
            raise ValueError(f"data.options.stride must be an integer >= 1, got {stride!r}")
        if not 0 <= val_fraction < 1:
            raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
        if path is None:
            names = [f"x{k + 1}" for k in range(n_channels)]
            values = lorenz96(n_steps, n_channels=n_channels, noise=noise, seed=seed)
            source, dt = f"Lorenz-96, F = 8, seed {seed}", 0.05 if dt is None else dt
        else:
            names, values = read_series(path, dim)
            source, dt = Path(path).name, 1.0 if dt is None else dt
        if channels is not None:
            channels = [channels] if isinstance(channels, str) else list(channels)
            missing = [c for c in channels if c not in names]
            if missing:
                raise ValueError(f"channel(s) {', '.join(missing)} not in {source}; it has {', '.join(names)}")
            values = values[:, [names.index(c) for c in channels]]
            names = channels
        bad = ~np.isfinite(values)
        if bad.any():
            t, c = np.argwhere(bad)[0]
            raise ValueError(f"{source} holds NaN or inf (first at step {t}, channel {names[c]!r}); fill or drop "
                             f"those steps first")

        T = len(values)
        n_val = int(round(T * val_fraction))
        n_train = T - n_val
        if n_train < window:
            raise ValueError(f"{source}: the training part has {n_train} steps, fewer than window = {window}; "
                             f"use a shorter window or a longer series")
        if 0 < n_val < window:
            raise ValueError(f"{source}: the validation part has {n_val} steps, fewer than window = {window}; "
                             f"raise val_fraction, shorten the window, or set val_fraction = 0")
        mean, std = values[:n_train].mean(0), values[:n_train].std(0)
        if (std == 0).any():
            raise ValueError(f"channel(s) {[n for n, s in zip(names, std) if s == 0]} of {source} are constant; "
                             f"they cannot be standardised; leave them out with data.options.channels")

        # (C, T), standardised once: an item is then a slice
        self.series = torch.from_numpy(((values - mean) / std).T.astype(np.float32))
        self.window = window
        self.starts = {"train": range(0, n_train - window + 1, stride),
                       "val": range(n_train, T - window + 1, stride) if n_val else range(0)}
        self._layout = Layout(
            channels=tuple(names),
            spatial=("time",),            # the window's axis; not periodic: a window does not wrap around
            shape=(window,),
            coords={"time": tuple(dt * k for k in range(window))},   # offsets within the window
            mean=torch.tensor(mean, dtype=torch.float32).reshape(-1, 1),
            std=torch.tensor(std, dtype=torch.float32).reshape(-1, 1),
            attrs={"adapter": self.name, "source": source, "dt": float(dt)},
        )

    @property
    def layout(self) -> Layout:
        return self._layout

    def dataset(self, split: str) -> Dataset:
        if split not in self.starts:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        return _Windows(self.series, self.starts[split], self.window)

    @classmethod
    def decode(cls, x: torch.Tensor, layout: Layout, path, *, attrs: dict | None = None) -> Path:
        """Write standardised samples ``(N, C, window)`` in physical units: CSV for ``*.csv``, else netCDF.

        CSV has one row per sample and time step (columns ``sample``, ``time``, then the channels)
        and no room for ``attrs``; netCDF (diffkit's default writer) has one variable per channel
        with dims ``(sample, time)``, and the ``attrs`` as global attributes.
        """
        path = Path(path)
        if path.suffix.lower() != ".csv":
            return super().decode(x, layout, path, attrs=attrs)
        values = layout.denormalize(x.detach().float().cpu()).double().numpy()
        return write_csv(values, layout, path)


# ----------------------------------------------------------------------------- samples
def write_csv(values: np.ndarray, layout: Layout, path) -> Path:
    """Samples ``(N, C, window)`` in physical units as CSV, atomically (a temporary file, then
    ``os.replace``: readers never see half a file)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    times = layout.coords.get("time", tuple(range(layout.shape[0])))
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        with open(tmp, "w", newline="", encoding="utf-8") as f:
            w = csv.writer(f)
            w.writerow(["sample", "time", *layout.channels])
            for n in range(values.shape[0]):
                for j, t in enumerate(times):
                    w.writerow([n, f"{t:.9g}", *(f"{v:.9g}" for v in values[n, :, j])])
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def read_samples(path, layout: Layout) -> np.ndarray:
    """Samples ``(N, C, window)`` in physical units from a file written by :meth:`TimeSeriesAdapter.decode`."""
    path = Path(path)
    C, L = layout.num_channels, layout.shape[0]
    if path.suffix.lower() == ".csv":
        with open(path, newline="", encoding="utf-8") as f:
            rows = list(csv.reader(f))
        cols = [rows[0].index(c) for c in layout.channels]
        flat = np.array([[float(r[j]) for j in cols] for r in rows[1:]])       # (N * L, C)
        if flat.shape[0] % L:
            raise ValueError(f"{path} has {flat.shape[0]} rows, not a multiple of the window length {L}")
        return flat.reshape(-1, L, C).transpose(0, 2, 1)
    import xarray as xr

    with xr.open_dataset(path) as ds:
        return np.stack([ds[c].transpose("sample", "time").values for c in layout.channels], axis=1)

