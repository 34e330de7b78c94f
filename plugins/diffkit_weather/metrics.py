"""WeatherBench-2-style probabilistic forecast metrics: the weather conventions on :mod:`diffkit.ensemble`.

The scores themselves (ensemble-mean RMSE, spread, spread/skill, fair and energy CRPS, rank
histograms) are computed by :mod:`diffkit.ensemble`, the one implementation in diffkit; this
module adds what is particular to gridded weather data: cell-area latitude weights, the dim
conventions (member, init time, latitude, longitude) and the xarray wrappers.  Definitions
follow WeatherBench 2 (Rasp et al. 2024, "WeatherBench 2: A benchmark for the next generation of
data-driven global weather models", JAMES 16, e2023MS004019) and its reference code
(``weatherbench2.metrics``); the CRPS estimators follow Ferro (2014, QJRMS 140, 1917) and Zamo &
Naveau (2018, Math. Geosci. 50, 209).

Conventions (tensor functions)
------------------------------
- Inputs are torch tensors or anything :func:`torch.as_tensor` accepts (numpy arrays); all
  arithmetic is float64 on the forecast's device and results are float64.
- The *layout* is the member-free shape ``(..., lat, lon)`` of the truth.  An ensemble forecast
  is that layout with one extra member dim at ``member_dim`` (an index into the forecast).
  ``lat_dim``, ``lon_dim`` and ``init_dim`` index the layout (defaults ``-2``, ``-1`` and
  ``None``); negative indices are the safe choice.  The truth broadcasts against the forecast
  with its member dim removed.
- ``weights``: ``None`` (uniform), a 1-D ``(nlat,)`` tensor placed along ``lat_dim`` (e.g.
  :func:`latitude_weights`), or any non-negative tensor that broadcasts to the layout.
- ``mask``: optional bool or non-negative float tensor that broadcasts to the layout; True / >0
  marks valid points.  Masked points get weight 0 and their values (NaN included) are never
  used.  Unmasked NaN propagates to the result, as in WB2.
- Order of averaging: a pointwise score -> area-weighted mean over (lat, lon) per remaining index
  -> (for RMSE and spread, square root) -> mean over ``init_dim``, equal weight per init time
  (``dims=(lat, lon)`` and ``sample_dims=(init,)`` of :mod:`diffkit.ensemble`).
  Init times with no valid point (everything masked) are left out of the init mean.
  ``sqrt_first=True`` (default) takes the square root per init time *before* the init mean
  (WB2's ``RMSESqrtBeforeTimeAvg``, ``EnsembleMeanRMSESqrtBeforeTimeAvg`` and
  ``EnsembleStddevSqrtBeforeTimeAvg``); ``sqrt_first=False`` averages the MSE / the variance
  over init times first and takes the root last (WB2's ``EnsembleMeanMSE``/``EnsembleVariance``
  followed by a square root).  RMSE and spread always use the same order, so their ratio is
  consistent.
- The spread/skill ratio is always ``sqrt((M + 1) / M) * spread / RMSE`` (1 for a reliable
  ensemble), the one convention of :mod:`diffkit.ensemble`.

The ``*_da`` wrappers take :class:`xarray.DataArray` (or :class:`xarray.Dataset`, per variable)
with named dims: member ``"member"`` or ``"realization"``, init ``"init_time"``, latitude
``"latitude"`` or ``"lat"``, longitude ``"longitude"`` or ``"lon"``; every other dim (lead_time,
level, ...) is kept, with its coordinates.  :func:`metric_da` applies any registered ensemble
metric (:func:`diffkit.ensemble.registered`) the same way.  Importing this module does not
import xarray.
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from diffkit import ensemble as E
from diffkit.ensemble import _as64, _dim, crps_pointwise  # noqa: F401  (crps_pointwise: re-exported)
from diffkit.errors import ShapeError

__all__ = [
    "latitude_weights", "spatial_mean", "rmse", "crps_pointwise", "crps", "spread",
    "spread_skill_ratio", "rank_histogram",
    "rmse_da", "crps_da", "spread_da", "spread_skill_ratio_da", "rank_histogram_da", "metric_da",
    "METRICS", "MEMBER_DIMS", "INIT_DIM", "LAT_DIMS", "LON_DIMS",
]

_F64 = torch.float64
MEMBER_DIMS = ("member", "realization")
INIT_DIM = "init_time"
LAT_DIMS = ("latitude", "lat")
LON_DIMS = ("longitude", "lon")


# ----------------------------------------------------------------------------- helpers
def _layout_dims(nd: int, lat_dim: int, lon_dim: int, init_dim: int | None) -> tuple[int, int, int | None]:
    lat, lon = _dim(lat_dim, nd, "lat_dim"), _dim(lon_dim, nd, "lon_dim")
    init = None if init_dim is None else _dim(init_dim, nd, "init_dim")
    if len({lat, lon, init} - {None}) != 2 + (init is not None):
        raise ShapeError(f"lat_dim, lon_dim and init_dim must be distinct dims, got {lat_dim}, {lon_dim}, {init_dim}")
    return lat, lon, init


def _shape(x) -> tuple[int, ...]:
    return tuple(x.shape) if hasattr(x, "shape") else np.shape(x)


def _layout(forecast, truth, member_dim) -> tuple[int, ...]:
    """The layout's shape: the forecast without its member dim, broadcast against the truth."""
    fs = list(_shape(forecast))
    if member_dim is not None and fs:
        del fs[_dim(member_dim, len(fs), "member_dim")]
    if truth is None:
        return tuple(fs)
    try:
        return tuple(torch.broadcast_shapes(tuple(fs), _shape(truth)))
    except RuntimeError:
        return tuple(fs)  # diffkit.ensemble names the mismatch


def _core_kw(shape: tuple[int, ...], weights, lat_dim, lon_dim, init_dim) -> dict:
    """:mod:`diffkit.ensemble` keywords for a weather layout: weights (1-D along lat), dims, sample dims."""
    nd = len(shape)
    lat, lon, init = _layout_dims(nd, lat_dim, lon_dim, init_dim)
    if weights is not None:
        weights = _as64(weights, "weights")
        if weights.ndim == 1:
            if weights.shape[0] != shape[lat]:
                raise ShapeError(f"1-D weights have {weights.shape[0]} entries but lat dim {lat} of the layout "
                                 f"{tuple(shape)} has {shape[lat]}")
            weights = weights.reshape([shape[lat] if d == lat else 1 for d in range(nd)])
    return dict(weights=weights, dims=(lat, lon), sample_dims=() if init is None else (init,))

# ----------------------------------------------------------------------------- weights
def latitude_weights(lat_degrees) -> torch.Tensor:
    """Cell-area latitude weights ``(nlat,)``, normalised to mean 1 (WB2 ``get_lat_weights``).

    ``w_j = sin(upper_j) - sin(lower_j)`` (the integral of cos(lat) over the band), with band
    edges halfway between neighbouring grid latitudes; the first and last rows extend half a
    spacing beyond their centre, clipped to +-90 deg.  Unlike WB2, whose outer edges are always
    the poles, this is also correct for regional grids.  Latitudes may be ascending or
    descending (strictly monotonic) and unevenly spaced (Gaussian grids); one latitude gets
    weight 1.
    """
    lat = _as64(lat_degrees, "lat_degrees")
    if lat.ndim != 1 or lat.numel() == 0:
        raise ShapeError(f"lat_degrees must be a non-empty 1-D array, got shape {tuple(lat.shape)}")
    if not bool(torch.isfinite(lat).all()) or bool((lat.abs() > 90).any()):
        raise ValueError("latitudes must be finite and within [-90, 90] degrees")
    if lat.numel() == 1:
        return torch.ones_like(lat)
    d = lat.diff()
    if not (bool((d > 0).all()) or bool((d < 0).all())):
        raise ValueError("latitudes must be strictly monotonic (ascending or descending)")
    edges = torch.cat([lat[:1] - d[:1] / 2, (lat[:-1] + lat[1:]) / 2, lat[-1:] + d[-1:] / 2]).clamp(-90.0, 90.0)
    w = torch.deg2rad(edges).sin().diff().abs()
    return w / w.mean()


def spatial_mean(x, weights=None, *, mask=None, lat_dim: int = -2, lon_dim: int = -1) -> torch.Tensor:
    """Weighted mean of ``x`` over (lat, lon): ``sum(w m x) / sum(w m)`` (WB2 ``_spatial_average``).

    Returns ``x`` without its lat and lon dims; NaN where every point is masked.
    """
    return E.weighted_mean(x, mask=mask, **_core_kw(_shape(x), weights, lat_dim, lon_dim, None))


# ----------------------------------------------------------------------------- scores
def rmse(forecast, truth, weights=None, *, member_dim: int | None = None, mask=None, init_dim: int | None = None,
         lat_dim: int = -2, lon_dim: int = -1, sqrt_first: bool = True) -> torch.Tensor:
    """Area-weighted RMSE: ``sqrt(spatial_mean((f - y)^2))`` per init time, then the mean over inits.

    Deterministic by default; with ``member_dim`` the forecast is an ensemble and its ensemble mean
    is scored (WB2 ``EnsembleMeanRMSESqrtBeforeTimeAvg``).  ``sqrt_first=False`` gives
    ``sqrt(mean over inits of the spatial MSE)`` instead.  Returns the layout without lat, lon
    and init dims.
    """
    kw = _core_kw(_layout(forecast, truth, member_dim), weights, lat_dim, lon_dim, init_dim)
    if member_dim is not None:
        return E.ensemble_mean_rmse(forecast, truth, member_dim=member_dim, mask=mask, sqrt_first=sqrt_first, **kw)
    return E.rmse(forecast, truth, mask=mask, sqrt_first=sqrt_first, **kw)


def crps(forecast, truth, weights=None, *, member_dim: int = 0, mask=None, init_dim: int | None = None,
         lat_dim: int = -2, lon_dim: int = -1, estimator: str = "fair", method: str = "sort") -> torch.Tensor:
    """Ensemble CRPS (:func:`crps_pointwise`), area-weighted mean over space, then mean over inits (WB2 ``CRPS``)."""
    kw = _core_kw(_layout(forecast, truth, member_dim), weights, lat_dim, lon_dim, init_dim)
    return E.crps(forecast, truth, member_dim=member_dim, mask=mask, estimator=estimator, method=method, **kw)


def spread(forecast, weights=None, *, member_dim: int = 0, mask=None, init_dim: int | None = None,
           lat_dim: int = -2, lon_dim: int = -1, sqrt_first: bool = True) -> torch.Tensor:
    """Ensemble spread: ``sqrt(spatial_mean(var_members))`` per init time (ddof=1), then the mean over inits.

    WB2 ``EnsembleStddevSqrtBeforeTimeAvg``; ``sqrt_first=False`` gives ``sqrt`` of the init mean of
    the spatial-mean variance (WB2 ``EnsembleVariance``, root taken last).  Needs ``M >= 2``.
    """
    kw = _core_kw(_layout(forecast, None, member_dim), weights, lat_dim, lon_dim, init_dim)
    return E.spread(forecast, member_dim=member_dim, mask=mask, sqrt_first=sqrt_first, **kw)


def spread_skill_ratio(forecast, truth, weights=None, *, member_dim: int = 0, mask=None,
                       init_dim: int | None = None, lat_dim: int = -2, lon_dim: int = -1,
                       sqrt_first: bool = True, calibrated: bool = True) -> torch.Tensor:
    """Spread/skill ``sqrt((M + 1) / M) * spread / RMSE(ensemble mean)`` (:func:`spread`, :func:`rmse`, same order).

    Fortin et al. (2014, J. Hydrometeor. 15, 1708): a reliable ensemble has
    ``E[(xbar - y)^2] = (1 + 1/M) E[s^2]``, so the ratio is 1; below that the ensemble is
    under-dispersive.  The correction is always applied (:mod:`diffkit.ensemble`); ``calibrated``
    is accepted for compatibility and must be True (the raw ratio is ``spread / rmse``).
    """
    if calibrated is not True:
        raise ValueError("the spread/skill ratio is always sqrt((M+1)/M)-corrected; for the raw ratio divide "
                         "spread() by rmse(member_dim=...)")
    kw = _core_kw(_layout(forecast, truth, member_dim), weights, lat_dim, lon_dim, init_dim)
    return E.spread_skill_ratio(forecast, truth, member_dim=member_dim, mask=mask, sqrt_first=sqrt_first, **kw)


def rank_histogram(forecast, truth, *, member_dim: int = 0, mask=None, keep_dims: Sequence[int] = (),
                   generator: torch.Generator | int | None = None, normalize: bool = False) -> torch.Tensor:
    """Rank histogram (Talagrand diagram): counts of the truth's rank among the ``M`` members, ``M + 1`` bins.

    :func:`diffkit.ensemble.rank_histogram` (ties at random from ``generator``, a
    :class:`torch.Generator` or an int seed), counting every valid (unmasked) point, unweighted,
    over all layout dims except ``keep_dims``; returns int64 ``(*kept, M + 1)`` (kept dims in
    layout order), or float64 fractions summing to 1 with ``normalize=True``.  Unmasked NaN/inf
    raises :class:`~diffkit.errors.NonFiniteError` (mask them).
    """
    nd = len(_layout(forecast, truth, member_dim))
    keep = [_dim(d, nd, "keep_dims") for d in keep_dims]
    if len(set(keep)) != len(keep):
        raise ShapeError(f"keep_dims has repeated dims: {tuple(keep_dims)}")
    return E.rank_histogram(forecast, truth, member_dim=member_dim, mask=mask,
                            dims=[d for d in range(nd) if d not in keep], generator=generator, normalize=normalize)


# ----------------------------------------------------------------------------- xarray wrappers
def _find_dim(dims, name, candidates, what: str, required: bool = True):
    if name is not None:
        if name not in dims:
            raise ShapeError(f"{what} dim {name!r} is not among the dims {tuple(dims)}")
        return name
    found = [c for c in candidates if c in dims]
    if len(found) > 1:
        raise ShapeError(f"several {what} dims {found} in {tuple(dims)}; pass {what}_dim= to choose")
    if not found:
        if required:
            raise ShapeError(f"no {what} dim (one of {candidates}) in {tuple(dims)}; pass {what}_dim=")
        return None
    return found[0]


def _from_xr(da, dtype=_F64) -> torch.Tensor:
    """A writable copy of ``da``'s values (xarray's broadcasts are read-only views)."""
    t = torch.from_numpy(np.array(da.values))
    return t if dtype is None else t.to(dtype)


def _da_call(core, forecast, truth, *, weights, mask, member_dim, init_dim, lat_dim, lon_dim, ensemble: bool,
             rank: bool = False, **kw):
    """Map named dims onto the layout ``(*other, [init], lat, lon)`` (forecast ``(*other, [init], [member], lat,
    lon)``) and call ``core``, a function of :mod:`diffkit.ensemble`'s calling convention."""
    import xarray as xr

    if isinstance(forecast, xr.Dataset):
        out = {}
        for k in forecast.data_vars:
            m = mask[k] if isinstance(mask, xr.Dataset) else mask
            out[k] = _da_call(core, forecast[k], None if truth is None else truth[k], weights=weights, mask=m,
                              member_dim=member_dim, init_dim=init_dim, lat_dim=lat_dim, lon_dim=lon_dim,
                              ensemble=ensemble, rank=rank, **kw)
        return xr.Dataset(out)
    lat = _find_dim(forecast.dims, lat_dim, LAT_DIMS, "lat")
    lon = _find_dim(forecast.dims, lon_dim, LON_DIMS, "lon")
    member = _find_dim(forecast.dims, member_dim, MEMBER_DIMS, "member") if ensemble else None
    excl = [member] if member else []
    if truth is not None:
        if member and member in truth.dims:
            raise ShapeError(f"truth has the member dim {member!r}")
        forecast, truth = xr.align(forecast, truth, join="exact")
        fc, tr = xr.broadcast(forecast, truth, exclude=excl)
    else:
        fc = forecast
        tr = forecast.isel({member: 0}, drop=True) if member else forecast
    init = init_dim if init_dim is not None and init_dim in fc.dims else None
    special = {lat, lon, member, init}
    other = [d for d in fc.dims if d not in special]
    tail = ([init] if init else []) + [lat, lon]
    fc = fc.transpose(*other, *tail[:-2], *excl, lat, lon)
    tr = tr.transpose(*other, *tail)
    if weights is None:
        w = latitude_weights(fc[lat].values)
    elif isinstance(weights, xr.DataArray):
        if set(weights.dims) - {lat, lon}:
            raise ShapeError(f"weights dims {weights.dims} must be among ({lat!r}, {lon!r})")
        weights, _ = xr.align(weights, tr, join="exact")
        w = _from_xr(xr.broadcast(weights, tr[lat], tr[lon])[0].transpose(lat, lon))
    else:
        w = weights
    if isinstance(mask, xr.DataArray):
        if member and member in mask.dims:
            raise ShapeError(f"mask has the member dim {member!r}; masks are per point of the truth layout")
        mask, _ = xr.align(mask, tr, join="exact")
        mask = _from_xr(mask.broadcast_like(tr).transpose(*tr.dims), dtype=None)
    args = dict(member_dim=-3) if member else {}
    fct = _from_xr(fc)
    trt = [] if truth is None else [_from_xr(tr)]
    if rank:
        res = core(fct, *trt, mask=mask, dims=tuple(range(len(other), tr.ndim)), **args, **kw)
    else:
        res = core(fct, *trt, mask=mask, **_core_kw(tuple(tr.shape), w, -2, -1, -3 if init else None), **args, **kw)
    coords = {k: c.variable for k, c in tr.coords.items() if set(c.dims) <= set(other)}
    dims = list(other)
    attrs = {}
    if member:
        attrs["ensemble_size"] = fc.sizes[member]
    if rank:
        dims.append("rank")
        coords["rank"] = ("rank", list(range(fc.sizes[member] + 1)))
    return xr.DataArray(res.cpu().numpy(), dims=dims, coords=coords, name=forecast.name, attrs=attrs)


def metric_da(fn, forecast, truth, *, weights=None, mask=None, member_dim: str | None = None,
              init_dim: str | None = INIT_DIM, lat_dim: str | None = None, lon_dim: str | None = None, **options):
    """Any ensemble metric ``fn`` of :mod:`diffkit.ensemble`'s convention (``fn.kind == "ensemble"``, e.g. from
    :func:`diffkit.ensemble.registered`) on DataArrays/Datasets: latitude-weighted over (lat, lon), averaged
    over ``init_dim`` when present; the remaining dims are kept with their coordinates."""
    return _da_call(fn, forecast, truth, weights=weights, mask=mask, member_dim=member_dim, init_dim=init_dim,
                    lat_dim=lat_dim, lon_dim=lon_dim, ensemble=True, **options)


def rmse_da(forecast, truth, *, weights=None, mask=None, member_dim: str | None = None,
            init_dim: str | None = INIT_DIM, lat_dim: str | None = None, lon_dim: str | None = None,
            sqrt_first: bool = True):
    """:func:`rmse` on DataArrays/Datasets; ``member_dim="member"`` scores the ensemble mean.

    Without ``member_dim`` a member dim is kept like any other dim (RMSE per member).  Weights
    default to :func:`latitude_weights` of the latitude coordinate; the mean over ``init_dim`` is
    taken when that dim is present.  Returns the remaining dims with their coordinates.
    """
    core = E.rmse if member_dim is None else E.ensemble_mean_rmse
    return _da_call(core, forecast, truth, weights=weights, mask=mask, member_dim=member_dim, init_dim=init_dim,
                    lat_dim=lat_dim, lon_dim=lon_dim, ensemble=member_dim is not None, sqrt_first=sqrt_first)


def crps_da(forecast, truth, *, weights=None, mask=None, member_dim: str | None = None,
            init_dim: str | None = INIT_DIM, lat_dim: str | None = None, lon_dim: str | None = None,
            estimator: str = "fair", method: str = "sort"):
    """:func:`crps` on DataArrays/Datasets (member dim ``"member"`` or ``"realization"`` unless given)."""
    return _da_call(E.crps, forecast, truth, weights=weights, mask=mask, member_dim=member_dim, init_dim=init_dim,
                    lat_dim=lat_dim, lon_dim=lon_dim, ensemble=True, estimator=estimator, method=method)


def spread_da(forecast, *, weights=None, mask=None, member_dim: str | None = None,
              init_dim: str | None = INIT_DIM, lat_dim: str | None = None, lon_dim: str | None = None,
              sqrt_first: bool = True):
    """:func:`spread` on DataArrays/Datasets."""
    return _da_call(E.spread, forecast, None, weights=weights, mask=mask, member_dim=member_dim, init_dim=init_dim,
                    lat_dim=lat_dim, lon_dim=lon_dim, ensemble=True, sqrt_first=sqrt_first)


def spread_skill_ratio_da(forecast, truth, *, weights=None, mask=None, member_dim: str | None = None,
                          init_dim: str | None = INIT_DIM, lat_dim: str | None = None, lon_dim: str | None = None,
                          sqrt_first: bool = True, calibrated: bool = True):
    """:func:`spread_skill_ratio` on DataArrays/Datasets (always ``sqrt((M + 1) / M)``-corrected)."""
    if calibrated is not True:
        raise ValueError("the spread/skill ratio is always sqrt((M+1)/M)-corrected; for the raw ratio divide "
                         "spread_da() by rmse_da(member_dim=...)")
    return _da_call(E.spread_skill_ratio, forecast, truth, weights=weights, mask=mask, member_dim=member_dim,
                    init_dim=init_dim, lat_dim=lat_dim, lon_dim=lon_dim, ensemble=True, sqrt_first=sqrt_first)


def rank_histogram_da(forecast, truth, *, mask=None, member_dim: str | None = None,
                      init_dim: str | None = INIT_DIM, lat_dim: str | None = None, lon_dim: str | None = None,
                      generator: torch.Generator | int | None = None, normalize: bool = False):
    """:func:`rank_histogram` on DataArrays/Datasets: counts over init (when present), lat and lon per
    remaining dims, with a new trailing dim ``"rank"`` (``0..M``)."""
    return _da_call(E.rank_histogram, forecast, truth, weights=None, mask=mask, member_dim=member_dim,
                    init_dim=init_dim, lat_dim=lat_dim, lon_dim=lon_dim, ensemble=True, rank=True,
                    generator=generator, normalize=normalize)


METRICS = {
    "weather_rmse": rmse,
    "weather_crps": crps,
    "weather_spread": spread,
    "weather_spread_skill_ratio": spread_skill_ratio,
    "weather_rank_histogram": rank_histogram,
}
"""The weather-convention tensor functions (lat/lon/init dims), registered through the ``diffkit_metrics``
hook with the plugin's prefix.  They are not ``kind="ensemble"``: the core registers the scores in the
uniform ensemble convention (``ensemble_*``), which :func:`metric_da` applies to weather data."""
