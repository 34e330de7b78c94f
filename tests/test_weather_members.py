"""Ensemble (member) dimensions in weather inputs (issue 13, item 1) and the ERA5-style end-to-end case.

The file is written here the way an ERA5 ensemble file from the CDS/cfgrib looks: 10 members in a
``number`` dim first (``number, time, latitude, longitude``), latitude descending, the cfgrib scalar
coordinates ``step`` and ``surface``, and ``GRIB_*`` attributes on every variable.  Each member is
the same zonally travelling pattern plus its own offset field, so members differ everywhere.

- without a member choice a multi-member file is an error for ``diffkit forecast`` and ``diffkit
  evaluate`` (one line, naming the dim, its size and ``--member``);
- ``--member VALUE`` starts from that member (the initial states equal the file's values of that
  member) and records it; ``--member all`` gives one ensemble per input member (dim
  ``initial_member``) and records it;
- ``evaluate --member all`` scores every truth member as a separate case: the scores are the means
  of the per-member scores (exactly, for RMSE, CRPS, spread and the references), the rank
  histograms their sums;
- NaN or inf in the initial state of member 3 is an error naming member 3, also when member 0 is
  clean; inf in a truth member is reported as infinite.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from diffkit_weather import adapter as A
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    from diffkit_weather import adapter as A

import xarray as xr

from diffkit.checkpoint import capture_rng_state, restore_rng_state
from diffkit.cli import main
from diffkit_weather import decode as D
from diffkit_weather import evaluate as E
from diffkit_weather import forecast as F

from _tiny_unet import TINY_UNET_TOML  # noqa: E402

NUMBER = np.arange(10, dtype=np.int64)          # ERA5's ensemble: 10 members, numbered 0..9
LAT = np.arange(60.0, -61.0, -20.0)             # 7 rows, descending (ERA5 order)
LON = np.arange(0.0, 360.0, 22.5)               # 16 columns, global
NT = 24                                          # 6-hourly from 2020-01-01 00:00
GRIB = {
    "t2m": dict(GRIB_paramId=167, GRIB_shortName="2t", GRIB_units="K", GRIB_name="2 metre temperature",
                GRIB_cfVarName="t2m", GRIB_gridType="regular_ll", GRIB_typeOfLevel="surface",
                GRIB_NV=0, GRIB_Nx=16, GRIB_Ny=7, units="K", long_name="2 metre temperature",
                standard_name="unknown"),
    "msl": dict(GRIB_paramId=151, GRIB_shortName="msl", GRIB_units="Pa", GRIB_name="Mean sea level pressure",
                GRIB_cfVarName="msl", GRIB_gridType="regular_ll", GRIB_typeOfLevel="surface",
                GRIB_NV=0, GRIB_Nx=16, GRIB_Ny=7, units="Pa", long_name="Mean sea level pressure",
                standard_name="air_pressure_at_mean_sea_level"),
}


def era5_members(nmem: int = len(NUMBER), seed: int = 0) -> xr.Dataset:
    g = np.random.default_rng(seed)
    t = np.arange(NT)
    out = {}
    for v, (base, amp) in {"t2m": (280.0, 5.0), "msl": (101000.0, 800.0)}.items():
        f = g.normal(size=(len(LAT), len(LON)))
        move = np.stack([np.roll(f, k, axis=-1) for k in t])                     # (T, lat, lon)
        offs = g.normal(size=(nmem, 1, len(LAT), len(LON))) * 0.3               # each member its own offset
        out[v] = (("number", "time", "latitude", "longitude"),
                  (base + amp * (move[None] + offs)).astype(np.float32), dict(GRIB[v]))
    return xr.Dataset(out, coords={
        "number": ("number", NUMBER[:nmem], {"long_name": "ensemble member numerical id", "units": "1",
                                             "standard_name": "realization"}),
        "time": ("time", (6 * t).astype(np.int64), {"units": "hours since 2020-01-01 00:00",
                                                     "standard_name": "forecast_reference_time",
                                                     "long_name": "initial time of forecast"}),
        "step": ((), np.timedelta64(0, "ns"), {"long_name": "time since forecast_reference_time"}),
        "surface": ((), 0.0, {"long_name": "original GRIB coordinate for key: level(surface)", "units": "1"}),
        "latitude": ("latitude", LAT, {"units": "degrees_north", "standard_name": "latitude",
                                       "long_name": "latitude", "stored_direction": "decreasing"}),
        "longitude": ("longitude", LON, {"units": "degrees_east", "standard_name": "longitude",
                                         "long_name": "longitude"}),
    }, attrs={"GRIB_edition": 1, "GRIB_centre": "ecmf", "GRIB_centreDescription": "European Centre for "
              "Medium-Range Weather Forecasts", "GRIB_subCentre": 0, "Conventions": "CF-1.7",
              "institution": "European Centre for Medium-Range Weather Forecasts",
              "history": "2026-01-01T00:00 GRIB to CDM+CF via cfgrib-0.9.10.4/ecCodes-2.30.0 with "
                         "{\"source\": \"era5_ens.grib\", \"filter_by_keys\": {}, \"encode_cf\": [\"parameter\", "
                         "\"time\", \"geography\", \"vertical\"]}"})


def _toml(run: Path, path: Path, options: str = "") -> str:
    return f"""\
run_dir = "{run}"
[data]
adapter = "weather"
batch_size = 8
val_fraction = 0.25
[data.options]
path = "{path}"
forcings = []
{options}
{TINY_UNET_TOML}
[trainer]
steps = 4
warmup = 1
val_every = 0
ckpt_every = 0
[sample]
sampler = "ddim"
nfe = 2
"""


@pytest.fixture(scope="module")
def era5(tmp_path_factory):
    """The ERA5-style file and a model trained on all its members by ``diffkit train`` (4 steps)."""
    root = tmp_path_factory.mktemp("era5ens")
    path = root / "era5_ens.nc"
    era5_members().to_netcdf(path)
    (root / "cfg.toml").write_text(_toml(root / "run", path))
    state = capture_rng_state(cuda=False)
    try:
        assert main(["train", str(root / "cfg.toml"), "--no-progress", "--device", "cpu"]) == 0
    finally:
        restore_rng_state(state)
    return dict(root=root, path=path, run=root / "run")


def _err(capsys) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


INIT = "2020-01-05T00:00"
BASE = ["--members", "2", "--steps", "2", "--no-progress", "--device", "cpu"]


def test_member_dimension_without_choice_is_an_error(era5, capsys, tmp_path):
    run, path = str(era5["run"]), str(era5["path"])
    capsys.readouterr()
    out = tmp_path / "fc.nc"
    assert main(["forecast", run, "--data", path, "--init", INIT, "--out", str(out), *BASE]) == 1
    err = _err(capsys)
    assert err.startswith("diffkit forecast: error:")
    assert "has 10 members in its member dim 'number' (values [0, 1, 2, ..., 7, 8, 9] (10 values))" in err
    assert "no member was chosen; choose one with --member VALUE" in err and "--member all" in err
    assert not out.exists()
    # a member the file does not have
    assert main(["forecast", run, "--data", path, "--init", INIT, "--member", "12", "--out", str(out), *BASE]) == 1
    assert "member '12' is not in the member dim 'number' of era5_ens.nc; its members are [0, 1, 2" in _err(capsys)
    # a member choice on a file without a member dim
    one = tmp_path / "one.nc"
    era5_members().isel(number=0, drop=True).to_netcdf(one)
    assert main(["forecast", run, "--data", str(one), "--init", INIT, "--member", "3", "--out", str(out), *BASE]) == 1
    assert "member 3 was chosen, but no variable of one.nc has a member dim" in _err(capsys)
    # evaluate: a multi-member truth without --member
    assert main(["forecast", run, "--data", path, "--init", INIT, "--member", "3", "--out", str(out), *BASE]) == 0
    capsys.readouterr()
    assert main(["evaluate", str(out), "--truth", path, "--out", str(tmp_path / "ev"), "--no-plots"]) == 1
    err = _err(capsys)
    assert err.startswith("diffkit evaluate: error:") and "has 10 members in its member dim 'number'" in err
    assert not (tmp_path / "ev").exists()


def test_forecast_member_choice_reads_that_member_and_is_recorded(era5):
    fc = F.load_forecaster(era5["run"], device="cpu")
    raw = era5_members()
    for m in (3, 7):
        ist = F.initial_states(era5["path"], fc.layout, INIT, options=fc.data_options, member=m)
        want = np.stack([raw[v].sel(number=m).isel(time=16).values[::-1] for v in ("t2m", "msl")])  # lat ascending
        np.testing.assert_array_equal(ist.history[0, 0].numpy(), want)
        assert ist.members == (m,) and ist.member_dim == "number"
        assert D.member_attrs(ist, m) == {"initial_member": str(m), "initial_member_dim": "number",
                                          "initial_member_choice": f"member {m} of 'number' (--member {m})"}
    # the default: the run's data.options.member when it names one member, recorded as such
    opts = dict(fc.data_options, member=4)
    ist = F.initial_states(era5["path"], fc.layout, INIT, options=opts)
    assert ist.members == (4,)
    assert D.member_attrs(ist, None, 4)["initial_member_choice"] == "member 4 of 'number' (data.options.member = 4 " \
                                                                  "of the run)"
    with pytest.raises(A.WeatherDataError, match="has 10 members in its member dim 'number'"):
        F.initial_states(era5["path"], fc.layout, INIT, options=dict(fc.data_options, member=[1, 2]))
    every = F.initial_states(era5["path"], fc.layout, INIT, options=fc.data_options, member="all")
    assert every.members == tuple(range(10)) and every.history.shape[0] == 10 and len(every.times) == 10
    for m in range(10):
        want = np.stack([raw[v].sel(number=m).isel(time=16).values[::-1] for v in ("t2m", "msl")])
        np.testing.assert_array_equal(every.history[m, 0].numpy(), want)


@pytest.mark.slow
def test_era5_style_multi_member_end_to_end(era5, capsys, tmp_path):
    """train (the fixture) -> forecast --member 3 / --member all -> evaluate --member 3 / --member all,
    through the ``diffkit`` commands on the ERA5-style file with GRIB attributes."""
    run, path = str(era5["run"]), str(era5["path"])
    one, every = tmp_path / "fc3.nc", tmp_path / "fc_all.nc"
    capsys.readouterr()
    assert main(["forecast", run, "--data", path, "--init", f"{INIT},2020-01-05T12:00", "--member", "3",
                 "--out", str(one), *BASE]) == 0
    assert "initial state: member 3 of 'number' (--member 3)" in capsys.readouterr().out
    with xr.open_dataset(one) as ds:
        assert dict(ds.sizes) == {"member": 2, "init_time": 2, "lead_time": 2, "latitude": 7, "longitude": 16}
        assert ds.attrs["initial_member"] == "3" and ds.attrs["initial_member_dim"] == "number"
        assert "--member 3" in ds.attrs["command"]
        assert np.isfinite(ds["t2m"].values).all()
        for v in ("t2m", "msl"):   # the GRIB_* attributes of the input stay behind (issue 13 item 3)
            assert not [k for k in ds[v].attrs if k.startswith("GRIB_")] and ds[v].attrs["units"] == GRIB[v]["units"]
    assert main(["forecast", run, "--data", path, "--init", f"{INIT},2020-01-05T12:00", "--member", "all",
                 "--out", str(every), *BASE]) == 0
    assert "2 member(s) x 10 initial member(s) x 2 init time(s)" in capsys.readouterr().out
    with xr.open_dataset(every) as ds:
        ds.load()
    assert ds["t2m"].dims == ("initial_member", "member", "init_time", "lead_time", "latitude", "longitude")
    assert ds["initial_member"].values.tolist() == list(range(10)) and ds.attrs["initial_member"] == "all"
    assert not [k for k in ds["msl"].attrs if k.startswith("GRIB_")] and ds["msl"].attrs["units"] == "Pa"
    assert "every member of 'number' (0, 1, 2, 3, 4, 5, 6, 7, 8, 9; --member all)" in ds.attrs["initial_member_choice"]
    # evaluate against member 3, and against every member
    for fcp, tm, cases in ((one, "3", 2), (every, "3", 20), (one, "all", 20), (every, "all", 200)):
        ev = tmp_path / f"ev_{fcp.stem}_{tm}"
        plots = [] if cases in (2, 200) else ["--no-plots"]       # figures for the first and the last
        assert main(["evaluate", str(fcp), "--truth", path, "--member", tm, "--out", str(ev), *plots]) == 0
        out = capsys.readouterr().out
        assert f"{cases} case(s)" in out
        with xr.open_dataset(ev / "scores.nc") as s:
            assert s.attrs["truth_member"] == tm and s.attrs["truth_member_dim"] == "number"
            assert s.attrs["n_cases"] == cases
            assert s.attrs["forecast_initial_member"] == ("3" if fcp == one else "all")
            for m in ("rmse", "crps", "spread", "persistence_rmse", "climatology_rmse"):
                assert np.isfinite(s[m].values).all(), m
        assert {"scores.csv", "scores.nc"} | ({"lead_curves.png", "maps_t2m.png", "maps_msl.png"} if not plots
                                              else set()) == {p.name for p in ev.iterdir()} - {"rank_histograms.png"}


def test_evaluate_every_truth_member_averages_the_per_member_scores(era5, tmp_path):
    """``member="all"``: every truth member is a case of equal weight -> exactly the mean of the per-member
    scores (per-case roots, then the case mean), rank histograms summed (continuous data: no ties)."""
    fc = F.load_forecaster(era5["run"], device="cpu")
    ist = F.initial_states(era5["path"], fc.layout, [INIT, "2020-01-05T12:00"], options=fc.data_options, member=2)
    pred = F.forecast(fc, None, ist, steps=2, members=3, seed=1)
    ds = D.member_dataset(pred, fc.layout, ist, attrs=D.member_attrs(ist, 2))
    every = E.evaluate(ds, era5["path"], member="all", plots=False).scores
    per = [E.evaluate(ds, era5["path"], member=m, plots=False).scores for m in range(10)]
    for m in ("rmse", "crps", "spread", "spread_skill_ratio", "persistence_rmse", "climatology_rmse"):
        want = np.mean([p[m].values for p in per], 0)
        if m == "spread_skill_ratio":   # spread / rmse of the case means, not the mean of the ratios
            want = np.mean([p["spread"].values for p in per], 0) / np.mean([p["rmse"].values for p in per], 0) \
                * np.sqrt(4 / 3)
        if m == "climatology_rmse":     # the climatology is the mean over every truth member: another field
            assert not np.allclose(every[m].values, want)
            continue
        np.testing.assert_allclose(every[m].values, want, rtol=1e-10, err_msg=m)
    np.testing.assert_array_equal(every["rank_histogram"].values, np.sum([p["rank_histogram"].values for p in per], 0))
    assert every.attrs["n_cases"] == 20 and every.attrs["cases"] == "2 init time(s) x 10 truth member(s)"
    assert per[4].attrs["truth_member"] == "4" and "member 4 of 'number' (--member 4)" == \
        per[4].attrs["truth_member_choice"]


def test_non_finite_member_initial_state_is_reported_naming_the_member(era5, capsys, tmp_path):
    run = str(era5["run"])
    raw = era5_members()
    for bad, what in ((np.nan, "holds NaN at 1 grid point(s)"), (np.inf, "holds infinite values (+inf or -inf)")):
        x = raw.copy(deep=True)
        x["msl"][dict(number=3, time=16, latitude=2, longitude=5)] = bad   # member 3 at the init time only
        p = tmp_path / "bad.nc"
        x.to_netcdf(p)
        capsys.readouterr()
        # member 0 is clean: forecasting from it works, as before
        assert main(["forecast", run, "--data", str(p), "--init", INIT, "--member", "0", "--out",
                     str(tmp_path / "ok.nc"), *BASE]) == 0
        assert main(["forecast", run, "--data", str(p), "--init", INIT, "--member", "all", "--out",
                     str(tmp_path / "x.nc"), *BASE]) == 1
        err = _err(capsys)
        assert "the initial state of member 3 of 'number' (bad.nc)" in err and what in err, err
        assert "channel 'msl' at 2020-01-05 00:00" in err
        assert not (tmp_path / "x.nc").exists()
    # inf in truth member 5 at a valid time: reported as infinite by evaluate
    x = raw.copy(deep=True)
    x["t2m"][dict(number=5, time=17, latitude=0, longitude=0)] = np.inf
    x.to_netcdf(tmp_path / "badtruth.nc")
    capsys.readouterr()
    assert main(["evaluate", str(tmp_path / "ok.nc"), "--truth", str(tmp_path / "badtruth.nc"), "--member", "all",
                 "--out", str(tmp_path / "ev"), "--no-plots"]) == 1
    err = _err(capsys)
    assert "the truth holds infinite values (1 value(s); the first, +inf, in variable 't2m' at truth_member 5, " \
           "init_time 2020-01-05T00:00, lead_time 6 h)" in err, err
