"""The two-layer quasi-geostrophic simulator (``diffkit_weather.qg``): the growth and drift of
baroclinically unstable normal modes in the full nonlinear model, batching/seeding/spin-up,
perturbed ensembles, float32, the stability checks, the light import and the observing
``diffkit data weather qg --observe``.  The model's operators, linear theory, energy budget, CF
output, coarse-graining and oracle are tested in test_weather_qg_<module>.py, one file per module.
Small grids (nx = 32) and short runs: a few seconds on one CPU thread.
"""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from _qg_fixtures import DAY, L, Q, QC, QE, QL, QN
from diffkit.errors import DiffkitError, NonFiniteError


def test_normal_mode_growth_and_drift_in_the_nonlinear_model():
    """Tiny fastest-growing normal modes at four wavenumbers, evolved by the full model (Jacobian,
    drag and filter on) for 60 days: each mode's amplitude grows at ``Re lam`` and its phase turns at
    ``Im lam`` of :func:`linear_modes` with the same drag and filter.  (10, 4) lies inside the
    filter range (K dx = 2.12 > 0.65 pi), so its rate checks the filter too."""
    nx = 32
    modes = [(7, 0), (5, 3), (10, 4), (3, -2)]
    q0 = QL.normal_mode_pv(nx, modes, 1e-2, phase=[0.0, 1.0, 2.0, 3.0])
    r = Q.simulate_qg(1, 31, q0=q0[None], out_every=2 * DAY)
    ph = torch.fft.rfft2(r["psi"][0, :, 0], norm="forward")         # upper layer
    t = r["t"].numpy()
    errs = []
    for i, j in modes:
        c = ph[:, j % nx, i].numpy()
        growth = np.polyfit(t, np.log(np.abs(c)), 1)[0]
        omega = np.polyfit(t, np.unwrap(np.angle(c)), 1)[0]
        lam = QL.linear_modes(2 * np.pi * i / L, 2 * np.pi * j / L, nx=nx)["eigenvalues"][0]
        errs.append((abs(growth / lam.real - 1), abs(omega / lam.imag - 1)))
        # the layer structure is the analytic one
        c2 = torch.fft.rfft2(r["psi"][0, -1, 1], norm="forward")[j % nx, i].item()
        ratio = QL.linear_modes(2 * np.pi * i / L, 2 * np.pi * j / L, nx=nx)["psi"][1]
        assert abs(c2 / c[-1] - ratio) < 1e-6 * abs(ratio)
    # measured: relative errors <= 4e-9 (growth) and 2e-9 (frequency); the (7, 0) mode grows by
    # exp(0.40) over the run, (10, 4) decays by exp(-0.30) (filter), so the fits are well posed
    assert max(max(e) for e in errs) < 1e-5, errs


def test_batched_members_seeding_output_interval_and_spin_up():
    kw = dict(nx=32, spin_up_years=2 / 365, ic_amplitude=1e-5)
    r3 = Q.simulate_qg(3, 5, seed=11, **kw)
    assert r3["q"].shape == r3["psi"].shape == r3["u"].shape == r3["v"].shape == (3, 5, 2, 32, 32)
    assert torch.equal(r3["q"], Q.simulate_qg(3, 5, seed=11, **kw)["q"])          # same seed
    assert not torch.allclose(Q.simulate_qg(3, 5, seed=12, **kw)["q"], r3["q"])
    scale = float(r3["q"].abs().max())
    r5 = Q.simulate_qg(5, 5, seed=11, **kw)                                         # prefix property
    torch.testing.assert_close(r5["q"][:3], r3["q"], atol=1e-12 * scale, rtol=0)
    for i in range(3):                                                              # batched = single
        one = Q.simulate_qg(1, 5, q0=r3["q0"][i:i + 1], **kw)
        torch.testing.assert_close(one["q"][0], r3["q"][i], atol=1e-12 * scale, rtol=0)
    # output every 6 h, t counts from the end of the 2-day spin-up, which is discarded
    torch.testing.assert_close(r3["t"], torch.arange(5, dtype=torch.float64) * 21600.0)
    assert r3["params"]["spin_up"] == 2 * DAY and r3["params"]["spin_up_steps"] == 8
    assert r3["params"]["n_sub"] == 3 and r3["dt_sim"] == 7200.0
    full = Q.simulate_qg(3, 13, seed=11, nx=32, spin_up_years=0, ic_amplitude=1e-5)
    torch.testing.assert_close(full["q"][:, 8:], r3["q"], atol=1e-12 * scale, rtol=0)
    torch.testing.assert_close(full["q"][:, 0], r3["q0"], atol=0, rtol=0)
    assert float(r3["q0"].pow(2).mean().sqrt()) == pytest.approx(1e-5, rel=1e-9)


def test_perturb_members():
    base = Q.simulate_qg(1, 1, nx=32, spin_up_years=0, ic_amplitude=1e-5, seed=3)["q"][0, 0]
    ens = Q.perturb_members(base, 4, amplitude=0.05, seed=7)
    assert ens.shape == (4, 2, 32, 32) and ens.dtype == base.dtype
    dq = ens - base
    rms = dq.pow(2).mean((-2, -1)).sqrt() / base.pow(2).mean((-2, -1)).sqrt()
    torch.testing.assert_close(rms, torch.full((4, 2), 0.05, dtype=torch.float64))
    assert float(dq.mean((-2, -1)).abs().max()) < 1e-20                       # zero mean
    torch.testing.assert_close(Q.perturb_members(base[None], 2, amplitude=0.05, seed=7), ens[:2])
    assert not torch.allclose(Q.perturb_members(base, 2, amplitude=0.05, seed=8), ens[:2])
    absolute = Q.perturb_members(base, 1, amplitude=1e-7, relative=False) - base
    torch.testing.assert_close(absolute.pow(2).mean((-2, -1)).sqrt(), torch.full((1, 2), 1e-7, dtype=torch.float64))
    r = Q.simulate_qg(4, 3, q0=ens)                                            # an ensemble run
    assert r["params"]["spin_up"] == 0 and torch.allclose(r["q"][:, 0], ens, atol=1e-20)


def test_float32():
    kw = dict(nx=32, spin_up_years=0, ic_amplitude=1e-5, seed=2)
    r32 = Q.simulate_qg(1, 5, dtype=torch.float32, **kw)
    r64 = Q.simulate_qg(1, 5, **kw)
    assert r32["q"].dtype == torch.float32 and r32["x"].dtype == torch.float32
    assert float((r32["q"].double() - r64["q"]).abs().max()) < 1e-5 * float(r64["q"].abs().max())


def test_cfl_violation_names_the_fix():
    kw = dict(nx=32, spin_up_years=0, ic_amplitude=1e-7)
    with pytest.raises(Q.StabilityError, match="reduce dt to <=") as ei:
        Q.simulate_qg(1, 3, dt=2e6, out_every=2e6, **kw)          # U1 alone: CFL = 1.6
    assert isinstance(ei.value, DiffkitError) and isinstance(ei.value, ValueError)
    msg = str(ei.value)
    assert "CFL number" in msg and "initial condition" in msg
    dt_ok = float(msg.split("reduce dt to <= ")[1].split(" ")[0])
    assert 5e5 < dt_ok < 1.2e6        # 0.96 dx / (U1 + eddy speed)
    Q.simulate_qg(1, 3, dt=dt_ok, out_every=dt_ok, **kw)           # following the advice works
    with pytest.raises(Q.StabilityError, match=r"exceeds 0\.001 \(cfl_max\)"):
        Q.simulate_qg(1, 3, cfl_max=0.001, **kw)         # observed 0.007


def test_nonfinite_state_raises_with_step():
    q0 = torch.zeros(1, 2, 32, 32, dtype=torch.float64)
    q0[0, 1, 3, 4] = float("nan")
    with pytest.raises(Q.NonFiniteStateError, match="initial condition") as ei:
        Q.simulate_qg(1, 3, q0=q0)
    assert isinstance(ei.value, NonFiniteError) and isinstance(ei.value, Q.StabilityError)
    # an unstable step with the check switched off blows up; the error names the output step
    with pytest.raises(Q.NonFiniteStateError, match=r"at output step \d+ \(recording\)"):
        Q.simulate_qg(1, 200, nx=32, dt=4e5, out_every=4e5, spin_up_years=0, cfl_max=float("inf"),
                      ic_amplitude=1e-5)


def test_argument_errors():
    with pytest.raises(ValueError, match="q0 must have shape"):
        Q.simulate_qg(2, 1, q0=torch.zeros(1, 2, 32, 32))
    with pytest.raises(ValueError, match="nx = 64"):
        Q.simulate_qg(1, 1, q0=torch.zeros(1, 2, 32, 32), nx=64)
    with pytest.raises(ValueError, match="fields"):
        Q.simulate_qg(1, 1, nx=32, spin_up_years=0, fields=("omega",))


def test_import_is_light_and_progress_bar_runs():
    # the plugin package's __init__ imports xarray; the simulator modules themselves must not: load
    # them under a bare package object that does not run __init__
    pkg_dir = Path(Q.__file__).parent
    code = ("import importlib.util, sys, types; p = types.ModuleType('diffkit_weather'); "
            "p.__path__ = [%r]; sys.modules['diffkit_weather'] = p; "
            "import diffkit_weather.qg, diffkit_weather.qg_coarse, diffkit_weather.qg_oracle; "
            "print('xarray' in sys.modules)" % str(pkg_dir))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    Q.simulate_qg(1, 3, nx=32, spin_up_years=0, progress=True)


def test_data_weather_observe_option(tmp_path, capsys):
    """``diffkit data weather qg --nx 32 --observe 16``: the file holds the coarse-grained state of
    the 32^2 run (equal to coarse_grain of the same run without --observe), on a 16^2 grid, and
    says so; perturbed copies start from the fine state; a bad --observe is a one-line error."""
    import xarray as xr

    from diffkit.cli import main

    base = ["data", "weather", "qg", "--years", "0.01", "--spin-up-years", "0.01", "--nx", "32", "--seed", "2",
            "--no-progress"]
    assert main(base + ["--out", str(tmp_path / "full.nc")]) == 0, capsys.readouterr().err
    assert main(base + ["--observe", "16", "--members-of-init", "2", "--out", str(tmp_path / "obs.nc")]) == 0, \
        capsys.readouterr().err
    assert "(member=3, time=15, level=2, latitude=16, longitude=16)" in capsys.readouterr().out
    with xr.open_dataset(tmp_path / "full.nc") as full, xr.open_dataset(tmp_path / "obs.nc") as obs:
        assert obs.attrs["nx"] == 16 and obs.attrs["nx_sim"] == 32 and "--observe 16" in obs.attrs["command"]
        assert "|kx|, |ky| < 8" in obs.attrs["observation"]
        for name in ("streamfunction", "potential_vorticity", "eastward_wind"):
            ref = QC.coarse_grain(torch.from_numpy(full[name].values), 16).numpy()
            np.testing.assert_allclose(obs[name].isel(member=0).values, ref, rtol=0,
                                       atol=1e-12 * np.abs(ref).max())
        np.testing.assert_allclose(obs["x"].values, (np.arange(16) + 0.5) * L / 16)
        q = obs["potential_vorticity"].values
        for c in (1, 2):                                     # the copies: near run 0 at frame 0, not equal
            d = np.abs(q[c, 0] - q[0, 0]).max() / np.abs(q[0, 0]).max()
            assert 1e-4 < d < 0.2, d
    for bad in ("15", "32", "2"):
        assert main(base + ["--observe", bad, "--out", str(tmp_path / "x.nc")]) == 1
        err = capsys.readouterr().err
        assert f"--observe must be an even number of grid points from 4 to below --nx (32), got {bad}" in err
        assert len(err.strip().splitlines()) == 1


def test_qg_module_keeps_the_api_of_the_modules_it_was_split_into():
    """Code written against ``diffkit_weather.qg`` (benchmarks, examples) keeps working: it re-exports
    the linear theory, the energy budget, the CF output and the defaults from their modules."""
    from diffkit_weather import qg_model as QM

    assert (Q.linear_modes, Q.linear_growth_rate, Q.normal_mode_pv) == \
        (QL.linear_modes, QL.linear_growth_rate, QL.normal_mode_pv)
    assert Q.energy_budget is QE.energy_budget and Q.DEFAULTS is QM.DEFAULTS
    assert (Q.to_dataset, Q.write_netcdf) == (QN.to_dataset, QN.write_netcdf)
    assert set(Q.__all__) <= set(vars(Q))
