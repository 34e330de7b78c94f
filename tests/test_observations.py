"""Observation files and operators (diffkit/observations.py, issue 15 item 3): the point operator's
interpolation is exact on linear fields and wraps periodic seams, its transpose is its adjoint, and
synthetic files read back into the values they were made of.  No model involved: fast."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from diffkit.errors import ObservationError
from diffkit.observations import Axis, ObservationGrid, PointInterpolation, read_observations, synthetic_observations

LAT = Axis("latitude", tuple(40.0 + 2.5 * np.arange(5)))                       # not periodic
LON = Axis("longitude", tuple(45.0 * np.arange(8)), periodic=True, modulus=360.0)   # a global ring


def test_point_interpolation_is_exact_on_linear_fields_and_periodic_across_the_seam():
    lat, lon = np.meshgrid(LAT.values, LON.values, indexing="ij")
    field = torch.as_tensor(2.0 + 3.0 * lat - 0.5 * lon)[None, None]            # (1, 1, 5, 8)
    rng = np.random.default_rng(0)
    p_lat, p_lon = rng.uniform(40.0, 50.0, 200), rng.uniform(0.0, 315.0, 200)  # inside, not across the seam
    op = PointInterpolation([LAT, LON], np.zeros(200), [p_lat, p_lon], 1)
    np.testing.assert_allclose(op(field)[0].numpy(), 2.0 + 3.0 * p_lat - 0.5 * p_lon, rtol=0, atol=1e-11)
    # across the seam: between longitude 315 (index 7) and 360 = 0 (index 0), also written as -22.5
    seam = PointInterpolation([LAT, LON], np.zeros(3), [np.full(3, 45.0), np.array([337.5, -22.5, 326.25])], 1)
    f = field[0, 0, 2].numpy()                                                    # latitude 45
    want = [0.5 * f[7] + 0.5 * f[0], 0.5 * f[7] + 0.5 * f[0], 0.75 * f[7] + 0.25 * f[0]]
    np.testing.assert_allclose(seam(field)[0].numpy(), want, rtol=0, atol=1e-12)
    # 1-D, linear interpolation on a periodic line given as x in [0, L) (and modulo L)
    x = Axis("x", tuple(0.5 * np.arange(8)), periodic=True, modulus=4.0)
    u = torch.as_tensor(1.0 - 2.0 * x.values)[None, None]
    pts = np.array([0.25, 1.1, 3.4, 3.75, 7.75])
    got = PointInterpolation([x], np.zeros(5), [pts], 1)(u)[0].numpy()
    np.testing.assert_allclose(got[:3], 1.0 - 2.0 * pts[:3], atol=1e-12)
    np.testing.assert_allclose(got[3:], 0.5 * (u[0, 0, 7] + u[0, 0, 0]).item(), atol=1e-12)  # the seam cell


def test_point_interpolation_transpose_is_its_adjoint_and_channels_are_kept():
    rng = np.random.default_rng(1)
    ch = rng.integers(0, 3, 40)
    op = PointInterpolation([LAT, LON], ch, [rng.uniform(40, 50, 40), rng.uniform(-180, 540, 40)], 3)
    x = torch.randn(4, 3, 5, 8, dtype=torch.float64)
    v = torch.randn(4, 40, dtype=torch.float64)
    assert torch.allclose((op(x) * v).sum(), (x * op.transpose(v)).sum(), atol=1e-10)
    assert torch.allclose(op(x), x.flatten(1) @ op.matrix().T, atol=1e-12)
    y = op(torch.arange(3.0, dtype=torch.float64)[None, :, None, None].expand(1, 3, 5, 8).contiguous())
    assert torch.allclose(y[0], torch.as_tensor(ch, dtype=torch.float64), atol=1e-12)  # each point reads its channel


def test_points_outside_the_grid_are_one_line_errors():
    with pytest.raises(ObservationError, match=r"outside the model's grid, the first at latitude = 51"):
        PointInterpolation([LAT, LON], [0, 0], [np.array([45.0, 51.0]), np.array([10.0, 10.0])], 1)
    per = Axis("latitude", tuple(40.0 + 2.5 * np.arange(5)), periodic=True)  # the cell 50..52.5 is the domain's
    PointInterpolation([per, LON], [0], [np.array([51.0]), np.array([10.0])], 1)
    with pytest.raises(ObservationError, match=r"spans \[40, 52.5\) \(periodic\)"):
        PointInterpolation([per, LON], [0], [np.array([53.0]), np.array([10.0])], 1)


def _grid(window):
    return ObservationGrid(channels=(("u", {}), ("v", {})), axes=(LAT, LON),
                           time_key=lambda t: np.asarray(t, dtype=np.float64), window=tuple(window))


@pytest.mark.parametrize("form", ["grid", "points"])
def test_synthetic_observations_read_back_as_truth_plus_noise(form, tmp_path):
    rng = np.random.default_rng(2)
    T = 3
    truth = rng.standard_normal((T, 2, 5, 8)) * np.array([1.0, 10.0])[None, :, None, None]
    ds = synthetic_observations(truth, variables=[("u", {}), ("v", {})], axes=[LAT, LON], time=np.arange(T) * 0.5,
                                time_attrs={"units": "1"}, var_attrs={"u": {"units": "m"}, "v": {"units": "m"}},
                                stride=2, noise=0.05, form=form, seed=3)
    ds.to_netcdf(tmp_path / "o.nc")
    assert ds["u"].attrs["ancillary_variables"] == "u_sigma_y" and ds["u_sigma_y"].attrs["units"] == "m"
    obs = read_observations(tmp_path / "o.nc", _grid(np.arange(T) * 0.5))
    assert obs.form == form and sorted(obs.steps) == [0, 1, 2]
    per_step = 2 * 3 * 4                                                          # 2 channels x lat 0,2,4 x lon 0,2,4,6
    assert all(s.count == per_step for s in obs.steps.values())
    clim = truth.transpose(1, 0, 2, 3).reshape(2, -1).std(1)
    for k, s in obs.steps.items():
        x = torch.as_tensor(truth[k])[None]
        err = (s.y - s.apply(x)[0]).numpy()
        sig = s.sigma.numpy()
        np.testing.assert_allclose(np.unique(np.round(sig, 5)), np.round(np.sort(0.05 * clim), 5), rtol=1e-5)
        assert np.all(np.abs(err) < 5 * sig) and np.all(np.abs(err) > 0)        # noisy, at the noise level
    with pytest.raises(ObservationError, match="outside the assimilation window"):
        read_observations(tmp_path / "o.nc", _grid(np.arange(2) * 0.5))
