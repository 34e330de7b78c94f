"""diffkit.model: building a model from a config and loading one for inference, without the trainer."""
from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from diffkit.checkpoint import CheckpointManager
from diffkit.config import config_from_dict, config_to_dict
from diffkit.denoiser import Denoiser, Regressor
from diffkit.errors import ConfigError, DiffkitError
from diffkit.layout import Layout
from diffkit.model import (LoadedModel, _accepts, _check_options, build_model, checkpoint_path, load_for_sampling,
                           load_model)

LAYOUT = Layout(channels=("a", "b"))


def cfg(objective="diffusion", **model):
    return config_from_dict({"data": {"adapter": "mixture"},
                             "model": {"backbone": "mlp", "objective": objective,
                                       "options": {"hidden": 16, "depth": 1, **model}}})


@pytest.mark.parametrize("objective,kind", [("diffusion", Denoiser), ("regression", Regressor)])
def test_build_model_from_a_config(objective, kind):
    m = build_model(cfg(objective), LAYOUT)
    assert isinstance(m, kind) and m.layout is LAYOUT


def test_unknown_backbone_option_is_a_config_error_listing_the_valid_ones():
    with pytest.raises(ConfigError, match=r"model.options \(backbone 'mlp'\): unknown option\(s\) hiden; valid options"):
        build_model(cfg(hiden=3), LAYOUT)

    def f(layout, x=1, *, y=2):
        return None
    assert _accepts(f, "y") and not _accepts(f, "z")
    _check_options(f, {"x": 0, "y": 1}, "here")
    with pytest.raises(ConfigError, match="here: unknown option.*z; valid options: x, y"):
        _check_options(f, {"z": 0}, "here")


def _save(run_dir, objective="diffusion", step=3):
    c = cfg(objective)
    m = build_model(c, LAYOUT)
    torch.nn.init.normal_(next(m.net.parameters()))
    CheckpointManager(run_dir / "checkpoints").save(step, {
        "model": m.net.state_dict(), "ema": m.net.state_dict(), "layout": LAYOUT.to_dict(), "adapter": "mixture",
        "config": config_to_dict(c), "step": step})
    return m


@pytest.mark.parametrize("objective", ["diffusion", "regression"])
def test_load_model_from_a_run_directory_a_folder_or_a_file(tmp_path, objective):
    ref = _save(tmp_path, objective)
    from diffkit.adapters import MixtureAdapter

    for where in (tmp_path, tmp_path / "checkpoints", next((tmp_path / "checkpoints").glob("*.pt"))):
        got = load_model(where, device="cpu")
        assert isinstance(got, LoadedModel) and got.objective == objective and got.adapter is MixtureAdapter
        assert got.layout == LAYOUT or got.layout.channels == LAYOUT.channels
        assert got.path.suffix == ".pt" and not got.model.training
        for p, q in zip(got.model.net.parameters(), ref.net.parameters()):
            assert torch.equal(p, q) and not p.requires_grad
        m, c, a = load_for_sampling(where)
        assert type(m) is type(got.model) and c == got.config and a is MixtureAdapter


def test_checkpoint_path_and_missing_checkpoint(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    assert checkpoint_path(tmp_path) == tmp_path / "checkpoints"
    assert checkpoint_path(tmp_path / "x.pt") == tmp_path / "x.pt"
    with pytest.raises(DiffkitError, match="no checkpoint found in"):
        load_model(tmp_path)


def test_inference_does_not_import_the_trainer():
    code = ("import sys, diffkit.model, diffkit.rollout, diffkit.distributed, diffkit.cli, diffkit_pde.surrogate, "
            "diffkit_weather.forecast; "
            "assert 'diffkit.train' not in sys.modules, 'inference code imports the trainer'")
    subprocess.run([sys.executable, "-c", code], check=True)
