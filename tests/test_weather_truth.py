"""Tests of ``diffkit_weather.truth``: the verifying data read at each valid time of a forecast,
the forecast's way: a perfect forecast of the oracle file scores 0 (the truth is aligned with the
forecast's init and lead times), and a truth that does not cover the forecast is an error naming
the missing valid times."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from diffkit_weather import adapter as A
from diffkit_weather import evaluate as E

from _weather_shift import _fc_from, truth_model  # shift: conftest.py


def test_evaluate_perfect_forecast_and_uncovered_truth(shift, tmp_path):
    L = A.GriddedAdapter(str(shift), val_fraction=0.25).layout
    times = np.array(["2000-01-05T00"], "datetime64[ns]")
    pred = torch.from_numpy(truth_model(np.array([16]), 4))[:, None].expand(1, 2, 4, 4, 8, 24)
    ev = E.evaluate(_fc_from(pred, L, times), str(shift), plots=False)
    s = ev.scores
    assert np.abs(s["rmse"].values).max() < 1e-6 and np.abs(s["crps"].values).max() < 1e-6
    assert np.abs(s["spread"].values).max() == 0 and ev.files == []
    # one member: RMSE only, the ensemble scores are NaN; the table still has every row
    one = E.evaluate(_fc_from(pred[:, :1], L, times), shift)
    assert np.isnan(one.scores["crps"].values).all() and np.isfinite(one.scores["rmse"].values).all()
    assert len(one.table) == 16
    xr.open_dataset(shift).isel(time=slice(0, 19)).to_netcdf(tmp_path / "short.nc")
    with pytest.raises(A.WeatherDataError, match=r"does not cover the forecast: variable 't' lacks 2 of its 4 valid "
                                                 r"times: 2000-01-05 18:00, 2000-01-06 00:00"):
        E.evaluate(_fc_from(pred, L, times), tmp_path / "short.nc")
