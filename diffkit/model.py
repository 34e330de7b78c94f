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
from .errors import ConfigError, DiffkitError
from .layout import Layout
from .schedules import get_schedule

__all__ = ["LoadedModel", "build_model", "checkpoint_path", "load_for_sampling", "load_model"]


def build_model(cfg: Config, layout: Layout) -> Denoiser | Regressor:
    """The model a config describes (a :class:`Denoiser`, or a :class:`Regressor` when
    ``model.objective = "regression"``), every name resolved through the plugin registry."""
    factory = registry.get("backbone", cfg.model.backbone)
    options = dict(cfg.model.options)
    _check_options(factory, options, f"model.options (backbone {cfg.model.backbone!r})")
    net = factory(layout, **options)
    if cfg.model.objective == "regression":
        return Regressor(net, layout, get_schedule(cfg.model.schedule))
    return Denoiser(net, get_schedule(cfg.model.schedule), cfg.model.parameterization, layout)


def _accepts(factory, name: str) -> bool:
    """Whether ``factory`` takes a keyword argument ``name``."""
    try:
        return name in inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return False


def _check_options(factory, options: dict, where: str) -> None:
    """Unknown keyword options are a ConfigError naming them and listing the valid ones."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "layout"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")


def checkpoint_path(path) -> Path:
    """A checkpoint file, a checkpoint directory, or a run directory holding ``checkpoints/``."""
    p = Path(path)
    if p.is_dir() and (p / "checkpoints").is_dir():
        return p / "checkpoints"
    return p


@dataclass(frozen=True)
class LoadedModel:
    """A trained model ready for inference: the EMA weights in eval mode, its config, the
    registered adapter class (its decoder) and the checkpoint file it came from."""

    model: Denoiser | Regressor
    config: Config
    adapter: type
    path: Path

    @property
    def layout(self) -> Layout:
        return self.model.layout

    @property
    def objective(self) -> str:
        """``"diffusion"`` or ``"regression"``."""
        return "regression" if isinstance(self.model, Regressor) else "diffusion"


def load_model(path, device=None) -> LoadedModel:
    """The EMA model of a checkpoint file, checkpoint directory or run directory (the newest
    valid checkpoint there), loaded with ``weights_only=True``."""
    from .checkpoint import resume as find

    got = find(checkpoint_path(path), require=("ema", "layout", "config", "adapter"))
    if got is None:
        raise DiffkitError(f"no checkpoint found in {path}; give a checkpoint file or a run directory "
                           f"holding checkpoints/")
    file, ck = got
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
