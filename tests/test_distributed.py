"""Several processes (``torchrun``, gloo on CPU) train and sample exactly as one process does.

Each rank draws the noise of the whole global batch and keeps its rows, and the data is dealt
out as ``DistributedSampler`` does, so 2 processes with global batch B must end with the same
weights as 1 process with global batch B -- up to float rounding, since DDP averages the
gradients with a float all-reduce.  The runs go through the real command line
(``torchrun -m diffkit train`` / ``sample``), with a tiny MLP on the built-in ``mixture`` data.

The training runs are shared by the tests of this module (a module-scoped fixture):

- ``one``: ``diffkit train`` in one process, 30 steps, checkpoints every 10;
- ``two``: the same under ``torchrun --nproc_per_node=2``;
- ``resumed``: ``two``'s run directory cut back to its step-20 checkpoint, resumed with 2
  processes through a small wrapper of ``diffkit.cli.main`` which, after ``fit()``, all-gathers
  the EMA and model weights of every rank (the EMA is saved by rank 0 only, so this is the
  one place the other rank's copy is seen).

Sized for a 2-core CI machine (about 40 s for the module).
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

STEPS, CKPT_EVERY, LOG_EVERY, VAL_EVERY = 30, 10, 5, 15
SETS = [
    "model.options={hidden=32,depth=2}", "data.options={n=2000}", "data.batch_size=64",
    f"trainer.steps={STEPS}", f"trainer.val_every={VAL_EVERY}", "trainer.val_batches=2",
    f"trainer.ckpt_every={CKPT_EVERY}", f"trainer.log_every={LOG_EVERY}",
]
RTOL, ATOL = 1e-5, 1e-6  # gloo's all-reduce averages in float: close, not bitwise
#: torchrun / DDP variables that must not leak in when pytest itself runs under a launcher
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")

# Wraps `diffkit ...` (argv as for the console script): after Trainer.fit, every rank all-gathers
# its EMA and model weights and writes the largest difference to rank 0's copy.
PROBE = '''
import json, os, sys

import torch
import torch.distributed as td

from diffkit import train
from diffkit.cli import main

_fit = train.Trainer.fit


def fit(self):
    out = _fit(self)
    res = {"rank": self.dist.rank, "world": self.dist.world, "step": self.step}
    for name, net in (("ema", self.ema.net), ("model", self.net)):
        v = torch.cat([p.detach().reshape(-1).double() for p in net.parameters()])
        got = [torch.empty_like(v) for _ in range(self.dist.world)]
        td.all_gather(got, v)
        res[name] = max(float((g - got[0]).abs().max()) for g in got)
    with open(os.path.join(os.environ["PROBE_OUT"], f"rank{self.dist.rank}.json"), "w") as f:
        json.dump(res, f)
    return out


train.Trainer.fit = fit
rc = main(sys.argv[1:])
# what is left running once the command is done (the process group destroyed): a native thread
# still alive here runs on into interpreter shutdown
threads = []
for t in os.listdir("/proc/self/task") if os.path.isdir("/proc/self/task") else []:
    with open(f"/proc/self/task/{t}/comm") as f:
        threads.append(f.read().strip())
with open(os.path.join(os.environ["PROBE_OUT"], f"rank{os.environ['RANK']}-exit.json"), "w") as f:
    json.dump({"threads": threads, "initialized": td.is_initialized()}, f)
raise SystemExit(rc)
'''


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    return env


def _run(cmd: list[str], cwd: Path, timeout: float = 180, **env) -> subprocess.CompletedProcess:
    p = subprocess.run(cmd, cwd=cwd, env=_env(**env), capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    return p


def torchrun(target: list[str], args: list[str], cwd: Path, nproc: int = 2, **kw) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=N TARGET ARGS`` from this Python (a free port)."""
    return _run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                 *target, *args], cwd, **kw)


def diffkit1(args: list[str], cwd: Path) -> subprocess.CompletedProcess:
    """Plain ``diffkit ARGS``: one process."""
    exe = shutil.which("diffkit", path=os.path.dirname(sys.executable))
    return _run(([exe] if exe else [sys.executable, "-m", "diffkit"]) + args, cwd)


def train_args(run_dir: str, *extra: str) -> list[str]:
    """``train`` with the module's settings; ``extra`` last, so that its ``--set`` win."""
    out = ["train", "--device", "cpu", "--no-progress", "--run-dir", run_dir]
    for s in SETS:
        out += ["--set", s]
    return out + list(extra)


def ckpt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"ckpt-{step:09d}.pt", map_location="cpu", weights_only=False)


def metrics(run: Path) -> list[dict]:
    """The lines of ``metrics.jsonl``: training records (``loss``) and validation ones (``val_loss``)."""
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def expected_records() -> list[tuple[int, str]]:
    out = []
    for step in range(1, STEPS + 1):
        out += [(step, "loss")] if step % LOG_EVERY == 0 else []
        out += [(step, "val_loss")] if step % VAL_EVERY == 0 else []
    return out


def records(rows: list[dict]) -> list[tuple[int, str]]:
    return [(r["step"], "loss" if "loss" in r else "val_loss") for r in rows]


def assert_same_weights(a: dict, b: dict, what: str) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{what}: {key}.{name}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    root = tmp_path_factory.mktemp("dist")
    out = {"root": root}
    out["two_proc"] = torchrun(["-m", "diffkit"], train_args("two"), root)
    out["one_proc"] = diffkit1(train_args("one"), root)
    # `two` as a 2-process run killed between steps 20 and 29 leaves it: the step-20 checkpoint is
    # the newest (each is written by rank 0 alone, so this is that very file) and metrics end at 20
    src, dst = root / "two", root / "resumed"
    (dst / "checkpoints").mkdir(parents=True)
    shutil.copy(src / "config.toml", dst / "config.toml")
    for step in (10, 20):
        name = f"ckpt-{step:09d}.pt"
        shutil.copy(src / "checkpoints" / name, dst / "checkpoints" / name)
    lines = [line for line in (src / "metrics.jsonl").read_text().splitlines() if json.loads(line)["step"] <= 20]
    (dst / "metrics.jsonl").write_text("".join(line + "\n" for line in lines))
    (root / "probe.py").write_text(textwrap.dedent(PROBE))
    (root / "probe").mkdir()
    out["resume_proc"] = torchrun(["probe.py"], train_args("resumed", "--resume"), root,
                                  PROBE_OUT=str(root / "probe"))
    return out


@pytest.mark.slow
def test_two_processes_train_the_same_model_as_one(runs):
    root = runs["root"]
    one, two = ckpt(root / "one", STEPS), ckpt(root / "two", STEPS)
    assert one["step"] == two["step"] == STEPS
    # same position in the data (30 steps of 64 cross the 29-batch epoch of 1900 samples)
    assert (one["epoch"], one["batch_in_epoch"]) == (two["epoch"], two["batch_in_epoch"]) == (1, 1)
    # both drew the noise of the whole global batch from the same generator
    assert torch.equal(one["noise_generator"], two["noise_generator"])
    for step in range(CKPT_EVERY, STEPS + 1, CKPT_EVERY):
        assert_same_weights(ckpt(root / "one", step), ckpt(root / "two", step), f"step {step}")
    # and the weights did move (the comparison is not between two copies of the initialisation)
    first = ckpt(root / "one", CKPT_EVERY)
    assert any(not torch.equal(first["model"][k], one["model"][k]) for k in one["model"])


@pytest.mark.slow
def test_logged_losses_do_not_depend_on_the_number_of_processes(runs):
    # the training loss is that of the global batch (not rank 0's share), and validation
    # evaluates the same samples whatever the world size
    root = runs["root"]
    m1, m2 = metrics(root / "one"), metrics(root / "two")
    assert records(m1) == records(m2) == expected_records()
    for a, b in zip(m1, m2):
        key = "loss" if "loss" in a else "val_loss"
        assert b[key] == pytest.approx(a[key], rel=1e-5, abs=1e-7), (a, b)
        if key == "loss":
            assert b["lr"] == pytest.approx(a["lr"], rel=1e-12)


@pytest.mark.slow
def test_only_rank_zero_writes(runs):
    run = runs["root"] / "two"
    files = sorted(str(p.relative_to(run)) for p in run.rglob("*") if p.is_file())
    assert files == ["checkpoints/ckpt-000000010.pt", "checkpoints/ckpt-000000020.pt",
                     "checkpoints/ckpt-000000030.pt", "config.toml", "metrics.jsonl"]
    assert records(metrics(run)) == expected_records(), "metrics.jsonl has missing or duplicate lines"
    stdout = runs["two_proc"].stdout
    assert stdout.count("diffkit train: finished at step 30") == 1, stdout


@pytest.mark.slow
def test_resume_with_two_processes_equals_an_uninterrupted_run(runs):
    root = runs["root"]
    assert runs["resume_proc"].stdout.count("resumed from") == 1, runs["resume_proc"].stdout
    assert_same_weights(ckpt(root / "two", STEPS), ckpt(root / "resumed", STEPS), "resumed at 20 vs uninterrupted")
    a, b = metrics(root / "two"), metrics(root / "resumed")
    assert records(b) == records(a), "resume duplicated or dropped metrics lines"
    for x, y in zip(a, b):
        key = "loss" if "loss" in x else "val_loss"
        assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_ema_and_weights_identical_on_every_rank(runs):
    probe = runs["root"] / "probe"
    res = [json.loads((probe / f"rank{r}.json").read_text()) for r in range(2)]
    assert [r["rank"] for r in res] == [0, 1] and all(r["world"] == 2 and r["step"] == STEPS for r in res)
    for r in res:  # DDP keeps replicas bitwise equal; the EMA follows deterministically
        assert r["model"] == 0.0 and r["ema"] == 0.0, r


@pytest.mark.slow
def test_every_rank_leaves_no_process_group_threads_behind(runs):
    # DDP's first import of torch._dynamo took references to the process group that outlived
    # destroy_process_group (as did the DDP wrapper itself): its gloo threads then ran on into
    # interpreter shutdown, where a rank could abort ("terminate called without an active exception")
    if not os.path.isdir("/proc/self/task"):
        pytest.skip("no /proc/self/task to list a process's threads")
    probe = runs["root"] / "probe"
    for r in range(2):
        left = json.loads((probe / f"rank{r}-exit.json").read_text())
        assert not left["initialized"]
        assert not [t for t in left["threads"] if "gloo" in t], (r, left["threads"])
    assert "terminate called" not in runs["resume_proc"].stderr


@pytest.mark.slow
def test_resume_a_one_process_checkpoint_with_two_processes(runs):
    root = runs["root"]
    start = root / "one" / "checkpoints" / f"ckpt-{20:09d}.pt"
    torchrun(["-m", "diffkit"], train_args("one_to_two", "--resume", str(start)), root)
    assert_same_weights(ckpt(root / "one", STEPS), ckpt(root / "one_to_two", STEPS), "1-proc run resumed on 2")


@pytest.mark.slow
def test_time_budget_stops_every_rank_at_the_same_step(runs):
    # each rank reads its own clock: unless they agree on when to stop, one leaves the loop and
    # the other waits forever in DDP's all-reduce of its next step
    root = runs["root"]
    args = train_args("budget", "--set", "trainer.steps=1000000", "--set", "trainer.time_budget=1.0",
                      "--set", "trainer.ckpt_every=0")
    p = torchrun(["-m", "diffkit"], args, root, timeout=90)
    m = re.findall(r"diffkit train: stopped early at step (\d+)", p.stdout)
    assert len(m) == 1, f"{p.stdout}\n{p.stderr[-3000:]}"
    step = int(m[0])
    # said once (by rank 0), naming the budget
    assert p.stdout.count("diffkit: time budget reached (trainer.time_budget = 1 s) at step") == 1, p.stdout
    assert f"at step {step} of 1000000" in p.stdout
    assert "terminate called" not in p.stderr
    names = sorted(c.name for c in (root / "budget" / "checkpoints").iterdir())
    assert names == [f"ckpt-{step:09d}.pt"], (names, p.stdout)


@pytest.mark.parametrize("n", [10, 9], ids=["even-5+5", "uneven-5+4"])
@pytest.mark.slow
def test_sharded_sampling_equals_one_process(runs, n, monkeypatch):
    import xarray as xr

    root = runs["root"]
    monkeypatch.chdir(root)
    common = ["--steps", "5", "--seed", "1", "--device", "cpu", "--no-progress"]
    # `-n`: torchrun's own parser takes `--n` for an abbreviation of one of its options
    p2 = torchrun(["-m", "diffkit"], ["sample", "two", "-n", str(n), "--out", f"s2-{n}.nc", *common], root)
    from diffkit.cli import main  # one process: in this one (saves an interpreter start-up)

    assert main(["sample", "two", "--n", str(n), "--out", f"s1-{n}.nc", *common]) == 0
    assert p2.stdout.count(f"wrote {n} samples") == 1, p2.stdout
    with xr.open_dataset(root / f"s1-{n}.nc") as a, xr.open_dataset(root / f"s2-{n}.nc") as b:
        assert a.sizes["sample"] == b.sizes["sample"] == n
        for var in a.data_vars:
            torch.testing.assert_close(torch.from_numpy(b[var].values), torch.from_numpy(a[var].values),
                                       rtol=RTOL, atol=ATOL)
        drop = ("history", "command")  # they name the time and the command line, which differ here
        assert {k: v for k, v in a.attrs.items() if k not in drop} == {k: v for k, v in b.attrs.items() if k not in drop}
        assert a.attrs["command"] == f"diffkit sample two --n {n} --out s1-{n}.nc {' '.join(common)}"
        assert b.attrs["command"] == f"diffkit sample two -n {n} --out s2-{n}.nc {' '.join(common)}"
