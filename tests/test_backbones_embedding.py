"""Tests of ``diffkit_backbones.embedding``: the input checks every backbone runs (rank, channels,
scalars, labels, batch sizes, supported ranks: one-line ShapeErrors naming the fix) and the null
label of the condition embedding."""
from __future__ import annotations

import pytest
import torch

from diffkit.errors import ShapeError
from diffkit.layout import Layout
from diffkit_backbones import build_dit, build_mlp, build_unet

from _backbone_helpers import TINY_MLP, TINY_UNET, _inputs, _layout, _randomize_zero_init

pytestmark = pytest.mark.usefixtures("one_thread")


def test_labels_none_is_null_label_and_labels_matter():
    torch.manual_seed(0)
    lay = _layout((16,), num_classes=3)
    model = build_unet(lay, **TINY_UNET)
    _randomize_zero_init(model)
    x, c, _, _ = _inputs(lay)
    null = torch.full((2,), 3)
    torch.testing.assert_close(model(x, c, labels=None), model(x, c, labels=null))
    assert not torch.allclose(model(x, c, labels=torch.zeros(2, dtype=torch.long)), model(x, c))


@pytest.fixture(scope="module")
def cond_unet():
    torch.manual_seed(0)
    lay = _layout((16, 12), cond=("m",), scalars=("a", "b"), num_classes=3)
    return build_unet(lay, **TINY_UNET)


def test_error_wrong_rank(cond_unet):
    x, c, s, y = _inputs(cond_unet.layout)
    with pytest.raises(ShapeError, match="rank 3 .* expects rank 4"):
        cond_unet(x[:, :, 0], c, s, y)


def test_error_wrong_channels(cond_unet):
    x, c, s, y = _inputs(cond_unet.layout)
    with pytest.raises(ShapeError, match="2 channels but the layout expects 3.*conditioning"):
        cond_unet(x[:, :2], c, s, y)


def test_error_scalars(cond_unet):
    x, c, s, y = _inputs(cond_unet.layout)
    with pytest.raises(ShapeError, match="scalars missing"):
        cond_unet(x, c, None, y)
    with pytest.raises(ShapeError, match=r"scalars must have shape \(2, 2\)"):
        cond_unet(x, c, s[:, :1], y)
    plain = build_mlp(Layout(channels=("a",)), **TINY_MLP)
    with pytest.raises(ShapeError, match="declares no scalar"):
        plain(torch.randn(2, 1), c, torch.randn(2, 1))


def test_error_labels(cond_unet):
    x, c, s, _ = _inputs(cond_unet.layout)
    with pytest.raises(ShapeError, match=r"must lie in \[0, 3\]"):
        cond_unet(x, c, s, torch.tensor([0, 4]))
    with pytest.raises(ShapeError, match=r"must lie in \[0, 3\]"):
        cond_unet(x, c, s, torch.tensor([-1, 0]))
    with pytest.raises(ShapeError, match="integer"):
        cond_unet(x, c, s, torch.tensor([0.0, 1.0]))
    plain = build_mlp(Layout(channels=("a",)), **TINY_MLP)
    with pytest.raises(ShapeError, match="unconditional"):
        plain(torch.randn(2, 1), c, labels=torch.tensor([0, 0]))


def test_error_batch_mismatch(cond_unet):
    x, c, s, y = _inputs(cond_unet.layout)
    with pytest.raises(ShapeError, match=r"c_noise must have shape \(2,\)"):
        cond_unet(x, torch.zeros(3), s, y)
    with pytest.raises(ShapeError, match="scalars must have shape"):
        cond_unet(x, c, torch.randn(3, 2), y)
    with pytest.raises(ShapeError, match=r"labels must have shape \(2,\)"):
        cond_unet(x, c, s, torch.tensor([0, 1, 2]))


def test_error_unsupported_ranks():
    vec = Layout(channels=("a",))
    with pytest.raises(ShapeError, match="mlp"):
        build_unet(vec)
    with pytest.raises(ShapeError, match="mlp"):
        build_dit(vec)
    four = _layout((2, 2, 2), channels=("a",)).replace(spatial=("t", "x", "y", "z"), shape=(2, 2, 2, 2))
    with pytest.raises(ShapeError, match="1 to 3 spatial axes"):
        build_unet(four)
    with pytest.raises(ShapeError, match="unet"):
        build_mlp(_layout((4,)))
