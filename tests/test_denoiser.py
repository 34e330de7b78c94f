"""Tests of :mod:`diffkit.denoiser`: the Denoiser / Cond contract (what the network sees, the
parameterisation conversions, shape and time checks, classifier-free guidance), with the fake
networks of conftest.py."""
from __future__ import annotations

import math

import pytest
import torch

import diffkit as dk
from diffkit import param as P
from diffkit.errors import NonFiniteError, ShapeError

from _references import F64, ref_cosine_alpha_bar


def _layout(**kw):
    base = dict(channels=("u", "v"), spatial=("x",), shape=(6,), cond_channels=("f",),
                scalars=("s1", "s2"), num_classes=3)
    base.update(kw)
    return dk.Layout(**base)


def _cond(B=4, L=6, gen=None):
    g = gen or torch.Generator().manual_seed(0)
    return dk.Cond(fields=torch.randn(B, 1, L, generator=g), scalars=torch.randn(B, 2, generator=g),
                   labels=torch.tensor([0, 1, 2, 1])[:B])


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
def test_denoiser_net_call_and_parameterisation(affine_net, p, gen):
    net = affine_net(out_channels=2, c=0.1, d=0.2)
    sch = dk.cosine()
    D = dk.Denoiser(net, sch, p, layout=_layout())
    x = torch.randn(4, 2, 6, generator=gen)
    cond = _cond(gen=gen)
    t = torch.tensor([0.1, 0.4, 0.7, 1.0], dtype=F64)
    x0, eps = D.predict(x, t, cond)
    # what the net saw: x with the conditioning field appended, c_noise = log-SNR (float32)
    seen = net.seen
    assert seen["x"].shape == (4, 3, 6)
    torch.testing.assert_close(seen["x"][:, 2:], cond.fields)
    torch.testing.assert_close(seen["x"][:, :2], x)
    assert seen["c_noise"].dtype == torch.float32 and seen["c_noise"].shape == (4,)
    ab = torch.tensor(ref_cosine_alpha_bar(t.numpy())).clamp_min(1 / (1 + math.exp(15)))
    torch.testing.assert_close(seen["c_noise"].double(), torch.log(ab / (1 - ab)), rtol=1e-5, atol=1e-5)
    assert seen["scalars"] is cond.scalars and torch.equal(seen["labels"], cond.labels)
    # the output, converted by hand
    a, s = ab.sqrt()[:, None, None], (1 - ab).sqrt()[:, None, None]
    out = 0.3 * x + 0.01 * seen["c_noise"][:, None, None] + 0.1 * cond.scalars.sum(1)[:, None, None] \
        + 0.2 * (cond.labels.float() + 1)[:, None, None]
    want_x0 = {"eps": (x - s * out) / a, "x0": out, "v": a * x - s * out}[p]
    want_eps = {"eps": out, "x0": (x - a * out) / s, "v": s * x + a * out}[p]
    torch.testing.assert_close(x0, want_x0.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(eps, want_eps.float(), rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(D(x, t, cond), x0)


def test_denoiser_clips_c_noise(affine_net):
    net = affine_net()
    D = dk.Denoiser(net, dk.cosine(), "eps", logsnr_clip=5.0)
    D.net_output(torch.zeros(3, 2), torch.tensor([1e-3, 0.5, 1.0], dtype=F64))
    l = dk.cosine().logsnr(torch.tensor([1e-3, 0.5, 1.0], dtype=F64)).clamp(-5, 5).float()
    torch.testing.assert_close(net.seen["c_noise"], l)
    assert float(net.seen["c_noise"][0]) == 5.0 and float(net.seen["c_noise"][2]) == -5.0


def test_denoiser_without_layout_accepts_any_rank(affine_net, shape, gen):
    sch = dk.linear()
    D = dk.Denoiser(affine_net(), sch, "v")
    x = torch.randn(shape, generator=gen, dtype=F64)
    t = torch.rand(shape[0], generator=gen, dtype=F64) * 0.9 + 0.05
    x0, eps = D.predict(x, t)
    a, s = sch.coeffs(t)
    bb = lambda v: v[(...,) + (None,) * (x.ndim - 1)]
    assert x0.shape == shape
    torch.testing.assert_close(bb(a) * x0 + bb(s) * eps, x, rtol=1e-9, atol=1e-9)


def test_denoiser_reads_layout_from_net(affine_net):
    net = affine_net()
    net.layout = _layout(cond_channels=(), scalars=())
    D = dk.Denoiser(net, dk.cosine())
    assert D.layout is net.layout
    with pytest.raises(ShapeError):
        D(torch.zeros(2, 3, 6), 0.5)


@pytest.mark.parametrize("x_shape, match", [((4, 3, 6), "channels"), ((4, 2), "rank"), ((4, 2, 6, 1), "rank")])
def test_denoiser_rejects_wrong_x(affine_net, x_shape, match):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    with pytest.raises(ShapeError, match=match):
        D(torch.zeros(x_shape), 0.5, _cond())


def test_denoiser_accepts_other_spatial_sizes(affine_net):
    """The layout check is on rank and channels only (backbones may pad and crop)."""
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout(cond_channels=(), scalars=()))
    assert D(torch.zeros(2, 2, 9), 0.5).shape == (2, 2, 9)


@pytest.mark.parametrize("change, match", [
    (dict(fields=torch.zeros(4, 1, 5)), "Cond.fields"),
    (dict(fields=torch.zeros(4, 2, 6)), "Cond.fields"),
    (dict(fields=None), "Cond.fields is None"),
    (dict(scalars=torch.zeros(4, 3)), "Cond.scalars"),
    (dict(scalars=torch.zeros(3, 2)), "Cond.scalars"),
    (dict(scalars=None), "Cond.scalars is None"),
    (dict(labels=torch.tensor([0, 1, 4, 1])), "labels must lie"),
    (dict(labels=torch.tensor([0, -1, 2, 1])), "labels must lie"),
    (dict(labels=torch.tensor([0.0, 1.0, 2.0, 1.0])), "integer"),
    (dict(labels=torch.tensor([0, 1, 2])), "Cond.labels has shape"),
    (dict(fields=torch.full((4, 1, 6), float("nan"))), "NaN"),
])
def test_cond_mismatch_raises_shape_error(affine_net, change, match):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    c = _cond()
    c = dk.Cond(**{**dict(fields=c.fields, scalars=c.scalars, labels=c.labels), **change})
    err = NonFiniteError if match == "NaN" else ShapeError
    with pytest.raises(err, match=match):
        D(torch.zeros(4, 2, 6), 0.5, c)


def test_cond_given_but_not_declared_raises(affine_net):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout(cond_channels=(), scalars=(), num_classes=0))
    x = torch.zeros(4, 2, 6)
    with pytest.raises(ShapeError, match="no cond_channels"):
        D(x, 0.5, dk.Cond(fields=torch.zeros(4, 1, 6)))
    with pytest.raises(ShapeError, match="no scalars"):
        D(x, 0.5, dk.Cond(scalars=torch.zeros(4, 2)))
    with pytest.raises(ShapeError, match="num_classes = 0"):
        D(x, 0.5, dk.Cond(labels=torch.zeros(4, dtype=torch.long)))


def test_null_label_is_accepted(affine_net):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    c = _cond()
    D(torch.zeros(4, 2, 6), 0.5, dk.Cond(c.fields, c.scalars, torch.full((4,), 3)))


@pytest.mark.parametrize("t", [0.0, -0.2, 1.0 + 1e-9, 1.5])
def test_denoiser_rejects_times_outside_0_1(affine_net, t):
    D = dk.Denoiser(affine_net(), dk.cosine())
    with pytest.raises(ValueError):
        D(torch.zeros(2, 3), t)
    with pytest.raises(ValueError):
        D(torch.zeros(2, 3), torch.tensor([0.5, t], dtype=F64))


def test_guidance_without_labels_raises(affine_net):
    D = dk.Denoiser(affine_net(out_channels=2), dk.cosine(), layout=_layout())
    c = _cond()
    with pytest.raises(ValueError, match="labels"):
        D(torch.zeros(4, 2, 6), 0.5, dk.Cond(c.fields, c.scalars), guidance=2.0)
    with pytest.raises(ValueError, match="labels"):
        D(torch.zeros(4, 2), 0.5, None, guidance=3.0)


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
@pytest.mark.parametrize("w", [0.0, 1.0, 2.5, -0.5])
def test_classifier_free_guidance(affine_net, p, w, gen):
    net = affine_net(out_channels=2, c=0.1, d=0.7)
    D = dk.Denoiser(net, dk.cosine(), p, layout=_layout())
    x = torch.randn(4, 2, 6, generator=gen)
    c = _cond(gen=gen)
    t = torch.tensor([0.2, 0.5, 0.6, 0.9], dtype=F64)
    out_c = D.net_output(x, t, c)
    out_u = D.net_output(x, t, dk.Cond(c.fields, c.scalars, torch.full((4,), 3)))
    assert not torch.allclose(out_c, out_u)  # the fake net does depend on labels
    calls = net.calls
    got = D(x, t, c, guidance=w)
    assert net.calls == calls + 1  # one (batched, for w != 1) forward pass
    if w != 1.0:
        assert net.seen["x"].shape[0] == 8
    a, s = D.schedule.coeffs(t)
    want = P.to_x0(p, out_u + w * (out_c - out_u), x, a, s)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # guidance is affine: also holds in x0 space
    x0_c, x0_u = D(x, t, c), P.to_x0(p, out_u, x, a, s)
    torch.testing.assert_close(got, x0_u + w * (x0_c - x0_u), rtol=1e-4, atol=1e-4)
    if w == 1.0:
        assert torch.equal(got, D(x, t, c))
    # bound denoisers carry cond and guidance
    bd = D.bind(c, w)
    assert bd.schedule is D.schedule
    torch.testing.assert_close(bd(x, t), got)


def test_cond_index_and_repeat():
    c = _cond()
    r = c.repeat_interleave(3)
    assert r.fields.shape == (12, 1, 6) and r.scalars.shape == (12, 2)
    assert r.labels.tolist() == [0, 0, 0, 1, 1, 1, 2, 2, 2, 1, 1, 1]
    i = c.index(torch.tensor([2, 0]))
    assert i.labels.tolist() == [2, 0] and torch.equal(i.fields[0], c.fields[2])
    assert dk.Cond().index(slice(0, 1)) == dk.Cond()
