"""Where training puts its noise levels: the noise distributions (uniform_t, lognormal,
logsnr_uniform) against their closed forms, the edm weighting and the importance-weighted vdm
weighting against the continuous-time ELBO, EDM preconditioning = v-prediction, the share of the
loss weight at small noise levels (the numbers in docs/training.md), and the surrogate defaults
resolved by the trainer.

References are written out here (Nichol's cosine formula, the normal CDF through math.erf), so
they do not go through diffkit's own conversions.
"""
from __future__ import annotations

import dataclasses
import math

import pytest
import torch
from torch import nn

import diffkit as dk
from diffkit.config import (Config, LossConfig, apply_overrides, config_from_dict, describe, is_surrogate,
                            load_config, resolve_loss_defaults)
from diffkit.errors import ConfigError
from diffkit.losses import (LOGSNR_MAX, NOISES, WEIGHTINGS, NoiseDistribution, eps_weight, noise_distribution,
                            sample_times)

F64 = torch.float64
S_COS = 0.008
LOGSNR_MIN_COS = -15.0


def cos_logsnr(t: torch.Tensor) -> torch.Tensor:
    """Nichol's cosine schedule, clipped at log-SNR -15, written out."""
    f = lambda u: torch.cos((u + S_COS) / (1 + S_COS) * math.pi / 2) ** 2
    ab = (f(t) / f(torch.zeros_like(t))).clamp_min(1.0 / (1.0 + math.exp(15.0)))
    return torch.log(ab / (1 - ab))


def linear_logsnr_T(T: int = 1000) -> float:
    """Log-SNR at n = T of DDPM's linear schedule (beta from 1e-4 to 0.02)."""
    la = float(torch.log1p(-torch.linspace(1e-4, 0.02, T, dtype=F64)).sum())
    return la - math.log(-math.expm1(la))


def Phi(x: float) -> float:
    return 0.5 * (1.0 + math.erf(x / math.sqrt(2.0)))


def ecdf_distance(samples: torch.Tensor, cdf) -> float:
    """sup |F_n - F| (Kolmogorov-Smirnov statistic) of ``samples`` against the CDF ``cdf``."""
    x, _ = samples.double().sort()
    n = len(x)
    F = torch.tensor([cdf(float(v)) for v in x[:: max(1, n // 4000)]], dtype=F64)
    i = torch.arange(0, n, max(1, n // 4000), dtype=F64)
    return float(torch.maximum((i + 1) / n - F, F - i / n).abs().max())


def dkw(n: int, alpha: float = 1e-6) -> float:
    """Dvoretzky-Kiefer-Wolfowitz bound: sup |F_n - F| exceeds it with probability < alpha."""
    return math.sqrt(math.log(2 / alpha) / (2 * n))


SCHEDULES = {
    "cosine": (lambda: dk.cosine(), LOGSNR_MIN_COS),
    "linear1000": (lambda: dk.linear(T=1000), linear_logsnr_T(1000)),
    "cosine_T50": (lambda: dk.cosine(T=50), LOGSNR_MIN_COS),
}


@pytest.fixture(autouse=True)
def _isolate():
    """In-process trainers seed the global RNGs: undo it."""
    from diffkit.checkpoint import capture_rng_state, restore_rng_state

    state = capture_rng_state(cuda=False)
    yield
    restore_rng_state(state)


# -- the distributions ---------------------------------------------------------------------------
@pytest.mark.parametrize("sched", list(SCHEDULES))
@pytest.mark.parametrize("p_mean, p_std", [(-1.2, 1.2), (-2.5, 0.7)])
def test_lognormal_log_sigma_is_the_truncated_normal(sched, p_mean, p_std):
    make, lam1 = SCHEDULES[sched]
    schedule = make()
    N = 20000
    t = sample_times(schedule, N, noise=NoiseDistribution("lognormal", p_mean, p_std),
                     generator=torch.Generator().manual_seed(1))
    assert t.dtype == F64 and t.shape == (N,) and bool(((t > 0) & (t <= 1)).all())
    log_sig = -0.5 * schedule.logsnr(t)  # log sigma~ of the drawn times
    # truncated to the schedule's range [logSNR(1), LOGSNR_MAX]: sigma~ in [e^-15, e^(-lam1/2)]
    a, b = (-LOGSNR_MAX / 2 - p_mean) / p_std, (-lam1 / 2 - p_mean) / p_std
    assert bool((log_sig <= -lam1 / 2 + 1e-9).all()) and bool((log_sig >= -LOGSNR_MAX / 2 - 1e-9).all())
    Z = Phi(b) - Phi(a)
    cdf = lambda v: min(1.0, max(0.0, (Phi((v - p_mean) / p_std) - Phi(a)) / Z))
    assert ecdf_distance(log_sig, cdf) < dkw(N)
    assert abs(float(log_sig.mean()) - p_mean) < 5 * p_std / math.sqrt(N)
    assert abs(float(log_sig.std()) / p_std - 1) < 5 / math.sqrt(2 * N)
    # a wrong spread would be caught: the same draws against N(p_mean, (1.15 p_std)^2)
    wrong = lambda v: Phi((v - p_mean) / (1.15 * p_std))
    assert ecdf_distance(log_sig, wrong) > dkw(N)


@pytest.mark.parametrize("sched", list(SCHEDULES))
def test_logsnr_uniform_is_uniform_on_its_range(sched):
    make, lam1 = SCHEDULES[sched]
    schedule = make()
    N = 20000
    nd = NoiseDistribution("logsnr_uniform", sigma_min=0.01, sigma_max=20.0)
    lam = schedule.logsnr(sample_times(schedule, N, noise=nd, generator=torch.Generator().manual_seed(2)))
    lo, hi = -2 * math.log(20.0), -2 * math.log(0.01)
    assert nd.logsnr_range(schedule) == pytest.approx((lo, hi), abs=1e-12)
    assert float(lam.min()) >= lo - 1e-8 and float(lam.max()) <= hi + 1e-8
    assert float(lam.min()) < lo + 0.01 and float(lam.max()) > hi - 0.01  # the whole range is used
    assert ecdf_distance(lam, lambda v: min(1.0, max(0.0, (v - lo) / (hi - lo)))) < dkw(N)


def test_logsnr_uniform_range_is_cut_to_the_schedule():
    """sigma_max above sigma~(t = 1) is cut to the schedule's largest noise level; a range wholly
    outside the schedule is an error naming it."""
    lin = dk.linear(T=1000)
    lam1 = linear_logsnr_T(1000)  # sigma~(1) = e^(-lam1/2) ~ 157
    nd = NoiseDistribution("logsnr_uniform", sigma_min=0.1, sigma_max=1000.0)
    lo, hi = nd.logsnr_range(lin)
    assert lo == pytest.approx(lam1, abs=1e-9) and hi == pytest.approx(-2 * math.log(0.1))
    lam = lin.logsnr(nd.sample(lin, 5000, generator=torch.Generator().manual_seed(3)))
    assert float(lam.min()) >= lam1 - 1e-6
    assert ecdf_distance(lam, lambda v: min(1.0, max(0.0, (v - lo) / (hi - lo)))) < dkw(5000)
    with pytest.raises(ValueError, match=r"\[sigma_min, sigma_max\] = \[200, 1000\] lies outside the schedule"):
        NoiseDistribution("logsnr_uniform", sigma_min=200.0, sigma_max=1000.0).sample(lin, 4)


def test_discrete_schedules_keep_grid_times_for_uniform_t_and_continuous_times_otherwise():
    """uniform_t on a discrete schedule draws n/T; lognormal and logsnr_uniform draw continuous t
    (the network is conditioned on the log-SNR; between grid points it is that of the interpolated
    log alpha_bar), with exactly the distribution asked for (tested above on linear1000, cosine_T50)."""
    sch = dk.linear(T=100)
    g = torch.Generator().manual_seed(4)
    n = sample_times(sch, 4000, generator=g, noise="uniform_t") * 100
    assert bool(((n - n.round()).abs() < 1e-9).all())
    for kind in ("lognormal", "logsnr_uniform"):
        t = sample_times(sch, 4000, generator=g, noise=kind)
        off_grid = ((t * 100 - (t * 100).round()).abs() > 1e-6).double().mean()
        assert float(off_grid) > 0.9 and bool(((t > 0) & (t <= 1)).all())


@pytest.mark.parametrize("kind", NOISES)
def test_one_uniform_draw_per_sample_and_reproducible(kind):
    """Exact resume relies on the generator advancing by a fixed amount per draw: every distribution
    consumes exactly one float64 uniform per sample (on a continuous schedule)."""
    sch = dk.cosine()
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    a = sample_times(sch, 64, generator=g1, noise=kind)
    assert torch.equal(a, sample_times(sch, 64, generator=g2, noise=kind))
    ref = torch.Generator().manual_seed(5)
    torch.rand(64, generator=ref, dtype=F64)
    assert torch.equal(g1.get_state(), ref.get_state())
    assert not torch.equal(a, sample_times(sch, 64, generator=g1, noise=kind))


@pytest.mark.parametrize("kwargs, pattern", [
    (dict(kind="log_normal"), r"unknown noise distribution 'log_normal'; choose one of uniform_t, lognormal"),
    (dict(kind="lognormal", p_std=0.0), r"0 < p_std"),
    (dict(kind="lognormal", p_mean=math.inf), r"finite p_mean"),
    (dict(kind="logsnr_uniform", sigma_min=1.0, sigma_max=0.5), r"0 < sigma_min < sigma_max"),
    (dict(kind="logsnr_uniform", sigma_min=0.0), r"0 < sigma_min"),
])
def test_bad_distribution_parameters(kwargs, pattern):
    with pytest.raises(ValueError, match=pattern):
        NoiseDistribution(**kwargs)


# -- weightings ----------------------------------------------------------------------------------
@pytest.mark.parametrize("sigma_data", [1.0, 0.5])
def test_edm_weight_is_karras_lambda_on_the_x0_error(sigma_data):
    """lambda(sigma) |D - x0|^2 with lambda = (sigma^2 + sd^2)/(sigma sd)^2 and |D - x0|^2 =
    sigma~^2 |eps - eps_hat|^2 is (1 + sigma~^2/sd^2) on the eps-MSE."""
    t = torch.linspace(0.01, 0.99, 41, dtype=F64)
    sig2 = torch.exp(-cos_logsnr(t))  # sigma~^2
    lam = (sig2 + sigma_data**2) / (sig2 * sigma_data**2)
    got = eps_weight("edm", dk.cosine(), t, "v", sigma_data=sigma_data)
    torch.testing.assert_close(got, lam * sig2, rtol=1e-10, atol=0)


@pytest.mark.parametrize("noise", [NoiseDistribution("lognormal", -1.2, 1.2), NoiseDistribution("lognormal", -2.0, 0.8),
                                   NoiseDistribution("logsnr_uniform", sigma_min=0.01, sigma_max=80.0)],
                         ids=["lognormal", "lognormal_narrow", "logsnr_uniform"])
def test_vdm_weight_is_half_over_the_logsnr_density(noise):
    """Importance weight 1/(2 p(logSNR)), p written out (the log-normal's density in log-SNR carries
    the Jacobian 1/2 of log sigma~ = -logSNR/2)."""
    sch = dk.cosine()
    lo, hi = noise.logsnr_range(sch)
    # (up to logSNR 20: near t = 0 the round trip logSNR -> t -> logSNR loses digits in float64)
    lam = torch.linspace(lo + 0.01, min(hi - 0.01, 20.0), 200, dtype=F64)
    if noise.kind == "logsnr_uniform":
        p = torch.full_like(lam, 1 / (hi - lo))
    else:
        m, s = noise.p_mean, noise.p_std
        Z = Phi((-lo / 2 - m) / s) - Phi((-hi / 2 - m) / s)
        z = (-lam / 2 - m) / s
        p = 0.5 * torch.exp(-z**2 / 2) / (math.sqrt(2 * math.pi) * s * Z)
    t = sch.t_from_logsnr(lam)
    torch.testing.assert_close(eps_weight("vdm", sch, t, "v", noise=noise) * p, torch.full_like(p, 0.5),
                               rtol=1e-6, atol=0)


@pytest.mark.parametrize("noise", ["uniform_t", NoiseDistribution("lognormal", -1.2, 1.2),
                                   NoiseDistribution("lognormal", -0.5, 1.0),
                                   NoiseDistribution("logsnr_uniform", sigma_min=0.1, sigma_max=10.0)],
                         ids=["uniform_t", "lognormal", "lognormal_narrow", "logsnr_uniform"])
def test_vdm_estimates_the_continuous_time_elbo_under_any_noise_distribution(noise):
    """E[w(t) m(t)] = 1/2 int m dlogSNR over the drawn range, for an eps-MSE m(logSNR) =
    exp(-logSNR^2/4): sqrt(pi) over the whole line, sqrt(pi) erf(ln 10) on [0.1, 10]."""
    sch = dk.cosine()
    N = 100000
    nd = NoiseDistribution.of(noise)
    t = sample_times(sch, N, noise=nd, generator=torch.Generator().manual_seed(7))
    lam = cos_logsnr(t)
    m = torch.exp(-lam**2 / 4)
    est = eps_weight("vdm", sch, t, "eps", noise=nd) * m
    want = math.sqrt(math.pi)
    if nd.kind == "logsnr_uniform":
        want *= math.erf(math.log(10.0))
    se = float(est.std()) / math.sqrt(N)
    assert abs(float(est.mean()) - want) < 5 * se, (float(est.mean()), want, se)
    assert se < 0.02 * want  # a test that can tell
    if nd.kind != "uniform_t":  # the uniform-t weight under this distribution would be biased
        naive = -0.5 * sch.dlogsnr_dt(t) * m
        assert abs(float(naive.mean()) - want) > 10 * se


def _simple_then(weight_fn, shape, noise):
    D = dk.Denoiser(_AffineNet(), dk.cosine(), "x0")
    g = torch.Generator().manual_seed(8)
    t = sample_times(D.schedule, shape[0], noise=noise, generator=g)
    x0 = torch.randn(shape, generator=g, dtype=F64)
    eps = torch.randn(shape, generator=g, dtype=F64)
    simple = dk.diffusion_loss(D, x0, weighting="simple", t=t, eps=eps).double()
    return D, x0, eps, t, simple, weight_fn(cos_logsnr(t))


class _AffineNet(nn.Module):
    def forward(self, x, c_noise, scalars=None, labels=None):
        return 0.3 * x + 0.01 * c_noise.to(x.dtype)[(...,) + (None,) * (x.ndim - 1)]


def test_new_weightings_on_every_rank(shape):
    """edm and importance-weighted vdm are per-sample multiples of the eps-MSE (itself checked by hand
    on every rank in test_losses.py); draws through the generator give one loss per sample."""
    nd = NoiseDistribution("lognormal", -1.2, 1.2)
    m, s = nd.p_mean, nd.p_std
    Z = 1 - Phi((-LOGSNR_MAX / 2 - m) / s) - (1 - Phi((-LOGSNR_MIN_COS / 2 - m) / s))
    dens = lambda lam: 0.5 * torch.exp(-((-lam / 2 - m) / s) ** 2 / 2) / (math.sqrt(2 * math.pi) * s * Z)
    for weighting, wfn in (("edm", lambda lam: 1 + torch.exp(-lam)), ("vdm", lambda lam: 0.5 / dens(lam))):
        D, x0, eps, t, simple, w = _simple_then(wfn, shape, nd)
        got = dk.diffusion_loss(D, x0, weighting=weighting, t=t, eps=eps, noise=nd).double()
        assert got.shape == (shape[0],)
        torch.testing.assert_close(got, simple * w, rtol=1e-6, atol=1e-12)
        drawn = dk.diffusion_loss(D, x0, weighting=weighting, noise=nd, generator=torch.Generator().manual_seed(9))
        assert drawn.shape == (shape[0],) and bool(torch.isfinite(drawn).all())


def test_edm_with_unit_sigma_data_is_the_v_mse(affine_net):
    D = dk.Denoiser(affine_net(), dk.cosine(), "v")
    g = torch.Generator().manual_seed(10)
    x0, eps = torch.randn(6, 3, 5, generator=g, dtype=F64), torch.randn(6, 3, 5, generator=g, dtype=F64)
    t = torch.linspace(0.02, 0.98, 6, dtype=F64)
    edm = dk.diffusion_loss(D, x0, weighting="edm", t=t, eps=eps)
    torch.testing.assert_close(edm, dk.diffusion_loss(D, x0, weighting="native", t=t, eps=eps))
    assert not torch.allclose(edm, dk.diffusion_loss(D, x0, weighting="edm", sigma_data=0.5, t=t, eps=eps))


# -- EDM preconditioning is v-prediction ---------------------------------------------------------
class _RandomNet(nn.Module):
    """A random MLP on (x, log-SNR) for vector data (B, C)."""

    def __init__(self, C=3, hidden=16):
        super().__init__()
        g = torch.Generator().manual_seed(11)
        self.w1 = nn.Parameter(torch.randn(C + 1, hidden, generator=g, dtype=F64) / 2)
        self.w2 = nn.Parameter(torch.randn(hidden, C, generator=g, dtype=F64) / 4)

    def forward(self, x, c_noise, scalars=None, labels=None):
        h = torch.cat([x, c_noise.to(x.dtype)[:, None] / 10], dim=1) @ self.w1
        return torch.tanh(h) @ self.w2


def test_edm_preconditioning_equals_v_prediction():
    """Karras et al. 2022 with sigma_d = 1, in VE variables y = x_t/alpha = x0 + sigma~ eps:
    D(y, sigma~) = c_skip y + c_out F(c_in y, c_noise) with c_skip = 1/(sigma~^2+1) = alpha^2,
    c_out = sigma~/sqrt(sigma~^2+1) = sigma, c_in = 1/sqrt(sigma~^2+1) = alpha, c_noise = ln(sigma~)/4.
    With F(x, c) = -v_net(x, logSNR = -8c), D is the v-parameterised Denoiser's x0-estimate
    alpha x_t - sigma v_hat, and EDM's loss lambda |D - x0|^2 is the v-MSE (= the edm weighting)."""
    net = _RandomNet()
    Dv = dk.Denoiser(net, dk.cosine(), "v")
    g = torch.Generator().manual_seed(12)
    B = 64
    t = torch.linspace(0.005, 0.995, B, dtype=F64)
    x0 = torch.randn(B, 3, generator=g, dtype=F64)
    eps = torch.randn(B, 3, generator=g, dtype=F64)
    lam = cos_logsnr(t)
    alpha, sigma = torch.sigmoid(lam).sqrt()[:, None], torch.sigmoid(-lam).sqrt()[:, None]
    x_t = alpha * x0 + sigma * eps
    sig = torch.exp(-lam / 2)[:, None]  # sigma~
    y = x_t / alpha
    c_skip, c_out, c_in = 1 / (sig**2 + 1), sig / (sig**2 + 1).sqrt(), 1 / (sig**2 + 1).sqrt()
    c_noise = sig.log()[:, 0] / 4
    F = lambda x, c: -net(x, (-8 * c).to(torch.float32))  # the Denoiser hands the net a float32 log-SNR
    D_edm = c_skip * y + c_out * F(c_in * y, c_noise)
    torch.testing.assert_close(c_skip, alpha**2)
    torch.testing.assert_close(c_out, sigma)
    torch.testing.assert_close(c_in, alpha)
    with torch.no_grad():
        torch.testing.assert_close(Dv(x_t, t), D_edm, rtol=1e-9, atol=1e-9)
        edm_loss = ((sig**2 + 1) / sig**2 * (D_edm - x0) ** 2).mean(1)
        for weighting in ("edm", "native"):
            torch.testing.assert_close(dk.diffusion_loss(Dv, x0, weighting=weighting, t=t, eps=eps), edm_loss,
                                       rtol=1e-9, atol=1e-12)


# -- where the loss weight sits: the numbers in docs/training.md ---------------------------------
def _fractions_by_quadrature(noise: str, weighting: str, x: float) -> tuple[float, float]:
    """(share of draws, share of the eps-MSE weight) at sigma~ < x, by quadrature, written out.

    uniform_t + min_snr on the cosine schedule: integrate over t.  lognormal(-1.2, 1.2) + edm: closed
    form, E[(1 + sigma~^2) 1{log sigma~ < c}] = Phi(c') + exp(2m + 2s^2) Phi(c' - 2s), c' = (c - m)/s
    (the truncation at the schedule's ends moves it by < 1e-6)."""
    if noise == "uniform_t":
        n = 400000
        t = (torch.arange(n, dtype=F64) + 0.5) / n
        lam = cos_logsnr(t)
        snr = lam.exp()
        w = {"min_snr": torch.clamp(snr, max=5.0) / snr, "edm": 1 + 1 / snr}[weighting]
        below = (torch.exp(-lam / 2) < x).double()
        return float(below.mean()), float((w * below).sum() / w.sum())
    m, s = -1.2, 1.2
    c = (math.log(x) - m) / s
    assert weighting == "edm"
    return Phi(c), (Phi(c) + math.exp(2 * m + 2 * s**2) * Phi(c - 2 * s)) / (1 + math.exp(2 * m + 2 * s**2))


#: (noise, weighting) -> {sigma~: (share of draws, share of the eps-MSE weight)}, as in docs/training.md
DOC_FRACTIONS = {
    ("uniform_t", "min_snr"): {0.2: (0.119, 0.0101), 0.05: (0.025, 0.00015), 0.01: (0.0023, 6.6e-7)},
    ("lognormal", "edm"): {0.2: (0.366, 0.142), 0.05: (0.067, 0.0257), 0.01: (0.0023, 0.00087)},
}


@pytest.mark.parametrize("noise, weighting", list(DOC_FRACTIONS))
def test_loss_weight_below_small_noise_levels(noise, weighting):
    """The training path (sample_times + eps_weight, 400k draws) against quadrature, and both against
    the numbers quoted in docs/training.md."""
    sch = dk.cosine()
    nd = NoiseDistribution(noise)
    N = 400000
    t = sample_times(sch, N, noise=nd, generator=torch.Generator().manual_seed(13))
    w = eps_weight(weighting, sch, t, "v", noise=nd)
    sig = torch.exp(-cos_logsnr(t) / 2)
    for x, (draws_doc, weight_doc) in DOC_FRACTIONS[(noise, weighting)].items():
        q_draws, q_weight = _fractions_by_quadrature(noise, weighting, x)
        mc_draws = float((sig < x).double().mean())
        mc_weight = float((w * (sig < x)).sum() / w.sum())
        assert abs(mc_draws - q_draws) < 5 * math.sqrt(q_draws * (1 - q_draws) / N)
        assert abs(mc_weight - q_weight) < 0.05 * q_weight + 1e-4
        assert q_draws == pytest.approx(draws_doc, rel=0.02, abs=5e-4)
        assert q_weight == pytest.approx(weight_doc, rel=0.02)


# -- config: the [loss] keys, their errors, auto defaults ----------------------------------------
def test_loss_choices_match_the_engine():
    from typing import Literal, get_args, get_origin

    for key, names in (("loss.weighting", WEIGHTINGS), ("loss.noise", NOISES)):
        arms = get_args(describe()[key].type)
        lit = [a for a in arms if get_origin(a) is Literal]
        assert len(lit) == 1 and get_args(lit[0]) == names and type(None) in arms
        assert describe()[key].default is None
    lc = LossConfig()
    nd = noise_distribution(dataclasses.replace(lc, noise="lognormal"))
    assert nd == NoiseDistribution("lognormal", lc.p_mean, lc.p_std, lc.sigma_min, lc.sigma_max)
    assert NoiseDistribution() == NoiseDistribution("uniform_t", lc.p_mean, lc.p_std, lc.sigma_min, lc.sigma_max)


@pytest.mark.parametrize("key, value, pattern", [
    ("noise", "log_normal", r"'loss\.noise' in f\.toml must be one of 'uniform_t', 'lognormal', 'logsnr_uniform' "
                            r"\(or unset\), got 'log_normal'; did you mean 'lognormal'\?"),
    ("weighting", "EDM", r"'loss\.weighting' in f\.toml must be one of .*'edm'.* \(or unset\).*did you mean 'edm'"),
    ("p_std", 0.0, r"'loss\.p_std' in f\.toml must be > 0 and finite, got 0\.0"),
    ("p_std", -1.0, r"'loss\.p_std' .* must be > 0"),
    ("p_mean", math.nan, r"'loss\.p_mean' in f\.toml must be finite"),
    ("sigma_min", 0.0, r"'loss\.sigma_min' in f\.toml must be > 0 and finite"),
    ("sigma_max", math.inf, r"'loss\.sigma_max' .* must be > 0 and finite"),
    ("sigma_min", 100.0, r"'loss\.sigma_min' in f\.toml must be below 'loss\.sigma_max' \(80\.0\), got 100\.0"),
    ("sigma_data", -1.0, r"'loss\.sigma_data' in f\.toml must be > 0 and finite"),
    ("p_mean", "-1", r"'loss\.p_mean' .* must be float, got '-1' \(str\); remove the quotes"),
])
def test_bad_loss_values_are_one_line_errors(key, value, pattern):
    with pytest.raises(ConfigError, match=pattern) as e:
        config_from_dict({"loss": {key: value}}, source="f.toml")
    assert "\n" not in str(e.value) and e.value.key == f"loss.{key}"


@dataclasses.dataclass(frozen=True)
class _Spec:
    target: str = "residual"


class _LayoutLike:
    """Stands for a Layout with an autoregressive spec (``layout.autoregressive``)."""

    def __init__(self, spec):
        self.autoregressive = spec


def test_auto_defaults_resolve_for_a_surrogate_and_for_a_plain_model():
    cfg = Config()
    assert cfg.loss.weighting is None and cfg.loss.noise is None
    plain = dk.Layout(channels=("u",))
    assert not is_surrogate(cfg, plain)
    r = resolve_loss_defaults(cfg, plain)
    assert (r.loss.weighting, r.loss.noise) == ("min_snr", "uniform_t")
    for target in ("residual", "state"):
        sur = _LayoutLike(_Spec(target))
        assert is_surrogate(cfg, sur)
        r = resolve_loss_defaults(cfg, sur)
        assert (r.loss.weighting, r.loss.noise) == ("edm", "lognormal")
        assert (r.loss.p_mean, r.loss.p_std) == (-1.2, 1.2)
    # a regression baseline is not a diffusion surrogate; keys that are set are kept
    reg = apply_overrides(cfg, ["model.objective=regression"])
    assert resolve_loss_defaults(reg, _LayoutLike(_Spec())).loss.noise == "uniform_t"
    mine = apply_overrides(cfg, ["loss.weighting=vdm", "loss.noise=logsnr_uniform"])
    assert resolve_loss_defaults(mine, _LayoutLike(_Spec())) == mine
    half = apply_overrides(cfg, ["loss.weighting=simple"])
    assert resolve_loss_defaults(half, _LayoutLike(_Spec())).loss == dataclasses.replace(
        half.loss, noise="lognormal")


def _surrogate_layout():
    """A vector layout with an autoregressive spec (diffkit.layout.AutoregressiveSpec once it exists)."""
    try:
        from diffkit.layout import AutoregressiveSpec
    except ImportError:  # pragma: no cover - before the typed spec lands
        AutoregressiveSpec = None
    if AutoregressiveSpec is not None and "autoregressive" in {f.name for f in dataclasses.fields(dk.Layout)}:
        spec = AutoregressiveSpec(variables=("u", "v"), target="residual", state_mean=(0.0, 0.0),
                                  state_std=(1.0, 1.0))
        return dk.Layout(channels=("u", "v"), cond_channels=("u@t", "v@t"), autoregressive=spec)
    lay = dk.Layout(channels=("u", "v"), cond_channels=("u@t", "v@t"))
    object.__setattr__(lay, "autoregressive", _Spec("residual"))
    return lay


class _PairAdapter:
    """x | c ~ N(0.9 c, 0.03^2) on 2 channels: a tiny surrogate-like data set."""

    name = "mixture"  # (only stored in the checkpoint)

    def __init__(self, layout, n=256):
        g = torch.Generator().manual_seed(14)
        self.layout = layout
        c = torch.randn(n, 2, generator=g)
        self.items = [{"x": 0.9 * ci + 0.03 * torch.randn(2, generator=g), "fields": ci} for ci in c]

    def dataset(self, split):
        return self.items if split == "train" else self.items[:64]


def _trainer(tmp_path, layout, *sets, name="run"):
    from diffkit.train import Trainer

    cfg = apply_overrides(Config(), ["model.options={hidden=16,depth=1}", "data.batch_size=32",
                                     "trainer.val_every=4", "trainer.val_batches=1", "trainer.log_every=1",
                                     "trainer.deterministic=true", f'run_dir="{tmp_path / name}"', *sets])
    return Trainer(cfg, device="cpu", progress=False, adapter=_PairAdapter(layout))


def test_trainer_stores_the_resolved_loss_config_and_draws_from_it(tmp_path):
    tr = _trainer(tmp_path, _surrogate_layout(), "trainer.steps=4", "trainer.ckpt_every=2")
    assert (tr.cfg.loss.weighting, tr.cfg.loss.noise) == ("edm", "lognormal")
    # _noise draws the global batch from the configured distribution (one generator, all ranks)
    g = torch.Generator().manual_seed(0)
    g.set_state(tr.noise_gen.get_state())
    t, _ = tr._noise(torch.zeros(32, 2))
    torch.testing.assert_close(t, sample_times(tr.model.schedule, 32, generator=g, noise="lognormal"))
    tr.fit()
    saved = load_config(tmp_path / "run" / "config.toml")
    assert (saved.loss.weighting, saved.loss.noise) == ("edm", "lognormal") and saved == tr.cfg
    from diffkit.checkpoint import CheckpointManager

    _, ck = CheckpointManager(tmp_path / "run" / "checkpoints").latest_valid(require=("config",))
    assert ck["config"]["loss"]["weighting"] == "edm" and ck["config"]["loss"]["noise"] == "lognormal"
    plain = _trainer(tmp_path, dk.Layout(channels=("u", "v"), cond_channels=("u@t", "v@t")), name="plain")
    assert (plain.cfg.loss.weighting, plain.cfg.loss.noise) == ("min_snr", "uniform_t")


def test_resume_with_lognormal_noise_is_bitwise_exact(tmp_path):
    """12 steps in one go equal 5 steps, a checkpoint, and 7 more in a fresh trainer (noise drawn
    from the log-normal with the importance-weighted vdm weighting; validation every 4 steps)."""
    from diffkit.train import Trainer

    sets = ["trainer.steps=12", "trainer.ckpt_every=5", "loss.noise=lognormal", "loss.weighting=vdm"]
    full = _trainer(tmp_path, _surrogate_layout(), *sets, name="full")
    full.fit()
    ckpt = tmp_path / "full" / "checkpoints" / "ckpt-000000005.pt"
    assert ckpt.exists()
    cfg = dataclasses.replace(full.cfg, run_dir=str(tmp_path / "resumed"))
    resumed = Trainer(cfg, device="cpu", progress=False, adapter=_PairAdapter(_surrogate_layout()), resume=str(ckpt))
    assert resumed.step == 5
    resumed.fit()
    assert resumed.step == 12
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k
    assert torch.equal(full.noise_gen.get_state(), resumed.noise_gen.get_state())


def test_resume_keeps_the_stored_loss_for_unset_keys(tmp_path, capsys):
    """A surrogate run trained with min_snr + uniform_t (explicit, or a checkpoint written before
    loss.noise existed) keeps them when resumed from a config that leaves the keys unset, instead of
    switching to today's surrogate default (edm + lognormal) half-way; a key set explicitly wins."""
    from diffkit.checkpoint import CheckpointManager, save_checkpoint
    from diffkit.train import Trainer

    first = _trainer(tmp_path, _surrogate_layout(), "trainer.steps=2", "loss.weighting=min_snr",
                     "loss.noise=uniform_t", name="old")
    first.fit()
    path, ck = CheckpointManager(tmp_path / "old" / "checkpoints").latest_valid(require=("config",))
    unset = dataclasses.replace(first.cfg, loss=dataclasses.replace(first.cfg.loss, weighting=None, noise=None))
    again = Trainer(unset, device="cpu", progress=False, adapter=_PairAdapter(_surrogate_layout()), resume=str(path))
    assert (again.cfg.loss.weighting, again.cfg.loss.noise) == ("min_snr", "uniform_t")
    assert "keeping the stored loss settings" in capsys.readouterr().out
    # a checkpoint from before loss.noise existed: its runs drew t uniformly
    del ck["config"]["loss"]["noise"]
    old_path = tmp_path / "older.pt"
    save_checkpoint(old_path, {k: v for k, v in ck.items() if k not in ("format", "format_version", "diffkit_version")})
    older = Trainer(unset, device="cpu", progress=False, adapter=_PairAdapter(_surrogate_layout()), resume=str(old_path))
    assert older.cfg.loss.noise == "uniform_t"
    # explicit keys in the resuming config win over the stored ones
    mixed = dataclasses.replace(unset, loss=dataclasses.replace(unset.loss, weighting="edm"))
    explicit = Trainer(mixed, device="cpu", progress=False, adapter=_PairAdapter(_surrogate_layout()), resume=str(path))
    assert (explicit.cfg.loss.weighting, explicit.cfg.loss.noise) == ("edm", "uniform_t")
