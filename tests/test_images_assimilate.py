"""Images assimilation: held-out digits (``diffkit data images``), synthetic observations of them
(``--observe-from``), and ``diffkit assimilate`` with an unconditional digits model (inpainting).

The first tests need no model (the grid, the operator, the files); the end-to-end ones train a small
unconditional UNet through the CLI and are in the slow lane.
"""
from __future__ import annotations

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
