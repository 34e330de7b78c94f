"""diffkit.calibrate.spread_scale / scale_spread: recalibrating an ensemble's spread on validation data.

Exact properties: scaling the anomalies leaves the ensemble mean (and so its RMSE) unchanged and
multiplies the spread by the scale, so the validation spread/skill becomes exactly 1, at any rank,
any member dim, with per-channel scales, weights and masks, and at the physical scale of the data
(a field of std 0.01 is calibrated as well as a unit one).  Statistical property: an ensemble drawn
with three times the right spread is brought back to spread/skill 1 on independent data."""
from __future__ import annotations

import math

import pytest
import torch

from diffkit.calibrate import scale_spread, spread_scale
from diffkit.ensemble import ensemble_mean_rmse, spread, spread_skill_ratio


def _ens(shape, members, scale, spread_factor, seed=0):
    """``(M, *shape)`` members and ``shape`` truth: a shared error plus member noise, all times ``scale``."""
    g = torch.Generator().manual_seed(seed)
    truth = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    err = scale * torch.randn(shape, generator=g, dtype=torch.float64)
    fc = truth + err + spread_factor * scale * torch.randn((members, *shape), generator=g, dtype=torch.float64)
    return fc, truth


@pytest.mark.parametrize("shape", [(7,), (3, 9), (2, 3, 8), (2, 2, 4, 5), (2, 2, 3, 4, 3)])
@pytest.mark.parametrize("scale", [1.0, 0.01])
def test_spread_scale_makes_spread_skill_one_and_keeps_the_mean_any_rank(shape, scale):
    fc, truth = _ens(shape, 6, scale, 2.5)
    kw = dict(sample_dims=(0,)) if len(shape) > 1 else {}
    s = spread_scale(fc, truth, **kw)
    assert s.ndim == 0 and float(s) < 1                      # over-dispersed: the scale shrinks
    cal = scale_spread(fc, s)
    assert cal.dtype == fc.dtype and cal.shape == fc.shape
    torch.testing.assert_close(cal.mean(0), fc.mean(0), rtol=0, atol=1e-15 * scale * 10)
    assert float(spread_skill_ratio(cal, truth, **kw)) == pytest.approx(1.0, rel=1e-12)
    assert float(ensemble_mean_rmse(cal, truth, **kw)) == pytest.approx(float(ensemble_mean_rmse(fc, truth, **kw)),
                                                                          rel=1e-12)
    assert float(spread(cal, truth, **kw)) == pytest.approx(float(s) * float(spread(fc, truth, **kw)), rel=1e-12)
    # the calibrated spread is at the data's scale (std 0.01 data: spread of order 0.01, not 1)
    assert 0.2 * scale < float(spread(cal, truth, **kw)) < 5 * scale


def test_spread_scale_per_channel_with_the_member_dim_elsewhere_weights_and_mask():
    g = torch.Generator().manual_seed(1)
    N, C, X, M = 4, 3, 10, 5
    truth = torch.randn(N, C, X, generator=g, dtype=torch.float64)
    sd = torch.tensor([0.2, 1.0, 5.0], dtype=torch.float64)[:, None]          # one channel under, one over
    fc = truth[:, :, None] + 0.6 * torch.randn(N, C, M, X, generator=g, dtype=torch.float64) * sd[:, None] \
        + 0.6 * torch.randn(N, C, 1, X, generator=g, dtype=torch.float64)
    w = torch.linspace(0.5, 1.5, X, dtype=torch.float64)
    mask = torch.ones(C, X, dtype=torch.bool)
    mask[:, :2] = False
    fc[:, :, :, 0] = float("nan")                                           # masked NaN never enters
    kw = dict(member_dim=2, weights=w, mask=mask, dims=(-1,), sample_dims=(0,))
    s = spread_scale(fc, truth, **kw)
    assert s.shape == (C, 1)
    assert float(s[0, 0]) > 1 > float(s[2, 0])
    cal = scale_spread(fc, s, member_dim=2)
    torch.testing.assert_close(spread_skill_ratio(cal, truth, **kw), torch.ones(C, dtype=torch.float64))
    # the scale broadcasts along the channel dim: each channel moved by its own factor only
    one = scale_spread(fc, float(s[1, 0]), member_dim=2)
    torch.testing.assert_close(one[:, 1, :, 2:], cal[:, 1, :, 2:])


def test_a_three_times_too_wide_ensemble_is_calibrated_on_independent_data():
    # reliable ensemble: truth and members drawn alike around a random centre; then the members'
    # deviation is made 3x too wide.  The scale from a validation set brings a test set back to 1.
    def draw(seed, n=400, M=8):
        g = torch.Generator().manual_seed(seed)
        centre = 0.01 * torch.randn(n, 16, generator=g, dtype=torch.float64)
        truth = centre + 0.01 * torch.randn(n, 16, generator=g, dtype=torch.float64)
        fc = centre + 0.03 * torch.randn(M, n, 16, generator=g, dtype=torch.float64)
        return fc, truth

    fc, truth = draw(0)
    # members of std 0.03 around the centre, truth 0.01 from it: spread/skill = sqrt(9/8) 0.03 / sqrt(0.01^2 + 0.03^2/8)
    want = math.sqrt(9 / 8) * 0.03 / math.sqrt(0.01 ** 2 + 0.03 ** 2 / 8)
    assert float(spread_skill_ratio(fc, truth, sample_dims=(0,))) == pytest.approx(want, rel=0.05)
    s = float(spread_scale(fc, truth, sample_dims=(0,)))
    assert s == pytest.approx(1 / want, rel=0.05)
    test_fc, test_truth = draw(1)
    assert float(spread_skill_ratio(scale_spread(test_fc, s), test_truth, sample_dims=(0,))) == \
        pytest.approx(1.0, abs=0.05)


def test_spread_scale_errors_are_one_line():
    fc, truth = _ens((5,), 4, 1.0, 1.0)
    same = fc[:1].expand(4, 5)
    with pytest.raises(ValueError, match="no spread") as e:
        spread_scale(same, truth)
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="mean has no error"):
        exact = torch.arange(5.0, dtype=torch.float64)
        spread_scale(exact + torch.tensor([[-1.0], [1.0]], dtype=torch.float64), exact)
    for bad in (0.0, -1.0, math.inf, math.nan):
        with pytest.raises(ValueError, match="finite and > 0"):
            scale_spread(fc, bad)
    with pytest.raises(Exception, match="does not broadcast"):
        scale_spread(fc, torch.ones(3))
    with pytest.raises(Exception, match="member dim"):
        scale_spread(torch.tensor(1.0), 1.0)
    # ints are scaled in float64 rather than truncated
    out = scale_spread(torch.tensor([[0, 2], [2, 0]]), 0.5)
    assert out.dtype == torch.float64 and out.tolist() == [[0.5, 1.5], [1.5, 0.5]]


def test_apply_spread_scale_is_scale_spread_of_the_command_option():
    from argparse import Namespace

    from diffkit.calibrate import apply_spread_scale

    g = torch.Generator().manual_seed(0)
    x = 0.01 * torch.randn(3, 5, 4, generator=g)                     # (N, M, X): member dim 1
    assert apply_spread_scale(x, Namespace(spread_scale=1.0), member_dim=1) is x
    assert apply_spread_scale(x, Namespace(), member_dim=1) is x     # an older namespace: as sampled
    y = apply_spread_scale(x, Namespace(spread_scale=0.25), member_dim=1)
    m = x.mean(1, keepdim=True)
    torch.testing.assert_close(y, m + 0.25 * (x - m))
    assert y.dtype == x.dtype


def test_the_spread_scale_option_parses_checks_and_records():
    import argparse

    from diffkit.calibrate import add_spread_scale_argument, check_spread_scale, spread_scale_attrs

    ap = argparse.ArgumentParser()
    add_spread_scale_argument(ap)
    assert ap.parse_args([]).spread_scale == 1.0 and spread_scale_attrs(ap.parse_args([])) == {}
    a = ap.parse_args(["--spread-scale", "1.5"])
    check_spread_scale(a)
    assert spread_scale_attrs(a) == {"spread_scale": 1.5}
    for bad in ("0", "-2", "inf", "nan"):
        with pytest.raises(ValueError, match="--spread-scale must be a finite number > 0") as e:
            check_spread_scale(ap.parse_args(["--spread-scale", bad]))
        assert "\n" not in str(e.value)
