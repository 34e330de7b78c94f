"""``diffkit assimilate``: ensembles of states conditioned on sparse, noisy observations.

The engine is domain-free; a domain plugin supplies, through its adapter class's ``assimilation``
attribute (an :class:`Assimilation`), its options of the command (:meth:`Assimilation.add_arguments`),
how observation files map onto its models' states (:class:`~diffkit.observations.ObservationGrid`) and
are read (:meth:`Assimilation.read`: CF netCDF by default, or the domain's own format), where the
initial states come from, and how the analysis is written (its forecast / rollout writer, so an
analysis is read like a forecast).

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

import numpy as np
import torch

from .errors import DiffkitError
from .observations import ObservationSet, StepObservations

__all__ = ["METHODS", "DEFAULTS", "Assimilation", "GuidedRollout", "assimilation_for", "add_domain_arguments",
           "check_domain_options", "guidance_options", "model_space", "check_amortised", "ensemble_statistics_attrs",
           "AmortisedConditions", "amortised_conditions", "check_window_method"]

#: the methods of ``diffkit assimilate --method``
METHODS = ("mmps", "reconstruction", "dps", "amortised")
#: default strength options per guided method (the CLI's --gamma / --zeta / --cg-iters)
DEFAULTS = {"reconstruction": {"gamma": 1.0}, "dps": {"zeta": 1.0}, "mmps": {"cg_iters": 10}}


class Assimilation:
    """What a domain gives ``diffkit assimilate`` (set as ``AdapterClass.assimilation``, or
    as ``ASSIMILATION`` in the module ``observe`` of the adapter's package).  Class methods (hooks);
    a domain defines :meth:`grid` and :meth:`run`, the others have defaults:

    - :meth:`add_arguments` -- the domain's options of the command (default none);
    - :meth:`check` -- which models of the domain it assimilates with (default: surrogates);
    - :meth:`grid` -- the :class:`~diffkit.observations.ObservationGrid` of a model's layout (no window yet);
    - :meth:`read_times`, :meth:`metadata`, :meth:`read` -- an observation file's time keys (to choose
      the window from), its global attributes and its observations (default: the CF netCDF format);
    - :meth:`run` -- read the initial states, roll the guided model out over the window and write the
      analysis; returns ``(path, message)``.  It reads the observations through ``cls.read_times`` /
      ``cls.read`` (never the netCDF reader directly), so that a subclass's own format is used.
    """

    name = "domain"
    #: whether :meth:`run` also assimilates with window models trained with amortised conditioning
    amortised = False
    #: whether :meth:`run` starts from the initial states of ``--init FILE`` (surrogates); a domain that
    #: assimilates with unconditional single-state models sets it False
    needs_init = True

    @classmethod
    def add_arguments(cls, group) -> None:
        """Add the domain's options of ``diffkit assimilate`` to ``group`` (an argparse argument group
        titled "NAME domain options"; pytest's ``pytest_addoption`` is the model).  The command parses
        every installed domain's options; giving one of another domain's is an error.  Default: none."""

    @classmethod
    def grid(cls, layout):  # pragma: no cover - interface
        raise NotImplementedError

    @classmethod
    def read_times(cls, path, grid) -> np.ndarray:
        """The sorted distinct time keys (``grid.time_key``'s units) of the observations in ``path``,
        from which :meth:`run` chooses the window; an unreadable file is a one-line error.  Default:
        :func:`diffkit.observations.observation_window` (CF netCDF)."""
        from .observations import observation_window

        return observation_window(path, grid)

    @classmethod
    def metadata(cls, path) -> Mapping[str, Any]:
        """The global attributes of the observation file ``path`` (a domain may take defaults from them);
        default: the netCDF file's.  A format without any returns ``{}``."""
        from .observations import open_observations

        return dict(open_observations(path).attrs)

    @classmethod
    def read(cls, path, grid) -> ObservationSet:
        """The observations of ``path`` per step of ``grid.window`` (:meth:`ObservationGrid.with_window`):
        an :class:`~diffkit.observations.ObservationSet` in physical units, every fault a one-line
        :class:`~diffkit.errors.ObservationError`.  Default: :func:`diffkit.observations.read_observations`
        (CF netCDF, gridded or points); a point format of the domain's own returns
        :func:`diffkit.observations.point_observations` of its arrays."""
        from .observations import read_observations

        return read_observations(path, grid)

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


def assimilation_for(adapter_cls, *, required: bool = True) -> type[Assimilation] | None:
    """The domain's :class:`Assimilation` of a checkpoint's adapter class, or an error naming the adapter
    (``required=False``: None).  An ``observe`` module of the adapter's package that fails to import is
    raised as it is, not taken for a domain without assimilation."""
    a = getattr(adapter_cls, "assimilation", None)
    if a is None:  # the plugin's convention: ASSIMILATION in the module observe of the adapter's package
        import importlib

        pkg = (getattr(adapter_cls, "__module__", "") or "").split(".")[0]
        try:
            a = getattr(importlib.import_module(f"{pkg}.observe"), "ASSIMILATION", None) if pkg else None
        except ModuleNotFoundError as e:
            if e.name not in (f"{pkg}.observe", pkg):
                raise
            a = None
    if a is None and required:
        name = getattr(adapter_cls, "name", adapter_cls.__name__)
        raise DiffkitError(f"the {name!r} adapter this checkpoint was trained on reads no observation files (its class "
                           f"has no `assimilation`); diffkit assimilate works on models of an adapter whose class "
                           f"sets one (`diffkit assimilate --help` lists the installed domains; docs/observations.md)")
    return a


def _domain_name(domain, fallback: str) -> str:
    name = getattr(domain, "name", None)
    return fallback if not name or name == Assimilation.name else str(name)


def add_domain_arguments(parser) -> dict:
    """Each installed domain's options (:meth:`Assimilation.add_arguments`), in a group "NAME domain
    options", for every adapter of the registry whose class has an assimilation (diffkit's own domains
    first; domains sharing one ``add_arguments``, a subclass and its parent, share one group).  A domain
    that fails, or whose options clash with the command's or an earlier domain's, is a
    :class:`~diffkit.registry.PluginWarning` naming its plugin, and none of its options is added.
    Returns ``{dest: (add_arguments function, domain names, option, default)}`` of the options added
    (:func:`diffkit.options.add_option_groups`)."""
    import warnings

    from . import registry

    try:
        comps = registry.components("adapter")
    except Exception:  # noqa: BLE001 - an inconsistent plugin set: loading the checkpoint reports it
        return {}
    own = lambda c: not str(getattr(c.obj, "__module__", "")).startswith(("diffkit.", "diffkit_"))  # noqa: E731
    hooks: dict = {}  # add_arguments function -> [(domain name, plugin, domain)]
    for comp in sorted(comps, key=own):
        try:
            domain = assimilation_for(comp.obj, required=False) if isinstance(comp.obj, type) else None
            fn = getattr(domain.add_arguments, "__func__", None) if domain is not None else None
        except Exception as e:  # noqa: BLE001 - a broken plugin must not break the CLI
            warnings.warn(f"diffkit plugin {comp.plugin!r}: the assimilation of its adapter {comp.name!r} failed to "
                          f"load, and its options of diffkit assimilate are left out: {type(e).__name__}: "
                          f"{' '.join(str(e).split())}", registry.PluginWarning, stacklevel=2)
            continue
        if fn is not None and fn is not Assimilation.add_arguments.__func__:
            hooks.setdefault(fn, []).append((_domain_name(domain, comp.name), comp.plugin, domain))
    from .options import Provider, add_option_groups

    providers = []
    for fn, users in hooks.items():
        names = tuple(dict.fromkeys(n for n, _, _ in users))
        providers.append(Provider(fn, names, users[0][1], users[0][2].add_arguments))
    return add_option_groups(parser, providers, command="diffkit assimilate", kind="domain")


def check_domain_options(args, domain, owners: Mapping[str, tuple]) -> None:
    """An error if ``args`` gives an option another domain than ``domain`` (the checkpoint's) added
    (``owners``: what :func:`add_domain_arguments` returned)."""
    from .options import check_option_owner

    check_option_owner(args, getattr(domain.add_arguments, "__func__", domain.add_arguments), owners, kind="domain",
                       running=f"this checkpoint is a model of the {domain.name} domain", command="diffkit assimilate")


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


@dataclass
class AmortisedConditions:
    """The observations of a window model's trajectory of ``L`` states, as
    :func:`diffkit.window.sample_trajectory` takes them (physical, ``(1, L, C, *S)``): state 0 the
    initial state, fully observed and exact; state ``1 + j`` the gridded observations of window step
    ``j``; ``sigma`` their noise std for a noise-aware model (``None`` otherwise: taken as exact)."""

    values: torch.Tensor
    mask: torch.Tensor
    sigma: torch.Tensor | None

    @property
    def noisy(self) -> bool:
        return self.sigma is not None

    @property
    def note(self) -> str:
        """The analysis file's ``amortised_note``: how the observations were used."""
        return ("a model trained on noisy observations (data.mask_noise): each observation's sigma_y is an input"
                if self.noisy else "amortised conditioning takes the observations as exact: sigma_y is not used")

    def how(self, obs: ObservationSet) -> str:
        """How the observations were used, for the command's one-line summary."""
        lo, hi = obs.sigma_range()
        return (f"with their sigma_y {lo:g}..{hi:g} (a noise-aware amortised model)" if self.noisy else
                f"taken as exact (amortised conditioning; sigma_y {lo:g}..{hi:g} not used)")


def amortised_conditions(layout, args, obs: ObservationSet, first: torch.Tensor, length: int,
                         hint: str = "") -> AmortisedConditions:
    """The conditions of ``diffkit assimilate --method amortised`` for a window model of ``layout``
    (checked first with :func:`check_window_method`): the observations must be gridded (a one-line
    error otherwise; ``hint``: how the domain makes them so); ``first`` ``(C, *S)`` is the initial
    state and ``length`` the number of states (initial state included).  With ``--no-guidance``
    only the initial state is observed (the prior)."""
    from .errors import ObservationError

    if obs.form != "grid":
        raise ObservationError(f"{args.obs}: amortised conditioning takes gridded observations (values and a mask on "
                               f"the model's grid); give the gridded form{hint}, or use --method mmps / reconstruction "
                               f"/ dps with a surrogate")
    shape = (1, int(length), *first.shape)
    values = torch.full(shape, float("nan"), dtype=torch.float64)
    mask = torch.zeros(shape, dtype=torch.bool)
    values[0, 0], mask[0, 0] = first.to(torch.float64), True
    sigma = torch.zeros(shape, dtype=torch.float64) if layout.window.noise else None
    if not args.no_guidance:
        for j, st in obs.steps.items():
            values[0, 1 + j][st.mask] = st.y.to(torch.float64)
            mask[0, 1 + j] = st.mask
            if sigma is not None:
                sigma[0, 1 + j][st.mask] = st.sigma.to(torch.float64)
    return AmortisedConditions(values, mask, sigma)


def check_window_method(layout, method: str) -> None:
    """A one-line error unless a window model's ``--method`` is amortised and the model amortised."""
    from .errors import ObservationError

    if method != "amortised":
        raise ObservationError(f"this checkpoint is a window model (data.window = {layout.window.length}); it "
                           f"assimilates with --method amortised, not {method}")
    check_amortised(layout)


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
    sampler and NFE (``sample``: the run's ``[sample]`` section, unless given), ``--spread-scale``
    (``spread_scale``, where not 1: :func:`diffkit.calibrate.apply_spread_scale` applies it) and the
    command."""
    from .calibrate import spread_scale_attrs

    lo, hi = obs.sigma_range()
    return {"checkpoint": str(args.checkpoint), "observations": str(args.obs), "observation_form": obs.form,
            "n_observations": obs.count, "observed_steps": len(obs.steps), "sigma_y_range": f"{lo:g}..{hi:g}",
            "method": "none (prior)" if args.no_guidance else method, **(details or {}),
            **({"init_file": str(args.init)} if args.init is not None else {}), **(init or {}), "seed": args.seed,
            "sampler": args.sampler or sample.sampler, "nfe": args.nfe or sample.nfe,
            **spread_scale_attrs(args),
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
    from .calibrate import check_spread_scale

    check_spread_scale(args)
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
    check_domain_options(args, domain, getattr(args, "domain_options", {}))
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
    parser.add_argument("checkpoint", help="checkpoint file or run directory of a diffusion model of a domain that "
                                           "assimilates (an autoregressive surrogate, or what the domain takes)")
    parser.add_argument("--obs", required=True, metavar="OBS",
                        help="observation file (CF netCDF, gridded with missing values or points, or the domain's own "
                             "format; docs/observations.md)")
    parser.add_argument("--init", default=None, metavar="FILE",
                        help="file holding the initial states of a surrogate's rollout (the truth / data file format "
                             "of the domain); required where the domain's rollouts start from one")
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
    from .calibrate import add_spread_scale_argument

    add_spread_scale_argument(parser, "analysis ensemble")
    parser.add_argument("--no-guidance", action="store_true",
                        help="sample the prior ensemble (the same rollout, observations only checked and recorded): "
                             "the reference an analysis is compared with")
    parser.add_argument("--out", required=True, help="output netCDF file (members, ensemble mean and spread)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    # each installed domain's options, in a group of its own (--help lists them)
    parser.set_defaults(func=run_command, domain_options=add_domain_arguments(parser))
