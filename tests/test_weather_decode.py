"""Tests of ``diffkit_weather.decode``: model tensors back onto the data file's variables, levels,
coordinates and attributes (``next_state``, ``unstack``) and the adapter's ``decode``
(``write_samples``) as an atomically written CF netCDF equal to the file."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from diffkit_weather import adapter as A
from diffkit_weather import decode as D

from _weather_era5 import LAT, LEVELS


@pytest.mark.parametrize("target", ["state", "residual"])
def test_era5_round_trip_items_unstack_decode(era5_path, tmp_path, target):
    a = A.GriddedAdapter(era5_path, val_fraction=0, target=target, history=2)
    L = a.layout
    raw = xr.open_dataset(era5_path, decode_times=False).load()
    d = a.dataset("train")
    i = 3
    it = d[i]
    tgt = int(d.pairs[i, -1])
    assert it["fields"].shape == (2 * 7, 19, 36) and L.cond_channels[7] == "z@500@t"
    phys = D.next_state(it["x"][None], it["fields"][None], L)[0]
    ds = D.unstack(phys, L)
    for v in ("z", "t", "u", "t2m"):
        ref = raw[v].isel(time=tgt)
        assert ds[v].dims == ref.dims and ds[v].attrs == ref.attrs
        tol = 1e-5 * float(np.abs(ref).max())
        np.testing.assert_allclose(ds[v].values, ref.values, rtol=0, atol=tol)
    np.testing.assert_array_equal(ds["latitude"].values, LAT)      # original (descending) order
    np.testing.assert_array_equal(ds["level"].values, LEVELS)
    # decode: atomically written CF netCDF equal to the template, from the layout alone
    lay = type(L).from_dict(L.to_dict())
    if target == "state":
        out = A.GriddedAdapter.decode(torch.stack([it["x"], d[0]["x"]]), lay, tmp_path / "dec.nc", attrs={"step": 7})
        with xr.open_dataset(out) as dec:
            assert set(dec.data_vars) == {"z", "t", "u", "t2m"} and dec.attrs["step"] == 7
            for v in dec.data_vars:
                assert dec[v].attrs == raw[v].attrs and dec[v].dims == ("sample", *raw[v].dims[1:])
                ref = raw[v].isel(time=tgt).values
                np.testing.assert_allclose(dec[v].values[0], ref, rtol=0, atol=1e-5 * np.abs(ref).max())
            cf = {"latitude": D.CF_LATITUDE, "longitude": D.CF_LONGITUDE}   # CF attributes added (test_cf_outputs.py)
            for c in ("latitude", "longitude", "level"):
                np.testing.assert_array_equal(dec[c].values, raw[c].values)
                assert dec[c].attrs == {**raw[c].attrs, **cf.get(c, {})} and dec[c].dtype == raw[c].dtype
        assert not list(tmp_path.glob(".*tmp*"))
