"""The PDE surrogate pipeline (``diffkit_pde``): the ``pde`` adapter's training windows and their
normalisation, clear errors for bad data, exact autoregressive rollouts with oracle networks
(a periodic shift, whose one-step map is known), seeded ensembles of a trained model, and the
``diffkit data pde`` / ``train`` / ``rollout`` commands end to end.  Tiny sizes throughout.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from torch import nn

try:
    import diffkit_pde as P
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import diffkit_pde as P

import xarray as xr  # a dependency: missing it is a failure, not a skip

from diffkit.checkpoint import capture_rng_state, restore_rng_state  # noqa: E402
from diffkit.cli import main  # noqa: E402
from diffkit.config import config_from_dict  # noqa: E402
from diffkit.denoiser import Cond, Denoiser, Regressor  # noqa: E402
from diffkit.errors import NonFiniteError, ShapeError, UnknownComponentError  # noqa: E402
from diffkit.schedules import cosine  # noqa: E402
from diffkit_pde.adapter import PDEDataError, TrajectoryAdapter, spec_from_layout  # noqa: E402
from diffkit.rollout import DEFAULT_PERTURB  # noqa: E402

TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_levels": [], "mid_attn": False}
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ============================================================================= synthetic files
N_TRAJ, N_TIME, NX = 5, 12, 8
DT = 0.1 * (1 + np.arange(N_TRAJ))            # per-trajectory output interval
DX = 0.5 + 0.25 * np.arange(N_TRAJ)           # per-trajectory grid spacing


def known_u(n=N_TRAJ, T=N_TIME, nx=NX) -> np.ndarray:
    """u[i, t, x] = 1000 i + t^2 + x / 8: exact in float32, the trajectory readable from the value,
    and a residual u[t + k] - u[t] that varies with t (so it has a non-zero std)."""
    i, t, x = np.meshgrid(np.arange(n), np.arange(T), np.arange(nx), indexing="ij")
    return (1000.0 * i + t**2 + x / 8.0).astype(np.float64)


def write_1d(path, u=None, **attrs) -> Path:
    u = known_u() if u is None else u
    n, T, nx = u.shape
    ds = xr.Dataset({"u": (("trajectory", "time", "x"), u, {"units": "m/s"}),
                     "dt": ("trajectory", DT[:n]), "dx": ("trajectory", DX[:n])},
                    coords={"x": np.arange(nx) * 0.5, "time": np.arange(T) * 0.1}, attrs=attrs)
    ds.to_netcdf(path)
    return Path(path)


@pytest.fixture
def synth(tmp_path) -> Path:
    return write_1d(tmp_path / "synth.nc", L=6.0)


def phys_items(ds, layout, C):
    """Items of a dataset de-normalised with the layout alone: (fields (h, C, *S), target (hz, C, *S))."""
    a = layout.autoregressive
    nd = layout.ndim
    sm = torch.tensor(a.state_mean).reshape(-1, *[1] * nd)
    ss = torch.tensor(a.state_std).reshape(-1, *[1] * nd)
    out = []
    for k in range(len(ds)):
        it = ds[k]
        f = it["fields"].reshape(-1, C, *layout.shape).double() * ss.double() + sm.double()
        x = (it["x"].double() * layout.std.double() + layout.mean.double()).reshape(-1, C, *layout.shape)
        out.append((f, x))
    return out


# ============================================================================= 1. adapter windows
@pytest.mark.parametrize("history,horizon,frame_step,stride,target", [
    (1, 1, 1, 1, "state"),
    (2, 1, 2, 3, "state"),
    (3, 2, 1, 2, "residual"),
    (2, 2, 2, 1, "residual"),
    (1, 3, 3, 1, "state"),
])
def test_windows_are_the_normalised_frames(synth, history, horizon, frame_step, stride, target):
    u = known_u()
    a = TrajectoryAdapter(str(synth), history=history, horizon=horizon, frame_step=frame_step, stride=stride,
                          target=target, val_fraction=0.2)
    h, hz, fs = history, horizon, frame_step
    span = (h + hz - 1) * fs + 1
    starts = list(range(0, N_TIME - span + 1, stride))
    n_train, n_val = 4, 1
    train, val = a.dataset("train"), a.dataset("val")
    assert len(train) == n_train * len(starts) and len(val) == n_val * len(starts)

    # statistics: from the training trajectories only, recomputed here by hand
    L = a.layout
    tr = u[:n_train]
    assert L.autoregressive.state_mean == pytest.approx([tr.mean()], rel=1e-9)
    assert L.autoregressive.state_std == pytest.approx([tr.std()], rel=1e-9)
    if target == "state":
        tm = [tr.mean()] * hz
        ts = [tr.std()] * hz
    else:
        d = [tr[:, k * fs:] - tr[:, : N_TIME - k * fs] for k in range(1, hz + 1)]
        tm, ts = [x.mean() for x in d], [x.std() for x in d]
        assert min(ts) > 0
    assert L.mean.reshape(-1).double().numpy() == pytest.approx(tm, rel=1e-6)
    assert L.std.reshape(-1).double().numpy() == pytest.approx(ts, rel=1e-6)

    # layout
    assert L.spatial == ("x",) and L.periodic == ("x",) and L.shape == (NX,)
    assert L.coords["x"] == pytest.approx(tuple(np.arange(NX) * 0.5))
    pre = "d" if target == "residual" else ""
    assert L.channels == tuple(f"{pre}u@t+{k}" for k in range(1, hz + 1)) if hz > 1 else L.channels == (f"{pre}u",)
    assert L.cond_channels == tuple([f"u@t-{j}" for j in range(h - 1, 0, -1)] + ["u@t"])
    sp = L.autoregressive
    assert sp.history == h and sp.horizon == hz and sp.frame_step == fs and sp.variables == ("u",)
    assert sp.target == target and sp.step == pytest.approx(DT[0] * fs) and sp.step_units == "1"

    # every item: shapes, the normalised values, and the physical frames recovered exactly
    for split, trajs, ds in (("train", range(n_train), train), ("val", range(n_train, N_TRAJ), val)):
        got = phys_items(ds, L, 1)
        k = 0
        for i in trajs:
            for s in starts:
                it = ds[k]
                assert it["fields"].shape == (h, NX) and it["x"].shape == (hz, NX) and "scalars" not in it
                hist = u[i, s: s + h * fs: fs]                                       # (h, nx)
                fut = u[i, s + h * fs: s + (h + hz - 1) * fs + 1: fs]               # (hz, nx)
                assert hist.shape[0] == h and fut.shape[0] == hz
                tgt = fut - hist[-1] if target == "residual" else fut
                f_exp = (hist - L.autoregressive.state_mean[0]) / L.autoregressive.state_std[0]
                x_exp = (tgt - np.array(tm)[:, None]) / np.array(ts)[:, None]
                np.testing.assert_allclose(it["fields"].numpy(), f_exp, atol=2e-6, rtol=1e-5)
                np.testing.assert_allclose(it["x"].numpy(), x_exp, atol=2e-6, rtol=1e-5)
                f, x = got[k]
                np.testing.assert_allclose(f[:, 0].numpy(), hist, atol=1e-3, rtol=0)
                np.testing.assert_allclose(x[:, 0].numpy(), tgt, atol=1e-3, rtol=0)
                k += 1
        assert k == len(ds)


def test_validation_trajectories_are_disjoint_from_training(synth):
    for frac, n_val in ((0.2, 1), (0.4, 2), (0.0, 0)):
        a = TrajectoryAdapter(str(synth), val_fraction=frac)
        traj_of = lambda ds: {int(round(float(f[0, 0, 0]))) // 1000 for f, _ in phys_items(ds, a.layout, 1)}
        train = traj_of(a.dataset("train"))
        val = traj_of(a.dataset("val")) if n_val else set()
        assert train == set(range(N_TRAJ - n_val)) and val == set(range(N_TRAJ - n_val, N_TRAJ))
        assert not train & val
    with pytest.raises(ValueError, match="split"):
        a.dataset("test")


def test_max_trajectories_ignores_the_rest_even_if_broken(tmp_path):
    u = known_u()
    u[4, 2, 1] = np.nan                          # beyond max_trajectories: never read
    p = write_1d(tmp_path / "m.nc", u)
    a = TrajectoryAdapter(str(p), max_trajectories=3, val_fraction=0.3)
    assert list(a.train_traj) == [0, 1] and list(a.val_traj) == [2]
    assert a.layout.autoregressive.state_mean == pytest.approx([u[:2].mean()], rel=1e-9)


def test_old_checkpoint_layouts_are_converted(synth):
    """A layout dict as written before Layout.autoregressive (the spec in attrs) loads with
    weights_only=True and is converted by upgrade_layout, as load_surrogate does."""
    import io

    from diffkit.layout import Layout
    from diffkit_pde.adapter import upgrade_layout

    L = TrajectoryAdapter(str(synth), history=2, horizon=2, frame_step=2, target="residual", val_fraction=0.2).layout
    d = L.to_dict()
    sp = d.pop("autoregressive")
    d["attrs"] = {**d["attrs"], "variables": "u", "history": 2, "horizon": 2, "frame_step": 2, "target": "residual",
                  "dt_frame": float(DT[0]), "state_mean": sp["state_mean"], "state_std": sp["state_std"]}
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    old = Layout.from_dict(torch.load(buf, weights_only=True))
    assert old.autoregressive is None
    with pytest.raises(PDEDataError, match="no autoregressive spec.*load_surrogate"):
        spec_from_layout(old)
    up = upgrade_layout(old)
    assert up.autoregressive == L.autoregressive and up.attrs == L.attrs
    d["attrs"].pop("target")
    with pytest.raises(PDEDataError, match="old PDE checkpoint.*lack target"):
        upgrade_layout(Layout.from_dict(d))


def test_explicit_mean_and_std_are_used_as_given(synth):
    u = known_u()
    a = TrajectoryAdapter(str(synth), mean={"u": 5.0}, std={"u": 2.0}, history=2, val_fraction=0.2)
    L = a.layout
    assert L.autoregressive.state_mean == (5.0,) and L.autoregressive.state_std == (2.0,)
    assert float(L.mean) == 5.0 and float(L.std) == 2.0      # target "state": the same statistics
    it = a.dataset("train")[3]                                # trajectory 0, start 3
    np.testing.assert_allclose(it["fields"].numpy(), (u[0, 3:5] - 5.0) / 2.0, rtol=1e-6)
    np.testing.assert_allclose(it["x"].numpy(), (u[0, 5:6] - 5.0) / 2.0, rtol=1e-6)


def test_scalars_are_standardised_over_training_trajectories(synth):
    fs = 2
    a = TrajectoryAdapter(str(synth), scalars=["dt", "dx", "L"], frame_step=fs, val_fraction=0.2)
    L = a.layout
    assert L.scalars == ("dt", "dx", "L")
    raw = np.stack([DT * fs, DX, np.full(N_TRAJ, 6.0)], 1)   # dt is the model's step: frame_step intervals
    m, s = raw[:4].mean(0), raw[:4].std(0)
    s[2] = 1.0                                                # a constant is only centred
    assert L.attrs["scalar_mean"] == pytest.approx(m.tolist(), rel=1e-12)
    assert L.attrs["scalar_std"] == pytest.approx(s.tolist(), rel=1e-12)
    assert L.attrs["scalar_names"] == "dt,dx,L"
    for split, trajs in (("train", range(4)), ("val", [4])):
        ds = a.dataset(split)
        per = len(ds) // len(trajs)
        for j, i in enumerate(trajs):
            for k in (j * per, j * per + per - 1):
                np.testing.assert_allclose(ds[k]["scalars"].numpy(), (raw[i] - m) / s, rtol=1e-5, atol=1e-6)
    # the validation trajectory lies outside the training range of dt: > 1 standard deviation out
    assert float(a.dataset("val")[0]["scalars"][0]) > 1.0
    with pytest.raises(PDEDataError, match=r"'nu'.*available: .*dt.*dx"):
        TrajectoryAdapter(str(synth), scalars=["nu"])


def test_two_dimensional_fields_with_two_variables(tmp_path):
    n, T, nx, ny = 3, 6, 4, 5
    rng = np.random.default_rng(1)
    uu = rng.normal(size=(n, T, nx, ny)) * 3 + 1
    vv = rng.normal(size=(n, T, nx, ny)) * 0.5 - 2
    xr.Dataset({"u": (("trajectory", "time", "x", "y"), uu), "v": (("trajectory", "time", "x", "y"), vv),
                "dt": ("trajectory", np.full(n, 0.5))},
               coords={"x": np.arange(nx) / nx, "y": np.arange(ny) / ny}).to_netcdf(tmp_path / "k.nc")
    a = TrajectoryAdapter(str(tmp_path / "k.nc"), variables=["u", "v"], history=2, horizon=1, val_fraction=0.34)
    L = a.layout
    assert L.spatial == ("x", "y") and L.periodic == ("x", "y") and L.shape == (nx, ny)
    assert L.channels == ("u", "v") and L.cond_channels == ("u@t-1", "v@t-1", "u@t", "v@t")
    tr = np.stack([uu[:2], vv[:2]])
    assert L.autoregressive.state_mean == pytest.approx([tr[0].mean(), tr[1].mean()], rel=1e-6)
    assert L.autoregressive.state_std == pytest.approx([tr[0].std(), tr[1].std()], rel=1e-6)
    ds = a.dataset("train")
    assert len(ds) == 2 * (T - 2)
    it = ds[0]
    assert it["fields"].shape == (4, nx, ny) and it["x"].shape == (2, nx, ny)
    got = phys_items(ds, L, 2)
    for k, (f, x) in enumerate(got):
        i, s = divmod(k, T - 2)
        np.testing.assert_allclose(f.numpy(), np.stack([uu[i, s:s + 2], vv[i, s:s + 2]], 1), atol=1e-5)
        np.testing.assert_allclose(x.numpy(), np.stack([uu[i, s + 2:s + 3], vv[i, s + 2:s + 3]], 1), atol=1e-5)
    with pytest.raises(PDEDataError, match=r"w not in .*trajectory variables are u, v"):
        TrajectoryAdapter(str(tmp_path / "k.nc"), variables=["u", "w"])


def _all_items(a):
    return [a.dataset(sp)[k] for sp in ("train", "val") for k in range(len(a.dataset(sp)))]


def _same_items(a, b):
    ia, ib = _all_items(a), _all_items(b)
    assert len(ia) == len(ib) > 0
    for x, y in zip(ia, ib):
        assert x.keys() == y.keys()
        for key in x:
            torch.testing.assert_close(x[key], y[key], rtol=0, atol=0)
    assert a.layout.autoregressive == b.layout.autoregressive
    torch.testing.assert_close(a.layout.mean, b.layout.mean, rtol=0, atol=0)
    torch.testing.assert_close(a.layout.std, b.layout.std, rtol=0, atol=0)


OPTS = dict(history=2, horizon=2, frame_step=2, stride=2, target="residual", scalars=["dt", "dx"], val_fraction=0.2)


def test_lazy_reading_gives_the_same_items(synth):
    _same_items(TrajectoryAdapter(str(synth), **OPTS), TrajectoryAdapter(str(synth), lazy=True, **OPTS))


def test_pdebench_file_gives_the_same_items_as_netcdf(tmp_path):
    u = known_u()
    x, t = np.arange(NX) * 0.5, np.arange(N_TIME) * 0.1
    P.write_pdebench(tmp_path / "pb.hdf5", {"u": u}, x=x, t=t)
    xr.Dataset({"u": (("trajectory", "time", "x"), u), "dt": ("trajectory", np.full(N_TRAJ, 0.1)),
                "dx": ("trajectory", np.full(N_TRAJ, 0.5))},
               coords={"x": x, "time": t}).to_netcdf(tmp_path / "pb.nc")
    ref = TrajectoryAdapter(str(tmp_path / "pb.nc"), **OPTS)
    for lazy in (False, True):
        pb = TrajectoryAdapter(str(tmp_path / "pb.hdf5"), lazy=lazy, **OPTS)
        _same_items(ref, pb)
        assert pb.layout.coords["x"] == pytest.approx(tuple(x)) and pb.layout.autoregressive.step == pytest.approx(0.1 * OPTS["frame_step"])


# ============================================================================= 2. clear errors
def test_nan_in_the_data_names_variable_trajectory_and_frame(tmp_path):
    u = known_u()
    u[2, 3, 5] = np.nan
    p = write_1d(tmp_path / "nan.nc", u)
    with pytest.raises(NonFiniteError, match=r"'u'.*trajectory 2, frame 3"):
        TrajectoryAdapter(str(p))


def test_nan_in_a_validation_trajectory_read_lazily_is_reported_when_read(tmp_path):
    u = known_u()
    u[4, 7, 0] = np.inf
    p = write_1d(tmp_path / "nan.nc", u)
    a = TrajectoryAdapter(str(p), lazy=True, val_fraction=0.2)     # the NaN is in the validation trajectory
    a.dataset("train")[0]
    with pytest.raises(NonFiniteError, match=r"trajectory 4 .*NaN or inf"):
        _all_items(a)


def test_nan_in_a_training_trajectory_read_lazily_names_the_trajectory(tmp_path):
    u = known_u()
    u[2, 3, 5] = np.nan
    p = write_1d(tmp_path / "nan.nc", u)
    with pytest.raises(NonFiniteError, match=r"trajectory 2"):
        a = TrajectoryAdapter(str(p), lazy=True)
        _all_items(a)


def test_too_few_frames_for_the_history_is_a_clear_error(synth):
    with pytest.raises(PDEDataError, match=r"12 frames.*15 .*history 7.*horizon 1.*2 output interval"):
        TrajectoryAdapter(str(synth), history=7, frame_step=2)
    with pytest.raises(PDEDataError, match=r"variable\(s\) w not in .*trajectory variables are u"):
        TrajectoryAdapter(str(synth), variables=["w"])
    with pytest.raises(PDEDataError, match="history must be an integer >= 1"):
        TrajectoryAdapter(str(synth), history=0)
    with pytest.raises(PDEDataError, match="target must be one of state, residual"):
        TrajectoryAdapter(str(synth), target="delta")
    with pytest.raises(FileNotFoundError, match="diffkit data pde"):
        TrajectoryAdapter(str(synth.with_name("missing.nc")))


def test_unknown_pde_name(capsys):
    with pytest.raises(UnknownComponentError, match=r"'foo'.*ks, burgers, kolmogorov"):
        P.simulator("foo")
    assert P.simulator("ks") is P.simulate_ks
    with pytest.raises(SystemExit) as e:
        main(["data", "pde", "foo", "--out", "x.nc"])
    assert e.value.code == 2
    assert "invalid choice: 'foo'" in capsys.readouterr().err


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


# ============================================================================= 3. oracle rollouts
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


# ============================================================================= 4. trained models
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


# ============================================================================= 5. the commands
@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = root / "f.nc"
    rc = main(["data", "pde", "burgers", "--trajectories", "3", "--steps", "12", "--set", "nx=32",
               "--set", "resolution_tol=None", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    return out


def test_data_pde_writes_cf_netcdf_with_the_parameters(cli_data):
    with xr.open_dataset(cli_data) as ds:
        ds.load()
    assert dict(ds.sizes) == {"trajectory": 3, "time": 12, "x": 32}
    assert ds["u"].dims == ("trajectory", "time", "x")
    assert ds.attrs["Conventions"].startswith("CF-")
    assert int(ds.attrs["nx"]) == 32 and int(ds.attrs["n_traj"]) == 3 and int(ds.attrs["n_steps"]) == 12
    assert float(ds.attrs["nu"]) == 0.01 and ds.attrs["kind"] == "burgers"
    assert bool(np.isfinite(ds["u"].values).all()) and float(ds["u"].std()) > 0
    np.testing.assert_allclose(ds["dt"].values, 0.05)


def test_data_pde_command_attribute_reproduces_the_file(cli_data):
    with xr.open_dataset(cli_data) as ds:
        assert "--steps 12" in ds.attrs["command"]


def test_data_pde_bad_option_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    rc = main(["data", "pde", "burgers", "--set", "bogus=1", "--out", str(tmp_path / "x.nc"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("diffkit data pde: error:") and "'bogus'" in err
    assert "valid options: nx, " in err and "nu" in err
    assert not (tmp_path / "x.nc").exists()
    assert main(["data", "pde", "burgers", "--set", "help=1", "--out", str(tmp_path / "x.nc")]) == 0
    assert "nx = 128" in capsys.readouterr().out


def test_data_pde_set_seed_is_honoured_or_rejected_clearly(tmp_path, capsys):
    out = tmp_path / "s.nc"
    rc = main(["data", "pde", "burgers", "--trajectories", "1", "--steps", "2", "--set", "nx=16",
               "--set", "resolution_tol=None", "--set", "seed=3", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    if rc == 0:
        with xr.open_dataset(out) as ds:
            assert int(ds.attrs["seed"]) == 3
    else:
        assert rc == 1 and "--seed" in err


TOML = """\
run_dir = "{run}"
[data]
adapter = "pde"
batch_size = 8
val_fraction = 0.34
[data.options]
path = "{data}"
history = 1
[model]
backbone = "unet"
[model.options]
channels = 8
channel_mult = [1, 2]
num_res_blocks = 1
attn_levels = []
mid_attn = false
[trainer]
steps = 10
warmup = 1
val_every = 0
ckpt_every = 0
[sample]
nfe = 3
"""


def test_train_then_rollout_from_the_command_line(cli_data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(TOML.format(run=run.as_posix(), data=cli_data.as_posix()))
    assert main(["train", str(cfg), "--no-progress", "--device", "cpu"]) == 0
    assert "finished at step 10" in capsys.readouterr().out
    out, png = tmp_path / "r.nc", tmp_path / "r.png"
    args = ["rollout", str(run), "--init", str(cli_data), "--index", "2", "--members", "3", "--steps", "5",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main([*args, "--plot", str(png)]) == 0
    stdout = capsys.readouterr().out
    assert "wrote 3 member(s) x 5 frame(s)" in stdout and "high-correlation time" in stdout
    with xr.open_dataset(out) as ds:
        ds.load()
    assert f"u: verdict: {ds.attrs['calibration_u']}" in stdout.splitlines()       # issue 14 item 3
    assert ds["u"].dims == ("member", "time", "x") and ds["u"].shape == (3, 5, 32)
    assert {"u", "u_truth", "correlation", "ensemble_mean_correlation", "nrmse", "spread"} <= set(ds.data_vars)
    assert ds["correlation"].dims == ("member", "time")
    with xr.open_dataset(cli_data) as f:
        np.testing.assert_array_equal(ds["u_truth"].values, f["u"].values[2, 1:6].astype(np.float32))
        np.testing.assert_allclose(ds["time"].values, f["time"].values[1:6])
    assert ds.attrs["init_index"] == 2 and ds.attrs["seed"] == 0 and ds.attrs["objective"] == "diffusion"
    corr = ds["correlation"].values
    assert np.isfinite(corr).all() and (np.abs(corr) <= 1).all()
    for p in (png, tmp_path / "r-correlation.png"):
        assert p.read_bytes()[:8] == PNG_SIGNATURE and p.stat().st_size > 1000
    # the same seed writes the same ensemble; --index out of range is one line
    again = tmp_path / "again.nc"
    assert main([*args[:-5], "--out", str(again), "--no-progress", "--device", "cpu"]) == 0
    with xr.open_dataset(again) as ds2:
        np.testing.assert_array_equal(ds2["u"].values, ds["u"].values)
    capsys.readouterr()
    bad = ["rollout", str(run), "--init", str(cli_data), "--index", "3", "--out", str(tmp_path / "b.nc"),
           "--no-progress", "--device", "cpu"]
    assert main(bad) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkit rollout: error: --index 3 is out of range")
    assert "3 trajectories" in err and not (tmp_path / "b.nc").exists()


def test_rollout_rejects_a_checkpoint_not_trained_on_pde_data(cli_data, tmp_path, capsys):
    from diffkit.train import Trainer

    state = capture_rng_state(cuda=False)
    try:
        cfg = config_from_dict({"run_dir": str(tmp_path / "mix"), "data": {"options": {"n": 64}, "batch_size": 16},
                                "model": {"options": {"hidden": 8, "depth": 1}},
                                "trainer": {"steps": 1, "val_every": 0, "ckpt_every": 0}})
        Trainer(cfg, device="cpu", progress=False).fit()
    finally:
        restore_rng_state(state)
    with pytest.raises(PDEDataError, match="not trained on PDE trajectories"):
        P.load_surrogate(tmp_path / "mix")
    rc = main(["rollout", str(tmp_path / "mix"), "--init", str(cli_data), "--out", str(tmp_path / "r.nc"),
               "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert 'not trained on PDE trajectories' in err and 'data.adapter = "pde"' in err


def test_plugins_lists_the_commands_and_rollout_has_help(capsys):
    assert main(["plugins", "--kind", "command"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:]]
    names = {" ".join(r[1:3]) if r[1] == "data" else r[1] for r in rows}
    assert {"data pde", "rollout"} <= names
    with pytest.raises(SystemExit) as e:
        main(["rollout", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--init" in out and "--members" in out and "--plot" in out
