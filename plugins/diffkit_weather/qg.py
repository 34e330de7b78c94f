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
- **Space**: Fourier pseudo-spectral; PV inversion by the exact 2x2 solve per wavenumber; the
  Nyquist row/column are zero.  The Jacobian is computed in advective form ``u q_x + v q_y`` on a
  zero-padded ``3/2 nx`` grid (the 3/2 rule), so it is free of aliasing: the discrete model is a
  Galerkin truncation that conserves energy and enstrophy exactly under the Jacobian, which makes
  the energy budget (:func:`energy_budget`) close with no "numerical" term other than the filter.
  (pyqg does not dealias; it relies on its filter.  The 3/2 rule keeps all of pyqg's modes.)
- **Small-scale dissipation**: pyqg's exponential spectral filter, ``filtr(K) =
  exp(-filterfac (K dx - 0.65 pi)^4)`` for ``K dx > 0.65 pi`` (``filterfac = 23.6``), which
  pyqg multiplies into ``q`` after every ``dt = 7200 s`` step.  Here it is the equivalent linear
  damping rate ``sigma(K) = -ln(filtr(K)) / filter_timescale`` (``filter_timescale = 7200 s``):
  the same damping per 2 h as pyqg, but a property of the equations rather than of the step, so
  results converge as ``dt -> 0`` and the filter's energy loss is a well-defined budget term.
  ``filterfac=0`` switches it off.
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

Public API: :func:`simulate_qg`, :func:`perturb_members`, :func:`linear_modes`,
:func:`linear_growth_rate`, :func:`normal_mode_pv`, :func:`energy_budget`, :func:`to_dataset`,
:func:`write_netcdf`; :class:`StabilityError`, :class:`NonFiniteStateError`; ``DEFAULTS``.
Importing this module does not import xarray.
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Sequence

import numpy as np
import torch

from diffkit.errors import DiffkitError, NonFiniteError
from diffkit.etdrk4 import ETDRK4, SCHEME as ETDRK4_SCHEME, frames, resolve_device_dtype

from .qg_coarse import _check_coarse, coarse_grain

SCHEME = f"{ETDRK4_SCHEME}, filter exact, Jacobian explicit and 3/2-rule dealiased, PV inversion spectral"
DAY = 86400.0
YEAR = 365.0 * DAY
CPHI = 0.65 * math.pi          # pyqg's filter cut-off (in K dx)

#: pyqg's two-layer reference configuration (``pyqg.QGModel`` defaults), SI units
DEFAULTS: dict[str, float] = dict(nx=64, L=1e6, beta=1.5e-11, rd=15e3, delta=0.25, H1=500.0,
                                  U1=0.025, U2=0.0, rek=5.787e-7, filterfac=23.6,
                                  filter_timescale=7200.0)

FIELDS = ("q", "psi", "u", "v")


class StabilityError(DiffkitError, ValueError):
    """The time step violates the advective CFL limit of the scheme, or the run blew up."""


class NonFiniteStateError(StabilityError, NonFiniteError):
    """The simulated state holds NaN or inf."""


# ----------------------------------------------------------------------------- helpers
def _cdtype(dtype):
    return torch.complex128 if dtype == torch.float64 else torch.complex64


def _floor_sig(x: float, digits: int = 4) -> float:
    """``x`` rounded *down* to ``digits`` significant digits (a suggested step that is safe as printed)."""
    if not (x > 0 and math.isfinite(x)):
        return x
    e = math.floor(math.log10(x)) - digits + 1
    return math.floor(x / 10.0 ** e * (1 - 1e-12)) * 10.0 ** e


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)


def _params(nx, L, beta, rd, delta, H1, U1, U2, rek, filterfac, filter_timescale) -> dict:
    p = dict(nx=int(nx), L=float(L), beta=float(beta), rd=float(rd), delta=float(delta), H1=float(H1),
             U1=float(U1), U2=float(U2), rek=float(rek), filterfac=float(filterfac),
             filter_timescale=float(filter_timescale))
    if p["nx"] < 8 or p["nx"] % 2:
        raise ValueError(f"nx must be an even integer >= 8, got {nx}")
    for k in ("L", "rd", "delta", "H1", "filter_timescale"):
        if not (p[k] > 0 and math.isfinite(p[k])):
            raise ValueError(f"{k} must be positive and finite, got {p[k]}")
    for k in ("rek", "filterfac"):
        if not p[k] >= 0:
            raise ValueError(f"{k} must be >= 0, got {p[k]}")
    p["H2"] = p["H1"] / p["delta"]
    p["H"] = p["H1"] + p["H2"]
    p["F1"] = 1.0 / (p["rd"] ** 2 * (1.0 + p["delta"]))
    p["F2"] = p["delta"] * p["F1"]
    p["Qy1"] = p["beta"] + p["F1"] * (p["U1"] - p["U2"])
    p["Qy2"] = p["beta"] - p["F2"] * (p["U1"] - p["U2"])
    p["dx"] = p["L"] / p["nx"]
    return p


def _filter_rate(K: torch.Tensor | np.ndarray, dx: float, filterfac: float, filter_timescale: float):
    """pyqg's filter as a damping rate: ``filterfac (K dx - 0.65 pi)^4 / filter_timescale`` above
    ``K dx = 0.65 pi``, else 0 (``exp(-rate * filter_timescale)`` is pyqg's ``filtr``)."""
    lib = torch if isinstance(K, torch.Tensor) else np
    x = lib.clip(K * dx - CPHI, 0.0, None) if lib is np else torch.clamp(K * dx - CPHI, min=0.0)
    return filterfac * x ** 4 / filter_timescale


def _rfft_weights(n: int) -> torch.Tensor:
    """Parseval weights over the last (rfft) axis: 1 at kx = 0 and Nyquist, 2 elsewhere."""
    w = torch.full((n // 2 + 1,), 2.0, dtype=torch.float64)
    w[0] = 1.0
    w[-1] = 1.0
    return w


class _Spectral:
    """Wavenumbers, PV inversion, linear operators and the dealiased Jacobian on an ``nx^2`` grid.

    Spectral arrays are ``rfft2`` over (y, x) with ``norm="forward"`` (coefficients are Fourier
    amplitudes), shape ``(..., 2, nx, nx//2 + 1)``: rows ``ky``, columns ``kx >= 0``.
    """

    def __init__(self, p: dict, device, dtype):
        n = p["nx"]
        self.n, self.m, self.h = n, 3 * n // 2, n // 2
        self.device, self.dtype, self.cdt = device, dtype, _cdtype(dtype)
        c = 2 * math.pi / p["L"]
        kx = c * torch.arange(n // 2 + 1, dtype=torch.float64)[None, :]
        ky = c * torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
        iy = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
        mask = (torch.arange(n // 2 + 1)[None, :] < n // 2) & (iy.abs() < n // 2)    # no Nyquist
        K2 = kx ** 2 + ky ** 2
        F1, F2 = p["F1"], p["F2"]
        det = K2 * (K2 + F1 + F2)
        inv = torch.where(K2 > 0, 1.0 / torch.where(K2 > 0, det, torch.ones_like(det)), torch.zeros_like(det))
        inv = inv * mask
        self.kx64, self.ky64, self.K2_64, self.mask64 = kx, ky, K2, mask
        self.sigma64 = _filter_rate(K2.sqrt(), p["dx"], p["filterfac"], p["filter_timescale"]) * mask
        # psi = A q with A = M^-1, M = [[-K2 - F1, F1], [F2, -K2 - F2]]
        self.A64 = torch.stack((torch.stack((-(K2 + F2) * inv, -F1 * inv)),
                                torch.stack((-F2 * inv, -(K2 + F1) * inv))))          # (2, 2, n, nk)
        U = torch.tensor([p["U1"], p["U2"]], dtype=torch.float64)[:, None, None]
        Qy = torch.tensor([p["Qy1"], p["Qy2"]], dtype=torch.float64)[:, None, None]
        drag = torch.stack((torch.zeros_like(K2), p["rek"] * K2))                    # + rek K2 psi2
        self.Lq64 = -1j * kx * U                                                     # times q
        self.Lbg64 = -1j * kx * Qy                                                   # times psi
        self.Lpsi64 = self.Lbg64 + drag                                              # times psi
        self.drag64 = drag
        to = lambda t: t.to(device=device, dtype=self.cdt if t.is_complex() else dtype)
        self.A = to(self.A64)
        self.Lq, self.Lpsi = to(self.Lq64 * mask), to(self.Lpsi64 * mask)
        self.mask = mask.to(device)
        self.ikx = to(1j * kx + 0j)
        self.iky = to(1j * ky + 0j)
        self.weights = _rfft_weights(n)

    # -- transforms
    def fft(self, f: torch.Tensor) -> torch.Tensor:
        return torch.fft.rfft2(f, norm="forward") * self.mask

    def ifft(self, fh: torch.Tensor) -> torch.Tensor:
        return torch.fft.irfft2(fh, s=(self.n, self.n), norm="forward")

    def psi(self, qh: torch.Tensor) -> torch.Tensor:
        A = self.A
        q1, q2 = qh[..., 0, :, :], qh[..., 1, :, :]
        return torch.stack((A[0, 0] * q1 + A[0, 1] * q2, A[1, 0] * q1 + A[1, 1] * q2), -3)

    def _resize(self, a: torch.Tensor, m: int) -> torch.Tensor:
        """The modes ``|kx|, |ky| < h`` of a half spectrum ``a`` (``n`` or ``3n/2`` grid) on an ``m``
        grid: zero-padding (``m = 3n/2``) or truncation (``m = n``) for the 3/2 rule."""
        n, h = a.shape[-2], self.h
        out = a.new_zeros(*a.shape[:-2], m, m // 2 + 1)
        out[..., :h, :h] = a[..., :h, :h]
        out[..., m - h + 1:, :h] = a[..., n - h + 1:, :h]
        return out

    def jacobian(self, qh: torch.Tensor, ph: torch.Tensor) -> torch.Tensor:
        """``J(psi, q) = u q_x + v q_y`` (spectral, dealiased by the 3/2 rule)."""
        spec = torch.stack((-self.iky * ph, self.ikx * ph, self.ikx * qh, self.iky * qh))
        f = torch.fft.irfft2(self._resize(spec, self.m), s=(self.m, self.m), norm="forward")
        return self._resize(torch.fft.rfft2(f[0] * f[2] + f[1] * f[3], norm="forward"), self.n)

    def rhs(self, qh: torch.Tensor) -> torch.Tensor:
        """Everything but the filter: ``-J - U q_x - Qy psi_x + drag`` (spectral)."""
        ph = self.psi(qh)
        return self.Lq * qh + self.Lpsi * ph - self.jacobian(qh, ph)

    def velocities(self, ph: torch.Tensor) -> torch.Tensor:
        """(2, ..., 2, n, n): eddy ``u = -psi_y`` and ``v = psi_x`` in physical space."""
        return self.ifft(torch.stack((-self.iky * ph, self.ikx * ph)))


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


# ----------------------------------------------------------------------------- linear theory
def linear_modes(k, l, *, beta: float = 1.5e-11, rd: float = 15e3, delta: float = 0.25,
                 U1: float = 0.025, U2: float = 0.0, rek: float = 5.787e-7, nx: int | None = None,
                 L: float = 1e6, filterfac: float = 23.6, filter_timescale: float = 7200.0) -> dict:
    """Normal modes ``psi_n = Re[psi_hat_n exp(i(k x + l y) + lam t)]`` of the linearised model.

    Per wavenumber (``k``, ``l`` in rad/m, broadcast) the generalised 2x2 eigenproblem
    ``lam M psi = B psi`` with ``M = [[-K^2 - F1, F1], [F2, -K^2 - F2]]`` (so ``q = M psi``) and
    ``B = -i k diag(U) M - i k diag(Qy) + diag(0, rek K^2)``, minus the filter rate
    ``sigma(K)`` when ``nx`` is given (the grid spacing ``L/nx`` enters pyqg's filter).  The
    bottom drag is included (``rek=0`` gives the inviscid Phillips/Flierl problem, whose
    eigenvalues are ``-i k c`` with the classic phase speeds ``c``).
    Returns a dict with ``eigenvalues`` (..., 2) complex (s^-1, the faster-growing first),
    ``growth_rate`` = ``Re lam`` of the first, ``phase_speed`` ``c = i lam / k`` (m/s; its
    imaginary part times ``k`` is the growth rate) and ``psi`` (..., 2) the layer structure of the
    fastest mode (normalised to ``|psi_1| = 1`` when possible).
    """
    k, l = np.broadcast_arrays(np.asarray(k, dtype=np.float64), np.asarray(l, dtype=np.float64))
    K2 = k ** 2 + l ** 2
    F1 = 1.0 / (rd ** 2 * (1.0 + delta))
    F2 = delta * F1
    Qy = np.array([beta + F1 * (U1 - U2), beta - F2 * (U1 - U2)])
    U = np.array([U1, U2])
    ok = K2 > 0
    K2s = np.where(ok, K2, 1.0)
    M = np.empty(k.shape + (2, 2))
    M[..., 0, 0], M[..., 0, 1] = -K2s - F1, F1
    M[..., 1, 0], M[..., 1, 1] = F2, -K2s - F2
    B = -1j * k[..., None, None] * (U[:, None] * M + np.diag(Qy))
    B[..., 1, 1] += rek * K2s
    A = np.linalg.solve(M, B)
    if nx is not None:
        sig = _filter_rate(np.sqrt(K2s), L / nx, filterfac, filter_timescale)
        A = A - sig[..., None, None] * np.eye(2)
    lam, vec = np.linalg.eig(A)
    order = np.argsort(-lam.real, axis=-1)
    lam = np.take_along_axis(lam, order, -1)
    vec = np.take_along_axis(vec, order[..., None, :], -1)
    v = vec[..., :, 0]
    v = v / np.where(np.abs(v[..., :1]) > 1e-300, v[..., :1], 1.0)
    lam = np.where(ok[..., None], lam, 0.0)
    with np.errstate(divide="ignore", invalid="ignore"):
        c = np.where(k != 0, 1j * lam[..., 0] / np.where(k != 0, k, 1.0), np.nan + 0j)
    return {"eigenvalues": lam, "growth_rate": lam[..., 0].real, "phase_speed": c, "psi": v}


def normal_mode_pv(nx: int, modes: Sequence[tuple[int, int]], amplitude: float | Sequence[float] = 1.0, *,
                   phase: float | Sequence[float] = 0.0, L: float = 1e6, **kw) -> torch.Tensor:
    """PV (2, nx, nx) (float64, axes layer, y, x) of a sum of fastest-growing normal modes.

    ``modes``: integer wavenumber pairs ``(i, j)`` (``k = 2 pi i / L``, ``l = 2 pi j / L``,
    ``|i|, |j| < nx/2``); mode ``m`` has upper-layer streamfunction ``amplitude_m cos(k x' + l y'
    + phase_m)`` (m^2/s; ``x'``, ``y'`` measured from grid point 0) and the layer structure of
    :func:`linear_modes` (``kw``: its model parameters).  Each grows as ``exp(growth_rate t)``
    under :func:`simulate_qg` with the same parameters while the amplitude is small.
    """
    n = int(nx)
    amps = np.broadcast_to(np.asarray(amplitude, dtype=np.float64), (len(modes),))
    phs = np.broadcast_to(np.asarray(phase, dtype=np.float64), (len(modes),))
    p = _params(n, L, kw.get("beta", 1.5e-11), kw.get("rd", 15e3), kw.get("delta", 0.25), 500.0,
                kw.get("U1", 0.025), kw.get("U2", 0.0), kw.get("rek", 5.787e-7),
                kw.get("filterfac", 23.6), kw.get("filter_timescale", 7200.0))
    F1, F2 = p["F1"], p["F2"]
    qh = torch.zeros(2, n, n // 2 + 1, dtype=torch.complex128)
    for (i, j), a, ph in zip(modes, amps, phs):
        i, j = int(i), int(j)
        if i < 0 or (i == 0 and j < 0):
            i, j = -i, -j                      # the same real mode
        if (i, j) == (0, 0) or abs(i) >= n // 2 or abs(j) >= n // 2:
            raise ValueError(f"mode {(i, j)} must be nonzero with |i|, |j| < nx/2 = {n // 2}")
        k, l = 2 * math.pi * i / p["L"], 2 * math.pi * j / p["L"]
        psi = linear_modes(k, l, nx=n, L=p["L"], **kw)["psi"]
        K2 = k * k + l * l
        q = np.array([(-K2 - F1) * psi[0] + F1 * psi[1], F2 * psi[0] + (-K2 - F2) * psi[1]])
        c = torch.as_tensor(0.5 * a * np.exp(1j * ph) * q)
        qh[:, j % n, i] += c
        if i == 0:
            qh[:, (-j) % n, 0] += c.conj()
    return torch.fft.irfft2(qh, s=(n, n), norm="forward")


def linear_growth_rate(k, l, **kw) -> np.ndarray:
    """Growth rate (s^-1) of the linear baroclinic instability at wavenumber (``k``, ``l``) rad/m:
    ``max Re lam`` over the two normal modes, i.e. ``k max Im c`` (see :func:`linear_modes` for the
    keywords; drag included by default, the filter when ``nx`` is given).  Negative when stable
    with drag, 0 where neutral and inviscid."""
    return linear_modes(k, l, **kw)["growth_rate"]


# ----------------------------------------------------------------------------- energy budget
def energy_budget(result: dict, *, fd_order: int = 4) -> dict:
    """Energy budget of saved QG states (per member and frame), exact for the discrete model.

    Needs ``result["q"]`` (all frames) and ``result["params"]`` from :func:`simulate_qg`.

    Total (KE + APE) energy per unit mass, domain mean, m^2 s^-2::

        E = (H1 |grad psi1|^2/2 + H2 |grad psi2|^2/2 + H1 F1 (psi1 - psi2)^2/2) / H,

    whose tendency is ``dE/dt = -(1/H) sum_n H_n <psi_n d_t q_n>``.  Term by term (W/kg):
    ``conversion`` (the background-flow terms ``-U_n q_x - Qy_n psi_x``, i.e. baroclinic
    conversion from the mean shear, ``(H1 F1 / H)(U1 - U2) <psi1 d_x psi2>``; the beta parts
    contribute nothing), ``drag`` (``-(H2/H) rek <|grad psi2|^2>``), ``filter`` (the spectral
    filter's loss) and ``nonlinear`` (the Jacobian's: zero to round-off, the dealiased Jacobian
    conserves energy).  ``tendency`` is their sum; ``tendency_fd`` is ``dE/dt`` from centred
    finite differences of ``energy`` over the frames (order ``fd_order`` = 2 or 4; NaN at the
    first and last ``fd_order/2`` frames) and ``residual = tendency_fd - tendency``.
    Returns float64 tensors of shape (n_members, n_steps), also ``kinetic_energy`` and
    ``potential_energy``.
    """
    p = result["params"]
    if p.get("nx_sim", p["nx"]) != p["nx"]:
        raise ValueError(f"energy_budget needs the model's own state, but this result is coarse-grained "
                         f"({p['nx_sim']}^2 model observed on {p['nx']}^2); run simulate_qg without observe")
    q = torch.as_tensor(result["q"]).to(torch.float64)
    S = _Spectral(p, q.device, torch.float64)
    qh = S.fft(q)
    ph = S.psi(qh)
    w = S.weights.to(q.device)
    H, H1, H2, F1 = p["H"], p["H1"], p["H2"], p["F1"]
    Hn = torch.tensor([H1, H2], dtype=torch.float64, device=q.device)[:, None, None]

    def mean_prod(a, b):               # <a b> summed with H_n / H weights over the layers
        return (w * (a.conj() * b).real * Hn / H).sum((-3, -2, -1))

    K2 = S.K2_64.to(q.device)
    ke = 0.5 * mean_prod(ph, K2 * ph)
    d = ph[..., 0, :, :] - ph[..., 1, :, :]
    ape = 0.5 * H1 * F1 / H * (w * d.abs() ** 2).sum((-2, -1))
    dev = lambda t: t.to(q.device)
    conversion = -mean_prod(ph, dev(S.Lq64) * qh + dev(S.Lbg64) * ph)
    drag = -mean_prod(ph, dev(S.drag64) * ph)
    filt = -mean_prod(ph, -dev(S.sigma64) * qh)
    nonlin = -mean_prod(ph, -S.jacobian(qh, ph))
    E = ke + ape
    tend = conversion + drag + filt + nonlin
    tau = float(p["out_every"])
    fd = torch.full_like(E, float("nan"))
    if fd_order == 2 and E.shape[-1] >= 3:
        fd[..., 1:-1] = (E[..., 2:] - E[..., :-2]) / (2 * tau)
    elif fd_order == 4 and E.shape[-1] >= 5:
        fd[..., 2:-2] = (-E[..., 4:] + 8 * E[..., 3:-1] - 8 * E[..., 1:-3] + E[..., :-4]) / (12 * tau)
    elif fd_order not in (2, 4):
        raise ValueError(f"fd_order must be 2 or 4, got {fd_order}")
    return {"energy": E, "kinetic_energy": ke, "potential_energy": ape, "conversion": conversion,
            "drag": drag, "filter": filt, "nonlinear": nonlin, "tendency": tend,
            "tendency_fd": fd, "residual": fd - tend}


# ----------------------------------------------------------------------------- xarray / netCDF
KM_PER_DEG = 111.2


def to_dataset(result: dict, *, lat0: float = 45.0, lon0: float = -30.0,
               start: str = "2000-01-01T00:00:00"):
    """A CF-1.8 :class:`xarray.Dataset` of a :func:`simulate_qg` result on a labelled lat-lon grid.

    Dims ``("time", "level", "latitude", "longitude")`` for a single member; with
    ``n_members > 1`` a leading ``"member"`` dim (CF ``standard_name = "realization"``) is added.
    ``time`` holds datetimes (frame 0 = ``start``; encoded as "hours since 2000-01-01 00:00:00",
    standard calendar); ``level`` is the layer (1 = upper, 2 = lower; ``positive = "down"``, with
    auxiliary ``layer_thickness``, ``depth`` (layer mid-depth) and ``background_eastward_wind``
    U_n).  The square domain is placed with its centre at (``lat0``, ``lon0``): ``latitude =
    lat0 + (y - L/2) / 111.2 km`` and ``longitude = lon0 + (x - L/2) / (111.2 km cos(lat0))``
    (a local tangent-plane labelling, increasing northward/eastward; the model itself is a
    Cartesian beta-plane and *doubly periodic*: longitude and latitude both wrap over the domain,
    not the globe).  ``x``/``y`` in metres are kept as auxiliary coordinates.  Variables:
    ``streamfunction`` (m2 s-1), ``potential_vorticity`` (s-1, QG PV anomaly), ``eastward_wind``
    and ``northward_wind`` (m s-1, eddy velocities; add ``background_eastward_wind`` for the total
    zonal wind) -- those of them present in ``result``.  Model parameters become global attributes.
    """
    import xarray as xr  # lazy: importing the plugin must not import xarray

    from diffkit.adapters import netcdf_attrs

    p = dict(result["params"])
    cpu = lambda a: torch.as_tensor(a).detach().cpu().numpy()
    nm = int(p["n_members"])
    x, y = cpu(result["x"]).astype(np.float64), cpu(result["y"]).astype(np.float64)
    L = float(p["L"])
    lat = lat0 + (y - L / 2) / (KM_PER_DEG * 1e3)
    lon = lon0 + (x - L / 2) / (KM_PER_DEG * 1e3 * math.cos(math.radians(lat0)))
    t = cpu(result["t"]).astype(np.float64)
    times = np.datetime64(start, "ns") + np.round(t * 1e9).astype("timedelta64[ns]")
    H1, H2 = float(p["H1"]), float(p["H2"])
    coords: dict[str, Any] = {
        "time": ("time", times, {"standard_name": "time", "long_name": "time", "axis": "T"}),
        "level": ("level", np.array([1, 2], dtype=np.int32),
                  {"long_name": "layer", "units": "1", "positive": "down", "axis": "Z",
                   "comment": "1 = upper layer, 2 = lower layer"}),
        "latitude": ("latitude", lat, {"standard_name": "latitude", "long_name": "latitude",
                                       "units": "degrees_north", "axis": "Y"}),
        "longitude": ("longitude", lon, {"standard_name": "longitude", "long_name": "longitude",
                                         "units": "degrees_east", "axis": "X"}),
        "y": ("latitude", y, {"standard_name": "projection_y_coordinate", "long_name": "model y (northward)",
                              "units": "m"}),
        "x": ("longitude", x, {"standard_name": "projection_x_coordinate", "long_name": "model x (eastward)",
                               "units": "m"}),
        "layer_thickness": ("level", np.array([H1, H2]), {"long_name": "layer thickness", "units": "m"}),
        "depth": ("level", np.array([H1 / 2, H1 + H2 / 2]),
                  {"standard_name": "depth", "long_name": "layer mid-depth", "units": "m", "positive": "down"}),
        "background_eastward_wind": ("level", np.array([p["U1"], p["U2"]], dtype=np.float64),
                                     {"long_name": "background zonal velocity U_n of the layer", "units": "m s-1"}),
    }
    dims = ("time", "level", "latitude", "longitude")
    if nm > 1:
        dims = ("member",) + dims
        coords["member"] = ("member", np.arange(nm, dtype=np.int32),
                            {"standard_name": "realization", "long_name": "ensemble member", "units": "1"})
    spec = {
        "psi": ("streamfunction", {"long_name": "eddy streamfunction", "units": "m2 s-1"}),
        "q": ("potential_vorticity", {"long_name": "quasi-geostrophic potential vorticity anomaly",
                                      "units": "s-1"}),
        "u": ("eastward_wind", {"standard_name": "eastward_wind", "units": "m s-1",
                                "long_name": "eddy eastward velocity u = -d psi/dy",
                                "comment": "total zonal wind = eastward_wind + background_eastward_wind"}),
        "v": ("northward_wind", {"standard_name": "northward_wind", "units": "m s-1",
                                 "long_name": "eddy northward velocity v = d psi/dx"}),
    }
    dv = {}
    for key, (name, attrs) in spec.items():
        if key in result:
            a = cpu(result[key])
            dv[name] = (dims, a if nm > 1 else a[0], attrs)
    gattrs = {"Conventions": "CF-1.8", "source": "diffkit_weather.qg two-layer quasi-geostrophic model",
              "title": "two-layer quasi-geostrophic simulation (pyqg reference configuration)",
              "grid_note": ("doubly periodic square domain of side L: longitude and latitude both wrap "
                            "over the domain (not the globe); lat/lon label a local tangent plane centred "
                            f"at ({lat0}, {lon0}) with 111.2 km per degree of latitude and 111.2 km "
                            "cos(lat0) per degree of longitude; the dynamics are Cartesian (beta-plane)"),
              "lat0": float(lat0), "lon0": float(lon0),
              "periodic_axes": "latitude longitude",
              **netcdf_attrs(p)}
    ds = xr.Dataset(dv, coords=coords, attrs=gattrs)
    ds["time"].encoding.update(units="hours since 2000-01-01 00:00:00", calendar="standard")
    return ds


def write_netcdf(ds, path) -> Path:
    """Write ``ds`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    from diffkit.adapters import atomic_to_netcdf

    return atomic_to_netcdf(ds, path)
