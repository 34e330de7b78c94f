"""Tests of diffusion_loss: every weighting and parameterisation against a by-hand computation,
per-element weights and masks on tensors of rank 1..5, label dropout, and errors.

The network is a fixed affine function (``0.3 x_t + 0.01 c_noise``), and the schedule's
coefficients and log-SNR derivative are recomputed from Nichol's cosine formula, so the
expected loss does not go through diffkit's own conversions.
"""
from __future__ import annotations

import math

import pytest
import torch

import diffkit as dk
from diffkit.errors import NonFiniteError
from diffkit.losses import WEIGHTINGS, sample_times

F64 = torch.float64
S_COS = 0.008
AB_MIN = 1.0 / (1.0 + math.exp(15.0))


def cos_ab(t: torch.Tensor) -> torch.Tensor:
    f = lambda u: torch.cos((u + S_COS) / (1 + S_COS) * math.pi / 2) ** 2
    return (f(t) / f(torch.zeros_like(t))).clamp_min(AB_MIN)


def cos_dlogsnr(t: torch.Tensor) -> torch.Tensor:
    theta = (t + S_COS) / (1 + S_COS) * math.pi / 2
    return -math.pi / (1 + S_COS) * torch.tan(theta) / (1 - cos_ab(t))


def bb(v, like):
    return v[(...,) + (None,) * (like.ndim - 1)]


def by_hand(x0, eps, t, p, weighting, gamma=5.0, weight=None):
    """The per-sample loss from its definition, for the net ``out = 0.3 x_t + 0.01 c_noise``."""
    ab = cos_ab(t)
    a, s = ab.sqrt(), (1 - ab).sqrt()
    x_t = bb(a, x0) * x0 + bb(s, x0) * eps
    c_noise = torch.log(ab / (1 - ab)).clamp(-30, 30).float().double()
    out = 0.3 * x_t + 0.01 * bb(c_noise, x0)
    eps_hat = {"eps": out, "x0": (x_t - bb(a, x0) * out) / bb(s, x0), "v": bb(s, x0) * x_t + bb(a, x0) * out}[p]
    native_target = {"eps": eps, "x0": x0, "v": bb(a, x0) * eps - bb(s, x0) * x0}[p]

    def mean(e):
        e = e.reshape(e.shape[0], -1)
        if weight is None:
            return e.mean(1)
        w = torch.broadcast_to(weight.double(), x0.shape).reshape(e.shape[0], -1)
        return (w * e).sum(1) / w.sum(1)

    mse_eps = mean((eps - eps_hat) ** 2)
    if weighting == "simple":
        return mse_eps
    if weighting == "vdm":
        return -0.5 * cos_dlogsnr(t) * mse_eps
    if weighting == "min_snr":
        snr = ab / (1 - ab)
        return torch.clamp(snr, max=gamma) / snr * mse_eps
    if weighting == "edm":  # Karras et al.: lambda |D - x0|^2 = (sigma~^2 + 1)/sigma~^2 * sigma~^2 |eps err|^2
        return (1 + (1 - ab) / ab) * mse_eps
    if weighting == "native":
        return mean((out - native_target) ** 2)
    raise AssertionError(weighting)


def _inputs(shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    t = torch.linspace(0.03, 0.97, shape[0], dtype=F64)
    return x0, eps, t


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
@pytest.mark.parametrize("weighting", ["simple", "vdm", "min_snr", "edm", "native"])
def test_loss_equals_definition(affine_net, shape, weighting, p):
    D = dk.Denoiser(affine_net(), dk.cosine(), p)
    x0, eps, t = _inputs(shape)
    got = dk.diffusion_loss(D, x0, weighting=weighting, t=t, eps=eps)
    assert got.shape == (shape[0],)
    want = by_hand(x0, eps, t, p, weighting)
    torch.testing.assert_close(got.double(), want, rtol=2e-5, atol=1e-7)


def test_weightings_differ_and_are_consistent(affine_net):
    """simple and native coincide for eps-prediction only; min_snr = simple where SNR <= gamma."""
    x0, eps, t = _inputs((6, 3, 4))
    L = {}
    for p in ("eps", "x0", "v"):
        D = dk.Denoiser(affine_net(), dk.cosine(), p)
        L[p] = {w: dk.diffusion_loss(D, x0, weighting=w, t=t, eps=eps).double() for w in WEIGHTINGS}
    torch.testing.assert_close(L["eps"]["simple"], L["eps"]["native"])
    assert not torch.allclose(L["x0"]["simple"], L["x0"]["native"])
    assert not torch.allclose(L["v"]["simple"], L["v"]["native"])
    snr = cos_ab(t) / (1 - cos_ab(t))
    low = snr <= 5.0
    assert low.any() and (~low).any()
    torch.testing.assert_close(L["eps"]["min_snr"][low], L["eps"]["simple"][low])
    assert bool((L["eps"]["min_snr"][~low] < L["eps"]["simple"][~low]).all())


@pytest.mark.parametrize("gamma", [0.5, 1.0, 20.0])
def test_min_snr_gamma(affine_net, gamma):
    D = dk.Denoiser(affine_net(), dk.cosine(), "v")
    x0, eps, t = _inputs((8, 2, 3), seed=1)
    got = dk.diffusion_loss(D, x0, weighting="min_snr", gamma=gamma, t=t, eps=eps)
    torch.testing.assert_close(got.double(), by_hand(x0, eps, t, "v", "min_snr", gamma=gamma), rtol=2e-5, atol=1e-7)


def _mask(shape):
    """Zero the second half of the last axis (of the batch axis for rank 1); sample 0 fully masked."""
    m = torch.ones(shape, dtype=F64)
    if len(shape) == 1:
        m[1::2] = 0.0
    else:
        m[..., shape[-1] // 2:] = 0.0
        m[0] = 0.0
    return m


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
def test_mask_gives_mean_over_unmasked_region(affine_net, shape, p, request):
    D = dk.Denoiser(affine_net(), dk.cosine(), p)
    x0, eps, t = _inputs(shape, seed=2)
    m = _mask(shape)
    got = dk.diffusion_loss(D, x0, weighting="simple", weight=m, t=t, eps=eps).double()
    assert got.shape == (shape[0],)
    want = by_hand(x0, eps, t, p, "simple", weight=m)
    keep = m.reshape(shape[0], -1).sum(1) > 0
    torch.testing.assert_close(got[keep], want[keep], rtol=2e-5, atol=1e-7)
    assert bool((got[~keep] == 0).all())  # a fully masked sample contributes 0
    # values under the mask are ignored entirely (the fake net acts element-wise)
    x0b = torch.where(m > 0, x0, torch.full_like(x0, 1e3))
    got_b = dk.diffusion_loss(D, x0b, weighting="simple", weight=m, t=t, eps=eps).double()
    torch.testing.assert_close(got_b, got, rtol=1e-5, atol=1e-7)
    # and the mask does change the loss (for rank 1 a sample is one element: kept or dropped whole)
    full = dk.diffusion_loss(D, x0, weighting="simple", t=t, eps=eps).double()
    assert bool((full[~keep] > 0).all())
    if len(shape) > 1:
        assert not torch.allclose(full[keep], got[keep])
    else:
        torch.testing.assert_close(full[keep], got[keep], rtol=1e-5, atol=1e-8)


def test_all_ones_weight_equals_no_weight(affine_net, shape):
    D = dk.Denoiser(affine_net(), dk.cosine(), "x0")
    x0, eps, t = _inputs(shape, seed=3)
    w = torch.ones(shape[1:]) * 2.5  # constant weights of any scale are a no-op
    a = dk.diffusion_loss(D, x0, weighting="vdm", weight=w, t=t, eps=eps)
    b = dk.diffusion_loss(D, x0, weighting="vdm", t=t, eps=eps)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("which", ["spatial", "channel+spatial"])
def test_area_weights_broadcast(affine_net, shape, which):
    """Weights of shape (*spatial) (area weights) or (C, *spatial) (a layout's weights) broadcast
    against (B, C, *spatial); for vector data (B, C) the (C,) weights, for (B,) a 0-d weight."""
    wshape = shape[2:] if which == "spatial" else shape[1:]
    if not wshape:
        wshape = shape[1:2]
    g = torch.Generator().manual_seed(4)
    w = 0.1 + torch.rand(wshape, generator=g, dtype=F64)  # e.g. cos(latitude) area weights
    D = dk.Denoiser(affine_net(), dk.cosine(), "v")
    x0, eps, t = _inputs(shape, seed=5)
    for weighting in ("simple", "native"):
        got = dk.diffusion_loss(D, x0, weighting=weighting, weight=w, t=t, eps=eps).double()
        assert got.shape == (shape[0],)
        want = by_hand(x0, eps, t, "v", weighting, weight=w)
        torch.testing.assert_close(got, want, rtol=2e-5, atol=1e-7)
        unweighted = by_hand(x0, eps, t, "v", weighting)
        if w.numel() > 1:  # a non-constant weight changes the loss
            assert not torch.allclose(got, unweighted, rtol=1e-3)
        else:
            torch.testing.assert_close(got, unweighted, rtol=2e-5, atol=1e-7)


def test_label_dropout(affine_net):
    layout = dk.Layout(channels=("u",), num_classes=4)
    net = affine_net(d=0.5)
    D = dk.Denoiser(net, dk.cosine(), "eps", layout=layout)
    B = 2000
    x0 = torch.randn(B, 1, dtype=F64)
    labels = torch.arange(B) % 4
    cond = dk.Cond(labels=labels)
    t = torch.full((B,), 0.5, dtype=F64)
    eps = torch.randn(B, 1, dtype=F64)
    l1 = dk.diffusion_loss(D, x0, cond=cond, p_uncond=1.0, t=t, eps=eps)
    assert bool((net.seen["labels"] == 4).all()), "p_uncond=1: the net must only see the null label"
    l_null = dk.diffusion_loss(D, x0, cond=dk.Cond(labels=torch.full((B,), 4)), t=t, eps=eps)
    torch.testing.assert_close(l1, l_null)
    l0 = dk.diffusion_loss(D, x0, cond=cond, p_uncond=0.0, t=t, eps=eps)
    assert torch.equal(net.seen["labels"], labels)
    assert not torch.allclose(l0, l1)
    dk.diffusion_loss(D, x0, cond=cond, p_uncond=0.3, t=t, eps=eps, generator=torch.Generator().manual_seed(0))
    seen = net.seen["labels"]
    dropped = seen == 4
    frac = float(dropped.double().mean())
    assert abs(frac - 0.3) < 5 * math.sqrt(0.3 * 0.7 / B)
    assert torch.equal(seen[~dropped], labels[~dropped])


@pytest.mark.parametrize("bad", [float("nan"), float("inf")])
def test_non_finite_data_raises(affine_net, shape, bad):
    D = dk.Denoiser(affine_net(), dk.cosine(), "eps")
    x0 = torch.randn(shape)
    x0.view(-1)[-1] = bad
    with pytest.raises(NonFiniteError, match="x0"):
        dk.diffusion_loss(D, x0)
    # check=False skips the scan (the loss then carries the non-finite value)
    assert not bool(torch.isfinite(dk.diffusion_loss(D, x0, check=False)).all())


def test_unknown_weighting_raises(affine_net):
    D = dk.Denoiser(affine_net(), dk.cosine(), "eps")
    with pytest.raises(ValueError, match="simple, vdm, min_snr, edm, native"):
        dk.diffusion_loss(D, torch.randn(3, 2), weighting="elbo")


def test_training_time_sampling():
    g = torch.Generator().manual_seed(0)
    sch = dk.linear(T=100)
    t = sample_times(sch, 5000, generator=g)
    n = t * 100
    assert bool(((n - n.round()).abs() < 1e-9).all())
    assert int(n.round().min()) == 1 and int(n.round().max()) == 100
    tc = sample_times(sch, 5000, continuous=True, generator=g)
    assert bool(((tc > 0) & (tc <= 1)).all()) and not bool((tc * 100 == (tc * 100).round()).all())
    assert abs(float(tc.mean()) - 0.5) < 5 * math.sqrt(1 / 12 / 5000)
    tcos = sample_times(dk.cosine(), 100, generator=g)
    assert bool(((tcos > 0) & (tcos <= 1)).all())


@pytest.mark.parametrize("weighting", WEIGHTINGS)
def test_scalar_time_tensor_equals_per_sample_time(affine_net, weighting):
    D = dk.Denoiser(affine_net(), dk.cosine(), "x0")
    x0, eps, _ = _inputs((4, 2, 3), seed=9)
    a = dk.diffusion_loss(D, x0, weighting=weighting, t=torch.tensor(0.4, dtype=F64), eps=eps)
    b = dk.diffusion_loss(D, x0, weighting=weighting, t=torch.full((4,), 0.4, dtype=F64), eps=eps)
    assert a.shape == (4,)
    torch.testing.assert_close(a, b)


def test_random_draws_are_reproducible(affine_net):
    D = dk.Denoiser(affine_net(), dk.linear(), "eps")
    x0 = torch.randn(16, 2, 3)
    a = dk.diffusion_loss(D, x0, generator=torch.Generator().manual_seed(7))
    b = dk.diffusion_loss(D, x0, generator=torch.Generator().manual_seed(7))
    c = dk.diffusion_loss(D, x0, generator=torch.Generator().manual_seed(8))
    assert torch.equal(a, b) and not torch.equal(a, c)


class _ExactGaussianNet(torch.nn.Module):
    """Bayes-optimal network for x0 ~ N(0, sd^2): its output is E[target | x_t] in its space."""

    def __init__(self, p, sd):
        super().__init__()
        self.p, self.sd = p, sd

    def forward(self, x, c_noise, scalars=None, labels=None):
        ab = torch.sigmoid(c_noise.double())[:, None]
        a, s = ab.sqrt(), (1 - ab).sqrt()
        x = x.double()
        x0 = a * self.sd**2 / (ab * self.sd**2 + s**2) * x
        eps = (x - a * x0) / s
        return {"eps": eps, "x0": x0, "v": a * eps - s * x0}[self.p]


@pytest.mark.parametrize("p", ["eps", "x0", "v"])
def test_loss_of_bayes_optimal_net_is_posterior_variance(p):
    """E[loss] for the optimal predictor is the posterior variance in its space:
    Var[eps|x_t] = a^2 sd^2/(a^2 sd^2 + s^2); the x0 and v variances follow by the error factors."""
    sd, N = 0.6, 40000
    D = dk.Denoiser(_ExactGaussianNet(p, sd), dk.cosine(), p)
    g = torch.Generator().manual_seed(11)
    x0 = sd * torch.randn(N, 2, generator=g, dtype=F64)
    for tv in (0.3, 0.7):
        t = torch.full((N,), tv, dtype=F64)
        ab = float(cos_ab(torch.tensor(tv, dtype=F64)))
        var_eps = ab * sd**2 / (ab * sd**2 + 1 - ab)
        for weighting, want in (("simple", var_eps),
                                ("native", var_eps * {"eps": 1.0, "x0": (1 - ab) / ab, "v": 1 / ab}[p])):
            l = dk.diffusion_loss(D, x0, weighting=weighting, t=t, generator=g).double()
            se = float(l.std()) / math.sqrt(N)
            assert abs(float(l.mean()) - want) < 5 * se, (weighting, float(l.mean()), want, se)


def test_python_float_time_equals_tensor_time(affine_net):
    D = dk.Denoiser(affine_net(), dk.cosine(), "v")
    x0, eps, _ = _inputs((3, 2, 5), seed=4)
    a = dk.diffusion_loss(D, x0, t=0.4, eps=eps)
    b = dk.diffusion_loss(D, x0, t=torch.full((3,), 0.4, dtype=torch.float64), eps=eps)
    torch.testing.assert_close(a, b)


def test_float64_data_keeps_float64_loss(affine_net):
    D = dk.Denoiser(affine_net(), dk.cosine(), "eps")
    x0, eps, t = _inputs((3, 2, 5), seed=5)
    assert dk.diffusion_loss(D, x0.double(), t=t, eps=eps.double()).dtype == torch.float64


def test_guidance_and_label_dropout_need_a_layout_with_classes(affine_net):
    D = dk.Denoiser(affine_net(), dk.cosine(), "eps")  # no layout
    x = torch.randn(2, 3)
    cond = dk.Cond(labels=torch.tensor([0, 1]))
    with pytest.raises(ValueError, match="num_classes"):
        D(x, 0.5, cond, guidance=2.0)
    with pytest.raises(ValueError, match="num_classes"):
        dk.diffusion_loss(D, x, cond=cond, p_uncond=0.5)
