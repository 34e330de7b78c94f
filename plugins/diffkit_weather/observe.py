"""Weather observations: synthetic observation files (``diffkit data weather qg --observe-from``)
and the weather side of ``diffkit assimilate``.

An observation file (docs/observations.md) is gridded -- the truth file's variables with dims
``(time, [level,] latitude, longitude)`` and NaN where unobserved -- or station points:
``latitude(obs)``, ``longitude(obs)``, ``time(obs)`` (and ``level(obs)`` for variables with levels)
and the values, interpolated bilinearly on the model's lat-lon grid (across the seam where the
layout's axis is periodic; longitudes are taken modulo 360).  The analysis is written as
``diffkit forecast`` writes a forecast from the initial time (``member``, ``init_time``,
``lead_time``, ``valid_time``), plus ``{var}_ensemble_mean`` / ``{var}_ensemble_spread``, so
``diffkit evaluate`` scores it against the truth like a forecast.

With a window model trained with universal-amortised conditioning (``data.window = k``,
``data.amortised = true``) ``--method amortised`` samples the trajectory from the state at
``--init-time`` over the window, every state conditioned on its gridded observations
(:func:`diffkit.window.sample_trajectory`), and writes it the same way (:func:`_run_amortised`).
"""
from __future__ import annotations

import math

import numpy as np

from diffkit.assimilate import Assimilation, GuidedRollout, analysis_attrs, ensemble_statistics, label_analysis
from diffkit.errors import ObservationError
from diffkit.observations import Axis, ObservationGrid, synthetic_observations

__all__ = ["WeatherAssimilation", "observation_grid", "make_observations", "time_keys"]

_EPOCH = np.datetime64("1970-01-01T00:00:00", "ns")


def time_keys(times) -> np.ndarray:
    """Hours since 1970-01-01 of datetime64 or cftime values (the keys times are matched by)."""
    t = np.asarray(times)
    if np.issubdtype(t.dtype, np.datetime64):
        return (t.astype("datetime64[ns]") - _EPOCH) / np.timedelta64(1, "h")
    if t.dtype == object and t.size and hasattr(t.flat[0], "calendar"):
        import cftime

        return np.asarray(cftime.date2num(t.ravel(), "hours since 1970-01-01", t.flat[0].calendar),
                          dtype=np.float64).reshape(t.shape)
    return t.astype(np.float64)


def _fmt_key(k: float) -> str:
    t = _EPOCH + np.timedelta64(int(round(k * 3600e9)), "ns")
    return str(np.datetime_as_string(t, unit="m"))


def observation_grid(layout) -> ObservationGrid:
    """The :class:`~diffkit.observations.ObservationGrid` of a weather model's layout: each channel is a
    file variable at a level, the axes the model's latitude / longitude (model orientation; periodic
    where the layout says so; longitude modulo 360), times in hours since 1970."""
    a = layout.attrs
    chans = []
    for v in a["variables"]:
        levs = a.get("levels", {}).get(v) or []
        if levs:
            d = a.get("level_dims", {}).get(v, "level")
            chans += [(v, {d: float(l)}) for l in levs]
        else:
            chans.append((v, {}))
    if len(chans) != layout.num_channels:
        raise ObservationError(f"the checkpoint's variables and levels give {len(chans)} channels, its layout "
                               f"{layout.num_channels}; the checkpoint is inconsistent")
    lat, lon = a.get("lat_name", "latitude"), a.get("lon_name", "longitude")
    axes = (Axis(lat, layout.coords["latitude"], periodic="latitude" in layout.periodic),
            Axis(lon, layout.coords["longitude"], periodic="longitude" in layout.periodic, modulus=360.0))
    units = a.get("units", {}) if isinstance(a.get("units"), dict) else {}
    return ObservationGrid(channels=tuple(chans), axes=axes, time_key=time_keys, format_time=_fmt_key,
                           units={v: units.get(ch) for ch, (v, _) in zip(layout.channels, chans) if units.get(ch)})


def make_observations(truth, *, member=None, window: str | None = None, variables=None, fraction=None, stride=None,
                      noise: float = 0.05, absolute: bool = False, form: str = "grid", seed: int = 0,
                      command: str = ""):
    """A synthetic observation dataset of the weather file ``truth`` (one member; the times of ``window``,
    ``"START,END"`` ISO, inclusive, default all); see :func:`diffkit.observations.synthetic_observations`.
    The climatological std of a channel is its std over every time and grid point of the file."""
    import xarray as xr

    from .adapter import find_coords

    try:
        ds = xr.open_dataset(truth)
    except FileNotFoundError:
        raise ObservationError(f"truth file {truth} does not exist") from None
    r = find_coords(ds, truth)
    miss = [k for k in ("time", "latitude", "longitude") if k not in r]
    if miss:
        raise ObservationError(f"{truth} has no {', '.join(miss)} dim; give a gridded weather file")
    T, LA, LO, levs, M = r["time"], r["latitude"], r["longitude"], r.get("level", []), r.get("member")
    if M is not None:
        if member is None:
            if ds.sizes[M] > 1:
                raise ObservationError(f"{truth} has {ds.sizes[M]} members ({M!r}); choose the one to observe with "
                                       f"--obs-member VALUE")
            ds = ds.isel({M: 0})
        else:
            vals = np.asarray(ds[M].values) if M in ds.variables else np.arange(ds.sizes[M])
            hit = [i for i, x in enumerate(vals) if str(x) == str(member)]
            if not hit:
                raise ObservationError(f"--obs-member {member} is not a member of {truth} ({M}: {', '.join(map(str, vals))})")
            ds = ds.isel({M: hit[0]})
    avail = [v for v in ds.data_vars if {T, LA, LO} <= set(ds[v].dims)]
    names = avail if variables is None else list(variables)
    bad = [v for v in names if v not in avail]
    if bad or not names:
        raise ObservationError(f"--obs-variables: {', '.join(bad) or '(none)'} not in {truth}; its gridded variables "
                               f"are {', '.join(avail)}")
    if window:
        parts = [p.strip() for p in str(window).split(",")]
        if len(parts) != 2:
            raise ObservationError(f"--obs-window {window!r}: give START,END (ISO times, inclusive)")
        try:
            lo, hi = (time_keys(np.array([np.datetime64(p, "ns")]))[0] for p in parts)
        except ValueError:
            raise ObservationError(f"--obs-window {window!r}: not ISO times (e.g. 2000-01-02T00:00)") from None
        k = time_keys(ds[T].values)
        ds = ds.isel({T: np.flatnonzero((k >= lo - 1e-6) & (k <= hi + 1e-6))})
        if not ds.sizes[T]:
            raise ObservationError(f"--obs-window {window} holds no time of {truth}")
    chans, arrs, clim, extra = [], [], [], {}
    for v in names:
        da = ds[v]
        lv = [d for d in da.dims if d in levs]
        other = [d for d in da.dims if d not in (T, LA, LO, *lv)]
        if other or len(lv) > 1:
            raise ObservationError(f"variable {v!r} of {truth} has the dims {tuple(da.dims)}; observe variables with "
                                   f"(time, [level,] latitude, longitude) (--obs-variables)")
        a = np.asarray(da.transpose(T, *lv, LA, LO).values, dtype=np.float64)
        if lv:
            d = lv[0]
            extra[d] = (np.asarray(ds[d].values, dtype=np.float64), {k: ds[d].attrs[k] for k in ds[d].attrs
                                                                      if k in ("units", "long_name", "positive",
                                                                               "standard_name", "axis")})
            for i, l in enumerate(extra[d][0]):
                chans.append((v, {d: float(l)}))
                arrs.append(a[:, i])
                clim.append(float(np.nanstd(a[:, i])))
        else:
            chans.append((v, {}))
            arrs.append(a)
            clim.append(float(np.nanstd(a)))
    per = str(ds.attrs.get("periodic_axes", "")).replace(",", " ").split()
    lon = np.asarray(ds[LO].values, dtype=np.float64)
    lon_per = "longitude" in per or (lon.size > 1 and math.isclose(abs(lon[1] - lon[0]) * lon.size, 360.0))
    axes = [Axis(LA, tuple(np.asarray(ds[LA].values, dtype=np.float64)), periodic="latitude" in per),
            Axis(LO, tuple(lon), periodic=lon_per, modulus=360.0)]
    keep = ("units", "long_name", "standard_name")
    return synthetic_observations(
        np.stack(arrs, 1), variables=chans, axes=axes, time=np.asarray(ds[T].values),
        time_attrs={"standard_name": "time", "long_name": "time"}, extra_coords=extra,
        var_attrs={v: {k: ds[v].attrs[k] for k in keep if k in ds[v].attrs} for v in names},
        axis_attrs={ax: {k: ds[ax].attrs[k] for k in ("units", "long_name", "standard_name", "axis")
                         if k in ds[ax].attrs} for ax in (LA, LO)},
        fraction=fraction, stride=stride, noise=noise, absolute=absolute, form=form, seed=seed, clim_std=clim,
        attrs={"source_file": str(truth), "command": command, **({"periodic_axes": " ".join(per)} if per else {})})


class WeatherAssimilation(Assimilation):
    """``diffkit assimilate`` for weather models: the guided forecast from ``--init-time`` (default one
    lead before the first observation) over the observation window, written as a forecast."""

    name = "weather"
    amortised = True

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--init-time", default=None, metavar="TIME",
                           help="the initial time (ISO); default one model step before the first observation")

    @classmethod
    def grid(cls, layout) -> ObservationGrid:
        return observation_grid(layout)

    @classmethod
    def run(cls, loaded, args, guide):
        if getattr(loaded.layout, "window", None) is not None:
            return _run_amortised(cls, loaded, args)
        from diffkit.adapters import atomic_to_netcdf
        from diffkit.calibrate import apply_spread_scale

        from .forecast import forecast, forecast_dataset, initial_states, load_forecaster

        fc = load_forecaster(args.checkpoint, device=next(loaded.model.parameters()).device)
        layout = fc.layout
        grid = cls.grid(layout)
        keys = cls.read_times(args.obs, grid)
        lead = float(layout.autoregressive.step)
        init = args.init_time or _fmt_key(float(keys[0]) - lead)
        opts = fc.data_options
        ist = initial_states(args.init, layout, init, options=opts)
        t0 = float(time_keys(ist.times)[0])
        steps = args.steps if args.steps is not None else max(1, int(math.ceil((keys[-1] - t0) / lead - 1e-6)))
        window = t0 + lead * np.arange(1, steps + 1)
        obs = cls.read(args.obs, grid.with_window(window, 1e-3))
        guided = GuidedRollout(fc.model, {} if args.no_guidance else obs.steps, guide)
        pred = forecast(guided, None, ist, steps=steps, members=args.members, seed=args.seed, sampler=args.sampler,
                        nfe=args.nfe, progress=not args.no_progress, config=fc.config)
        pred = apply_spread_scale(pred, args, member_dim=1)                     # (N, M, K, C, lat, lon)
        lo, hi = obs.sigma_range()
        attrs = analysis_attrs(args, obs, fc.config.sample, guide.method,
                               details={f"guidance_{k}": v for k, v in guide.options.items()},
                               init={"objective": "diffusion"})
        ds = forecast_dataset(pred, layout, ist.times, attrs=attrs, options=opts)
        _add_statistics(ds, prior=args.no_guidance)
        out = atomic_to_netcdf(ds, args.out)
        what = "prior ensemble (no guidance)" if args.no_guidance else f"analysis ({guide.method})"
        return out, (f"wrote the {what}: {args.members} member(s) x {steps} step(s) of {lead:g} h from {init} to "
                     f"{out}; {obs.count} observation(s) at {len(obs.steps)} step(s) ({obs.form} form, sigma_y "
                     f"{lo:g}..{hi:g}); score it with diffkit evaluate {out} --truth TRUTH.nc")


def _add_statistics(ds, *, prior: bool) -> None:
    """An analysis forecast's title / source and each variable's ensemble mean and spread (the variable's
    units and ``_FillValue``)."""
    label_analysis(ds, prior=prior)
    for v in list(ds.data_vars):
        da = ds[v]
        ds[f"{v}_ensemble_mean"], ds[f"{v}_ensemble_spread"] = ensemble_statistics(da, v, da.attrs, keep_attrs=False)
        for s in ("_ensemble_mean", "_ensemble_spread"):
            ds[v + s].encoding["_FillValue"] = da.encoding.get("_FillValue")


def _run_amortised(cls, loaded, args):
    """``--method amortised`` with a window model of ``k`` states trained with universal-amortised
    conditioning: the trajectory from the state at ``--init-time`` (fully observed, state 0) over the
    window, every state conditioned on its gridded observations (:func:`diffkit.window.sample_trajectory`:
    SDA composition for ``L <= k`` states, autoregressive windows beyond, each window with the forcings of
    its own time), written as the guided forecast is.  A model trained with ``data.mask_noise`` gets each
    observation's sigma_y; one trained on exact observations takes them as exact (sigma_y is read and
    recorded, not used)."""
    import torch

    from diffkit.adapters import atomic_to_netcdf
    from diffkit.assimilate import amortised_conditions, check_window_method
    from diffkit.calibrate import apply_spread_scale
    from diffkit.window import sample_trajectory, state_layout

    from .forecast import forcing_scalars, forecast_dataset, initial_states

    layout = loaded.layout
    k = layout.window.length
    check_window_method(layout, args.method)
    ar = state_layout(layout)
    grid = cls.grid(ar)
    keys = cls.read_times(args.obs, grid)
    lead = float(ar.autoregressive.step)
    init = args.init_time or _fmt_key(float(keys[0]) - lead)
    opts = dict(loaded.config.data.options)
    ist = initial_states(args.init, ar, init, options=opts)
    if len(ist.times) != 1:
        raise ObservationError(f"--init-time {init} selects {len(ist.times)} initial states of {args.init}; a window "
                               f"model's trajectory starts from one: give one ISO time")
    x0 = ist.history[0, -1]
    if not bool(torch.isfinite(x0).all()):
        raise ObservationError(f"the state at {init} in {args.init} holds {int((~torch.isfinite(x0)).sum())} NaN "
                               f"value(s); a window model starts from a complete state: choose another --init-time")
    t0 = float(time_keys(ist.times)[0])
    steps = args.steps if args.steps is not None else max(1, int(math.ceil((keys[-1] - t0) / lead - 1e-6)))
    window = t0 + lead * np.arange(1, steps + 1)
    obs = cls.read(args.obs, grid.with_window(window, 1e-3))
    L = max(1 + steps, k)            # a window shorter than the model's is sampled whole, its first states kept
    method = "autoregressive" if L > k else "sda"
    scal = None
    if ar.scalars:  # the adapter's forcings of a window are those of its latest history state, state k - 2
        scal = torch.stack([forcing_scalars(ist.times, ar, (s + k - 2) * lead) for s in range(L - k + 1)], 1)
    cond = amortised_conditions(layout, args, obs, x0, L, hint=" (diffkit data weather qg ... --observe-from TRUTH "
                                                              "--obs-form grid)")
    fields = ist.static[None] if ar.attrs.get("static_channels") else None
    sc = loaded.config.sample
    g = torch.Generator(device=next(loaded.model.parameters()).device).manual_seed(args.seed)
    pred = sample_trajectory(loaded.model, cond.values, cond.mask, args.members, length=L, method=method,
                             sampler=args.sampler or sc.sampler, nfe=args.nfe or sc.nfe, generator=g, fields=fields,
                             scalars=scal, progress=not args.no_progress,
                             sigma=cond.sigma)[:, :, 1:1 + steps].to("cpu", torch.float32)
    pred = apply_spread_scale(pred, args, member_dim=1)                         # (1, M, K, C, lat, lon)
    attrs = analysis_attrs(args, obs, sc, "amortised",
                           details={"amortised_note": cond.note, "composition": method, "window_states": k},
                           init={"objective": "diffusion"})
    ds = forecast_dataset(pred, ar, ist.times, attrs=attrs, options=opts)
    _add_statistics(ds, prior=args.no_guidance)
    out = atomic_to_netcdf(ds, args.out)
    what = "prior ensemble (no observations)" if args.no_guidance else "analysis (amortised)"
    return out, (f"wrote the {what}: {args.members} member(s) x {steps} step(s) of {lead:g} h from {init} to {out}; "
                 f"{obs.count} observation(s) at {len(obs.steps)} step(s) {cond.how(obs)}; score it with diffkit evaluate {out} "
                 f"--truth TRUTH.nc")


def add_observe_arguments(parser) -> None:
    """``--observe-from`` and the options of synthetic observations of ``diffkit data weather qg``."""
    from diffkit.observations import add_observe_arguments as common

    common(parser)
    parser.add_argument("--obs-member", default=None, metavar="VALUE",
                        help="with --observe-from: the member of the truth file to observe (needed when it has several)")
    parser.add_argument("--obs-window", default=None, metavar="START,END",
                        help="with --observe-from: the times to observe (ISO, inclusive; default all)")


def observe_requested(args) -> bool:
    from diffkit.observations import observe_requested as common

    return common(args)


def run_observe(args) -> int:
    """``diffkit data weather qg --observe-from TRUTH.nc ... --out OBS.nc``."""
    import shlex

    from diffkit.observations import write_observations

    command = shlex.join(["diffkit", *getattr(args, "argv", ["data", "weather", "qg"])])
    variables = [v.strip() for v in args.obs_variables.split(",") if v.strip()] if args.obs_variables else None
    ds = make_observations(args.observe_from, member=args.obs_member, window=args.obs_window, variables=variables,
                           fraction=args.obs_fraction, stride=args.obs_stride, noise=args.obs_noise,
                           absolute=args.obs_noise_absolute, form=args.obs_form, seed=args.seed, command=command)
    out = write_observations(ds, args.out, command)
    names = [v for v in ds.data_vars if not v.endswith("_sigma_y")]
    n = sum(int(np.isfinite(ds[v].values).sum()) for v in names)
    nt = ds.sizes["time"] if "time" in ds.dims else len(np.unique(ds["time"].values))
    print(f"diffkit data weather: wrote {n} observation(s) of {', '.join(names)} ({nt} time(s), {args.obs_form} form) "
          f"of {args.observe_from} to {out}")
    return 0


#: what ``diffkit assimilate`` uses for checkpoints of the ``weather`` adapter (:func:`diffkit.assimilate.assimilation_for`)
ASSIMILATION = WeatherAssimilation
