"""Weather outputs as CF netCDF, on the data file's grid: :func:`unstack` puts model tensors back
onto the file's variables, levels and coordinates (original names, attributes, units, order and
orientation; NaN on the layout's fixed missing-value mask, stored run-length encoded by the
adapter, :func:`fixed_mask`); :func:`write_samples` (the adapter's ``decode``) and
:func:`forecast_dataset` / :func:`member_dataset` (``diffkit forecast``) build their datasets
from it and finish them alike (:func:`cf_metadata`, the file's ``_FillValue``).
:func:`upgrade_layout` reads the layouts of old weather checkpoints."""
from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any, Mapping, Sequence

import numpy as np
import torch

from diffkit.adapters import CF_COORDINATE_ATTRS, atomic_to_netcdf, cf_attrs, cf_output, command_of
from diffkit.errors import ShapeError
from diffkit.layout import AutoregressiveSpec, Layout

from ._common import ADAPTER, WeatherDataError, _fmt_level, _plain
from .cf import _shift
from .store import ALL_MEMBERS

if TYPE_CHECKING:
    from .forecast import InitialStates


#: CF attributes of a latitude / longitude the adapter recognised: every output carries them, whatever the input had
CF_LATITUDE = {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"}
CF_LONGITUDE = {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"}


def cf_grid_attrs(role: str, file_attrs: Mapping) -> dict:
    """CF attributes of the recognised ``"latitude"`` or ``"longitude"`` dim whose coordinate variable
    has ``file_attrs``: :data:`CF_LATITUDE` / :data:`CF_LONGITUDE` (``units``, ``standard_name`` and
    ``axis`` always; the file's ``long_name`` if it has one).  A rotated-pole ``grid_latitude`` /
    ``grid_longitude`` keeps its standard name, in ``degrees``."""
    ref = dict(CF_LATITUDE if role == "latitude" else CF_LONGITUDE)
    sn = str(file_attrs.get("standard_name", "")).strip().lower()
    if sn == f"grid_{role}":
        ref.update(standard_name=sn, units="degrees", long_name=f"{role} in the rotated grid")
    ln = str(file_attrs.get("long_name", "")).strip()
    return {**ref, **({"long_name": ln} if ln else {})}


def cf_metadata(ds, layout: Layout, *, title: str, command: str):
    """The CF metadata of a weather output ``ds`` (:func:`unstack`'s variables and coordinates,
    ``ds.attrs`` diffkit's own global attributes), set in place and returned: latitude and longitude
    get the layout's ``coord_attrs`` (:func:`cf_grid_attrs` for a layout without them); levels and
    variables keep only the CF attributes of the data file (:data:`diffkit.adapters.CF_COORDINATE_ATTRS`,
    :data:`~diffkit.adapters.CF_VARIABLE_ATTRS`: no ``GRIB_*`` or other input-specific ones) and the
    layout's ``channel_attrs``; of the file's global attributes only ``history`` is carried, extended by
    a line naming ``command`` (:func:`diffkit.adapters.cf_output`)."""
    a = layout.attrs
    for role, name, fa in (("latitude", a["lat_name"], a.get("lat_attrs", {})),
                           ("longitude", a["lon_name"], a.get("lon_attrs", {}))):
        if name in ds.variables:
            ds[name].attrs = dict(layout.coord_attrs.get(role) or cf_grid_attrs(role, fa))
    for v, ld in a.get("level_dims", {}).items():
        if ld in ds.variables:
            ds[ld].attrs = cf_attrs(ds[ld].attrs, CF_COORDINATE_ATTRS)
    for v in ds.data_vars:
        lv = a.get("levels", {}).get(v)
        first = f"{v}@{_fmt_level(lv[0])}" if lv else str(v)   # the variable's (first) channel
        ds[v].attrs = {**cf_attrs(ds[v].attrs), **layout.channel_attrs.get(first, {})}
    history = a.get("global_attrs", {}).get("history")
    return cf_output(ds, title=title, command=command, history=history)


def _rle(mask: np.ndarray) -> list[int]:
    """Run lengths of a flattened boolean mask, starting with a run of False."""
    f = mask.ravel().astype(np.int8)
    change = np.flatnonzero(np.diff(f)) + 1
    bounds = np.concatenate([[0], change, [f.size]])
    runs = np.diff(bounds).tolist()
    return ([0] + runs) if f[0] else runs


def _unrle(runs: Sequence[int], shape) -> np.ndarray:
    v = np.zeros(int(np.prod(shape)), bool)
    pos, on = 0, False
    for r in runs:
        if on:
            v[pos: pos + r] = True
        pos += r
        on = not on
    return v.reshape(shape)


def fixed_mask(layout: Layout) -> np.ndarray:
    """The ``(C, lat, lon)`` fixed missing-value mask (model orientation) stored in the layout."""
    fm = layout.attrs.get("fixed_mask", {})
    return np.stack([_unrle(fm[c], layout.shape) if c in fm else np.zeros(layout.shape, bool) for c in layout.channels])


def shared_levels(layout: Layout) -> dict[str, list[float]]:
    """``{level dim: values}`` of the level coordinates of the layout's outputs: the union of the
    levels of the variables on each level dim.  A dim whose variables share one list keeps it as it
    is (the order chosen); otherwise the union is sorted in the data file's direction (layouts
    written before it was recorded: descending if the variables' lists of two or more levels all
    descend, else ascending), and each variable is NaN at the levels it lacks."""
    a = layout.attrs
    per: dict[str, list[list[float]]] = {}
    for v in a["variables"]:
        lv = a.get("levels", {}).get(v)
        if lv:
            per.setdefault(a["level_dims"][v], []).append([float(l) for l in lv])
    out = {}
    for ld, lists in per.items():
        if all(l == lists[0] for l in lists):
            out[ld] = lists[0]
            continue
        desc = a.get("level_descending", {}).get(ld)
        if desc is None:
            runs = [np.diff(l) for l in lists if len(l) > 1]
            desc = bool(runs) and all((d < 0).all() for d in runs)
        out[ld] = sorted({l for ls in lists for l in ls}, reverse=desc)
    return out


def unstack(x, layout: Layout, *, dim: str = "sample", values=None):
    """Physical-unit tensors back onto the file's grid as an :class:`xarray.Dataset`.

    ``x`` is ``(C, lat, lon)`` or ``(N, C, lat, lon)`` in the model's orientation (de-normalised:
    ``layout.denormalize``); the result has the original variable names, attributes, units, level
    coordinates and latitude/longitude values in the file's order and convention, with a leading
    ``dim`` (``"sample"``, coordinate ``values`` if given, e.g. times) for 4-D input.  Points of the
    layout's fixed mask are NaN.  Variables that share a level dim but not their levels (``levels =
    {z = [500], t = [850]}``) share the union of their levels (:func:`shared_levels`), each variable
    NaN at the levels it was not trained on -- as ``xarray.merge`` of the per-variable selections.
    """
    import xarray as xr

    a = layout.attrs
    if a.get("adapter") != ADAPTER:
        raise WeatherDataError(f"this layout was not made by the weather adapter (adapter {a.get('adapter')!r}); "
                               f"unstack needs a model trained with data.adapter = \"weather\"")
    x = np.asarray(torch.as_tensor(x).detach().cpu().double().numpy() if torch.is_tensor(x) else x, dtype=np.float64)
    single = x.ndim == 3
    if single:
        x = x[None]
    if x.ndim != 4 or tuple(x.shape[1:]) != tuple(layout.sample_shape):
        raise WeatherDataError(f"unstack needs (C, lat, lon) or (N, C, lat, lon) = (N, {layout.sample_shape}); got "
                               f"{tuple(x.shape)}")
    x = x.copy()
    fm = fixed_mask(layout)
    if fm.any():
        x[:, fm] = np.nan
    if a.get("lat_flipped"):
        x = x[..., ::-1, :]
    if a.get("lon_flipped"):
        x = x[..., ::-1]
    latn, lonn = a["lat_name"], a["lon_name"]
    cdt = a.get("coord_dtypes", {})
    cval = lambda name, v: np.asarray(v, dtype=cdt.get(name, "float64"))
    coords: dict[str, Any] = {
        latn: (latn, cval(latn, a["lat_values"]), dict(a.get("lat_attrs", {}))),
        lonn: (lonn, cval(lonn, a["lon_values"]), dict(a.get("lon_attrs", {}))),
    }
    if not single:
        coords[dim] = (dim, np.arange(x.shape[0]) if values is None else np.asarray(values))
    data_vars = {}
    c = 0
    chans = list(layout.channels)
    shared = shared_levels(layout)
    for v in a["variables"]:
        lv = a.get("levels", {}).get(v)
        n = len(lv) if lv else 1
        block = x[:, c: c + n]
        expect = [f"{v}@{_fmt_level(l)}" for l in lv] if lv else [v]
        if chans[c: c + n] != expect:
            raise WeatherDataError(f"layout channels {chans[c: c + n]} do not match variable {v!r} {expect}")
        c += n
        vd = list(a["var_dims"][v])
        if lv:
            ld = a["level_dims"][v]
            union = shared[ld]
            if ld not in coords:
                coords[ld] = (ld, cval(ld, union), dict(a.get("level_attrs", {}).get(v, {})))
            if list(lv) != union:     # each value at its own level of the shared dim, NaN at the others
                pos = [union.index(float(l)) for l in lv]
                full = np.full((block.shape[0], len(union), *block.shape[2:]), np.nan)
                full[:, pos] = block
                block = full
            src = [ld, latn, lonn]
        else:
            block = block[:, 0]
            src = [latn, lonn]
        perm = [src.index(d) + 1 for d in vd]
        block = np.transpose(block, [0] + perm)
        dt = np.dtype(a.get("dtypes", {}).get(v, "float32"))
        arr = block.astype(dt)
        dims = vd
        if single:
            arr = arr[0]
        else:
            dims = [dim] + vd
        data_vars[v] = (dims, arr, dict(a.get("var_attrs", {}).get(v, {})))
    gattrs = {k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in a.get("global_attrs", {}).items()}
    gattrs.setdefault("Conventions", "CF-1.8")
    gattrs["source"] = (gattrs.get("source", "") + " | diffkit weather adapter").strip(" |")
    return xr.Dataset(data_vars, coords=coords, attrs=gattrs)


def next_state(x: torch.Tensor, fields: torch.Tensor, layout: Layout) -> torch.Tensor:
    """Physical next state ``(B, C, lat, lon)`` from standardised samples ``x`` and the item's
    ``fields`` (``(B, cond, lat, lon)``): the sample itself for ``target="state"``, the latest input
    state plus the increment for ``target="residual"``
    (:meth:`diffkit.layout.AutoregressiveSpec.state_from`, as in :func:`diffkit.rollout.rollout`)."""
    spec = upgrade_layout(layout).autoregressive
    C, h = spec.num_variables, spec.history
    last = spec.destandardize(fields[:, (h - 1) * C: h * C], 2)
    return spec.state_from(last, layout.denormalize(x))


#: the keys of ``Layout.attrs`` that old weather checkpoints (before ``Layout.autoregressive``) held
_LEGACY = ("history", "lead_hours", "target", "state_mean", "state_std")


def upgrade_layout(layout: Layout) -> Layout:
    """A weather layout with its autoregressive spec: itself if it has one, else the spec read from
    the attrs of a checkpoint written before the spec was typed (``history``, ``lead_hours``,
    ``target``, ``state_mean``/``state_std``; the state channels are ``attrs["channels"]``), those
    keys removed from ``attrs``."""
    if layout.autoregressive is not None or layout.attrs.get("adapter") != ADAPTER:
        return layout
    a = layout.attrs
    try:
        spec = AutoregressiveSpec.from_legacy_attrs(a, variables=a.get("channels", layout.channels),
                                                    step=a.get("lead_hours"), step_units="hours")
    except ValueError as e:
        raise WeatherDataError(f"cannot read this old weather checkpoint's layout: {e}") from None
    return layout.replace(autoregressive=spec, attrs={k: v for k, v in a.items() if k not in _LEGACY})


def _check_layout(layout: Layout, where: str = "the checkpoint") -> Layout:
    """The weather layout with its autoregressive spec (an old checkpoint's converted), or an error."""
    if layout.attrs.get("adapter") != ADAPTER:
        raise WeatherDataError(f"{where} was not trained on the weather adapter (its layout comes from adapter "
                               f"{layout.attrs.get('adapter')!r}); forecast needs data.adapter = \"weather\"")
    return upgrade_layout(layout)


def _output(ds, layout: Layout, *, title: str, command: str):
    """A weather output dataset finished for writing: each variable's ``_FillValue`` that of the data
    file (none where it had none), and :func:`cf_metadata`."""
    a = layout.attrs
    for v in ds.data_vars:
        fv = a.get("fill_values", {}).get(v)
        ds[v].encoding["_FillValue"] = np.dtype(ds[v].dtype).type(fv) if fv is not None else None
    return cf_metadata(ds, layout, title=title, command=command)


def write_samples(x, layout: Layout, path, *, attrs: Mapping | None = None) -> Path:
    """Write standardised samples ``(N, C, lat, lon)`` as CF netCDF with the file's variable names,
    units, levels and coordinates (original order and convention), atomically; the CF metadata is
    that of :func:`cf_metadata` (``attrs["command"]``, the command line, names the history line).

    With ``target = "residual"`` the samples are increments over ``lead_hours`` (global attribute
    ``target = "residual"``); add them to the initial state for a forecast.
    """
    x = torch.as_tensor(x).detach().float().cpu()
    if x.ndim == len(layout.sample_shape):
        x = x[None]
    layout.check(x, "samples")
    ds = unstack(layout.denormalize(x), layout)
    spec = upgrade_layout(layout).autoregressive
    ds.attrs = {"target": spec.target if spec is not None else "state",
                "lead_hours": spec.step if spec is not None and spec.step is not None else float("nan")}
    ds.attrs.update({k: (v if isinstance(v, (int, float)) else str(v)) for k, v in (attrs or {}).items()})
    ds = _output(ds, layout, title="diffkit samples", command=command_of(attrs, "diffkit: samples"))
    return atomic_to_netcdf(ds, path)


# ----------------------------------------------------------------------------- forecasts
def _jsonable(v):
    try:
        json.dumps(v)
        return v
    except TypeError:
        return str(v)


def forecast_dataset(pred, layout: Layout, init_times, *, attrs: Mapping | None = None, options: Mapping | None = None):
    """CF :class:`xarray.Dataset` of a forecast ``(N, M, K, C, lat, lon)`` (physical, model orientation).

    Dims ``(member, init_time, lead_time, [level,] latitude, longitude)`` -- the variables, level and
    grid dims keep the data file's names, attributes, units, dtypes and orientation
    (:func:`unstack`); ``lead_time`` is a timedelta
    (``forecast_period``), ``valid_time(init_time, lead_time)`` a 2-D coordinate.  ``options`` (the
    run's ``data.options``) records ``time_units``/``dims``/``member`` so that ``evaluate`` reads the
    truth files the same way; ``attrs`` become global attributes.
    """
    import xarray as xr

    pred = torch.as_tensor(pred).detach().float().cpu()
    if pred.ndim != 6 or tuple(pred.shape[3:]) != tuple(layout.sample_shape):
        raise ShapeError(f"forecast has shape {tuple(pred.shape)}, expected (N, M, K, "
                         f"{', '.join(map(str, layout.sample_shape))})")
    N, M, K = pred.shape[:3]
    init_times = np.asarray(init_times)
    if init_times.shape != (N,):
        raise ShapeError(f"{init_times.size} init time(s) for {N} initial condition(s)")
    spec = _check_layout(layout, "the layout").autoregressive
    lead_h = spec.step
    flat = pred.permute(1, 0, 2, 3, 4, 5).reshape(M * N * K, *layout.sample_shape)
    tpl = unstack(flat, layout, dim="sample")
    leads = (np.arange(1, K + 1) * np.int64(round(lead_h * 3600e9))).astype("timedelta64[ns]")
    if np.issubdtype(init_times.dtype, np.datetime64):
        init_times = init_times.astype("datetime64[ns]")
        valid = init_times[:, None] + leads[None, :]
    else:
        valid = np.stack([_shift(init_times, lead_h * k) for k in range(1, K + 1)], 1)
    coords = {k: v for k, v in tpl.coords.items() if k != "sample"}
    coords["member"] = ("member", np.arange(M, dtype=np.int32),
                        {"standard_name": "realization", "long_name": "ensemble member", "units": "1"})
    coords["init_time"] = ("init_time", init_times, {"standard_name": "forecast_reference_time",
                                                     "long_name": "initialisation time of the forecast"})
    coords["lead_time"] = ("lead_time", leads, {"standard_name": "forecast_period", "long_name": "lead time"})
    coords["valid_time"] = (("init_time", "lead_time"), valid, {"standard_name": "time", "long_name": "valid time"})
    dv = {}
    for v in tpl.data_vars:
        da = tpl[v]
        arr = da.values.reshape(M, N, K, *da.shape[1:])
        dv[v] = (("member", "init_time", "lead_time", *da.dims[1:]), arr, dict(da.attrs))
    # the data file's global attributes are not copied: cf_metadata extends its history only
    gattrs = {"source": "diffkit forecast", "lead_hours": lead_h, "members": int(M), "steps": int(K),
              "history_states": spec.history, "target": spec.target}
    o = {k: v for k, v in dict(options or {}).items() if k in ("time_units", "dims", "member") and v is not None}
    gattrs["diffkit_data_options"] = json.dumps({k: _jsonable(v) for k, v in o.items()})
    gattrs.update({k: (v if isinstance(v, (int, float, str)) else str(v)) for k, v in (attrs or {}).items()
                   if v is not None})
    ds = xr.Dataset(dv, coords=coords, attrs=gattrs)
    ds = ds.transpose("member", "init_time", "lead_time", ...)
    ds["lead_time"].encoding.update(units="hours", dtype="float64")
    return _output(ds, layout, title="diffkit forecast", command=command_of(attrs, "diffkit forecast"))


def member_attrs(ist: "InitialStates", member=None, run_member=None) -> dict:
    """Global attributes recording which input member(s) a forecast started from: ``initial_member``
    (the value, ``"all"``, or ``"none"`` when the data have no member dim), ``initial_member_dim``
    and ``initial_member_choice`` (how it was chosen: ``--member``, the run's ``data.options.member``,
    or the data's only member)."""
    if ist.member_dim is None:
        return {"initial_member": "none", "initial_member_choice": "the data have no member dim"}
    every = (isinstance(member, str) and member.strip().lower() == ALL_MEMBERS) or len(ist.members) > 1
    value = ALL_MEMBERS if every else str(ist.members[0])
    if member is not None:
        how = f"--member {member}"
    elif run_member is not None and (isinstance(run_member, str) or np.ndim(run_member) == 0 or
                                     len(run_member) == 1):
        how = f"data.options.member = {run_member!r} of the run"
    else:
        how = f"the only member of {ist.member_dim!r}"
    return {"initial_member": value, "initial_member_dim": str(ist.member_dim),
            "initial_member_choice": f"member {value} of {ist.member_dim!r} ({how})" if not every else
            f"every member of {ist.member_dim!r} ({', '.join(map(str, ist.members))}; {how}), one ensemble each"}


def member_dataset(pred, layout: Layout, ist: "InitialStates", *, attrs: Mapping | None = None,
                   options: Mapping | None = None, per_member: bool | None = None):
    """:func:`forecast_dataset` of a forecast from :func:`initial_states` with one or several input
    members: ``pred`` is ``(I * N, M, K, C, lat, lon)`` (member-major, as ``ist``).  With several
    (or ``per_member=True``) the dataset gets a leading dim ``initial_member`` (the input member each
    ensemble started from, values of the data's member dim); else it is :func:`forecast_dataset`'s."""
    import xarray as xr

    I = len(ist.members)
    N = len(ist.times) // I
    if per_member is None:
        per_member = I > 1
    if not per_member:
        return forecast_dataset(pred, layout, ist.times, attrs=attrs, options=options)
    parts = [forecast_dataset(pred[i * N:(i + 1) * N], layout, ist.times[:N], attrs=attrs, options=options)
             for i in range(I)]
    ds = xr.concat(parts, dim="initial_member", data_vars="all", coords="minimal", compat="override",
                   combine_attrs="override")
    ds = ds.assign_coords(initial_member=("initial_member", np.asarray([_plain(m) for m in ist.members]),
                                          {"long_name": f"member of the input data the ensemble started from "
                                                        f"(its dim {ist.member_dim!r})"}))
    ds = ds.transpose("initial_member", "member", "init_time", "lead_time", ...)
    for v in ds.data_vars:
        ds[v].encoding = dict(parts[0][v].encoding)
    ds["lead_time"].encoding.update(parts[0]["lead_time"].encoding)
    return ds
