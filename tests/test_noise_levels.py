"""Small noise levels at sampling time: every sampler must reproduce the spread of data that is
much narrower than the data's scale (conditional spreads of 0.01-0.3 are common in surrogates).

Exact denoiser of Gaussian data ``N(mu, s^2 I)`` (:class:`diffkit.GaussianDenoiser`), float64,
4000 samples of dimension 64 from fixed generators: the standard error of the pooled std is
``s / sqrt(2 * 256000)``, 0.14 % of ``s``, so the tolerances below (3 %, 6 %, 10 %) sit 20 or
more standard errors away from the statistical noise -- a failure is a sampler bias, never bad
luck.  The mean must come back within 5 standard errors (``s / sqrt(4000)`` per coordinate).
"""
from __future__ import annotations

import math

import pytest
import torch

import diffkit as dk
from diffkit import samplers as S

F64 = torch.float64
N, D = 4000, 64
STDS = (1.0, 0.1, 0.03, 0.01)
SCHEDULES = {"cosine": dk.cosine, "linear": lambda: dk.linear(1000), "sigmoid": dk.sigmoid}
# the NFE from which each sampler, on its default grid, reproduces the std within 10 %
# (named in its docstring); first-order samplers need more calls
HOLDS_AT = [("dpmpp_2m", {}, 20), ("dpmpp_3m", {}, 20), ("ddim", {}, 50), ("euler", {}, 50), ("heun", {}, 35),
            ("ddpm", {}, 100), (S.dpmpp_2s, {}, 21), (S.dpmpp_2s, {"churn": 2.5, "churn_noise": 1.05}, 21),
            ("euler", {"churn": 2.5}, 50), ("heun", {"churn": 2.5}, 51), ("ddim", {"eta": 1.0}, 100),
            ("unipc", {}, 10), ("unipc", {}, 20), ("unipc", {"order": 3}, 20)]


def _mean(std: float) -> torch.Tensor:
    """A non-zero, non-constant mean: 0.5 +- min(3 std, 0.5), so of order 1 as in standardised
    data (the prior N(0, I) at sigma~ = 80 misses the marginal's mean by 0.0125 mu, which the
    flow carries to the data as a bias of 0.0125 mu when the std is ~1: < 0.8 standard errors here)."""
    return 0.5 + min(3 * std, 0.5) * torch.linspace(-1, 1, D, dtype=F64)


def _draw(schedule, std, seed=0, **kw):
    mu = _mean(std)
    den = dk.GaussianDenoiser(schedule, mu, std)
    x = dk.sample(den, (N, D), generator=torch.Generator().manual_seed(seed), dtype=F64, **kw)
    return x, mu, den


def _check(x, mu, std, tol, what):
    ratio = float((x - x.mean(0)).pow(2).sum() / (x.numel() - x.shape[1])) ** 0.5 / std
    assert abs(ratio - 1) <= tol, f"{what}: std ratio {ratio:.4f} not within {tol:.0%} of 1"
    z = (x.mean(0) - mu) / (std / math.sqrt(x.shape[0]))
    assert float(z.abs().max()) < 5, f"{what}: mean off by {float(z.abs().max()):.1f} standard errors"
    return ratio


@pytest.mark.parametrize("which", list(SCHEDULES))
@pytest.mark.parametrize("std", STDS)
def test_default_sampler_reproduces_the_std(which, std):
    """``dk.sample(D, shape)`` with no options: within 3 % at its default NFE, 6 % at NFE 10."""
    sch = SCHEDULES[which]()
    x, mu, den = _draw(sch, std)
    assert den.nfe == S.DEFAULT_NFE
    _check(x, mu, std, 0.03, f"default sampler, {which}, std {std}")
    x, mu, den = _draw(sch, std, seed=1, nfe=10)
    assert den.nfe == 10
    _check(x, mu, std, 0.06, f"default sampler at NFE 10, {which}, std {std}")


@pytest.mark.parametrize("sampler, opts, nfe", HOLDS_AT,
                         ids=[f"{getattr(s, '__name__', s)}-{'-'.join(f'{k}{v}' for k, v in o.items()) or 'plain'}-{n}"
                              for s, o, n in HOLDS_AT])
@pytest.mark.slow
def test_every_sampler_reproduces_the_std_where_documented(sampler, opts, nfe):
    fn = dk.registry.resolve("sampler", sampler)
    assert f"NFE {nfe}" in fn.__doc__  # the docstring names the NFE where it holds
    for which in ("cosine", "linear"):
        sch = SCHEDULES[which]()
        for std in STDS:
            x, mu, den = _draw(sch, std, sampler=sampler, nfe=nfe, **opts)
            assert den.nfe == nfe
            _check(x, mu, std, 0.10, f"{fn.__name__} {opts} NFE {nfe}, {which}, std {std}")


def test_old_default_grid_collapses_small_spreads():
    """The failure this file guards against: on a grid uniform in t the last call is at
    sigma~ ~ 0.2, and a 0.01 spread comes back as ~0.1 of itself."""
    x, mu, _ = _draw(dk.cosine(), 0.01, spacing="uniform")
    ratio = float(x.std(0).mean()) / 0.01
    assert ratio < 0.2


def test_discrete_schedules_reach_below_their_first_training_step():
    """No clamp of sigma_min to t = 1/T: the default grid of the linear T = 1000 schedule
    ends at sigma~ = SIGMA_MIN, below sigma~(1/T) ~ 0.01."""
    sch = dk.linear(1000)
    for spacing in ("logsnr", "karras"):
        ts = S.timesteps(sch, 12, spacing)
        a, s = sch.coeffs(ts[-2])
        assert float(s / a) == pytest.approx(S.SIGMA_MIN, rel=1e-9)
        a1, s1 = sch.coeffs(torch.tensor(1 / 1000, dtype=F64))
        assert float(s / a) < float(s1 / a1) / 5
    with pytest.raises(ValueError, match="sigma_min"):
        S.timesteps(sch, 5, "logsnr", sigma_min=0.0)


def test_every_builtin_sampler_defaults_to_a_noise_level_grid():
    for name, fn in S.BUILTIN_SAMPLERS.items():
        assert fn.info.default_spacing == "logsnr", name
    assert S.dpmpp_2s.info.default_spacing == "logsnr"
    from diffkit.config import SampleConfig

    sc = SampleConfig()
    assert (sc.sampler, sc.nfe) == (S.DEFAULT_SAMPLER, S.DEFAULT_NFE)
    assert sc.spacing is None  # None = the sampler's default, so old checkpoints follow the new default


@pytest.mark.parametrize("nfe", [3, 5, 7, 9, 11])
def test_heun_warns_below_its_stable_nfe(nfe):
    den = dk.GaussianMixtureDenoiser(dk.cosine(), torch.tensor([[-1.0] * 4, [1.0] * 4], dtype=F64), [0.05, 0.05])
    with pytest.warns(UserWarning, match=rf"heun with NFE {nfe} is unstable.*NFE >= {S.HEUN_MIN_NFE}"):
        x = dk.sample(den, (2000, 4), sampler="heun", nfe=nfe, generator=torch.Generator().manual_seed(0), dtype=F64)
    # the warning is deserved: samples are far too spread (data: |x| <= ~1.2)
    assert float(x.abs().max()) > 2.0 or float((x.abs() - 1).std()) > 2 * 0.05


@pytest.mark.parametrize("nfe", [1, 2, S.HEUN_MIN_NFE, S.HEUN_MIN_NFE + 1, 21])
def test_heun_does_not_warn_where_stable(nfe, recwarn):
    den = dk.GaussianMixtureDenoiser(dk.cosine(), torch.tensor([[-1.0] * 4, [1.0] * 4], dtype=F64), [0.05, 0.05])
    x = dk.sample(den, (2000, 4), sampler="heun", nfe=nfe, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert not [w for w in recwarn if "heun" in str(w.message)]
    if nfe >= S.HEUN_MIN_NFE:
        assert float(x.abs().max()) < 2.0


def test_heun_warns_when_called_directly():
    den = dk.GaussianDenoiser(dk.cosine(), torch.zeros(3, dtype=F64), 0.5)
    ts = S.timesteps(den.schedule, 3, "logsnr")  # 3 steps ending in 0: 5 calls
    with pytest.warns(UserWarning, match="heun with NFE 5"):
        S.heun(den, torch.randn(4, 3, dtype=F64), ts)


def test_refiner_schedule_is_sampled_on_its_own_levels(counting):
    """PDE-Refiner's recipe (ddpm, nfe = T) must keep visiting exactly the refiner's levels
    t = n/T although the samplers' default grid is now logsnr: the schedule's sample_spacing."""
    sch = dk.get_schedule({"name": "refiner", "steps": 3, "sigma_min": 4e-7})
    assert sch.sample_spacing == "uniform" and dk.cosine().sample_spacing is None
    den = counting(dk.GaussianDenoiser(sch, torch.zeros(3, dtype=F64), 0.1))
    dk.sample(den, (5, 3), sampler="ddpm", nfe=sch.T, generator=torch.Generator().manual_seed(0), dtype=F64)
    assert den.times == pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-15)
    den = counting(dk.GaussianDenoiser(sch, torch.zeros(3, dtype=F64), 0.1))
    dk.sample(den, (5, 3), sampler="ddpm", nfe=sch.T, spacing="logsnr", dtype=F64)  # an explicit spacing wins
    assert den.times != pytest.approx([1.0, 0.75, 0.5, 0.25], abs=1e-6)
