"""The one ETDRK4 integrator (``diffkit/etdrk4.py``) against exact references, and proof that the
PDE simulators and the QG model, which each had their own copy before, give bit-identical
trajectories with it."""
from __future__ import annotations

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from diffkit.etdrk4 import ETDRK4, amplification_factor, etdrk4_coefficients, resolve_device_dtype

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffkit_pde as P
    from diffkit_pde import kolmogorov as PK, periodic1d as P1, stability as PS
except ImportError:  # not installed: use the source tree
    sys.path.insert(0, str(ROOT / "plugins"))
    import diffkit_pde as P
    from diffkit_pde import kolmogorov as PK, periodic1d as P1, stability as PS


# ----------------------------------------------------------------------------- the copies it replaced
# Frozen from plugins/diffkit_pde/simulators.py and plugins/diffkit_weather/qg.py as they were
# before issue 16 (commit 3826934; the two copies differed only in how h entered): the references
# of the before -> after identity tests.  Deliberately a copy of diffkit/etdrk4.py's arithmetic.
def _former_coefficients(lin, h, n_contour=32, *, qg=False):
    if qg:   # qg.py's copy: h a Python float
        hl = float(h) * lin.to(torch.float64)
    else:    # simulators.py's copy
        lin = torch.as_tensor(lin, dtype=torch.float64)
        h = torch.as_tensor(h, dtype=torch.float64)
        hl = h * lin
    r = torch.exp(1j * math.pi * (torch.arange(1, n_contour + 1, dtype=torch.float64) - 0.5) / n_contour)
    LR = hl.to(torch.complex128)[..., None] + r
    eLR = torch.exp(LR)
    Q = h * ((torch.exp(LR / 2) - 1) / LR).mean(-1).real
    f1 = h * ((-4 - LR + eLR * (4 - 3 * LR + LR ** 2)) / LR ** 3).mean(-1).real
    f2 = h * ((2 + LR + eLR * (-2 + LR)) / LR ** 3).mean(-1).real
    f3 = h * ((-4 - 3 * LR - LR ** 2 + eLR * (4 - LR)) / LR ** 3).mean(-1).real
    return {"E": torch.exp(hl), "E2": torch.exp(hl / 2), "Q": Q, "f1": f1, "f2": f2, "f3": f3}


class _FormerETDRK4:
    qg = False

    def __init__(self, lin, h, device, dtype, n_contour=32):
        for k, t in _former_coefficients(lin, h, n_contour, qg=self.qg).items():
            setattr(self, k, t.to(device=device, dtype=dtype))

    def step(self, v, N):
        Nv = N(v)
        a = self.E2 * v + self.Q * Nv
        Na = N(a)
        b = self.E2 * v + self.Q * Na
        Nb = N(b)
        c = self.E2 * a + self.Q * (2 * Nb - Nv)
        Nc = N(c)
        return self.E * v + Nv * self.f1 + 2 * (Na + Nb) * self.f2 + Nc * self.f3


class _FormerQGETDRK4(_FormerETDRK4):
    qg = True


def _former_amplification_ok(z, w, tol=1e-6):
    c = _former_coefficients(z, 1.0)
    E, E2, Q, f1, f2, f3 = (c[k] for k in ("E", "E2", "Q", "f1", "f2", "f3"))
    a = E2 + Q * w
    b = E2 + Q * w * a
    cc = E2 * a + Q * w * (2 * b - 1)
    R = (E + f1 * w + 2 * f2 * w * (a + b) + f3 * w * cc).abs()
    return R <= torch.clamp(E, min=1.0) * (1 + tol)


def _same(a: dict, b: dict, keys) -> None:
    for k in keys:
        assert torch.equal(torch.as_tensor(a[k]), torch.as_tensor(b[k])), k


# ----------------------------------------------------------------------------- one integrator
def test_one_etdrk4_used_by_the_pde_simulators_and_qg():
    """Issue 16, "one etdrk4.py, used by the PDE simulators and by QG": every simulator steps with
    diffkit.etdrk4.ETDRK4, and no other module defines the coefficients or a step class."""
    from diffkit_weather import qg as Q

    assert P1.ETDRK4 is ETDRK4 and PK.ETDRK4 is ETDRK4 and Q.ETDRK4 is ETDRK4
    assert P.etdrk4_coefficients is etdrk4_coefficients
    own = (ROOT / "diffkit" / "etdrk4.py").resolve()
    defs = [p.relative_to(ROOT).as_posix() for d in ("diffkit", "plugins") for p in (ROOT / d).rglob("*.py")
            if p.resolve() != own and any(s in p.read_text() for s in
                                          ("def etdrk4_coefficients", "def _etdrk4_coefficients",
                                           "class _ETDRK4", "class ETDRK4"))]
    assert defs == []


def test_etdrk4_is_not_imported_by_import_diffkit():
    code = "import sys, diffkit; print('diffkit.etdrk4' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"


# ----------------------------------------------------------------------------- exact references
def test_coefficients_match_the_closed_forms_and_their_limits():
    """Away from 0 the contour means equal the explicit phi-function formulas; at z = 0 (where
    the formulas are 0/0) they equal the limits Q = h/2, f1 = f2 = f3 = h/6."""
    h = 0.3
    lin = torch.tensor([-20.0, -5.0, -2.0, 2.0, 3.0])
    z = h * lin.double()
    ez = torch.exp(z)
    want = {"E": ez, "E2": torch.exp(z / 2), "Q": h * (torch.exp(z / 2) - 1) / z,
            "f1": h * (-4 - z + ez * (4 - 3 * z + z ** 2)) / z ** 3,
            "f2": h * (2 + z + ez * (-2 + z)) / z ** 3,
            "f3": h * (-4 - 3 * z - z ** 2 + ez * (4 - z)) / z ** 3}
    c = etdrk4_coefficients(lin, h)
    for k, v in want.items():
        assert c[k].dtype == torch.float64
        torch.testing.assert_close(c[k], v, rtol=1e-12, atol=0, msg=k)
    c0 = etdrk4_coefficients(torch.zeros(1), h)
    for k, v in dict(E=1.0, E2=1.0, Q=h / 2, f1=h / 6, f2=h / 6, f3=h / 6).items():
        assert abs(float(c0[k]) - v) < 1e-15, k


def test_linear_part_and_constant_forcing_are_exact():
    """``v' = lam v + c``: ETDRK4 is exact for a constant nonlinear term, stiff or not."""
    lam = torch.tensor([-1e4, -30.0, -1.0, -1e-9, 0.0, 0.7], dtype=torch.float64)
    h, c, v0 = 0.1, 0.25, torch.full((6,), 1.5, dtype=torch.complex128)
    v1 = ETDRK4(lam, h).step(v0, lambda v: torch.full_like(v, c))
    phi1 = torch.where(lam != 0, torch.expm1(h * lam) / torch.where(lam != 0, lam, 1.0), torch.tensor(h, dtype=torch.float64))
    want = torch.exp(h * lam) * 1.5 + c * phi1
    torch.testing.assert_close(v1.real, want, rtol=1e-13, atol=1e-15)


def test_fourth_order_on_a_nonlinear_scalar_equation():
    """``v' = lam v - v^2`` (exact: ``lam v0 e^{lam t} / (lam + v0 (e^{lam t} - 1))``): the error at
    t = 1 falls 16-fold per halving of h."""
    lam, v0, T = torch.tensor([-1.0, 0.5], dtype=torch.float64), 0.2, 1.0
    e = torch.exp(lam * T)
    exact = lam * v0 * e / (lam + v0 * (e - 1))
    errs = []
    for n in (5, 10, 20):
        s, v = ETDRK4(lam, T / n), torch.full((2,), v0, dtype=torch.float64)
        for _ in range(n):
            v = s.step(v, lambda u: -u * u)
        errs.append((v - exact).abs())
    order = torch.log2(torch.stack(errs[:-1]) / torch.stack(errs[1:]))
    assert bool(((order > 3.8) & (order < 4.3)).all()), order


def test_amplification_factor_reduces_to_rk4_and_to_the_exponential():
    """Without the exact part ETDRK4 is classical RK4 (``R = sum_{j<=4} w^j/j!``); without the
    explicit part it is ``e^z``."""
    w = torch.tensor([0.3j, -0.5 + 1j, 2.8j, -1.0], dtype=torch.complex128)
    rk4 = 1 + w + w ** 2 / 2 + w ** 3 / 6 + w ** 4 / 24
    torch.testing.assert_close(amplification_factor(torch.zeros(4, dtype=torch.float64), w), rk4,
                               rtol=1e-13, atol=1e-14)
    z = torch.tensor([-3.0, -0.1, 0.0, 0.4], dtype=torch.float64)
    torch.testing.assert_close(amplification_factor(z, torch.zeros(4, dtype=torch.complex128)).real,
                               torch.exp(z), rtol=1e-14, atol=0)


def test_per_row_steps_equal_single_runs_and_dtype_follows_the_state():
    lin = -torch.arange(6, dtype=torch.float64)[None, :] ** 2
    h = torch.tensor([[0.1], [0.05]], dtype=torch.float64)
    N = lambda v: -0.5j * v * v
    v0 = torch.randn(2, 6, dtype=torch.complex128, generator=torch.Generator().manual_seed(0))
    both = ETDRK4(lin, h).step(v0, N)
    for i in range(2):
        assert torch.equal(both[i:i + 1], ETDRK4(lin, h[i:i + 1]).step(v0[i:i + 1], N))
    s32 = ETDRK4(lin, h, dtype=torch.float32)
    assert s32.E.dtype == torch.float32 and s32.step(v0.to(torch.complex64), N).dtype == torch.complex64
    with pytest.raises(TypeError, match="float32 or torch.float64"):
        ETDRK4(lin, h, dtype=torch.float16)


def test_resolve_device_dtype_follows_the_reference():
    f32 = torch.zeros(2, dtype=torch.float32)
    assert resolve_device_dtype(None, None, f32) == (torch.device("cpu"), torch.float32)
    assert resolve_device_dtype(None, None, torch.zeros(2, dtype=torch.int64))[1] == torch.float64
    assert resolve_device_dtype("cpu", torch.float64, f32)[1] == torch.float64
    with pytest.raises(TypeError, match="dtype must be torch.float32 or torch.float64, got torch.float16"):
        resolve_device_dtype(None, torch.float16)


# ----------------------------------------------------------------------------- before -> after
@pytest.mark.filterwarnings("ignore::diffkit_pde.stability.ResolutionWarning")
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_pde_trajectories_bit_identical_to_the_former_copy(monkeypatch, dtype):
    """KS, Burgers and Kolmogorov flow, with the shared integrator and with the copy the PDE
    simulators had before: the same bits (trajectories, CFL limits, spectral tails)."""
    def runs():
        return (P.simulate_ks(2, 3, nx=64, L=22.0, burn_in=0.4, seed=1, dtype=dtype),
                P.simulate_burgers(2, 3, nx=32, nx_sim=64, seed=2, dtype=dtype),
                P.simulate_kolmogorov(1, 2, n_sim=32, n_out=16, burn_in=0.2, dtype=dtype))

    new = runs()
    for mod in (P1, PK):
        monkeypatch.setattr(mod, "ETDRK4", _FormerETDRK4)
    monkeypatch.setattr(PS, "_amplification_ok", _former_amplification_ok)
    old = runs()
    for a, b in zip(new[:2], old[:2]):
        _same(a, b, ("u", "cfl_limit", "spectral_tail", "dt_sim"))
    _same(new[2], old[2], ("state", "omega", "spectral_tail"))
    assert new[2]["params"]["cfl_limit"] == old[2]["params"]["cfl_limit"]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_qg_trajectories_bit_identical_to_the_former_copy(monkeypatch, dtype):
    """The QG model with the shared integrator and with the copy it had before: the same bits."""
    from diffkit_weather import qg as Q

    def run():
        return Q.simulate_qg(2, 3, nx=32, spin_up_years=0.005, seed=3, dtype=dtype)

    new = run()
    monkeypatch.setattr(Q, "ETDRK4", _FormerQGETDRK4)
    old = run()
    _same(new, old, ("q", "psi", "u", "v"))


# Frozen from simulate_qg before issue 16 moved its frame loop onto etdrk4.frames (commit 5b1c5c5):
# simulate_qg(2, 4, nx=32, spin_up_years=1/365, seed=5, ic_amplitude=1e-5, observe=16,
# fine_frames=[3, 1]) in float64 -- RMS of the coarse q per (member, frame, layer), RMS of q_fine per
# (member, fine frame), three single values and the largest CFL number seen.
_QG_FROZEN = {
    "rms_q": [[[4.9757790689272535e-06, 4.58734897929653e-06], [4.97533357713927e-06, 4.529893001755619e-06],
               [4.9821816988813156e-06, 4.4743800829539855e-06], [4.996309950020074e-06, 4.4207008151380765e-06]],
              [[4.6692275939233436e-06, 4.699369083415058e-06], [4.746655082799319e-06, 4.657333855663191e-06],
               [4.839695592244628e-06, 4.614043020539854e-06], [4.946864165737085e-06, 4.568969575016983e-06]]],
    "rms_q_fine": [6.325857918434893e-06, 6.4306613329162085e-06, 6.159821586496793e-06, 6.205022085596618e-06],
    "q_final[1,0,3,5]": -9.200446533701421e-07, "psi[0,2,1,7,2]": 3493.8969285480366,
    "u[1,3,0,0,9]": 0.07573392198022572, "cfl_observed_max": 0.18711421967744318,
}


def test_qg_frame_loop_is_the_former_loop_and_matches_the_frozen_reference():
    """simulate_qg's frames (spin-up discarded, n_sub = 3 ETDRK4 steps per 6-hour frame, observed on
    16^2, fine states kept at frames 3 and 1) are bit-identical to the loop it had before, written
    out here (frame 0 = the initial state, then n_sub steps per frame), in float64 and float32; and
    the float64 run equals the values frozen from the former code (to round-off: the FFTs may
    differ between builds)."""
    import numpy as np

    from diffkit_weather import qg as Q
    from diffkit_weather.qg_coarse import coarse_grain
    from diffkit_weather.qg_model import _Spectral

    kw = dict(nx=32, spin_up_years=1 / 365, seed=5, ic_amplitude=1e-5, observe=16, fine_frames=[3, 1])
    runs = {dtype: Q.simulate_qg(2, 4, dtype=dtype, **kw) for dtype in (torch.float64, torch.float32)}
    for dtype, r in runs.items():
        p = r["params"]
        assert (p["spin_up_steps"], p["n_sub"]) == (4, 3)
        S = _Spectral(dict(p, nx=p["nx_sim"], dx=p["dx_sim"]), torch.device("cpu"), dtype)
        q = torch.stack([Q._random_field(np.random.default_rng([5, i]), 32) * 1e-5 for i in range(2)])
        qh = torch.fft.rfft2(q, norm="forward") * S.mask64
        qh[..., 0, 0] = 0
        qh = qh.to(S.cdt)
        stepper = ETDRK4(-S.sigma64, p["dt_sim"], "cpu", dtype)
        seen = []
        for j in range(4 + 4):                        # the former loop
            if j > 0:
                for _ in range(3):
                    qh = stepper.step(qh, S.rhs)
            if j >= 4:
                seen.append(S.ifft(torch.stack((qh, S.psi(qh)))))
        seen = torch.stack(seen, 2)                   # (2 = q/psi, member, frame, layer, y, x)
        assert torch.equal(r["q"], coarse_grain(seen[0], 16)) and torch.equal(r["psi"], coarse_grain(seen[1], 16))
        assert torch.equal(r["q_fine"], seen[0][:, [3, 1]]) and torch.equal(r["q_final"], seen[0][:, -1])
    r = runs[torch.float64]
    f = _QG_FROZEN
    close = lambda got, want: torch.testing.assert_close(torch.as_tensor(got, dtype=torch.float64),
                                                         torch.as_tensor(want, dtype=torch.float64),
                                                         rtol=1e-10, atol=0)
    close(r["q"].pow(2).mean((-2, -1)).sqrt(), f["rms_q"])
    close(r["q_fine"].pow(2).mean((-3, -2, -1)).sqrt().flatten(), f["rms_q_fine"])
    close(r["q_final"][1, 0, 3, 5], f["q_final[1,0,3,5]"])
    close(r["psi"][0, 2, 1, 7, 2], f["psi[0,2,1,7,2]"])
    close(r["u"][1, 3, 0, 0, 9], f["u[1,3,0,0,9]"])
    close(r["params"]["cfl_observed_max"], f["cfl_observed_max"])
