"""Ensemble weather forecasts with a model trained on the ``weather`` adapter.

A forecaster is a checkpoint trained with ``data.adapter = "weather"``: a conditional diffusion
model (``model.objective = "diffusion"``, GenCast-style: each step samples the next state given
the latest ``history`` states and the forcings), or the deterministic MSE baseline
(``"regression"``) with the same backbone.  :func:`forecast` rolls it out autoregressively,
``lead`` hours per step, with the core's :func:`diffkit.rollout.rollout`; this module adds the
weather conditioning (forcings, static fields, the mask channel) and the fixed missing-value mask:

- all ``N`` initial conditions times ``M`` members advance in **one batch**, one model call (a
  Regressor) or one sampler run (a Denoiser, :func:`diffkit.samplers.sample`) per step;
- the noise (sampler noise and initial-condition perturbations) comes from **one generator**
  seeded by ``seed``: the same seed gives the same ensemble, whatever else runs;
- the **forcings** (sin/cos of the time of day and of the year) are those of each step's own
  initialisation time ``t + k * lead``, as in training (``layout.attrs["forcing_time"] = "init"``);
- the **target** is the state or the increment (``target = "residual"``), turned into the next
  physical state by the layout's :class:`~diffkit.layout.AutoregressiveSpec` (latest input state
  plus the de-normalised increment), as :func:`~diffkit_weather.decode.next_state` does;
- **missing values**: inputs are filled with 0 (the normalised mean) and flagged in the
  ``"mask"`` channel exactly as the adapter does for training; outputs are NaN on the layout's
  fixed missing-value mask (points missing at every training time);
- everything (variables, levels, grid, statistics, history, lead, forcings, masks) is read from
  the layout stored in the checkpoint; the data files only supply the initial states (and static
  fields), read with the adapter's coordinate logic and checked against the checkpoint's grid.

**Perturbed-initial-condition ensembles.**  The policy is the core's (:mod:`diffkit.rollout`, the
same for PDE surrogates): ``perturb`` adds independent Gaussian noise of standard deviation
``perturb`` to the *normalised* initial state of every member (i.e. ``perturb`` times each
channel's climatological standard deviation in physical units); one noise field per member is
added to every history state, so the recent tendency the model sees is kept.  All members are
perturbed (no unperturbed control), so the members are exchangeable, as the fair CRPS and the
rank histogram assume.  The default (``perturb=None``) is 0 for a diffusion model (its spread
comes from the sampler) and :data:`~diffkit.rollout.DEFAULT_PERTURB` (0.05) for a regression model
with more than one member: the "perturbed-initial-condition ensemble" baseline.  Points of the
fixed missing-value mask are not perturbed.

:func:`~diffkit_weather.decode.forecast_dataset` turns a forecast into CF netCDF: dims ``(member,
init_time, lead_time, [level,] latitude, longitude)`` with the file's own variable, coordinate and
level names, attributes, units and orientation (:func:`~diffkit_weather.decode.unstack`),
``lead_time`` a timedelta (``standard_name = "forecast_period"``), ``init_time``
(``"forecast_reference_time"``), ``member`` (``"realization"``) and the 2-D coordinate
``valid_time(init_time, lead_time)``.  The files are read by :class:`~diffkit_weather.store.Store`,
the adapter's reader.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping, NamedTuple

import numpy as np
import torch

from diffkit.denoiser import Cond
from diffkit.errors import NonFiniteError, ShapeError
from diffkit.layout import Layout
from diffkit.model import ModelView
from diffkit.rollout import DEFAULT_PERTURB, rollout

from ._common import WeatherDataError
from .decode import _check_layout, fixed_mask
from .decode import forecast_dataset, member_attrs, member_dataset  # noqa: F401  (public names of this module before the split)
from .cf import ALL_VAL, _as_time, _fmt_time, _keys, _nearest, _parse_time, _shift, time_forcings
from .store import Store, check_grid

__all__ = ["Forecaster", "InitialStates", "load_forecaster", "initial_states", "forecast", "persistence",
           "select_init_times", "forcing_scalars", "DEFAULT_PERTURB", "ALL_VAL",
           "forecast_dataset", "member_attrs", "member_dataset"]


# ----------------------------------------------------------------------------- the model
@dataclass
class Forecaster(ModelView):
    """A trained weather model with its run configuration (from :func:`load_forecaster`); ``layout``
    and ``objective`` from :class:`diffkit.model.ModelView`."""

    model: Any
    config: Any
    path: str = ""

    @property
    def data_options(self) -> dict:
        """The run's ``data.options`` (time_units, dims, member, val_slice, ...)."""
        return dict(self.config.data.options) if self.config is not None else {}


def load_forecaster(ckpt, device=None) -> Forecaster:
    """The EMA model of a checkpoint (file, checkpoints folder or run directory) trained with the
    ``weather`` adapter, with its config."""
    from diffkit.model import load_for_sampling

    model, cfg, _ = load_for_sampling(ckpt, device=device)
    model.layout = _check_layout(model.layout, f"checkpoint {ckpt}")
    return Forecaster(model, cfg, str(ckpt))


# ----------------------------------------------------------------------------- reading files
def _files_for(data, layout: Layout, *, time_units=None, dims=None, member=None, statics=(),
               member_optional: bool = False) -> Store:
    a = layout.attrs
    return Store.open(data, a["variables"], a.get("levels", {}), level_dims=a.get("level_dims", {}),
                  time_units=time_units, dims=dims, member=member, statics=statics, member_optional=member_optional)


def _to_model(a: np.ndarray, layout: Layout) -> np.ndarray:
    """File orientation -> the model's (latitude ascending, longitude continuous)."""
    if layout.attrs.get("lat_flipped"):
        a = a[..., ::-1, :]
    if layout.attrs.get("lon_flipped"):
        a = a[..., ::-1]
    return np.ascontiguousarray(a)


def _train_bounds(layout: Layout, like) -> tuple[float, float] | None:
    tt = layout.attrs.get("train_times") or []
    if len(tt) != 2:
        return None
    lo, hi = (_parse_time(str(s).replace(" ", "T"), like) for s in tt)
    return float(_keys([lo])[0]), float(_keys([hi])[0])


def select_init_times(available, layout: Layout, init_times, *, steps: int | None = None,
                      val_slice=None, need_truth: bool = False) -> np.ndarray:
    """Indices into ``available`` (decoded times of the data, ascending) of the requested init times.

    ``init_times``: ISO strings (``"1996-01-06T00:00"``; matched *exactly*), datetime64 / cftime
    values, a comma-separated string, or ``"all-val"``: every validation init time -- every time
    whose history states and (with ``steps``) the ``steps`` valid times after it are all in the
    data and all outside the checkpoint's training period (``layout.attrs["train_times"]``), and
    inside ``val_slice`` when the run used one.  A time not in the data is an error naming the
    nearest available times; so is one without its history states (or, with ``need_truth``,
    without truth for every step).
    """
    available = np.asarray(available)
    keys = _keys(available) if available.size else np.zeros(0)
    kset = {float(k): i for i, k in enumerate(keys)}
    a = layout.attrs
    spec = _check_layout(layout, "the layout").autoregressive
    h, lead = spec.history, spec.step
    back = [-(h - 1 - j) * lead for j in range(h)]
    fwd = [k * lead for k in range(1, (steps or 0) + 1)]
    have = lambda k, offs: all(round(k + o, 6) in kset for o in offs)
    if isinstance(init_times, str):
        init_times = [s for s in init_times.split(",") if s.strip()]
    elif np.ndim(init_times) == 0:
        init_times = [init_times]
    init_times = list(init_times)
    if not init_times:
        eg = _fmt_time(available[0]) if available.size else "1996-01-06T00:00"
        raise WeatherDataError(f"no init time given; give ISO times (e.g. {eg}) or {ALL_VAL!r}")
    if any(isinstance(s, str) and s.strip() == ALL_VAL for s in init_times):
        if len(init_times) > 1:
            raise WeatherDataError(f"{ALL_VAL!r} stands alone; do not mix it with other init times")
        if not available.size:
            raise WeatherDataError("the data have no times")
        tb = _train_bounds(layout, available)
        ok = np.ones(len(keys), bool)
        offs = back + fwd
        if val_slice is not None:
            vs = val_slice.split("/") if isinstance(val_slice, str) else list(val_slice)
            import pandas as pd

            key = lambda ts: float(_keys([_parse_time(ts.isoformat(), available)])[0])
            lo = -np.inf if vs[0] in (None, "") else key(pd.Period(str(vs[0])).start_time)
            hi = np.inf if vs[1] in (None, "") else key(pd.Period(str(vs[1])).end_time.floor("s"))
        else:
            lo, hi = -np.inf, np.inf
        for i, k in enumerate(keys):
            ts = [k + o for o in offs]
            ok[i] = have(k, offs) and all(lo <= t <= hi for t in ts)
            if tb is not None:
                ok[i] &= all(t < tb[0] or t > tb[1] for t in ts)
        if not ok.any():
            span = f"{_fmt_time(available[0])} .. {_fmt_time(available[-1])}"
            train = f"training period {a.get('train_times')}" if tb is not None else "no stored training period"
            raise WeatherDataError(f"{ALL_VAL!r}: no init time of the data ({span}) has its {h} history state(s) and "
                                   f"{steps or 0} step(s) of {lead:g} h all outside the checkpoint's {train}; give "
                                   f"data covering the validation period, fewer --steps, or explicit init times")
        return np.flatnonzero(ok)
    out = []
    for s in init_times:
        like = available if available.size else np.array([], "datetime64[ns]")
        t = _as_time(s.strip() if isinstance(s, str) else s, like)
        k = float(_keys([t])[0])
        if k not in kset:
            near = _nearest(keys, available, k) if keys.size else "none"
            raise WeatherDataError(f"init time {_fmt_time(t)} is not a time of the data (matched exactly); the "
                                   f"nearest available times are {near}")
        if not have(k, back):
            first_ok = next((available[i] for i, kk in enumerate(keys) if have(kk, back)), None)
            raise WeatherDataError(
                f"init time {_fmt_time(t)} needs {h} history state(s) {lead:g} h apart ending there, which the data "
                f"lack; the first init time with a full history is "
                f"{_fmt_time(first_ok) if first_ok is not None else 'none'}")
        if need_truth and not have(k, fwd):
            raise WeatherDataError(f"init time {_fmt_time(t)}: the data do not hold all {steps} valid times up to "
                                   f"{_fmt_time(_shift(np.asarray([t]), fwd[-1])[0])}")
        out.append(kset[k])
    return np.asarray(out, dtype=np.int64)


# ----------------------------------------------------------------------------- initial states
class InitialStates(NamedTuple):
    """What :func:`initial_states` returns; ``history, forcings, mask, *_ = initial_states(...)``."""

    history: torch.Tensor
    """``(N, history, C, lat, lon)`` physical float32, model orientation, oldest first; NaN where missing."""
    forcings: Callable[[int], torch.Tensor]
    """``forcings(k)`` -> ``(N, S)`` scalars (``layout.scalars``) of step ``k``'s init time ``t + k * lead``."""
    mask: torch.Tensor
    """``(C, lat, lon)`` bool: the checkpoint's fixed missing-value mask (True = always missing)."""
    times: np.ndarray
    """The ``N`` init times (datetime64[ns] or cftime)."""
    static: torch.Tensor | None
    """``(S, lat, lon)`` standardised static fields (NaN filled with 0), or None."""
    static_valid: torch.Tensor | None
    """``(lat, lon)`` bool, False where a static field is missing, or None."""
    members: tuple = (None,)
    """The input members the states come from, ``(None,)`` when the data have no member dim.  With
    several (``member="all"`` or a list), ``history`` and ``times`` hold ``len(members)`` blocks of
    the ``N`` init times, member by member: row ``i * N + n`` is init ``n`` of member ``i``."""
    member_dim: str | None = None
    """The data's member dim (``number``, ``member``, ...), or None."""


def forcing_scalars(times, layout: Layout, hours: float = 0.0) -> torch.Tensor:
    """``(N, S)`` scalar conditions ``layout.scalars`` (``sin_time_of_day``, ``cos_day_of_year``, ...)
    of the times ``times + hours``, as the adapter computes them (raw sin/cos, not standardised)."""
    t = _shift(np.asarray(times), hours) if hours else np.asarray(times)
    if not layout.scalars:
        return torch.zeros((len(t), 0))
    fr = time_forcings(t)
    cols = []
    for name in layout.scalars:
        fn, _, what = name.partition("_")
        if fn not in ("sin", "cos") or what not in fr:
            raise WeatherDataError(f"unknown scalar condition {name!r} in the checkpoint layout; the weather forecast "
                                   f"knows sin_/cos_ of time_of_day and day_of_year")
        cols.append((np.sin if fn == "sin" else np.cos)(2 * np.pi * fr[what]))
    return torch.as_tensor(np.stack(cols, 1), dtype=torch.float32)


def _static_fields(files: Store, layout: Layout):
    a = layout.attrs
    names = list(a.get("static", []))
    if not names:
        return None, None
    arrs = [files.read_static(v) for v in names]
    x = _to_model(np.concatenate(arrs, 0), layout)
    if x.shape[0] != len(a.get("static_channels", [])):
        raise WeatherDataError(f"static fields {names} have {x.shape[0]} level(s) in the data, the checkpoint "
                               f"{len(a['static_channels'])} ({a['static_channels']})")
    m = np.asarray(a["static_mean"], np.float64)[:, None, None]
    s = np.asarray(a["static_std"], np.float64)[:, None, None]
    z = (x - m) / s
    valid = np.isfinite(z).all(0)
    return torch.as_tensor(np.nan_to_num(z, nan=0.0), dtype=torch.float32), torch.as_tensor(valid)


def _opts(options, **kw) -> dict:
    o = dict(options or {})
    for k, v in kw.items():
        if v is not None:
            o[k] = v
    return o


def initial_states(data, layout: Layout, init_times, *, steps: int | None = None, options: Mapping | None = None,
                   time_units: str | None = None, dims: Mapping[str, str] | None = None, member=None,
                   need_truth: bool = False) -> InitialStates:
    """Initial states of a forecast from data files (a file, a glob, a list) or an xarray Dataset.

    The data are checked against the checkpoint's grid, variables and levels
    (:func:`~diffkit_weather.store.check_grid`: a mismatch is an error naming both) and read with
    the adapter's coordinate logic; ``options`` is the run's ``data.options`` (its ``time_units``,
    ``dims``, ``member`` and ``val_slice`` are used; the keyword arguments override them).  For each
    init time ``t`` (see :func:`select_init_times`; ``"all-val"`` needs ``steps``) the history states
    ``t - (history - 1) * lead, ..., t`` are read in physical units and the model's orientation.

    **Members.**  On data with a member dim (``number``, ``member``, ``realization``, ...)
    ``member`` chooses the member(s) to start from: a member value, a list of them, or ``"all"``
    (one block of initial states per member, see :attr:`InitialStates.members`).  Without
    ``member`` the run's ``data.options.member`` applies when it names one member; with neither, a
    member dim with more than one member is an error asking for the choice.  Every member read is
    checked: ``+-inf`` anywhere, and NaN outside the checkpoint's fixed missing-value mask when the
    model was trained without missing values (no mask channel), are errors naming the member,
    channel and time.
    """
    layout = _check_layout(layout, "the layout")
    o = _opts(options, time_units=time_units, dims=dims)
    dims = o.get("dims")
    optional = member is None
    if member is None:
        member = o.get("member")
        if member is not None and not isinstance(member, str) and np.ndim(member) == 1:
            member = list(member)[0] if len(member) == 1 else None   # a run on several members: no choice
    check_grid(data, layout, dims=dims)
    a = layout.attrs
    files = _files_for(data, layout, time_units=o.get("time_units"), dims=dims, member=member,
                       statics=a.get("static", []), member_optional=optional)
    idx = select_init_times(files.times, layout, init_times, steps=steps, val_slice=o.get("val_slice"),
                            need_truth=need_truth)
    times = files.times[idx]
    h, lead = layout.autoregressive.history, layout.autoregressive.step
    N, C = len(idx), layout.num_channels
    keys = files.keys[idx]
    want = np.stack([keys - (h - 1 - j) * lead for j in range(h)], 1).round(6)  # (N, h)
    I = len(files.members)
    out = np.empty((I, N, h, C, *layout.shape), np.float32)
    fm = fixed_mask(layout)
    for i in range(I):
        c = 0
        for v in a["variables"]:
            arr = files.read(v, want.ravel(), i)                   # (N*h, L, lat, lon)
            L = arr.shape[1]
            if c + L <= C:
                out[i, :, :, c: c + L] = _to_model(arr, layout).reshape(N, h, L, *layout.shape)
            c += L
        if c != C:
            raise WeatherDataError(f"the data give {c} channels, the checkpoint has {C} "
                                   f"({', '.join(layout.channels)})")
        _check_finite(out[i], layout, fm, files, i, times, want)
    if fm.any():
        out[:, :, :, fm] = np.nan
    out = out.reshape(I * N, h, C, *layout.shape)
    static, valid = _static_fields(files, layout)
    times = np.concatenate([times] * I) if I > 1 else times
    return InitialStates(torch.from_numpy(out), lambda k: forcing_scalars(times, layout, k * lead),
                         torch.from_numpy(fm), times, static, valid, tuple(files.members), files.member_dim)


def _check_finite(x: np.ndarray, layout: Layout, fm: np.ndarray, files: Store, i: int, times, want) -> None:
    """Raise on ``+-inf`` in the initial states ``x`` ``(N, h, C, lat, lon)`` of member position ``i``, and on
    NaN outside the fixed mask when the model has no mask channel (it was trained without missing values)."""
    inf = np.isinf(x) & ~fm
    nan = np.isnan(x) & ~fm
    allow_nan = bool(int(layout.attrs.get("mask_channel", 0)))
    for what, bad in (("infinite values (+inf or -inf)", inf), ("NaN", None if allow_nan else nan)):
        if bad is None or not bad.any():
            continue
        n, j, c = (int(q[0]) for q in np.nonzero(bad.any(axis=(3, 4))))
        key = float(want[n, j])
        base = np.datetime64("1970-01-01", "ns")
        when = (_fmt_time(base + np.timedelta64(int(round(key * 3600e9)), "ns"))
                if np.issubdtype(np.asarray(times).dtype, np.datetime64) else files._fmt_keys([key]))
        who = files.member_label(i)
        fix = ("fix them, or set them to NaN where the model knows missing values" if what != "NaN" else
               "the model was trained without missing values (no mask channel): give complete initial states"
               + (" or choose another member" if who else ""))
        raise NonFiniteError(
            f"the initial state{' of ' + who if who else ''} ({files.names}) holds {what} at "
            f"{int(bad[n, j, c].sum())} grid point(s) of channel {layout.channels[c]!r} at {when} (init time "
            f"{_fmt_time(times[n])}{'' if what != 'NaN' else ', outside the checkpoint fixed missing-value mask'}; "
            f"{int(bad.sum())} value(s) in all); {fix}")


# ----------------------------------------------------------------------------- the forecast
def forecast(model, layout: Layout | None, history, init_times=None, steps: int = 1, members: int = 1, *,
             seed: int = 0, sampler: str | None = None, nfe: int | None = None, spacing: str | None = None,
             perturb: float | None = None, perturb_length=0.0, static=None, static_valid=None,
             generator: torch.Generator | None = None, progress: bool = False, config=None) -> torch.Tensor:
    """Roll a weather model out for ``steps`` steps of ``lead`` hours; returns physical values
    ``(N, members, steps, C, lat, lon)`` (float32, CPU, model orientation, NaN on the fixed mask).

    ``model``: a :class:`Forecaster`, Denoiser or Regressor; ``layout`` defaults to the model's.
    ``history``: ``(N, history, C, lat, lon)`` physical states (oldest first; NaN where missing), or
    the :class:`InitialStates` of :func:`initial_states` (then ``init_times`` and the static fields
    come from it).  ``init_times``: the ``N`` init times (datetime64 / cftime; needed when the model
    takes forcings).  Sampler, NFE and spacing default to the run's ``[sample]`` section.
    ``perturb``: see the module doc (None: 0 for diffusion, :data:`DEFAULT_PERTURB` for a regression
    model with ``members > 1``).  ``perturb_length``: the perturbations' correlation length in grid
    points (one number, or one per axis lat, lon; 0: white noise), as in :mod:`diffkit.rollout`.
    """
    if isinstance(model, Forecaster):
        config, model = model.config, model.model
    layout = _check_layout(layout if layout is not None else model.layout, "the layout")
    if isinstance(history, InitialStates):
        if init_times is None:
            init_times = history.times
        if static is None:
            static, static_valid = history.static, history.static_valid
        history = history.history
    a, spec = layout.attrs, layout.autoregressive
    h, C, lead = spec.history, layout.num_channels, spec.step
    history = torch.as_tensor(history)
    want = (h, C, *layout.shape)
    if history.ndim != 5 or tuple(history.shape[1:]) != want:
        raise ShapeError(f"history has shape {tuple(history.shape)}, expected (N, {', '.join(map(str, want))}): "
                         f"{h} state(s) of the {C} channels {', '.join(layout.channels)} on the "
                         f"{layout.shape[0]} x {layout.shape[1]} grid the model was trained on")
    if not isinstance(steps, int) or not isinstance(members, int) or steps < 1 or members < 1:
        raise ValueError(f"steps and members must be integers >= 1, got steps={steps!r}, members={members!r}")
    N = history.shape[0]
    fm = torch.from_numpy(fixed_mask(layout))
    mask_channel = bool(int(a.get("mask_channel", 0)))
    bad = ~torch.isfinite(history) & ~fm.to(history.device)
    if bool(bad.any()) and not mask_channel:
        raise NonFiniteError(f"the initial states hold NaN or inf at {int(bad.sum())} value(s) outside the "
                             f"checkpoint's fixed missing-value mask, and the model was trained without missing "
                             f"values (no mask channel); give complete initial states")
    times = None
    if layout.scalars:
        if init_times is None:
            raise ShapeError(f"the model is conditioned on the forcings {layout.scalars} of the init time; pass "
                             f"init_times (N times)")
        times = np.asarray(init_times)
        if times.shape != (N,):
            raise ShapeError(f"init_times has {times.size} time(s), the history {N} initial condition(s)")
    S = a.get("static_channels", [])
    if S:
        if static is None:
            raise ShapeError(f"the model is conditioned on the static fields {S}; pass static= (standardised, as "
                             f"from initial_states)")
        static = torch.as_tensor(static, dtype=torch.float32)
        if tuple(static.shape) != (len(S), *layout.shape):
            raise ShapeError(f"static has shape {tuple(static.shape)}, expected {(len(S), *layout.shape)}")
    sv = None if static_valid is None else torch.as_tensor(static_valid, dtype=torch.bool)

    def condition(k, hist, fields):
        """The adapter's conditioning of step ``k``: history, static fields, the mask channel; the
        forcings of the step's own init time ``t + k * lead``."""
        B, dev = fields.shape[0], fields.device
        parts = [fields]
        if S:
            parts.append(static.to(dev)[None].expand(B, -1, -1, -1))
        if mask_channel:
            valid = torch.isfinite(hist).all(1).all(1)
            if sv is not None:
                valid = valid & sv.to(dev)
            parts.append(valid.to(torch.float32)[:, None])
        sc = None
        if layout.scalars:
            sc = forcing_scalars(times, layout, k * lead).to(dev).repeat_interleave(B // N, 0)
        return Cond(fields=torch.cat(parts, 1), scalars=sc)

    return rollout(model, history, steps, members, condition=condition, perturb=perturb,
                   perturb_length=perturb_length, sampler=sampler, nfe=nfe,
                   spacing=spacing, config=config, generator=generator, seed=seed, layout=layout, fixed_mask=fm,
                   allow_missing=True, progress=progress, desc="forecast")


# ----------------------------------------------------------------------------- netCDF
def persistence(history, steps: int) -> torch.Tensor:
    """The persistence forecast ("nothing changes"), the trivial reference of WeatherBench 2: the
    latest input state at every lead, ``(N, 1, steps, C, lat, lon)`` like :func:`forecast`.

    ``history``: the :class:`InitialStates` of :func:`initial_states`, or its ``(N, history, C,
    lat, lon)`` tensor."""
    h = history.history if isinstance(history, InitialStates) else torch.as_tensor(history)
    if h.ndim != 5:
        raise ShapeError(f"history has shape {tuple(h.shape)}, expected (N, history, C, lat, lon)")
    if steps < 1:
        raise ValueError(f"steps must be >= 1, got {steps}")
    return h[:, -1][:, None, None].expand(-1, 1, steps, *h.shape[2:])
