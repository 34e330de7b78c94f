"""Shared pieces of the QG tests (test_weather_qg.py and test_weather_qg_<module>.py, one file per
module of the QG model): the modules, imported from the source tree when the installed plugin
predates them, the units, and the finite-amplitude run that the operator and energy tests share.
"""
from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest

try:
    from diffkit_weather import qg as Q
    from diffkit_weather import qg_coarse as QC, qg_energy as QE, qg_linear as QL, qg_netcdf as QN
    from diffkit_weather import qg_oracle as QO
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    from diffkit_weather import qg as Q
    from diffkit_weather import qg_coarse as QC, qg_energy as QE, qg_linear as QL, qg_netcdf as QN
    from diffkit_weather import qg_oracle as QO

__all__ = ["Q", "QC", "QE", "QL", "QN", "QO", "DAY", "L", "finite_amplitude_run"]

DAY = 86400.0
L = 1e6


@pytest.fixture(scope="module")
def finite_amplitude_run():
    """Finite-amplitude unstable modes (speeds ~0.15 m/s): nonlinear from the start, energy
    cascades into the filter range within days.  nx = 32, 8 days, output every 2 h."""
    nx = 32
    modes = [(7, 0), (6, 3), (5, -4), (8, 2), (4, 1), (10, 3), (9, -6)]
    g = np.random.default_rng(0)
    q0 = QL.normal_mode_pv(nx, modes, [3e3] * 5 + [1e3] * 2, phase=g.uniform(0, 2 * np.pi, len(modes)))
    return Q.simulate_qg(1, 97, q0=q0[None], out_every=7200.0)
