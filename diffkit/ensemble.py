"""Ensemble verification metrics: skill, spread, spread/skill, CRPS and rank histograms.

The one implementation of these scores in diffkit; the domain plugins (``diffkit_weather.metrics``,
``diffkit_pde.metrics``) only map their coordinates and dim conventions onto it.  Definitions
follow WeatherBench 2 (Rasp et al. 2024, JAMES 16, e2023MS004019, and ``weatherbench2.metrics``);
the CRPS estimators follow Ferro (2014, QJRMS 140, 1917) and Zamo & Naveau (2018, Math. Geosci.
50, 209); the spread/skill correction Fortin et al. (2014, J. Hydrometeor. 15, 1708).

Conventions
-----------
- ``forecast`` is a tensor (or anything :func:`torch.as_tensor` accepts) with a member dim at
  ``member_dim`` (an index into the forecast, default 0).  The *layout* is the forecast without
  its member dim, broadcast against the ``truth`` (the truth may have fewer dims; it broadcasts
  from the right).  ``dims``, ``sample_dims`` and the dims of ``weights`` and ``mask`` index the
  layout; negative indices are the safe choice.  Any rank works: a layout may be a scalar
  series ``(T,)`` or ``(N, K, C, X, Y)``.
- ``weights``: ``None`` (uniform) or a finite non-negative tensor that broadcasts to the layout
  (area weights ``(nlat, 1)``, a land mask, cell volumes...).  ``mask``: ``None`` or a bool or
  non-negative float tensor that broadcasts to the layout, True / > 0 at valid points; it
  multiplies the weights.  Points of weight 0 are left out and their values (NaN included) are
  never used; unmasked NaN propagates to the result.
- Reduction: a pointwise quantity -> weighted mean over ``dims`` (``None``: every layout dim not
  in ``sample_dims``) -> for RMSE and spread, the square root -> equal-weight mean over
  ``sample_dims`` (e.g. initial times or trajectories; a sample with no valid point is left
  out).  The result is the layout without ``dims`` and ``sample_dims``, float64 (all arithmetic
  is float64 on the forecast's device).
- **Order of the square root.**  ``sqrt_first=True`` (the default, everywhere) takes the root per
  sample *before* the mean over ``sample_dims``, as WeatherBench 2 does for RMSE
  (``RMSESqrtBeforeTimeAvg``, ``EnsembleStddevSqrtBeforeTimeAvg``); ``sqrt_first=False`` averages
  the squares over the samples and takes the root last.  RMSE and spread always use the same
  order, so their ratio is consistent.
- **Spread/skill**, one convention: ``ratio = sqrt((M + 1) / M) * spread / RMSE(ensemble mean)``,
  where ``spread`` is the root of the weighted mean member variance (``ddof = 1``) and both are
  averaged over ``sample_dims`` in the order above.  For a reliable ensemble (truth exchangeable
  with the ``M`` members) ``E[(xbar - y)^2] = (1 + 1/M) E[s^2]``, so the ratio is 1; below 1 the
  ensemble is under-dispersive.  The identity is about averaged squares, so with very few
  points per sample ``sqrt_first=True`` carries a small Jensen bias; ``sqrt_first=False`` has none.
- CRPS: ``mean_i |X_i - y| - c sum_{i,j} |X_i - X_j|`` with ``c = 1/(2M(M-1))`` ("fair",
  unbiased for the distribution the members are drawn from; WB2's CRPS) or ``c = 1/(2M^2)``
  ("nrg", the CRPS of the empirical ensemble distribution, as properscoring computes it).
- Rank histogram: ``M + 1`` bins; ties broken at random (Hamill 2001) with a generator.

Registered metrics
------------------
The scores with one value per remaining index are registered through the ``diffkit_metrics``
hook as ``ensemble_*`` and marked with :func:`ensemble_metric` (``fn.kind == "ensemble"``): they
share the calling convention
``fn(forecast, truth, *, member_dim=0, weights=None, mask=None, dims=None, sample_dims=(), **options)``
so that a consumer (``diffkit evaluate``, ``diffkit rollout``) can compute every registered
ensemble metric, a plugin's too, without knowing it; :func:`registered` lists them.
"""
from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from .errors import NonFiniteError, ShapeError

__all__ = [
    "weighted_mean", "rmse", "ensemble_mean_rmse", "spread", "spread_skill_ratio", "crps_pointwise", "crps",
    "rank_histogram", "ensemble_metric", "registered", "METRICS", "Dispersion", "dispersion_verdict",
    "rank_summary", "format_rank_bins", "DISPERSION_BAND", "RANK_EXTREMES_BAND",
]

_F64 = torch.float64
_ESTIMATORS = ("fair", "nrg")
_METHODS = ("sort", "pairwise")


# ----------------------------------------------------------------------------- helpers
def _to_tensor(x) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return x
    a = np.asarray(x)
    return torch.from_numpy(a if a.flags.writeable else a.copy()) if a.dtype != object else torch.as_tensor(x)


def _as64(x, what: str, device=None) -> torch.Tensor:
    t = _to_tensor(x)
    if t.is_complex():
        raise TypeError(f"{what} is complex ({t.dtype}); pass a real field")
    return t.to(device=device if device is not None else t.device, dtype=_F64)


def _dim(d, nd: int, what: str) -> int:
    if isinstance(d, bool) or not isinstance(d, (int, np.integer)):
        raise TypeError(f"{what} must be int dim indices, got {d!r}")
    d = int(d)
    if not -nd <= d < nd:
        raise ShapeError(f"{what}: dim {d} is out of range for a layout of {nd} dims")
    return d % nd


def _dims(ds, nd: int, what: str) -> tuple[int, ...]:
    ds = (ds,) if isinstance(ds, (int, np.integer)) else tuple(ds)
    out = tuple(_dim(d, nd, what) for d in ds)
    if len(set(out)) != len(out):
        raise ShapeError(f"{what} has repeated dims: {ds}")
    return out


def _point_weights(shape: torch.Size, device, weights, mask) -> torch.Tensor:
    """Weights broadcast to ``shape`` (float64), zero at masked points."""
    w = torch.ones((), dtype=_F64, device=device)
    if weights is not None:
        w = _as64(weights, "weights", device)
        if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
            raise ValueError("weights must be finite and non-negative")
    if mask is not None:
        m = _to_tensor(mask).to(device=device, dtype=_F64)
        if not bool(torch.isfinite(m).all()) or bool((m < 0).any()):
            raise ValueError("a float mask must be finite and non-negative (0 = excluded)")
        w = w * m
    try:
        return torch.broadcast_to(w, shape)
    except RuntimeError:
        raise ShapeError(f"weights/mask of shape {tuple(w.shape)} do not broadcast to the layout {tuple(shape)} "
                         f"(the forecast without its member dim, broadcast against the truth)") from None


def _reduce(x: torch.Tensor, weights, mask, dims, sample_dims, *, sqrt: bool = False,
            sqrt_first: bool = True) -> torch.Tensor:
    """Weighted mean over ``dims``, optional sqrt, then equal-weight mean over ``sample_dims`` (module doc)."""
    nd = x.ndim
    sd = _dims(sample_dims, nd, "sample_dims")
    rd = tuple(d for d in range(nd) if d not in sd) if dims is None else _dims(dims, nd, "dims")
    if set(rd) & set(sd):
        raise ShapeError(f"dims {tuple(rd)} and sample_dims {tuple(sd)} share dims; a dim is either weighted "
                         f"(dims) or averaged per sample (sample_dims)")
    w = _point_weights(x.shape, x.device, weights, mask)
    valid = w > 0
    zero = torch.zeros((), dtype=_F64, device=x.device)
    x = torch.where(valid, x, zero)  # masked NaN never enters
    if rd:
        den = w.sum(rd, keepdim=True)
        m = (x * w).sum(rd, keepdim=True) / den  # NaN where nothing is valid
    else:  # nothing to weight (torch's sum over dims=() would sum everything)
        den = w
        m = torch.where(valid, x, torch.full((), math.nan, dtype=_F64, device=x.device))
    if sqrt and (sqrt_first or not sd):
        m = m.sqrt()
    if sd:
        has = den > 0
        m = torch.where(has, m, zero).sum(sd, keepdim=True) / has.sum(sd, keepdim=True)
        if sqrt and not sqrt_first:
            m = m.sqrt()
    gone = set(rd) | set(sd)
    return m.reshape([n for d, n in enumerate(m.shape) if d not in gone])


def _ensemble(forecast, truth, member_dim: int, min_members: int = 1):
    """Forecast with its member dim moved last, the truth (or None) and the ensemble size."""
    fc = _as64(forecast, "forecast")
    if fc.ndim < 1:
        raise ShapeError("an ensemble forecast needs a member dim, got a scalar")
    fc = fc.movedim(_dim(member_dim, fc.ndim, "member_dim"), -1)
    M = fc.shape[-1]
    if M < min_members:
        raise ValueError(f"this metric needs at least {min_members} ensemble members, got {M}")
    if truth is None:
        return fc, None, M
    tr = _as64(truth, "truth", fc.device)
    if tr.ndim > fc.ndim - 1:
        raise ShapeError(f"truth has shape {tuple(tr.shape)}: more dims than the forecast without its member dim "
                         f"{tuple(fc.shape[:-1])}")
    try:
        torch.broadcast_shapes(fc.shape[:-1], tr.shape)
    except RuntimeError:
        raise ShapeError(f"truth of shape {tuple(tr.shape)} does not broadcast against the forecast without its "
                         f"member dim {tuple(fc.shape[:-1])}") from None
    return fc, tr, M


def _check_choice(value, allowed, what):
    if value not in allowed:
        raise ValueError(f"{what} must be one of {allowed}, got {value!r}")


# ----------------------------------------------------------------------------- registration
def ensemble_metric(fn: Callable | None = None, *, min_members: int = 2):
    """Mark ``fn`` as an ensemble metric: ``fn.kind = "ensemble"`` and ``fn.min_members``.

    The calling convention it promises is
    ``fn(forecast, truth, *, member_dim=0, weights=None, mask=None, dims=None, sample_dims=(), **options)``
    with the meanings of this module, returning one value per index of the layout without
    ``dims`` and ``sample_dims``; ``min_members`` is the smallest ensemble it accepts.  Use as
    ``@ensemble_metric`` or ``@ensemble_metric(min_members=1)``.
    """
    def mark(f):
        f.kind = "ensemble"
        f.min_members = int(min_members)
        return f

    return mark if fn is None else mark(fn)


def registered() -> dict[str, Callable]:
    """``{name: fn}`` of every metric registered through ``diffkit_metrics`` with ``fn.kind == "ensemble"``
    (the core's ``ensemble_*`` and any plugin's), sorted by name."""
    from . import registry

    return {c.name: c.obj for c in registry.components("metric") if getattr(c.obj, "kind", None) == "ensemble"}


# ----------------------------------------------------------------------------- scores
def weighted_mean(x, weights=None, *, mask=None, dims=None, sample_dims=()) -> torch.Tensor:
    """Weighted mean of ``x`` over ``dims`` (``sum(w m x) / sum(w m)``), then the mean over ``sample_dims``.

    ``x`` is the layout itself (no member dim).  NaN where every point is masked.
    """
    return _reduce(_as64(x, "x"), weights, mask, dims, sample_dims)


def rmse(forecast, truth, *, weights=None, mask=None, dims=None, sample_dims=(),
         sqrt_first: bool = True) -> torch.Tensor:
    """Weighted RMSE of a deterministic forecast: ``sqrt(weighted mean over dims of (f - y)^2)``, then the
    mean over ``sample_dims`` (root first unless ``sqrt_first=False``).  The layout is the broadcast
    of ``forecast`` and ``truth``."""
    fc = _as64(forecast, "forecast")
    tr = _as64(truth, "truth", fc.device)
    try:
        err = fc - tr
    except RuntimeError:
        raise ShapeError(f"forecast of shape {tuple(fc.shape)} and truth of shape {tuple(tr.shape)} do not "
                         f"broadcast") from None
    return _reduce(err.square(), weights, mask, dims, sample_dims, sqrt=True, sqrt_first=sqrt_first)


@ensemble_metric(min_members=1)
def ensemble_mean_rmse(forecast, truth, *, member_dim: int = 0, weights=None, mask=None, dims=None,
                       sample_dims=(), sqrt_first: bool = True) -> torch.Tensor:
    """RMSE of the ensemble mean (the "skill" of spread/skill), weighted, root per sample by default.

    WB2 ``EnsembleMeanRMSESqrtBeforeTimeAvg``; ``sqrt_first=False`` is the root of the sample
    mean of the weighted MSE.
    """
    fc, tr, _ = _ensemble(forecast, truth, member_dim)
    return _reduce((fc.mean(-1) - tr).square(), weights, mask, dims, sample_dims, sqrt=True, sqrt_first=sqrt_first)


def _spread_and_skill(forecast, truth, member_dim, weights, mask, dims, sample_dims, sqrt_first, need_skill):
    fc, tr, M = _ensemble(forecast, truth, member_dim, 2)
    var = fc.var(-1, correction=1)
    skill = None
    if tr is not None:
        sq = (fc.mean(-1) - tr).square()
        var = var.expand(sq.shape)  # the same layout (and so the same weights and samples) for both
        if need_skill:
            skill = _reduce(sq, weights, mask, dims, sample_dims, sqrt=True, sqrt_first=sqrt_first)
    sprd = _reduce(var, weights, mask, dims, sample_dims, sqrt=True, sqrt_first=sqrt_first)
    return sprd, skill, M


@ensemble_metric
def spread(forecast, truth=None, *, member_dim: int = 0, weights=None, mask=None, dims=None, sample_dims=(),
           sqrt_first: bool = True) -> torch.Tensor:
    """Ensemble spread: root of the weighted mean member variance (ddof 1), root per sample by default.

    WB2 ``EnsembleStddevSqrtBeforeTimeAvg``.  ``truth`` is not used in the score; when given, it
    only sets the layout (the forecast broadcast against it), so that the spread lines up with
    :func:`ensemble_mean_rmse` and the same ``mask`` applies.  Needs ``M >= 2``.
    """
    return _spread_and_skill(forecast, truth, member_dim, weights, mask, dims, sample_dims, sqrt_first, False)[0]


@ensemble_metric
def spread_skill_ratio(forecast, truth, *, member_dim: int = 0, weights=None, mask=None, dims=None,
                       sample_dims=(), sqrt_first: bool = True) -> torch.Tensor:
    """Spread/skill ratio ``sqrt((M + 1) / M) * spread / RMSE(ensemble mean)``: 1 for a reliable ensemble.

    :func:`spread` and :func:`ensemble_mean_rmse` with the same weights, mask and order of the
    square root; below 1 the ensemble is under-dispersive (see the module doc).
    """
    sprd, skill, M = _spread_and_skill(forecast, truth, member_dim, weights, mask, dims, sample_dims, sqrt_first,
                                       True)
    return math.sqrt((M + 1) / M) * sprd / skill


def crps_pointwise(forecast, truth, *, member_dim: int = 0, estimator: str = "fair",
                   method: str = "sort") -> torch.Tensor:
    """Pointwise ensemble CRPS ``mean_i |X_i - y| - c * sum_{i,j} |X_i - X_j|`` (layout shape).

    ``estimator="fair"``: ``c = 1 / (2 M (M-1))``, unbiased for the CRPS of the distribution the
    members are drawn from (Ferro 2014; WB2 ``CRPS``; needs ``M >= 2``).  ``estimator="nrg"``:
    ``c = 1 / (2 M^2)``, the CRPS of the empirical ensemble distribution (Gneiting & Raftery 2007).
    ``method="sort"`` uses ``sum_{i,j} |X_i - X_j| = 2 sum_i (2i - M - 1) X_(i)`` over the sorted
    members, ``O(M log M)``; ``method="pairwise"`` is the direct ``O(M^2)`` double sum.
    """
    _check_choice(estimator, _ESTIMATORS, "estimator")
    _check_choice(method, _METHODS, "method")
    fc, tr, M = _ensemble(forecast, truth, member_dim, 2 if estimator == "fair" else 1)
    skill = (fc - tr.unsqueeze(-1)).abs().mean(-1)
    if method == "sort":
        i = torch.arange(1, M + 1, dtype=_F64, device=fc.device)
        pair = 2.0 * (fc.sort(-1).values * (2.0 * i - M - 1)).sum(-1)
    else:
        pair = (fc.unsqueeze(-1) - fc.unsqueeze(-2)).abs().sum((-2, -1))
    c = 1.0 / (2.0 * M * (M - 1)) if estimator == "fair" else 1.0 / (2.0 * M * M)
    return skill - c * pair


@ensemble_metric
def crps(forecast, truth, *, member_dim: int = 0, weights=None, mask=None, dims=None, sample_dims=(),
         estimator: str = "fair", method: str = "sort") -> torch.Tensor:
    """Ensemble CRPS (fair by default, :func:`crps_pointwise`): weighted mean over ``dims``, then over ``sample_dims``.

    WB2 ``CRPS``.  ``estimator="nrg"`` gives the energy form (accepts ``M = 1``).
    """
    c = crps_pointwise(forecast, truth, member_dim=member_dim, estimator=estimator, method=method)
    return _reduce(c, weights, mask, dims, sample_dims)


def rank_histogram(forecast, truth, *, member_dim: int = 0, mask=None, dims=None,
                   generator: torch.Generator | int | None = None, normalize: bool = False) -> torch.Tensor:
    """Rank histogram (Talagrand diagram): counts of the truth's rank among the ``M`` members, ``M + 1`` bins.

    The rank is the number of members below the truth; ties with ``k`` members are broken at
    random, uniformly over the ``k + 1`` possible ranks (Hamill 2001, MWR 129, 550), drawn from
    ``generator`` (a :class:`torch.Generator` or an int seed; ``None`` uses torch's global RNG).
    Counts every valid (unmasked) point, unweighted, over ``dims`` of the layout (``None``: all);
    returns int64 ``(*kept dims, M + 1)``, or float64 fractions summing to 1 with
    ``normalize=True``.  Unmasked NaN/inf raises :class:`~diffkit.errors.NonFiniteError`.
    """
    fc, tr, M = _ensemble(forecast, truth, member_dim)
    shape = torch.broadcast_shapes(fc.shape[:-1], tr.shape)
    nd = len(shape)
    rest = list(range(nd)) if dims is None else list(_dims(dims, nd, "dims"))
    keep = [d for d in range(nd) if d not in rest]
    valid = (_point_weights(shape, fc.device, None, mask) > 0) if mask is not None else \
        torch.ones(shape, dtype=torch.bool, device=fc.device)
    y = tr.expand(shape).unsqueeze(-1)
    x = fc.expand(shape + (M,))
    finite = torch.isfinite(y[..., 0]) & torch.isfinite(x).all(-1)
    if bool((valid & ~finite).any()):
        raise NonFiniteError("rank_histogram: NaN or inf at unmasked points; exclude them with mask=")
    below = (x < y).sum(-1)
    ties = (x == y).sum(-1)
    if isinstance(generator, int) and not isinstance(generator, bool):
        generator = torch.Generator().manual_seed(generator)
    gdev = generator.device if generator is not None else torch.device("cpu")
    u = torch.rand(shape, generator=generator, dtype=_F64, device=gdev).to(fc.device)
    rank = below + torch.floor(u * (ties + 1)).long().clamp_max(ties)
    kept_shape = tuple(shape[d] for d in keep)
    K = math.prod(kept_shape)
    rank = rank.permute(keep + rest).reshape(K, -1)
    valid = valid.permute(keep + rest).reshape(K, -1)
    idx = rank + (M + 1) * torch.arange(K, device=fc.device).unsqueeze(-1)
    counts = torch.bincount(idx[valid], minlength=K * (M + 1)).reshape(kept_shape + (M + 1,))
    if normalize:
        counts = counts.to(_F64)
        return counts / counts.sum(-1, keepdim=True)
    return counts


# ----------------------------------------------------------------------------- calibration verdict
#: spread/skill (averaged over leads) below the first value is under-dispersive, above the second over-dispersive
DISPERSION_BAND = (0.8, 1.2)
#: the rank histogram's two extreme bins, as a multiple of their uniform share ``2 / (M + 1)``: above the second
#: value (a U shape) is under-dispersive, below the first (a cap shape) over-dispersive
RANK_EXTREMES_BAND = (0.5, 1.5)
#: the histogram is used only when its two extreme bins expect at least this many counts under uniformity
_MIN_EXTREME_COUNTS = 20


@dataclass(frozen=True)
class Dispersion:
    """What :func:`dispersion_verdict` decided, and the numbers that decided it.

    ``verdict``: ``"under-dispersive"``, ``"well-dispersed"``, ``"over-dispersive"`` or
    ``"undetermined"`` (no finite spread/skill, e.g. a one-member ensemble); ``spread_skill``: the
    mean of the finite per-lead ratios (NaN if none), ``lo`` / ``hi`` their range, ``leads`` how
    many there were; ``extremes``: the rank histogram's two extreme bins as a multiple of uniform
    (None without a histogram or with too few counts); ``reason``: the rule that fired; ``str()``:
    the one-line report.
    """

    verdict: str
    spread_skill: float
    lo: float
    hi: float
    leads: int
    extremes: float | None
    reason: str
    by_ratio: bool = False
    """True where the mean spread/skill alone decided (outside ``band``): a spread scale fixes that."""
    unit: str = "leads"
    """What the ratios were taken over, as the report line names them (``"times"``, ``"images"``)."""

    @property
    def spread_scale(self) -> float:
        """``1 / spread_skill``: scaling every member's anomaly about the ensemble mean by it (which leaves
        the mean, and so the skill, unchanged) makes this mean spread/skill exactly 1
        (:func:`diffkit.calibrate.scale_spread`); NaN when undetermined."""
        r = self.spread_skill
        return 1.0 / r if math.isfinite(r) and r > 0 else math.nan

    def __str__(self) -> str:
        if not self.leads:
            return f"{self.verdict}: {self.reason}"
        ss = f"spread/skill {self.spread_skill:.2f}"
        ss += f" (mean of {self.leads} {self.unit}, {self.lo:.2f}..{self.hi:.2f})" if self.leads > 1 else ""
        rk = "" if self.extremes is None else f", extreme rank bins {self.extremes:.2f}x uniform"
        fix = ""
        if self.by_ratio and math.isfinite(self.spread_scale):
            fix = (f"; scaling the members' anomalies by {self.spread_scale:.3g} makes it 1 (diffkit.calibrate; "
                   f"measure the scale on validation data, not on the data scored)")
        return f"{self.verdict}: {ss}{rk}; {self.reason}{fix}"


def rank_summary(counts) -> tuple[np.ndarray, float]:
    """Each bin of a rank histogram ``(..., M + 1)`` (leading dims summed) as a multiple of uniform, and
    the two extreme bins together as a multiple of their uniform share ``2 / (M + 1)``."""
    c = np.asarray(counts, dtype=np.float64)
    if c.ndim < 1 or c.shape[-1] < 2:
        raise ShapeError(f"a rank histogram needs M + 1 >= 2 bins on its last dim, got shape {c.shape}")
    c = c.reshape(-1, c.shape[-1]).sum(0)
    tot = c.sum()
    if not tot > 0:
        nan = np.full(c.shape, math.nan)
        return nan, math.nan
    rel = c / tot * c.size
    return rel, float((c[0] + c[-1]) / tot * c.size / 2.0)


def format_rank_bins(counts, max_bins: int = 12) -> str:
    """A rank histogram ``(..., M + 1)`` (leading dims summed) as text, each bin as a multiple of uniform
    (:func:`rank_summary`): every bin up to ``max_bins`` bins, else the two bins at each end with the
    minimum and maximum.  The one formatting of ``diffkit evaluate`` and ``diffkit rollout``."""
    rel, _ = rank_summary(counts)
    if len(rel) <= max_bins:
        return " ".join(f"{x:.2f}" for x in rel)
    return (f"{rel[0]:.2f} {rel[1]:.2f} .. {rel[-2]:.2f} {rel[-1]:.2f} "
            f"(min {np.nanmin(rel):.2f}, max {np.nanmax(rel):.2f})")


def dispersion_verdict(spread_skill, rank_counts=None, *, band=DISPERSION_BAND,
                       rank_band=RANK_EXTREMES_BAND, unit: str = "leads") -> Dispersion:
    """Under-, well- or over-dispersive: the one verdict rule of ``diffkit evaluate``, ``diffkit rollout``
    and the quickstart.

    ``spread_skill``: the spread/skill ratios (:func:`spread_skill_ratio`) at each lead, any shape
    (NaN is ignored); ``rank_counts``: optionally the rank histogram counts ``(..., M + 1)``
    (:func:`rank_histogram`; leading dims, e.g. leads, are summed).  The rule:

    1. ``r`` = the mean over leads of the finite spread/skill ratios.  No finite ratio (one member):
       ``"undetermined"``.
    2. ``r < band[0]`` (0.8): ``"under-dispersive"``; ``r > band[1]`` (1.2): ``"over-dispersive"``.
    3. Otherwise, if the rank histogram is given and its two extreme bins expect at least 20 counts
       under uniformity: ``e`` = the mass in the two extreme bins over its uniform share
       ``2 / (M + 1)``.  ``e > rank_band[1]`` (1.5; a U shape: the truth falls outside the ensemble
       too often) is ``"under-dispersive"``, ``e < rank_band[0]`` (0.5; a cap shape) is
       ``"over-dispersive"``.
    4. Otherwise ``"well-dispersed"``.

    Spread/skill decides first because it is the calibration measure of record (WeatherBench 2);
    the histogram catches an ensemble whose average ratio is fine but whose tails are wrong.  A
    biased ensemble also fills one extreme bin; that counts as under-dispersion here (its spread
    does not cover its error).  Returns a :class:`Dispersion`; ``str()`` of it is the report line,
    which calls the ratios' index ``unit`` ("leads"; ``diffkit evaluate``'s generic evaluator names
    its cases: "times", "images").
    """
    return replace(_dispersion_verdict(spread_skill, rank_counts, band=band, rank_band=rank_band), unit=str(unit))


def _dispersion_verdict(spread_skill, rank_counts, *, band, rank_band) -> Dispersion:
    lo_b, hi_b = (float(b) for b in band)
    lo_r, hi_r = (float(b) for b in rank_band)
    if not 0 < lo_b <= hi_b or not 0 <= lo_r <= 1 <= hi_r:
        raise ValueError(f"band must be 0 < low <= high (got {tuple(band)}) and rank_band low <= 1 <= high "
                         f"(got {tuple(rank_band)})")
    r = (spread_skill.detach().cpu().double().numpy() if isinstance(spread_skill, torch.Tensor)
         else np.asarray(spread_skill, dtype=np.float64)).ravel()
    r = r[np.isfinite(r)]
    ext = None
    if rank_counts is not None:
        c = np.asarray(rank_counts.cpu() if isinstance(rank_counts, torch.Tensor) else rank_counts, np.float64)
        _, e = rank_summary(c)
        if math.isfinite(e) and c.sum() * 2.0 / c.shape[-1] >= _MIN_EXTREME_COUNTS:
            ext = e
    if not r.size:
        return Dispersion("undetermined", math.nan, math.nan, math.nan, 0, ext,
                          "no finite spread/skill (it needs at least 2 members)")
    m, lo, hi = float(r.mean()), float(r.min()), float(r.max())
    if m < lo_b:
        return Dispersion("under-dispersive", m, lo, hi, int(r.size), ext, f"spread/skill below {lo_b:g}", True)
    if m > hi_b:
        return Dispersion("over-dispersive", m, lo, hi, int(r.size), ext, f"spread/skill above {hi_b:g}", True)
    if ext is not None and ext > hi_r:
        v, why = "under-dispersive", f"spread/skill in [{lo_b:g}, {hi_b:g}] but extreme rank bins above {hi_r:g}x " \
                                     f"uniform (U-shaped histogram)"
    elif ext is not None and ext < lo_r:
        v, why = "over-dispersive", f"spread/skill in [{lo_b:g}, {hi_b:g}] but extreme rank bins below {lo_r:g}x " \
                                    f"uniform (cap-shaped histogram)"
    else:
        v, why = "well-dispersed", f"spread/skill in [{lo_b:g}, {hi_b:g}]" + (
            "" if ext is None else f", extreme rank bins in [{lo_r:g}, {hi_r:g}]x uniform")
    return Dispersion(v, m, lo, hi, int(r.size), ext, why)


METRICS = {
    "ensemble_mean_rmse": ensemble_mean_rmse,
    "ensemble_spread": spread,
    "ensemble_spread_skill_ratio": spread_skill_ratio,
    "ensemble_crps": crps,
    "ensemble_rank_histogram": rank_histogram,
}
"""The core's ensemble metrics, registered by diffkit through ``diffkit_metrics``.  All but the rank
histogram (which returns ``M + 1`` bins per kept index) follow the ensemble convention
(``fn.kind == "ensemble"``)."""
