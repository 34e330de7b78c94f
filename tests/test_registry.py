"""Tests of :mod:`diffkit.registry`: plugin discovery and the component registry.

Discovery is tested two ways, as pytest does: with faked entry points (``registry._entry_points``
returns ``EntryPoint`` objects pointing at modules written to ``tmp_path``), and with a real
installed distribution (a ``*.dist-info`` folder on ``sys.path`` that
:mod:`importlib.metadata` finds).  Every test starts and ends with a freshly discovered registry
(conftest.py's ``clean_registry``).
"""
from __future__ import annotations

import importlib
import importlib.util
import sys
import textwrap
import warnings
from importlib import metadata
from pathlib import Path

import pytest

import diffkit
from diffkit import PluginError, PluginWarning, UnknownComponentError, hookimpl, registry

from _registry_helpers import CORE, _run_python, names, owner

pytestmark = pytest.mark.usefixtures("clean_registry")


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
