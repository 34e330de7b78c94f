"""Shared fixtures for the engine, sampler and loss tests.

The fake networks here stand in for real backbones so that these tests depend on nothing but
the core package: each one is a fixed, known function of its inputs, so that every quantity a
test checks can be recomputed by hand.
"""
from __future__ import annotations

import os

import pytest
import torch
from torch import nn

# Tiny tensors: thread wake-up costs dominate, and on small shared CPU boxes torch's intra-op
# pool can make a 4-element softmax take ~20 ms.  One thread keeps the suite fast and
# deterministic; set DIFFKIT_TEST_THREADS to override.
torch.set_num_threads(int(os.environ.get("DIFFKIT_TEST_THREADS", "1")))

#: the environment switches of diffkit's plugin loading, which a test must not inherit
PLUGIN_ENV_VARS = ("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "DIFFKIT_PLUGINS")


@pytest.fixture
def isolated_trainer_state(monkeypatch):
    """In-process trainers seed the global RNGs and may register plugins: undo both (the plugin
    switches of the environment are cleared, the registry refreshed before and after)."""
    from diffkit import registry
    from diffkit.checkpoint import capture_rng_state, restore_rng_state

    for var in PLUGIN_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    state = capture_rng_state(cuda=False)
    registry.refresh()
    yield
    restore_rng_state(state)
    registry.refresh()



@pytest.fixture
def clean_registry(monkeypatch):
    """Every test starts and ends with a freshly discovered registry, no diffkit env vars
    and no plugins registered by hand (test_registry.py and test_testing.py use it for every test,
    through ``pytestmark = pytest.mark.usefixtures("clean_registry")``)."""
    from diffkit import registry

    for var in PLUGIN_ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    saved = list(registry._extra)
    registry.refresh()
    yield
    registry._extra[:] = saved
    registry.refresh()

#: one batch shape per tensor rank 1..5: (B,), (B,C), (B,C,L), (B,C,H,W), (B,C,D,H,W)
SHAPES = [(5,), (5, 3), (4, 2, 7), (3, 2, 4, 5), (3, 2, 3, 2, 4)]
SHAPE_IDS = [f"rank{len(s)}" for s in SHAPES]


@pytest.fixture(params=SHAPES, ids=SHAPE_IDS)
def shape(request) -> tuple[int, ...]:
    """A batch shape, once for every rank 1..5."""
    return request.param


@pytest.fixture
def gen() -> torch.Generator:
    """A seeded CPU generator (fresh for every test)."""
    return torch.Generator().manual_seed(1234)


class AffineNet(nn.Module):
    """``out = a * x[:, :C] + b * c_noise (+ c * scalars.sum) (+ d * labels)``, broadcast over any rank.

    Records the last inputs it saw in ``self.seen`` and counts calls in ``self.calls``.
    """

    def __init__(self, out_channels: int | None = None, a: float = 0.3, b: float = 0.01,
                 c: float = 0.0, d: float = 0.0):
        super().__init__()
        self.out_channels, self.a, self.b, self.c, self.d = out_channels, a, b, c, d
        self.calls = 0
        self.seen: dict = {}

    def forward(self, x, c_noise, scalars=None, labels=None):
        self.calls += 1
        self.seen = {"x": x, "c_noise": c_noise, "scalars": scalars, "labels": labels}
        xs = x if self.out_channels is None else x[:, : self.out_channels]
        per = lambda v: v.to(xs.dtype)[(...,) + (None,) * (xs.ndim - 1)]
        out = self.a * xs + self.b * per(c_noise)
        if scalars is not None and self.c:
            out = out + self.c * per(scalars.sum(1))
        if labels is not None and self.d:
            out = out + self.d * per(labels.to(xs.dtype) + 1.0)
        return out


@pytest.fixture
def affine_net():
    """Factory of :class:`AffineNet` instances."""
    return AffineNet


class CountingDenoiser:
    """Wrap a sampler-contract denoiser and count its calls and the times it was called at."""

    def __init__(self, inner):
        self.inner, self.schedule = inner, inner.schedule
        self.calls = 0
        self.times: list[float] = []

    def __call__(self, x, t, **kw):
        self.calls += 1
        self.times.append(float(torch.as_tensor(t).flatten()[0]))
        return self.inner(x, t, **kw)


@pytest.fixture
def counting():
    """Factory: ``counting(denoiser)`` -> :class:`CountingDenoiser`."""
    return CountingDenoiser


@pytest.fixture
def synth(tmp_path):
    """The PDE tests' small 1-D trajectory file (values known in closed form: tests/_pde_fixtures.py)."""
    from _pde_fixtures import write_1d

    return write_1d(tmp_path / "synth.nc", L=6.0)


@pytest.fixture
def era5_path(tmp_path) -> str:
    """A synthetic ERA5-layout netCDF file (tests/_weather_era5.py), for the weather tests."""
    from _weather_era5 import era5, write

    return write(era5(), tmp_path / "era5.nc")


@pytest.fixture(scope="module")
def shift(tmp_path_factory):
    """The weather tests' oracle file (tests/_weather_shift.py), once per test module."""
    from _weather_shift import write_shift

    return write_shift(tmp_path_factory.mktemp("shift") / "shift.nc")


@pytest.fixture(scope="module")
def one_thread():
    """Intra-op threading off for a module of tiny nets, where it only adds overhead (and stalls on a
    busy machine); the backbone tests use it for every test (``pytestmark``)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
