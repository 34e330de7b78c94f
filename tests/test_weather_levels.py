"""Variables that share a level dim but not their levels (``data.options.levels = {z = [500], t = [850]}``).

Every output (``decode`` of ``diffkit sample``, the forecast file) puts each variable's values at its
own levels of one shared level coordinate -- the union of the levels, as ``xarray.merge`` of the
per-variable selections gives -- NaN at the levels a variable was not trained on.  Before, every
variable was labelled with the first variable's levels (t at 850 hPa written as level 500), or
xarray raised "conflicting sizes".  ``evaluate`` scores each variable at the levels it is forecast
at only: the NaN padding is neither read from the truth (which may lack those levels) nor scored.

The checks use the zonal-shift file of tests/test_weather_forecast.py and its exact oracle, so the
forecast equals the truth and every value can be compared with the file's.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    from diffkit_weather import adapter as A
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    from diffkit_weather import adapter as A

import xarray as xr

from diffkit.adapters import atomic_to_netcdf
from diffkit.denoiser import Regressor
from diffkit_weather import decode as D
from diffkit_weather import evaluate as E
from diffkit_weather import forecast as F
from diffkit_weather import metrics as WM

sys.path.insert(0, str(Path(__file__).resolve().parent))
from _weather_shift import ShiftOracle, write_shift  # noqa: E402

CASES = {"disjoint": {"t": [850], "z": [500]},        # was: t at 850 labelled 500 (or z at 500 labelled 850)
         "overlapping": {"t": [500, 850], "z": [500]},  # was: xarray's "conflicting sizes"
         "reversed": {"t": [850, 500], "z": [300]}}     # not sorted by the user: each value still at its level


@pytest.fixture(scope="module")
def shift(tmp_path_factory) -> Path:
    p = tmp_path_factory.mktemp("levels") / "shift.nc"
    ds = xr.open_dataset(write_shift(p.with_name("two.nc"))).load()
    # a third level, so that "reversed" has a level that no variable of the other has
    ds = xr.concat([ds[["t", "z"]], (ds[["t", "z"]].isel(level=[0]) * 0.5 + 1).assign_coords(level=[300])], "level")
    ds["level"].attrs.update(units="hPa", standard_name="air_pressure")
    ds.sortby("level").to_netcdf(p)
    return p


def _expect(raw: xr.Dataset, levels: dict, union: list, times) -> dict:
    """``{v: (len(times), len(union), lat, lon)}``: the file's values at each variable's levels, NaN elsewhere."""
    out = {}
    for v, lv in levels.items():
        a = np.full((len(times), len(union), raw.sizes["latitude"], raw.sizes["longitude"]), np.nan)
        for l in lv:
            a[:, union.index(l)] = raw[v].sel(level=l).values[times]
        out[v] = a
    return out


@pytest.mark.parametrize("case", list(CASES))
def test_unstack_per_variable_levels_are_labelled_correctly(shift, case, tmp_path):
    levels = CASES[case]
    a = A.GriddedAdapter(str(shift), variables=["t", "z"], levels=levels, val_fraction=0.25)
    L = a.layout
    assert list(L.channels) == [f"{v}@{l}" for v in ("t", "z") for l in levels[v]]
    d = a.dataset("train")
    ks = [0, 5]
    x = torch.stack([d[k]["x"] for k in ks])                        # standardised states at the target times
    path = A.GriddedAdapter.decode(x, L, tmp_path / "samples.nc")
    raw = xr.open_dataset(shift)
    with xr.open_dataset(path) as ds:
        union = sorted({l for lv in levels.values() for l in lv})
        assert ds["level"].values.tolist() == union                  # ascending, as in the file
        assert ds["level"].attrs["units"] == "hPa" and ds["t"].dims == ("sample", "level", "latitude", "longitude")
        times = [int(d.pairs[k][-1]) for k in ks]
        for v, want in _expect(raw, levels, union, times).items():
            np.testing.assert_allclose(ds[v].values, want, rtol=1e-5, atol=1e-5, equal_nan=True)
            for l in union:                                          # NaN exactly at the levels v lacks
                lacks = l not in levels[v]
                assert bool(np.isnan(ds[v].sel(level=l).values).all()) == lacks, (v, l)


@pytest.mark.parametrize("case", ["disjoint", "overlapping"])
def test_forecast_per_variable_levels_round_trip_through_evaluate(shift, case, tmp_path):
    levels = CASES[case]
    a = A.GriddedAdapter(str(shift), variables=["t", "z"], levels=levels, val_fraction=0.25)
    L = a.layout
    model = Regressor(ShiftOracle(L), L)                            # the exact one-step map
    ist = F.initial_states(str(shift), L, ["2000-01-02T00:00", "2000-01-03T06:00"])
    K, M = 3, 2
    pred = F.forecast(model, None, ist, steps=K, members=M, perturb=0.0)
    fc_path = atomic_to_netcdf(D.forecast_dataset(pred, L, ist.times, attrs={"seed": 0}), tmp_path / "fc.nc")
    raw = xr.open_dataset(shift).load()
    union = sorted({l for lv in levels.values() for l in lv})
    i0 = np.array([4, 9])
    with xr.open_dataset(fc_path) as fc:
        assert fc["level"].values.tolist() == union
        for n in range(2):
            want = _expect(raw, levels, union, list(i0[n] + 1 + np.arange(K)))
            for v in levels:
                for m in range(M):
                    np.testing.assert_allclose(fc[v].values[m, n], want[v], rtol=0, atol=1e-4, equal_nan=True)
    # the truth in two files, each variable only at its own levels: the padding is not read from it
    tfiles = []
    for v, lv in levels.items():
        tfiles.append(tmp_path / f"truth_{v}.nc")
        raw[[v]].sel(level=lv).to_netcdf(tfiles[-1])
    figures = case == "disjoint"                                    # (the figures cost seconds: once)
    ev = E.evaluate(fc_path, [str(p) for p in tfiles], out=tmp_path / "eval", plots=figures)
    s = ev.scores
    chans = [f"{v}@{l}" for v in ("t", "z") for l in levels[v]]
    assert s["channel"].values.tolist() == chans                    # the padding is not a channel
    np.testing.assert_allclose(s["rmse"].values, 0, atol=1e-4)       # exact forecast, at the right levels
    assert s["level"].values.tolist() == [float(c.split("@")[1]) for c in chans]
    lacking = [f"{v}@{l}" for v in ("t", "z") for l in union if l not in levels[v]]
    assert s.attrs["levels_not_forecast"].startswith(", ".join(lacking) + ": NaN in the forecast")
    # the references are those of each variable's own level: persistence RMSE recomputed directly
    w = WM.latitude_weights(raw["latitude"].values).numpy()
    for c, ch in enumerate(chans):
        v, l = ch.split("@")
        f = raw[v].sel(level=float(l)).values.astype(np.float64)
        for k in range(K):
            err = [f[i + 1 + k] - f[i] for i in i0]
            ok = [np.isfinite(e) for e in err]
            want = np.mean([np.sqrt((np.where(o, e, 0) ** 2 * w[:, None] * o).sum() / (w[:, None] * o).sum())
                            for e, o in zip(err, ok)])
            assert abs(float(s["persistence_rmse"].values[c, k]) - want) < 1e-4 * max(1.0, want), (ch, k)
    # read_truth's dataset is on the forecast's levels, NaN where the variable is not forecast
    for v, lv in levels.items():
        for l in union:
            assert bool(np.isnan(ev.truth[v].sel(level=l).values).all()) == (l not in lv), (v, l)
    assert E.open_scores(tmp_path / "eval" / "scores.nc")["channel"].values.tolist() == chans
    assert (tmp_path / "eval" / f"maps_{E._safe(chans[-1])}.png").exists() == figures
