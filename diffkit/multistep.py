"""Multistep solvers of the probability-flow ODE in data-prediction form: DPM-Solver++(2M) and
(3M) (Lu et al. 2022) and UniPC (Zhao et al. 2023).

They keep the denoiser's last x0 estimates in local variables and use them as points of a
polynomial in the half-log-SNR ``lambda = log(alpha / sigma)`` inside the exponential integrator

    x_s = (sigma_s / sigma_t) x_t + sigma_s int_{lambda_t}^{lambda_s} e^{lambda} x0(lambda) dlambda

(Lu et al. 2022, eq. 9), one denoiser call per step.  Registered and documented with the other
samplers: :mod:`diffkit.samplers` (which re-exports them).
"""
from __future__ import annotations

import math

from .grids import _coef, _Grid, _report, sampler_info

__all__ = ["dpmpp_2m", "dpmpp_3m", "unipc"]


def _half_logsnr(g: _Grid, i: int) -> float:
    return math.log(g.a[i] / g.s[i])


#: Zero-length steps.  A grid strictly decreasing in t can still repeat a noise level where the
#: schedule is flat: the cosine and sigmoid schedules clip the log-SNR at ``logsnr_min`` near
#: t = 1, so a fine grid uniform in t (``spacing="uniform"``, NFE in the thousands) has several
#: points there with the same alpha and sigma.  Such a step has half-log-SNR length h = 0 and
#: its exact solution is the identity: the multistep samplers (dpmpp_2m, dpmpp_3m, unipc) take
#: it as such and keep their history from the last distinct noise level (their step ratios
#: divided by zero there: "float division by zero" at NFE 5000); the one-step samplers'
#: formulas are the identity there already.  The denoiser call at the start of such a step is
#: still made, so NFE stays exact.  A history point whose step is shorter than
#: ``_MIN_STEP_RATIO`` times the current one (a grid point just past the flat part) is not used
#: for a higher-order correction: a divided difference over so short a step would amplify the
#: denoiser's round-off by ``h / h_prev``.  Grids from :func:`timesteps` otherwise have step
#: ratios between ~0.5 and 2, so this changes nothing else.
_MIN_STEP_RATIO = 1e-2


@sampler_info(order=2, stochastic=False)
def dpmpp_2m(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, capturable: bool = False):
    """DPM-Solver++(2M) (Lu et al. 2022), the multistep second-order data-prediction solver.

    The last step onto t = 0 is first order (it returns the x0 estimate).  The default sampler
    of :func:`sample`: on Gaussian data of std 1, 0.1, 0.03, 0.01 (exact denoiser, default
    logsnr grid) it returns the std to within 2 % at NFE 20 and 5 % at NFE 10."""
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    # the plan of every step, before the loop: what it does ("x0": return the estimate, "same": the
    # identity, 1: first order, 2: second order) and its coefficients
    kinds, rows, have_prev, h_prev = [], [], False, None
    for i in range(g.n):
        row = (0.0, 0.0, 0.0, 0.0)
        if g.s[i + 1] == 0:
            kind = "x0"
        else:
            h = _half_logsnr(g, i + 1) - _half_logsnr(g, i)
            if h == 0:  # coincident noise levels: the exact step is the identity (see _MIN_STEP_RATIO)
                kinds.append("same")
                rows.append(row)
                continue  # (the history stays that of the last distinct level)
            # Lu et al. (2022) Alg. 2, DPM-Solver++(2M), with r = h_{i-1} / h_i:
            #   D_i = (1 + 1/(2r)) x0_i - 1/(2r) x0_{i-1}            (D_i = x0_i on the first step)
            #   x_{t_i} = (sigma_{t_i} / sigma_{t_{i-1}}) x_{t_{i-1}} - alpha_{t_i} (e^{-h_i} - 1) D_i
            kind, k_new, k_prev = 1, 0.0, 0.0
            if have_prev and h_prev >= _MIN_STEP_RATIO * h:
                r = h_prev / h
                kind, k_new, k_prev = 2, 1 + 1 / (2 * r), 1 / (2 * r)
            row = (k_new, k_prev, g.s[i + 1] / g.s[i], g.a[i + 1] * math.expm1(-h))
            h_prev = h
        have_prev = True
        kinds.append(kind)
        rows.append(row)
    coef = _coef(rows, x, capturable)
    x0_prev = None
    for i in range(g.n):
        x0 = g.call(x, i, kw)
        if kinds[i] == "x0":
            x = x0
        elif kinds[i] == "same":
            _report(callback, g, i, x, x0)
            continue
        else:
            k_new, k_prev, k_x, k_d = coef[i]
            d = x0 if kinds[i] == 1 else k_new * x0 - k_prev * x0_prev  # D_i
            x = k_x * x - k_d * d
        x0_prev = x0
        _report(callback, g, i, x, x0)
    return x


@sampler_info(order=3, stochastic=False)
def dpmpp_3m(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
    """DPM-Solver++(3M) (Lu et al. 2022), multistep third order in log-SNR.

    The data-prediction ODE solution is expanded to second order in the half-log-SNR step h
    with divided differences of the last three x0 estimates (phi_2, phi_3 of the exponential
    integrator).  Lower order on the first steps, order <= 2 on the step before the final
    one, and the final step onto t = 0 returns the x0 estimate.

    Needs NFE >= 20 on the default logsnr grid: on Gaussian data the std comes out within 2 %
    at NFE 20 (1.007/1.006/1.007/1.026 for data std 1/0.1/0.03/0.01) but up to 27 % too high
    at NFE 10 (where dpmpp_2m is within 5 %)."""
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    x0_1 = x0_2 = h_1 = h_2 = None
    for i in range(g.n):
        x0 = g.call(x, i, kw)
        if g.s[i + 1] == 0:
            x = x0
        else:
            h = _half_logsnr(g, i + 1) - _half_logsnr(g, i)
            if h == 0:  # coincident noise levels: the identity (see _MIN_STEP_RATIO)
                _report(callback, g, i, x, x0)
                continue
            if h_1 is not None and h_1 < _MIN_STEP_RATIO * h:  # too short to difference over
                x0_1 = x0_2 = h_1 = h_2 = None
            elif h_2 is not None and h_2 < _MIN_STEP_RATIO * h:
                x0_2 = h_2 = None
            # The data-prediction exponential integrator (Lu et al. 2022, sec. 3) with x0(lambda) expanded
            # to second order about lambda_t (the Taylor expansion of DPM-Solver, Lu et al. 2022a, sec. 3.2):
            #   x_s = (sigma_s / sigma_t) x_t - alpha_s (e^{-h} - 1) x0 + alpha_s phi2 (h x0') + 2 alpha_s phi3 (h^2 x0'' / 2)
            # with phi2 = int_0^h e^{u-h} u du / h and phi3 = int_0^h e^{u-h} u^2/2 du / h^2, and h x0', h^2 x0''/2
            # from divided differences of the last three estimates (the third-order multistep update of
            # the DPM-Solver reference code)
            a_s = g.a[i + 1]
            em = math.expm1(-h)
            x = (g.s[i + 1] / g.s[i]) * x - (a_s * em) * x0
            phi2 = em / h + 1.0  # int_0^h e^{u-h} u du / h
            last_before_final = g.s[-1] == 0 and i == g.n - 2
            if h_2 is not None and not last_before_final:
                r0, r1 = h_1 / h, h_2 / h
                d1_0 = (x0 - x0_1) / r0
                d1_1 = (x0_1 - x0_2) / r1
                d1 = d1_0 + (d1_0 - d1_1) * (r0 / (r0 + r1))  # ~ h x0'    (quadratic fit)
                d2 = (d1_0 - d1_1) / (r0 + r1)  # ~ h^2 x0'' / 2
                phi3 = 0.5 - phi2 / h  # int_0^h e^{u-h} u^2/2 du / h^2
                x = x + (a_s * phi2) * d1 + (2.0 * a_s * phi3) * d2
            elif h_1 is not None:
                x = x + (a_s * phi2 * h / h_1) * (x0 - x0_1)
            h_2, h_1 = h_1, h
        x0_2, x0_1 = x0_1, x0
        _report(callback, g, i, x, x0)
    return x


def _solve(a: list, b: list) -> list:
    """Solve the small dense system ``a y = b`` (Gaussian elimination with partial pivoting,
    Python floats: UniPC's systems are at most 3 x 3)."""
    n = len(b)
    m = [list(row) + [v] for row, v in zip(a, b)]
    for c in range(n):
        p = max(range(c, n), key=lambda r: abs(m[r][c]))
        m[c], m[p] = m[p], m[c]
        for r in range(c + 1, n):
            f = m[r][c] / m[c][c]
            for k in range(c, n + 1):
                m[r][k] -= f * m[c][k]
    y = [0.0] * n
    for r in reversed(range(n)):
        y[r] = (m[r][n] - sum(m[r][k] * y[k] for k in range(r + 1, n))) / m[r][r]
    return y


def _unipc_coeffs(h: float, rks: list, variant: str) -> tuple[float, float, list, list]:
    """``(phi1, B, R, b)`` of one UniPC step of half-log-SNR length ``h`` in data prediction.

    ``rks`` are the step-length ratios ``r_k = (lambda_{i-k} - lambda_i) / h`` of the older
    estimates, followed by 1 (the new point).  ``phi1 = expm1(-h)``; ``B`` is the variant's
    ``B(h)`` (``bh1``: ``-h``, ``bh2``: ``expm1(-h)``); ``R[p][k] = r_k^p`` and
    ``b[p] = h phi_{p+2}(-h) (p + 1)! / B(h)``, the Vandermonde system of the paper's
    Theorem 3.1 (``phi_{k+1}(z) = (phi_k(z) - 1/k!) / z``, ``phi_1(z) = (e^z - 1) / z``)."""
    hh = -h
    phi1 = math.expm1(hh)
    bh = hh if variant == "bh1" else phi1
    phi = phi1 / hh - 1.0  # h phi_2 scaled: (e^z - 1 - z) / z with z = -h, i.e. z phi_2(z)
    fact, b = 1, []
    for p in range(1, len(rks) + 1):
        b.append(phi * fact / bh)
        fact *= p + 1
        phi = phi / hh - 1.0 / fact
    R = [[r ** p for r in rks] for p in range(len(rks))]
    return phi1, bh, R, b


@sampler_info(order=3, stochastic=False)
def unipc(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, order: int = 2,
          variant: str = "bh2", lower_order_final: bool = True):
    """UniPC (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast
    Sampling of Diffusion Models"): the multistep predictor UniP-``order`` with the corrector
    UniC, in data-prediction (x0) form in the half-log-SNR ``lambda = log(alpha / sigma)``.

    Step ``i`` (``h = lambda_{i+1} - lambda_i``) starts from the denoiser's estimate ``m_i`` at
    ``x_i``:

    - *corrector* (UniC, on every step's result except the last one's): once ``m_i`` is known,
      the step ``i-1 -> i`` is redone from ``x_{i-1}`` with ``m_i`` as one more point of the x0
      polynomial, which raises its order by one at no extra call (``m_i`` is not re-evaluated
      at the corrected point, so NFE = number of steps);
    - *predictor* (UniP): ``x_{i+1} = (sigma_{i+1}/sigma_i) x_i - alpha_{i+1} phi1 m_i
      - alpha_{i+1} B(h) sum_k rho_k D_k`` with ``phi1 = e^{-h} - 1``, the divided differences
      ``D_k = (m_{i-k} - m_i) / r_k`` of the older estimates, ``r_k = (lambda_{i-k} - lambda_i) / h``,
      and ``rho`` from the Vandermonde system of the paper's Theorem 3.1 (``B(h) = e^{-h} - 1``
      for ``variant="bh2"``, ``-h`` for ``"bh1"``; the two-point predictor and the one-point
      corrector take ``rho = 1/2``, as the paper's bh2 does).

    ``order`` (1, 2 or 3) is the predictor's order.  The first steps use the older estimates
    there are, and with ``lower_order_final`` on a grid ending in 0 the last steps drop to
    ... 3, 2, 1 (diffusers' ``lower_order_final``); the final step onto t = 0 returns the x0
    estimate.  With the corrector the global error is of order ``order + 1``: measured on
    Gaussian data (exact denoiser, 64..512 steps uniform in log-SNR from t = 1 to 0.05) 2.0,
    3.0, and 3.8-4.6 for ``order`` 1, 2, 3; the declared order is the default's, 3.

    The default ``order=2`` holds at NFE 10 on the default logsnr grid: on Gaussian data of std
    1/0.1/0.03/0.01 (exact denoiser) the std ratio is 1.058/1.060/1.052/1.019 at NFE 10 and
    1.015/1.015/1.014/1.012 at NFE 20 (cosine, linear and sigmoid schedules alike).  ``order=3``
    is diffusers' ``UniPCMultistepScheduler(solver_order=3)``: 1.002/1.003/1.001/1.008 at NFE 20
    but up to 24 % too spread at NFE 10 (1.033/1.176/1.235/1.158), like ``dpmpp_3m``."""
    if variant not in ("bh1", "bh2"):
        raise ValueError(f"variant must be 'bh1' or 'bh2', got {variant!r}")
    if order not in (1, 2, 3):
        raise ValueError(f"order must be 1, 2 or 3, got {order!r}")
    g = _Grid(denoiser, ts, x)
    kw = extra_args or {}
    lam = [_half_logsnr(g, i) if g.s[i] > 0 else math.inf for i in range(g.n + 1)]
    ends_at_zero = g.s[-1] == 0
    ms: list = []  # x0 estimates m_i, m_{i-1}, ... (newest first), at most `order` of them
    ls: list = []  # the half-log-SNR of each estimate in ms
    x_prev, k_prev, i_prev = None, 0, 0
    for i in range(g.n):
        m = g.call(x, i, kw)
        if x_prev is not None and g.s[i + 1] > 0:  # UniC on the step i_prev -> i (useless before the x0 step)
            x = _unipc_step(g, i_prev, i, x_prev, ms, ls, k_prev, variant, m_new=m)
        x_prev = None
        if g.s[i + 1] > 0 and lam[i + 1] == lam[i]:
            # coincident noise levels: the identity, and no duplicate in the history (see _MIN_STEP_RATIO)
            _report(callback, g, i, x, m)
            continue
        ms.insert(0, m)
        ls.insert(0, lam[i])
        del ms[order:], ls[order:]
        if g.s[i + 1] == 0:
            x_next = m
        else:
            h = lam[i + 1] - lam[i]
            k = 1  # the older estimates, down to the first one too close to its successor
            while k < min(order, len(ms)) and ls[k - 1] - ls[k] >= _MIN_STEP_RATIO * h:
                k += 1
            if lower_order_final and ends_at_zero:
                k = min(k, g.n - i)
            x_next = _unipc_step(g, i, i + 1, x, ms, ls, k, variant)
            x_prev, k_prev, i_prev = x, k, i
        x = x_next
        _report(callback, g, i, x, m)
    return x


def _unipc_step(g: _Grid, i: int, j: int, x, ms: list, ls: list, k: int, variant: str, m_new=None):
    """One UniPC step from grid point ``i`` (state ``x``, estimates ``ms = [m_i, m_{i-1}, ...]``
    at half-log-SNRs ``ls``) to grid point ``j`` with ``k`` points: the predictor UniP-k, or with
    ``m_new`` (the estimate at the predicted point) the corrector UniC-k."""
    lam_j = _half_logsnr(g, j)
    h = lam_j - ls[0]
    m0 = ms[0]
    rks = [(ls[q] - ls[0]) / h for q in range(1, k)]
    a_s = g.a[j]
    phi1, bh, R, b = _unipc_coeffs(h, rks + [1.0], variant)
    # Zhao et al. (2023) UniP-k / UniC-k (sec. 3) in data-prediction form, phi_1 = e^{-h} - 1:
    #   x_j = (sigma_j / sigma_i) x_i - alpha_j phi_1 m_i - alpha_j B(h) sum_k rho_k D_k / r_k,
    #   D_k = m_{i-k} - m_i   (UniC adds the new estimate's term rho (m_new - m_i), with r = 1)
    out = (g.s[j] / g.s[i]) * x - (a_s * phi1) * m0
    if m_new is None:  # predictor: the older estimates only
        if k == 1:
            return out
        rhos = [0.5] if k == 2 else _solve([row[:-1] for row in R[:-1]], b[:-1])
    else:  # corrector: the older estimates and the new one
        rhos = [0.5] if k == 1 else _solve(R, b)
    corr = 0
    for j in range(1, k):
        corr = corr + (rhos[j - 1] / rks[j - 1]) * (ms[j] - m0)
    if m_new is not None:
        corr = corr + rhos[-1] * (m_new - m0)
    return out - (a_s * bh) * corr
