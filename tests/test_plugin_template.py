"""The plugin template (``examples/plugin-template``) works as its README says, from a real install.

How it is installed, and why: ``pip install --no-deps --no-build-isolation --target SITE`` of a
copy of the template, then every step runs in a subprocess with ``SITE`` first on
``PYTHONPATH``.  This is a real build through the template's own ``pyproject.toml`` (setuptools
writes the ``diffkit`` entry point into ``SITE/diffkit_timeseries-0.1.0.dist-info``), so a wrong
entry point, package list or build backend fails here exactly as it would for a researcher; and
the entry point is discovered by :mod:`importlib.metadata` from ``PYTHONPATH``, as for any
installed distribution.  Unlike a plain ``pip install`` it leaves the test environment untouched
(nothing to uninstall, no effect on later tests or parallel runs).  ``--no-deps``: diffkit and
torch are already there; ``--no-build-isolation`` with ``--no-index``: no network, the build uses
the setuptools of this environment (diffkit's ``test`` extra requires it).  The copy keeps the
build's ``build/`` and ``*.egg-info`` out of the repository.

Then, as in the README: ``diffkit plugins`` lists the adapter and the backbone under the plugin's
name, ``diffkit train`` runs the template's ``run.toml`` (reduced: a few dozen steps of a tiny
network), ``diffkit sample`` writes CSV and netCDF through the plugin's decoder, and the
template's own tests pass under pytest (with diffkit's ``diffkit_check`` fixture).  About 30 s.
"""
from __future__ import annotations

import csv
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
TEMPLATE = ROOT / "examples" / "plugin-template"
ENV_VARS = ("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "DIFFKIT_PLUGINS", "PYTEST_ADDOPTS")
#: the reduced setting of run.toml: a few dozen steps of a tiny network on a short series
QUICK = ["--set", "trainer.steps=40", "--set", "trainer.warmup=5", "--set", "trainer.val_every=20",
         "--set", "trainer.ckpt_every=0", "--set", "trainer.log_every=10", "--set", "data.batch_size=16",
         "--set", "model.options={hidden=16, depth=2}", "--set", "data.options={window=32, n_steps=1000}"]


@pytest.fixture(scope="module")
def site(tmp_path_factory) -> Path:
    """The template, built and installed into a folder of its own (see the module docstring)."""
    tmp = tmp_path_factory.mktemp("plugin-template")
    src = tmp / "src"
    shutil.copytree(TEMPLATE, src, ignore=shutil.ignore_patterns("build", "*.egg-info", "__pycache__", "runs"))
    target = tmp / "site"
    r = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "--no-build-isolation", "--no-index",
                        "--quiet", "--disable-pip-version-check",
                        "--target", str(target), str(src)],
                       capture_output=True, text=True, timeout=300, env=_env(None))
    assert r.returncode == 0, f"pip could not install the template:\n{r.stdout}\n{r.stderr}"
    eps = list(target.glob("diffkit_timeseries-*.dist-info/entry_points.txt"))
    assert eps and "timeseries = diffkit_timeseries" in eps[0].read_text(), "the build wrote no diffkit entry point"
    return target


def _env(site: Path | None) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONDONTWRITEBYTECODE="1")
    if site is not None:
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(site), env.get("PYTHONPATH")]))
    return env


def _run(args: list[str], site: Path, cwd: Path, timeout: float = 180) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, *args], capture_output=True, text=True, cwd=cwd, env=_env(site),
                       timeout=timeout)
    assert r.returncode == 0, f"{' '.join(args)} failed ({r.returncode}):\n{r.stdout}\n{r.stderr}"
    return r


def test_diffkit_plugins_lists_the_template(site, tmp_path):
    out = _run(["-m", "diffkit", "plugins"], site, tmp_path)
    rows = {tuple(line.split(None, 3)[:3]) for line in out.stdout.splitlines()[1:]}
    assert ("adapter", "timeseries", "timeseries") in rows, out.stdout
    assert ("backbone", "tsconv", "timeseries") in rows, out.stdout
    assert "timeseries" not in out.stderr, out.stderr                  # no warning about it


@pytest.mark.slow
def test_train_and_sample_through_the_template(site, tmp_path):
    run = tmp_path / "run"
    _run(["-m", "diffkit", "train", str(TEMPLATE / "run.toml"), "--device", "cpu", "--no-progress",
          "--run-dir", str(run), *QUICK], site, tmp_path)
    assert (run / "checkpoints" / "ckpt-000000040.pt").exists()
    logged = (run / "metrics.jsonl").read_text()
    assert '"val_loss"' in logged and '"step": 40' in logged

    channels = [f"x{k}" for k in range(1, 9)]
    _run(["-m", "diffkit", "sample", str(run), "--n", "3", "--steps", "4", "--seed", "0", "--no-progress",
          "--out", str(tmp_path / "s.csv")], site, tmp_path)
    with open(tmp_path / "s.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["sample", "time", *channels]
    assert len(rows) == 1 + 3 * 32                                   # one row per sample and step
    values = np.array([[float(v) for v in r[2:]] for r in rows[1:]])
    assert np.isfinite(values).all() and values.std() > 0.1          # physical units (Lorenz-96 std ~3.6)
    assert [float(r[1]) for r in rows[1:3]] == [0.0, 0.05]

    _run(["-m", "diffkit", "sample", str(run), "--n", "3", "--steps", "4", "--seed", "0", "--no-progress",
          "--out", str(tmp_path / "s.nc")], site, tmp_path)
    import xarray as xr

    with xr.open_dataset(tmp_path / "s.nc") as ds:
        assert sorted(ds.data_vars) == channels and ds["x1"].dims == ("sample", "time")
        nc = np.stack([ds[c].values for c in channels], axis=-1).reshape(-1, 8)
    np.testing.assert_allclose(nc, values, rtol=1e-6, atol=1e-6)     # same seed, same samples, either format


@pytest.mark.slow
def test_the_templates_own_tests_pass(site, tmp_path):
    """Its tests, on the installed package (run from an empty folder, so that the source folder is
    not what `import diffkit_timeseries` finds)."""
    tests = site.parent / "src" / "tests"
    r = subprocess.run([sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(tests)],
                       capture_output=True, text=True, cwd=tmp_path, env=_env(site), timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert " passed" in r.stdout and "skipped" not in r.stdout, r.stdout
