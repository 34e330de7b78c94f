"""Tuning the perturbed-initial-condition ensemble of a regression model.

A regression (MSE) model gives an ensemble only from perturbed initial conditions
(:mod:`diffkit.rollout`: ``perturb``, the standard deviation in standardised units, and
``perturb_length``, the correlation length in grid points).  :func:`tune_perturbation` picks the
pair on validation data, so that the baseline a diffusion ensemble is compared with is as good
as this family allows:

- every candidate ``(amplitude, length)`` of a small grid rolls the model out ``steps`` steps from
  the validation initial states with ``members`` members, **with the same seed** (common random
  numbers: the candidates differ by their perturbation only, not by the luck of the draw);
- the ensemble at lead ``steps`` is scored against the truth in standardised units (each state
  channel divided by its ``state_std``, so the channels weigh alike) with :mod:`diffkit.ensemble`:
  fair CRPS, ensemble-mean RMSE, spread and spread/skill, weighted means over the channels and
  grid points, then the mean over the initial states;
- ``crps_multiscale`` is the mean, over the block sizes ``scales``, of the fair CRPS of the fields
  averaged over blocks of ``b`` points along every spatial axis (``b = 1``: the pointwise CRPS),
  times ``b ** (ndim / 2)`` (a constant per scale, so that coarse scales, whose means vary less,
  still count: white noise would score alike at every scale).
  The pointwise CRPS sees only each point's marginal distribution, so when the model maps the
  perturbations linearly (as over a short first lead) it cannot tell two correlation lengths of the
  same pointwise spread apart; the block means' variance depends on the correlation, and a sum of
  proper scores is proper, so ``crps_multiscale`` identifies the length as well;
- the choice minimises ``metric``: ``"crps"`` (the default: the score the baseline is compared on),
  ``"crps_multiscale"``, or ``"spread_skill"`` (``|log(spread/skill)|``, spread/skill closest to 1).

The result is a :class:`PerturbationTuning`: the table of every candidate's scores and the choice.
"""
from __future__ import annotations

import math
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field

import torch

from . import ensemble as E
from .errors import ShapeError
from .rollout import _unwrap, autoregressive_spec, resolve_perturb_length, rollout

__all__ = ["METRICS", "PerturbationTuning", "tune_perturbation", "block_means"]

#: the selection criteria of :func:`tune_perturbation` (smaller is better)
METRICS = ("crps", "crps_multiscale", "spread_skill")
COLUMNS = ("amplitude", "length", "crps", "crps_multiscale", "rmse", "spread", "spread_skill")


@dataclass
class PerturbationTuning:
    """What :func:`tune_perturbation` returns."""

    table: list[dict]
    """One row per candidate, in grid order: ``amplitude``, ``length`` and the scores ``crps``,
    ``crps_multiscale``, ``rmse``, ``spread``, ``spread_skill`` at lead ``lead`` (standardised units)."""
    amplitude: float
    """The chosen ``perturb``."""
    length: float | tuple
    """The chosen ``perturb_length`` (as given in ``lengths``)."""
    metric: str
    lead: int
    members: int
    scales: tuple[int, ...] = field(default=(1,))

    @property
    def best(self) -> dict:
        """The chosen candidate's row."""
        return next(r for r in self.table if r["amplitude"] == self.amplitude and r["length"] == self.length)

    def markdown(self) -> str:
        """The table as markdown, the chosen row in bold."""
        head = "| amplitude | length | fair CRPS | multiscale CRPS | RMSE | spread | spread/skill |"
        lines = [head, "|---|---|---|---|---|---|---|"]
        for r in self.table:
            cells = [f"{r['amplitude']:g}", str(r["length"]), f"{r['crps']:.4g}", f"{r['crps_multiscale']:.4g}",
                     f"{r['rmse']:.4g}", f"{r['spread']:.4g}", f"{r['spread_skill']:.3f}"]
            if r is self.best:
                cells = [f"**{c}**" for c in cells]
            lines.append("| " + " | ".join(cells) + " |")
        return "\n".join(lines)


def block_means(x: torch.Tensor, b: int, ndim: int, weights: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Weighted means of ``x`` over blocks of ``b`` points along each of its last ``ndim`` axes
    (each axis cropped to a multiple of ``b``), and the blocks' total weights.  ``weights``
    broadcasts against ``x``; a block of weight 0 has mean 0 and weight 0."""
    w = torch.broadcast_to(weights, x.shape)
    xw = torch.where(w > 0, x, torch.zeros((), dtype=x.dtype, device=x.device)) * w
    for ax in range(x.ndim - ndim, x.ndim):
        n = x.shape[ax] // b * b
        xw = xw.narrow(ax, 0, n).unflatten(ax, (n // b, b)).sum(ax + 1)
        w = w.narrow(ax, 0, n).unflatten(ax, (n // b, b)).sum(ax + 1)
    return xw / w.clamp_min(torch.finfo(w.dtype).tiny), w


def _check_grid(values, what: str) -> list:
    vals = list(values) if isinstance(values, (list, tuple)) else [values]
    if not vals:
        raise ValueError(f"{what} is empty; give at least one candidate")
    return vals


def tune_perturbation(model, history: torch.Tensor, truth: torch.Tensor, *, steps: int = 1, members: int = 8,
                      amplitudes: Sequence[float] = (0.02, 0.05, 0.1, 0.2, 0.4),
                      lengths: Sequence = (0.0, 1.0, 2.0, 4.0), metric: str = "crps",
                      scales: Sequence[int] = (1, 2, 4, 8), weights=None, fixed_mask: torch.Tensor | None = None,
                      seed: int = 0, forecast: Callable[..., torch.Tensor] | None = None,
                      layout=None, **rollout_kwargs) -> PerturbationTuning:
    """Pick ``(perturb, perturb_length)`` for a regression model's perturbed-initial-condition ensemble
    on validation data (see the module doc).

    ``model``: a Regressor (or a handle with ``.model``) with an autoregressive layout.
    ``history``: ``(N, history, C, *S)`` physical validation initial states; ``truth``: ``(N, C, *S)``
    the physical states ``steps`` steps later.  ``amplitudes`` (> 0) x ``lengths`` (each a number or
    one per spatial axis, >= 0) is the grid.  ``scales``: the block sizes of ``crps_multiscale``
    (those above the smallest spatial size are dropped).  ``weights``: per-point weights that
    broadcast to ``(C, *S)`` (e.g. area weights); ``fixed_mask``: ``(C, *S)`` points left out (and
    never perturbed).  ``forecast``: how to roll out, ``forecast(perturb=, perturb_length=,
    members=, steps=, seed=) -> (N, members, steps, C, *S)`` physical (a domain's forecast function
    with its conditioning); default :func:`diffkit.rollout.rollout` with ``rollout_kwargs``.
    """
    inner, _ = _unwrap(model, None)
    layout = inner.layout if layout is None else layout
    spec = autoregressive_spec(layout)
    nd, C = layout.ndim, spec.num_variables
    if metric not in METRICS:
        raise ValueError(f"metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise ValueError(f"steps must be an integer >= 1 (the lead, in steps, that is scored), got {steps!r}")
    if isinstance(members, bool) or not isinstance(members, int) or members < 2:
        raise ValueError(f"members must be an integer >= 2 (the fair CRPS and the spread need two), got {members!r}")
    amps = [float(a) for a in _check_grid(amplitudes, "amplitudes")]
    if not all(math.isfinite(a) and a > 0 for a in amps):
        raise ValueError(f"amplitudes must be > 0 and finite, got {amps} (the unperturbed forecast is a separate "
                         f"baseline: it has no spread)")
    lens = _check_grid(lengths, "lengths")
    for v in lens:
        resolve_perturb_length(v, nd)
    truth = torch.as_tensor(truth)
    history = torch.as_tensor(history)
    want = (C, *layout.shape)
    if truth.ndim != 1 + len(want) or tuple(truth.shape[1:]) != want or truth.shape[0] != history.shape[0]:
        raise ShapeError(f"truth has shape {tuple(truth.shape)}, expected ({history.shape[0]}, "
                         f"{', '.join(map(str, want))}): the state {steps} step(s) after each of the "
                         f"{history.shape[0]} initial states")
    smin = min(layout.shape) if nd else 1
    sc = tuple(sorted({int(b) for b in scales if 1 <= int(b) <= smin} | {1}))

    w = torch.ones(want, dtype=torch.float64)
    if weights is not None:
        w = w * torch.as_tensor(weights, dtype=torch.float64)
    if fixed_mask is not None:
        w = torch.where(torch.as_tensor(fixed_mask, dtype=torch.bool), torch.zeros((), dtype=torch.float64), w)
    y = spec.standardize(truth.to(torch.float64), nd)
    y = torch.where(w > 0, y, torch.zeros((), dtype=torch.float64))

    if forecast is None:
        def forecast(**kw):
            return rollout(model, history, layout=layout, fixed_mask=fixed_mask, **rollout_kwargs, **kw)

    dims = tuple(range(-(nd + 1), 0))                       # channels and space: the layout is (N, C, *S)
    table = []
    for length in lens:
        for a in amps:
            pred = forecast(perturb=a, perturb_length=length, members=members, steps=steps, seed=seed)
            if tuple(pred.shape) != (history.shape[0], members, steps, *want):
                raise ShapeError(f"forecast returned shape {tuple(pred.shape)}, expected "
                                 f"{(history.shape[0], members, steps, *want)}")
            f = spec.standardize(pred[:, :, steps - 1].to(torch.float64), nd)     # (N, M, C, *S)
            f = torch.where(w > 0, f, torch.zeros((), dtype=torch.float64))
            kw = dict(member_dim=1, weights=w, dims=dims, sample_dims=(0,))
            row = dict(amplitude=a, length=length,
                       crps=float(E.crps(f, y, **kw)),
                       rmse=float(E.ensemble_mean_rmse(f, y, **kw)),
                       spread=float(E.spread(f, y, **kw)),
                       spread_skill=float(E.spread_skill_ratio(f, y, **kw)))
            ms = []
            for b in sc:
                fb, _ = block_means(f, b, nd, w)
                yb, wb = block_means(y, b, nd, w)
                ms.append(float(E.crps(fb, yb, member_dim=1, weights=wb, dims=dims, sample_dims=(0,))) * b ** (nd / 2))
            row["crps_multiscale"] = sum(ms) / len(ms)
            table.append({k: row[k] for k in COLUMNS})
    key = (lambda r: abs(math.log(r["spread_skill"])) if r["spread_skill"] > 0 else math.inf) \
        if metric == "spread_skill" else (lambda r: r[metric])
    best = min(table, key=key)
    if len(amps) > 1 and best["amplitude"] in (min(amps), max(amps)):
        edge = "smallest" if best["amplitude"] == min(amps) else "largest"
        warnings.warn(f"tune_perturbation chose the {edge} amplitude of the grid ({best['amplitude']:g}): the "
                      f"optimum may lie beyond it; extend amplitudes past {best['amplitude']:g}", stacklevel=2)
    return PerturbationTuning(table=table, amplitude=best["amplitude"], length=best["length"], metric=metric,
                              lead=steps, members=members, scales=sc)
