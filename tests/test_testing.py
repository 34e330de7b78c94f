"""Tests of :mod:`diffkit.testing`: the pytest fixtures it ships and its contract checks
(check_sampler, check_schedule, check_backbone, check_plugin_registers), which pass on diffkit's
own components and fail on broken ones.  Every test starts and ends with a freshly discovered
registry (conftest.py's ``clean_registry``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from importlib import metadata

import pytest
import torch

import diffkit
from diffkit import Layout, hookimpl, registry
from diffkit.testing import check_backbone, check_plugin_registers, check_sampler, check_schedule

from _registry_helpers import CORE, ENV_VARS, _run_python

pytestmark = pytest.mark.usefixtures("clean_registry")


def test_pytest11_entry_point_ships_the_fixtures(request):
    eps = [ep for ep in metadata.entry_points(group="pytest11") if ep.name == "diffkit"]
    assert eps and eps[0].value == "diffkit.testing"
    assert request.config.pluginmanager.has_plugin("diffkit")


def test_fixtures(diffkit_registry, diffkit_check):
    assert diffkit_registry is registry
    assert registry._manager is None  # refreshed before the test
    for fn in ("check_adapter", "check_backbone", "check_sampler", "check_schedule", "check_plugin_registers"):
        assert getattr(diffkit_check, fn) is getattr(diffkit.testing, fn)


@pytest.mark.slow
def test_fixtures_in_a_plugin_authors_suite(tmp_path):
    """A plugin's test suite gets the fixtures from the installed entry point alone (fresh pytest run)."""
    (tmp_path / "test_author.py").write_text(textwrap.dedent('''
        import diffkit
        from diffkit import hookimpl

        class P:
            @hookimpl
            def diffkit_schedules(self):
                return {"authored": diffkit.cosine}

        def test_register(diffkit_registry, diffkit_check):
            diffkit_check.check_schedule(diffkit.cosine)
            diffkit_check.check_sampler(diffkit.samplers.ddim, nfe=20)
            diffkit_registry.register_plugin(P(), "author")
            assert diffkit_registry.get("schedule", "authored") is diffkit.cosine

        def test_registry_was_cleaned(diffkit_registry):
            assert "authored" not in {c.name for c in diffkit_registry.components("schedule")}
        '''))
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS and k != "PYTEST_ADDOPTS"}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", "test_author.py"],
                          capture_output=True, text=True, cwd=tmp_path, env=env, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "2 passed" in proc.stdout


def test_checks_work_without_pytest(tmp_path):
    got = _run_python("""
        import json, sys
        sys.modules["pytest"] = None  # importing pytest now fails
        import diffkit
        from diffkit.testing import check_schedule, check_sampler
        check_schedule(diffkit.linear)
        check_sampler(diffkit.samplers.ddim, nfe=20)
        print(json.dumps(hasattr(diffkit.testing, "diffkit_registry")))
        """, tmp_path)
    assert got is False


@pytest.mark.parametrize("name", sorted(CORE["sampler"]))
def test_check_sampler_passes_on_builtins(diffkit_check, name):
    diffkit_check.check_sampler(registry.get("sampler", name))


def test_check_sampler_with_options():
    check_sampler(diffkit.samplers.ddim, eta=1.0)
    check_sampler(diffkit.samplers.euler, nfe=20, churn=5.0)  # churn costs a bisection per step


@pytest.mark.parametrize("name", sorted(CORE["schedule"] - {"alpha_bar"}))
def test_check_schedule_passes_on_builtins(diffkit_check, name):
    diffkit_check.check_schedule(registry.get("schedule", name))


def test_check_schedule_with_options():
    check_schedule(diffkit.from_alpha_bar, alpha_bar=torch.linspace(0.999, 0.001, 50))
    check_schedule(diffkit.cosine, T=100)
    check_schedule(diffkit.linear, T=50, beta_end=0.2)


def test_check_plugin_registers_on_builtins():
    import importlib

    from diffkit._builtins import BUILTIN_PLUGINS

    got = {}
    for name in BUILTIN_PLUGINS:  # each built-in module is a plugin of its own
        for kind, comps in check_plugin_registers(importlib.import_module(name)).items():
            assert not set(comps) & set(got.get(kind, {})), (name, kind)
            got.setdefault(kind, {}).update(comps)
    assert set(got) == {"adapter", "schedule", "sampler", "guidance", "metric", "command", "evaluator"}
    assert set(got["sampler"]) == CORE["sampler"] and set(got["command"]) == {"quickstart"}
    assert set(got["evaluator"]) == {"ensemble"}


def test_check_plugin_registers_on_backbones():
    import diffkit_backbones

    assert set(check_plugin_registers(diffkit_backbones)["backbone"]) >= {"unet", "dit", "mlp"}


TINY = {"unet": dict(channels=8, channel_mult=(1, 2), num_res_blocks=1, num_heads=2, groups=4),
        "dit": dict(hidden=24, depth=2, num_heads=2),
        "mlp": dict(hidden=32, depth=2)}


FIELD = Layout(channels=("u", "v"), spatial=("lat", "lon"), shape=(6, 10), periodic=("lon",),
               cond_channels=("mask",), scalars=("year",), num_classes=3)


VECTOR = Layout(channels=("a", "b", "c"), scalars=("s",), num_classes=2)


@pytest.mark.parametrize("name", ["unet", "dit", "mlp"])
def test_check_backbone_passes_on_builtin_backbones(diffkit_check, name):
    lay = VECTOR if name == "mlp" else FIELD
    state = torch.random.get_rng_state()
    model = diffkit_check.check_backbone(registry.get("backbone", name), lay, **TINY[name])
    assert isinstance(model, torch.nn.Module)
    assert torch.equal(torch.random.get_rng_state(), state)  # global RNG untouched
    one_d = Layout(channels=("t",), spatial=("x",), shape=(12,))
    if name != "mlp":
        check_backbone(registry.get("backbone", name), one_d, out_channels=2, **TINY[name])


def _broken_samplers():
    from diffkit.samplers import ddim, ddpm, sampler_info

    def no_info(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
        return ddim(denoiser, x, ts, extra_args=extra_args, callback=callback)

    @sampler_info(order=1, stochastic=True)
    def global_rng(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
        return ddpm(denoiser, x, ts, extra_args=extra_args, generator=None, callback=callback)

    @sampler_info(order=1, stochastic=False)
    def identity(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
        for i in range(len(ts) - 1):
            x0 = denoiser(x, ts[i].expand(x.shape[0]), **(extra_args or {}))
            if callback:
                callback({"i": i, "n": len(ts) - 1, "t": float(ts[i]), "t_next": float(ts[i + 1]), "x": x, "x0": x0})
        return x

    @sampler_info(order=1, stochastic=False)
    def silent(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
        return ddim(denoiser, x, ts, extra_args=extra_args)

    @sampler_info(order=1, stochastic=False)
    def wasteful(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
        denoiser(x, ts[0].expand(x.shape[0]), **(extra_args or {}))
        return ddim(denoiser, x, ts, extra_args=extra_args, callback=callback)

    @sampler_info(order=1, stochastic=False)
    def drops_extra_args(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
        return ddim(denoiser, x, ts, callback=callback)

    @sampler_info(order=1, stochastic=False)
    def in_place(denoiser, x, ts, *, extra_args=None, generator=None, callback=None):
        out = ddim(denoiser, x, ts, extra_args=extra_args, callback=callback)
        x.copy_(out)
        return x

    @sampler_info(order=1, stochastic=False)
    def no_kwargs(denoiser, x, ts):
        return ddim(denoiser, x, ts)

    return [(no_info, "no .info"), (global_rng, "not reproducible"), (identity, "does not converge"),
            (silent, "callback 0 times"), (wasteful, "called the denoiser 51 times"),
            (drops_extra_args, "extra_args"), (in_place, "in place"), (no_kwargs, "keyword 'extra_args'")]


@pytest.mark.parametrize("fn,match", _broken_samplers(), ids=lambda v: getattr(v, "__name__", "")[:20])
def test_check_sampler_fails_on_broken_samplers(fn, match):
    with pytest.raises(AssertionError, match=match):
        check_sampler(fn)


class _Shifted(diffkit.Schedule):
    """alpha_bar(0) = e^-0.1."""

    def _log_alpha_bar(self, t):
        return -0.1 - 12.0 * t


class _Increasing(diffkit.Schedule):
    """log-SNR rises after t = 0.5."""

    def _log_alpha_bar(self, t):
        return -12.0 * (t - 1.5 * torch.relu(t - 0.5))


class _NanEnd(diffkit.Schedule):
    """alpha_bar(1) = 0: log-SNR is -inf at t = 1."""

    def _log_alpha_bar(self, t):
        return torch.log1p(-t)


class _TooClean(diffkit.Schedule):
    """alpha_bar(1) = e^-1: far from pure noise."""

    def _log_alpha_bar(self, t):
        return -t


class _BadTransition(diffkit.Schedule):
    def _log_alpha_bar(self, t):
        return -12.0 * t

    def transition(self, s, t):
        lam, sig = super().transition(s, t)
        return lam, sig * 1.1


@pytest.mark.parametrize("cls,match", [(_Shifted, r"alpha_bar\(0\)"), (_Increasing, "increases"),
                                       (_NanEnd, "not finite"), (_TooClean, r"alpha_bar\(1\)"),
                                       (_BadTransition, r"lam\^2 \+ sig\^2"), (dict, "not a diffkit.Schedule")])
def test_check_schedule_fails_on_broken_schedules(cls, match):
    with pytest.raises(AssertionError, match=match):
        check_schedule(cls)


class _Net(torch.nn.Module):
    """A tiny 1-D conv backbone with switchable defects."""

    def __init__(self, layout, *, defect=None, out_channels=None):
        super().__init__()
        self.layout, self.defect = layout, defect
        out = out_channels or layout.num_channels
        self.conv = torch.nn.Conv1d(layout.in_channels, out, 3, padding=1, padding_mode="circular")
        self.emb = torch.nn.Linear(1, out)
        self.unused = torch.nn.Linear(2, 2) if defect == "unused" else None

    def forward(self, x, c_noise, scalars=None, labels=None):
        if self.defect != "no_check" and (x.ndim != 3 or x.shape[1] != self.layout.in_channels):
            raise diffkit.ShapeError(f"x has shape {tuple(x.shape)}")
        h = self.conv(x)
        h = h + self.emb(c_noise[:, None].float() * (self.defect != "ignores_noise"))[..., None]
        if self.defect == "batch_norm":
            h = h - h.mean(0, keepdim=True)
        if self.defect == "nan":
            h = h / 0.0
        if self.defect == "crop":
            h = h[..., 1:]
        return h


@pytest.mark.parametrize("defect,match", [("ignores_noise", "c_noise"), ("batch_norm", "rest of the batch"),
                                          ("nan", "not finite"), ("crop", "expected"), ("unused", "unused"),
                                          ("no_check", "raised RuntimeError")])
def test_check_backbone_fails_on_broken_backbones(defect, match):
    lay = Layout(channels=("u",), spatial=("x",), shape=(8,), periodic=("x",))
    check_backbone(_Net, lay)  # the healthy version passes
    with pytest.raises(AssertionError, match=match):
        check_backbone(_Net, lay, defect=defect)
    with pytest.raises(AssertionError, match="not a torch.nn.Module"):
        check_backbone(lambda layout: object(), lay)


class _UnmarkedPlugin:
    def diffkit_samplers(self):
        return {"x": diffkit.samplers.ddim}


class _NonDict:
    @hookimpl
    def diffkit_samplers(self):
        return [diffkit.samplers.ddim]


class _NotCallable:
    @hookimpl
    def diffkit_metrics(self):
        return {"pi": 3.14}


class _Shadow:
    @hookimpl
    def diffkit_samplers(self):
        return {"heun": diffkit.samplers.heun}


class _Typo:
    @hookimpl
    def diffkit_sampler(self):
        return {}


class _NoDoc:
    @hookimpl
    def diffkit_metrics(self):
        return {"anon": lambda x, y: x}


class _Empty:
    pass


@pytest.mark.parametrize("plugin,match", [(_UnmarkedPlugin(), "not marked"), (_NonDict(), "must return a dict"),
                                          (_NotCallable(), "not a callable"), (_Shadow(), "shadows a diffkit built-in"),
                                          (_Typo(), "matches no diffkit hook"), (_NoDoc(), "no docstring"),
                                          (_Empty(), "implements none")],
                         ids=lambda v: type(v).__name__ if not isinstance(v, str) else "")
def test_check_plugin_registers_fails_on_broken_plugins(plugin, match):
    with pytest.raises(AssertionError, match=match):
        check_plugin_registers(plugin)
    if isinstance(plugin, _NoDoc):
        check_plugin_registers(plugin, require_descriptions=False)
