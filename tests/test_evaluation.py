"""``diffkit evaluate`` as the core's command (diffkit/evaluation.py): its generic ensemble scoring against
direct calls of diffkit.ensemble, at the scale of the data (std 0.01), the choice of evaluator (the
plugins' first, diffkit's generic one last, ``--evaluator``, two claims an error), the PDE evaluator's
trajectory, and one-line errors for every file it cannot score."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch
import xarray as xr

from diffkit import ensemble as E
from diffkit.cli import main
from diffkit.evaluation import EnsembleEvaluator, EvaluationError, Evaluator, score_ensemble

pytestmark = pytest.mark.usefixtures("clean_registry")


def _ensemble(M=8, T=5, shape=(6, 4), scale=0.01, spread=1.0, seed=0, mean=3.0):
    """A reliable ensemble at the data's scale: truth and members exchangeable draws about a common,
    case-dependent centre (``spread`` scales the members' deviations)."""
    g = np.random.default_rng(seed)
    centre = mean + g.normal(size=(T, *shape))
    truth = centre + scale * g.normal(size=(T, *shape))
    members = centre[None] + spread * scale * g.normal(size=(M, T, *shape))
    dims = ("time",) + tuple(f"d{i}" for i in range(len(shape)))
    coords = {"time": ("time", 10.0 + 0.5 * np.arange(T), {"units": "1", "long_name": "time"})}
    coords.update({d: (d, np.arange(n) * 0.25) for d, n in zip(dims[1:], shape)})
    fc = xr.Dataset({"u": (("member", *dims), members)},
                    coords={**coords, "member": ("member", np.arange(M), {"standard_name": "realization"})})
    tr = xr.Dataset({"u": (dims, truth)}, coords=coords)
    return fc, tr


@pytest.mark.parametrize("shape", [(), (7,), (6, 4), (3, 4, 5)])
def test_scores_equal_direct_ensemble_metric_calls(shape):
    """Per case (time) over the other dims and over every case, each registered metric and the rank
    histogram equal diffkit.ensemble's own calls (ranks 1 to 4 of the truth)."""
    fc, tr = _ensemble(shape=shape, T=4)
    s = score_ensemble(fc, tr, seed=3)
    f = torch.from_numpy(fc["u"].values)
    t = torch.from_numpy(tr["u"].values)
    sp = tuple(range(1, t.ndim))
    for name, fn in E.registered().items():
        np.testing.assert_allclose(s[name].values[0], fn(f, t, dims=sp).numpy(), rtol=1e-12, err_msg=name)
        assert float(s[f"{name}_overall"].values[0]) == pytest.approx(float(fn(f, t, dims=sp, sample_dims=(0,))),
                                                                      rel=1e-12)
    rh = E.rank_histogram(f, t, dims=sp, generator=torch.Generator().manual_seed(3))
    np.testing.assert_array_equal(s["rank_histogram"].values[0], rh.numpy())
    assert s.attrs["case_dim"] == "time" and s.attrs["members"] == 8 and s.attrs["Conventions"] == "CF-1.8"
    assert all(s[v].attrs.get("long_name") for v in s.variables)


@pytest.mark.parametrize("spread, verdict", [(1.0, "well-dispersed"), (2.0, "over-dispersive"),
                                             (0.5, "under-dispersive")])
def test_spread_at_std_001_comes_back_and_the_verdict_names_the_scale(spread, verdict):
    """A std-0.01 ensemble: spread/skill is 1 when reliable, 2 or 0.5 when the members' deviations are
    scaled so; the verdict says so and its spread scale is the inverse."""
    fc, tr = _ensemble(M=16, T=40, shape=(32,), spread=spread, seed=1)
    s = score_ensemble(fc, tr)
    ss = float(s["ensemble_spread_skill_ratio_overall"].values[0])
    # E[(xbar - y)^2] = (1 + s^2 / M) 0.01^2, E[spread^2] = s^2 0.01^2: ratio s sqrt((M+1)/(M + s^2))
    want = spread * math.sqrt(17 / (16 + spread ** 2))
    assert ss == pytest.approx(want, rel=0.08)
    assert float(s["ensemble_spread_overall"].values[0]) == pytest.approx(0.01 * spread, rel=0.05)
    assert s.attrs["dispersion_u"] == verdict
    assert s.attrs["spread_scale_u"] == pytest.approx(1 / float(np.nanmean(s["ensemble_spread_skill_ratio"].values[0])))


def test_truth_is_matched_by_coordinate_value():
    """A truth with more times, in another order and with float noise of 1e-12 gives the scores of the
    aligned truth; a time it lacks is an error naming it."""
    fc, tr = _ensemble(T=5, shape=(6,))
    want = score_ensemble(fc, tr)
    extra = xr.concat([tr, tr.isel(time=[0]).assign_coords(time=[99.0])], "time").isel(time=[5, 3, 0, 4, 1, 2])
    extra = extra.assign_coords(time=extra["time"].values + 1e-12)
    got = score_ensemble(fc, extra)
    for name in E.registered():
        np.testing.assert_allclose(got[name].values, want[name].values, rtol=1e-12)
    with pytest.raises(EvaluationError, match=r"the truth has no time = 12 .*covers 10\.\.11\.5"):
        score_ensemble(fc, tr.isel(time=[0, 1, 2, 3]))


def test_nan_in_the_truth_is_left_out_and_inf_is_an_error():
    fc, tr = _ensemble(T=3, shape=(6,))
    holed = tr.copy(deep=True)
    holed["u"].values[1, 2] = np.nan
    s = score_ensemble(fc, holed)
    f, t = torch.from_numpy(fc["u"].values), torch.from_numpy(holed["u"].values)
    np.testing.assert_allclose(s["ensemble_mean_rmse"].values[0],
                               E.ensemble_mean_rmse(f, t, mask=torch.isfinite(t), dims=(1,)).numpy(), rtol=1e-12)
    assert np.isfinite(s["ensemble_mean_rmse"].values).all()
    holed["u"].values[0, 0] = np.inf
    with pytest.raises(EvaluationError, match="the truth holds 1 infinite value"):
        score_ensemble(fc, holed)


def test_files_it_cannot_score_are_one_line_errors():
    fc, tr = _ensemble(T=3, shape=(6,))
    with pytest.raises(EvaluationError, match="no member dim"):
        score_ensemble(fc.isel(member=0, drop=True), tr)
    with pytest.raises(EvaluationError, match="share no variable"):
        score_ensemble(fc, tr.rename(u="v"))
    with pytest.raises(EvaluationError, match=r"has the dim 'trajectory' .*--select trajectory=VALUE"):
        score_ensemble(fc, xr.concat([tr, tr], "trajectory"))
    with pytest.raises(EvaluationError, match="lacks the forecast's dim 'd0'"):
        score_ensemble(fc, tr.isel(d0=0, drop=True))
    with pytest.raises(EvaluationError, match="--case-dim 'nope' is not a dim"):
        score_ensemble(fc, tr, case_dim="nope")


def _write(tmp_path, fc, tr, attrs=None):
    fc = fc.assign_attrs(attrs or {})
    fc.to_netcdf(tmp_path / "fc.nc")
    tr.to_netcdf(tmp_path / "truth.nc")
    return tmp_path / "fc.nc", tmp_path / "truth.nc"


def test_cli_generic_file_writes_cf_scores_csv_and_figures(tmp_path, capsys):
    fc, tr = _ensemble(T=4, shape=(6, 4))
    f, t = _write(tmp_path, fc, xr.concat([tr, tr + 1], "trajectory"))
    assert main(["evaluate", str(f), "--truth", str(t), "--out", str(tmp_path / "s"), "--select", "trajectory=0"]) == 0
    out = capsys.readouterr().out
    assert out.startswith("diffkit evaluate (ensemble): 8 member(s), 4 time(s) (10..11.5); variable(s) u")
    assert "u: verdict: " in out
    with xr.open_dataset(tmp_path / "s" / "scores.nc") as s:
        want = score_ensemble(fc, tr)
        np.testing.assert_allclose(s["ensemble_crps"].values, want["ensemble_crps"].values, rtol=1e-12)
        assert s.attrs["Conventions"] == "CF-1.8" and "diffkit evaluate" in s.attrs["history"]
        assert list(s["variable"].values) == ["u"]
    rows = (tmp_path / "s" / "scores.csv").read_text().splitlines()
    assert rows[0].startswith("variable,time,") and len(rows) == 1 + 4 + 1 and rows[-1].startswith("u,all,")
    for png in ("scores.png", "rank_histograms.png"):
        assert (tmp_path / "s" / png).read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("argv, msg", [
    (["--evaluator", "nope"], "--evaluator 'nope' is not registered; the evaluators are pde, weather, ensemble"),
    (["--member", "0"], "--member is an option of the weather evaluator, and "),
    ([], "has the dim 'trajectory' (2 values) that the forecast lacks: choose one with --select trajectory=VALUE"),
    (["--select", "trajectory"], "--select 'trajectory' is not DIM=VALUE"),
    (["--select", "trajectory=5"], "--select trajectory=5: the truth's 'trajectory' has no value 5"),
])
def test_cli_errors_are_one_line(tmp_path, capsys, argv, msg):
    fc, tr = _ensemble(T=3, shape=(6,))
    f, t = _write(tmp_path, fc, xr.concat([tr, tr], "trajectory").assign_coords(trajectory=[0, 1]))
    assert main(["evaluate", str(f), "--truth", str(t), "--out", str(tmp_path / "s"), *argv]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_cli_refuses_a_file_without_members(tmp_path, capsys):
    fc, tr = _ensemble(T=3, shape=(6,))
    f, t = _write(tmp_path, tr, tr)
    assert main(["evaluate", str(f), "--truth", str(t), "--out", str(tmp_path / "s")]) != 0
    err = capsys.readouterr().err
    assert "no evaluator scores" in err and "needs a member dim" in err


def _register(name, evaluator):
    """Register ``evaluator`` by hand as the evaluator ``name`` of a plugin ``NAME_plugin`` (clean_registry
    undoes it)."""
    from diffkit import hookimpl, registry

    class Plugin:
        @hookimpl
        def diffkit_evaluators(self):
            return {name: evaluator}

    registry.register_plugin(Plugin(), f"{name}_plugin")


def test_two_plugin_evaluators_claiming_a_file_is_an_error(tmp_path, capsys):
    class Greedy(EnsembleEvaluator):
        """Claims every file with members (a test plugin)."""

        name = "greedy"

    _register("greedy", Greedy)
    fc, tr = _ensemble(T=3, shape=(6,))
    f, t = _write(tmp_path, fc, tr, {"source": "diffkit rollout", "init_index": 0})
    assert main(["evaluate", str(f), "--truth", str(t), "--out", str(tmp_path / "s")]) != 0
    err = capsys.readouterr().err
    assert "can be scored by the pde and the greedy evaluators: choose one with --evaluator NAME" in err
    assert main(["evaluate", str(f), "--truth", str(t), "--out", str(tmp_path / "s"), "--evaluator", "greedy",
                 "--no-plots"]) == 0
    assert capsys.readouterr().out.startswith("diffkit evaluate (greedy): ")


def test_a_broken_evaluator_is_a_warning_naming_its_plugin(tmp_path, capsys):
    class Broken(Evaluator):
        """Fails to look at any file (a test plugin)."""

        name = "broken"

        @classmethod
        def can_evaluate(cls, ds):
            raise RuntimeError("frobnicate")

    _register("broken", Broken)
    fc, tr = _ensemble(T=3, shape=(6,))
    f, t = _write(tmp_path, fc, tr)
    assert main(["evaluate", str(f), "--truth", str(t), "--out", str(tmp_path / "s"), "--no-plots"]) == 0
    out, err = capsys.readouterr()
    assert out.startswith("diffkit evaluate (ensemble): ")
    assert err.strip() == ("warning: diffkit plugin 'broken_plugin': its evaluator 'broken' failed to look at the file "
                           "and is skipped: RuntimeError: frobnicate")


def test_the_evaluator_of_evaluation_md_runs_as_written(tmp_path, capsys):
    """docs/evaluation.md's "Writing an evaluator" block, registered as a plugin: it claims a station file,
    renames the archive's time dim, and the scores are the generic ones against the renamed truth."""
    import re
    import types
    from pathlib import Path

    from diffkit import registry

    text = (Path(__file__).resolve().parents[1] / "docs" / "evaluation.md").read_text()
    section = text.split("## Writing an evaluator", 1)[1]
    code = re.findall(r"```python\n(.*?)```", section, flags=re.S)[0]
    mod = types.ModuleType("station_plugin")
    exec(compile(code, "docs/evaluation.md", "exec"), mod.__dict__)
    registry.register_plugin(mod, "station_plugin")
    fc, tr = _ensemble(T=4, shape=(5,))
    fc, tr = fc.rename(d0="station"), tr.rename(d0="station")
    archive = xr.concat([tr, tr.isel(time=[0]).assign_coords(time=[50.0])], "time").rename(time="obs_time")
    f, t = _write(tmp_path, fc, archive)
    assert main(["evaluate", str(f), "--truth", str(t), "--out", str(tmp_path / "s"), "--no-plots"]) == 0
    assert capsys.readouterr().out.startswith("diffkit evaluate (stations): 8 member(s), 4 time(s)")
    with xr.open_dataset(tmp_path / "s" / "scores.nc") as s:
        np.testing.assert_allclose(s["ensemble_crps"].values, score_ensemble(fc, tr)["ensemble_crps"].values,
                                   rtol=1e-12)
