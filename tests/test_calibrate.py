"""diffkit.calibrate.tune_perturbation against an exact setting.

The "model" is the identity regression x_{t+1} = x_t (a residual model predicting 0), and the
truth is x_t + a * e with e Gaussian noise of unit variance, correlated with a Gaussian filter of
std l (built here independently of diffkit.rollout, by summing rolled copies).  The model's mean is
then perfect and its error is a * e, so a perturbation of amplitude s and length l' gives, at each
point, the predictive law N(x_t, s^2) against the truth's N(x_t, a^2):

- the fair CRPS is minimised at s = a (CRPS is proper), whatever l';
- spread/skill is sqrt((M + 1) / M) * s / sqrt(a^2 + s^2 / M) for every candidate (exact; 1 at s = a);
- the multiscale CRPS (block means of 1, 2, 4, 8, 16 points) is minimised at (a, l) too, while the
  pointwise CRPS hardly depends on l' (it sees the marginals only).
"""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from diffkit.calibrate import METRICS, block_means, tune_perturbation
from diffkit.denoiser import Regressor
from diffkit.layout import AutoregressiveSpec, Layout, history_channels

NY, NX, N = 32, 32, 128
A_TRUE, L_TRUE = 0.5, 2.0
AMPS = (0.25, 0.35, 0.5, 0.7, 1.0)
LENGTHS = (0.0, 1.0, 2.0, 4.0)


def identity_model() -> Regressor:
    spec = AutoregressiveSpec(variables=("u",), history=1, horizon=1, step=1.0, step_units="steps",
                              target="residual", state_mean=(0.0,), state_std=(1.0,))
    layout = Layout(channels=("du@t+1",), spatial=("y", "x"), shape=(NY, NX), periodic=("y", "x"),
                    cond_channels=history_channels(("u",), 1), mean=torch.zeros(1, 1), std=torch.ones(1, 1),
                    autoregressive=spec)

    class Zero(nn.Module):
        def __init__(self):
            super().__init__()
            self.w = nn.Parameter(torch.zeros(()))

        def forward(self, x, c_noise, scalars=None, labels=None):
            return torch.zeros_like(x[:, :1]) + 0 * self.w
    return Regressor(Zero(), layout)


def gaussian_field(n: int, length: float, g: torch.Generator) -> torch.Tensor:
    """Periodic Gaussian-filtered white noise of unit variance, by a direct sum of rolled copies."""
    w = torch.randn((n, NY, NX), generator=g, dtype=torch.float64)
    r = math.ceil(5 * length)
    k = [math.exp(-m * m / (2 * length ** 2)) for m in range(-r, r + 1)]
    out = torch.zeros_like(w)
    for i, ki in enumerate(k):
        for j, kj in enumerate(k):
            out += ki * kj * w.roll((i - r, j - r), (1, 2))
    return out / sum(v * v for v in k)


def data():
    g = torch.Generator().manual_seed(0)
    x = torch.randn((N, 1, 1, NY, NX), generator=g, dtype=torch.float64) * 1.5 + 0.3
    truth = x[:, 0] + A_TRUE * gaussian_field(N, L_TRUE, g)[:, None]
    return x.float(), truth.float()


@pytest.mark.slow
def test_tune_perturbation_recovers_true_amplitude_and_length():
    model = identity_model()
    hist, truth = data()
    M = 8
    # the fair CRPS picks the true amplitude; spread, RMSE and spread/skill are the exact ones
    res = tune_perturbation(model, hist, truth, members=M, amplitudes=AMPS, lengths=(L_TRUE,), metric="crps")
    assert [(r["amplitude"], r["length"]) for r in res.table] == [(a, L_TRUE) for a in AMPS]
    assert res.amplitude == A_TRUE and res.metric == "crps" and res.lead == 1 and res.scales == (1, 2, 4, 8)
    for r in res.table:     # a perfect-mean model with perturbation s
        s = r["amplitude"]
        exact = math.sqrt((M + 1) / M) * s / math.sqrt(A_TRUE ** 2 + s * s / M)
        assert r["spread_skill"] == pytest.approx(exact, rel=0.05), r
        assert r["spread"] == pytest.approx(s, rel=0.05)
        assert r["rmse"] == pytest.approx(math.sqrt(A_TRUE ** 2 + s * s / M), rel=0.05)
    # the multiscale CRPS picks the true amplitude and length
    ms = tune_perturbation(model, hist, truth, members=M, amplitudes=(0.35, 0.5, 0.7), lengths=(1.0, 2.0, 4.0),
                           metric="crps_multiscale", scales=(1, 2, 4, 8, 16))
    assert (ms.amplitude, ms.length) == (A_TRUE, L_TRUE) and ms.scales == (1, 2, 4, 8, 16)
    # the pointwise CRPS hardly sees the length: at the true amplitude it varies far less over the
    # lengths than the multiscale score
    at = [r for r in ms.table if r["amplitude"] == A_TRUE]
    spread_pt = max(r["crps"] for r in at) - min(r["crps"] for r in at)
    spread_ms = max(r["crps_multiscale"] for r in at) - min(r["crps_multiscale"] for r in at)
    assert spread_pt < 0.3 * spread_ms
    ss = tune_perturbation(model, hist, truth, members=M, amplitudes=(0.35, 0.5, 0.7), lengths=(L_TRUE,),
                           metric="spread_skill")
    assert ss.amplitude == A_TRUE and ss.best["spread_skill"] == pytest.approx(1, abs=0.05)
    assert "**0.5**" in ss.markdown() and ss.markdown().count("\n") == 3 + 1


def test_tune_perturbation_uses_the_forecast_hook_and_the_mask():
    model = identity_model()
    hist, truth = data()
    seen = []

    def forecast(**kw):
        seen.append(kw)
        from diffkit.rollout import rollout
        return rollout(model, hist, **kw)
    fm = torch.zeros(1, NY, NX, dtype=torch.bool)
    fm[0, :4] = True
    truth2 = truth.clone()
    truth2[:, 0, :4] = float("nan")            # left out: the mask, not the values
    res = tune_perturbation(model, hist, truth2, members=4, amplitudes=(0.5,), lengths=(1.0,), forecast=forecast,
                            fixed_mask=fm, seed=3)
    assert seen == [dict(perturb=0.5, perturb_length=1.0, members=4, steps=1, seed=3)]
    assert all(math.isfinite(v) for k, v in res.best.items() if k not in ("amplitude", "length"))


def test_block_means_any_rank():
    for shape in ((10,), (6, 9), (4, 6, 8)):
        x = torch.arange(math.prod(shape), dtype=torch.float64).reshape(shape)
        w = torch.ones(shape, dtype=torch.float64)
        m, wb = block_means(x, 2, len(shape), w)
        ref = x
        for ax in range(len(shape)):
            n = shape[ax] // 2 * 2
            ref = ref.narrow(ax, 0, n).unflatten(ax, (n // 2, 2)).mean(ax + 1)
        torch.testing.assert_close(m, ref)
        assert bool((wb == 2 ** len(shape)).all())


def test_tune_perturbation_errors():
    model = identity_model()
    hist, truth = data()
    cases = [
        (dict(metric="mae"), ValueError, "metric must be one of " + ", ".join(METRICS)),
        (dict(members=1), ValueError, "members must be an integer >= 2"),
        (dict(steps=0), ValueError, "steps must be an integer >= 1"),
        (dict(amplitudes=(0.0, 0.1)), ValueError, "amplitudes must be > 0 and finite"),
        (dict(amplitudes=()), ValueError, "amplitudes is empty"),
        (dict(lengths=(-1.0,)), ValueError, "perturb_length must be >= 0"),
    ]
    for kw, exc, msg in cases:
        with pytest.raises(exc, match=msg):
            tune_perturbation(model, hist, truth, **kw)
    with pytest.raises(ValueError, match=r"truth has shape \(128, 32, 32\), expected \(128, 1, 32, 32\)"):
        tune_perturbation(model, hist, truth[:, 0])


def test_tune_perturbation_warns_when_its_choice_is_at_the_edge_of_the_grid():
    model = identity_model()
    hist, truth = data()
    with pytest.warns(UserWarning, match=r"chose the largest amplitude of the grid \(0\.2\).*extend amplitudes past 0\.2"):
        res = tune_perturbation(model, hist, truth, members=4, amplitudes=(0.1, 0.2), lengths=(L_TRUE,))
    assert res.amplitude == 0.2
    import warnings
    with warnings.catch_warnings():
        warnings.simplefilter("error")     # an interior optimum says nothing
        assert tune_perturbation(model, hist, truth, members=4, amplitudes=(0.35, 0.5, 0.7),
                                 lengths=(L_TRUE,)).amplitude == A_TRUE
