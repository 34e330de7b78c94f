"""Tests of ``diffkit_weather.evaluate``: the scores of a forecast against the oracle file equal
direct calls of :mod:`diffkit_weather.metrics`, and the tables and figures are written (tidy
CSV, netCDF, PNGs; no temporary files left).  The input checks of ``evaluate`` are in
test_weather_evaluate_checks.py."""
from __future__ import annotations

import numpy as np
import torch
import xarray as xr

from diffkit_weather import adapter as A
from diffkit_weather import evaluate as E
from diffkit_weather import metrics as WM

from _weather_shift import LAT, _fc_from, truth_model  # shift: conftest.py

PNG = b"\x89PNG\r\n\x1a\n"


def test_evaluate_scores_equal_direct_metric_calls(shift, tmp_path):
    L = A.GriddedAdapter(str(shift), val_fraction=0.25).layout
    times = np.array(["2000-01-02T00", "2000-01-03T00"], "datetime64[ns]")
    N, M, K = 2, 3, 3
    g = np.random.default_rng(3)
    base = torch.from_numpy(truth_model(np.array([4, 8]), K)).float()  # (N, K, C, lat, lon), model order
    # exchangeable truth and members: a shared error plus member noise of the same size (a reliable ensemble)
    shared = g.normal(size=(N, 1, K, 4, 8, 24)) * 0.3
    pred = base[:, None] + torch.from_numpy(shared + g.normal(size=(N, M, K, 4, 8, 24)) * 0.3).float()
    fc = _fc_from(pred, L, times)
    ev = E.evaluate(fc, shift, out=tmp_path / "ev", seed=0)
    s = ev.scores
    assert list(s["channel"].values) == ["t@500", "t@850", "z@500", "z@850"]
    raw = xr.open_dataset(shift)
    w = WM.latitude_weights(LAT)
    idx = np.array([[4, 8]]).T + 1 + np.arange(K)                     # (N, K) truth time indices
    g2 = torch.Generator().manual_seed(0)
    for c, (v, li) in enumerate([("t", 0), ("t", 1), ("z", 0), ("z", 1)]):
        tr = torch.from_numpy(raw[v].values[idx][:, :, li].astype(np.float64))   # (N, K, lat, lon), file order
        f = torch.from_numpy(fc[v].values[:, :, :, li].astype(np.float64))      # (M, N, K, lat, lon)
        mask = torch.isfinite(tr) & torch.isfinite(f).all(0)
        kw = dict(member_dim=0, mask=mask, init_dim=0)
        np.testing.assert_allclose(s["rmse"].values[c], WM.rmse(f, tr, w, **kw).numpy(), rtol=1e-12)
        np.testing.assert_allclose(s["crps"].values[c], WM.crps(f, tr, w, **kw).numpy(), rtol=1e-12)
        np.testing.assert_allclose(s["spread"].values[c], WM.spread(f, w, **kw).numpy(), rtol=1e-12)
        np.testing.assert_allclose(s["spread_skill_ratio"].values[c],
                                   WM.spread_skill_ratio(f, tr, w, calibrated=True, **kw).numpy(), rtol=1e-12)
        rh = WM.rank_histogram(f, tr, member_dim=0, mask=mask, keep_dims=(1,), generator=g2)  # no ties: exact
        np.testing.assert_array_equal(s["rank_histogram"].values[c], rh.numpy())
        assert int(rh.sum()) == int(mask.sum())
    assert 0.85 < float(s["spread_skill_ratio"].mean()) < 1.15        # (M+1)/M-corrected: about 1
    # the files: tidy CSV, netCDF, figures
    names = sorted(p.name for p in ev.files)
    assert names == ["lead_curves.png", "maps_t-500.png", "maps_t-850.png", "maps_z-500.png", "maps_z-850.png",
                     "rank_histograms.png", "scores.csv", "scores.nc"]
    import pandas as pd

    tab = pd.read_csv(tmp_path / "ev" / "scores.csv")
    assert len(tab) == 4 * K and list(tab.columns[:5]) == ["variable", "level", "channel", "units", "lead_hours"]
    assert tab["lead_hours"].tolist()[:K] == [6.0, 12.0, 18.0] and tab["level"].tolist()[0] == 500
    np.testing.assert_allclose(tab["crps"].values, s["crps"].values.ravel(), rtol=1e-7)
    assert [f"rank_{j}" for j in range(M + 1)] == list(tab.columns[-(M + 1):])
    back = E.open_scores(tmp_path / "ev" / "scores.nc")               # channel names: channel_name(channel)
    np.testing.assert_allclose(back["rmse"].values, s["rmse"].values)
    assert list(back["channel"].values) == list(s["channel"].values)
    for p in ev.files:
        if p.suffix == ".png":
            assert p.read_bytes()[:8] == PNG
    assert not list((tmp_path / "ev").glob(".*"))                     # no temporary files left behind
