"""Observation files: sparse, noisy observations of a model's state as CF netCDF, read into
observation operators for guided sampling (``diffkit assimilate``), and made synthetically from a
truth file (``diffkit data ... --observe-from``).

Domain-free: a domain plugin describes how its files map onto a model's state with an
:class:`ObservationGrid` -- which file variable (and which level, or other extra-dim value) each
state channel is, the spatial axes (their names and coordinates in the model's orientation, which
are periodic), and how file times become numbers -- and this module does the rest.

**The file format** (docs/observations.md).  Two forms, told apart by the global attribute
``featureType``:

- *gridded* (no ``featureType``): each observed variable has the dims ``(time, [extra dims,]
  *spatial)`` of the truth file (e.g. ``(time, level, y, x)``); NaN (or the ``_FillValue``) marks
  the points that are not observed.  The grid must be the model's (the order of the coordinates may
  differ: a descending coordinate is matched value by value).  The
  operator is a mask (:class:`diffkit.guidance.MaskOperator`).
- *points* (``featureType = "point"``): every variable has the one dim ``obs``; the auxiliary
  coordinates ``time(obs)``, one per spatial axis (``y(obs)``, ``x(obs)``) and one per extra dim
  (``level(obs)``) place each observation.  Every observation needs a value (NaN is an error).  The
  operator interpolates the state multilinearly at the points (:class:`PointInterpolation`: bilinear
  on a 2-D grid, linear on a line), across the seam of periodic axes.

In both forms the observation error is an ancillary variable named by the data variable's
``ancillary_variables`` attribute (``{var}_sigma_y`` as written here): the standard deviation
sigma_y of the observation error in the variable's units, a scalar or one value per observation
(same dims as the variable).  It must be finite and > 0.

Times must be valid times of the assimilation window: the domain gives the window's times and a
tolerance (:meth:`ObservationGrid.with_window`); an observation at another time is an error naming it.
Another format (a domain's ``Assimilation.read``, :mod:`diffkit.assimilate`): :func:`point_observations`
makes the :class:`ObservationSet` of point observations given as arrays (a CSV of stations, say).
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping, Sequence

import numpy as np
import torch

from .errors import ObservationError
from .guidance import ObservationOperator

__all__ = ["ObservationError", "Axis", "ObservationGrid", "PointInterpolation", "StepObservations",
           "ObservationSet", "read_observations", "observation_window", "point_observations",
           "synthetic_observations", "SIGMA_SUFFIX", "FORMS"]

#: the name of a variable's observation-error variable is ``{var}{SIGMA_SUFFIX}``
SIGMA_SUFFIX = "_sigma_y"
#: the two forms of an observation file
FORMS = ("grid", "points")


# ----------------------------------------------------------------------------- the grid
@dataclass(frozen=True)
class Axis:
    """A spatial axis of the model's grid as observation files name it.

    ``coords``: the grid's coordinate values in the model's order (strictly monotonic, uniform where
    ``periodic``).  ``periodic``: the grid wraps: the cell between the last and the first point is part
    of the domain, and interpolation there uses both.  ``modulus``: a coordinate value is first reduced
    modulo this (e.g. 360 for an angle in degrees, so that -30 and 330 are the same place; the domain length
    for a periodic domain whose coordinates may be given unwrapped); None: values are taken as given.
    """

    name: str
    coords: tuple[float, ...]
    periodic: bool = False
    modulus: float | None = None

    def __post_init__(self):
        c = np.asarray(self.coords, dtype=np.float64)
        if c.ndim != 1 or c.size < 1:
            raise ValueError(f"Axis {self.name!r}: coords must be a non-empty 1-D sequence")
        object.__setattr__(self, "coords", tuple(float(v) for v in c))

    @property
    def values(self) -> np.ndarray:
        return np.asarray(self.coords, dtype=np.float64)

    @property
    def period(self) -> float | None:
        """The length of a periodic axis (points times the spacing), None for others."""
        c = self.values
        if not self.periodic or c.size < 2:
            return None
        return abs(c[1] - c[0]) * c.size

    def locate(self, p: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
        """``(i0, i1, w1, inside)`` for positions ``p``: the value there is ``(1 - w1) x[i0] + w1 x[i1]``;
        ``inside`` is False for positions outside the grid."""
        c = self.values
        p = np.asarray(p, dtype=np.float64)
        n = c.size
        if self.modulus:
            lo = min(c[0], c[-1])
            p = lo + np.mod(p - lo, self.modulus)
        if n == 1:
            inside = np.isclose(p, c[0])
            z = np.zeros(p.shape, np.int64)
            return z, z, np.zeros(p.shape), inside
        step = c[1] - c[0]
        asc = step > 0
        # work on an ascending copy, map the indices back
        ca = c if asc else c[::-1]
        if self.periodic:
            L = abs(step) * n
            q = p - ca[0]
            inside = (q >= -1e-9 * L) & (q < L * (1 + 1e-12))
            q = np.mod(q, L)
            f = q / abs(step)
            i0 = np.floor(f).astype(np.int64)
            w = f - i0
            i0 = np.clip(i0, 0, n - 1)
            i1 = (i0 + 1) % n
        else:
            tol = 1e-9 * (ca[-1] - ca[0])
            inside = (p >= ca[0] - tol) & (p <= ca[-1] + tol)
            pc = np.clip(p, ca[0], ca[-1])
            i0 = np.clip(np.searchsorted(ca, pc, side="right") - 1, 0, n - 2)
            i1 = i0 + 1
            w = (pc - ca[i0]) / (ca[i1] - ca[i0])
        if not asc:
            i0, i1 = n - 1 - i0, n - 1 - i1
        return i0, i1, np.clip(w, 0.0, 1.0), inside

    def index_of(self, values: np.ndarray, what: str) -> np.ndarray:
        """Indices of the grid points equal to ``values`` (a gridded file's coordinate); an error if any is not one."""
        c = self.values
        v = np.asarray(values, dtype=np.float64)
        tol = 1e-6 * max(1.0, float(np.abs(c).max()))
        d = np.abs(v[:, None] - c[None, :])
        j = d.argmin(1)
        bad = d[np.arange(v.size), j] > tol
        if bad.any() or v.size != c.size:
            raise ObservationError(
                f"{what}: the {self.name} coordinate ({_vals(v)}, {v.size} points) is not the model's grid ({_vals(c)}, "
                f"{c.size} points); write gridded observations on the grid the model was trained on, or use the points "
                f"form (featureType = \"point\")")
        return j


@dataclass(frozen=True)
class ObservationGrid:
    """How observation files map onto a model's state ``(C, *spatial)``; the domain plugin makes one.

    ``channels``: per state channel, ``(variable, {extra_dim: value})`` -- the file variable and the
    values of its extra dims (e.g. ``("q", {"level": 1.0})``; ``{}`` for a variable without).  ``axes``: the spatial axes in the model's order.  ``time_key``: decoded file times ->
    float keys in the units of ``window`` (e.g. hours since 1970, or a nondimensional time).
    ``window``: the keys of the valid times of the states being estimated, in order; ``tolerance``:
    how close an observation time must be to one of them.  ``format_time``: a key as text for messages.
    ``units``: per file variable, its units in the model (checked against the file's ``units``).
    """

    channels: tuple[tuple[str, Mapping[str, float]], ...]
    axes: tuple[Axis, ...]
    time_key: Callable[[Any], np.ndarray]
    window: tuple[float, ...] = ()
    tolerance: float = 1e-6
    format_time: Callable[[float], str] = lambda k: f"{k:g}"
    units: Mapping[str, str] = field(default_factory=dict)
    time_name: str = "time"

    @property
    def variables(self) -> list[str]:
        out = []
        for v, _ in self.channels:
            if v not in out:
                out.append(v)
        return out

    @property
    def shape(self) -> tuple[int, ...]:
        return tuple(len(a.coords) for a in self.axes)

    def extra_dims(self, variable: str) -> list[str]:
        for v, sel in self.channels:
            if v == variable:
                return list(sel)
        return []

    def channel_of(self, variable: str, selectors: Mapping[str, float], what: str) -> int:
        for c, (v, sel) in enumerate(self.channels):
            if v == variable and all(math.isclose(float(selectors[d]), float(x), rel_tol=1e-9, abs_tol=1e-9)
                                     for d, x in sel.items()):
                return c
        have = [", ".join(f"{d} {x:g}" for d, x in sel.items()) for v, sel in self.channels if v == variable]
        got = ", ".join(f"{d} {float(x):g}" for d, x in selectors.items())
        raise ObservationError(f"{what}: {variable!r} at {got} is not a state channel of the model (it has "
                               f"{variable!r} at {'; '.join(have)}); observe only the model's levels")

    def with_window(self, window: Sequence[float], tolerance: float) -> "ObservationGrid":
        import dataclasses

        return dataclasses.replace(self, window=tuple(float(w) for w in window), tolerance=float(tolerance))

    def step_of(self, keys: np.ndarray, what: str) -> np.ndarray:
        """The window index of each time key; an error naming the first time outside the window."""
        w = np.asarray(self.window, dtype=np.float64)
        if not w.size:
            raise ObservationError(f"{what}: no assimilation window was given")
        keys = np.asarray(keys, dtype=np.float64)
        d = np.abs(keys[:, None] - w[None, :])
        j = d.argmin(1)
        bad = d[np.arange(keys.size), j] > self.tolerance
        if bad.any():
            k = float(keys[np.flatnonzero(bad)[0]])
            where = "before" if k < w[0] else "after" if k > w[-1] else "between the steps of"
            raise ObservationError(
                f"{what}: {int(bad.sum())} observation(s) at times outside the assimilation window, the first at "
                f"{self.format_time(k)} ({where} the window's {w.size} valid time(s) {self.format_time(w[0])} .. "
                f"{self.format_time(w[-1])}); observe at the window's valid times, or choose another window "
                f"(--steps, and the domain's options in diffkit assimilate --help)")
        return j


def _vals(a, n: int = 3) -> str:
    a = np.asarray(a).ravel()
    if a.size <= 2 * n:
        return ", ".join(f"{x:g}" for x in a)
    return ", ".join(f"{x:g}" for x in a[:n]) + ", ..., " + ", ".join(f"{x:g}" for x in a[-n:])


# ----------------------------------------------------------------------------- point operator
class PointInterpolation(ObservationOperator):
    """The observation operator of point observations: multilinear interpolation of the state
    ``(B, C, *spatial)`` at ``N`` points, ``y[b, n] = sum_k w[n, k] x[b, c_n, corner_k(n)]``.

    Bilinear on a 2-D grid, linear on a line, and so on; across the seam of periodic axes the two
    neighbours are the last and the first grid point.  Linear, so exact for fields linear in each
    coordinate between grid points.  ``channel``: ``(N,)`` state channel of each point;
    ``positions``: one ``(N,)`` array per axis.  Points outside the grid raise
    :class:`ObservationError` naming the first one.
    """

    def __init__(self, axes: Sequence[Axis], channel, positions: Sequence, num_channels: int, *,
                 what: str = "observations"):
        channel = np.asarray(channel, dtype=np.int64).ravel()
        N = channel.size
        if len(positions) != len(axes):
            raise ObservationError(f"{what}: {len(positions)} coordinate(s) per point for {len(axes)} spatial axes")
        shape = tuple(len(a.coords) for a in axes)
        w = np.ones((N, 1))
        flat = channel[:, None] * int(np.prod(shape))
        for d, (ax, p) in enumerate(zip(axes, positions)):
            p = np.asarray(p, dtype=np.float64).ravel()
            i0, i1, w1, inside = ax.locate(p)
            if not inside.all():
                n = int(np.flatnonzero(~inside)[0])
                c = ax.values
                rng = (f"[{min(c[0], c[-1]):g}, {min(c[0], c[-1]) + ax.period:g}) (periodic)" if ax.periodic
                       and ax.period else f"[{min(c[0], c[-1]):g}, {max(c[0], c[-1]):g}]")
                raise ObservationError(
                    f"{what}: {int((~inside).sum())} point(s) outside the model's grid, the first at {ax.name} = "
                    f"{p[n]:g} (the grid's {ax.name} spans {rng}); drop them or observe inside the domain")
            stride = int(np.prod(shape[d + 1:]))
            flat = np.concatenate([flat + i0[:, None] * stride, flat + i1[:, None] * stride], 1)
            w = np.concatenate([w * (1 - w1)[:, None], w * w1[:, None]], 1)
        self.index = torch.as_tensor(flat, dtype=torch.long)       # (N, 2^d) into the flattened (C * prod(S))
        self.weight = torch.as_tensor(w, dtype=torch.float64)      # (N, 2^d)
        self.channel = torch.as_tensor(channel)
        self.in_shape = (int(num_channels), *shape)
        self.num_points = N

    linear = True

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        self._check_x(x)
        flat = x.flatten(1)                                          # (B, C * prod(S))
        vals = flat[:, self.index.to(x.device)]                      # (B, N, 2^d)
        return (vals * self.weight.to(device=x.device, dtype=x.dtype)).sum(-1)

    def out_shape(self, in_shape=None):
        return (self.num_points,)

    def transpose(self, v: torch.Tensor, in_shape=None) -> torch.Tensor:
        """``A^T v``: each observation's weights scattered back onto its grid corners, ``(B, C, *S)``."""
        B = v.shape[0]
        out = torch.zeros((B, int(np.prod(self.in_shape))), dtype=v.dtype, device=v.device)
        w = self.weight.to(device=v.device, dtype=v.dtype)
        idx = self.index.to(v.device)
        out.scatter_add_(1, idx.reshape(1, -1).expand(B, -1), (v[:, :, None] * w[None]).reshape(B, -1))
        return out.reshape(B, *self.in_shape)

    def matrix(self) -> torch.Tensor:
        """The operator as a dense ``(N, C * prod(S))`` matrix (for small problems and tests)."""
        D = int(np.prod(self.in_shape))
        A = torch.zeros((self.num_points, D), dtype=torch.float64)
        A.scatter_add_(1, self.index, self.weight)
        return A


# ----------------------------------------------------------------------------- observations per step
@dataclass
class StepObservations:
    """The observations of one valid time, in physical units: either a ``mask`` ``(C, *S)`` (gridded:
    the observed points, ``y`` in ``mask`` order) or a point ``operator``; ``sigma`` one value per
    observation."""

    y: torch.Tensor
    sigma: torch.Tensor
    mask: torch.Tensor | None = None
    operator: PointInterpolation | None = None

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The physical operator on physical states ``(B, C, *S)`` -> ``(B, N)``."""
        if self.mask is not None:
            return x[:, self.mask.to(x.device)]
        return self.operator(x)

    @property
    def count(self) -> int:
        return int(self.y.numel())


@dataclass
class ObservationSet:
    """What :func:`read_observations` returns: ``steps`` maps a window index to its observations."""

    steps: dict[int, StepObservations]
    form: str
    variables: list[str]
    path: Path

    @property
    def count(self) -> int:
        return sum(s.count for s in self.steps.values())

    def sigma_range(self) -> tuple[float, float]:
        s = torch.cat([o.sigma for o in self.steps.values()])
        return float(s.min()), float(s.max())


def open_observations(path):
    """An observation file opened with xarray (times decoded)."""
    import xarray as xr

    p = Path(path)
    if not p.exists():
        raise ObservationError(f"observation file {path} does not exist; make one with `diffkit data ... "
                               f"--observe-from TRUTH.nc` or see docs/observations.md")
    try:
        return xr.open_dataset(p, decode_timedelta=False).load()
    except Exception as e:  # noqa: BLE001 - any reader failure is one line
        raise ObservationError(f"cannot read the observation file {path} ({type(e).__name__}: "
                               f"{' '.join(str(e).split())}); give a netCDF file") from None


def observation_window(path, grid: ObservationGrid) -> np.ndarray:
    """The sorted distinct time keys of the observations in ``path`` (to choose a window from)."""
    ds = open_observations(path)
    name = grid.time_name
    if name not in ds.variables:
        raise ObservationError(f"{path}: no {name!r} coordinate; every observation needs a time (docs/observations.md)")
    keys = np.asarray(grid.time_key(ds[name].values), dtype=np.float64).ravel()
    keys = keys[np.isfinite(keys)]
    if not keys.size:
        raise ObservationError(f"{path}: the {name!r} coordinate holds no valid time")
    return np.unique(keys)


def _data_variables(ds) -> list[str]:
    sig = set()
    for v in ds.data_vars:
        anc = str(ds[v].attrs.get("ancillary_variables", "")).split()
        sig.update(anc)
    return [v for v in ds.data_vars if v not in sig and not str(v).endswith(SIGMA_SUFFIX)]


def _sigma_of(ds, v: str, shape, path) -> np.ndarray:
    names = str(ds[v].attrs.get("ancillary_variables", "")).split()
    name = names[0] if names else f"{v}{SIGMA_SUFFIX}"
    if name not in ds.variables:
        raise ObservationError(
            f"{path}: variable {v!r} has no observation error sigma_y; add a variable {v + SIGMA_SUFFIX!r} (a scalar or "
            f"one value per observation, in the units of {v!r}) and name it in {v!r}'s attribute "
            f"ancillary_variables")
    s = ds[name]
    if s.ndim and tuple(s.dims) != tuple(ds[v].dims):
        raise ObservationError(f"{path}: sigma_y variable {name!r} has dims {tuple(s.dims)}; give a scalar or the dims "
                               f"of {v!r} {tuple(ds[v].dims)}")
    a = np.broadcast_to(np.asarray(s.values, dtype=np.float64), shape)
    u_s, u_v = str(s.attrs.get("units", "")).strip(), str(ds[v].attrs.get("units", "")).strip()
    if u_s and u_v and u_s != u_v:
        raise ObservationError(f"{path}: sigma_y {name!r} is in {u_s!r} but {v!r} in {u_v!r}; give sigma_y in the "
                               f"units of the observations")
    return a


def _check_sigma(sig: np.ndarray, v: str, path) -> None:
    if np.isnan(sig).any() or np.isinf(sig).any():
        raise ObservationError(f"{path}: sigma_y of {v!r} holds NaN or inf ({int((~np.isfinite(sig)).sum())} value(s)); "
                               f"give a finite observation error > 0 for every observation")
    if (sig <= 0).any():
        raise ObservationError(f"{path}: sigma_y of {v!r} holds {int((sig <= 0).sum())} value(s) <= 0 (the smallest "
                               f"{float(sig.min()):g}); the observation error standard deviation must be > 0")


def _check_units(ds, v: str, grid: ObservationGrid, path) -> None:
    want = str(grid.units.get(v, "")).strip()
    got = str(ds[v].attrs.get("units", "")).strip()
    if want and got and want != got:
        raise ObservationError(f"{path}: variable {v!r} is in {got!r}, the model's {v!r} in {want!r}; convert the "
                               f"observations to {want!r}")


def read_observations(path, grid: ObservationGrid) -> ObservationSet:
    """The observations of ``path`` per window step, checked against ``grid`` (see the module doc):
    unknown variables, wrong dims, points outside the grid, times outside the window, NaN values (points
    form), missing or non-positive sigma_y are each a one-line :class:`ObservationError`."""
    ds = open_observations(path)
    form = "points" if str(ds.attrs.get("featureType", "")).strip().lower() == "point" else "grid"
    names = _known(_data_variables(ds), grid, path)
    parts: dict[int, list] = {}
    for v in names:
        _check_units(ds, v, grid, path)
        (_read_points if form == "points" else _read_gridded)(ds, v, grid, path, parts)
    return _assemble(parts, form, names, grid, path)


def _known(names: list, grid: ObservationGrid, path) -> list:
    """``names``, unless empty or one is not a variable of the model (an error)."""
    if not names:
        raise ObservationError(f"{path} holds no observation variable; it needs one of the model's variables "
                               f"({', '.join(grid.variables)})")
    unknown = [v for v in names if v not in grid.variables]
    if unknown:
        raise ObservationError(f"{path}: variable {unknown[0]!r} is not a variable of the model (its variables: "
                               f"{', '.join(grid.variables)}); rename or drop it")
    return names


def _assemble(parts: Mapping[int, list], form: str, names: list, grid: ObservationGrid, path) -> ObservationSet:
    """The :class:`ObservationSet` of the per-step ``parts`` the readers collect (in their order)."""
    C, S = len(grid.channels), grid.shape
    steps = {}
    for k, items in sorted(parts.items()):
        if form == "grid":
            mask = torch.zeros((C, *S), dtype=torch.bool)
            y = torch.full((C, *S), float("nan"), dtype=torch.float64)
            sg = torch.full((C, *S), float("nan"), dtype=torch.float64)
            for m, yy, ss in items:
                if bool((mask & m).any()):
                    raise ObservationError(f"{path}: two observations of the same point at "
                                           f"{grid.format_time(grid.window[k])}")
                mask |= m
                y[m], sg[m] = yy, ss
            steps[k] = StepObservations(y[mask], sg[mask], mask=mask)
        else:
            ch = np.concatenate([c for c, _, _, _ in items])
            pos = [np.concatenate([p[d] for _, p, _, _ in items]) for d in range(len(grid.axes))]
            op = PointInterpolation(grid.axes, ch, pos, C, what=str(path))
            steps[k] = StepObservations(torch.as_tensor(np.concatenate([y for _, _, y, _ in items])),
                                        torch.as_tensor(np.concatenate([s for _, _, _, s in items])), operator=op)
    if not steps:
        raise ObservationError(f"{path} holds no observation (every value is missing)")
    return ObservationSet(steps, form, list(names), Path(path))


def _read_gridded(ds, v, grid: ObservationGrid, path, parts) -> None:
    da = ds[v]
    extra = grid.extra_dims(v)
    want = (grid.time_name, *extra, *(a.name for a in grid.axes))
    if set(da.dims) != set(want) or len(da.dims) != len(want):
        raise ObservationError(
            f"{path}: variable {v!r} has the dims {tuple(da.dims)}; a gridded observation of {v!r} has the dims "
            f"{want} (or give points: one dim obs with featureType = \"point\")")
    da = da.transpose(*want)
    vals = np.asarray(da.values, dtype=np.float64)
    sig = _sigma_of(ds, v, vals.shape, path)
    if np.isinf(vals).any():
        raise ObservationError(f"{path}: variable {v!r} holds {int(np.isinf(vals).sum())} infinite value(s); "
                               f"unobserved points are NaN, observed ones finite")
    obs = ~np.isnan(vals)
    _check_sigma(sig[obs], v, path)
    # each axis matched value by value to the model's (any orientation)
    perm = [ax.index_of(ds[ax.name].values, f"{path}: variable {v!r}") for ax in grid.axes]
    keys = np.asarray(grid.time_key(ds[grid.time_name].values), dtype=np.float64)
    have = obs.reshape(obs.shape[0], -1).any(1)
    if not have.any():
        return
    k_of = np.full(keys.size, -1)
    k_of[have] = grid.step_of(keys[have], f"{path}: variable {v!r}")
    levels = [np.asarray(ds[d].values, dtype=np.float64) for d in extra]
    import itertools

    for t in np.flatnonzero(have):
        for li in itertools.product(*(range(len(l)) for l in levels)):
            o = obs[(t, *li)]
            if not o.any():
                continue
            c = grid.channel_of(v, {d: l[i] for d, l, i in zip(extra, levels, li)}, f"{path}")
            m = torch.zeros((len(grid.channels), *grid.shape), dtype=torch.bool)
            place = np.zeros(grid.shape, dtype=bool)
            yv = np.zeros(grid.shape)
            sv = np.zeros(grid.shape)
            ix = np.ix_(*perm)
            place[ix] = o
            yv[ix] = vals[(t, *li)]
            sv[ix] = sig[(t, *li)]
            m[c] = torch.from_numpy(place)
            parts.setdefault(int(k_of[t]), []).append((m, torch.from_numpy(yv[place]), torch.from_numpy(sv[place])))


def _read_points(ds, v, grid: ObservationGrid, path, parts) -> None:
    da = ds[v]
    if da.ndim != 1:
        raise ObservationError(f"{path}: variable {v!r} has the dims {tuple(da.dims)}; in the points form "
                               f"(featureType = \"point\") every observation variable has one dim (obs)")
    dim = da.dims[0]
    extra = grid.extra_dims(v)
    need = [grid.time_name, *(a.name for a in grid.axes), *extra]
    miss = [n for n in need if n not in ds.variables or ds[n].dims != (dim,)]
    if miss:
        raise ObservationError(f"{path}: variable {v!r} lacks the coordinate(s) {', '.join(miss)} along {dim!r}; a "
                               f"point observation of {v!r} needs {', '.join(f'{n}({dim})' for n in need)}")
    vals = np.asarray(da.values, dtype=np.float64)
    _add_points(parts, grid, v, ds[grid.time_name].values, [ds[a.name].values for a in grid.axes],
                [ds[d].values for d in extra], vals, _sigma_of(ds, v, vals.shape, path), path)


def _add_points(parts, grid: ObservationGrid, v: str, times, pos, ext, vals, sig, path) -> None:
    """Check the point observations of variable ``v`` (one entry per observation: file ``times``, the
    positions per axis, the extra-dim values ``ext`` per extra dim of ``v``) and add them to ``parts``."""
    vals = np.asarray(vals, dtype=np.float64)
    if not np.isfinite(vals).all():
        bad = np.flatnonzero(~np.isfinite(vals))
        raise ObservationError(f"{path}: variable {v!r} holds NaN or inf at {bad.size} of {vals.size} observations "
                               f"(the first is obs {int(bad[0])}); in the points form every observation needs a "
                               f"finite value: drop the missing ones")
    sig = np.broadcast_to(np.asarray(sig, dtype=np.float64), vals.shape)
    _check_sigma(sig, v, path)
    keys = np.asarray(grid.time_key(np.asarray(times)), dtype=np.float64).ravel()
    if not np.isfinite(keys).all():
        raise ObservationError(f"{path}: the time of {int((~np.isfinite(keys)).sum())} observation(s) is missing")
    k_of = grid.step_of(keys, f"{path}: variable {v!r}")
    pos = [np.asarray(p, dtype=np.float64) for p in pos]
    for d, p in zip(grid.axes, pos):
        if not np.isfinite(p).all():
            raise ObservationError(f"{path}: the {d.name} of {int((~np.isfinite(p)).sum())} observation(s) of {v!r} "
                                   f"is missing")
    extra = grid.extra_dims(v)
    ext = [np.asarray(e, dtype=np.float64) for e in ext]
    at = [tuple(float(e[n]) for e in ext) for n in range(vals.size)]
    combos = {key: grid.channel_of(v, dict(zip(extra, key)), f"{path}") for key in dict.fromkeys(at)}
    ch = np.array([combos[key] for key in at], dtype=np.int64)
    # the operator of the step checks the positions (one error for the file, not per step)
    PointInterpolation(grid.axes, ch, pos, len(grid.channels), what=f"{path}: variable {v!r}")
    for k in np.unique(k_of):
        sel = k_of == k
        parts.setdefault(int(k), []).append((ch[sel], [p[sel] for p in pos], vals[sel], sig[sel]))


def point_observations(path, grid: ObservationGrid, *, variable, time, position: Mapping[str, Any], value, sigma,
                       selectors: Mapping[str, Any] | None = None) -> ObservationSet:
    """Point observations as arrays, one entry per observation (what a domain's ``Assimilation.read`` of
    its own point format, a CSV of stations say, returns), checked and placed on ``grid``'s window as
    the points form of a netCDF file is: the :class:`ObservationSet` of :func:`read_observations`, bit
    for bit, for the same observations in the same order.  ``variable``: names; ``time``: as a decoded
    netCDF time coordinate (numbers, datetime64; ``grid.time_key`` makes them keys); ``position``:
    ``{axis name: coordinates}``; ``value``, ``sigma`` (sigma_y, or a scalar): in the variable's units;
    ``selectors``: ``{extra dim: values}`` for variables with extra dims; ``path``: for messages."""
    variable = np.asarray(variable).astype(str).ravel()
    n = variable.size
    missing = [a.name for a in grid.axes if a.name not in position]
    if missing:
        raise ObservationError(f"{path}: no {', '.join(missing)} position; point observations need "
                               f"{', '.join(a.name for a in grid.axes)}")
    arrays = {"time": time, "value": value, "sigma": np.broadcast_to(sigma, (n,)) if np.ndim(sigma) == 0 else sigma,
              **{a.name: position[a.name] for a in grid.axes}, **dict(selectors or {})}
    arrays = {k: np.asarray(a).ravel() for k, a in arrays.items()}
    for what, a in arrays.items():
        if a.size != n:
            raise ObservationError(f"{path}: {a.size} {what} value(s) for {n} observation(s); give one per observation")
    names = _known(list(dict.fromkeys(variable.tolist())), grid, path)
    parts: dict[int, list] = {}
    for v in names:
        sel = variable == v
        extra = grid.extra_dims(v)
        if any(d not in arrays for d in extra):
            raise ObservationError(f"{path}: variable {v!r} needs selectors {{{', '.join(extra)}: values}}")
        _add_points(parts, grid, v, arrays["time"][sel], [arrays[a.name][sel] for a in grid.axes],
                    [arrays[d][sel] for d in extra], arrays["value"][sel], arrays["sigma"][sel], path)
    return _assemble(parts, "points", names, grid, path)


# ----------------------------------------------------------------------------- synthetic observations
def synthetic_observations(values: np.ndarray, *, variables: Sequence[tuple[str, Mapping[str, float]]],
                           axes: Sequence[Axis], time, time_attrs: Mapping | None = None,
                           extra_coords: Mapping[str, tuple] | None = None, var_attrs: Mapping | None = None,
                           axis_attrs: Mapping | None = None, fraction: float | None = None,
                           stride: int | None = None, noise: float = 0.05, absolute: bool = False,
                           form: str = "grid", seed: int = 0, clim_std: Sequence[float] | None = None,
                           attrs: Mapping | None = None):
    """A CF observation dataset (see the module doc) of ``values`` ``(T, C, *S)`` (the truth, physical,
    axes in the order of ``axes``, channels as ``variables`` -- ``(name, {extra_dim: value})``).

    Where: ``fraction`` (of the grid points, drawn at random once with ``seed``, the same points at
    every time: fixed sensors; in the points form the stations are at random positions inside the
    domain, not only grid points, and their values are the truth interpolated there) or ``stride``
    (every ``stride``-th grid point along each axis).  Noise: ``sigma_y = noise * clim_std[c]`` per
    channel (``clim_std`` by default the std of ``values`` per channel over time and space), or
    ``noise`` itself with ``absolute=True``; the observed value is the truth plus Gaussian noise of
    that std (``seed``).  ``time``: the ``T`` time values (datetime64 or numbers) and ``time_attrs``
    their attributes; ``extra_coords``: ``{dim: (values, attrs)}`` of the extra dims; ``var_attrs``:
    ``{variable: attrs}`` (units...); ``axis_attrs``: ``{axis: attrs}``.
    """
    import xarray as xr

    values = np.asarray(values, dtype=np.float64)
    T, C = values.shape[:2]
    S = values.shape[2:]
    if form not in FORMS:
        raise ObservationError(f"the observation form must be one of {', '.join(FORMS)}, got {form!r}")
    if (fraction is None) == (stride is None):
        raise ObservationError("give either a fraction of the grid points (--obs-fraction F) or a stride "
                               "(--obs-stride K), not both and not neither")
    if fraction is not None and not 0 < fraction <= 1:
        raise ObservationError(f"--obs-fraction must be in (0, 1], got {fraction:g}")
    if stride is not None and (isinstance(stride, bool) or int(stride) != stride or stride < 1):
        raise ObservationError(f"--obs-stride must be an integer >= 1, got {stride!r}")
    if not (math.isfinite(noise) and noise > 0):
        what = "itself" if absolute else "as a fraction of the climatological std of each variable"
        raise ObservationError(f"--obs-noise must be > 0 and finite (sigma_y {what}), got {noise:g}")
    if len(variables) != C or len(axes) != len(S):
        raise ValueError(f"synthetic_observations: {len(variables)} variables / {len(axes)} axes for values of "
                         f"shape {values.shape}")
    if not np.isfinite(values).all():
        raise ObservationError("the truth holds NaN or inf; synthetic observations need a complete truth")
    rng = np.random.default_rng(seed)
    if clim_std is None:
        clim_std = values.transpose(1, 0, *range(2, values.ndim)).reshape(C, -1).std(1)
    clim_std = np.asarray(clim_std, dtype=np.float64)
    sig_c = np.full(C, float(noise)) if absolute else noise * clim_std
    if not (sig_c > 0).all():
        raise ObservationError("a variable of the truth is constant (climatological std 0): relative noise is 0 there; "
                               "give --obs-noise-absolute")
    order = list(dict.fromkeys(v for v, _ in variables))
    extra_of = {v: list(sel) for v, sel in variables}
    extra_coords = dict(extra_coords or {})
    var_attrs = {k: dict(a) for k, a in (var_attrs or {}).items()}
    axis_attrs = dict(axis_attrs or {})
    npts = int(np.prod(S))
    tattrs = dict(time_attrs or {})
    base = {"Conventions": "CF-1.8", "title": "diffkit synthetic observations", "source": "diffkit",
            "observation_noise": (f"sigma_y = {noise:g} (absolute)" if absolute else
                                  f"sigma_y = {noise:g} x the climatological std of each variable"),
            "observation_sampling": (f"fraction {fraction:g} of the grid points (seed {seed})" if fraction is not None
                                     else f"every {int(stride)}-th grid point along each axis"),
            **{k: v for k, v in (attrs or {}).items()}}
    noise_draw = rng.standard_normal  # one stream: positions first, then the noise
    if form == "grid":
        if fraction is not None:
            n = max(1, int(round(fraction * npts)))
            flat = np.zeros(npts, bool)
            flat[rng.choice(npts, n, replace=False)] = True
            where = flat.reshape(S)
        else:
            where = np.zeros(S, bool)
            where[tuple(slice(None, None, int(stride)) for _ in S)] = True
        obs = np.where(where, values + noise_draw(values.shape) * sig_c.reshape(C, *[1] * len(S)), np.nan)
        coords = {"time": ("time", np.asarray(time), tattrs)}
        for ax in axes:
            coords[ax.name] = (ax.name, ax.values, dict(axis_attrs.get(ax.name, {})))
        dv = {}
        for v in order:
            cs = [c for c, (vv, _) in enumerate(variables) if vv == v]
            ex = extra_of[v]
            for d in ex:
                vals_d, a_d = extra_coords[d]
                coords[d] = (d, np.asarray(vals_d, dtype=np.float64), dict(a_d))
            shape_ex = [len(extra_coords[d][0]) for d in ex]
            arr = obs[:, cs].reshape(T, *shape_ex, *S) if ex else obs[:, cs[0]]
            a = dict(var_attrs.get(v, {}))
            a["ancillary_variables"] = v + SIGMA_SUFFIX
            dims = ("time", *ex, *(ax.name for ax in axes))
            dv[v] = (dims, arr.astype(np.float32), a)
            sg = np.broadcast_to(sig_c[cs].reshape(1, *shape_ex, *[1] * len(S)) if ex else sig_c[cs[0]],
                                 arr.shape)
            dv[v + SIGMA_SUFFIX] = (dims, np.where(np.isnan(arr), np.nan, sg).astype(np.float32),
                                    _sigma_attrs(v, a))
        return xr.Dataset(dv, coords=coords, attrs=base)
    # points: fixed stations at every time and every channel combination of the variables
    groups = {}
    for c, (v, sel) in enumerate(variables):
        groups.setdefault(tuple(sorted(sel.items())), []).append(c)
    sets = {tuple(sorted(extra_of[v])) for v in order}
    if len(sets) > 1:
        raise ObservationError("the variables have different extra dims (levels); make one observation file per "
                               "variable (--obs-variables)")
    if fraction is not None:
        n = max(1, int(round(fraction * npts)))
        pos = []
        for ax in axes:
            c = ax.values
            lo, hi = min(c[0], c[-1]), max(c[0], c[-1])
            pos.append(rng.uniform(lo, lo + ax.period if ax.periodic and ax.period else hi, n))
    else:
        grids = np.meshgrid(*(ax.values[::int(stride)] for ax in axes), indexing="ij")
        pos = [g.ravel() for g in grids]
    nst = pos[0].size
    combos = list(groups.items())  # (extra selectors, [channels of each variable at them])
    rows_t, rows_s, rows_g = np.meshgrid(np.arange(T), np.arange(nst), np.arange(len(combos)), indexing="ij")
    rows_t, rows_s, rows_g = rows_t.ravel(), rows_s.ravel(), rows_g.ravel()
    N = rows_t.size
    dv = {}
    coords = {"time": ("obs", np.asarray(time)[rows_t], tattrs)}
    for ax, p in zip(axes, pos):
        coords[ax.name] = ("obs", p[rows_s], dict(axis_attrs.get(ax.name, {})))
    ex_dims = [d for d, _ in combos[0][0]]
    for j, d in enumerate(ex_dims):
        coords[d] = ("obs", np.asarray([combos[g][0][j][1] for g in rows_g], dtype=np.float64),
                     dict(extra_coords.get(d, ((), {}))[1]))
    for v in order:
        chans = [next(c for c in chs if variables[c][0] == v) for _, chs in combos]
        ch = np.asarray(chans)[rows_g]
        op = PointInterpolation(axes, np.zeros(nst, np.int64), pos, 1)
        truth = np.empty(N)
        for t in range(T):
            for g, c in enumerate(chans):
                sel = (rows_t == t) & (rows_g == g)
                field = torch.as_tensor(values[t, c][None, None])
                truth[sel] = op(field)[0].numpy()[rows_s[sel]]
        sg = sig_c[ch]
        y = truth + noise_draw(N) * sg
        a = dict(var_attrs.get(v, {}))
        a["ancillary_variables"] = v + SIGMA_SUFFIX
        a["coordinates"] = " ".join(["time", *(ax.name for ax in axes), *ex_dims])
        dv[v] = (("obs",), y.astype(np.float32), a)
        dv[v + SIGMA_SUFFIX] = (("obs",), sg.astype(np.float32), _sigma_attrs(v, a))
    coords["obs"] = ("obs", np.arange(N, dtype=np.int32), {"long_name": "observation index"})
    return xr.Dataset(dv, coords=coords, attrs={**base, "featureType": "point"})


def _sigma_attrs(v: str, a: Mapping) -> dict:
    out = {"long_name": f"standard deviation of the observation error of {v} (sigma_y)"}
    if a.get("units"):
        out["units"] = a["units"]
    if a.get("standard_name"):
        out["standard_name"] = f"{a['standard_name']} standard_error"
    return out


# ----------------------------------------------------------------------------- the --observe-from options
def add_observe_arguments(parser) -> None:
    """The options of synthetic observations shared by the domains' data commands (``--observe-from``)."""
    g = parser.add_argument_group(
        "synthetic observations (--observe-from)",
        "make an observation file (--out) of a truth file instead of simulating; docs/observations.md")
    g.add_argument("--observe-from", default=None, metavar="TRUTH.nc",
                   help="the truth file to observe: writes observations of it to --out")
    how = g.add_mutually_exclusive_group()
    how.add_argument("--obs-fraction", type=float, default=None, metavar="F",
                     help="observe a fraction F of the grid points, drawn at random (--seed), the same at every time; "
                          "in the points form, stations at random positions")
    how.add_argument("--obs-stride", type=int, default=None, metavar="K",
                     help="observe every K-th grid point along each spatial axis")
    g.add_argument("--obs-noise", type=float, default=0.05, metavar="SIGMA",
                   help="observation error std sigma_y as a fraction of each variable's climatological std "
                        "(default 0.05), or in the variable's units with --obs-noise-absolute")
    g.add_argument("--obs-noise-absolute", action="store_true", help="--obs-noise is sigma_y itself")
    g.add_argument("--obs-form", choices=FORMS, default="grid",
                   help="grid: the truth's grid with NaN where unobserved (default); points: one value per "
                        "observation with its time and coordinates")
    g.add_argument("--obs-variables", default=None, metavar="A,B",
                   help="variables to observe (default: every state variable of the truth file)")


def observe_requested(args) -> bool:
    """Whether a data command was asked for observations (and not a simulation); options of observations
    without --observe-from are an error."""
    if getattr(args, "observe_from", None):
        if args.obs_fraction is None and args.obs_stride is None:
            raise ObservationError("--observe-from needs --obs-fraction F or --obs-stride K (where to observe)")
        return True
    given = [f for f, v in (("--obs-fraction", args.obs_fraction), ("--obs-stride", args.obs_stride),
                            ("--obs-noise-absolute", args.obs_noise_absolute or None),
                            ("--obs-variables", args.obs_variables)) if v is not None]
    if given:
        raise ObservationError(f"{given[0]} makes observations of a truth file: give --observe-from TRUTH.nc")
    return False


def write_observations(ds, path, command: str) -> Path:
    """Write an observation dataset as CF netCDF, atomically (``history`` names ``command``)."""
    from .adapters import atomic_to_netcdf, cf_output

    return atomic_to_netcdf(cf_output(ds, title="diffkit synthetic observations", command=command), path)
