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


class _GaussianAR(torch.nn.Module):
    """A stand-in autoregressive diffusion model: its standardised target z ~ N(0, I) whatever the
    history (the exact denoiser :class:`diffkit.analytic.GaussianDenoiser`), target = residual."""

    def __init__(self):
        super().__init__()
        from diffkit.layout import AutoregressiveSpec, Layout
        from diffkit.schedules import CosineSchedule

        self.schedule = CosineSchedule()
        spec = AutoregressiveSpec(variables=("u",), history=1, target="residual", state_mean=(1.0,), state_std=(0.5,))
        self.layout = Layout(channels=("du",), spatial=("x",), shape=(8,), periodic=("x",),
                             coords={"x": tuple(0.5 * np.arange(8))}, cond_channels=("u@t",),
                             mean=torch.tensor(0.3).reshape(1, 1), std=torch.tensor(2.0).reshape(1, 1),
                             autoregressive=spec)
        self.w = torch.nn.Parameter(torch.zeros(()))

    def bind(self, cond=None, guidance=None):
        from diffkit.analytic import GaussianDenoiser

        return GaussianDenoiser(self.schedule, torch.zeros(1, 8), 1.0)


@pytest.mark.parametrize("kind", ["mask", "points"])
def test_guided_rollout_step_is_the_exact_gaussian_posterior(kind):
    """diffkit.assimilate moves physical observations of the next state x = last + mean + std z into the model's
    standardised space; with a Gaussian prior on z and MMPS (exact there) the guided step's x0 estimate is the
    closed-form posterior mean E[z | x_t, y], so any error in the offset (latest state, mean) or scale shows."""
    from diffkit.assimilate import Guide, GuidedRollout
    from diffkit.denoiser import Cond
    from diffkit.observations import StepObservations

    model = _GaussianAR()
    x_ax = Axis("x", tuple(0.5 * np.arange(8)), periodic=True, modulus=4.0)
    g = torch.Generator().manual_seed(0)
    last = 1.0 + 0.5 * torch.randn(3, 1, 8, generator=g, dtype=torch.float64)     # physical latest states
    if kind == "mask":
        mask = torch.zeros(1, 8, dtype=torch.bool)
        mask[0, ::3] = True
        A = torch.eye(8, dtype=torch.float64)[mask[0]]
        step = StepObservations(y=torch.tensor([1.5, -0.5, 2.0], dtype=torch.float64),
                                sigma=torch.tensor([0.1, 0.2, 0.4], dtype=torch.float64), mask=mask)
    else:
        op = PointInterpolation([x_ax], [0, 0, 0, 0], [np.array([0.2, 1.3, 3.9, 2.5])], 1)
        A = op.matrix()
        step = StepObservations(y=torch.tensor([1.5, -0.5, 2.0, 0.7], dtype=torch.float64),
                                sigma=torch.tensor([0.1, 0.2, 0.4, 0.3], dtype=torch.float64), operator=op)
    gr = GuidedRollout(model, {1: step}, Guide("mmps", {"cg_iters": 20, "cg_tol": 0.0}))
    fields = ((last - 1.0) / 0.5).to(torch.float32)
    plain = gr.bind(Cond(fields=fields))                                            # step 0: no observations
    assert type(plain).__name__ == "GaussianDenoiser"
    guided = gr.bind(Cond(fields=fields))                                           # step 1: guided
    t = 0.6
    a, s = (float(v) for v in model.schedule.coeffs(torch.tensor([t], dtype=torch.float64)))
    x_t = torch.randn(3, 1, 8, generator=g, dtype=torch.float64)
    got = guided(x_t, t)
    m = a / (a * a + s * s) * x_t.flatten(1)                                        # E[z | x_t], prior N(0, I)
    v = s * s / (a * a + s * s)                                                     # Var[z | x_t]
    # y = A x + e = A(last + 0.3 + 2 z) + e  ->  (y - A(last + 0.3)) / 2 = A z + e / 2
    yz = (step.y[None] - (last.flatten(1) + 0.3) @ A.T) / 2.0
    Sz = torch.diag((step.sigma / 2.0) ** 2)
    K = v * A.T @ torch.linalg.inv(v * A @ A.T + Sz)
    want = m + (yz - m @ A.T) @ K.T
    torch.testing.assert_close(got.flatten(1), want, rtol=1e-6, atol=1e-8)
