"""Two-layer quasi-geostrophic (QG) model: a batched, pseudo-spectral torch simulator (CPU and GPU).

The model is pyqg's reference two-layer configuration (Flierl 1978; pyqg documentation, "Two
layer model"; ``pyqg.QGModel`` defaults): a doubly periodic square of side ``L = 1e6 m`` on an
``nx x nx`` grid (64), beta-plane ``beta = 1.5e-11 m^-1 s^-1``, deformation radius
``rd = 15 km``, layer-depth ratio ``delta = H1/H2 = 0.25`` with ``H1 = 500 m`` (``H2 = 2000 m``),
background zonal flows ``U1 = 0.025 m/s``, ``U2 = 0``, linear Ekman drag ``rek = 5.787e-7 s^-1``
on the lower layer, time step 2 h.  In pyqg's notation (layer ``n = 1`` upper, ``2`` lower)::

    q1 = Lap psi1 + F1 (psi2 - psi1),        q2 = Lap psi2 + F2 (psi1 - psi2),
    F1 = 1 / (rd^2 (1 + delta)),             F2 = delta F1,
    d_t q_n + J(psi_n, q_n) + U_n d_x q_n + Qy_n d_x psi_n = -delta_{n2} rek Lap psi2 - sigma q_n,
    Qy1 = beta + F1 (U1 - U2),               Qy2 = beta - F2 (U1 - U2),

with ``J(a, b) = a_x b_y - a_y b_x``, eddy velocities ``u_n = -d_y psi_n``, ``v_n = d_x psi_n``;
``psi``, ``q``, ``u``, ``v`` are the *eddy* fields (the background flow ``U_n`` and PV gradient
``Qy_n`` are separate).  Arrays are laid out ``(..., layer, y, x)`` (pyqg's order: rows are
``y``/north, columns ``x``/east); grid points are cell centres ``x_i = (i + 1/2) L / nx``.

Numerical scheme
----------------
- **Space** and **small-scale dissipation**: Fourier pseudo-spectral with the 3/2 rule, PV
  inversion per wavenumber, pyqg's exponential filter as an exact linear damping rate -- described
  in :mod:`diffkit_weather.qg_model`, which holds the parameters and the spectral operators.
- **Time**: ETDRK4 (Cox & Matthews 2002; Kassam & Trefethen 2005, contour-integral phi
  functions; :mod:`diffkit.etdrk4`, the integrator the PDE simulators use too): the stiff
  filter damping is integrated exactly, the Jacobian, the background advection ``U_n d_x``, the
  beta/shear term ``Qy_n d_x psi_n`` and the drag explicitly (at ``nx = 64`` and 2 h the
  background flow alone has CFL number 0.012, the equilibrated eddies reach 0.15-0.2; drag and
  Rossby-wave rates times the step are below 1e-2).  pyqg uses AB3
  with the filter applied per step; ETDRK4 costs 4 right-hand sides per step but is
  fourth-order accurate and self-starting (a batched run equals the single runs exactly).
  Cost on one CPU thread at ``nx = 64``, ``dt = 2 h``: about 11 s per simulated year for one
  member and 13-20 s per member-year batched (16 members: 200-320 s per year; FFT-bound).

Conventions (as :mod:`diffkit_pde.conventions`)
------------------------------------------------
- ``device``/``dtype`` follow ``q0`` when given, else CPU/float64; coefficients are computed in
  float64 and moved once; one host sync per *output* step (the stability check).
- Randomness per member from ``numpy.random.default_rng([seed, i])``: member ``i`` is the same
  whatever ``n_members`` is.
- Output every ``out_every`` seconds (6 h); the internal step is ``out_every / n_sub`` with
  ``n_sub = ceil(out_every / dt)`` (never above the requested ``dt``).  A spin-up of
  ``spin_up_years`` (365-day years; pyqg's examples use 360) is run first and discarded: frame 0
  is the state at the end of the spin-up and ``t`` counts seconds from it.  The configuration is
  only 1.5 times supercritical (growth e-folding ~150 days at wavenumber 7 with drag), so from the
  default random PV of RMS 1e-7 s^-1 the flow equilibrates after 3-4 years (measured at
  ``nx = 64``: total energy ~1.1e-3 m^2 s^-2, RMS eddy ``u`` 0.046 / 0.008 m/s in the upper /
  lower layer); hence the 5-year default spin-up.
- **Stability check.**  On the initial state and after every output step the advective CFL
  number ``C = max(|u_n + U_n| + |v_n|) h / dx`` (per member) is compared with ``cfl_max``; the
  default is the reach of RK4 (= ETDRK4 without damping) on the imaginary axis over the largest
  retained wavenumber, ``2 sqrt(2) / (k_max dx)`` (0.93 at ``nx = 64``): safe, not tight (the
  filter damps the fastest modes).  A violation raises :class:`StabilityError` with the fix
  ("reduce dt to <= X"); NaN/inf raises :class:`NonFiniteStateError` naming the output step.

Public API: :func:`simulate_qg`, :func:`perturb_members`; :class:`StabilityError`,
:class:`NonFiniteStateError`; ``DEFAULTS`` (from :mod:`~diffkit_weather.qg_model`).  Re-exported
from the modules that hold them, so ``diffkit_weather.qg`` keeps the whole QG API:
:func:`linear_modes`, :func:`linear_growth_rate`, :func:`normal_mode_pv`
(:mod:`~diffkit_weather.qg_linear`), :func:`energy_budget` (:mod:`~diffkit_weather.qg_energy`),
:func:`to_dataset`, :func:`write_netcdf` (:mod:`~diffkit_weather.qg_netcdf`).  Importing this
module does not import xarray.
"""
from __future__ import annotations

import math
from typing import Any, Sequence

import numpy as np
import torch

from diffkit.errors import DiffkitError, NonFiniteError
from diffkit.etdrk4 import ETDRK4, SCHEME as ETDRK4_SCHEME, frames, resolve_device_dtype

from .qg_coarse import _check_coarse, coarse_grain
from .qg_energy import energy_budget
from .qg_linear import linear_growth_rate, linear_modes, normal_mode_pv
from .qg_model import DEFAULTS, _params, _Spectral
from .qg_netcdf import KM_PER_DEG, to_dataset, write_netcdf

__all__ = ["simulate_qg", "perturb_members", "StabilityError", "NonFiniteStateError", "DEFAULTS", "FIELDS",
           "SCHEME", "DAY", "YEAR",
           # re-exported from the modules they live in
           "linear_modes", "linear_growth_rate", "normal_mode_pv", "energy_budget", "to_dataset",
           "write_netcdf", "KM_PER_DEG"]

SCHEME = f"{ETDRK4_SCHEME}, filter exact, Jacobian explicit and 3/2-rule dealiased, PV inversion spectral"
DAY = 86400.0
YEAR = 365.0 * DAY

FIELDS = ("q", "psi", "u", "v")


class StabilityError(DiffkitError, ValueError):
    """The time step violates the advective CFL limit of the scheme, or the run blew up."""


class NonFiniteStateError(StabilityError, NonFiniteError):
    """The simulated state holds NaN or inf."""


# ----------------------------------------------------------------------------- helpers
def _floor_sig(x: float, digits: int = 4) -> float:
    """``x`` rounded *down* to ``digits`` significant digits (a suggested step that is safe as printed)."""
    if not (x > 0 and math.isfinite(x)):
        return x
    e = math.floor(math.log10(x)) - digits + 1
    return math.floor(x / 10.0 ** e * (1 - 1e-12)) * 10.0 ** e


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)


# ----------------------------------------------------------------------------- initial conditions
_IC_GRID = 32   # random fields are drawn on a 32^2 grid and zero-padded: resolution independent


def _random_field(g: np.random.Generator, n: int) -> torch.Tensor:
    """(2, n, n) zero-mean Gaussian random field, modes ``|kx|, |ky| < 16`` (of a 32^2 draw),
    each layer scaled to unit RMS on the ``n`` grid."""
    m = _IC_GRID
    c = torch.from_numpy(np.fft.rfft2(g.standard_normal((2, m, m)), norm="forward"))
    c[..., 0, 0] = 0
    c[..., m // 2, :] = 0
    c[..., :, m // 2] = 0
    out = torch.zeros(2, n, n // 2 + 1, dtype=torch.complex128)
    K = min(m // 2, n // 2)                   # copy |k| <= K - 1
    out[..., :K, :K] = c[..., :K, :K]
    out[..., n - K + 1:, :K] = c[..., m - K + 1:, :K]
    f = torch.fft.irfft2(out, s=(n, n), norm="forward")
    return f / f.pow(2).mean((-2, -1), keepdim=True).sqrt()


def perturb_members(q0, n: int, amplitude: float = 0.01, seed: int = 0, *,
                    relative: bool = True) -> torch.Tensor:
    """``n`` perturbed copies of one QG state, for ensembles started from a common state.

    ``q0``: PV of shape (2, ny, nx) or (1, 2, ny, nx).  Member ``i`` adds a zero-mean Gaussian
    random field drawn from ``default_rng([seed, i])`` (modes ``|kx|, |ky| < 16``, independent per
    layer) with RMS ``amplitude`` times the RMS of ``q0`` in that layer (``relative=True``) or
    ``amplitude`` in s^-1 (``relative=False``).  Returns (n, 2, ny, nx) on ``q0``'s device/dtype.
    """
    q = torch.as_tensor(q0).detach()
    shape = tuple(q.shape)
    if q.ndim == 4 and q.shape[0] == 1:
        q = q[0]
    if q.ndim != 3 or q.shape[0] != 2 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"q0 must have shape (2, nx, nx) or (1, 2, nx, nx), got {shape}")
    if not q.is_floating_point():
        q = q.double()
    nx = q.shape[-1]
    noise = torch.stack([_random_field(np.random.default_rng([int(seed), i]), nx) for i in range(int(n))])
    if relative:
        scale = q.double().cpu().pow(2).mean((-2, -1)).sqrt()[:, None, None]
    else:
        scale = torch.ones(2, 1, 1, dtype=torch.float64)
    return q[None] + (float(amplitude) * scale * noise).to(device=q.device, dtype=q.dtype)


# ----------------------------------------------------------------------------- simulator
def simulate_qg(n_members: int, n_steps: int, *, nx: int | None = None, L: float = 1e6,
                beta: float = 1.5e-11, rd: float = 15e3, delta: float = 0.25, H1: float = 500.0,
                U1: float = 0.025, U2: float = 0.0, rek: float = 5.787e-7, dt: float = 7200.0,
                out_every: float = 6 * 3600.0, spin_up_years: float | None = None, seed: int = 0,
                q0=None, ic_amplitude: float = 1e-7, filterfac: float = 23.6,
                filter_timescale: float = 7200.0, fields: Sequence[str] = FIELDS, device=None,
                dtype=None, progress: bool = False, cfl_max: float | None = None,
                observe: int | None = None, fine_frames: Sequence[int] | None = None) -> dict:
    """Run ``n_members`` independent two-layer QG simulations (batched) and keep ``n_steps`` frames.

    The model, scheme and checks are described in the module docstring.  Initial conditions: a
    zero-mean Gaussian random PV field per member and layer (modes ``|kx|, |ky| < 16``, RMS
    ``ic_amplitude`` s^-1, drawn from ``default_rng([seed, i])``), or ``q0`` (n_members, 2, nx, nx)
    (its domain mean and Nyquist modes are dropped; :func:`perturb_members` makes ensembles of one
    state).  ``spin_up_years`` of simulation are discarded first (default 5 years for random
    initial conditions, 0 with ``q0``); ``nx`` defaults to 64 or to the size of ``q0``.
    ``fields`` selects which of ``q``, ``psi``, ``u``, ``v`` are stored (each takes
    ``n_members*n_steps*2*nx^2`` numbers).

    ``observe``: a coarse-grained observation.  The model runs on the ``nx^2`` grid, and the stored
    fields are its :func:`coarse_grain` onto an ``observe^2`` grid (a sharp spectral truncation to
    ``|kx|, |ky| < observe/2``; ``x``, ``y`` are then the coarse cell centres and
    ``params["nx"]`` is ``observe``, ``params["nx_sim"]`` the simulated grid), so the next coarse
    state is uncertain given the current one (the sub-grid scales are unseen;
    :func:`oracle_ensemble` gives that uncertainty).  ``fine_frames``: indices of recorded frames
    at which the full fine PV is kept as well, ``q_fine`` (n_members, len(fine_frames), 2, nx, nx),
    e.g. the init times of an oracle ensemble and a pool of other times for its sub-grid
    climatology.

    Returns a dict: ``q``, ``psi``, ``u``, ``v`` of shape (n_members, n_steps, 2, nx, nx)
    (axes member, time, layer, y, x; eddy fields in s^-1, m^2/s, m/s); ``x``, ``y`` (nx,) cell
    centres in m; ``t`` (n_steps,) seconds since frame 0 (the end of the spin-up); ``q0`` (the
    initial state before the spin-up), ``q_final`` (the state of the last frame, to continue a
    run); ``dt_sim`` (internal step, s), ``cfl_limit`` and ``params`` (every setting, derived
    constants ``F1``, ``F2``, ``Qy1``, ``Qy2``, ``H2``, and the observed maximum CFL number).
    With ``observe``, ``q``/``psi``/``u``/``v`` are on the ``observe^2`` grid while ``q0``,
    ``q_final`` and ``q_fine`` are fine states.
    """
    device, dtype = resolve_device_dtype(device, dtype, q0 if isinstance(q0, torch.Tensor) else None)
    if q0 is not None:
        q0t = torch.as_tensor(q0).detach()
        if q0t.ndim == 3:
            q0t = q0t[None]
        if q0t.ndim != 4 or q0t.shape[:2] != (n_members, 2) or q0t.shape[-1] != q0t.shape[-2]:
            raise ValueError(f"q0 must have shape (n_members, 2, nx, nx) with n_members = {n_members}, "
                             f"got {tuple(torch.as_tensor(q0).shape)}")
        if nx is None:
            nx = q0t.shape[-1]
        elif q0t.shape[-1] != nx:
            raise ValueError(f"q0 is on a {q0t.shape[-1]}^2 grid but nx = {nx}")
    nx = 64 if nx is None else nx
    if int(n_members) < 1 or int(n_steps) < 1:
        raise ValueError(f"n_members and n_steps must be >= 1, got {n_members}, {n_steps}")
    unknown = set(fields) - set(FIELDS)
    if unknown:
        raise ValueError(f"fields must be among {FIELDS}, got {sorted(unknown)}")
    p = _params(nx, L, beta, rd, delta, H1, U1, U2, rek, filterfac, filter_timescale)
    n_obs = p["nx"] if observe is None else _check_coarse(p["nx"], observe, "observe")
    fine = [] if fine_frames is None else [int(i) for i in fine_frames]
    bad_frames = [i for i in fine if not 0 <= i < int(n_steps)]
    if bad_frames:
        raise ValueError(f"fine_frames must be recorded frame indices in [0, {int(n_steps)}), got {bad_frames[:5]}")
    if not (dt > 0 and math.isfinite(dt)) or not (out_every > 0 and math.isfinite(out_every)):
        raise ValueError(f"dt and out_every must be positive and finite, got {dt}, {out_every}")
    if spin_up_years is None:
        spin_up_years = 5.0 if q0 is None else 0.0
    if spin_up_years < 0:
        raise ValueError(f"spin_up_years must be >= 0, got {spin_up_years}")
    n_spin = math.ceil(float(spin_up_years) * YEAR / float(out_every) - 1e-9)
    n_sub = max(1, math.ceil(float(out_every) / float(dt) - 1e-9))
    h = float(out_every) / n_sub
    n = p["nx"]

    S = _Spectral(p, device, dtype)
    if q0 is None:
        q_init = torch.stack([_random_field(np.random.default_rng([int(seed), i]), n) * float(ic_amplitude)
                              for i in range(int(n_members))])
    else:
        q_init = q0t.to(torch.float64).cpu()
    qh = torch.fft.rfft2(q_init.to(torch.float64), norm="forward") * S.mask64
    qh[..., 0, 0] = 0
    q_init = torch.fft.irfft2(qh, s=(n, n), norm="forward")
    qh = qh.to(device=device, dtype=S.cdt)

    stepper = ETDRK4(-S.sigma64, h, device, dtype)
    kmax_dx = 2 * math.pi * (n // 2 - 1) / n
    limit = 2 * math.sqrt(2) / kmax_dx if cfl_max is None else float(cfl_max)
    dx = p["dx"]
    U = torch.tensor([p["U1"], p["U2"]], dtype=dtype, device=device)[:, None, None]
    max_cfl = 0.0

    def check(uv: torch.Tensor, where: str, step: int | None):
        nonlocal max_cfl
        speed = ((uv[0] + U).abs() + uv[1].abs()).amax((-3, -2, -1))          # (B,)
        cfl = speed * (h / dx)
        worst = float(cfl.max())                                               # NaN propagates
        at = f"at output step {step} ({where})" if step is not None else f"on the {where}"
        if not math.isfinite(worst):
            bad = torch.nonzero(~torch.isfinite(cfl)).flatten().tolist()
            raise NonFiniteStateError(
                f"two-layer QG: the state holds NaN/inf {at}, members {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''}; the run blew up (or q0 is not finite).  "
                f"Check q0, reduce dt (now {h:.4g} s) or keep the filter on (filterfac = {p['filterfac']:g})")
        if worst > limit:
            i = int(cfl.argmax())
            s = float(speed[i])
            dt_ok = _floor_sig(limit * dx / s)
            mm = math.ceil(float(out_every) / dt_ok - 1e-9)
            raise StabilityError(
                f"two-layer QG: CFL number {worst:.3g} = max(|u+U|+|v|)*dt/dx exceeds {limit:.3g} "
                f"({'cfl_max' if cfl_max is not None else 'the RK4 imaginary-axis limit 2*sqrt(2)/(k_max dx)'}) "
                f"{at} (member {i}: max(|u+U|+|v|) = {s:.4g} m/s, dt = {h:.4g} s, dx = {dx:.4g} m).  "
                f"Fix: reduce dt to <= {dt_ok:.4g} s (e.g. dt = out_every/{mm} = {float(out_every) / mm:.4g} s)")
        max_cfl = max(max_cfl, worst)

    ph = S.psi(qh)
    check(S.velocities(ph), "initial condition", None)
    want = [f for f in FIELDS if f in fields]
    out = {f: torch.empty(n_members, n_steps, 2, n_obs, n_obs, device=device, dtype=dtype) for f in want}
    obs = (lambda a: a) if n_obs == n else (lambda a: coarse_grain(a, n_obs))
    q_fine = torch.empty(n_members, len(fine), 2, n, n, device=device, dtype=dtype) if fine else None
    slot = {}
    for i, fr in enumerate(fine):
        slot.setdefault(fr, []).append(i)
    pbar = _progress(n_spin + n_steps - 1, progress, "two-layer QG")
    try:
        for j, qh in frames(stepper, qh, S.rhs, n_sub, n_spin + n_steps, pbar):
            if j > 0:
                ph = S.psi(qh)
                uv = S.velocities(ph)
                check(uv, "spin-up" if j < n_spin else "recording", j)
            else:
                uv = S.velocities(ph)
            if j >= n_spin:
                k = j - n_spin
                if "u" in out:
                    out["u"][:, k] = obs(uv[0])
                if "v" in out:
                    out["v"][:, k] = obs(uv[1])
                if "q" in out or "psi" in out or k in slot:
                    qp = S.ifft(torch.stack((qh, ph)))
                    if "q" in out:
                        out["q"][:, k] = obs(qp[0])
                    if "psi" in out:
                        out["psi"][:, k] = obs(qp[1])
                    for i in slot.get(k, ()):
                        q_fine[:, i] = qp[0]
    finally:
        pbar.close()

    xs = (torch.arange(n_obs, dtype=torch.float64) + 0.5) * (p["L"] / n_obs)
    params = dict(kind="qg2", name="two-layer quasi-geostrophic model",
                  configuration="pyqg two-layer reference (Flierl 1978)",
                  equation="d_t q_n + J(psi_n, q_n) + U_n d_x q_n + Qy_n d_x psi_n = "
                           "-delta_n2 rek Lap psi_2 - sigma(K) q_n; q_1 = Lap psi_1 + F1 (psi_2 - psi_1), "
                           "q_2 = Lap psi_2 + F2 (psi_1 - psi_2)",
                  **{k: v for k, v in p.items()},
                  ny=n, dt_requested=float(dt), dt_sim=h, n_sub=n_sub, out_every=float(out_every),
                  spin_up_years=float(spin_up_years), spin_up=n_spin * float(out_every),
                  spin_up_steps=n_spin, seed=int(seed), n_members=int(n_members), n_steps=int(n_steps),
                  ic_amplitude=float(ic_amplitude), cfl_max=("auto" if cfl_max is None else float(cfl_max)),
                  cfl_limit=limit, cfl_observed_max=max_cfl, scheme=SCHEME, dealias="3/2 rule",
                  filter="pyqg exponential filter exp(-filterfac (K dx - 0.65 pi)^4) per filter_timescale, "
                         "applied as an exact linear damping",
                  domain="doubly periodic square [0, L)^2",
                  initial_condition=("user-supplied" if q0 is not None else
                                     f"Gaussian random PV, modes |kx|,|ky| < 16, RMS {ic_amplitude:g} 1/s per layer"))
    if observe is not None:
        params.update(nx=n_obs, ny=n_obs, dx=p["L"] / n_obs, nx_sim=n, dx_sim=dx, observe=n_obs,
                      observation=(f"coarse-grained: the {n}^2 model's fields cut to the Fourier modes "
                                   f"|kx|, |ky| < {n_obs // 2} (sharp spectral truncation, no aliasing) and "
                                   f"evaluated on the cell centres of a {n_obs}^2 grid"))
    res: dict[str, Any] = {f: out[f] for f in want}
    res.update(x=xs.to(device, dtype), y=xs.clone().to(device, dtype),
               t=(torch.arange(n_steps, dtype=torch.float64) * float(out_every)).to(device, dtype),
               q0=q_init.to(device, dtype), q_final=S.ifft(qh), dt_sim=h, cfl_limit=limit, params=params)
    if fine:
        res.update(q_fine=q_fine, fine_frames=torch.tensor(fine, dtype=torch.long))
    return res
