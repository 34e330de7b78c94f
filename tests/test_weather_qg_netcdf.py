"""The QG run as CF netCDF (``diffkit_weather.qg_netcdf``): metadata, the lat-lon labelling, time
encoding, members, and an atomic round trip.
"""
from __future__ import annotations

import math

import numpy as np
import pytest

from _qg_fixtures import Q, QN


def test_to_dataset_cf_metadata_and_netcdf_round_trip(tmp_path):
    import xarray as xr
    r = Q.simulate_qg(1, 4, nx=32, spin_up_years=0, ic_amplitude=1e-5, seed=1)
    ds = QN.to_dataset(r)
    for name in ("streamfunction", "potential_vorticity", "eastward_wind", "northward_wind"):
        assert ds[name].dims == ("time", "level", "latitude", "longitude")
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["nx"] == 32 and ds.attrs["beta"] == 1.5e-11
    assert ds.attrs["rek"] == 5.787e-7 and "periodic" in ds.attrs["grid_note"]
    assert ds.attrs["periodic_axes"] == "latitude longitude"
    assert ds["eastward_wind"].attrs["standard_name"] == "eastward_wind"
    assert ds["northward_wind"].attrs["units"] == "m s-1" and ds["streamfunction"].attrs["units"] == "m2 s-1"
    assert ds["potential_vorticity"].attrs["units"] == "s-1"
    t = ds["time"].values
    assert np.issubdtype(t.dtype, np.datetime64) and t[0] == np.datetime64("2000-01-01T00:00")
    assert (np.diff(t) == np.timedelta64(6, "h")).all()
    assert ds["time"].attrs["standard_name"] == "time" and ds["time"].attrs["axis"] == "T"
    lat, lon = ds["latitude"], ds["longitude"]
    assert (np.diff(lat.values) > 0).all() and (np.diff(lon.values) > 0).all()
    assert (lat.attrs["units"], lat.attrs["standard_name"], lat.attrs["axis"]) == ("degrees_north", "latitude", "Y")
    assert (lon.attrs["units"], lon.attrs["standard_name"], lon.attrs["axis"]) == ("degrees_east", "longitude", "X")
    assert float(lat.mean()) == pytest.approx(45.0) and float(lon.mean()) == pytest.approx(-30.0)
    assert float(lat[1] - lat[0]) == pytest.approx(31250.0 / 111.2e3)
    assert float(lon[1] - lon[0]) == pytest.approx(31250.0 / (111.2e3 * math.cos(math.radians(45.0))))
    assert list(ds["level"].values) == [1, 2] and ds["level"].attrs["positive"] == "down"
    np.testing.assert_allclose(ds["layer_thickness"].values, [500.0, 2000.0])
    np.testing.assert_array_equal(ds["eastward_wind"].values, r["u"][0].numpy())

    path = tmp_path / "sub" / "qg.nc"
    QN.write_netcdf(ds, path)
    assert [p.name for p in path.parent.iterdir()] == ["qg.nc"]          # no temporary file left
    with xr.open_dataset(path) as back:
        np.testing.assert_array_equal(back["time"].values, t)
        np.testing.assert_allclose(back["potential_vorticity"].values, r["q"][0].numpy(), rtol=0, atol=0)
        np.testing.assert_allclose(back["latitude"].values, lat.values)
        assert back["latitude"].attrs["units"] == "degrees_north" and back.attrs["Conventions"] == "CF-1.8"
    with xr.open_dataset(path, decode_times=False) as raw:
        # xarray may shorten the reference time to "hours since 2000-01-01" (the same CF time)
        assert raw["time"].attrs["units"] in ("hours since 2000-01-01 00:00:00", "hours since 2000-01-01")
        assert raw["time"].attrs["calendar"] == "standard"
        np.testing.assert_allclose(raw["time"].values, [0.0, 6.0, 12.0, 18.0])

    # several members: a leading "member" dimension (CF realization)
    r2 = Q.simulate_qg(2, 2, nx=32, spin_up_years=0, ic_amplitude=1e-5, fields=("q", "u"))
    ds2 = QN.to_dataset(r2, lat0=50.0, lon0=10.0, start="2001-06-01")
    assert ds2["potential_vorticity"].dims == ("member", "time", "level", "latitude", "longitude")
    assert "streamfunction" not in ds2 and ds2["member"].attrs["standard_name"] == "realization"
    assert ds2["time"].values[0] == np.datetime64("2001-06-01T00:00")
    QN.write_netcdf(ds2, tmp_path / "ens.nc")
    with xr.open_dataset(tmp_path / "ens.nc") as back:
        np.testing.assert_array_equal(back["eastward_wind"].values, r2["u"].numpy())
