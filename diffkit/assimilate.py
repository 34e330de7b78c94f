"""``diffkit assimilate``: ensembles of states conditioned on sparse, noisy observations.

The engine is domain-free; a domain plugin supplies, through its adapter class's ``assimilation``
attribute (an :class:`Assimilation`), how observation files map onto its models' states
(:class:`~diffkit.observations.ObservationGrid`), where the initial states come from, and how the
analysis is written (its forecast / rollout writer, so an analysis is read like a forecast).

**Autoregressive surrogates** (``layout.autoregressive`` set; :mod:`diffkit.rollout`).  The prior is
the surrogate's ensemble rollout from an initial history over the observation window; each step's
sampler run is guided by the observations at that step's valid time (reconstruction guidance of
an autoregressive surrogate, Shysheya et al. 2024, or DPS / MMPS): :class:`GuidedRollout` is the
model the rollout runs, and its ``bind(cond)`` returns the guided denoiser of the step.  A step
without observations is sampled from the prior.  The guidance works in the model's standardised
space: an observation ``y = A(x) + e`` of the physical state ``x = base + std * z`` (``base`` the
layout's mean, plus the latest state for ``target = "residual"``) becomes
``(y - A(base)) / std = A(z) + e / std`` (:func:`model_space`), exact for masks and for point
interpolation with one scale per channel (otherwise the operator is ``z -> A(std * z)``).

``--method amortised`` needs a window model trained with universal-amortised conditioning
(``data.window = k``, ``data.amortised = true``, :mod:`diffkit.window`); any other checkpoint is a
one-line error saying so.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import DiffkitError
from .observations import StepObservations

__all__ = ["METHODS", "DEFAULTS", "Assimilation", "GuidedRollout", "assimilation_for", "guidance_options",
           "model_space", "check_amortised", "ensemble_statistics_attrs"]

#: the methods of ``diffkit assimilate --method``
METHODS = ("mmps", "reconstruction", "dps", "amortised")
#: default strength options per guided method (the CLI's --gamma / --zeta / --cg-iters)
DEFAULTS = {"reconstruction": {"gamma": 1.0}, "dps": {"zeta": 1.0}, "mmps": {"cg_iters": 10}}


class Assimilation:
    """What a domain gives ``diffkit assimilate`` (set as ``AdapterClass.assimilation``, or
    as ``ASSIMILATION`` in the module ``observe`` of the adapter's package).

    - :meth:`grid` -- the :class:`~diffkit.observations.ObservationGrid` of a model's layout (no window yet);
    - :meth:`run` -- read the initial states, roll the guided model out over the window and write the
      analysis; returns ``(path, message)``.
    """

    name = "domain"
    #: whether :meth:`run` also assimilates with window models trained with amortised conditioning
    amortised = False
    #: whether :meth:`run` starts from the initial states of ``--init FILE`` (surrogates); a domain that
    #: assimilates with unconditional single-state models sets it False
    needs_init = True

    @classmethod
    def grid(cls, layout):  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def check(cls, layout) -> None:
        """An error unless this domain's :meth:`run` assimilates with a model of ``layout`` (called before
        :meth:`run`, after ``--method amortised`` was checked).  Default: autoregressive surrogates, and
        window models where :attr:`amortised`."""
        if getattr(layout, "window", None) is not None:
            if not cls.amortised:
                raise DiffkitError(f"--method amortised is not wired for the {cls.name} domain: its window models "
                                   f"are sampled from Python (diffkit.window.sample_trajectory)")
        elif layout.autoregressive is None:
            raise DiffkitError(f"this checkpoint is not an autoregressive surrogate (layout.autoregressive is None); "
                               f"diffkit assimilate guides the rollouts of the {cls.name} domain's surrogates")

    @classmethod
    def run(cls, loaded, args, guide: "Guide"):  # pragma: no cover - interface
        raise NotImplementedError


def assimilation_for(adapter_cls) -> type[Assimilation]:
    """The domain's :class:`Assimilation` of a checkpoint's adapter class, or an error naming the adapter."""
    a = getattr(adapter_cls, "assimilation", None)
    if a is None:  # the plugin's convention: ASSIMILATION in the module observe of the adapter's package
        import importlib

        pkg = (getattr(adapter_cls, "__module__", "") or "").split(".")[0]
        try:
            a = getattr(importlib.import_module(f"{pkg}.observe"), "ASSIMILATION", None) if pkg else None
        except ModuleNotFoundError:
            a = None
    if a is None:
        name = getattr(adapter_cls, "name", adapter_cls.__name__)
        raise DiffkitError(f"the {name!r} adapter this checkpoint was trained on reads no observation files (its class "
                           f"has no `assimilation`); diffkit assimilate works on models of the weather and pde "
                           f"adapters, or of a plugin adapter that sets one (docs/observations.md)")
    return a


def guidance_options(method: str, gamma: float | None = None, zeta: float | None = None,
                     cg_iters: int | None = None) -> dict:
    """The keyword options of ``method`` from the CLI's values; an option of another method is an error."""
    given = {"gamma": gamma, "zeta": zeta, "cg_iters": cg_iters}
    own = DEFAULTS.get(method, {})
    wrong = [k for k, v in given.items() if v is not None and k not in own]
    if wrong:
        flag = "--" + wrong[0].replace("_", "-")
        users = [m for m, o in DEFAULTS.items() if wrong[0] in o]
        raise ValueError(f"{flag} is an option of --method {', '.join(users)}, not of --method {method}; leave it out")
    out = dict(own)
    for k, v in given.items():
        if v is None or k not in own:
            continue
        if k == "cg_iters":
            if isinstance(v, bool) or int(v) != v or v < 1:
                raise ValueError(f"--cg-iters must be an integer >= 1, got {v}")
            out[k] = int(v)
        else:
            if not (math.isfinite(v) and v > 0):
                raise ValueError(f"--{k} must be > 0 and finite, got {v:g}")
            out[k] = float(v)
    return out


@dataclass
class Guide:
    """A guidance method and its options: ``guide(denoiser, observation)`` is the guided denoiser."""

    method: str
    options: dict = field(default_factory=dict)

    def __call__(self, denoiser, obs):
        from .registry import get_guidance

        return get_guidance(self.method)(denoiser, obs, **self.options)


def model_space(step: StepObservations, layout, last: torch.Tensor | None = None):
    """A step's physical observations as a :class:`diffkit.guidance.Observation` of the model's
    standardised sample ``z`` (see the module doc).  ``last``: ``(B, C, *S)`` physical latest states
    for ``target = "residual"`` (None for ``"state"``)."""
    from .guidance import LinearOperator, MaskOperator, Observation

    shape = tuple(layout.sample_shape)
    C = shape[0]
    std = (layout.std if layout.std is not None else torch.ones(())).to(torch.float64).expand(shape)
    mean = (layout.mean if layout.mean is not None else torch.zeros(())).to(torch.float64).expand(shape)
    base = mean[None]
    if last is not None:
        base = last.to(torch.float64) + base
    y, sig = step.y.to(torch.float64)[None], step.sigma.to(torch.float64)
    if step.mask is not None:
        m = step.mask
        s = std[m]
        return Observation(MaskOperator(m), (y - base[:, m]) / s, sig / s)
    op = step.operator
    off = op(base)
    flat = std.reshape(C, -1)
    if bool((flat == flat[:, :1]).all()):                         # one scale per channel: rescale the data
        s = flat[:, 0][op.channel]
        return Observation(op, (y - off) / s, sig / s)
    return Observation(LinearOperator(lambda z: op(std.to(z) * z), shape), y - off, sig)


class GuidedRollout(torch.nn.Module):
    """The model an autoregressive rollout (:func:`diffkit.rollout.rollout`) runs for assimilation:
    a :class:`~diffkit.denoiser.Denoiser` whose ``bind(cond)`` -- called once per step, in order --
    returns the step's denoiser guided by its observations (``observations[k]``, window step ``k``,
    0-based), or the plain one where the step has none.  ``layout`` and parameters are the model's."""

    def __init__(self, denoiser, observations: Mapping[int, StepObservations], guide: Guide):
        super().__init__()
        from .denoiser import Regressor

        if isinstance(denoiser, Regressor):
            raise DiffkitError("this checkpoint is a deterministic regression model (model.objective = "
                               "\"regression\"): it has no prior distribution to guide; assimilate with a diffusion "
                               "model")
        spec = denoiser.layout.autoregressive
        if spec is None:
            raise DiffkitError("GuidedRollout needs an autoregressive model (layout.autoregressive)")
        if spec.horizon != 1:
            raise DiffkitError(f"this model predicts {spec.horizon} states per call (horizon {spec.horizon}); "
                               f"assimilation guides one state per step: use a model trained with horizon = 1")
        self.inner = denoiser
        self.layout = denoiser.layout
        self.schedule = denoiser.schedule
        self.observations = dict(observations)
        self.guide = guide
        self.step = 0
        self.guided_steps = 0

    def bind(self, cond=None, guidance=None):
        k = self.step
        self.step += 1
        bound = self.inner.bind(cond, guidance)
        st = self.observations.get(k)
        if st is None:
            return bound
        spec, layout = self.layout.autoregressive, self.layout
        last = None
        if spec.target == "residual":
            C, h = spec.num_variables, spec.history
            z = cond.fields[:, (h - 1) * C: h * C]                  # the latest standardised state (NaN as 0)
            last = spec.destandardize(z.to(torch.float64), layout.ndim)
        self.guided_steps += 1
        return self.guide(bound, model_space(st, layout, last))


def check_amortised(layout) -> None:
    """An error unless ``layout`` is a window model trained with universal-amortised conditioning."""
    how = ("train one with data.window = k and data.amortised = true (universal-amortised conditioning, "
           "docs/assimilation.md), or use --method mmps, reconstruction or dps")
    try:
        from .window import window_spec
    except ImportError:
        raise DiffkitError(f"this checkpoint was not trained with amortised conditioning: {how}") from None
    try:
        spec = window_spec(layout)
    except DiffkitError:
        spec = None
    if spec is None or getattr(spec, "conditioning", None) != "amortised":
        raise DiffkitError(f"this checkpoint was not trained with amortised conditioning: {how}")


def ensemble_statistics_attrs(variable: str, what: str, attrs: Mapping[str, Any], dim: str = "member") -> dict:
    """CF attributes of the ensemble mean (``what = "mean"``) or spread (``"standard_deviation"``) of a
    variable: its units and ``cell_methods = "{dim}: mean"`` (diffkit evaluate scores only the members)."""
    a = {k: attrs[k] for k in ("units",) if k in attrs}
    label = "ensemble mean" if what == "mean" else "ensemble spread (standard deviation over the members)"
    a["long_name"] = f"{label} of {attrs.get('long_name', variable)}"
    a["cell_methods"] = f"{dim}: {what}"
    return a


def ensemble_statistics(da, variable: str, attrs: Mapping[str, Any], *, dim: str = "member", keep_attrs=None):
    """The ensemble mean and spread (std over ``dim``, ddof 1; NaN with one member) of ``da`` with
    :func:`ensemble_statistics_attrs` of ``attrs``; ``keep_attrs`` goes to the mean (xarray's)."""
    import numpy as np

    mean = da.mean(dim, keep_attrs=keep_attrs).assign_attrs(ensemble_statistics_attrs(variable, "mean", attrs, dim))
    sd = da.std(dim, ddof=1) if da.sizes[dim] > 1 else da.isel({dim: 0}) * np.nan
    return mean, sd.assign_attrs(ensemble_statistics_attrs(variable, "standard_deviation", attrs, dim))


def analysis_attrs(args, obs, sample, method: str, *, details: Mapping[str, Any] | None = None,
                   init: Mapping[str, Any] | None = None) -> dict:
    """The global attributes an analysis file of ``diffkit assimilate`` records (the domains' ``run``):
    checkpoint, observations and their form / count / sigma_y range, the method (``"none (prior)"``
    with ``--no-guidance``) and its ``details``, the initial state's file and ``init`` keys, seed,
    sampler and NFE (``sample``: the run's ``[sample]`` section, unless given) and the command."""
    lo, hi = obs.sigma_range()
    return {"checkpoint": str(args.checkpoint), "observations": str(args.obs), "observation_form": obs.form,
            "n_observations": obs.count, "observed_steps": len(obs.steps), "sigma_y_range": f"{lo:g}..{hi:g}",
            "method": "none (prior)" if args.no_guidance else method, **(details or {}),
            **({"init_file": str(args.init)} if args.init is not None else {}), **(init or {}), "seed": args.seed,
            "sampler": args.sampler or sample.sampler, "nfe": args.nfe or sample.nfe,
            "command": " ".join(["diffkit", *getattr(args, "argv", ["assimilate", str(args.checkpoint)])])}


def label_analysis(ds, *, prior: bool) -> None:
    """``title`` and ``source`` of an analysis file (``prior``: run with ``--no-guidance``)."""
    ds.attrs["title"] = "diffkit analysis" if not prior else "diffkit prior ensemble"
    ds.attrs["source"] = "diffkit assimilate"


def run_command(args) -> int:
    """``diffkit assimilate``: see :func:`register`."""
    import warnings

    from .devices import resolve_device
    from .model import load_model

    if args.members < 1:
        raise ValueError(f"--members must be >= 1, got {args.members}")
    if args.steps is not None and args.steps < 1:
        raise ValueError(f"--steps must be >= 1, got {args.steps}")
    if not 0 <= args.seed < 2 ** 63:
        raise ValueError(f"--seed must be in 0..{2 ** 63 - 1}, got {args.seed}")
    from .constants import MAX_NFE

    if args.nfe is not None and not 1 <= args.nfe <= MAX_NFE:
        raise ValueError(f"--nfe must be in 1..{MAX_NFE} (denoiser calls per step), got {args.nfe}")
    options = guidance_options(args.method, args.gamma, args.zeta, args.cg_iters) \
        if args.method != "amortised" else guidance_options("amortised")
    if args.sampler is not None:
        from . import registry

        registry.resolve("sampler", args.sampler)  # a typo fails first, listing them
    device = resolve_device(args.device)
    loaded = load_model(args.checkpoint, device=device)
    if args.method == "amortised":
        check_amortised(loaded.layout)
    domain = assimilation_for(loaded.adapter)
    domain.check(loaded.layout)
    if domain.needs_init and args.init is None:
        raise DiffkitError(f"--init FILE is required for this {domain.name} model: the file holding the initial "
                           f"states its rollout starts from (the domain's truth / data file)")
    with warnings.catch_warnings():
        warnings.simplefilter("default")
        out, msg = domain.run(loaded, args, Guide(args.method, options))
    print(f"diffkit assimilate: {msg}")
    return 0


def register(parser) -> None:
    """The options of ``diffkit assimilate`` (the CLI mounts it as a core command)."""
    parser.add_argument("checkpoint", help="checkpoint file or run directory of a diffusion model (an autoregressive "
                                           "surrogate trained on the weather or pde adapter)")
    parser.add_argument("--obs", required=True, metavar="OBS.nc",
                        help="observation file (CF netCDF, gridded with missing values or points; docs/observations.md)")
    parser.add_argument("--init", default=None, metavar="FILE",
                        help="file holding the initial states of a surrogate's rollout (the truth / data file format "
                             "of the domain); required for surrogates")
    parser.add_argument("--init-time", default=None, metavar="TIME",
                        help="weather: the initial time (ISO); default one model step before the first observation")
    parser.add_argument("--index", type=int, default=None,
                        help="PDE: trajectory of --init to start from (default: the observation file's "
                             "source_trajectory, else 0)")
    parser.add_argument("--start", type=int, default=None,
                        help="PDE: first history frame (default: the last history frame one step before the first "
                             "observation)")
    parser.add_argument("--members", "-m", type=int, default=8, help="ensemble members (default 8)")
    parser.add_argument("--steps", "-k", type=int, default=None,
                        help="window steps (default: up to the last observation time)")
    parser.add_argument("--method", choices=METHODS, default="mmps",
                        help="guidance: mmps (default), reconstruction, dps; amortised needs a model trained with "
                             "universal-amortised conditioning")
    parser.add_argument("--gamma", type=float, default=None,
                        help="reconstruction: the prior-covariance factor (default 1)")
    parser.add_argument("--zeta", type=float, default=None, help="dps: the step size (default 1)")
    parser.add_argument("--cg-iters", type=int, default=None, help="mmps: conjugate-gradient iterations (default 10)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the run's sample.sampler)")
    parser.add_argument("--nfe", type=int, default=None, help="denoiser evaluations per step (default: the run's)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same analysis")
    parser.add_argument("--no-guidance", action="store_true",
                        help="sample the prior ensemble (the same rollout, observations only checked and recorded): "
                             "the reference an analysis is compared with")
    parser.add_argument("--out", required=True, help="output netCDF file (members, ensemble mean and spread)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_command)
