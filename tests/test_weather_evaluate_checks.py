"""``diffkit evaluate`` checks what it scores (issue 13, item 2), the ``dims`` option on a file without
coordinate values (item 3, last bullet) and the reference lines of the lead-time curves (item 6).

The forecasts are built with :func:`diffkit_weather.forecast.forecast_dataset` on the shift file of
``test_weather_forecast`` (two variables on two levels, latitude descending, a missing polar row);
the expected numbers come from direct calls of :mod:`diffkit_weather.metrics` on the raw file.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from diffkit_weather import adapter as A
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    from diffkit_weather import adapter as A

import xarray as xr

from diffkit.cli import main
from diffkit_weather import cf as C
from diffkit_weather import decode as D
from diffkit_weather import evaluate as E
from diffkit_weather import forecast as F
from diffkit_weather import metrics as WM
from diffkit_weather import plots as P

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _weather_shift import LAT, truth_model, write_shift  # noqa: E402,F401  (shift: conftest.py)

K = 3
TIMES = np.array(["2000-01-02T00", "2000-01-03T00"], "datetime64[ns]")    # time indices 4 and 8


@pytest.fixture(scope="module")
def fc(shift):
    L = A.GriddedAdapter(str(shift), val_fraction=0.25).layout
    g = np.random.default_rng(5)
    base = torch.from_numpy(truth_model(np.array([4, 8]), K)).float()
    pred = base[:, None] + torch.from_numpy(g.normal(size=(2, 3, K, 4, 8, 24)) * 0.3).float()
    return D.forecast_dataset(pred, L, TIMES)


def _cli_err(capsys, args) -> str:
    capsys.readouterr()
    assert main(args) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "Traceback" not in err, err
    return err


def test_evaluate_rejects_valid_time_mismatch(fc, shift, tmp_path, capsys):
    bad = fc.copy()
    vt = bad["valid_time"].values.copy()
    vt[1, 2] += np.timedelta64(6, "h")             # init 2000-01-03 00:00, lead 18 h: 2000-01-04 00:00 instead of 18:00
    bad = bad.assign_coords(valid_time=(("init_time", "lead_time"), vt, bad["valid_time"].attrs))
    with pytest.raises(A.WeatherDataError, match=r"valid_time disagrees with init_time \+ lead_time: at init_time "
                                                 r"2000-01-03 00:00, lead_time 18 h it is 2000-01-04 00:00, expected "
                                                 r"2000-01-03 18:00 \(1 of 6 valid times disagree\)"):
        E.evaluate(bad, shift, plots=False)
    # the same through the command (the file as written and read back)
    bad.to_netcdf(tmp_path / "bad.nc")
    err = _cli_err(capsys, ["evaluate", str(tmp_path / "bad.nc"), "--truth", str(shift), "--out", str(tmp_path / "e")])
    assert err.startswith("diffkit evaluate: error: the forecast's valid_time disagrees with init_time + lead_time")
    assert not (tmp_path / "e").exists()


def test_evaluate_transposes_dims_and_rejects_extra_dims(fc, shift):
    ref = E.evaluate(fc, shift, plots=False, seed=0).scores
    tr = fc.copy()
    for v in fc.data_vars:
        tr[v] = fc[v].transpose("longitude", "lead_time", "level", "member", "latitude", "init_time")
    tr = tr.assign_coords(valid_time=fc["valid_time"].transpose("lead_time", "init_time"))
    got = E.evaluate(tr, shift, plots=False, seed=0).scores
    for m in ("rmse", "crps", "spread", "spread_skill_ratio", "rank_histogram", "persistence_rmse"):
        np.testing.assert_array_equal(got[m].values, ref[m].values, err_msg=m)
    # an extra dim that is not a member, time, level or grid dim: named
    extra = fc.copy()
    extra["t"] = fc["t"].expand_dims(foo=3).copy()
    with pytest.raises(A.WeatherDataError, match=r"forecast variable 't' has the dim 'foo' \(size 3\), which evaluate "
                                                 r"cannot score .* select one 'foo' first \(ds.isel\(foo=0\)\)"):
        E.evaluate(extra, shift, plots=False)
    # a variable without a dim every variable needs
    lacks = fc.copy()
    lacks["z"] = fc["z"].isel(member=0, drop=True)
    with pytest.raises(A.WeatherDataError, match=r"forecast variable 'z' lacks the dim\(s\) 'member'"):
        E.evaluate(lacks, shift, plots=False)
    # a second level dim
    two = fc.copy()
    two["t"] = fc["t"].expand_dims(plev=xr.DataArray([1000.0, 925.0], dims="plev", attrs={"units": "hPa"}))
    with pytest.raises(A.WeatherDataError, match=r"forecast variable 't' has the dim 'plev' \(size 2\)|"
                                                 r"forecast variable 't' has the dim 'level' \(size 2\)"):
        E.evaluate(two, shift, plots=False)
    # valid_time on other dims
    odd = fc.assign_coords(valid_time=("init_time", fc["valid_time"].values[:, 0]))
    with pytest.raises(A.WeatherDataError, match=r"valid_time has the dims \('init_time',\); it must be "
                                                 r"valid_time\(init_time, lead_time\)"):
        E.evaluate(odd, shift, plots=False)


def test_inf_is_reported_as_infinite(fc, shift, tmp_path):
    # the adapter's statistics scan: +inf in one training frame is named, not "constant ... (std 0)"
    with xr.open_dataset(shift) as ds:
        ds = ds.load()
    ds["t"][dict(time=3, level=1, latitude=2, longitude=7)] = np.inf
    ds.to_netcdf(tmp_path / "inf.nc")
    with pytest.raises(A.WeatherDataError) as e:
        A.GriddedAdapter(str(tmp_path / "inf.nc"), val_fraction=0.25)
    msg = str(e.value)
    assert "variable 't' (channel 't@850', file inf.nc) holds infinite values (+inf) at 1 grid point(s) at " \
           "2000-01-01 18:00" in msg and "constant" not in msg and "std 0" not in msg
    # -inf in the validation times is found as well
    with xr.open_dataset(shift) as ds:
        ds = ds.load()
    ds["z"][dict(time=26, level=0, latitude=4, longitude=0)] = -np.inf
    ds.to_netcdf(tmp_path / "ninf.nc")
    with pytest.raises(A.WeatherDataError, match=r"variable 'z' \(channel 'z@500', file ninf.nc\) holds infinite "
                                                 r"values \(-inf\) at 1 grid point\(s\) at 2000-01-07 12:00"):
        A.GriddedAdapter(str(tmp_path / "ninf.nc"), val_fraction=0.25)
    # evaluate: inf in the forecast or the truth is infinite, not masked
    bad = fc.copy(deep=True)
    bad["z"][dict(member=1, init_time=1, lead_time=0, level=0, latitude=3, longitude=3)] = np.inf
    with pytest.raises(A.WeatherDataError, match=r"the forecast holds infinite values \(1 value\(s\); the first, "
                                                 r"\+inf, in variable 'z' at member 1, init_time 2000-01-03T00:00, "
                                                 r"lead_time 6 h\)"):
        E.evaluate(bad, shift, plots=False)
    ds = xr.open_dataset(shift).load()
    ds["z"][dict(time=6, level=1, latitude=4, longitude=0)] = -np.inf     # the valid time of init 4, lead 12 h
    ds.to_netcdf(tmp_path / "tinf.nc")
    with pytest.raises(A.WeatherDataError, match=r"the truth holds infinite values \(1 value\(s\); the first, -inf, "
                                                 r"in variable 'z' at init_time 2000-01-02T00:00, lead_time 12 h\)"):
        E.evaluate(fc, tmp_path / "tinf.nc", plots=False)


def _plain_file(path, with_coords: bool):
    x = np.random.default_rng(0).normal(size=(12, 5, 8)).astype(np.float32)
    coords = {"step": ("step", 6 * np.arange(12), {"units": "hours since 2000-01-01"})}
    if with_coords:
        coords.update(y=("y", np.linspace(-40.0, 40.0, 5)), x=("x", np.arange(0.0, 360.0, 45.0)))
    xr.Dataset({"a": (("step", "y", "x"), x)}, coords=coords).to_netcdf(path)
    return path


def test_dims_option_without_coordinates_is_an_error(tmp_path):
    p = _plain_file(tmp_path / "plain.nc", with_coords=False)
    dims = {"time": "step", "latitude": "y", "longitude": "x"}
    with pytest.raises(A.WeatherDataError, match=r"dims option maps latitude to 'y', but .*plain.nc has no coordinate "
                                                 r"values for 'y' \(only index numbers 0..4, which are not degrees of "
                                                 r"latitude\); give the coordinates in the file, e.g. "
                                                 r"ds.assign_coords\(y=\(\"y\", values, \{\"units\": "
                                                 r"\"degrees_north\"\}\)\)"):
        A.GriddedAdapter(str(p), dims=dims, forcings=[])
    with xr.open_dataset(p) as ds:
        with pytest.raises(A.WeatherDataError, match=r"maps longitude to 'x', but plain.nc has no coordinate values "
                                                     r"for 'x' \(only index numbers 0..7, which are not degrees of "
                                                     r"longitude\)"):
            C.find_coords(ds.assign_coords(y=np.linspace(-40.0, 40.0, 5)), "plain.nc", {"latitude": "y", "longitude": "x"})
    # the same silent default without the option: dims named lat/lon but no coordinate values
    x = np.zeros((4, 5, 8), np.float32) + np.arange(4.0)[:, None, None]
    xr.Dataset({"a": (("time", "lat", "lon"), x)},
               coords={"time": ("time", 6 * np.arange(4), {"units": "hours since 2000-01-01"})}).to_netcdf(
        tmp_path / "named.nc")
    with pytest.raises(A.WeatherDataError, match=r"dim 'lat' of .*named.nc looks like latitude but has no coordinate "
                                                 r"values \(only index numbers 0..4, which are not degrees of "
                                                 r"latitude\); give the coordinates in the file"):
        A.GriddedAdapter(str(tmp_path / "named.nc"), forcings=[])
    # with coordinates given in the file the same option works, and the values are the file's
    q = _plain_file(tmp_path / "coords.nc", with_coords=True)
    ad = A.GriddedAdapter(str(q), dims=dims, forcings=[], val_fraction=0.25)
    assert ad.layout.attrs["lat_values"] == [-40.0, -20.0, 0.0, 20.0, 40.0]
    assert ad.layout.attrs["lon_values"] == list(np.arange(0.0, 360.0, 45.0))


def test_lead_curves_have_reference_lines(fc, shift, tmp_path, monkeypatch):
    ev = E.evaluate(fc, shift, plots=False)
    s = ev.scores
    raw = xr.open_dataset(shift)
    w = WM.latitude_weights(LAT)
    i0 = np.array([4, 8])
    vidx = i0[:, None] + 1 + np.arange(K)                                  # valid time indices (N, K)
    uniq = np.unique(vidx)
    for c, (v, li) in enumerate([("t", 0), ("t", 1), ("z", 0), ("z", 1)]):
        x = raw[v].values[:, li].astype(np.float64)                        # (T, lat, lon), file order
        tr = torch.from_numpy(x[vidx])                                     # (N, K, lat, lon)
        pers = torch.from_numpy(np.broadcast_to(x[i0][:, None], tr.shape).copy())
        clim = torch.from_numpy(np.broadcast_to(x[uniq].mean(0), tr.shape).copy())
        mask = torch.isfinite(tr)
        kw = dict(mask=mask, init_dim=0)
        np.testing.assert_allclose(s["persistence_rmse"].values[c], WM.rmse(pers, tr, w, **kw).numpy(), rtol=1e-10)
        np.testing.assert_allclose(s["climatology_rmse"].values[c], WM.rmse(clim, tr, w, **kw).numpy(), rtol=1e-10)
    assert (s["persistence_rmse"].values > 0).all() and (s["climatology_rmse"].values > 0).all()
    assert "persistence_rmse: the truth at the init time" in s.attrs["persistence"]
    assert "mean of the truth over the 6 distinct valid times" in s.attrs["climatology"]
    # the figure: one dashed and one dotted line per channel on the RMSE panel, at the stored values
    figs = []
    monkeypatch.setattr(P, "_save", lambda fig, path, dpi=110: figs.append(fig) or Path(path))
    P.plot_lead_curves(s, tmp_path / "lc.png")
    ax = figs[0].axes[0]
    lines = {ln.get_gid(): ln for ln in ax.get_lines() if ln.get_gid()}
    for c in range(4):
        for ref, style in (("persistence_rmse", "--"), ("climatology_rmse", ":")):
            ln = lines[f"{ref}:{c}"]
            assert ln.get_linestyle() == style
            np.testing.assert_allclose(ln.get_ydata(), s[ref].values[c])
            np.testing.assert_allclose(ln.get_xdata(), [6.0, 12.0, 18.0])
    labels = ax.get_legend_handles_labels()[1]
    assert "persistence (truth at init)" in labels and "climatology (mean truth)" in labels
    # both references in scores.nc and scores.csv; a truth without the init times: persistence not computed, said so
    ev = E.evaluate(fc, shift, out=tmp_path / "ev")
    with xr.open_dataset(tmp_path / "ev" / "scores.nc") as back:
        np.testing.assert_allclose(back["persistence_rmse"].values, s["persistence_rmse"].values)
        np.testing.assert_allclose(back["climatology_rmse"].values, s["climatology_rmse"].values)
    import pandas as pd

    assert {"persistence_rmse", "climatology_rmse"} <= set(pd.read_csv(tmp_path / "ev" / "scores.csv").columns)
    raw.isel(time=slice(5, None)).to_netcdf(tmp_path / "late.nc")
    late = E.evaluate(fc, tmp_path / "late.nc", plots=False).scores
    assert np.isnan(late["persistence_rmse"].values).all()
    assert late.attrs["persistence"].startswith("not computed: the truth lacks 1 init time(s) (2000-01-02 00:00)")
