"""The PDE plugin's commands (:mod:`diffkit_pde.cli`): ``diffkit data pde`` and ``diffkit rollout``
end to end (with ``diffkit train`` between them), their one-line errors and help.  Tiny sizes.
"""
from __future__ import annotations

import numpy as np
import pytest
import xarray as xr
from _pde_fixtures import P

from diffkit.checkpoint import capture_rng_state, restore_rng_state
from diffkit.cli import main
from diffkit.config import config_from_dict
from diffkit.errors import UnknownComponentError
from diffkit_pde.adapter import PDEDataError

from _tiny_unet import TINY_UNET_TOML

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


# ============================================================================= the commands
def test_unknown_pde_name(capsys):
    with pytest.raises(UnknownComponentError, match=r"'foo'.*ks, burgers, kolmogorov"):
        P.simulator("foo")
    assert P.simulator("ks") is P.simulate_ks
    with pytest.raises(SystemExit) as e:
        main(["data", "pde", "foo", "--out", "x.nc"])
    assert e.value.code == 2
    assert "invalid choice: 'foo'" in capsys.readouterr().err


@pytest.fixture(scope="module")
def cli_data(tmp_path_factory):
    root = tmp_path_factory.mktemp("cli")
    out = root / "f.nc"
    rc = main(["data", "pde", "burgers", "--trajectories", "3", "--steps", "12", "--set", "nx=32",
               "--set", "resolution_tol=None", "--out", str(out), "--no-progress", "--device", "cpu"])
    assert rc == 0
    return out


def test_data_pde_writes_cf_netcdf_with_the_parameters(cli_data):
    with xr.open_dataset(cli_data) as ds:
        ds.load()
    assert dict(ds.sizes) == {"trajectory": 3, "time": 12, "x": 32}
    assert ds["u"].dims == ("trajectory", "time", "x")
    assert ds.attrs["Conventions"].startswith("CF-")
    assert int(ds.attrs["nx"]) == 32 and int(ds.attrs["n_traj"]) == 3 and int(ds.attrs["n_steps"]) == 12
    assert float(ds.attrs["nu"]) == 0.01 and ds.attrs["kind"] == "burgers"
    assert bool(np.isfinite(ds["u"].values).all()) and float(ds["u"].std()) > 0
    np.testing.assert_allclose(ds["dt"].values, 0.05)


def test_data_pde_command_attribute_reproduces_the_file(cli_data):
    with xr.open_dataset(cli_data) as ds:
        assert "--steps 12" in ds.attrs["command"]


def test_data_pde_bad_option_is_one_line_naming_the_valid_ones(tmp_path, capsys):
    rc = main(["data", "pde", "burgers", "--set", "bogus=1", "--out", str(tmp_path / "x.nc"), "--no-progress"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert err.startswith("diffkit data pde: error:") and "'bogus'" in err
    assert "valid options: nx, " in err and "nu" in err
    assert not (tmp_path / "x.nc").exists()
    assert main(["data", "pde", "burgers", "--set", "help=1", "--out", str(tmp_path / "x.nc")]) == 0
    assert "nx = 128" in capsys.readouterr().out


def test_data_pde_set_seed_is_honoured_or_rejected_clearly(tmp_path, capsys):
    out = tmp_path / "s.nc"
    rc = main(["data", "pde", "burgers", "--trajectories", "1", "--steps", "2", "--set", "nx=16",
               "--set", "resolution_tol=None", "--set", "seed=3", "--out", str(out), "--no-progress"])
    err = capsys.readouterr().err
    if rc == 0:
        with xr.open_dataset(out) as ds:
            assert int(ds.attrs["seed"]) == 3
    else:
        assert rc == 1 and "--seed" in err


TOML = """\
run_dir = "{run}"
[data]
adapter = "pde"
batch_size = 8
val_fraction = 0.34
[data.options]
path = "{data}"
history = 1
""" + TINY_UNET_TOML + """
[trainer]
steps = 10
warmup = 1
val_every = 0
ckpt_every = 0
[sample]
nfe = 3
"""


def test_train_then_rollout_from_the_command_line(cli_data, tmp_path, capsys):
    run = tmp_path / "run"
    cfg = tmp_path / "cfg.toml"
    cfg.write_text(TOML.format(run=run.as_posix(), data=cli_data.as_posix()))
    assert main(["train", str(cfg), "--no-progress", "--device", "cpu"]) == 0
    assert "finished at step 10" in capsys.readouterr().out
    out, png = tmp_path / "r.nc", tmp_path / "r.png"
    args = ["rollout", str(run), "--init", str(cli_data), "--index", "2", "--members", "3", "--steps", "5",
            "--out", str(out), "--no-progress", "--device", "cpu"]
    assert main([*args, "--plot", str(png)]) == 0
    stdout = capsys.readouterr().out
    assert "wrote 3 member(s) x 5 frame(s)" in stdout and "high-correlation time" in stdout
    with xr.open_dataset(out) as ds:
        ds.load()
    assert f"u: verdict: {ds.attrs['calibration_u']}" in stdout.splitlines()       # issue 14 item 3
    assert ds["u"].dims == ("member", "time", "x") and ds["u"].shape == (3, 5, 32)
    assert {"u", "u_truth", "correlation", "ensemble_mean_correlation", "nrmse", "spread"} <= set(ds.data_vars)
    assert ds["correlation"].dims == ("member", "time")
    with xr.open_dataset(cli_data) as f:
        np.testing.assert_array_equal(ds["u_truth"].values, f["u"].values[2, 1:6].astype(np.float32))
        np.testing.assert_allclose(ds["time"].values, f["time"].values[1:6])
    assert ds.attrs["init_index"] == 2 and ds.attrs["seed"] == 0 and ds.attrs["objective"] == "diffusion"
    corr = ds["correlation"].values
    assert np.isfinite(corr).all() and (np.abs(corr) <= 1).all()
    for p in (png, tmp_path / "r-correlation.png"):
        assert p.read_bytes()[:8] == PNG_SIGNATURE and p.stat().st_size > 1000
    # the same seed writes the same ensemble; --index out of range is one line
    again = tmp_path / "again.nc"
    assert main([*args[:-5], "--out", str(again), "--no-progress", "--device", "cpu"]) == 0
    with xr.open_dataset(again) as ds2:
        np.testing.assert_array_equal(ds2["u"].values, ds["u"].values)
    capsys.readouterr()
    bad = ["rollout", str(run), "--init", str(cli_data), "--index", "3", "--out", str(tmp_path / "b.nc"),
           "--no-progress", "--device", "cpu"]
    assert main(bad) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("diffkit rollout: error: --index 3 is out of range")
    assert "3 trajectories" in err and not (tmp_path / "b.nc").exists()
    # --spread-scale: the same seed's members with their anomalies halved; the file's scores are theirs
    half = tmp_path / "half.nc"
    assert main([*args[:-5], "--spread-scale", "0.5", "--out", str(half), "--no-progress", "--device", "cpu"]) == 0
    with xr.open_dataset(half) as h:
        x = ds["u"].values.astype(np.float64)
        m = x.mean(0, keepdims=True)
        np.testing.assert_allclose(h["u"].values, m + 0.5 * (x - m), rtol=0, atol=1e-5)
        np.testing.assert_allclose(h["ensemble_spread_skill_ratio"].values,
                                   0.5 * ds["ensemble_spread_skill_ratio"].values, rtol=1e-4)
        assert h.attrs["spread_scale"] == 0.5 and "spread_scale" not in ds.attrs
    assert main([*args[:-5], "--spread-scale", "-1", "--out", str(tmp_path / "n.nc"), "--no-progress"]) == 1
    assert "--spread-scale must be a finite number > 0" in capsys.readouterr().err


def test_rollout_rejects_a_checkpoint_not_trained_on_pde_data(cli_data, tmp_path, capsys):
    from diffkit.train import Trainer

    state = capture_rng_state(cuda=False)
    try:
        cfg = config_from_dict({"run_dir": str(tmp_path / "mix"), "data": {"options": {"n": 64}, "batch_size": 16},
                                "model": {"options": {"hidden": 8, "depth": 1}},
                                "trainer": {"steps": 1, "val_every": 0, "ckpt_every": 0}})
        Trainer(cfg, device="cpu", progress=False).fit()
    finally:
        restore_rng_state(state)
    with pytest.raises(PDEDataError, match="not trained on PDE trajectories"):
        P.load_surrogate(tmp_path / "mix")
    rc = main(["rollout", str(tmp_path / "mix"), "--init", str(cli_data), "--out", str(tmp_path / "r.nc"),
               "--no-progress", "--device", "cpu"])
    err = capsys.readouterr().err.strip()
    assert rc == 1 and len(err.splitlines()) == 1
    assert 'not trained on PDE trajectories' in err and 'data.adapter = "pde"' in err


def test_plugins_lists_the_commands_and_rollout_has_help(capsys):
    assert main(["plugins", "--kind", "command"]) == 0
    rows = [ln.split() for ln in capsys.readouterr().out.splitlines()[1:]]
    names = {" ".join(r[1:3]) if r[1] == "data" else r[1] for r in rows}
    assert {"data pde", "rollout"} <= names
    with pytest.raises(SystemExit) as e:
        main(["rollout", "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert "--init" in out and "--members" in out and "--plot" in out
