"""Observations of PDE trajectories: synthetic observation files (``diffkit data pde ... --observe-from``)
and the PDE side of ``diffkit assimilate``.

An observation file (docs/observations.md) observes one trajectory: the gridded form has the
variables with dims ``(time, x[, y])`` and NaN where unobserved; the points form has ``x(obs)``
(``y(obs)``), ``time(obs)`` and the values ``u(obs)``, interpolated linearly (bilinearly in 2-D)
on the periodic grid.  ``time`` is the trajectory's time (the ``t`` of a file with jittered output
intervals, else ``time``), ``x`` the file's ``x`` coordinate (positions, or positions / L when the
trajectories have different lengths L) -- the coordinates the model was trained with.
"""
from __future__ import annotations

import math

import numpy as np

from diffkit.assimilate import Assimilation, GuidedRollout, analysis_attrs, ensemble_statistics, label_analysis
from diffkit.errors import ObservationError
from diffkit.observations import Axis, ObservationGrid, synthetic_observations

__all__ = ["PDEAssimilation", "observation_grid", "make_observations"]


def observation_grid(layout) -> ObservationGrid:
    """The :class:`~diffkit.observations.ObservationGrid` of a PDE surrogate's layout: its state variables,
    its spatial axes (periodic ones wrap modulo the domain length), times as numbers."""
    from .adapter import spec_from_layout

    spec = spec_from_layout(layout)
    axes = []
    for ax, n in zip(layout.spatial, layout.shape):
        c = np.asarray(layout.coords.get(ax, tuple(range(n))), dtype=np.float64)
        per = ax in layout.periodic
        period = abs(c[1] - c[0]) * n if per and n > 1 else None
        axes.append(Axis(ax, tuple(c), periodic=per, modulus=period))
    units = layout.attrs.get("units", {})
    return ObservationGrid(channels=tuple((v, {}) for v in spec.variables), axes=tuple(axes),
                           time_key=lambda t: np.asarray(t, dtype=np.float64),
                           units=dict(units) if isinstance(units, dict) else {})


def _trajectory_times(ds, index: int) -> np.ndarray:
    if "t" in ds and ds["t"].dims == ("trajectory", "time"):
        return np.asarray(ds["t"][index].values, dtype=np.float64)
    return np.asarray(ds["time"].values, dtype=np.float64)


def _frames(text: str | None, n: int) -> slice:
    if not text:
        return slice(None)
    try:
        parts = [int(p) if p.strip() else None for p in text.split(":")]
        if len(parts) == 1:
            return slice(parts[0], parts[0] + 1)
        return slice(*parts[:3])
    except ValueError:
        raise ObservationError(f"--obs-frames {text!r} is not a frame range; give START:STOP (e.g. 1:20) or one "
                               f"frame index") from None


def make_observations(truth, *, trajectory: int = 0, frames: str | None = None, variables=None,
                      fraction: float | None = None, stride: int | None = None, noise: float = 0.05,
                      absolute: bool = False, form: str = "grid", seed: int = 0, command: str = ""):
    """A synthetic observation dataset of trajectory ``trajectory`` of the file ``truth`` (see
    :func:`diffkit.observations.synthetic_observations` for ``fraction``/``stride``/``noise``/``form``;
    the climatological std is each variable's std over the whole file)."""
    from .adapter import open_trajectories, select_variables

    ds = open_trajectories(truth)
    names = select_variables(ds, variables, truth)
    ntraj = ds.sizes["trajectory"]
    if not 0 <= trajectory < ntraj:
        raise ObservationError(f"--obs-trajectory {trajectory} is out of range: {truth} has {ntraj} trajectories "
                               f"(0..{ntraj - 1})")
    sl = _frames(frames, ds.sizes["time"])
    times = _trajectory_times(ds, trajectory)[sl]
    if not times.size:
        raise ObservationError(f"--obs-frames {frames} selects no frame of the {ds.sizes['time']} in {truth}")
    spatial = tuple(ds[names[0]].dims[2:])
    vals = np.stack([np.asarray(ds[v][trajectory].values, dtype=np.float64)[sl] for v in names], 1)
    clim = [float(np.nanstd(np.asarray(ds[v].values, dtype=np.float64))) for v in names]
    axes = []
    for ax in spatial:
        c = np.asarray(ds[ax].values if ax in ds.coords else np.arange(ds.sizes[ax]), dtype=np.float64)
        axes.append(Axis(ax, tuple(c), periodic=True, modulus=abs(c[1] - c[0]) * c.size if c.size > 1 else None))
    var_attrs = {v: {k: ds[v].attrs[k] for k in ("units", "long_name", "standard_name") if k in ds[v].attrs}
                 for v in names}
    axis_attrs = {ax: {k: ds[ax].attrs[k] for k in ("units", "long_name", "axis") if ax in ds.coords
                       and k in ds[ax].attrs} for ax in spatial}
    out = synthetic_observations(vals, variables=[(v, {}) for v in names], axes=axes, time=times,
                                 time_attrs={"long_name": "time (nondimensional)", "units": "1"},
                                 var_attrs=var_attrs, axis_attrs=axis_attrs, fraction=fraction, stride=stride,
                                 noise=noise, absolute=absolute, form=form, seed=seed,
                                 clim_std=clim, attrs={"source_file": str(truth), "source_trajectory": int(trajectory),
                                                       "command": command})
    return out


def _start_for(times: np.ndarray, first: float, step: float, spec, path) -> int:
    """The first history frame such that the last one is one model step before ``first``."""
    h, fs = spec.history, spec.frame_step
    target = first - step
    j = int(np.argmin(np.abs(times - target)))
    if abs(times[j] - target) > 1e-6 * max(1.0, abs(step)):
        raise ObservationError(f"no frame of {path} at time {target:g}, one model step ({step:g}) before the first "
                               f"observation at {first:g}; give --start (the first history frame)")
    start = j - (h - 1) * fs
    if start < 0:
        raise ObservationError(f"the first observation is at time {first:g}, too early for a history of {h} frame(s) "
                               f"before it in {path} (frames from time {times[0]:g}); observe later frames "
                               f"(--obs-frames {h * fs}:) or give --start")
    return start


class PDEAssimilation(Assimilation):
    """``diffkit assimilate`` for PDE surrogates: the guided rollout from a trajectory of ``--init``,
    written as ``diffkit rollout`` writes (with the truth and its scores where the file has them)."""

    name = "pde"
    amortised = True

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--index", type=int, default=None,
                           help="trajectory of --init to start from (default: the observation file's "
                                "source_trajectory, else 0)")
        group.add_argument("--start", type=int, default=None,
                           help="first history frame (default: the last history frame one step before the first "
                                "observation)")

    @classmethod
    def grid(cls, layout) -> ObservationGrid:
        return observation_grid(layout)

    @classmethod
    def _index(cls, args) -> int:
        """``--index``, else the observation file's ``source_trajectory`` (:meth:`metadata`), else 0."""
        if args.index is not None:
            return args.index
        return int(cls.metadata(args.obs).get("source_trajectory", 0))

    @classmethod
    def run(cls, loaded, args, guide):
        if getattr(loaded.layout, "window", None) is not None:
            return _run_amortised(cls, loaded, args)
        from diffkit.adapters import atomic_to_netcdf
        from diffkit.calibrate import apply_spread_scale

        from .adapter import open_trajectories, spec_from_layout, upgrade_layout
        from .surrogate import initial_condition, rollout, rollout_dataset

        model = loaded.model
        model.layout = upgrade_layout(model.layout)
        layout = model.layout
        spec = spec_from_layout(layout)
        grid = cls.grid(layout)
        keys = cls.read_times(args.obs, grid)
        index = cls._index(args)
        start = args.start
        if start is None:
            ds = open_trajectories(args.init, lazy=True)
            if not 0 <= index < ds.sizes["trajectory"]:
                raise ObservationError(f"--index {index} is out of range: {args.init} has {ds.sizes['trajectory']} "
                                       f"trajectories (0..{ds.sizes['trajectory'] - 1})")
            times = _trajectory_times(ds, index)
            step = spec.step if spec.step is not None else float(times[spec.frame_step] - times[0])
            start = _start_for(times, float(keys[0]), step, spec, args.init)
        ic = initial_condition(args.init, layout, index=index, start=start)
        steps = args.steps if args.steps is not None else max(1, int(math.ceil((keys[-1] - ic.t0) / ic.dt - 1e-6)))
        window = ic.t0 + ic.dt * np.arange(1, steps + 1)
        obs = cls.read(args.obs, grid.with_window(window, 1e-6 * max(1.0, abs(ic.dt))))
        guided = GuidedRollout(model, {} if args.no_guidance else obs.steps, guide)
        pred = rollout(guided, ic.history, steps, members=args.members,
                       scalars=None if ic.scalars is None else ic.scalars[None], sampler=args.sampler, nfe=args.nfe,
                       seed=args.seed, progress=not args.no_progress, config=loaded.config)
        pred = apply_spread_scale(pred, args, member_dim=-(layout.ndim + 3))    # (members, steps, C, *S)
        lo, hi = obs.sigma_range()
        a = analysis_attrs(args, obs, loaded.config.sample, guide.method,
                           details={f"guidance_{k}": v for k, v in guide.options.items()},
                           init={"init_index": index, "init_start": start})
        ds = rollout_dataset(pred, layout, ic, attrs=a)
        _add_statistics(ds, spec.variables, prior=args.no_guidance)
        out = atomic_to_netcdf(ds, args.out)
        what = "prior ensemble (no guidance)" if args.no_guidance else f"analysis ({guide.method})"
        msg = (f"wrote the {what}: {args.members} member(s) x {steps} step(s) of trajectory {index} from frame "
               f"{start} to {out}; {obs.count} observation(s) at {len(obs.steps)} step(s) ({obs.form} form, "
               f"sigma_y {lo:g}..{hi:g})")
        return out, msg + _truth_summary(ds, args.init)


def _truth_summary(ds, init) -> str:
    """What the command adds to its summary where ``--init`` holds the truth of the window: the
    ensemble-mean RMSE (mean over steps) and each variable's calibration line (spread/skill, and the
    spread scale that would make it 1: the number ``--spread-scale`` takes, measured on validation runs)."""
    msg = ""
    if "ensemble_mean_rmse" in ds:
        r = np.asarray(ds["ensemble_mean_rmse"].values, dtype=float)
        if np.isfinite(r).any():
            msg += f"; ensemble-mean RMSE vs the truth in {init}: {np.nanmean(r):.4g} (mean over steps)"
    for k in sorted(ds.attrs):
        if k.startswith("calibration_"):
            msg += f"; {k[len('calibration_'):]}: {ds.attrs[k]}"
    return msg


def _add_statistics(ds, variables, *, prior: bool) -> None:
    """An analysis rollout's title / source and each variable's ensemble mean and spread (units, or "1")."""
    label_analysis(ds, prior=prior)
    for v in variables:
        da = ds[v]
        ds[f"{v}_ensemble_mean"], ds[f"{v}_ensemble_spread"] = ensemble_statistics(
            da, v, {"units": da.attrs.get("units", "1"), "long_name": v})


def add_observe_arguments(parser) -> None:
    """``--observe-from`` and the options of synthetic observations of ``diffkit data pde``."""
    from diffkit.observations import add_observe_arguments as common

    common(parser)
    parser.add_argument("--obs-trajectory", type=int, default=0, metavar="I",
                        help="with --observe-from: the trajectory to observe (default 0)")
    parser.add_argument("--obs-frames", default=None, metavar="START:STOP",
                        help="with --observe-from: the frames to observe (default all; e.g. 1:20 leaves frame 0, the "
                             "initial history, unobserved)")


def observe_requested(args) -> bool:
    from diffkit.observations import observe_requested as common

    return common(args)


def run_observe(args) -> int:
    """``diffkit data pde NAME --observe-from TRUTH.nc ... --out OBS.nc``."""
    import shlex

    from diffkit.observations import write_observations

    command = shlex.join(["diffkit", *getattr(args, "argv", ["data", "pde", args.pde])])
    variables = [v.strip() for v in args.obs_variables.split(",") if v.strip()] if args.obs_variables else None
    ds = make_observations(args.observe_from, trajectory=args.obs_trajectory, frames=args.obs_frames,
                           variables=variables, fraction=args.obs_fraction, stride=args.obs_stride,
                           noise=args.obs_noise, absolute=args.obs_noise_absolute, form=args.obs_form,
                           seed=args.seed, command=command)
    out = write_observations(ds, args.out, command)
    names = [v for v in ds.data_vars if not v.endswith("_sigma_y")]
    n = sum(int(np.isfinite(ds[v].values).sum()) for v in names)
    print(f"diffkit data pde: wrote {n} observation(s) of {', '.join(names)} (trajectory {args.obs_trajectory}, "
          f"{ds.sizes['time'] if 'time' in ds.dims else len(np.unique(ds['time'].values))} time(s), {args.obs_form} "
          f"form) of {args.observe_from} to {out}")
    return 0


def _run_amortised(cls, loaded, args):
    """``--method amortised`` with a window model trained with universal-amortised conditioning: the
    trajectory from the initial state (fully observed) over the window, every state conditioned on its
    gridded observations (:func:`diffkit.window.sample_trajectory`, autoregressive composition).
    A model trained with ``data.mask_noise`` gets each observation's sigma_y; one trained on exact
    observations takes them as exact (sigma_y is read and recorded, not used)."""
    import torch

    from diffkit.adapters import atomic_to_netcdf
    from diffkit.assimilate import amortised_conditions, check_window_method
    from diffkit.calibrate import apply_spread_scale
    from diffkit.window import sample_trajectory, state_layout

    from .adapter import open_trajectories, scalar_values
    from .surrogate import initial_condition, rollout_dataset

    layout = loaded.layout
    check_window_method(layout, args.method)
    ar = state_layout(layout)
    grid = cls.grid(ar)
    keys = cls.read_times(args.obs, grid)
    index = cls._index(args)
    ds = open_trajectories(args.init, lazy=True)
    if not 0 <= index < ds.sizes["trajectory"]:
        raise ObservationError(f"--index {index} is out of range: {args.init} has {ds.sizes['trajectory']} "
                               f"trajectories (0..{ds.sizes['trajectory'] - 1})")
    times = _trajectory_times(ds, index)
    spec = ar.autoregressive
    step = spec.step if spec.step is not None else float(times[spec.frame_step] - times[0])
    start = args.start if args.start is not None else _start_for(times, float(keys[0]), step, spec, args.init)
    ic = initial_condition(args.init, ar, index=index, start=start)
    steps = args.steps if args.steps is not None else max(1, int(math.ceil((keys[-1] - ic.t0) / ic.dt - 1e-6)))
    window = ic.t0 + ic.dt * np.arange(1, steps + 1)
    obs = cls.read(args.obs, grid.with_window(window, 1e-6 * max(1.0, abs(ic.dt))))
    L = 1 + steps
    cond = amortised_conditions(layout, args, obs, ic.history[-1], L)
    scal = None
    if layout.scalars:
        a = layout.attrs
        raw = torch.as_tensor(scalar_values(ds, layout.scalars, spec.frame_step, args.init)[index:index + 1],
                              dtype=torch.float32)
        scal = (raw - torch.as_tensor(a["scalar_mean"], dtype=torch.float32)) / torch.as_tensor(a["scalar_std"],
                                                                                                 dtype=torch.float32)
    sc = loaded.config.sample
    g = torch.Generator(device=next(loaded.model.parameters()).device).manual_seed(args.seed)
    method = "autoregressive" if L > layout.window.length else "sda"
    pred = sample_trajectory(loaded.model, cond.values, cond.mask, args.members, length=L, method=method,
                             sampler=args.sampler or sc.sampler, nfe=args.nfe or sc.nfe, generator=g, scalars=scal,
                             progress=not args.no_progress, sigma=cond.sigma)[0, :, 1:].to(torch.float32)
    pred = apply_spread_scale(pred, args)                                      # (members, steps, C, *S)
    a = analysis_attrs(args, obs, sc, "amortised", details={"amortised_note": cond.note, "composition": method},
                       init={"init_index": index, "init_start": start})
    out_ds = rollout_dataset(pred, ar, ic, attrs=a)
    _add_statistics(out_ds, ar.channels, prior=args.no_guidance)
    out = atomic_to_netcdf(out_ds, args.out)
    what = "prior ensemble (no observations)" if args.no_guidance else "analysis (amortised)"
    return out, (f"wrote the {what}: {args.members} member(s) x {steps} step(s) of trajectory {index} from frame "
                 f"{start} to {out}; {obs.count} observation(s) at {len(obs.steps)} step(s) {cond.how(obs)}"
                 + _truth_summary(out_ds, args.init))


#: what ``diffkit assimilate`` uses for checkpoints of the ``pde`` adapter (:func:`diffkit.assimilate.assimilation_for`)
ASSIMILATION = PDEAssimilation
