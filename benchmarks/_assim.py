"""What the assimilation benchmarks share (``assimilation_ks.py``, ``assimilation_qg.py``; issue 15).

States are flattened to vectors of length ``d`` for the classical baselines (``diffkit.da_baselines``
works on vectors); a window is ``K`` frames, each observed at the same points (a boolean ``mask``
of the state's shape, ``y`` ``(K, p)`` in the mask's flat order) with noise ``sigma``: one float for
every observation, or one value per observation ``(p,)``.

- :func:`oi_window`: per-frame optimal interpolation with a climatological background, sampled from
  its posterior;
- :func:`enkf_window`: the stochastic EnKF cycled over the window with the domain's forecast step;
- :func:`window_guided`, :func:`amortised`: a universal-amortised window model (``diffkit.window``)
  over the window, as a prior guided by reconstruction guidance or conditioned on the observations
  (states ``(C, *S)``: ``mask`` has the state's shape with its variables first);
- :func:`scores`: ensemble-mean RMSE, fair CRPS and spread/skill (``diffkit.ensemble``);
  :func:`split_rmse` the RMSE at the observed and at the unobserved points, :func:`noise_rms` that of
  the observations themselves (what a method that imposes them exactly scores at the observed points);
- :func:`verdicts`, :func:`target_lines`, :func:`verdict_table`: the best diffkit row per sparsity
  against the references, as dicts, printed ``target ...: PASS/FAIL`` lines and a markdown table;
- :func:`atomic_text`: write a text file atomically.
"""
from __future__ import annotations

import math
from pathlib import Path

import torch


def _obs_variance(sigma):
    """``R`` for ``diffkit.da_baselines``: ``sigma ** 2`` as a float, or as ``(p,)`` variances."""
    if isinstance(sigma, (int, float)):
        return float(sigma) ** 2
    return torch.as_tensor(sigma, dtype=torch.float64) ** 2


def oi_window(clim, y, sigma, mask, members: int, seed: int) -> torch.Tensor:
    """``(M, K, d)``: per-frame OI of the ``K`` frames' observations ``y`` ``(K, p)`` with the background
    ``clim`` (an ``Analysis``: mean ``(d,)``, covariance ``(d, d)``), ``members`` draws of each posterior."""
    from diffkit.da_baselines import gaussian_samples, optimal_interpolation, selection_matrix

    H = selection_matrix(mask.reshape(-1), clim.mean.shape[0])
    xa, Pa = optimal_interpolation(clim.mean, clim.cov, H, y, _obs_variance(sigma))
    return gaussian_samples(xa, Pa, members, generator=torch.Generator().manual_seed(seed)).transpose(0, 1)


def enkf_window(forecast, starts, y, sigma, mask, inflation: float, seed: int, localisation=None) -> torch.Tensor:
    """``(M, K, d)``: the stochastic EnKF's analysis ensembles over the window, from ``starts`` ``(M, d)``
    one step before the first frame, with ``forecast((M, d)) -> (M, d)`` between frames."""
    from diffkit.da_baselines import enkf, selection_matrix

    H = selection_matrix(mask.reshape(-1), starts.shape[-1])
    R = _obs_variance(sigma)
    obs = [(H, y[k], R) for k in range(y.shape[0])]
    ens = enkf(forecast, starts, obs, inflation=inflation, generator=torch.Generator().manual_seed(seed),
               localisation=localisation)
    return ens.transpose(0, 1)


def _state_stats(layout, C: int):
    """The window model's per-variable state statistics ``(C, *S)`` (float64): its layout's first ``C`` channels."""
    shape = tuple(layout.sample_shape)
    m = torch.broadcast_to(layout.mean, shape)[:C].to(torch.float64)
    sd = torch.broadcast_to(layout.std, shape)[:C].to(torch.float64)
    return m, sd


def window_guided(model, cfg, y, sigma, mask, gamma: float, members: int, seed: int) -> torch.Tensor:
    """``(M, K, C, *S)``: the amortised window model's prior over the ``K`` frames (SDA composition,
    :class:`diffkit.window.ComposedDenoiser`, an all-zero mask) guided by reconstruction guidance on all
    the window's observations ``y`` ``(K, p)`` at once (a smoother).  ``mask``: ``(C, *S)`` bool."""
    from diffkit.guidance import MaskOperator, Observation, reconstruction
    from diffkit.sampling import sample
    from diffkit.window import ComposedDenoiser

    K, C, S = y.shape[0], mask.shape[0], tuple(mask.shape[1:])
    m, sd = _state_stats(model.layout, C)
    sig = torch.as_tensor(sigma, dtype=torch.float64) / sd[mask]            # (p,), standardised
    # one noise for every observation: a float (as the KS benchmark always had); else one per observation
    sig = float(sig[0]) if bool((sig == sig[0]).all()) else sig.repeat(K).reshape(1, -1).float()
    dev = next(model.parameters()).device
    shape = (members, K * C, *S)
    zeros = torch.zeros(shape, device=dev)
    den = ComposedDenoiser(model, K, zeros, zeros.clone())
    full = mask[None].expand(K, *mask.shape).reshape(K * C, *S).contiguous()
    obs = Observation(MaskOperator(full), ((y - m[mask]) / sd[mask]).reshape(1, -1).float(), sig)
    x_init = torch.randn(shape, generator=torch.Generator().manual_seed(seed)).to(dev)
    x = sample(reconstruction(den, obs, gamma=gamma), shape, sampler=cfg.sample.sampler,
               nfe=cfg.sample.nfe, x_init=x_init, device=dev,
               generator=torch.Generator(device=dev).manual_seed(seed))
    return x.double().cpu().reshape(members, K, C, *S) * sd + m


def amortised(model, cfg, y, mask, members: int, seed: int, sigma=None, sampler: str | None = None,
              nfe: int | None = None) -> torch.Tensor:
    """``(M, K, C, *S)``: the amortised window model conditioned on the observations ``y`` ``(K, p)`` at
    ``mask`` ``(C, *S)`` (:func:`diffkit.window.sample_trajectory`, SDA composition).  A model trained
    with ``data.mask_noise`` gets their noise std ``sigma`` (a number, or ``(p,)`` per observation);
    one trained on exact observations imposes them as exact (``sigma`` is not given to it).  ``sampler`` /
    ``nfe`` override the run's ``[sample]`` section."""
    from diffkit.window import sample_trajectory

    K = y.shape[0]
    values = torch.full((1, K, *mask.shape), float("nan"), dtype=torch.float64)
    values[0][:, mask] = y
    obs_mask = torch.zeros(1, K, *mask.shape, dtype=torch.bool)
    obs_mask[0][:, mask] = True
    sig = None
    if sigma is not None and model.layout.window.noise:
        sig = torch.zeros(1, K, *mask.shape, dtype=torch.float64)
        sig[0][:, mask] = torch.as_tensor(sigma, dtype=torch.float64)   # a number or (p,): broadcast over frames
    noise = torch.randn((1, members, K, *mask.shape), generator=torch.Generator().manual_seed(seed))
    dev = next(model.parameters()).device
    x = sample_trajectory(model, values, obs_mask, members, method="sda", sampler=sampler or cfg.sample.sampler,
                          nfe=nfe or cfg.sample.nfe, noise=noise, generator=torch.Generator(device=dev).manual_seed(seed),
                          sigma=sig)
    return x[0].double().cpu()


def scores(pred: torch.Tensor, truth: torch.Tensor) -> dict:
    """Ensemble-mean RMSE, fair CRPS and spread/skill of ``(N, M, K, ...)`` against ``(N, K, ...)``: root
    per (trajectory, frame) over the state's entries, then the mean."""
    from diffkit.ensemble import crps, ensemble_mean_rmse, spread_skill_ratio

    kw = dict(member_dim=1, sample_dims=(0, 1))
    return dict(rmse=float(ensemble_mean_rmse(pred, truth, **kw)), crps=float(crps(pred, truth, **kw)),
                spread_skill=float(spread_skill_ratio(pred, truth, **kw)))


def split_rmse(pred: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> dict:
    """The ensemble-mean RMSE of ``(N, M, K, *state)`` against ``(N, K, *state)`` at the points where the
    boolean ``mask`` ``(*state)`` is true (observed) and where it is false, as :func:`scores` roots it."""
    from diffkit.ensemble import ensemble_mean_rmse

    kw = dict(member_dim=1, sample_dims=(0, 1))
    return dict(rmse_observed=float(ensemble_mean_rmse(pred[..., mask], truth[..., mask], **kw)),
                rmse_unobserved=float(ensemble_mean_rmse(pred[..., ~mask], truth[..., ~mask], **kw)))


def noise_rms(y: torch.Tensor, truth: torch.Tensor, mask: torch.Tensor) -> float:
    """The RMS of the realised observation errors ``y - truth`` (``y`` ``(N, K, p)`` in ``mask``'s flat order,
    ``truth`` ``(N, K, *state)``), rooted per (window, frame) as :func:`scores` roots the RMSE."""
    d = y.to(torch.float64) - truth[..., mask].to(torch.float64)
    return float(d.pow(2).mean(-1).sqrt().mean())


def best_row(rows: dict) -> str:
    """The row of lowest RMSE; among rows within a relative 1e-9 of it (a recalibrated row has its raw
    row's ensemble mean, so the same RMSE up to rounding) the one whose spread/skill is closest to 1
    (smallest ``|log(spread/skill)|``), then the first."""
    lo = min(v["rmse"] for v in rows.values())
    tied = [r for r, v in rows.items() if v["rmse"] <= lo * (1 + 1e-9)]

    def off(r):
        ss = rows[r].get("spread_skill")
        return abs(math.log(ss)) if ss is not None and math.isfinite(ss) and ss > 0 else math.inf

    return min(tied, key=off)


def verdicts(table: dict, diffkit_rows, references, spread_skill: tuple[float, float], key: str = "stride") -> list[dict]:
    """Per sparsity (the keys of ``table``, named ``key`` in the output): the best of ``diffkit_rows`` by
    RMSE (:func:`best_row`: ties go to the better spread/skill), its RMSE over each reference row's
    (``references``: ``(row, target)``; target None: reported, no verdict, ``met`` None) and its
    spread/skill against the interval ``spread_skill``."""
    out = []
    for sparsity, rows in table.items():
        avail = {r: v for r, v in rows.items() if r in diffkit_rows and v.get("rmse") is not None
                 and math.isfinite(v["rmse"])}
        if not avail:
            out.append({key: sparsity, "best": None, "met": False, "what": "no diffkit method available"})
            continue
        best = best_row(avail)
        b = avail[best]
        checks = []
        for ref, target in references:
            o = rows[ref]
            checks.append((f"RMSE / {ref}", b["rmse"] / o["rmse"],
                           None if target is None else b["rmse"] <= target * o["rmse"],
                           "none (reported)" if target is None else f"<= {target}"))
        lo, hi = spread_skill
        checks.append(("spread/skill", b["spread_skill"], lo <= b["spread_skill"] <= hi, f"in [{lo}, {hi}]"))
        for what, value, ok, want in checks:
            out.append({key: sparsity, "best": best, "what": what, "value": float(value), "target": want,
                        "met": None if ok is None else bool(ok)})
    return out


def _verdict(met) -> str:
    return "reported" if met is None else ("PASS" if met else "FAIL")


def target_lines(targets: list[dict], key: str = "stride") -> list[str]:
    """One ``target (...): ... PASS/FAIL`` line per verdict of :func:`verdicts` (``reported`` without a target)."""
    out = []
    for v in targets:
        if v["best"] is None:
            out.append(f"target ({key} {v[key]}): {v['what']}: FAIL")
            continue
        out.append(f"target ({key} {v[key]}, best diffkit method {v['best']}): {v['what']} = {v['value']:.2f} "
                   f"(target {v['target']}): {_verdict(v['met'])}")
    return out


def verdict_table(targets: list[dict], key: str = "stride") -> list[str]:
    """The markdown table of the verdicts of :func:`verdicts`."""
    lines = [f"| {key} | best diffkit method | criterion | value | target | verdict |", "|---|---|---|---|---|---|"]
    for v in targets:
        lines.append(f"| {v[key]} | {v['best'] or 'none'} | {v['what']} | "
                     f"{'' if v['best'] is None else format(v['value'], '.2f')} | {v.get('target', '')} | "
                     f"**{_verdict(v['met'])}** |")
    return lines


def atomic_text(path: Path, text: str) -> None:
    from diffkit._io import atomic_write

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda f: f.write(text))
