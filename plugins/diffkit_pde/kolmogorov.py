"""2-D incompressible Navier--Stokes in vorticity form: Kolmogorov flow (Shysheya et al. 2024), ETDRK4.

``Re = 1000``, forcing wavenumber 4, linear drag 0.1 on ``[0, 2 pi]^2``, simulated at ``256^2``
(2/3 dealiased) and coarsened to ``64^2`` (:func:`simulate_kolmogorov`); random initial
vorticity (:func:`kolmogorov_initial_vorticity`), the exact Taylor--Green vortex
(:func:`taylor_green_vorticity`), the spectral divergence and the energy budget of saved states
(:func:`kolmogorov_energy_budget`).  Conventions: :mod:`diffkit_pde.conventions`; stability
check: :mod:`diffkit_pde.stability`.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffkit.etdrk4 import ETDRK4, SCHEME, frames, resolve_device_dtype

from .conventions import _n_burn, _n_sub, _progress, _rngs
from .stability import _AdvectiveLimit, _Checker, _warn_resolution


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
    device, dtype = resolve_device_dtype(device, dtype, omega0)
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
    stepper = ETDRK4(-nu * k2 - drag, h, device, dtype, n_contour)
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
        for j, w in frames(stepper, w, N, n_sub, nb + n_steps, pbar):
            if j > 0:
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
