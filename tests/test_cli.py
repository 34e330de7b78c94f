"""The ``diffkit`` command line: help, ``diffkit plugins``, warnings and error reporting.

The subprocess tests run the installed console script and ``python -m diffkit`` from a
scratch directory; fake plugins are real distributions (``*.dist-info`` plus a module) put on
``PYTHONPATH``, so the child process discovers them exactly as it would installed ones.
"""
from __future__ import annotations

import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

import diffkit
from diffkit import registry
from diffkit.cli import main

from _registry_helpers import ENV_VARS  # the plugin switches a subprocess must not inherit
BUILTINS = [("schedule", n) for n in ("alpha_bar", "cosine", "linear", "sigmoid")] + \
           [("sampler", n) for n in ("ddim", "ddpm", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "euler", "heun", "unipc")] + [("metric", "sliced_wasserstein")] + \
           [("adapter", "mixture"), ("evaluator", "ensemble")]


#: every test starts and ends with a freshly discovered registry (conftest.py's clean_registry)
pytestmark = pytest.mark.usefixtures("clean_registry")


def console_script() -> str:
    exe = shutil.which("diffkit", path=os.path.dirname(sys.executable)) or shutil.which("diffkit")
    if exe is None:
        pytest.fail("the diffkit console script is not installed: the package's [project.scripts] "
                    "entry is missing or `pip install -e .` was not run")
    return exe


def write_distribution(site: Path, dist: str, entry_points: dict[str, str], modules: dict[str, str]) -> None:
    info = site / f"{dist}-0.1.dist-info"
    info.mkdir(parents=True)
    (info / "METADATA").write_text(f"Metadata-Version: 2.1\nName: {dist}\nVersion: 0.1\n")
    (info / "entry_points.txt").write_text("[diffkit]\n" + "".join(f"{k} = {v}\n" for k, v in entry_points.items()))
    for mod, source in modules.items():
        (site / f"{mod}.py").write_text(textwrap.dedent(source))


SCHEDULE_PLUGIN = '''
    from diffkit import hookimpl, cosine

    def my_schedule(**options):
        """A schedule from a fake plugin."""
        return cosine(**options)

    @hookimpl
    def diffkit_schedules():
        return {"shared_name": my_schedule}
    '''


def run(args: list[str], tmp_path: Path, *, site: Path | None = None, module: bool = False, **env_extra):
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["OMP_NUM_THREADS"] = "1"
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    env.update(env_extra)
    cmd = [sys.executable, "-m", "diffkit", *args] if module else [console_script(), *args]
    return subprocess.run(cmd, capture_output=True, text=True, cwd=tmp_path, env=env, timeout=120)


def table(stdout: str) -> list[tuple[str, str, str, str]]:
    """Rows of ``diffkit plugins`` output, as (kind, name, plugin, description)."""
    lines = stdout.strip().splitlines()
    assert re.split(r"\s{2,}", lines[0].strip()) == ["KIND", "NAME", "PLUGIN", "DESCRIPTION"]
    rows = []
    for line in lines[1:]:
        parts = re.split(r"\s{2,}", line.strip(), maxsplit=3)
        rows.append(tuple(parts + [""] * (4 - len(parts))))
    return rows


# -- help -----------------------------------------------------------------------------------
@pytest.mark.parametrize("module", [False, True], ids=["console-script", "python-m"])
@pytest.mark.slow
def test_help(tmp_path, module):
    top = run(["--help"], tmp_path, module=module)
    assert top.returncode == 0, top.stderr
    assert "usage: diffkit" in top.stdout and "plugins" in top.stdout
    sub = run(["plugins", "--help"], tmp_path, module=module)
    assert sub.returncode == 0, sub.stderr
    assert "usage: diffkit plugins" in sub.stdout and "--kind" in sub.stdout and "--debug" in sub.stdout


def test_version_and_no_command(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0 and capsys.readouterr().out.strip() == f"diffkit {diffkit.__version__}"
    assert main([]) == 0
    assert "usage: diffkit" in capsys.readouterr().out


# -- diffkit plugins ------------------------------------------------------------------------
def test_plugins_lists_every_component(capsys):
    assert main(["plugins"]) == 0
    out, err = capsys.readouterr()
    rows = table(out)
    by_key = {(k, n): (p, d) for k, n, p, d in rows}
    for kind, name in BUILTINS:
        plugin, desc = by_key[(kind, name)]
        assert plugin == "diffkit"
        assert desc == registry.Component(kind, name, plugin, registry.get(kind, name)).description != ""
    assert len(rows) == len(registry.components())
    assert err == ""
    for name in ("unet", "dit", "mlp"):
        assert by_key[("backbone", name)][0] == "backbones" and by_key[("backbone", name)][1]


def test_plugins_kind_filter(capsys):
    assert main(["plugins", "--kind", "sampler"]) == 0
    rows = table(capsys.readouterr().out)
    assert {r[0] for r in rows} == {"sampler"}
    assert {r[1] for r in rows} == {"ddim", "ddpm", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "euler", "heun", "unipc"}
    assert main(["plugins", "--kind", "adapter"]) == 0
    assert {(r[0], r[1], r[2]) for r in table(capsys.readouterr().out)} == {("adapter", "mixture", "diffkit"),
                                                                            ("adapter", "pde", "pde"),
                                                                            ("adapter", "weather", "weather"),
                                                                            ("adapter", "images", "images")}
    assert main(["plugins", "--kind", "command"]) == 0
    assert {(r[0], r[1], r[2]) for r in table(capsys.readouterr().out)} == {("command", "data pde", "pde"),
                                                                            ("command", "rollout", "pde"),
                                                                            ("command", "data weather", "weather"),
                                                                            ("command", "forecast", "weather"),
                                                                            ("command", "data images", "images"),
                                                                            ("command", "quickstart", "diffkit")}
    assert main(["plugins", "--kind", "evaluator"]) == 0   # diffkit evaluate is the core's; the domains' evaluators
    assert {(r[0], r[1], r[2]) for r in table(capsys.readouterr().out)} == {("evaluator", "ensemble", "diffkit"),
                                                                            ("evaluator", "pde", "pde"),
                                                                            ("evaluator", "weather", "weather")}


def test_plugins_bad_kind_is_a_usage_error(capsys):
    with pytest.raises(SystemExit) as e:
        main(["plugins", "--kind", "bogus"])
    assert e.value.code == 2
    assert "invalid choice: 'bogus'" in capsys.readouterr().err


@pytest.mark.slow
def test_plugins_subprocess_includes_backbones(tmp_path):
    proc = run(["plugins"], tmp_path)
    assert proc.returncode == 0, proc.stderr
    rows = table(proc.stdout)
    assert {(k, n) for k, n, _, _ in rows} >= set(BUILTINS)
    assert {(k, n, p) for k, n, p, _ in rows} >= {("backbone", n, "backbones") for n in ("unet", "dit", "mlp")}


@pytest.mark.slow
def test_broken_plugin_is_a_warning_and_exit_0(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, "brokenplugin", {"broken": "brokenplugin"},
                       {"brokenplugin": "raise ImportError('No module named frobnicate')\n"})
    proc = run(["plugins"], tmp_path, site=site)
    assert proc.returncode == 0, proc.stderr
    warn = [l for l in proc.stderr.splitlines() if l.startswith("warning:")]
    assert len(warn) == 1 and "'broken'" in warn[0] and "frobnicate" in warn[0], proc.stderr
    assert "Traceback" not in proc.stderr
    assert {(k, n) for k, n, _, _ in table(proc.stdout)} >= set(BUILTINS)
    quiet = run(["plugins"], tmp_path, site=site, DIFFKIT_DISABLE_PLUGIN_AUTOLOAD="1")
    assert quiet.returncode == 0 and quiet.stderr == ""
    assert {r[0] for r in table(quiet.stdout)} == {"adapter", "schedule", "sampler", "guidance", "metric", "command",
                                                   "evaluator"}


@pytest.mark.slow
def test_plugin_from_dist_info_is_listed(tmp_path):
    site = tmp_path / "site"
    write_distribution(site, "oneplugin", {"one": "oneplugin"}, {"oneplugin": SCHEDULE_PLUGIN})
    proc = run(["plugins", "--kind", "schedule"], tmp_path, site=site)
    assert proc.returncode == 0, proc.stderr
    assert ("schedule", "shared_name", "one", "A schedule from a fake plugin.") in table(proc.stdout)


# -- errors -----------------------------------------------------------------------------------
@pytest.fixture
def clashing_site(tmp_path) -> Path:
    """Two installed plugins registering the same schedule name: ``diffkit plugins`` must fail."""
    site = tmp_path / "site"
    write_distribution(site, "oneplugin", {"one": "oneplugin"}, {"oneplugin": SCHEDULE_PLUGIN})
    write_distribution(site, "twoplugin", {"two": "twoplugin"}, {"twoplugin": SCHEDULE_PLUGIN})
    return site


def test_error_is_one_line_without_traceback(tmp_path, clashing_site):
    proc = run(["plugins"], tmp_path, site=clashing_site)
    assert proc.returncode == 1
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1, proc.stderr
    assert lines[0].startswith("diffkit plugins: error: schedule 'shared_name' is registered by two plugins")
    assert "'one'" in lines[0] and "'two'" in lines[0] and "--debug" in lines[0]
    assert "Traceback" not in proc.stderr and proc.stdout == ""


@pytest.mark.slow
def test_error_with_debug_shows_traceback(tmp_path, clashing_site):
    proc = run(["plugins", "--debug"], tmp_path, site=clashing_site, module=True)
    assert proc.returncode != 0
    assert "Traceback (most recent call last)" in proc.stderr
    assert "diffkit.errors.PluginError: schedule 'shared_name'" in proc.stderr


@pytest.mark.slow
def test_env_switch_resolves_the_clash(tmp_path, clashing_site):
    proc = run(["plugins", "--kind", "schedule"], tmp_path, site=clashing_site, DIFFKIT_PLUGINS="two")
    assert proc.returncode == 0, proc.stderr
    assert ("schedule", "shared_name", "two", "A schedule from a fake plugin.") in table(proc.stdout)


def test_in_process_error_path(monkeypatch, capsys):
    def boom(kind=None):
        raise diffkit.PluginError("two plugins\nclash")

    monkeypatch.setattr(registry, "components", boom)
    assert main(["plugins"]) == 1
    err = capsys.readouterr().err
    assert err == "diffkit plugins: error: two plugins clash (--debug shows the traceback)\n"
    with pytest.raises(diffkit.PluginError):
        main(["plugins", "--debug"])


# -- issue 13: messages of diffkit sample and of usage errors ---------------------------------
@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    """A 2-step unconditional run (the built-in mixture data, an MLP)."""
    d = tmp_path_factory.mktemp("tiny_run")
    registry.refresh()
    assert main(["train", "--no-progress", "--run-dir", str(d / "run"), "--set", "trainer.steps=2",
                 "--set", "data.batch_size=8", "--set", "data.options.n=64", "--set", "trainer.val_every=0",
                 "--set", "sample.nfe=2", "--set", "sample.n=2"]) == 0
    return d / "run"


def one_error_line(capsys, prefix="diffkit sample: error: ") -> str:
    err = capsys.readouterr().err
    lines = err.splitlines()
    assert len(lines) == 1 and lines[0].startswith(prefix) and "Traceback" not in err, err
    return lines[0]


def test_guidance_on_unconditional_model_says_so(tiny_run, tmp_path, capsys):
    out = tmp_path / "s.nc"
    assert main(["sample", str(tiny_run), "--guidance", "2", "--out", str(out), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert "--guidance 2 was given but this model is unconditional (num_classes = 0)" in line
    assert not out.exists()


def test_negative_guidance_is_rejected(tiny_run, tmp_path, capsys):
    assert main(["sample", str(tiny_run), "--guidance", "-1.5", "--out", str(tmp_path / "s.nc")]) == 1
    line = one_error_line(capsys)
    assert "--guidance must be >= 0" in line and "got -1.5: negative guidance is not supported" in line


def test_out_is_a_directory(tiny_run, tmp_path, capsys):
    d = tmp_path / "outdir"
    d.mkdir()
    assert main(["sample", str(tiny_run), "--out", str(d), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert f"--out {d} is a directory; give a file name, e.g. --out {d / 'samples.nc'}" in line
    assert ".tmp" not in line and list(d.iterdir()) == []


@pytest.mark.parametrize("name, what", [("s.png", "has an unknown extension '.png'"), ("s", "has no extension"),
                                        ("s.zarr", "has an unknown extension '.zarr'")])
def test_out_unknown_extension(tiny_run, tmp_path, capsys, name, what):
    out = tmp_path / name
    assert main(["sample", str(tiny_run), "--out", str(out), "--no-progress"]) == 1
    line = one_error_line(capsys)
    assert f"--out {out} {what}: the 'mixture' adapter writes .nc, .nc4, .netcdf, .cdf files" in line
    assert ".tmp" not in line and not out.exists()
    assert main(["sample", str(tiny_run), "--out", str(out.with_suffix(".nc")), "--no-progress", "--n", "2"]) == 0


def test_warnings_print_one_line(tiny_run, tmp_path, capsys):
    """A diffkit warning printed by the CLI is ``warning: <message>``, without the Python source line."""
    assert main(["sample", str(tiny_run), "--sampler", "heun", "--steps", "3", "--n", "2", "--no-progress",
                 "--out", str(tmp_path / "s.nc")]) == 0
    err = capsys.readouterr().err
    assert err.splitlines() == ["warning: heun with NFE 3 is unstable (samples can be many times too spread or "
                                "diverge); use NFE >= 12, or dpmpp_2m at low NFE"]
    assert "warnings.warn" not in err and ".py:" not in err
    # another library's warning: one line too, with its category and origin
    from diffkit.cli import format_warning

    line = format_warning("x is deprecated\n  use y", DeprecationWarning, "/site-packages/xarray/core.py", 12)
    assert line == "warning: x is deprecated use y (DeprecationWarning at core.py:12)\n"
    import warnings as w

    assert w.showwarning is not None and w.showwarning.__module__ != "diffkit.cli"  # restored after main()


def test_sample_missing_run_does_not_suggest_resume(tmp_path, capsys):
    empty = tmp_path / "empty"
    empty.mkdir()
    bad_run = tmp_path / "bad_run"
    (bad_run / "checkpoints").mkdir(parents=True)
    (bad_run / "checkpoints" / "ckpt-000000002.pt").write_bytes(b"PK\x03\x04 truncated")
    trunc = tmp_path / "trunc.pt"
    trunc.write_bytes(b"PK")
    for path, fragment in [(tmp_path / "missing", "does not exist; check the path: give a checkpoint file"),
                           (empty, "no checkpoint found in"),
                           (bad_run, "none of the 1 checkpoints in"),
                           (trunc, "is truncated")]:
        assert main(["sample", str(path), "--out", str(tmp_path / "s.nc")]) == 1
        line = one_error_line(capsys, "diffkit sample: error: ")
        assert fragment in line and "--resume" not in line, line


def test_unknown_option_shows_subcommand_usage(capsys):
    for argv, usage in [(["train", "--nope"], "usage: diffkit train "),
                        (["sample", "run", "--out", "x.nc", "--nope", "1"], "usage: diffkit sample "),
                        (["data", "pde", "ks", "--out", "x.nc", "--nope"], "usage: diffkit data pde "),
                        (["forecast", "--nope"], "usage: diffkit forecast ")]:
        with pytest.raises(SystemExit) as e:
            main(argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.startswith(usage), err
        command = usage[len("usage: "):].strip()
        assert f"{command}: error: " in err and "Traceback" not in err
    with pytest.raises(SystemExit):
        main(["train", "--nope"])
    assert "diffkit train: error: unrecognized arguments: --nope" in capsys.readouterr().err
    with pytest.raises(SystemExit):  # no command: the top level's usage
        main(["--nope"])
    assert capsys.readouterr().err.startswith("usage: diffkit [-h]")
