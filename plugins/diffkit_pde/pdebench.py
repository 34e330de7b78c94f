"""PDEBench HDF5 files as CF :class:`xarray.Dataset` objects in the plugin's own convention.

PDEBench (Takamoto et al. 2022, *PDEBench: an extensive benchmark for scientific machine
learning*, NeurIPS Datasets and Benchmarks) distributes its data as HDF5 downloads.  This module
reads the three layouts those files use, detected automatically, into the same structure as
:func:`diffkit_pde.netcdf.to_dataset`, so one adapter reads both kinds of file:

1. ``"tensor"`` -- one array ``tensor`` (or ``data``) of shape ``(sample, time, x[, y[, z]][, channel])``
   plus 1-D ``x-coordinate``, ``t-coordinate`` (and ``y-coordinate``, ``z-coordinate``); the
   1-D files (``1D_Burgers``, ``1D_Advection``, ...).  Channels become variables named by
   ``channel_names``, else ``u`` (one channel) or ``u0``, ``u1``, ...
2. ``"fields"`` -- separate named arrays (``density``, ``Vx``, ``Vy``, ``pressure``, ...), each
   ``(sample, time, x[, y[, z]])``, plus the same coordinate arrays; the CFD files.  Each array
   becomes a variable of that name.
3. ``"groups"`` -- one group per sample (``0000``, ``0001``, ...), each holding ``data`` of shape
   ``(time, x[, y], channel)`` and ``grid/x``, ``grid/y``, ``grid/t``; 2-D diffusion-reaction and
   shallow water.  Samples are stacked along ``trajectory``.

The output has dims ``(trajectory, time, x[, y[, z]])``; one variable per field (float32 or
float64) with ``long_name``/``units``; coordinates ``trajectory`` (0..N-1), ``time``, ``x``
(``y``, ``z``) with CF ``axis`` attributes; per-trajectory variables ``dt`` (output interval)
and ``dx`` (``dy``, ``dz``, grid spacing); global attributes ``Conventions = "CF-1.8"``,
``source``, ``pdebench_layout`` and the file's root attributes.  Scalar ``params`` (e.g. the
viscosity, which PDEBench puts in the file *name*) become both a global attribute and a
per-trajectory variable.

Which array axis is time, x or y is decided from the lengths of the coordinate arrays, not from
position alone; the PDEBench order ``(time, x, y)`` (channel last) only breaks ties between
assignments that fit the lengths equally well.  Files without coordinate arrays get index
coordinates (``x = arange(nx)/nx``, ``time = arange(nt)``) and a :class:`MissingCoordinateWarning`.

``lazy=True`` keeps the HDF5 file open and wraps every field (all three layouts) in an xarray
lazily indexed backend array: indexing reads only the selected hyperslab; ``ds.close()`` closes
the file.  :func:`write_pdebench` writes files in each layout (for tests and examples);
:func:`is_hdf5` / :func:`is_pdebench` tell HDF5 files, and PDEBench files from netCDF-4 ones,
apart.  ``h5py`` and ``xarray`` are imported only inside the functions that need them.
"""
from __future__ import annotations

import functools
import itertools
import os
import warnings
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from diffkit.errors import DiffkitError

__all__ = ["read_pdebench", "write_pdebench", "is_hdf5", "is_pdebench",
           "PDEBenchError", "PDEBenchFileNotFoundError", "MissingCoordinateWarning"]

HDF5_SIGNATURE = b"\x89HDF\r\n\x1a\n"
LAYOUTS = ("tensor", "fields", "groups")
_SPATIAL = ("x", "y", "z")
_COORD_DS = {"time": "t-coordinate", "x": "x-coordinate", "y": "y-coordinate", "z": "z-coordinate"}
_GRID_DS = {"time": "t", "x": "x", "y": "y", "z": "z"}   # inside the "grid" group of a sample
_TENSOR_NAMES = ("tensor", "data")
_LONG_NAMES = {"density": "mass density", "pressure": "pressure", "Vx": "x component of velocity",
               "Vy": "y component of velocity", "Vz": "z component of velocity", "u": "u"}
_SUPPORTED = ("supported layouts: (1) 'tensor': a dataset 'tensor' or 'data' of shape "
              "(sample, time, x[, y][, channel]) with 'x-coordinate', 't-coordinate' "
              "['y-coordinate']; (2) 'fields': named datasets such as 'density', 'Vx', 'Vy', "
              "'pressure', each (sample, time, x[, y]), with the same coordinates; (3) 'groups': "
              "one group per sample ('0000', '0001', ...) holding 'data' (time, x[, y], channel) "
              "and 'grid/x', 'grid/y', 'grid/t'")


class PDEBenchError(DiffkitError, ValueError):
    """A file cannot be read as PDEBench data (not HDF5, unknown layout, inconsistent shapes,
    non-uniform grid), or an argument of :func:`read_pdebench` does not fit the file."""


class PDEBenchFileNotFoundError(DiffkitError, FileNotFoundError):
    """The PDEBench file does not exist."""


class MissingCoordinateWarning(UserWarning):
    """A PDEBench file lacks a coordinate array; index coordinates are used instead."""


# ----------------------------------------------------------------------------- file type
def _sniff(path: Path, n: int = 8, offset: int = 0) -> bytes:
    with open(path, "rb") as fh:
        fh.seek(offset)
        return fh.read(n)


def is_hdf5(path) -> bool:
    """Whether ``path`` is an HDF5 file, by the signature ``\\x89HDF\\r\\n\\x1a\\n``.

    The signature sits at offset 0, or at 512, 1024, 2048, ... when the file has a user block.
    netCDF-4 files are HDF5 files too (see :func:`is_pdebench`).  ``False`` for a missing file or
    a directory."""
    p = Path(path).expanduser()
    if not p.is_file():
        return False
    size = p.stat().st_size
    offset = 0
    try:
        with open(p, "rb") as fh:
            while offset + 8 <= size:
                fh.seek(offset)
                if fh.read(8) == HDF5_SIGNATURE:
                    return True
                offset = 512 if offset == 0 else 2 * offset
    except OSError:
        return False
    return False


def _is_netcdf4(f) -> bool:
    """netCDF-4 files (netCDF4-python, h5netcdf, xarray) carry ``_NCProperties`` at the root;
    older ones are still recognisable by their HDF5 dimension scales."""
    if "_NCProperties" in f.attrs:
        return True
    for v in f.values():
        cls = v.attrs.get("CLASS") if hasattr(v, "attrs") else None
        if isinstance(cls, bytes) and cls == b"DIMENSION_SCALE":
            return True
        if isinstance(cls, str) and cls == "DIMENSION_SCALE":
            return True
    return False


def is_pdebench(path) -> bool:
    """Whether ``path`` should be read with :func:`read_pdebench`: an HDF5 file that is not a
    netCDF-4 file (those, including diffkit_pde's own output, are for ``xarray.open_dataset``).
    The layout itself is checked by :func:`read_pdebench`, whose errors say what is missing."""
    if not is_hdf5(path):
        return False
    import h5py

    try:
        with h5py.File(Path(path).expanduser(), "r") as f:
            return not _is_netcdf4(f)
    except OSError:
        return False


def _check_file(path) -> Path:
    p = Path(path).expanduser()
    if not p.exists():
        raise PDEBenchFileNotFoundError(
            f"PDEBench file {str(p)!r} does not exist; check the path (PDEBench data are downloads, "
            f"see https://github.com/pdebench/PDEBench, or write one with write_pdebench)")
    if not p.is_file():
        raise PDEBenchError(f"{str(p)!r} is not a file (a directory?); pass the path of a PDEBench .h5/.hdf5 file")
    if not is_hdf5(p):
        head = _sniff(p, 4)
        if head[:3] == b"CDF":
            kind = ("it is a netCDF-3 file: open it with xarray.open_dataset "
                    "(diffkit_pde's own netCDF files are read that way)")
        else:
            kind = (f"its first bytes are {head!r}, not the HDF5 signature {HDF5_SIGNATURE!r}; "
                    f"pass a PDEBench .h5/.hdf5 file (a truncated download fails this way too)")
        raise PDEBenchError(f"{str(p)!r} is not an HDF5 file: {kind}")
    return p


# ----------------------------------------------------------------------------- reading helpers
def _listing(f) -> str:
    import h5py

    items = []
    f.visititems(lambda name, obj: items.append(f"{name} {obj.shape}") if isinstance(obj, h5py.Dataset) else None)
    return ", ".join(items) if items else "(none)"


def _attr(v):
    """An HDF5 attribute as a netCDF-friendly string or number (mirrors netcdf._attr)."""
    if isinstance(v, bytes):
        return v.decode("utf-8", "replace")
    if isinstance(v, np.ndarray):
        if v.size == 1:
            return _attr(v.reshape(()).item())
        return str([_attr(a) for a in v.tolist()])
    if isinstance(v, np.generic):
        return _attr(v.item())
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)):
        return v
    return str(v)


def _out_dtype(dt: np.dtype) -> np.dtype:
    dt = np.dtype(dt)
    if dt in (np.float32, np.float64):
        return dt
    if dt.kind == "f" and dt.itemsize < 4:
        return np.dtype(np.float32)
    if dt.kind in "fiub":
        return np.dtype(np.float64)
    raise PDEBenchError(f"unsupported data type {dt} (fields must be real numbers)")


def _coord1d(obj, name: str, where: str) -> np.ndarray:
    a = np.asarray(obj[()])
    if a.ndim != 1:
        raise PDEBenchError(f"{name} in {where} has shape {a.shape}; coordinate arrays must be 1-D")
    return a


def _spacing(v: np.ndarray, name: str, where: str) -> float:
    """The uniform step of an increasing coordinate; NaN for a single point.

    Uniform means every difference is within rtol 1e-6 of the mean step; for coordinates stored
    in single precision (as PDEBench's are) the rounding of the stored values,
    4 eps(dtype) max|v|, is allowed on top, else no float32 grid would pass."""
    if v.size < 2:
        return float("nan")
    x = v.astype(np.float64)
    d = np.diff(x)
    step = (x[-1] - x[0]) / (x.size - 1)
    if not np.all(d > 0):
        raise PDEBenchError(f"{name} in {where} is not strictly increasing; the coordinate must "
                            f"increase along its axis")
    eps = np.finfo(v.dtype).eps if v.dtype.kind == "f" else 0.0
    tol = 1e-6 * abs(step) + 4 * eps * float(np.abs(x).max())
    if float(np.abs(d - step).max()) > tol:
        raise PDEBenchError(
            f"{name} in {where} is not uniformly spaced (steps from {d.min():.9g} to {d.max():.9g}, "
            f"rtol 1e-6); the dataset's dt/dx need a uniform grid: resample the data onto one first")
    return float(step)


def _assign_axes(shape: Sequence[int], axes: Sequence[int], roles: Sequence[str],
                 lengths: Mapping[str, int | None], what: str) -> tuple[int, ...]:
    """Which of ``axes`` holds each of ``roles`` (``"time"``, ``"x"``, ...), from coordinate lengths.

    A role fits an axis when its coordinate has that axis' length (``time`` also: length + 1,
    PDEBench's cell edges) or when the coordinate is missing.  Of all fitting assignments the
    PDEBench order (roles in order on the first axes) wins, else the only one, else the only one
    keeping x before y before z; anything else is ambiguous."""
    def fits(role, n):
        L = lengths.get(role)
        return L is None or L == n or (role == "time" and L == n + 1)

    cands = [p for p in itertools.permutations(axes, len(roles))
             if all(fits(r, shape[a]) for r, a in zip(roles, p))]
    desc = ", ".join(f"{r}: {lengths[r] if lengths.get(r) is not None else 'no coordinate'}" for r in roles)
    if not cands:
        raise PDEBenchError(
            f"{what} has shape {tuple(shape)}, which does not fit the coordinate lengths ({desc}); "
            f"expected axes (sample, time, x[, y][, channel]) with a t-coordinate of length time "
            f"or time + 1: the coordinate arrays do not belong to this array")
    canonical = tuple(axes[:len(roles)])
    if canonical in cands:
        return canonical
    if len(cands) > 1:
        sp = [i for i, r in enumerate(roles) if r in _SPATIAL]
        ordered = [p for p in cands if all(p[a] < p[b] for a, b in zip(sp, sp[1:]))]
        if len(ordered) == 1:
            return ordered[0]
        raise PDEBenchError(
            f"cannot tell the axes of {what} apart: shape {tuple(shape)} fits the coordinate lengths "
            f"({desc}) in {len(cands)} ways; store the array as (sample, time, x[, y][, channel])")
    return cands[0]


class _Source:
    """Reads basic-indexed blocks, in logical order (trajectory, time, x[, y[, z]]), of one field.

    ``arrays`` is one array with a sample axis (``stacked=False``) or one array per sample
    (``stacked=True``, the groups layout); ``perm[i]`` is the array axis of logical axis i (the
    trajectory axis excluded when stacked); ``channel`` = (axis, index) or None.  Arrays are
    h5py datasets (lazy reads) or numpy arrays (already read)."""

    def __init__(self, arrays, perm, channel, stacked: bool, dtype):
        self.arrays, self.perm, self.channel, self.stacked = list(arrays), tuple(perm), channel, stacked
        a0 = self.arrays[0]
        inner = tuple(a0.shape[p] for p in self.perm)
        self.shape = (len(self.arrays),) + inner if stacked else inner
        self.dtype = np.dtype(dtype)

    def _read_one(self, arr, key):
        fkey: list[Any] = [slice(None)] * arr.ndim
        for k, ax in zip(key, self.perm):
            fkey[ax] = k
        if self.channel is not None:
            fkey[self.channel[0]] = self.channel[1]
        out = np.asarray(arr[tuple(fkey)])
        kept = [ax for ax in sorted(self.perm) if isinstance(fkey[ax], slice)]   # result axes, array order
        want = [ax for ax in self.perm if isinstance(fkey[ax], slice)]          # logical order
        if kept != want:
            out = out.transpose([kept.index(ax) for ax in want])
        return out

    def read(self, key: tuple) -> np.ndarray:
        key = tuple(key) + (slice(None),) * (len(self.shape) - len(key))
        if not self.stacked:
            out = self._read_one(self.arrays[0], key)
        elif isinstance(key[0], slice):
            idx = range(len(self.arrays))[key[0]]
            parts = [self._read_one(self.arrays[i], key[1:]) for i in idx]
            if parts:
                out = np.stack(parts)
            else:
                rest = [len(range(n)[k]) for n, k in zip(self.shape[1:], key[1:]) if isinstance(k, slice)]
                out = np.empty([0, *rest], dtype=self.dtype)
        else:
            out = self._read_one(self.arrays[int(key[0])], key[1:])
        return np.asarray(out, dtype=self.dtype)

    def load(self) -> np.ndarray:
        return self.read(())


@functools.lru_cache(maxsize=None)
def _backend_array_class():
    from xarray.backends import BackendArray
    from xarray.core import indexing

    class PDEBenchBackendArray(BackendArray):
        """A lazily read field: xarray hands basic (int/slice) keys to :meth:`_Source.read`."""

        def __init__(self, source: _Source):
            self.source = source
            self.shape = source.shape
            self.dtype = source.dtype

        def __getitem__(self, key):
            return indexing.explicit_indexing_adapter(key, self.shape, indexing.IndexingSupport.BASIC,
                                                      self._raw)

        def _raw(self, key):
            return self.source.read(tuple(key))

    return PDEBenchBackendArray, indexing.LazilyIndexedArray


# ----------------------------------------------------------------------------- layouts
def _detect(f, where: str) -> str:
    import h5py

    if any(n in f and isinstance(f[n], h5py.Dataset) for n in _TENSOR_NAMES):
        return "tensor"
    if any(isinstance(v, h5py.Group) and isinstance(v.get("data"), h5py.Dataset) for v in f.values()):
        return "groups"
    if any(isinstance(v, h5py.Dataset) and k not in _COORD_DS.values() and v.ndim >= 3 for k, v in f.items()):
        return "fields"
    if _is_netcdf4(f):
        raise PDEBenchError(f"{where} is a netCDF-4 file, not a PDEBench file: open it with "
                            f"xarray.open_dataset (diffkit_pde's own netCDF files are read that way)")
    raise PDEBenchError(f"no recognisable PDEBench layout in {where}: datasets found: {_listing(f)}; "
                        f"{_SUPPORTED}")


def _root_coords(f, where: str) -> dict[str, np.ndarray]:
    import h5py

    out = {}
    for role, name in _COORD_DS.items():
        if name in f and isinstance(f[name], h5py.Dataset):
            out[role] = _coord1d(f[name], repr(name), where)
    return out


def _n_spatial(coords: Mapping[str, Any], default: int) -> int:
    present = [i + 1 for i, ax in enumerate(_SPATIAL) if ax in coords]
    return max(present) if present else default


def _channel_names(n_ch: int, channel_names, where: str) -> list[str]:
    if channel_names is None:
        return ["u"] if n_ch == 1 else [f"u{i}" for i in range(n_ch)]
    names = [channel_names] if isinstance(channel_names, str) else list(channel_names)
    if len(names) != n_ch:
        raise PDEBenchError(f"channel_names has {len(names)} name(s) {names} but {where} has {n_ch} "
                            f"channel(s); pass one name per channel")
    if len(set(names)) != len(names):
        raise PDEBenchError(f"channel_names {names} repeats a name; the names must differ")
    return [str(n) for n in names]


def _split_array(shape, ndim_lead: int, coords, default_ns: int, what: str, channel_names, where: str):
    """Axes of an array ``(lead..., time, x[, y][, channel])``: perm, channel axis, channel names."""
    ns = _n_spatial(coords, default_ns)
    roles = ["time", *_SPATIAL[:ns]]
    nd = len(shape)
    if nd not in (ndim_lead + 1 + ns, ndim_lead + 2 + ns):
        lead = "sample, " if ndim_lead else ""
        sp = ", ".join(_SPATIAL[:ns])
        raise PDEBenchError(
            f"{what} has shape {tuple(shape)}, but the file's coordinates describe {ns}-D data: expected "
            f"({lead}time, {sp}) or ({lead}time, {sp}, channel)")
    lengths = {r: (len(coords[r]) if r in coords else None) for r in roles}
    free = list(range(ndim_lead, nd))
    perm = _assign_axes(shape, free, roles, lengths, what)
    rest = [a for a in free if a not in perm]
    if rest:
        ch_axis = rest[0]
        names = _channel_names(shape[ch_axis], channel_names, where)
    else:
        ch_axis = None
        names = _channel_names(1, channel_names, where)
    return roles, perm, ch_axis, names


def _parse_tensor(f, where, channel_names):
    name = next(n for n in _TENSOR_NAMES if n in f)
    d = f[name]
    coords = _root_coords(f, where)
    default_ns = {3: 1, 4: 1, 5: 2}.get(d.ndim, max(d.ndim - 3, 1))  # no coordinates: 4-D = 1-D + channel
    roles, perm, ch_axis, names = _split_array(d.shape, 1, coords, default_ns, f"dataset {name!r} of {where}",
                                               channel_names, where)
    units = _attr(d.attrs["units"]) if "units" in d.attrs else "1"
    fields = []
    for i, nm in enumerate(names):
        ch = None if ch_axis is None else (ch_axis, i)
        attrs = {"long_name": _LONG_NAMES.get(nm, nm), "units": units}
        fields.append((nm, dict(arrays=[d], perm=(0, *perm), channel=ch, stacked=False), attrs))
    return dict(roles=roles, coords=coords, fields=fields, n=d.shape[0], t_per_sample=None,
                shape=[d.shape[a] for a in perm])


def _parse_fields(f, where, channel_names, variables):
    import h5py

    if channel_names is not None:
        raise PDEBenchError(f"channel_names applies to the 'tensor' and 'groups' layouts, but {where} has "
                            f"named fields; select them with variables= instead")
    cands = {k: v for k, v in f.items() if isinstance(v, h5py.Dataset)
             and k not in _COORD_DS.values() and v.ndim >= 3}
    use = list(cands) if variables is None else [v for v in variables if v in cands]
    shapes = {k: cands[k].shape for k in use}
    if len(set(shapes.values())) > 1:
        raise PDEBenchError(f"the fields of {where} differ in shape ({shapes}); read fields of one shape "
                            f"at a time with variables=[...]")
    coords = _root_coords(f, where)
    shape = shapes[use[0]] if use else next(iter(cands.values())).shape
    roles, perm, ch_axis, _ = _split_array(shape, 1, coords, len(shape) - 2, f"the fields of {where}", None, where)
    if ch_axis is not None:
        raise PDEBenchError(f"the fields of {where} have shape {tuple(shape)}: one axis more than "
                            f"(sample, time, {', '.join(roles[1:])}); the 'fields' layout has no channel axis")
    fields = []
    for k, v in cands.items():
        attrs = {"long_name": _attr(v.attrs["long_name"]) if "long_name" in v.attrs else _LONG_NAMES.get(k, k),
                 "units": _attr(v.attrs["units"]) if "units" in v.attrs else "1"}
        fields.append((k, dict(arrays=[v], perm=(0, *perm), channel=None, stacked=False), attrs))
    return dict(roles=roles, coords=coords, fields=fields, n=shape[0], t_per_sample=None,
                shape=[shape[a] for a in perm])


def _parse_groups(f, where, channel_names):
    import h5py

    names = [k for k, v in f.items() if isinstance(v, h5py.Group) and isinstance(v.get("data"), h5py.Dataset)]
    names.sort(key=lambda s: (0, int(s), s) if s.isdigit() else (1, 0, s))
    datas = [f[k]["data"] for k in names]
    shape = datas[0].shape
    for k, d in zip(names, datas):
        if d.shape != shape:
            raise PDEBenchError(f"sample group {k!r} of {where} holds data of shape {d.shape}, sample "
                                f"{names[0]!r} {shape}; all samples must have the same shape")
    grids = []
    for k in names:
        g = f[k].get("grid")
        grids.append({r: _coord1d(g[n], f"'{k}/grid/{n}'", where)
                      for r, n in _GRID_DS.items() if isinstance(g, h5py.Group) and n in g})
    coords = dict(grids[0])
    for k, g in zip(names, grids):
        if set(g) != set(coords):
            raise PDEBenchError(f"sample group {k!r} of {where} has grid arrays {sorted(g)}, sample "
                                f"{names[0]!r} {sorted(coords)}; every sample needs the same grid arrays")
        for r in _SPATIAL:
            if r in g and not np.array_equal(g[r], coords[r]):
                raise PDEBenchError(f"sample group {k!r} of {where} has a different grid/{r} from sample "
                                    f"{names[0]!r}; samples on different grids cannot share one dataset")
    t_per = None
    if "time" in coords and any(not np.array_equal(g["time"], coords["time"]) for g in grids):
        t_per = [g["time"] for g in grids]
    roles, perm, ch_axis, cnames = _split_array(shape, 0, coords, max(len(shape) - 2, 1),
                                                f"'{names[0]}/data' of {where}", channel_names, where)
    d0 = datas[0]
    units = _attr(d0.attrs["units"]) if "units" in d0.attrs else "1"
    fields = []
    for i, nm in enumerate(cnames):
        ch = None if ch_axis is None else (ch_axis, i)
        fields.append((nm, dict(arrays=datas, perm=perm, channel=ch, stacked=True),
                       {"long_name": _LONG_NAMES.get(nm, nm), "units": units}))
    return dict(roles=roles, coords=coords, fields=fields, n=len(names), t_per_sample=t_per,
                shape=[shape[a] for a in perm])


# ----------------------------------------------------------------------------- read
def read_pdebench(path, *, variables: str | Sequence[str] | None = None,
                  channel_names: str | Sequence[str] | None = None,
                  params: Mapping[str, float] | None = None, lazy: bool = False):
    """Read a PDEBench HDF5 file into a CF-1.8 :class:`xarray.Dataset` (see the module docstring).

    ``variables`` selects fields by their output names (channel names for the ``tensor`` and
    ``groups`` layouts).  ``channel_names`` names the channels of those layouts (default ``u``
    or ``u0``, ``u1``, ...).  ``params`` maps names to scalar parameters (e.g. ``{"nu": 0.01}``),
    stored as global attributes and as per-trajectory variables.  ``lazy=False`` reads the
    selected fields into numpy arrays and closes the file; ``lazy=True`` keeps it open and reads
    on indexing / ``.load()`` (close with ``ds.close()``).

    Raises :class:`PDEBenchFileNotFoundError` for a missing file and :class:`PDEBenchError`
    (a ``ValueError``) for a file that is not HDF5 (e.g. netCDF-3 or text), a netCDF-4 file,
    an unknown layout (the message lists the datasets in the file), unknown ``variables``,
    inconsistent shapes or a non-uniform grid.
    """
    import h5py
    import xarray as xr

    p = _check_file(path)
    where = repr(p.name)
    if isinstance(variables, str):
        variables = [variables]
    if variables is not None:
        variables = list(variables)
        if not variables:
            raise PDEBenchError("variables is empty; pass None for all fields or at least one name")
    params = dict(params or {})
    for k, v in params.items():
        if isinstance(v, (bool, np.bool_)) or not isinstance(v, (int, float, np.integer, np.floating)):
            raise PDEBenchError(f"params[{k!r}] = {v!r} is not a number; params holds scalar parameters "
                                f"such as {{'nu': 0.01}}")
    try:
        f = h5py.File(p, "r")
    except OSError as e:
        raise PDEBenchError(f"{str(p)!r} cannot be opened as an HDF5 file ({e}); the file may be truncated "
                            f"or corrupt: download or write it again") from e
    try:
        ds = _read_open(f, p, where, variables, channel_names, params, lazy, xr)
    except BaseException:
        f.close()
        raise
    if lazy:
        ds.set_close(f.close)
    else:
        f.close()
    return ds


def _read_open(f, p: Path, where: str, variables, channel_names, params, lazy, xr):
    if _is_netcdf4(f):
        raise PDEBenchError(f"{where} is a netCDF-4 file, not a PDEBench file: open it with "
                            f"xarray.open_dataset (diffkit_pde's own netCDF files are read that way)")
    layout = _detect(f, where)
    if layout == "tensor":
        info = _parse_tensor(f, where, channel_names)
    elif layout == "fields":
        info = _parse_fields(f, where, channel_names, variables)
    else:
        info = _parse_groups(f, where, channel_names)
    available = [nm for nm, _, _ in info["fields"]]
    if variables is not None:
        unknown = [v for v in variables if v not in available]
        if unknown:
            hint = "" if layout == "fields" else " (channel names; rename them with channel_names=)"
            raise PDEBenchError(f"variables {unknown} not in {where}; available: {available}{hint}")
        if len(set(variables)) != len(variables):
            raise PDEBenchError(f"variables {variables} repeats a name")
        by_name = {nm: (nm, s, a) for nm, s, a in info["fields"]}
        info["fields"] = [by_name[v] for v in variables]

    roles, coords, n = info["roles"], info["coords"], info["n"]
    sizes = dict(zip(roles, info["shape"]))
    nt = sizes["time"]
    spatial = roles[1:]
    reserved = {"trajectory", "time", "t", "dt", *spatial, *(f"d{ax}" for ax in spatial)}
    for nm in [*(nm for nm, _, _ in info["fields"]), *params]:
        if nm in reserved:
            raise PDEBenchError(f"the name {nm!r} in {where} clashes with a coordinate or the per-trajectory "
                                f"variables {sorted(reserved)}; rename it with channel_names= or params=")
    clash = set(params) & {nm for nm, _, _ in info["fields"]}
    if clash:
        raise PDEBenchError(f"params {sorted(clash)} have the names of fields in {where}; rename them")

    missing = [r for r in roles if r not in coords]
    if missing:
        src = "'grid/...' arrays of the sample groups" if layout == "groups" else "coordinate datasets"
        warnings.warn(f"{where} has no {', '.join(_COORD_DS[r] if layout != 'groups' else 'grid/' + _GRID_DS[r] for r in missing)} "
                      f"({src}); using index coordinates instead: "
                      + ", ".join("time = arange(nt)" if r == "time" else f"{r} = arange(n{r})/n{r}" for r in missing),
                      MissingCoordinateWarning, stacklevel=3)

    dims = ("trajectory", *roles)
    xcoords: dict[str, Any] = {"trajectory": ("trajectory", np.arange(n), {"long_name": "trajectory index"})}
    dv: dict[str, Any] = {}

    # time: PDEBench's t-coordinate sometimes has nt + 1 entries (the edges of the output intervals,
    # e.g. 1D_Advection/1D_Burgers: 202 values for 201 frames); the first nt are the frame times
    def tcut(t):
        return t[:nt]

    if info["t_per_sample"] is not None:
        ts = np.stack([tcut(t).astype(np.float64) for t in info["t_per_sample"]])
        dts = [_spacing(tcut(t), f"grid/t of sample {i}", where) for i, t in enumerate(info["t_per_sample"])]
        xcoords["time"] = ("time", np.arange(nt), {"long_name": "output step index", "units": "1", "axis": "T"})
        xcoords["t"] = (("trajectory", "time"), ts, {"long_name": "time", "units": "1"})
        dt = np.asarray(dts, dtype=np.float64)
    elif "time" in coords:
        t = tcut(coords["time"])
        step = _spacing(t, "the t-coordinate", where)
        xcoords["time"] = ("time", t.astype(np.float64), {"long_name": "time", "units": "1", "axis": "T"})
        dt = np.full(n, step)
    else:
        xcoords["time"] = ("time", np.arange(nt), {"long_name": "output step index (no t-coordinate in the file)",
                                                   "units": "1", "axis": "T"})
        dt = np.ones(n)
    for ax in spatial:
        nx = sizes[ax]
        if ax in coords:
            v = coords[ax]
            step = _spacing(v, f"the {ax}-coordinate", where)
            lname = "position" if len(spatial) == 1 else f"{ax} coordinate"
            xcoords[ax] = (ax, v.astype(np.float64), {"long_name": lname, "units": "1", "axis": ax.upper()})
        else:
            step = 1.0 / nx
            xcoords[ax] = (ax, np.arange(nx) / nx, {"long_name": f"{ax} index divided by n{ax} "
                                                                 f"(no {ax} coordinate in the file)",
                                                    "units": "1", "axis": ax.upper()})
        dv[f"d{ax}"] = ("trajectory", np.full(n, step),
                        {"long_name": "grid spacing" if len(spatial) == 1 else f"grid spacing in {ax}", "units": "1"})

    fields = {}
    cache: dict[int, np.ndarray] = {}
    for nm, spec, attrs in info["fields"]:
        arrays = spec["arrays"]
        dtype = _out_dtype(arrays[0].dtype)
        if not lazy:  # read each HDF5 dataset once, even when several channels come from it
            for a in arrays:
                if id(a) not in cache:
                    cache[id(a)] = np.asarray(a[()])
            arrays = [cache[id(a)] for a in arrays]
        src = _Source(arrays, spec["perm"], spec["channel"], spec["stacked"], dtype)
        if lazy:
            BA, Lazy = _backend_array_class()
            data = Lazy(BA(src))
        else:
            data = src.load()
        fields[nm] = xr.Variable(dims, data, attrs)
    cache.clear()

    dv["dt"] = ("trajectory", dt, {"long_name": "output time interval", "units": "1"})
    for k, v in params.items():
        dv[k] = ("trajectory", np.full(n, float(v)), {"long_name": k, "units": "1"})

    attrs: dict[str, Any] = {"Conventions": "CF-1.8", "source": f"PDEBench HDF5 file {p.name}",
                             "title": f"PDEBench data ({layout} layout)", "pdebench_layout": layout}
    for k, v in f.attrs.items():
        attrs[k if k not in attrs else f"hdf5_{k}"] = _attr(v)
    for k, v in params.items():
        attrs[k] = _attr(v)
    return xr.Dataset({**fields, **dv}, coords=xcoords, attrs=attrs)


# ----------------------------------------------------------------------------- write
def write_pdebench(path, fields: Mapping[str, np.ndarray] | np.ndarray, *, x, t, y=None,
                   layout: str = "tensor", attrs: Mapping[str, Any] | None = None) -> Path:
    """Write a PDEBench-style HDF5 file (atomically: temporary file, then ``os.replace``).

    ``fields``: a dict of arrays ``(sample, time, x[, y])`` or one array.  ``x``, ``t``, ``y``:
    1-D coordinates (``t`` may have ``time + 1`` entries, as in some PDEBench files; ``None``
    omits a coordinate, which tests the reader's fallback).  ``attrs``: root attributes.

    - ``layout="tensor"``: dataset ``tensor``; a given array is written as is (``(sample, time,
      x[, y][, channel])``), a dict of one field as ``(sample, time, x[, y])``, of several fields
      stacked on a last channel axis (the names are not stored: PDEBench files have none);
      coordinates ``x-coordinate``, ``y-coordinate``, ``t-coordinate``.
    - ``layout="fields"``: one dataset per dict entry (an array is not accepted), same coordinates.
    - ``layout="groups"``: groups ``0000``, ``0001``, ... with ``data`` ``(time, x[, y], channel)``
      (a dict is stacked on the channel axis, an array needs its channel axis already) and
      ``grid/x``, ``grid/y``, ``grid/t``.
    """
    import h5py

    if layout not in LAYOUTS:
        raise PDEBenchError(f"layout must be one of {LAYOUTS}, got {layout!r}")
    p = Path(path).expanduser()
    ns = 1 if y is None else 2
    if isinstance(fields, Mapping):
        if not fields:
            raise PDEBenchError("fields is empty; pass at least one array")
        arrs = {str(k): np.asarray(v) for k, v in fields.items()}
        shapes = {k: v.shape for k, v in arrs.items()}
        if len(set(shapes.values())) > 1:
            raise PDEBenchError(f"the fields differ in shape: {shapes}")
        shape = next(iter(shapes.values()))
        if len(shape) != 2 + ns:
            raise PDEBenchError(f"fields must have shape (sample, time, x{', y' if ns == 2 else ''}), got {shape}")
        if layout == "fields":
            data = None
        else:
            vs = list(arrs.values())
            data = vs[0] if (len(vs) == 1 and layout == "tensor") else np.stack(vs, axis=-1)
    else:
        if layout == "fields":
            raise PDEBenchError("layout='fields' needs a dict of named arrays, e.g. {'density': ..., 'Vx': ...}")
        data = np.asarray(fields)
        arrs = None
        if layout == "groups" and data.ndim != 3 + ns:
            raise PDEBenchError(f"layout='groups' needs an array (sample, time, x{', y' if ns == 2 else ''}, channel), "
                                f"got shape {data.shape}; pass a dict to have the channel axis added")
        if data.ndim not in (2 + ns, 3 + ns):
            raise PDEBenchError(f"the array must have shape (sample, time, x{', y' if ns == 2 else ''}[, channel]), "
                                f"got {data.shape}")
        shape = data.shape
    nt = shape[1]
    coords = {"t": t, "x": x, "y": y}
    for k, v in coords.items():
        if v is not None:
            v = np.asarray(v)
            if v.ndim != 1:
                raise PDEBenchError(f"{k} must be 1-D, got shape {v.shape}")
            coords[k] = v
    if coords["t"] is not None and len(coords["t"]) not in (nt, nt + 1):
        raise PDEBenchError(f"t has {len(coords['t'])} values for {nt} time steps; pass nt or nt + 1 values")
    for k, ax in (("x", 2), ("y", 3)):
        if coords[k] is not None and len(coords[k]) != shape[ax]:
            raise PDEBenchError(f"{k} has {len(coords[k])} values but the data have {shape[ax]} points along {k}")

    p.parent.mkdir(parents=True, exist_ok=True)
    tmp = p.with_name(f".{p.name}.tmp-{os.getpid()}")
    try:
        with h5py.File(tmp, "w") as f:
            for k, v in (attrs or {}).items():
                f.attrs[k] = v
            if layout == "groups":
                for i in range(shape[0]):
                    g = f.create_group(f"{i:04d}")
                    g.create_dataset("data", data=data[i])
                    grid = g.create_group("grid")
                    for k in ("x", "y", "t"):
                        if coords[k] is not None:
                            grid.create_dataset(k, data=coords[k])
            else:
                if layout == "tensor":
                    f.create_dataset("tensor", data=data)
                else:
                    for k, v in arrs.items():
                        f.create_dataset(k, data=v)
                for k in ("x", "y", "t"):
                    if coords[k] is not None:
                        f.create_dataset(f"{k}-coordinate", data=coords[k])
        os.replace(tmp, p)
    finally:
        if tmp.exists():
            tmp.unlink()
    return p
