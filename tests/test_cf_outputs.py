"""CF metadata on every output (issue 13, item 3; item 6 "Units").

The outputs -- weather forecasts (``diffkit forecast``), PDE rollouts (``diffkit rollout``) and samples
(``diffkit sample``: the weather decoder and the core netCDF writer) -- are written from tiny models and
checked with IOOS ``compliance-checker``'s CF-1.8 check, offline (a socket guard fails the test on any
connection attempt).  The rule: **no HIGH or MEDIUM priority failure and no checker error**; the
LOW-priority suggestions are printed, not asserted.  One MEDIUM recommendation is deliberately not
followed by forecast files, and only that one is allowed there: CF §2.4 recommends that dims other than
T/Z/Y/X stand left of the time dim, but a forecast keeps ``(member, init_time, lead_time, ...)`` (the
WeatherBench-2 order: lead time after initialisation time), so ``lead_time`` follows ``init_time``.
(There are no analysis files yet: data assimilation is a later issue.  Image samples are PNG + npz,
not netCDF.)

Inputs: a synthetic file as ERA5 comes out of cfgrib (27 ``GRIB_*`` attributes per variable, GRIB global
attributes, a ``history``, latitude/longitude without any attribute), and NCL's storm files (no CF
attributes at all) where installed.
"""
from __future__ import annotations

import datetime
import io
import re
import socket
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

import xarray as xr  # a dependency: missing it is a failure, not a skip

from diffkit import __version__
from diffkit.adapters import MixtureAdapter, decode_samples
from diffkit.checkpoint import capture_rng_state, restore_rng_state
from diffkit.cli import main
from diffkit.config import config_from_dict
from diffkit.layout import Layout

from _tiny_unet import TINY_UNET  # noqa: E402

NCL = Path("/usr/share/ncarg/data/cdf")
STORM = [NCL / "Ustorm.cdf", NCL / "Pstorm.cdf"]
STORM_UNITS = "hours since 1996-01-05 00:00"
needs_ncl = pytest.mark.skipif(not STORM[0].exists(), reason="NCL sample data not installed (apt-get install libncarg-data)")
CF_LAT = {"standard_name": "latitude", "long_name": "latitude", "units": "degrees_north", "axis": "Y"}
CF_LON = {"standard_name": "longitude", "long_name": "longitude", "units": "degrees_east", "axis": "X"}
STAMP = re.compile(r"^(\d{4}-\d\d-\d\dT\d\d:\d\d:\d\dZ): (.*) \(diffkit (\S+)\)$")


# ============================================================================= the CF check
def cf_check(path, monkeypatch, *, forecast: bool = False, nondimensional_time: bool = False) -> None:
    """Fail unless ``path`` passes compliance-checker's CF-1.8 check with no HIGH or MEDIUM failure and
    no checker error, apart from the documented exceptions: a forecast's lead_time after init_time (CF
    §2.4's recommended order), a PDE rollout's nondimensional dim ``time`` (units "1"), which the
    checker's §5.1 name rule expects to be a dated CF time.  The checker must not touch the network."""
    import warnings

    from compliance_checker.base import BaseCheck
    from compliance_checker.runner import CheckSuite

    def no_network(*a, **k):
        raise AssertionError("compliance-checker tried to use the network")

    with monkeypatch.context() as m:
        m.setattr(socket.socket, "connect", no_network)
        m.setattr(socket, "create_connection", no_network)
        m.setattr(socket, "getaddrinfo", no_network)
        suite = CheckSuite()
        with warnings.catch_warnings():  # its deprecated SOS checkers warn on loading
            warnings.simplefilter("ignore", DeprecationWarning)
            suite.load_all_available_checkers()
        ds = suite.load_dataset(str(path))
        try:
            groups, errors = suite.run_all(ds, ["cf:1.8"], skip_checks=[])["cf:1.8"]
        finally:
            ds.close()
    failed, low = [], []
    for r in groups:
        v = r.value
        bad = (v[0] < v[1]) if isinstance(v, tuple) else (v is False)
        if not bad:
            continue
        msgs = list(r.msgs)
        if forecast and r.name.startswith("§2.4"):
            # (member, init_time, lead_time, ...): lead_time (not T/Z/Y/X) follows the time dim init_time
            msgs = [s for s in msgs if not re.search(r"init_time \(T\), lead_time \(U\)", s)]
        if nondimensional_time and r.name.startswith("§5.1"):
            # the checker's name rule: a dim named "time" is expected to be a CF (dated) time coordinate
            msgs = [s for s in msgs if s != "Coordinate variable 'time' should have standard_name='time', found: 'None'"]
        (failed if r.weight >= BaseCheck.MEDIUM else low).extend(f"[{r.weight}] {r.name}: {s}" for s in msgs)
    if low:
        print(f"{path}: LOW-priority CF suggestions:\n  " + "\n  ".join(low))
    assert not errors, f"compliance-checker errors on {path}: {errors}"
    assert not failed, f"{path} fails the CF-1.8 check:\n  " + "\n  ".join(failed)


# ============================================================================= inputs
GRIB_KEYS = ["paramId", "dataType", "numberOfPoints", "typeOfLevel", "stepUnits", "stepType", "gridType",
             "NV", "Nx", "Ny", "cfName", "cfVarName", "gridDefinitionDescription", "iDirectionIncrementInDegrees",
             "iScansNegatively", "jDirectionIncrementInDegrees", "jPointsAreConsecutive", "jScansPositively",
             "latitudeOfFirstGridPointInDegrees", "latitudeOfLastGridPointInDegrees",
             "longitudeOfFirstGridPointInDegrees", "longitudeOfLastGridPointInDegrees", "missingValue", "name",
             "shortName", "totalNumber", "units"]
assert len(GRIB_KEYS) == 27
INPUT_HISTORY = "2024-03-01T10:00 GRIB to CDM+CF via cfgrib-0.9.10.4/ecCodes-2.31.0 with {'source': 'era5.grib'}"
LAT = np.arange(35.0, -36.0, -10.0)   # 8 rows, descending like ERA5
LON = np.arange(0.0, 360.0, 22.5)     # 16 columns
NT = 16


def write_grib_like(path) -> Path:
    """ERA5 as cfgrib writes it: 27 GRIB_* attributes per variable, GRIB global attributes and a history;
    latitude and longitude without any attribute (only their names say what they are)."""
    g = np.random.default_rng(0)
    la, lo = np.meshgrid(np.deg2rad(LAT), np.deg2rad(LON), indexing="ij")
    t = np.arange(NT)[:, None, None]

    def field(base, amp):
        return (base + amp * np.cos(la) * np.sin(lo - 0.4 * t) + 0.1 * amp * g.standard_normal((NT, *la.shape)))

    def grib(name, units):
        return {**{f"GRIB_{k}": (f"{name}-{k}" if i % 2 else i) for i, k in enumerate(GRIB_KEYS)},
                "units": units, "valid_range": [0.0, 1000.0], "cell_methods": "time: point"}

    ds = xr.Dataset(
        {"t2m": (("time", "latitude", "longitude"), field(285.0, 20.0).astype(np.float32),
                 {**grib("t2m", "K"), "long_name": "2 metre temperature", "standard_name": "air_temperature"}),
         "msl": (("time", "latitude", "longitude"), field(101000.0, 900.0).astype(np.float32),
                 {**grib("msl", "Pa"), "long_name": "Mean sea level pressure", "standard_name": "air_pressure_at_mean_sea_level"})},
        coords={"time": ("time", 6 * np.arange(NT), {"units": "hours since 2020-01-01", "long_name": "time"}),
                "latitude": ("latitude", LAT), "longitude": ("longitude", LON)},
        attrs={"GRIB_edition": 1, "GRIB_centre": "ecmf", "GRIB_centreDescription": "European Centre for "
               "Medium-Range Weather Forecasts", "GRIB_subCentre": 0, "Conventions": "CF-1.7",
               "institution": "European Centre for Medium-Range Weather Forecasts", "history": INPUT_HISTORY})
    ds.to_netcdf(path)
    return Path(path)


def _train(cfg: dict) -> Path:
    from diffkit.train import Trainer

    state = capture_rng_state(cuda=False)
    try:
        Trainer(config_from_dict(cfg), device="cpu", progress=False).fit()
    finally:
        restore_rng_state(state)
    return Path(cfg["run_dir"])


@pytest.fixture(scope="module")
def weather(tmp_path_factory):
    """A tiny weather model (2 steps) on the GRIB-like file, its samples (a training snapshot: a weather
    model is conditional, so `diffkit sample` leaves it to `diffkit forecast`) and its forecast."""
    root = tmp_path_factory.mktemp("cf_weather")
    data = write_grib_like(root / "era5_grib.nc")
    t0 = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    run = _train({"run_dir": str(root / "run"),
                  "data": {"adapter": "weather", "batch_size": 4, "val_fraction": 0.25, "options": {"path": str(data)}},
                  "model": {"backbone": "unet", "options": TINY_UNET},
                  "trainer": {"steps": 2, "warmup": 1, "val_every": 0, "ckpt_every": 0, "log_every": 100,
                              "snapshot_every": 2},
                  "sample": {"sampler": "ddim", "nfe": 2, "n": 2}})
    fc, smp = root / "fc.nc", run / "snapshots" / "step-000000002.nc"
    assert main(["forecast", str(run), "--data", str(data), "--init", "2020-01-04T00:00", "--members", "2",
                 "--steps", "2", "--out", str(fc), "--no-progress", "--device", "cpu"]) == 0
    t1 = datetime.datetime.now(datetime.timezone.utc)
    return dict(data=data, run=run, forecast=fc, samples=smp, times=(t0, t1))


@pytest.fixture(scope="module")
def pde(tmp_path_factory):
    """A tiny PDE surrogate (2 steps) and its rollout by ``diffkit rollout``."""
    root = tmp_path_factory.mktemp("cf_pde")
    data = root / "burgers.nc"
    assert main(["data", "pde", "burgers", "--trajectories", "3", "--steps", "12", "--set", "nx=32", "--set",
                 "resolution_tol=None", "--out", str(data), "--no-progress", "--device", "cpu"]) == 0
    run = _train({"run_dir": str(root / "run"),
                  "data": {"adapter": "pde", "batch_size": 4, "val_fraction": 0.34, "options": {"path": str(data)}},
                  "model": {"backbone": "unet", "options": TINY_UNET},
                  "trainer": {"steps": 2, "warmup": 1, "val_every": 0, "ckpt_every": 0, "log_every": 100},
                  "sample": {"sampler": "ddim", "nfe": 2}})
    out = root / "rollout.nc"
    assert main(["rollout", str(run), "--init", str(data), "--index", "2", "--members", "2", "--steps", "3",
                 "--out", str(out), "--no-progress", "--device", "cpu"]) == 0
    return dict(data=data, run=run, rollout=out)


@pytest.fixture(scope="module")
def mixture(tmp_path_factory):
    """Samples of a tiny model of the built-in mixture (vector data) by ``diffkit sample``: the core writer."""
    root = tmp_path_factory.mktemp("cf_mixture")
    run = _train({"run_dir": str(root / "run"), "data": {"batch_size": 16, "options": {"n": 200}},
                  "model": {"options": {"hidden": 16, "depth": 1}},
                  "trainer": {"steps": 2, "warmup": 1, "val_every": 0, "ckpt_every": 0, "log_every": 100}})
    out = root / "samples.nc"
    assert main(["sample", str(run), "--n", "4", "--steps", "2", "--out", str(out), "--no-progress",
                 "--device", "cpu"]) == 0
    return dict(run=run, samples=out)


def _open(path) -> xr.Dataset:
    with xr.open_dataset(path) as ds:
        return ds.load()


# ============================================================================= the tests
def test_forecast_output_passes_cf_check(weather, monkeypatch):
    cf_check(weather["forecast"], monkeypatch, forecast=True)
    fc = _open(weather["forecast"])
    assert fc["t2m"].dims == ("member", "init_time", "lead_time", "latitude", "longitude")
    assert fc["init_time"].attrs["standard_name"] == "forecast_reference_time"
    assert fc["valid_time"].attrs["standard_name"] == "time"
    assert fc["lead_time"].attrs["standard_name"] == "forecast_period"
    assert fc["init_time"].values[0] == np.datetime64("2020-01-04T00:00")
    np.testing.assert_array_equal(fc["valid_time"].values[0], np.array(["2020-01-04T06:00", "2020-01-04T12:00"],
                                                                       dtype="datetime64[ns]"))
    with xr.open_dataset(weather["forecast"], decode_times=False, decode_timedelta=False) as raw:
        # CF time encoding: float64 "<unit> since <date>" (no int64: CF-1.8 has none), lead time in hours
        assert raw["init_time"].dtype == np.float64 and " since " in raw["init_time"].attrs["units"]
        assert raw["valid_time"].dtype == np.float64 and " since " in raw["valid_time"].attrs["units"]
        assert raw["lead_time"].attrs["units"] == "hours" and raw["lead_time"].values.tolist() == [6.0, 12.0]
        assert "_FillValue" not in raw["latitude"].attrs and "_FillValue" not in raw["init_time"].attrs


def test_rollout_output_passes_cf_check(pde, monkeypatch):
    cf_check(pde["rollout"], monkeypatch, nondimensional_time=True)
    ds = _open(pde["rollout"])
    assert ds["u"].dims == ("member", "time", "x")
    assert ds["time"].attrs == {"long_name": "time (nondimensional)", "units": "1"}    # the exception's reason
    assert ds["x"].attrs == {"long_name": "x coordinate", "units": "1"}
    with xr.open_dataset(pde["data"]) as f:
        np.testing.assert_array_equal(ds["x"].values, f["x"].values)


@pytest.mark.parametrize("kind", ["weather", "mixture"])
def test_sample_output_passes_cf_check(kind, weather, mixture, monkeypatch):
    path = {"weather": weather, "mixture": mixture}[kind]["samples"]
    cf_check(path, monkeypatch)
    ds = _open(path)
    want = {"weather": {"t2m", "msl"}, "mixture": {"x0", "x1"}}[kind]
    assert set(ds.data_vars) == want and ds.sizes["sample"] == {"weather": 2, "mixture": 4}[kind]
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["title"] == "diffkit samples"


@pytest.mark.parametrize("case", ["grib_like", pytest.param("ncl_storm", marks=needs_ncl)])
def test_lat_lon_get_cf_attributes_when_input_lacks_them(case, tmp_path, monkeypatch):
    if case == "ncl_storm":
        a = A.GriddedAdapter([str(p) for p in STORM], time_units=STORM_UNITS, val_fraction=0.1)
        lat, lon, variables = "lat", "lon", {"u", "p"}
        with xr.open_dataset(STORM[0]) as f:
            assert f["lat"].attrs == {} and f["lon"].attrs == {}             # the input has none
    else:
        a = A.GriddedAdapter(str(write_grib_like(tmp_path / "g.nc")), val_fraction=0.25)
        lat, lon, variables = "latitude", "longitude", {"t2m", "msl"}
    L = a.layout
    assert L.coord_attrs == {"latitude": CF_LAT, "longitude": CF_LON}
    from diffkit_weather import decode as D

    pred = torch.randn(1, 2, 2, *L.sample_shape)
    fc = D.forecast_dataset(pred, L, a.times[[3]])
    fc.to_netcdf(tmp_path / "fc.nc")
    # an old checkpoint's layout (saved before coord_attrs existed) gets the same attributes
    d = L.to_dict()
    del d["coord_attrs"], d["channel_attrs"]
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    old = Layout.from_dict(torch.load(buf, weights_only=True))
    assert old.coord_attrs == {} and old.channel_attrs == {}
    dec = A.GriddedAdapter.decode(torch.randn(2, *L.sample_shape), old, tmp_path / "dec.nc")
    for path in (tmp_path / "fc.nc", dec):
        ds = _open(path)
        assert set(ds.data_vars) == variables
        assert ds[lat].attrs == CF_LAT and ds[lon].attrs == CF_LON
        # cf-xarray finds them (it did not before: the symptom)
        import cf_xarray  # noqa: F401

        assert ds.cf["latitude"].name == lat and ds.cf["longitude"].name == lon
        assert ds.cf.axes["X"] == [lon] and ds.cf.axes["Y"] == [lat]
        cf_check(path, monkeypatch, forecast=path.name == "fc.nc")


def test_grib_attributes_not_copied(weather):
    with xr.open_dataset(weather["data"]) as f:
        assert sum(k.startswith("GRIB_") for k in f["t2m"].attrs) == 27                   # the input has them
    for path in (weather["forecast"], weather["samples"]):
        ds = _open(path)
        for name, var in ds.variables.items():
            assert not [k for k in var.attrs if k.startswith("GRIB_")], (path.name, name, var.attrs)
        assert not [k for k in ds.attrs if k.startswith("GRIB_")] and "institution" not in ds.attrs
        # the allow-list: units, long_name, standard_name (valid_range, cell_methods describe the input)
        assert ds["t2m"].attrs == {"units": "K", "long_name": "2 metre temperature", "standard_name": "air_temperature"}
        assert ds["msl"].attrs == {"units": "Pa", "long_name": "Mean sea level pressure",
                                   "standard_name": "air_pressure_at_mean_sea_level"}
        assert ds.attrs["Conventions"] == "CF-1.8"


def _last_line(history: str, times=None) -> str:
    m = STAMP.match(history.splitlines()[-1])
    assert m, history
    assert m.group(3) == __version__
    if times is not None:
        t = datetime.datetime.strptime(m.group(1), "%Y-%m-%dT%H:%M:%SZ").replace(tzinfo=datetime.timezone.utc)
        assert times[0] <= t <= times[1], (t, times)
    return m.group(2)


def test_history_is_extended(weather, pde, mixture):
    fc, smp = _open(weather["forecast"]), _open(weather["samples"])
    for ds in (fc, smp):
        lines = ds.attrs["history"].splitlines()
        assert len(lines) == 2 and lines[0] == INPUT_HISTORY                # the input's, then one new line
    assert _last_line(fc.attrs["history"], weather["times"]).startswith(f"diffkit forecast {weather['run']} ")
    assert "--init 2020-01-04T00:00 --members 2 --steps 2" in _last_line(fc.attrs["history"])
    assert _last_line(smp.attrs["history"], weather["times"]) == "diffkit train: snapshot at step 2"
    # outputs of inputs without a history start one
    for ds, what in ((_open(pde["rollout"]), "rollout"), (_open(mixture["samples"]), "sample")):
        assert len(ds.attrs["history"].splitlines()) == 1
        assert _last_line(ds.attrs["history"]).startswith(f"diffkit {what} ")


def test_scores_output_passes_cf_check(weather, tmp_path, monkeypatch, capsys):
    """``diffkit evaluate``'s scores.nc: CF-1.8 like the other outputs (no documented exception needed):
    int32 counts, title/source/history (the forecast's, extended by the evaluate command line), a
    long_name on every variable, and the channel names as the label variable ``channel_name(channel)``
    -- a string coordinate variable ``channel`` is not CF and crashed compliance-checker's monotonicity
    check.  ``open_scores`` gives ``channel`` back as the coordinate."""
    from diffkit_weather import evaluate as E

    t0 = datetime.datetime.now(datetime.timezone.utc).replace(microsecond=0)
    out = tmp_path / "ev"
    assert main(["evaluate", str(weather["forecast"]), "--truth", str(weather["data"]), "--out", str(out),
                 "--no-plots"]) == 0
    capsys.readouterr()
    t1 = datetime.datetime.now(datetime.timezone.utc)
    path = out / "scores.nc"
    cf_check(path, monkeypatch)
    with xr.open_dataset(path, decode_times=False, decode_timedelta=False) as raw:
        assert raw["rank_histogram"].dtype == np.int32 and raw["rank"].dtype == np.int32
        assert raw["lead_time"].attrs["units"] == "hours" and "_FillValue" not in raw["lead_time"].attrs
        assert "channel" not in raw.variables and raw["channel_name"].dims == ("channel",)
        for name, var in raw.variables.items():
            assert str(var.attrs.get("long_name", "")).strip(), name
        assert list(raw.attrs)[:4] == ["Conventions", "title", "source", "history"]
        assert raw.attrs["title"] == "diffkit evaluate: ensemble scores" and raw.attrs["source"] == "diffkit evaluate"
        fc_history = _open(weather["forecast"]).attrs["history"].splitlines()
        lines = raw.attrs["history"].splitlines()
        assert lines[:-1] == fc_history and lines[0] == INPUT_HISTORY     # the forecast's history, then one line
        assert _last_line(raw.attrs["history"], (t0, t1)) == (
            f"diffkit evaluate {weather['forecast']} --truth {weather['data']} --out {out} --no-plots")
    s = E.open_scores(path)
    assert s["channel"].values.tolist() == ["t2m", "msl"] and s["variable"].values.tolist() == ["t2m", "msl"]
    assert s["rank_histogram"].values.sum() > 0 and s["lead_time"].dtype.kind == "m"
    np.testing.assert_allclose(s["rmse"].sel(channel="msl").values,
                               E.evaluate(weather["forecast"], weather["data"], plots=False).scores["rmse"]
                               .sel(channel="msl").values, rtol=1e-12)


def test_layout_units_reach_decoded_netcdf(tmp_path, monkeypatch):
    """A plugin's units: ``layout.attrs["units"]`` (one string for every channel, or per channel) and
    the typed ``channel_attrs`` / ``coord_attrs`` (which win), through a checkpoint, into the file the
    default decoder writes (``diffkit sample``'s)."""
    x = torch.randn(3, 2, 4)
    base = dict(channels=("T", "q"), spatial=("x",), shape=(4,), coords={"x": (0.0, 250.0, 500.0, 750.0)},
                mean=torch.tensor([280.0, 0.01]).reshape(2, 1), std=torch.tensor([5.0, 0.002]).reshape(2, 1))

    def written(layout, name):
        buf = io.BytesIO()
        torch.save(layout.to_dict(), buf)                          # what a checkpoint stores
        buf.seek(0)
        back = Layout.from_dict(torch.load(buf, weights_only=True))
        path = decode_samples(MixtureAdapter, x, back, tmp_path / name, attrs={"command": "diffkit sample run"})
        cf_check(path, monkeypatch)
        return _open(path)

    ds = written(Layout(**base, attrs={"units": "K"}), "one.nc")
    assert ds["T"].attrs == {"long_name": "T", "units": "K"} and ds["q"].attrs == {"long_name": "q", "units": "K"}
    np.testing.assert_allclose(ds["T"].values, (x[:, 0] * 5 + 280).numpy(), rtol=1e-6)
    ds = written(Layout(**base, attrs={"units": {"T": "K"}}), "dict.nc")
    assert ds["T"].attrs["units"] == "K" and "units" not in ds["q"].attrs
    ds = written(Layout(**base, attrs={"units": {"T": "degC"}},
                        channel_attrs={"T": {"units": "K", "standard_name": "air_temperature"},
                                       "q": {"units": "kg kg-1", "long_name": "specific humidity"}},
                        coord_attrs={"x": {"units": "km", "long_name": "distance along the track"}}),
                 "typed.nc")
    assert ds["T"].attrs == {"long_name": "T", "units": "K", "standard_name": "air_temperature"}
    assert ds["q"].attrs == {"long_name": "specific humidity", "units": "kg kg-1"}
    assert ds["x"].attrs == {"long_name": "distance along the track", "units": "km"}
    np.testing.assert_array_equal(ds["x"].values, [0.0, 250.0, 500.0, 750.0])
    # declared attributes are checked where the layout is made, one line naming the key
    with pytest.raises(ValueError, match=r"Layout.channel_attrs names \['Tx'\], which are not channels"):
        Layout(**base, channel_attrs={"Tx": {"units": "K"}})
    with pytest.raises(ValueError, match=r"Layout.coord_attrs names \['y'\], which are not spatial axes"):
        Layout(**base, coord_attrs={"y": {"units": "m"}})
    with pytest.raises(TypeError, match=r"Layout.channel_attrs\['T'\] must be a dict of attributes"):
        Layout(**base, channel_attrs={"T": "K"})
    with pytest.raises(TypeError, match=r"Layout.channel_attrs\['T'\]\['units'\] must be a str, a number"):
        Layout(**base, channel_attrs={"T": {"units": None}})
