"""WeatherBench-2-style metrics of the weather plugin (``diffkit_weather.metrics``).

CRPS is cross-checked against scoringrules (fair and energy estimators) and properscoring (energy
form) on the same random numbers; RMSE, spread and the averaging order against hand computations
in numpy; the spread/skill ratio and the rank histogram against the known values for reliable
and under-dispersive synthetic ensembles (fixed seeds, tolerances of several standard errors);
masks by changing the values under them; the xarray wrappers against the tensor core.  Small
sizes: the file runs in a few seconds on one CPU thread.
"""
from __future__ import annotations

import math
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import properscoring
import pytest
import scoringrules
import torch
import xarray as xr
from scipy import stats

try:
    import diffkit_weather  # noqa: F401
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import diffkit_weather  # noqa: F401

from diffkit.errors import NonFiniteError, ShapeError
from diffkit_weather import metrics as W

F64 = torch.float64


def close(a, b, **kw):
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), **kw)


def _np_spatial_mean(x, w_lat):
    """Reference area-weighted mean over the last two dims (lat, lon) in numpy."""
    w = np.broadcast_to(w_lat[:, None], x.shape[-2:])
    return (x * w).sum((-2, -1)) / w.sum()


# ----------------------------------------------------------------------------- CRPS
@pytest.mark.parametrize("estimator", ["fair", "nrg"])
@pytest.mark.parametrize("method", ["sort", "pairwise"])
def test_crps_pointwise_matches_scoringrules(estimator, method):
    rng = np.random.default_rng(0)
    fc = rng.normal(size=(3, 7, 4, 5)) * 2 + 1  # (init, member, lat, lon)
    y = rng.normal(size=(3, 4, 5))
    ours = W.crps_pointwise(fc, y, member_dim=1, estimator=estimator, method=method)
    ref = scoringrules.crps_ensemble(y, fc, m_axis=1, estimator=estimator)
    assert ours.dtype == F64 and ours.shape == (3, 4, 5)
    close(ours, ref, rtol=1e-12, atol=1e-12)


def test_crps_nrg_matches_properscoring_and_fair_differs():
    rng = np.random.default_rng(1)
    fc = rng.normal(size=(6, 4, 5))
    y = rng.normal(size=(4, 5))
    nrg = W.crps_pointwise(torch.from_numpy(fc).float(), y, member_dim=0, estimator="nrg")
    close(nrg, properscoring.crps_ensemble(y, np.moveaxis(fc, 0, -1)), rtol=1e-6, atol=1e-6)
    fair = W.crps_pointwise(fc, y, member_dim=0, estimator="fair")
    # fair = nrg - (pair term) * (1/(2M(M-1)) - 1/(2M^2)) < nrg wherever members differ
    assert bool((fair < nrg).all())


def test_crps_sort_equals_pairwise_with_ties_and_known_values():
    rng = np.random.default_rng(2)
    fc = rng.integers(0, 3, size=(5, 6, 7)).astype(float)  # many ties
    y = rng.integers(0, 3, size=(6, 7)).astype(float)
    for est in ("fair", "nrg"):
        close(W.crps_pointwise(fc, y, estimator=est, method="sort"),
              W.crps_pointwise(fc, y, estimator=est, method="pairwise"), rtol=0, atol=1e-12)
    # two members {0, 2}, truth 1: mean |X - y| = 1, sum_{i,j} |Xi - Xj| = 4
    two = torch.tensor([0.0, 2.0]).reshape(2, 1, 1)
    one = torch.ones(1, 1)
    close(W.crps_pointwise(two, one, estimator="fair"), [[1 - 4 / 4]])
    close(W.crps_pointwise(two, one, estimator="nrg"), [[1 - 4 / 8]])
    # one member: the energy form is the absolute error; the fair form is undefined
    close(W.crps_pointwise(torch.full((1, 1, 1), 3.0), one, estimator="nrg"), [[2.0]])
    with pytest.raises(ValueError, match="at least 2"):
        W.crps_pointwise(torch.zeros(1, 2, 2), torch.zeros(2, 2), estimator="fair")
    with pytest.raises(ValueError, match="estimator"):
        W.crps_pointwise(fc, y, estimator="pwm")


def test_crps_space_then_init_mean():
    rng = np.random.default_rng(3)
    lat = np.linspace(-80, 80, 9)
    fc = rng.normal(size=(4, 5, 9, 6))  # (init, member, lat, lon)
    y = rng.normal(size=(4, 9, 6))
    w = W.latitude_weights(lat).numpy()
    point = scoringrules.crps_ensemble(y, fc, m_axis=1, estimator="fair")
    expect = _np_spatial_mean(point, w).mean()
    got = W.crps(fc, y, w, member_dim=1, init_dim=0)
    assert got.shape == ()
    close(got, expect, rtol=1e-12, atol=1e-12)
    per_init = W.crps(fc, y, w, member_dim=1)
    close(per_init, _np_spatial_mean(point, w), rtol=1e-12, atol=1e-12)


# ----------------------------------------------------------------------------- latitude weights
def test_latitude_weights_global_grid_with_poles():
    lat = np.arange(-90.0, 90.5, 1.0)
    w = W.latitude_weights(lat)
    assert w.shape == (181,) and w.dtype == F64
    close(w.mean(), 1.0, rtol=1e-14, atol=0)
    ratio = w[1:-1] / torch.cos(torch.deg2rad(torch.as_tensor(lat[1:-1])))
    close(ratio, torch.full_like(ratio, float(ratio[90])), rtol=1e-10, atol=0)  # proportional to cos(lat)
    # the pole rows are half bands [89.5, 90]: 1 - cos(0.5 deg) in the unnormalised form
    close(w[0] / w[90], (1 - math.cos(math.radians(0.5))) / (2 * math.sin(math.radians(0.5))), rtol=1e-10, atol=0)
    close(w.flip(0), w, rtol=0, atol=0)  # symmetric grid


def test_latitude_weights_descending_regional_and_uneven():
    lat = np.array([30.0, 40.0, 50.0])
    w = W.latitude_weights(lat)
    s = np.sin(np.radians([25.0, 35.0, 45.0, 55.0]))  # half a spacing beyond the outer rows
    ref = np.diff(s) / np.diff(s).mean()
    close(w, ref, rtol=1e-13, atol=0)
    close(W.latitude_weights(lat[::-1].copy()), ref[::-1].copy(), rtol=1e-13, atol=0)
    asc = np.array([-85.0, -60.0, -10.0, 0.0, 30.0, 88.0])  # uneven, outer edges clipped to +-90
    wa = W.latitude_weights(asc)
    close(W.latitude_weights(torch.as_tensor(asc).flip(0)), wa.flip(0), rtol=1e-13, atol=0)
    e = np.radians([-90.0, -72.5, -35.0, -5.0, 15.0, 59.0, 90.0])
    close(wa, np.diff(np.sin(e)) / np.diff(np.sin(e)).mean(), rtol=1e-13, atol=0)
    close(W.latitude_weights([12.0]), [1.0])
    for bad in ([0.0, 1.0, 1.0], [0.0, 2.0, 1.0], [0.0, 91.0], [[0.0, 1.0]], [0.0, float("nan")]):
        with pytest.raises((ValueError, ShapeError)):
            W.latitude_weights(bad)


def test_spatial_mean_of_constant_and_mask():
    lat = np.linspace(90, -90, 19)
    w = W.latitude_weights(lat)
    x = torch.full((2, 19, 8), 3.25)
    close(W.spatial_mean(x, w), [3.25, 3.25], rtol=1e-14, atol=0)
    mask = torch.rand(2, 19, 8, generator=torch.Generator().manual_seed(0)) > 0.5
    y = x.clone()
    y[~mask] = float("nan")
    close(W.spatial_mean(y, w, mask=mask), [3.25, 3.25], rtol=1e-14, atol=0)
    # a (lat, lon) field with lat on dim 0 and lon on dim 1
    f = torch.arange(19 * 8, dtype=F64).reshape(19, 8)
    close(W.spatial_mean(f.T, w, lat_dim=1, lon_dim=0), W.spatial_mean(f, w), rtol=1e-14, atol=0)
    with pytest.raises(ShapeError):
        W.spatial_mean(x, w[:-1])


# ----------------------------------------------------------------------------- RMSE and spread
def test_rmse_sqrt_per_init_then_mean_by_hand():
    rng = np.random.default_rng(4)
    lat = np.array([-60.0, -20.0, 20.0, 60.0])
    w = W.latitude_weights(lat).numpy()
    f = rng.normal(size=(3, 2, 4, 5))  # (init, lead, lat, lon)
    y = rng.normal(size=(3, 2, 4, 5))
    mse = _np_spatial_mean((f - y) ** 2, w)  # (init, lead)
    got = W.rmse(f, y, w, init_dim=0)
    assert got.shape == (2,)
    close(got, np.sqrt(mse).mean(0), rtol=1e-12, atol=0)
    close(W.rmse(f, y, w, init_dim=0, sqrt_first=False), np.sqrt(mse.mean(0)), rtol=1e-12, atol=0)
    close(W.rmse(f, y, w), np.sqrt(mse), rtol=1e-12, atol=0)
    # the order matters: constant errors 1 and 3 on two inits give 2, not sqrt(5)
    e = torch.stack([torch.ones(4, 5), 3 * torch.ones(4, 5)])
    close(W.rmse(e, torch.zeros(4, 5), w, init_dim=0), 2.0)
    close(W.rmse(e, torch.zeros(4, 5), w, init_dim=0, sqrt_first=False), math.sqrt(5.0))


def test_ensemble_mean_rmse_and_spread_by_hand():
    rng = np.random.default_rng(5)
    w = W.latitude_weights(np.linspace(-45, 45, 7)).numpy()
    fc = rng.normal(size=(4, 6, 7, 3))  # (init, member, lat, lon)
    y = rng.normal(size=(4, 7, 3))
    close(W.rmse(fc, y, w, member_dim=1, init_dim=0), W.rmse(fc.mean(1), y, w, init_dim=0), rtol=1e-13, atol=0)
    var = _np_spatial_mean(fc.var(1, ddof=1), w)
    close(W.spread(fc, w, member_dim=1, init_dim=0), np.sqrt(var).mean(), rtol=1e-12, atol=0)
    close(W.spread(fc, w, member_dim=1, init_dim=0, sqrt_first=False), np.sqrt(var.mean()), rtol=1e-12, atol=0)
    skill = np.sqrt(_np_spatial_mean((fc.mean(1) - y) ** 2, w)).mean()
    # one convention: always corrected by sqrt((M+1)/M), M = 6 here (calibrated=True is the same; False is refused)
    ssr = W.spread_skill_ratio(fc, y, w, member_dim=1, init_dim=0)
    close(ssr, math.sqrt(7 / 6) * np.sqrt(var).mean() / skill, rtol=1e-12, atol=0)
    close(W.spread_skill_ratio(fc, y, w, member_dim=1, init_dim=0, calibrated=True), ssr, rtol=0, atol=0)
    with pytest.raises(ValueError, match="always"):
        W.spread_skill_ratio(fc, y, w, member_dim=1, init_dim=0, calibrated=False)
    with pytest.raises(ValueError, match="at least 2"):
        W.spread(fc[:, :1], w, member_dim=1)


@pytest.mark.parametrize("sqrt_first", [True, False])
def test_spread_skill_ratio_of_reliable_and_underdispersive_ensembles(sqrt_first):
    g = torch.Generator().manual_seed(6)
    T, M, nlat, nlon = 20, 5, 32, 64
    w = W.latitude_weights(torch.linspace(-87.1875, 87.1875, nlat))
    y = torch.randn(T, nlat, nlon, generator=g, dtype=F64)
    fc = torch.randn(T, M, nlat, nlon, generator=g, dtype=F64)  # members and truth iid N(0, 1)
    kw = dict(member_dim=1, init_dim=0, sqrt_first=sqrt_first)
    cal = W.spread_skill_ratio(fc, y, w, calibrated=True, **kw)
    raw = W.spread(fc, w, **kw) / W.rmse(fc, y, w, **kw)  # the uncorrected ratio
    # standard error of the ratio ~0.005 here
    assert abs(float(cal) - 1.0) < 0.03, float(cal)
    assert abs(float(raw) - math.sqrt(M / (M + 1))) < 0.03, float(raw)
    close(W.spread(fc, w, member_dim=1, init_dim=0), 1.0, rtol=0.02, atol=0)
    under = W.spread_skill_ratio(0.5 * fc, y, w, calibrated=True, **kw)  # expected ~0.53
    assert float(under) < 0.7
    over = W.spread_skill_ratio(2.0 * fc, y, w, calibrated=True, **kw)  # expected ~1.6
    assert float(over) > 1.3


# ----------------------------------------------------------------------------- rank histogram
def _chi2(counts):
    counts = np.asarray(counts, dtype=float)
    e = counts.sum() / counts.size
    return ((counts - e) ** 2 / e).sum()


def test_rank_histogram_flat_for_reliable_and_u_shaped_for_underdispersive():
    g = torch.Generator().manual_seed(7)
    M = 9
    y = torch.randn(8, 50, 50, generator=g)
    fc = torch.randn(M, 8, 50, 50, generator=g)
    h = W.rank_histogram(fc, y, generator=1)
    assert h.shape == (M + 1,) and h.dtype == torch.int64
    assert int(h.sum()) == y.numel()
    crit = stats.chi2.ppf(0.999, M)
    assert _chi2(h) < crit, h
    hu = W.rank_histogram(0.3 * fc, y, generator=1)
    assert _chi2(hu) > 50 * crit  # strongly U-shaped
    assert hu[0] > 3 * hu[M // 2] and hu[-1] > 3 * hu[M // 2]
    hn = W.rank_histogram(fc, y, generator=1, keep_dims=(0,), normalize=True)
    assert hn.shape == (8, M + 1) and hn.dtype == F64
    close(hn.sum(-1), torch.ones(8))
    close(hn.mean(0), h.to(F64) / h.sum(), rtol=1e-12, atol=1e-12)  # equal counts per kept slice


def test_rank_histogram_random_tie_breaking():
    M = 4
    n = 5000
    y = torch.zeros(n, 1, 1)
    fc = torch.zeros(M, n, 1, 1)  # every member ties with the truth: rank uniform on 0..M
    h = W.rank_histogram(fc, y, generator=torch.Generator().manual_seed(3))
    assert int(h.sum()) == n
    assert _chi2(h) < stats.chi2.ppf(0.999, M), h
    assert torch.equal(h, W.rank_histogram(fc, y, generator=3))  # seeded: reproducible
    # members {-1, 0, 0, 1} and truth 0: ranks 1, 2, 3 equally likely, never 0 or 4
    fc2 = torch.tensor([-1.0, 0.0, 0.0, 1.0]).reshape(M, 1, 1, 1).expand(M, n, 1, 1)
    h2 = W.rank_histogram(fc2, y, generator=5)
    assert h2[0] == 0 and h2[-1] == 0
    assert _chi2(h2[1:4]) < stats.chi2.ppf(0.999, 2), h2


# ----------------------------------------------------------------------------- masks
def _masked_case():
    g = torch.Generator().manual_seed(8)
    fc = torch.randn(4, 6, 8, 10, generator=g, dtype=F64)  # (init, member, lat, lon)
    y = torch.randn(4, 8, 10, generator=g, dtype=F64)
    mask = torch.rand(4, 8, 10, generator=g) < 0.8
    mask[1] = False  # one init time with no valid point: left out of the init mean
    return fc, y, mask


def _all_metrics(fc, y, w, mask):
    kw = dict(member_dim=1, mask=mask, init_dim=0)
    return {
        "rmse": W.rmse(fc[:, 0], y, w, mask=mask, init_dim=0),
        "ens_rmse": W.rmse(fc, y, w, **kw),
        "crps_fair": W.crps(fc, y, w, **kw),
        "crps_nrg": W.crps(fc, y, w, estimator="nrg", **kw),
        "spread": W.spread(fc, w, **kw),
        "ssr": W.spread_skill_ratio(fc, y, w, calibrated=True, **kw),
        "ssr_mean_first": W.spread_skill_ratio(fc, y, w, sqrt_first=False, **kw),
        "rank": W.rank_histogram(fc, y, member_dim=1, mask=mask, generator=0),
    }


def test_masked_points_are_excluded_from_every_metric():
    fc, y, mask = _masked_case()
    w = W.latitude_weights(np.linspace(-70, 70, 8))
    base = _all_metrics(fc, y, w, mask)
    fc2, y2 = fc.clone(), y.clone()
    fc2[:, 0][~mask] = float("nan")
    fc2[:, 3][~mask] = 1e6
    y2[~mask] = -float("inf")
    other = _all_metrics(fc2, y2, w, mask)
    for k in base:
        assert torch.isfinite(base[k].to(F64)).all(), k
        close(other[k], base[k], rtol=0, atol=0)
    assert int(base["rank"].sum()) == int(mask.sum())
    # excluding inits 1 (all masked) equals scoring inits 0, 2, 3 only
    keep = [0, 2, 3]
    sub = _all_metrics(fc[keep], y[keep], w, mask[keep])
    for k in base:
        if k != "rank":
            close(sub[k], base[k], rtol=1e-13, atol=0)
    # masking whole longitude columns equals slicing them away
    cols = torch.zeros(8, 10, dtype=torch.bool)
    cols[:, :7] = True
    close(W.crps(fc, y, w, member_dim=1, mask=cols, init_dim=0),
          W.crps(fc[..., :7], y[..., :7], w, member_dim=1, init_dim=0), rtol=1e-13, atol=0)
    # a float mask is a multiplicative weight
    close(W.rmse(fc[:, 0], y, w, mask=mask.to(F64) * 2.0), W.rmse(fc[:, 0], y, w, mask=mask), equal_nan=True)
    assert torch.isnan(W.rmse(fc[:, 0], y, w, mask=mask)[1])  # per init: nothing valid at init 1
    with pytest.raises(NonFiniteError):
        W.rank_histogram(fc2, y2, member_dim=1, generator=0)  # NaN not masked
    with pytest.raises(ShapeError):
        W.crps(fc, y, w, member_dim=1, mask=mask[:, :, :5])


# ----------------------------------------------------------------------------- xarray wrappers
def _xr_case(member_name="member"):
    rng = np.random.default_rng(9)
    M, T, L, P, nlat, nlon = 5, 4, 3, 2, 7, 6
    lat = np.linspace(60.0, -60.0, nlat)  # descending, as in ERA5
    lon = np.arange(nlon) * 60.0
    init = np.array(["2020-01-01", "2020-01-02", "2020-01-03", "2020-01-04"], dtype="datetime64[ns]")
    lead = np.array([6, 12, 24], dtype="timedelta64[h]").astype("timedelta64[ns]")
    coords = dict(init_time=init, lead_time=lead, level=[500, 850], latitude=lat, longitude=lon)
    truth = xr.DataArray(rng.normal(size=(T, L, P, nlat, nlon)), name="t",
                         dims=("init_time", "lead_time", "level", "latitude", "longitude"), coords=coords)
    truth = truth.assign_coords(valid_time=truth.init_time + truth.lead_time,  # depends on init_time: dropped
                                lead_hours=("lead_time", [6, 12, 24]))  # depends on lead_time only: kept
    # forecast in another dim order, with the member dim in the middle
    fc = xr.DataArray(rng.normal(size=(L, M, T, nlat, P, nlon)), name="t",
                      dims=("lead_time", member_name, "init_time", "latitude", "level", "longitude"),
                      coords={k: v for k, v in coords.items()})
    return fc, truth


def _core_layout(fc, truth, member="member"):
    f = fc.transpose("lead_time", "level", "init_time", member, "latitude", "longitude").values
    y = truth.transpose("lead_time", "level", "init_time", "latitude", "longitude").values
    return f, y, W.latitude_weights(fc.latitude.values)


@pytest.mark.parametrize("member_name", ["member", "realization"])
def test_xarray_wrappers_keep_dims_and_match_the_core(member_name):
    fc, truth = _xr_case(member_name)
    f, y, w = _core_layout(fc, truth, member_name)
    kw = dict(member_dim=3, init_dim=2)
    cases = [
        (W.crps_da(fc, truth), W.crps(f, y, w, **kw)),
        (W.crps_da(fc, truth, estimator="nrg"), W.crps(f, y, w, estimator="nrg", **kw)),
        (W.rmse_da(fc, truth, member_dim=member_name), W.rmse(f, y, w, **kw)),
        (W.spread_da(fc), W.spread(f, w, **kw)),
        (W.spread_skill_ratio_da(fc, truth, calibrated=True), W.spread_skill_ratio(f, y, w, calibrated=True, **kw)),
    ]
    for da, ref in cases:
        assert da.dims == ("lead_time", "level")
        assert da.name == "t" and da.attrs["ensemble_size"] == 5
        np.testing.assert_array_equal(da.lead_time.values, truth.lead_time.values)
        np.testing.assert_array_equal(da.level.values, [500, 850])
        assert "valid_time" not in da.coords and "init_time" not in da.coords and "latitude" not in da.coords
        if da is not cases[3][0]:  # spread has no truth, hence no truth-only coords
            np.testing.assert_array_equal(da.lead_hours.values, [6, 12, 24])
        close(da.values, ref, rtol=1e-13, atol=0)
    # deterministic RMSE per member keeps the member dim
    per_member = W.rmse_da(fc, truth)
    assert set(per_member.dims) == {"lead_time", member_name, "level"}
    close(per_member.isel({member_name: 2}).transpose("lead_time", "level").values,
          W.rmse(f[:, :, :, 2], y, w, init_dim=2), rtol=1e-13, atol=0)
    h = W.rank_histogram_da(fc, truth, generator=0)
    assert h.dims == ("lead_time", "level", "rank")
    np.testing.assert_array_equal(h["rank"].values, np.arange(6))
    assert (h.sum("rank") == 4 * 7 * 6).all()
    np.testing.assert_array_equal(h.values, W.rank_histogram(f, y, member_dim=3, keep_dims=(0, 1), generator=0))
    per_init = W.rank_histogram_da(fc, truth, init_dim=None, generator=0, normalize=True)
    assert per_init.dims == ("lead_time", "init_time", "level", "rank")
    close(per_init.sum("rank").values, np.ones((3, 4, 2)))


def test_xarray_wrappers_mask_weights_dataset_and_no_init_dim():
    fc, truth = _xr_case()
    f, y, w = _core_layout(fc, truth)
    land = xr.DataArray(np.arange(7 * 6).reshape(7, 6) % 3 != 0, dims=("latitude", "longitude"),
                        coords=dict(latitude=truth.latitude, longitude=truth.longitude))
    got = W.crps_da(fc, truth, mask=land.T)  # any dim order
    close(got.values, W.crps(f, y, w, member_dim=3, init_dim=2, mask=torch.as_tensor(land.values)),
          rtol=1e-13, atol=0)
    # changing masked values does not change the wrapper's result
    fc_nan = fc.where(land.broadcast_like(fc))
    close(W.crps_da(fc_nan, truth, mask=land).values, got.values, rtol=0, atol=0)
    # uniform weights as a DataArray over latitude
    uni = xr.DataArray(np.ones(7), dims="latitude", coords=dict(latitude=truth.latitude))
    close(W.crps_da(fc, truth, weights=uni).values, W.crps(f, y, None, member_dim=3, init_dim=2),
          rtol=1e-13, atol=0)
    # a Dataset is scored per variable
    ds = W.spread_skill_ratio_da(fc.to_dataset(name="t").assign(u=2 * fc), truth.to_dataset(name="t").assign(u=truth))
    assert set(ds.data_vars) == {"t", "u"} and ds["t"].dims == ("lead_time", "level")
    close(ds["t"].values, W.spread_skill_ratio_da(fc, truth).values, rtol=1e-14, atol=0)
    # no init dim: one value per remaining dim, no averaging
    one = W.crps_da(fc.isel(init_time=0), truth.isel(init_time=0))
    assert one.dims == ("lead_time", "level")
    close(one.values, W.crps(f[:, :, 0], y[:, :, 0], w, member_dim=2), rtol=1e-13, atol=0)
    with pytest.raises(ValueError):  # coordinates must agree exactly (xarray's AlignmentError)
        W.crps_da(fc, truth.assign_coords(latitude=truth.latitude + 1))
    with pytest.raises(ShapeError, match="member"):
        W.crps_da(fc.rename(member="ens"), truth)


# ----------------------------------------------------------------------------- API
def test_inputs_outputs_and_errors():
    g = torch.Generator().manual_seed(10)
    fc = torch.randn(5, 3, 4, generator=g)
    y = torch.randn(3, 4, generator=g)
    out = W.crps(fc, y, None)
    assert out.dtype == F64 and out.shape == ()
    close(out, W.crps(fc.numpy(), y.double().numpy(), None), rtol=1e-6, atol=1e-7)
    # the truth broadcasts: one field for every init time
    close(W.crps(fc[:, None].expand(5, 2, 3, 4), y, None, init_dim=0), out, rtol=1e-12, atol=0)
    with pytest.raises(ShapeError):
        W.crps(fc, torch.randn(3, 5), None)
    with pytest.raises(ShapeError):
        W.rmse(fc, fc[0], None, init_dim=-1)  # init_dim collides with lon_dim
    with pytest.raises(ValueError):
        W.crps(fc, y, -torch.ones(3))


def test_metrics_registry():
    assert set(W.METRICS) == {"weather_rmse", "weather_crps", "weather_spread", "weather_spread_skill_ratio",
                              "weather_rank_histogram"}
    for name, fn in W.METRICS.items():
        assert callable(fn) and (fn.__doc__ or "").strip(), name
    code = "import sys, diffkit_weather.metrics; assert 'xarray' not in sys.modules"
    plugins = str(Path(__file__).resolve().parents[1] / "plugins")
    subprocess.run([sys.executable, "-c", code], check=True, env={**os.environ, "PYTHONPATH": plugins})


# ----------------------------------------------------------------------------- the diffkit_metrics hook in evaluate
def test_metric_da_applies_core_ensemble_metrics_like_the_wrappers():
    from diffkit import ensemble as E

    fc, truth = _xr_case()
    close(W.metric_da(E.crps, fc, truth).values, W.crps_da(fc, truth).values, rtol=0, atol=0)
    close(W.metric_da(E.spread_skill_ratio, fc, truth).values, W.spread_skill_ratio_da(fc, truth).values,
          rtol=0, atol=0)
    close(W.metric_da(E.spread, fc, truth).transpose("lead_time", "level").values, W.spread_da(fc).values,
          rtol=1e-14, atol=0)


def test_evaluate_scores_every_registered_ensemble_metric():
    """`diffkit evaluate` computes the core's ensemble metrics as its columns and a plugin's ensemble
    metric as a column under its registered name (NaN where the forecast has too few members)."""
    from diffkit import ensemble as E
    from diffkit import hookimpl, registry
    from diffkit_weather import evaluate as EV

    rng = np.random.default_rng(11)
    M, N, K, nlat, nlon = 4, 2, 2, 5, 6
    lat, lon = np.linspace(50, 30, nlat), np.arange(nlon) * 10.0
    init = np.array(["2000-01-01T00", "2000-01-01T06"], "datetime64[ns]")
    lead = np.array([6, 12], "timedelta64[h]").astype("timedelta64[ns]")
    times = init[0] + np.arange(4) * np.timedelta64(6, "h")
    truth = xr.Dataset({"t": (("time", "latitude", "longitude"), rng.normal(size=(4, nlat, nlon)))},
                       coords=dict(time=times, latitude=lat, longitude=lon))
    fc = xr.Dataset({"t": (("member", "init_time", "lead_time", "latitude", "longitude"),
                           rng.normal(size=(M, N, K, nlat, nlon)))},
                    coords=dict(init_time=init, lead_time=lead, latitude=lat, longitude=lon))
    fc = fc.assign_coords(valid_time=fc.init_time + fc.lead_time)

    @E.ensemble_metric(min_members=5)
    def fake_big(forecast, truth, *, member_dim=0, weights=None, mask=None, dims=None, sample_dims=()):
        """Needs five members."""
        raise AssertionError("not called with four members")

    plugin = type("P", (), {})()
    plugin.diffkit_metrics = hookimpl(lambda: {"fake_energy_crps": E.ensemble_metric(
        lambda forecast, truth, **kw: E.crps(forecast, truth, estimator="nrg", **kw), min_members=1),
        "fake_big": fake_big})
    registry.register_plugin(plugin, "fake_weather_metrics")
    try:
        s = EV.evaluate(fc, truth, plots=False).scores
    finally:
        registry.unregister_plugin("fake_weather_metrics")
    assert [m for m in s.data_vars] == ["rmse", "crps", "spread", "spread_skill_ratio", "fake_big",
                                        "fake_energy_crps", "persistence_rmse", "climatology_rmse", "rank_histogram"]
    assert np.isnan(s["fake_big"].values).all()
    tr = EV.read_truth(fc, truth)["t"]
    close(s["fake_energy_crps"].values[0], W.crps_da(fc["t"], tr, estimator="nrg").values, rtol=1e-13, atol=0)
    close(s["crps"].values[0], W.crps_da(fc["t"], tr).values, rtol=1e-13, atol=0)
    assert (s["fake_energy_crps"].values > s["crps"].values).all()  # the energy form exceeds the fair one
    assert "fake_energy_crps" not in EV.evaluate(fc, truth, plots=False).scores
