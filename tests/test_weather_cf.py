"""Tests of ``diffkit_weather.cf``: which dims are latitude, longitude, level and time (CF
attributes before names), how a file's grid becomes the model's orientation (longitude across the
wrap, non-monotonic latitude) and time decoding, through the adapter on synthetic ERA5-layout files."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from diffkit_weather import adapter as A
from diffkit_weather import decode as D

from _weather_era5 import LAT, era5, write


def test_cf_attributes_not_names_find_the_coordinates(tmp_path):
    p = write(era5(cf_names=True), tmp_path / "cf.nc")   # dims valid / p / yy / xx
    a = A.GriddedAdapter(p, variables=["t", "t2m"], levels=[850], val_fraction=0)
    assert a.layout.channels == ("t@850", "t2m") and a.layout.periodic == ("longitude",)
    assert a.layout.attrs["lat_name"] == "yy" and a.layout.attrs["level_dims"] == {"t": "p"}
    with pytest.raises(A.WeatherDataError, match="level 700 .* not in"):
        A.GriddedAdapter(p, levels=[700])


def test_longitude_across_the_wrap_is_relabelled_not_reordered(tmp_path):
    lon = np.r_[np.arange(180.0, 360.0, 10.0), np.arange(0.0, 180.0, 10.0)]   # 180 .. 350, 0 .. 170
    p = write(era5(lon=lon), tmp_path / "wrap.nc")
    a = A.GriddedAdapter(p, variables=["t2m"], val_fraction=0)
    lm = np.asarray(a.layout.coords["longitude"])
    assert (np.diff(lm) > 0).all() and lm[0] == -180 and a.layout.periodic == ("longitude",)
    ds = D.unstack(a.layout.denormalize(a.dataset("train")[0]["x"]), a.layout)
    np.testing.assert_array_equal(ds["longitude"].values, lon.astype(np.float32))
    raw = xr.open_dataset(p, decode_times=False)
    np.testing.assert_allclose(ds["t2m"].values, raw["t2m"].values[1], rtol=1e-6)
    # a regional grid across Greenwich stays contiguous and is not periodic
    p2 = write(era5(lon=np.r_[340.0, 350.0, 0.0, 10.0, 20.0]), tmp_path / "greenwich.nc")
    b = A.GriddedAdapter(p2, variables=["t2m"], val_fraction=0)
    assert b.layout.coords["longitude"] == (-20, -10, 0, 10, 20) and b.layout.periodic == ()


def test_error_non_monotonic_latitude(tmp_path):
    lat = LAT.copy()
    lat[[3, 4]] = lat[[4, 3]]
    p = write(era5(lat=lat), tmp_path / "shuffled.nc")
    with pytest.raises(A.WeatherDataError, match="latitude of shuffled.nc is not monotonic"):
        A.GriddedAdapter(p)


def test_error_undecodable_time(tmp_path):
    ds = era5(nt=4)
    ds["time"].attrs["units"] = "hours since the flood"
    p = write(ds, tmp_path / "t.nc")
    with pytest.raises(A.WeatherDataError, match="cannot decode the time coordinate 'time'"):
        A.GriddedAdapter(p)
    a = A.GriddedAdapter(p, time_units="hours since 2000-01-01", val_fraction=0)
    assert a.times[0] == np.datetime64("2000-01-01T00:00")
