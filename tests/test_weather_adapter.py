"""The ``weather`` adapter (``diffkit_weather.adapter.GriddedAdapter``) on real and synthetic files.

- NCL's storm sample files (Debian ``libncarg-data``, installed by ``.ci/run``): four files, one
  variable each (u, v, t, p), no CF attributes at all (dims ``timestep``, ``lat``, ``lon``), a
  -9999 corner mask, and whole missing frames of v and t -- real-world warts;
- a synthetic file in the ERA5 / WeatherBench-2 layout (tests/_weather_era5.py: latitude 90 .. -90,
  longitude 0 .. 350, pressure levels, "hours since 1979-01-01") for the layout, members, pickling and
  options (the CF coordinates, the multi-file store and the decode round trip on the same files are
  tested in test_weather_cf.py, test_weather_store.py and test_weather_decode.py);
- the errors, and the memory use of a 2000-step file measured in a subprocess.
"""
from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from diffkit_weather import adapter as A
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    from diffkit_weather import adapter as A
from diffkit_weather import decode as D  # noqa: E402

import xarray as xr  # a dependency: missing it is a failure, not a skip

from _weather_era5 import LAT, LON, era5, write  # noqa: E402  (era5_path: conftest.py)

NCL = Path("/usr/share/ncarg/data/cdf")
STORM = [NCL / f"{v}storm.cdf" for v in "UVTP"]
STORM_UNITS = "hours since 1996-01-05 00:00"  # the files' 'reftime' text variable: "1996 01 05 00:00"
needs_ncl = pytest.mark.skipif(not STORM[0].exists(), reason="NCL sample data not installed (apt-get install libncarg-data)")


def _storm(**kw):
    kw.setdefault("time_units", STORM_UNITS)
    return A.GriddedAdapter([str(p) for p in STORM], **kw)


# ----------------------------------------------------------------------------- NCL storm files
@needs_ncl
def test_storm_needs_time_units_and_names_its_text_origin():
    with pytest.raises(A.WeatherDataError) as e:
        A.GriddedAdapter([str(p) for p in STORM])
    msg = str(e.value)
    assert "'timestep'" in msg and "time_units" in msg and "1996 01 05 00:00" in msg


@needs_ncl
def test_storm_missing_frames_are_an_error_naming_variable_time_and_points():
    # v is missing (-9999) at every valid point at steps 17 and 37, t at step 17: not a fixed mask
    with pytest.raises(A.WeatherDataError) as e:
        _storm()
    msg = str(e.value)
    assert "'v'" in msg and "1996-01-09 06:00" in msg and "964 grid point" in msg and "allow_missing" in msg
    # u and p have only the fixed corner mask: no error
    _storm(variables=["u", "p"])


@needs_ncl
def test_storm_layout_channels_grid_and_statistics():
    a = _storm(allow_missing=True)
    L = a.layout
    assert L.channels == ("u", "v", "t", "p")
    assert L.cond_channels == ("u@t", "v@t", "t@t", "p@t", "mask")
    assert L.scalars == ("sin_time_of_day", "cos_time_of_day", "sin_day_of_year", "cos_day_of_year")
    assert L.spatial == ("latitude", "longitude") and L.shape == (33, 36)
    assert L.periodic == ()                      # 140W .. 52.5W: regional
    lat = np.asarray(L.coords["latitude"])
    assert (np.diff(lat) > 0).all() and lat[0] == 20 and lat[-1] == 60
    assert L.weights.shape == (1, 33, 1) and float(L.weights.mean()) == pytest.approx(1, abs=1e-6)
    w = L.weights.ravel()
    assert w[0] > w[-1]                          # cos(20) > cos(60)
    assert float(w[0] / w[-1]) == pytest.approx(np.cos(np.deg2rad(20)) / np.cos(np.deg2rad(60)), rel=0.01)
    # statistics: NaN-skipping numpy on the 58 training times (64 - round(6.4))
    assert a.train_times.sum() == 58
    for c, (v, f) in enumerate(zip("uvtp", STORM)):
        with xr.open_dataset(f) as ds:
            x = ds[v].values[:58].astype(np.float64)
        assert a.layout.autoregressive.state_mean[c] == pytest.approx(np.nanmean(x), rel=1e-12)
        assert a.layout.autoregressive.state_std[c] == pytest.approx(np.nanstd(x), rel=1e-10)
        assert float(L.mean[c, 0, 0]) == pytest.approx(np.nanmean(x), rel=1e-6)
        assert float(L.std[c, 0, 0]) == pytest.approx(np.nanstd(x), rel=1e-6)
    # a checkpoint holds plain data only: the layout survives torch.save / weights_only load
    buf = __import__("io").BytesIO()
    torch.save(L.to_dict(), buf)
    buf.seek(0)
    assert type(L).from_dict(torch.load(buf, weights_only=True)).attrs == L.attrs


@needs_ncl
def test_storm_fixed_mask_is_weight_zero_and_a_mask_channel():
    a = _storm(allow_missing=True, val_fraction=0)
    with xr.open_dataset(STORM[0]) as ds:
        corner = np.isnan(ds["u"].values).all(0)        # (lat, lon), ascending lat like the model
    assert corner.sum() == 224
    d = a.dataset("train")
    it = d[0]
    assert it["x"].shape == (4, 33, 36) and it["weight"].shape == (4, 33, 36)
    assert (it["weight"][:, corner] == 0).all() and (it["weight"][:, ~corner] == 1).all()
    assert (it["fields"][-1][corner] == 0).all() and (it["fields"][-1][~corner] == 1).all()
    assert torch.isfinite(it["x"]).all() and (it["x"][:, corner] == 0).all()
    # the target at step 17 has no v and no t: weight 0 on those channels, never filled silently
    i = int(np.flatnonzero(d.pairs[:, -1] == 17)[0])
    w = d[i]["weight"]
    assert (w[1] == 0).all() and (w[2] == 0).all() and (w[0][~corner] == 1).all()
    # an input at step 17: v, t filled with 0 and the mask channel is 0 (union over channels)
    j = int(np.flatnonzero(d.pairs[:, -2] == 17)[0])
    f = d[j]["fields"]
    assert (f[1] == 0).all() and (f[-1] == 0).all()
    # the mask is in the layout: a checkpoint alone restores it
    assert D.fixed_mask(a.layout).sum() == 4 * 224


@needs_ncl
@pytest.mark.parametrize("lead,history,pairs", [(None, 1, 63), (6, 1, 63), (12, 1, 62), (12, 2, 60), (18, 3, 55)])
def test_storm_pair_counts(lead, history, pairs):
    a = _storm(variables=["u", "p"], lead=lead, history=history, val_fraction=0)
    assert len(a.dataset("train")) == pairs and len(a.dataset("val")) == 0
    assert a.step_hours == 6 and a.lead_hours == (lead or 6)


@needs_ncl
def test_storm_time_split_never_shares_times():
    a = _storm(variables=["u", "p"], lead=12)          # 58 training times, 6 validation times
    tr, va = a.dataset("train"), a.dataset("val")
    assert (len(tr), len(va)) == (56, 4)
    assert set(tr.pairs.ravel()).isdisjoint(va.pairs.ravel())
    b = _storm(variables=["u", "p"], train_slice=["1996-01-05", "1996-01-15"], val_slice="1996-01-16/1996-01-20")
    assert b.times[b.train_pairs.max()] == np.datetime64("1996-01-15T18:00")
    assert b.times[b.val_pairs.min()] == np.datetime64("1996-01-16T00:00")
    with pytest.raises(A.WeatherDataError, match="overlap"):
        _storm(variables=["u", "p"], train_slice=["1996-01-05", "1996-01-15"], val_slice=["1996-01-15", None])


@needs_ncl
def test_storm_forcings_of_the_init_time():
    a = _storm(variables=["u", "p"], val_fraction=0)
    d = a.dataset("train")
    t0, t1 = d.times(0)
    assert t0 == np.datetime64("1996-01-05T00:00") and t1 == np.datetime64("1996-01-05T06:00")
    doy = 4 / 366                                       # Jan 5, 00:00 of a leap year
    np.testing.assert_allclose(d[0]["scalars"].numpy(), [0, 1, np.sin(2 * np.pi * doy), np.cos(2 * np.pi * doy)], atol=1e-6)
    assert d.times(3)[0] == np.datetime64("1996-01-05T18:00")
    doy = (4 + 0.75) / 366
    np.testing.assert_allclose(d[3]["scalars"].numpy(), [-1, 0, np.sin(2 * np.pi * doy), np.cos(2 * np.pi * doy)], atol=1e-6)


@needs_ncl
def test_storm_decode_restores_file_and_mask(tmp_path):
    a = _storm(variables=["u", "p"], val_fraction=0)
    it = a.dataset("train")[5]
    out = A.GriddedAdapter.decode(it["x"][None], a.layout, tmp_path / "s.nc")
    with xr.open_dataset(out) as d, xr.open_dataset(STORM[0]) as u:
        assert list(d["u"].dims) == ["sample", "lat", "lon"]
        np.testing.assert_array_equal(d["lat"].values, u["lat"].values)
        assert d["lat"].dtype == u["lat"].dtype == np.float32
        ref = u["u"].values[6]
        np.testing.assert_allclose(d["u"].values[0], ref, rtol=1e-5, atol=1e-4)   # NaN on the mask too
        assert d["u"].encoding["_FillValue"] == -9999


# ----------------------------------------------------------------------------- ERA5 layout
def test_era5_layout_is_global_and_latitude_ascending(era5_path):
    a = A.GriddedAdapter(era5_path, val_fraction=0.25)
    L = a.layout
    assert L.channels == ("z@500", "z@850", "t@500", "t@850", "u@500", "u@850", "t2m")
    assert L.periodic == ("longitude",)
    assert L.coords["latitude"][0] == -90 and L.coords["latitude"][-1] == 90
    assert "mask" not in L.cond_channels and "weight" not in a.dataset("train")[0]
    assert L.weights.shape == (1, 19, 1) and float(L.weights.mean()) == pytest.approx(1, abs=1e-6)
    assert float(L.weights[0, 0, 0]) < 0.05           # the polar cap is small
    assert a.step_hours == 6 and len(a.dataset("train")) == 8 and len(a.dataset("val")) == 2


def test_members_are_separate_trajectories(tmp_path):
    p = write(era5(nt=6, members=3), tmp_path / "ens.nc")
    a = A.GriddedAdapter(p, variables=["t2m"], val_fraction=0)
    raw = xr.open_dataset(p, decode_times=False)
    assert len(a.dataset("train")) == 5 * 3
    x = a.layout.denormalize(a.dataset("train")[4]["x"])      # pair 1, member 1
    np.testing.assert_allclose(x[0].numpy(), raw["t2m"].values[1, 2, ::-1], rtol=1e-6)
    b = A.GriddedAdapter(p, variables=["t2m"], val_fraction=0, member=[2])
    assert len(b.dataset("train")) == 5


def test_dataset_pickles_and_collates(era5_path):
    a = A.GriddedAdapter(era5_path, val_fraction=0)
    d = pickle.loads(pickle.dumps(a.dataset("train")))
    torch.testing.assert_close(d[2], a.dataset("train")[2])
    batch = torch.utils.data.default_collate([d[0], d[1]])
    assert batch["x"].shape == (2, 7, 19, 36) and batch["scalars"].shape == (2, 4)


# ----------------------------------------------------------------------------- errors
@needs_ncl
def test_error_missing_variable_lists_the_available_ones():
    with pytest.raises(A.WeatherDataError) as e:
        _storm(variables=["u", "q"])
    assert "'q'" in str(e.value) and "p, t, u, v" in str(e.value)


@needs_ncl
def test_error_lead_not_a_multiple_of_the_step():
    with pytest.raises(A.WeatherDataError, match=r"lead 9 h is not a positive multiple .* \(6 h\)"):
        _storm(variables=["u"], lead=9)
    with pytest.raises(A.WeatherDataError, match="positive multiple"):
        _storm(variables=["u"], lead=-6)


def test_error_gap_in_time_axis(tmp_path):
    p = write(era5(nt=10, drop=[4]), tmp_path / "gap.nc")   # 00 06 12 18 | 1979-01-02 06:00 ...
    with pytest.raises(A.WeatherDataError) as e:
        A.GriddedAdapter(p, variables=["t2m"])
    msg = str(e.value)
    assert "1979-01-01 18:00 is followed by 1979-01-02 06:00" in msg and "12 h" in msg and "allow_gaps" in msg
    a = A.GriddedAdapter(p, variables=["t2m"], allow_gaps=True, val_fraction=0)
    assert len(a.dataset("train")) == 8                     # 10 times, 9 steps, one spans the gap
    b = A.GriddedAdapter(p, variables=["t2m"], allow_gaps=True, val_fraction=0, lead=12)
    assert len(b.dataset("train")) == 7                     # 12 h pairs across the gap are whole


def test_error_nan_outside_fixed_mask_and_allow_missing(tmp_path):
    ds = era5(nt=8)
    ds["t2m"].values[:, 0, :3] = np.nan          # fixed (every time): fine
    ds["t"].values[5, 1, 2, 4:6] = np.nan        # t@850 at 1979-01-02 06:00, two points
    p = write(ds, tmp_path / "nan.nc")
    with pytest.raises(A.WeatherDataError) as e:
        A.GriddedAdapter(p, val_fraction=0)
    msg = str(e.value)
    assert "'t'" in msg and "t@850" in msg and "1979-01-02 06:00" in msg and "2 grid point" in msg
    a = A.GriddedAdapter(p, val_fraction=0, allow_missing=True)
    it = a.dataset("train")[4]                   # target time index 5
    w = it["weight"]
    c = a.layout.channels.index("t@850")
    assert w[c].sum() == 19 * 36 - 2 and w[-1].sum() == 19 * 36 - 3
    # stats of t@850 skip the two NaNs
    ref = ds["t"].values[:, 1].astype(np.float64)
    assert a.layout.autoregressive.state_mean[c] == pytest.approx(np.nanmean(ref), rel=1e-12)


# ----------------------------------------------------------------------------- memory
MEM_SCRIPT = textwrap.dedent("""
    import json, sys, tracemalloc
    import numpy as np, torch, xarray
    sys.path.insert(0, sys.argv[1])
    from diffkit_weather.adapter import GriddedAdapter

    def rss_peak():  # VmHWM: peak resident set size since the last reset, bytes
        for line in open("/proc/self/status"):
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024

    def reset_peak():  # Linux >= 4.0: writing 5 to clear_refs resets VmHWM to the current RSS
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")

    def run(path):
        a = GriddedAdapter(path, val_fraction=0.25)
        d = a.dataset("train")
        for i in range(0, len(d), 7):
            float(d[i]["x"].sum())
        return len(range(0, len(d), 7))

    run(sys.argv[2])  # warm-up on a small file: lazy imports and first-use caches are not the data
    out = []
    for path in sys.argv[3:]:
        reset_peak()
        base = rss_peak()
        tracemalloc.start()
        items = run(path)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        out.append(dict(path=path, traced=traced, rss=rss_peak() - base, items=items))
    print(json.dumps(out))
""")


def _big_file(path: Path, nt: int) -> int:
    """(time, level, lat, lon) z and t on 2 levels and t2m, 32 x 64, written in blocks."""
    import netCDF4

    with netCDF4.Dataset(path, "w") as nc:
        for d, n in (("time", nt), ("level", 2), ("latitude", 32), ("longitude", 64)):
            nc.createDimension(d, n)
        nc.createVariable("time", "i8", ("time",)).setncatts({"units": "hours since 2000-01-01", "calendar": "standard"})
        nc["time"][:] = 6 * np.arange(nt)
        nc.createVariable("level", "i4", ("level",)).setncatts({"units": "hPa"})
        nc["level"][:] = [500, 850]
        nc.createVariable("latitude", "f4", ("latitude",)).setncatts({"units": "degrees_north"})
        nc["latitude"][:] = np.linspace(87.1875, -87.1875, 32)
        nc.createVariable("longitude", "f4", ("longitude",)).setncatts({"units": "degrees_east"})
        nc["longitude"][:] = np.arange(64) * 5.625
        g = np.random.default_rng(0)
        for v, dims in (("z", ("time", "level", "latitude", "longitude")), ("t", ("time", "level", "latitude", "longitude")),
                        ("t2m", ("time", "latitude", "longitude"))):
            nc.createVariable(v, "f4", dims).setncatts({"units": "1"})
            for s in range(0, nt, 250):
                e = min(nt, s + 250)
                nc[v][s:e] = g.standard_normal((e - s, *([2] if len(dims) == 4 else []), 32, 64)).astype(np.float32)
    return path.stat().st_size


@pytest.mark.skipif(not Path("/proc/self/clear_refs").exists(), reason="needs Linux /proc to reset the peak RSS")
@pytest.mark.slow
def test_memory_stays_bounded_and_does_not_grow_with_time_steps(tmp_path, era5_path):
    p1, p2 = tmp_path / "m1000.nc", tmp_path / "m2000.nc"
    size1, size2 = _big_file(p1, 1000), _big_file(p2, 2000)
    assert 75e6 < size2 < 90e6
    plugins = str(Path(A.__file__).resolve().parents[1])
    # cold: the first big file after a warm-up on a small one; then both lengths again, warm
    r = subprocess.run([sys.executable, "-c", MEM_SCRIPT, plugins, era5_path, str(p2), str(p1), str(p2)],
                       capture_output=True, text=True, timeout=120, env={**os.environ, "OMP_NUM_THREADS": "1"})
    assert r.returncode == 0, r.stderr[-3000:]
    cold, m1, m2 = json.loads(r.stdout.strip().splitlines()[-1])
    print(f"\n{size2 / 1e6:.1f} MB file, cold: traced peak {cold['traced'] / 1e6:.2f} MB, peak RSS growth "
          f"{cold['rss'] / 1e6:.1f} MB; warm: {size1 / 1e6:.1f} MB file {m1['traced'] / 1e6:.2f} / {m1['rss'] / 1e6:.1f} MB, "
          f"{size2 / 1e6:.1f} MB file {m2['traced'] / 1e6:.2f} / {m2['rss'] / 1e6:.1f} MB")
    assert cold["traced"] < 0.25 * size2 and cold["rss"] < 0.25 * size2, cold
    for m in (m1, m2):
        assert m["traced"] < 0.25 * size1 and m["rss"] < 0.25 * size1, m
    assert m2["items"] > 1.9 * m1["items"]
    assert m2["traced"] < 1.25 * m1["traced"] + 1e6        # twice the steps, not twice the memory
    assert m2["rss"] < m1["rss"] + 2e6


# ----------------------------------------------------------------------------- options
def test_static_fields_and_explicit_dims(tmp_path):
    ds = era5(nt=6)
    la = np.deg2rad(LAT)[:, None] + 0 * LON[None, :]
    ds["orog"] = (("latitude", "longitude"), (1000 * np.cos(la) ** 2).astype(np.float32), {"units": "m"})
    ds["sst"] = ds["t2m"].expand_dims(expver=[1], axis=1)        # a size-1 extra dim is dropped
    p = write(ds, tmp_path / "static.nc")
    a = A.GriddedAdapter(p, variables=["t2m"], static=["orog"], val_fraction=0, dims={"time": "time"})
    assert a.layout.cond_channels == ("t2m@t", "orog")           # orog is no state variable by default
    b = A.GriddedAdapter(p, val_fraction=0)
    assert b.layout.channels[-2:] == ("t2m", "sst")
    torch.testing.assert_close(b.dataset("train")[1]["x"][-1], b.dataset("train")[1]["x"][-2])
    f = a.dataset("train")[0]["fields"][1].numpy()
    ref = ds["orog"].values[::-1].astype(np.float64)
    np.testing.assert_allclose(f, (ref - ref.mean()) / ref.std(), atol=1e-5)
    with pytest.raises(A.WeatherDataError, match="roles are"):
        A.GriddedAdapter(p, dims={"when": "time"})


def test_residual_statistics_and_irregular_reads(tmp_path):
    p = write(era5(nt=12, drop=[3, 7]), tmp_path / "gaps.nc")   # reads of non-evenly spaced times
    a = A.GriddedAdapter(p, variables=["t2m"], target="residual", allow_gaps=True, val_fraction=0, stats_block=3)
    raw = xr.open_dataset(p, decode_times=False)["t2m"].values.astype(np.float64)
    hrs = xr.open_dataset(p, decode_times=False)["time"].values
    ok = np.flatnonzero(np.diff(hrs) == 6)
    d = raw[ok + 1] - raw[ok]
    assert len(a.dataset("train")) == ok.size
    assert float(a.layout.mean[0]) == pytest.approx(d.mean(), rel=1e-5, abs=1e-6)
    assert float(a.layout.std[0]) == pytest.approx(d.std(), rel=1e-6)
    assert a.layout.autoregressive.state_std[0] == pytest.approx(raw.std(), rel=1e-10)
