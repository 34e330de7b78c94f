"""Tests of the diffkit-timeseries plugin.

The contract checks come from diffkit itself, as the ``diffkit_check`` pytest fixture (installed
with diffkit through its ``pytest11`` entry point): they test what diffkit relies on, and this
file adds what only this domain knows (the windows hold the file's values).  Run them after
``pip install -e .`` of this package, from its folder: ``python -m pytest``.
"""
from __future__ import annotations

import numpy as np
import pytest

import diffkit_timeseries
from diffkit import Layout, ShapeError
from diffkit_timeseries.adapter import TimeSeriesAdapter, lorenz96, read_samples
from diffkit_timeseries.backbone import build_tsconv


def write_csv(path, values, names, time_column=True):
    with open(path, "w") as f:
        f.write(",".join((["time"] if time_column else []) + names) + "\n")
        for t, row in enumerate(values):
            f.write(",".join(([str(t)] if time_column else []) + [repr(float(v)) for v in row]) + "\n")
    return path


# -- the plugin --------------------------------------------------------------------------------
def test_plugin_registers(diffkit_check):
    found = diffkit_check.check_plugin_registers(diffkit_timeseries)
    assert set(found) == {"adapter", "backbone"}


def test_installed_plugin_is_discovered(diffkit_check):
    """The entry point of pyproject.toml: `diffkit plugins` lists both components under "timeseries"."""
    diffkit_check.check_plugin_registers(diffkit_timeseries, entry_point="timeseries")


# -- the adapter -------------------------------------------------------------------------------
def test_adapter_contract_on_the_synthetic_series(diffkit_check):
    diffkit_check.check_adapter(TimeSeriesAdapter, n_steps=1000, window=32)


@pytest.mark.parametrize("suffix", [".csv", ".nc"])
def test_adapter_contract_on_a_file(diffkit_check, tmp_path, suffix):
    values = lorenz96(300, n_channels=4, seed=1)
    path = write_csv(tmp_path / "series.csv", values, ["a", "b", "c", "d"])
    if suffix == ".nc":
        import xarray as xr

        xr.Dataset({n: ("time", values[:, k]) for k, n in enumerate("abcd")}).to_netcdf(tmp_path / "series.nc")
        path = tmp_path / "series.nc"
    # decode to netCDF: diffkit reads it back itself; to CSV: it needs our reader
    diffkit_check.check_adapter(TimeSeriesAdapter, path=str(path), window=16, channels=["c", "a"])
    diffkit_check.check_adapter(TimeSeriesAdapter, path=str(path), window=16, decode_suffix=".csv",
                                read_back=read_samples)


def test_windows_hold_the_file_values_and_the_split_is_by_time(tmp_path):
    values = np.arange(100.0)[:, None] * np.array([1.0, -2.0]) + np.array([5.0, 0.5])
    path = write_csv(tmp_path / "s.csv", values, ["up", "down"], time_column=False)
    a = TimeSeriesAdapter(path=str(path), window=10, stride=5, val_fraction=0.2)
    lay = a.layout
    assert lay.channels == ("up", "down") and lay.sample_shape == (2, 10) and lay.periodic == ()
    train, val = a.dataset("train"), a.dataset("val")
    assert len(train) == 15 and len(val) == 3           # starts 0, 5, .., 70 and 80, 85, 90
    np.testing.assert_allclose(lay.denormalize(train[3]["x"]).numpy(), values[15:25].T, rtol=1e-6)
    np.testing.assert_allclose(lay.denormalize(val[0]["x"]).numpy(), values[80:90].T, rtol=1e-6)
    np.testing.assert_allclose(lay.mean.flatten().numpy(), values[:80].mean(0), rtol=1e-6)   # training part only


def test_errors_name_the_fix(tmp_path):
    path = write_csv(tmp_path / "s.csv", np.ones((50, 1)) * [[1.0, 2.0]] + np.arange(50)[:, None], ["a", "b"])
    with pytest.raises(ValueError, match="not in s.csv; it has a, b"):
        TimeSeriesAdapter(path=str(path), channels=["c"])
    with pytest.raises(ValueError, match="fewer than window = 64"):
        TimeSeriesAdapter(path=str(path))
    with pytest.raises(ValueError, match="unknown split"):
        TimeSeriesAdapter(path=str(path), window=4).dataset("test")
    (tmp_path / "bad.csv").write_text("a,b\n1,2\n3,x\n")
    with pytest.raises(ValueError, match="line 3, column 'b'"):
        TimeSeriesAdapter(path=str(tmp_path / "bad.csv"))


# -- the backbone ------------------------------------------------------------------------------
@pytest.mark.parametrize("layout", [
    Layout(channels=("x1", "x2", "x3"), spatial=("time",), shape=(32,)),
    # everything a layout can declare: conditioning fields, scalars, classes, a periodic axis
    Layout(channels=("u",), spatial=("time",), shape=(16,), periodic=("time",), cond_channels=("u_past",),
           scalars=("forcing",), num_classes=3),
], ids=["plain", "conditional"])
def test_backbone_contract(diffkit_check, layout):
    diffkit_check.check_backbone(build_tsconv, layout, hidden=16, depth=3)


def test_backbone_needs_one_axis():
    with pytest.raises(ShapeError, match="one spatial axis"):
        build_tsconv(Layout(channels=("t",), spatial=("lat", "lon"), shape=(4, 8)))
