"""``diffkit assimilate`` knows no domain (issue 15): each domain adds its options through
``Assimilation.add_arguments`` (a group per domain in ``--help``; a broken or clashing plugin is a
warning naming it), reads its observations through ``read_times`` / ``metadata`` / ``read`` (CF netCDF
by default; a plugin's own CSV of stations gives the same observations bit for bit), and the core
modules' source names no domain.  No model is trained here: fast (the end-to-end analysis with the
CSV reader is in test_assimilate.py)."""
from __future__ import annotations

import argparse
import re
import sys
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from diffkit import hookimpl, registry
from diffkit.adapters import Adapter
from diffkit.assimilate import (Assimilation, add_domain_arguments, assimilation_for, check_domain_options)
from diffkit.errors import DiffkitError, ObservationError
from diffkit.observations import (Axis, ObservationGrid, observation_window, point_observations, read_observations,
                                  synthetic_observations)
from diffkit.registry import PluginWarning

from _stations_plugin import StationsAdapter, StationsAssimilation, StationsPlugin, write_csv

ROOT = Path(__file__).resolve().parents[1]
pytestmark = pytest.mark.usefixtures("clean_registry")

X = Axis("x", tuple(0.5 * np.arange(8)), periodic=True, modulus=4.0)
Y = Axis("y", tuple(1.0 + np.arange(5)))
TIMES = 0.25 * np.arange(1, 4)


def _grid(window=()):
    return ObservationGrid(channels=(("u", {}), ("v", {})), axes=(Y, X),
                           time_key=lambda t: np.asarray(t, dtype=np.float64), window=tuple(window))


def _points(tmp_path, name="pts.nc"):
    truth = np.random.default_rng(0).standard_normal((3, 2, 5, 8))
    ds = synthetic_observations(truth, variables=[("u", {}), ("v", {})], axes=[Y, X], time=TIMES, fraction=0.3,
                                noise=0.1, form="points", seed=4)
    ds.to_netcdf(tmp_path / name)
    return tmp_path / name


def _assimilate_parser():
    p = argparse.ArgumentParser(prog="diffkit assimilate")
    p.add_argument("--steps", type=int, default=None)
    return p, add_domain_arguments(p)


# -- the core names no domain ---------------------------------------------------------------------------
DOMAIN_WORDS = re.compile(r"\b(weather|pde|pdes|latitudes?|longitudes?|lat-lon|images?)\b", re.IGNORECASE)


@pytest.mark.parametrize("module", ["assimilate", "observations"])
def test_core_assimilation_modules_name_no_domain(module):
    src = (ROOT / "diffkit" / f"{module}.py").read_text()
    hits = [(n, m.group(0)) for n, line in enumerate(src.splitlines(), 1) for m in DOMAIN_WORDS.finditer(line)]
    assert hits == [], f"diffkit/{module}.py names a domain (line, word): {hits}"
    assert "--init-time" not in src and "--index" not in src and '"--start"' not in src


# -- options through the domain -------------------------------------------------------------------------
def test_assimilate_help_lists_each_domains_group(capsys):
    from diffkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["assimilate", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    groups = {m.group(1): m.group(2) for m in re.finditer(r"\n(\S[^\n]*) domain options:\n((?:  [^\n]*\n?)*)", out)}
    assert set(groups) >= {"pde", "weather"}, out
    assert "--index" in groups["pde"] and "--start" in groups["pde"] and "--init-time" not in groups["pde"]
    assert "--init-time" in groups["weather"] and "--index" not in groups["weather"]
    core = out.split("\noptions:\n")[1].split("\n\n")[0]                             # the command's own options
    assert "--members" in core and "--init-time" not in core and "--index" not in core
    assert not DOMAIN_WORDS.search(core), core


def test_another_domains_option_is_a_one_line_error():
    from diffkit_pde.observe import PDEAssimilation
    from diffkit_weather.observe import WeatherAssimilation

    p, owners = _assimilate_parser()
    args = p.parse_args(["--init-time", "2000-01-02T00:00"])
    check_domain_options(args, WeatherAssimilation, owners)                      # its own option
    with pytest.raises(DiffkitError, match=r"^--init-time is an option of the weather domain, and this checkpoint "
                                           r"is a model of the pde domain: leave it out"):
        check_domain_options(args, PDEAssimilation, owners)
    args = p.parse_args(["--index", "3", "--start", "0"])
    check_domain_options(args, PDEAssimilation, owners)
    check_domain_options(args, StationsAssimilation, owners)                     # inherits the pde options
    with pytest.raises(DiffkitError, match="--index is an option of the pde domain"):
        check_domain_options(args, WeatherAssimilation, owners)
    check_domain_options(p.parse_args([]), WeatherAssimilation, owners)          # defaults are no option given


class _Minimal(Assimilation):
    """A domain that defines only grid, check and run (the other hooks are the defaults)."""

    name = "minimal"

    @classmethod
    def grid(cls, layout):
        return _grid()

    @classmethod
    def check(cls, layout):
        return None

    @classmethod
    def run(cls, loaded, args, guide):
        return None, "ran"


def _adapter_plugin(**adapters):
    class Plugin:
        @hookimpl
        def diffkit_adapters(self):
            return adapters
    return Plugin()


def _domain_adapter(domain):
    return type(f"{domain.__name__}Adapter", (Adapter,), {"assimilation": domain})


def test_a_domain_with_grid_check_run_only_gets_the_defaults(tmp_path):
    registry.register_plugin(_adapter_plugin(minimal=_domain_adapter(_Minimal)), "minimal_plugin")
    assert assimilation_for(_domain_adapter(_Minimal)) is _Minimal
    with warnings.catch_warnings():
        warnings.simplefilter("error")                                           # no warning
        p, owners = _assimilate_parser()
    assert all("minimal" not in g.title for g in p._action_groups) and _Minimal.needs_init
    path = _points(tmp_path)
    np.testing.assert_array_equal(_Minimal.read_times(path, _grid()), observation_window(path, _grid()))
    assert _Minimal.metadata(path)["featureType"] == "point"
    a, b = _Minimal.read(path, _grid(TIMES)), read_observations(path, _grid(TIMES))
    assert sorted(a.steps) == sorted(b.steps) and a.count == b.count
    check_domain_options(p.parse_args([]), _Minimal, owners)


@pytest.mark.parametrize("kind", ["clash", "broken", "positional", "import"])
def test_a_broken_or_clashing_domain_is_a_warning_naming_its_plugin(kind, capsys, tmp_path, monkeypatch):
    class Clash(Assimilation):
        name = "clashy"

        @classmethod
        def add_arguments(cls, group):
            group.add_argument("--mine", type=int)
            group.add_argument({"clash": "--start", "broken": "--fine", "positional": "where"}[kind])
            if kind == "broken":
                raise RuntimeError("no options today")

    if kind == "import":  # the adapter's package has an observe module that fails to import
        (tmp_path / "dk_badobs_pkg").mkdir()
        (tmp_path / "dk_badobs_pkg" / "__init__.py").write_text("")
        (tmp_path / "dk_badobs_pkg" / "observe.py").write_text("import dk_no_such_module\n")
        monkeypatch.syspath_prepend(str(tmp_path))
        monkeypatch.delitem(sys.modules, "dk_badobs_pkg", raising=False)
        adapter = type("BadObsAdapter", (Adapter,), {"__module__": "dk_badobs_pkg.adapter"})
    else:
        adapter = _domain_adapter(Clash)
    registry.register_plugin(_adapter_plugin(clashy=adapter), "clashy_plugin")
    from diffkit.cli import main

    with pytest.raises(SystemExit) as e:
        main(["assimilate", "--help"])
    assert e.value.code == 0
    captured = capsys.readouterr()
    warned = [line for line in captured.err.splitlines() if "clashy_plugin" in line]
    assert len(warned) == 1 and warned[0].startswith("warning: diffkit plugin 'clashy_plugin'"), captured.err
    assert {"clash": "its option --start clashes with the pde domain's --start", "broken": "no options today",
            "positional": "its argument 'where' is positional",
            "import": "dk_no_such_module"}[kind] in warned[0]
    assert "--mine" not in captured.out and "clashy domain options" not in captured.out  # nothing half-added
    assert "pde domain options" in captured.out and "weather domain options" in captured.out


# -- observations through the domain ---------------------------------------------------------------------
def test_a_csv_of_stations_reads_as_the_equivalent_netcdf_bit_for_bit(tmp_path):
    nc = _points(tmp_path)
    csv = write_csv(nc, tmp_path / "stations.csv", ["y", "x"])
    assert csv.read_text().splitlines()[0] == "variable,time,y,x,value,sigma_y"
    np.testing.assert_array_equal(StationsAssimilation.read_times(csv, _grid()), observation_window(nc, _grid()))
    assert StationsAssimilation.metadata(csv) == {} and StationsAssimilation.metadata(nc)["featureType"] == "point"
    a, b = StationsAssimilation.read(csv, _grid(TIMES)), read_observations(nc, _grid(TIMES))
    assert (a.form, a.variables, sorted(a.steps), a.count) == (b.form, b.variables, sorted(b.steps), b.count)
    assert a.variables == ["u", "v"] and a.count > 0
    for k in b.steps:
        sa, sb = a.steps[k], b.steps[k]
        for name in ("y", "sigma"):
            assert torch.equal(getattr(sa, name), getattr(sb, name)), (k, name)
        for name in ("index", "weight", "channel"):
            assert torch.equal(getattr(sa.operator, name), getattr(sb.operator, name)), (k, name)
    # the netCDF file itself still reads through the plugin's domain (its super().read)
    assert StationsAssimilation.read(nc, _grid(TIMES)).count == b.count
    assert assimilation_for(StationsAdapter) is StationsAssimilation


def test_point_observations_faults_are_one_line_errors():
    g = _grid(TIMES)
    ok = dict(variable=["u", "v"], time=[0.25, 0.5], position={"x": [0.1, 3.9], "y": [1.5, 2.0]}, value=[1.0, 2.0],
              sigma=0.1)
    assert point_observations("s.csv", g, **ok).count == 2
    for change, match in [
        (dict(variable=["u", "w"]), r"s.csv: variable 'w' is not a variable of the model \(its variables: u, v\)"),
        (dict(position={"x": [0.1, 3.9]}), r"s.csv: no y position; point observations need y, x"),
        (dict(value=[1.0]), r"s.csv: 1 value value\(s\) for 2 observation\(s\)"),
        (dict(time=[0.25, 2.0]), r"outside the assimilation window, the first at 2 \(after"),
        (dict(sigma=[0.1, 0.0]), r"sigma_y of 'v' holds 1 value\(s\) <= 0"),
        (dict(value=[np.nan, 2.0]), r"variable 'u' holds NaN or inf at 1 of 1"),
        (dict(position={"x": [0.1, 3.9], "y": [1.5, 9.0]}), r"outside the model's grid, the first at y = 9"),
    ]:
        with pytest.raises(ObservationError, match=match) as e:
            point_observations("s.csv", g, **{**ok, **change})
        assert "\n" not in str(e.value)
