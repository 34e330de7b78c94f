"""The rollout core (diffkit.rollout) and the autoregressive spec (diffkit.layout), against exact references.

- An exact conditional denoiser: the standardised target y given the conditions is
  N(f(c), s^2) with f(c) = a * z + b per channel (z: the standardised latest input state), so
  after any number of steps y_k - f(c_k), recovered from the physical output with the spec, is
  i.i.d. N(0, s^2).  Member spread within 5 % of s, ensemble mean within 3 standard errors of
  f(c), after 1 and 5 steps, for target "state" and "residual" and s = 0.03, 0.1.
- Regression: exact shift dynamics; the perturbation policy (perturb=0: identical members;
  default: DEFAULT_PERTURB for members > 1, one noise field per member on every history state).
- Spatially correlated perturbations (``perturb_length``), on 1-, 2- and 3-D grids with periodic and
  non-periodic axes: unit variance at every point (edges included) and the correlation
  exp(-d^2 / (4 l^2)) at lag d of a Gaussian filter of std l (the kernel's autocorrelation), within
  4.5 standard errors estimated from 20 independent batches; periodic axes correlate across the
  boundary, the others do not; through the rollout: std ``perturb`` per point, never on the fixed
  mask, and ``perturb_length=0`` is the white noise draw for draw.
- The spec: round trip through Layout.to_dict/from_dict and weights_only checkpoints; old
  layouts; clear errors.
"""
from __future__ import annotations

import io
import math

import pytest
import torch
from torch import nn

from diffkit._shape import as_batch_time
from diffkit.denoiser import Cond, Regressor
from diffkit.errors import DiffkitError, NonFiniteError, ShapeError
from diffkit.layout import AutoregressiveSpec, Layout, history_channels
from diffkit.rollout import DEFAULT_PERTURB, correlated_noise, resolve_perturb, resolve_perturb_length, rollout
from diffkit import get_schedule

C, NX, H = 2, 8, 2                       # state channels, grid points, history states
SM, SS = (1.0, -2.0), (2.0, 0.5)         # state statistics (physical)
TM, TS = (0.1, -0.2), (0.3, 0.7)         # target statistics (the layout's mean/std)
A, B = (0.5, -0.3), (0.2, 0.1)           # f(c) = A * z_last + B, per channel (model units)


def make_layout(target="residual", history=H, horizon=1, step=6.0, scalars=()) -> Layout:
    spec = AutoregressiveSpec(variables=("u", "v"), history=history, horizon=horizon, step=step, step_units="hours",
                              target=target, state_mean=SM, state_std=SS)
    chans = [f"{'d' if target == 'residual' else ''}{v}@t+{k}" for k in range(1, horizon + 1) for v in ("u", "v")]
    col = lambda v: torch.tensor(v * horizon).reshape(-1, 1)
    return Layout(channels=tuple(chans), spatial=("x",), shape=(NX,), periodic=("x",),
                  cond_channels=history_channels(("u", "v"), history), scalars=scalars,
                  mean=col(TM), std=col(TS), autoregressive=spec)


def col(v):
    return torch.tensor(v, dtype=torch.float64).reshape(-1, 1)


class ExactConditional(nn.Module):
    """The denoiser contract (``layout``, ``schedule``, ``bind(cond)``) for y | c ~ N(f(c), s^2):
    the exact posterior mean E[y | y_t] = f + alpha s^2 / (alpha^2 s^2 + sigma^2) (y_t - alpha f)."""

    def __init__(self, layout: Layout, s: float):
        super().__init__()
        self.layout, self.s, self.schedule = layout, float(s), get_schedule("cosine")
        self.calls = 0

    def f(self, fields: torch.Tensor) -> torch.Tensor:
        h, Cs = self.layout.autoregressive.history, self.layout.autoregressive.num_variables
        z = fields[:, (h - 1) * Cs: h * Cs].double()
        return col(A) * z + col(B)

    def bind(self, cond: Cond, guidance=None):
        self.calls += 1
        mu, s2, sched = self.f(cond.fields), self.s ** 2, self.schedule

        class Bound:
            schedule = sched

            def __call__(_, x, t):
                a, sg = sched.coeffs(as_batch_time(t, x.shape[0], device=x.device))
                a, sg = a.reshape(-1, 1, 1), sg.reshape(-1, 1, 1)
                return (mu + a * s2 / (a * a * s2 + sg * sg) * (x.double() - a * mu)).to(x.dtype)
        return Bound()


def recovered(pred: torch.Tensor, history: torch.Tensor, layout: Layout):
    """(y, f) per member and step in model units: y from the physical output through the spec, f
    from each member's own previous state."""
    spec = layout.autoregressive
    N, M, K = pred.shape[:3]
    prev = torch.cat([history[:, None, -1:].expand(N, M, 1, C, NX), pred[:, :, :-1]], 2).double()   # (N, M, K, C, x)
    tgt = spec.target_from(prev, pred.double())
    y = (tgt - col(TM)) / col(TS)
    f = col(A) * ((prev - col(SM)) / col(SS)) + col(B)
    return y, f


def initial_history(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return (torch.randn((n, H, C, NX), generator=g, dtype=torch.float64) * col(SS) + col(SM)).float()


GRID = dict(sampler="dpmpp_2m", nfe=20, spacing="logsnr")


@pytest.mark.parametrize("target", ["state", "residual"])
@pytest.mark.parametrize("s", [0.03, 0.1])
@pytest.mark.parametrize("steps", [1, 5])
def test_exact_conditional_denoiser_gives_the_conditional_law(target, s, steps):
    L = make_layout(target)
    model = ExactConditional(L, s)
    N, M = 4, 128
    hist = initial_history(N)
    pred = rollout(model, hist, steps, M, seed=1, **GRID)
    assert pred.shape == (N, M, steps, C, NX) and pred.dtype == torch.float32
    assert model.calls == steps                                 # one sampler run per step, all members at once
    y, f = recovered(pred, hist, L)
    r = (y - f)                                                 # i.i.d. N(0, s^2) at every step
    for k in range(steps):
        rk = r[:, :, k]
        assert abs(float(rk.std()) / s - 1) < 0.05, (k, float(rk.std()))
        n = rk.numel()
        assert abs(float(rk.mean())) < 3 * s / math.sqrt(n)
    # member spread about the ensemble mean, and the ensemble mean against f(c) at step 1 (same c for all members)
    y1, f1 = y[:, :, 0], f[:, 0, 0]
    spread = float(y1.std(1).pow(2).mean().sqrt())
    assert abs(spread / s - 1) < 0.05
    zmean = (y1.mean(1) - f1) / (s / math.sqrt(M))              # (N, C, x): standard normal
    assert abs(float(zmean.mean())) < 3 / math.sqrt(zmean.numel()) and float(zmean.abs().max()) < 4.5


def test_exact_conditional_denoiser_with_the_runs_defaults():
    """No sampler/nfe/spacing: the run's [sample] section (here the config defaults)."""
    from diffkit.config import Config

    L = make_layout("residual")
    s = 0.1
    hist = initial_history(4)
    pred = rollout(ExactConditional(L, s), hist, 2, 128, seed=3, config=Config())
    y, f = recovered(pred, hist, L)
    r = y - f
    assert abs(float(r.std()) / s - 1) < 0.05
    assert abs(float(r.mean())) < 3 * s / math.sqrt(r.numel())
    # and without any config: the SampleConfig defaults, the same numbers
    torch.testing.assert_close(rollout(ExactConditional(L, s), hist, 2, 128, seed=3), pred, rtol=0, atol=0)


def test_horizon_above_one_and_steps_not_a_multiple():
    L = make_layout("state", horizon=3)
    model = ExactConditional(L, 0.05)

    def f3(fields):  # the same law for each of the 3 predicted states, from the latest input
        return ExactConditional.f(model, fields).repeat(1, 3, 1)
    model.f = f3
    hist = initial_history(3)
    pred = rollout(model, hist, 7, 16, seed=0, **GRID)
    assert pred.shape == (3, 16, 7, C, NX) and model.calls == 3
    # the first call's three states all follow from the initial history; the 4th from the 3rd predicted state
    z = (hist[:, -1].double() - col(SM)) / col(SS)
    y = (pred.double() - col(TM)) / col(TS)
    r = y[:, :, :3] - (col(A) * z + col(B))[:, None, None]
    assert abs(float(r.std()) / 0.05 - 1) < 0.05
    z3 = (pred[:, :, 2].double() - col(SM)) / col(SS)
    r4 = y[:, :, 3] - (col(A) * z3 + col(B))
    assert abs(float(r4.std()) / 0.05 - 1) < 0.1


def test_seeded_and_a_generator_is_the_seed():
    L = make_layout("residual")
    hist = initial_history(2)
    run = lambda **kw: rollout(ExactConditional(L, 0.1), hist, 3, 4, **GRID, **kw)
    a, b, c = run(seed=5), run(seed=5), run(seed=6)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert torch.equal(run(generator=torch.Generator().manual_seed(5)), a)


# ----------------------------------------------------------------------------- regression
class ShiftNet(nn.Module):
    """The exact one-step map next = roll(state, 1) from the ``use``-th history state (-1: latest)."""

    def __init__(self, layout: Layout, use: int = -1, shift: int = 1, nan_at: int | None = None):
        super().__init__()
        self.w = nn.Parameter(torch.zeros(()))
        self.layout, self.use, self.shift, self.nan_at, self.calls = layout, use, shift, nan_at, 0

    def forward(self, x, c_noise, scalars=None, labels=None):
        self.calls += 1
        spec = self.layout.autoregressive
        Bn = x.shape[0]
        f = x[:, self.layout.num_channels:]
        hist = spec.destandardize(f[:, : spec.history * C].reshape(Bn, spec.history, C, NX), 1)
        last = hist[:, -1]
        nxt = torch.roll(hist[:, self.use], self.shift, dims=-1)
        y = self.layout.normalize(spec.target_from(last, nxt))
        if self.nan_at is not None and self.calls == self.nan_at:
            y = y.clone()
            y[0, 0, 0] = float("nan")
        return y + 0 * self.w


@pytest.mark.parametrize("target", ["state", "residual"])
def test_regression_reproduces_exact_shift_dynamics(target):
    L = make_layout(target)
    net = ShiftNet(L)
    hist = initial_history(3)
    pred = rollout(Regressor(net, L), hist, 6, 2, perturb=0)
    assert net.calls == 6
    truth = torch.stack([torch.roll(hist[:, -1], k, dims=-1) for k in range(1, 7)], 1)
    torch.testing.assert_close(pred, truth[:, None].expand_as(pred), atol=2e-5, rtol=0)


def test_perturbation_policy():
    L = make_layout("state")
    hist = initial_history(3)
    M = 256
    # perturb = 0: identical members, whatever the seed
    p0 = rollout(Regressor(ShiftNet(L, shift=0), L), hist, 2, 4, perturb=0, seed=0)
    assert torch.equal(p0[:, 0], p0[:, 1]) and torch.equal(p0, rollout(Regressor(ShiftNet(L, shift=0), L), hist, 2, 4,
                                                                          perturb=0, seed=9))
    # the default for a regression model with M > 1 is DEFAULT_PERTURB x state_std, every member perturbed
    last = rollout(Regressor(ShiftNet(L, use=-1, shift=0), L), hist, 1, M, seed=2)
    oldest = rollout(Regressor(ShiftNet(L, use=0, shift=0), L), hist, 1, M, seed=2)
    e_last = (last[:, :, 0].double() - hist[:, None, -1].double()) / col(SS)
    e_old = (oldest[:, :, 0].double() - hist[:, None, 0].double()) / col(SS)
    assert abs(float(e_last.std()) / DEFAULT_PERTURB - 1) < 0.05
    assert abs(float(e_last.mean())) < 3 * DEFAULT_PERTURB / math.sqrt(e_last.numel())
    assert bool((e_last.abs().amax((2, 3)) > 0).all())                    # no unperturbed control member
    torch.testing.assert_close(e_old, e_last, atol=1e-5, rtol=0)          # one noise field on every history state
    # an explicit perturb; one member: none by default; a diffusion model: none by default
    p = rollout(Regressor(ShiftNet(L, shift=0), L), hist, 1, M, perturb=0.2, seed=2)
    e = (p[:, :, 0].double() - hist[:, None, -1].double()) / col(SS)
    assert abs(float(e.std()) / 0.2 - 1) < 0.05
    one = rollout(Regressor(ShiftNet(L, shift=0), L), hist, 1, 1, seed=2)
    torch.testing.assert_close(one[:, 0, 0], hist[:, -1], atol=1e-5, rtol=0)
    reg, den = Regressor(ShiftNet(L), L), ExactConditional(L, 0.1)
    assert resolve_perturb(None, reg, 2) == DEFAULT_PERTURB and resolve_perturb(None, reg, 1) == 0.0
    assert resolve_perturb(None, den, 8) == 0.0 and resolve_perturb(0.3, den, 8) == 0.3
    with pytest.raises(ValueError, match="perturb must be >= 0"):
        resolve_perturb(-0.1, reg, 2)


def _lag_corr(x: torch.Tensor, axis: int, d: int, periodic: bool) -> torch.Tensor:
    """The correlation at lag ``d`` along ``axis`` of unit-variance fields ``x`` (batch dim 0), per batch."""
    a = x.movedim(axis, -1)
    pair = a * a.roll(-d, -1) if periodic else a[..., :-d] * a[..., d:]
    return pair.flatten(1).mean(1)


def _estimate(values: torch.Tensor, batches: int = 20):
    """Mean and standard error of a per-sample statistic from ``batches`` independent batch means."""
    b = values.reshape(batches, -1).mean(1)
    return float(b.mean()), float(b.std() / math.sqrt(batches))


@pytest.mark.parametrize("shape,length,periodic", [
    ((48,), (2.0,), (True,)),
    ((48,), (2.0,), (False,)),
    ((16, 24), (1.5, 3.0), (False, True)),
    ((8, 10, 12), (1.0, 2.0, 0.0), (True, False, True)),
])
def test_correlated_perturbations_have_unit_variance_and_gaussian_correlation(shape, length, periodic):
    n = 6000 if len(shape) == 1 else 2000
    g = torch.Generator().manual_seed(1)
    x = correlated_noise((n, *shape), length, periodic, generator=g).double()
    assert x.shape == (n, *shape) and x.dtype == torch.float64
    # unit variance at every point, the edges of the non-periodic axes included
    var = x.square().mean(0)
    se_var = math.sqrt(2 / n)
    assert abs(float(var.mean()) - 1) < 4.5 * se_var * 2     # the points are correlated: a looser bound on the mean
    assert float((var - 1).abs().max()) < 5.5 * se_var
    for ax in range(len(shape)):
        edge = var.movedim(ax, 0)
        assert abs(float(edge[0].mean()) - 1) < 4.5 * se_var and abs(float(edge[-1].mean()) - 1) < 4.5 * se_var
    for ax, (l, p) in enumerate(zip(length, periodic)):
        for d in (1, 2, 3):
            if d >= shape[ax] // 2:
                continue
            exact = math.exp(-d * d / (4 * l * l)) if l > 0 else 0.0
            est, se = _estimate(_lag_corr(x, ax + 1, d, p))
            assert abs(est - exact) < 4.5 * se + 1e-4, (ax, d, est, exact, se)
        # across the boundary: neighbours on a periodic axis, unrelated on the others
        a = x.movedim(ax + 1, -1)
        est, se = _estimate((a[..., 0] * a[..., -1]).reshape(n, -1).mean(1))
        exact = math.exp(-1 / (4 * l * l)) if (p and l > 0) else math.exp(-(shape[ax] - 1) ** 2 / (4 * l * l)) \
            if l > 0 else 0.0
        assert abs(est - exact) < 4.5 * se + 1e-4, (ax, est, exact)
    # every length 0 is torch.randn itself
    w = correlated_noise((3, *shape), (0.0,) * len(shape), periodic, generator=torch.Generator().manual_seed(5))
    assert torch.equal(w, torch.randn((3, *shape), generator=torch.Generator().manual_seed(5)))


def test_correlated_perturbations_in_the_rollout_respect_std_periodicity_and_fixed_mask():
    M, amp, l = 512, 0.2, 1.5
    hist = initial_history(2)
    fm = torch.zeros(C, NX, dtype=torch.bool)
    fm[1, 3] = True
    for periodic in (True, False):
        L = make_layout("state")
        L = L if periodic else L.replace(periodic=())
        model = Regressor(ShiftNet(L, use=-1, shift=0), L)
        p = rollout(model, hist, 1, M, perturb=amp, perturb_length=l, fixed_mask=fm, seed=3)
        e = ((p[:, :, 0].double() - hist[:, None, -1].double()) / col(SS))        # (N, M, C, x)
        assert bool(p[:, :, 0, 1, 3].isnan().all())                               # the fixed mask: untouched
        e = e.reshape(-1, C, NX)
        valid = e[:, 0]                                                             # channel 0: no masked point
        sd = valid.std(0)
        assert float((sd / amp - 1).abs().max()) < 5.5 / math.sqrt(2 * e.shape[0])
        z = valid / amp
        est, se = _estimate(_lag_corr(z, 1, 1, periodic), batches=16)
        assert abs(est - math.exp(-1 / (4 * l * l))) < 4.5 * se + 1e-4
        est, se = _estimate(z[:, 0] * z[:, -1], batches=16)
        assert abs(est - (math.exp(-1 / (4 * l * l)) if periodic else math.exp(-49 / (4 * l * l)))) < 4.5 * se + 1e-4
    # perturb_length = 0 (the default) is the white noise of before, draw for draw
    L = make_layout("state")
    model = Regressor(ShiftNet(L, use=-1, shift=0), L)
    p = rollout(model, hist, 1, 4, perturb=0.2, seed=7)
    p0 = rollout(model, hist, 1, 4, perturb=0.2, perturb_length=0, seed=7)
    assert torch.equal(p, p0)
    white = torch.randn((2 * 4, 1, C, NX), generator=torch.Generator().manual_seed(7))[:, 0] * 0.2
    e = (p[:, :, 0].double() - hist[:, None, -1].double()) / col(SS)
    torch.testing.assert_close(e.reshape(8, C, NX), white.double(), atol=2e-5, rtol=0)


def test_perturb_length_errors():
    assert resolve_perturb_length(2, 3) == (2.0, 2.0, 2.0) and resolve_perturb_length([1, 0], 2) == (1.0, 0.0)
    with pytest.raises(ValueError, match=r"perturb_length has 2 value\(s\) \[1.0, 2.0\], but the grid has 1 spatial"):
        resolve_perturb_length([1, 2], 1)
    with pytest.raises(ValueError, match="perturb_length must be >= 0 and finite"):
        resolve_perturb_length(-1, 2)
    with pytest.raises(ValueError, match="perturb_length must be >= 0 and finite"):
        resolve_perturb_length(float("nan"), 2)
    with pytest.raises(ValueError, match="perturb_length must be a number or one number per spatial axis"):
        resolve_perturb_length("wide", 2)
    L = make_layout("state")
    with pytest.raises(ValueError, match="perturb_length has 3 value"):
        rollout(Regressor(ShiftNet(L), L), initial_history(1), 1, 2, perturb_length=(1, 1, 1))


def test_fixed_mask_and_missing_values():
    L = make_layout("state")
    hist = initial_history(2)
    fm = torch.zeros(C, NX, dtype=torch.bool)
    fm[1, 3] = True
    hist[:, :, 1, 3] = float("nan")
    model = Regressor(ShiftNet(L, shift=0), L)
    p = rollout(model, hist, 2, 8, fixed_mask=fm, seed=0)
    assert bool(p[..., 1, 3].isnan().all()) and bool(torch.isfinite(p[..., ~fm]).all())
    hist2 = hist.clone()
    hist2[0, 0, 0, 0] = float("nan")
    with pytest.raises(NonFiniteError, match="initial states hold NaN or inf at 1 value"):
        rollout(model, hist2, 1, 2, fixed_mask=fm)
    rollout(model, hist2, 1, 2, fixed_mask=fm, allow_missing=True)      # the hook's business then


def test_condition_hook_gets_the_step_and_the_history():
    L = make_layout("state", scalars=("c",))
    seen = []

    def condition(k, hist, fields):
        seen.append((k, tuple(hist.shape), tuple(fields.shape)))
        return Cond(fields=fields, scalars=torch.full((fields.shape[0], 1), float(k)))
    rollout(Regressor(ShiftNet(L), L), initial_history(3), 4, 2, condition=condition, perturb=0)
    assert seen == [(k, (6, H, C, NX), (6, H * C, NX)) for k in range(4)]


def test_non_finite_prediction_names_the_step():
    L = make_layout("residual")
    with pytest.raises(NonFiniteError, match=r"at step 3 \(lead 18 hours\)"):
        rollout(Regressor(ShiftNet(L, nan_at=3), L), initial_history(2), 5, 1)


def test_clear_errors():
    L = make_layout("state")
    model = Regressor(ShiftNet(L), L)
    with pytest.raises(ShapeError, match=r"history has shape \(2, 1, 2, 8\), expected \(N, 2, 2, 8\)"):
        rollout(model, initial_history(2)[:, :1], 1)
    with pytest.raises(ValueError, match="steps and members must be integers >= 1"):
        rollout(model, initial_history(2), 0)
    plain = L.replace(autoregressive=None)
    with pytest.raises(DiffkitError, match="no autoregressive spec"):
        rollout(Regressor(ShiftNet(L), plain), initial_history(2), 1)


# ----------------------------------------------------------------------------- the spec
def test_spec_round_trips_through_layout_dicts_and_weights_only_checkpoints():
    L = make_layout("residual", horizon=2)
    d = L.to_dict()
    assert d["autoregressive"] == {"variables": ["u", "v"], "history": 2, "horizon": 2, "step": 6.0,
                                   "step_units": "hours", "frame_step": 1, "target": "residual",
                                   "state_mean": [1.0, -2.0], "state_std": [2.0, 0.5]}
    buf = io.BytesIO()
    torch.save(d, buf)
    buf.seek(0)
    back = Layout.from_dict(torch.load(buf, weights_only=True))
    assert back.autoregressive == L.autoregressive and back.channels == L.channels
    assert Layout.from_dict(make_layout().replace(autoregressive=None).to_dict()).autoregressive is None
    spec = L.autoregressive
    assert spec.history_channels == ("u@t-1", "v@t-1", "u@t", "v@t") == history_channels(["u", "v"], 2)
    assert history_channels(["u"], 1) == ("u@t",)


def test_spec_target_and_state_are_inverse():
    x, last = torch.randn(3, 2, 8), torch.randn(2, 8)
    for target in ("state", "residual"):
        sp = AutoregressiveSpec(("u", "v"), target=target, state_mean=SM, state_std=SS)
        torch.testing.assert_close(sp.state_from(last, sp.target_from(last, x)), x)
        torch.testing.assert_close(sp.destandardize(sp.standardize(x, 1), 1), x)
    sp = AutoregressiveSpec(("u", "v"), target="residual", state_mean=SM, state_std=SS)
    assert torch.equal(sp.target_from(last, x), x - last)


def test_old_layout_attrs_convert():
    """A layout dict as written before Layout.autoregressive: the spec in attrs.  It loads (with
    autoregressive None) and the domain converts it with AutoregressiveSpec.from_legacy_attrs."""
    new = make_layout("residual")
    old = new.to_dict()
    del old["autoregressive"]
    old["attrs"] = {"adapter": "x", "history": 2, "target": "residual", "state_mean": list(SM), "state_std": list(SS)}
    L = Layout.from_dict(old)
    assert L.autoregressive is None
    spec = AutoregressiveSpec.from_legacy_attrs(L.attrs, variables=("u", "v"), step=6.0, step_units="hours")
    assert spec == new.autoregressive
    with pytest.raises(ValueError, match="attrs lack state_mean, state_std"):
        AutoregressiveSpec.from_legacy_attrs({"history": 1, "target": "state"}, variables=("u",))


def test_spec_and_layout_errors():
    with pytest.raises(ValueError, match="target must be one of state, residual"):
        AutoregressiveSpec(("u",), target="delta", state_mean=[0], state_std=[1])
    with pytest.raises(ValueError, match="state_mean has 1 value"):
        AutoregressiveSpec(("u", "v"), state_mean=[0], state_std=[1, 1])
    with pytest.raises(ValueError, match="state_std has entries <= 0"):
        AutoregressiveSpec(("u",), state_mean=[0], state_std=[0])
    with pytest.raises(ValueError, match="history must be an integer >= 1"):
        AutoregressiveSpec(("u",), history=0, state_mean=[0], state_std=[1])
    spec = AutoregressiveSpec(("u", "v"), history=2, state_mean=SM, state_std=SS)
    with pytest.raises(ValueError, match="cond_channels must begin with the history channels"):
        Layout(channels=("u", "v"), spatial=("x",), shape=(NX,), cond_channels=("u@t", "v@t"), autoregressive=spec)
    with pytest.raises(ValueError, match="horizon \\* len\\(variables\\) target channels"):
        Layout(channels=("u",), spatial=("x",), shape=(NX,), cond_channels=spec.history_channels, autoregressive=spec)
