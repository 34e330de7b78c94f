"""The PDE plugin's ``pde`` adapter (:mod:`diffkit_pde.adapter`): its training windows and their
normalisation, lazy and PDEBench reading, old checkpoint layouts, and clear errors for bad data.
Tiny sizes throughout.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr
from _pde_fixtures import DT, DX, N_TIME, N_TRAJ, NX, P, known_u, write_1d

from diffkit.errors import NonFiniteError
from diffkit_pde.adapter import PDEDataError, TrajectoryAdapter, spec_from_layout


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
