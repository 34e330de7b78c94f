"""The PDE surrogate (:mod:`diffkit_pde.surrogate`): initial conditions read from a file, exact
autoregressive rollouts with oracle networks (a periodic shift, whose one-step map is known), and
seeded ensembles, rollout datasets and reports of trained models.  Tiny sizes throughout.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch
import xarray as xr
from _pde_fixtures import DT, P, known_u
from torch import nn

from diffkit.checkpoint import capture_rng_state, restore_rng_state
from diffkit.config import config_from_dict
from diffkit.denoiser import Cond, Denoiser, Regressor
from diffkit.errors import NonFiniteError, ShapeError
from diffkit.rollout import DEFAULT_PERTURB
from diffkit.schedules import cosine
from diffkit_pde.adapter import PDEDataError, TrajectoryAdapter, spec_from_layout

from _tiny_unet import TINY_UNET  # noqa: E402


# ============================================================================= 1. initial conditions
def test_initial_condition_checks_grid_index_and_start(synth, tmp_path):
    layout = TrajectoryAdapter(str(synth), history=2, frame_step=2).layout
    coarse = tmp_path / "coarse.nc"
    xr.open_dataset(synth).isel(x=slice(0, 4)).to_netcdf(coarse)
    with pytest.raises(ShapeError, match=r"x=4.*x=8"):
        P.initial_condition(coarse, layout)
    for bad in (5, -1):
        with pytest.raises(PDEDataError, match=rf"--index {bad} is out of range: .*5 trajectories"):
            P.initial_condition(synth, layout, index=bad)
    with pytest.raises(PDEDataError, match="12 frames per trajectory"):
        P.initial_condition(synth, layout, start=10)          # history needs frames 10 and 12
    ic = P.initial_condition(synth, layout, index=3, start=1)
    u = known_u()
    np.testing.assert_array_equal(ic.history[:, 0].numpy(), u[3, [1, 3]])
    np.testing.assert_array_equal(ic.truth[:, 0].numpy(), u[3, 5::2])
    assert ic.t0 == pytest.approx(0.3) and ic.dt == pytest.approx(2 * DT[3])
    # the same grid but another variable
    xr.open_dataset(synth).rename({"u": "w"}).to_netcdf(tmp_path / "w.nc")
    with pytest.raises(PDEDataError, match="lacks the variable"):
        P.initial_condition(tmp_path / "w.nc", layout)


# ============================================================================= 2. oracle rollouts
def shift_file(path, n=3, T=50, nx=16, speeds=None, seed=0) -> tuple[Path, np.ndarray, np.ndarray]:
    """u moves right by ``c_i`` grid points per frame, v left by one: u[i, t] = roll(f_i, c_i t)."""
    rng = np.random.default_rng(seed)
    f = rng.normal(size=(n, nx)) * 2 + 3
    g = rng.normal(size=(n, nx)) * 0.5 - 1
    c = np.ones(n, dtype=int) if speeds is None else np.asarray(speeds)
    u = np.stack([np.stack([np.roll(f[i], c[i] * t) for t in range(T)]) for i in range(n)])
    v = np.stack([np.stack([np.roll(g[i], -t) for t in range(T)]) for i in range(n)])
    xr.Dataset({"u": (("trajectory", "time", "x"), u), "v": (("trajectory", "time", "x"), v),
                "c": ("trajectory", c.astype(float)), "dt": ("trajectory", np.full(n, 0.25))},
               coords={"x": np.arange(nx) / nx, "time": np.arange(T) * 0.25}).to_netcdf(path)
    return Path(path), u, v


class ShiftOracle(nn.Module):
    """The exact one-step map of :func:`shift_file` in the model's standardised space.

    Predicts every target frame from the *oldest* history frame, so a wrongly ordered or wrongly
    updated history breaks it.  With ``speed_scalar`` the shift of u is read from the scalar ``c``.
    """

    def __init__(self, layout, speeds=(1, -1), speed_scalar=False):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))   # rollout reads the device from the parameters
        spec = spec_from_layout(layout)
        self.h, self.hz, self.fs, self.target = spec.history, spec.horizon, spec.frame_step, spec.target
        self.C = spec.num_variables
        self.sm, self.ss = torch.tensor(spec.state_mean)[:, None], torch.tensor(spec.state_std)[:, None]
        self.tm, self.ts = layout.mean.reshape(-1, 1), layout.std.reshape(-1, 1)
        self.speeds, self.speed_scalar = speeds, speed_scalar
        self.c_mean, self.c_std = layout.attrs["scalar_mean"], layout.attrs["scalar_std"]
        self.calls = 0

    def forward(self, x, c_noise, scalars=None, labels=None):
        self.calls += 1
        B, nx, C, h = x.shape[0], x.shape[-1], self.C, self.h
        assert x.shape[1] == self.hz * C + h * C and c_noise.shape == (B,)
        hist = x[:, self.hz * C:].reshape(B, h, C, nx) * self.ss + self.sm          # physical history
        if self.speed_scalar:
            cs = torch.round(scalars[:, 0] * self.c_std[0] + self.c_mean[0]).long().tolist()
        else:
            cs = [self.speeds[0]] * B
        out = []
        for k in range(1, self.hz + 1):
            lag = (k + h - 1) * self.fs                                                # frames from the oldest
            for c in range(C):
                sp = cs if c == 0 else [self.speeds[c]] * B
                nxt = torch.stack([torch.roll(hist[b, 0, c], sp[b] * lag, -1) for b in range(B)])
                out.append(nxt - hist[:, -1, c] if self.target == "residual" else nxt)
        y = torch.stack(out, 1)
        return (y - self.tm) / self.ts + 0 * self.w


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    return shift_file(tmp_path_factory.mktemp("shift") / "shift.nc")


def _truth(u, v, last, fs, K):
    idx = last + fs * np.arange(1, K + 1)
    return torch.from_numpy(np.stack([u[:, idx], v[:, idx]], 2))                      # (N, K, 2, nx)


@pytest.mark.parametrize("history,horizon,frame_step,target", [
    (1, 1, 1, "state"), (1, 1, 1, "residual"), (2, 1, 1, "state"), (2, 1, 2, "residual"),
    (2, 2, 1, "residual"), (3, 2, 2, "state"),
])
def test_regressor_oracle_rollout_is_exact(shift, history, horizon, frame_step, target):
    path, u, v = shift
    a = TrajectoryAdapter(str(path), variables=["u", "v"], history=history, horizon=horizon,
                          frame_step=frame_step, target=target, val_fraction=0)
    L = a.layout
    net = ShiftOracle(L)
    model = Regressor(net, L)
    # the oracle maps every training item's fields to its x: items and rollout share one convention
    ds = a.dataset("train")
    for k in (0, len(ds) // 2, len(ds) - 1):
        it = ds[k]
        assert it["x"].shape == (2 * horizon, 16) and it["fields"].shape == (2 * history, 16)
        torch.testing.assert_close(model(Cond(fields=it["fields"][None])), it["x"][None], atol=1e-4, rtol=0)
    net.calls = 0
    start, K = 2, 19                              # K not a multiple of the horizon
    last = start + (history - 1) * frame_step
    hist = torch.stack([P.initial_condition(path, L, index=i, start=start).history for i in range(3)])
    np.testing.assert_array_equal(hist[:, -1].numpy(), np.stack([u[:, last], v[:, last]], 1).astype(np.float32))
    pred = P.rollout(model, hist, K, members=2, perturb=0)  # regression, 2 members: perturbed by default
    assert pred.shape == (3, 2, K, 2, 16) and pred.dtype == torch.float32
    assert net.calls == -(-K // horizon)            # one batched call per model step, all members at once
    truth = _truth(u, v, last, frame_step, K)
    torch.testing.assert_close(pred, truth[:, None].float().expand_as(pred), atol=2e-5, rtol=0)
    # the initial condition's truth is the same reference
    ic = P.initial_condition(path, L, index=1, start=start)
    torch.testing.assert_close(ic.truth[:K].double(), truth[1], atol=1e-6, rtol=0)
    # unbatched history: (M, K, C, nx), the same numbers
    one = P.rollout(model, hist[1], K, members=2, perturb=0)
    assert one.shape == (2, K, 2, 16)
    torch.testing.assert_close(one, pred[1], atol=0, rtol=0)


@pytest.mark.parametrize("sampler", ["dpmpp_2m", "ddim"])
@pytest.mark.parametrize("history,target", [(1, "state"), (2, "residual")])
def test_denoiser_oracle_rollout_is_exact_with_deterministic_samplers(shift, sampler, history, target):
    path, u, v = shift
    a = TrajectoryAdapter(str(path), variables=["u", "v"], history=history, target=target, val_fraction=0)
    L = a.layout
    den = Denoiser(ShiftOracle(L), cosine(), "x0", L)
    K = 20
    hist = torch.stack([P.initial_condition(path, L, index=i).history for i in range(3)])
    pred = P.rollout(den, hist, K, members=3, sampler=sampler, nfe=3, seed=7)
    assert pred.shape == (3, 3, K, 2, 16)
    truth = _truth(u, v, history - 1, 1, K)
    torch.testing.assert_close(pred, truth[:, None].float().expand_as(pred), atol=2e-5, rtol=0)
    assert torch.equal(pred[:, 0], pred[:, 1]) and torch.equal(pred[:, 0], pred[:, 2])


def test_oracle_rollout_with_scalar_conditions(tmp_path):
    path, u, _ = shift_file(tmp_path / "speeds.nc", n=4, speeds=[1, 2, 3, 2])
    a = TrajectoryAdapter(str(path), variables=["u"], scalars=["c"], val_fraction=0)
    L = a.layout
    assert L.attrs["scalar_mean"] == [2.0] and L.attrs["scalar_std"] == pytest.approx([np.std([1, 2, 3, 2])])
    model = Regressor(ShiftOracle(L, speeds=(None,), speed_scalar=True), L)
    ics = [P.initial_condition(path, L, index=i) for i in range(4)]
    assert [float(ic.scalars[0]) for ic in ics] == [1.0, 2.0, 3.0, 2.0]       # physical values
    hist, scal = torch.stack([ic.history for ic in ics]), torch.stack([ic.scalars for ic in ics])
    pred = P.rollout(model, hist, 12, scalars=scal)
    torch.testing.assert_close(pred[:, 0, :, 0].double(), torch.from_numpy(u[:, 1:13]), atol=2e-5, rtol=0)
    with pytest.raises(ShapeError, match="scalars"):
        P.rollout(model, hist, 2)
    with pytest.raises(ShapeError, match=r"expected \(N, 1, 1, 16\)"):
        P.rollout(model, hist[:, :, :, :8], 2, scalars=scal)
    with pytest.raises(NonFiniteError):
        P.rollout(model, hist * float("nan"), 2, scalars=scal)

# ============================================================================= 3. trained models
def _train_cfg(data: Path, run_dir: Path, objective: str, horizon: int = 1):
    return config_from_dict({
        "run_dir": str(run_dir),
        "data": {"adapter": "pde", "batch_size": 8, "val_fraction": 0.2,
                 "options": {"path": str(data), "history": 2, "horizon": horizon, "target": "residual",
                             "scalars": ["dt", "dx"]}},
        "model": {"backbone": "unet", "objective": objective, "options": TINY_UNET},
        "trainer": {"steps": 20, "lr": 1e-3, "warmup": 2, "val_every": 0, "ckpt_every": 0, "log_every": 100},
        "sample": {"sampler": "dpmpp_2m", "nfe": 4},
    })


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    from diffkit.train import Trainer

    root = tmp_path_factory.mktemp("trained")
    data = root / "burgers.nc"
    P.write_netcdf(P.to_dataset(P.simulate_burgers(6, 20, nx=32, resolution_tol=None)), data)
    state = capture_rng_state(cuda=False)
    try:
        runs = {}
        for objective in ("diffusion", "regression"):
            # the regression model predicts two frames per call
            cfg = _train_cfg(data, root / objective, objective, horizon=1 if objective == "diffusion" else 2)
            out = Trainer(cfg, device="cpu", progress=False).fit()
            assert out["step"] == 20
            runs[objective] = cfg.run_dir
    finally:
        restore_rng_state(state)
    return data, runs


def test_diffusion_ensembles_are_seeded(trained):
    data, runs = trained
    sur = P.load_surrogate(runs["diffusion"], device="cpu")
    assert sur.config.model.objective == "diffusion"
    # everything the rollout needs came back from the checkpoint
    ref = TrajectoryAdapter(str(data), history=2, target="residual", scalars=["dt", "dx"], val_fraction=0.2)
    assert spec_from_layout(sur.layout) == spec_from_layout(ref.layout)
    assert sur.dt == pytest.approx(0.05)
    ics = [P.initial_condition(data, sur.layout, index=i, start=3) for i in (4, 5)]
    hist, scal = torch.stack([ic.history for ic in ics]), torch.stack([ic.scalars for ic in ics])
    run = lambda seed, **kw: P.rollout(sur, hist, 4, members=3, scalars=scal, seed=seed, **kw)
    a, b, c = run(0), run(0), run(1)
    assert a.shape == (2, 3, 4, 1, 32) and bool(torch.isfinite(a).all())
    assert torch.equal(a, b)
    assert not torch.equal(a, c) and (a - c).abs().max() > 1e-3
    for m in range(3):
        for n in range(m):
            assert (a[:, m] - a[:, n]).abs().amax() > 1e-3           # members differ
    # an explicit generator is the seed; an unbatched history gives (M, K, C, nx), the same numbers
    g = torch.Generator().manual_seed(0)
    assert torch.equal(run(123, generator=g), a)
    one = P.rollout(sur, hist[0], 4, members=3, scalars=scal[0], seed=5)
    assert one.shape == (3, 4, 1, 32)
    assert torch.equal(one, P.rollout(sur, hist[:1], 4, members=3, scalars=scal[:1], seed=5)[0])


def test_regression_members_follow_the_perturbation_policy(trained):
    """The policy of diffkit.rollout, as in weather: a regression ensemble (members > 1) is perturbed
    by DEFAULT_PERTURB unless perturb says otherwise; with perturb=0 the members are identical."""
    data, runs = trained
    sur = P.load_surrogate(runs["regression"], device="cpu")
    assert isinstance(sur.model, Regressor)
    assert sur.layout.channels == ("du@t+1", "du@t+2") and sur.layout.autoregressive.horizon == 2
    ic = P.initial_condition(data, sur.layout, index=5)
    p = P.rollout(sur, ic.history, 7, members=3, scalars=ic.scalars[None], seed=0, perturb=0)
    q = P.rollout(sur, ic.history, 7, members=3, scalars=ic.scalars[None], seed=9, perturb=0)
    assert p.shape == (3, 7, 1, 32) and bool(torch.isfinite(p).all())
    assert torch.equal(p[0], p[1]) and torch.equal(p[0], p[2]) and torch.equal(p, q)
    assert (p[0, 1:] - p[0, :-1]).abs().max() > 0                 # it does advance
    one = P.rollout(sur, ic.history, 7, members=1, scalars=ic.scalars[None], seed=4)
    torch.testing.assert_close(one[0], p[0], atol=1e-5, rtol=0)   # one member: not perturbed
    d = P.rollout(sur, ic.history, 7, members=3, scalars=ic.scalars[None], seed=0)   # perturb=None
    assert torch.equal(d, P.rollout(sur, ic.history, 7, members=3, scalars=ic.scalars[None], seed=0,
                                    perturb=DEFAULT_PERTURB))
    for m in range(3):
        for n in range(m):
            assert (d[m] - d[n]).abs().amax() > 1e-4                # members differ


def test_rollout_dataset_of_an_initial_condition(trained):
    data, runs = trained
    sur = P.load_surrogate(runs["diffusion"], device="cpu")
    ic = P.initial_condition(data, sur.layout, index=5, start=10)
    K = 12                                                        # more than the 8 frames left in the file
    pred = P.rollout(sur, ic.history, K, members=2, scalars=ic.scalars[None])
    ds = P.rollout_dataset(pred, sur.layout, ic)
    assert ds["u"].dims == ("member", "time", "x") and ds["u"].shape == (2, K, 32)
    file_t = xr.open_dataset(data)["time"].values
    np.testing.assert_allclose(ds["time"].values, file_t[11] + 0.05 * np.arange(1, K + 1))
    truth = ds["u_truth"].values
    assert ds.attrs["truth_frames"] == 8 and np.isnan(truth[8:]).all()
    np.testing.assert_array_equal(truth[:8], xr.open_dataset(data)["u"].values[5, 12:20].astype(np.float32))
    p = pred[:, :8, 0].double().numpy()
    pc, tc = p - p.mean(-1, keepdims=True), truth[None, :8] - truth[:8].mean(-1, keepdims=True)
    r = (pc * tc).sum(-1) / np.sqrt((pc**2).sum(-1) * (tc**2).sum(-1))
    np.testing.assert_allclose(ds["correlation"].values[:, :8], r, atol=1e-5)
    assert np.isnan(ds["correlation"].values[:, 8:]).all()
    assert ds["spread"].shape == (K,) and ds.attrs["Conventions"].startswith("CF-")


def test_rollout_report_has_calibration_verdict(trained):
    """issue 14 item 3: the rollout dataset holds the rank histogram per step and the dispersion verdict of
    diffkit.ensemble.dispersion_verdict; rollout_report prints spread/skill per step, the histogram and the verdict."""
    from diffkit import ensemble as E

    data, runs = trained
    sur = P.load_surrogate(runs["diffusion"], device="cpu")
    ic = P.initial_condition(data, sur.layout, index=5, start=10)
    K, M = 10, 3                                                  # 8 frames left in the file: 2 steps past its end
    pred = P.rollout(sur, ic.history, K, members=M, scalars=ic.scalars[None])
    ds = P.rollout_dataset(pred, sur.layout, ic)
    rh = ds["u_rank_histogram"].values
    assert ds["u_rank_histogram"].dims == ("time", "rank") and rh.shape == (K, M + 1)
    # exact: each step's counts are the ranks of the 32 truth points among the members (no ties in float data)
    p, t = pred[:, :8, 0].double().numpy(), ds["u_truth"].values[:8].astype(np.float64)
    ranks = (p < t[None]).sum(0)                                  # (8, 32)
    np.testing.assert_array_equal(rh[:8], np.stack([np.bincount(r, minlength=M + 1) for r in ranks]))
    assert (rh[8:] == 0).all()                                    # past the file's end: nothing to rank
    ss = E.spread_skill_ratio(torch.as_tensor(p), torch.as_tensor(t), dims=(-1,)).numpy()
    np.testing.assert_allclose(ds["ensemble_spread_skill_ratio"].values[:8], ss, rtol=1e-5)
    d = E.dispersion_verdict(ss, rh)
    assert ds.attrs["dispersion_u"] == d.verdict and ds.attrs["calibration_u"] == str(d)
    rep = P.rollout_report(ds).splitlines()
    assert rep[0].split() == ["step", "time", "rmse", "crps", "spread", "spread/skill"]
    assert [int(line.split()[0]) for line in rep[1:-2]] == [1, 2, 4, 5, 7, 8]        # 6 of the 8 scored steps
    assert float(rep[1].split()[-1]) == pytest.approx(ss[0], rel=1e-3)
    assert rep[-1] == f"u: verdict: {d}" and d.verdict in ("under-dispersive", "well-dispersed", "over-dispersive")
    rel, _ = E.rank_summary(rh)
    assert rep[-2] == "u: rank histogram / uniform (all steps): " + " ".join(f"{x:.2f}" for x in rel)
    # one member: no spread, no verdict, no report
    one = P.rollout_dataset(pred[:1], sur.layout, ic)
    assert "calibration_u" not in one.attrs and P.rollout_report(one) == ""
