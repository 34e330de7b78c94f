"""Rollout metrics for neural PDE surrogates (torch only; importing this module imports no xarray).

Conventions
-----------
- A rollout is a tensor of shape ``(..., K, C, *spatial)``: leading batch dims (trajectory ``N``,
  member ``M``, ...), ``K`` time steps, ``C`` channels and ``n_spatial`` spatial axes (1-D
  ``(nx,)`` or 2-D ``(nx, ny)``).  Functions taking ``(pred, truth, n_spatial)`` reduce over the
  trailing ``1 + n_spatial`` dims ``(C, *spatial)``, which must be equal in both tensors; the
  leading dims (``K`` included) broadcast, so a truth ``(N, K, C, nx)`` serves a prediction
  ``(N, M, K, C, nx)`` once given a member dim, ``truth[:, None]``, or a truth ``(K, C, nx)`` serves
  any batch of predictions.
- Step ``k = 1..K`` of a rollout is at time ``k * dt`` (step 0, the initial condition, is not
  part of the rollout).
- Everything is computed in float64 on the inputs' device; results come back as float64 when an
  input is float64 and as float32 otherwise.  Inputs may be torch tensors or anything
  :func:`torch.as_tensor` accepts (numpy arrays).

The correlation-time protocol follows PDE-Refiner (Lippe et al. 2023, arXiv:2308.05732): the
Pearson correlation between a rollout and the reference solution at every step, and the time
until it first drops below 0.8.  The ensemble diagnostics (spread, ensemble-mean skill,
spread/skill with the ``sqrt((M+1)/M)`` correction of Fortin et al. 2014, J. Hydrometeor. 15,
1708) and the deterministic RMSE are :mod:`diffkit.ensemble`'s, mapped onto this layout: the
weighted dims are ``(C, *spatial)`` (uniform weights), trajectories pooled with ``pool_dims``
are its sample dims.
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import torch

from diffkit import ensemble as E
from diffkit.errors import ShapeError

__all__ = [
    "pearson_per_step", "high_correlation_time", "never_dropped", "rmse", "nrmse",
    "energy_spectrum", "ensemble_spread", "ensemble_mean_skill", "spread_skill_ratio", "METRICS",
]

_F64 = torch.float64


# ----------------------------------------------------------------------------- helpers
def _tensor(x, what: str) -> torch.Tensor:
    x = torch.as_tensor(x)
    if x.is_complex():
        raise TypeError(f"{what} is complex ({x.dtype}); pass the real field")
    return x


def _out_dtype(*xs: torch.Tensor) -> torch.dtype:
    """float64 if any input is float64, else float32."""
    return _F64 if any(x.dtype == _F64 for x in xs) else torch.float32


def _check_n_spatial(n_spatial, allowed: Sequence[int] | None = None) -> int:
    if isinstance(n_spatial, bool) or not isinstance(n_spatial, int) or n_spatial < 1:
        raise ValueError(f"n_spatial must be a positive int (1 for (nx,), 2 for (nx, ny)), got {n_spatial!r}")
    if allowed is not None and n_spatial not in allowed:
        raise ValueError(f"n_spatial must be one of {tuple(allowed)}, got {n_spatial}")
    return n_spatial


def _field_dims(n_spatial: int) -> tuple[int, ...]:
    """The trailing ``(C, *spatial)`` dims."""
    return tuple(range(-(1 + n_spatial), 0))


def _check_rank(x: torch.Tensor, n_spatial: int, what: str, extra: int = 0) -> None:
    need = 2 + n_spatial + extra
    if x.ndim < need:
        lead = "(M, ..., " if extra else "(..., "
        layout = lead + "K, C, " + ", ".join(f"s{i}" for i in range(n_spatial)) + ")"
        raise ShapeError(f"{what} has shape {tuple(x.shape)} but n_spatial={n_spatial} needs at least {need} dims "
                         f"{layout}; add the missing channel or time dim with .unsqueeze() "
                         f"(e.g. a 1-D rollout (K, nx) becomes (K, 1, nx) with x.unsqueeze(-2))")


def _check_pair(pred: torch.Tensor, truth: torch.Tensor, n_spatial: int,
                names: tuple[str, str] = ("pred", "truth")) -> tuple[int, ...]:
    """Validate two ``(..., K, C, *spatial)`` tensors and return their broadcast shape."""
    a, b = names
    _check_rank(pred, n_spatial, a)
    _check_rank(truth, n_spatial, b)
    nf = 1 + n_spatial
    fix = (f"{b} must have the same trailing (C, *spatial) dims as {a} and leading dims "
           f"(..., K) that broadcast against {a}'s (insert size-1 dims, e.g. truth[:, None] for a member dim)")
    if pred.shape[-nf:] != truth.shape[-nf:]:
        raise ShapeError(f"{a} has shape {tuple(pred.shape)} and {b} has shape {tuple(truth.shape)}: "
                         f"their (C, *spatial) dims {tuple(pred.shape[-nf:])} and {tuple(truth.shape[-nf:])} "
                         f"differ (n_spatial={n_spatial}); {fix}")
    try:
        return tuple(torch.broadcast_shapes(pred.shape, truth.shape))
    except RuntimeError:
        raise ShapeError(f"{a} has shape {tuple(pred.shape)} and {b} has shape {tuple(truth.shape)}: "
                         f"their leading dims do not broadcast; {fix}") from None


# ----------------------------------------------------------------------------- correlation
def pearson_per_step(pred, truth, n_spatial: int) -> torch.Tensor:
    """Pearson correlation between ``pred`` and ``truth`` at every step, over all of ``(C, *spatial)``.

    ``pred`` and ``truth`` are ``(..., K, C, *spatial)`` (leading dims broadcast); the result is
    ``(..., K)``.  Each field is centred by its own mean over ``(C, *spatial)`` (one mean for all
    channels together), as in PDE-Refiner (Lippe et al. 2023, arXiv:2308.05732).  Where either
    field is constant (zero variance) the correlation is undefined and returned as **NaN**; a
    NaN or inf in a field (a diverged rollout) also gives NaN.  :func:`high_correlation_time`
    counts NaN as a drop.
    """
    pred, truth = _tensor(pred, "pred"), _tensor(truth, "truth")
    n_spatial = _check_n_spatial(n_spatial)
    _check_pair(pred, truth, n_spatial)
    out = _out_dtype(pred, truth)
    dims = _field_dims(n_spatial)
    p, t = pred.to(_F64), truth.to(_F64)
    pc = p - p.mean(dims, keepdim=True)
    tc = t - t.mean(dims, keepdim=True)
    cov = (pc * tc).sum(dims)
    r = cov / (pc.square().sum(dims).sqrt() * tc.square().sum(dims).sqrt())
    # exact test for constant fields: rounding in the mean would otherwise give a tiny, meaningless variance
    const = (p.amax(dims) == p.amin(dims)) | (t.amax(dims) == t.amin(dims))
    r = torch.where(const, torch.full_like(r, math.nan), r.clamp(-1.0, 1.0))
    return r.to(out)


def _check_threshold(threshold) -> float:
    threshold = float(threshold)
    if not -1.0 < threshold < 1.0:
        raise ValueError(f"threshold must lie in the open interval (-1, 1), got {threshold}")
    return threshold


def _drops(corr, threshold) -> torch.Tensor:
    corr = _tensor(corr, "corr")
    if corr.ndim < 1 or corr.shape[-1] == 0:
        raise ShapeError(f"corr must have shape (..., K) with K >= 1, got {tuple(corr.shape)}")
    return ~(corr >= _check_threshold(threshold))  # NaN >= x is False: NaN counts as a drop


def high_correlation_time(corr, dt: float = 1.0, threshold: float = 0.8) -> torch.Tensor:
    """Time until the correlation first drops below ``threshold`` (PDE-Refiner's high-correlation time).

    ``corr`` is ``(..., K)`` for steps ``1..K`` (step ``k`` at time ``k*dt``), e.g. from
    :func:`pearson_per_step`; the result is ``(...,)``: the time of the last step before the
    first step with ``corr < threshold`` (NaN counts as a drop; ``corr == threshold`` does not),
    so a drop at step 1 gives 0 and a drop at step ``k`` gives ``(k-1)*dt``.  A curve that never
    drops gives ``K*dt``: that value is **censored** at the rollout horizon (the true time is
    at least ``K*dt``); :func:`never_dropped` says which entries are censored.  Lippe et al.
    (2023, arXiv:2308.05732) use ``threshold = 0.8``.  Average per-trajectory times, or pass
    the trajectory-mean curve, as the protocol requires.
    """
    dt = float(dt)
    if not (dt > 0 and math.isfinite(dt)):
        raise ValueError(f"dt must be a positive finite number, got {dt}")
    drop = _drops(corr, threshold)
    K = drop.shape[-1]
    first = drop.to(torch.uint8).argmax(-1)  # index of the first drop (0 when none)
    steps = torch.where(drop.any(-1), first, torch.full_like(first, K))
    out = _out_dtype(torch.as_tensor(corr))
    return steps.to(out) * dt


def never_dropped(corr, threshold: float = 0.8) -> torch.Tensor:
    """Bool ``(...,)``: True where ``corr`` (``(..., K)``) never drops below ``threshold`` (NaN is a drop),
    i.e. where :func:`high_correlation_time` is censored at the horizon ``K*dt``."""
    return ~_drops(corr, threshold).any(-1)


# ----------------------------------------------------------------------------- errors
def rmse(pred, truth, n_spatial: int) -> torch.Tensor:
    """Root-mean-square error over ``(C, *spatial)`` at every step: ``(..., K)``."""
    pred, truth = _tensor(pred, "pred"), _tensor(truth, "truth")
    n_spatial = _check_n_spatial(n_spatial)
    _check_pair(pred, truth, n_spatial)
    return E.rmse(pred, truth, dims=_field_dims(n_spatial)).to(_out_dtype(pred, truth))


def nrmse(pred, truth, n_spatial: int) -> torch.Tensor:
    """Normalised RMSE ``||pred - truth|| / ||truth||`` (L2 norms over ``(C, *spatial)``) at every step: ``(..., K)``.

    A zero truth field gives ``inf`` (NaN if the prediction is zero too).
    """
    pred, truth = _tensor(pred, "pred"), _tensor(truth, "truth")
    n_spatial = _check_n_spatial(n_spatial)
    _check_pair(pred, truth, n_spatial)
    dims = _field_dims(n_spatial)
    t = truth.to(_F64)
    num = torch.linalg.vector_norm(pred.to(_F64) - t, dim=dims)
    den = torch.linalg.vector_norm(t, dim=dims)
    return (num / den).to(_out_dtype(pred, truth))


# ----------------------------------------------------------------------------- spectra
def _lengths(lengths, n_spatial: int, lead: torch.Size) -> list[torch.Tensor]:
    """One float64 tensor of domain lengths per spatial axis (per-sample lengths only in 1-D)."""
    if n_spatial == 1:
        if isinstance(lengths, (list, tuple)) and len(lengths) == 1:
            lengths = lengths[0]
        L = torch.as_tensor(lengths, dtype=_F64)
        if L.ndim > 0:
            try:
                torch.broadcast_shapes(L.shape, lead)
            except RuntimeError:
                raise ShapeError(f"per-sample lengths of shape {tuple(L.shape)} do not broadcast against the "
                                 f"leading dims {tuple(lead)} of u; pass one length or one per sample") from None
        Ls = [L]
    else:
        L = torch.as_tensor(lengths, dtype=_F64)
        if L.ndim == 0:
            Ls = [L, L]
        elif L.shape == (2,):
            Ls = [L[0], L[1]]
        else:
            raise ShapeError(f"lengths for a 2-D field must be one float or a pair (Lx, Ly), got shape {tuple(L.shape)}")
    for L in Ls:
        if not bool(torch.all(L > 0)) or not bool(torch.all(torch.isfinite(L))):
            raise ValueError(f"domain lengths must be positive and finite, got {lengths!r}")
    return Ls


def energy_spectrum(u, n_spatial: int, lengths=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Energy spectrum of periodic fields ``u`` of shape ``(..., *spatial)``: returns ``(k, E)``, ``E`` is ``(..., nk)``.

    The Fourier coefficients are ``u_hat = fft(u) / n`` (``n`` grid points), so that Parseval
    reads ``sum_k E(k) = mean(u**2)`` over the grid (``E(0) = mean(u)**2``) and a single mode
    ``A sin(2 pi m x / L)`` puts ``A**2/2`` into the bin of ``m``.

    - 1-D: one-sided, ``E(m) = |u_hat_m|**2 + |u_hat_-m|**2`` for ``m = 0..nx//2`` (the Nyquist
      mode of an even grid counted once).
    - 2-D: isotropic shell sum: every mode ``(mx, my)`` goes to the shell ``round(|k| / dk)``;
      shells run up to the largest one occupied (about ``sqrt(2) n/2`` for a square grid), so
      Parseval holds exactly.  Shells beyond ``n//2`` hold only corner modes that a circle
      does not fully cover; truncate at ``n//2 + 1`` bins for the isotropic part.

    ``k`` is the integer mode number ``m`` (as floats) unless ``lengths`` is given, then it is in
    physical units ``2 pi m / L``.  1-D: ``lengths`` is one float or a tensor of per-sample lengths
    broadcasting against the leading dims (then ``k`` is ``(..., nk)``).  2-D: one float or
    ``(Lx, Ly)``; the shell width ``dk`` is ``2 pi / max(Lx, Ly)`` (one mode when ``Lx == Ly``).  Used in PDE-Refiner (Lippe et al. 2023, arXiv:2308.05732) to show which frequencies a
    surrogate resolves.
    """
    n_spatial = _check_n_spatial(n_spatial, allowed=(1, 2))
    u = _tensor(u, "u")
    if u.ndim < n_spatial:
        raise ShapeError(f"u has shape {tuple(u.shape)} but n_spatial={n_spatial} needs at least {n_spatial} dims")
    if min(u.shape[u.ndim - n_spatial:]) == 0:
        raise ShapeError(f"u has shape {tuple(u.shape)} with an empty spatial axis")
    out = _out_dtype(u)
    dev = u.device
    x = u.to(_F64)
    lead = u.shape[: u.ndim - n_spatial]
    if n_spatial == 1:
        nx = u.shape[-1]
        uh = torch.fft.rfft(x, dim=-1) / nx
        m = torch.arange(nx // 2 + 1, dtype=_F64, device=dev)
        w = torch.full_like(m, 2.0)
        w[0] = 1.0
        if nx % 2 == 0:
            w[-1] = 1.0  # Nyquist mode: its own conjugate
        E = uh.abs().square() * w
        if lengths is None:
            k = m
        else:
            (L,) = _lengths(lengths, 1, lead)
            L = L.to(dev)
            k = 2 * math.pi * m / (L[..., None] if L.ndim else L)
        return k.to(out), E.to(out)

    nx, ny = u.shape[-2:]
    uh = torch.fft.fft2(x, dim=(-2, -1)) / (nx * ny)
    P = uh.abs().square()
    mx = torch.fft.fftfreq(nx, d=1.0 / nx, dtype=_F64, device=dev)
    my = torch.fft.fftfreq(ny, d=1.0 / ny, dtype=_F64, device=dev)
    if lengths is None:
        kx, ky, dk = mx, my, 1.0
    else:
        Lx, Ly = (float(L) for L in _lengths(lengths, 2, lead))
        kx, ky = 2 * math.pi * mx / Lx, 2 * math.pi * my / Ly
        dk = 2 * math.pi / max(Lx, Ly)
    shell = torch.round(torch.sqrt(kx[:, None] ** 2 + ky[None, :] ** 2) / dk).to(torch.long).reshape(-1)
    nk = int(shell.max()) + 1
    E = torch.zeros(*lead, nk, dtype=_F64, device=dev)
    E.index_add_(-1, shell, P.reshape(*lead, nx * ny))
    k = torch.arange(nk, dtype=_F64, device=dev) * dk
    return k.to(out), E.to(out)


# ----------------------------------------------------------------------------- ensembles
def _member_dim(ens: torch.Tensor, member_dim: int, n_spatial: int) -> int:
    _check_rank(ens, n_spatial, "ens", extra=1)
    nd = ens.ndim
    if isinstance(member_dim, bool) or not isinstance(member_dim, int):
        raise TypeError(f"member_dim must be an int, got {member_dim!r}")
    d = member_dim + nd if member_dim < 0 else member_dim
    if not 0 <= d < nd - (2 + n_spatial):
        raise ShapeError(f"member_dim={member_dim} of ens with shape {tuple(ens.shape)} is not one of the leading "
                         f"dims before (K, C, *spatial) (n_spatial={n_spatial}); pass the index of the member dim")
    if ens.shape[d] < 2:
        raise ShapeError(f"ens has shape {tuple(ens.shape)}: {ens.shape[d]} member(s) along member_dim={member_dim}; "
                         "an ensemble spread needs at least 2 members")
    return d


def _skill_truth(ens: torch.Tensor, truth: torch.Tensor, d: int, n_spatial: int) -> torch.Tensor:
    """The truth without a size-1 member dim, checked against the ensemble mean's shape."""
    if truth.ndim == ens.ndim:
        if truth.shape[d] != 1:
            raise ShapeError(f"ens has shape {tuple(ens.shape)} and truth has shape {tuple(truth.shape)}: a truth "
                             f"with a member dim must have size 1 there (dim {d}); pass one truth per trajectory")
        truth = truth.squeeze(d)
    mean_shape = ens.shape[:d] + ens.shape[d + 1:]
    if truth.ndim > len(mean_shape):
        raise ShapeError(f"ens has shape {tuple(ens.shape)} and truth has shape {tuple(truth.shape)}: truth has more "
                         f"dims than ens without its member dim {tuple(mean_shape)}; drop the extra dims of truth")
    try:
        _check_pair(ens.select(d, 0), truth, n_spatial, names=("the ensemble mean", "truth"))
    except ShapeError as e:
        raise ShapeError(f"ens has shape {tuple(ens.shape)} (member_dim={d}): {e}") from None
    return truth


def _sample_dims(pool_dims, nd_out: int, shape) -> tuple[int, ...]:
    """``pool_dims`` (dims of the ``(..., K)`` result) as non-negative dims of the layout."""
    if pool_dims is None:
        return ()
    dims = (pool_dims,) if isinstance(pool_dims, int) else tuple(pool_dims)
    if any(isinstance(p, bool) or not isinstance(p, int) or not -nd_out <= p < nd_out for p in dims):
        raise ShapeError(f"pool_dims={pool_dims} do not index the result of shape {tuple(shape)} "
                         f"(the leading dims of ens without its member dim, then K)")
    return tuple(p % nd_out for p in dims)


def ensemble_spread(ens, n_spatial: int, member_dim: int = 0) -> torch.Tensor:
    """Ensemble spread ``sqrt(mean over (C, *spatial) of the member variance)`` (``ddof = 1``).

    ``ens`` is ``(..., M, ..., K, C, *spatial)`` with the members along ``member_dim`` (``M >= 2``);
    the result has the remaining leading dims: ``(..., K)``.  :func:`diffkit.ensemble.spread`.
    """
    ens = _tensor(ens, "ens")
    n_spatial = _check_n_spatial(n_spatial)
    d = _member_dim(ens, member_dim, n_spatial)
    return E.spread(ens, member_dim=d, dims=_field_dims(n_spatial)).to(_out_dtype(ens))


def ensemble_mean_skill(ens, truth, n_spatial: int, member_dim: int = 0) -> torch.Tensor:
    """RMSE of the ensemble mean against ``truth`` at every step: ``(..., K)``.

    ``truth`` broadcasts against ``ens`` without its member dim (or has size 1 there).
    :func:`diffkit.ensemble.ensemble_mean_rmse`.
    """
    ens, truth = _tensor(ens, "ens"), _tensor(truth, "truth")
    n_spatial = _check_n_spatial(n_spatial)
    d = _member_dim(ens, member_dim, n_spatial)
    truth = _skill_truth(ens, truth, d, n_spatial)
    return E.ensemble_mean_rmse(ens, truth, member_dim=d, dims=_field_dims(n_spatial)).to(_out_dtype(ens, truth))


def spread_skill_ratio(ens, truth, n_spatial: int, member_dim: int = 0,
                       pool_dims: int | Sequence[int] | None = None, sqrt_first: bool = True) -> torch.Tensor:
    """Spread-skill ratio ``sqrt((M+1)/M) * spread / skill`` at every step: ``(..., K)``; 1 for a reliable ensemble.

    ``spread`` is :func:`ensemble_spread` and ``skill`` is :func:`ensemble_mean_skill`; the one
    convention of :func:`diffkit.ensemble.spread_skill_ratio`.  For a reliable ensemble of ``M``
    members (truth exchangeable with the members), ``E[(mean - y)^2] = (1 + 1/M) E[s^2]`` with
    the unbiased member variance ``s^2``, hence the factor.  ``pool_dims`` (dims of the
    ``(..., K)`` result, e.g. ``0`` for trajectories) are averaged over before taking the ratio,
    ``mean(spread) / mean(skill)`` (root per trajectory first, as WeatherBench 2 does per init
    time), or ``sqrt(mean spread^2) / sqrt(mean skill^2)`` with ``sqrt_first=False``; either
    avoids the bias of averaging per-trajectory ratios.  Values < 1 mean under-dispersion.
    """
    ens, truth = _tensor(ens, "ens"), _tensor(truth, "truth")
    n_spatial = _check_n_spatial(n_spatial)
    d = _member_dim(ens, member_dim, n_spatial)
    truth = _skill_truth(ens, truth, d, n_spatial)
    nd = ens.ndim - 1  # the layout: ens without its member dim, (..., K, C, *spatial)
    out_shape = torch.broadcast_shapes(ens.shape[:d] + ens.shape[d + 1:], truth.shape)[: nd - 1 - n_spatial]
    sd = _sample_dims(pool_dims, len(out_shape), out_shape)
    r = E.spread_skill_ratio(ens, truth, member_dim=d, dims=_field_dims(n_spatial), sample_dims=sd,
                             sqrt_first=sqrt_first)
    return r.to(_out_dtype(ens, truth))


METRICS = {
    "pde_pearson_per_step": pearson_per_step,
    "pde_high_correlation_time": high_correlation_time,
    "pde_nrmse": nrmse,
    "pde_rmse": rmse,
    "pde_energy_spectrum": energy_spectrum,
    "pde_ensemble_spread": ensemble_spread,
    "pde_spread_skill_ratio": spread_skill_ratio,
}
"""The PDE-convention tensor functions (``n_spatial``, ``(..., K, C, *spatial)``), registered through the
``diffkit_metrics`` hook with the plugin's prefix.  The ensemble scores in the uniform ensemble
convention are the core's ``ensemble_*`` (:mod:`diffkit.ensemble`), which ``diffkit rollout``
computes per step."""
