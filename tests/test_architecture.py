"""The shape of the code base (issue 16): docs/architecture.md's module map matches the tree, and no
module of ``diffkit/`` or ``plugins/`` grows past what a maintainer reads in one sitting.

The map's convention: in the ``diffkit/`` section every module is named by its file name
(``__init__.py`` and ``__main__.py`` included); in the ``plugins/`` section a plugin package is a row
of the package table (its ``__init__.py``), and each of its modules is named by its file name either
in that row or under a heading naming the package (or anywhere as ``diffkit_pde/adapter.py``).
"""
from __future__ import annotations

import fnmatch
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
DOC = ROOT / "docs" / "architecture.md"
#: the issue's limit: no module in diffkit/ or plugins/ over this many lines
MAX_LINES = 800

_TICKED = re.compile(r"`([^`\s]+)`")
_PLUGIN = re.compile(r"diffkit_[a-z0-9_]+")


def tree_modules() -> set[str]:
    """Every module the map must name, as a path relative to the repository root."""
    core = {p.relative_to(ROOT).as_posix() for p in (ROOT / "diffkit").rglob("*.py")}
    plugins = {p.relative_to(ROOT).as_posix() for p in (ROOT / "plugins").glob("*/**/*.py")}
    plugins = {m for m in plugins if not m.endswith("/__init__.py") or m.count("/") > 2}   # a package is its row
    return {m for m in core | plugins if "__pycache__" not in m}


def tree_plugin_packages() -> set[str]:
    return {p.parent.name for p in (ROOT / "plugins").glob("*/__init__.py")}


def module_map(text: str) -> str:
    start = text.index("## Module map")
    end = text.find("\n## ", start + 1)
    return text[start: end if end >= 0 else len(text)]


def named_in_map(text: str) -> tuple[set[str], set[str]]:
    """(modules, plugin packages) the map names; modules as paths relative to the repository root.

    A ``.py`` name counts for the plugin package in the first cell of its table row, else for the
    package of the nearest heading (``diffkit/`` or a plugin package); ``diffkit/x.py``,
    ``plugins/pkg/x.py`` and ``pkg/x.py`` name themselves, other paths (``tests/...``) nothing."""
    modules: set[str] = set()
    packages: set[str] = set()
    section = None
    for line in module_map(text).splitlines():
        ticked = _TICKED.findall(line)
        if line.startswith("#"):
            first = ticked[0] if ticked else ""
            section = ("diffkit" if first.rstrip("/") == "diffkit" else
                       f"plugins/{first}" if _PLUGIN.fullmatch(first) else None)
            continue
        where = section
        if line.startswith("|"):
            cell = _TICKED.findall(line.split("|")[1])
            if cell and _PLUGIN.fullmatch(cell[0]):
                packages.add(cell[0])
                where = f"plugins/{cell[0]}"
        for tok in ticked:
            if not tok.endswith(".py"):
                continue
            if "/" in tok:
                head = tok.split("/")[0]
                if head in ("diffkit", "plugins"):
                    modules.add(tok)
                elif _PLUGIN.fullmatch(head):
                    modules.add(f"plugins/{tok}")
            elif where is not None:
                modules.add(f"{where}/{tok}")
    return modules, packages


def test_module_map_names_every_module():
    """Each module under diffkit/ and plugins/*/ is named in docs/architecture.md's module map."""
    modules, packages = named_in_map(DOC.read_text())
    missing = sorted(tree_modules() - modules)
    assert not missing, f"docs/architecture.md's module map does not name {missing}: add one line each"
    assert not tree_plugin_packages() - packages, sorted(tree_plugin_packages() - packages)


def test_module_map_names_only_modules_that_exist():
    modules, packages = named_in_map(DOC.read_text())
    gone = sorted(m for m in modules if not (ROOT / m).is_file())
    assert not gone, f"docs/architecture.md's module map names modules that do not exist: {gone}"
    assert packages <= tree_plugin_packages(), sorted(packages - tree_plugin_packages())


def test_module_map_reader_attributes_names_to_their_package():
    """The reader above: file names count for their row's package, then their heading's; qualified
    names for themselves; a name outside any package section counts for none."""
    doc = "\n".join([
        "## Module map", "### `diffkit/` — core", "| module | role |", "|---|---|",
        "| `a.py`, `b.py` | x |", "### `plugins/` — plugins", "| package | adds |", "|---|---|",
        "| `diffkit_p` | `c.py` and `diffkit_q/d.py` |", "| `diffkit_q` | q |", "stray `e.py`, `tests/t.py`",
        "#### `diffkit_q`", "| `f.py` | f |", "## Next", "| `g.py` | after the map |"])
    modules, packages = named_in_map(doc)
    assert modules == {"diffkit/a.py", "diffkit/b.py", "plugins/diffkit_p/c.py", "plugins/diffkit_q/d.py",
                       "plugins/diffkit_q/f.py"}
    assert packages == {"diffkit_p", "diffkit_q"}


@pytest.mark.parametrize("top", ["diffkit", "plugins"])
def test_no_module_over_800_lines(top):
    """No module in diffkit/ or plugins/ over 800 lines (issue 16): split it by concern instead."""
    sizes = {p.relative_to(ROOT).as_posix(): len(p.read_text(encoding="utf-8").splitlines())
             for p in (ROOT / top).rglob("*.py") if "__pycache__" not in p.parts}
    assert sizes, f"no modules found under {top}/"
    over = {m: n for m, n in sorted(sizes.items()) if n > MAX_LINES}
    assert not over, f"modules over {MAX_LINES} lines: {over}"


def test_fast_lane_is_documented_and_the_full_command_is_cis():
    """The README gives the fast lane (``-m "not slow"``, the ``slow`` marker declared and markers
    strict) beside the full command, and the full command is the one .ci/run runs."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib

    readme = (ROOT / "README.md").read_text()
    ci = (ROOT / ".ci" / "run").read_text().split("the README's test command, verbatim", 1)[1]
    ci_cmd = next(line.strip() for line in ci.splitlines()[1:] if line.strip() and not line.startswith("#"))
    assert ci_cmd.startswith("python3 -m pytest") and "slow" not in ci_cmd, f"CI must run every test: {ci_cmd}"
    assert f"&& {ci_cmd}\n```" in readme, "the README's full test command is not the one .ci/run runs"
    assert 'python3 -m pytest -q -m "not slow"' in readme
    ini = tomllib.loads((ROOT / "pyproject.toml").read_text())["tool"]["pytest"]["ini_options"]
    assert any(m.startswith("slow:") for m in ini["markers"]) and "--strict-markers" in ini["addopts"]


# ------------------------------------------------------------------------------------------
# one test file per module (issue 16)
# ------------------------------------------------------------------------------------------
TESTS = ROOT / "tests"

#: Modules whose tests live in files not named by the rule (see test_every_module_has_a_test_file),
#: each with the reason.  A pattern (fnmatch) names several modules at once.  When a module gets
#: its own tests/test_<name>.py, drop its entry here.
TESTED_IN: dict[str, tuple[str, ...]] = {
    # -- core --------------------------------------------------------------------------------
    "diffkit/_builtins.py": ("test_layering.py", "test_testing.py"),      # the list of built-in plugin modules
    "diffkit/_io.py": ("test_quickstart.py",),                            # atomic_write: quickstart's report.md
    "diffkit/_shape.py": ("test_rollout.py", "test_window.py"),           # as_batch_time; bcast etc. in every engine test
    "diffkit/adapter_checks.py": ("test_check_adapter.py",),              # named for its entry point, check_adapter
    "diffkit/adapters.py": ("test_check_adapter.py", "test_cf_outputs.py",  # Adapter/MixtureAdapter, cf_output,
                            "test_images_decode.py", "test_model.py"),    # decode_samples/write_netcdf
    "diffkit/config_docs.py": ("test_config.py", "test_typed.py"),         # the config reference is tested with the schema
    "diffkit/constants.py": ("test_config.py",),                          # constants shared by the schema and samplers
    "diffkit/devices.py": ("test_cli.py", "test_distributed.py"),         # --device resolution of the commands
    "diffkit/grids.py": ("test_samplers.py", "test_noise_levels.py"),     # sampler time grids, split out of samplers.py
    "diffkit/multistep.py": ("test_samplers.py",),                        # the multistep samplers, split out of samplers.py
    "diffkit/sampling.py": ("test_window.py",),                           # sample() of window models, until test_sampling.py lands
    "diffkit/hookspecs.py": ("test_registry.py", "test_layering.py"),     # the hooks plugins implement
    "diffkit/layout.py": ("test_config.py", "test_checkpoint.py",         # the Layout contract: validation and
                          "test_denoiser.py", "test_rollout.py"),         # round trips, in its users' tests
    # -- plugins -----------------------------------------------------------------------------
    "plugins/diffkit_backbones/dit.py": ("test_backbones.py", "test_backbones_fastpaths.py"),  # the backbone contract
    "plugins/diffkit_images/grid.py": ("test_images_decode.py",),          # make_grid / to_pixels of decoded images
    "plugins/diffkit_images/scoring.py": ("test_images_adapter.py", "test_images_benchmark.py"),
    "plugins/diffkit_images/quickstart.py": ("test_quickstart.py",),      # every domain's quickstart, one file
    "plugins/diffkit_pde/quickstart.py": ("test_quickstart.py",),
    "plugins/diffkit_weather/quickstart.py": ("test_quickstart.py",),
    "plugins/diffkit_pde/periodic1d.py": ("test_pde_simulators.py", "test_etdrk4.py"),  # what the simulators share:
    "plugins/diffkit_pde/conventions.py": ("test_pde_simulators.py",),    # the 1-D engine, batching, seeding, dtypes
    "plugins/diffkit_pde/plots.py": ("test_figures.py", "test_pde_metrics.py"),
    "plugins/diffkit_images/observe.py": ("test_images_assimilate.py",),   # data images --observe-from, assimilate's images side
    "plugins/diffkit_pde/observe.py": ("test_assimilate.py",),            # data pde --observe-from, assimilate's PDE side
    "plugins/diffkit_weather/observe.py": ("test_assimilate.py", "test_weather_qg.py"),  # data weather qg --observe-from
    "plugins/diffkit_weather/plots.py": ("test_weather_evaluate.py", "test_weather_evaluate_checks.py"),
    "plugins/diffkit_weather/_common.py": ("test_weather_adapter.py",),   # WeatherDataError and value formatting
    "plugins/diffkit_weather/qg*.py": ("test_weather_qg.py",),            # the QG model and its oracle / coarse runs
}

#: Modules with no test file of their own, and why.
UNTESTED: dict[str, str] = {
    "diffkit/__init__.py": "re-exports only; `import diffkit` staying light is tested in test_registry.py",
    "diffkit/__main__.py": "two lines: `python -m diffkit` runs cli.main (test_cli.py tests main)",
    "diffkit/errors.py": "exception classes only; every test's pytest.raises checks them",
    "plugins/*/__init__.py": "a plugin package's hooks and re-exports: test_registry.py / test_layering.py "
                             "load every built-in plugin through its entry point",
    # a gap, not a design: sliced_wasserstein / mean_std_error are only used as measures
    # (test_guidance.py), never checked against a reference
}


def all_modules() -> list[str]:
    """Every module of diffkit/ and plugins/*/, packages' __init__.py included."""
    found = [p for top in ("diffkit", "plugins") for p in (ROOT / top).rglob("*.py")]
    return sorted(p.relative_to(ROOT).as_posix() for p in found if "__pycache__" not in p.parts)


def rule_test_name(module: str) -> str:
    """The rule's test file (without ``.py``): ``diffkit/<m>.py`` -> ``test_<m>``,
    ``plugins/diffkit_<domain>/<m>.py`` -> ``test_<domain>_<m>``; a leading underscore is dropped."""
    parts = module[:-len(".py")].split("/")
    name = parts[-1].lstrip("_")
    if parts[0] == "plugins":
        return f"test_{parts[1].removeprefix('diffkit_')}_{name}"
    return f"test_{name}"


def has_rule_test(module: str, test_files: set[str]) -> bool:
    """``tests/test_<name>.py``, or ``tests/test_<name>_<aspect>.py`` where one module's tests are
    split by aspect (test_train_log.py)."""
    base = rule_test_name(module)
    return any(f == f"{base}.py" or f.startswith(f"{base}_") for f in test_files)


def _listed(module: str, table: dict) -> str | None:
    return next((key for key in table if fnmatch.fnmatchcase(module, key)), None)


def test_rule_test_names():
    assert rule_test_name("diffkit/schedules.py") == "test_schedules"
    assert rule_test_name("diffkit/_typed.py") == "test_typed"
    assert rule_test_name("plugins/diffkit_weather/cf.py") == "test_weather_cf"
    assert rule_test_name("plugins/diffkit_weather/_common.py") == "test_weather_common"
    files = {"test_train_log.py", "test_cf_outputs.py", "test_weather_cf.py"}
    assert has_rule_test("diffkit/train.py", files) and has_rule_test("plugins/diffkit_weather/cf.py", files)
    assert not has_rule_test("diffkit/cf.py", {"test_cfx.py"}) and not has_rule_test("diffkit/process.py", files)


def test_every_module_has_a_test_file():
    """One test file per module (issue 16): the tests of ``diffkit/<m>.py`` live in
    ``tests/test_<m>.py`` and those of ``plugins/diffkit_<domain>/<m>.py`` in
    ``tests/test_<domain>_<m>.py``, or the module is listed in TESTED_IN (tests in files named
    otherwise, with the reason) or UNTESTED (none, with the reason)."""
    test_files = {p.name for p in TESTS.glob("test_*.py")}
    missing = [m for m in all_modules()
               if not has_rule_test(m, test_files) and not _listed(m, TESTED_IN) and not _listed(m, UNTESTED)]
    assert not missing, (f"modules without a test file: {missing}; put their tests in "
                         f"{[rule_test_name(m) + '.py' for m in missing]} (tests/), or list them with the reason "
                         "in TESTED_IN / UNTESTED of tests/test_architecture.py")


def test_test_file_exemptions_name_real_modules_and_files():
    """Every TESTED_IN / UNTESTED entry matches a module, and every file TESTED_IN names exists."""
    modules = all_modules()
    stale = [key for key in [*TESTED_IN, *UNTESTED] if not fnmatch.filter(modules, key)]
    assert not stale, f"TESTED_IN / UNTESTED name modules that do not exist: {stale}"
    gone = sorted({f for files in TESTED_IN.values() for f in files if not (TESTS / f).is_file()})
    assert not gone, f"TESTED_IN names test files that do not exist: {gone}"
    both = [m for m in modules if _listed(m, TESTED_IN) and _listed(m, UNTESTED)]
    assert not both, f"modules both in TESTED_IN and UNTESTED: {both}"
