"""Rollout metrics and figures of the PDE plugin (``diffkit_pde.metrics``, ``diffkit_pde.plots``):
exact identities (correlation of a field with itself, affine invariance, phase-shifted sines,
Parseval, single modes), hand-built correlation curves for the high-correlation time, statistical
checks of the ensemble spread and the spread-skill ratio with fixed seeds, shape errors, and
PNG output without pyplot.  Small sizes: the file runs in a few seconds on one CPU thread.
"""
from __future__ import annotations

import ast
import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import diffkit_pde as P  # noqa: F401
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import diffkit_pde as P  # noqa: F401

from diffkit.errors import ShapeError
from diffkit_pde import metrics as M
from diffkit_pde import plots

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _field(shape, seed=0):
    return torch.randn(shape, generator=_gen(seed), dtype=torch.float64)


SHAPES = {1: (3, 5, 2, 32), 2: (3, 5, 2, 12, 10)}  # (N, K, C, *spatial)


# ----------------------------------------------------------------------------- Pearson correlation
@pytest.mark.parametrize("ns", [1, 2])
def test_pearson_self_negative_and_affine_invariance(ns):
    u = _field(SHAPES[ns])
    assert M.pearson_per_step(u, u, ns).shape == SHAPES[ns][:2]
    torch.testing.assert_close(M.pearson_per_step(u, u, ns), torch.ones(SHAPES[ns][:2], dtype=torch.float64))
    torch.testing.assert_close(M.pearson_per_step(-u, u, ns), -torch.ones(SHAPES[ns][:2], dtype=torch.float64))
    v = u + 0.7 * _field(SHAPES[ns], seed=1)
    r = M.pearson_per_step(v, u, ns)
    assert bool(((r > -1) & (r < 1)).all())
    torch.testing.assert_close(M.pearson_per_step(3.5 * v - 2.0, 0.25 * u + 7.0, ns), r)
    # symmetric, and equal to numpy's corrcoef on the flattened (C, *spatial) field
    torch.testing.assert_close(M.pearson_per_step(u, v, ns), r)
    a, b = v[1, 2].reshape(-1).numpy(), u[1, 2].reshape(-1).numpy()
    assert float(r[1, 2]) == pytest.approx(np.corrcoef(a, b)[0, 1], abs=1e-12)


def test_pearson_phase_shifted_sines_1d_and_2d():
    nx = 64
    x = torch.arange(nx, dtype=torch.float64) * 2 * math.pi / nx
    phis = torch.tensor([0.0, 0.4, 1.3, math.pi / 2, 2.5, math.pi], dtype=torch.float64)
    pred = torch.sin(3 * x + phis[:, None])[:, None, :]  # (K, C=1, nx)
    truth = torch.sin(3 * x).expand(len(phis), 1, nx)
    torch.testing.assert_close(M.pearson_per_step(pred, truth, 1), torch.cos(phis), atol=1e-12, rtol=0)
    # 2-D: sin(2x + 3y + phi) against sin(2x + 3y)
    y = x[:32] * 2
    X, Y = torch.meshgrid(x, y[: 32], indexing="ij")
    pred2 = torch.sin(2 * X + 3 * Y + phis[:, None, None])[:, None]
    truth2 = torch.sin(2 * X + 3 * Y)[None, None]
    torch.testing.assert_close(M.pearson_per_step(pred2, truth2, 2), torch.cos(phis), atol=1e-12, rtol=0)


def test_pearson_constant_and_nonfinite_fields_give_nan():
    u = _field((4, 1, 16))
    c = u.clone()
    c[1] = 0.1  # constant pred at step 1 (the mean is not exactly 0.1 in floating point)
    c[2, 0, 3] = float("nan")
    c[3, 0, 5] = float("inf")
    r = M.pearson_per_step(c, u, 1)
    assert float(r[0]) == pytest.approx(1.0)
    assert torch.isnan(r[1:]).all()
    assert torch.isnan(M.pearson_per_step(u, torch.zeros_like(u), 1)).all()


def test_dtype_and_broadcasting_of_leading_dims():
    truth = _field((5, 2, 16)).float()  # (K, C, nx)
    ens = truth + 0.1 * _field((3, 4, 5, 2, 16), seed=3).float()  # (N, M, K, C, nx)
    for f in (M.pearson_per_step, M.rmse, M.nrmse):
        out = f(ens, truth, 1)
        assert out.shape == (3, 4, 5) and out.dtype == torch.float32
        assert f(ens.double(), truth, 1).dtype == torch.float64
    # numpy inputs are accepted
    assert M.rmse(ens.numpy(), truth.numpy(), 1).shape == (3, 4, 5)
    # a (N, 1, K, C, nx) truth broadcasts over members
    t_n = truth.expand(3, 1, 5, 2, 16)
    torch.testing.assert_close(M.rmse(ens, t_n, 1), M.rmse(ens, truth, 1))


# ----------------------------------------------------------------------------- high-correlation time
def test_high_correlation_time_on_hand_built_curves():
    corr = torch.tensor([
        [0.5, 0.99, 0.99, 0.99],    # drops at step 1 -> 0
        [0.99, 0.95, 0.7, 0.9],     # drops at step 3 -> 2 dt (recovery afterwards ignored)
        [0.99, 0.95, 0.9, 0.85],    # never drops -> K dt, censored
        [0.99, float("nan"), 0.9, 0.9],  # NaN counts as a drop at step 2 -> dt
        [0.9, 0.8, 0.79, 0.9],      # exactly at the threshold is not a drop -> 2 dt
    ])
    t = M.high_correlation_time(corr, dt=0.5, threshold=0.8)
    torch.testing.assert_close(t, torch.tensor([0.0, 1.0, 2.0, 0.5, 1.0]))
    assert M.never_dropped(corr, 0.8).tolist() == [False, False, True, False, False]
    # leading dims and default dt
    c3 = corr.reshape(5, 1, 4).expand(5, 2, 4)
    assert M.high_correlation_time(c3).shape == (5, 2)
    torch.testing.assert_close(M.high_correlation_time(c3)[:, 1], torch.tensor([0.0, 2.0, 4.0, 1.0, 2.0]))
    # from real correlations: a rollout equal to the truth for 3 steps, then unrelated
    truth = _field((6, 1, 32))
    pred = truth.clone()
    pred[3:] = _field((3, 1, 32), seed=5)
    r = M.pearson_per_step(pred, truth, 1)
    assert float(M.high_correlation_time(r, dt=0.2)) == pytest.approx(0.6)


@pytest.mark.parametrize("kw", [dict(threshold=1.0), dict(threshold=-1.0), dict(threshold=float("nan")),
                                dict(dt=0.0), dict(dt=-1.0)])
def test_high_correlation_time_rejects_bad_arguments(kw):
    with pytest.raises(ValueError):
        M.high_correlation_time(torch.ones(3, 4), **kw)


# ----------------------------------------------------------------------------- errors
@pytest.mark.parametrize("ns", [1, 2])
def test_nrmse_and_rmse(ns):
    u = _field(SHAPES[ns])
    for eps in (1e-3, 0.25):
        torch.testing.assert_close(M.nrmse(u * (1 + eps), u, ns), torch.full(SHAPES[ns][:2], eps, dtype=torch.float64))
    torch.testing.assert_close(M.rmse(u + 0.3, u, ns), torch.full(SHAPES[ns][:2], 0.3, dtype=torch.float64))
    assert torch.all(M.rmse(u, u, ns) == 0) and torch.all(M.nrmse(u, u, ns) == 0)
    # nrmse = rmse / rms(truth)
    v = _field(SHAPES[ns], seed=2)
    dims = tuple(range(-(1 + ns), 0))
    torch.testing.assert_close(M.nrmse(v, u, ns), M.rmse(v, u, ns) / u.square().mean(dims).sqrt())


# ----------------------------------------------------------------------------- spectra
@pytest.mark.parametrize("nx", [32, 33])
def test_energy_spectrum_1d_parseval_and_single_mode(nx):
    u = 0.3 + _field((4, 3, nx))
    k, E = M.energy_spectrum(u, 1)
    assert E.shape == (4, 3, nx // 2 + 1)
    torch.testing.assert_close(k, torch.arange(nx // 2 + 1, dtype=torch.float64))
    torch.testing.assert_close(E.sum(-1), u.square().mean(-1))
    torch.testing.assert_close(E[..., 0], u.mean(-1).square())
    L, A = 22.0, 1.7
    x = torch.arange(nx, dtype=torch.float64) * L / nx
    for m in (1, 5, nx // 2 - 1):
        k, E = M.energy_spectrum(A * torch.sin(2 * math.pi * m * x / L + 0.4), 1, lengths=L)
        want = torch.zeros(nx // 2 + 1, dtype=torch.float64)
        want[m] = A ** 2 / 2
        torch.testing.assert_close(E, want, atol=1e-12, rtol=0)
        assert float(k[m]) == pytest.approx(2 * math.pi * m / L)
    if nx % 2 == 0:  # the Nyquist mode cos(pi j) has mean square 1 and sits in the last bin
        E = M.energy_spectrum(torch.cos(math.pi * torch.arange(nx, dtype=torch.float64)), 1)[1]
        assert float(E[-1]) == pytest.approx(1.0) and float(E[:-1].abs().max()) < 1e-12


def test_energy_spectrum_1d_per_sample_lengths():
    L = torch.tensor([[60.0], [64.0], [70.0]])  # (N, 1) against u (N, K, nx)
    k, E = M.energy_spectrum(_field((3, 2, 16)), 1, lengths=L)
    assert k.shape == (3, 1, 9) and E.shape == (3, 2, 9)
    torch.testing.assert_close(k[1, 0, 2], torch.tensor(2 * 2 * math.pi / 64.0, dtype=torch.float64))


@pytest.mark.parametrize("shape", [(16, 16), (12, 20), (15, 16)])
def test_energy_spectrum_2d_parseval_and_single_mode(shape):
    nx, ny = shape
    u = 0.2 + _field((2, 3, nx, ny))
    k, E = M.energy_spectrum(u, 2)
    # all modes are binned: shells run past n//2 up to the corners
    assert E.shape[-1] == round(math.hypot(nx // 2, ny // 2)) + 1
    torch.testing.assert_close(E.sum(-1), u.square().mean((-2, -1)))
    torch.testing.assert_close(E[..., 0], u.mean((-2, -1)).square())
    X, Y = torch.meshgrid(torch.arange(nx, dtype=torch.float64) * 2 * math.pi / nx,
                          torch.arange(ny, dtype=torch.float64) * 2 * math.pi / ny, indexing="ij")
    A = 0.9
    for (mx, my), shell in (((3, 0), 3), ((0, 2), 2), ((3, 4), 5), ((-3, 4), 5)):
        k, E = M.energy_spectrum(A * torch.sin(mx * X + my * Y + 1.1), 2)
        assert float(E[shell]) == pytest.approx(A ** 2 / 2)
        assert float(E.sum() - E[shell]) == pytest.approx(0.0, abs=1e-12)
        assert float(k[shell]) == shell
    k, _ = M.energy_spectrum(u, 2, lengths=(2 * math.pi, 4 * math.pi))
    torch.testing.assert_close(k[:3], torch.tensor([0.0, 0.5, 1.0], dtype=torch.float64))


# ----------------------------------------------------------------------------- ensembles
@pytest.mark.parametrize("ns", [1, 2])
def test_ensemble_spread_identical_and_gaussian_members(ns):
    N, Mm, K = 3, 4, 2
    spatial = (64,) if ns == 1 else (16, 16)
    member = _field((N, 1, K, 2, *spatial))
    same = member.expand(N, Mm, K, 2, *spatial)
    assert M.ensemble_spread(same, ns, member_dim=1).shape == (N, K)
    assert torch.all(M.ensemble_spread(same, ns, member_dim=1) == 0)
    s = 0.7
    ens = s * _field((N, 16, K, 2, *spatial), seed=11)  # 16 members, 2 x 64 or 2 x 256 points
    spread = M.ensemble_spread(ens, ns, member_dim=1)
    # spread^2 averages 2*64*15 (or more) chi^2 terms: relative sd of spread < 1.5 %
    torch.testing.assert_close(spread, torch.full((N, K), s, dtype=torch.float64), rtol=0.06, atol=0)
    # member_dim can be given negatively and be any leading dim
    torch.testing.assert_close(M.ensemble_spread(ens.movedim(1, 0), ns), spread)
    torch.testing.assert_close(M.ensemble_spread(ens, ns, member_dim=-(3 + ns)), spread)


@pytest.mark.parametrize("ns", [1, 2])
def test_spread_skill_ratio_of_a_reliable_ensemble_is_one(ns):
    N, Mm, K = 4, 5, 3
    spatial = (128,) if ns == 1 else (16, 16)
    g = _gen(7)
    mu = torch.randn(N, 1, K, 1, *spatial, generator=g, dtype=torch.float64)  # a per-trajectory signal
    draw = mu + 0.5 * torch.randn(N, Mm + 1, K, 1, *spatial, generator=g, dtype=torch.float64)
    ens, truth = draw[:, :Mm], draw[:, Mm]  # truth exchangeable with the members
    ratio = M.spread_skill_ratio(ens, truth, ns, member_dim=1)
    assert ratio.shape == (N, K)
    pooled = M.spread_skill_ratio(ens, truth, ns, member_dim=1, pool_dims=(0, 1))
    assert pooled.shape == () and float(pooled) == pytest.approx(1.0, abs=0.05)
    assert float(ratio.mean()) == pytest.approx(1.0, abs=0.08)
    # skill and spread are what the ratio combines; an under-dispersed ensemble scores < 1
    skill = M.ensemble_mean_skill(ens, truth, ns, member_dim=1)
    spread = M.ensemble_spread(ens, ns, member_dim=1)
    torch.testing.assert_close(ratio, math.sqrt((Mm + 1) / Mm) * spread / skill)
    narrow = mu + 0.1 * (ens - mu)
    assert float(M.spread_skill_ratio(narrow, truth, ns, member_dim=1, pool_dims=(0, 1))) < 0.3
    # a truth with a size-1 member dim is the same as one without
    torch.testing.assert_close(M.ensemble_mean_skill(ens, truth[:, None], ns, member_dim=1), skill)


def test_ensemble_needs_two_members_and_a_valid_member_dim():
    with pytest.raises(ShapeError, match="at least 2 members"):
        M.ensemble_spread(_field((1, 3, 1, 8)), 1)
    with pytest.raises(ShapeError, match="member_dim"):
        M.ensemble_spread(_field((2, 3, 1, 8)), 1, member_dim=1)  # that is K
    with pytest.raises(ShapeError, match=r"\(4, 3, 1, 8\)"):
        M.ensemble_mean_skill(_field((4, 3, 1, 8)), _field((2, 3, 1, 8)), 1)


# ----------------------------------------------------------------------------- shape errors
def test_shape_errors_name_both_shapes():
    pred, truth = _field((2, 5, 1, 16)), _field((3, 5, 1, 16))
    for f in (M.pearson_per_step, M.rmse, M.nrmse):
        with pytest.raises(ShapeError, match=r"\(2, 5, 1, 16\).*\(3, 5, 1, 16\)"):
            f(pred, truth, 1)
    with pytest.raises(ShapeError, match=r"\(5, 1, 16\).*\(5, 1, 17\)"):
        M.rmse(_field((5, 1, 16)), _field((5, 1, 17)), 1)
    with pytest.raises(ShapeError, match="unsqueeze"):  # a (K, nx) rollout without its channel dim
        M.rmse(_field((5, 16)), _field((5, 16)), 1)
    assert issubclass(ShapeError, ValueError)
    with pytest.raises(ValueError, match="n_spatial"):
        M.energy_spectrum(_field((4, 4, 4, 4)), 3)


def test_metrics_registry_dict():
    assert set(M.METRICS) == {"pde_pearson_per_step", "pde_high_correlation_time", "pde_nrmse", "pde_rmse",
                              "pde_energy_spectrum", "pde_ensemble_spread", "pde_spread_skill_ratio"}
    assert all(callable(f) and f.__doc__ for f in M.METRICS.values())


# ----------------------------------------------------------------------------- plots
def _png(path: Path) -> None:
    data = path.read_bytes()
    assert data[:8] == PNG_SIGNATURE and len(data) > 1000
    assert not [p for p in path.parent.iterdir() if p.name.endswith(".tmp")]  # no temporary left behind


def test_module_level_imports_are_light():
    """Neither module imports xarray or matplotlib when imported (matplotlib only inside the plot functions).

    Checked on the source (a fresh interpreter would cost seconds of torch import); that pyplot is
    never imported while plotting is checked in :func:`test_plots_write_pngs`."""
    for mod in (M, plots):
        tree = ast.parse(Path(mod.__file__).read_text())
        top = set()
        for node in tree.body:  # module level only, not inside functions
            if isinstance(node, ast.Import):
                top |= {a.name.split(".")[0] for a in node.names}
            elif isinstance(node, ast.ImportFrom) and node.level == 0:
                top.add(node.module.split(".")[0])
        assert not top & {"xarray", "matplotlib"}, (mod.__name__, top)


def test_plots_write_pngs(tmp_path, monkeypatch):
    """All four plots, with torch and numpy inputs, while any import of pyplot would fail."""
    import matplotlib

    monkeypatch.setitem(sys.modules, "matplotlib.pyplot", None)  # `import matplotlib.pyplot` now raises
    monkeypatch.delattr(matplotlib, "pyplot", raising=False)  # ... and so does `from matplotlib import pyplot`
    g = _gen(3)
    K, nx = 12, 32
    x = torch.arange(nx, dtype=torch.float64) * 2 * math.pi / nx
    truth = torch.sin(x - 0.1 * torch.arange(1, K + 1, dtype=torch.float64)[:, None])
    roll = {"DDPM member 0": truth + 0.1 * torch.randn(K, nx, generator=g, dtype=torch.float64),
            "MSE": (truth * 0.8).numpy()}
    roll["MSE"][-1, 3] = np.nan  # a diverged value is drawn blank
    written = [plots.plot_space_time(truth, roll, tmp_path / "st.png", dt=0.2, x=x, title="KS")]
    t2 = torch.randn(6, 1, 8, 10, generator=g)
    written.append(plots.plot_snapshots(t2, {"DDPM": t2 + 0.1}, tmp_path / "sub" / "snap.png", times_idx=[0, -1]))
    noisy = truth[:, None] + torch.stack([s * torch.randn(K, 1, nx, generator=g, dtype=torch.float64)
                                          for s in (0.1, 0.5, 2.0)])
    c = M.pearson_per_step(noisy, truth[:, None], 1)  # (3, K)
    written.append(plots.plot_correlation({"DDPM": c, "MSE": c[0].numpy()}, tmp_path / "corr.png", dt=0.2))
    written.append(plots.plot_spectra({"truth": M.energy_spectrum(truth, 1), "MSE": M.energy_spectrum(truth * 0.8, 1)},
                                      tmp_path / "spec.png"))
    assert written == [tmp_path / "st.png", tmp_path / "sub" / "snap.png", tmp_path / "corr.png", tmp_path / "spec.png"]
    for p in written:
        _png(p)


def test_plot_replaces_existing_file_atomically_and_checks_shapes(tmp_path):
    path = tmp_path / "st.png"
    path.write_bytes(b"old")
    truth = np.zeros((4, 8))
    assert plots.plot_space_time(truth, {"a": truth + 1}, path) == path
    _png(path)
    with pytest.raises(ShapeError, match=r"\(4, 9\)"):
        plots.plot_space_time(truth, {"a": np.zeros((4, 9))}, tmp_path / "bad.png")
    with pytest.raises(ShapeError, match="K, nx"):
        plots.plot_space_time(np.zeros((4, 8, 8)), {}, tmp_path / "bad.png")
    assert not (tmp_path / "bad.png").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["st.png"]


# ----------------------------------------------------------------------------- the diffkit_metrics hook in the rollout report
def test_rollout_dataset_reports_every_registered_ensemble_metric_per_step(tmp_path):
    """The rollout report computes the registered ensemble metrics (diffkit.ensemble) per step over
    (C, x): equal to the PDE wrappers where the file has truth, NaN past its end."""
    import xarray as xr

    from diffkit import ensemble as E
    from diffkit_pde.adapter import TrajectoryAdapter

    rng = np.random.default_rng(0)
    path = tmp_path / "traj.nc"
    xr.Dataset({"u": (("trajectory", "time", "x"), rng.normal(size=(3, 10, 16)))},
               coords={"x": np.arange(16) * 0.5, "time": np.arange(10) * 0.1}).to_netcdf(path)
    layout = TrajectoryAdapter(str(path)).layout
    ic = P.initial_condition(path, layout, index=1, start=2)
    Ka, K, Mb = ic.truth.shape[0], ic.truth.shape[0] + 2, 4
    pred = torch.randn(Mb, K, *ic.truth.shape[1:], generator=_gen(1))
    ds = P.rollout_dataset(pred, layout, ic)
    assert set(E.registered()) <= set(ds.data_vars)
    truth = ic.truth.double()
    p = pred[:, :Ka].double()
    np.testing.assert_allclose(ds["ensemble_spread_skill_ratio"].values[:Ka],
                               M.spread_skill_ratio(p, truth, 1, member_dim=0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ds["ensemble_mean_rmse"].values[:Ka],
                               M.ensemble_mean_skill(p, truth, 1, member_dim=0).numpy(), rtol=1e-12)
    np.testing.assert_allclose(ds["ensemble_spread"].values[:Ka], ds["spread"].values[:Ka], rtol=1e-6)
    np.testing.assert_allclose(ds["ensemble_crps"].values[:Ka],
                               E.crps(p, truth, dims=(1, 2)).numpy(), rtol=1e-12)
    for name in E.registered():
        assert ds[name].dims == ("time",) and np.isnan(ds[name].values[Ka:]).all(), name


def test_spread_skill_ratio_pooling_orders_match_the_one_convention():
    """Pooling over trajectories (and steps) follows diffkit.ensemble: by default the root per
    trajectory and step first, then the means; ``sqrt_first=False`` pools the squares."""
    g = _gen(12)
    ens = torch.randn(3, 4, 2, 1, 32, generator=g, dtype=torch.float64)  # (N, M, K, C, x)
    truth = torch.randn(3, 2, 1, 32, generator=g, dtype=torch.float64)
    s = M.ensemble_spread(ens, 1, member_dim=1)
    e = M.ensemble_mean_skill(ens, truth, 1, member_dim=1)
    f = math.sqrt(5 / 4)
    torch.testing.assert_close(M.spread_skill_ratio(ens, truth, 1, member_dim=1, pool_dims=0), f * s.mean(0) / e.mean(0))
    torch.testing.assert_close(M.spread_skill_ratio(ens, truth, 1, member_dim=1, pool_dims=(0, -1), sqrt_first=False),
                               f * s.square().mean().sqrt() / e.square().mean().sqrt())
    with pytest.raises(ShapeError, match="pool_dims"):
        M.spread_skill_ratio(ens, truth, 1, member_dim=1, pool_dims=2)
