"""Models from configs and checkpoints: building one (:func:`build_model`) and loading one for
inference (:func:`load_for_sampling`, :func:`load_model`).

Inference code (``diffkit sample``, the rollout core, the domain plugins) imports this module,
never the trainer; :mod:`diffkit.train` imports it to build the model it trains.
"""
from __future__ import annotations

import inspect
from dataclasses import dataclass
from pathlib import Path

import torch

from . import registry
from .config import Config, config_from_dict
from .denoiser import Denoiser, Regressor
from .errors import ConfigError
from .layout import Layout

__all__ = ["LoadedModel", "ModelView", "build_model", "checkpoint_path", "load_for_sampling", "load_model"]


def build_model(cfg: Config, layout: Layout) -> Denoiser | Regressor:
    """The model a config describes (a :class:`Denoiser`, or a :class:`Regressor` when
    ``model.objective = "regression"``), every name resolved through the plugin registry."""
    options = dict(cfg.model.options)
    _check_options(registry.get("backbone", cfg.model.backbone), options,
                   f"model.options (backbone {cfg.model.backbone!r})")
    schedule = _schedule(cfg.model.schedule)
    net = registry.resolve("backbone", {"name": cfg.model.backbone, **options})(layout)
    if cfg.model.objective == "regression":
        return Regressor(net, layout, schedule)
    return Denoiser(net, schedule, cfg.model.parameterization, layout)


def _schedule(spec):
    """The schedule ``model.schedule`` names; a bad option is a ConfigError naming the key."""
    if not isinstance(spec, dict):
        return registry.resolve("schedule", spec)
    options = {k: v for k, v in spec.items() if k != "name"}
    factory = registry.get("schedule", spec.get("name"))
    _check_options(factory, options, f"model.schedule (schedule {spec.get('name')!r})")
    try:
        return registry.resolve("schedule", spec)
    except (ValueError, TypeError) as e:
        raise ConfigError(f"model.schedule {spec!r} is invalid: {' '.join(str(e).split())}") from None


def _accepts(factory, name: str) -> bool:
    """Whether ``factory`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


#: unknown keyword options are a ConfigError naming them and listing the valid ones (the registry's check)
_check_options = registry.check_options


def checkpoint_path(path) -> Path:
    """A checkpoint file, a checkpoint directory, or a run directory holding ``checkpoints/``."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


#: what a path given to an inference command may be
_GIVE = "give a checkpoint file (.pt), a checkpoints directory or a run directory (the run_dir of diffkit train)"


def _find_checkpoint(path, require) -> tuple[Path, dict]:
    """``(file, checkpoint)`` for inference: the file itself, or the newest valid checkpoint of a
    checkpoints or run directory.  The errors speak to someone sampling, not resuming: they never
    suggest ``--resume``, and a directory whose checkpoints all fail is one line naming each."""
    import warnings

    from .checkpoint import _RESUME_HINT, CheckpointManager, load_checkpoint
    from .errors import CheckpointError

    hint = "use another checkpoint file, or pass the run directory to use its newest valid checkpoint"
    p = checkpoint_path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint {path} does not exist; check the path: {_GIVE}")
    try:
        if not p.is_dir():
            return p, load_checkpoint(p, require=require)
        found = CheckpointManager(p).list()
        if not found:
            raise CheckpointError(f"no checkpoint found in {path}; {_GIVE} holding checkpoints/")
        reasons = []
        for _, f in reversed(found):
            try:
                ck = load_checkpoint(f, require=require)
            except CheckpointError as e:
                reasons.append((f, " ".join(str(e).replace(f"; {_RESUME_HINT}", "").split())))
                continue
            for bad, reason in reasons:  # newer ones that failed: said once the one used is known
                warnings.warn(f"skipping checkpoint {bad}: {reason}", stacklevel=3)
            return f, ck
        reasons = [f"{f.name}: {r}" for f, r in reasons]
        raise CheckpointError(f"none of the {len(found)} checkpoints in {p} can be loaded ({'; '.join(reasons)}); "
                              f"give a valid checkpoint file")
    except CheckpointError as e:
        raise CheckpointError(" ".join(str(e).replace(_RESUME_HINT, hint).split())) from None


class ModelView:
    """What a holder of a trained network (its ``model`` attribute: a Denoiser or Regressor) tells
    about it: the layout and the objective.  :class:`LoadedModel` and the domains' handles
    (``diffkit_pde``'s Surrogate, ``diffkit_weather``'s Forecaster) share it."""

    model: Denoiser | Regressor

    @property
    def layout(self) -> Layout:
        return self.model.layout

    @property
    def objective(self) -> str:
        """``"diffusion"`` or ``"regression"``."""
        return "regression" if isinstance(self.model, Regressor) else "diffusion"


@dataclass(frozen=True)
class LoadedModel(ModelView):
    """A trained model ready for inference: the EMA weights in eval mode, its config, the
    registered adapter class (its decoder) and the checkpoint file it came from."""

    model: Denoiser | Regressor
    config: Config
    adapter: type
    path: Path


def load_model(path, device=None) -> LoadedModel:
    """The EMA model of a checkpoint file, checkpoint directory or run directory (the newest
    valid checkpoint there), loaded with ``weights_only=True``."""
    file, ck = _find_checkpoint(path, require=("ema", "layout", "config", "adapter"))
    cfg = config_from_dict(ck["config"], source=f"{path} (stored config)")
    layout = Layout.from_dict(ck["layout"])
    model = build_model(cfg, layout)
    model.net.load_state_dict(ck["ema"])
    model.eval().requires_grad_(False)
    if device is not None:
        model.to(torch.device(device))
    return LoadedModel(model, cfg, registry.get("adapter", ck["adapter"]), Path(file))


def load_for_sampling(path, device=None) -> tuple[Denoiser | Regressor, Config, type]:
    """``(ema_model, config, adapter_class)`` from a checkpoint file or run directory
    (:func:`load_model` as a tuple)."""
    m = load_model(path, device=device)
    return m.model, m.config, m.adapter


def class_balanced_count(n: int, num_classes: int) -> int:
    """``n`` rounded up to a multiple of ``num_classes`` (``n`` as is for ``num_classes = 0``).

    The default number of samples of a class-conditional model (``sample.n`` in ``diffkit sample``
    and in training snapshots), whose labels cycle through the classes: every class then gets the
    same number of samples, e.g. a full row per class in an image grid (16 -> 20 for 10 classes).
    An explicit ``--n`` is drawn as given."""
    if num_classes <= 0:
        return n
    return -(-n // num_classes) * num_classes
