"""diffkit.da_baselines (issue 15, the KS assimilation benchmark's references): optimal interpolation is
the closed-form Gaussian posterior, the Kalman filter equals conditioning the joint Gaussian of the whole
linear model, and the stochastic EnKF with many members converges to the Kalman filter (inflation too)."""
from __future__ import annotations

import math

import pytest
import torch

from diffkit.da_baselines import (DAError, enkf, enkf_analysis, gaspari_cohn, gaussian_samples, gaussian_statistics,
                                  kalman_filter, optimal_interpolation, selection_matrix, tune_inflation)
from diffkit.errors import ShapeError

F64 = torch.float64


def _spd(d, g, scale=1.0):
    A = torch.randn(d, d, generator=g, dtype=F64)
    return scale * (A @ A.T / d + 0.3 * torch.eye(d, dtype=F64))


@pytest.mark.parametrize("kind", ["dense", "mask"])
def test_oi_equals_closed_form_gaussian_posterior(kind):
    g = torch.Generator().manual_seed(0)
    d = 7
    m, B = torch.randn(d, generator=g, dtype=F64), _spd(d, g)
    H = torch.randn(4, d, generator=g, dtype=F64) if kind == "dense" else selection_matrix([0, 3, 6], d)
    p = H.shape[0]
    r = 0.1 + torch.rand(p, generator=g, dtype=F64)
    y = torch.randn(p, generator=g, dtype=F64)
    xa, Pa = optimal_interpolation(m, B, H, y, r)
    # information form of the posterior of x ~ N(m, B), y | x ~ N(Hx, diag r)
    prec = torch.linalg.inv(B) + H.T @ torch.diag(1 / r) @ H
    P_ref = torch.linalg.inv(prec)
    x_ref = P_ref @ (torch.linalg.solve(B, m) + H.T @ (y / r))
    torch.testing.assert_close(xa, x_ref, rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(Pa, P_ref, rtol=1e-10, atol=1e-10)
    # a batch of observations with the same operator: one analysis per row
    ys = torch.randn(3, p, generator=g, dtype=F64)
    xb, _ = optimal_interpolation(m, B, H, ys, torch.diag(r))
    for i in range(3):
        torch.testing.assert_close(xb[i], P_ref @ (torch.linalg.solve(B, m) + H.T @ (ys[i] / r)))
    if kind == "mask":  # the observed entries are pulled to the data, the posterior variance below r there
        assert bool((torch.diagonal(Pa)[[0, 3, 6]] < r).all())


def test_oi_samples_have_the_posterior_mean_and_covariance():
    g = torch.Generator().manual_seed(1)
    d, n = 5, 40_000
    m, B = torch.randn(d, generator=g, dtype=F64), _spd(d, g)
    xa, Pa = optimal_interpolation(m, B, selection_matrix(torch.tensor([True, False, True, False, False]), d),
                                   torch.tensor([0.5, -1.0], dtype=F64), 0.04)
    s = gaussian_samples(xa, Pa, n, generator=g)
    assert s.shape == (n, d)
    sd = torch.diagonal(Pa).sqrt()
    assert bool(((s.mean(0) - xa).abs() < 5 * sd / math.sqrt(n)).all())
    emp = gaussian_statistics(s).cov
    # entrywise MC std of a sample covariance: sqrt((P_ij^2 + P_ii P_jj) / n)
    tol = 5 * ((Pa ** 2 + torch.outer(torch.diagonal(Pa), torch.diagonal(Pa))) / n).sqrt()
    assert bool(((emp - Pa).abs() < tol).all())
    # a batch of means shares the covariance
    assert gaussian_samples(torch.stack([xa, xa]), Pa, 3, generator=g).shape == (2, 3, d)


def _linear_model(d, g):
    F = 0.9 * torch.linalg.qr(torch.randn(d, d, generator=g, dtype=F64))[0]
    return F, _spd(d, g, 0.2)


def _observations(F, Q, x0, Hs, r, g):
    """Simulated truth and observations (H, y, r) per step of the linear model."""
    x, obs = x0, []
    Lq = torch.linalg.cholesky(Q)
    for H in Hs:
        x = F @ x + Lq @ torch.randn(F.shape[0], generator=g, dtype=F64)
        obs.append(None if H is None else (H, H @ x + math.sqrt(r) * torch.randn(H.shape[0], generator=g, dtype=F64), r))
    return obs


def test_kalman_filter_equals_conditioning_the_joint_gaussian():
    g = torch.Generator().manual_seed(2)
    d, K, r = 3, 4, 0.3
    F, Q = _linear_model(d, g)
    m0, P0 = torch.randn(d, generator=g, dtype=F64), _spd(d, g)
    Hs = [torch.randn(2, d, generator=g, dtype=F64), None, selection_matrix([1], d), torch.randn(2, d, generator=g,
                                                                                                   dtype=F64)]
    obs = _observations(F, Q, m0, Hs, r, g)
    means, covs = kalman_filter(F, Q, m0, P0, obs)
    # joint Gaussian of (x_1..x_K): x_k = F^k x_0 + sum_j F^(k-j) w_j
    Fk = [torch.linalg.matrix_power(F, k) for k in range(K + 1)]
    mu = torch.cat([Fk[k] @ m0 for k in range(1, K + 1)])
    C = torch.zeros(K * d, K * d, dtype=F64)
    for a in range(1, K + 1):
        for b in range(1, K + 1):
            c = Fk[a] @ P0 @ Fk[b].T
            for j in range(1, min(a, b) + 1):
                c = c + Fk[a - j] @ Q @ Fk[b - j].T
            C[(a - 1) * d: a * d, (b - 1) * d: b * d] = c
    for k in range(1, K + 1):  # the filter at step k conditions on the observations of steps 1..k
        rows, ys = [], []
        for j in range(1, k + 1):
            if obs[j - 1] is not None:
                H = obs[j - 1][0]
                big = torch.zeros(H.shape[0], K * d, dtype=F64)
                big[:, (j - 1) * d: j * d] = H
                rows.append(big)
                ys.append(obs[j - 1][1])
        Hb, yb = torch.cat(rows), torch.cat(ys)
        xa, Pa = optimal_interpolation(mu, C, Hb, yb, r)
        sl = slice((k - 1) * d, k * d)
        torch.testing.assert_close(means[k - 1], xa[sl], rtol=1e-9, atol=1e-9)
        torch.testing.assert_close(covs[k - 1], Pa[sl, sl], rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("inflation", [1.0, 1.2])
def test_enkf_converges_to_the_kalman_filter_with_many_members(inflation):
    g = torch.Generator().manual_seed(3)
    d, K, r, M = 3, 4, 0.2, 40_000
    F, Q = _linear_model(d, g)
    m0, P0 = torch.randn(d, generator=g, dtype=F64), _spd(d, g)
    Hs = [selection_matrix([0], d), torch.randn(2, d, generator=g, dtype=F64), None, selection_matrix([0, 2], d)]
    obs = _observations(F, Q, m0, Hs, r, g)
    ref_m, ref_P = kalman_filter(F, Q, m0, P0, obs, inflation=inflation)
    Lq = torch.linalg.cholesky(Q)
    X0 = gaussian_samples(m0, P0, M, generator=g)
    ens = enkf(lambda X: X @ F.T + torch.randn(X.shape, generator=g, dtype=F64) @ Lq.T, X0, obs,
               inflation=inflation, generator=g)
    assert ens.shape == (K, M, d)
    for k in range(K):
        P = ref_P[k]
        sd = torch.diagonal(P).sqrt()
        assert bool(((ens[k].mean(0) - ref_m[k]).abs() < 6 * sd / math.sqrt(M)).all()), k
        emp = gaussian_statistics(ens[k]).cov
        tol = 6 * ((P ** 2 + torch.outer(torch.diagonal(P), torch.diagonal(P))) / M).sqrt()
        assert bool(((emp - P).abs() < tol).all()), (k, emp, P)
    # the filter is informative: the last analysis is closer than the forecast-only spread
    assert float(torch.diagonal(ref_P[-1]).sum()) < float(torch.diagonal(_cov_no_obs(F, Q, P0, K)).sum())


def _cov_no_obs(F, Q, P, K):
    for _ in range(K):
        P = F @ P @ F.T + Q
    return P


def test_enkf_localisation_and_gaspari_cohn():
    r = torch.tensor([0.0, 0.5, 1.0, 1.5, 2.0, 3.0], dtype=F64)
    c = gaspari_cohn(r, 1.0)
    assert float(c[0]) == 1.0 and float(c[-2]) == pytest.approx(0.0, abs=1e-12) and float(c[-1]) == 0.0
    assert bool((c[:-1].diff() < 0).all())
    eps = 1e-9  # continuous at r = radius
    assert float(gaspari_cohn(torch.tensor(1 - eps), 1.0)) == pytest.approx(float(gaspari_cohn(torch.tensor(1 + eps),
                                                                                                1.0)), abs=1e-7)
    # a localisation of zeros off the diagonal keeps unobserved, uncorrelated entries unchanged
    g = torch.Generator().manual_seed(4)
    X = torch.randn(50, 4, generator=g, dtype=F64)
    Xa = enkf_analysis(X, selection_matrix([0], 4), torch.tensor([3.0], dtype=F64), 0.1, generator=g,
                       localisation=torch.eye(4, dtype=F64))
    torch.testing.assert_close(Xa[:, 1:], X[:, 1:])
    assert float((Xa[:, 0].mean() - 3.0).abs()) < float((X[:, 0].mean() - 3.0).abs())


def test_tune_inflation_picks_the_lowest_finite_score():
    def score(lam):
        if lam > 1.3:
            raise DAError("blew up")
        return (lam - 1.1) ** 2

    best, scores = tune_inflation(score, [1.0, 1.1, 1.2, 1.5])
    assert best == 1.1 and math.isnan(scores[1.5]) and scores[1.0] == pytest.approx(0.01)


@pytest.mark.parametrize("call,err,fragment", [
    (lambda: optimal_interpolation(torch.zeros(3), torch.eye(3), torch.ones(2, 4), torch.zeros(2), 1.0), ShapeError,
     "expected (p, 3)"),
    (lambda: optimal_interpolation(torch.zeros(3), torch.eye(3), torch.eye(3), torch.zeros(2), 1.0), ShapeError,
     "observations y have shape (2,)"),
    (lambda: optimal_interpolation(torch.zeros(3), torch.eye(3), torch.eye(3), torch.zeros(3), 0.0), DAError,
     "must be > 0"),
    (lambda: optimal_interpolation(torch.zeros(3), torch.eye(3), torch.eye(3), torch.tensor([0, float("nan"), 0]), 1.0),
     DAError, "NaN or inf"),
    (lambda: enkf(lambda X: X, torch.zeros(1, 3), [None]), ShapeError, "at least 2 members"),
    (lambda: enkf(lambda X: X, torch.randn(4, 3), [None], inflation=0.0), DAError, "inflation must be > 0"),
    (lambda: enkf(lambda X: X[:, :2], torch.randn(4, 3), [None]), ShapeError, "forecast returned shape"),
    (lambda: enkf(lambda X: X * float("inf"), torch.randn(4, 3), [None]), DAError, "blew up"),
    (lambda: selection_matrix([0, 5], 4), ShapeError, "indices must be in 0..3"),
    (lambda: gaussian_samples(torch.zeros(2), -torch.eye(2), 3), DAError, "not positive semi-definite"),
    (lambda: gaspari_cohn(torch.zeros(2), 0.0), DAError, "radius must be > 0"),
    (lambda: tune_inflation(lambda v: v, []), DAError, "grid is empty"),
])
def test_da_baselines_bad_input_is_one_line_error(call, err, fragment):
    with pytest.raises(err) as e:
        call()
    assert fragment in str(e.value) and "\n" not in str(e.value)
