"""``diffkit evaluate``: score an ensemble file against the truth, in any domain.

The command belongs to the core; what it knows about a file comes from *evaluators*, registered
through the ``diffkit_evaluators`` hook (``{name: Evaluator subclass}``) the way xarray chooses a
backend: each evaluator says whether it can score a file from its dims and attributes, read lazily
(:meth:`Evaluator.can_evaluate`), adds its own options (a group "NAME evaluator options",
:mod:`diffkit.options`) and runs.  The plugins' evaluators are asked first (the weather domain's
scores forecasts with init and lead times, latitude-weighted; the PDE domain's picks the truth
trajectory a rollout started from); diffkit's own, :class:`EnsembleEvaluator` (``"ensemble"``),
scores any other file with a member dim against a truth file holding the same variables on the same
coordinates.  ``--evaluator NAME`` chooses one; two plugin evaluators that both claim a file are an
error naming them.

:func:`score_ensemble` is the generic scoring as a function: every registered ensemble metric
(:func:`diffkit.ensemble.registered`: ensemble-mean RMSE, fair CRPS, spread, spread/skill and any
plugin's) per *case* (by default the first dim after the member dim: the time of a rollout or an
analysis, the image of an images analysis) over the remaining dims, their mean over the cases, the
rank histogram per case and the dispersion verdict (:func:`diffkit.ensemble.dispersion_verdict`)
with the spread scale that would make spread/skill 1 (:mod:`diffkit.calibrate`).  Nothing here knows
a domain: coordinates are matched by value, the truth's extra dims are chosen with ``--select``.
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from .errors import DiffkitError
from .hookspecs import hookimpl

__all__ = ["Evaluator", "EnsembleEvaluator", "EvaluationError", "member_dim_of", "match_truth", "score_ensemble",
           "select_index", "select_truth", "write_scores", "format_scores", "evaluators", "register", "run_command"]

#: the dim names :func:`member_dim_of` takes for the members, besides a coordinate of standard_name realization
MEMBER_DIMS = ("member", "realization", "number", "ensemble")
#: how many cases :func:`format_scores` prints (evenly spaced, the first and last among them)
MAX_PRINTED_CASES = 6


class EvaluationError(DiffkitError, ValueError):
    """A forecast or truth file that cannot be scored; the message names the problem and the fix."""


# ----------------------------------------------------------------------------- the evaluator interface
class Evaluator:
    """What an evaluator implements (all class methods; subclass it).

    - :meth:`can_evaluate` ``(ds) -> bool``: whether it scores the forecast dataset ``ds`` (opened
      lazily: look at dims and attributes, not at values);
    - :meth:`add_arguments` ``(group)``: its ``--options`` of ``diffkit evaluate`` (none by default);
    - :meth:`run` ``(args) -> int``: score ``args.forecast`` against ``args.truth`` (a list of paths),
      write into ``args.out`` (``args.no_plots``, ``args.seed``: the rank histograms' tie-breaking),
      print a summary; errors are one-line exceptions.
    """

    name = "evaluator"

    @classmethod
    def can_evaluate(cls, ds) -> bool:  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def add_arguments(cls, group) -> None:
        """Add this evaluator's options to ``group``; default: none."""

    @classmethod
    def run(cls, args) -> int:  # pragma: no cover - interface
        raise NotImplementedError


def member_dim_of(ds) -> str | None:
    """The member dim of a dataset: a dim whose coordinate has ``standard_name = "realization"`` (CF),
    else the first of :data:`MEMBER_DIMS` among its dims; None if neither."""
    for d in ds.dims:
        if d in ds.coords and ds[d].attrs.get("standard_name") == "realization":
            return str(d)
    return next((d for d in MEMBER_DIMS if d in ds.dims), None)


def _fmt(v) -> str:
    if isinstance(v, (float, np.floating)):
        return f"{float(v):.6g}"
    if isinstance(v, np.datetime64):
        return str(v)[:19]
    return str(v)


def _match_index(name: str, fv: np.ndarray, tv: np.ndarray, what: str) -> np.ndarray:
    """The index into the truth's coordinate ``tv`` of each forecast coordinate value ``fv`` (numbers
    within a relative 1e-6 of the coordinate's scale, anything else exactly); an error naming the first
    value the truth lacks."""
    if fv.dtype.kind in "fiu" and tv.dtype.kind in "fiu":
        f, t = fv.astype(np.float64), tv.astype(np.float64)
        if t.size:   # the nearest truth value of each forecast value, by binary search (n log n: any grid size)
            scale = max(float(np.nanmax(np.abs(t))), 1.0)
            order = np.argsort(t, kind="stable")
            ts = t[order]
            pos = np.clip(np.searchsorted(ts, f), 1, len(ts) - 1) if len(ts) > 1 else np.zeros(len(f), dtype=int)
            left = pos - 1 if len(ts) > 1 else pos
            near = np.where(np.abs(ts[left] - f) <= np.abs(ts[pos] - f), left, pos)
            idx = order[near]
            ok = np.abs(t[idx] - f) <= 1e-6 * scale
        else:
            idx, ok = np.zeros(len(f), dtype=int), np.zeros(len(f), dtype=bool)
    else:
        pos = {v: i for i, v in enumerate(tv.tolist())}
        idx = np.array([pos.get(v, -1) for v in fv.tolist()], dtype=int)
        ok = idx >= 0
    if not ok.all():
        bad = fv[~ok][0]
        rng = f"{_fmt(tv.min())}..{_fmt(tv.max())}" if tv.size and tv.dtype.kind in "fiuM" else f"{tv.size} values"
        raise EvaluationError(f"the truth has no {name} = {_fmt(bad)} for {what} ({int((~ok).sum())} of the forecast's "
                              f"{len(fv)} {name} values are missing; the truth's {name} covers {rng}): give a truth "
                              f"file that covers the forecast, or choose another slice with --select")
    return idx


def match_truth(forecast, truth, variable: str, member_dim: str):
    """The truth's ``variable`` on the forecast's coordinates, dims in the forecast's order without the
    member dim: each dim's values are matched by value where both files have a coordinate (numbers to
    a relative 1e-6), by size otherwise.  One-line errors: a dim the truth lacks or has in excess (the
    fix: ``--select DIM=VALUE``), a value it lacks, sizes that differ."""
    f = forecast[variable]
    t = truth[variable]
    dims = [d for d in f.dims if d != member_dim]
    extra = [d for d in t.dims if d not in dims]
    if extra:
        d = extra[0]
        raise EvaluationError(f"the truth's {variable!r} has the dim {d!r} ({t.sizes[d]} values) that the forecast "
                              f"lacks: choose one with --select {d}=VALUE (a coordinate value, or an index where "
                              f"{d!r} has no coordinate)")
    lacking = [d for d in dims if d not in t.dims]
    if lacking:
        raise EvaluationError(f"the truth's {variable!r} lacks the forecast's dim {lacking[0]!r} (its dims: "
                              f"{', '.join(map(str, t.dims)) or 'none'}): give a truth file with the forecast's dims")
    for d in dims:
        if d in f.coords and d in t.coords:
            idx = _match_index(str(d), np.asarray(f[d].values), np.asarray(t[d].values), f"{variable!r}")
            t = t.isel({d: idx}).assign_coords({d: f[d].values})
        elif t.sizes[d] != f.sizes[d]:
            raise EvaluationError(f"{variable!r} has {f.sizes[d]} values along {d!r} in the forecast and {t.sizes[d]} "
                                  f"in the truth, and no coordinate to match them by: give files of the same size")
    return t.transpose(*dims)


def _check_finite(x: np.ndarray, what: str, variable: str) -> None:
    inf = np.isinf(x)
    if inf.any():
        raise EvaluationError(f"the {what} holds {int(inf.sum())} infinite value(s) in {variable!r}; infinite values "
                              f"cannot be scored: fix them, or set them to NaN to leave those points out")


def score_ensemble(forecast, truth, *, case_dim: str | None = None, variables=None, seed: int = 0,
                   command: str | None = None, sources: tuple[str, str] | None = None):
    """Score the ensemble ``forecast`` (an :class:`xarray.Dataset` with a member dim, :func:`member_dim_of`)
    against ``truth`` (a dataset with the same variables, any extra dims already chosen): a CF-1.8
    dataset of scores.

    ``variables``: those to score (default: every forecast variable with the member dim that the
    truth also holds).  For each, the truth is matched to the forecast (:func:`match_truth`); the
    cases are ``case_dim`` (default: the first dim after the member dim) and the scores per case
    reduce over the remaining dims with equal weight; points where the truth or any member is NaN are
    left out; +-inf is an error.  The dataset holds, per variable and case, every registered
    ensemble metric (:func:`diffkit.ensemble.registered`) the ensemble is large enough for, and
    ``{metric}_overall`` per variable (the root per case, then the mean over cases, as
    :mod:`diffkit.ensemble` reduces ``sample_dims``); with two or more members the rank histogram
    per case (``rank_histogram``, ties broken by ``seed``) and, as attributes, each variable's
    dispersion verdict (``dispersion_V``, ``calibration_V``) and the spread scale
    ``1 / (spread/skill)`` (``spread_scale_V``; measure it on validation data, then assimilate or
    forecast with ``--spread-scale``)."""
    import torch
    import xarray as xr

    from . import ensemble as E
    from .adapters import cf_output

    mdim = member_dim_of(forecast)
    if mdim is None:
        raise EvaluationError(f"the forecast has no member dim (a dim named {', '.join(MEMBER_DIMS)} or a coordinate "
                              f"with standard_name realization; its dims: {', '.join(map(str, forecast.dims))}): give "
                              f"an ensemble file (diffkit assimilate, rollout, forecast)")
    if variables is None:
        variables = [str(v) for v in forecast.data_vars if mdim in forecast[v].dims and v in truth.data_vars]
        if not variables:
            with_m = [str(v) for v in forecast.data_vars if mdim in forecast[v].dims]
            have = ", ".join(map(str, truth.data_vars))
            raise EvaluationError(f"the forecast and the truth share no variable: the forecast's ensemble variables "
                                  f"are {', '.join(with_m) or 'none'}, the truth holds {have}; give the truth of the "
                                  f"forecast's variables")
    else:
        for v in variables:
            if v not in forecast.data_vars or mdim not in forecast[v].dims:
                raise EvaluationError(f"{v!r} is not an ensemble variable of the forecast (one with the member dim "
                                      f"{mdim!r})")
            if v not in truth.data_vars:
                raise EvaluationError(f"the truth holds no variable {v!r}; its variables: "
                                      f"{', '.join(map(str, truth.data_vars))}")
    M = int(forecast.sizes[mdim])
    metrics = {n: fn for n, fn in E.registered().items() if M >= getattr(fn, "min_members", 1)}
    first = forecast[variables[0]]
    dims0 = [d for d in first.dims if d != mdim]
    case = case_dim if case_dim is not None else (dims0[0] if dims0 else None)
    if case is None:
        raise EvaluationError(f"{variables[0]!r} has no dim besides the members: nothing to score it over")
    g = torch.Generator().manual_seed(int(seed))
    per: dict[str, list] = {n: [] for n in metrics}
    overall: dict[str, list] = {n: [] for n in metrics}
    ranks, attrs = [], {}
    case_coord = None
    for v in variables:
        f = forecast[v]
        dims = [d for d in f.dims if d != mdim]
        if case not in dims:
            raise EvaluationError(f"--case-dim {case!r} is not a dim of {v!r} (its dims: {', '.join(map(str, dims))})")
        dims = [case] + [d for d in dims if d != case]
        if case_coord is None:
            case_coord = f[case]
        elif f.sizes[case] != case_coord.size or (case in f.coords and not np.array_equal(
                np.asarray(f[case].values), np.asarray(case_coord.values))):
            raise EvaluationError(f"{v!r} and {variables[0]!r} differ along {case!r}: score them separately "
                                  f"(--variables)")
        t = match_truth(forecast, truth, v, mdim).transpose(*dims)
        fv = np.asarray(f.transpose(mdim, *dims).values, dtype=np.float64)
        tv = np.asarray(t.values, dtype=np.float64)
        _check_finite(fv, "forecast", v)
        _check_finite(tv, "truth", v)
        fx, tx = torch.from_numpy(fv), torch.from_numpy(tv)
        mask = torch.isfinite(tx) & torch.isfinite(fx).all(0)
        sp = tuple(range(1, tx.ndim))
        for n, fn in metrics.items():
            per[n].append(fn(fx, tx, member_dim=0, mask=mask, dims=sp).numpy())
            overall[n].append(float(fn(fx, tx, member_dim=0, mask=mask, dims=sp, sample_dims=(0,))))
        if M >= 2:
            rh = E.rank_histogram(fx, tx, member_dim=0, mask=mask, dims=sp, generator=g).numpy()
            ranks.append(rh.astype(np.int32))
            ss = per.get("ensemble_spread_skill_ratio", [None])[-1]
            d = E.dispersion_verdict(ss if ss is not None else np.full(tx.shape[0], np.nan), rh, unit=f"{case}s")
            attrs[f"dispersion_{v}"] = d.verdict
            attrs[f"calibration_{v}"] = str(d)
            attrs[f"spread_scale_{v}"] = float(d.spread_scale)
    coords: dict[str, Any] = {"variable": ("variable", np.asarray(variables, dtype=object),
                                           {"long_name": "the scored variable of the forecast"})}
    cattrs = {k: val for k, val in case_coord.attrs.items() if k in ("long_name", "standard_name", "units", "axis",
                                                                      "calendar")}
    coords[case] = (case, np.asarray(case_coord.values) if case in forecast.coords
                    else np.arange(case_coord.size), cattrs or {"long_name": f"{case} (the cases scored)"})
    dv = {}
    for n, fn in metrics.items():
        doc = " ".join((fn.__doc__ or n).strip().split("\n\n")[0].split())
        dv[n] = (("variable", case), np.stack(per[n]), {"long_name": doc})
        dv[f"{n}_overall"] = (("variable",), np.asarray(overall[n]),
                              {"long_name": f"{doc} (over every {case}: per {case}, then the mean)"})
    if ranks:
        coords["rank"] = ("rank", np.arange(M + 1, dtype=np.int32),
                          {"long_name": "rank of the truth among the members (0: below every member)", "units": "1"})
        dv["rank_histogram"] = (("variable", case, "rank"), np.stack(ranks),
                                {"long_name": f"counts of the rank of the truth among the members (per {case})",
                                 "units": "1"})
    a = {"source": "diffkit evaluate", "members": M, "member_dim": mdim, "case_dim": case,
         "n_cases": int(case_coord.size), **attrs}
    if sources:
        a["forecast"], a["truth"] = sources
    ds = xr.Dataset(dv, coords=coords, attrs=a)
    return cf_output(ds, title="diffkit evaluate: ensemble scores", command=command or "diffkit evaluate",
                     history=forecast.attrs.get("history"))


_COLUMNS = (("rmse", "ensemble_mean_rmse"), ("crps", "ensemble_crps"), ("spread", "ensemble_spread"),
            ("spread/skill", "ensemble_spread_skill_ratio"))


def format_scores(scores, max_cases: int = MAX_PRINTED_CASES) -> str:
    """The scores of :func:`score_ensemble` as text: per variable the scores over every case, those of up
    to ``max_cases`` cases, the rank histogram over every case (each bin / uniform) and the verdict."""
    from .ensemble import format_rank_bins

    case = scores.attrs["case_dim"]
    n = scores.sizes[case]
    idx = sorted(set(np.linspace(0, n - 1, min(max_cases, n)).round().astype(int).tolist()))
    cols = [(h, k) for h, k in _COLUMNS if k in scores]
    lines = [f"{'variable':<14} {case:>12} " + " ".join(f"{h:>12}" for h, _ in cols)]
    for i, v in enumerate(scores["variable"].values):
        lines.append(f"{str(v):<14} {'all':>12} " + " ".join(f"{float(scores[f'{k}_overall'][i]):12.4g}"
                                                             for _, k in cols))
        for j in idx:
            c = _fmt(scores[case].values[j])
            lines.append(f"{'':<14} {c:>12} " + " ".join(f"{float(scores[k][i, j]):12.4g}" for _, k in cols))
    for i, v in enumerate(scores["variable"].values):
        if "rank_histogram" in scores:
            lines.append(f"{v}: rank histogram / uniform (every {case}): "
                         f"{format_rank_bins(scores['rank_histogram'].values[i])}")
        if f"calibration_{v}" in scores.attrs:
            lines.append(f"{v}: verdict: {scores.attrs[f'calibration_{v}']}")
    return "\n".join(lines)


def _plot(scores, out: Path) -> list[Path]:
    """``scores.png``: each score against the case coordinate, a line per variable; ``rank_histograms.png``
    (two or more members): each variable's rank histogram over every case, as a multiple of uniform."""
    from .ensemble import rank_summary
    from .figures import new_figure, save_figure

    case = scores.attrs["case_dim"]
    x = scores[case].values
    cols = [(h, k) for h, k in _COLUMNS if k in scores]
    files = []
    fig = new_figure(3.2 * len(cols), 2.8)
    axes = fig.subplots(1, len(cols), squeeze=False)[0]
    for ax, (h, k) in zip(axes, cols):
        for i, v in enumerate(scores["variable"].values):
            ax.plot(x, scores[k].values[i], marker="o", ms=3, label=str(v))
        if k == "ensemble_spread_skill_ratio":
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
        ax.set_title(h)
        ax.set_xlabel(case)
    axes[0].legend(fontsize=7)
    files.append(save_figure(fig, out / "scores.png"))
    if "rank_histogram" in scores:
        nv = scores.sizes["variable"]
        fig = new_figure(3.2 * nv, 2.6)
        axes = fig.subplots(1, nv, squeeze=False)[0]
        for i, (ax, v) in enumerate(zip(axes, scores["variable"].values)):
            rel, _ = rank_summary(scores["rank_histogram"].values[i])
            ax.bar(np.arange(rel.size), rel, color="0.5")
            ax.axhline(1.0, color="k", lw=0.8, ls="--")
            ax.set_title(f"{v}: rank of the truth")
            ax.set_xlabel("rank")
            ax.set_ylabel("count / uniform")
        files.append(save_figure(fig, out / "rank_histograms.png"))
    return files


def write_scores(scores, out, *, plots: bool = True) -> list[Path]:
    """Write ``out/scores.nc`` (CF-1.8), ``out/scores.csv`` (a row per variable and case, then a row
    ``all`` per variable with the ``_overall`` scores) and, unless ``plots=False``, the figures of
    :func:`_plot`; every file atomically.  Returns their paths."""
    import csv
    import io

    from ._io import atomic_write
    from .adapters import atomic_to_netcdf

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    case = scores.attrs["case_dim"]
    names = [k for k in scores.data_vars if scores[k].dims == ("variable", case)]
    buf = io.StringIO()
    w = csv.writer(buf, lineterminator="\n")
    w.writerow(["variable", case, *names])
    for i, v in enumerate(scores["variable"].values):
        for j, c in enumerate(scores[case].values):
            w.writerow([v, _fmt(c), *(f"{float(scores[k].values[i, j]):.8g}" for k in names)])
        w.writerow([v, "all", *(f"{float(scores[f'{k}_overall'].values[i]):.8g}" for k in names)])
    text = buf.getvalue()
    files = [atomic_write(out / "scores.csv", lambda fh: fh.write(text)),
             atomic_to_netcdf(scores.assign_coords(variable=scores["variable"].astype(str)), out / "scores.nc")]
    if plots:
        files += _plot(scores, out)
    return files


# ----------------------------------------------------------------------------- the generic evaluator
def _parse_select(items) -> dict[str, str]:
    sel = {}
    for item in items or []:
        dim, eq, val = str(item).partition("=")
        if not eq or not dim.strip() or not val.strip():
            raise EvaluationError(f"--select {item!r} is not DIM=VALUE (e.g. --select trajectory=0)")
        sel[dim.strip()] = val.strip()
    return sel


def select_index(truth, dim: str, val: str) -> int:
    """The position along ``dim`` of ``--select dim=val``: by coordinate value where the dim has a
    coordinate (numbers to a relative 1e-6, else the text), as an index otherwise; one-line errors."""
    if dim not in truth.dims:
        raise EvaluationError(f"--select {dim}={val}: the truth has no dim {dim!r} (its dims: "
                              f"{', '.join(map(str, truth.dims))})")
    if dim in truth.coords:
        tv = np.asarray(truth[dim].values)
        try:
            fv = np.asarray([float(val)]) if tv.dtype.kind in "fiu" else np.asarray([val], dtype=tv.dtype)
        except ValueError:
            raise EvaluationError(f"--select {dim}={val}: {val!r} is not a value of {dim!r} "
                                  f"({_fmt(tv.min())}..{_fmt(tv.max())})") from None
        try:
            return int(_match_index(dim, fv, tv, "--select")[0])
        except EvaluationError:
            rng = f"{_fmt(tv.min())}..{_fmt(tv.max())}" if tv.dtype.kind in "fiuM" else ", ".join(map(str, tv[:8]))
            raise EvaluationError(f"--select {dim}={val}: the truth's {dim!r} has no value {val} (it holds "
                                  f"{rng})") from None
    try:
        i = int(val)
    except ValueError:
        raise EvaluationError(f"--select {dim}={val}: {dim!r} has no coordinate, so give an index "
                              f"0..{truth.sizes[dim] - 1}") from None
    if not 0 <= i < truth.sizes[dim]:
        raise EvaluationError(f"--select {dim}={val}: {dim!r} has no coordinate, so {val} is an index, and "
                              f"it is out of range 0..{truth.sizes[dim] - 1}")
    return i


def select_truth(truth, select: dict[str, str]):
    """``truth`` at ``select`` (``{dim: value}``, each as :func:`select_index` reads it); the dims are dropped."""
    for dim, val in select.items():
        truth = truth.isel({dim: select_index(truth, dim, val)}, drop=True)
    return truth


def open_netcdf(path, what: str):
    """``xarray.open_dataset(path)`` (lazy) with a one-line error for a missing or unreadable file."""
    import xarray as xr

    p = Path(path)
    if not p.is_file():
        raise EvaluationError(f"the {what} file {p} does not exist")
    try:
        return xr.open_dataset(p)
    except Exception as e:  # noqa: BLE001 - any reader failure is the file's
        raise EvaluationError(f"cannot read the {what} file {p} as netCDF ({type(e).__name__}: "
                              f"{' '.join(str(e).split())[:200]})") from None


class EnsembleEvaluator(Evaluator):
    """Any file with a member dim, against a truth file with the same variables on the same coordinates
    (diffkit's own: the generic evaluator, asked after the plugins')."""

    name = "ensemble"

    @classmethod
    def can_evaluate(cls, ds) -> bool:
        return member_dim_of(ds) is not None

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--select", action="append", default=None, metavar="DIM=VALUE",
                           help="a dim of the truth the forecast lacks (e.g. the trajectory of a file of many): the "
                                "slice to score against, by coordinate value (by index where the dim has none); "
                                "repeatable")
        group.add_argument("--case-dim", default=None, metavar="DIM",
                           help="the dim whose values are the cases scored one by one (default: the first dim after "
                                "the member dim: a rollout's or analysis's time, an images analysis's image)")
        group.add_argument("--variables", nargs="+", default=None, metavar="VAR",
                           help="the variables to score (default: every ensemble variable the truth also holds)")

    @classmethod
    def select(cls, forecast, truth, args) -> dict[str, str]:
        """``{dim: value}`` of the truth's slice to score against: ``--select``, parsed."""
        return _parse_select(getattr(args, "select", None))

    @classmethod
    def truth(cls, forecast, truth, args):
        """The truth dataset to score against: :func:`select_truth` at :meth:`select`.  A domain overrides it
        to add its defaults (the PDE evaluator: the trajectory a rollout started from)."""
        return select_truth(truth, cls.select(forecast, truth, args))

    @classmethod
    def run(cls, args) -> int:
        if len(args.truth) != 1:
            raise EvaluationError(f"the {cls.name} evaluator reads one truth file, got {len(args.truth)}: "
                                  f"{', '.join(map(str, args.truth))}")
        fc = open_netcdf(args.forecast, "forecast")
        tr = open_netcdf(args.truth[0], "truth")
        with fc, tr:
            truth = cls.truth(fc, tr, args)
            scores = score_ensemble(fc, truth, case_dim=getattr(args, "case_dim", None),
                                    variables=getattr(args, "variables", None), seed=args.seed,
                                    command=_command(args), sources=(str(args.forecast), str(args.truth[0])))
        files = write_scores(scores, args.out, plots=not args.no_plots)
        case = scores.attrs["case_dim"]
        c = scores[case].values
        rng = f" ({_fmt(c[0])}..{_fmt(c[-1])})" if c.size > 1 else f" ({_fmt(c[0])})"
        print(f"diffkit evaluate ({cls.name}): {scores.attrs['members']} member(s), {scores.attrs['n_cases']} "
              f"{case}(s){rng}; variable(s) {', '.join(map(str, scores['variable'].values))}")
        print(format_scores(scores))
        print(f"diffkit evaluate: wrote {len(files)} file(s) to {args.out}: "
              f"{', '.join(sorted(p.name for p in files))}")
        return 0


def _command(args) -> str:
    import shlex

    return shlex.join(["diffkit", *getattr(args, "argv", ["evaluate", str(args.forecast)])])


@hookimpl
def diffkit_evaluators():
    return {"ensemble": EnsembleEvaluator}


# ----------------------------------------------------------------------------- the command
def evaluators() -> list:
    """The registered evaluators (:class:`~diffkit.registry.Component` of kind ``evaluator``): the
    plugins' first (diffkit's domains, then the rest, by name), diffkit's own generic one last."""
    from . import registry

    comps = registry.components("evaluator")
    core = lambda c: str(getattr(c.obj, "__module__", "")).startswith("diffkit.")  # noqa: E731
    third = lambda c: not str(getattr(c.obj, "__module__", "")).startswith("diffkit_")  # noqa: E731
    return sorted(comps, key=lambda c: (core(c), third(c), c.name))


def _key(obj):
    fn = getattr(obj, "add_arguments", None)
    return getattr(fn, "__func__", fn)


def register(parser) -> None:
    """The arguments of ``diffkit evaluate``, each evaluator's options in a group of its own."""
    import warnings

    from . import registry
    from .options import Provider, add_option_groups

    parser.add_argument("forecast", help="the ensemble netCDF to score: a forecast, rollout or analysis written by "
                                         "diffkit (a member dim), or any file with one")
    parser.add_argument("--truth", nargs="+", required=True, metavar="FILE",
                        help="netCDF file(s) with the truth (the weather evaluator reads several, or globs)")
    parser.add_argument("--out", required=True, metavar="DIR",
                        help="output folder: scores.csv, scores.nc and the figures (*.png)")
    parser.add_argument("--evaluator", default=None, metavar="NAME",
                        help="the evaluator to use (default: the one that claims the file; `diffkit plugins --kind "
                             "evaluator` lists them)")
    parser.add_argument("--no-plots", action="store_true", help="write the tables only")
    parser.add_argument("--seed", type=int, default=0, help="seed of the random tie-breaking of rank histograms")
    providers = []
    try:
        comps = evaluators()
    except Exception:  # noqa: BLE001 - an inconsistent plugin set: the command reports it when run
        comps = []
    groups: dict = {}
    for c in comps:
        try:
            key = _key(c.obj)
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the CLI
            warnings.warn(f"diffkit plugin {c.plugin!r}: its evaluator {c.name!r} is broken and its options of "
                          f"diffkit evaluate are left out: {type(e).__name__}: {e}", registry.PluginWarning,
                          stacklevel=2)
            continue
        if key is None or key is Evaluator.add_arguments.__func__:
            continue
        groups.setdefault(key, []).append(c)
    for key, cs in groups.items():
        providers.append(Provider(key, tuple(c.name for c in cs), cs[0].plugin, cs[0].obj.add_arguments))
    parser.set_defaults(func=run_command,
                        evaluator_options=add_option_groups(parser, providers, command="diffkit evaluate",
                                                            kind="evaluator"))


def _claims(comp, ds) -> bool:
    import warnings

    from . import registry

    try:
        return bool(comp.obj.can_evaluate(ds))
    except Exception as e:  # noqa: BLE001 - a broken plugin is a warning, not the end of the command
        warnings.warn(f"diffkit plugin {comp.plugin!r}: its evaluator {comp.name!r} failed to look at the file and is "
                      f"skipped: {type(e).__name__}: {' '.join(str(e).split())}", registry.PluginWarning,
                      stacklevel=3)
        return False


def choose(path, name: str | None = None):
    """The evaluator :class:`~diffkit.registry.Component` for the forecast file ``path``: ``name`` if given,
    else the one plugin evaluator that claims the file (:meth:`Evaluator.can_evaluate`), else diffkit's
    generic one if it does; one-line errors otherwise."""
    comps = evaluators()
    if name is not None:
        for c in comps:
            if c.name == name:
                return c
        raise EvaluationError(f"--evaluator {name!r} is not registered; the evaluators are "
                              f"{', '.join(c.name for c in comps)}")
    with open_netcdf(path, "forecast") as ds:
        claims = [c for c in comps if _claims(c, ds)]
        dims = ", ".join(f"{d} ({n})" for d, n in ds.sizes.items())
    plugin = [c for c in claims if c.obj is not EnsembleEvaluator]
    if len(plugin) > 1:
        raise EvaluationError(f"{path} can be scored by the {' and the '.join(c.name for c in plugin)} evaluators: "
                              f"choose one with --evaluator NAME")
    if plugin:
        return plugin[0]
    if claims:
        return claims[0]
    raise EvaluationError(f"no evaluator scores {path} (dims {dims or 'none'}): an ensemble needs a member dim (a dim "
                          f"named member or a coordinate with standard_name realization); the evaluators are "
                          f"{', '.join(c.name for c in comps)}")


def run_command(args) -> int:
    """``diffkit evaluate``: see :func:`register`."""
    from .options import check_option_owner

    comp = choose(args.forecast, args.evaluator)
    check_option_owner(args, _key(comp.obj), getattr(args, "evaluator_options", {}), kind="evaluator",
                       running=f"{args.forecast} is scored by the {comp.name} evaluator", command="diffkit evaluate")
    return int(comp.obj.run(args) or 0)
