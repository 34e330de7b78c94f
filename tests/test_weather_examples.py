"""The weather examples run as written (their CI settings) and their models learn something.

- ``examples/weather_qg.py --quick``: simulate the QG model, train the DDPM and the MSE baseline,
  forecast ensembles from held-out init times, evaluate, figures;
- ``examples/weather_storm.py --quick``: the same pipeline on NCL's storm files (four variables,
  missing frames, a fixed land mask), and the message when the files are not installed.

The behaviour checks compare the ensemble-mean RMSE at the first lead with the persistence
forecast ("nothing changes") scored by the same ``evaluate``; the measured numbers for trained and
untrained (``--steps 1``) models are in each test's docstring.
"""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

import xarray as xr  # a dependency: missing it is a failure, not a skip

ROOT = Path(__file__).resolve().parents[1]
PNG = b"\x89PNG\r\n\x1a\n"
NCL = Path("/usr/share/ncarg/data/cdf")
needs_ncl = pytest.mark.skipif(not (NCL / "Ustorm.cdf").exists(),
                               reason="NCL sample data not installed (apt-get install libncarg-data)")


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def _ratio(report, objective) -> float:
    """Ensemble-mean RMSE at the first lead over the persistence RMSE, averaged over the channels."""
    r, p = report[objective], report["persistence"]
    return float(np.mean([r[c]["rmse"][0] / p[c]["rmse"][0] for c in r]))


def _check_scores(folder: Path, channels, n_leads: int, members: int) -> None:
    import pandas as pd

    tab = pd.read_csv(folder / "scores.csv")
    assert list(tab["channel"].unique()) == list(channels) and len(tab) == len(channels) * n_leads
    assert np.isfinite(tab[["rmse", "crps", "spread", "spread_skill_ratio"]].values).all()
    assert (tab[[f"rank_{j}" for j in range(members + 1)]].sum(axis=1) > 0).all()
    with xr.open_dataset(folder / "scores.nc") as s:
        assert s["rmse"].dims == ("channel", "lead_time") and s.attrs["members"] == members
    for name in ["lead_curves.png", "rank_histograms.png"] + [f"maps_{c.replace('@', '-')}.png" for c in channels]:
        assert (folder / name).read_bytes()[:8] == PNG, name


@pytest.mark.slow
def test_weather_qg_example_runs_end_to_end(tmp_path):
    """The QG example in its CI setting (32^2 over 500 km -- the reference resolution --, a year of
    spin-up, 120 days to train, 120 steps per model; ~45 s on one core): every output is written,
    and both models beat the persistence forecast at the first lead (24 h) -- the ensemble-mean
    RMSE over the persistence RMSE, averaged over the two layers, below 0.85 for the DDPM and 0.9
    for the MSE baseline.  Measured (seeds 0 / 1 / 2): trained DDPM 0.74 / 0.58 / 0.68, MSE
    baseline 0.78 / 0.68 / 0.73; untrained (--steps 1) DDPM 1.04 and MSE 1.09 (an untrained
    residual model predicts about no change, plus noise), so the bounds separate them."""
    mod = _load_example("weather_qg")
    report = mod.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert _ratio(report, "diffusion") < 0.85, report
    assert _ratio(report, "regression") < 0.9, report
    members, K, n_init = report["members"], 4, 4
    channels = ["streamfunction@1", "streamfunction@2"]
    with xr.open_dataset(tmp_path / "qg.nc") as truth:
        assert truth["streamfunction"].dims == ("time", "level", "latitude", "longitude")
        t = truth["time"].values
    for objective in ("diffusion", "regression"):
        with xr.open_dataset(tmp_path / objective / "forecast.nc") as ds:
            assert ds["streamfunction"].dims == ("member", "init_time", "lead_time", "level", "latitude",
                                                 "longitude")
            assert dict(ds.sizes) == {"member": members, "init_time": n_init, "lead_time": K, "level": 2,
                                      "latitude": 32, "longitude": 32}
            assert ds.attrs["objective"] == objective and ds["lead_time"].attrs["standard_name"] == "forecast_period"
            assert np.isfinite(ds["streamfunction"].values).all()
            # held out: every init time after the training period, and its valid times in the record
            assert (ds["init_time"].values > np.datetime64(report["train_slice"][1])).all()
            assert np.isin(ds["valid_time"].values, t).all()
            if objective == "diffusion":       # an ensemble: the members differ
                assert float(ds["streamfunction"].std("member").mean()) > 0
        _check_scores(tmp_path / objective, channels, K, members)
        # the spread grows with lead time, and so does the error
        r = report[objective]["streamfunction@1"]
        assert r["rmse"][-1] > r["rmse"][0] and r["spread"][-1] > r["spread"][0]
    assert (tmp_path / "compare_lead_curves.png").read_bytes()[:8] == PNG
    assert json.loads((tmp_path / "report.json").read_text())["init_times"] == report["init_times"]


@needs_ncl
@pytest.mark.slow
def test_weather_storm_example_runs_end_to_end(tmp_path):
    """The storm example in its CI setting (u, v, t, p with allow_missing; the DDPM alone, 300
    steps, 8 members; ~50 s on one core): outputs are written on the files' own grid and names,
    NaN exactly on their fixed land mask, and the DDPM beats persistence at 6 h -- the ensemble-
    mean RMSE over the persistence RMSE, averaged over the four variables, below 0.95.
    Measured (seeds 0 / 1 / 2): trained 0.86 / 0.88 / 0.87; untrained (--steps 1) 1.05."""
    mod = _load_example("weather_storm")
    report = mod.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    assert _ratio(report, "diffusion") < 0.95, report
    assert "regression" not in report                       # --quick trains the DDPM only
    members, K = report["members"], 4
    raw = {v: xr.open_dataset(NCL / f"{v.upper()}storm.cdf", decode_times=False)[v].values for v in "uvtp"}
    with xr.open_dataset(tmp_path / "diffusion" / "forecast.nc") as ds:
        for v in "uvtp":
            assert ds[v].dims == ("member", "init_time", "lead_time", "lat", "lon")
            land = np.isnan(raw[v]).all(0)                  # missing at every time: the fixed mask
            np.testing.assert_array_equal(np.isnan(ds[v].values), np.broadcast_to(land, ds[v].shape))
        assert dict(ds.sizes) == {"member": members, "init_time": 4, "lead_time": K, "lat": 33, "lon": 36}
        assert str(ds["init_time"].values.min()) >= "1996-01-17"
        np.testing.assert_allclose(ds["p"].values[np.isfinite(ds["p"].values)].mean(), np.nanmean(raw["p"]), rtol=0.02)
    _check_scores(tmp_path / "diffusion", ["u", "v", "t", "p"], K, members)


def test_weather_storm_example_without_the_files_says_how_to_install(tmp_path):
    mod = _load_example("weather_storm")
    with pytest.raises(FileNotFoundError, match="apt-get install libncarg-data"):
        mod.main(["--quick", "--no-progress", "--ncl-dir", str(tmp_path), "--out", str(tmp_path / "out")])
    assert not (tmp_path / "out").exists()
    # as a script: one line on stderr, exit status 1
    r = subprocess.run([sys.executable, str(ROOT / "examples" / "weather_storm.py"), "--ncl-dir", str(tmp_path)],
                       capture_output=True, text=True, timeout=120)
    assert r.returncode == 1 and "apt-get install libncarg-data" in r.stderr
    assert len(r.stderr.strip().splitlines()) == 1, r.stderr
