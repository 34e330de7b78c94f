"""Runtime failures a user can act on (issue 13, items 5 and 6): a full disk, resuming with another
model, run directories that cannot be one, duplicate log records after a kill, the time-budget stop.

Each failure is one line on stderr naming the problem and the fix, never a traceback, never a
temp-file name; whatever was already on disk is kept.
"""
from __future__ import annotations

import errno
import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from diffkit.checkpoint import CheckpointManager, load_checkpoint
from diffkit.cli import main
from diffkit.config import Config, apply_overrides
from diffkit.train import Trainer

from _registry_helpers import ENV_VARS  # the plugin switches a subprocess must not inherit
TINY = ["model.options={hidden=32,depth=2}", "data.options={n=2000}", "data.batch_size=64", "trainer.val_every=0"]
#: what torch.save raises when the disk fills up under it (torch 2.x, measured on a full 1 MiB tmpfs)
TORCH_SHORT_WRITE = "[enforce fail at inline_container.cc:672] . unexpected pos 832 vs 726"


@pytest.fixture(autouse=True)
def _isolate(isolated_trainer_state):
    """In-process trainers seed the global RNGs and may register plugins: undo both (conftest)."""


def train_argv(run_dir, *sets: str, extra=()) -> list[str]:
    out = ["train", "--device", "cpu", "--no-progress", "--run-dir", str(run_dir)]
    for s in (*TINY, *sets):
        out += ["--set", s]
    return out + list(extra)


def one_line_error(err: str, *must_contain: str) -> str:
    """stderr of a failed command: a single line, no traceback, no temp-file name, naming what it must."""
    lines = [ln for ln in err.splitlines() if ln.strip()]
    assert len(lines) == 1, f"expected a one-line error, got:\n{err}"
    line = lines[0]
    assert "Traceback" not in err and ".tmp" not in line, line
    for s in must_contain:
        assert s in line, f"{s!r} not in the error: {line}"
    return line


def sha(p: Path) -> str:
    return hashlib.sha256(p.read_bytes()).hexdigest()


# -- disk full ---------------------------------------------------------------------------------
def _full_disk(monkeypatch, error: BaseException, free: int = 0) -> dict:
    """The second torch.save writes part of a file, then fails with ``error``; disk_usage says ``free``."""
    real_save, calls = torch.save, {"n": 0}

    def save(obj, f, *a, **k):
        calls["n"] += 1
        if calls["n"] == 2:
            f.write(b"PK\x03\x04" + b"\0" * 4096)  # half a checkpoint, then no room
            raise error
        return real_save(obj, f, *a, **k)

    real_usage = shutil.disk_usage

    def usage(path):
        u = real_usage(path)
        return type(u)(u.total, u.total - free, free)

    monkeypatch.setattr("diffkit.checkpoint.torch.save", save)
    monkeypatch.setattr("diffkit.checkpoint.shutil.disk_usage", usage)
    return calls


def _train_into_a_full_disk(tmp_path, monkeypatch, capsys, error, free=0) -> tuple[str, Path, str]:
    run_dir = tmp_path / "run"
    first = run_dir / "checkpoints" / "ckpt-000000002.pt"
    _full_disk(monkeypatch, error, free)
    rc = main(train_argv(run_dir, "trainer.steps=6", "trainer.ckpt_every=2"))
    err = capsys.readouterr().err
    monkeypatch.undo()
    assert rc == 1, err
    # the previous checkpoint is intact, and there is no partial or temp file
    assert sorted(p.name for p in (run_dir / "checkpoints").iterdir()) == [first.name]
    assert load_checkpoint(first, require=("model", "ema", "optimizer", "step"))["step"] == 2
    return err, run_dir, sha(first)


def test_disk_full_is_named_as_such_when_torch_raises_runtime_error(tmp_path, monkeypatch, capsys):
    # what torch really raises: a RuntimeError from its zip writer, not OSError(ENOSPC)
    err, run_dir, _ = _train_into_a_full_disk(tmp_path, monkeypatch, capsys, RuntimeError(TORCH_SHORT_WRITE))
    one_line_error(err, "diffkit train: error: could not write checkpoint",
                   str(run_dir / "checkpoints" / "ckpt-000000004.pt"), "disk full",
                   f"0 bytes free on {run_dir / 'checkpoints'}", "free some disk space",
                   "previous checkpoints are untouched")


def test_disk_full_is_named_as_such_on_enospc(tmp_path, monkeypatch, capsys):
    error = OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    err, run_dir, _ = _train_into_a_full_disk(tmp_path, monkeypatch, capsys, error, free=512 * 1024)
    one_line_error(err, "ckpt-000000004.pt", "disk full", os.strerror(errno.ENOSPC),
                   f"512.0 KiB free on {run_dir / 'checkpoints'}", "previous checkpoints are untouched")


def test_disk_full_is_named_as_such_when_enospc_hides_behind_torchs_error(tmp_path, monkeypatch, capsys):
    # on a real full disk the file's ENOSPC is the RuntimeError's context: that is enough, whatever
    # the free space says afterwards
    def chained():
        try:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
        except OSError:
            try:
                raise RuntimeError(TORCH_SHORT_WRITE)
            except RuntimeError as e:
                return e

    err, _, _ = _train_into_a_full_disk(tmp_path, monkeypatch, capsys, chained(), free=10 << 30)
    one_line_error(err, "disk full", os.strerror(errno.ENOSPC), "10.0 GiB free on")


def test_disk_full_is_not_claimed_when_the_disk_has_room(tmp_path, monkeypatch, capsys):
    # the same torch error with plenty of free space is some other failure: torch's reason is shown
    err, _, _ = _train_into_a_full_disk(tmp_path, monkeypatch, capsys, RuntimeError(TORCH_SHORT_WRITE),
                                        free=50 << 30)
    line = one_line_error(err, "could not write checkpoint", "unexpected pos 832 vs 726",
                          "previous checkpoints are untouched")
    assert "disk full" not in line


def test_disk_full_is_named_as_such_for_the_metrics_log(tmp_path, monkeypatch, capsys):
    import builtins

    run_dir = tmp_path / "run"
    real_open = builtins.open

    def full_open(file, mode="r", *a, **k):
        if str(file).endswith("metrics.jsonl") and "a" in mode:
            raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(file))
        return real_open(file, mode, *a, **k)

    monkeypatch.setattr("diffkit.train.open", full_open, raising=False)
    rc = main(train_argv(run_dir, "trainer.steps=4", "trainer.log_every=2"))
    assert rc == 1
    one_line_error(capsys.readouterr().err, "diffkit train: error: could not append to",
                   str(run_dir / "metrics.jsonl"), "disk full", "free on")


# -- resume with a different model -------------------------------------------------------------
def test_resume_with_different_model_config_says_so(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_argv(run_dir, "trainer.steps=2")) == 0
    before = {p.name: sha(p) for p in (run_dir / "checkpoints").iterdir()}
    capsys.readouterr()

    rc = main(train_argv(run_dir, "trainer.steps=4", "model.options={hidden=64,depth=2}", extra=["--resume"]))
    assert rc == 1
    line = one_line_error(capsys.readouterr().err, "diffkit train: error: cannot resume from",
                          "ckpt-000000002.pt", "the checkpoint was trained with model.options.hidden=32, "
                          "this config has 64", "weight(s) differ in shape", "resume with the checkpoint's config",
                          "start a new run_dir")
    assert "size mismatch" not in line and "Missing key" not in line and "state_dict" not in line

    # a deeper network: weights missing from the checkpoint, and the key that made them
    rc = main(train_argv(run_dir, "trainer.steps=4", "model.options={hidden=32,depth=3}", extra=["--resume"]))
    assert rc == 1
    one_line_error(capsys.readouterr().err, "model.options.depth=2, this config has 3",
                   "weight(s) of this model are not in the checkpoint")

    # same [model], other data: the data option that changed the network's input is named
    rc = main(train_argv(run_dir, "trainer.steps=4", "data.options={n=2000,dim=3}", extra=["--resume"]))
    assert rc == 1
    one_line_error(capsys.readouterr().err, "data.options.dim unset, this config has data.options.dim=3",
                   "inp.weight is [32, 2] in the checkpoint and [32, 3] here")
    assert {p.name: sha(p) for p in (run_dir / "checkpoints").iterdir()} == before  # nothing was touched

    # and the right config still resumes
    assert main(train_argv(run_dir, "trainer.steps=4", extra=["--resume"])) == 0
    assert "resumed from" in capsys.readouterr().out


# -- path errors -------------------------------------------------------------------------------
def test_run_dir_is_a_file(tmp_path, capsys):
    f = tmp_path / "notes.txt"
    f.write_text("keep me")
    assert main(train_argv(f, "trainer.steps=2")) == 1
    one_line_error(capsys.readouterr().err, f"run_dir {f} is a file, not a directory", "--run-dir")
    assert f.read_text() == "keep me"
    # below a file
    assert main(train_argv(f / "run", "trainer.steps=2")) == 1
    one_line_error(capsys.readouterr().err, f"run_dir {f / 'run'} cannot be created: {f} is a file")


def test_run_dir_empty(tmp_path, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)  # were "" taken for ".", the run would land here
    argv = [a for a in train_argv("x", "trainer.steps=2") if a not in ("--run-dir", "x")]
    assert main([*argv, "--set", 'run_dir=""']) == 1
    one_line_error(capsys.readouterr().err, "run_dir is empty", "--run-dir")
    assert os.listdir(tmp_path) == []


def test_checkpoints_dir_is_a_file(tmp_path, capsys):
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    (run_dir / "checkpoints").write_text("not a directory")
    assert main(train_argv(run_dir, "trainer.steps=2")) == 1
    one_line_error(capsys.readouterr().err, f"{run_dir / 'checkpoints'} is a file, not a directory",
                   "move the file away")
    # and where the file appears only during the run, save_checkpoint names it the same way
    mgr = CheckpointManager(run_dir / "checkpoints")
    from diffkit.errors import CheckpointError

    with pytest.raises(CheckpointError, match="checkpoints is a file, not a directory") as ei:
        mgr.save(1, {"model": {}})
    assert ".tmp" not in str(ei.value)
    assert sorted(os.listdir(run_dir)) == ["checkpoints"]


# -- logs after resume -------------------------------------------------------------------------
KILL_STEPS, KILL_EVERY, VAL_EVERY = 150, 14, 7
KILL_SETS = [f"trainer.steps={KILL_STEPS}", f"trainer.ckpt_every={KILL_EVERY}", "trainer.log_every=1",
             f"trainer.val_every={VAL_EVERY}", "trainer.val_batches=1"]


def _records(path: Path) -> list[tuple[int, str]]:
    """``(step, "loss" | "val_loss")`` of every complete line of metrics.jsonl."""
    out = []
    for line in path.read_text().splitlines(keepends=True) if path.exists() else []:
        if line.endswith("\n"):
            rec = json.loads(line)
            out.append((rec["step"], "loss" if "loss" in rec else "val_loss"))
    return out


def _console(args: list[str]) -> list[str]:
    exe = shutil.which("diffkit", path=os.path.dirname(sys.executable))
    return ([exe] if exe else [sys.executable, "-m", "diffkit"]) + args


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ENV_VARS}
    env["OMP_NUM_THREADS"] = "1"
    return env


def _kill_after_logging_past_a_checkpoint(run_dir: Path) -> tuple[int, int]:
    """Train in a subprocess; SIGKILL it once metrics.jsonl holds steps after its newest checkpoint.

    The child is frozen (SIGSTOP) while the files are checked, so what is checked is what the kill
    leaves.  Returns (newest checkpoint step, last logged step).
    """
    proc = subprocess.Popen(_console(train_argv(run_dir, *KILL_SETS)), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True, cwd=run_dir.parent, env=_env())
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                out, err = proc.communicate()
                pytest.fail(f"training ended ({proc.returncode}) before it was killed:\n{out}\n{err}")
            ck = [s for s, _ in CheckpointManager(run_dir / "checkpoints").list()]
            rec = _records(run_dir / "metrics.jsonl")
            if ck and ck[-1] >= KILL_EVERY and rec and rec[-1][0] > ck[-1] + 1:
                proc.send_signal(signal.SIGSTOP)
                ck = [s for s, _ in CheckpointManager(run_dir / "checkpoints").list()]
                rec = _records(run_dir / "metrics.jsonl")
                if rec[-1][0] > ck[-1] + 1:
                    proc.send_signal(signal.SIGKILL)
                    proc.communicate(timeout=60)
                    assert proc.returncode == -signal.SIGKILL
                    return ck[-1], rec[-1][0]
                proc.send_signal(signal.SIGCONT)
            time.sleep(0.002)
        pytest.fail("no checkpoint followed by logged steps within 120 s")
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()


@pytest.mark.slow
def test_metrics_jsonl_no_duplicates_after_kill_and_resume(tmp_path):
    run_dir = tmp_path / "run"
    ckpt_step, logged = _kill_after_logging_past_a_checkpoint(run_dir)
    assert KILL_EVERY <= ckpt_step < logged < KILL_STEPS
    # without the fix the resumed run logs steps ckpt_step+1..logged a second time
    assert any(s > ckpt_step for s, _ in _records(run_dir / "metrics.jsonl"))

    res = subprocess.run(_console(train_argv(run_dir, *KILL_SETS, extra=["--resume"])), capture_output=True,
                         text=True, cwd=tmp_path, env=_env(), timeout=180)
    assert res.returncode == 0, f"{res.stdout}\n{res.stderr}"
    assert f"resumed from {run_dir / 'checkpoints' / f'ckpt-{ckpt_step:09d}.pt'} at step {ckpt_step}" in res.stdout

    text = (run_dir / "metrics.jsonl").read_text()
    assert text.endswith("\n")
    rows = [json.loads(line) for line in text.splitlines()]
    for kind in ("loss", "val_loss"):
        steps = [r["step"] for r in rows if kind in r]
        assert all(a < b for a, b in zip(steps, steps[1:])), f"{kind} steps not strictly increasing: {steps}"
    # exactly the records of an uninterrupted run, each once
    expected = []
    for step in range(1, KILL_STEPS + 1):
        expected += [(step, "loss")] + ([(step, "val_loss")] if step % VAL_EVERY == 0 else [])
    assert _records(run_dir / "metrics.jsonl") == expected


def test_metrics_jsonl_half_written_record_is_dropped_on_resume(tmp_path):
    cfg = apply_overrides(Config(), [*TINY, f'run_dir="{tmp_path / "run"}"', "trainer.steps=6",
                                     "trainer.ckpt_every=4", "trainer.log_every=1"])
    Trainer(cfg, device="cpu", progress=False).fit()
    run_dir = Path(cfg.run_dir)
    (run_dir / "checkpoints" / "ckpt-000000006.pt").unlink()  # killed after step 6 was logged ...
    with open(run_dir / "metrics.jsonl", "a") as f:
        f.write('{"step": 7, "lo')  # ... in the middle of writing step 7's record
    Trainer(cfg, device="cpu", progress=False, resume=True).fit()
    assert [s for s, _ in _records(run_dir / "metrics.jsonl")] == [1, 2, 3, 4, 5, 6]
    assert (run_dir / "metrics.jsonl").read_text().endswith("}\n")


# -- the time budget ---------------------------------------------------------------------------
def test_time_budget_stop_names_the_budget(tmp_path, capsys):
    run_dir = tmp_path / "run"
    assert main(train_argv(run_dir, "trainer.steps=1000000", "trainer.time_budget=1", "trainer.ckpt_every=0")) == 0
    out = capsys.readouterr().out
    import re

    m = re.search(r"time budget reached \(trainer\.time_budget = 1 s\) at step (\d+) of 1000000; "
                  r"checkpoint saved\. Continue with --resume", out)
    assert m, out
    step = int(m.group(1))
    assert f"stopped early at step {step}" in out
    assert [s for s, _ in CheckpointManager(run_dir / "checkpoints").list()] == [step]
    # a run that reaches its steps says nothing about a budget
    assert main(train_argv(tmp_path / "done", "trainer.steps=2", "trainer.time_budget=600")) == 0
    assert "time budget" not in capsys.readouterr().out
