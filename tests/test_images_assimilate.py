"""Images assimilation: held-out digits (``diffkit data images``), synthetic observations of them
(``--observe-from``), and ``diffkit assimilate`` with an unconditional digits model (inpainting).

The first tests need no model (the grid, the operator, the files); the end-to-end ones train a small
unconditional UNet through the CLI and are in the slow lane.
"""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr

from diffkit.assimilate import model_space
from diffkit.cli import main
from diffkit.errors import ObservationError
from diffkit.layout import Layout
from diffkit.observations import read_observations

from diffkit_images.observe import make_observations, observation_grid, truth_dataset

LAYOUT = Layout(channels=("L",), spatial=("y", "x"), shape=(8, 8), mean=torch.full((1, 1, 1), 8.0),
                std=torch.full((1, 1, 1), 8.0))


def _truth(tmp_path, n=3):
    vals = np.random.default_rng(0).uniform(0, 16, (n, 1, 8, 8))
    path = tmp_path / "truth.nc"
    truth_dataset(vals, ("L",), index=np.arange(10, 10 + n)).to_netcdf(path)
    return vals, path


def test_gridded_observations_are_a_mask_in_the_model_space(tmp_path):
    """25 % of the pixels, the same ones in every image; sigma_y = 0.05 x the file's std; in model units
    (x - 8) / 8 the values and sigma_y are divided by the layout's std, exactly."""
    vals, truth = _truth(tmp_path)
    ds = make_observations(truth, fraction=0.25, noise=0.05, seed=1)
    assert ds["L"].dims == ("image", "y", "x") and ds["L_sigma_y"].attrs["long_name"].startswith("standard deviation")
    path = tmp_path / "obs.nc"
    ds.to_netcdf(path)
    grid = observation_grid(LAYOUT)
    obs = read_observations(path, grid.with_window([0.0, 1.0, 2.0], 1e-6))
    assert obs.form == "grid" and sorted(obs.steps) == [0, 1, 2] and obs.count == 3 * 16
    masks = [obs.steps[k].mask for k in range(3)]
    assert all(torch.equal(m, masks[0]) for m in masks) and int(masks[0].sum()) == 16
    sig = 0.05 * vals.std()
    for k, st in obs.steps.items():
        np.testing.assert_allclose(st.sigma.numpy(), sig, rtol=1e-6)
        assert np.abs(st.y.numpy() - vals[k][st.mask.numpy()]).max() < 5 * sig
        o = model_space(st, LAYOUT)
        np.testing.assert_allclose(o.y[0].numpy(), (st.y.numpy() - 8.0) / 8.0, rtol=1e-12)
        np.testing.assert_allclose(o.sigma_y.numpy(), sig / 8.0, rtol=1e-6)
        z = torch.as_tensor((vals[k] - 8.0) / 8.0)[None]
        np.testing.assert_allclose(o.operator(z)[0].numpy(), (vals[k][st.mask.numpy()] - 8.0) / 8.0)


def test_point_observations_interpolate_the_image_bilinearly(tmp_path):
    """Points form: stations at random sub-pixel positions, values the truth interpolated bilinearly there;
    with a negligible sigma_y the operator applied to the truth gives the observed values."""
    vals, truth = _truth(tmp_path, n=2)
    ds = make_observations(truth, fraction=0.2, noise=1e-6, absolute=True, form="points", seed=2)
    assert ds.attrs["featureType"] == "point" and ds["L"].attrs["coordinates"] == "image y x"
    path = tmp_path / "pts.nc"
    ds.to_netcdf(path)
    obs = read_observations(path, observation_grid(LAYOUT).with_window([0.0, 1.0], 1e-6))
    for k, st in obs.steps.items():
        got = st.apply(torch.as_tensor(vals[k])[None])[0].numpy()
        np.testing.assert_allclose(got, st.y.numpy(), atol=1e-4)
        y0, x0 = ds["y"].values[ds["image"].values == k][0], ds["x"].values[ds["image"].values == k][0]
        i, j = int(np.floor(y0)), int(np.floor(x0))
        wy, wx = y0 - i, x0 - j
        v = vals[k, 0]
        ref = ((1 - wy) * (1 - wx) * v[i, j] + (1 - wy) * wx * v[i, min(j + 1, 7)] + wy * (1 - wx) * v[min(i + 1, 7), j]
               + wy * wx * v[min(i + 1, 7), min(j + 1, 7)])
        assert abs(st.y.numpy()[0] - ref) < 1e-3


BAD = {
    "unknown variable": (lambda o: o.rename({"L": "R"}).assign(R=lambda d: d["R"].assign_attrs(
        ancillary_variables="L_sigma_y")), "variable 'R' is not a variable of the model (its variables: L)"),
    "negative sigma_y": (lambda o: o.assign(L_sigma_y=-o["L_sigma_y"]), "sigma_y of 'L' holds"),
    "wrong grid": (lambda o: o.isel(y=slice(0, 7)), "the y coordinate (0, 1, 2, ..., 4, 5, 6, 7 points) is not the "
                                                     "model's grid"),
    "no image dim": (lambda o: o.rename({"image": "time"}), "a gridded observation of 'L' has the dims ('image', 'y', "
                                                           "'x')"),
}


@pytest.mark.parametrize("name", list(BAD))
def test_bad_observation_files_are_one_line_errors(tmp_path, name):
    _, truth = _truth(tmp_path, n=2)
    edit, fragment = BAD[name]
    path = tmp_path / "bad.nc"
    edit(make_observations(truth, fraction=0.25, seed=1)).to_netcdf(path)
    with pytest.raises(ObservationError) as e:
        read_observations(path, observation_grid(LAYOUT).with_window([0.0, 1.0], 1e-6))
    assert fragment in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_nan_in_point_observations_is_an_error(tmp_path):
    _, truth = _truth(tmp_path, n=1)
    ds = make_observations(truth, fraction=0.2, form="points", seed=0)
    ds["L"].values[3] = np.nan
    ds.to_netcdf(tmp_path / "nan.nc")
    with pytest.raises(ObservationError, match="holds NaN or inf at 1 of"):
        read_observations(tmp_path / "nan.nc", observation_grid(LAYOUT).with_window([0.0], 1e-6))


def test_data_images_writes_held_out_digits(tmp_path, capsys):
    """The default source's validation split (the images adapter's, seed 0): the same pixel values and
    labels as scikit-learn's digits at those indices, none of them a training image."""
    from sklearn.datasets import load_digits

    from diffkit_images.adapter import ImageAdapter

    out = tmp_path / "truth.nc"
    assert main(["data", "images", "--images", "2:6", "--out", str(out)]) == 0
    assert "wrote 4 image(s)" in capsys.readouterr().out
    ad = ImageAdapter()
    d = load_digits()
    with xr.open_dataset(out) as ds:
        idx = ds["source_index"].values
        assert ds["L"].dims == ("image", "y", "x") and idx.tolist() == ad.val_idx[2:6].tolist()
        assert not set(idx) & set(ad.train_idx.tolist())
        np.testing.assert_array_equal(ds["L"].values, d.images[idx])
        np.testing.assert_array_equal(ds["label"].values, d.target[idx])
    obs = tmp_path / "obs.nc"
    assert main(["data", "images", "--observe-from", str(out), "--obs-stride", "2", "--obs-images", "1:3",
                 "--out", str(obs)]) == 0
    with xr.open_dataset(obs) as o:
        assert o["L"].shape == (2, 8, 8) and int(np.isfinite(o["L"].values).sum()) == 2 * 16
    assert main(["data", "images", "--obs-fraction", "0.2", "--out", str(tmp_path / "x.nc")]) == 1
    assert "--obs-fraction makes observations of a truth file: give --observe-from" in capsys.readouterr().err


def test_which_models_and_options_the_images_domain_takes():
    """Single-state models only (no conditioning fields / scalars); a class-conditional one needs label
    dropout (its null label is the unconditional model); surrogate options are refused, one line each."""
    from types import SimpleNamespace

    from diffkit.errors import DiffkitError
    from diffkit.layout import AutoregressiveSpec
    from diffkit_images.observe import ImagesAssimilation

    ImagesAssimilation.check(LAYOUT)
    ImagesAssimilation.check(Layout(channels=("L",), spatial=("y", "x"), shape=(8, 8), num_classes=10))
    with pytest.raises(DiffkitError, match="conditioned on fields / scalars \\(c\\)"):
        ImagesAssimilation.check(Layout(channels=("L",), spatial=("y", "x"), shape=(8, 8), cond_channels=("c",)))
    ar = Layout(channels=("L",), spatial=("y", "x"), shape=(8, 8), cond_channels=("L@t",),
                autoregressive=AutoregressiveSpec(variables=("L",), state_mean=(0.0,), state_std=(1.0,)))
    with pytest.raises(DiffkitError, match="models sequences"):
        ImagesAssimilation.check(ar)
    args = SimpleNamespace(init=None, init_time=None, index=None, start=None, steps=3)
    with pytest.raises(DiffkitError, match="--steps does not apply to images models"):
        ImagesAssimilation.run(None, args, None)
    cond = SimpleNamespace(model=torch.nn.Linear(1, 1), layout=Layout(channels=("L",), spatial=("y", "x"), shape=(8, 8),
                                                                       num_classes=10),
                           config=SimpleNamespace(loss=SimpleNamespace(p_uncond=0.0), sample=None))
    args.steps = None
    with pytest.raises(DiffkitError, match="trained without label dropout"):
        ImagesAssimilation.run(cond, args, None)


# ============================================================================= end to end (slow: trains a model)
RUN = ["--no-progress", "--device", "cpu"]
ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def digits(tmp_path_factory):
    """examples/assimilate_images.py --quick (~40 s): an unconditional UNet trained 300 steps on the
    digits; 12 of its held-out digits with 25 % of their pixels observed (sigma_y = 0.05 x the pixels'
    std); the reconstruction-guidance analysis and the prior ensemble (--no-guidance), 4 members each."""
    import importlib.util

    root = tmp_path_factory.mktemp("images_assim")
    spec = importlib.util.spec_from_file_location("assimilate_images", ROOT / "examples" / "assimilate_images.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    report = mod.main(["--quick", "--no-progress", "--out", str(root)])
    return {"root": root, "run": root / "run", "truth": root / "truth.nc", "obs": root / "obs.nc",
            "prior": root / "prior.nc", "report": report}


@pytest.mark.slow
def test_assimilate_images_example_inpaints_better_than_the_prior(digits):
    """Measured (seed 0): ensemble-mean RMSE 4.04 vs the prior's 4.81 (0..16 scale), unobserved pixels 4.64 vs
    4.92, spread/skill 0.93 (the prior's 0.97); on a 1000-step, 16-channel model 4.21 vs 4.97, 4.84 vs 5.12.
    Super-resolution from 2x2 block means (reconstruction, gamma 0.25): 3.28."""
    r = digits["report"]
    a, p = r["analysis"], r["prior"]
    assert a["rmse"] < 0.92 * p["rmse"] and a["rmse_unobserved"] < p["rmse_unobserved"], r
    assert 0.5 < a["spread_skill"] < 1.5, r
    sr = r["super_resolution"]          # measured: 3.28 vs nearest-neighbour upsampling 3.46, prior 4.81
    assert sr["rmse"] < 0.8 * sr["prior_rmse"] and sr["rmse"] < sr["nearest_rmse"], sr
    assert (digits["root"] / "analysis.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert json.loads((digits["root"] / "report.json").read_text()) == r


@pytest.mark.slow
def test_diffkit_evaluate_scores_the_images_analysis_per_image(digits, tmp_path, capsys):
    """``diffkit evaluate analysis.nc --truth truth.nc``: no domain claims an images analysis, so diffkit's
    generic evaluator scores it, per image over the pixels: its RMSE per image is the direct one, the
    analysis beats the prior ensemble, and each image's rank histogram counts every pixel."""
    from diffkit.cli import main

    root = digits["root"]
    for name in ("analysis", "prior"):
        assert main(["evaluate", str(root / f"{name}.nc"), "--truth", str(digits["truth"]), "--out",
                     str(tmp_path / name), "--no-plots"]) == 0
        assert capsys.readouterr().out.startswith("diffkit evaluate (ensemble): 4 member(s), 12 image(s) (0..11)")
    with xr.open_dataset(tmp_path / "analysis" / "scores.nc") as s, xr.open_dataset(root / "analysis.nc") as a, \
            xr.open_dataset(digits["truth"]) as t, xr.open_dataset(tmp_path / "prior" / "scores.nc") as sp:
        direct = np.sqrt(((a["L"].values.mean(1) - t["L"].values) ** 2).mean((1, 2)))
        np.testing.assert_allclose(s["ensemble_mean_rmse"].values[0], direct, rtol=1e-5)
        assert float(s["ensemble_mean_rmse_overall"].values[0]) == pytest.approx(direct.mean(), rel=1e-5)
        assert float(s["ensemble_mean_rmse_overall"].values[0]) < float(sp["ensemble_mean_rmse_overall"].values[0])
        np.testing.assert_array_equal(s["rank_histogram"].values[0].sum(-1), np.full(12, 64))
        assert s.attrs["case_dim"] == "image" and s.attrs["dispersion_L"]


def rmse(path, truth, obs):
    """``(all, unobserved, observed pixels)`` RMSE of the ensemble mean of ``path`` against the truth."""
    with xr.open_dataset(path) as a, xr.open_dataset(truth) as t, xr.open_dataset(obs) as o:
        err = a["L_ensemble_mean"].values - t["L"].values
        seen = np.isfinite(o["L"].values)
    return tuple(float(np.sqrt((e ** 2).mean())) for e in (err, err[~seen], err[seen]))


def _check_analysis(out, method):
    with xr.open_dataset(out) as ds:
        assert ds["L"].dims == ("image", "member", "y", "x") and ds["L"].shape == (12, 4, 8, 8)
        assert ds["member"].attrs["standard_name"] == "realization"
        assert ds["L_ensemble_mean"].attrs["cell_methods"] == "member: mean"
        np.testing.assert_allclose(ds["L_ensemble_mean"].values, ds["L"].values.mean(1), rtol=1e-5, atol=1e-5)
        np.testing.assert_allclose(ds["L_ensemble_spread"].values, ds["L"].values.std(1, ddof=1), rtol=1e-4, atol=1e-4)
        assert ds.attrs["method"] == method and ds.attrs["n_observations"] == 12 * 16
        assert ds.attrs["observation_form"] == "grid" and ds.attrs["title"] == "diffkit analysis"
    assert out.with_suffix(".png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _analysis(digits, method, capsys):
    """The analysis of ``method`` (run once per module) and the command's output."""
    out = digits["root"] / f"a_{method}.nc"
    if out not in digits:
        capsys.readouterr()
        rc = main(["assimilate", str(digits["run"]), "--obs", str(digits["obs"]), "--members", "4", "--method",
                   method, "--out", str(out), *RUN])
        captured = capsys.readouterr()
        assert rc == 0, captured.err
        digits[out] = captured
    return out, digits[out]


@pytest.mark.slow
def test_assimilate_images_dps_beats_the_prior_ensemble(digits, capsys):
    """Measured: RMSE 4.19 vs the prior's 4.81, unobserved pixels 4.52 vs 4.92."""
    out, captured = _analysis(digits, "dps", capsys)
    assert "analysis (dps): 4 member(s) of 12 image(s)" in captured.out
    _check_analysis(out, "dps")
    _check_analysis(digits["root"] / "analysis.nc", "reconstruction")      # the example's, through the same CLI
    a_all, a_un, _ = rmse(out, digits["truth"], digits["obs"])
    p_all, p_un, _ = rmse(digits["prior"], digits["truth"], digits["obs"])
    assert a_all < 0.92 * p_all and a_un < p_un, (a_all, p_all, a_un, p_un)


@pytest.mark.slow
def test_assimilate_images_mmps_fits_the_observed_pixels(digits, capsys):
    """Measured: observed pixels' RMSE 0.42 vs the prior's 4.49 (sigma_y 0.30); its safeguard engaged and
    said so (the UNet's Tweedie covariance is not positive definite)."""
    out, captured = _analysis(digits, "mmps", capsys)
    assert "analysis (mmps)" in captured.out and "warning: mmps: the denoiser's covariance" in captured.err
    _check_analysis(out, "mmps")
    a_obs = rmse(out, digits["truth"], digits["obs"])[2]
    p_obs = rmse(digits["prior"], digits["truth"], digits["obs"])[2]
    assert a_obs < 0.2 * p_obs, (a_obs, p_obs)


@pytest.mark.slow
def test_assimilate_images_mmps_beats_the_prior_on_unobserved_pixels(digits, capsys):
    """Before MMPS's overshoot test this UNet's Jacobian, far from a PSD covariance, blew the unobserved
    pixels up (RMSE 10.0 vs the prior's 4.9 on a 0..16 scale); the samples whose update overshoots the
    observations now take reconstruction guidance's update, and MMPS fits the observed pixels and beats
    the prior on the others."""
    out, _ = _analysis(digits, "mmps", capsys)
    _, a_un, a_obs = rmse(out, digits["truth"], digits["obs"])
    _, p_un, p_obs = rmse(digits["prior"], digits["truth"], digits["obs"])
    assert a_un < 0.97 * p_un, (a_un, p_un)
    assert a_obs < 0.2 * p_obs, (a_obs, p_obs)


#: where the command says it otherwise than read_observations (it checks the image dim first)
CLI_FRAGMENT = {"no image dim": "no 'image' coordinate; an images observation file numbers its images along 'image'"}


@pytest.mark.slow
@pytest.mark.parametrize("name", list(BAD))
def test_assimilate_rejects_bad_observation_files(digits, name, capsys):
    edit, fragment = BAD[name]
    fragment = CLI_FRAGMENT.get(name, fragment)
    with xr.open_dataset(digits["obs"]) as o:
        bad = edit(o.load())
    path = digits["root"] / f"bad_{name.replace(' ', '_')}.nc"
    bad.to_netcdf(path)
    out = digits["root"] / "never.nc"
    capsys.readouterr()
    assert main(["assimilate", str(digits["run"]), "--obs", str(path), "--members", "2", "--out", str(out), *RUN]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkit assimilate: error:") and fragment in err, err
    assert not out.exists()


@pytest.mark.slow
def test_options_of_surrogates_are_refused(digits, capsys):
    assert main(["assimilate", str(digits["run"]), "--obs", str(digits["obs"]), "--init", str(digits["truth"]),
                 "--out", str(digits["root"] / "never.nc"), *RUN]) == 1
    assert "--init does not apply to images models" in capsys.readouterr().err


@pytest.mark.slow
def test_bad_file_error_is_one_line_in_a_subprocess(digits):
    """Process level: the CLI as users run it prints one line and exits 1 (run 5 times when it was written)."""
    import subprocess
    import sys

    path = digits["root"] / "bad_proc.nc"
    with xr.open_dataset(digits["obs"]) as o:
        o.load().assign(L_sigma_y=-o["L_sigma_y"]).to_netcdf(path)
    p = subprocess.run([sys.executable, "-m", "diffkit", "assimilate", str(digits["run"]), "--obs", str(path),
                        "--out", str(digits["root"] / "never.nc"), *RUN], capture_output=True, text=True, timeout=300)
    assert p.returncode == 1 and len(p.stderr.strip().splitlines()) == 1, p.stderr
    assert "sigma_y of 'L' holds" in p.stderr and "<= 0" in p.stderr


@pytest.mark.slow
def test_spread_scale_recalibrates_the_prior_members(digits):
    """--spread-scale on the images domain: the example's prior (same seed) with every member's anomaly
    about the ensemble mean times 2, the mean unchanged, the scale recorded."""
    out = digits["root"] / "prior_x2.nc"
    assert main(["assimilate", str(digits["run"]), "--obs", str(digits["obs"]), "--members", "4", "--seed", "0",
                 "--no-guidance", "--spread-scale", "2", "--out", str(out), *RUN]) == 0
    with xr.open_dataset(digits["prior"]) as p, xr.open_dataset(out) as c:
        x = p["L"].values.astype(np.float64)
        m = x.mean(1, keepdims=True)
        np.testing.assert_allclose(c["L"].values, m + 2 * (x - m), rtol=0, atol=1e-4)
        np.testing.assert_allclose(c["L_ensemble_spread"].values, 2 * p["L_ensemble_spread"].values, rtol=1e-4,
                                   atol=1e-4)
        assert c.attrs["spread_scale"] == 2.0 and "spread_scale" not in p.attrs
