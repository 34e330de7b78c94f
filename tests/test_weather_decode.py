"""Tests of ``diffkit_weather.decode``: model tensors back onto the data file's variables, levels,
coordinates and attributes (``next_state``, ``unstack``), the adapter's ``decode``
(``write_samples``) as an atomically written CF netCDF equal to the file, and ``upgrade_layout``
reading the layouts of old weather checkpoints (tests/_weather_shift.py's oracle file)."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from diffkit.denoiser import Regressor
from diffkit.layout import Layout
from diffkit_weather import adapter as A
from diffkit_weather import decode as D
from diffkit_weather import forecast as F

from _weather_era5 import LAT, LEVELS
from _weather_shift import ShiftOracle  # shift: conftest.py


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


def _old_layout_dict(layout):
    """The dict of ``layout`` as written before Layout.autoregressive: the spec in attrs."""
    d = layout.to_dict()
    sp = d.pop("autoregressive")
    d["attrs"] = {**d["attrs"], "history": sp["history"], "lead_hours": sp["step"], "target": sp["target"],
                  "state_mean": sp["state_mean"], "state_std": sp["state_std"]}
    return d


def test_old_checkpoint_layouts_are_converted(shift, tmp_path):
    import io

    L = A.GriddedAdapter(str(shift), history=2, target="residual", val_fraction=0.25).layout
    assert L.autoregressive.step == 6.0 and L.autoregressive.step_units == "hours"
    assert not {"history", "lead_hours", "target", "state_mean", "state_std"} & set(L.attrs)
    buf = io.BytesIO()
    torch.save(_old_layout_dict(L), buf)
    buf.seek(0)
    old = Layout.from_dict(torch.load(buf, weights_only=True))
    assert old.autoregressive is None
    up = D.upgrade_layout(old)
    assert up.autoregressive == L.autoregressive and repr(up.attrs) == repr(L.attrs)   # (NaN fill values)
    # forecasts accept the old layout as it is (converted on the way in)
    model = Regressor(ShiftOracle(L), L)
    ist = F.initial_states(shift, old, "2000-01-02T00:00")
    torch.testing.assert_close(F.forecast(model, old, ist, steps=2, members=1),
                               F.forecast(model, L, ist, steps=2, members=1), rtol=0, atol=0, equal_nan=True)
    broken = {**_old_layout_dict(L)}
    broken["attrs"] = {k: v for k, v in broken["attrs"].items() if k != "state_std"}
    with pytest.raises(A.WeatherDataError, match="old weather checkpoint.*lack state_std"):
        D.upgrade_layout(Layout.from_dict(broken))
