"""The training runtime end to end: exact resume after SIGINT and SIGKILL in the middle of an
epoch, a NaN loss, a full disk while checkpointing, the ``train -> sample`` command-line flow and
the time budget.

Subprocess runs use the installed console script with one thread and no progress bar.  The
model (a 2-block MLP of width 32) and the data (2000 mixture samples, batch 64: 29 steps per
epoch) are tiny, so one training step takes a few milliseconds and a 400-step run crosses a
dozen epochs.  Checkpoints every 14 steps never fall on an epoch boundary (lcm(14, 29) = 406 >
400 steps), so a run killed at any moment resumes from the middle of an epoch.
"""
from __future__ import annotations

import errno
import hashlib
import json
import math
import os
import re
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffkit import hookimpl, registry
from diffkit.adapters import MixtureAdapter
from diffkit.checkpoint import CheckpointManager, load_checkpoint
from diffkit.cli import main
from diffkit.config import Config, apply_overrides, config_from_dict, load_config
from diffkit.errors import CheckpointError
from diffkit.model import load_for_sampling
from diffkit.train import Trainer, TrainingDiverged

from _registry_helpers import ENV_VARS  # the plugin switches a subprocess must not inherit
N_DATA, BATCH = 2000, 64
TINY = [
    "model.options={hidden=32,depth=2}",
    f"data.options={{n={N_DATA}}}",
    f"data.batch_size={BATCH}",
    "trainer.val_every=0",
]
#: the exact-resume runs: 400 steps, deterministic, a checkpoint every 14 steps
RESUME_STEPS, RESUME_EVERY = 400, 14
RESUME_SETS = TINY + [f"trainer.steps={RESUME_STEPS}", f"trainer.ckpt_every={RESUME_EVERY}",
                      "trainer.deterministic=true", "trainer.log_every=10"]


def steps_per_epoch() -> int:
    return len(MixtureAdapter(n=N_DATA).dataset("train")) // BATCH


SPE = steps_per_epoch()


# -- helpers --------------------------------------------------------------------------------
def console_script() -> str:
    exe = shutil.which("diffkit", path=os.path.dirname(sys.executable)) or shutil.which("diffkit")
    if exe is None:
        pytest.fail("the diffkit console script is not installed: the package's [project.scripts] "
                    "entry is missing or `pip install -e .` was not run")
    return exe


def child_env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def set_args(sets) -> list[str]:
    return [a for s in sets for a in ("--set", s)]


def train_cmd(run_dir: Path, sets, *extra: str) -> list[str]:
    return [console_script(), "train", "--device", "cpu", "--no-progress", "--run-dir", str(run_dir),
            *set_args(sets), *extra]


def run(cmd, cwd, timeout=120) -> subprocess.CompletedProcess:
    return subprocess.run(cmd, capture_output=True, text=True, cwd=cwd, env=child_env(), timeout=timeout)


def ok(res: subprocess.CompletedProcess) -> subprocess.CompletedProcess:
    assert res.returncode == 0, f"exit {res.returncode}\nstdout:\n{res.stdout}\nstderr:\n{res.stderr}"
    return res


def one_line_error(err: str, *must_contain: str) -> str:
    """stderr of a failed command: a single line, no traceback, naming what it must name."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    assert "Traceback" not in err
    for s in must_contain:
        assert s in lines[0], f"{s!r} not in the error: {lines[0]}"
    return lines[0]


def ckpt_steps(run_dir: Path) -> list[int]:
    return [s for s, _ in CheckpointManager(run_dir / "checkpoints").list()]


def ckpt_file(run_dir: Path, step: int) -> Path:
    return run_dir / "checkpoints" / f"ckpt-{step:09d}.pt"


def assert_same_state(a, b, where: str) -> None:
    """Nested state dicts equal, tensors bitwise (torch.equal, same dtype)."""
    if isinstance(a, torch.Tensor):
        if not isinstance(b, torch.Tensor) or a.dtype != b.dtype or a.shape != b.shape:
            pytest.fail(f"{where}: {type(b).__name__} {getattr(b, 'dtype', '')} {tuple(getattr(b, 'shape', ()))} "
                        f"where {a.dtype} {tuple(a.shape)} was expected")
        if not torch.equal(a, b):
            diff = (a.double() - b.double()).abs().max().item() if a.is_floating_point() else "n/a"
            pytest.fail(f"{where} differs (max abs difference {diff})")
    elif isinstance(a, dict):
        assert isinstance(b, dict) and set(a) == set(b), f"{where}: keys differ ({sorted(map(str, a))} vs {sorted(map(str, b))})"
        for k in a:
            assert_same_state(a[k], b[k], f"{where}.{k}")
    elif isinstance(a, (list, tuple)):
        assert isinstance(b, (list, tuple)) and len(a) == len(b), f"{where}: lengths differ"
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same_state(x, y, f"{where}[{i}]")
    else:
        assert a == b, f"{where}: {a!r} != {b!r}"


def wait_for_checkpoint(proc: subprocess.Popen, run_dir: Path, min_step: int, timeout: float = 90.0) -> int:
    """Poll until a checkpoint at step >= min_step exists; return the newest step."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        steps = ckpt_steps(run_dir)
        if steps and steps[-1] >= min_step:
            return steps[-1]
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"training exited ({proc.returncode}) before a checkpoint at step >= {min_step}:\n{out}\n{err}")
        time.sleep(0.002)
    proc.kill()
    proc.communicate()
    pytest.fail(f"no checkpoint at step >= {min_step} after {timeout} s")


@pytest.fixture(autouse=True)
def _isolate(isolated_trainer_state):
    """In-process trainers seed the global RNGs and may register plugins: undo both (conftest)."""


def inproc_config(tmp_path: Path, *sets: str) -> Config:
    return apply_overrides(Config(), [*TINY, f'run_dir="{tmp_path / "run"}"', *sets])


# -- 1. exact resume ------------------------------------------------------------------------
def test_mixture_split_gives_the_epoch_length_the_resume_tests_assume():
    assert SPE == 29
    assert math.lcm(RESUME_EVERY, SPE) > RESUME_STEPS  # no periodic checkpoint on an epoch boundary


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory) -> dict:
    """Final checkpoint of an uninterrupted run."""
    run_dir = tmp_path_factory.mktemp("reference") / "run"
    res = ok(run(train_cmd(run_dir, RESUME_SETS), cwd=run_dir.parent))
    assert f"finished at step {RESUME_STEPS}" in res.stdout
    return load_checkpoint(ckpt_file(run_dir, RESUME_STEPS))


def assert_resumed_equal(reference: dict, run_dir: Path) -> None:
    final = load_checkpoint(ckpt_file(run_dir, RESUME_STEPS))
    assert final["step"] == RESUME_STEPS
    for key in ("model", "ema", "optimizer"):
        assert_same_state(reference[key], final[key], key)
    # the rest of the training state too: the resumed run is the same run
    for key in ("scheduler", "epoch", "batch_in_epoch", "noise_generator"):
        assert_same_state(reference[key], final[key], key)
    assert_same_state(reference["rng"]["torch"], final["rng"]["torch"], "rng.torch")


def check_position(ck: dict) -> None:
    """(epoch, batch_in_epoch) of a checkpoint agree with its step and the epoch length."""
    step, epoch, bie = ck["step"], ck["epoch"], ck["batch_in_epoch"]
    assert 0 < bie <= SPE
    assert epoch * SPE + bie == step, (step, epoch, bie)


@pytest.mark.slow
def test_resume_after_sigint_is_bitwise_exact(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run_dir, RESUME_SETS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=child_env())
    try:
        wait_for_checkpoint(proc, run_dir, RESUME_EVERY)  # training is under way, the handler installed
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == 0, f"exit {proc.returncode}\n{out}\n{err}"
    m = re.search(r"interrupted at step (\d+); checkpoint saved\. Resume with --resume", out)
    assert m, f"no 'interrupted ... resume with --resume' line in:\n{out}\n{err}"
    stopped = int(m.group(1))
    assert RESUME_EVERY <= stopped < RESUME_STEPS, "the run was not interrupted"
    assert "Traceback" not in err
    # the step that was running when Ctrl-C came was finished and checkpointed
    assert ckpt_steps(run_dir)[-1] == stopped
    ck = load_checkpoint(ckpt_file(run_dir, stopped))
    assert ck["step"] == stopped
    check_position(ck)
    assert ck["batch_in_epoch"] > 0

    assert f"stopped early at step {stopped}" in out

    res = ok(run(train_cmd(run_dir, RESUME_SETS, "--resume", str(run_dir)), cwd=tmp_path))
    assert re.search(rf"resumed from .*ckpt-{stopped:09d}\.pt at step {stopped}\b", res.stdout), res.stdout
    assert f"finished at step {RESUME_STEPS}" in res.stdout
    assert_resumed_equal(reference_run, run_dir)


@pytest.mark.slow
def test_resume_after_sigkill_mid_epoch_is_bitwise_exact(reference_run, tmp_path):
    run_dir = tmp_path / "run"
    proc = subprocess.Popen(train_cmd(run_dir, RESUME_SETS), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, cwd=tmp_path, env=child_env())
    try:
        wait_for_checkpoint(proc, run_dir, 2 * RESUME_EVERY)
        proc.send_signal(signal.SIGKILL)  # no chance to save anything
        out, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    assert proc.returncode == -signal.SIGKILL, f"exit {proc.returncode}\n{out}\n{err}"
    last = ckpt_steps(run_dir)[-1]
    assert 2 * RESUME_EVERY <= last < RESUME_STEPS, "the run was not killed before its end"
    assert last % RESUME_EVERY == 0  # a periodic checkpoint: nothing was saved at the kill
    ck = load_checkpoint(ckpt_file(run_dir, last))
    check_position(ck)
    assert 0 < ck["batch_in_epoch"] < SPE, "the resume point must be in the middle of an epoch"

    # bare --resume: the latest valid checkpoint of the run directory (a temp file that the
    # kill may have left behind is ignored)
    res = ok(run(train_cmd(run_dir, RESUME_SETS, "--resume"), cwd=tmp_path))
    assert re.search(rf"resumed from .*ckpt-{last:09d}\.pt at step {last}\b", res.stdout), res.stdout
    assert_resumed_equal(reference_run, run_dir)


def test_resume_skips_a_corrupt_newest_checkpoint_with_a_warning(tmp_path):
    cfg = inproc_config(tmp_path, "trainer.steps=6", "trainer.ckpt_every=2")
    Trainer(cfg, device="cpu", progress=False).fit()
    run_dir = Path(cfg.run_dir)
    assert ckpt_steps(run_dir) == [2, 4, 6]
    newest = ckpt_file(run_dir, 6)
    newest.write_bytes(newest.read_bytes()[:1000])  # a torn write
    with pytest.warns(UserWarning, match=r"skipping checkpoint .*ckpt-000000006\.pt"):
        trainer = Trainer(cfg, device="cpu", progress=False, resume=True)
    assert trainer.step == 4
    assert trainer.fit()["step"] == 6
    assert load_checkpoint(newest)["step"] == 6  # rewritten by the resumed run


# -- 2. NaN loss ----------------------------------------------------------------------------
@pytest.mark.slow
def test_cli_diverging_run_stops_with_the_step_and_keeps_the_last_good_checkpoint(tmp_path):
    run_dir = tmp_path / "run"
    sets = TINY + ["trainer.steps=50", "trainer.ckpt_every=1", "trainer.lr=1e30", "trainer.grad_clip=none",
                   "trainer.warmup=0"]
    res = run(train_cmd(run_dir, sets), cwd=tmp_path)
    assert res.returncode != 0
    line = one_line_error(res.stderr, "diffkit train: error:", str(run_dir / "checkpoints"))
    m = re.search(r"the loss became (nan|inf|-inf) at step (\d+)", line)
    assert m, line
    bad = int(m.group(2))
    assert bad >= 2
    steps = ckpt_steps(run_dir)
    assert steps and steps[-1] == bad - 1  # nothing saved for the diverged step
    ck = load_checkpoint(ckpt_file(run_dir, bad - 1), require=("model", "ema", "optimizer"))
    assert ck["step"] == bad - 1
    assert all(torch.isfinite(v).all() for v in ck["model"].values())


class PoisonedMixture(MixtureAdapter):
    """The mixture data set, whose items become huge (1e30, finite) after ``good`` items were read."""

    name = "poisoned_mixture"

    def __init__(self, good: int = 0, **options):
        super().__init__(**options)
        self.good = good

    def dataset(self, split):
        inner, adapter = super().dataset(split), self

        class Poisoned(torch.utils.data.Dataset):
            served = 0

            def __len__(self):
                return len(inner)

            def __getitem__(self, i):
                item = inner[i]
                Poisoned.served += 1
                if split == "train" and Poisoned.served > adapter.good:
                    item = {"x": torch.full_like(item["x"], 1e30)}
                return item

        return Poisoned()


class PoisonPlugin:
    @hookimpl
    def diffkit_adapters(self):
        return {"poisoned_mixture": PoisonedMixture}


@pytest.fixture
def poison_plugin():
    registry.register_plugin(PoisonPlugin(), "test-poison")
    yield
    registry.unregister_plugin("test-poison")


def test_huge_data_values_stop_training_naming_the_step(poison_plugin, tmp_path):
    cfg = inproc_config(tmp_path, 'data.adapter="poisoned_mixture"',
                        f"data.options={{n={N_DATA}, good={3 * BATCH}}}",
                        "trainer.steps=20", "trainer.ckpt_every=1")
    trainer = Trainer(cfg, device="cpu", progress=False)
    with pytest.raises(TrainingDiverged, match=r"the loss became (nan|inf) at step 4;.*last good checkpoint"):
        trainer.fit()
    run_dir = Path(cfg.run_dir)
    assert ckpt_steps(run_dir) == [1, 2, 3]
    ck = load_checkpoint(ckpt_file(run_dir, 3))
    assert ck["step"] == 3 and ck["adapter"] == "poisoned_mixture"
    assert all(torch.isfinite(v).all() for v in ck["ema"].values())
    den, cfg2, adapter_cls = load_for_sampling(run_dir)  # the last good checkpoint is usable
    assert adapter_cls is PoisonedMixture and cfg2 == trainer.cfg  # (the config with [loss] resolved)


# -- 3. full disk ---------------------------------------------------------------------------
def test_disk_full_during_a_checkpoint_keeps_the_previous_one(tmp_path, monkeypatch):
    cfg = inproc_config(tmp_path, "trainer.steps=6", "trainer.ckpt_every=2")
    trainer = Trainer(cfg, device="cpu", progress=False)
    run_dir = Path(cfg.run_dir)
    first = ckpt_file(run_dir, 2)
    real_save = torch.save
    seen = {"calls": 0}

    def full_disk_save(obj, f, *args, **kwargs):
        seen["calls"] += 1
        if seen["calls"] == 2:
            seen["first_sha"] = hashlib.sha256(first.read_bytes()).hexdigest()
            f.write(b"PK\x03\x04 half a checkpoint")  # a partial write, then the disk is full
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        return real_save(obj, f, *args, **kwargs)

    monkeypatch.setattr("diffkit.checkpoint.torch.save", full_disk_save)
    with pytest.raises(CheckpointError) as ei:
        trainer.fit()
    msg = str(ei.value)
    assert "ckpt-000000004.pt" in msg and os.strerror(errno.ENOSPC) in msg and "disk full" in msg
    assert "previous checkpoints are untouched" in msg
    assert trainer.step == 4
    monkeypatch.undo()

    # only the first checkpoint is there: no partial file, no temp file, bytes unchanged
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == ["ckpt-000000002.pt"]
    assert hashlib.sha256(first.read_bytes()).hexdigest() == seen["first_sha"]
    ck = load_checkpoint(first, require=("model", "ema", "optimizer", "step"))
    assert ck["step"] == 2
    resumed = Trainer(cfg, device="cpu", progress=False, resume=True)
    assert resumed.step == 2


# -- 4. the command line: train -> sample ---------------------------------------------------
CLI_SETS = TINY + ["trainer.steps=20", "trainer.ckpt_every=10", "trainer.log_every=5", "trainer.lr=1e-3"]


@pytest.fixture(scope="module")
def trained_run(tmp_path_factory) -> Path:
    run_dir = tmp_path_factory.mktemp("cli") / "run"
    res = ok(run(train_cmd(run_dir, CLI_SETS), cwd=run_dir.parent))
    assert "finished at step 20" in res.stdout
    return run_dir


@pytest.mark.slow
def test_run_directory_holds_config_metrics_and_checkpoints(trained_run):
    # (the unset [loss] keys are stored resolved: a mixture model is not a surrogate)
    expected = apply_overrides(Config(), [*CLI_SETS, f'run_dir="{trained_run}"', "loss.weighting=min_snr",
                                          "loss.noise=uniform_t"])
    saved = load_config(trained_run / "config.toml")
    assert saved == expected
    ck = load_checkpoint(ckpt_file(trained_run, 20))
    assert config_from_dict(ck["config"]) == saved
    assert ckpt_steps(trained_run) == [10, 20]

    records = [json.loads(ln) for ln in (trained_run / "metrics.jsonl").read_text().splitlines()]
    losses = [r for r in records if "loss" in r]
    assert [r["step"] for r in losses] == [5, 10, 15, 20]
    for r in losses:
        assert math.isfinite(r["loss"]) and r["loss"] > 0
        assert {"lr", "samples_per_s", "elapsed_s"} <= set(r)


@pytest.mark.slow
def test_sample_writes_cf_netcdf_reproducibly(trained_run, tmp_path, capsys):
    import xarray as xr
    out = tmp_path / "s.nc"
    args = ["sample", str(trained_run), "--n", "64", "--steps", "5", "--seed", "3", "--no-progress"]
    res = ok(run([console_script(), *args, "--out", str(out)], cwd=tmp_path))
    assert "wrote 64 samples" in res.stdout
    with xr.open_dataset(out) as ds:
        ds.load()
    assert ds.sizes["sample"] == 64
    assert set(ds.data_vars) == {"x0", "x1"}
    assert ds.attrs["Conventions"].startswith("CF-")
    assert ds.attrs["source"] == "diffkit" and ds.attrs["seed"] == "3" and ds.attrs["nfe"] == "5"
    assert ds["x0"].attrs["long_name"] == "x0"
    assert ds["x0"].notnull().all() and float(ds["x0"].std()) > 0

    # same seed, same file (here in-process: the result does not depend on the process either)
    same = tmp_path / "same.nc"
    assert main([*args, "--device", "cpu", "--out", str(same)]) == 0
    with xr.open_dataset(same) as a, xr.open_dataset(out) as b:   # (bitwise; the history line names time and --out)
        assert a.load().identical(b.load().assign_attrs(history=a.attrs["history"], command=a.attrs["command"]))
    other = tmp_path / "other.nc"
    assert main([*args[:-3], "--seed", "4", "--no-progress", "--device", "cpu", "--out", str(other)]) == 0
    with xr.open_dataset(other) as ds4:
        assert ds4.attrs["seed"] == "4"
        assert not (ds4["x0"].values == ds["x0"].values).all()


@pytest.mark.slow
def test_a_checkpoint_alone_is_enough_to_sample(trained_run, tmp_path, capsys):
    import xarray as xr
    alone = tmp_path / "elsewhere"
    alone.mkdir()
    shutil.copy(ckpt_file(trained_run, 20), alone / "model.pt")
    res = ok(run([console_script(), "sample", "model.pt", "--n", "16", "--steps", "4", "--seed", "1",
                  "--no-progress", "--out", "s.nc"], cwd=alone))
    assert "wrote 16 samples" in res.stdout
    assert sorted(p.name for p in alone.iterdir()) == ["model.pt", "s.nc"]
    # the same samples as from the run directory, which has the config file next to it
    ref = tmp_path / "ref.nc"
    assert main(["sample", str(trained_run), "--n", "16", "--steps", "4", "--seed", "1", "--no-progress",
                 "--device", "cpu", "--out", str(ref)]) == 0
    with xr.open_dataset(alone / "s.nc") as a, xr.open_dataset(ref) as b:
        assert a.sizes["sample"] == 16
        assert (a["x0"].values == b["x0"].values).all() and (a["x1"].values == b["x1"].values).all()


def _corrupt(tmp_path, trained_run) -> Path:
    p = tmp_path / "corrupt.pt"
    data = bytearray(ckpt_file(trained_run, 20).read_bytes())
    p.write_bytes(bytes(data[: len(data) // 2]))
    return p


def _foreign(tmp_path, trained_run) -> Path:
    p = tmp_path / "foreign.pt"
    torch.save({"state_dict": {"w": torch.zeros(3)}}, p)
    return p


def _not_torch(tmp_path, trained_run) -> Path:
    p = tmp_path / "notes.pt"
    p.write_text("these are not weights\n")
    return p


def _missing(tmp_path, trained_run) -> Path:
    return tmp_path / "no" / "such.pt"


def _empty_dir(tmp_path, trained_run) -> Path:
    p = tmp_path / "empty_run"
    (p / "checkpoints").mkdir(parents=True)
    return p


@pytest.mark.parametrize("make, reason", [
    (_corrupt, "truncated or corrupt"),
    (_foreign, "not a diffkit checkpoint"),
    (_not_torch, "not a diffkit checkpoint"),
    (_missing, "does not exist"),
    (_empty_dir, "no checkpoint found"),
], ids=["corrupt", "foreign", "not-torch", "missing", "empty-run-dir"])
def test_sample_from_a_bad_checkpoint_is_a_one_line_error(make, reason, trained_run, tmp_path, capsys):
    bad = make(tmp_path, trained_run)
    out = tmp_path / "s.nc"
    rc = main(["sample", str(bad), "--n", "4", "--steps", "2", "--no-progress", "--device", "cpu", "--out", str(out)])
    assert rc != 0
    one_line_error(capsys.readouterr().err, "diffkit sample: error:", str(bad), reason)
    assert not out.exists()


def test_sample_missing_checkpoint_exits_nonzero_from_the_console_script(tmp_path):
    res = run([console_script(), "sample", "gone.pt", "--n", "4", "--out", "s.nc"], cwd=tmp_path)
    assert res.returncode == 1
    one_line_error(res.stderr, "gone.pt", "does not exist")
    assert not (tmp_path / "s.nc").exists()


def test_bad_config_key_names_the_key(tmp_path, capsys):
    rc = main(["train", "--device", "cpu", "--no-progress", "--run-dir", str(tmp_path / "run"),
               "--set", "trainer.lrr=1"])
    assert rc != 0
    one_line_error(capsys.readouterr().err, "'trainer.lrr'", "did you mean 'trainer.lr'")
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("argv, expect", [
    (["train", "--help"], ["--resume", "--set", "--run-dir", "--no-progress"]),
    (["sample", "--help"], ["--n", "--sampler", "--steps", "--seed", "--out"]),
])
def test_subcommand_help(argv, expect, capsys):
    with pytest.raises(SystemExit) as ei:
        main(argv)
    assert ei.value.code == 0
    out = capsys.readouterr().out
    for flag in expect:
        assert flag in out


def test_config_command_lists_every_key(capsys):
    assert main(["config"]) == 0
    out = capsys.readouterr().out
    for key in ("trainer.lr", "trainer.time_budget", "trainer.ckpt_every", "trainer.deterministic",
                "data.batch_size", "model.backbone", "sample.nfe"):
        assert key in out


# -- 5. time budget -------------------------------------------------------------------------
def test_time_budget_stops_early_with_a_checkpoint(tmp_path):
    cfg = inproc_config(tmp_path, "trainer.steps=1000000", "trainer.time_budget=2", "trainer.ckpt_every=0")
    trainer = Trainer(cfg, device="cpu", progress=False)
    t0 = time.monotonic()
    out = trainer.fit()
    elapsed = time.monotonic() - t0
    assert 2.0 <= elapsed < 30.0
    assert 0 < out["step"] < 1000000
    run_dir = Path(cfg.run_dir)
    assert ckpt_steps(run_dir) == [out["step"]]
    assert load_checkpoint(ckpt_file(run_dir, out["step"]))["step"] == out["step"]


# ------------------------------------------------------------------------------------------
# lazy data: the runtime reads only the items it trains on
# ------------------------------------------------------------------------------------------
class _CountingDataset(torch.utils.data.Dataset):
    """A 'larger than memory' data set: items are made on access and every access is counted."""

    def __init__(self, n: int):
        self.n, self.reads = n, 0

    def __len__(self):
        return self.n

    def __getitem__(self, i):
        self.reads += 1
        g = torch.Generator().manual_seed(int(i))
        return {"x": torch.randn(2, generator=g)}


class _LazyAdapter(MixtureAdapter):
    name = "lazy_counting"

    def __init__(self):
        super().__init__(n=100)
        self.sets = {"train": _CountingDataset(10**7), "val": _CountingDataset(10**5)}

    def dataset(self, split):
        return self.sets[split]


def test_runtime_reads_only_the_items_it_trains_on(tmp_path):
    """A 10-million-item data set: 3 steps of batch 8 plus 2 validation batches read 24 + 16
    items, never the whole set (no materialisation, no full pass)."""
    cfg = config_from_dict({"run_dir": str(tmp_path / "lazy"), "data": {"batch_size": 8},
                            "model": {"options": {"hidden": 16, "depth": 1}},
                            "trainer": {"steps": 3, "val_every": 3, "val_batches": 2, "ckpt_every": 0}})
    adapter = _LazyAdapter()
    tr = Trainer(cfg, device="cpu", progress=False, adapter=adapter)
    tr.fit()
    assert adapter.sets["train"].reads == 3 * 8
    assert adapter.sets["val"].reads == 2 * 8
