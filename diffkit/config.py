"""Configuration of a training run: TOML or YAML files mapped onto frozen dataclasses.

A run is described by one :class:`Config`, made of five sections (``[data]``, ``[model]``,
``[loss]``, ``[trainer]``, ``[sample]``) and ``run_dir``.  Every field is documented by the
string literal that follows it; :func:`describe` collects those into ``{dotted.key:
FieldDoc(type, default, help)}`` and :func:`format_config_help` lists them for the CLI.

- :func:`load_config` reads ``.toml`` or ``.yaml``/``.yml``; missing sections and keys take
  their defaults;
- :func:`config_from_dict` does the same for a plain dict;
- :func:`apply_overrides` applies ``--set trainer.lr=1e-4``-style overrides, whose values are
  TOML literals (``1e-4``, ``32``, ``true``, ``[0.9, 0.95]``, ``{name = "cosine"}``), with
  ``null``/``none`` for None and a bare word read as a string;
- :func:`dump_config` writes the resolved configuration (atomically) so that
  ``load_config(path) == cfg``; :func:`config_to_dict` gives plain nested dicts.

An unknown key is a :class:`~diffkit.errors.ConfigError` naming the dotted key and where it
came from (the file, or ``--set ...``), the valid keys and the closest match; a value of the
wrong type or out of range is one naming the key, the expected type and the value given.
Reading a file or dict collects every problem and raises one error listing them all
(``"3 problems in c.toml: (1) ...; (2) ...; (3) ..."``, one line; ``.errors`` holds each).
Integers must fit in 64 bits, ``T`` of a schedule table is an integer in 1..1000000, and
``sample.sampler`` must be a registered sampler (a plugin's sampler once its plugin is loaded).
Types are checked strictly: an int is accepted for a float, but not for a bool, and a bool
is not an int.  The errors carry ``.key`` and ``.source`` attributes.

TOML has no null.  An optional value whose default is unset (``trainer.time_budget``) is
simply left out; to switch off one whose default is set (``trainer.grad_clip``), write the
string ``"none"`` (YAML's ``null`` works too).  :func:`dump_config` follows the same rules.
YAML 1.1 would read ``1e-4`` as a string; diffkit's YAML loader reads it as a float, as YAML
1.2 does, and rejects duplicate keys.
"""
from __future__ import annotations

import ast
import contextlib
import contextvars
import copy
import dataclasses
import difflib
import inspect
import math
import os
import re
import sys
import textwrap
import types
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal, NamedTuple, Union, get_args, get_origin, get_type_hints

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

import tomli_w
import yaml

from ._io import atomic_write
from .errors import ConfigError
from .samplers import BUILTIN_SAMPLERS, MAX_NFE, SPACINGS

__all__ = [
    "Config", "DataConfig", "FieldDoc", "LossConfig", "ModelConfig", "SampleConfig", "TrainerConfig",
    "apply_overrides", "config_from_dict", "config_to_dict", "describe", "dump_config",
    "format_config_help", "format_config_markdown", "is_surrogate", "load_config", "resolve_loss_defaults",
]

#: strings read as None where a value may be unset (in files only when the type has no str)
_NONE_WORDS = ("none", "null")


class _Validated:
    """Checks and normalises the fields of a config dataclass after ``__init__``.

    Also runs for direct construction and :func:`dataclasses.replace`; while a file or an
    override is being read, the errors name it (see :func:`_build`).
    """

    def __post_init__(self) -> None:
        ctx = _CONTEXT.get()
        if ctx is not None and ctx[0] is type(self):
            prefix, source = ctx[1], ctx[2]
        else:
            prefix, source = _SECTION.get(type(self), ""), f"{type(self).__name__}(...)"
        _validate(self, prefix, source)


# -- the sections ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DataConfig(_Validated):
    """Where the training data comes from."""

    adapter: str = "mixture"
    """Registered data adapter name (`diffkit plugins` lists them)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to the adapter."""
    val_fraction: float = 0.05
    """Fraction of the data held out for validation, in [0, 1); passed to adapters that take a
    ``val_fraction`` option (unless data.options sets it)."""
    workers: int = 0
    """DataLoader worker processes (0 loads in the main process)."""
    batch_size: int = 64
    """Global batch size: samples per optimizer step, summed over the trainer.grad_accum micro-batches
    (so it must be a multiple of grad_accum)."""


@dataclass(frozen=True, kw_only=True)
class ModelConfig(_Validated):
    """The network and the diffusion process it is trained for."""

    backbone: str = "mlp"
    """Registered backbone name (`diffkit plugins` lists them)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to the backbone (for example channels)."""
    parameterization: Literal["eps", "x0", "v"] = "v"
    """What the network predicts: the noise (eps), the clean data (x0) or the velocity (v)."""
    schedule: str | dict[str, Any] = "cosine"
    """Noise schedule: a registered name, or a table {name = ..., **options} (for example
    {name = "linear", T = 1000})."""
    objective: Literal["diffusion", "regression"] = "diffusion"
    """diffusion: a (conditional) DDPM, sampled with sample.sampler; regression: the deterministic
    baseline with the same backbone, trained by plain MSE to predict x from its conditions in one
    call (the network sees zeros in place of the noisy sample; schedule and sampler are unused)."""


@dataclass(frozen=True, kw_only=True)
class LossConfig(_Validated):
    """The training objective: where the noise levels are drawn and how each is weighted (see
    diffkit.losses).  Unset keys are resolved when training starts, from the model and the adapter's
    layout, and the resolved values are what the run's config.toml and checkpoints hold."""

    weighting: Literal["simple", "vdm", "min_snr", "edm", "native"] | None = None
    """Per-noise-level loss weighting: simple (Ho et al. 2020), vdm (continuous-time ELBO,
    importance-weighted under any noise distribution), min_snr (Hang et al. 2023), edm (Karras et al.
    2022; 1 + sigma~^2/sigma_data^2 on the eps-MSE, the v-MSE when sigma_data = 1) or native (MSE in
    the network's own output space).  Unset: edm for a surrogate (a diffusion model whose layout has
    an autoregressive spec), min_snr otherwise."""
    noise: Literal["uniform_t", "lognormal", "logsnr_uniform"] | None = None
    """Training noise distribution: uniform_t (t uniform in (0, 1]; n uniform in 1..T on a discrete
    schedule), lognormal (log sigma~ normal with mean p_mean and std p_std, sigma~ = sigma/alpha; EDM)
    or logsnr_uniform (log-SNR uniform over [sigma_min, sigma_max] in sigma~ units).  Unset: lognormal
    for a surrogate, uniform_t otherwise."""
    p_mean: float = -1.2
    """Mean of log sigma~ of the lognormal noise distribution (finite)."""
    p_std: float = 1.2
    """Standard deviation of log sigma~ of the lognormal noise distribution (> 0)."""
    sigma_min: float = 0.002
    """Smallest noise level sigma~ of the logsnr_uniform distribution (> 0, below sigma_max)."""
    sigma_max: float = 80.0
    """Largest noise level sigma~ of the logsnr_uniform distribution (finite, above sigma_min)."""
    sigma_data: float = 1.0
    """Data standard deviation sigma_d of the edm weighting (> 0; 1 for standardised data)."""
    gamma: float = 5.0
    """SNR cap of the min_snr weighting (> 0)."""
    p_uncond: float = 0.1
    """Probability of dropping the class label during training, which trains the unconditional
    model used by classifier-free guidance; in [0, 1)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sigma_min >= self.sigma_max:
            ctx = _CONTEXT.get()
            prefix, source = (ctx[1], ctx[2]) if ctx is not None and ctx[0] is LossConfig else ("loss", "LossConfig(...)")
            key = _join(prefix, "sigma_min")
            _report(_error(f"{key!r} in {source} must be below {_join(prefix, 'sigma_max')!r} ({self.sigma_max!r}), "
                           f"got {self.sigma_min!r}", key, source))


@dataclass(frozen=True, kw_only=True)
class TrainerConfig(_Validated):
    """The optimisation loop, checkpoints and logging."""

    steps: int = 1000
    """Number of optimizer steps."""
    time_budget: float | None = None
    """Wall-clock budget in seconds: training stops (with a checkpoint) when it is spent; unset
    means no limit."""
    lr: float = 2e-4
    """Peak learning rate of AdamW (> 0)."""
    weight_decay: float = 0.0
    """AdamW weight decay (>= 0)."""
    betas: tuple[float, float] = (0.9, 0.999)
    """AdamW (beta1, beta2), each in [0, 1)."""
    warmup: int = 100
    """Linear learning-rate warm-up, in optimizer steps (0 for none)."""
    grad_clip: float | None = 1.0
    """Clip the global gradient norm to this value (> 0); "none" switches clipping off."""
    grad_accum: int = 1
    """Micro-batches accumulated per optimizer step (>= 1)."""
    ema_decay: float = 0.999
    """Decay of the exponential moving average of the weights, in [0, 1)."""
    ema_warmup: bool = True
    """Ramp the EMA decay up from 0 over the first steps (min(ema_decay, (1 + n) / (10 + n)))."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: auto is bf16 autocast on CUDA and fp32 on CPU."""
    compile: bool = False
    """Compile the model with torch.compile."""
    seed: int = 0
    """Random seed of the model initialisation, the data order and the noise."""
    log_every: int = 50
    """Log the training loss every this many steps (>= 1)."""
    val_every: int = 500
    """Compute the validation loss every this many steps (0 = never)."""
    val_batches: int = 4
    """Batches in each validation pass (>= 1)."""
    snapshot_every: int = 0
    """Draw sample.n samples with the EMA model every this many steps (0 = off)."""
    ckpt_every: int = 500
    """Write a checkpoint every this many steps (0 = only at the end of training)."""
    keep_last: int = 3
    """Number of most recent periodic checkpoints kept in the run directory (>= 1)."""
    deterministic: bool = False
    """Use deterministic algorithms (torch.use_deterministic_algorithms): reproducible, slower."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig(_Validated):
    """Sampling, for snapshots during training and for `diffkit sample`."""

    sampler: str = "dpmpp_2m"
    """Registered sampler name (ddpm, ddim, dpmpp_2m, dpmpp_2s, dpmpp_3m, euler, heun, unipc or a plugin's)."""
    nfe: int = 20
    """Denoiser evaluations per sample (1 to 1000000)."""
    spacing: str | None = None
    """Time grid: uniform, quadratic, karras or logsnr; unset uses the sampler's default (logsnr from
    sigma~ = 80 to 1e-3 for every built-in sampler; a schedule may declare its own, as refiner does)."""
    n: int = 16
    """Number of samples to draw (>= 1)."""
    guidance: float | None = None
    """Classifier-free guidance scale w (>= 0; 1 is the conditional model, 0 the unconditional
    one); unset means no guidance.  Only class-conditional models (num_classes > 0) are guided."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.sampler, str) or self.sampler in BUILTIN_SAMPLERS:
            return
        from . import registry
        from .errors import UnknownComponentError

        try:  # a plugin's sampler: checked against the registry, so a typo fails before training
            registry.get("sampler", self.sampler)
        except UnknownComponentError:
            ctx = _CONTEXT.get()
            prefix, source = (ctx[1], ctx[2]) if ctx is not None and ctx[0] is SampleConfig else ("sample", "SampleConfig(...)")
            key = _join(prefix, "sampler")
            names = sorted(c.name for c in registry.components("sampler"))
            msg = f"{key!r} in {source} must be a registered sampler ({', '.join(names)}), got {self.sampler!r}"
            close = difflib.get_close_matches(self.sampler.lower(), names, n=1, cutoff=0.5)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            _report(_error(msg + "; `diffkit plugins --kind sampler` lists them with their plugins", key, source))


@dataclass(frozen=True, kw_only=True)
class Config(_Validated):
    """A complete training run."""

    data: DataConfig = field(default_factory=DataConfig)
    """The [data] section."""
    model: ModelConfig = field(default_factory=ModelConfig)
    """The [model] section."""
    loss: LossConfig = field(default_factory=LossConfig)
    """The [loss] section."""
    trainer: TrainerConfig = field(default_factory=TrainerConfig)
    """The [trainer] section."""
    sample: SampleConfig = field(default_factory=SampleConfig)
    """The [sample] section."""
    run_dir: str = "runs/default"
    """Directory of the run: checkpoints, logs, samples and the resolved config.toml."""

    def __post_init__(self) -> None:
        super().__post_init__()
        accum, batch = self.trainer.grad_accum, self.data.batch_size
        if batch % accum:
            ctx = _CONTEXT.get()
            source = ctx[2] if ctx is not None and ctx[0] is Config else "Config(...)"
            _report(_error(f"'data.batch_size' in {source} must be a multiple of 'trainer.grad_accum' ({accum}): "
                           f"it is the global batch, split into grad_accum micro-batches; got {batch}",
                           "data.batch_size", source))


_SECTION = {DataConfig: "data", ModelConfig: "model", LossConfig: "loss", TrainerConfig: "trainer",
            SampleConfig: "sample"}

#: what an unset [loss] key becomes: (for a surrogate, for any other model); see resolve_loss_defaults
LOSS_AUTO = {"weighting": ("edm", "min_snr"), "noise": ("lognormal", "uniform_t")}


def is_surrogate(cfg: "Config", layout: Any) -> bool:
    """Whether ``cfg`` trains a surrogate: a diffusion model whose layout has an autoregressive spec
    (``layout.autoregressive``, a next-state model with a state or residual target), whose conditional
    distributions are narrow in model units (spreads of 0.01-0.3 standardised units)."""
    return cfg.model.objective == "diffusion" and getattr(layout, "autoregressive", None) is not None


def resolve_loss_defaults(cfg: "Config", layout: Any) -> "Config":
    """``cfg`` with its unset ``[loss]`` keys (weighting, noise) resolved for this model and layout
    (:data:`LOSS_AUTO`: edm weighting and lognormal noise for a surrogate, min_snr and uniform_t
    otherwise).  Keys already set are kept; the trainer stores the result in config.toml and its
    checkpoints, so a resumed run, ``diffkit sample`` and an inspection see the resolved values."""
    which = 0 if is_surrogate(cfg, layout) else 1
    changes = {k: v[which] for k, v in LOSS_AUTO.items() if getattr(cfg.loss, k) is None}
    if not changes:
        return cfg
    return dataclasses.replace(cfg, loss=dataclasses.replace(cfg.loss, **changes))


#: value checks: field -> (predicate, what the value must be); skipped for None
_RULES: dict[type, tuple[tuple[str, Any, str], ...]] = {
    DataConfig: (
        ("val_fraction", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("workers", lambda v: v >= 0, ">= 0"),
        ("batch_size", lambda v: v >= 1, ">= 1"),
    ),
    ModelConfig: (
        ("schedule", lambda v: not isinstance(v, dict) or isinstance(v.get("name"), str),
         "a schedule name or a table with a 'name' key, like {name = \"cosine\"}"),
    ),
    LossConfig: (
        ("p_mean", math.isfinite, "finite"),
        ("p_std", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("sigma_min", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("sigma_max", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("sigma_data", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("gamma", lambda v: v > 0, "> 0"),
        ("p_uncond", lambda v: 0 <= v < 1, "in [0, 1)"),
    ),
    TrainerConfig: (
        ("steps", lambda v: v >= 1, ">= 1"),
        ("time_budget", lambda v: v > 0, "> 0 seconds (or unset)"),
        ("lr", lambda v: 0 < v < math.inf, "> 0 and finite"),
        ("weight_decay", lambda v: 0 <= v < math.inf, ">= 0 and finite"),
        ("betas", lambda v: all(0 <= b < 1 for b in v), "two numbers in [0, 1)"),
        ("warmup", lambda v: v >= 0, ">= 0"),
        ("grad_clip", lambda v: v > 0, "> 0 (or \"none\" to switch clipping off)"),
        ("grad_accum", lambda v: v >= 1, ">= 1"),
        ("ema_decay", lambda v: 0 <= v < 1, "in [0, 1)"),
        ("log_every", lambda v: v >= 1, ">= 1"),
        ("val_every", lambda v: v >= 0, ">= 0 (0 = never)"),
        ("val_batches", lambda v: v >= 1, ">= 1"),
        ("snapshot_every", lambda v: v >= 0, ">= 0 (0 = off)"),
        ("ckpt_every", lambda v: v >= 0, ">= 0 (0 = only at the end)"),
        ("keep_last", lambda v: v >= 1, ">= 1"),
    ),
    SampleConfig: (
        ("nfe", lambda v: 1 <= v <= MAX_NFE, f"in 1..{MAX_NFE} (the number of denoiser calls)"),
        ("spacing", lambda v: v in SPACINGS, "one of " + ", ".join(SPACINGS) + " (or unset)"),
        ("n", lambda v: v >= 1, ">= 1"),
        ("guidance", lambda v: 0 <= v < math.inf, ">= 0 and finite (or unset; negative guidance is not supported: "
                                                   "0 is the unconditional model, 1 the conditional one)"),
    ),
}

#: the most discrete steps a schedule table may ask for (``T``): a discrete schedule holds a
#: float64 grid of T values; 1000 is DDPM's
MAX_SCHEDULE_T = 1_000_000


def _check_schedule_table(obj: "ModelConfig", prefix: str, source: str) -> None:
    """``T`` in a schedule table is an integer in 1..MAX_SCHEDULE_T, named with its key."""
    spec = obj.schedule
    if not isinstance(spec, dict) or "T" not in spec:
        return
    T, key = spec["T"], _join(prefix, "schedule.T")
    if T is None:  # continuous time
        return
    if isinstance(T, bool) or not isinstance(T, int):
        _report(_wrong_type(T, int, key, source, "an integer number of discrete steps (or unset)"))
    elif not 1 <= T <= MAX_SCHEDULE_T:
        _report(_error(f"{key!r} in {source} must be an integer in 1..{MAX_SCHEDULE_T} (the number of discrete "
                       f"steps of the schedule; 1000 is DDPM's), got {T!r}", key, source))

#: (class being built, key prefix, source) while a mapping is turned into a config
_CONTEXT: contextvars.ContextVar[tuple[type, str, str] | None] = contextvars.ContextVar(
    "diffkit_config_context", default=None)


# -- errors ------------------------------------------------------------------------------------
def _error(msg: str, key: str | None, source: str | None) -> ConfigError:
    err = ConfigError(msg)
    err.key, err.source = key, source
    return err


#: the problems found so far while a file or dict is read (None: raise the first one at once)
_ERRORS: contextvars.ContextVar[list | None] = contextvars.ContextVar("diffkit_config_errors", default=None)


def _report(err: ConfigError) -> None:
    """Record ``err`` while a file or dict is read (so that every problem is reported at once), else raise it."""
    errors = _ERRORS.get()
    if errors is None:
        raise err
    errors.append(err)


@contextlib.contextmanager
def _raising():
    """Raise the first problem at once (for trial conversions, whose failures are expected)."""
    token = _ERRORS.set(None)
    try:
        yield
    finally:
        _ERRORS.reset(token)


def _combined(errors: list[ConfigError], source: str) -> ConfigError:
    """One error for every problem found in ``source``: the first one's message if it is alone,
    else ``"3 problems in f.toml: (1) ...; (2) ...; (3) ..."``.  ``.errors`` holds them all; ``.key``
    is the first one's key."""
    if len(errors) == 1:
        return errors[0]
    parts = []
    for i, e in enumerate(errors, 1):
        msg = getattr(e, "short", None) or str(e)
        msg = msg.replace(f" in {source}", "").rstrip(". ")
        parts.append(f"({i}) {msg}")
    err = _error(f"{len(errors)} problems in {source}: " + "; ".join(parts), errors[0].key, source)
    err.errors = list(errors)
    return err


def _join(prefix: str, name: str) -> str:
    return f"{prefix}.{name}" if prefix else name


def _unknown_key(name: Any, cls: type, prefix: str, source: str) -> ConfigError:
    valid = [f.name for f in dataclasses.fields(cls)]
    key = _join(prefix, str(name))
    msg = f"unknown key {key!r} in {source}"
    hint = None
    if isinstance(name, str):
        # a key of another section (trainer.batch_size) before a spelling suggestion
        others = [s for c, s in _SECTION.items() if c is not cls and name in {f.name for f in dataclasses.fields(c)}]
        if others:
            hint = _join(others[0], name)
        else:
            close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
            if not close:
                close = difflib.get_close_matches(name.lower(), valid, n=1, cutoff=0.6)
            if close:
                hint = _join(prefix, close[0])
    if hint:
        msg += f"; did you mean {hint!r}?"
    short = msg  # in a list of several problems, a suggestion is enough
    where = f"in [{prefix}]" if prefix else "at the top level"
    msg += f" Valid keys {where}: {', '.join(valid)}"
    err = _error(msg, key, source)
    if hint:
        err.short = short
    return err


def _wrong_type(value: Any, tp: Any, key: str, source: str, expected: str | None = None) -> ConfigError:
    expected = expected or _type_name(tp)
    msg = f"{key!r} in {source} must be {expected}, got {value!r} ({type(value).__name__})"
    numbers = {int, float} & _arms(tp)
    if isinstance(value, bool) and numbers:
        msg += "; a bool is not a number"
    elif bool in _arms(tp) and isinstance(value, (int, float)):
        msg += "; write true or false"
    elif isinstance(value, float) and int in _arms(tp) and float not in _arms(tp) and value.is_integer():
        msg += f"; write {int(value)} (an integer, without a decimal point or exponent)"
    elif isinstance(value, str) and numbers and _looks_numeric(value):
        msg += "; remove the quotes to give a number"
    return _error(msg, key, source)


def _looks_numeric(s: str) -> bool:
    try:
        float(s)
    except ValueError:
        return False
    return True


# -- types -------------------------------------------------------------------------------------
@lru_cache(maxsize=None)
def _hints(cls: type) -> dict[str, Any]:
    return get_type_hints(cls)


def _is_union(tp: Any) -> bool:
    return get_origin(tp) in (Union, types.UnionType)


def _arms(tp: Any) -> set:
    """The plain types a (union) type admits: ``float | None`` -> {float, NoneType}."""
    args = get_args(tp) if _is_union(tp) else (tp,)
    return {get_origin(a) or a for a in args}


def _type_name(tp: Any) -> str:
    if tp is Any:
        return "Any"
    if tp is type(None) or tp is None:
        return "None"
    origin, args = get_origin(tp), get_args(tp)
    if _is_union(tp):
        return " | ".join(_type_name(a) for a in args)
    if origin is Literal:
        return " | ".join(repr(a) for a in args)
    if origin is not None:
        inner = ", ".join("..." if a is Ellipsis else _type_name(a) for a in args)
        return f"{origin.__name__}[{inner}]"
    if dataclasses.is_dataclass(tp):
        return f"table ({tp.__name__})"
    return getattr(tp, "__name__", repr(tp))


def _convert(value: Any, tp: Any, key: str, source: str) -> Any:
    """``value`` checked against ``tp`` and normalised (int -> float, list -> tuple)."""
    if tp is Any:
        return value
    origin, args = get_origin(tp), get_args(tp)
    if dataclasses.is_dataclass(tp):
        if isinstance(value, tp):
            return value
        return _build(tp, value, key, source)
    if _is_union(tp):
        if value is None or (isinstance(value, str) and value.strip().lower() in _NONE_WORDS
                             and type(None) in args and str not in _arms(tp)):
            if type(None) in args:
                return None
            raise _wrong_type(value, tp, key, source)
        for arm in args:
            if arm is type(None):
                continue
            try:
                with _raising():
                    return _convert(value, arm, key, source)
            except ConfigError:
                continue
        literal = [a for a in args if get_origin(a) is Literal]
        if isinstance(value, str) and len(literal) == 1 and len(args) == 2 and type(None) in args:
            try:  # an optional choice: the choice's error, with its suggestion
                _convert(value, literal[0], key, source)
            except ConfigError as e:
                raise _error(str(e).replace(", got ", " (or unset), got ", 1), key, source) from None
        raise _wrong_type(value, tp, key, source)
    if tp is type(None):
        if value is None:
            return None
        raise _wrong_type(value, tp, key, source)
    if tp is bool:
        if isinstance(value, bool):
            return value
        raise _wrong_type(value, tp, key, source)
    if tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            if not _INT64[0] <= value <= _INT64[1]:
                raise _error(f"{key!r} in {source} is out of range: {value} does not fit in a 64-bit integer "
                             f"({_INT64[0]} .. {_INT64[1]})", key, source)
            return value
        raise _wrong_type(value, tp, key, source)
    if tp is float:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
        raise _wrong_type(value, tp, key, source)
    if tp is str:
        if isinstance(value, str):
            return value
        raise _wrong_type(value, tp, key, source)
    if origin is Literal:
        for a in args:
            if type(value) is type(a) and value == a:
                return value
        msg = f"{key!r} in {source} must be one of {', '.join(repr(a) for a in args)}, got {value!r}"
        if isinstance(value, str):
            close = difflib.get_close_matches(value.lower(), [str(a) for a in args], n=1, cutoff=0.5)
            if close:
                msg += f"; did you mean {close[0]!r}?"
        raise _error(msg, key, source)
    if origin is tuple:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(value, tp, key, source, f"a list ({_type_name(tp)})")
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value))
        if len(value) != len(args):
            raise _error(f"{key!r} in {source} must be a list of {len(args)} values ({_type_name(tp)}), "
                         f"got {len(value)}: {list(value)!r}", key, source)
        return tuple(_convert(v, a, f"{key}[{i}]", source) for i, (v, a) in enumerate(zip(value, args)))
    if origin is list:
        if not isinstance(value, (list, tuple)):
            raise _wrong_type(value, tp, key, source, f"a list ({_type_name(tp)})")
        return [_convert(v, args[0], f"{key}[{i}]", source) for i, v in enumerate(value)] if args else list(value)
    if origin is dict:
        if not isinstance(value, Mapping):
            raise _wrong_type(value, tp, key, source, f"a table ({_type_name(tp)})")
        kt, vt = args if args else (Any, Any)
        out = {}
        for k, v in value.items():
            k = _convert(k, kt, f"{key} (a key)", source)
            out[k] = _convert(v, vt, _join(key, str(k)), source)
        return out
    raise TypeError(f"diffkit.config cannot check values of type {tp!r} (field {key!r})")  # a bug here


_INT64 = (-(2**63), 2**63 - 1)


def _fits(value: Any, tp: Any) -> bool:
    try:
        with _raising():
            _convert(value, tp, "", "")
    except ConfigError:
        return False
    return True


def _validate(obj: Any, prefix: str, source: str) -> None:
    """Convert and check every field of ``obj``.  While a file or dict is read (:func:`_build`),
    each bad value is recorded and replaced by its default so that the rest are checked too."""
    hints = _hints(type(obj))
    for f in dataclasses.fields(obj):
        key = _join(prefix, f.name)
        value = getattr(obj, f.name)
        try:
            new = _convert(value, hints[f.name], key, source)
        except ConfigError as e:
            _report(e)
            new = _default(f)
        if new is not value:
            object.__setattr__(obj, f.name, new)
    for name, ok, what in _RULES.get(type(obj), ()):
        value = getattr(obj, name)
        if value is not None and not ok(value):
            key = _join(prefix, name)
            _report(_error(f"{key!r} in {source} must be {what}, got {value!r}", key, source))
            object.__setattr__(obj, name, _default(next(f for f in dataclasses.fields(obj) if f.name == name)))
    if type(obj) is ModelConfig:
        _check_schedule_table(obj, prefix, source)


def _build(cls: type, value: Any, prefix: str, source: str) -> Any:
    """An instance of the config dataclass ``cls`` from a mapping read from ``source``."""
    if not isinstance(value, Mapping):
        what = f"{prefix!r} in {source}" if prefix else f"the configuration in {source}"
        raise _error(f"{what} must be a table of settings (keys {', '.join(f.name for f in dataclasses.fields(cls))}), "
                     f"got {value!r} ({type(value).__name__})", prefix or None, source)
    if _ERRORS.get() is None:  # the outermost call: collect every problem, then raise them together
        errors: list[ConfigError] = []
        token = _ERRORS.set(errors)
        try:
            out = _build(cls, value, prefix, source)
        finally:
            _ERRORS.reset(token)
        if errors:
            raise _combined(errors, source)
        return out
    names = {f.name for f in dataclasses.fields(cls)}
    for k in [k for k in value if k not in names]:
        _report(_unknown_key(k, cls, prefix, source))
        value = {kk: v for kk, v in value.items() if kk != k}
    token = _CONTEXT.set((cls, prefix, source))
    try:
        return cls(**value)
    finally:
        _CONTEXT.reset(token)


# -- documentation -----------------------------------------------------------------------------
class FieldDoc(NamedTuple):
    """One configuration key: its type, its default and its help text."""

    type: Any
    default: Any
    help: str

    @property
    def type_name(self) -> str:
        """The type, readably (``float | None``, ``'eps' | 'x0' | 'v'``)."""
        return _type_name(self.type)


@lru_cache(maxsize=None)
def _field_docs(cls: type) -> dict[str, str]:
    """The string literal after each field of ``cls`` (and its bases), on one line."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if klass is object or not dataclasses.is_dataclass(klass):
            continue
        try:
            tree = ast.parse(textwrap.dedent(inspect.getsource(klass)))
        except (OSError, TypeError, SyntaxError):  # no source (frozen app): no help text
            continue
        body = tree.body[0].body if tree.body and isinstance(tree.body[0], ast.ClassDef) else []
        for node, nxt in zip(body, body[1:]):
            if (isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name)
                    and isinstance(nxt, ast.Expr) and isinstance(nxt.value, ast.Constant)
                    and isinstance(nxt.value.value, str)):
                docs[node.target.id] = " ".join(nxt.value.value.split())
    return docs


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return dataclasses.MISSING


def describe(cls: type = Config, prefix: str = "") -> dict[str, FieldDoc]:
    """``{dotted.key: FieldDoc(type, default, help)}`` of every setting of ``cls``.

    Sections are flattened (``trainer.lr``); the help is the field's docstring.
    """
    if not (isinstance(cls, type) and dataclasses.is_dataclass(cls)):
        raise TypeError(f"describe() takes a config dataclass, got {cls!r}")
    hints, docs = _hints(cls), _field_docs(cls)
    out: dict[str, FieldDoc] = {}
    for f in dataclasses.fields(cls):
        tp, key = hints[f.name], _join(prefix, f.name)
        if dataclasses.is_dataclass(tp):
            out.update(describe(tp, key))
        else:
            out[key] = FieldDoc(tp, _default(f), docs.get(f.name, ""))
    return out


def _literal(value: Any) -> str:
    """A value as it would be written in TOML (None as ``unset``)."""
    if value is None:
        return "unset"
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'
    if isinstance(value, (list, tuple)):
        return "[" + ", ".join(_literal(v) for v in value) + "]"
    if isinstance(value, Mapping):
        return "{" + ", ".join(f"{k} = {_literal(v)}" for k, v in value.items()) + "}"
    return repr(value)


def format_config_help(cls: type = Config, width: int = 88) -> str:
    """Every configuration key with its type, default and help, for ``diffkit config --help``."""
    lines = [
        "Configuration keys (sections of a .toml or .yaml file; override any with --set KEY=VALUE,",
        "the value written as in TOML: --set trainer.lr=1e-4 --set model.options.channels=32):",
    ]
    hints = _hints(cls)
    top = []
    for f in dataclasses.fields(cls):
        tp = hints[f.name]
        if not dataclasses.is_dataclass(tp):
            top.append(f)
            continue
        doc = " ".join((tp.__doc__ or "").split())
        lines += ["", f"[{f.name}]" + (f"  {doc}" if doc else "")]
        lines += _format_keys(describe(tp, f.name), width)
    if top:
        lines += ["", "top level"]
        lines += _format_keys({k: v for k, v in describe(cls).items() if "." not in k}, width)
    return "\n".join(lines) + "\n"


MARKDOWN_COMMAND = "diffkit config --markdown > docs/config.md"
"""The command that writes ``docs/config.md`` from these dataclasses."""


def _md_cell(text: str) -> str:
    """``text`` for a Markdown table cell: ``|`` escaped, and ``*`` / ``_`` outside code spans."""
    parts = re.split(r"(`+[^`]*`+)", text.replace("\n", " "))
    for i in range(0, len(parts), 2):
        parts[i] = re.sub(r"([*_])", r"\\\1", parts[i])
    return "".join(parts).replace("|", "\\|")


def format_config_markdown(cls: type = Config) -> str:
    """The configuration reference as Markdown (``docs/config.md``): one table per section with
    every key's type, default and meaning, then every default as a TOML file.  Generated from the
    dataclasses and their field docstrings, like :func:`format_config_help`."""
    hints = _hints(cls)
    lines = [
        "# Configuration reference",
        "",
        f"<!-- Generated from the dataclasses in diffkit/config.py by `{MARKDOWN_COMMAND}`.",
        "     Do not edit by hand: a test checks that this file equals the generated text. -->",
        "",
        "A run is described by one TOML or YAML file with the sections below.  Every key has a default,",
        "so an empty file (or none at all) is a valid configuration.  Override any key on the command",
        "line with `--set KEY=VALUE`, the value written as in TOML: `--set trainer.lr=1e-4`,",
        "`--set model.options.channels=32`.  An unknown key or a wrong type is an error naming the key",
        "and the file; a file with several problems gets one error listing them all, each with its",
        "\"did you mean\".  `sample.sampler` must be a registered sampler and integers must fit in 64",
        "bits, checked when the file is read, before training starts.  `diffkit config` prints this",
        "list in a terminal; [training.md](training.md) shows the workflow.",
        "",
        "TOML has no null: an optional key whose default is unset is left out, and `\"none\"` switches",
        "off one whose default is set (`grad_clip = \"none\"`).",
    ]
    sections, top = [], []
    for f in dataclasses.fields(cls):
        (sections if dataclasses.is_dataclass(hints[f.name]) else top).append(f)
    tables = [(f"`[{f.name}]`", " ".join((hints[f.name].__doc__ or "").split()), describe(hints[f.name], f.name))
              for f in sections]
    if top:
        tables.append(("Top level", "Keys outside any section.",
                       {k: v for k, v in describe(cls).items() if "." not in k}))
    for title, doc, docs in tables:
        lines += ["", f"## {title}", ""]
        if doc:
            lines += [doc, ""]
        lines += ["| key | type | default | meaning |", "|-----|------|---------|---------|"]
        for key, d in docs.items():
            default = "unset" if d.default is None else f"`{_md_cell(_literal(d.default))}`"
            lines.append(f"| `{key}` | `{_md_cell(d.type_name)}` | {default} | {_md_cell(d.help)} |")
    lines += ["", "## Every default, as a file", "", "```toml"]
    for f in top:
        lines += _toml_defaults(describe(cls), f.name)
    for f in sections:
        lines += ["", f"[{f.name}]"] + _toml_defaults(describe(hints[f.name], f.name), f"{f.name}.")
    lines += ["```"]
    return "\n".join(lines) + "\n"


def _toml_defaults(docs: dict[str, FieldDoc], prefix: str) -> list[str]:
    out = []
    for key, d in docs.items():
        if not key.startswith(prefix) or "." in key[len(prefix):]:
            continue
        name = key[len(prefix):] or key
        out.append(f"# {name} = (unset)" if d.default is None else f"{name} = {_literal(d.default)}")
    return out


def _format_keys(docs: dict[str, FieldDoc], width: int) -> list[str]:
    out = []
    for key, d in docs.items():
        out.append(f"  {key} = {_literal(d.default)}  ({d.type_name})")
        if d.help:
            out += textwrap.wrap(d.help, width=width, initial_indent="      ", subsequent_indent="      ")
    return out


# -- reading -----------------------------------------------------------------------------------
class _YamlLoader(yaml.SafeLoader):
    """safe_load, plus YAML 1.2 floats (``1e-4``) and an error on duplicate keys."""

    def construct_mapping(self, node, deep=False):
        seen = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            with contextlib.suppress(TypeError):
                if key in seen:
                    raise yaml.constructor.ConstructorError(
                        "while constructing a mapping", node.start_mark,
                        f"found duplicate key {key!r}", key_node.start_mark)
                seen[key] = True
        return super().construct_mapping(node, deep=deep)


_YamlLoader.add_implicit_resolver(
    "tag:yaml.org,2002:float", re.compile(r"^[-+]?[0-9][0-9_]*(?:\.[0-9_]*)?[eE][-+]?[0-9]+$"), list("-+0123456789"))

_TOML_SUFFIXES, _YAML_SUFFIXES = (".toml",), (".yaml", ".yml")


def _suffix(path: Path, action: str) -> str:
    ext = path.suffix.lower()
    if ext not in _TOML_SUFFIXES + _YAML_SUFFIXES:
        raise _error(f"cannot {action} configuration file {str(path)!r}: unknown extension {ext or '(none)'!r}; "
                     f"use .toml, .yaml or .yml", None, str(path))
    return ext


def _read(path: Path) -> Any:
    src = str(path)
    ext = _suffix(path, "read")
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise _error(f"configuration file {src!r} does not exist", None, src) from None
    except UnicodeDecodeError as e:
        raise _error(f"configuration file {src!r} is not UTF-8 text ({e.reason} at byte {e.start})", None, src) from None
    except OSError as e:
        raise _error(f"cannot read configuration file {src!r}: {e.strerror or e}", None, src) from None
    if ext in _TOML_SUFFIXES:
        try:
            return tomllib.loads(text)
        except tomllib.TOMLDecodeError as e:
            msg = getattr(e, "msg", None) or str(e)
            line, col = getattr(e, "lineno", None), getattr(e, "colno", None)
            m = re.search(r"\s*\(at line (\d+), column (\d+)\)", msg)
            if m:
                msg = msg[:m.start()] + msg[m.end():]
                line, col = line or int(m.group(1)), col or int(m.group(2))
            elif re.search(r"\(at end of document\)", msg):
                line = line or text.count("\n") + 1
            where = f"{src}, line {line}" + (f", column {col}" if col else "") if line else src
            raise _error(f"{where}: invalid TOML: {msg}", None, src) from None
    try:
        return yaml.load(text, Loader=_YamlLoader)  # noqa: S506 - a SafeLoader subclass
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{src}, line {mark.line + 1}, column {mark.column + 1}" if mark is not None else src
        problem = getattr(e, "problem", None)
        ctx = getattr(e, "context", None)
        msg = (f"{problem} ({ctx})" if ctx else problem) if problem else str(e)
        raise _error(f"{where}: invalid YAML: {msg}", None, src) from None


def load_config(path: str | os.PathLike) -> Config:
    """The :class:`Config` in a ``.toml``, ``.yaml`` or ``.yml`` file; absent keys take defaults."""
    path = Path(path)
    data = _read(path)
    if data is None:  # an empty YAML file
        data = {}
    return config_from_dict(data, source=str(path))


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Config:
    """A validated :class:`Config` from nested dicts; errors name ``source``."""
    return _build(Config, copy.deepcopy(d), "", source)


# -- overrides ---------------------------------------------------------------------------------
def _parse_value(raw: str, tp: Any, source: str) -> Any:
    """An override value: a TOML literal, ``null``/``none`` -> None, else the raw string."""
    if raw.lower() in _NONE_WORDS:
        return None
    try:
        value = tomllib.loads(f"v = {raw}")["v"]
    except tomllib.TOMLDecodeError as e:
        if raw[:1] in ("[", "{", '"', "'"):
            raise _error(f"invalid value in {source}: {raw} is not a valid TOML value ({e})", None, source) from None
        return raw  # a bare word: a string
    # "--set run_dir=2024" means the string when the key takes a string and not an int
    if str in _arms(tp) and not isinstance(value, str) and not _fits(value, tp):
        return raw
    return value


def _set_override(data: dict, item: str, source: str) -> None:
    key, sep, raw = item.partition("=")
    key, raw = key.strip(), raw.strip()
    parts = key.split(".")
    if not sep or not key or any(not p.strip() for p in parts):
        raise _error(f"--set expects KEY=VALUE with a dotted key, like --set trainer.lr=1e-4; got {item!r}",
                     key or None, source)
    parts = [p.strip() for p in parts]
    cls, node, prefix = Config, data, ""
    for i, part in enumerate(parts):
        names = {f.name for f in dataclasses.fields(cls)}
        if part not in names:
            raise _unknown_key(part, cls, prefix, source)
        tp, rest, here = _hints(cls)[part], parts[i + 1:], _join(prefix, part)
        if dataclasses.is_dataclass(tp):
            if rest:
                cls, node, prefix = tp, node[part], here
                continue
            value = _parse_value(raw, Any, source)  # a whole section: an inline table, merged
            if not isinstance(value, dict):
                raise _error(f"{here!r} is a section; in {source} give one of its keys ({here}.KEY=VALUE) "
                             f"or an inline table {{key = value, ...}}", here, source)
            node[part] = {**node[part], **value}
            return
        if not rest:
            node[part] = _parse_value(raw, tp, source)
            return
        if dict not in _arms(tp):
            raise _error(f"{here!r} is {_type_name(tp)}, not a table, so {key!r} in {source} cannot be set",
                         key, source)
        cur = node.get(part)
        if isinstance(cur, str) and str in _arms(tp):  # schedule = "cosine" -> {name = "cosine", ...}
            cur = {"name": cur}
        d = node[part] = dict(cur) if isinstance(cur, dict) else {}
        for j, p in enumerate(rest[:-1]):
            nxt = d.get(p, {})
            if not isinstance(nxt, dict):
                sub = ".".join(parts[:i + j + 2])
                raise _error(f"{sub!r} is {nxt!r}, not a table, so {key!r} in {source} cannot be set", key, source)
            d[p] = d = dict(nxt)
        d[rest[-1]] = _parse_value(raw, Any, source)
        return


def apply_overrides(cfg: Config, overrides: Iterable[str]) -> Config:
    """A new :class:`Config` with ``KEY=VALUE`` overrides (``--set``) applied in order.

    Values are TOML literals (``1e-4``, ``32``, ``true``, ``"text"``, ``[0.9, 0.95]``,
    ``{name = "sigmoid"}``); ``null`` or ``none`` is None; anything else is a string.  Keys
    below a table-valued setting (``model.options.channels``) may be new; ``model.schedule.T``
    turns a schedule name into a ``{name = ..., T = ...}`` table.
    """
    if isinstance(overrides, str):
        overrides = [overrides]
    for item in overrides:
        source = f"--set {item}"
        data = _plain(cfg, keep_tuples=True)
        _set_override(data, item, source)
        cfg = _build(Config, data, "", source)
    return cfg


# -- writing -----------------------------------------------------------------------------------
def _plain(value: Any, keep_tuples: bool = False) -> Any:
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return {f.name: _plain(getattr(value, f.name), keep_tuples) for f in dataclasses.fields(value)}
    if isinstance(value, Mapping):
        return {k: _plain(v, keep_tuples) for k, v in value.items()}
    if isinstance(value, tuple) and keep_tuples:
        return tuple(_plain(v, keep_tuples) for v in value)
    if isinstance(value, (list, tuple)):
        return [_plain(v, keep_tuples) for v in value]
    return copy.deepcopy(value)


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` as plain nested dicts (tuples as lists, None kept); a copy."""
    return _plain(cfg)


def _toml_ready(obj: Any, prefix: str, path: str) -> dict[str, Any]:
    """``obj`` as a dict TOML can hold: None left out where it is the default, else ``"none"``."""
    hints, out = _hints(type(obj)), {}
    for f in dataclasses.fields(obj):
        key, value, tp = _join(prefix, f.name), getattr(obj, f.name), hints[f.name]
        if dataclasses.is_dataclass(value):
            out[f.name] = _toml_ready(value, key, path)
        elif value is None:
            if _default(f) is None:
                continue
            if str in _arms(tp):
                raise _error(f"cannot write {key!r} = None to {path!r}: TOML has no null and the key also takes "
                             f"strings; save the configuration as .yaml instead", key, path)
            out[f.name] = "none"
        else:
            _check_no_none(value, key, path)
            out[f.name] = _plain(value)
    return out


def _check_no_none(value: Any, key: str, path: str) -> None:
    if value is None:
        raise _error(f"cannot write {key!r} = None to {path!r}: TOML has no null; remove the key "
                     f"or save the configuration as .yaml instead", key, path)
    if isinstance(value, Mapping):
        for k, v in value.items():
            _check_no_none(v, _join(key, str(k)), path)
    elif isinstance(value, (list, tuple)):
        for i, v in enumerate(value):
            _check_no_none(v, f"{key}[{i}]", path)


def _atomic_write(path: Path, text: str) -> None:
    """Write ``text`` to ``path`` so that readers see the old file or the new one, never a part."""
    atomic_write(path, lambda f: f.write(text))


_HEADER = "# Resolved diffkit configuration; read it back with diffkit.config.load_config.\n"


def dump_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write ``cfg`` to ``path`` (``.toml``, or ``.yaml``/``.yml``), atomically; returns the path.

    TOML has no null: unset optional values are left out and ones whose default is set are
    written as ``"none"``, so that ``load_config(path) == cfg``.  A None inside an options
    table cannot be written to TOML (a :class:`ConfigError`); YAML keeps it.
    """
    path = Path(path)
    if not isinstance(cfg, Config):
        raise TypeError(f"dump_config() takes a Config, got {type(cfg).__name__}")
    if _suffix(path, "write") in _TOML_SUFFIXES:
        data = _toml_ready(cfg, "", str(path))
        try:
            text = tomli_w.dumps(data)
        except TypeError as e:  # an options value TOML cannot hold
            raise _error(f"cannot write the configuration to {str(path)!r} as TOML: {e}", None, str(path)) from None
    else:
        text = yaml.safe_dump(config_to_dict(cfg), sort_keys=False, allow_unicode=True)
    _atomic_write(path, _HEADER + text)
    return path
