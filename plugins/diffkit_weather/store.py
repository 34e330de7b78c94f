"""Reading gridded data: where the files are (netCDF files, globs, zarr stores local or remote),
opening them lazily (xarray; zarr through dask with the store's own chunks, so a read of some times
loads only the chunks holding them), and :class:`Store`, the one lazy reader of variables spread
over files that the adapter and the forecaster share.  :func:`check_grid` checks data against a
checkpoint's grid."""
from __future__ import annotations

import glob as _glob
import os
import re
from functools import reduce
from pathlib import Path
from typing import Any, Mapping, Sequence

import numpy as np

from diffkit.layout import Layout

from ._common import ADAPTER, WeatherDataError, _plain, _vals
from .cf import _fmt_keys, _keys, _same_coord, decode_file_time, find_coords, level_pos, one_calendar


def _index(local: np.ndarray):
    """A basic (slice) indexer for evenly spaced ascending positions, else the list."""
    local = np.asarray(local, dtype=np.int64)
    if local.size == 1:
        return slice(int(local[0]), int(local[0]) + 1)
    d = np.diff(local)
    if d.size and (d == d[0]).all() and d[0] > 0:
        return slice(int(local[0]), int(local[-1]) + 1, int(d[0]))
    return local.tolist()


class RemotePath(str):
    """A URL of a zarr store (``gs://bucket/era5.zarr``, ``s3://...``, ``memory://...``): a ``str``
    with :class:`~pathlib.Path`'s ``name``, so it stands where a local path does."""

    @property
    def name(self) -> str:
        return self.rstrip("/").rsplit("/", 1)[-1]

    def resolve(self) -> "RemotePath":
        return self


_URL = re.compile(r"^[A-Za-z][A-Za-z0-9+.\-]*://")
#: the fsspec filesystem package a URL scheme needs (none of them is a diffkit dependency)
_FS_PACKAGES = {"gs": "gcsfs", "gcs": "gcsfs", "s3": "s3fs", "s3a": "s3fs", "az": "adlfs", "abfs": "adlfs",
                "abfss": "adlfs", "http": "aiohttp", "https": "aiohttp"}
_ZARR_MARKERS = ("zarr.json", ".zgroup", ".zarray", ".zmetadata")


def resolve_paths(path) -> list[Path]:
    """The data of ``path``: a netCDF file, a zarr store (a directory, usually ``*.zarr``, or a URL
    such as ``gs://bucket/era5.zarr``), a glob pattern, or a list of these (sorted per glob)."""
    items = [path] if isinstance(path, (str, os.PathLike)) else list(path)
    if not items:
        raise WeatherDataError("data.options.path is empty; give a netCDF file, a zarr store, a glob such as "
                               "'era5/*.nc' or a list")
    out: list = []
    for it in items:
        s = os.fspath(it)
        if _URL.match(s):  # a remote store: existence is checked when it is opened
            out.append(RemotePath(s))
        elif any(c in s for c in "*?["):
            hits = sorted(_glob.glob(s))
            if not hits:
                raise WeatherDataError(f"no file matches the pattern {s!r}; check the path (data.options.path)")
            out += [Path(h) for h in hits]
        else:
            p = Path(s)
            if not p.exists():
                raise FileNotFoundError(f"gridded data file {p} does not exist; check data.options.path")
            out.append(p)
    seen, uniq = set(), []
    for p in out:
        if p.resolve() not in seen:
            seen.add(p.resolve())
            uniq.append(p)
    return uniq


def is_zarr(path) -> bool:
    """Whether ``path`` is read as a zarr store: a URL, a ``*.zarr`` path, or a directory holding zarr metadata."""
    s = os.fspath(path)
    if _URL.match(s) or s.rstrip("/\\").endswith(".zarr"):
        return True
    p = Path(s)
    return p.is_dir() and any((p / m).exists() for m in _ZARR_MARKERS)


def open_lazy(path):
    """Open one netCDF file or zarr store lazily (no data read, times not decoded: :func:`decode_time`
    does that).  A zarr store is opened through dask with its own chunks, so a read of some times
    loads only the chunks holding them."""
    import xarray as xr

    if is_zarr(path):
        return _open_zarr(path)
    if Path(os.fspath(path)).is_dir():
        raise WeatherDataError(f"{path} is a directory, neither a netCDF file nor a zarr store (no "
                               f"{' / '.join(_ZARR_MARKERS)} in it); give netCDF files, a glob such as "
                               f"'{Path(path) / '*.nc'}', or a zarr store")
    try:
        return xr.open_dataset(path, decode_times=False, decode_timedelta=False, cache=False)
    except Exception as e:
        raise WeatherDataError(f"cannot read {path} as netCDF ({type(e).__name__}: {e}); give CF netCDF files") from None


_fork_hook_set = False


def _dask_synchronous_after_fork() -> None:
    # dask's threaded scheduler keeps a thread pool that a forked child (a DataLoader worker)
    # inherits without its threads: a compute there waits forever.  Children compute in their own
    # thread instead (each worker is one reader; the parallelism is the workers).
    import dask

    dask.config.set(scheduler="synchronous")


def _open_zarr(path):
    global _fork_hook_set
    import warnings

    import xarray as xr

    s = os.fspath(path)
    try:
        import dask.array  # noqa: F401  (open_zarr(chunks=...) needs it)
        import zarr  # noqa: F401
    except ImportError as e:
        raise WeatherDataError(f"{s} is a zarr store; reading it needs the optional packages zarr and dask "
                               f"({(e.name or 'zarr').split('.')[0]} is not installed): pip install \"diffkit[zarr]\"") from None
    remote = _URL.match(s)
    if remote:
        scheme = s.split("://", 1)[0].lower()
        try:
            import fsspec

            fsspec.get_filesystem_class(scheme)
        except ImportError as e:
            why = str(e).splitlines()[0] if str(e) else type(e).__name__
            raise WeatherDataError(f"reading {s} needs the fsspec filesystem for {scheme}://, which is not "
                                   f"installed ({why}); it is no diffkit dependency: pip install "
                                   f"{_FS_PACKAGES.get(scheme, 'fsspec and the package for ' + scheme + '://')}") from None
        except ValueError:
            raise WeatherDataError(f"{s}: fsspec knows no filesystem {scheme}://; give a local path or a URL "
                                   f"such as gs://bucket/store.zarr (gcsfs) or s3://bucket/store.zarr (s3fs)") from None
    if not _fork_hook_set:
        os.register_at_fork(after_in_child=_dask_synchronous_after_fork)
        _fork_hook_set = True
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.filterwarnings("always", message="Failed to open Zarr store with consolidated metadata")
            ds = xr.open_zarr(s, chunks={}, decode_times=False, decode_timedelta=False)
    except FileNotFoundError as e:  # also zarr's GroupNotFoundError: no store metadata there
        if remote:
            raise WeatherDataError(f"no zarr store at {s} ({type(e).__name__}: {e}); check the URL "
                                   f"(data.options.path)") from None
        if not Path(s).exists():
            raise FileNotFoundError(f"zarr store {s} does not exist; check data.options.path") from None
        raise WeatherDataError(f"{s} is not a zarr store ({type(e).__name__}: {e}); give the directory "
                               f"that holds the store's zarr.json / .zgroup") from None
    except Exception as e:
        msg = str(e).splitlines()[0] if str(e) else ""
        raise WeatherDataError(f"cannot read {s} as a zarr store ({type(e).__name__}: {msg})") from None
    for w in caught:
        if "consolidated metadata" in str(w.message):
            if remote:  # slow, but works: say so in one line
                warnings.warn(f"{s} has no consolidated metadata, so opening it reads each array's metadata "
                              f"separately; zarr.consolidate_metadata() on the store makes it faster", stacklevel=3)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    return ds



# ----------------------------------------------------------------------------- segments
def field_segment(ds, v, roles: Mapping, fi: int, name: str, level_dim: str | None = None):
    """Where the dims of variable ``v`` of file ``fi`` (``ds``, dim roles ``roles`` from
    :func:`~diffkit_weather.cf.find_coords`) are: a *segment* dict (``file``, ``name``, the dims
    ``time``/``level``/``lat``/``lon``/``member`` or None, ``extra`` size-1 dims, ``member_values``),
    or None when ``v`` has no latitude and longitude dims.  Second, the dims that make it no plain
    gridded field (other dims of size > 1, a second level dim); ``level_dim`` picks the level dim."""
    d = list(map(str, ds[v].dims))
    lat, lon, tdim, mdim = roles.get("latitude"), roles.get("longitude"), roles.get("time"), roles.get("member")
    if lat not in d or lon not in d:
        return None, []
    lev = [x for x in d if x in roles.get("level", [])]
    if level_dim is not None and level_dim in d:
        lev = [level_dim]
    extra = [x for x in d if x not in (lat, lon, tdim, mdim, *lev)]
    big = [x for x in extra if ds.sizes[x] != 1] + lev[1:]
    seg = dict(file=fi, name=name, time=tdim if tdim in d else None, lat=lat, lon=lon,
               level=lev[0] if lev else None, member=mdim if mdim in d else None, extra=extra)
    if seg["member"] is not None:
        seg["member_values"] = np.asarray(ds[mdim].values) if mdim in ds.variables else np.arange(ds.sizes[mdim])
    return seg, big


#: the ``member`` value that chooses every member of a member dim (``--member all``)
ALL_MEMBERS = "all"



def _member_pos(vals: np.ndarray, want) -> int | None:
    """Position of the member ``want`` (a value, or its text as typed after ``--member``) in the
    member coordinate ``vals``; None when absent."""
    vals = np.asarray(vals)
    if isinstance(want, str):
        w = want.strip()
        if vals.dtype.kind in "iuf":
            try:
                hit = np.flatnonzero(vals.astype(np.float64) == float(w))
            except ValueError:
                return None
        else:
            hit = np.flatnonzero(np.array([str(_plain(x)) for x in vals.ravel()], dtype=object) == w)
    else:
        try:
            hit = np.flatnonzero(vals == want)
        except (TypeError, ValueError):
            return None
    return int(hit[0]) if hit.size else None


def _member_list(member) -> list | None:
    """``member`` as a list of wanted members (None: no choice; ``"all"`` stays ``"all"``)."""
    if member is None:
        return None
    if isinstance(member, str):
        return ALL_MEMBERS if member.strip().lower() == ALL_MEMBERS else [member]
    if np.ndim(member) == 0:
        return [member]
    out = list(member)
    if not out:
        raise WeatherDataError("member: an empty list chooses no member; give a member value or 'all'")
    return out


# ----------------------------------------------------------------------------- the store
class Store:
    """Lazy reader of gridded variables spread over files (netCDF; zarr stores through dask) or held
    in one in-memory :class:`xarray.Dataset`: the one reader of the adapter (training pairs,
    statistics) and of the forecaster (initial states, static fields, the truth of a forecast).

    Each variable is a list of *segments* (:func:`field_segment`), one per file that holds some of
    its times, each with its decoded ``times`` and their ``keys`` (:func:`~diffkit_weather.cf._keys`),
    its ``level_index`` (positions of the levels read; else found by value from ``levels`` at the
    first read) and ``member_index`` (positions in its member dim of the members read).
    :meth:`read` reads only the times asked for (a slice where they are evenly spaced, so a zarr
    store loads only the chunks holding them), in ``dtype``, in the model's orientation when
    ``orient`` (:func:`~diffkit_weather.cf._orientation`) is given, else in the files' own.

    Files are opened once per process: a forked DataLoader worker (or an unpickled copy) reopens
    them by path and never shares a netCDF handle; an in-memory Dataset travels as it is.
    ``keys`` / ``times`` are the times every variable has.  :meth:`open` finds the segments the
    forecaster's way and chooses members; the adapter builds them with its own rules."""

    def __init__(self, sources: Sequence[tuple], segments: Mapping[str, list], *, static: Mapping | None = None,
                 levels: Mapping[str, Sequence[float]] | None = None, orient: Mapping | None = None,
                 dtype=np.float64):
        self.sources = [(name, path) for name, path, _ in sources]
        self._open = {i: ds for i, (_, _, ds) in enumerate(sources) if ds is not None}
        self._pid = os.getpid()
        self.names = ", ".join(name for name, _ in self.sources)
        self.segs = {v: list(s) for v, s in segments.items()}
        self.variables = list(self.segs)
        self.static = dict(static or {})
        self.levels = {k: list(v) for k, v in (levels or {}).items()}
        self.orient, self.dtype = orient, np.dtype(dtype)
        self.members, self.member_dim = [None], None
        self._index_times()

    def _index_times(self) -> None:
        """Per variable the sorted keys it has, each with the (segment, position) that holds it (the
        first in segment order); ``clash[v]``: the first key a later segment holds again, with the
        segment that holds it first and the later one."""
        self._where: dict[str, tuple] = {}
        self.clash: dict[str, tuple] = {}
        for v, segs in self.segs.items():
            k = np.concatenate([s["keys"] for s in segs])
            si = np.concatenate([np.full(len(s["keys"]), i, np.int64) for i, s in enumerate(segs)])
            lj = np.concatenate([np.arange(len(s["keys"]), dtype=np.int64) for s in segs])
            uk, first = np.unique(k, return_index=True)   # first occurrence in (segment, position) order
            self._where[v] = (uk, si[first], lj[first])
            again = np.ones(k.size, bool)
            again[first] = False
            if again.any():
                i = int(np.flatnonzero(again)[0])
                self.clash[v] = (float(k[i]), int(si[first][np.searchsorted(uk, k[i])]), int(si[i]))
        v0 = self.variables[0]
        common = reduce(np.intersect1d, (self._where[v][0] for v in self.variables))
        self.keys = np.asarray(common, dtype=np.float64)
        si, lj = self._locate(v0, self.keys)
        segs = self.segs[v0]
        self.times = np.empty(len(self.keys), dtype=np.asarray(segs[0]["times"]).dtype)
        for s in np.unique(si):
            at = si == s
            self.times[at] = np.asarray(segs[int(s)]["times"])[lj[at]]

    # -- files -----------------------------------------------------------------------------
    def __getstate__(self):
        s = dict(self.__dict__)
        s["_open"] = {i: ds for i, ds in self._open.items() if self.sources[i][1] is None}
        return s

    def __setstate__(self, s):
        self.__dict__.update(s)
        self._pid = os.getpid()

    def ds(self, i: int):
        """The dataset of source ``i``, opened lazily in this process."""
        if self._pid != os.getpid():  # forked DataLoader worker: never share netCDF handles
            self._open = {j: d for j, d in self._open.items() if self.sources[j][1] is None}
            self._pid = os.getpid()
        if i not in self._open:
            self._open[i] = open_lazy(self.sources[i][1])
        return self._open[i]

    # -- times -----------------------------------------------------------------------------
    def has(self, v: str, keys) -> np.ndarray:
        """Whether variable ``v`` has data at each of the time ``keys``."""
        uk = self._where[v][0]
        keys = np.asarray(keys, np.float64)
        if not uk.size:
            return np.zeros(keys.shape, bool)
        return uk[np.clip(np.searchsorted(uk, keys), 0, uk.size - 1)] == keys

    def _locate(self, v: str, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        uk, si, lj = self._where[v]
        p = np.clip(np.searchsorted(uk, keys), 0, max(uk.size - 1, 0))
        return si[p], lj[p]

    def segment(self, v: str, key: float) -> dict:
        """The segment that holds variable ``v`` at the time ``key``."""
        return self.segs[v][int(self._locate(v, np.asarray([key], np.float64))[0][0])]

    def _fmt_keys(self, keys) -> str:
        return _fmt_keys(keys, self.times)

    # -- reading ---------------------------------------------------------------------------
    def _level_index(self, v: str, seg: dict) -> list[int] | None:
        if "level_index" in seg:
            return seg["level_index"]
        name, ds = seg["name"], self.ds(seg["file"])
        ld = seg["level"]
        lv = self.levels.get(v)
        if not lv:
            if ld is not None:
                raise WeatherDataError(f"variable {v!r} of {name} has a level dim {ld!r}, which the checkpoint's "
                                       f"variable has not")
            idx = None
        else:
            if ld is None:
                raise WeatherDataError(f"variable {v!r} of {name} has no level dim; the checkpoint has it on "
                                       f"levels {lv}")
            fl = (np.asarray(ds[ld].values, np.float64) if ld in ds.variables
                  else np.arange(ds.sizes[ld], dtype=np.float64))
            idx = []
            for l in lv:
                i = level_pos(fl, l)
                if i is None:
                    raise WeatherDataError(f"level {l:g} of variable {v!r} is not in {name} (levels {_vals(fl, 20)})")
                idx.append(i)
        seg["level_index"] = idx
        return idx

    def _select(self, v: str, seg: dict, ind: dict, member: int, dtype) -> np.ndarray:
        """``seg``'s values of ``v`` at the positions ``ind`` (time first, then level, lat, lon; a level
        dim of size 1 where ``v`` has none), of the member at position ``member``."""
        li = self._level_index(v, seg)
        if li is not None:
            ind[seg["level"]] = _index(li)
        if seg["member"] is not None:
            ind[seg["member"]] = int(seg["member_index"][member])
        for d in seg["extra"]:  # size-1 dims (e.g. a single height level): dropped
            ind[d] = 0
        da = self.ds(seg["file"])[v].isel(ind)
        order = ([seg["time"]] if seg["time"] in da.dims else []) + ([seg["level"]] if li is not None else []) + \
            [seg["lat"], seg["lon"]]
        a = np.asarray(da.transpose(*order).values if list(da.dims) != order else da.values, dtype=dtype)
        return a if li is not None else np.expand_dims(a, -3)

    def _oriented(self, a: np.ndarray) -> np.ndarray:
        o = self.orient
        if o is not None and o["lat_flip"]:
            a = a[..., ::-1, :]
        if o is not None and o["lon_flip"]:
            a = a[..., ::-1]
        return np.ascontiguousarray(a)

    def read(self, v: str, keys, member: int = 0) -> np.ndarray:
        """``(n, L, lat, lon)`` values of ``v`` at the time ``keys`` (NaN where missing; ``L`` is 1 for a
        variable without levels), of the member at position ``member`` of each segment's members."""
        keys = np.asarray(keys, np.float64).ravel()
        ok = self.has(v, keys)
        if not ok.all():
            absent = [float(k) for k in keys[~ok]]
            raise WeatherDataError(f"variable {v!r} has no data at {len(absent)} of the times asked for in "
                                   f"{self.names} (first {self._fmt_keys(absent[:3])})")
        si, lj = self._locate(v, keys)
        if si.size and (si == si[0]).all() and (np.diff(lj) > 0).all():   # one file, ascending: read as asked
            seg = self.segs[v][int(si[0])]
            return self._oriented(self._select(v, seg, {seg["time"]: _index(lj)}, member, self.dtype))
        out = None
        for s in np.unique(si):
            sel = np.flatnonzero(si == s)
            seg = self.segs[v][int(s)]
            loc, inv = np.unique(lj[sel], return_inverse=True)   # ascending, each time read once
            a = self._select(v, seg, {seg["time"]: _index(loc)}, member, self.dtype)
            if out is None:
                out = np.empty((keys.size, *a.shape[1:]), self.dtype)
            out[sel] = a[inv.ravel()]
        return self._oriented(out)

    def read_static(self, v: str) -> np.ndarray:
        """``(L, lat, lon)`` float64 of a static field (a field with a time dim: its first time), all its
        levels, of the first member read."""
        seg = self.static.get(v)
        if seg is None:
            if v in self._where:
                seg = self.segs[v][0]
            else:
                raise WeatherDataError(f"static field {v!r} the checkpoint is conditioned on is not in {self.names}")
        ind: dict[str, Any] = {}
        if seg["time"] is not None:
            ind[seg["time"]] = 0
        if seg["member"] is not None:
            ind[seg["member"]] = seg["member_index"][0]   # static fields: the first chosen member
        for d in seg["extra"]:
            ind[d] = 0
        da = self.ds(seg["file"])[v].isel(ind)
        order = ([seg["level"]] if seg["level"] else []) + [seg["lat"], seg["lon"]]
        a = np.asarray(da.transpose(*order).values, dtype=np.float64)
        return self._oriented(a[None] if a.ndim == 2 else a)

    def lat_lon(self) -> tuple[np.ndarray, np.ndarray]:
        """Latitude and longitude of the first variable's first file, in the file's order."""
        seg = self.segs[self.variables[0]][0]
        ds = self.ds(seg["file"])
        return (np.asarray(ds[seg["lat"]].values, np.float64), np.asarray(ds[seg["lon"]].values, np.float64))

    # -- the forecaster's files ------------------------------------------------------------
    @classmethod
    def open(cls, data, variables: Sequence[str], levels: Mapping[str, Sequence[float]], *,
             level_dims: Mapping[str, str] | None = None, time_units: str | None = None,
             dims: Mapping[str, str] | None = None, member=None, statics: Sequence[str] = (),
             member_optional: bool = False) -> "Store":
        """Gridded files (or one xarray Dataset) read the adapter's way -- CF coordinate roles, decoded
        times (``time_units`` for files without CF units), levels chosen by value, the chosen members of
        a member dim -- without the adapter's statistics pass.  Arrays come back in float64, in the
        files' own order.

        ``member``: None (no choice: a member dim must have one member, else an error asking for one),
        a member value, a list of them, or ``"all"``.  ``members`` are the chosen member values
        (``[None]`` when no variable has a member dim), ``member_dim`` the member dim's name;
        :meth:`read` reads the member at a position of ``members``.  A variable without a member
        dim is the same for every member.  ``member_optional``: a member choice on files without a
        member dim is ignored (else an error)."""
        if hasattr(data, "data_vars"):
            sources = [("the data set", None, data)]
        else:
            sources = [(p.name, p, open_lazy(p)) for p in resolve_paths(data)]
        names = ", ".join(n for n, _, _ in sources)
        variables, level_dims = list(variables), dict(level_dims or {})
        segs: dict[str, list[dict]] = {v: [] for v in variables}
        static: dict[str, dict] = {}
        decoded: dict[int, np.ndarray] = {}
        for fi, (name, _, ds) in enumerate(sources):
            r = find_coords(ds, name, dims)
            for v in variables + list(statics):
                if v not in ds.data_vars:
                    continue
                seg, big = field_segment(ds, v, r, fi, name, level_dims.get(v))
                if seg is None:
                    continue
                d = tuple(map(str, ds[v].dims))
                if big:
                    raise WeatherDataError(
                        f"variable {v!r} of {name} has the dim(s) {', '.join(f'{x!r} (size {ds.sizes[x]})' for x in big)}"
                        f" besides time, one level, latitude, longitude and a member dim (dims {d}); select "
                        f"one value of it first (ds.isel({big[0]}=0)), or name its role with data.options.dims")
                if v in statics:
                    static.setdefault(v, seg)
                    continue
                if seg["time"] is None:
                    raise WeatherDataError(f"variable {v!r} of {name} has no time dim (dims {d})")
                if fi not in decoded:
                    decoded[fi] = decode_file_time(ds, seg["time"], name, time_units, how="time_units (data.options."
                                                   "time_units of the run, or --time-units)")
                seg["times"] = decoded[fi]
                seg["keys"] = _keys(decoded[fi])
                segs[v].append(seg)
        missing = [v for v in variables if not segs[v]]
        if missing:
            have = sorted({str(v) for _, _, ds in sources for v in ds.data_vars})
            raise WeatherDataError(f"variable(s) {missing} are not (as gridded fields with a time dim) in "
                                   f"{names}; they have {', '.join(have) or 'none'}")
        store = cls(sources, segs, static=static, levels=levels)
        store._choose_members(member, member_optional)
        one_calendar([s["times"] for v in variables for s in segs[v]])
        return store

    def _choose_members(self, member, optional: bool) -> None:
        """Resolve the member choice against every segment with a member dim (see the class doc)."""
        msegs = [s for v in self.variables for s in self.segs[v] if s["member"] is not None] + \
            [s for s in self.static.values() if s["member"] is not None]
        want = _member_list(member)
        self.member_dim = None
        if not msegs:
            if want is not None and not optional:
                shown = ALL_MEMBERS if want == ALL_MEMBERS else ", ".join(map(str, want))
                raise WeatherDataError(f"member {shown} was chosen, but no variable of {self.names} has a member dim "
                                       f"(member, number, realization, ...); leave the member choice out")
            self.members = [None]
            return
        first = msegs[0]
        vals0 = first["member_values"]
        self.member_dim = first["member"]
        if want is None:
            if len(vals0) > 1:
                raise WeatherDataError(
                    f"{first['name']} has {len(vals0)} members in its member dim {first['member']!r} (values "
                    f"{_vals(vals0)}) and no member was chosen; choose one with --member VALUE (member= in Python, "
                    f"data.options.member in a run), or every one with --member all")
            chosen = [0]
        elif want == ALL_MEMBERS:
            chosen = list(range(len(vals0)))
        else:
            chosen = []
            for w in want:
                i = _member_pos(vals0, w)
                if i is None:
                    raise WeatherDataError(f"member {w!r} is not in the member dim {first['member']!r} of "
                                           f"{first['name']}; its members are {_vals(vals0, 20)}")
                chosen.append(i)
        self.members = [_plain(vals0[i]) for i in chosen]
        for s in msegs:
            idx = []
            for i in chosen:
                j = _member_pos(s["member_values"], vals0[i]) if s is not first else i
                if j is None:
                    raise WeatherDataError(f"member {_plain(vals0[i])!r} of {first['name']} is not in the member dim "
                                           f"{s['member']!r} of {s['name']}; its members are "
                                           f"{_vals(s['member_values'], 20)}")
                idx.append(j)
            s["member_index"] = idx

    def member_label(self, pos: int) -> str:
        """``"member 3 of 'number'"`` for the member at ``pos`` ("" without a member dim)."""
        m = self.members[pos]
        return "" if m is None else f"member {m!r} of {self.member_dim!r}"


def check_grid(ds_or_path, layout: Layout, *, dims: Mapping[str, str] | None = None) -> None:
    """Raise :class:`WeatherDataError` unless the data (an xarray Dataset, a file, a glob or a list)
    are on the grid of ``layout`` (a checkpoint's) and hold its variables and levels."""
    a = layout.attrs
    if a.get("adapter") != ADAPTER:
        raise WeatherDataError(f"the layout was not made by the weather adapter (adapter {a.get('adapter')!r})")
    if hasattr(ds_or_path, "data_vars"):
        sets = [("the data set", ds_or_path)]
    else:
        sets = [(p.name, open_lazy(p)) for p in resolve_paths(ds_or_path)]
    have: dict[str, tuple] = {}
    for name, ds in sets:
        r = find_coords(ds, name, dims)
        if "latitude" not in r or "longitude" not in r:
            raise WeatherDataError(f"{name} has no latitude/longitude dims (dims: {', '.join(map(str, ds.dims))})")
        _same_coord(np.asarray(ds[r["latitude"]].values, np.float64), np.asarray(a["lat_values"]),
                    "latitude", name, "the checkpoint layout")
        _same_coord(np.asarray(ds[r["longitude"]].values, np.float64), np.asarray(a["lon_values"]),
                    "longitude", name, "the checkpoint layout")
        for v in ds.data_vars:
            have.setdefault(str(v), (name, ds))
    missing = [v for v in a["variables"] if v not in have]
    if missing:
        raise WeatherDataError(f"variable(s) {missing} of the checkpoint layout are not in "
                               f"{', '.join(n for n, _ in sets)}; they have {', '.join(sorted(have)) or 'none'}")
    for v, lv in a.get("levels", {}).items():
        name, ds = have[v]
        ld = a["level_dims"][v]
        if ld not in ds[v].dims:
            raise WeatherDataError(f"variable {v!r} of {name} has no level dim {ld!r} (dims {tuple(ds[v].dims)}), "
                                   f"which the checkpoint layout has")
        fl = np.asarray(ds[ld].values, np.float64) if ld in ds.variables else np.arange(ds.sizes[ld], dtype=np.float64)
        absent = [l for l in lv if level_pos(fl, l) is None]
        if absent:
            raise WeatherDataError(f"level(s) {absent} of variable {v!r} are not in {name} (levels {_vals(fl, 20)})")
