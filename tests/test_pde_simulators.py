"""What the built-in PDE simulators (``diffkit_pde``: ks, burgers, kolmogorov) share -- their
conventions (``conventions.py``) and the 1-D engine (``periodic1d.py``): batched trajectories are
independent and seeded, dtypes follow the inputs, per-trajectory dt and L jitter is recorded, and
importing the plugin stays light.  An integration file over the simulators; each simulator's own
validation is in test_pde_burgers.py, test_pde_ks.py and test_pde_kolmogorov.py, the stability
checks in test_pde_stability.py, the netCDF output in test_pde_netcdf.py.
"""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import torch

from _pde_fixtures import P, coarse_ns


# ----------------------------------------------------------------------------- batching, seeding
@coarse_ns
def test_batched_trajectories_are_independent_and_seeded():
    r3 = P.simulate_ks(3, 6, nx=128, burn_in=2.0, dt_out=0.5, seed=11)
    r3b = P.simulate_ks(3, 6, nx=128, burn_in=2.0, dt_out=0.5, seed=11)
    assert torch.equal(r3["u"], r3b["u"])
    r5 = P.simulate_ks(5, 6, nx=128, burn_in=2.0, dt_out=0.5, seed=11)
    torch.testing.assert_close(r5["u"][:3], r3["u"], atol=1e-12, rtol=0)   # prefix property
    assert not torch.allclose(P.simulate_ks(3, 2, nx=128, burn_in=0, seed=12)["u"][:, 0], r3["u0"])
    for i in range(3):
        one = P.simulate_ks(1, 6, nx=128, burn_in=2.0, dt_out=0.5, u0=r3["u0"][i:i + 1], L=r3["L"][i:i + 1])
        torch.testing.assert_close(one["u"][0], r3["u"][i], atol=1e-12, rtol=0)

    b3 = P.simulate_burgers(3, 4, nx=64, seed=2)
    for i in range(3):
        one = P.simulate_burgers(1, 4, nx=64, u0=b3["u0"][i:i + 1], dt=float(b3["dt_sim"][0]))
        torch.testing.assert_close(one["u"][0], b3["u"][i], atol=1e-12, rtol=0)

    k3 = P.simulate_kolmogorov(3, 3, n_sim=32, n_out=16, burn_in=0.2, seed=4)
    for i in range(3):
        one = P.simulate_kolmogorov(1, 3, n_sim=32, n_out=16, burn_in=0.2, omega0=k3["omega0"][i:i + 1])
        torch.testing.assert_close(one["state"][0], k3["state"][i], atol=1e-12, rtol=0)


def test_float32_and_dtype_follow_inputs():
    r = P.simulate_ks(2, 3, nx=128, burn_in=1.0, dtype=torch.float32)
    assert r["u"].dtype == torch.float32 and r["L"].dtype == torch.float32
    r64 = P.simulate_ks(2, 3, nx=128, burn_in=1.0)
    assert float((r["u"].double() - r64["u"]).abs().max()) < 1e-3
    u0 = r64["u0"].float()
    r2 = P.simulate_ks(2, 2, nx=128, burn_in=0, u0=u0, L=r64["L"])
    assert r2["u"].dtype == torch.float32


def test_dt_and_L_jitter_recorded_per_trajectory():
    r = P.simulate_ks(3, 4, nx=64, L=22.0, L_jitter=0.1, dt_out=0.2, dt_jitter=0.1, burn_in=1.0, seed=1)
    assert len(set(r["dt"].tolist())) == 3 and bool(((r["dt"] - 0.2).abs() <= 0.02 + 1e-12).all())
    torch.testing.assert_close(r["t"][:, 1] - r["t"][:, 0], r["dt"])
    torch.testing.assert_close(r["dt_sim"] * r["params"]["n_sub"], r["dt"])
    ic = r["ic_params"]                                      # the initial condition is what it says
    xi = torch.arange(64, dtype=torch.float64) / 64
    u0 = (torch.as_tensor(ic["amplitudes"])[:, None, :]
          * torch.sin(2 * math.pi * torch.as_tensor(ic["wavenumbers"], dtype=torch.float64)[:, None, :] * xi[None, :, None]
                      + torch.as_tensor(ic["phases"])[:, None, :])).sum(-1)
    torch.testing.assert_close(r["u0"], u0)
    assert ic["wavenumbers"].min() >= 1 and ic["wavenumbers"].max() <= 3


# ----------------------------------------------------------------------------- output


def test_import_is_light_and_progress_bar_runs(capsys):
    code = ("import sys; sys.path.insert(0, %r); import diffkit_pde; "
            "print('xarray' in sys.modules)" % str(Path(__file__).resolve().parents[1] / "plugins"))
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
    P.simulate_burgers(1, 3, nx=32, progress=True)
