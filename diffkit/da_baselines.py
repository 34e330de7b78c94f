"""Classical data-assimilation baselines: optimal interpolation and the stochastic ensemble Kalman filter.

The references a learned assimilation method is compared with (``benchmarks/assimilation_ks.py``).
Everything works on **flattened state vectors** ``x`` of length ``d`` (float64): a domain flattens
its states, builds its observation matrix ``H`` (``(p, d)``, :func:`selection_matrix` for observed
points) and, for the filter, supplies the forecast step ``forecast(ensemble (M, d)) -> (M, d)``
(its own simulator); nothing here knows what the state is.

- :func:`optimal_interpolation` (OI / BLUE): the analysis of one state from a Gaussian background
  ``N(m, B)`` and observations ``y = H x + e``, ``e ~ N(0, R)``:
  ``x_a = m + K (y - H m)``, ``K = B H^T (H B H^T + R)^-1``, ``P_a = B - K H B``.  With the
  climatological ``B`` (:func:`gaussian_statistics` of training states) this is the per-state
  baseline; :func:`gaussian_samples` draws an ensemble from ``N(x_a, P_a)`` for spread and CRPS.
  Exact: it is the posterior of the linear-Gaussian model.
- :func:`enkf`: the stochastic EnKF with perturbed observations (Evensen 1994; Burgers, van
  Leeuwen & Evensen 1998).  Each cycle forecasts the ensemble, inflates its anomalies
  multiplicatively (``x_i <- xbar + lambda (x_i - xbar)``), and updates every member with its own
  perturbed observations ``y + e_i``, ``e_i ~ N(0, R)``, through the gain of the sample covariance
  (optionally Schur-multiplied by a localisation matrix, e.g. :func:`gaspari_cohn` of the
  distances).  For a linear model and ``M -> infinity`` it converges to the Kalman filter
  (:func:`kalman_filter`, the exact reference, with the same inflation of ``P_f``).
- :func:`tune_inflation`: the inflation of a small grid with the lowest score (e.g. the analysis
  RMSE on a validation trajectory).
"""
from __future__ import annotations

import math
from typing import Callable, Sequence

import torch

from .errors import DiffkitError, ShapeError

__all__ = ["DAError", "Analysis", "gaussian_statistics", "selection_matrix", "optimal_interpolation",
           "gaussian_samples", "gaspari_cohn", "enkf_analysis", "enkf", "kalman_filter", "tune_inflation"]

_F64 = torch.float64


class DAError(DiffkitError, ValueError):
    """A data-assimilation baseline was called with inputs it cannot use."""


class Analysis(tuple):
    """``(mean, cov)`` of a Gaussian analysis (a tuple, so ``x_a, P_a = optimal_interpolation(...)``)."""

    def __new__(cls, mean, cov):
        return super().__new__(cls, (mean, cov))

    @property
    def mean(self) -> torch.Tensor:
        return self[0]

    @property
    def cov(self) -> torch.Tensor:
        return self[1]


# ----------------------------------------------------------------------------- checks
def _vec(x, what: str) -> torch.Tensor:
    t = torch.as_tensor(x).to(_F64)
    if not bool(torch.isfinite(t).all()):
        raise DAError(f"{what} holds NaN or inf; give finite values")
    return t


def _matrix(H, d: int) -> torch.Tensor:
    H = _vec(H, "the observation matrix H")
    if H.ndim != 2 or H.shape[1] != d:
        raise ShapeError(f"the observation matrix H has shape {tuple(H.shape)}, expected (p, {d}) for states of "
                         f"length {d}; build it with selection_matrix(index, {d}) for observed points")
    return H


def _obs_cov(R, p: int, device) -> torch.Tensor:
    """``R`` as a ``(p, p)`` covariance from a float (one variance), ``(p,)`` variances or a ``(p, p)`` matrix."""
    R = _vec(R, "the observation-error covariance R").to(device)
    if R.ndim == 0:
        R = R.expand(p)
    if R.ndim == 1:
        if R.shape[0] != p:
            raise ShapeError(f"R has {R.shape[0]} variances but there are {p} observations; give one per observation "
                             f"(or a float)")
        if bool((R <= 0).any()):
            raise DAError(f"the observation-error variances R must be > 0, got values down to {float(R.min()):g}; "
                          f"give variances (sigma_y ** 2), not zero")
        return torch.diag(R)
    if R.shape != (p, p):
        raise ShapeError(f"R has shape {tuple(R.shape)}, expected a float, ({p},) variances or a ({p}, {p}) matrix")
    if not bool(torch.allclose(R, R.T)) or float(torch.linalg.eigvalsh(R).min()) <= 0:
        raise DAError("the observation-error covariance R must be symmetric positive definite")
    return R


def _cov(B, d: int, what: str) -> torch.Tensor:
    B = _vec(B, what)
    if B.shape != (d, d):
        raise ShapeError(f"{what} has shape {tuple(B.shape)}, expected ({d}, {d}) for states of length {d}")
    return B


def _solve_spd(S: torch.Tensor, rhs: torch.Tensor) -> torch.Tensor:
    """``S^-1 rhs`` for a symmetric positive definite ``S`` (Cholesky)."""
    L = torch.linalg.cholesky(0.5 * (S + S.T))
    return torch.cholesky_solve(rhs, L)


# ----------------------------------------------------------------------------- statistics and operators
def gaussian_statistics(states) -> Analysis:
    """Mean ``(d,)`` and covariance ``(d, d)`` (``ddof = 1``) of ``states`` ``(n, d)``, e.g. the
    climatological background of optimal interpolation from training states."""
    X = _vec(states, "states")
    if X.ndim != 2 or X.shape[0] < 2:
        raise ShapeError(f"states have shape {tuple(X.shape)}, expected (n, d) with n >= 2 samples")
    m = X.mean(0)
    A = X - m
    return Analysis(m, A.T @ A / (X.shape[0] - 1))


def selection_matrix(index, d: int) -> torch.Tensor:
    """The ``(p, d)`` matrix that picks the entries ``index`` (flat indices or a boolean mask of length
    ``d``) of a state vector: the observation matrix of observed points."""
    idx = torch.as_tensor(index)
    if idx.dtype == torch.bool:
        if idx.numel() != d:
            raise ShapeError(f"the mask has {idx.numel()} entries, expected {d} (one per state entry)")
        idx = idx.reshape(-1).nonzero().reshape(-1)
    idx = idx.reshape(-1).long()
    if idx.numel() and (int(idx.min()) < 0 or int(idx.max()) >= d):
        raise ShapeError(f"observation indices must be in 0..{d - 1}, got {int(idx.min())}..{int(idx.max())}")
    H = torch.zeros(idx.numel(), d, dtype=_F64)
    H[torch.arange(idx.numel()), idx] = 1.0
    return H


def gaspari_cohn(distance, radius: float) -> torch.Tensor:
    """The Gaspari & Cohn (1999, eq. 4.10) compactly supported correlation of ``distance / radius``:
    1 at 0, 0 beyond ``2 radius``.  A localisation matrix is ``gaspari_cohn(D, c)`` of the pairwise
    distances ``D`` between state entries (the domain computes them)."""
    if not (radius > 0 and math.isfinite(radius)):
        raise DAError(f"the localisation radius must be > 0 and finite, got {radius!r}")
    r = _vec(distance, "distance").abs() / float(radius)
    a = -0.25 * r ** 5 + 0.5 * r ** 4 + 0.625 * r ** 3 - 5.0 / 3.0 * r ** 2 + 1.0
    b = (r ** 5 / 12.0 - 0.5 * r ** 4 + 0.625 * r ** 3 + 5.0 / 3.0 * r ** 2 - 5.0 * r + 4.0
         - 2.0 / 3.0 / r.clamp_min(1e-300))
    return torch.where(r <= 1, a, torch.where(r < 2, b, torch.zeros_like(r)))


# ----------------------------------------------------------------------------- optimal interpolation
def optimal_interpolation(mean, B, H, y, R) -> Analysis:
    """OI / BLUE analysis ``(x_a, P_a)`` of states with background ``N(mean, B)`` from ``y = H x + e``.

    ``mean``: ``(d,)``; ``B``: ``(d, d)``; ``H``: ``(p, d)``; ``y``: ``(p,)`` or a batch ``(n, p)`` of
    observations with the same ``H`` and ``R`` (then ``x_a`` is ``(n, d)``); ``R``: a float, ``(p,)``
    variances or ``(p, p)``.  ``x_a = m + K (y - H m)``, ``P_a = B - K H B`` (symmetrised) with
    ``K = B H^T (H B H^T + R)^-1``.
    """
    m = _vec(mean, "the background mean")
    if m.ndim != 1:
        raise ShapeError(f"the background mean has shape {tuple(m.shape)}, expected (d,)")
    d = m.shape[0]
    B = _cov(B, d, "the background covariance B")
    H = _matrix(H, d)
    p = H.shape[0]
    y = _vec(y, "the observations y")
    if y.shape[-1:] != (p,) or y.ndim > 2:
        raise ShapeError(f"the observations y have shape {tuple(y.shape)}, expected ({p},) or (n, {p}) for {p} "
                         f"observations (rows of H)")
    R = _obs_cov(R, p, m.device)
    BHt = B @ H.T                                       # (d, p)
    K = _solve_spd(H @ BHt + R, BHt.T).T                # (d, p)
    xa = m + (y - H @ m) @ K.T
    Pa = B - K @ BHt.T
    return Analysis(xa, 0.5 * (Pa + Pa.T))


def gaussian_samples(mean, cov, members: int, generator: torch.Generator | None = None) -> torch.Tensor:
    """``members`` draws of ``N(mean, cov)``: ``(members, d)``, or ``(n, members, d)`` for a batch of
    means ``(n, d)`` sharing ``cov``.  ``cov`` may be singular (positive semi-definite): it is
    factored by its eigendecomposition, negative round-off eigenvalues set to 0."""
    m = _vec(mean, "the mean")
    d = m.shape[-1]
    C = _cov(cov, d, "the covariance")
    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise DAError(f"members must be an integer >= 1, got {members!r}")
    w, V = torch.linalg.eigh(0.5 * (C + C.T))
    if float(w.min()) < -1e-8 * max(1.0, float(w.abs().max())):
        raise DAError(f"the covariance is not positive semi-definite (eigenvalue {float(w.min()):.3g})")
    F = V * w.clamp_min(0).sqrt()                       # cov = F F^T
    z = torch.randn((*m.shape[:-1], members, d), generator=generator, dtype=_F64)
    return m.unsqueeze(-2) + z @ F.T


# ----------------------------------------------------------------------------- ensemble Kalman filter
def _ensemble(x, what: str = "the ensemble") -> torch.Tensor:
    X = _vec(x, what)
    if X.ndim != 2 or X.shape[0] < 2:
        raise ShapeError(f"{what} has shape {tuple(X.shape)}, expected (members, d) with at least 2 members")
    return X


def enkf_analysis(ensemble, H, y, R, *, generator: torch.Generator | None = None, localisation=None) -> torch.Tensor:
    """One stochastic EnKF update of ``ensemble`` ``(M, d)`` with observations ``y`` ``(p,)`` of ``H``:
    ``x_i + K (y + e_i - H x_i)``, ``e_i ~ N(0, R)``, ``K = P H^T (H P H^T + R)^-1`` with ``P`` the
    sample covariance (``ddof = 1``), Schur-multiplied by ``localisation`` ``(d, d)`` when given."""
    X = _ensemble(ensemble)
    M, d = X.shape
    H = _matrix(H, d)
    p = H.shape[0]
    y = _vec(y, "the observations y")
    if tuple(y.shape) != (p,):
        raise ShapeError(f"the observations y have shape {tuple(y.shape)}, expected ({p},) (one per row of H)")
    R = _obs_cov(R, p, X.device)
    A = X - X.mean(0)
    P = A.T @ A / (M - 1)
    if localisation is not None:
        P = P * _cov(localisation, d, "the localisation matrix")
    PHt = P @ H.T
    K = _solve_spd(H @ PHt + R, PHt.T).T                # (d, p)
    e = torch.randn((M, p), generator=generator, dtype=_F64) @ torch.linalg.cholesky(R).T
    return X + (y + e - X @ H.T) @ K.T


def enkf(forecast: Callable[[torch.Tensor], torch.Tensor], ensemble, observations: Sequence, *,
         inflation: float = 1.0, generator: torch.Generator | None = None, localisation=None) -> torch.Tensor:
    """Cycle the stochastic EnKF: for each entry of ``observations`` forecast the ensemble one step
    (``forecast((M, d)) -> (M, d)``), inflate its anomalies by ``inflation``, and update it with that
    step's observations ``(H, y, R)`` (``None``: no observation, the forecast is kept).

    ``ensemble``: the initial ``(M, d)`` ensemble, one step before the first observations.  Returns
    the analysis ensembles ``(K, M, d)`` of the ``K`` steps.
    """
    X = _ensemble(ensemble, "the initial ensemble")
    lam = float(inflation)
    if not (lam > 0 and math.isfinite(lam)):
        raise DAError(f"inflation must be > 0 and finite (1: none), got {inflation!r}")
    out = []
    for k, ob in enumerate(observations):
        Xf = torch.as_tensor(forecast(X)).to(_F64)
        if tuple(Xf.shape) != tuple(X.shape):
            raise ShapeError(f"forecast returned shape {tuple(Xf.shape)} at step {k}, expected {tuple(X.shape)} "
                             f"(members, d)")
        if not bool(torch.isfinite(Xf).all()):
            raise DAError(f"the forecast of step {k} holds NaN or inf (the model blew up); lower the inflation or "
                          f"check the forecast step")
        mean = Xf.mean(0)
        Xf = mean + lam * (Xf - mean)
        if ob is not None:
            H, y, R = ob
            Xf = enkf_analysis(Xf, H, y, R, generator=generator, localisation=localisation)
        X = Xf
        out.append(X)
    if not out:
        raise DAError("observations is empty: give one (H, y, R) or None per step")
    return torch.stack(out)


def kalman_filter(F, Q, m0, P0, observations: Sequence, *, inflation: float = 1.0) -> Analysis:
    """The Kalman filter of ``x_{k+1} = F x_k + w``, ``w ~ N(0, Q)``, from ``N(m0, P0)``, with each
    step's observations ``(H, y, R)`` (or ``None``): the exact filtering means ``(K, d)`` and
    covariances ``(K, d, d)``.  ``inflation`` multiplies the forecast covariance by ``inflation ** 2``
    (what multiplicative anomaly inflation does to an ensemble), for comparison with :func:`enkf`."""
    m = _vec(m0, "m0")
    d = m.shape[0]
    F, Q, P = _cov(F, d, "F"), _cov(Q, d, "Q"), _cov(P0, d, "P0")
    means, covs = [], []
    for ob in observations:
        m = F @ m
        P = float(inflation) ** 2 * (F @ P @ F.T + Q)
        if ob is not None:
            H, y, R = ob
            m, P = optimal_interpolation(m, P, H, y, R)
        means.append(m)
        covs.append(P)
    return Analysis(torch.stack(means), torch.stack(covs))


def tune_inflation(score: Callable[[float], float], grid: Sequence[float]) -> tuple[float, dict]:
    """The value of ``grid`` with the lowest finite ``score(inflation)`` (ties: the first), and every
    score as ``{inflation: score}`` (NaN where the filter failed with a :class:`DAError`)."""
    grid = [float(g) for g in grid]
    if not grid:
        raise DAError("the inflation grid is empty; give at least one value (e.g. 1.0, 1.05, 1.1)")
    scores = {}
    for g in grid:
        try:
            scores[g] = float(score(g))
        except DAError:
            scores[g] = float("nan")
    ok = {g: s for g, s in scores.items() if math.isfinite(s)}
    if not ok:
        raise DAError(f"every inflation of the grid {grid} failed (non-finite score); widen the grid")
    return min(ok, key=ok.get), scores
