"""Neural PDE surrogates: autoregressive ensemble rollouts of a trained model.

A surrogate is a checkpoint trained on the ``pde`` adapter: a conditional DDPM
(``model.objective = "diffusion"``), which samples the next frame(s) given the history, or the
one-step MSE baseline (``"regression"``) with the same backbone.  :func:`rollout` feeds each
prediction back as history (PDE-Refiner, Lippe et al. 2023; Shysheya et al. 2024) through the
core's :func:`diffkit.rollout.rollout`; this module only adds the PDE parameters (scalar
conditions, constant along a trajectory):

- all ``members`` of all initial conditions advance in one batch, one model call per step;
- the noise comes from one generator seeded by ``seed``: the same seed gives the same ensemble;
- everything it needs (history length, horizon, step, target, normalisation) is the layout's
  :class:`~diffkit.layout.AutoregressiveSpec`, stored in the checkpoint, so no training data is
  needed;
- the perturbation policy is the core's: a regression model with ``members > 1`` gets
  :data:`~diffkit.rollout.DEFAULT_PERTURB` initial-condition noise unless ``perturb`` says
  otherwise; a diffusion model none.
"""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from diffkit.denoiser import Cond
from diffkit.errors import NonFiniteError, ShapeError
from diffkit.layout import AutoregressiveSpec, Layout
from diffkit.model import ModelView
from diffkit.rollout import rollout as _rollout

from .adapter import (PDEDataError, check_trajectories_finite, open_trajectories, scalar_values,
                      spec_from_layout, upgrade_layout)


@dataclass
class Surrogate(ModelView):
    """A trained model with its run configuration (from :func:`load_surrogate`); ``layout`` and
    ``objective`` from :class:`diffkit.model.ModelView`."""

    model: Any
    config: Any

    @property
    def spec(self) -> AutoregressiveSpec:
        return spec_from_layout(self.layout)

    @property
    def dt(self) -> float:
        """Time between predicted frames (the file's output interval times ``frame_step``; NaN if unknown)."""
        step = self.spec.step
        return float("nan") if step is None else step


def load_surrogate(path, device=None) -> Surrogate:
    """The EMA model of a checkpoint (file or run directory) trained with the ``pde`` adapter
    (an old checkpoint's layout is converted, :func:`~diffkit_pde.adapter.upgrade_layout`)."""
    from diffkit.model import load_for_sampling

    model, cfg, _ = load_for_sampling(path, device=device)
    model.layout = upgrade_layout(model.layout)
    spec_from_layout(model.layout)  # raises unless it is a PDE surrogate
    return Surrogate(model, cfg)


def rollout(model, history: torch.Tensor, steps: int, *, members: int = 1, scalars=None,
            sampler: str | None = None, nfe: int | None = None, spacing: str | None = None, seed: int = 0,
            generator: torch.Generator | None = None, progress: bool = False, config=None,
            perturb: float | None = None, perturb_length=0.0) -> torch.Tensor:
    """Roll a surrogate out for ``steps`` frames from ``history``; returns physical values.

    ``history``: ``(N, history, C, *S)`` (or without ``N``) physical frames, oldest first;
    ``scalars``: ``(N, S)`` physical PDE parameters named by ``layout.scalars``.  Returns
    ``(N, members, steps, C, *S)`` (without ``N`` if ``history`` had none).  ``model`` is a
    :class:`Surrogate`, a Denoiser or a Regressor; sampler, NFE and spacing default to the run's
    ``[sample]`` section; ``perturb``, ``perturb_length``: the core's policy (:mod:`diffkit.rollout`).
    """
    if isinstance(model, Surrogate):
        config, model = model.config, model.model
    layout = model.layout
    spec = spec_from_layout(layout)
    history = torch.as_tensor(history)
    squeeze = history.ndim == 2 + layout.ndim
    if squeeze:
        history = history[None]
    want = (spec.history, spec.num_variables, *layout.shape)
    if tuple(history.shape[1:]) != want:
        raise ShapeError(f"history has shape {tuple(history.shape)}, expected (N, {', '.join(map(str, want))}): "
                         f"{spec.history} frame(s) of {spec.num_variables} variable(s) {list(spec.variables)} on the "
                         f"grid {layout.spatial} = {layout.shape} the model was trained on")
    if not bool(torch.isfinite(history).all()):
        raise NonFiniteError("the initial history holds NaN or inf; give finite initial conditions")
    condition = None
    if layout.scalars:
        if scalars is None:
            raise ShapeError(f"the model is conditioned on the scalars {layout.scalars}; pass scalars= (N, "
                             f"{len(layout.scalars)})")
        s = torch.as_tensor(scalars, dtype=torch.float32).reshape(history.shape[0], -1)
        if s.shape[1] != len(layout.scalars):
            raise ShapeError(f"scalars has {s.shape[1]} columns, the model takes {len(layout.scalars)}: {layout.scalars}")
        a = layout.attrs
        m = torch.as_tensor(a["scalar_mean"], dtype=torch.float32)
        d = torch.as_tensor(a["scalar_std"], dtype=torch.float32)
        z = (s - m) / d

        def condition(k, hist, fields):  # the same PDE parameters at every step
            return Cond(fields=fields, scalars=z.to(fields.device).repeat_interleave(hist.shape[0] // z.shape[0], 0))
    pred = _rollout(model, history, steps, members, condition=condition, perturb=perturb,
                    perturb_length=perturb_length, sampler=sampler, nfe=nfe,
                    spacing=spacing, config=config, generator=generator, seed=seed, progress=progress)
    return pred[0] if squeeze else pred


# ----------------------------------------------------------------------------- files
@dataclass
class InitialCondition:
    """History, truth and parameters of one trajectory of a file, checked against a layout."""

    history: torch.Tensor       # (history, C, *S) physical
    truth: torch.Tensor         # (K_avail, C, *S) frames after the history, frame_step apart
    scalars: torch.Tensor | None
    t0: float                   # time of the last history frame
    dt: float                   # time between predicted frames
    index: int
    start: int
    path: Path


def initial_condition(path, layout: Layout, *, index: int = 0, start: int = 0, lazy: bool = True) -> InitialCondition:
    """Read trajectory ``index`` of ``path`` from frame ``start`` for a model with ``layout``.

    The file's variables and grid must match the checkpoint's; otherwise the error names both.
    """
    spec = spec_from_layout(layout)
    ds = open_trajectories(path, lazy=lazy, pdebench=json.loads(str(layout.attrs.get("pdebench", "{}")) or "{}"))
    have = [v for v in spec.variables if v not in ds.data_vars]
    if have:
        raise PDEDataError(f"{path} lacks the variable(s) {', '.join(have)} the checkpoint predicts "
                           f"({', '.join(spec.variables)}); it has {', '.join(ds.data_vars)}")
    dims = tuple(ds[spec.variables[0]].dims[2:])
    shape = tuple(ds.sizes[d] for d in dims)
    if dims != layout.spatial or shape != layout.shape:
        raise ShapeError(
            f"the grid of {path} ({', '.join(f'{d}={n}' for d, n in zip(dims, shape))}) does not match the "
            f"checkpoint's ({', '.join(f'{d}={n}' for d, n in zip(layout.spatial, layout.shape))}); simulate "
            f"initial conditions at the resolution the model was trained on, or train at this one")
    ntraj, ntime = ds.sizes["trajectory"], ds.sizes["time"]
    if not 0 <= index < ntraj:
        raise PDEDataError(f"--index {index} is out of range: {path} has {ntraj} trajectories (0..{ntraj - 1})")
    h, fs = spec.history, spec.frame_step
    last = start + (h - 1) * fs
    if start < 0 or last >= ntime:
        raise PDEDataError(f"{path} has {ntime} frames per trajectory: too few for a history of {h} frame(s) "
                           f"{fs} apart from frame {start}; choose an earlier --start or a longer file")
    arr = np.stack([np.asarray(ds[v][index].values, dtype=np.float32) for v in spec.variables], axis=1)
    for k, v in enumerate(spec.variables):
        check_trajectories_finite(arr[None, :, k], v, path, offset=index)
    u = torch.from_numpy(arr)
    hist = u[start: last + 1: fs]
    truth = u[last + fs:: fs]
    scal = None
    if layout.scalars:
        scal = torch.as_tensor(scalar_values(ds, layout.scalars, fs, path)[index], dtype=torch.float32)
    if "t" in ds and ds["t"].dims == ("trajectory", "time"):
        times = np.asarray(ds["t"][index].values, dtype=np.float64)
    else:
        times = np.asarray(ds["time"].values, dtype=np.float64)
    dt = float(np.asarray(ds["dt"][index].values)) * fs if "dt" in ds.data_vars else float(times[fs] - times[0])
    return InitialCondition(hist, truth, scal, float(times[last]), dt, index, start, Path(path))


def _calibration(dv: dict, coords: dict, attrs: dict, pred, truth, ok, variables) -> None:
    """Per variable: the rank histogram per step ``{v}_rank_histogram (time, rank)``, and the verdict of
    :func:`diffkit.ensemble.dispersion_verdict` from its spread/skill per step and that histogram, as the
    attributes ``dispersion_{v}`` (the verdict) and ``calibration_{v}`` (its line)."""
    from diffkit import ensemble as E

    Mb = pred.shape[0]
    coords["rank"] = ("rank", np.arange(Mb + 1, dtype=np.int32),
                      {"long_name": "rank of the truth among the members (0: below every member)", "units": "1"})
    g = torch.Generator().manual_seed(0)  # ties (rare for continuous fields) are broken at random, reproducibly
    for c, v in enumerate(variables):
        sp = tuple(range(1, truth.ndim - 1))                                         # the spatial dims of (K, *S)
        ss = E.spread_skill_ratio(pred[:, :, c], truth[:, c], member_dim=0, mask=ok[:, c], dims=sp)
        rh = E.rank_histogram(pred[:, :, c], truth[:, c], member_dim=0, mask=ok[:, c], dims=sp, generator=g)
        dv[f"{v}_rank_histogram"] = (("time", "rank"), rh.numpy().astype(np.int32),
                                     {"long_name": f"counts of the rank of the truth of {v} among the members "
                                                   f"(over space, per step)", "units": "1"})
        d = E.dispersion_verdict(ss, rh)
        attrs[f"dispersion_{v}"] = d.verdict
        attrs[f"calibration_{v}"] = str(d)


def rollout_report(ds, max_steps: int = 6) -> str:
    """The calibration report of a rollout dataset (from :func:`rollout_dataset` with the truth and two or
    more members): RMSE of the ensemble mean, CRPS, spread and spread/skill at up to ``max_steps`` steps,
    then per variable the rank histogram over all steps (each bin / uniform) and the dispersion verdict
    (:func:`diffkit.ensemble.dispersion_verdict`).  Empty without them."""
    from diffkit.ensemble import format_rank_bins

    vs = [k[len("calibration_"):] for k in ds.attrs if k.startswith("calibration_")]
    if not vs:
        return ""
    K = ds.sizes["time"]
    ok = [k for k in range(K) if np.isfinite(float(ds["ensemble_spread_skill_ratio"].values[k]))]
    idx = [ok[int(i)] for i in sorted(set(np.linspace(0, len(ok) - 1, min(max_steps, len(ok))).round().astype(int)))] \
        if ok else []
    cols = [("rmse", "ensemble_mean_rmse"), ("crps", "ensemble_crps"), ("spread", "ensemble_spread"),
            ("spread/skill", "ensemble_spread_skill_ratio")]
    lines = [f"{'step':>6} {'time':>9} " + " ".join(f"{h:>12}" for h, _ in cols)]
    for k in idx:
        vals = [float(ds[n].values[k]) if n in ds else float("nan") for _, n in cols]
        lines.append(f"{k + 1:>6} {float(ds['time'].values[k]):9.4g} " + " ".join(f"{x:12.4g}" for x in vals))
    for v in vs:
        if f"{v}_rank_histogram" in ds:
            lines.append(f"{v}: rank histogram / uniform (all steps): "
                         f"{format_rank_bins(ds[f'{v}_rank_histogram'].values)}")
        lines.append(f"{v}: verdict: {ds.attrs[f'calibration_{v}']}")
    return "\n".join(lines)


def rollout_dataset(pred: torch.Tensor, layout: Layout, ic: InitialCondition | None = None, *,
                    dt: float = 1.0, t0: float = 0.0, attrs: dict | None = None):
    """CF xarray Dataset of a rollout ``(members, steps, C, *S)``: dims ``(member, time, *spatial)``.

    With the initial condition's truth, adds ``{var}_truth`` (NaN where the file ends), the
    per-member and ensemble-mean Pearson correlation and normalised RMSE per step, the
    ensemble spread, the high-correlation times (threshold 0.8) as attributes, and every registered
    ensemble metric (:func:`diffkit.ensemble.registered`: ``ensemble_mean_rmse``, ``ensemble_crps``,
    ``ensemble_spread_skill_ratio``, ... and any plugin's) per step over ``(C, *spatial)``.  With two
    or more members, also per variable the rank histogram per step ``{var}_rank_histogram (time,
    rank)`` and the dispersion verdict of :func:`diffkit.ensemble.dispersion_verdict` (spread/skill
    of the variable per step and that histogram) as the attributes ``dispersion_{var}`` and
    ``calibration_{var}`` (:func:`rollout_report` prints them).
    """
    import xarray as xr

    from diffkit.adapters import cf_output, command_of

    from . import metrics as M

    spec = spec_from_layout(layout)
    if ic is not None:
        dt, t0 = ic.dt, ic.t0
    Mb, K = pred.shape[:2]
    times = t0 + dt * np.arange(1, K + 1)
    dims = ("member", "time", *layout.spatial)
    coords = {"member": ("member", np.arange(Mb, dtype=np.int32),
                         {"long_name": "ensemble member", "standard_name": "realization", "units": "1"}),
              # no axis attributes: CF's axis T is a "<unit> since <date>" time, X / Y are longitude / latitude;
              # nondimensional time and space are none of them
              "time": ("time", times, {"long_name": "time (nondimensional)", "units": "1"})}
    for ax, n in zip(layout.spatial, layout.shape):
        vals = layout.coords.get(ax, tuple(range(n)))
        a = {"long_name": f"{ax} coordinate", "units": "1", **layout.coord_attrs.get(ax, {})}  # the adapter's win
        coords[ax] = (ax, np.asarray(vals), a)
    units = layout.attrs.get("units", {}) if isinstance(layout.attrs.get("units"), dict) else {}
    dv = {}
    for c, v in enumerate(spec.variables):
        dv[v] = (dims, pred[:, :, c].numpy(), {"long_name": f"{v} (surrogate rollout)", "units": units.get(v, "1")})
    a = {"source": "diffkit rollout", "members": Mb, "steps": K,
         **{k: str(v) if not isinstance(v, (int, float)) else v for k, v in (attrs or {}).items()}}
    if ic is not None and ic.truth.shape[0]:
        Ka = min(K, ic.truth.shape[0])
        truth = torch.full((K, *pred.shape[2:]), float("nan"))
        truth[:Ka] = ic.truth[:Ka]
        for c, v in enumerate(spec.variables):
            dv[f"{v}_truth"] = (dims[1:], truth[:, c].numpy(), {"long_name": f"{v} (reference simulation)",
                                                                 "units": units.get(v, "1")})
        nsp = layout.ndim
        corr = torch.full((Mb, K), float("nan"))
        corr[:, :Ka] = M.pearson_per_step(pred[:, :Ka], truth[:Ka], nsp)
        mean = pred.mean(0)
        mcorr = torch.full((K,), float("nan"))
        mcorr[:Ka] = M.pearson_per_step(mean[:Ka], truth[:Ka], nsp)
        nr = torch.full((Mb, K), float("nan"))
        nr[:, :Ka] = M.nrmse(pred[:, :Ka], truth[:Ka], nsp)
        dv["correlation"] = (("member", "time"), corr.numpy(), {"long_name": "Pearson correlation with the truth"})
        dv["ensemble_mean_correlation"] = (("time",), mcorr.numpy(),
                                           {"long_name": "Pearson correlation of the ensemble mean with the truth"})
        dv["nrmse"] = (("member", "time"), nr.numpy(), {"long_name": "RMSE divided by the RMS of the truth"})
        hct = M.high_correlation_time(corr[:, :Ka], dt=dt, threshold=0.8)
        a["high_correlation_time_members"] = [float(x) for x in hct]
        a["high_correlation_time_ensemble_mean"] = float(M.high_correlation_time(mcorr[:Ka], dt=dt, threshold=0.8))
        a["truth_frames"] = Ka
        from diffkit.ensemble import registered

        ok = torch.isfinite(truth)  # frames past the end of the file are masked out: NaN there
        for name, fn in registered().items():
            if Mb >= fn.min_members:
                val = fn(pred, truth, member_dim=0, mask=ok, dims=tuple(range(1, truth.ndim)))
                doc = " ".join((fn.__doc__ or name).strip().split("\n\n")[0].split())
                dv[name] = (("time",), val.numpy(), {"long_name": doc})
        if Mb > 1:
            _calibration(dv, coords, a, pred, truth, ok, spec.variables)
    if Mb > 1:
        dv["spread"] = (("time",), M.ensemble_spread(pred, layout.ndim, member_dim=0).numpy(),
                        {"long_name": "ensemble spread (RMS over space of the member standard deviation)"})
    return cf_output(xr.Dataset(dv, coords=coords, attrs=a), title="diffkit rollout",
                     command=command_of(attrs, "diffkit rollout"))
