"""Tests of ``diffkit_backbones.mlp``: the residual MLP on vector data with conditioning fields,
scalars and labels, and its dependence on the noise level and the scalars."""
from __future__ import annotations

import pytest
import torch

from diffkit.layout import Layout
from diffkit_backbones import build_mlp

from _backbone_helpers import TINY_MLP, _inputs, _randomize_zero_init

pytestmark = pytest.mark.usefixtures("one_thread")


def test_mlp_vector_data_with_conditions():
    torch.manual_seed(0)
    lay = Layout(channels=("a", "b", "c"), cond_channels=("d",), scalars=("s",), num_classes=4)
    model = build_mlp(lay, **TINY_MLP)
    x, c, s, y = _inputs(lay, batch=5)
    assert x.shape == (5, 4)
    out = model(x, c, s, y)
    assert out.shape == (5, 3) and torch.count_nonzero(out) == 0
    _randomize_zero_init(model)
    assert model(x, c, s, y).shape == (5, 3)
    assert build_mlp(lay, out_channels=7, **TINY_MLP)(x, c, s).shape == (5, 7)


def test_noise_level_and_scalars_matter():
    torch.manual_seed(0)
    lay = Layout(channels=("a",), scalars=("s",))
    model = build_mlp(lay, **TINY_MLP)
    _randomize_zero_init(model)
    x = torch.randn(3, 1)
    s = torch.randn(3, 1)
    base = model(x, torch.zeros(3), s)
    assert not torch.allclose(base, model(x, torch.full((3,), 0.5), s))
    assert not torch.allclose(base, model(x, torch.zeros(3), s + 1))
