"""Tests of ``diffkit_pde.stability``: the CFL check (an error naming the CFL number and the fix,
monitored during a run), non-finite states named with their step, and the resolution warning on
under-resolved shocks."""
from __future__ import annotations

import pytest
import torch

from _pde_fixtures import P, coarse_ns


def test_cfl_violation_names_cfl_number_and_fix():
    with pytest.raises(P.StabilityError) as ei:
        P.simulate_burgers(2, 5, nx=128, nu=0.05, amplitude=1.0, dt=0.2, dt_out=0.2)
    msg = str(ei.value)
    assert "CFL number" in msg and "dt = 0.2" in msg and "reduce dt to <=" in msg
    assert isinstance(ei.value, ValueError)
    # following the advice works
    dt_ok = float(msg.split("reduce dt to <= ")[1].split(" ")[0])
    P.simulate_burgers(2, 5, nx=128, nu=0.05, amplitude=1.0, dt=dt_ok, dt_out=0.2)
    # a fixed threshold
    with pytest.raises(P.StabilityError, match=r"exceeds 0\.5, cfl_max"):
        P.simulate_burgers(2, 5, nx=128, nu=0.01, amplitude=1.0, dt=0.05, dt_out=0.2, cfl_max=0.5)
    with pytest.raises(P.StabilityError, match="CFL number"):
        P.simulate_ks(2, 3, dt=2.0, dt_out=2.0, burn_in=0)
    with pytest.raises(P.StabilityError, match="CFL number"):
        P.simulate_kolmogorov(2, 2, n_sim=64, n_out=32, dt=0.2, dt_out=0.2, burn_in=0, rms_velocity=3.0)


@coarse_ns
def test_cfl_monitored_during_run():
    # a flow that accelerates: strong forcing, no drag; the initial CFL is tiny, the later one is not
    with pytest.raises(P.StabilityError, match=r"at output step \d+ \(recording\)"):
        P.simulate_kolmogorov(2, 40, n_sim=32, n_out=32, dt=0.1, dt_out=0.1, burn_in=0, drag=0.0,
                              forcing_amplitude=20.0, rms_velocity=0.01)


def test_nonfinite_state_raises_with_step():
    u0 = torch.zeros(1, 64, dtype=torch.float64)
    u0[0, 3] = float("nan")
    with pytest.raises(P.NonFiniteStateError, match="initial condition"):
        P.simulate_burgers(1, 3, nx=64, u0=u0, dt=0.01)
    # an unstable step with the check switched off blows up; the error names the output step
    with pytest.raises(P.NonFiniteStateError, match=r"output step \d+") as ei:
        P.simulate_burgers(1, 400, nx=64, nu=1e-4, amplitude=1.0, dt=0.5, dt_out=0.5, cfl_max=float("inf"),
                           dealias=False)
    assert "increase nx" in str(ei.value)


def test_resolution_warning_flags_under_resolved_shocks():
    with pytest.warns(P.ResolutionWarning, match="nx_sim"):
        r = P.simulate_burgers(4, 21, nx=128, nx_sim=128, seed=0)
    assert float(r["spectral_tail"].max()) > 1e-2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        r = P.simulate_burgers(4, 21, nx=128, seed=0)          # default nx_sim = 4 nx = 512
    assert float(r["spectral_tail"].max()) < 1e-3
