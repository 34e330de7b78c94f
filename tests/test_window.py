"""Window models and universal-amortised conditioning (issue 15 item 2, ``diffkit.window``).

- window data sets built from the ``pde`` adapter are the raw trajectory frames;
- the training masks follow their probabilities and never observe everything;
- the layout's window declaration survives a checkpoint, and old layouts load without one;
- exact references: with a Gaussian (AR(1) in time, correlated in space) prior and the exact
  conditional denoiser, the amortised sampler gives the closed-form conditional mean and
  covariance, the autoregressive window composition the closed-form joint of the Markov chain
  within Monte-Carlo error, and SDA's composition the joint with a bias that falls with the window;
- a tiny model trains on PDE data (1-D and 2-D fields) and samples finite members of the right shape.

Deterministic samplers map their initial noise affinely to the output, so pushing the zero vector
and the identity through one (``noise=``) gives the sampler's exact output mean and covariance
without Monte-Carlo error; the stochastic checks use seeded ensembles.
"""
from __future__ import annotations

import math
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

try:
    import diffkit_pde as P
except ImportError:  # editable install made before the plugin existed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
    import diffkit_pde as P

import xarray as xr

from diffkit import get_schedule
from diffkit._shape import as_batch_time
from diffkit.checkpoint import capture_rng_state, load_checkpoint, restore_rng_state, save_checkpoint
from diffkit.config import config_from_dict
from diffkit.errors import ConfigError, NonFiniteError, ObservationError, ShapeError
from diffkit.layout import Layout, WindowSpec, window_channels
from diffkit.window import (ComposedDenoiser, MaskDistribution, WindowAdapter, WindowError, composition_starts,
                            sample_amortised, sample_trajectory, window_options)
from diffkit_pde.adapter import TrajectoryAdapter

TINY_UNET = {"channels": 8, "channel_mult": [1, 2], "num_res_blocks": 1, "attn_levels": [], "mid_attn": False}
SCHED = get_schedule("cosine")


# ============================================================================= exact Gaussian window models
def ar1_cov(n_states: int, phi: float, K: torch.Tensor) -> torch.Tensor:
    """Covariance of ``n_states`` states of the stationary AR(1) chain ``x' = phi x + sqrt(1 - phi^2) xi``,
    ``xi ~ N(0, K)``: ``phi^|i-j| K`` (step-major, as window channels flatten)."""
    i = torch.arange(n_states, dtype=torch.float64)
    return torch.kron(phi ** (i[:, None] - i[None]).abs(), K)


def conditional(S: torch.Tensor, obs: torch.Tensor, y: torch.Tensor):
    """Closed form of ``x ~ N(0, S)`` given ``x[obs] = y``: mean and covariance of the unobserved entries."""
    U = ~obs
    if not obs.any():
        return torch.zeros(int(U.sum()), dtype=S.dtype), S[U][:, U]
    G = S[U][:, obs] @ torch.linalg.inv(S[obs][:, obs])
    return G @ y[obs], S[U][:, U] - G @ S[U][:, obs].T


class ExactWindowGaussian:
    """A window 'model' of ``x0 ~ N(0, cov)`` (flattened windows) with the exact (conditional)
    denoiser ``E[x0 | x_t, x0[mask] = values]``; an amortised layout reads values and mask from the
    conditioning fields, as a trained network does."""

    def __init__(self, layout: Layout, cov: torch.Tensor):
        self.layout, self.schedule, self.cov = layout, SCHED, cov

    def parameters(self):
        return iter(())

    def __call__(self, x, t, cond=None):
        B, n = x.shape[0], self.cov.shape[0]
        a, s = SCHED.coeffs(as_batch_time(t, B, device=x.device))
        assert bool((a == a[0]).all()), "one time per call"
        a, s = float(a[0]), float(s[0])
        xf = x.reshape(B, n).double()
        if self.layout.window.noise:
            return self._noisy(xf, cond, a, s).reshape(x.shape).to(x.dtype)
        if self.layout.window.conditioning == "amortised":
            f = cond.fields[:, :2 * x.shape[1]].reshape(B, 2, n).double()
            vals, mask = f[:, 0], f[:, 1] > 0.5
        else:
            vals, mask = torch.zeros_like(xf), torch.zeros_like(xf, dtype=torch.bool)
        out = torch.empty_like(xf)
        assert n < 63
        keys = (mask.long() << torch.arange(n)).sum(1)  # one integer per mask pattern (unique(dim=0) is slow)
        for key in keys.unique().tolist():
            rows = keys == key
            O = mask[rows.nonzero()[0, 0]]
            U = ~O
            if O.any():
                G = self.cov[U][:, O] @ torch.linalg.inv(self.cov[O][:, O])
                mu, Sc = vals[rows][:, O] @ G.T, self.cov[U][:, U] - G @ self.cov[U][:, O].T
            else:
                mu, Sc = torch.zeros(int(rows.sum()), int(U.sum()), dtype=torch.float64), self.cov
            gain = a * Sc @ torch.linalg.inv(a * a * Sc + s * s * torch.eye(Sc.shape[0], dtype=torch.float64))
            r = torch.empty(int(rows.sum()), n, dtype=torch.float64)
            r[:, U] = mu + (xf[rows][:, U] - a * mu) @ gain.T
            r[:, O] = vals[rows][:, O]
            out[rows] = r
        return out.reshape(x.shape).to(x.dtype)

    def _noisy(self, xf, cond, a: float, s: float):
        """``E[x0 | x_t, y]`` with ``y = x0[mask] + sigma * eps`` (sigma = 0: exact), row by row: the
        posterior ``N(mu, Sc)`` given ``y``, then the Gaussian denoiser of that posterior."""
        B, n = xf.shape
        f = cond.fields[:, :3 * n].reshape(B, 3, n).double()
        out = torch.empty_like(xf)
        eye = torch.eye(n, dtype=torch.float64)
        for b in range(B):
            O = f[b, 1] > 0.5
            G = self.cov[:, O] @ torch.linalg.inv(self.cov[O][:, O] + torch.diag(f[b, 2][O] ** 2))
            mu, Sc = G @ f[b, 0][O], self.cov - G @ self.cov[O]
            out[b] = mu + a * Sc @ torch.linalg.solve(a * a * Sc + s * s * eye, xf[b] - a * mu)
        return out


def window_model(k: int, phi: float, K: torch.Tensor, *, amortised: bool, noise: bool = False,
                 mean: float = 0.0, std: float = 1.0) -> ExactWindowGaussian:
    """The exact window model; ``mean`` / ``std``: the layout's physical units (the model works in standardised ones)."""
    n_space = K.shape[0]
    spec = WindowSpec(("u",), k, conditioning="amortised" if amortised else "none", noise=noise)
    stats = {} if (mean, std) == (0.0, 1.0) else {"mean": torch.full((k, 1), mean), "std": torch.full((k, 1), std)}
    lay = Layout(channels=spec.channels, spatial=("x",), shape=(n_space,), window=spec,
                 cond_channels=spec.observation_channels, **stats)
    return ExactWindowGaussian(lay, ar1_cov(k, phi, K))


def pushed_moments(draw, n: int):
    """Exact output mean and covariance of a deterministic sampler run ``draw(noise)`` (affine in the
    noise ``(n + 1, n)``: row 0 zero, then the identity), as flattened ``(n,)`` / ``(n, n)``."""
    z = torch.cat([torch.zeros(1, n, dtype=torch.float64), torch.eye(n, dtype=torch.float64)])
    out = draw(z).reshape(n + 1, -1)
    mean = out[0]
    A = out[1:] - mean
    return mean, A.T @ A


K3 = torch.tensor([[1.0, 0.6, 0.6], [0.6, 1.0, 0.6], [0.6, 0.6, 1.0]], dtype=torch.float64)  # periodic GP, 3 points


# ============================================================================= 1. window data sets
def _traj_file(path, n=4, T=9, shape=(6,), variables=("u",), seed=0) -> tuple[Path, dict]:
    rng = np.random.default_rng(seed)
    dims = ("trajectory", "time") + ("x", "y")[:len(shape)]
    data = {v: rng.normal(size=(n, T, *shape)) * (1 + i) + 3 * i for i, v in enumerate(variables)}
    coords = {d: np.arange(s) / s for d, s in zip(dims[2:], shape)}
    xr.Dataset({**{v: (dims, a) for v, a in data.items()}, "dt": ("trajectory", np.full(n, 0.5))},
               coords=coords).to_netcdf(path)
    return Path(path), data


@pytest.mark.parametrize("shape,variables,history,horizon,target", [
    ((6,), ("u",), 1, 2, "state"),
    ((6,), ("u",), 2, 2, "residual"),
    ((4, 5), ("u", "v"), 2, 1, "residual"),
    ((4, 5), ("u", "v"), 1, 3, "state"),
])
def test_window_dataset_matches_trajectory_frames(tmp_path, shape, variables, history, horizon, target):
    path, data = _traj_file(tmp_path / "t.nc", shape=shape, variables=variables)
    inner = TrajectoryAdapter(str(path), variables=list(variables), history=history, horizon=horizon, target=target,
                              val_fraction=0.25)
    k, C = history + horizon, len(variables)
    wa = WindowAdapter(inner, k)
    L = wa.layout
    assert L.channels == window_channels(variables, k) and L.window.length == k and L.autoregressive is None
    assert L.cond_channels == () and L.shape == shape and L.periodic == inner.layout.periodic
    sm = torch.tensor(inner.layout.autoregressive.state_mean, dtype=torch.float64)
    ss = torch.tensor(inner.layout.autoregressive.state_std, dtype=torch.float64)
    ds = wa.dataset("train")
    T = next(iter(data.values())).shape[1]
    per = T - k + 1
    assert len(ds) == 3 * per
    for i in range(len(ds)):
        tr, s = divmod(i, per)
        x = ds[i]["x"]
        assert x.shape == (k * C, *shape) and x.dtype == torch.float32
        raw = torch.from_numpy(np.stack([data[v][tr, s:s + k] for v in variables], 1))  # (k, C, *S)
        phys = L.denormalize(x.double()).reshape(k, C, *shape)
        torch.testing.assert_close(phys, raw, rtol=1e-5, atol=1e-5 * float(raw.abs().max()))
        # the layout's statistics are the per-variable state statistics, repeated per state
        z = (raw - sm.reshape(-1, *[1] * len(shape))) / ss.reshape(-1, *[1] * len(shape))
        torch.testing.assert_close(x.double().reshape(k, C, *shape), z, rtol=1e-5, atol=1e-5)


def test_window_amortised_items_hold_values_mask_and_weight(tmp_path):
    path, _ = _traj_file(tmp_path / "t.nc", shape=(6,))
    inner = TrajectoryAdapter(str(path), history=1, horizon=3, val_fraction=0.25)
    wa = WindowAdapter(inner, 4, amortised=True, masks=MaskDistribution(0.3, 0.3, 0.3), seed=5)
    L = wa.layout
    assert L.cond_channels == tuple(f"obs:u@t+{j}" for j in range(4)) + tuple(f"mask:u@t+{j}" for j in range(4))
    ds = wa.dataset("train")
    plain = WindowAdapter(inner, 4).dataset("train")
    for i in range(len(ds)):
        it = ds[i]
        x, f, w = it["x"], it["fields"], it["weight"]
        torch.testing.assert_close(x, plain[i]["x"])
        m = f[4:]
        assert set(m.unique().tolist()) <= {0.0, 1.0} and not bool(m.all())
        torch.testing.assert_close(f[:4], x * m)
        torch.testing.assert_close(w, 1 - m)
    # masks are a function of (seed, epoch, item): the same again, others in the next epoch
    again = wa.dataset("train")
    assert all(torch.equal(again[i]["fields"], ds[i]["fields"]) for i in range(len(ds)))
    again.set_epoch(1)
    assert any(not torch.equal(again[i]["fields"], ds[i]["fields"]) for i in range(len(ds)))


def test_window_noisy_amortised_items_hold_noisy_values_sigma_and_weight(tmp_path):
    """data.mask_noise: the same masks as without it (same seed), the sparse points observed with noise of one
    std per window in [low, high], that std as input channels, and the loss on every element not observed
    exactly (the noisy points included); the observed past states stay exact."""
    path, _ = _traj_file(tmp_path / "t.nc", n=8, T=12, shape=(16,))
    inner = TrajectoryAdapter(str(path), history=1, horizon=3, val_fraction=0.25)
    dist = MaskDistribution(0.3, 0.3, 0.3, fraction=(0.2, 0.6), noise=(0.05, 0.5))
    wa = WindowAdapter(inner, 4, amortised=True, masks=dist, seed=5)
    L = wa.layout
    assert L.window.noise and L.cond_channels == L.window.value_channels + L.window.mask_channels + tuple(
        f"sigma:u@t+{j}" for j in range(4))
    ds = wa.dataset("train")
    exact = WindowAdapter(inner, 4, amortised=True, masks=MaskDistribution(0.3, 0.3, 0.3, fraction=(0.2, 0.6)),
                          seed=5).dataset("train")
    z, n_noisy = [], 0
    for i in range(len(ds)):
        it = ds[i]
        x, f, w = it["x"], it["fields"], it["weight"]
        v, m, sg = f[:4], f[4:8], f[8:]
        torch.testing.assert_close(m, exact[i]["fields"][4:])  # the mask draw is unchanged
        assert not bool(sg[m == 0].any()) and bool((sg >= 0).all())
        levels = sg[sg > 0].unique()
        assert levels.numel() <= 1 and bool(((levels >= 0.05) & (levels <= 0.5 + 1e-6)).all())
        ex = (m > 0) & (sg == 0)
        torch.testing.assert_close(v[ex], x[ex])  # exact entries: the state
        torch.testing.assert_close(w, 1 - ex.to(w.dtype))
        if levels.numel():
            n_noisy += 1
            z.append(((v - x)[sg > 0] / sg[sg > 0]).double())
    z = torch.cat(z)
    assert n_noisy > 5 and z.numel() > 100
    assert abs(float(z.mean())) < 4 / math.sqrt(z.numel()) and abs(float(z.std()) - 1) < 0.15


@pytest.mark.parametrize("amortised", [False, True])
def test_window_adapter_passes_the_adapter_contract_check(tmp_path, amortised):
    from diffkit.testing import check_adapter

    path, _ = _traj_file(tmp_path / "t.nc", shape=(4, 5), variables=("u", "v"))
    inner = TrajectoryAdapter(str(path), variables=["u", "v"], history=1, horizon=2, val_fraction=0.25)
    check_adapter(WindowAdapter(inner, 3, amortised=amortised), n_items=4, workdir=tmp_path)


def test_window_length_must_be_history_plus_horizon(tmp_path):
    path, _ = _traj_file(tmp_path / "t.nc")
    inner = TrajectoryAdapter(str(path), history=2, horizon=1, val_fraction=0.25)
    with pytest.raises(WindowError, match=r"data.window = 4 needs windows of 4 states.*history 2 \+ horizon 1 = 3"):
        WindowAdapter(inner, 4)
    # left unset, history / horizon are filled in from the window
    assert window_options(TrajectoryAdapter, {"path": "p"}, 5) == {"path": "p", "history": 1, "horizon": 4}
    assert window_options(TrajectoryAdapter, {"history": 2}, 5) == {"history": 2}


def test_window_config_keys_are_validated():
    cfg = config_from_dict({"data": {"window": 4, "amortised": True, "mask_past": 0.5, "mask_points": 0.2,
                                     "mask_both": 0.1, "mask_fraction": [0.05, 0.2]}})
    assert cfg.data.window == 4 and cfg.data.amortised
    assert MaskDistribution.from_config(cfg.data) == MaskDistribution(0.5, 0.2, 0.1, (0.05, 0.2))
    noisy = config_from_dict({"data": {"window": 3, "amortised": True, "mask_noise": [0.01, 0.2]}})
    assert MaskDistribution.from_config(noisy.data).noise == (0.01, 0.2) and MaskDistribution.from_config(noisy.data).noisy
    for bad, msg in [({"window": 1}, "'data.window'.*0 \\(off\\) or a number of states >= 2"),
                     ({"amortised": True}, "'data.amortised'.*needs a window model"),
                     ({"mask_past": 0.6, "mask_points": 0.6}, "must be <= 1"),
                     ({"mask_both": 1.5}, "'data.mask_both'.*probability"),
                     ({"mask_fraction": [0.5, 0.1]}, "'data.mask_fraction'.*0 < low <= high <= 1"),
                     ({"window": 3, "amortised": True, "mask_noise": [0.2, 0.1]}, "'data.mask_noise'.*0 < low <= high"),
                     ({"window": 3, "mask_noise": [0.1, 0.2]}, "'data.mask_noise'.*needs amortised conditioning")]:
        with pytest.raises(ConfigError, match=msg) as ei:
            config_from_dict({"data": bad})
        assert "\n" not in str(ei.value)


# ============================================================================= 2. masks
def test_mask_drawing_respects_probabilities():
    dist = MaskDistribution(past=0.2, points=0.3, both=0.1, fraction=(0.05, 0.4))
    k, shape, n = 5, (2, 8), 4000
    g = torch.Generator().manual_seed(0)
    modes, fracs, js = {m: 0 for m in ("past", "points", "both", "none")}, [], []
    for _ in range(n):
        m, mode = dist.draw(k, shape, g)
        modes[mode] += 1
        assert m.shape == (k, *shape) and not bool(m.all())
        observed = m.reshape(k, -1).all(1)
        if mode == "none":
            assert not bool(m.any())
        elif mode == "past":
            j = int(observed.sum())
            assert 1 <= j <= k - 1 and bool(observed[:j].all()) and not bool(m[j:].any())  # target unobserved
            js.append(j)
        elif mode == "points":
            fracs.append(float(m.mean()))
        else:  # both: the first j states, then sparse points
            j = int(observed.long().cumprod(0).sum())
            assert 1 <= j <= k - 1
    for mode, p in dist.probabilities.items():
        assert abs(modes[mode] / n - p) < 4 * math.sqrt(p * (1 - p) / n), (mode, modes[mode] / n, p)
    # past: j uniform in 1..k-1
    counts = np.bincount(js, minlength=k)[1:]
    q = 1 / (k - 1)
    assert np.all(np.abs(counts / len(js) - q) < 4 * np.sqrt(q * (1 - q) / len(js)))
    # points: E[f] for f log-uniform in [lo, hi] is (hi - lo) / log(hi / lo)
    lo, hi = dist.fraction
    ef = (hi - lo) / math.log(hi / lo)
    assert abs(np.mean(fracs) - ef) < 4 * np.std(fracs) / math.sqrt(len(fracs))
    # a mask that would observe everything leaves the last state unobserved
    full = MaskDistribution(past=0.0, points=1.0, both=0.0, fraction=(1.0, 1.0))
    m, _ = full.draw(3, (4,), g)
    assert bool(m[:2].all()) and not bool(m[2].any())


def test_mask_distribution_rejects_bad_probabilities():
    with pytest.raises(WindowError, match="sum to <= 1"):
        MaskDistribution(0.5, 0.5, 0.5)
    with pytest.raises(WindowError, match="0 < low <= high <= 1"):
        MaskDistribution(fraction=(0.0, 0.5))
    with pytest.raises(WindowError, match=r"mask noise must be \(0, 0\) .* or \(low, high\)"):
        MaskDistribution(noise=(0.0, 0.5))


# ============================================================================= 3. layout round trip
def test_layout_window_declaration_round_trips_through_checkpoint(tmp_path):
    spec = WindowSpec(("u", "v"), 3, step=0.5, step_units="1", frame_step=2, conditioning="amortised")
    lay = Layout(channels=spec.channels, spatial=("x",), shape=(4,), cond_channels=spec.value_channels
                 + spec.mask_channels + ("static",), mean=torch.zeros(6, 1), std=torch.ones(6, 1), window=spec)
    p = save_checkpoint(tmp_path / "c.pt", {"layout": lay.to_dict()})
    back = Layout.from_dict(load_checkpoint(p, require=("layout",))["layout"])
    assert back.window == spec and back.cond_channels == lay.cond_channels
    assert back.window.mask_channels == tuple(f"mask:{c}" for c in spec.channels)
    # a layout saved before the window field existed loads with window None
    old = {k: v for k, v in lay.replace(window=None, cond_channels=()).to_dict().items() if k != "window"}
    assert Layout.from_dict(old).window is None
    # the declaration is checked
    with pytest.raises(ValueError, match=r"must begin with the amortised window's value, mask \(and noise\) channels"):
        Layout(channels=spec.channels, spatial=("x",), shape=(4,), window=spec)
    with pytest.raises(ValueError, match="must be the window's channels"):
        Layout(channels=("u", "v"), spatial=("x",), shape=(4,), window=WindowSpec(("u", "v"), 2))
    with pytest.raises(ValueError, match="length must be an integer >= 2"):
        WindowSpec(("u",), 1)
    with pytest.raises(ValueError, match="conditioning must be one of none, amortised"):
        WindowSpec(("u",), 2, conditioning="guided")
    with pytest.raises(ValueError, match="noise = true needs conditioning"):
        WindowSpec(("u",), 2, noise=True)
    # a noise-aware window declaration round-trips; one saved before the noise field loads as exact
    ns = WindowSpec(("u", "v"), 3, conditioning="amortised", noise=True)
    nl = Layout(channels=ns.channels, spatial=("x",), shape=(4,), cond_channels=ns.observation_channels,
                window=ns)
    assert Layout.from_dict(nl.to_dict()).window == ns and ns.noise_channels[0] == "sigma:u@t+0"
    d = lay.to_dict()
    d["window"] = {k: v for k, v in d["window"].items() if k != "noise"}
    assert Layout.from_dict(d).window.noise is False


# ============================================================================= 4. exact references
@pytest.mark.parametrize("kind", ["past", "points", "both", "none"])
def test_amortised_sampler_reproduces_gaussian_conditional(kind):
    k, phi = 4, 0.7
    model = window_model(k, phi, K3, amortised=True)
    n = k * 3
    g = torch.Generator().manual_seed(1)
    mask = torch.zeros(k, 3, dtype=torch.bool)
    if kind in ("past", "both"):
        mask[:2] = True
    if kind in ("points", "both"):
        mask[2, 1] = mask[3, 0] = True
    y = torch.randn(k, 3, generator=g, dtype=torch.float64)
    values = torch.where(mask, y, torch.full_like(y, float("nan")))[None, :, None]  # (1, k, 1, 3); NaN unobserved
    mean_ref, cov_ref = conditional(model.cov, mask.flatten(), y.flatten())
    U = ~mask.flatten()
    # deterministic sampler, exact moments of its output
    mean, cov = pushed_moments(lambda z: sample_amortised(model, values, mask[None, :, None], n + 1, sampler="heun",
                                                          nfe=199, noise=z.reshape(1, n + 1, k, 1, 3),
                                                          dtype=torch.float64), n)
    assert float((mean[U] - mean_ref).abs().max()) < 5e-3
    assert float((cov[U][:, U] - cov_ref).abs().max()) < 1e-2
    assert not bool(cov[~U].any())  # observed entries are the observations
    if kind != "both":
        return
    # a stochastic sampler: moments within Monte-Carlo error (and the observed entries exact)
    M = 2000
    x = sample_amortised(model, values, mask[None, :, None], M, sampler="ddpm", nfe=200, generator=g,
                         dtype=torch.float64).reshape(M, n)
    assert torch.equal(x[:, ~U], y.flatten()[~U].expand(M, -1))
    sd = cov_ref.diag().sqrt()
    assert bool(((x[:, U].mean(0) - mean_ref).abs() < 5 * sd / math.sqrt(M) + 5e-3).all())
    se = ((cov_ref.diag()[:, None] * cov_ref.diag()[None] + cov_ref**2) / M).sqrt()
    assert bool(((torch.cov(x[:, U].T) - cov_ref).abs() < 5 * se + 2e-2).all())


def _noisy_posterior(S: torch.Tensor, obs: torch.Tensor, y: torch.Tensor, sig: torch.Tensor):
    """Closed form of ``x ~ N(0, S)`` given ``y = x[obs] + sig * eps`` (``sig`` 0: exact): mean and covariance of every entry."""
    G = S[:, obs] @ torch.linalg.inv(S[obs][:, obs] + torch.diag(sig[obs] ** 2))
    return G @ y[obs], S - G @ S[obs]


@pytest.mark.parametrize("mean,std", [(0.0, 1.0), (5.0, 0.01)])
def test_amortised_sampler_with_noisy_observations_matches_gaussian_posterior(mean, std):
    """A model trained with noisy observations (WindowSpec.noise, data.mask_noise) given an exact past state
    and three noisy points (sigma 0.3 / 0.1 / 0.5 model units, one per value, in physical units): the
    closed-form posterior, at unit scale and at std 0.01 around 5 (sigma_y standardised with the state std);
    the exactly observed state is kept, the noisy points are not (they have posterior spread)."""
    k, phi = 4, 0.7
    model = window_model(k, phi, K3, amortised=True, noise=True, mean=mean, std=std)
    n = k * 3
    mask = torch.zeros(k, 3, dtype=torch.bool)
    mask[0] = True
    sig = torch.zeros(k, 3, dtype=torch.float64)
    for (i, j), v in zip([(1, 2), (2, 1), (3, 0)], (0.3, 0.1, 0.5)):
        mask[i, j], sig[i, j] = True, v
    y = torch.randn(k, 3, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    mean_ref, cov_ref = _noisy_posterior(model.cov, mask.flatten(), y.flatten(), sig.flatten())
    values = torch.where(mask, mean + std * y, torch.full_like(y, float("nan")))[None, :, None]
    m, s = mask[None, :, None], (std * sig)[None, :, None]
    mu, cov = pushed_moments(lambda z: sample_amortised(model, values, m, n + 1, sampler="heun", nfe=199, sigma=s,
                                                        noise=z.reshape(1, n + 1, k, 1, 3), dtype=torch.float64), n)
    # mean: 0.0069 at Heun 99, 199 and 399 NFE alike (the sampler's N(0, I) start against the exact
    # marginal at t = T, alpha_T = 6e-4; the exact-observation case has 0.0038), covariance 0.0019 at 199
    assert float(((mu - mean) / std - mean_ref).abs().max()) < 1e-2
    assert float((cov / std**2 - cov_ref).abs().max()) < 5e-3
    exact, noisy = mask.flatten() & (sig.flatten() == 0), sig.flatten() > 0
    assert torch.equal(mu[exact], values.flatten()[exact]) and not bool(cov[exact].any())
    assert bool((cov.diag()[noisy] / std**2 > 0.5 * cov_ref.diag()[noisy]).all())
    # sigma = 0 everywhere (or None) is the exact conditional of the exact-observation models
    mean0, _ = conditional(model.cov, mask.flatten(), y.flatten())
    z0 = torch.zeros(1, 1, k, 1, 3, dtype=torch.float64)
    for s0 in (None, 0.0):
        x = sample_amortised(model, values, m, 1, sampler="heun", nfe=99, sigma=s0, noise=z0, dtype=torch.float64)
        assert float(((x.flatten() - mean) / std)[~mask.flatten()].sub(mean0).abs().max()) < 1e-2


def test_sda_composition_with_noisy_amortised_observations_matches_posterior():
    """SDA's composition of a noise-aware amortised window model, three points observed with noise 0.3:
    the whole trajectory's closed-form posterior (as the exact-observation test, same tolerance)."""
    L, k, phi = 10, 7, 0.5
    K1 = torch.ones(1, 1, dtype=torch.float64)
    model = window_model(k, phi, K1, amortised=True, noise=True)
    S = ar1_cov(L, phi, K1)
    mask = torch.zeros(L, dtype=torch.bool)
    mask[[1, 4, 8]] = True
    y = torch.tensor([0.0, 1.2, 0, 0, -0.8, 0, 0, 0, 0.5, 0], dtype=torch.float64)
    mean_ref, cov_ref = _noisy_posterior(S, mask, y, torch.full((L,), 0.3, dtype=torch.float64))
    vals, m = y.reshape(1, L, 1, 1), mask.reshape(1, L, 1, 1)
    mean, cov = pushed_moments(lambda z: sample_trajectory(model, vals, m, L + 1, sampler="heun", nfe=199, sigma=0.3,
                                                           noise=z.reshape(1, L + 1, L, 1, 1), dtype=torch.float64), L)
    assert float((mean - mean_ref).abs().max()) < 0.02
    assert float((cov - cov_ref).abs().max()) < 0.02
    # the autoregressive composition passes sigma on too: the noisy points are not imposed
    x = sample_trajectory(model, vals, m, 2, method="autoregressive", sigma=0.3, nfe=5,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    assert x.shape == (1, 2, L, 1, 1) and not bool((x[0, :, mask] == y[mask]).any())


def test_autoregressive_window_composition_reproduces_markov_gaussian_joint():
    """Windows of 3 states of an AR(1) chain, each conditioned on the last state drawn: the exact
    conditional of a Markov chain, so the 8-state joint is reproduced within Monte-Carlo error."""
    k, L, phi, M = 3, 8, 0.8, 4000
    model = window_model(k, phi, K3[:1, :1], amortised=True)
    ref = ar1_cov(L, phi, K3[:1, :1])
    g = torch.Generator().manual_seed(2)
    x = sample_trajectory(model, length=L, members=M, method="autoregressive", overlap=1, sampler="dpmpp_2m",
                          nfe=40, generator=g, dtype=torch.float64).reshape(M, L)
    se = ((ref.diag()[:, None] * ref.diag()[None] + ref**2) / M).sqrt()
    err = (x.T @ x / M - ref).abs()
    assert bool((err < 5 * se + 2e-2).all()), float((err - 5 * se).max())  # 2e-2: the sampler's NFE-40 bias
    assert float(x.mean(0).abs().max()) < 5 / math.sqrt(M)
    # with observations: the observed states are kept exactly
    mask = torch.zeros(1, L, 1, 1, dtype=torch.bool)
    mask[0, [0, 5]] = True
    vals = torch.ones(1, L, 1, 1, dtype=torch.float64)
    x = sample_trajectory(model, vals, mask, 3, method="autoregressive", overlap=2, nfe=5, generator=g,
                          dtype=torch.float64)
    assert x.shape == (1, 3, L, 1, 1) and bool((x[0, :, [0, 5]] == 1).all())


def test_sda_composition_reproduces_markov_gaussian_joint():
    """SDA's composition of the exact window denoisers of a stationary AR(1) chain (phi = 0.5, 12 states):
    exact in the clean limit, biased at intermediate noise (the noisy chain is not Markov); the largest
    covariance error of the sampled joint falls with the window: measured 0.047 (k = 5), 0.018 (7),
    0.0036 (9) with Heun at 199 NFE (itself within 0.003)."""
    L, phi, K1 = 12, 0.5, torch.ones(1, 1, dtype=torch.float64)
    ref = ar1_cov(L, phi, K1)
    errs = {}
    for k in (5, 9):
        model = window_model(k, phi, K1, amortised=False)
        mean, cov = pushed_moments(lambda z: sample_trajectory(model, length=L, members=L + 1, sampler="heun",
                                                               nfe=199, noise=z.reshape(1, L + 1, L, 1, 1),
                                                               dtype=torch.float64), L)
        assert float(mean.abs().max()) < 1e-12
        errs[k] = float((cov - ref).abs().max())
    assert errs[9] < 0.01 and errs[5] < 0.08 and errs[9] < errs[5] / 3, errs


def test_sda_composition_with_amortised_observations_matches_posterior():
    """An amortised window model composed over a trajectory, each window given its slice of the
    observations: the posterior mean and covariance of the whole trajectory."""
    L, k, phi = 10, 7, 0.5
    K1 = torch.ones(1, 1, dtype=torch.float64)
    model = window_model(k, phi, K1, amortised=True)
    S = ar1_cov(L, phi, K1)
    mask = torch.zeros(L, dtype=torch.bool)
    mask[[1, 4, 8]] = True
    y = torch.tensor([0.0, 1.2, 0, 0, -0.8, 0, 0, 0, 0.5, 0], dtype=torch.float64)
    mean_ref, cov_ref = conditional(S, mask, y)
    vals, m = y.reshape(1, L, 1, 1), mask.reshape(1, L, 1, 1)
    mean, cov = pushed_moments(lambda z: sample_trajectory(model, vals, m, L + 1, sampler="heun", nfe=199,
                                                           noise=z.reshape(1, L + 1, L, 1, 1), dtype=torch.float64), L)
    U = ~mask
    assert torch.equal(mean[mask], y[mask]) and float(cov[mask].abs().max()) == 0
    assert float((mean[U] - mean_ref).abs().max()) < 0.02
    assert float((cov[U][:, U] - cov_ref).abs().max()) < 0.02


def test_sda_composed_window_prior_with_mmps_guidance_matches_posterior():
    """The guided window model: a window prior composed over a trajectory (ComposedDenoiser follows the
    denoiser contract) wrapped by diffkit.guidance's MMPS, three noisy point observations
    (sigma_y = 0.1): the closed-form posterior (measured errors: mean 0.018, covariance 0.011 with Heun
    at 99 NFE; 0.007 at 199)."""
    from diffkit import guidance as G
    from diffkit.sampling import sample

    L, k, phi, sy = 10, 7, 0.5, 0.1
    K1 = torch.ones(1, 1, dtype=torch.float64)
    S = ar1_cov(L, phi, K1)
    where = [1, 4, 8]
    A = torch.zeros(3, L, dtype=torch.float64)
    A[range(3), where] = 1
    y = torch.tensor([1.2, -0.8, 0.5], dtype=torch.float64)
    gain = S @ A.T @ torch.linalg.inv(A @ S @ A.T + sy**2 * torch.eye(3, dtype=torch.float64))
    mean_ref, cov_ref = gain @ y, S - gain @ A @ S
    mask = torch.zeros(L, 1, dtype=torch.bool)
    mask[where] = True
    obs = G.Observation(G.MaskOperator(mask), y[None].expand(L + 1, -1), sy)
    guided = G.mmps(ComposedDenoiser(window_model(k, phi, K1, amortised=False), L), obs)
    mean, cov = pushed_moments(lambda z: sample(guided, (L + 1, L, 1), sampler="heun", nfe=99,
                                                x_init=z.reshape(L + 1, L, 1), dtype=torch.float64), L)
    assert float((mean - mean_ref).abs().max()) < 0.04 and float((cov - cov_ref).abs().max()) < 0.025


class ScalarEcho:
    """A window 'model' whose clean estimate is its scalar condition everywhere: shows which window's
    scalars each state of a composed trajectory got."""

    def __init__(self, k: int):
        spec = WindowSpec(("u",), k, conditioning="amortised")
        self.layout = Layout(channels=spec.channels, spatial=("x",), shape=(2,), window=spec,
                             cond_channels=spec.observation_channels, scalars=("f",))
        self.schedule = SCHED

    def parameters(self):
        return iter(())

    def __call__(self, x, t, cond=None):
        return cond.scalars[:, :1, None].to(x.dtype).expand_as(x).clone()


def test_trajectory_windows_take_their_own_scalars():
    """sample_trajectory's per-window scalars (N, L - k + 1, S), e.g. the forcings of each window's time:
    SDA gives each state the scalars of the window it is most central in, the autoregressive method
    those of the window that drew it; a (N, S) tensor is every window's; a wrong shape is a one-line error."""
    k, L = 3, 7
    model = ScalarEcho(k)
    per = torch.arange(L - k + 1, dtype=torch.float64).reshape(1, L - k + 1, 1) * 10   # window s -> 10 s
    x = sample_trajectory(model, length=L, members=2, scalars=per, sampler="ddim", nfe=3,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    want = (10 * composition_starts(L, k)).to(torch.float64)
    assert torch.equal(x[0, :, :, 0, 0], want.expand(2, L)) and torch.equal(x[..., 0], x[..., 1])
    x = sample_trajectory(model, length=L, members=2, method="autoregressive", overlap=1, scalars=per, nfe=3,
                          generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    # windows start at 0, 2, 4 (k - overlap = 2 apart): states 0-2 from window 0, 3-4 from 2, 5-6 from 4
    assert x[0, 0, :, 0, 0].tolist() == [0.0, 0.0, 0.0, 20.0, 20.0, 40.0, 40.0]
    same = sample_trajectory(model, length=L, scalars=torch.full((1, 1), 5.0), nfe=3, dtype=torch.float64,
                             generator=torch.Generator().manual_seed(0))
    assert bool((same == 5).all())
    with pytest.raises(ShapeError, match=r"per-window scalars have shape \(1, 4, 1\), expected \(1, 5, 1\)") as ei:
        sample_trajectory(model, length=L, scalars=per[:, :4], nfe=3)
    assert "\n" not in str(ei.value)


def test_composition_takes_each_state_from_its_most_central_window():
    assert composition_starts(8, 3).tolist() == [0, 0, 1, 2, 3, 4, 5, 5]
    assert composition_starts(6, 4).tolist() == [0, 0, 1, 2, 2, 2]
    assert composition_starts(4, 4).tolist() == [0, 0, 0, 0]

    class Tag:  # the x0 estimate of each window state = its window's start + position / 10
        schedule = SCHED

        def __init__(self, k):
            spec = WindowSpec(("u",), k)
            self.layout = Layout(channels=spec.channels, window=spec)

        def __call__(self, x, t, cond=None):
            return x[:, :1] + torch.arange(x.shape[1], dtype=x.dtype) / 10

    den = ComposedDenoiser(Tag(3), 6)
    x = torch.arange(6, dtype=torch.float64)[None].repeat(2, 1)  # state i holds i: the window start is x[:, 0]
    out = den(x, torch.full((2,), 0.5))
    starts = composition_starts(6, 3)
    expect = starts.double() + (torch.arange(6) - starts).double() / 10
    torch.testing.assert_close(out[0], expect)


# ============================================================================= 5. bad inputs
def test_window_sampling_bad_inputs_are_one_line_errors():
    prior = window_model(3, 0.5, K3, amortised=False)
    amort = window_model(3, 0.5, K3, amortised=True)
    noisy = window_model(3, 0.5, K3, amortised=True, noise=True)
    v, m = torch.zeros(1, 3, 1, 3), torch.ones(1, 3, 1, 3)
    cases = [
        (lambda: sample_amortised(prior, v, m, 2), WindowError, "trained with amortised conditioning"),
        (lambda: sample_amortised(amort, v[:, :2], m[:, :2], 2), ShapeError, r"values have shape \(1, 2, 1, 3\)"),
        (lambda: sample_amortised(amort, v, m[..., :2], 2), ShapeError, "mask has shape"),
        (lambda: sample_amortised(amort, v, m * 0.5, 2), ObservationError, "only 0 .* and 1"),
        (lambda: sample_amortised(amort, v * float("nan"), m, 2), NonFiniteError, "where the mask says observed"),
        (lambda: sample_amortised(amort, v, m, 0), WindowError, "members must be an integer >= 1"),
        (lambda: sample_amortised(amort, v, m, 1, sigma=0.1), WindowError,
         "takes observations as exact .* data.mask_noise"),
        (lambda: sample_amortised(noisy, v, m, 1, sigma=-0.1), ObservationError, "negative, NaN or inf"),
        (lambda: sample_amortised(noisy, v, m, 1, sigma=torch.ones(2, 2)), ShapeError, "sigma has shape"),
        (lambda: sample_trajectory(amort, torch.zeros(1, 5, 1, 3), torch.ones(1, 5, 1, 3), sigma=0.1), WindowError,
         "takes observations as exact"),
        (lambda: sample_trajectory(amort, length=5, method="kalman"), WindowError, "method must be one of sda"),
        (lambda: sample_trajectory(amort, length=5, method="autoregressive", overlap=3), WindowError,
         r"overlap must be an integer in 1..2"),
        (lambda: sample_trajectory(amort, length=2), WindowError, "shorter than the model's window of 3"),
        (lambda: sample_trajectory(amort), WindowError, "give length="),
        (lambda: sample_trajectory(prior, torch.zeros(1, 5, 1, 3), torch.ones(1, 5, 1, 3)), WindowError,
         "unconditional window prior"),
        (lambda: sample_trajectory(prior, length=5, method="autoregressive"), WindowError,
         "trained with amortised conditioning"),
    ]
    for fn, exc, msg in cases:
        with pytest.raises(exc, match=msg) as ei:
            fn()
        assert "\n" not in str(ei.value)
    from diffkit.denoiser import Regressor

    with pytest.raises(WindowError, match="regression model .* needs a diffusion model"):
        sample_amortised(Regressor(torch.nn.Identity(), amort.layout), v, m, 1)
    not_window = Layout(channels=("u",))

    class M:
        layout, schedule = not_window, SCHED
    with pytest.raises(WindowError, match="not a window model; train one with data.window"):
        sample_amortised(M(), v, m, 1)


# ============================================================================= 6. end to end
@pytest.mark.parametrize("noise", [False, True])
def test_window_amortised_training_resumes_bitwise_exactly(tmp_path, noise):
    """8 steps in one go equal 4 steps, a checkpoint (mid-epoch) and 4 more in a fresh trainer: the masks
    (and, with data.mask_noise, the observation noise) are a function of (seed, epoch, item), so the
    resumed run draws the same ones (3 steps per epoch)."""
    import dataclasses

    from diffkit.train import Trainer

    path, _ = _traj_file(tmp_path / "t.nc", n=4, T=6, shape=(8,))
    cfg = config_from_dict({
        "run_dir": str(tmp_path / "full"),
        "data": {"adapter": "pde", "batch_size": 4, "val_fraction": 0.25, "window": 3, "amortised": True,
                 "mask_noise": [0.05, 0.5] if noise else [0.0, 0.0], "options": {"path": str(path)}},
        "model": {"backbone": "unet", "options": TINY_UNET},
        "trainer": {"steps": 8, "lr": 1e-3, "warmup": 1, "val_every": 0, "ckpt_every": 4, "log_every": 100,
                    "deterministic": True},
    })
    state = capture_rng_state(cuda=False)
    try:
        full = Trainer(cfg, device="cpu", progress=False)
        assert len(full.train_set) == 12 and full.model.layout.window.noise == noise
        full.fit()
        ckpt = tmp_path / "full" / "checkpoints" / "ckpt-000000004.pt"
        resumed = Trainer(dataclasses.replace(cfg, run_dir=str(tmp_path / "resumed")), device="cpu", progress=False,
                          resume=str(ckpt))
        assert resumed.step == 4
        resumed.fit()
    finally:
        restore_rng_state(state)
        torch.use_deterministic_algorithms(False)
    assert resumed.step == 8
    for (k, a), b in zip(full.net.state_dict().items(), resumed.net.state_dict().values()):
        assert torch.equal(a, b), k



def _pde_file(root: Path, dims: int) -> Path:
    path = root / f"pde{dims}.nc"
    if dims == 1:
        res = P.simulate_burgers(6, 14, nx=16, resolution_tol=None)
    else:
        res = P.simulate_kolmogorov(4, 10, n_sim=32, n_out=8, burn_in=1.0, resolution_tol=None)
    P.write_netcdf(P.to_dataset(res), path)
    return path


@pytest.mark.parametrize("dims", [1, 2])
def test_window_model_trains_and_samples_amortised_end_to_end(tmp_path, dims):
    from diffkit.model import load_model
    from diffkit.train import Trainer

    data = _pde_file(tmp_path, dims)
    k = 4
    cfg = config_from_dict({
        "run_dir": str(tmp_path / "run"),
        "data": {"adapter": "pde", "batch_size": 8, "val_fraction": 0.25, "window": k, "amortised": True,
                 "options": {"path": str(data), **({"variables": ["u", "v"]} if dims == 2 else {})}},
        "model": {"backbone": "unet", "options": TINY_UNET},
        "trainer": {"steps": 6, "lr": 1e-3, "warmup": 1, "val_every": 3, "ckpt_every": 0, "log_every": 100,
                    "snapshot_every": 6},
        "sample": {"nfe": 2, "n": 2},
    })
    state = capture_rng_state(cuda=False)
    try:
        out = Trainer(cfg, device="cpu", progress=False).fit()
    finally:
        restore_rng_state(state)
    assert out["step"] == 6
    snap = xr.open_dataset(tmp_path / "run" / "snapshots" / "step-000000006.nc")  # the windows, decoded
    names = ["u"] if dims == 1 else ["u", "v"]
    assert list(snap.data_vars) == [f"{v}@t+{j}" for j in range(k) for v in names]
    assert snap.sizes["sample"] == 2 and bool(np.isfinite(snap.to_array().values).all())
    lm = load_model(tmp_path / "run")
    lay = lm.layout
    C = 1 if dims == 1 else 2
    assert lay.window.length == k and lay.window.conditioning == "amortised" and lay.num_channels == k * C
    assert len(lay.cond_channels) == 2 * k * C and lm.config.data.window == k
    S = lay.shape
    ds = xr.open_dataset(data)
    variables = list(lay.window.variables)
    truth = torch.from_numpy(np.stack([ds[v].values[-1, :k] for v in variables], 1))[None]  # (1, k, C, *S)
    mask = torch.zeros_like(truth, dtype=torch.bool)
    mask[:, 0] = True  # forecast from the first state
    mask[:, 1:, :, ::3] = True  # and assimilate sparse points of the others
    g = torch.Generator().manual_seed(0)
    x = sample_amortised(lm, truth, mask, 3, nfe=4, generator=g)  # a load_model result, or its .model
    assert x.shape == (1, 3, k, C, *S) and bool(torch.isfinite(x).all())
    torch.testing.assert_close(x[:, :, mask[0]], truth[:, None, mask[0]].float().expand(1, 3, -1))
    # the composed denoiser's fast path (the model's x0_at) equals its plain call
    L, B = k + 2, 2
    zeros = torch.zeros(B, L * C, *S)
    den = ComposedDenoiser(lm.model, L, zeros, zeros)
    xt, tt = torch.randn(B, L * C, *S, generator=g), torch.full((B,), 0.3, dtype=torch.float64)
    a, s = (float(v[0]) for v in lm.model.schedule.coeffs(tt))
    lam = float(lm.model.schedule.logsnr(tt)[0])
    torch.testing.assert_close(den.x0_at(xt, tt, a, s, lam), den(xt, tt), rtol=1e-5, atol=1e-5)
    traj = sample_trajectory(lm.model, length=k + 2, members=2, nfe=3, generator=g)
    assert traj.shape == (1, 2, k + 2, C, *S) and bool(torch.isfinite(traj).all())


def test_window_dataset_matches_gridded_frames(tmp_path):
    """The same windows from the gridded (``weather``) adapter: every adapter with an autoregressive spec serves them."""
    try:
        from diffkit_weather.adapter import GriddedAdapter
    except ImportError:
        sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "plugins"))
        from diffkit_weather.adapter import GriddedAdapter
    g = np.random.default_rng(0)
    nt, lat, lon = 10, np.linspace(60.0, -60.0, 5), np.arange(0.0, 360.0, 45.0)
    t2m = (280 + 5 * g.standard_normal((nt, lat.size, lon.size))).astype(np.float32)
    path = tmp_path / "grid.nc"
    xr.Dataset({"t2m": (("time", "latitude", "longitude"), t2m, {"units": "K"})},
               coords={"time": ("time", 6 * np.arange(nt), {"units": "hours since 2000-01-01"}),
                       "latitude": ("latitude", lat, {"units": "degrees_north"}),
                       "longitude": ("longitude", lon, {"units": "degrees_east"})}).to_netcdf(path)
    inner = GriddedAdapter(str(path), history=2, target="residual", val_fraction=0.3)
    wa = WindowAdapter(inner, 3)
    L = wa.layout
    assert L.channels == ("t2m@t+0", "t2m@t+1", "t2m@t+2") and L.weights.shape == inner.layout.weights.shape
    ds, pairs = wa.dataset("train"), inner.dataset("train").pairs
    raw = torch.from_numpy(t2m).double()
    lat_model = torch.tensor(L.coords["latitude"])
    order = [int(np.argmin(np.abs(lat - v))) for v in lat_model.tolist()]  # the adapter's latitude order
    for i in range(len(ds)):
        phys = L.denormalize(ds[i]["x"].double())
        ref = raw[torch.as_tensor(pairs[i])][:, order]
        torch.testing.assert_close(phys, ref, rtol=0, atol=1e-4)


def test_windows_md_gives_the_sampling_signatures():
    """docs/windows.md states the signatures of the inference functions exactly as the code has them."""
    import inspect

    text = (Path(__file__).resolve().parents[1] / "docs" / "windows.md").read_text()

    def fmt(v):
        return f'"{v}"' if isinstance(v, str) else str(v)

    for fn in (sample_amortised, sample_trajectory):
        parts, star = [], False
        for p in inspect.signature(fn).parameters.values():
            if p.kind is p.KEYWORD_ONLY and not star:
                parts.append("*")
                star = True
            if p.kind is p.VAR_KEYWORD:
                parts.append(f"**{p.name}")
            else:
                parts.append(p.name if p.default is p.empty else f"{p.name}={fmt(p.default)}")
        sig = f"`{fn.__name__}({', '.join(parts)})`"
        assert sig in text, f"docs/windows.md lacks {sig}"
