"""The shape of the code base (issue 16): docs/architecture.md's module map matches the tree, and no
module of ``diffkit/`` or ``plugins/`` grows past what a maintainer reads in one sitting.

The map's convention: in the ``diffkit/`` section every module is named by its file name
(``__init__.py`` and ``__main__.py`` included); in the ``plugins/`` section a plugin package is a row
of the package table (its ``__init__.py``), and each of its modules is named by its file name either
in that row or under a heading naming the package (or anywhere as ``diffkit_pde/adapter.py``).
"""
from __future__ import annotations

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
