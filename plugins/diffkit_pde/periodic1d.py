"""The 1-D engine shared by :mod:`diffkit_pde.ks` and :mod:`diffkit_pde.burgers`.

ETDRK4 (:mod:`diffkit.etdrk4`) for ``u_t = lin(d_x) u - (u^2/2)_x`` on per-trajectory periodic
domains ``[0, L_i)``: the linear operator ``lin`` is exact, the conservative advection explicit
(optionally 2/3 dealiased), with the stability check and resolution monitor of
:mod:`diffkit_pde.stability`; plus the per-trajectory domain lengths and the random-sine
initial conditions (LPSDA's generator) of both equations.
"""
from __future__ import annotations

import math

import numpy as np
import torch

from diffkit.etdrk4 import ETDRK4, SCHEME, frames, resolve_device_dtype

from .conventions import _n_sub, _progress, _rngs
from .stability import _AdvectiveLimit, _Checker, _warn_resolution


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
    stepper = ETDRK4(lin_fn(k), h[:, None], device, dtype, n_contour)
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
        for j, v in frames(stepper, v, N, n_sub, n_burn + n_steps, pbar):
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
    device, dtype = resolve_device_dtype(device, dtype, u0)
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
