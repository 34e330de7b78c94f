"""Shared helpers of the PDE plugin's tests (test_pde_adapter, test_pde_surrogate, test_pde_cli, and
the simulator tests test_pde_burgers / _ks / _kolmogorov / _stability / _netcdf / _simulators):
the plugin import, a small synthetic trajectory file whose values are known in closed form, and the
simulator tests' convergence-order fit and coarse-grid warning filter.
The ``synth`` fixture built on it is in conftest.py.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

try:
    import diffkit_pde as P
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import diffkit_pde as P

import xarray as xr  # a dependency: missing it is a failure, not a skip

__all__ = ["P", "N_TRAJ", "N_TIME", "NX", "DT", "DX", "known_u", "write_1d", "coarse_ns", "_order"]

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


# ============================================================================= simulator checks
#: the simulator tests' small Kolmogorov grids under-resolve Re = 1000 on purpose (the checks are of
#: the discrete system); the resolution monitor itself is tested on Burgers (test_pde_stability.py)
coarse_ns = pytest.mark.filterwarnings("ignore::diffkit_pde.stability.ResolutionWarning")


def _order(dts, errs) -> float:
    """Least-squares slope of log(err) against log(dt)."""
    return float(np.polyfit(np.log(dts), np.log(errs), 1)[0])
