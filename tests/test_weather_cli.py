"""``diffkit data weather qg``: a CF file on a labelled lat-lon grid, with perturbed-IC members."""
from __future__ import annotations

import numpy as np
import xarray as xr

from diffkit.cli import main


def test_data_weather_qg_writes_cf_members(tmp_path, capsys):
    out = tmp_path / "qg.nc"
    rc = main(["data", "weather", "qg", "--years", "0.01", "--spin-up-years", "0.01", "--nx", "16",
               "--members", "2", "--members-of-init", "2", "--seed", "3", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    with xr.open_dataset(out) as ds:
        assert ds.attrs["Conventions"] == "CF-1.8"
        assert ds["streamfunction"].dims == ("member", "time", "level", "latitude", "longitude")
        assert ds.sizes["member"] == 2 + 2 * 2 and ds.sizes["time"] == int(0.01 * 365 * 4) + 1
        assert ds["latitude"].attrs["units"] == "degrees_north" and ds["longitude"].attrs["units"] == "degrees_east"
        assert np.all(np.diff(ds["time"].values) == np.timedelta64(6, "h"))
        assert "--members-of-init 2" in ds.attrs["command"] and "--seed 3" in ds.attrs["command"]
        q = ds["potential_vorticity"].values
        # the perturbed copies start from run 0 / run 1's first frame, close to it but not equal
        for run, copies in ((0, (2, 3)), (1, (4, 5))):
            for c in copies:
                d = np.abs(q[c, 0] - q[run, 0]).max() / np.abs(q[run, 0]).max()
                assert 1e-4 < d < 0.2, (run, c, d)
        assert np.abs(q[2, 0] - q[3, 0]).max() > 1e-4 * np.abs(q[0, 0]).max()  # the copies differ


def test_data_weather_rejects_bad_numbers(tmp_path, capsys):
    assert main(["data", "weather", "qg", "--years", "0", "--out", str(tmp_path / "x.nc")]) == 1
    err = capsys.readouterr().err
    assert "diffkit data weather: error: --years must be > 0" in err


def test_data_weather_fields_and_precision(tmp_path, capsys):
    out = tmp_path / "psi.nc"
    rc = main(["data", "weather", "qg", "--years", "0.005", "--spin-up-years", "0", "--nx", "16", "--members-of-init",
               "2", "--fields", "psi", "--float32", "--out", str(out), "--no-progress"])
    assert rc == 0, capsys.readouterr().err
    with xr.open_dataset(out) as ds:
        assert list(ds.data_vars) == ["streamfunction"] and ds["streamfunction"].dtype == np.float32
        assert ds.sizes["member"] == 3 and "--fields psi --float32" in ds.attrs["command"]
    assert main(["data", "weather", "qg", "--fields", "psi,w", "--out", str(tmp_path / "x.nc")]) == 1
    assert "unknown field(s) w; choose from psi, q, u, v" in capsys.readouterr().err


def test_qg_file_is_doubly_periodic_for_the_adapter(tmp_path, capsys):
    """The QG domain wraps in both directions: its file says so, the adapter's layout follows, the
    option overrides it, and a wrong axis name is an error naming the valid ones."""
    import pytest

    from diffkit_weather.adapter import GriddedAdapter, WeatherDataError

    out = tmp_path / "qg.nc"
    assert main(["data", "weather", "qg", "--years", "0.01", "--spin-up-years", "0", "--nx", "16",
                 "--fields", "psi", "--out", str(out), "--no-progress"]) == 0, capsys.readouterr().err
    opts = dict(forcings=[], val_fraction=0.25)
    assert GriddedAdapter(out, **opts).layout.periodic == ("latitude", "longitude")
    assert GriddedAdapter(out, periodic=[], **opts).layout.periodic == ()
    assert GriddedAdapter(out, periodic="longitude", **opts).layout.periodic == ("longitude",)
    with pytest.raises(WeatherDataError, match="periodic axes can only be 'latitude' and/or 'longitude'"):
        GriddedAdapter(out, periodic=["x"], **opts)
