"""Built-in PDE simulators: batched, pseudo-spectral torch code for CPU and GPU, no downloads.

Three equations, all on periodic domains and all stepped with the fourth-order exponential
time-differencing Runge--Kutta scheme **ETDRK4** of Cox & Matthews (2002) in the form of
Kassam & Trefethen (2005, SIAM J. Sci. Comput. 26, 1214), whose phi functions are evaluated
by a contour integral (mean over ``n_contour`` points of a unit circle around each ``h*lambda``):

- :func:`simulate_ks` -- Kuramoto--Sivashinsky ``u_t + u u_x + u_xx + u_xxxx = 0`` in the
  LPSDA / PDE-Refiner setup (``L = 64`` varied by +-10 % per trajectory, ``nx = 256``, output
  every ``0.2``, random-sine initial conditions, burn-in discarded);
- :func:`simulate_burgers` -- viscous Burgers ``u_t + u u_x = nu u_xx`` (``nx = 128``,
  ``L = 2 pi``, ``nu = 0.01``), with :func:`burgers_cole_hopf` for exact solutions;
- :func:`simulate_kolmogorov` -- 2-D incompressible Navier--Stokes in vorticity form,
  Kolmogorov flow of Shysheya et al. (2024): ``Re = 1000``, forcing wavenumber 4, linear drag
  0.1 on ``[0, 2 pi]^2``, simulated at ``256^2`` (2/3 dealiased) and coarsened to ``64^2``.

Conventions shared by all simulators
------------------------------------
- ``device``/``dtype`` follow the inputs: given an initial condition tensor, its device and dtype
  are used unless overridden; otherwise CPU/float64.  Scheme coefficients are computed once in
  float64 on the CPU and then moved; nothing leaves the device inside the time loop except one
  scalar per *output* step (the stability check below).
- Randomness is drawn per trajectory from ``numpy.random.default_rng([seed, i])``: trajectory
  ``i`` is the same whatever ``n_traj`` is, and a batched run equals the single runs.
- Output frame 0 is the state at the end of the burn-in (``t = burn_in``); frame ``k`` is
  ``k*dt_out`` later.  The internal step is ``dt_out / n_sub`` with ``n_sub = ceil(dt_out/dt)``,
  so the effective step never exceeds the requested ``dt``.
- **Stability check.**  ETDRK4 integrates the linear (diffusive/dispersive) part exactly and the
  advective nonlinearity explicitly.  The advective CFL number ``C = max|u| dt/dx`` (in 2-D
  ``max(|u|+|v|) dt/dx``) is evaluated on the initial condition and after every output step
  (one fused reduction, one host sync per output step) and compared with a limit:

  * ``cfl_max=None`` (default): the frozen-coefficient limit of ETDRK4 for *this* equation, grid
    and step, computed once at set-up -- the largest ``C`` for which the amplification factor of
    every retained mode ``k``, advected at speed ``C dx/dt`` and damped by the exact linear part,
    stays within ``max(1, e^{h lin(k)})``.  Without damping this is RK4's imaginary-axis reach
    2.83 over ``k_max dx``: about 1.4 on a 2/3-dealiased grid (Burgers, Navier--Stokes; 0.9
    undealiased).  The KS hyperdiffusion damps the grid scale, so its limit is larger (about
    5 at ``dt = 0.05`` with ``nx = 256``, ``L = 64``, 10 at ``dt = 1``).  The limit is stored as
    ``result["cfl_limit"]``.  Measured runs stay stable somewhat beyond it (the analysis freezes
    the *maximum* speed everywhere), so it is a safe, not a tight, bound.
  * ``cfl_max=<float>``: a fixed threshold on ``C`` (e.g. 1.0).

  A violation raises :class:`StabilityError` naming the CFL number, the limit, the step and the
  fix ("reduce dt to <= X", X found by bisection for the current speed); NaN/inf in the state
  raises :class:`NonFiniteStateError` (a subclass of it and of diffkit's ``NonFiniteError``)
  naming the output step.
- **Resolution monitor.**  The largest spectral amplitude of the velocity (``u`` in 1-D,
  ``(u, v)`` in 2-D) in the top 10 % of the retained modes, relative to the peak, is tracked over
  the recorded frames (on the device, no sync) and returned as ``result["spectral_tail"]``; above
  ``resolution_tol`` (default 1e-3) a :class:`ResolutionWarning` says the grid under-resolves the
  solution (the tail is of the order of the relative truncation error).
"""
from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Callable, Sequence

import numpy as np
import torch

from diffkit.errors import DiffkitError, NonFiniteError

# the public names are listed once, in diffkit_pde/__init__.py

SCHEME = "ETDRK4 (Cox & Matthews 2002; Kassam & Trefethen 2005 contour-integral phi functions)"


class StabilityError(DiffkitError, ValueError):
    """The time step violates the advective CFL limit of the scheme, or the run blew up."""


class NonFiniteStateError(StabilityError, NonFiniteError):
    """The simulated state holds NaN or inf."""


class ResolutionWarning(UserWarning):
    """The spectrum near the (dealiasing) cutoff is not small: the grid does not resolve the solution."""


def _warn_resolution(name, tail: float, tol: float, hint: str):
    if tol is not None and tail > tol:
        import warnings

        warnings.warn(
            f"{name}: the spectral amplitude near the cutoff reaches {tail:.2g} of the peak (> "
            f"resolution_tol = {tol:g}); the grid under-resolves the solution and the relative "
            f"error is of that order.  {hint}", ResolutionWarning, stacklevel=3)


# ----------------------------------------------------------------------------- common helpers
def _resolve(device, dtype, ref: torch.Tensor | None):
    if device is None:
        device = ref.device if isinstance(ref, torch.Tensor) else "cpu"
    if dtype is None:
        dtype = ref.dtype if isinstance(ref, torch.Tensor) and ref.is_floating_point() else torch.float64
    if dtype not in (torch.float32, torch.float64):
        raise TypeError(f"dtype must be torch.float32 or torch.float64, got {dtype}")
    return torch.device(device), dtype


def _rngs(seed: int, n: int) -> list[np.random.Generator]:
    """One independent generator per trajectory (trajectory i is the same for every n_traj)."""
    return [np.random.default_rng([int(seed), i]) for i in range(n)]


def etdrk4_coefficients(lin: torch.Tensor, h: torch.Tensor | float, n_contour: int = 32) -> dict:
    """ETDRK4 coefficients ``E, E2, Q, f1, f2, f3`` for a diagonal linear operator ``lin``.

    ``lin`` (real, float64) and ``h`` broadcast together.  The phi functions are evaluated as
    means over ``n_contour`` points on the upper half of a unit circle centred on each ``h*lin``
    (Kassam & Trefethen 2005, eq. 2.5 and their ``kursiv.m``), which avoids the cancellation of
    the explicit formulas for small ``h*lin``.  Returned as float64 tensors of the broadcast shape.
    """
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


class _ETDRK4:
    """One ETDRK4 step ``v -> v(t+h)`` for ``v_t = lin*v + N(v)`` with diagonal ``lin``."""

    def __init__(self, lin, h, device, dtype, n_contour=32):
        c = etdrk4_coefficients(lin, h, n_contour)
        for k, t in c.items():
            setattr(self, k, t.to(device=device, dtype=dtype))

    def step(self, v: torch.Tensor, N: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        Nv = N(v)
        a = self.E2 * v + self.Q * Nv
        Na = N(a)
        b = self.E2 * v + self.Q * Na
        Nb = N(b)
        c = self.E2 * a + self.Q * (2 * Nb - Nv)
        Nc = N(c)
        return self.E * v + Nv * self.f1 + 2 * (Na + Nb) * self.f2 + Nc * self.f3


def _n_sub(dt_out_max: float, dt: float) -> int:
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive finite number, got {dt}")
    return max(1, math.ceil(dt_out_max / dt - 1e-9))


def _amplification_ok(z: torch.Tensor, w: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Whether ETDRK4 is stable for ``v' = lam v + mu v`` (``lam`` exact, ``mu`` explicit) with
    ``z = h lam`` (real) and ``w = h mu`` (complex): ``|R(z, w)| <= max(1, e^z) (1 + tol)``, where
    ``R`` is the one-step amplification factor.  ``z`` and ``w`` broadcast; elementwise result."""
    c = etdrk4_coefficients(z, 1.0)
    E, E2, Q, f1, f2, f3 = (c[k] for k in ("E", "E2", "Q", "f1", "f2", "f3"))
    a = E2 + Q * w
    b = E2 + Q * w * a
    cc = E2 * a + Q * w * (2 * b - 1)
    R = (E + f1 * w + 2 * f2 * w * (a + b) + f3 * w * cc).abs()
    return R <= torch.clamp(E, min=1.0) * (1 + tol)


class _AdvectiveLimit:
    """Frozen-coefficient stability limit of ETDRK4 for advection by a speed ``s``.

    Each retained mode ``k`` of the advective term sees ``v' = lin(k) v - i s k v``; with the
    CFL number ``C = s h / dx`` the explicit part is ``w = -i C (k dx)``.  ``lin`` and ``kdx`` are
    (B, K) float64 tensors (one row per trajectory, or a single row), ``dx`` is (B,) or (1,).
    ``limit(h)`` is the largest C for which every mode is stable (capped at ``C_CAP``).
    """

    C_CAP = 100.0

    def __init__(self, lin: torch.Tensor, kdx: torch.Tensor, dx: torch.Tensor):
        self.lin, self.kdx, self.dx = lin, kdx, dx.reshape(-1)

    def _ok(self, h: torch.Tensor, C: torch.Tensor) -> torch.Tensor:
        """(B, nC) stability of C values for per-trajectory steps ``h`` (B, 1)."""
        z = (h * self.lin)[..., None]                          # (B, K, 1)
        w = -1j * C[:, None, :] * self.kdx[..., None]           # (B, K, nC)
        return _amplification_ok(z, w).all(1)

    def limit(self, h) -> torch.Tensor:
        h = torch.as_tensor(h, dtype=torch.float64).reshape(-1, 1).expand(self.lin.shape[0], 1)
        grid = torch.logspace(math.log10(0.05), math.log10(self.C_CAP), 160, dtype=torch.float64)
        ok = self._ok(h, grid.expand(h.shape[0], -1))           # (B, nC)
        first_bad = torch.where(~ok, torch.arange(grid.numel()), grid.numel()).amin(1)
        lo = torch.where(first_bad > 0, grid[(first_bad - 1).clamp(min=0)], torch.zeros(()).double())
        hi = torch.where(first_bad < grid.numel(), grid[first_bad.clamp(max=grid.numel() - 1)],
                         torch.full((), math.inf, dtype=torch.float64))
        done = ~torch.isfinite(hi)
        lo = torch.where(done, torch.full_like(lo, self.C_CAP), lo)
        for _ in range(30):
            mid = torch.where(done, lo, 0.5 * (lo + hi))
            okm = self._ok(h, mid[:, None])[:, 0]
            lo = torch.where(okm & ~done, mid, lo)
            hi = torch.where(~okm & ~done, mid, hi)
        return lo                                               # (B,)

    def max_dt(self, speed: torch.Tensor, h_hi: torch.Tensor) -> torch.Tensor:
        """Largest step <= ``h_hi`` that is stable at ``speed`` (per trajectory, by bisection)."""
        speed = speed.reshape(-1, 1)
        n = max(speed.shape[0], self.lin.shape[0])
        speed = speed.expand(n, 1)
        dx = self.dx.reshape(-1, 1).expand(n, 1)
        lo = torch.zeros_like(speed)
        hi = torch.as_tensor(h_hi, dtype=torch.float64).reshape(-1, 1).expand(n, 1).clone()
        for _ in range(40):
            mid = 0.5 * (lo + hi)
            ok = self._ok(mid, speed * mid / dx)[:, :1]
            lo = torch.where(ok, mid, lo)
            hi = torch.where(ok, hi, mid)
        return lo[:, 0]


class _Checker:
    """CFL / finiteness monitor: one reduction and one host sync per call.

    The CFL number ``C = speed * h / dx`` is compared with ``cfl_max`` (a float) or, when
    ``cfl_max`` is None, with the frozen-coefficient ETDRK4 limit of ``adv`` (per trajectory).
    """

    def __init__(self, name, cfl_max, h, dx, dt_out, adv: _AdvectiveLimit, what="max|u|", dim_hint="nx"):
        self.name = name
        self.h = torch.as_tensor(h, dtype=torch.float64).reshape(-1)   # (B,) or (1,)
        self.dx = torch.as_tensor(dx, dtype=torch.float64).reshape(-1)
        self.dt_out = torch.as_tensor(dt_out, dtype=torch.float64).reshape(-1)
        self.adv, self.what, self.dim_hint = adv, what, dim_hint
        self.auto = cfl_max is None
        self.limit = adv.limit(self.h) if self.auto else torch.full_like(self.h, float(cfl_max))
        self._cache: dict = {}
        self.max_cfl = 0.0

    def _dev(self, x, ref):
        key = (id(x), ref.device, ref.dtype)
        if key not in self._cache:
            self._cache[key] = x.to(ref.device, ref.dtype)
        return self._cache[key]

    def __call__(self, speed: torch.Tensor, where: str, step: int | None = None):
        """``speed``: (B,) maximum advective speed per trajectory, on the device."""
        h, dx, lim = self._dev(self.h, speed), self._dev(self.dx, speed), self._dev(self.limit, speed)
        cfl = speed * h / dx
        worst, mc = torch.stack(((cfl / lim).max(), cfl.max())).tolist()  # NaN propagates through max
        if not math.isfinite(worst):
            bad = torch.nonzero(~torch.isfinite(cfl)).flatten().tolist()
            at = f"at output step {step} ({where})" if step is not None else f"in the {where}"
            raise NonFiniteStateError(
                f"{self.name}: the state holds NaN/inf {at}, trajectories {bad[:10]}"
                f"{' ...' if len(bad) > 10 else ''}; the run blew up.  Reduce dt (now "
                f"{float(self.h.max()):.4g}) or increase {self.dim_hint} to resolve the solution "
                f"(an under-resolved grid scale grows without bound)")
        if worst > 1.0:
            i = int((cfl / lim).argmax())
            pick = lambda t: float(t[i if t.numel() > 1 else 0])
            hi_, dxi, s, c, li = pick(self.h), pick(self.dx), float(speed[i]), float(cfl[i]), pick(self.limit)
            sp = speed.detach().double().cpu().clamp_min(1e-300)
            if self.auto:
                dt_ok = float(self.adv.max_dt(sp, self.h).min())
                how = "the ETDRK4 stability limit for this equation, grid and dt (frozen-coefficient analysis)"
            else:
                dt_ok = float((self.limit * self.dx / sp).min())
                how = "cfl_max"
            dto = float(self.dt_out.max())
            m = math.ceil(dto / dt_ok - 1e-9) if dt_ok > 0 else 0
            at = f"at output step {step} ({where})" if step is not None else f"on the {where}"
            raise StabilityError(
                f"{self.name}: CFL number {c:.3g} = {self.what}*dt/dx exceeds {li:.3g}, {how}, {at} "
                f"(trajectory {i}: {self.what} = {s:.4g}, dt = {hi_:.4g}, dx = {dxi:.4g}).  "
                f"Fix: reduce dt to <= {dt_ok:.4g}" + (f" (e.g. dt = dt_out/{m} = {dto / m:.4g})" if m else "") +
                f", or lower the velocity amplitude (at fixed dt, refining the grid -- a larger "
                f"{self.dim_hint} -- raises the CFL number)")
        self.max_cfl = max(self.max_cfl, mc)
        return worst


def _progress(total: int, enabled: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(total=total, disable=not enabled, desc=desc, unit="step", leave=False)


def _as_L(L, L_jitter, rngs, n_traj) -> torch.Tensor:
    """Per-trajectory domain lengths (float64, CPU).  Scalar ``L`` is jittered by ``L_jitter``.

    One uniform number is drawn per trajectory in every case, so the initial conditions drawn
    afterwards do not depend on whether ``L`` is jittered or given."""
    r = torch.tensor([g.random() for g in rngs], dtype=torch.float64)
    if isinstance(L, (int, float)):
        out = float(L) * (1.0 + float(L_jitter) * (2.0 * r - 1.0))
    else:
        out = torch.as_tensor(L, dtype=torch.float64).detach().cpu().reshape(-1).clone()
        if out.numel() == 1:
            out = out.expand(n_traj).clone()
    if out.numel() != n_traj:
        raise ValueError(f"L has {out.numel()} entries, expected 1 or n_traj = {n_traj}")
    if not bool((out > 0).all()):
        raise ValueError(f"domain lengths must be positive, got {out.tolist()}")
    return out


def _random_sines(rngs, nx, n_modes, l_min, l_max, amplitude) -> tuple[torch.Tensor, dict]:
    """``u0(x) = sum_j A_j sin(2 pi l_j x / L + phi_j)``, ``A ~ U[-a, a]``, ``phi ~ U[0, 2pi)``,
    integer ``l ~ U{l_min..l_max}`` (LPSDA's generator), one set of draws per trajectory."""
    A = np.stack([g.uniform(-amplitude, amplitude, n_modes) for g in rngs])
    phi = np.stack([g.uniform(0.0, 2 * np.pi, n_modes) for g in rngs])
    ll = np.stack([g.integers(l_min, l_max + 1, n_modes) for g in rngs])
    xi = np.arange(nx) / nx  # x / L
    u0 = (A[:, None, :] * np.sin(2 * np.pi * ll[:, None, :] * xi[None, :, None] + phi[:, None, :])).sum(-1)
    return torch.from_numpy(u0), {"amplitudes": A, "phases": phi, "wavenumbers": ll}


# ----------------------------------------------------------------------------- 1-D engine
def _simulate_1d(name, u0, L, lin_fn, *, dt_out, dt, n_steps, n_burn, dealias, cfl_max,
                 stride, progress, device, dtype, n_contour):
    """ETDRK4 for ``u_t = lin(d_x) u - (u^2/2)_x`` on per-trajectory periodic domains.

    ``u0``: (B, nx_sim) on device; ``L``, ``dt_out``: (B,) float64 CPU tensors.
    Returns u (B, n_steps, nx_sim // stride), the effective step h (B,) and n_sub.
    """
    B, nx = u0.shape
    n_sub = _n_sub(float(dt_out.max()), dt)
    h = dt_out / n_sub                                          # (B,)
    n_idx = torch.arange(nx // 2 + 1, dtype=torch.float64)     # rfft mode index
    k = 2 * math.pi * n_idx[None, :] / L[:, None]              # (B, nk)
    stepper = _ETDRK4(lin_fn(k), h[:, None], device, dtype, n_contour)
    kd = k.clone()
    if nx % 2 == 0:
        kd[:, -1] = 0.0                                         # odd derivative: no Nyquist mode
    mask = (n_idx < nx / 3) if dealias else torch.ones_like(n_idx, dtype=torch.bool)
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
    g = (-0.5j * kd * mask).to(device=device, dtype=cdt)
    mask_d = mask.to(device)

    def N(v):
        u = torch.fft.irfft(v, n=nx, norm="forward")
        return g * torch.fft.rfft(u * u, norm="forward")

    dx = L / nx
    adv = _AdvectiveLimit(lin_fn(k), (kd * mask) * dx[:, None], dx)
    check = _Checker(name, cfl_max, h, dx, dt_out, adv)
    check(u0.abs().amax(-1), "initial condition")
    v = torch.fft.rfft(u0, norm="forward")
    if dealias:
        v = v * mask_d
    out = torch.empty(B, n_steps, nx // stride, device=device, dtype=dtype)
    K = math.ceil(nx / 3) if dealias else nx // 2          # retained modes 0..K-1
    band = ((n_idx >= 0.9 * K) & (n_idx < K)).to(device)
    tail = torch.zeros(B, device=device, dtype=dtype)
    pbar = _progress(n_burn + n_steps - 1, progress, name)
    try:
        for j in range(n_burn + n_steps):
            if j > 0:
                for _ in range(n_sub):
                    v = stepper.step(v, N)
                pbar.update(1)
            if j > 0 or n_burn == 0:
                u = torch.fft.irfft(v, n=nx, norm="forward")
                check(u.abs().amax(-1), "burn-in" if j < n_burn else "recording", j)
            if j >= n_burn:
                out[:, j - n_burn] = u[:, ::stride]
                a = v.abs()
                tail = torch.maximum(tail, (a * band).amax(-1) / a.amax(-1).clamp_min(1e-300))
    finally:
        pbar.close()
    check.tail = tail
    return out, h, n_sub, check


def _finish_1d(kind, out, L, dt_out, h, n_sub, n_burn, n_steps, nx_out, params, chk, resolution_tol, hint):
    B = out.shape[0]
    tail = chk.tail.double().cpu()
    _warn_resolution(params["name"], float(tail.max()), resolution_tol, hint)
    t = (n_burn + torch.arange(n_steps, dtype=torch.float64))[None, :] * dt_out[:, None]
    x = L[:, None] * torch.arange(nx_out, dtype=torch.float64)[None, :] / nx_out
    dev, dt_ = out.device, out.dtype
    res = {
        "u": out,
        "x": x.to(dev, dt_), "t": t.to(dev, dt_), "L": L.to(dev, dt_),
        "dt": dt_out.to(dev, dt_), "dx": (L / nx_out).to(dev, dt_),
        "dt_sim": h.to(dev, dt_), "cfl_limit": chk.limit.to(dev, dt_),
        "spectral_tail": tail.to(dev, dt_),
        "params": {"cfl_observed_max": chk.max_cfl, **params, "kind": kind, "n_traj": B,
                   "n_steps": n_steps, "n_sub": n_sub,
                   "burn_in": float(n_burn * float(dt_out.mean())), "burn_in_steps": n_burn,
                   "scheme": SCHEME},
    }
    return res


def _prep_1d(n_traj, u0, L, L_jitter, dt_out, dt_jitter, seed, device, dtype, nx_sim,
             ic_kw):
    device, dtype = _resolve(device, dtype, u0)
    rngs = _rngs(seed, n_traj)
    Ls = _as_L(L, L_jitter, rngs, n_traj)
    dto = torch.tensor([float(dt_out) * (1.0 + float(dt_jitter) * (2.0 * g.random() - 1.0))
                        for g in rngs], dtype=torch.float64)
    ic_info = {}
    if u0 is None:
        u0_, ic_info = _random_sines(rngs, nx_sim, **ic_kw)
    else:
        u0_ = torch.as_tensor(u0).detach()
        if u0_.ndim == 1:
            u0_ = u0_[None]
        if u0_.shape != (n_traj, nx_sim):
            raise ValueError(f"u0 must have shape (n_traj, nx_sim) = {(n_traj, nx_sim)}, got {tuple(u0_.shape)}")
    return device, dtype, Ls, dto, u0_.to(device=device, dtype=dtype), ic_info


def _n_burn(burn_in, dt_out):
    if burn_in < 0:
        raise ValueError(f"burn_in must be >= 0, got {burn_in}")
    return math.ceil(float(burn_in) / float(dt_out) - 1e-9)


# ----------------------------------------------------------------------------- KS
def simulate_ks(n_traj: int, n_steps: int, *, nx: int = 256, L: float | Sequence[float] = 64.0,
                L_jitter: float = 0.1, dt_out: float = 0.2, dt_jitter: float = 0.0, dt: float = 0.05,
                burn_in: float = 100.0, seed: int = 0, u0: torch.Tensor | None = None,
                n_modes: int = 10, l_min: int = 1, l_max: int = 3, amplitude: float = 0.5,
                dealias: bool = False, cfl_max: float | None = None, n_contour: int = 32,
                resolution_tol: float | None = 1e-3, device=None, dtype=None,
                progress: bool = False) -> dict:
    """Kuramoto--Sivashinsky ``u_t + u u_x + u_xx + u_xxxx = 0`` on ``[0, L_i)``, periodic, ETDRK4.

    LPSDA / PDE-Refiner setup: per trajectory ``L_i = L (1 + L_jitter U[-1, 1])`` (scalar ``L``;
    pass a sequence to fix them), ``nx`` points, output every ``dt_out_i = dt_out (1 + dt_jitter
    U[-1,1])`` (LPSDA also jitters the time span by +-10 %; default 0 here) with internal step
    ``dt_out_i / ceil(dt_out/dt)``; initial condition ``sum_{j<n_modes} A_j sin(2 pi l_j x/L_i +
    phi_j)``, ``A ~ U[-amplitude, amplitude]``, ``phi ~ U[0, 2 pi)``, integer ``l`` in
    ``[l_min, l_max]``; the first ``burn_in`` time units are discarded.  ``u0`` (n_traj, nx)
    replaces the random initial condition (then give ``L`` explicitly or ``L_jitter=0``).

    Returns a dict: ``u`` (n_traj, n_steps, nx); per trajectory ``x`` (n_traj, nx), ``t``
    (n_traj, n_steps; absolute time, frame 0 at the end of the burn-in), ``L``, ``dt`` (output
    interval), ``dx``, ``dt_sim`` (internal step); ``u0`` (the initial condition before burn-in)
    and ``params`` (all settings, for :func:`to_dataset`).
    """
    device, dtype, Ls, dto, u0_, ic = _prep_1d(
        n_traj, u0, L, L_jitter, dt_out, dt_jitter, seed, device, dtype, nx,
        dict(n_modes=n_modes, l_min=l_min, l_max=l_max, amplitude=amplitude))
    nb = _n_burn(burn_in, dt_out)
    out, h, n_sub, chk = _simulate_1d("Kuramoto-Sivashinsky", u0_, Ls, lambda k: k ** 2 - k ** 4,
                                 dt_out=dto, dt=dt, n_steps=n_steps, n_burn=nb, dealias=dealias,
                                 cfl_max=cfl_max, stride=1, progress=progress, device=device,
                                 dtype=dtype, n_contour=n_contour)
    params = dict(equation="u_t + u u_x + u_xx + u_xxxx = 0", name="Kuramoto-Sivashinsky", nx=nx,
                  L_nominal=(float(L) if isinstance(L, (int, float)) else float("nan")),
                  L_jitter=float(L_jitter if isinstance(L, (int, float)) else 0.0),
                  dt_out=float(dt_out), dt_jitter=float(dt_jitter), dt_requested=float(dt),
                  seed=int(seed), dealias=bool(dealias), cfl_max=("auto" if cfl_max is None else float(cfl_max)),
                  initial_condition=("user-supplied" if u0 is not None else
                                     f"sum of {n_modes} sines, A~U[-{amplitude},{amplitude}], "
                                     f"phase~U[0,2pi), integer wavenumber l in [{l_min},{l_max}]"))
    res = _finish_1d("ks", out, Ls, dto, h, n_sub, nb, n_steps, nx, params, chk, resolution_tol,
                     "Increase nx (KS needs about 2 grid points per unit length of L).")
    res["u0"] = u0_
    res["ic_params"] = ic   # per-trajectory amplitudes, phases, wavenumbers (numpy; {} for a given u0)
    return res


# ----------------------------------------------------------------------------- Burgers
def simulate_burgers(n_traj: int, n_steps: int, *, nx: int = 128, nx_sim: int | None = None,
                     L: float | Sequence[float] = 2 * math.pi, L_jitter: float = 0.0, nu: float = 0.01,
                     dt_out: float = 0.05, dt: float | None = None, cfl_target: float = 0.5,
                     burn_in: float = 0.0, seed: int = 0, u0: torch.Tensor | None = None,
                     n_modes: int = 3, l_min: int = 1, l_max: int = 3, amplitude: float = 0.5,
                     dealias: bool = True, cfl_max: float | None = None, n_contour: int = 32,
                     resolution_tol: float | None = 1e-3, device=None, dtype=None,
                     progress: bool = False) -> dict:
    """Viscous Burgers ``u_t + u u_x = nu u_xx`` on ``[0, L)``, periodic, pseudo-spectral ETDRK4.

    The diffusion is integrated exactly, the advection (conservative form ``-(u^2/2)_x``, 2/3
    dealiased by default) explicitly.  ``nx_sim`` (a multiple of ``nx``) runs the solver on a finer
    grid and returns every ``nx_sim/nx``-th point; default ``4*nx`` (or the size of ``u0``).  A
    shock of width ~ ``4 nu / jump`` must be resolved: with the defaults (``nu = 0.01``, jumps ~1)
    the relative error against a 4096-point run is 4.5e-2 at ``nx_sim = 128``, 4.5e-3 at 256,
    5e-5 at 512 and 2e-8 at 1024.  The largest spectral amplitude near the dealiasing cutoff
    (relative to the peak; ``result["spectral_tail"]``) tracks that error, and a
    :class:`ResolutionWarning` is issued when it exceeds ``resolution_tol``.
    ``dt=None`` picks ``dt = cfl_target * dx / max|u0|``
    (viscous Burgers obeys a maximum principle, so ``max|u|`` does not grow).  Random initial
    conditions are sums of sines as in :func:`simulate_ks`; ``u0`` (n_traj, nx_sim) replaces them.

    Returns the same dict as :func:`simulate_ks` (``u`` of shape (n_traj, n_steps, nx)).
    """
    if nx_sim is None:
        nx_sim = torch.as_tensor(u0).shape[-1] if u0 is not None else 4 * nx
    nx_sim = int(nx_sim)
    if nx_sim % nx:
        raise ValueError(f"nx_sim = {nx_sim} must be a multiple of nx = {nx}")
    device, dtype, Ls, dto, u0_, ic = _prep_1d(
        n_traj, u0, L, L_jitter, dt_out, 0.0, seed, device, dtype, nx_sim,
        dict(n_modes=n_modes, l_min=l_min, l_max=l_max, amplitude=amplitude))
    if dt is None:
        umax = u0_.abs().amax(-1).double().cpu()
        dxs = Ls / nx_sim
        dt = float((cfl_target * dxs / umax.clamp_min(1e-300)).min())
        dt = min(dt, float(dt_out))
    nb = _n_burn(burn_in, dt_out)
    nu = float(nu)
    out, h, n_sub, chk = _simulate_1d("Burgers", u0_, Ls, lambda k: -nu * k ** 2,
                                 dt_out=dto, dt=dt, n_steps=n_steps, n_burn=nb, dealias=dealias,
                                 cfl_max=cfl_max, stride=nx_sim // nx, progress=progress,
                                 device=device, dtype=dtype, n_contour=n_contour)
    params = dict(equation="u_t + u u_x = nu u_xx", name="Burgers", nx=nx, nx_sim=nx_sim, nu=nu,
                  L_nominal=(float(L) if isinstance(L, (int, float)) else float("nan")),
                  L_jitter=float(L_jitter if isinstance(L, (int, float)) else 0.0),
                  dt_out=float(dt_out), dt_requested=float(dt), seed=int(seed),
                  dealias=bool(dealias), cfl_max=("auto" if cfl_max is None else float(cfl_max)),
                  initial_condition=("user-supplied" if u0 is not None else
                                     f"sum of {n_modes} sines, A~U[-{amplitude},{amplitude}], "
                                     f"phase~U[0,2pi), integer wavenumber l in [{l_min},{l_max}]"))
    res = _finish_1d("burgers", out, Ls, dto, h, n_sub, nb, n_steps, nx, params, chk, resolution_tol,
                     "Increase nx_sim (shocks of width ~ 2 nu / jump need dx below it), increase "
                     "nu or lower the amplitude.")
    res["u0"] = u0_
    res["ic_params"] = ic   # per-trajectory amplitudes, phases, wavenumbers (numpy; {} for a given u0)
    return res


def burgers_cole_hopf(x, t, *, nu: float, a0: float, amplitudes, wavenumbers, phases=None):
    """Exact periodic Burgers solution by the Cole--Hopf transform.

    ``phi(x, t) = a0 + sum_k a_k exp(-nu k^2 t) cos(k x + c_k)`` solves the heat equation
    ``phi_t = nu phi_xx``, and ``u = -2 nu phi_x / phi`` solves ``u_t + u u_x = nu u_xx`` as long
    as ``phi > 0`` (take ``a0 > sum |a_k|``).  ``x`` and ``t`` broadcast; returns ``u``.
    """
    x = torch.as_tensor(x, dtype=torch.float64)
    dev = x.device
    t = torch.as_tensor(t, dtype=torch.float64, device=dev)
    a = torch.as_tensor(amplitudes, dtype=torch.float64, device=dev)
    k = torch.as_tensor(wavenumbers, dtype=torch.float64, device=dev)
    c = torch.zeros_like(a) if phases is None else torch.as_tensor(phases, dtype=torch.float64, device=dev)
    if float(a0) <= float(a.abs().sum()):
        raise ValueError("a0 must exceed sum |a_k| so that phi stays positive")
    x_, t_ = torch.broadcast_tensors(x, t)
    decay = torch.exp(-nu * k ** 2 * t_[..., None])
    arg = k * x_[..., None] + c
    phi = a0 + (a * decay * torch.cos(arg)).sum(-1)
    phi_x = -(a * k * decay * torch.sin(arg)).sum(-1)
    return -2.0 * nu * phi_x / phi


# ----------------------------------------------------------------------------- 2-D Navier-Stokes
def _wavenumbers_2d(n: int):
    """Integer wavenumbers of ``rfft2`` over (x, y) on ``[0, 2 pi)^2``: kx (n, 1), ky (1, n//2+1)."""
    kx = torch.fft.fftfreq(n, d=1.0 / n, dtype=torch.float64)[:, None]
    ky = torch.fft.rfftfreq(n, d=1.0 / n, dtype=torch.float64)[None, :]
    return kx, ky


def _rfft2_weights(n: int) -> torch.Tensor:
    """Parseval weights of a half (rfft) spectrum: 1 on ky = 0 and Nyquist, 2 elsewhere."""
    w = torch.full((1, n // 2 + 1), 2.0, dtype=torch.float64)
    w[0, 0] = 1.0
    if n % 2 == 0:
        w[0, -1] = 1.0
    return w


def _resize_half_spectrum(w: torch.Tensor, m: int) -> torch.Tensor:
    """Copy the modes ``|kx|, |ky| < m/2`` of an ``rfft2`` array (norm="forward") of any size into
    one of size ``m`` (zero-padding or truncating; the Nyquist modes of the target are zero)."""
    n = w.shape[-2]
    out = torch.zeros(*w.shape[:-2], m, m // 2 + 1, dtype=w.dtype, device=w.device)
    K = min((m - 1) // 2, (n - 1) // 2) + 1  # keep |k| <= K-1 in both grids (no Nyquist)
    out[..., :K, :K] = w[..., :K, :K]
    if K > 1:
        out[..., m - K + 1:, :K] = w[..., n - K + 1:, :K]
    return out


def taylor_green_vorticity(n: int, t: float = 0.0, *, nu: float = 1e-3, drag: float = 0.0,
                           amplitude: float = 1.0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Taylor--Green vortex ``omega = 2 a cos x cos y exp(-(2 nu + drag) t)`` on an n x n grid.

    Its stream function is ``psi = a cos x cos y`` (velocity ``u = psi_y = -a cos x sin y``,
    ``v = -psi_x = a sin x cos y``); because ``omega`` is proportional to ``psi`` the advection
    vanishes and, without forcing, the vortex decays at rate ``nu |k|^2 + drag = 2 nu + drag``.
    Array axes are (x, y).
    """
    x = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    om = 2 * amplitude * torch.cos(x)[:, None] * torch.cos(x)[None, :] * math.exp(-(2 * nu + drag) * t)
    return om.to(device=device, dtype=dtype)


def _random_vorticity_hat(g: np.random.Generator, peak_wavenumber: float, rms_velocity: float,
                          K: int = 16) -> torch.Tensor:
    """Random vorticity, rfft2 coefficients (norm="forward") on a 2K grid, modes ``|k_i| < K``."""
    n = 2 * K
    c = torch.from_numpy(np.fft.rfft2(g.standard_normal((n, n)), norm="forward"))
    kx, ky = _wavenumbers_2d(n)
    kk = torch.sqrt(kx ** 2 + ky ** 2)
    c = c * torch.exp(-0.5 * ((kk - peak_wavenumber) / 2.0) ** 2)
    c[0, 0] = 0
    c[n // 2, :] = 0
    c[:, n // 2] = 0
    k2 = torch.where(kk > 0, kk ** 2, torch.ones_like(kk))
    rms2 = float((_rfft2_weights(n) * c.abs() ** 2 / k2).sum())  # mean(u^2 + v^2)
    return c * (rms_velocity / math.sqrt(rms2))


def kolmogorov_initial_vorticity(n_traj: int, n: int, *, seed: int = 0, peak_wavenumber: float = 4.0,
                                 rms_velocity: float = 1.0, dtype=torch.float64, device="cpu") -> torch.Tensor:
    """Random initial vorticity (n_traj, n, n), axes (x, y): a Gaussian random field whose modes
    ``|kx|, |ky| < 16`` are weighted by ``exp(-(|k| - peak)^2 / 8)``, scaled to the given RMS
    speed.  Resolution independent: every ``n`` samples the same band-limited field."""
    hats = torch.stack([_random_vorticity_hat(g, peak_wavenumber, rms_velocity) for g in _rngs(seed, n_traj)])
    om = torch.fft.irfft2(_resize_half_spectrum(hats, n), s=(n, n), norm="forward")
    return om.to(device=device, dtype=dtype)


def simulate_kolmogorov(n_traj: int, n_steps: int, *, n_sim: int = 256, n_out: int = 64,
                        dt_out: float = 0.2, dt: float | None = None, re: float = 1000.0,
                        nu: float | None = None, drag: float = 0.1, k_f: int = 4,
                        forcing_amplitude: float = 1.0, burn_in: float = 10.0, seed: int = 0,
                        omega0: torch.Tensor | None = None, peak_wavenumber: float = 4.0,
                        rms_velocity: float = 1.0, max_velocity: float = 7.0, cfl_target: float = 0.5,
                        cfl_max: float | None = None, coarsen: str = "spectral", n_contour: int = 32,
                        resolution_tol: float | None = 1e-3, device=None, dtype=None,
                        progress: bool = False) -> dict:
    """2-D incompressible Navier--Stokes on ``[0, 2 pi)^2``, Kolmogorov flow (Shysheya et al. 2024).

    Vorticity form ``omega_t + u . grad omega = nu Lap omega - drag omega + f`` with
    ``nu = 1/re``, stream function ``Lap psi = -omega``, ``u = psi_y``, ``v = -psi_x``.
    **Forcing convention** (jax-cfd's ``kolmogorov_forcing``): the velocity forcing is
    ``F = (A sin(k_f y), 0)``, so the vorticity forcing is ``f = curl F = -A k_f cos(k_f y)``
    (``A = forcing_amplitude``, ``k_f = 4``); ``drag`` is the linear damping ``-drag*u``.
    Energy budget (``E = <|u|^2>/2``, ``<.>`` the domain mean): ``dE/dt = <u . F> - nu <omega^2>
    - 2 drag E``, see :func:`kolmogorov_energy_budget`.

    Pseudo-spectral on an ``n_sim^2`` grid with the 2/3 rule (modes ``|kx|, |ky| < n_sim/3``; the
    advection ``div(u omega)`` is then free of aliasing, so the discrete nonlinearity conserves
    energy and enstrophy exactly), ETDRK4 in time (viscosity and drag exact, constant forcing
    exact).  ``dt=None`` picks ``dt = cfl_target * dx / max_velocity`` (jax-cfd's
    ``stable_time_step`` with ``max_velocity = 7``).  The output is coarsened to ``n_out^2`` by
    spectral truncation (``coarsen="spectral"``, keeps ``|k| < n_out/2``: divergence-free to
    round-off) or by block averaging (``"block"``; then ``x``, ``y`` are block centres).
    ``omega0`` (n_traj, n, n) on any even grid replaces the random initial condition
    (:func:`kolmogorov_initial_vorticity`); it is resampled spectrally to ``n_sim``.

    Returns a dict: ``state`` (n_traj, n_steps, 2, n_out, n_out) = (u, v); ``u``, ``v`` (views of
    it) and ``omega`` (n_traj, n_steps, n_out, n_out) with array axes (x, y); ``x``, ``y``
    (n_out,), ``t`` (n_steps,), ``dt``, ``dt_sim``, ``omega0`` (on the simulation grid) and
    ``params``.
    """
    device, dtype = _resolve(device, dtype, omega0)
    if n_sim % 2 or n_out % 2:
        raise ValueError("n_sim and n_out must be even")
    if n_out > n_sim:
        raise ValueError(f"n_out = {n_out} must not exceed n_sim = {n_sim}")
    if coarsen not in ("spectral", "block"):
        raise ValueError(f"coarsen must be 'spectral' or 'block', got {coarsen!r}")
    if coarsen == "block" and n_sim % n_out:
        raise ValueError(f"block averaging needs n_sim ({n_sim}) to be a multiple of n_out ({n_out})")
    nu = 1.0 / float(re) if nu is None else float(nu)
    n, m = n_sim, n_out
    dx = 2 * math.pi / n
    cdt = torch.complex128 if dtype == torch.float64 else torch.complex64

    if omega0 is None:
        w0 = torch.stack([_random_vorticity_hat(g, peak_wavenumber, rms_velocity) for g in _rngs(seed, n_traj)])
        w0 = _resize_half_spectrum(w0, n)
    else:
        om0 = torch.as_tensor(omega0).detach()
        if om0.ndim == 2:
            om0 = om0[None]
        if om0.shape[0] != n_traj or om0.shape[-1] != om0.shape[-2]:
            raise ValueError(f"omega0 must have shape (n_traj, n, n) with n_traj = {n_traj}, got {tuple(om0.shape)}")
        w0 = _resize_half_spectrum(torch.fft.rfft2(om0.to(torch.float64).cpu(), norm="forward"), n)
    kx, ky = _wavenumbers_2d(n)
    k2 = kx ** 2 + ky ** 2
    mask = (kx.abs() < n / 3) & (ky.abs() < n / 3)
    inv_k2 = torch.where(k2 > 0, 1.0 / torch.where(k2 > 0, k2, torch.ones_like(k2)), torch.zeros_like(k2))
    yy = 2 * math.pi * torch.arange(n, dtype=torch.float64) / n
    f_phys = (-forcing_amplitude * k_f * torch.cos(k_f * yy))[None, :].expand(n, n)
    f_hat = torch.fft.rfft2(f_phys, norm="forward") * mask
    w = (w0 * mask).to(device=device, dtype=cdt)

    if dt is None:
        dt = cfl_target * dx / float(max_velocity)
    n_sub = _n_sub(float(dt_out), dt)
    h = float(dt_out) / n_sub
    stepper = _ETDRK4(-nu * k2 - drag, h, device, dtype, n_contour)
    ikx = (1j * kx).to(device=device, dtype=cdt)
    iky = (1j * ky).to(device=device, dtype=cdt)
    inv_k2_d = inv_k2.to(device=device, dtype=dtype)
    mask_d = mask.to(device)
    f_hat_d = f_hat.to(device=device, dtype=cdt)

    def fields(w):  # (u, v, omega) on the simulation grid, stacked (3, B, n, n)
        psi = w * inv_k2_d
        return torch.fft.irfft2(torch.stack((iky * psi, -ikx * psi, w)), s=(n, n), norm="forward")

    def N(w):
        u, v, om = fields(w)
        p = torch.fft.rfft2(torch.stack((u * om, v * om)), norm="forward")
        return (f_hat_d - (ikx * p[0] + iky * p[1])) * mask_d

    # coarse-grid operators
    kxc, kyc = _wavenumbers_2d(m)
    k2c = kxc ** 2 + kyc ** 2
    inv_k2c = torch.where(k2c > 0, 1.0 / torch.where(k2c > 0, k2c, torch.ones_like(k2c)),
                          torch.zeros_like(k2c)).to(device=device, dtype=dtype)
    ikxc = (1j * kxc).to(device=device, dtype=cdt)
    ikyc = (1j * kyc).to(device=device, dtype=cdt)
    f = n // m

    def coarse(w, fine):
        if coarsen == "block":
            return fine.reshape(3, n_traj, m, f, m, f).mean((3, 5))
        wc = _resize_half_spectrum(w, m)
        psi = wc * inv_k2c
        return torch.fft.irfft2(torch.stack((ikyc * psi, -ikxc * psi, wc)), s=(m, m), norm="forward")

    nn = torch.arange(math.ceil(n / 3), dtype=torch.float64)[None, :]   # max(|kx|, |ky|) of retained modes
    adv = _AdvectiveLimit(-(nu * nn ** 2 + drag), nn * dx, torch.tensor([dx], dtype=torch.float64))
    check = _Checker("Kolmogorov flow", cfl_max, h, dx, dt_out, adv, what="max(|u|+|v|)", dim_hint="n_sim")
    speed = lambda fl: (fl[0].abs() + fl[1].abs()).amax((-2, -1))
    fl = fields(w)
    check(speed(fl), "initial condition")
    nb = _n_burn(burn_in, dt_out)
    state = torch.empty(n_traj, n_steps, 2, m, m, device=device, dtype=dtype)
    omega = torch.empty(n_traj, n_steps, m, m, device=device, dtype=dtype)
    K = math.ceil(n / 3)
    kmax = torch.maximum(kx.abs(), ky.abs())
    band = ((kmax >= 0.9 * K) & (kmax < K)).to(device)
    inv_k_d = inv_k2.sqrt().to(device=device, dtype=dtype)
    tail = torch.zeros(n_traj, device=device, dtype=dtype)
    pbar = _progress(nb + n_steps - 1, progress, "Kolmogorov flow")
    try:
        for j in range(nb + n_steps):
            if j > 0:
                for _ in range(n_sub):
                    w = stepper.step(w, N)
                pbar.update(1)
                fl = fields(w)
                check(speed(fl), "burn-in" if j < nb else "recording", j)
            if j >= nb:
                c = coarse(w, fl)
                state[:, j - nb] = c[:2].transpose(0, 1)
                omega[:, j - nb] = c[2]
                a = w.abs() * inv_k_d                          # |velocity| of each mode
                tail = torch.maximum(tail, (a * band).amax((-2, -1)) / a.amax((-2, -1)).clamp_min(1e-300))
    finally:
        pbar.close()
    tail = tail.double().cpu()
    _warn_resolution("Kolmogorov flow", float(tail.max()), resolution_tol,
                     "Increase n_sim (or lower re).")

    xs = 2 * math.pi * torch.arange(m, dtype=torch.float64) / m
    if coarsen == "block":
        xs = xs + (f - 1) / 2 * dx
    t = (nb + torch.arange(n_steps, dtype=torch.float64)) * float(dt_out)
    params = dict(kind="kolmogorov", name="Kolmogorov flow",
                  equation="omega_t + u.grad(omega) = nu Lap(omega) - drag omega + f, "
                           "f = -A k_f cos(k_f y) (velocity forcing (A sin(k_f y), 0))",
                  re=1.0 / nu, nu=nu, drag=float(drag), k_f=int(k_f), forcing_amplitude=float(forcing_amplitude),
                  n_sim=n, n_out=m, coarsen=coarsen, dealias=True, dt_out=float(dt_out), dt_requested=float(dt),
                  n_sub=n_sub, burn_in=nb * float(dt_out), burn_in_steps=nb, seed=int(seed),
                  cfl_max=("auto" if cfl_max is None else float(cfl_max)), cfl_limit=float(check.limit[0]),
                  cfl_observed_max=check.max_cfl, n_traj=n_traj, n_steps=n_steps, scheme=SCHEME,
                  domain="[0, 2 pi)^2",
                  initial_condition=("user-supplied" if omega0 is not None else
                                     f"Gaussian random vorticity, |k| ~ {peak_wavenumber}, "
                                     f"rms speed {rms_velocity}"))
    return {"state": state, "u": state[:, :, 0], "v": state[:, :, 1], "omega": omega,
            "x": xs.to(device, dtype), "y": xs.to(device, dtype), "t": t.to(device, dtype),
            "dt": float(dt_out), "dt_sim": h, "spectral_tail": tail.to(device, dtype),
            "omega0": torch.fft.irfft2(w0 * mask, s=(n, n), norm="forward").to(device, dtype),
            "params": params}


def spectral_divergence(u: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """``du/dx + dv/dy`` of fields on ``[0, 2 pi)^2`` (axes (..., x, y)), computed spectrally."""
    n = u.shape[-1]
    kx, ky = _wavenumbers_2d(n)
    cdt = torch.complex128 if u.dtype == torch.float64 else torch.complex64
    ikx = (1j * kx).to(u.device, cdt)
    iky = (1j * ky).to(u.device, cdt)
    iky = iky.clone()
    ikx = ikx.clone()
    ikx[n // 2] = 0   # Nyquist: odd derivative undefined
    iky[:, -1] = 0
    d = ikx * torch.fft.rfft2(u, norm="forward") + iky * torch.fft.rfft2(v, norm="forward")
    return torch.fft.irfft2(d, s=(n, n), norm="forward")


def kolmogorov_energy_budget(result: dict) -> dict:
    """Spectral energy budget of saved Kolmogorov-flow states.

    From ``result["omega"]`` (and the parameters) computes, per trajectory and output step,
    the kinetic energy ``E = <|u|^2>/2 = 1/2 sum |omega_k|^2/|k|^2``, the enstrophy
    ``Z = <omega^2>/2``, the forcing power ``P = <u . F>``, the viscous dissipation
    ``eps = nu <|grad u|^2> = 2 nu Z`` and the drag loss ``2 drag E``; ``dEdt = P - eps - 2 drag E``
    is what ``dE/dt`` must equal.  Exact for the simulated (dealiased) system when every retained
    mode survives the coarsening, i.e. ``n_out >= 2/3 n_sim`` (e.g. 96 -> 64).
    """
    p = result["params"]
    om = result["omega"].to(torch.float64)
    m = om.shape[-1]
    kx, ky = _wavenumbers_2d(m)
    k2 = kx ** 2 + ky ** 2
    inv_k2 = torch.where(k2 > 0, 1.0 / torch.where(k2 > 0, k2, torch.ones_like(k2)), torch.zeros_like(k2))
    wts = _rfft2_weights(m)
    dev = om.device
    inv_k2, wts = inv_k2.to(dev), wts.to(dev)
    wh = torch.fft.rfft2(om, norm="forward")
    a2 = wts * wh.abs() ** 2
    E = 0.5 * (a2 * inv_k2).sum((-2, -1))
    Z = 0.5 * a2.sum((-2, -1))
    u_hat = (1j * ky.to(dev)) * wh * inv_k2           # u = psi_y
    yy = 2 * math.pi * torch.arange(m, dtype=torch.float64, device=dev) / m
    Fx = torch.fft.rfft2((p["forcing_amplitude"] * torch.sin(p["k_f"] * yy))[None, :].expand(m, m), norm="forward")
    P = (wts * (u_hat * Fx.conj()).real).sum((-2, -1))
    eps = 2 * p["nu"] * Z
    drag = 2 * p["drag"] * E
    return {"energy": E, "enstrophy": Z, "forcing_power": P, "dissipation": eps, "drag_loss": drag,
            "dEdt": P - eps - drag}


# ----------------------------------------------------------------------------- xarray / netCDF
def _attr(v):
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (int, float, str)):
        return v
    return str(v)


def to_dataset(result: dict, kind: str | None = None):
    """A CF-1.8 :class:`xarray.Dataset` of a simulator result.

    ``kind`` is ``"ks"``, ``"burgers"`` or ``"kolmogorov"`` (default: ``result["params"]["kind"]``).
    1-D: dims ``(trajectory, time, x)``, variable ``u``, per-trajectory variables ``L``, ``dx``,
    ``dt`` (output interval) and ``dt_sim``.  When all trajectories share the domain length the
    ``x`` coordinate is the position; otherwise ``x`` is the position divided by ``L`` and the
    auxiliary coordinate ``x_position(trajectory, x)`` holds the positions (likewise ``time`` vs
    ``t(trajectory, time)`` for jittered output intervals).  2-D: dims ``(trajectory, time, x, y)``,
    variables ``u``, ``v``, ``omega``.  All quantities are nondimensional (units ``"1"``).
    Simulation parameters become global attributes.
    """
    import xarray as xr  # lazy: importing the plugin must not import xarray

    p = dict(result["params"])
    kind = kind or p.get("kind")
    if kind not in ("ks", "burgers", "kolmogorov"):
        raise ValueError(f"kind must be 'ks', 'burgers' or 'kolmogorov', got {kind!r}")
    cpu = lambda a: torch.as_tensor(a).detach().cpu().numpy()
    attrs = {"Conventions": "CF-1.8", "source": "diffkit_pde simulators",
             "title": f"{p.get('name', kind)} simulation",
             **{k: _attr(v) for k, v in p.items() if v is not None}}
    ntr = int(p["n_traj"])
    coords: dict[str, Any] = {
        "trajectory": ("trajectory", np.arange(ntr), {"long_name": "trajectory index"})}
    if kind == "kolmogorov":
        for ax, nm in (("x", "X"), ("y", "Y")):
            coords[ax] = (ax, cpu(result[ax]), {"long_name": f"{ax} coordinate", "units": "1", "axis": nm})
        coords["time"] = ("time", cpu(result["t"]), {"long_name": "time (nondimensional)", "units": "1", "axis": "T"})
        dims = ("trajectory", "time", "x", "y")
        dv = {
            "u": (dims, cpu(result["u"]), {"long_name": "x component of velocity", "units": "1"}),
            "v": (dims, cpu(result["v"]), {"long_name": "y component of velocity", "units": "1"}),
            "omega": (dims, cpu(result["omega"]), {"long_name": "vorticity (dv/dx - du/dy)", "units": "1"}),
        }
        xs = cpu(result["x"])
        per = lambda v: np.full(ntr, float(v))
        dv["dt"] = ("trajectory", per(result["dt"]), {"long_name": "output time interval", "units": "1"})
        dv["dx"] = ("trajectory", per(xs[1] - xs[0]), {"long_name": "grid spacing", "units": "1"})
        dv["dt_sim"] = ("trajectory", per(result["dt_sim"]), {"long_name": "internal ETDRK4 time step", "units": "1"})
        # the state a surrogate learns by default (Shysheya et al. 2024); omega is derived from it
        attrs["state_variables"] = "u,v"
        return xr.Dataset(dv, coords=coords, attrs=attrs)

    u = cpu(result["u"])
    L, t = cpu(result["L"]), cpu(result["t"])
    nx = u.shape[-1]
    dims = ("trajectory", "time", "x")
    uattrs = {"long_name": "u", "units": "1"}
    if np.allclose(L, L[0], rtol=0, atol=0):
        coords["x"] = ("x", cpu(result["x"])[0], {"long_name": "position", "units": "1", "axis": "X"})
    else:
        coords["x"] = ("x", np.arange(nx) / nx, {"long_name": "position divided by the domain length L",
                                                  "units": "1", "axis": "X"})
        coords["x_position"] = (("trajectory", "x"), cpu(result["x"]), {"long_name": "position", "units": "1"})
    if np.allclose(t, t[:1], rtol=0, atol=0):
        coords["time"] = ("time", t[0], {"long_name": "time (nondimensional)", "units": "1", "axis": "T"})
    else:
        coords["time"] = ("time", np.arange(t.shape[1]), {"long_name": "output step index", "units": "1", "axis": "T"})
        coords["t"] = (("trajectory", "time"), t, {"long_name": "time (nondimensional)", "units": "1"})
    dv = {
        "u": (dims, u, uattrs),
        "L": ("trajectory", L, {"long_name": "domain length", "units": "1"}),
        "dx": ("trajectory", cpu(result["dx"]), {"long_name": "grid spacing", "units": "1"}),
        "dt": ("trajectory", cpu(result["dt"]), {"long_name": "output time interval", "units": "1"}),
        "dt_sim": ("trajectory", cpu(result["dt_sim"]), {"long_name": "internal ETDRK4 time step", "units": "1"}),
    }
    return xr.Dataset(dv, coords=coords, attrs=attrs)


def write_netcdf(ds, path) -> Path:
    """Write ``ds`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    from diffkit.adapters import atomic_to_netcdf

    return atomic_to_netcdf(ds, path)
