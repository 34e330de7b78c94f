"""Calibrating ensembles on validation data: the spread scale of any ensemble, and the
perturbed-initial-condition ensemble of a regression model.

**Spread scale** (:func:`spread_scale`, :func:`scale_spread`).  An ensemble whose spread does not
match its error (spread/skill, :func:`diffkit.ensemble.spread_skill_ratio`, away from 1) can be
recalibrated by scaling every member's anomaly about the ensemble mean,
``x_m' = xbar + s (x_m - xbar)``: the ensemble mean, and so its RMSE, are unchanged and the spread
is multiplied by exactly ``s`` (the root of the mean variance is homogeneous of degree 1 in ``s``,
whatever the weights, mask and order of the square root), so ``s = 1 / (spread/skill)`` measured on
validation data makes the validation spread/skill exactly 1.  It is the post-hoc counterpart of an
EnKF's multiplicative inflation (:mod:`diffkit.da_baselines`, whose inflation acts before the
analysis) and is as good as the validation data are like the data it is applied to: the same
method, model, observation density and lead.  ``dims`` left out of the reduction (e.g. the channel
dim) give one scale per remaining index, which :func:`scale_spread` broadcasts back.  A linear
rescaling keeps each member's mean-plus-anomaly structure but not necessarily its physical
consistency for large ``s``; the scale is reported so that a user sees how far from 1 it is.

**Perturbed initial conditions.**

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

__all__ = ["METRICS", "PerturbationTuning", "tune_perturbation", "block_means", "spread_scale", "scale_spread",
           "add_spread_scale_argument", "check_spread_scale", "apply_spread_scale", "spread_scale_attrs"]

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


# ----------------------------------------------------------------------------- spread scale
def spread_scale(forecast, truth, *, member_dim: int = 0, weights=None, mask=None, dims=None, sample_dims=(),
                 sqrt_first: bool = True) -> torch.Tensor:
    """The anomaly scale ``s = 1 / (spread/skill)`` that calibrates ``forecast`` against ``truth``: after
    :func:`scale_spread` by ``s`` its :func:`diffkit.ensemble.spread_skill_ratio` (same arguments) is
    exactly 1 and its ensemble mean unchanged (see the module doc).  The arguments are those of the
    :mod:`diffkit.ensemble` metrics; the result is float64 with the layout's shape (the forecast without
    its member dim, broadcast against the truth) with every reduced dim of size 1 and the leading
    size-1 dims dropped (a 0-d tensor when every dim is reduced), so it broadcasts against any
    forecast of that layout from the right.  A one-line error where the ensemble has no spread or the
    ensemble mean no error (no scale makes the ratio 1) or the ratio is not finite."""
    ratio = E.spread_skill_ratio(forecast, truth, member_dim=member_dim, weights=weights, mask=mask, dims=dims,
                                 sample_dims=sample_dims, sqrt_first=sqrt_first)
    bad = ~torch.isfinite(ratio) | (ratio <= 0)
    if bool(bad.any()):
        v = float(ratio[bad].flatten()[0])
        why = ("the ensemble has no spread (identical members)" if v == 0 else
               "the ensemble mean has no error (or there is no valid point)" if math.isinf(v) or math.isnan(v) else
               "the ratio is not positive")
        raise ValueError(f"spread/skill is {v:g} on the calibration data: {why}; no spread scale calibrates it -- "
                         f"use data where the members differ and the mean misses the truth")
    # the reduced dims back as size 1, so that the scale broadcasts against the layout from the right
    fc = torch.as_tensor(forecast)
    md = E._dim(member_dim, fc.ndim, "member_dim")
    layout = torch.broadcast_shapes(fc.shape[:md] + fc.shape[md + 1:], torch.as_tensor(truth).shape)
    nd = len(layout)
    sd = E._dims(sample_dims, nd, "sample_dims")
    rd = tuple(d for d in range(nd) if d not in sd) if dims is None else E._dims(dims, nd, "dims")
    keep = [n if d not in set(rd) | set(sd) else 1 for d, n in enumerate(layout)]
    while keep and keep[0] == 1:       # leading size-1 dims are implied by broadcasting
        keep.pop(0)
    return (1.0 / ratio).reshape(keep)


def scale_spread(forecast, scale, *, member_dim: int = 0) -> torch.Tensor:
    """``xbar + scale * (x - xbar)`` over the members at ``member_dim``: the ensemble with its anomalies
    scaled (its mean unchanged).  ``scale``: a number > 0 or a tensor of them that broadcasts against
    the forecast without its member dim (aligned from the right, as :func:`spread_scale` returns it).
    Keeps the forecast's dtype and device."""
    x = torch.as_tensor(forecast)
    if x.ndim < 1:
        raise ShapeError("scale_spread needs a forecast with a member dim, got a scalar")
    md = E._dim(member_dim, x.ndim, "member_dim")
    s = torch.as_tensor(scale, dtype=torch.float64)
    if not bool(torch.isfinite(s).all()) or bool((s <= 0).any()):
        raise ValueError(f"the spread scale must be finite and > 0 (1: unchanged), got {scale!r}")
    layout = x.shape[:md] + x.shape[md + 1:]
    try:
        torch.broadcast_shapes(layout, s.shape)
    except RuntimeError:
        raise ShapeError(f"the spread scale of shape {tuple(s.shape)} does not broadcast against the forecast "
                         f"without its member dim {tuple(layout)}") from None
    if not x.is_floating_point():
        x = x.to(torch.float64)
    s = s.to(device=x.device, dtype=x.dtype)
    mean = x.mean(md, keepdim=True)
    return mean + _at_layout(s, x.ndim, md) * (x - mean)


def _at_layout(s: torch.Tensor, ndim: int, md: int) -> torch.Tensor:
    """``s`` (aligned from the right against the layout: the forecast of ``ndim`` dims without dim ``md``)
    with a size-1 dim inserted where the member dim sits, so that it broadcasts against the forecast."""
    after = ndim - 1 - md                  # layout dims after the member dim
    if s.ndim <= after:
        return s
    return s.unsqueeze(s.ndim - after)


# ----------------------------------------------------------------------------- the --spread-scale option
def add_spread_scale_argument(parser, what: str = "ensemble") -> None:
    """``--spread-scale S`` of the commands that write an ensemble (``diffkit assimilate``, and the
    domains' ``diffkit forecast`` / ``diffkit rollout``): one option, one meaning, one check
    (:func:`check_spread_scale`) and one application (:func:`apply_spread_scale`)."""
    parser.add_argument("--spread-scale", type=float, default=1.0, metavar="S",
                        help=f"scale every member's anomaly about the {what} mean by S before writing (the mean is "
                             f"unchanged, the spread times S): the recalibration diffkit.calibrate.spread_scale "
                             f"measures on validation data, 1 / the spread/skill reported for runs of the same "
                             f"set-up (default 1: as sampled)")


def check_spread_scale(args) -> None:
    """A one-line error unless ``args.spread_scale`` (absent: 1) is a finite number > 0."""
    v = float(getattr(args, "spread_scale", 1.0))
    if not (math.isfinite(v) and v > 0):
        raise ValueError(f"--spread-scale must be a finite number > 0 (1: the ensemble as sampled), got {v:g}; "
                         f"measure it on validation data: 1 / the spread/skill diffkit evaluate (or the calibration "
                         f"line) reports")


def apply_spread_scale(members: torch.Tensor, args, *, member_dim: int = 0) -> torch.Tensor:
    """The sampled ``members`` (member dim at ``member_dim``) with ``--spread-scale`` applied: every
    member's anomaly about the ensemble mean times ``args.spread_scale`` (:func:`scale_spread`; 1 or
    absent: returned as is).  The commands call it on the sampled tensor before anything is computed
    from it, so the file's members, mean, spread and any score against a truth are those of the
    recalibrated ensemble; they record the scale as the ``spread_scale`` attribute.  The commands check
    the option first (:func:`check_spread_scale`, before any work); :func:`scale_spread` checks it too."""
    scale = float(getattr(args, "spread_scale", 1.0))
    if scale == 1.0:
        return members
    return scale_spread(members, scale, member_dim=member_dim)


def spread_scale_attrs(args) -> dict:
    """``{"spread_scale": S}`` where ``--spread-scale`` is not 1, else ``{}``: the attribute a file records."""
    v = float(getattr(args, "spread_scale", 1.0))
    return {"spread_scale": v} if v != 1.0 else {}
