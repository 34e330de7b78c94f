"""Tests of ``diffkit_weather.store``: reading variables spread over several files (a time split
equals one file; grids that differ between files are an error) and :func:`check_grid` against a
checkpoint's layout, on synthetic ERA5-layout files."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkit_weather import adapter as A
from diffkit_weather import store as S

from _weather_era5 import era5, write


def test_time_split_over_files_equals_one_file(tmp_path, era5_path):
    full = era5()
    p1 = write(full.isel(time=slice(0, 5)), tmp_path / "y1.nc")
    p2 = write(full.isel(time=slice(5, None)), tmp_path / "y2.nc")
    a = A.GriddedAdapter(str(tmp_path / "y?.nc"), val_fraction=0, lead=12)
    b = A.GriddedAdapter(era5_path, val_fraction=0, lead=12)
    assert len(a.dataset("train")) == len(b.dataset("train")) == 10
    for i in (0, 3, 9):                      # pair 3 reads from both files
        torch.testing.assert_close(a.dataset("train")[i], b.dataset("train")[i])
    assert a.layout.autoregressive.state_mean == pytest.approx(b.layout.autoregressive.state_mean, rel=1e-12)
    S.check_grid([p1, p2], a.layout)


def test_error_grids_differ_between_files(tmp_path):
    p1 = write(era5()[["t2m"]], tmp_path / "a.nc")
    p2 = write(era5(lat=np.arange(88.0, -90.1, -10.0))[["z"]], tmp_path / "b.nc")
    with pytest.raises(A.WeatherDataError) as e:
        A.GriddedAdapter([p1, p2])
    msg = str(e.value)
    assert "latitude" in msg and "a.nc" in msg and "b.nc" in msg
    # and data against a checkpoint layout
    a = A.GriddedAdapter(p1, val_fraction=0)
    S.check_grid(p1, a.layout)
    with pytest.raises(A.WeatherDataError, match="latitude of b.nc"):
        S.check_grid(p2, a.layout)
