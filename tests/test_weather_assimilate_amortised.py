"""``diffkit assimilate --method amortised`` for the weather domain (issue 15): a tiny QG window model
(the weather adapter with ``data.window = 4``, ``data.amortised = true``) trained by ``diffkit train``,
gridded observations made by ``diffkit data weather qg --observe-from``, the analysis sampled from the
state at ``--init-time`` (diffkit.window.sample_trajectory) and written as the guided weather analyses
are (CF, ``realization`` members, ensemble mean / spread), and compared with the same-seed prior
(``--no-guidance``: the initial state only)."""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr

from diffkit.checkpoint import capture_rng_state, restore_rng_state
from diffkit.cli import main

WINDOW_TOML = """\
run_dir = "{run}"
[data]
adapter = "weather"
batch_size = 16
val_fraction = 0.1
window = 4
amortised = true
mask_past = 0.3
mask_points = 0.3
mask_both = 0.3
mask_fraction = [0.02, 0.5]
mask_noise = {mask_noise}
[data.options]
path = ["{data}"]
{forcings}[model]
backbone = "unet"
[model.options]
channels = 16
channel_mult = [1, 2]
num_res_blocks = 1
attn_levels = []
mid_attn = false
[trainer]
steps = {steps}
lr = 2e-3
warmup = 10
val_every = 0
ckpt_every = 0
ema_decay = 0.99
[sample]
sampler = "dpmpp_2m"
nfe = 6
"""
RUN = ["--no-progress", "--device", "cpu"]
#: the observation window: 5 times 6 h apart; the analysis starts one lead before, at INIT
WINDOW = "2000-01-05T00:00,2000-01-06T00:00"
INIT = "2000-01-04T18:00"
SHORT = "2000-01-05T00:00,2000-01-05T06:00"
VAR = "streamfunction"
STEPS = 150

#: the module's fixture trains a window model through the CLI
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def qg(tmp_path_factory):
    root = tmp_path_factory.mktemp("assim_qg_amortised")
    data = root / "qg.nc"
    assert main(["data", "weather", "qg", "--years", "0.03", "--spin-up-years", "0.01", "--nx", "16", "--fields",
                 "psi", "--out", str(data), *RUN]) == 0
    # the window model (no forcings), and one trained for 2 steps with the default forcings (time of day / year)
    # and noisy observations (data.mask_noise)
    for run, steps, forcings, noise in (("run", STEPS, "forcings = []\n", "[0, 0]"),
                                        ("run_forced", 2, "", "[0.01, 0.2]")):
        (root / f"{run}.toml").write_text(WINDOW_TOML.format(run=(root / run).as_posix(), data=data.as_posix(),
                                                             steps=steps, forcings=forcings, mask_noise=noise))
        state = capture_rng_state(cuda=False)
        try:
            assert main(["train", str(root / f"{run}.toml"), *RUN]) == 0
        finally:
            restore_rng_state(state)
    grid, pts = root / "obs.nc", root / "stations.nc"
    assert main(["data", "weather", "qg", "--observe-from", str(data), "--obs-window", WINDOW, "--obs-fraction",
                 "0.2", "--obs-form", "grid", "--out", str(grid)]) == 0
    assert main(["data", "weather", "qg", "--observe-from", str(data), "--obs-window", WINDOW, "--obs-fraction",
                 "0.2", "--obs-form", "points", "--seed", "2", "--out", str(pts)]) == 0
    short = root / "obs_short.nc"                  # two times: a trajectory shorter than the window of 4 states
    assert main(["data", "weather", "qg", "--observe-from", str(data), "--obs-window", SHORT, "--obs-fraction",
                 "0.2", "--seed", "3", "--out", str(short)]) == 0
    common = ["assimilate", str(root / "run"), "--obs", str(grid), "--init", str(data), "--init-time", INIT,
              "--members", "4", "--method", "amortised"]
    assert main([*common, "--out", str(root / "a.nc"), *RUN]) == 0
    assert main([*common, "--no-guidance", "--out", str(root / "p.nc"), *RUN]) == 0
    return dict(root=root, data=data, run=root / "run", grid=grid, points=pts, short=short, common=common)


def test_the_analysis_is_cf_with_realization_members(qg):
    with xr.open_dataset(qg["root"] / "a.nc") as a, xr.open_dataset(qg["grid"]) as o:
        assert a[VAR].dims == ("member", "init_time", "lead_time", "level", "latitude", "longitude")
        assert a["member"].attrs["standard_name"] == "realization" and a.sizes["member"] == 4
        assert a.attrs["Conventions"].startswith("CF-") and a.attrs["title"] == "diffkit analysis"
        assert a.attrs["method"] == "amortised" and a.attrs["composition"] == "autoregressive"
        assert "sigma_y is not used" in a.attrs["amortised_note"] and a.attrs["observation_form"] == "grid"
        assert str(a["init_time"].values[0])[:16] == INIT
        np.testing.assert_array_equal(a["valid_time"].values[0], o["time"].values)
        assert a[f"{VAR}_ensemble_mean"].attrs["cell_methods"] == "member: mean"
        np.testing.assert_allclose(a[f"{VAR}_ensemble_mean"].values, a[VAR].values.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(a[f"{VAR}_ensemble_spread"].values, a[VAR].values.std(0, ddof=1), rtol=1e-4,
                                   atol=1e-6)
    with xr.open_dataset(qg["root"] / "p.nc") as p:
        assert p.attrs["method"] == "none (prior)" and p.attrs["title"] == "diffkit prior ensemble"


def test_every_member_reproduces_the_gridded_observations(qg):
    """Amortised conditioning takes the observations as exact: every member holds the observed value at
    every observed grid point of every time (the file's orientation is the model's here)."""
    with xr.open_dataset(qg["root"] / "a.nc") as a, xr.open_dataset(qg["grid"]) as o:
        y = o[VAR].transpose("time", "level", "latitude", "longitude").values
        x = a[VAR].values[:, 0]                                                    # (member, lead, level, lat, lon)
    seen = np.isfinite(y)
    assert 0.1 < seen.mean() < 0.3
    np.testing.assert_allclose(x[:, seen], np.broadcast_to(y[seen], (4, int(seen.sum()))), rtol=1e-6, atol=0)
    assert np.all(x.std(0)[~seen] > 0)                                             # unobserved points vary


def _errors(path, data, obs):
    """Squared errors of the ensemble mean vs the truth over the window, the observation's, the observed mask."""
    with xr.open_dataset(obs) as o:
        y = o[VAR].transpose("time", "level", "latitude", "longitude").values
    with xr.open_dataset(data) as d:
        truth = d[VAR].sel(time=slice(*WINDOW.split(","))).transpose("time", "level", "latitude", "longitude").values
    with xr.open_dataset(path) as a:
        err = (a[f"{VAR}_ensemble_mean"].values[0] - truth) ** 2
    return err, (y - truth) ** 2, np.isfinite(y)


def test_the_analysis_beats_the_prior_ensemble(qg):
    """Ensemble-mean RMSE vs the truth over the window: the analysis's below the same-seed prior's (the window
    model from the same initial state, no observations).  At the observed points the analysis is the
    observations (their error exactly); this few-second model does not improve the unobserved points
    (measured 174.9 for both; not asserted)."""
    a, o, seen = _errors(qg["root"] / "a.nc", qg["data"], qg["grid"])
    p, _, _ = _errors(qg["root"] / "p.nc", qg["data"], qg["grid"])
    np.testing.assert_allclose(np.sqrt(a[seen].mean()), np.sqrt(o[seen].mean()), rtol=1e-5)
    assert np.sqrt(o[seen].mean()) < 0.2 * np.sqrt(p[seen].mean())
    assert np.sqrt(a.mean()) < 0.95 * np.sqrt(p.mean()), (np.sqrt(a.mean()), np.sqrt(p.mean()))
    print(f"RMSE all / observed / unobserved: analysis {np.sqrt(a.mean()):.1f} / {np.sqrt(a[seen].mean()):.1f} / "
          f"{np.sqrt(a[~seen].mean()):.1f}, prior {np.sqrt(p.mean()):.1f} / {np.sqrt(p[seen].mean()):.1f} / "
          f"{np.sqrt(p[~seen].mean()):.1f}")


def test_diffkit_evaluate_scores_the_analysis(qg, capsys):
    """The analysis reads as a forecast: diffkit evaluate scores it, its RMSE below the prior's."""
    root, rmse = qg["root"], {}
    for name in ("a", "p"):
        assert main(["evaluate", str(root / f"{name}.nc"), "--truth", str(qg["data"]), "--out",
                     str(root / f"ev_{name}"), "--no-plots"]) == 0
        with xr.open_dataset(root / f"ev_{name}" / "scores.nc") as sc:
            rmse[name] = float(sc["rmse"].mean())
    assert "4 member(s), 1 init time(s), 5 lead time(s)" in capsys.readouterr().out
    assert rmse["a"] < rmse["p"], rmse


def _error(qg, capsys, *extra, obs=None):
    capsys.readouterr()
    args = list(qg["common"])
    if obs is not None:
        args[args.index("--obs") + 1] = str(obs)
    rc = main([*args, *extra, "--out", str(qg["root"] / "never.nc"), *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert not (qg["root"] / "never.nc").exists()
    return err


def test_a_guidance_method_with_a_window_model_is_a_one_line_error(qg, capsys):
    err = _error(qg, capsys, "--method", "mmps")
    assert "is a window model (data.window = 4); it assimilates with --method amortised, not mmps" in err


def test_station_observations_are_a_one_line_error_naming_the_fix(qg, capsys):
    err = _error(qg, capsys, obs=qg["points"])
    assert "amortised conditioning takes gridded observations" in err and "--obs-form grid" in err


def _reproduces(path, obs, steps):
    with xr.open_dataset(path) as a, xr.open_dataset(obs) as o:
        assert a.sizes["lead_time"] == steps
        np.testing.assert_array_equal(a["valid_time"].values[0], o["time"].values)
        y = o[VAR].transpose("time", "level", "latitude", "longitude").values
        x = a[VAR].values[:, 0]
        seen = np.isfinite(y)
        np.testing.assert_allclose(x[:, seen], np.broadcast_to(y[seen], (x.shape[0], int(seen.sum()))), rtol=1e-6,
                                   atol=0)
        return dict(a.attrs)


def test_a_window_shorter_than_the_models_is_one_sda_window(qg, capsys):
    """Two observed times: the trajectory of 3 states is sampled as one window of 4 (SDA), its first 3 kept."""
    out = qg["root"] / "short.nc"
    assert main(["assimilate", str(qg["run"]), "--obs", str(qg["short"]), "--init", str(qg["data"]), "--members", "2",
                 "--method", "amortised", "--out", str(out), *RUN]) == 0
    assert "2 member(s) x 2 step(s) of 6 h from 2000-01-04T18:00" in capsys.readouterr().out
    assert _reproduces(out, qg["short"], 2)["composition"] == "sda"


def test_a_noise_aware_model_with_forcings_gives_each_window_its_own(qg, capsys):
    """The forcings (sin/cos of the time of day and of the year) of a window are those of its state k - 2, as the
    adapter serves them: one window, and a longer trajectory of autoregressive windows, each with its own time's
    forcings (diffkit.window's per-window scalars; the mechanism is tested exactly in tests/test_window.py).
    This model was trained with data.mask_noise: it gets the file's sigma_y and does not copy the observations."""
    run = str(qg["root"] / "run_forced")
    for obs, steps, how in ((qg["short"], 2, "sda"), (qg["grid"], 5, "autoregressive")):
        out = qg["root"] / f"forced_{how}.nc"
        capsys.readouterr()
        assert main(["assimilate", run, "--obs", str(obs), "--init", str(qg["data"]), "--init-time", INIT,
                     "--members", "2", "--method", "amortised", "--out", str(out), *RUN]) == 0
        assert "with their sigma_y" in capsys.readouterr().out
        with xr.open_dataset(out) as a, xr.open_dataset(obs) as o:
            assert a.sizes["lead_time"] == steps and a.attrs["composition"] == how
            assert "data.mask_noise" in a.attrs["amortised_note"]
            y = o[VAR].transpose("time", "level", "latitude", "longitude").values
            x = a[VAR].values[:, 0]
            seen = np.isfinite(y)
            assert np.isfinite(x).all() and not np.any(x[:, seen] == y[seen])   # estimated, not imposed


def test_spread_scale_recalibrates_the_weather_analysis(qg):
    """--spread-scale on the weather domain: the same seed's analysis with every member's anomaly about the
    ensemble mean times 0.5 (observed points, where the members agree, stay put), the scale recorded."""
    out = qg["root"] / "a_half.nc"
    assert main([*qg["common"], "--spread-scale", "0.5", "--out", str(out), *RUN]) == 0
    with xr.open_dataset(qg["root"] / "a.nc") as a, xr.open_dataset(out) as c:
        x = a[VAR].values.astype(np.float64)
        m = x.mean(0, keepdims=True)
        np.testing.assert_allclose(c[VAR].values, m + 0.5 * (x - m), rtol=1e-5, atol=1e-2)
        np.testing.assert_allclose(c[f"{VAR}_ensemble_spread"].values, 0.5 * a[f"{VAR}_ensemble_spread"].values,
                                   rtol=1e-3, atol=1e-2)
        assert c.attrs["spread_scale"] == 0.5
