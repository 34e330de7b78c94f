"""diffkit.ensemble, the one implementation of the ensemble scores, against exact and independent references.

CRPS against scoringrules (fair estimator) and properscoring (energy form); spread, RMSE and the
reductions (weights, masks, dims, sample dims, both orders of the square root) against numpy on
flattened arrays; the spread/skill convention against reliable synthetic ensembles for M = 2, 5
and 20, where the uncorrected ratio sqrt(M/(M+1)) lies many standard errors away; the rank
histogram against chi-square bounds.  Runs in a few seconds on one CPU thread.
"""
from __future__ import annotations

import math

import numpy as np
import properscoring
import pytest
import scoringrules
import torch
from scipy import stats

from diffkit import ensemble as E
from diffkit import registry
from diffkit.errors import NonFiniteError, ShapeError

F64 = torch.float64


def close(a, b, **kw):
    kw.setdefault("rtol", 1e-12)
    kw.setdefault("atol", 1e-12)
    torch.testing.assert_close(torch.as_tensor(a, dtype=F64), torch.as_tensor(b, dtype=F64), **kw)


def _chi2(counts):
    counts = np.asarray(counts, dtype=float)
    e = counts.sum() / counts.size
    return ((counts - e) ** 2 / e).sum()


# ----------------------------------------------------------------------------- CRPS
@pytest.mark.parametrize("method", ["sort", "pairwise"])
def test_fair_crps_matches_scoringrules(method):
    rng = np.random.default_rng(0)
    fc = rng.normal(size=(3, 6, 4, 5)) * 1.5 + 0.3  # member dim 1 of the forecast
    y = rng.normal(size=(3, 4, 5))
    ref = scoringrules.crps_ensemble(y, fc, m_axis=1, estimator="fair")
    got = E.crps_pointwise(fc, y, member_dim=1, estimator="fair", method=method)
    assert got.dtype == F64 and got.shape == (3, 4, 5)
    close(got, ref)
    # reduced: weighted mean over the last two dims, equal-weight mean over the first
    w = rng.uniform(0.1, 2.0, size=(4, 1))
    per = (ref * w).sum((1, 2)) / (np.broadcast_to(w, (4, 5)).sum())
    close(E.crps(fc, y, member_dim=1, weights=w, dims=(-2, -1), method=method), per)
    close(E.crps(fc, y, member_dim=1, weights=w, dims=(1, 2), sample_dims=(0,), method=method), per.mean())


def test_energy_crps_matches_properscoring():
    rng = np.random.default_rng(1)
    fc = rng.normal(size=(7, 10, 3))
    y = rng.normal(size=(10, 3))
    ref = properscoring.crps_ensemble(y, np.moveaxis(fc, 0, -1))
    for method in ("sort", "pairwise"):
        close(E.crps_pointwise(fc, y, estimator="nrg", method=method), ref)
    close(E.crps(fc, y, estimator="nrg"), ref.mean())
    # one member: the energy form is the absolute error; the fair form needs two members
    close(E.crps_pointwise(fc[:1], y, estimator="nrg"), np.abs(fc[0] - y))
    with pytest.raises(ValueError, match="at least 2"):
        E.crps(fc[:1], y)


# ----------------------------------------------------------------------------- spread and RMSE
def test_spread_and_ensemble_mean_rmse_match_numpy():
    rng = np.random.default_rng(2)
    fc = rng.normal(size=(4, 5, 6, 7))  # (sample, member, a, b)
    y = rng.normal(size=(4, 6, 7))
    w = rng.uniform(0.0, 3.0, size=(6, 7))
    wsum = w.sum()
    var = fc.var(1, ddof=1)  # numpy's ddof=1 variance over members
    sq = (fc.mean(1) - y) ** 2
    s_per = np.sqrt((var * w).sum((1, 2)) / wsum)
    e_per = np.sqrt((sq * w).sum((1, 2)) / wsum)
    kw = dict(member_dim=1, weights=w, dims=(1, 2))
    close(E.spread(fc, **kw), s_per)
    close(E.ensemble_mean_rmse(fc, y, **kw), e_per)
    close(E.rmse(fc.mean(1), y, weights=w, dims=(1, 2)), e_per)
    # sample dims: the root per sample first (default), or the mean of the squares first
    close(E.spread(fc, sample_dims=(0,), **kw), s_per.mean())
    close(E.spread(fc, sample_dims=(0,), sqrt_first=False, **kw), np.sqrt((s_per ** 2).mean()))
    close(E.ensemble_mean_rmse(fc, y, sample_dims=(0,), sqrt_first=False, **kw), np.sqrt((e_per ** 2).mean()))
    M = 5
    close(E.spread_skill_ratio(fc, y, sample_dims=(0,), **kw), math.sqrt((M + 1) / M) * s_per.mean() / e_per.mean())
    close(E.spread_skill_ratio(fc, y, **kw), math.sqrt((M + 1) / M) * s_per / e_per)
    # the truth only sets the spread's layout
    close(E.spread(fc, y, **kw), s_per)
    with pytest.raises(ValueError, match="at least 2"):
        E.spread(fc[:, :1], **kw)


@pytest.mark.parametrize("M", [2, 5, 20])
@pytest.mark.parametrize("sqrt_first", [True, False])
def test_spread_skill_ratio_of_a_reliable_ensemble_is_one(M, sqrt_first):
    """Truth and members drawn from the same distribution: the corrected ratio is 1 and the uncorrected
    one sqrt(M / (M + 1)) (0.82, 0.91, 0.976), many standard errors (about 0.003 here) away."""
    g = torch.Generator().manual_seed(100 + M)
    S, n = 20, 10_000  # samples (e.g. init times) x points per sample
    mu = 3.0 * torch.randn(S, 1, n, generator=g, dtype=F64)  # a predictable signal
    sigma = torch.linspace(0.2, 2.0, n, dtype=F64)  # point-dependent uncertainty
    draw = mu + sigma * torch.randn(S, M + 1, n, generator=g, dtype=F64)
    ens, truth = draw[:, :M], draw[:, M]
    w = torch.rand(n, generator=g, dtype=F64) + 0.5  # any weights: reliability holds at every point
    kw = dict(member_dim=1, weights=w, dims=(1,), sample_dims=(0,), sqrt_first=sqrt_first)
    ratio = float(E.spread_skill_ratio(ens, truth, **kw))
    assert abs(ratio - 1.0) < 0.015, ratio
    raw = float(E.spread(ens, **kw) / E.ensemble_mean_rmse(ens, truth, **kw))
    assert abs(raw - math.sqrt(M / (M + 1))) < 0.015, raw
    # members shrunk to half their deviations: spread sigma/2, E[err^2] = sigma^2 (1 + 1/(4M))
    under = float(E.spread_skill_ratio(mu + 0.5 * (ens - mu), truth, **kw))
    assert abs(under - math.sqrt((M + 1) / M) * 0.5 / math.sqrt(1 + 0.25 / M)) < 0.015, under


# ----------------------------------------------------------------------------- rank histogram
def test_rank_histogram_flat_for_reliable_and_u_shaped_for_underdispersive():
    g = torch.Generator().manual_seed(3)
    M = 7
    y = torch.randn(40, 500, generator=g, dtype=F64)
    fc = torch.randn(M, 40, 500, generator=g, dtype=F64)
    h = E.rank_histogram(fc, y, generator=0)
    assert h.shape == (M + 1,) and h.dtype == torch.int64 and int(h.sum()) == y.numel()
    crit = stats.chi2.ppf(0.999, M)
    assert _chi2(h) < crit, h
    hu = E.rank_histogram(0.3 * fc, y, generator=0)
    assert _chi2(hu) > 50 * crit
    assert hu[0] > 3 * hu[M // 2] and hu[-1] > 3 * hu[M // 2]  # U-shaped
    ho = E.rank_histogram(3.0 * fc, y, generator=0)  # over-dispersive: a dome
    assert ho[M // 2] > 3 * ho[0] and ho[M // 2] > 3 * ho[-1]
    # counting over one dim keeps the other; fractions with normalize
    per = E.rank_histogram(fc, y, dims=(1,), generator=0, normalize=True)
    assert per.shape == (40, M + 1) and per.dtype == F64
    close(per.sum(-1), torch.ones(40))


def test_rank_histogram_ties_at_random_and_reproducible():
    n, M = 4000, 3
    y = torch.zeros(n)
    fc = torch.zeros(M, n)  # all tied: the rank is uniform on 0..M
    h = E.rank_histogram(fc, y, generator=torch.Generator().manual_seed(1))
    assert _chi2(h) < stats.chi2.ppf(0.999, M), h
    assert torch.equal(h, E.rank_histogram(fc, y, generator=1))
    fc2 = torch.tensor([-1.0, 0.0, 1.0])[:, None].expand(M, n)  # one tie: ranks 1 and 2 only
    h2 = E.rank_histogram(fc2, y, generator=2)
    assert h2[0] == 0 and h2[-1] == 0 and abs(int(h2[1]) - int(h2[2])) < 4 * math.sqrt(n)


# ----------------------------------------------------------------------------- weights, masks, dims
def _case(seed=4):
    g = torch.Generator().manual_seed(seed)
    fc = torch.randn(5, 6, 8, 9, generator=g, dtype=F64)  # (member, sample, a, b)
    y = torch.randn(6, 8, 9, generator=g, dtype=F64)
    mask = torch.rand(6, 8, 9, generator=g) < 0.7
    mask[2] = False  # a sample with no valid point: left out of the sample mean
    w = torch.rand(8, 1, generator=g, dtype=F64) + 0.1
    return fc, y, mask, w


def _scores(fc, y, **kw):
    return {
        "rmse": E.ensemble_mean_rmse(fc, y, **kw),
        "spread": E.spread(fc, y, **kw),
        "ratio": E.spread_skill_ratio(fc, y, **kw),
        "crps": E.crps(fc, y, **kw),
        "crps_nrg": E.crps(fc, y, estimator="nrg", **kw),
    }


def test_masked_values_are_never_used_and_empty_samples_are_left_out():
    fc, y, mask, w = _case()
    kw = dict(weights=w, mask=mask, dims=(1, 2), sample_dims=(0,))
    base = _scores(fc, y, **kw)
    fc2, y2 = fc.clone(), y.clone()
    fc2[0][~mask] = float("nan")
    fc2[3][~mask] = 1e9
    y2[~mask] = -float("inf")
    other = _scores(fc2, y2, **kw)
    keep = [0, 1, 3, 4, 5]
    sub = _scores(fc[:, keep], y[keep], **{**kw, "mask": mask[keep]})
    for k in base:
        assert torch.isfinite(base[k]).all(), k
        close(other[k], base[k], rtol=0, atol=0)
        close(sub[k], base[k])
    per = _scores(fc, y, weights=w, mask=mask, dims=(1, 2))
    assert all(bool(torch.isnan(v[2])) and bool(torch.isfinite(v[[0, 1]]).all()) for v in per.values())
    assert int(E.rank_histogram(fc2, y2, mask=mask, generator=0).sum()) == int(mask.sum())
    with pytest.raises(NonFiniteError):
        E.rank_histogram(fc2, y2, generator=0)


def test_weights_and_masks_against_numpy():
    fc, y, mask, w = _case(5)
    m = mask.numpy()
    ww = np.broadcast_to(w.numpy(), (8, 9))
    point = scoringrules.crps_ensemble(y.numpy(), fc.numpy(), m_axis=0, estimator="fair")  # (6, 8, 9)
    num = np.where(m, point, 0.0) * ww
    den = (m * ww).sum((1, 2))
    valid = den > 0
    close(E.crps(fc, y, weights=w, mask=mask, dims=(1, 2), sample_dims=(0,)),
          (num.sum((1, 2))[valid] / den[valid]).mean())
    # a float mask is a multiplicative weight; weights broadcast from the right
    close(E.crps(fc, y, weights=w, mask=mask.to(F64) * 3.0), E.crps(fc, y, weights=w * 3.0, mask=mask))
    close(E.crps(fc, y, weights=torch.ones(9) * 2.0), E.crps(fc, y))
    # masking columns equals slicing them away
    cols = torch.zeros(8, 9, dtype=torch.bool)
    cols[:, :4] = True
    close(E.spread(fc, weights=w, mask=cols, dims=(1, 2)), E.spread(fc[..., :4], weights=w, dims=(1, 2)))
    close(E.weighted_mean(y, w, mask=mask, dims=(1, 2), sample_dims=(0,)),
          (np.where(m, y.numpy(), 0) * ww).sum((1, 2))[valid].__truediv__(den[valid]).mean())
    with pytest.raises(ValueError, match="non-negative"):
        E.crps(fc, y, weights=-w)
    with pytest.raises(ShapeError, match="broadcast"):
        E.crps(fc, y, mask=mask[:, :, :5])


def test_reduction_over_named_dims_equals_moving_them_last():
    g = torch.Generator().manual_seed(6)
    fc = torch.randn(3, 4, 5, 6, 7, generator=g, dtype=F64)  # layout (4, 5, 6, 7) with members on dim 0
    y = torch.randn(4, 5, 6, 7, generator=g, dtype=F64)
    w = torch.rand(5, 1, 7, generator=g, dtype=F64)  # over the layout dims 1 and 3
    got = _scores(fc, y, weights=w, dims=(1, 3), sample_dims=(0,))
    moved = _scores(fc.permute(0, 1, 3, 2, 4), y.permute(0, 2, 1, 3), weights=w.permute(1, 0, 2),
                    dims=(-2, -1), sample_dims=(0,))
    for k in got:
        assert got[k].shape == (6,), k
        close(got[k], moved[k])
    # the member dim anywhere
    close(E.crps(fc.movedim(0, 3), y, member_dim=3, dims=(1, 3)), E.crps(fc, y, dims=(1, 3)))
    with pytest.raises(ShapeError, match="share"):
        E.crps(fc, y, dims=(0, 1), sample_dims=(0,))
    with pytest.raises(ShapeError, match="out of range"):
        E.crps(fc, y, dims=(4,))


@pytest.mark.parametrize("rank", [1, 2, 3, 4, 5])
def test_any_rank_of_the_field(rank):
    """Layouts of rank 1-5 give the same scores as the flattened field (one weighted mean over all)."""
    g = torch.Generator().manual_seed(rank)
    shape = (4, 3, 2, 3, 2)[:rank]
    fc = torch.randn(6, *shape, generator=g, dtype=F64)
    y = torch.randn(*shape, generator=g, dtype=F64)
    w = torch.rand(*shape, generator=g, dtype=F64)
    got = _scores(fc, y, weights=w)
    flat = _scores(fc.reshape(6, -1), y.reshape(-1), weights=w.reshape(-1))
    wn, fn_, yn = w.numpy().ravel(), fc.numpy().reshape(6, -1), y.numpy().ravel()
    close(flat["spread"], np.sqrt((fn_.var(0, ddof=1) * wn).sum() / wn.sum()))
    close(flat["crps"], (scoringrules.crps_ensemble(yn, fn_, m_axis=0, estimator="fair") * wn).sum() / wn.sum())
    for k in got:
        assert got[k].shape == (), k
        close(got[k], flat[k])
    h = E.rank_histogram(fc, y, generator=0)
    assert h.shape == (7,) and int(h.sum()) == y.numel()


# ----------------------------------------------------------------------------- the registered convention
def test_registered_ensemble_metrics_share_one_calling_convention():
    registry.refresh()
    reg = E.registered()
    assert {"ensemble_mean_rmse", "ensemble_spread", "ensemble_spread_skill_ratio", "ensemble_crps"} <= set(reg)
    assert "ensemble_rank_histogram" not in reg  # bins, not one value per index
    assert registry.get("metric", "ensemble_rank_histogram") is E.rank_histogram
    fc, y, mask, w = _case(7)
    for name, fn in reg.items():
        assert fn.kind == "ensemble" and fn.min_members >= 1, name
        out = fn(fc, y, member_dim=0, weights=w, mask=mask, dims=(1, 2), sample_dims=())
        assert out.shape == (6,) and out.dtype == F64, name
    # a plugin's metric marked with ensemble_metric is listed too
    plugin = type("P", (), {})()

    @E.ensemble_metric(min_members=1)
    def mae(forecast, truth, *, member_dim=0, weights=None, mask=None, dims=None, sample_dims=()):
        """Mean absolute error of the ensemble median."""
        med = torch.as_tensor(forecast).median(member_dim).values
        return E.weighted_mean((med - torch.as_tensor(truth)).abs(), weights, mask=mask, dims=dims,
                               sample_dims=sample_dims)

    from diffkit import hookimpl

    plugin.diffkit_metrics = hookimpl(lambda: {"fake_median_mae": mae})
    registry.register_plugin(plugin, "fake_ensemble_plugin")
    try:
        assert E.registered()["fake_median_mae"] is mae and mae.min_members == 1
    finally:
        registry.unregister_plugin("fake_ensemble_plugin")
    assert "fake_median_mae" not in E.registered()


# ----------------------------------------------------------------------------- issue 14 item 3: the calibration verdict
def _gaussian_ensemble(width: float, *, M: int = 8, leads: int = 4, points: int = 4000, seed: int = 0):
    """Truth ``y = mu + N(0, 1)`` and ``M`` members ``mu + width * N(0, 1)`` (``mu`` known per point): the
    ensemble is reliable for ``width = 1``, too narrow below, too wide above."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(leads, points, generator=g, dtype=torch.float64)
    truth = mu + torch.randn(leads, points, generator=g, dtype=torch.float64)
    fc = mu + width * torch.randn(M, leads, points, generator=g, dtype=torch.float64)
    ss = E.spread_skill_ratio(fc, truth, dims=(-1,))                         # one ratio per lead
    ranks = E.rank_histogram(fc, truth, dims=(-1,), generator=1)             # (leads, M + 1)
    return ss, ranks


@pytest.mark.parametrize("width, verdict", [(1.0, "well-dispersed"), (0.5, "under-dispersive"),
                                            (2.0, "over-dispersive")])
def test_dispersion_verdict_of_calibrated_narrow_and_wide_gaussian_ensembles(width, verdict):
    M = 8
    ss, ranks = _gaussian_ensemble(width, M=M)
    # expected ratio sqrt((M + 1) / M) * w / sqrt(1 + w^2 / M) (the mean's error holds the members' noise too):
    # 1 for w = 1, 0.52 for w = 0.5, 1.89 for w = 2; 4000 points per lead put each ratio within 3 %
    exact = math.sqrt((M + 1) / M) * width / math.sqrt(1 + width ** 2 / M)
    np.testing.assert_allclose(ss.numpy(), exact, rtol=0.03)
    d = E.dispersion_verdict(ss, ranks)
    assert d.verdict == verdict and d.leads == 4
    assert d.spread_skill == pytest.approx(float(ss.mean()))
    rel, ext = E.rank_summary(ranks)
    assert d.extremes == pytest.approx(ext)
    # the histogram agrees: flat for the reliable ensemble, U for the narrow one, cap for the wide one
    if width == 1.0:
        assert 0.9 < ext < 1.1 and np.all(np.abs(rel - 1) < 0.1)
    elif width < 1:
        assert ext > 1.5
    else:
        assert ext < 0.5
    line = str(d)
    assert line.startswith(verdict + ": spread/skill ") and f"{d.spread_skill:.2f}" in line
    assert "extreme rank bins" in line
    # without the histogram, spread/skill alone gives the same verdict
    assert E.dispersion_verdict(ss).verdict == verdict


def test_dispersion_verdict_rule_edges_and_rank_histogram_shape():
    flat = [100] * 9
    u_shape = [300] + [100] * 7 + [300]                                       # extremes (600/1300) / (2/9) x uniform
    cap = [10] + [100] * 7 + [10]                                             # extremes (20/720) / (2/9) x uniform
    assert E.rank_summary(u_shape)[1] == pytest.approx(600 / 1300 * 4.5)
    assert E.rank_summary(cap)[1] == pytest.approx(20 / 720 * 4.5)
    np.testing.assert_allclose(E.rank_summary([[150] + [50] * 7 + [150]] * 2)[0], np.asarray(u_shape) / 1300 * 9)
    # spread/skill decides first: the band is closed, the mean over leads is what counts
    assert E.dispersion_verdict([0.8, 0.8]).verdict == "well-dispersed"
    assert E.dispersion_verdict([0.79]).verdict == "under-dispersive"
    assert E.dispersion_verdict([1.21]).verdict == "over-dispersive"
    assert E.dispersion_verdict([0.5, 1.5]).verdict == "well-dispersed"      # mean 1.0
    assert E.dispersion_verdict([0.5, float("nan")]).spread_skill == 0.5    # NaN leads are ignored
    assert E.dispersion_verdict([0.5], cap).verdict == "under-dispersive"    # the ratio wins a disagreement
    # inside the band the histogram's shape decides
    assert E.dispersion_verdict([1.0], flat).verdict == "well-dispersed"
    d = E.dispersion_verdict([1.0], u_shape)
    assert d.verdict == "under-dispersive" and "U-shaped" in str(d)
    d = E.dispersion_verdict([1.0], cap)
    assert d.verdict == "over-dispersive" and "cap-shaped" in str(d)
    # too few counts to judge the extreme bins (expected 2 * 9 / 9 = 2 < 20): the histogram is not used
    d = E.dispersion_verdict([1.0], [3, 1, 1, 1, 1, 1, 1, 1, 3])
    assert d.verdict == "well-dispersed" and d.extremes is None
    # no finite ratio (a one-member ensemble): no verdict
    d = E.dispersion_verdict([float("nan")] * 3, flat)
    assert d.verdict == "undetermined" and "at least 2 members" in str(d)
    assert E.dispersion_verdict([1.0], band=(0.9, 1.1)).verdict == "well-dispersed"
    assert E.dispersion_verdict([1.15], band=(0.9, 1.1)).verdict == "over-dispersive"
    with pytest.raises(ValueError, match="band must be 0 < low <= high"):
        E.dispersion_verdict([1.0], band=(1.2, 0.8))
    with pytest.raises(ShapeError, match="M \\+ 1 >= 2 bins"):
        E.rank_summary([5])


def test_dispersion_verdict_names_the_spread_scale_that_calibrates():
    # the mean over leads of the ratios times the scale is exactly 1: scaling the anomalies scales every ratio
    d = E.dispersion_verdict([0.4, 0.6])
    assert d.spread_scale == pytest.approx(2.0) and "scaling the members' anomalies by 2 makes it 1" in str(d)
    d = E.dispersion_verdict([2.5])
    assert d.spread_scale == pytest.approx(0.4) and "by 0.4 makes it 1" in str(d)
    # no suggestion where the ratio is in the band (a histogram verdict is not a scale problem) or undetermined
    assert "scaling" not in str(E.dispersion_verdict([1.0]))
    assert "scaling" not in str(E.dispersion_verdict([1.0], [300] + [100] * 7 + [300]))
    d = E.dispersion_verdict([float("nan")])
    assert math.isnan(d.spread_scale) and "scaling" not in str(d)
