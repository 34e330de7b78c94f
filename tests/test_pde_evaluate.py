"""The pde evaluator of ``diffkit evaluate`` (plugins/diffkit_pde/evaluate.py): a rollout or analysis is
scored against the trajectory it started from (``init_index``), on that trajectory's own times, and
gives the scores the rollout file computed itself."""
from __future__ import annotations

import numpy as np
import pytest
import torch
import xarray as xr

from diffkit import ensemble as E
from diffkit.cli import main

pytestmark = pytest.mark.usefixtures("clean_registry")


def test_pde_evaluator_scores_the_trajectory_the_rollout_started_from(tmp_path, capsys):
    """A PDE rollout file (diffkit_pde.rollout_dataset of trajectory 1 of a file of 3, times per
    trajectory in ``t``): ``diffkit evaluate`` picks the pde evaluator, matches trajectory 1 by
    init_index and its own times, and reproduces the scores the file computed itself."""
    import diffkit_pde as P
    from diffkit_pde.adapter import TrajectoryAdapter

    rng = np.random.default_rng(0)
    path = tmp_path / "traj.nc"
    t = np.arange(10) * 0.1 + np.array([[0.0], [5.0], [9.0]])            # each trajectory its own times
    xr.Dataset({"u": (("trajectory", "time", "x"), rng.normal(size=(3, 10, 16))),
                "t": (("trajectory", "time"), t)},
               coords={"x": np.arange(16) * 0.5, "time": np.arange(10) * 0.1}).to_netcdf(path)
    layout = TrajectoryAdapter(str(path)).layout
    ic = P.initial_condition(path, layout, index=1, start=2)
    K = ic.truth.shape[0]
    pred = ic.truth[None] + 0.3 * torch.randn(5, K, *ic.truth.shape[1:], generator=torch.Generator().manual_seed(1))
    ds = P.rollout_dataset(pred, layout, ic, attrs={"init_index": 1, "command": "diffkit rollout test"})
    ds.to_netcdf(tmp_path / "rollout.nc")
    assert main(["evaluate", str(tmp_path / "rollout.nc"), "--truth", str(path), "--out", str(tmp_path / "s"),
                 "--no-plots"]) == 0
    assert capsys.readouterr().out.startswith("diffkit evaluate (pde): 5 member(s), 7 time(s) (5.3..5.9)")
    with xr.open_dataset(tmp_path / "s" / "scores.nc") as s:
        for name in E.registered():
            np.testing.assert_allclose(s[name].values[0], ds[name].values, rtol=1e-6, err_msg=name)
        np.testing.assert_array_equal(s["rank_histogram"].values[0].sum(-1), np.full(K, 16))
        assert s.attrs["dispersion_u"] == ds.attrs["dispersion_u"]
        assert s.attrs["calibration_u"].split(";")[0] == ds.attrs["calibration_u"].split(";")[0].replace("leads",
                                                                                                         "times")
    # another trajectory by --select: the scores against it
    assert main(["evaluate", str(tmp_path / "rollout.nc"), "--truth", str(path), "--out", str(tmp_path / "s2"),
                 "--no-plots", "--select", "trajectory=0"]) != 0          # trajectory 0's times are not 5.3..5.9
    assert "the truth has no time = 5.3" in capsys.readouterr().err


def _rollout(tmp_path, attrs):
    import diffkit_pde as P
    from diffkit_pde.adapter import TrajectoryAdapter

    path = tmp_path / "traj.nc"
    xr.Dataset({"u": (("trajectory", "time", "x"), np.random.default_rng(0).normal(size=(3, 10, 16)))},
               coords={"x": np.arange(16) * 0.5, "time": np.arange(10) * 0.1}).to_netcdf(path)
    layout = TrajectoryAdapter(str(path)).layout
    ic = P.initial_condition(path, layout, index=2, start=0)
    pred = ic.truth[None] + 0.3 * torch.randn(4, *ic.truth.shape, generator=torch.Generator().manual_seed(1))
    P.rollout_dataset(pred, layout, ic, attrs=attrs).to_netcdf(tmp_path / "rollout.nc")
    return path, tmp_path / "rollout.nc"


@pytest.mark.parametrize("attrs, argv, msg", [
    ({}, [], "does not record the one it started from (init_index): choose one with --select trajectory=VALUE"),
    ({"init_index": 7}, [], "the forecast started from trajectory 7 (init_index) and the truth has 3 (0..2)"),
    ({"init_index": 2}, ["--select", "trajectory=9"], "--select trajectory=9: 'trajectory' has no coordinate, so 9 is an index, and it is out "
     "of range 0..2"),
])
def test_pde_evaluator_errors_are_one_line(tmp_path, capsys, attrs, argv, msg):
    truth, roll = _rollout(tmp_path, {"command": "diffkit rollout test", **attrs})
    assert main(["evaluate", str(roll), "--truth", str(truth), "--out", str(tmp_path / "s"), *argv]) != 0
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and msg in err[0], err


def test_select_overrides_init_index(tmp_path, capsys):
    """Scoring against another trajectory with the same times: the scores against that trajectory."""
    from diffkit.evaluation import score_ensemble

    truth, roll = _rollout(tmp_path, {"init_index": 2})
    assert main(["evaluate", str(roll), "--truth", str(truth), "--out", str(tmp_path / "s"), "--no-plots",
                 "--select", "trajectory=0"]) == 0
    with xr.open_dataset(tmp_path / "s" / "scores.nc") as s, xr.open_dataset(roll) as r, \
            xr.open_dataset(truth) as t:
        want = score_ensemble(r, t.isel(trajectory=0))
        np.testing.assert_allclose(s["ensemble_mean_rmse"].values, want["ensemble_mean_rmse"].values, rtol=1e-12)
