"""``diffkit assimilate`` end to end on the PDE quick setting (issue 15 item 3): observations made by
``diffkit data pde ... --observe-from``, guided rollouts of a tiny KS surrogate trained by ``diffkit train``,
the analysis compared with the prior ensemble of the same rollout (same seed, no guidance), and every
bad observation file rejected with a one-line error."""
from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest
import xarray as xr

from diffkit.checkpoint import capture_rng_state, restore_rng_state
from diffkit.cli import main

TOML = """\
run_dir = "{run}"
[data]
adapter = "pde"
batch_size = 16
val_fraction = 0.2
[data.options]
path = "{data}"
history = 1
target = "residual"
[model]
backbone = "unet"
[model.options]
channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attn_levels = []
mid_attn = false
[trainer]
steps = 150
lr = 2e-3
warmup = 5
val_every = 0
ckpt_every = 0
[sample]
sampler = "dpmpp_2m"
nfe = 6
"""
RUN = ["--no-progress", "--device", "cpu"]
#: every test here trains a tiny model through the CLI (fixtures of 35-65 s): the slow lane
pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def ks(tmp_path_factory):
    root = tmp_path_factory.mktemp("assim")
    data = root / "ks.nc"
    assert main(["data", "pde", "ks", "--trajectories", "8", "--steps", "40", "--set", "nx=32", "--set", "L=22",
                 "--set", "burn_in=50", "--out", str(data), *RUN]) == 0
    (root / "cfg.toml").write_text(TOML.format(run=(root / "run").as_posix(), data=data.as_posix()))
    state = capture_rng_state(cuda=False)
    try:
        assert main(["train", str(root / "cfg.toml"), *RUN]) == 0
    finally:
        restore_rng_state(state)
    obs = root / "obs.nc"
    assert main(["data", "pde", "ks", "--observe-from", str(data), "--obs-trajectory", "7", "--obs-frames", "1:9",
                 "--obs-stride", "4", "--obs-noise", "0.05", "--seed", "1", "--out", str(obs)]) == 0
    prior = root / "prior.nc"
    assert main(["assimilate", str(root / "run"), "--obs", str(obs), "--init", str(data), "--members", "6",
                 "--no-guidance", "--out", str(prior), *RUN]) == 0
    return dict(root=root, data=data, run=root / "run", obs=obs, prior=prior)


def _rmse(path, obs):
    """Ensemble-mean RMSE vs the truth at the observed and at the unobserved points of the window."""
    with xr.open_dataset(obs) as o:
        seen = np.isfinite(o["u"].values)
    with xr.open_dataset(path) as ds:
        err = (ds["u_ensemble_mean"].values - ds["u_truth"].values) ** 2
    return float(np.sqrt(err[seen].mean())), float(np.sqrt(err[~seen].mean()))


def test_observe_from_writes_cf_observations_with_sigma_y(ks):
    with xr.open_dataset(ks["obs"]) as o, xr.open_dataset(ks["data"]) as d:
        assert o["u"].dims == ("time", "x") and o.attrs["Conventions"] == "CF-1.8"
        assert o["u"].attrs["ancillary_variables"] == "u_sigma_y" and o["u_sigma_y"].attrs["units"] == "1"
        seen = np.isfinite(o["u"].values)
        assert seen[:, ::4].all() and not seen[:, 1::4].any() and not seen[:, 2::4].any()   # every 4th point
        np.testing.assert_allclose(o["time"].values, d["time"].values[1:9])
        sig = np.unique(o["u_sigma_y"].values[seen])
        np.testing.assert_allclose(sig, 0.05 * float(d["u"].std()), rtol=1e-5)            # 0.05 x climatological std
        noise = o["u"].values[seen] - d["u"].values[7, 1:9][seen]
        assert 0.3 * sig[0] < noise.std() < 2.0 * sig[0]
    pts = ks["root"] / "pts.nc"
    assert main(["data", "pde", "ks", "--observe-from", str(ks["data"]), "--obs-fraction", "0.2", "--obs-form",
                 "points", "--obs-frames", "1:3", "--out", str(pts)]) == 0
    with xr.open_dataset(pts) as p:
        assert p.attrs["featureType"] == "point" and p["u"].dims == ("obs",)
        assert p.sizes["obs"] == 2 * round(0.2 * 32) and {"time", "x"} <= set(p.coords)


@pytest.mark.parametrize("method,extra", [
    ("reconstruction", []),
    pytest.param("dps", ["--zeta", "0.1"], marks=pytest.mark.xfail(
        strict=True, reason="measured: DPS (zeta 0.01..0.1) does not beat the prior of this 150-step surrogate "
                            "(observed-point RMSE 0.168..0.196 vs 0.164); on a 500-step one zeta 0.1 did (0.050 vs "
                            "0.071 observed, 0.074 vs 0.076 unobserved)")),
    # MMPS's Tweedie covariance is not positive definite on this barely trained surrogate: plain CG diverged
    # (RMSE ~1e5); the safeguarded CG (guidance.py) measured 0.069 / 0.132 vs the prior's 0.164 / 0.166
    ("mmps", []),
])
def test_assimilate_analysis_beats_the_prior_ensemble(ks, method, extra, capsys):
    out = ks["root"] / f"a_{method}.nc"
    rc = main(["assimilate", str(ks["run"]), "--obs", str(ks["obs"]), "--init", str(ks["data"]), "--members", "6",
               "--method", method, *extra, "--out", str(out), *RUN])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert f"analysis ({method})" in captured.out
    if method == "mmps":  # its safeguard engaged on this surrogate, and said so (no silent fallback)
        assert "warning: mmps: the denoiser's covariance" in captured.err, captured.err
    with xr.open_dataset(out) as ds:
        assert ds["u"].dims == ("member", "time", "x") and ds.sizes["member"] == 6
        assert ds["member"].attrs["standard_name"] == "realization"
        assert ds["u_ensemble_mean"].attrs["cell_methods"] == "member: mean"
        np.testing.assert_allclose(ds["u_ensemble_mean"].values, ds["u"].values.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(ds["u_ensemble_spread"].values, ds["u"].values.std(0, ddof=1), rtol=1e-4, atol=1e-6)
        assert ds.attrs["method"] == method and ds.attrs["n_observations"] == 64
    a_obs, a_un = _rmse(out, ks["obs"])
    p_obs, p_un = _rmse(ks["prior"], ks["obs"])
    # same seed and sampler: a guidance that does nothing gives the prior exactly, and fails both
    assert a_obs < 0.9 * p_obs, (a_obs, p_obs)
    assert a_un < p_un, (a_un, p_un)


def _bad(ks, name, edit):
    with xr.open_dataset(ks["obs"]) as o:
        ds = edit(o.load().copy(deep=True))
    path = ks["root"] / f"bad_{name}.nc"
    ds.to_netcdf(path)
    return path


def _shift_time(o):
    t = o["time"].values.copy()
    t[-1] += 0.05                                   # between two steps (0.2 apart) of the window
    return o.assign_coords(time=t)


def _points(o):
    o.attrs["featureType"] = "point"
    return o


BAD = {
    "unknown variable": (lambda o: o.rename({"u": "w"}).assign(w=lambda d: d["w"].assign_attrs(ancillary_variables="u_sigma_y")),
                         "variable 'w' is not a variable of the model (its variables: u)"),
    "times outside the window": (_shift_time, "outside the assimilation window"),
    "negative sigma_y": (lambda o: o.assign(u_sigma_y=-o["u_sigma_y"]), "sigma_y of 'u' holds"),
    "missing sigma_y": (lambda o: o.drop_vars("u_sigma_y"), "has no observation error sigma_y"),
    "wrong dims": (lambda o: o.isel(time=0), "a gridded observation of 'u' has the dims ('time', 'x')"),
    "infinite values": (lambda o: o.assign(u=o["u"].where(~np.isfinite(o["u"]), np.inf)), "infinite value(s)"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_assimilate_rejects_bad_observation_files(ks, name, capsys):
    edit, fragment = BAD[name]
    path = _bad(ks, name.replace(" ", "_"), edit)
    out = ks["root"] / "never.nc"
    capsys.readouterr()
    rc = main(["assimilate", str(ks["run"]), "--obs", str(path), "--init", str(ks["data"]), "--members", "2",
               "--out", str(out), *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert err.startswith("diffkit assimilate: error:") and fragment in err, err
    assert not out.exists()


def _points_file(ks, name, **change):
    """A points-form observation file of the first two observed frames, with ``change`` applied to its arrays."""
    with xr.open_dataset(ks["obs"]) as o:
        o = o.load()
    u = o["u"].values[:2]
    seen = np.isfinite(u)
    t = np.broadcast_to(o["time"].values[:2, None], u.shape)[seen]
    x = np.broadcast_to(o["x"].values[None, :], u.shape)[seen]
    vals = {"u": u[seen].astype(np.float64), "x": x.copy(), "time": t.copy(), "sigma": np.full(seen.sum(), 0.05)}
    for k, f in change.items():
        f(vals[k])
    ds = xr.Dataset({"u": ("obs", vals["u"], {"units": "1", "ancillary_variables": "u_sigma_y"}),
                     "u_sigma_y": ("obs", vals["sigma"], {"units": "1"})},
                    coords={"time": ("obs", vals["time"]), "x": ("obs", vals["x"])}, attrs={"featureType": "point"})
    path = ks["root"] / f"pts_{name}.nc"
    ds.to_netcdf(path)
    return path


# (x is periodic on the whole PDE domain: positions wrap, none is outside; tests/test_observations.py checks
# the outside-the-grid error on a non-periodic axis)
@pytest.mark.parametrize("name,change,fragment", [
    ("nan", {"u": lambda a: a.__setitem__(3, np.nan)}, "holds NaN or inf at 1 of 16 observations"),
    ("late", {"time": lambda a: a.__setitem__(0, 99.0)}, "outside the assimilation window, the first at 99"),
    ("sigma", {"sigma": lambda a: a.__setitem__(0, -1.0)}, "sigma_y of 'u' holds 1 value(s) <= 0"),
])
def test_assimilate_rejects_bad_point_observations(ks, name, change, fragment, capsys):
    path = _points_file(ks, name, **change)
    capsys.readouterr()
    rc = main(["assimilate", str(ks["run"]), "--obs", str(path), "--init", str(ks["data"]), "--members", "2",
               "--steps", "8", "--out", str(ks["root"] / "never.nc"), *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and fragment in err, err


def test_point_observations_guide_the_rollout(ks, capsys):
    path = _points_file(ks, "good")
    out = ks["root"] / "pts_analysis.nc"
    assert main(["assimilate", str(ks["run"]), "--obs", str(path), "--init", str(ks["data"]), "--members", "2",
                 "--method", "reconstruction", "--out", str(out), *RUN]) == 0
    assert "16 observation(s) at 2 step(s) (points form" in capsys.readouterr().out


def test_a_surrogate_needs_init(ks, capsys):
    rc = main(["assimilate", str(ks["run"]), "--obs", str(ks["obs"]), "--out", str(ks["root"] / "never.nc"), *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and "--init FILE is required for this pde model" in err, err
    assert not (ks["root"] / "never.nc").exists()


def test_amortised_needs_an_amortised_checkpoint(ks, capsys):
    rc = main(["assimilate", str(ks["run"]), "--obs", str(ks["obs"]), "--init", str(ks["data"]), "--method",
               "amortised", "--out", str(ks["root"] / "never.nc"), *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and "was not trained with amortised conditioning" in err and "data.amortised = true" in err


@pytest.mark.parametrize("noise", [False, True])
def test_amortised_window_model_conditions_on_the_observations(ks, capsys, noise):
    """--method amortised with a window model trained with universal-amortised conditioning (diffkit.window):
    the trajectory from the initial state, every observed value reproduced exactly (amortised conditioning
    takes observations as exact); the same checkpoint with a guidance method is a one-line error.  A model
    trained on noisy observations (data.mask_noise) gets the file's sigma_y instead and does not copy them."""
    root = ks["root"] / f"noise{int(noise)}"
    root.mkdir(exist_ok=True)
    cfg = TOML.format(run=(root / "arun").as_posix(), data=ks["data"].as_posix())
    cfg = cfg.replace('adapter = "pde"', 'adapter = "pde"\nwindow = 4\namortised = true'
                      + ('\nmask_noise = [0.01, 0.2]' if noise else ''))
    cfg = cfg.replace("history = 1\n", "").replace('target = "residual"\n', "").replace("steps = 150", "steps = 20")
    (root / "acfg.toml").write_text(cfg)
    state = capture_rng_state(cuda=False)
    try:
        assert main(["train", str(root / "acfg.toml"), *RUN]) == 0
    finally:
        restore_rng_state(state)
    out = root / "amortised.nc"
    common = ["assimilate", str(root / "arun"), "--obs", str(ks["obs"]), "--init", str(ks["data"]), "--members", "3"]
    capsys.readouterr()
    assert main([*common, "--method", "amortised", "--out", str(out), *RUN]) == 0
    said = capsys.readouterr().out
    with xr.open_dataset(out) as a, xr.open_dataset(ks["obs"]) as o:
        seen = np.isfinite(o["u"].values)
        assert a["u"].shape == (3, 8, 32) and a.attrs["method"] == "amortised"
        assert np.all(a["u_ensemble_spread"].values[~seen] > 0)                   # unobserved points vary
        if noise:  # estimated from noisy observations, not copied: spread at the observed points too
            assert "with their sigma_y" in said and "data.mask_noise" in a.attrs["amortised_note"]
            assert np.isfinite(a["u"].values).all() and np.all(a["u_ensemble_spread"].values[seen] > 0)
        else:
            assert "taken as exact (amortised conditioning" in said
            np.testing.assert_allclose(a["u"].values[:, seen],
                                       np.broadcast_to(o["u"].values[seen], (3, seen.sum())), rtol=0, atol=1e-5)
    assert main([*common, "--method", "mmps", "--out", str(root / "never.nc"), *RUN]) == 1
    assert "it assimilates with --method amortised, not mmps" in capsys.readouterr().err


def test_assimilate_bad_file_error_is_one_line_in_a_subprocess(ks):
    """Process level: the CLI as users run it prints one line and exits 1."""
    path = _bad(ks, "proc", lambda o: o.assign(u_sigma_y=-o["u_sigma_y"]))
    for _ in range(1):
        p = subprocess.run([sys.executable, "-m", "diffkit", "assimilate", str(ks["run"]), "--obs", str(path),
                            "--init", str(ks["data"]), "--out", str(ks["root"] / "never.nc"), *RUN],
                           capture_output=True, text=True, timeout=300)
        assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
        assert "sigma_y of 'u' holds" in p.stderr and "<= 0" in p.stderr


def test_a_plugins_csv_reader_gives_the_netcdf_analysis_bit_for_bit(ks, capsys, clean_registry):
    """A third-party plugin adapter (tests/_stations_plugin.py: the pde trajectory adapter under the name
    "stations") whose domain reads a CSV of stations through Assimilation.read_times / read, and netCDF as
    the pde domain: trained through ``diffkit train``, its analysis from the CSV equals the one from the
    equivalent points netCDF bit for bit with the same seed; it takes the pde domain's --index."""
    from diffkit import registry
    from _stations_plugin import StationsPlugin, write_csv

    registry.register_plugin(StationsPlugin(), "stations_plugin")
    root = ks["root"]
    cfg = TOML.format(run=(root / "srun").as_posix(), data=ks["data"].as_posix())
    (root / "scfg.toml").write_text(cfg.replace('adapter = "pde"', 'adapter = "stations"').replace("steps = 150",
                                                                                                  "steps = 3"))
    state = capture_rng_state(cuda=False)
    try:
        assert main(["train", str(root / "scfg.toml"), *RUN]) == 0
    finally:
        restore_rng_state(state)
    nc = _points_file(ks, "stations")
    csv = write_csv(nc, root / "stations.csv", ["x"])
    outs = {}
    for name, path in (("nc", nc), ("csv", csv)):
        outs[name] = root / f"stations_{name}.nc"
        capsys.readouterr()
        assert main(["assimilate", str(root / "srun"), "--obs", str(path), "--init", str(ks["data"]), "--index", "7",
                     "--members", "2", "--method", "reconstruction", "--seed", "5", "--out", str(outs[name]),
                     *RUN]) == 0
        assert "16 observation(s) at 2 step(s) (points form" in capsys.readouterr().out
    with xr.open_dataset(outs["nc"]) as a, xr.open_dataset(outs["csv"]) as b:
        assert a.attrs["observations"] == str(nc) and b.attrs["observations"] == str(csv)
        assert a.attrs["init_index"] == b.attrs["init_index"] == 7 and b.attrs["n_observations"] == 16
        assert list(a.data_vars) == list(b.data_vars) and "u_ensemble_mean" in a
        for v in a.data_vars:
            np.testing.assert_array_equal(a[v].values, b[v].values, err_msg=v)


def test_another_domains_option_is_a_one_line_error(ks, capsys):
    rc = main(["assimilate", str(ks["run"]), "--obs", str(ks["obs"]), "--init", str(ks["data"]), "--init-time",
               "2000-01-01", "--out", str(ks["root"] / "never.nc"), *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1, err
    assert "--init-time is an option of the weather domain, and this checkpoint is a model of the pde domain" in err


# ============================================================================= weather (QG quick setting)
WEATHER_TOML = """\
run_dir = "{run}"
[data]
adapter = "weather"
batch_size = 8
val_fraction = 0.1
[data.options]
path = ["{data}"]
[model]
backbone = "unet"
[model.options]
channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attn_levels = []
mid_attn = false
[trainer]
steps = 40
warmup = 1
val_every = 0
ckpt_every = 0
[sample]
sampler = "dpmpp_2m"
nfe = 4
"""
WINDOW = "2000-01-03T00:00,2000-01-04T00:00"


@pytest.fixture(scope="module")
def qg(tmp_path_factory):
    root = tmp_path_factory.mktemp("assim_qg")
    data = root / "qg.nc"
    assert main(["data", "weather", "qg", "--years", "0.03", "--spin-up-years", "0.01", "--nx", "16", "--fields",
                 "psi", "--out", str(data), *RUN]) == 0
    (root / "cfg.toml").write_text(WEATHER_TOML.format(run=(root / "run").as_posix(), data=data.as_posix()))
    state = capture_rng_state(cuda=False)
    try:
        assert main(["train", str(root / "cfg.toml"), *RUN]) == 0
    finally:
        restore_rng_state(state)
    grid, pts = root / "obs.nc", root / "stations.nc"
    assert main(["data", "weather", "qg", "--observe-from", str(data), "--obs-window", WINDOW, "--obs-fraction",
                 "0.2", "--out", str(grid)]) == 0
    assert main(["data", "weather", "qg", "--observe-from", str(data), "--obs-window", WINDOW, "--obs-fraction",
                 "0.2", "--obs-form", "points", "--seed", "2", "--out", str(pts)]) == 0
    return dict(root=root, data=data, run=root / "run", grid=grid, points=pts)


def _weather_rmse(path, obs):
    with xr.open_dataset(obs) as o:
        seen = np.isfinite(o["streamfunction"].values)                              # (time, level, lat, lon)
        times = o["time"].values
    with xr.open_dataset(path) as a:
        mean = a["streamfunction_ensemble_mean"].values[0]                          # (lead, level, lat, lon)
        valid = a["valid_time"].values[0]
    return mean, seen, times, valid


def test_weather_assimilate_beats_the_prior_and_evaluate_scores_it(qg, capsys):
    """QG quick setting: gridded observations of 20 % of the points; the analysis (reconstruction) is closer
    to the truth than the same-seed prior at observed and unobserved points, and diffkit evaluate scores it."""
    root = qg["root"]
    common = ["assimilate", str(qg["run"]), "--obs", str(qg["grid"]), "--init", str(qg["data"]), "--members", "4"]
    assert main([*common, "--method", "reconstruction", "--out", str(root / "a.nc"), *RUN]) == 0
    assert main([*common, "--no-guidance", "--out", str(root / "p.nc"), *RUN]) == 0
    assert "from 2000-01-02T18:00" in capsys.readouterr().out                       # one lead before the first obs
    with xr.open_dataset(qg["data"]) as d:
        truth = d["streamfunction"].sel(time=slice(*WINDOW.split(","))).values
    res = {}
    for name in ("a", "p"):
        mean, seen, times, valid = _weather_rmse(root / f"{name}.nc", qg["grid"])
        np.testing.assert_array_equal(valid, times)
        err = (mean - truth) ** 2
        res[name] = (np.sqrt(err[seen].mean()), np.sqrt(err[~seen].mean()))
    assert res["a"][0] < 0.9 * res["p"][0] and res["a"][1] < res["p"][1], res
    for name in ("a", "p"):
        assert main(["evaluate", str(root / f"{name}.nc"), "--truth", str(qg["data"]), "--out", str(root / f"ev_{name}"),
                     "--no-plots"]) == 0
    out = capsys.readouterr().out
    assert "4 member(s), 1 init time(s), 5 lead time(s)" in out
    with xr.open_dataset(root / "ev_a" / "scores.nc") as sa, xr.open_dataset(root / "ev_p" / "scores.nc") as sp:
        assert float(sa["rmse"].mean()) < float(sp["rmse"].mean())


def test_weather_station_observations_guide_the_forecast(qg, capsys):
    out = qg["root"] / "stations_analysis.nc"
    assert main(["assimilate", str(qg["run"]), "--obs", str(qg["points"]), "--init", str(qg["data"]), "--members",
                 "2", "--method", "reconstruction", "--out", str(out), *RUN]) == 0
    assert "(points form" in capsys.readouterr().out
    with xr.open_dataset(out) as a:
        assert a["streamfunction"].dims[:3] == ("member", "init_time", "lead_time") and a.attrs["observation_form"] == "points"


def _weather_bad(qg, name, edit):
    with xr.open_dataset(qg["points"]) as o:
        ds = edit(o.load().copy(deep=True))
    path = qg["root"] / f"bad_{name}.nc"
    ds.to_netcdf(path)
    return path


def _set(var, i, value):
    def edit(o):
        a = o[var].values.copy()
        a[i] = value
        return o.assign_coords({var: ("obs", a, o[var].attrs)}) if var in o.coords else o.assign(
            {var: ("obs", a, o[var].attrs)})
    return edit


@pytest.mark.parametrize("name,edit,fragment", [
    ("latitude", _set("latitude", 0, 80.0), "outside the model's grid, the first at latitude = 80"),
    ("level", _set("level", 0, 3.0), "'streamfunction' at level 3 is not a state channel of the model"),
    ("nan", _set("streamfunction", 1, np.nan), "holds NaN or inf at 1 of"),
    ("variable", lambda o: o.rename({"streamfunction": "temperature"}), "variable 'temperature' is not a variable"),
])
def test_weather_rejects_bad_station_files(qg, name, edit, fragment, capsys):
    path = _weather_bad(qg, name, edit)
    capsys.readouterr()
    rc = main(["assimilate", str(qg["run"]), "--obs", str(path), "--init", str(qg["data"]), "--members", "2",
               "--out", str(qg["root"] / "never.nc"), *RUN])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1 and fragment in err, err


def test_spread_scale_recalibrates_the_analysis_members(ks, capsys):
    """--spread-scale S: the same seed's analysis with every member's anomaly about the ensemble mean
    times S -- the mean (and its RMSE) unchanged, the spread times S, S recorded; a bad S is a one-line error."""
    common = ["assimilate", str(ks["run"]), "--obs", str(ks["obs"]), "--init", str(ks["data"]), "--members", "4",
              "--method", "reconstruction", "--seed", "3"]
    raw, cal = ks["root"] / "raw.nc", ks["root"] / "cal.nc"
    assert main([*common, "--out", str(raw), *RUN]) == 0
    capsys.readouterr()
    assert main([*common, "--spread-scale", "0.5", "--out", str(cal), *RUN]) == 0
    said = capsys.readouterr().out                  # the summary names the calibration and its scale
    assert "ensemble-mean RMSE vs the truth" in said and "; u: " in said and "spread/skill" in said
    with xr.open_dataset(raw) as r, xr.open_dataset(cal) as c:
        assert "spread_scale" not in r.attrs and c.attrs["spread_scale"] == 0.5
        assert c.attrs["calibration_u"] in said
        x, y = r["u"].values.astype(np.float64), c["u"].values.astype(np.float64)
        m = x.mean(0)
        np.testing.assert_allclose(y, m + 0.5 * (x - m), rtol=0, atol=1e-5)
        np.testing.assert_allclose(c["u_ensemble_mean"].values, r["u_ensemble_mean"].values, rtol=0, atol=1e-5)
        np.testing.assert_allclose(c["u_ensemble_spread"].values, 0.5 * r["u_ensemble_spread"].values, rtol=1e-4,
                                   atol=1e-6)
        # the scores against the truth in --init are those of the recalibrated members
        np.testing.assert_allclose(c["ensemble_spread_skill_ratio"].values,
                                   0.5 * r["ensemble_spread_skill_ratio"].values, rtol=1e-4)
        np.testing.assert_allclose(c["ensemble_mean_rmse"].values, r["ensemble_mean_rmse"].values, rtol=1e-5)
    capsys.readouterr()
    for bad in ("0", "-1", "nan"):
        assert main([*common, "--spread-scale", bad, "--out", str(ks["root"] / "never.nc"), *RUN]) == 1
        err = capsys.readouterr().err.strip()
        assert "--spread-scale must be a finite number > 0" in err and "\n" not in err
    assert not (ks["root"] / "never.nc").exists()
