"""Tests of ``diffkit_backbones.unet``: shift equivariance along periodic axes (and not along
bounded ones), the warning for periodic sizes not divisible by the stride, channels-last and bf16,
and the size of the DDPM CIFAR-10 preset."""
from __future__ import annotations

import pytest
import torch

from diffkit.layout import Layout
from diffkit_backbones import build_unet

from _backbone_helpers import TINY_UNET, _inputs, _layout, _randomize_zero_init

pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.mark.parametrize(
    "shape,axis",
    [((32,), 0), ((16, 11), 0), ((8, 12, 4), 1)],
    ids=["1d", "2d-odd-other-axis", "3d"],
)
def test_unet_equivariant_to_periodic_shifts(shape, axis):
    torch.manual_seed(0)
    names = ("x", "y", "z")[: len(shape)]
    lay = _layout(shape, periodic=(names[axis],))
    model = build_unet(lay, attn_levels=(1, 2), **TINY_UNET)
    _randomize_zero_init(model)
    stride = 2 ** (len(TINY_UNET["channel_mult"]) - 1)
    x, c, _, _ = _inputs(lay)
    dim = 2 + axis
    out = model(x, c)
    for k in (stride, 2 * stride):
        shifted = model(torch.roll(x, k, dims=dim), c)
        torch.testing.assert_close(shifted, torch.roll(out, k, dims=dim), atol=1e-5, rtol=1e-5)


def test_unet_not_equivariant_along_non_periodic_axis():
    torch.manual_seed(0)
    lay = _layout((16, 16), periodic=("x",))
    model = build_unet(lay, **TINY_UNET)
    _randomize_zero_init(model)
    x, c, _, _ = _inputs(lay)
    out = model(x, c)
    shifted = model(torch.roll(x, 4, dims=3), c)  # axis y: zero-padded
    assert (shifted - torch.roll(out, 4, dims=3)).abs().max() > 1e-3
    # and with no periodic axes at all, the x shift is not an equivariance either
    lay0 = _layout((16, 16))
    model0 = build_unet(lay0, **TINY_UNET)
    model0.load_state_dict(model.state_dict())
    out0 = model0(x, c)
    assert (model0(torch.roll(x, 4, dims=2), c) - torch.roll(out0, 4, dims=2)).abs().max() > 1e-3


def test_unet_warns_on_periodic_axis_not_divisible_by_stride():
    with pytest.warns(UserWarning, match="periodic axes"):
        build_unet(_layout((30,), periodic=("x",)), **TINY_UNET)


def test_unet_channels_last_and_bf16():
    torch.manual_seed(0)
    lay = _layout((16, 12))
    model = build_unet(lay, **TINY_UNET)
    _randomize_zero_init(model)
    x, c, _, _ = _inputs(lay)
    ref = model(x, c)
    model_cl = model.to(memory_format=torch.channels_last)
    torch.testing.assert_close(model_cl(x.to(memory_format=torch.channels_last), c), ref, atol=1e-5, rtol=1e-5)
    out = model.to(torch.bfloat16)(x.bfloat16(), c)
    assert out.dtype == torch.bfloat16
    assert (out.float() - ref).abs().max() < 0.1 * ref.abs().max()


def test_unet_ddpm_cifar10_preset_size():
    lay = Layout(channels=("r", "g", "b"), spatial=("y", "x"), shape=(32, 32))
    model = build_unet(lay, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) < 0.1 * 35.7e6, n
