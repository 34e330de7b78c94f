"""Tests of ``diffkit_pde.netcdf``: the simulators' results as CF datasets (``to_dataset``) and
atomic netCDF files (``write_netcdf``) that read back equal."""
from __future__ import annotations

import math

import numpy as np
import pytest

from _pde_fixtures import P, coarse_ns


@coarse_ns
def test_to_dataset_and_atomic_netcdf(tmp_path):
    import xarray as xr
    r = P.simulate_ks(3, 4, nx=64, L=22.0, burn_in=1.0, seed=1)
    ds = P.to_dataset(r, "ks")
    assert ds["u"].dims == ("trajectory", "time", "x")
    assert ds["L"].dims == ("trajectory",) and ds["x_position"].dims == ("trajectory", "x")
    assert ds.attrs["Conventions"] == "CF-1.8" and ds.attrs["nx"] == 64 and ds.attrs["seed"] == 1
    assert "ETDRK4" in ds.attrs["scheme"] and ds.attrs["burn_in"] == pytest.approx(1.0)
    assert ds["x"].attrs["axis"] == "X" and ds["time"].attrs["units"] == "1"
    path = write_path = tmp_path / "sub" / "ks.nc"
    P.write_netcdf(ds, write_path)
    assert [p.name for p in path.parent.iterdir()] == ["ks.nc"]   # no temporary file left
    with xr.open_dataset(path) as back:
        np.testing.assert_allclose(back["u"].values, r["u"].numpy())
        np.testing.assert_allclose(back["L"].values, r["L"].numpy())

    b = P.simulate_burgers(2, 3, nx=32)
    dsb = P.to_dataset(b)
    assert "x_position" not in dsb and float(dsb["x"][1]) == pytest.approx(2 * math.pi / 32)
    assert dsb.attrs["nu"] == 0.01

    k = P.simulate_kolmogorov(2, 2, n_sim=32, n_out=16, burn_in=0.0)
    dsk = P.to_dataset(k)
    assert dsk["u"].dims == ("trajectory", "time", "x", "y") and set(dsk.data_vars) >= {"u", "v", "omega"}
    assert dsk.attrs["re"] == pytest.approx(1000.0) and dsk.attrs["k_f"] == 4 and dsk.attrs["drag"] == 0.1
    # netCDF has no boolean: True is written as 1 (diffkit.adapters.netcdf_attrs)
    assert type(dsk.attrs["dealias"]) is int and dsk.attrs["dealias"] == 1
    P.write_netcdf(dsk, tmp_path / "k.nc")
    with pytest.raises(ValueError, match="kind"):
        P.to_dataset(k, "heat")
