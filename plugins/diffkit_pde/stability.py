"""Stability and resolution checks of the PDE simulators (ETDRK4, :mod:`diffkit.etdrk4`).

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

import torch

from diffkit.errors import DiffkitError, NonFiniteError
from diffkit.etdrk4 import amplification_factor


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


def _amplification_ok(z: torch.Tensor, w: torch.Tensor, tol: float = 1e-6) -> torch.Tensor:
    """Whether ETDRK4 is stable for ``v' = lam v + mu v`` (``lam`` exact, ``mu`` explicit) with
    ``z = h lam`` (real) and ``w = h mu`` (complex): ``|R(z, w)| <= max(1, e^z) (1 + tol)``, where
    ``R`` is the one-step amplification factor (:func:`diffkit.etdrk4.amplification_factor`).
    ``z`` and ``w`` broadcast; elementwise result."""
    R = amplification_factor(z, w).abs()
    E = torch.exp(torch.as_tensor(z, dtype=torch.float64))
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
