"""Plugin discovery and the component registry.

Modelled on pytest and xarray's backends: diffkit's own components are plugins too -- the
modules named in :data:`diffkit._builtins.BUILTIN_PLUGINS`, like pytest's ``default_plugins`` --
loaded through the same entry-point path as installed plugins, which come from the ``diffkit``
entry-point group.

:func:`resolve` is the one place where a name becomes a component: the maths (schedules,
samplers, the :class:`~diffkit.Denoiser`) takes objects, and everything that holds names (configs,
the command line, ``diffkit.sample``, ``diffkit.get_schedule``) resolves them here.  Discovery is lazy and cached; :func:`refresh`
rebuilds it.  A plugin that fails to import, or whose hook raises, becomes a
:class:`PluginWarning` naming it and the rest keep working.

Environment switches:

- ``DIFFKIT_DISABLE_PLUGIN_AUTOLOAD=1`` loads no entry points (only diffkit's core built-ins
  and plugins registered by hand with :func:`register_plugin`);
- ``DIFFKIT_PLUGINS=a,b`` loads only the named entry points.

Both are read when discovery runs; call :func:`refresh` after changing them.  Two plugins
registering the same name of the same kind is a :class:`~diffkit.errors.PluginError`
naming both.
"""
from __future__ import annotations

import functools
import importlib
import inspect
import os
import re
import warnings
from dataclasses import dataclass
from importlib import metadata
from typing import Any

import pluggy

from . import hookspecs
from ._builtins import BUILTIN_PLUGINS
from .errors import ConfigError, PluginError, UnknownComponentError

ENTRY_POINT_GROUP = "diffkit"
KINDS = ("backbone", "adapter", "schedule", "sampler", "guidance", "metric", "command", "quickstart", "evaluator")
_HOOKS = {
    "backbone": "diffkit_backbones",
    "adapter": "diffkit_adapters",
    "schedule": "diffkit_schedules",
    "sampler": "diffkit_samplers",
    "guidance": "diffkit_guidance",
    "metric": "diffkit_metrics",
    "command": "diffkit_commands",
    "quickstart": "diffkit_quickstarts",
    "evaluator": "diffkit_evaluators",
}


class PluginWarning(UserWarning):
    """A plugin could not be loaded or failed while registering; it was skipped."""


@dataclass(frozen=True)
class Component:
    """One registered component."""

    kind: str
    name: str
    plugin: str
    obj: Any

    @property
    def description(self) -> str:
        """The first paragraph of the object's docstring, on one line."""
        doc = (getattr(self.obj, "__doc__", None) or "").strip()
        return " ".join(re.split(r"\n\s*\n", doc, maxsplit=1)[0].split())


_manager: pluggy.PluginManager | None = None
_table: dict[str, dict[str, Component]] | None = None
_extra: list[tuple[str, Any]] = []  # plugins registered by hand


def _entry_points():
    return metadata.entry_points(group=ENTRY_POINT_GROUP)


def _autoload_disabled() -> bool:
    return os.environ.get("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "").strip().lower() not in ("", "0", "false", "no")


def _only() -> set[str] | None:
    """The entry-point names allowed by ``DIFFKIT_PLUGINS``, or ``None`` for all."""
    only = os.environ.get("DIFFKIT_PLUGINS", "")
    names = {s.strip() for s in only.split(",") if s.strip()}
    return names or None


def _warn(msg: str) -> None:
    warnings.warn(msg, PluginWarning, stacklevel=4)


def _register(pm: pluggy.PluginManager, plugin: Any, name: str) -> None:
    """Register ``plugin``; hooks with bad signatures leave no half-registered plugin behind."""
    try:
        pm.register(plugin, name=name)
    except Exception:
        if pm.has_plugin(name):
            pm.unregister(name=name)
        raise
    unknown = sorted(h.name for h in pm.get_hookcallers(plugin) or () if not h.has_spec())
    if unknown:
        _warn(f"diffkit plugin {name!r} implements unknown hooks {', '.join(unknown)} (a typo?); "
              f"the hooks are {', '.join(_HOOKS.values())}")


def _builtin_entry_points() -> list[metadata.EntryPoint]:
    """diffkit's own plugins as entry points of the ``diffkit`` group, named after their modules."""
    return [metadata.EntryPoint(name, name, ENTRY_POINT_GROUP) for name in BUILTIN_PLUGINS]


def _load(pm: pluggy.PluginManager, ep: metadata.EntryPoint) -> None:
    """Import the plugin ``ep`` points to and register it under ``ep.name``: the one loading path
    of built-in and installed plugins."""
    _register(pm, ep.load(), ep.name)


def _load_builtins(pm: pluggy.PluginManager) -> None:
    """Load diffkit's own plugins; one that fails is a bug in diffkit, raised as it is."""
    for ep in _builtin_entry_points():
        _load(pm, ep)


def _load_entry_points(pm: pluggy.PluginManager) -> None:
    only = _only()
    seen: dict[str, str] = {}
    for ep in _entry_points():
        if only is not None and ep.name not in only:
            continue
        if ep.name in seen:  # the same name from two distributions: keep the first
            if seen[ep.name] != ep.value:
                _warn(f"two installed diffkit plugins use the entry-point name {ep.name!r} "
                      f"({seen[ep.name]} and {ep.value}); {ep.value} is skipped")
            continue
        seen[ep.name] = ep.value
        if pm.is_blocked(ep.name):
            continue
        try:
            _load(pm, ep)
        except Exception as e:  # a broken plugin must not break diffkit
            _warn(f"diffkit plugin {ep.name!r} ({ep.value}) failed to load and is skipped: "
                  f"{type(e).__name__}: {e}")
    if only is not None:
        missing = sorted(only - set(seen))
        if missing:
            _warn(f"DIFFKIT_PLUGINS names {', '.join(missing)}, which no installed plugin provides")


def plugin_manager() -> pluggy.PluginManager:
    """The cached plugin manager, discovering plugins on first use."""
    global _manager
    if _manager is None:
        pm = pluggy.PluginManager("diffkit")
        pm.add_hookspecs(hookspecs)
        _load_builtins(pm)
        if not _autoload_disabled():
            _load_entry_points(pm)
        for name, plugin in _extra:
            if pm.has_plugin(name):
                _warn(f"plugin name {name!r} passed to register_plugin() is already taken by an "
                      f"installed plugin; the hand-registered one is skipped")
                continue
            try:
                _register(pm, plugin, name)
            except Exception as e:
                _warn(f"diffkit plugin {name!r} could not be registered and is skipped: {type(e).__name__}: {e}")
        _manager = pm
    return _manager


def register_plugin(plugin: Any, name: str) -> None:
    """Register a plugin object (module or instance with hookimpls) by hand, then refresh."""
    _extra.append((name, plugin))
    refresh()


def unregister_plugin(name: str) -> None:
    """Remove a plugin registered with :func:`register_plugin`."""
    _extra[:] = [(n, p) for n, p in _extra if n != name]
    refresh()


def refresh() -> None:
    """Forget the cached discovery; the next lookup discovers plugins again."""
    global _manager, _table
    _manager = None
    _table = None


def _build_table() -> dict[str, dict[str, Component]]:
    pm = plugin_manager()
    table: dict[str, dict[str, Component]] = {k: {} for k in KINDS}
    for kind, hook_name in _HOOKS.items():
        hook = getattr(pm.hook, hook_name)
        for impl in hook.get_hookimpls():
            plugin_name = _plugin_label(pm.get_name(impl.plugin) or repr(impl.plugin))
            try:
                got = impl.function()
                if got is None:
                    continue
                if not isinstance(got, dict):
                    raise TypeError(f"{hook_name}() must return a dict of name -> object, got {type(got).__name__}")
            except Exception as e:
                _warn(f"diffkit plugin {plugin_name!r} failed in {hook_name}() and its {kind}s are skipped: "
                      f"{type(e).__name__}: {e}")
                continue
            for name, obj in got.items():
                if not isinstance(name, str) or not name:
                    _warn(f"diffkit plugin {plugin_name!r} registered a {kind} with invalid name {name!r}; skipped")
                    continue
                if name in table[kind]:
                    other = table[kind][name].plugin
                    raise PluginError(
                        f"{kind} {name!r} is registered by two plugins, {other!r} and {plugin_name!r}; "
                        f"rename it in one of them, uninstall one, or choose the plugins to load with "
                        f"DIFFKIT_PLUGINS=name,..."
                    )
                table[kind][name] = Component(kind, name, plugin_name, obj)
    return table


def _plugin_label(name: str) -> str:
    """The plugin a component is listed under: ``diffkit`` for every built-in module."""
    return "diffkit" if name in BUILTIN_PLUGINS else name


def components(kind: str | None = None) -> list[Component]:
    """Every registered component (of one ``kind``), sorted by kind and name."""
    global _table
    if _table is None:
        _table = _build_table()
    if kind is not None:
        _check_kind(kind)
        return sorted(_table[kind].values(), key=lambda c: c.name)
    return [c for k in KINDS for c in sorted(_table[k].values(), key=lambda c: c.name)]


def _check_kind(kind: str) -> None:
    if kind not in KINDS:
        raise ValueError(f"unknown component kind {kind!r}; kinds are {', '.join(KINDS)}")


def get(kind: str, name: str) -> Any:
    """The object registered as ``name`` of ``kind``; an error lists what is installed."""
    _check_kind(kind)
    comps = {c.name: c for c in components(kind)}
    if name not in comps:
        avail = ", ".join(sorted(comps)) or "none"
        hint = ""
        if _autoload_disabled():
            hint = " (plugin autoload is off: DIFFKIT_DISABLE_PLUGIN_AUTOLOAD is set)"
        elif _only() is not None:
            hint = f" (only the plugins in DIFFKIT_PLUGINS={os.environ['DIFFKIT_PLUGINS']} are loaded)"
        raise UnknownComponentError(
            f"unknown {kind} {name!r}; installed {kind}s: {avail}{hint}. "
            f"Check the spelling, or install the plugin that provides it (`diffkit plugins` lists them)"
        )
    return comps[name].obj


#: kinds whose registered objects are factories of the component: resolving a name calls the
#: factory with the spec's options (``"cosine"`` resolves to ``cosine()``, a Schedule)
FACTORY_KINDS = ("schedule",)


def _is_component(kind: str, obj: Any) -> bool:
    """Whether ``obj`` is already a component of ``kind`` (rather than a name or a spec)."""
    if kind == "schedule":
        return callable(getattr(obj, "log_alpha_bar", None))
    return callable(obj)


def check_options(factory: Any, options: dict, where: str) -> None:
    """Unknown keyword options of ``factory`` are a :class:`~diffkit.errors.ConfigError` naming them
    and listing the valid ones (``where`` says whose options they are)."""
    try:
        params = inspect.signature(factory).parameters
    except (TypeError, ValueError):
        return
    if any(p.kind is p.VAR_KEYWORD for p in params.values()):
        return
    valid = [n for n, p in params.items() if p.kind in (p.KEYWORD_ONLY, p.POSITIONAL_OR_KEYWORD) and n != "layout"]
    unknown = sorted(set(options) - set(valid))
    if unknown:
        raise ConfigError(f"{where}: unknown option(s) {', '.join(unknown)}; valid options: {', '.join(valid)}")


def _bind(obj: Any, options: dict) -> Any:
    """``obj`` with keyword ``options`` fixed, keeping its attributes (a sampler's ``info``), name and doc."""
    bound = functools.partial(obj, **options)
    bound.__dict__.update(getattr(obj, "__dict__", {}))
    for attr in ("__name__", "__qualname__", "__doc__", "__module__"):
        if hasattr(obj, attr):
            setattr(bound, attr, getattr(obj, attr))
    return bound


def resolve(kind: str, spec: Any) -> Any:
    """The component of ``kind`` that ``spec`` names: the one place names become objects.

    ``spec`` is

    - a registered name (``"cosine"``, ``"dpmpp_2m"``, ``"unet"``);
    - a dict ``{"name": name, **options}``: the options are checked against the component's
      keywords (an unknown one is a :class:`~diffkit.errors.ConfigError` listing the valid ones);
    - or already a component (a :class:`~diffkit.schedules.Schedule` instance, a sampler function,
      any callable), returned unchanged.

    For a factory kind (:data:`FACTORY_KINDS`: ``schedule``) the result is what the factory
    builds, ``factory(**options)``; for every other kind it is the registered object, with the
    options bound as keyword arguments when there are any (``resolve("backbone", {"name": "unet",
    "channels": 32})(layout)``).  An unknown name is an :class:`~diffkit.errors.UnknownComponentError`
    listing the installed ones."""
    _check_kind(kind)
    if isinstance(spec, str):
        name, options = spec, {}
    elif isinstance(spec, dict):
        options = dict(spec)
        name = options.pop("name", None)
        if not isinstance(name, str) or not name:
            raise ConfigError(f"a {kind} given as a dict needs a 'name' key naming a registered {kind}, "
                              f"got {spec!r}; e.g. {{'name': ..., **options}}")
    elif _is_component(kind, spec):
        return spec
    else:
        raise TypeError(f"cannot make a {kind} from {type(spec).__name__} {spec!r}; give a registered {kind} "
                        f"name, a dict {{'name': ..., **options}} or a {kind} object")
    obj = get(kind, name)
    if options:
        check_options(obj, options, f"{kind} {name!r}")
    if kind in FACTORY_KINDS:
        return obj(**options)
    return _bind(obj, options) if options else obj


def get_schedule(spec: Any):
    """A :class:`~diffkit.schedules.Schedule` from an instance, a registered name or
    ``{"name": ..., **options}``: :func:`resolve` for ``kind="schedule"``."""
    return resolve("schedule", spec)


def get_guidance(spec: Any):
    """A guidance method from a registered name (``"dps"``, ``"reconstruction"``, ``"mmps"`` or a
    plugin's), ``{"name": ..., **options}`` (options bound) or a method itself: :func:`resolve` for
    ``kind="guidance"``."""
    return resolve("guidance", spec)
