"""``diffkit.testing.check_adapter`` and ``check_plugin_registers(entry_point=...)``.

The checks pass on every adapter diffkit ships -- ``mixture``, ``pde`` (on a tiny simulated
Kuramoto-Sivashinsky file), ``weather`` (on a tiny two-layer QG file, read back with its own
reader because its decoder writes the file's variables and levels, not one variable per channel)
-- and on the plugin template's ``timeseries`` adapter; and each rule fails, with a message
naming it, on an adapter broken in just that way.
"""
from __future__ import annotations

import os
import sys
from importlib import metadata
from pathlib import Path

import numpy as np
import pytest
import torch
from torch.utils.data import Dataset

import diffkit
from diffkit import Layout, registry
from diffkit.adapters import Adapter, MixtureAdapter, write_netcdf
from diffkit.testing import check_adapter, check_plugin_registers

ROOT = Path(__file__).resolve().parents[1]
try:
    import diffkit_pde as P
    import diffkit_weather as W
except ImportError:  # editable install made before the plugins existed
    sys.path.insert(0, str(ROOT / "plugins"))
    import diffkit_pde as P
    import diffkit_weather as W


#: every test starts and ends with a freshly discovered registry (conftest.py's clean_registry)
pytestmark = pytest.mark.usefixtures("clean_registry")


# ============================================================================= diffkit's adapters
def test_mixture(diffkit_check):
    a = diffkit_check.check_adapter(MixtureAdapter, n=400, dim=3)
    assert isinstance(a, MixtureAdapter)


@pytest.fixture(scope="module")
def ks_file(tmp_path_factory) -> Path:
    """4 Kuramoto-Sivashinsky trajectories of 8 frames on 32 points (~0.1 s)."""
    r = P.simulate_ks(4, 8, nx=32, L=16.0, burn_in=2.0, dt_out=0.5, seed=0)
    return P.write_netcdf(P.to_dataset(r), tmp_path_factory.mktemp("pde") / "ks.nc")


@pytest.mark.parametrize("options", [
    {},
    {"history": 2, "target": "residual", "scalars": ["dt", "L"], "lazy": True},   # fields and scalars
    {"horizon": 2, "frame_step": 2},
], ids=["state", "residual-scalars-lazy", "horizon"])
def test_pde(diffkit_check, ks_file, options):
    diffkit_check.check_adapter(P.TrajectoryAdapter, path=str(ks_file), val_fraction=0.25, **options)


@pytest.fixture(scope="module")
def qg_file(tmp_path_factory) -> Path:
    """12 six-hourly frames of the two-layer QG model on 32^2 points, two variables on two levels (~1 s)."""
    r = W.simulate_qg(1, 12, nx=32, spin_up_years=0, ic_amplitude=1e-5, seed=1, fields=("psi", "u"))
    return W.write_netcdf(W.to_dataset(r), tmp_path_factory.mktemp("weather") / "qg.nc")


def read_weather(path, layout) -> np.ndarray:
    """The weather decoder's file back as ``(N, C, lat, lon)``: variables with a level dim give one
    channel per level, in the layout's order and the model's (latitude ascending) orientation."""
    import xarray as xr

    a = layout.attrs
    lat, lon = a["lat_name"], a["lon_name"]
    blocks = []
    with xr.open_dataset(path) as ds:
        for v in a["variables"]:
            if a.get("levels", {}).get(v):
                blocks.append(ds[v].transpose("sample", a["level_dims"][v], lat, lon).values)
            else:
                blocks.append(ds[v].transpose("sample", lat, lon).values[:, None])
    x = np.concatenate(blocks, axis=1)
    if a.get("lat_flipped"):
        x = x[..., ::-1, :]
    if a.get("lon_flipped"):
        x = x[..., ::-1]
    return x


@pytest.mark.parametrize("options", [{}, {"history": 2, "target": "residual", "forcings": ["time_of_day"]}],
                         ids=["state", "residual"])
def test_weather(diffkit_check, qg_file, options):
    a = diffkit_check.check_adapter(W.GriddedAdapter, path=str(qg_file), val_fraction=0.25, read_back=read_weather,
                                    **options)
    assert a.layout.weights is not None                                  # area weights were checked too


def test_weather_needs_its_reader(qg_file):
    with pytest.raises(AssertionError, match=r"cannot read back .*\['streamfunction@1'.*Pass read_back="):
        check_adapter(W.GriddedAdapter, path=str(qg_file), val_fraction=0.25)


@pytest.fixture
def timeseries(monkeypatch):
    """The plugin template's package, importable without installing it."""
    monkeypatch.syspath_prepend(str(ROOT / "examples" / "plugin-template"))
    import diffkit_timeseries

    yield diffkit_timeseries
    for name in [m for m in sys.modules if m.startswith("diffkit_timeseries")]:
        del sys.modules[name]


def test_plugin_template(diffkit_check, timeseries, tmp_path):
    from diffkit_timeseries.adapter import TimeSeriesAdapter, read_samples

    diffkit_check.check_adapter(TimeSeriesAdapter, n_steps=600, window=32)
    diffkit_check.check_adapter(TimeSeriesAdapter, n_steps=600, window=32, decode_suffix=".csv",
                                read_back=read_samples, workdir=tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["decoded.csv"]


def test_an_instance_is_checked_as_is(diffkit_check):
    a = MixtureAdapter(n=100)
    assert diffkit_check.check_adapter(a) is a
    with pytest.raises(AssertionError, match="an adapter instance and options"):
        check_adapter(a, n=5)


# ============================================================================= broken adapters
class _Items(Dataset):
    def __init__(self, make, n):
        self.make, self.n = make, n

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        return self.make(i)


class Toy(Adapter):
    """A correct 1-D adapter (2 channels on 8 periodic points, a scalar, 3 classes); ``defect``
    breaks exactly one rule."""

    name = "toy"

    def __init__(self, defect: str | None = None):
        self.defect = defect
        g = torch.Generator().manual_seed(0)
        self.data = torch.randn(12, 2, 8, generator=g)
        kw = dict(channels=("u", "v"), spatial=("x",), shape=(8,), periodic=("x",), scalars=("s",), num_classes=3,
                  coords={"x": tuple(0.5 * k for k in range(8))}, mean=torch.tensor([[10.0], [-1.0]]),
                  std=torch.tensor([[2.0], [0.5]]), weights=torch.linspace(0.5, 1.5, 8), attrs={"adapter": "toy"})
        changes = {
            "coords_length": {"coords": {"x": (0.0, 1.0)}},
            "coords_uneven": {"coords": {"x": (0, 1, 2, 3, 5, 6, 7, 8)}},
            "weights_too_big": {"weights": torch.ones(1, 1, 8)},
            "negative_weights": {"weights": -torch.ones(8)},
            "numpy_attrs": {"attrs": {"adapter": "toy", "dx": np.float32(0.5)}},
            "mean_only": {"std": None},
        }
        kw.update(changes.get(defect, {}))
        self._layout = Layout(**kw)

    @property
    def layout(self):
        return self._layout

    def item(self, i):
        d = self.defect
        x = self.data[i].clone()
        it = {"x": x, "scalars": torch.tensor([0.1 * i]), "label": torch.tensor(i % 3)}
        if d == "raw_values":
            it["x"] = x * 1000.0 + 5000.0
        elif d == "x_shape":
            it["x"] = x[:, :7]
        elif d == "nan":
            it["x"] = x.clone().index_fill_(1, torch.tensor([3]), float("nan"))
        elif d == "int_x":
            it["x"] = x.long()
        elif d == "typo_key":
            it["labels"] = it.pop("label")
        elif d == "no_scalars":
            del it["scalars"]
        elif d == "label_null":
            it["label"] = torch.tensor(3)
        elif d == "random":
            it["x"] = torch.randn(2, 8)
        elif d == "bad_weight":
            it["weight"] = torch.ones(3, 8)
        elif d == "mixed_keys" and i % 2:
            it["weight"] = torch.ones(2, 8)
        return it

    def dataset(self, split):
        if split not in ("train", "val"):
            if self.defect == "any_split":
                return _Items(self.item, 2)
            raise ValueError(f"unknown split {split!r}")
        if split == "train" and self.defect == "empty":
            return _Items(self.item, 0)
        return _Items(self.item, 10 if split == "train" else 2)

    @classmethod
    def decode(cls, x, layout, path, *, attrs=None):
        return super().decode(x, layout, path, attrs=attrs)


class NoDenormalise(Toy):
    @classmethod
    def decode(cls, x, layout, path, *, attrs=None):
        return write_netcdf(x, layout, path, attrs=attrs)


class InPlace(Toy):
    @classmethod
    def decode(cls, x, layout, path, *, attrs=None):
        out = super().decode(x, layout, path, attrs=attrs)
        x.mul_(2)
        return out


class LeavesTemp(Toy):
    @classmethod
    def decode(cls, x, layout, path, *, attrs=None):
        Path(path).with_name(f".{Path(path).name}.tmp").write_text("")
        return super().decode(x, layout, path, attrs=attrs)


class ReturnsNothing(Toy):
    @classmethod
    def decode(cls, x, layout, path, *, attrs=None):
        super().decode(x, layout, path, attrs=attrs)


class NeedsTheData(Toy):
    def decode(self, x, layout, path, *, attrs=None):  # an instance method: a checkpoint is not enough
        return Adapter.decode.__func__(type(self), x, layout, path, attrs=attrs)


class NoAttrs(Toy):
    @classmethod
    def decode(cls, x, layout, path):
        return Adapter.decode.__func__(cls, x, layout, path)


class ForgetsAttrs(Toy):
    """A decoder that needs layout.attrs, which the layout passed to it (from a checkpoint) has."""

    @classmethod
    def decode(cls, x, layout, path, *, attrs=None):
        assert layout.attrs["adapter"] == "toy"
        return super().decode(x, layout, path, attrs=attrs)


class WithLabels(Toy):
    """A class-conditional decoder that takes the samples' labels."""

    seen = []

    @classmethod
    def decode(cls, x, layout, path, *, attrs=None, labels=None):
        cls.seen.append(labels)
        return write_netcdf(layout.denormalize(x), layout, path, attrs=attrs)


def test_the_toy_adapter_passes():
    check_adapter(Toy)
    check_adapter(ForgetsAttrs)
    check_adapter(WithLabels)
    assert WithLabels.seen[-1].tolist() == [i % 3 for i in (0, 1, 3, 4, 5, 6, 8, 9)]   # the items' labels


@pytest.mark.parametrize("defect,match", [
    ("coords_length", r"coords\['x'\] has 2 values but axis 'x' has size 8"),
    ("coords_uneven", "periodic axis 'x' has unevenly spaced coordinates"),
    ("weights_too_big", r"layout.weights of shape \(1, 1, 8\) broadcasts to \(1, 2, 8\)"),
    ("negative_weights", "must be >= 0"),
    ("numpy_attrs", "does not survive a checkpoint"),
    ("mean_only", "only one of mean and std"),
    ("raw_values", "do not look standardised"),
    ("x_shape", r"item\['x'\] has shape \(2, 7\), but the layout says \(2, 8\)"),
    ("nan", r"item\['x'\] holds NaN"),
    ("int_x", r"item\['x'\] has dtype torch.int64"),
    ("typo_key", r"item keys \['labels'\] are not part of the protocol"),
    ("no_scalars", "items lack 'scalars'"),
    ("label_null", r"outside \[0, 3\)"),
    ("random", "differs between two reads"),
    ("bad_weight", r"item\['weight'\] of shape \(3, 8\) does not broadcast"),
    ("mixed_keys", "every item needs the same keys"),
    ("any_split", "an unknown split must raise ValueError"),
    ("empty", "the training split is empty"),
])
def test_broken_layouts_and_items_fail(defect, match):
    with pytest.raises(AssertionError, match=match):
        check_adapter(Toy, defect=defect)


@pytest.mark.parametrize("cls,match", [
    (NoDenormalise, "decode does not write the physical values"),
    (InPlace, "modified its input x in place"),
    (LeavesTemp, r"left \['.decoded.nc.tmp'\] behind"),
    (ReturnsNothing, "decode returned None"),
    (NeedsTheData, "decode must be a classmethod"),
    (NoAttrs, r"does not accept decode\(x, layout, path, \*, attrs=None\)"),
])
def test_broken_decoders_fail(cls, match):
    with pytest.raises(AssertionError, match=match):
        check_adapter(cls)


def test_read_back_and_tolerance():
    """A lossy format (8-bit PNG, say) passes with its own reader and a tolerance that fits it."""
    def coarse(path, layout):                                   # values rounded to 0.1
        return np.round(diffkit.adapter_checks._read_netcdf_back(path, layout), 1)

    with pytest.raises(AssertionError, match="decode does not write the physical values"):
        check_adapter(Toy, read_back=coarse)
    check_adapter(Toy, read_back=coarse, atol=0.005)             # 0.005 x the largest value (~16) > 0.05


def test_a_failing_constructor_is_reported():
    with pytest.raises(AssertionError, match=r"MixtureAdapter\(n=1\) raised ValueError"):
        check_adapter(MixtureAdapter, n=1)


# ============================================================================= entry points
def test_installed_builtin_plugins_are_discovered(diffkit_check):
    import diffkit_backbones

    for module, ep in ((diffkit_backbones, "backbones"), (P, "pde"), (W, "weather")):
        diffkit_check.check_plugin_registers(module, entry_point=ep)


def test_entry_point_rules(monkeypatch, tmp_path):
    import diffkit_backbones

    def fake(**eps):
        objs = [metadata.EntryPoint(n, v, registry.ENTRY_POINT_GROUP) for n, v in eps.items()]
        monkeypatch.setattr(registry, "_entry_points", lambda: objs)

    fake(backbones="diffkit_backbones")
    check_plugin_registers(diffkit_backbones, entry_point="backbones")
    with pytest.raises(AssertionError, match=r"no installed entry point 'nets'.*pip install -e \."):
        check_plugin_registers(diffkit_backbones, entry_point="nets")
    fake(backbones="diffkit_pde")
    with pytest.raises(AssertionError, match=r"entry point 'backbones' = 'diffkit_pde' loads .*not this plugin"):
        check_plugin_registers(diffkit_backbones, entry_point="backbones")
    fake(backbones="diffkit_backbones")
    monkeypatch.setenv("DIFFKIT_PLUGINS", "pde")
    with pytest.raises(AssertionError, match=r"does not list backbone '\w+' under 'backbones'.*DIFFKIT_PLUGINS"):
        check_plugin_registers(diffkit_backbones, entry_point="backbones")
    assert registry._manager is None                                    # refreshed after the check
    assert os.environ["DIFFKIT_PLUGINS"] == "pde"
