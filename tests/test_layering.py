"""The layers of diffkit (issue 16, "Registry"): the maths takes objects, the registry turns names into
them, and nothing imports in a circle.

- ``import diffkit`` imports no plugin (the domain plugins load on first registry use);
- no math module imports :mod:`diffkit.registry`, neither at import time (checked in a fresh
  interpreter) nor anywhere in its source (checked with ``ast``, function-local imports included);
- the import graph of ``diffkit/`` (every import statement, function-local ones included) has no cycle;
- :func:`diffkit.registry.resolve` is where names become components, and the maths refuses names
  with one line pointing to it.
"""
from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import diffkit as dk
from diffkit import registry
from diffkit.errors import ConfigError, UnknownComponentError

ROOT = Path(__file__).resolve().parents[1]
PKG = ROOT / "diffkit"
PLUGINS = ("diffkit_weather", "diffkit_pde", "diffkit_images", "diffkit_backbones")
#: the math modules of the issue, and the modules samplers.py was split into
MATH = ("schedules", "samplers", "grids", "multistep", "process", "param", "losses", "denoiser")


def _fresh(code: str) -> list:
    """Run ``code`` in a fresh interpreter (from the repository root); it prints a JSON list."""
    r = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_diffkit_imports_no_plugin_module():
    loaded = _fresh(f"import json, sys, diffkit\n"
                    f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {PLUGINS!r})))")
    assert loaded == []


def test_import_diffkit_and_its_config_load_no_torch():
    """``import diffkit`` / ``diffkit.config`` are light (PEP 562 lazy names): no torch, xarray, netCDF4."""
    heavy = ("torch", "xarray", "netCDF4", "numpy")
    loaded = _fresh(f"import json, sys, diffkit, diffkit.config\n"
                    f"print(json.dumps(sorted(m for m in sys.modules if m.split('.')[0] in {heavy!r})))")
    assert loaded == []


def test_every_public_name_of_diffkit_resolves_lazily():
    out = _fresh("import json, diffkit\n"
                 "vals = {n: type(getattr(diffkit, n)).__name__ for n in diffkit.__all__}\n"
                 "print(json.dumps([sorted(vals), hasattr(diffkit, 'samplers'), hasattr(diffkit, 'nope')]))")
    import diffkit

    assert out == [sorted(diffkit.__all__), True, False]
    assert set(diffkit.__all__) <= set(dir(diffkit))


def test_no_math_module_imports_the_registry_at_import_time():
    # ``diffkit/__init__`` imports the registry, so the math modules are imported under a bare package
    # object standing in for ``diffkit``: only what they import themselves is loaded
    code = ("import importlib, json, sys, types\n"
            f"pkg = types.ModuleType('diffkit'); pkg.__path__ = [{str(PKG)!r}]; sys.modules['diffkit'] = pkg\n"
            "bad = []\n"
            f"for m in {MATH!r}:\n"
            "    importlib.import_module('diffkit.' + m)\n"
            "    bad += [(m, x) for x in ('diffkit.registry', 'diffkit.sampling', 'diffkit.model') if x in sys.modules]\n"
            f"    bad += [(m, x) for x in sys.modules if x.split('.')[0] in {PLUGINS!r}]\n"
            "print(json.dumps(bad))")
    assert _fresh(code) == []


def _imports(path: Path) -> list[tuple[int, str, tuple]]:
    """``(line, module, names)`` of every import in ``path`` (anywhere, function-local ones too), with
    the module absolute: ``from . import x`` is ``(line, "diffkit", ("x",))``, ``import a.b`` is
    ``(line, "a.b", ())``."""
    out = []
    for node in ast.walk(ast.parse(path.read_text(), str(path))):
        if isinstance(node, ast.Import):
            out += [(node.lineno, a.name, ()) for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                base = f"diffkit.{base}" if base else "diffkit"
            out.append((node.lineno, base, tuple(a.name for a in node.names)))
    return out


def _targets(path: Path) -> set[str]:
    """The diffkit modules ``path`` imports: ``diffkit.x`` for a module, ``diffkit`` (the package's
    ``__init__``) for a name taken from the package itself."""
    mods = {p.stem for p in PKG.glob("*.py")} - {"__init__"}
    out = set()
    for _, module, names in _imports(path):
        parts = module.split(".")
        if parts[0] != "diffkit":
            continue
        if len(parts) > 1:
            out.add(f"diffkit.{parts[1]}")
        elif not names:
            out.add("diffkit")
        else:
            out |= {f"diffkit.{n}" if n in mods else "diffkit" for n in names}
    return out


def test_no_math_module_imports_the_registry_in_its_source():
    for m in MATH:
        bad = sorted(_targets(PKG / f"{m}.py") & {"diffkit", "diffkit.registry", "diffkit.sampling", "diffkit.model"})
        assert bad == [], f"diffkit/{m}.py imports {bad}: the maths takes objects; resolve names in the caller"


def _graph() -> dict[str, set[str]]:
    """The import graph of ``diffkit/``: module -> the diffkit modules it imports (``diffkit`` is the
    package's ``__init__``)."""
    graph = {}
    for p in PKG.glob("*.py"):
        me = "diffkit" if p.stem == "__init__" else f"diffkit.{p.stem}"
        graph[me] = _targets(p) - {me}
    return graph


def _cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan)."""
    index, low, stack, on, out, counter = {}, {}, [], set(), [], [0]

    def visit(v):
        index[v] = low[v] = counter[0]
        counter[0] += 1
        stack.append(v)
        on.add(v)
        for w in sorted(graph.get(v, ())):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            comp = []
            while True:
                w = stack.pop()
                on.discard(w)
                comp.append(w)
                if w == v:
                    break
            if len(comp) > 1:
                out.append(sorted(comp))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return out


def test_import_graph_of_diffkit_has_no_cycle():
    graph = _graph()
    # the package's __init__ imports its public modules; an edge back to it from one of them would
    # be a cycle, so the modules import each other, never ``from diffkit import ...``
    cycles = _cycles(graph)
    detail = [{m: sorted(graph[m] & set(c)) for m in c} for c in cycles]
    assert cycles == [], f"import cycles in diffkit/ (function-local imports count): {detail}"
    # the layers of the issue: the registry knows its built-ins by name only, and they know no registry
    assert graph["diffkit.registry"] <= {"diffkit.hookspecs", "diffkit._builtins", "diffkit.errors"}
    assert graph["diffkit._builtins"] == set()
    for m in ("schedules", "samplers", "grids", "multistep"):
        assert "diffkit.registry" not in graph[f"diffkit.{m}"] and "diffkit.quickstart" not in graph[f"diffkit.{m}"]


def test_cycle_finder_finds_a_cycle():
    assert _cycles({"a": {"b"}, "b": {"c"}, "c": {"a"}, "d": {"a"}}) == [["a", "b", "c"]]
    assert _cycles({"a": {"b"}, "b": set()}) == []


def test_builtins_are_a_list_of_plugin_modules_loaded_as_entry_points():
    from diffkit._builtins import BUILTIN_PLUGINS

    assert all(isinstance(m, str) and m.startswith("diffkit.") for m in BUILTIN_PLUGINS)
    eps = registry._builtin_entry_points()
    assert [(ep.name, ep.value, ep.group) for ep in eps] == [(m, m, "diffkit") for m in BUILTIN_PLUGINS]
    pm = registry.plugin_manager()
    for m in BUILTIN_PLUGINS:
        assert pm.get_plugin(m) is sys.modules[m]
    assert {c.plugin for c in registry.components() if c.obj.__module__.startswith("diffkit.")} == {"diffkit"}


# -- resolve: the one place names become components ---------------------------------------------
def test_registry_resolve_names_specs_and_objects():
    sch = registry.resolve("schedule", "cosine")
    assert isinstance(sch, dk.Schedule) and type(sch) is type(dk.cosine())
    ref = registry.resolve("schedule", {"name": "refiner", "steps": 4, "sigma_min": 1e-6})
    assert ref.T == 5 and ref.sample_spacing == "uniform"
    assert registry.resolve("schedule", sch) is sch
    assert registry.resolve("sampler", "ddim") is dk.samplers.ddim
    assert registry.resolve("sampler", dk.samplers.heun) is dk.samplers.heun
    bound = registry.resolve("sampler", {"name": "ddim", "eta": 1.0})
    assert bound.info is dk.samplers.ddim.info and bound.keywords == {"eta": 1.0}
    D = dk.GaussianDenoiser(dk.cosine(), torch.zeros(2, dtype=torch.float64), 1.0)
    x1 = torch.randn(5, 2, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    run = lambda s, **kw: dk.sample(D, x1.shape, sampler=s, nfe=6, x_init=x1,
                                    generator=torch.Generator().manual_seed(1), **kw)
    assert torch.equal(run({"name": "ddim", "eta": 1.0}), run("ddim", eta=1.0))
    net = registry.resolve("backbone", {"name": "mlp", "hidden": 8, "depth": 1})(dk.Layout(channels=("a", "b")))
    assert sum(p.numel() for p in net.parameters()) > 0


def test_registry_resolve_bad_specs_are_one_line_errors():
    with pytest.raises(UnknownComponentError, match=r"unknown schedule 'cosin'; installed schedules: .*cosine"):
        registry.resolve("schedule", "cosin")
    with pytest.raises(ConfigError, match=r"schedule 'cosine': unknown option\(s\) q; valid options: s, logsnr_min, T"):
        registry.resolve("schedule", {"name": "cosine", "q": 1})
    with pytest.raises(ConfigError, match="a sampler given as a dict needs a 'name' key"):
        registry.resolve("sampler", {"eta": 1.0})
    with pytest.raises(TypeError, match="cannot make a schedule from int 3"):
        registry.resolve("schedule", 3)
    with pytest.raises(ValueError, match="unknown component kind 'samplers'"):
        registry.resolve("samplers", "ddim")
    for e in (UnknownComponentError, ConfigError):
        try:
            registry.resolve("sampler", "nope" if e is UnknownComponentError else {"name": "ddim", "bogus": 1})
        except e as err:
            assert "\n" not in str(err)


def test_math_modules_take_objects_and_point_names_to_the_registry(affine_net):
    with pytest.raises(TypeError, match=r"Denoiser takes a Schedule object, got 'cosine'; build it with "
                                        r"diffkit.get_schedule\('cosine'\)"):
        dk.Denoiser(affine_net(), "cosine")
    with pytest.raises(TypeError, match="Regressor takes a Schedule object"):
        dk.Regressor(affine_net(), dk.Layout(channels=("a",)), {"name": "cosine"})
    D = dk.GaussianDenoiser(dk.cosine(), torch.zeros(2), 1.0)
    with pytest.raises(TypeError, match=r"diffkit.samplers.sample takes a sampler function, got the name 'ddim'; "
                                        r"use diffkit.sample"):
        dk.samplers.sample(D, (2, 2), sampler="ddim", nfe=3)
    x = dk.samplers.sample(D, (2, 2), nfe=3, generator=torch.Generator().manual_seed(0))  # default: dpmpp_2m
    assert torch.equal(x, dk.sample(D, (2, 2), sampler="dpmpp_2m", nfe=3, generator=torch.Generator().manual_seed(0)))
    assert dk.get_schedule("linear").T == 1000 and not hasattr(dk.schedules, "get_schedule")
    assert not hasattr(dk.samplers, "get_sampler")
