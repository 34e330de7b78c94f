"""Docs and examples stay true: every hook is documented, and the examples run as written."""
from __future__ import annotations

import importlib.util
import inspect
import re
from pathlib import Path


import diffkit as dk
from diffkit import hookspecs

ROOT = Path(__file__).resolve().parents[1]


def test_every_hookspec_is_documented_in_plugins_md():
    text = (ROOT / "docs" / "plugins.md").read_text()
    specs = [n for n, f in inspect.getmembers(hookspecs, inspect.isfunction) if n.startswith("diffkit_")]
    assert specs, "no hook specifications found"
    for name in specs:
        sig = f"`{name}()`"
        assert sig in text, f"docs/plugins.md does not document hook {name} as {sig}"
        assert inspect.signature(getattr(hookspecs, name)).parameters == {}, name
        assert getattr(hookspecs, name).__doc__, f"hookspec {name} has no docstring"


def test_docs_name_only_registered_samplers_and_schedules():
    text = (ROOT / "docs" / "engine.md").read_text()
    table = {m for m in re.findall(r"^\| `(\w+)` \|", text, flags=re.M)}
    samplers = {c.name for c in dk.registry.components("sampler")}
    assert samplers <= table, f"samplers missing from docs/engine.md: {samplers - table}"


def _load_example(name):
    spec = importlib.util.spec_from_file_location(name, ROOT / "examples" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_gmm2d_example_learns_the_mixture():
    """The trained example, at a small budget: a model that learnt nothing scores ~10x the floor
    (its samples are a blob at the origin); this budget reaches < 3x on 2 CPU cores in ~20 s."""
    mod = _load_example("gmm2d")
    sw, floor = mod.main(["--steps", "600", "--quick", "--nfe", "19"])
    assert sw < 3.0 * floor, (sw, floor)


def test_gmm2d_untrained_model_is_far_from_truth():
    """Counter-test: with no training the same measurement is far above the bound above."""
    mod = _load_example("gmm2d")
    sw, floor = mod.main(["--steps", "1", "--quick", "--nfe", "19"])
    assert sw > 3.0 * floor, (sw, floor)


def test_pde_ks_example_runs_end_to_end(tmp_path):
    """The KS example in its CI setting: every output is written, and both surrogates beat the
    persistence forecast ("nothing changes") on the first step by 20 % or more.  Measured: trained
    DDPM 0.68x and MSE 0.25x persistence; untrained (--steps 1) DDPM 1.72x and MSE 1.00x (an
    untrained residual model predicts ~no change), so the check separates them."""
    mod = _load_example("pde_ks")
    report = mod.main(["--quick", "--no-progress", "--out", str(tmp_path)])
    for name in ("rollout_diffusion.nc", "rollout_regression.nc", "rollout_diffusion.png",
                 "rollout_diffusion-correlation.png", "correlation.png", "spectra_last_step.png", "report.json"):
        assert (tmp_path / name).stat().st_size > 0, name
    for objective in ("diffusion", "regression"):
        r = report[objective]
        assert r["nrmse_first_step"] < 0.8 * r["nrmse_first_step_persistence"], r
        assert r["high_correlation_time"][0] > 2.0, r
    import xarray as xr

    with xr.open_dataset(tmp_path / "rollout_diffusion.nc") as ds:
        assert ds["u"].dims == ("member", "time", "x") and ds.sizes["member"] == 4
        assert "u_truth" in ds and "correlation" in ds and ds.attrs["Conventions"] == "CF-1.8"
