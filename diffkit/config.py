"""The configuration schema of a training run: frozen, documented dataclasses.

A run is described by one :class:`Config`, made of five sections (``[data]``, ``[model]``,
``[loss]``, ``[trainer]``, ``[sample]``) and ``run_dir``.  Every field is documented by the
string literal that follows it, and its range or choices sit in its field metadata; the
loader (:mod:`diffkit._typed`) checks types and rules, :mod:`diffkit.config_docs` renders the
documentation (:func:`describe`, :func:`format_config_help`, ``docs/config.md``).

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

This module imports neither torch nor :mod:`diffkit.samplers` (the sampler constants come from
:mod:`diffkit.constants`); a test checks it.
"""
from __future__ import annotations

import dataclasses
import difflib
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from . import config_docs as _docs
from ._typed import Check, Range, Validated, apply_override, build, error, join, read_file, report, to_plain
from ._typed import wrong_type, write_file
from .config_docs import MARKDOWN_COMMAND, FieldDoc
from .constants import BUILTIN_SAMPLER_NAMES, MAX_NFE, SPACINGS

__all__ = [
    "Config", "DataConfig", "FieldDoc", "LossConfig", "MARKDOWN_COMMAND", "ModelConfig", "SampleConfig",
    "TrainerConfig", "apply_overrides", "config_from_dict", "config_to_dict", "describe", "dump_config",
    "format_config_help", "format_config_markdown", "is_surrogate", "load_config", "resolve_loss_defaults",
]

#: the most discrete steps a schedule table may ask for (``T``): a discrete schedule holds a
#: float64 grid of T values; 1000 is DDPM's
MAX_SCHEDULE_T = 1_000_000

# the rules most fields share (see diffkit._typed.Range)
_AT_LEAST_1 = {"range": Range(ge=1)}
_AT_LEAST_0 = {"range": Range(ge=0)}
_FRACTION = {"range": Range(ge=0, lt=1)}
_POSITIVE = {"range": Range(gt=0, finite=True)}
_PROBABILITY = {"range": Range(ge=0, le=1, what="a probability in [0, 1]")}


# -- the sections ------------------------------------------------------------------------------
@dataclass(frozen=True, kw_only=True)
class DataConfig(Validated, section="data"):
    """Where the training data comes from."""

    adapter: str = "mixture"
    """Registered data adapter name (`diffkit plugins` lists them)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to the adapter."""
    val_fraction: float = field(default=0.05, metadata=_FRACTION)
    """Fraction of the data held out for validation, in [0, 1); passed to adapters that take a
    ``val_fraction`` option (unless data.options sets it)."""
    workers: int = field(default=0, metadata=_AT_LEAST_0)
    """DataLoader worker processes (0 loads in the main process)."""
    batch_size: int = field(default=64, metadata=_AT_LEAST_1)
    """Global batch size: samples per optimizer step, summed over the trainer.grad_accum micro-batches
    (so it must be a multiple of grad_accum)."""
    window: int = field(default=0, metadata={"check": Check(lambda v: v == 0 or v >= 2,
                                                            "0 (off) or a number of states >= 2")})
    """Train a window model (diffkit.window, docs/windows.md): each sample is this many consecutive states
    (>= 2), stacked along the channels, from an autoregressive adapter's history and target frames
    (history + horizon must equal it; left unset they are filled in); 0 = off."""
    amortised: bool = False
    """Universal-amortised conditioning of a window model (Shysheya et al. 2024): every sample gets a random
    observation mask (see mask_past, mask_points, mask_both) and is conditioned on the observed values and
    the mask as channels, so one model forecasts and assimilates.  Needs data.window."""
    mask_past: float = field(default=0.25, metadata=_PROBABILITY)
    """Probability of a forecasting mask: the first j states of the window observed (j uniform in
    1..window-1), the rest not."""
    mask_points: float = field(default=0.25, metadata=_PROBABILITY)
    """Probability of a sparse mask: each point of every state observed with probability f (f
    log-uniform in mask_fraction)."""
    mask_both: float = field(default=0.25, metadata=_PROBABILITY)
    """Probability of both: the first j states observed and sparse points in the others.  The remaining
    probability, 1 - mask_past - mask_points - mask_both, draws no observation (the unconditional window model)."""
    mask_fraction: tuple[float, float] = field(default=(0.01, 0.5), metadata={"check": Check(
        lambda v: 0 < v[0] <= v[1] <= 1, "[low, high] with 0 < low <= high <= 1")})
    """Range [low, high] of the fraction of observed points of a sparse mask (0 < low <= high <= 1)."""
    mask_noise: tuple[float, float] = field(default=(0.0, 0.0), metadata={"check": Check(
        lambda v: v[0] == v[1] == 0 or 0 < v[0] <= v[1], "[0, 0] (off) or [low, high] with 0 < low <= high")})
    """Observation noise of amortised training: [0, 0] (off, the default) takes observations as exact; [low,
    high] adds Gaussian noise to the sparse points of each window, its std drawn log-uniform in [low, high]
    in units of each variable's standard deviation, and gives the model that std as input channels
    (sigma:...), so it infers the state from noisy observations (pass their sigma_y when sampling)."""

    def _cross_check(self, prefix: str, source: str) -> None:
        k = lambda name: join(prefix, name)  # noqa: E731
        total = self.mask_past + self.mask_points + self.mask_both
        if total > 1 + 1e-9:
            report(error(f"{k('mask_past')!r} + {k('mask_points')!r} + {k('mask_both')!r} in {source} must be <= 1 "
                         f"(the rest is the probability of no observation), got {total!r}", k("mask_past"), source))
        if max(self.mask_noise) > 0 and not self.amortised:
            report(error(f"{k('mask_noise')!r} in {source} needs amortised conditioning: set {k('amortised')!r} = true "
                         f"(or leave {k('mask_noise')!r} at [0, 0])", k("mask_noise"), source))
        if self.amortised and self.window < 2:
            report(error(f"{k('amortised')!r} in {source} needs a window model: set {k('window')!r} to the number of "
                         f"states per window (>= 2)", k("amortised"), source))


def _is_schedule(v: Any) -> bool:
    return not isinstance(v, dict) or isinstance(v.get("name"), str)


@dataclass(frozen=True, kw_only=True)
class ModelConfig(Validated, section="model"):
    """The network and the diffusion process it is trained for."""

    backbone: str = "mlp"
    """Registered backbone name (`diffkit plugins` lists them)."""
    options: dict[str, Any] = field(default_factory=dict)
    """Keyword options passed to the backbone (for example channels)."""
    parameterization: Literal["eps", "x0", "v"] = "v"
    """What the network predicts: the noise (eps), the clean data (x0) or the velocity (v)."""
    schedule: str | dict[str, Any] = field(default="cosine", metadata={"check": Check(
        _is_schedule, "a schedule name or a table with a 'name' key, like {name = \"cosine\"}")})
    """Noise schedule: a registered name, or a table {name = ..., **options} (for example
    {name = "linear", T = 1000})."""
    objective: Literal["diffusion", "regression"] = "diffusion"
    """diffusion: a (conditional) DDPM, sampled with sample.sampler; regression: the deterministic
    baseline with the same backbone, trained by plain MSE to predict x from its conditions in one
    call (the network sees zeros in place of the noisy sample; schedule and sampler are unused)."""

    def _cross_check(self, prefix: str, source: str) -> None:
        """``T`` in a schedule table is an integer in 1..MAX_SCHEDULE_T (unset: continuous time)."""
        spec = self.schedule
        if not isinstance(spec, dict) or spec.get("T") is None:
            return
        T, key = spec["T"], join(prefix, "schedule.T")
        if isinstance(T, bool) or not isinstance(T, int):
            report(wrong_type(T, int, key, source, "an integer number of discrete steps (or unset)"))
        elif not 1 <= T <= MAX_SCHEDULE_T:
            report(error(f"{key!r} in {source} must be an integer in 1..{MAX_SCHEDULE_T} (the number of discrete "
                         f"steps of the schedule; 1000 is DDPM's), got {T!r}", key, source))


@dataclass(frozen=True, kw_only=True)
class LossConfig(Validated, section="loss"):
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
    p_mean: float = field(default=-1.2, metadata={"range": Range(finite=True)})
    """Mean of log sigma~ of the lognormal noise distribution (finite)."""
    p_std: float = field(default=1.2, metadata=_POSITIVE)
    """Standard deviation of log sigma~ of the lognormal noise distribution (> 0)."""
    sigma_min: float = field(default=0.002, metadata=_POSITIVE)
    """Smallest noise level sigma~ of the logsnr_uniform distribution (> 0, below sigma_max)."""
    sigma_max: float = field(default=80.0, metadata=_POSITIVE)
    """Largest noise level sigma~ of the logsnr_uniform distribution (finite, above sigma_min)."""
    sigma_data: float = field(default=1.0, metadata=_POSITIVE)
    """Data standard deviation sigma_d of the edm weighting (> 0; 1 for standardised data)."""
    gamma: float = field(default=5.0, metadata={"range": Range(gt=0)})
    """SNR cap of the min_snr weighting (> 0)."""
    p_uncond: float = field(default=0.1, metadata=_FRACTION)
    """Probability of dropping the class label during training, which trains the unconditional
    model used by classifier-free guidance; in [0, 1)."""

    def _cross_check(self, prefix: str, source: str) -> None:
        if self.sigma_min >= self.sigma_max:
            key = join(prefix, "sigma_min")
            report(error(f"{key!r} in {source} must be below {join(prefix, 'sigma_max')!r} ({self.sigma_max!r}), "
                         f"got {self.sigma_min!r}", key, source))


@dataclass(frozen=True, kw_only=True)
class TrainerConfig(Validated, section="trainer"):
    """The optimisation loop, checkpoints and logging."""

    steps: int = field(default=1000, metadata=_AT_LEAST_1)
    """Number of optimizer steps."""
    time_budget: float | None = field(default=None, metadata={"range": Range(gt=0, note="seconds (or unset)")})
    """Wall-clock budget in seconds: training stops (with a checkpoint) when it is spent; unset
    means no limit."""
    lr: float = field(default=2e-4, metadata=_POSITIVE)
    """Peak learning rate of AdamW (> 0)."""
    weight_decay: float = field(default=0.0, metadata={"range": Range(ge=0, finite=True)})
    """AdamW weight decay (>= 0)."""
    betas: tuple[float, float] = field(default=(0.9, 0.999), metadata={"range": Range(
        ge=0, lt=1, each=True, what="two numbers in [0, 1)")})
    """AdamW (beta1, beta2), each in [0, 1)."""
    warmup: int = field(default=100, metadata=_AT_LEAST_0)
    """Linear learning-rate warm-up, in optimizer steps (0 for none)."""
    grad_clip: float | None = field(default=1.0, metadata={"range": Range(
        gt=0, note="(or \"none\" to switch clipping off)")})
    """Clip the global gradient norm to this value (> 0); "none" switches clipping off."""
    grad_accum: int = field(default=1, metadata=_AT_LEAST_1)
    """Micro-batches accumulated per optimizer step (>= 1)."""
    ema_decay: float = field(default=0.999, metadata=_FRACTION)
    """Decay of the exponential moving average of the weights, in [0, 1)."""
    ema_warmup: bool = True
    """Ramp the EMA decay up from 0 over the first steps (min(ema_decay, (1 + n) / (10 + n)))."""
    precision: Literal["auto", "fp32", "bf16"] = "auto"
    """Compute precision: auto is bf16 autocast on CUDA and fp32 on CPU."""
    compile: bool = False
    """Compile the model with torch.compile."""
    seed: int = 0
    """Random seed of the model initialisation, the data order and the noise."""
    log_every: int = field(default=50, metadata=_AT_LEAST_1)
    """Log the training loss every this many steps (>= 1)."""
    val_every: int = field(default=500, metadata={"range": Range(ge=0, note="(0 = never)")})
    """Compute the validation loss every this many steps (0 = never)."""
    val_batches: int = field(default=4, metadata=_AT_LEAST_1)
    """Batches in each validation pass (>= 1)."""
    snapshot_every: int = field(default=0, metadata={"range": Range(ge=0, note="(0 = off)")})
    """Draw sample.n samples with the EMA model every this many steps (0 = off)."""
    ckpt_every: int = field(default=500, metadata={"range": Range(ge=0, note="(0 = only at the end)")})
    """Write a checkpoint every this many steps (0 = only at the end of training)."""
    keep_last: int = field(default=3, metadata=_AT_LEAST_1)
    """Number of most recent periodic checkpoints kept in the run directory (>= 1)."""
    deterministic: bool = False
    """Use deterministic algorithms (torch.use_deterministic_algorithms): reproducible, slower."""
    check_every: int = field(default=0, metadata=_AT_LEAST_0)
    """Check the loss and the batch for NaN/inf every this many steps; 0 = every step on CPU (where reading
    the loss costs no device sync) and every trainer.log_every steps on an accelerator.  Between checks
    nothing waits for the device: a record of the first non-finite step is kept on the device, so the error
    names that exact step.  Steps that log, validate, snapshot or checkpoint are always checked first, so no
    checkpoint holds a diverged model."""
    fused_adamw: bool = False
    """Use the fused AdamW kernel (torch.optim.AdamW(fused=True): one kernel per parameter group; CPU and
    CUDA support it); same update as the default up to float round-off."""
    strategy: Literal["ddp", "fsdp"] = "ddp"
    """How several processes (torchrun) share the model: ddp replicates it on every process; fsdp shards the
    parameters, gradients, optimizer state and EMA weights over the processes (FSDP2, fully_shard), for
    backbones that do not fit one device.  Checkpoints hold the full, unsharded weights either way.  One
    process ignores it."""


@dataclass(frozen=True, kw_only=True)
class SampleConfig(Validated, section="sample"):
    """Sampling, for snapshots during training and for `diffkit sample`."""

    sampler: str = "dpmpp_2m"
    """Registered sampler name (ddpm, ddim, dpmpp_2m, dpmpp_2s, dpmpp_3m, euler, heun, unipc or a plugin's)."""
    nfe: int = field(default=20, metadata={"range": Range(ge=1, le=MAX_NFE, note="(the number of denoiser calls)")})
    """Denoiser evaluations per sample (1 to 1000000)."""
    spacing: str | None = field(default=None, metadata={"choices": SPACINGS})
    """Time grid: uniform, quadratic, karras or logsnr; unset uses the sampler's default (logsnr from
    sigma~ = 80 to 1e-3 for every built-in sampler; a schedule may declare its own, as refiner does)."""
    n: int = field(default=16, metadata=_AT_LEAST_1)
    """Number of samples to draw (>= 1)."""
    guidance: float | None = field(default=None, metadata={"range": Range(
        ge=0, finite=True, note="(or unset; negative guidance is not supported: 0 is the unconditional model, "
                                "1 the conditional one)")})
    """Classifier-free guidance scale w (>= 0; 1 is the conditional model, 0 the unconditional
    one); unset means no guidance.  Only class-conditional models (num_classes > 0) are guided."""

    def _cross_check(self, prefix: str, source: str) -> None:
        if not isinstance(self.sampler, str) or self.sampler in BUILTIN_SAMPLER_NAMES:
            return
        from . import registry  # only for a plugin's sampler: the registry loads the built-in plugins
        from .errors import UnknownComponentError

        try:  # a plugin's sampler: checked against the registry, so a typo fails before training
            registry.get("sampler", self.sampler)
        except UnknownComponentError:
            key = join(prefix, "sampler")
            names = sorted(c.name for c in registry.components("sampler"))
            msg = f"{key!r} in {source} must be a registered sampler ({', '.join(names)}), got {self.sampler!r}"
            close = difflib.get_close_matches(self.sampler.lower(), names, n=1, cutoff=0.5)
            if close:
                msg += f"; did you mean {close[0]!r}?"
            report(error(msg + "; `diffkit plugins --kind sampler` lists them with their plugins", key, source))


@dataclass(frozen=True, kw_only=True)
class Config(Validated):
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

    def _cross_check(self, prefix: str, source: str) -> None:
        accum, batch = self.trainer.grad_accum, self.data.batch_size
        if batch % accum:
            report(error(f"'data.batch_size' in {source} must be a multiple of 'trainer.grad_accum' ({accum}): "
                         f"it is the global batch, split into grad_accum micro-batches; got {batch}",
                         "data.batch_size", source))


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


# -- reading and writing (diffkit._typed, with Config as the schema) -----------------------------
def load_config(path: str | os.PathLike) -> Config:
    """The :class:`Config` in a ``.toml``, ``.yaml`` or ``.yml`` file; absent keys take defaults."""
    path = Path(path)
    return config_from_dict(read_file(path), source=str(path))


def config_from_dict(d: Mapping[str, Any], source: str = "<dict>") -> Config:
    """A validated :class:`Config` from nested dicts; errors name ``source``."""
    return build(Config, d, source)


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
        data = to_plain(cfg, keep_tuples=True)
        apply_override(Config, data, item, source)
        cfg = build(Config, data, source)
    return cfg


def config_to_dict(cfg: Any) -> dict[str, Any]:
    """``cfg`` as plain nested dicts (tuples as lists, None kept); a copy."""
    return to_plain(cfg)


_HEADER = "# Resolved diffkit configuration; read it back with diffkit.config.load_config.\n"


def dump_config(cfg: Config, path: str | os.PathLike) -> Path:
    """Write ``cfg`` to ``path`` (``.toml``, or ``.yaml``/``.yml``), atomically; returns the path.

    TOML has no null: unset optional values are left out and ones whose default is set are
    written as ``"none"``, so that ``load_config(path) == cfg``.  A None inside an options
    table cannot be written to TOML (a :class:`ConfigError`); YAML keeps it.
    """
    if not isinstance(cfg, Config):
        raise TypeError(f"dump_config() takes a Config, got {type(cfg).__name__}")
    return write_file(cfg, Path(path), _HEADER)


# -- documentation (diffkit.config_docs, with Config as the default schema) ----------------------
def describe(cls: type = Config, prefix: str = "") -> dict[str, FieldDoc]:
    """``{dotted.key: FieldDoc(type, default, help)}`` of every setting of ``cls`` (sections flattened)."""
    return _docs.describe(cls, prefix)


def format_config_help(cls: type = Config, width: int = 88) -> str:
    """Every configuration key with its type, default and help, for ``diffkit config --help``."""
    return _docs.format_help(cls, width)


def format_config_markdown(cls: type = Config) -> str:
    """The configuration reference as Markdown (``docs/config.md``, ``diffkit config --markdown``)."""
    return _docs.format_markdown(cls)
