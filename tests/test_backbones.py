"""The contract every built-in backbone (unet, dit, mlp) keeps: registered with a description, output
shapes for any rank and odd sizes, sizes other than the layout's, and a gradient reaching every
parameter.  An integration file over the backbones plugin (the DiT has no tests of its own beyond
these); each module's own tests are in test_backbones_unet.py, _mlp.py, _embedding.py (the input
checks) and _layers.py (padding), the fast paths in test_backbones_fastpaths.py."""
from __future__ import annotations

import pytest
import torch

from diffkit_backbones import build_dit, build_mlp, build_unet, diffkit_backbones

from _backbone_helpers import TINY_DIT, TINY_MLP, TINY_UNET, _inputs, _layout, _randomize_zero_init

pytestmark = pytest.mark.usefixtures("one_thread")


def test_hook_registers_three_backbones_with_descriptions():
    reg = diffkit_backbones()
    assert set(reg) == {"unet", "dit", "mlp"}
    for factory in reg.values():
        assert factory.__doc__.strip().splitlines()[0]


@pytest.mark.filterwarnings("ignore:unet. periodic axes")
@pytest.mark.parametrize("build,kw", [(build_unet, TINY_UNET), (build_dit, TINY_DIT)], ids=["unet", "dit"])
@pytest.mark.parametrize("shape", [(37,), (17, 24), (9, 10, 7)], ids=["1d", "2d", "3d"])
def test_output_shape_any_rank_odd_sizes(build, kw, shape):
    torch.manual_seed(0)
    lay = _layout(shape, periodic=("y",) if len(shape) > 1 else (), cond=("mask",),
                  scalars=("a", "b"), num_classes=3)
    model = build(lay, **kw)
    assert model.layout is lay
    x, c, s, y = _inputs(lay)
    out = model(x, c, s, y)
    assert out.shape == (2, lay.num_channels, *shape)
    assert torch.count_nonzero(out) == 0  # zero-initialised output layer
    _randomize_zero_init(model)
    out = model(x, c, s, y)
    assert out.shape == (2, lay.num_channels, *shape) and torch.isfinite(out).all()
    assert model(x, c, s, None).shape == out.shape  # labels=None -> null label
    assert build(lay, out_channels=5, **kw)(x, c, s).shape == (2, 5, *shape)


@pytest.mark.parametrize("build,kw", [(build_unet, TINY_UNET), (build_dit, dict(TINY_DIT, patch_size=(2, 3)))],
                         ids=["unet", "dit"])
def test_other_spatial_sizes_than_layout(build, kw):
    torch.manual_seed(0)
    lay = _layout((16, 12))
    model = build(lay, **kw)
    _randomize_zero_init(model)
    x, c, s, y = _inputs(lay, shape=(13, 21))
    assert model(x, c).shape == (2, 2, 13, 21)


# -- periodicity ------------------------------------------------------------------------------


# -- errors -----------------------------------------------------------------------------------


# -- gradients, dtype, memory format ---------------------------------------------------------------
@pytest.mark.parametrize(
    "build,kw,shape",
    [(build_unet, TINY_UNET, (12, 10)), (build_dit, TINY_DIT, (9, 6)), (build_mlp, TINY_MLP, ())],
    ids=["unet", "dit", "mlp"],
)
def test_gradient_reaches_every_parameter(build, kw, shape):
    torch.manual_seed(0)
    lay = _layout(shape, cond=("m",), scalars=("a",), num_classes=2)
    model = build(lay, **kw)
    _randomize_zero_init(model)
    x, c, s, y = _inputs(lay, batch=3)
    model(x, c, s, y).square().mean().backward()
    dead = [n for n, p in model.named_parameters() if p.grad is None or not p.grad.abs().sum() > 0]
    assert not dead, f"parameters without gradient: {dead}"


# -- size ---------------------------------------------------------------------------------------
