"""Tests of the built-in backbones plugin (unet, dit, mlp): shapes, periodicity, errors, gradients."""
from __future__ import annotations

import math

import pytest
import torch

from diffkit.errors import ShapeError
from diffkit.layout import Layout
from diffkit_backbones import build_dit, build_mlp, build_unet, diffkit_backbones
from diffkit_backbones.layers import AxisPad, pad_to_multiple

TINY_UNET = dict(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=2, groups=4)
TINY_DIT = dict(hidden=24, depth=2, num_heads=2)
TINY_MLP = dict(hidden=32, depth=2)


@pytest.fixture(autouse=True, scope="module")
def _one_thread():
    """The nets here are tiny: intra-op threading only adds overhead (and stalls on a busy machine)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


def _layout(shape, *, periodic=(), cond=(), scalars=(), num_classes=0, channels=("u", "v")):
    spatial = ("x", "y", "z")[: len(shape)]
    return Layout(channels=channels, spatial=spatial, shape=shape, periodic=periodic,
                  cond_channels=cond, scalars=scalars, num_classes=num_classes)


def _randomize_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised weight matrices random values, so outputs and gradients are non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))


def _inputs(layout, batch=2, shape=None):
    x = torch.randn(batch, layout.in_channels, *(layout.shape if shape is None else shape))
    c = torch.linspace(-15, 15, batch)
    s = torch.randn(batch, len(layout.scalars)) if layout.scalars else None
    y = torch.arange(batch) % (layout.num_classes + 1) if layout.num_classes else None
    return x, c, s, y


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


def test_labels_none_is_null_label_and_labels_matter():
    torch.manual_seed(0)
    lay = _layout((16,), num_classes=3)
    model = build_unet(lay, **TINY_UNET)
    _randomize_zero_init(model)
    x, c, _, _ = _inputs(lay)
    null = torch.full((2,), 3)
    torch.testing.assert_close(model(x, c, labels=None), model(x, c, labels=null))
    assert not torch.allclose(model(x, c, labels=torch.zeros(2, dtype=torch.long)), model(x, c))


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


# -- periodicity ------------------------------------------------------------------------------
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


def test_padding_wraps_periodic_axes_and_zero_pads_others():
    x = torch.arange(1.0, 16.0).reshape(1, 1, 5, 3)  # axis 0 periodic, axis 1 bounded
    padded, crop = pad_to_multiple(x, (4, 2), (True, False))
    assert padded.shape == (1, 1, 8, 4)
    torch.testing.assert_close(padded[0, 0, :, 0], x[0, 0, [4, 0, 1, 2, 3, 4, 0, 1], 0])  # 1 before, 2 after
    assert padded[0, 0, :, 3].abs().sum() == 0
    torch.testing.assert_close(padded[crop], x)
    assert pad_to_multiple(x, (5, 3), (True, False))[1] is None
    same = AxisPad([(1, 1), (1, 1)], (True, False))(x)
    torch.testing.assert_close(same[0, 0, 0, 1:-1], x[0, 0, -1])  # wrapped row
    torch.testing.assert_close(same[0, 0, 1:-1, 0], torch.zeros(5))  # zero column
    assert same[0, 0, 0, 0] == 0 and same[0, 0, -1, -1] == 0  # corners: wrapped zeros


def test_unet_warns_on_periodic_axis_not_divisible_by_stride():
    with pytest.warns(UserWarning, match="periodic axes"):
        build_unet(_layout((30,), periodic=("x",)), **TINY_UNET)


# -- errors -----------------------------------------------------------------------------------
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


# -- size ---------------------------------------------------------------------------------------
def test_unet_ddpm_cifar10_preset_size():
    lay = Layout(channels=("r", "g", "b"), spatial=("y", "x"), shape=(32, 32))
    model = build_unet(lay, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2, attn_levels=(1,))
    n = sum(p.numel() for p in model.parameters())
    assert abs(n - 35.7e6) < 0.1 * 35.7e6, n
