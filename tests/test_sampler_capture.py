"""Capturable sampler loops (issue 17): every coefficient is computed before the loop, the loop reads
nothing back from the device (no ``.item()``, ``float(tensor)``, ``bool(tensor)``, ...), and
``capturable=True`` (coefficients as a device tensor table) gives the plain path's samples."""
import contextlib

import pytest
import torch
from torch import nn

from diffkit.denoiser import Denoiser
from diffkit.schedules import cosine
from diffkit.samplers import ddim, ddpm, dpmpp_2m, euler, heun, timesteps


class TinyNet(nn.Module):
    """A small nonlinear network with the backbone signature."""

    def __init__(self, c: int = 2):
        super().__init__()
        torch.manual_seed(0)
        self.inp = nn.Conv1d(c, 8, 3, padding=1)
        self.emb = nn.Linear(1, 8)
        self.out = nn.Conv1d(8, c, 3, padding=1)

    def forward(self, x, c_noise, scalars=None, labels=None):
        h = torch.tanh(self.inp(x) + self.emb(c_noise[:, None] / 10)[:, :, None])
        return self.out(h)


#: what reads a tensor's value on the host (a device sync on an accelerator)
HOST_READS = ("item", "tolist", "numpy", "__float__", "__int__", "__bool__", "__index__", "__complex__")


class SyncGuard:
    """A denoiser wrapper that, from its first call (once the sampler's setup is done) to the end of
    the run, makes every host read of a tensor raise."""

    def __init__(self, den, monkeypatch):
        self.den, self.schedule, self.on, self.calls = den, den.schedule, False, 0
        for name in HOST_READS:
            orig = getattr(torch.Tensor, name)

            def guarded(t, *a, _orig=orig, _name=name, **k):
                if self.on:
                    raise AssertionError(f"host sync inside the sampler loop: Tensor.{_name}")
                return _orig(t, *a, **k)
            monkeypatch.setattr(torch.Tensor, name, guarded)

    def x0_at(self, x, t, alpha, sigma, logsnr):
        self.on, self.calls = True, self.calls + 1
        return self.den.x0_at(x, t, alpha, sigma, logsnr)

    def __call__(self, x, t):  # the plain call (a denoiser without x0_at); unused by Denoiser
        self.on, self.calls = True, self.calls + 1
        return self.den(x, t)


CASES = [
    ("ddim", ddim, {}),
    ("ddim_eta", ddim, {"eta": 0.7}),
    ("ddpm", ddpm, {}),
    ("ddpm_large", ddpm, {"variance": "large", "churn_noise": 0.9}),
    ("euler", euler, {}),
    ("euler_churn", euler, {"churn": 2.5, "churn_tmin": 0.05, "churn_tmax": 50.0, "churn_noise": 1.05}),
    ("heun", heun, {}),
    ("dpmpp_2m", dpmpp_2m, {}),
]


def run(fn, den, ts, seed=1, **options):
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(3, 2, 8, generator=g, dtype=torch.float32)
    with torch.no_grad():
        return fn(den, x, ts, generator=g, **options)


@pytest.fixture(scope="module")
def den():
    return Denoiser(TinyNet(), cosine(), "v").eval()


@pytest.mark.parametrize("spacing", ["logsnr", "uniform"])
@pytest.mark.parametrize("name, fn, opts", CASES, ids=[c[0] for c in CASES])
def test_capturable_equals_the_plain_path(den, name, fn, opts, spacing):
    ts = timesteps(den.schedule, 12, spacing)
    plain = run(fn, den, ts, **opts)
    cap = run(fn, den, ts, capturable=True, **opts)
    assert torch.isfinite(plain).all()
    if name.startswith(("euler", "heun")):  # torch.add(alpha=k) becomes k * x then +: round-off only
        torch.testing.assert_close(cap, plain, rtol=1e-4, atol=1e-5)
    else:  # the same kernels with the same float32 coefficients
        assert torch.equal(cap, plain)


def test_a_grid_with_repeated_levels_is_the_same_in_both_paths(den):
    """dpmpp_2m's identity steps (coincident noise levels: the cosine schedule's log-SNR is clipped near t = 1)."""
    ts = torch.cat([torch.tensor([1.0, 0.99999, 0.99998]), torch.linspace(0.9, 0.0, 10, dtype=torch.float64)])
    assert torch.equal(run(dpmpp_2m, den, ts, capturable=True), run(dpmpp_2m, den, ts))


@pytest.mark.parametrize("capturable", [False, True])
@pytest.mark.parametrize("name, fn, opts", CASES, ids=[c[0] for c in CASES])
def test_no_host_sync_inside_the_sampler_loop(den, monkeypatch, name, fn, opts, capturable):
    guard = SyncGuard(den, monkeypatch)
    ts = timesteps(den.schedule, 10, "logsnr")
    want = run(fn, den, ts, capturable=capturable, **opts)
    x = run(fn, guard, ts, capturable=capturable, **opts)
    assert guard.calls >= 10
    guard.on = False
    assert torch.equal(x, want)


def test_the_guard_catches_a_host_sync(den, monkeypatch):
    guard = SyncGuard(den, monkeypatch)

    def syncing(denoiser, x, ts, **kw):
        x0 = denoiser.x0_at(x, ts[0], 0.5, 0.5, 0.0)
        return x0 * float(x0.abs().max())
    with pytest.raises(AssertionError, match=r"host sync inside the sampler loop: Tensor.__float__"):
        syncing(guard, torch.ones(1, 2, 8), torch.tensor([1.0, 0.0]))
    guard.on = False


def test_capturable_coefficients_are_device_tensors_computed_before_the_loop(den, monkeypatch):
    """What the loop multiplies by is a 0-d float64 tensor (a view into one table), not a Python float."""
    import diffkit.grids as grids
    import diffkit.samplers as samplers

    seen = []
    inner = grids._coef

    def coef(rows, x, capturable):
        out = inner(rows, x, capturable)
        seen.append(out)
        return out
    monkeypatch.setattr(samplers, "_coef", coef)
    ts = timesteps(den.schedule, 6, "logsnr")
    run(ddim, den, ts, capturable=True)
    (table,) = seen
    assert len(table) == 6
    assert all(isinstance(k, torch.Tensor) and k.ndim == 0 and k.dtype == torch.float64 for row in table for k in row)
    assert len({k.untyped_storage().data_ptr() for row in table for k in row}) == 1
    with contextlib.suppress(Exception):
        monkeypatch.undo()
