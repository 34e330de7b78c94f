"""The ``pde`` adapter: trajectories as (history -> next frames) training pairs.

Reads this plugin's CF netCDF files (:func:`diffkit_pde.netcdf.to_dataset`) and files in
the PDEBench HDF5 layout (:func:`diffkit_pde.pdebench.read_pdebench`).  Both give variables with
dims ``(trajectory, time, *spatial)``.  An item pairs ``history`` frames, spaced ``frame_step``
output intervals apart, with the ``horizon`` frames that follow (PDE-Refiner, Lippe et al. 2023;
Shysheya et al. 2024):

- ``fields``: the history, standardised with the per-variable *state* statistics, as
  conditioning channels ``u@t-1, u@t`` (oldest first; :func:`diffkit.layout.history_channels`);
- ``x``: the target, either the next state(s) (``target="state"``) or the change from the last
  history frame (``target="residual"``), standardised with its own per-channel statistics;
- ``scalars`` (optional): PDE parameters such as ``dt``, ``dx``, ``L`` or ``nu``, standardised.

Normalisation is explicit: the statistics come from the training trajectories unless ``mean``
and ``std`` are given.  The history length, horizon, step, target and state statistics are the
layout's :class:`~diffkit.layout.AutoregressiveSpec` (``layout.autoregressive``; the target
statistics are the layout's ``mean``/``std``), hence in every checkpoint;
:mod:`diffkit_pde.surrogate` rolls out from the layout alone with :func:`diffkit.rollout.rollout`.  Trajectories (not windows) are split between training and validation, so
validation windows never overlap training ones.
"""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch
from torch.utils.data import Dataset

from diffkit.adapters import Adapter, split_of
from diffkit.errors import DiffkitError, NonFiniteError, ShapeError
from diffkit.layout import TARGETS, AutoregressiveSpec, Layout, history_channels


class PDEDataError(DiffkitError, ValueError):
    """A trajectory file cannot be used as asked (missing variable, too few frames, ...)."""


# ----------------------------------------------------------------------------- reading
def open_trajectories(path, *, lazy: bool = False, pdebench: dict | None = None):
    """An xarray Dataset of trajectories from a netCDF file of this plugin or a PDEBench HDF5 file.

    ``pdebench`` holds keyword options of :func:`~diffkit_pde.pdebench.read_pdebench` for HDF5
    files (``channel_names``, ``params`` such as ``{"nu": 0.001}``, ``variables``).
    """
    import xarray as xr

    p = Path(path)
    if not p.exists():
        raise FileNotFoundError(f"trajectory file {p} does not exist; make one with `diffkit data pde ks --out {p.name}`")
    from .pdebench import is_pdebench, read_pdebench

    if is_pdebench(p):
        return read_pdebench(p, lazy=lazy, **(pdebench or {}))
    try:
        ds = xr.open_dataset(p)
    except Exception as e:
        raise PDEDataError(f"cannot read {p} as netCDF or PDEBench HDF5 ({type(e).__name__}: {e}); "
                           f"give a file written by `diffkit data pde` or in the PDEBench layout") from None
    return ds if lazy else ds.load()


def field_variables(ds) -> list[str]:
    """Data variables with dims ``(trajectory, time, ...)`` and at least one spatial axis."""
    return [v for v, da in ds.data_vars.items()
            if da.dims[:2] == ("trajectory", "time") and da.ndim >= 3]


def spatial_dims(ds, variables: Sequence[str], path="the file") -> tuple[str, ...]:
    dims = {tuple(ds[v].dims[2:]) for v in variables}
    if len(dims) != 1:
        raise PDEDataError(f"variables {list(variables)} of {path} have different spatial dims {sorted(dims)}; "
                           f"choose variables on one grid (data.options.variables)")
    return dims.pop()


def select_variables(ds, variables, path="the file") -> list[str]:
    avail = field_variables(ds)
    if variables is None:
        if not avail:
            raise PDEDataError(f"{path} has no variable with dims (trajectory, time, x[, y]); it has "
                               f"{', '.join(f'{k}{tuple(v.dims)}' for k, v in ds.data_vars.items()) or 'none'}")
        default = ds.attrs.get("state_variables")
        return [v for v in str(default).split(",") if v in avail] if default else avail
    variables = [variables] if isinstance(variables, str) else list(variables)
    missing = [v for v in variables if v not in avail]
    if missing:
        raise PDEDataError(f"variable(s) {', '.join(missing)} not in {path}; its trajectory variables are "
                           f"{', '.join(avail) or 'none'}")
    return variables


def scalar_values(ds, names: Sequence[str], frame_step: int = 1, path="the file") -> np.ndarray:
    """``(trajectory, len(names))`` float64 values of scalar PDE parameters.

    A name is a per-trajectory variable (dims ``(trajectory,)``) or a numeric global attribute;
    ``dt`` is the file's output interval times ``frame_step`` (the model's time step).
    """
    n = ds.sizes["trajectory"]
    cols = []
    for name in names:
        if name in ds.data_vars and ds[name].dims == ("trajectory",):
            v = np.asarray(ds[name].values, dtype=np.float64)
        elif name in ds.attrs and _is_number(ds.attrs[name]):
            v = np.full(n, float(ds.attrs[name]))
        else:
            have = [k for k, a in ds.data_vars.items() if a.dims == ("trajectory",)]
            have += [k for k, a in ds.attrs.items() if _is_number(a)]
            raise PDEDataError(f"scalar condition {name!r} is neither a per-trajectory variable nor a numeric "
                               f"attribute of {path}; available: {', '.join(sorted(set(have))) or 'none'}")
        if name == "dt":
            v = v * frame_step
        cols.append(v)
    return np.stack(cols, axis=1) if cols else np.zeros((n, 0))


def _is_number(v) -> bool:
    try:
        return np.ndim(v) == 0 and math.isfinite(float(v))
    except (TypeError, ValueError):
        return False


def check_trajectories_finite(arr: np.ndarray, variable: str, path, offset: int = 0) -> None:
    """Raise :class:`NonFiniteError` naming the first trajectory and frame holding NaN or inf."""
    bad = ~np.isfinite(arr)
    if bad.any():
        i, t = np.argwhere(bad.reshape(bad.shape[0], bad.shape[1], -1).any(-1))[0]
        nbad = int(bad.reshape(bad.shape[0], -1).any(-1).sum())
        raise NonFiniteError(
            f"variable {variable!r} of {path} holds NaN or inf (first at trajectory {int(i) + offset}, frame {int(t)}; "
            f"{nbad} trajectories affected); drop those trajectories or re-simulate them "
            f"(a blown-up simulation needs a smaller time step)")


def window_starts(n_time: int, history: int, horizon: int, frame_step: int, stride: int) -> np.ndarray:
    span = (history + horizon - 1) * frame_step + 1
    return np.arange(0, n_time - span + 1, stride)


# ----------------------------------------------------------------------------- datasets
class _Windows(Dataset):
    def __init__(self, data: dict, traj: np.ndarray, starts: np.ndarray, scalars: torch.Tensor | None,
                 layout: Layout, path):
        self.data, self.traj, self.starts, self.scalars = data, traj, starts, scalars
        self.layout, self.spec, self.path = layout, layout.autoregressive, path
        self.per_traj = len(starts)

    def __len__(self):
        return len(self.traj) * self.per_traj

    def __getitem__(self, i):
        h, hz, fs = self.spec.history, self.spec.horizon, self.spec.frame_step
        tr = int(self.traj[i // self.per_traj])
        s = int(self.starts[i % self.per_traj])
        idx = s + fs * np.arange(h + hz)
        frames = []
        for v in self.spec.variables:
            a = self.data[v]
            frames.append(np.asarray(a[tr, idx] if isinstance(a, np.ndarray) else a[tr, s: s + fs * (h + hz - 1) + 1: fs].values,
                                     dtype=np.float32))
        u = torch.from_numpy(np.stack(frames, axis=1))  # (h + hz, C, *S)
        if not bool(torch.isfinite(u).all()):  # lazy reads are checked here, eager ones at load time
            raise NonFiniteError(f"trajectory {tr} of {self.path} holds NaN or inf in frames {idx.tolist()}; "
                                 f"drop or re-simulate that trajectory")
        return make_item(u, self.layout, None if self.scalars is None else self.scalars[tr])


def make_item(u: torch.Tensor, layout: Layout, scalars: torch.Tensor | None) -> dict:
    """One training pair from physical frames ``u`` of shape ``(history + horizon, C, *S)``: the
    history standardised as ``fields``, the target (the spec's
    :meth:`~diffkit.layout.AutoregressiveSpec.target_from`) normalised with the layout as ``x``."""
    spec = layout.autoregressive
    nd = u.ndim - 2
    hist, fut = u[:spec.history], u[spec.history:]
    fields = spec.standardize(hist, nd).reshape(-1, *u.shape[2:])
    x = layout.normalize(spec.target_from(hist[-1:], fut).reshape(-1, *u.shape[2:]))
    item = {"x": x, "fields": fields}
    if scalars is not None:
        item["scalars"] = scalars
    return item


def _col(v, nd: int) -> torch.Tensor:
    """Per-channel statistics as a ``(C, 1, ..., 1)`` tensor."""
    return torch.as_tensor(v, dtype=torch.float32).reshape(-1, *([1] * nd))


# ----------------------------------------------------------------------------- adapter
class TrajectoryAdapter(Adapter):
    """PDE trajectories (this plugin's netCDF or PDEBench HDF5) as history -> next-frame pairs.

    Options: ``path`` (the file), ``variables`` (default: all trajectory variables; for Kolmogorov
    files ``u, v``), ``history`` (frames of context, 1), ``horizon`` (frames predicted per call,
    1), ``frame_step`` (output intervals per model step, 1), ``target`` (``"state"`` or
    ``"residual"``), ``stride`` (between window starts, 1), ``scalars`` (PDE parameters given
    as scalar conditions, e.g. ``["dt", "dx"]``), ``val_fraction`` (of trajectories, 0.1),
    ``max_trajectories``, ``mean``/``std`` (``{variable: value}``: explicit state statistics),
    ``lazy`` (read windows from disk on demand instead of loading the file), ``pdebench``
    (options of :func:`~diffkit_pde.pdebench.read_pdebench` for HDF5 files, e.g.
    ``{params = {nu = 0.001}}``; kept in the layout, so rollouts read such files alike).
    """

    name = "pde"

    def __init__(self, path: str, variables: Sequence[str] | str | None = None, history: int = 1,
                 horizon: int = 1, frame_step: int = 1, target: str = "state", stride: int = 1,
                 scalars: Sequence[str] | str = (), val_fraction: float = 0.1, max_trajectories: int | None = None,
                 mean: dict | None = None, std: dict | None = None, lazy: bool = False,
                 pdebench: dict | None = None):
        for k, v in dict(history=history, horizon=horizon, frame_step=frame_step, stride=stride).items():
            if not isinstance(v, int) or isinstance(v, bool) or v < 1:
                raise PDEDataError(f"data.options.{k} must be an integer >= 1, got {v!r}")
        if target not in TARGETS:
            raise PDEDataError(f"data.options.target must be one of {', '.join(TARGETS)}, got {target!r}")
        if not 0 <= val_fraction < 1:
            raise PDEDataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        self.path = Path(path)
        self.pdebench = dict(pdebench or {})
        ds = open_trajectories(self.path, lazy=lazy, pdebench=self.pdebench)
        self.variables = select_variables(ds, variables, self.path)
        self.spatial = spatial_dims(ds, self.variables, self.path)
        ntraj, ntime = ds.sizes["trajectory"], ds.sizes["time"]
        if max_trajectories is not None:
            ntraj = min(ntraj, int(max_trajectories))
        need = (history + horizon - 1) * frame_step + 1
        if ntime < need:
            raise PDEDataError(
                f"{self.path} has {ntime} frames per trajectory, fewer than the {need} one training pair needs "
                f"(history {history} + horizon {horizon}, {frame_step} output interval(s) apart); lower "
                f"data.options.history / horizon / frame_step, or simulate longer trajectories (--steps)")
        n_val = 0 if val_fraction == 0 else max(1, int(round(ntraj * val_fraction)))
        if n_val >= ntraj:
            raise PDEDataError(f"{self.path} has {ntraj} trajectories: too few for a validation split of "
                               f"{val_fraction}; simulate more trajectories or set data.val_fraction = 0")
        self.history, self.horizon, self.frame_step, self.target = history, horizon, frame_step, target
        self.train_traj, self.val_traj = np.arange(ntraj - n_val), np.arange(ntraj - n_val, ntraj)
        self.starts = window_starts(ntime, history, horizon, frame_step, stride)

        if lazy:
            self.data = {v: ds[v] for v in self.variables}
        else:
            self.data = {}
            for v in self.variables:
                a = np.asarray(ds[v].values[:ntraj], dtype=np.float32)
                check_trajectories_finite(a, v, self.path)
                self.data[v] = a
        stats = self._statistics(mean, std)
        self.scalar_names = [scalars] if isinstance(scalars, str) else list(scalars)
        sc = scalar_values(ds, self.scalar_names, frame_step, self.path)[:ntraj]
        if self.scalar_names:
            tr = sc[self.train_traj]
            smean, sstd = tr.mean(0), tr.std(0)
            sstd = np.where(sstd > 1e-12 * np.maximum(1.0, np.abs(smean)), sstd, 1.0)  # constant: centred only
            stats["scalar_mean"], stats["scalar_std"] = smean.tolist(), sstd.tolist()
            self._scalars = torch.as_tensor((sc - smean) / sstd, dtype=torch.float32)
        else:
            self._scalars = None
        self.stats = stats
        self._layout = self._make_layout(ds)
        self.spec = self._layout.autoregressive

    # -- statistics --------------------------------------------------------------------
    def _statistics(self, mean, std) -> dict:
        tr = self.train_traj
        sm, ss, tm, ts = [], [], [], []
        fs, hz = self.frame_step, self.horizon
        for v in self.variables:
            a = self.data[v]
            if not isinstance(a, np.ndarray):  # lazy: statistics from (up to) the first 64 training trajectories
                a = np.asarray(a[: min(len(tr), 64)].values, dtype=np.float32)
                check_trajectories_finite(a, v, self.path)
            else:
                a = a[tr]
            m = float(mean[v]) if mean and v in mean else float(a.mean(dtype=np.float64))
            s = float(std[v]) if std and v in std else float(a.std(dtype=np.float64))
            if not s > 0:
                raise PDEDataError(f"variable {v!r} of {self.path} is constant (std 0); it cannot be standardised. "
                                   f"Drop it (data.options.variables) or give data.options.std")
            sm.append(m)
            ss.append(s)
            for k in range(1, hz + 1):
                if self.target == "residual":
                    d = a[:, k * fs:] - a[:, : a.shape[1] - k * fs]
                    m_k, s_k = float(d.mean(dtype=np.float64)), float(d.std(dtype=np.float64))
                    if not s_k > 0:
                        raise PDEDataError(f"variable {v!r} of {self.path} does not change in time; use target='state'")
                    tm.append((k, m_k))
                    ts.append((k, s_k))
                else:
                    tm.append((k, m))
                    ts.append((k, s))
        # target channels are ordered (step k, variable); see _make_layout
        C = len(self.variables)
        order = sorted(range(len(tm)), key=lambda i: (tm[i][0], i))
        return dict(state_mean=sm, state_std=ss,
                    target_mean=[tm[i][1] for i in order], target_std=[ts[i][1] for i in order],
                    target_channels=C * hz)

    def _make_layout(self, ds) -> Layout:
        vs, h, hz, fs = self.variables, self.history, self.horizon, self.frame_step
        shape = tuple(ds.sizes[d] for d in self.spatial)
        pre = "d" if self.target == "residual" else ""
        channels = [f"{pre}{v}@t+{k}" if hz > 1 else f"{pre}{v}" for k in range(1, hz + 1) for v in vs]
        coords = {d: tuple(float(c) for c in ds[d].values) for d in self.spatial if d in ds.coords}
        dt = float(np.asarray(ds["dt"].values).ravel()[0]) if "dt" in ds.data_vars else float("nan")
        step = dt * fs if math.isfinite(dt) and dt > 0 else None
        spec = AutoregressiveSpec(variables=tuple(vs), history=h, horizon=hz, step=step, step_units="1",
                                  frame_step=fs, target=self.target, state_mean=self.stats["state_mean"],
                                  state_std=self.stats["state_std"])
        units = {v: str(ds[v].attrs.get("units", "1")) for v in vs}
        attrs: dict[str, Any] = dict(
            adapter=self.name, source=str(self.path.name),
            title=str(ds.attrs.get("title", ds.attrs.get("name", ""))),
            scalar_names=",".join(self.scalar_names),
            scalar_mean=list(self.stats.get("scalar_mean", [])), scalar_std=list(self.stats.get("scalar_std", [])),
            units=units, pdebench=json.dumps(self.pdebench),
        )
        nd = len(shape)
        return Layout(channels=tuple(channels), spatial=self.spatial, shape=shape, periodic=self.spatial,
                      coords=coords, cond_channels=history_channels(vs, h), scalars=tuple(self.scalar_names),
                      mean=_col(self.stats["target_mean"], nd), std=_col(self.stats["target_std"], nd),
                      attrs=attrs, autoregressive=spec)

    # -- protocol ----------------------------------------------------------------------
    @property
    def layout(self) -> Layout:
        return self._layout

    def dataset(self, split: str) -> Dataset:
        traj = split_of(split, self.train_traj, self.val_traj)
        return _Windows(self.data, traj, self.starts, self._scalars, self._layout, self.path)


def spec_from_layout(layout: Layout) -> AutoregressiveSpec:
    """The :class:`~diffkit.layout.AutoregressiveSpec` of a PDE surrogate's (checkpoint's) layout.

    A layout of this adapter must have one; use :func:`upgrade_layout` first for a checkpoint
    written before the spec was typed (:func:`diffkit_pde.surrogate.load_surrogate` does)."""
    if layout.attrs.get("adapter") != TrajectoryAdapter.name:
        raise PDEDataError(f"this checkpoint was not trained on PDE trajectories (adapter {layout.attrs.get('adapter')!r}); "
                           f"`diffkit rollout` needs a model trained with data.adapter = \"pde\"")
    if layout.autoregressive is None:
        raise PDEDataError("this PDE layout has no autoregressive spec (Layout.autoregressive); load the checkpoint "
                           "with diffkit_pde.surrogate.load_surrogate, which converts old checkpoints")
    return layout.autoregressive


#: the PDE keys of ``Layout.attrs`` that old checkpoints (before ``Layout.autoregressive``) held
_LEGACY = ("variables", "history", "horizon", "frame_step", "target", "state_mean", "state_std", "dt_frame")


def upgrade_layout(layout: Layout) -> Layout:
    """A layout of this adapter with its autoregressive spec: itself if it has one, else the spec read
    from the attrs of a checkpoint written before the spec was typed (``variables`` as
    ``"u,v"``, ``history``, ``horizon``, ``frame_step``, ``target``, ``state_mean``/``state_std``,
    ``dt_frame``), those keys removed from ``attrs``."""
    if layout.autoregressive is not None or layout.attrs.get("adapter") != TrajectoryAdapter.name:
        return layout
    a = layout.attrs
    if "variables" not in a:
        raise PDEDataError("this PDE checkpoint's layout has neither an autoregressive spec nor the old attrs "
                           "(variables, history, target, state_mean, state_std); retrain it with this diffkit")
    fs = int(a.get("frame_step", 1))
    dt = float(a.get("dt_frame", float("nan")))
    try:
        spec = AutoregressiveSpec.from_legacy_attrs(a, variables=str(a["variables"]).split(","),
                                                    step=dt * fs if math.isfinite(dt) and dt > 0 else None)
    except ValueError as e:
        raise PDEDataError(f"cannot read this old PDE checkpoint's layout: {e}") from None
    return layout.replace(autoregressive=spec, attrs={k: v for k, v in a.items() if k not in _LEGACY})
