"""What the QG simulator itself knows: the oracle ensemble and the stationarity check.

:func:`oracle_ensemble` re-runs the fine model from fine states that agree with an observed
coarse state (sub-grid scales from their climatology, :func:`subgrid_draws`, or made consistent
with the observed coarse history), and coarse-grains the result: the true conditional spread a
forecast ensemble should match.  :func:`stationarity_report` checks that two periods of a dataset
have the same state and tendency statistics.
"""
from __future__ import annotations

from typing import Any, Sequence

import numpy as np
import torch

from .qg import simulate_qg
from .qg_coarse import _check_coarse, resolved_mask, split_scales


# ----------------------------------------------------------------------------- oracle ensemble
def subgrid_draws(pool, n_coarse: int, n: int, *, method: str = "pool", seed=0,
                  exclude=None) -> tuple[torch.Tensor, torch.Tensor | None]:
    """``n`` draws (n, 2, nx, nx) of the sub-grid scales (modes beyond ``|kx|, |ky| < n_coarse/2``)
    from their climatology, estimated from ``pool`` (N, 2, nx, nx): fine PV states of the same run
    at other times.

    ``method="pool"``: the sub-grid part of ``n`` pool states chosen at random without
    replacement (``N >= n``; with replacement otherwise), indices returned; ``exclude`` (indices)
    are never chosen, e.g. the state being re-simulated itself.  ``method="gaussian"``: a Gaussian
    field with the pool's sub-grid covariance per wavenumber (the 2x2 layer covariance of each
    mode: the climatological sub-grid spectrum, layers correlated, phases random); indices None.
    Randomness from ``numpy.random.default_rng(seed)`` (``seed`` may be a list).
    """
    P = torch.as_tensor(pool)
    if P.ndim != 4 or P.shape[1] != 2 or P.shape[-1] != P.shape[-2]:
        raise ValueError(f"pool must have shape (N, 2, nx, nx) (fine PV states), got {tuple(P.shape)}")
    nf = P.shape[-1]
    nc = _check_coarse(nf, n_coarse)
    g = np.random.default_rng(seed)
    mask = resolved_mask(nf, nc, P.device)
    if method == "pool":
        allowed = np.setdiff1d(np.arange(P.shape[0]), np.asarray([] if exclude is None else exclude, dtype=int))
        if allowed.size == 0:
            raise ValueError("subgrid_draws: every pool state is excluded; pass more pool states")
        idx = g.choice(allowed, size=int(n), replace=allowed.size < int(n))
        idx_t = torch.as_tensor(idx, device=P.device)
        return split_scales(P[idx_t], nc)[1], idx_t
    if method != "gaussian":
        raise ValueError(f"method must be 'pool' or 'gaussian', got {method!r}")
    c = torch.fft.rfft2(P.to(torch.float64), norm="forward") * ~mask                 # (N, 2, ny, nk)
    cov = torch.einsum("nayx,nbyx->yxab", c, c.conj()) / c.shape[0]                # (ny, nk, 2, 2)
    eye = torch.eye(2, dtype=cov.dtype, device=cov.device)
    scale = cov.diagonal(dim1=-2, dim2=-1).real.amax(-1).clamp_min(1e-300)[..., None, None]
    chol = torch.linalg.cholesky(cov + 1e-12 * scale * eye)                          # jitter: rank-1 modes
    w = torch.from_numpy(g.standard_normal((int(n), 2, nf, nf))).to(P.device)
    wh = torch.fft.rfft2(w, norm="forward") * nf                                     # E|w_k|^2 = 1
    d = torch.einsum("yxab,nbyx->nayx", chol, wh) * ~mask
    out = torch.fft.irfft2(d, s=(nf, nf), norm="forward")                           # Hermitian part
    out = torch.fft.irfft2(torch.fft.rfft2(out, norm="forward") * ~mask * _model_mask(nf, P.device),
                           s=(nf, nf), norm="forward")
    return out.to(P.dtype), None


def _model_mask(n: int, device=None) -> torch.Tensor:
    """The model's modes on an ``n^2`` grid: no Nyquist row/column, no domain mean."""
    m = resolved_mask(n, n, device)
    m[0, 0] = False
    return m


_MODEL_KEYS = ("L", "beta", "rd", "delta", "H1", "U1", "U2", "rek", "filterfac", "filter_timescale")


def oracle_ensemble(q_fine, pool, members: int, n_leads: int, *, observe: int, lead: float,
                    params: dict | None = None, method: str = "pool", seed: int = 0, exclude=None,
                    fields: Sequence[str] = ("q", "psi"), dt: float | None = None, device=None, dtype=None,
                    progress: bool = False, history=None, history_step: float | None = None) -> dict:
    """The simulator's own answer to "what can happen next, given the coarse state?".

    From fine PV state(s) ``q_fine`` (2, nx, nx) or (n_init, 2, nx, nx) whose coarse-grained
    version (:func:`coarse_grain` onto ``observe^2``) is what a forecaster sees, draw ``members``
    fine states that agree with it exactly on the resolved scales (``|kx|, |ky| < observe/2``:
    those of ``q_fine``, unchanged) and carry sub-grid scales drawn from their climatology
    (:func:`subgrid_draws` from ``pool``, fine PV states of the same run at other times; ``method``
    "pool" or "gaussian"; ``exclude`` pool indices never drawn, e.g. the init time's own frame),
    run each forward for ``n_leads`` steps of ``lead`` seconds with the full fine model, and
    coarse-grain every frame.  The spread of the members at each lead is the conditional spread of
    the coarse state given the coarse initial state (to the approximation that the sub-grid scales
    at t are independent of the resolved ones: drawn from the climatology, not from
    p(sub-grid | resolved)).

    **History-consistent sub-grid scales** (``history``): fine states ([n_init,] H, 2, nx, nx) at the
    H observation times before each init, oldest first, ``history_step`` seconds apart and the last
    one ``history_step`` before the init (only their coarse-grained part is used: what a forecaster
    with an H + 1-state history sees).  The members then start ``H * history_step`` before the init
    from the resolved scales of ``history[0]`` plus climatological sub-grid draws, are run forward by
    the fine model, and at each later observation time (the rest of ``history``, then ``q_fine``)
    their resolved scales are replaced by the observed ones while their own sub-grid scales are kept
    (direct insertion).  The sub-grid scales at the init are thus generated by the fine dynamics
    from the observed coarse history rather than drawn independently of it -- the closer
    approximation to p(sub-grid | coarse history) that a forecaster conditioned on that history
    should match.  Without ``history`` (the default), the sub-grid scales at the init are
    climatological draws: an oracle that ignores the history, and so over-spread for a forecaster
    that uses it.

    ``params``: the model's settings (``result["params"]`` of :func:`simulate_qg`, or a QG
    dataset's ``attrs``); ``L``, ``beta``, ``rd``, ``delta``, ``H1``, ``U1``, ``U2``, ``rek``,
    ``filterfac``, ``filter_timescale`` are taken from it (defaults: pyqg's), and its time step
    ``dt_requested`` unless ``dt`` is given.  Member ``m`` of init ``i`` uses
    ``default_rng([seed, i])`` (so an init's ensemble does not depend on the other inits).

    Returns a dict: each of ``fields`` (among q, psi, u, v) of shape ([n_init,] members,
    n_leads + 1, 2, observe, observe) (frame 0 = lead 0: the observed coarse state, the same for
    every member to round-off), ``q0_fine`` ([n_init,] members, 2, nx, nx) the members' fine
    initial states, ``draws`` ([n_init,] members) the pool indices (method "pool"), ``t`` (n_leads
    + 1,) lead seconds, ``x``/``y`` the coarse cell centres and ``params`` of the fine run.
    """
    q = torch.as_tensor(q_fine)
    single = q.ndim == 3
    if single:
        q = q[None]
    if q.ndim != 4 or q.shape[1] != 2 or q.shape[-1] != q.shape[-2]:
        raise ValueError(f"q_fine must have shape (2, nx, nx) or (n_init, 2, nx, nx), got {tuple(q.shape)}")
    P = torch.as_tensor(pool)
    if P.ndim != 4 or P.shape[1:] != q.shape[1:]:
        raise ValueError(f"pool must have shape (N, 2, nx, nx) on q_fine's grid {tuple(q.shape[1:])}, "
                         f"got {tuple(P.shape)}")
    if int(members) < 1 or int(n_leads) < 0:
        raise ValueError(f"members must be >= 1 and n_leads >= 0, got {members}, {n_leads}")
    nf = q.shape[-1]
    nc = _check_coarse(nf, observe, "observe")
    src = dict(params or {})
    model = {k: float(src[k]) for k in _MODEL_KEYS if k in src}
    step = float(dt if dt is not None else src.get("dt_requested", src.get("dt_sim", 7200.0)))
    hist = None
    if history is not None:
        hist = torch.as_tensor(history)
        if single and hist.ndim == 4:
            hist = hist[None]
        if hist.ndim != 5 or hist.shape[0] != q.shape[0] or hist.shape[2:] != q.shape[1:] or hist.shape[1] < 1:
            raise ValueError(f"history must have shape ([n_init,] H, 2, nx, nx) with H >= 1 on q_fine's grid, "
                             f"got {tuple(hist.shape)} for q_fine {tuple(q.shape)}")
        if history_step is None or not float(history_step) > 0:
            raise ValueError(f"history needs history_step > 0 (seconds between its states), got {history_step!r}")
    starts, draws = [], []
    for i in range(q.shape[0]):
        sub, idx = subgrid_draws(P, nc, int(members), method=method, seed=[int(seed), i], exclude=exclude)
        first = q[i] if hist is None else hist[i, 0]
        res, _ = split_scales(first.to(sub), nc)
        starts.append(res[None] + sub)
        draws.append(idx)
    q0 = torch.cat(starts)                                                        # (n_init*M, 2, nx, nx)
    if hist is not None:                     # direct insertion of the observed coarse history
        M = int(members)
        later = torch.cat([hist[:, 1:], q[:, None]], dim=1)                       # (n_init, H, 2, nx, nx)
        for j in range(later.shape[1]):
            r = simulate_qg(q0.shape[0], 2, q0=q0, spin_up_years=0.0, out_every=float(history_step), dt=step,
                            fields=(), device=device, dtype=dtype, progress=False, **model)
            _, sub = split_scales(r["q_final"].to(q0), nc)
            res, _ = split_scales(later[:, j].to(q0), nc)
            q0 = res.repeat_interleave(M, dim=0) + sub
    r = simulate_qg(q0.shape[0], int(n_leads) + 1, q0=q0, spin_up_years=0.0, out_every=float(lead), dt=step,
                    observe=nc, fields=fields, device=device, dtype=dtype, progress=progress, **model)
    shape = (q.shape[0], int(members))
    out: dict[str, Any] = {f: r[f].reshape(*shape, *r[f].shape[1:]) for f in fields}
    out["q0_fine"] = q0.reshape(*shape, *q0.shape[1:])
    out["draws"] = torch.stack(draws) if draws[0] is not None else None
    if single:
        for k in list(fields) + ["q0_fine", "draws"]:
            if out[k] is not None:
                out[k] = out[k][0]
    out.update(t=r["t"], x=r["x"], y=r["y"], params=r["params"])
    return out


# ----------------------------------------------------------------------------- stationarity
def stationarity_report(ds, train_slice, test_slice, *, variables: Sequence[str] | None = None,
                        lag: int = 1, tolerance: float = 0.05) -> dict:
    """Do two periods of a (QG, or any gridded) dataset have the same statistics?

    For each variable (default: every data variable with a ``time`` dim) and each index of its
    non-spatial dims other than time (``level``, ``member``), the standard deviation over time and
    space of the state, and of its tendency ``x(t + lag) - x(t)`` (``lag`` frames; differences
    inside each period only), in the training and the test period (``train_slice``,
    ``test_slice``: slices or ``(start, stop)`` of labels for ``ds.sel(time=...)``, both ends
    included).  Returns a dict: ``rows`` (one dict per channel: ``variable``, ``index`` (``{dim:
    label}`` of the other dims, e.g. ``{"level": 1}``, or None), ``state_std_train``,
    ``state_std_test``, ``state_ratio`` = test/train, and the same for ``tendency``),
    ``max_deviation`` (the largest ``|ratio - 1|``), ``tolerance`` and ``stationary``
    (``max_deviation <= tolerance``); :func:`format_stationarity` prints it.
    """
    def sl(s):
        return s if isinstance(s, slice) else slice(*s)

    names = list(variables) if variables is not None else [v for v in ds.data_vars if "time" in ds[v].dims]
    if not names:
        raise ValueError("stationarity_report: no variable with a time dim")
    if int(lag) < 1:
        raise ValueError(f"lag must be >= 1, got {lag}")
    rows = []
    for name in names:
        da = ds[name]
        parts = {k: da.sel(time=sl(s)) for k, s in (("train", train_slice), ("test", test_slice))}
        for k, p in parts.items():
            if p.sizes["time"] <= lag:
                raise ValueError(f"stationarity_report: the {k} period of {name!r} has {p.sizes['time']} "
                                 f"time(s); it needs more than lag = {lag}")
        other = [d for d in da.dims if d != "time" and d not in da.dims[-2:]]      # last two: space
        keep = [d for d in da.dims if d not in other]
        stacked = {k: (p.stack(_ch=other) if other else p.expand_dims(_ch=[0])) for k, p in parts.items()}
        for j in range(stacked["train"].sizes["_ch"]):
            lab = stacked["train"]["_ch"].values[j]
            row: dict[str, Any] = {"variable": name, "index": (
                {d: (v.item() if hasattr(v, "item") else v) for d, v in zip(other, lab)} if other else None)}
            for k, p in stacked.items():
                a = np.asarray(p.isel(_ch=j).transpose(*keep).values, dtype=np.float64)
                row[f"state_std_{k}"] = float(a.std())
                row[f"tendency_std_{k}"] = float((a[lag:] - a[:-lag]).std())
            for what in ("state", "tendency"):
                row[f"{what}_ratio"] = row[f"{what}_std_test"] / row[f"{what}_std_train"]
            rows.append(row)
    dev = max(max(abs(r["state_ratio"] - 1), abs(r["tendency_ratio"] - 1)) for r in rows)
    return {"rows": rows, "max_deviation": dev, "tolerance": float(tolerance),
            "stationary": bool(dev <= tolerance), "lag": int(lag)}


def format_stationarity(report: dict) -> str:
    """The :func:`stationarity_report` as lines: one per channel, then the verdict."""
    lines = []
    for r in report["rows"]:
        idx = "" if r["index"] is None else "[" + ", ".join(f"{d}={v}" for d, v in r["index"].items()) + "]"
        lines.append(f"{r['variable']}{idx}: state std test/train {r['state_ratio']:.3f}, "
                     f"tendency std (lag {report['lag']}) test/train {r['tendency_ratio']:.3f}")
    lines.append(f"stationarity: max |ratio - 1| = {report['max_deviation']:.3f} "
                 f"({'within' if report['stationary'] else 'OUTSIDE'} the tolerance {report['tolerance']:g})")
    return "\n".join(lines)
