"""Plugin discovery, the component registry and the contract checks of :mod:`diffkit.testing`.

Discovery is tested two ways, as pytest does: with faked entry points (``registry._entry_points``
returns ``EntryPoint`` objects pointing at modules written to ``tmp_path``), and with a real
installed distribution (a ``*.dist-info`` folder on ``sys.path`` that
:mod:`importlib.metadata` finds).
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import subprocess
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest
import torch

import diffkit
from diffkit import Layout, PluginError, PluginWarning, UnknownComponentError, hookimpl, registry
from diffkit.testing import check_backbone, check_plugin_registers, check_sampler, check_schedule


CORE = {
    "schedule": {"linear", "cosine", "sigmoid", "alpha_bar", "refiner"},
    "sampler": {"ddpm", "ddim", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "euler", "heun", "unipc"},
    "metric": {"sliced_wasserstein", "ensemble_mean_rmse", "ensemble_spread", "ensemble_spread_skill_ratio",
               "ensemble_crps", "ensemble_rank_histogram"},
    "adapter": {"mixture"},
    "guidance": {"dps", "reconstruction", "mmps"},
}
ENV_VARS = ("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "DIFFKIT_PLUGINS")


def names(kind: str) -> set[str]:
    return {c.name for c in registry.components(kind)}


def owner(kind: str, name: str) -> str:
    return {c.name: c.plugin for c in registry.components(kind)}[name]


@pytest.fixture(autouse=True)
def clean_registry(monkeypatch):
    """Every test starts and ends with a freshly discovered registry, no diffkit env vars
    and no plugins registered by hand."""
    for var in ENV_VARS:
        monkeypatch.delenv(var, raising=False)
    saved = list(registry._extra)
    registry.refresh()
    yield
    registry._extra[:] = saved
    registry.refresh()


@pytest.fixture
def make_module(tmp_path, monkeypatch):
    """``make_module(name, source)`` writes an importable module; it leaves ``sys.modules`` after the test."""
    src = tmp_path / "plugin_src"
    src.mkdir()
    monkeypatch.syspath_prepend(str(src))
    made: list[str] = []

    def make(name: str, source: str) -> str:
        (src / f"{name}.py").write_text(textwrap.dedent(source))
        importlib.invalidate_caches()
        made.append(name)
        return name

    yield make
    for name in made:
        sys.modules.pop(name, None)


@pytest.fixture
def fake_entry_points(monkeypatch):
    """``fake_entry_points(name=value, ...)`` replaces entry-point discovery; returns a call counter."""
    calls = {"n": 0}

    def install(**eps: str):
        objs = [metadata.EntryPoint(name, value, registry.ENTRY_POINT_GROUP) for name, value in eps.items()]

        def fake():
            calls["n"] += 1
            return objs

        monkeypatch.setattr(registry, "_entry_points", fake)
        registry.refresh()
        return calls

    return install


def schedule_plugin(*sched_names: str, doc: str = "A fake schedule for tests.") -> str:
    """Source of a plugin module registering ``sched_names`` as schedules."""
    return f'''
        from diffkit import hookimpl, cosine

        def fake_schedule(**options):
            """{doc}"""
            return cosine(**options)

        @hookimpl
        def diffkit_schedules():
            return {{n: fake_schedule for n in {list(sched_names)!r}}}
        '''


def write_distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> Path:
    """Install a distribution by hand: ``<dist>-0.1.dist-info`` plus top-level modules in ``site``."""
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    eps = "".join(f"{k} = {v}\n" for k, v in entry_points.items())
    (info / "entry_points.txt").write_text(f"[diffkit]\n{eps}")
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(source))
    return info


# -- built-ins ----------------------------------------------------------------------------
def test_core_builtins_register_through_the_hooks():
    for kind, want in CORE.items():
        assert want <= names(kind)
        for c in registry.components(kind):
            if c.name in want:
                assert c.plugin == "diffkit"
                assert c.description, f"{kind} {c.name} has no description"
    assert registry.get("sampler", "ddim") is diffkit.samplers.ddim
    assert registry.get("schedule", "cosine") is diffkit.cosine
    assert registry.get("metric", "sliced_wasserstein") is diffkit.sliced_wasserstein


def test_components_sorted_by_kind_then_name():
    comps = registry.components()
    keys = [(registry.KINDS.index(c.kind), c.name) for c in comps]
    assert keys == sorted(keys)
    with pytest.raises(ValueError, match="kinds are"):
        registry.components("samplers")


# -- discovery: faked entry points --------------------------------------------------------
def test_faked_entry_point_is_loaded(make_module, fake_entry_points):
    make_module("dk_fake_good", schedule_plugin("fake_sched"))
    fake_entry_points(goodplug="dk_fake_good")
    comp = {c.name: c for c in registry.components("schedule")}["fake_sched"]
    assert comp.plugin == "goodplug"
    assert comp.description == "A fake schedule for tests."
    assert registry.get("schedule", "fake_sched") is sys.modules["dk_fake_good"].fake_schedule
    assert registry.plugin_manager().has_plugin("goodplug")


def test_broken_plugin_import_is_a_warning_naming_it(make_module, fake_entry_points):
    make_module("dk_fake_broken", "raise ImportError('needs the heavy package frobnicate')\n")
    make_module("dk_fake_good", schedule_plugin("fake_sched"))
    fake_entry_points(brokenplug="dk_fake_broken", goodplug="dk_fake_good")
    with pytest.warns(PluginWarning, match=r"'brokenplug'.*dk_fake_broken.*frobnicate"):
        comps = registry.components()
    got = {c.name for c in comps}
    assert "fake_sched" in got and CORE["sampler"] <= got
    assert registry.get("sampler", "heun") is diffkit.samplers.heun
    assert not registry.plugin_manager().has_plugin("brokenplug")


def test_plugin_whose_hook_raises_is_a_warning_and_its_other_hooks_still_work(make_module, fake_entry_points):
    make_module("dk_fake_raises", schedule_plugin("ok_sched") + '''
        @hookimpl
        def diffkit_samplers():
            raise RuntimeError("sampler table corrupt")
        ''')
    fake_entry_points(raiser="dk_fake_raises")
    with pytest.warns(PluginWarning, match=r"'raiser' failed in diffkit_samplers\(\).*sampler table corrupt"):
        registry.components()
    assert owner("schedule", "ok_sched") == "raiser"
    assert names("sampler") == CORE["sampler"]


@pytest.mark.parametrize("ret,match", [("['not', 'a', 'dict']", "must return a dict.*got list"),
                                       ("{3: fake_schedule}", "invalid name 3"),
                                       ("{'': fake_schedule}", "invalid name ''")])
def test_hook_returning_bad_table_is_a_warning(make_module, fake_entry_points, ret, match):
    make_module("dk_fake_badret", f'''
        from diffkit import hookimpl

        def fake_schedule():
            """x"""

        @hookimpl
        def diffkit_schedules():
            return {ret}
        ''')
    fake_entry_points(badret="dk_fake_badret")
    with pytest.warns(PluginWarning, match=rf"'badret'.*{match}|{match}.*'badret'"):
        registry.components()
    assert names("schedule") == CORE["schedule"]


def test_hook_returning_none_registers_nothing_quietly(make_module, fake_entry_points):
    make_module("dk_fake_none", "from diffkit import hookimpl\n\n@hookimpl\ndef diffkit_metrics():\n    return None\n")
    fake_entry_points(nothing="dk_fake_none")
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert names("metric") == CORE["metric"]


def test_hook_with_bad_signature_skips_the_whole_plugin(make_module, fake_entry_points):
    make_module("dk_fake_badsig", schedule_plugin("half_sched") + '''
        @hookimpl
        def diffkit_backbones(layout):
            return {}
        ''')
    fake_entry_points(badsig="dk_fake_badsig")
    with pytest.warns(PluginWarning, match=r"'badsig'.*failed to load"):
        registry.components()
    assert "half_sched" not in names("schedule")  # no half-registered plugin
    assert not registry.plugin_manager().has_plugin("badsig")


def test_misspelt_hook_is_a_warning(make_module, fake_entry_points):
    make_module("dk_fake_typo", schedule_plugin("typo_sched") + '''
        @hookimpl
        def diffkit_sampler():
            return {}
        ''')
    fake_entry_points(typo="dk_fake_typo")
    with pytest.warns(PluginWarning, match=r"'typo' implements unknown hooks diffkit_sampler"):
        registry.components()
    assert owner("schedule", "typo_sched") == "typo"


def test_duplicate_name_across_plugins_is_an_error_naming_both(make_module, fake_entry_points):
    make_module("dk_fake_one", schedule_plugin("shared", "only_one"))
    make_module("dk_fake_two", schedule_plugin("shared"))
    fake_entry_points(first="dk_fake_one", second="dk_fake_two")
    with pytest.raises(PluginError, match=r"schedule 'shared'.*'first'.*'second'"):
        registry.components()
    with pytest.raises(PluginError):  # stays an error until fixed, also for unrelated lookups
        registry.get("sampler", "ddim")
    assert isinstance(PluginError("x"), diffkit.DiffkitError)


def test_plugin_shadowing_a_builtin_is_an_error(make_module, fake_entry_points):
    make_module("dk_fake_shadow", schedule_plugin("cosine"))
    fake_entry_points(shadow="dk_fake_shadow")
    with pytest.raises(PluginError, match=r"'cosine'.*'diffkit'.*'shadow'"):
        registry.get("schedule", "cosine")


def test_same_entry_point_name_from_two_distributions(make_module, fake_entry_points, monkeypatch):
    make_module("dk_fake_one", schedule_plugin("s_one"))
    make_module("dk_fake_two", schedule_plugin("s_two"))
    eps = [metadata.EntryPoint("dup", "dk_fake_one", "diffkit"), metadata.EntryPoint("dup", "dk_fake_one", "diffkit")]
    monkeypatch.setattr(registry, "_entry_points", lambda: eps)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same entry point twice (a path listed twice) is quiet
        assert owner("schedule", "s_one") == "dup"
    eps.append(metadata.EntryPoint("dup", "dk_fake_two", "diffkit"))
    registry.refresh()
    with pytest.warns(PluginWarning, match=r"'dup'.*dk_fake_one and dk_fake_two.*dk_fake_two is skipped"):
        assert "s_two" not in names("schedule")


# -- discovery: a real installed distribution ----------------------------------------------
def test_real_dist_info_entry_point_is_discovered(tmp_path, monkeypatch):
    site = tmp_path / "site"
    write_distribution(site, "fakeplugin", {"fake": "fakeplugin"},
                       {"fakeplugin": schedule_plugin("dist_sched", doc="Schedule from a real distribution.")})
    monkeypatch.syspath_prepend(str(site))
    monkeypatch.delitem(sys.modules, "fakeplugin", raising=False)
    registry.refresh()
    try:
        assert metadata.version("fakeplugin") == "0.1"
        eps = [ep for ep in metadata.entry_points(group="diffkit") if ep.name == "fake"]
        assert len(eps) == 1 and eps[0].value == "fakeplugin" and eps[0].dist.name == "fakeplugin"
        comp = {c.name: c for c in registry.components("schedule")}["dist_sched"]
        assert comp.plugin == "fake"
        assert comp.description == "Schedule from a real distribution."
        assert names("sampler") >= CORE["sampler"]
    finally:
        sys.modules.pop("fakeplugin", None)


def test_installed_backbones_entry_point_is_discovered():
    eps = {ep.name: ep for ep in metadata.entry_points(group="diffkit")}
    assert "backbones" in eps, "pyproject.toml must declare [project.entry-points.diffkit] backbones"
    assert eps["backbones"].value == "diffkit_backbones"
    assert eps["backbones"].dist.name == "diffkit"
    assert {"unet", "dit", "mlp"} <= names("backbone")
    assert {owner("backbone", n) for n in ("unet", "dit", "mlp")} == {"backbones"}


# -- errors and switches ------------------------------------------------------------------
def test_unknown_name_lists_the_installed_names():
    with pytest.raises(UnknownComponentError) as e:
        registry.get("sampler", "dpmpp_9m")
    msg = str(e.value)
    assert "'dpmpp_9m'" in msg and "ddim, ddpm, dpmpp_2m, dpmpp_2s, dpmpp_3m, euler, heun, unipc" in msg
    assert "autoload is off" not in msg
    assert isinstance(e.value, KeyError) and not msg.startswith('"')
    with pytest.raises(UnknownComponentError, match="installed adapters: images, mixture"):
        registry.get("adapter", "era5")


def test_disable_autoload_keeps_core_builtins(monkeypatch, fake_entry_points, make_module):
    make_module("dk_fake_good", schedule_plugin("fake_sched"))
    calls = fake_entry_points(goodplug="dk_fake_good")
    monkeypatch.setenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.refresh()
    for kind, want in CORE.items():
        assert names(kind) == want
    assert names("backbone") == set()
    assert calls["n"] == 0 and "dk_fake_good" not in sys.modules
    with pytest.raises(UnknownComponentError, match=r"installed backbones: none.*autoload is off"):
        registry.get("backbone", "unet")


@pytest.mark.parametrize("value,disabled", [("0", False), ("false", False), ("", False), ("yes", True), ("true", True)])
def test_disable_autoload_values(monkeypatch, fake_entry_points, value, disabled):
    calls = fake_entry_points()
    monkeypatch.setenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", value)
    registry.components()
    assert calls["n"] == (0 if disabled else 1)


def test_diffkit_plugins_env_filters_entry_points(monkeypatch, fake_entry_points, make_module):
    make_module("dk_fake_one", schedule_plugin("s_one"))
    make_module("dk_fake_two", schedule_plugin("s_two"))
    fake_entry_points(one="dk_fake_one", two="dk_fake_two")
    monkeypatch.setenv("DIFFKIT_PLUGINS", " one ")
    registry.refresh()
    assert names("schedule") == CORE["schedule"] | {"s_one"}
    assert "dk_fake_two" not in sys.modules  # not even imported
    with pytest.raises(UnknownComponentError, match=r"DIFFKIT_PLUGINS= one "):
        registry.get("schedule", "s_two")
    monkeypatch.setenv("DIFFKIT_PLUGINS", "one,three")
    registry.refresh()
    with pytest.warns(PluginWarning, match="DIFFKIT_PLUGINS names three"):
        registry.components()


def test_discovery_is_cached_until_refresh(monkeypatch, fake_entry_points, make_module):
    make_module("dk_fake_good", schedule_plugin("fake_sched"))
    calls = fake_entry_points(goodplug="dk_fake_good")
    registry.components()
    registry.components("sampler")
    registry.get("schedule", "fake_sched")
    registry.plugin_manager()
    assert calls["n"] == 1
    pm = registry.plugin_manager()
    monkeypatch.setenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    assert "fake_sched" in names("schedule")  # switches take effect on refresh()
    registry.refresh()
    assert registry.plugin_manager() is not pm
    assert "fake_sched" not in names("schedule")
    monkeypatch.delenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD")
    registry.refresh()
    assert "fake_sched" in names("schedule") and calls["n"] == 2


def test_register_and_unregister_plugin_by_hand(monkeypatch):
    class MyPlugin:
        @hookimpl
        def diffkit_samplers(self):
            return {"mine": diffkit.samplers.ddim}

    registry.register_plugin(MyPlugin(), "handmade")
    assert owner("sampler", "mine") == "handmade"
    registry.refresh()
    assert "mine" in names("sampler")  # survives refresh()
    monkeypatch.setenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.refresh()
    assert "mine" in names("sampler")  # and does not depend on autoload
    registry.unregister_plugin("handmade")
    with pytest.raises(UnknownComponentError):
        registry.get("sampler", "mine")
    registry.unregister_plugin("never-registered")  # a no-op


def test_register_plugin_duplicate_and_broken(monkeypatch):
    class Clash:
        @hookimpl
        def diffkit_samplers(self):
            return {"ddpm": diffkit.samplers.ddim}

    class BadSignature:
        @hookimpl
        def diffkit_metrics(self, extra):
            return {}

    registry.register_plugin(Clash(), "clash")
    with pytest.raises(PluginError, match=r"'ddpm'.*'diffkit'.*'clash'"):
        registry.components()
    registry.unregister_plugin("clash")
    before = names("metric")
    assert CORE["metric"] <= before
    registry.register_plugin(BadSignature(), "badsig")
    with pytest.warns(PluginWarning, match=r"'badsig' could not be registered"):
        assert names("metric") == before


def test_register_plugin_name_taken_by_entry_point(make_module, fake_entry_points):
    make_module("dk_fake_good", schedule_plugin("fake_sched"))
    fake_entry_points(goodplug="dk_fake_good")

    class Other:
        @hookimpl
        def diffkit_metrics(self):
            return {"other_metric": diffkit.sliced_wasserstein}

    registry.register_plugin(Other(), "goodplug")
    with pytest.warns(PluginWarning, match=r"'goodplug'.*already taken"):
        assert "other_metric" not in names("metric")


# -- import weight ------------------------------------------------------------------------
def _run_python(code: str, tmp_path: Path) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["OMP_NUM_THREADS"] = "1"
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True,
                          cwd=tmp_path, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout.strip().splitlines()[-1])


HEAVY = ("xarray", "netCDF4", "scipy", "pandas", "matplotlib", "diffusers")


def test_import_diffkit_is_light(tmp_path):
    got = _run_python(f"""
        import json, sys
        import diffkit
        heavy = {HEAVY!r} + ("einops", "diffkit_backbones", "diffkit.testing", "pytest")
        print(json.dumps(sorted(m for m in heavy if m in sys.modules)))
        """, tmp_path)
    assert got == [], f"`import diffkit` imported {got}"


def test_discovering_plugins_stays_light(tmp_path):
    got = _run_python(f"""
        import json, sys
        import diffkit
        names = {{c.name for c in diffkit.registry.components()}}
        print(json.dumps({{"heavy": sorted(m for m in {HEAVY!r} if m in sys.modules),
                          "backbones": "diffkit_backbones" in sys.modules, "unet": "unet" in names}}))
        """, tmp_path)
    assert got["heavy"] == [], f"plugin discovery imported {got['heavy']}"
    assert got["backbones"] and got["unet"]  # discovery really ran


# -- diffkit.testing: fixtures ------------------------------------------------------------
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


# -- diffkit.testing: the checks pass on diffkit's own components -------------------------
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
    assert set(got) == {"adapter", "schedule", "sampler", "guidance", "metric", "command"}
    assert set(got["sampler"]) == CORE["sampler"] and set(got["command"]) == {"quickstart"}


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


# -- diffkit.testing: the checks fail on broken components --------------------------------
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
