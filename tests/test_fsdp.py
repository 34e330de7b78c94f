"""``trainer.strategy = "fsdp"`` (issue 17): under ``torchrun`` the network, its gradients, the AdamW
state and the EMA weights are sharded (FSDP2, ``fully_shard``; gloo on CPU), and two processes train
the same model as DDP does, with checkpoints in the same format (the full weights, gathered).

The runs (a module-scoped fixture, through the real command line, as in test_distributed.py), all
in one ``torchrun --nproc_per_node=2`` launch: a probe calls ``diffkit.cli.main`` once per run in
each worker (starting the launcher and importing torch twice per run cost most of the time, and
three launches took 3x that), keeps the process group between runs and leaves it after the last:

- ``ddp``: ``diffkit train``, 12 steps, checkpoints every 6;
- ``fsdp``: the same with ``trainer.strategy=fsdp``;
- ``resumed``: ``fsdp``'s run directory cut back to its step-6 checkpoint (as if killed between steps
  6 and 12), resumed with FSDP by a new ``Trainer`` that has only those files.

After each ``fit()`` the probe records whether each rank's parameters and EMA weights are shards;
rank 0 prints a marker line before each run so that each run's output can be told apart.
"""
from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
import torch.distributed

if not (torch.distributed.is_available() and torch.distributed.is_gloo_available()):
    pytest.skip("torch.distributed with the gloo backend is not available", allow_module_level=True)

#: torchrun / DDP variables that must not leak in when pytest itself runs under a launcher
DIST_VARS = ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "GROUP_RANK", "MASTER_ADDR",
             "MASTER_PORT", "TORCHELASTIC_RUN_ID", "TORCHELASTIC_RESTART_COUNT")


def torchrun(target: list[str], args: list[str], cwd: Path, timeout: float = 240, **extra) -> subprocess.CompletedProcess:
    """``torchrun --standalone --nproc_per_node=2 TARGET ARGS`` from this Python (``--standalone``: a free port)."""
    env = {k: v for k, v in os.environ.items() if k not in DIST_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONUNBUFFERED="1", **extra)
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2", *target, *args]
    p = subprocess.run(cmd, cwd=cwd, env=env, capture_output=True, text=True, timeout=timeout)
    assert p.returncode == 0, f"{' '.join(cmd)} failed ({p.returncode}):\n{p.stdout}\n{p.stderr}"
    assert "terminate called" not in p.stderr, p.stderr
    return p


def ckpt(run: Path, step: int) -> dict:
    return torch.load(run / "checkpoints" / f"ckpt-{step:09d}.pt", map_location="cpu", weights_only=True)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]

STEPS, EVERY = 12, 6
SETS = ["model.options={hidden=32,depth=2}", "data.options={n=1000}", "data.batch_size=32",
        f"trainer.steps={STEPS}", "trainer.val_every=6", "trainer.val_batches=2", f"trainer.ckpt_every={EVERY}",
        "trainer.log_every=3", "trainer.weight_decay=0.01"]
RTOL, ATOL = 1e-5, 1e-6

PROBE = '''
import json, os, shutil, sys

import torch.distributed as td

from diffkit import cli, train

plan = json.loads(open(sys.argv[1]).read())
rank = int(os.environ["RANK"])
_fit, _leave, current = train.Trainer.fit, cli._leave_process_group, None


def fit(self):
    out = _fit(self)
    from torch.distributed.tensor import DTensor

    res = {"run": current, "rank": self.dist.rank, "fsdp": self.fsdp}
    for name, net in (("model", self.net), ("ema", self.ema.net)):
        ps = list(net.parameters())
        res[name] = {"dtensor": all(isinstance(p, DTensor) for p in ps),
                     "local": sum(p.to_local().numel() if isinstance(p, DTensor) else p.numel() for p in ps),
                     "full": sum(p.numel() for p in ps)}
    with open(os.path.join(plan["probe_out"], f"{current}-rank{self.dist.rank}.json"), "w") as f:
        json.dump(res, f)
    return out


train.Trainer.fit = fit
cli._leave_process_group = td.barrier  # every rank done with the run; the group stays for the next
for run in plan["runs"]:
    current = run["name"]
    if run["copy"] and rank == 0:
        for src, dst in run["copy"]:
            os.makedirs(os.path.dirname(dst), exist_ok=True)
            shutil.copy(src, dst)
    if run["copy"]:
        td.barrier()
    if rank == 0:
        print(plan["mark"] + current, flush=True)
    if cli.main(run["argv"]) != 0:
        raise SystemExit(f"{current}: diffkit train failed")
_leave()
'''
MARK = "=== probe run: "


def args(run_dir: str, *extra: str) -> list[str]:
    out = ["train", "--device", "cpu", "--no-progress", "--run-dir", run_dir]
    for s in SETS:
        out += ["--set", s]
    return out + list(extra)


@pytest.fixture(scope="module")
def runs(tmp_path_factory) -> dict:
    """The three runs in one launch; ``out["stdout"][name]``: what that run printed (both ranks)."""
    root = tmp_path_factory.mktemp("fsdp")
    (root / "probe.py").write_text(textwrap.dedent(PROBE))
    (root / "probe").mkdir()
    fsdp = ("--set", "trainer.strategy=fsdp")
    name = f"ckpt-{EVERY:09d}.pt"  # "resumed": fsdp's run directory as a kill between steps 6 and 12 leaves it
    cut = [(root / "fsdp" / "config.toml", root / "resumed" / "config.toml"),
           (root / "fsdp" / "checkpoints" / name, root / "resumed" / "checkpoints" / name)]
    plan = {"probe_out": str(root / "probe"), "mark": MARK,
            "runs": [{"name": "ddp", "argv": args("ddp"), "copy": []},
                     {"name": "fsdp", "argv": args("fsdp", *fsdp), "copy": []},
                     {"name": "resumed", "argv": args("resumed", *fsdp, "--resume"),
                      "copy": [[str(a), str(b)] for a, b in cut]}]}
    (root / "plan.json").write_text(json.dumps(plan))
    p = torchrun(["probe.py"], ["plan.json"], root, timeout=600)
    head, *parts = p.stdout.split(MARK)
    stdout = dict(part.split("\n", 1) for part in parts)
    assert list(stdout) == ["ddp", "fsdp", "resumed"], p.stdout
    return {"root": root, "stdout": stdout, "launch": p}


def probe(root: Path, run: str) -> list[dict]:
    return [json.loads((root / "probe" / f"{run}-rank{r}.json").read_text()) for r in range(2)]


def same(a: dict, b: dict, what: str) -> None:
    for key in ("model", "ema"):
        assert a[key].keys() == b[key].keys()
        for name in a[key]:
            torch.testing.assert_close(b[key][name], a[key][name], rtol=RTOL, atol=ATOL,
                                       msg=lambda m: f"{what}: {key}.{name}: {m}")


def structure(v):
    """The layout of a checkpoint entry: nested keys, tensor dtypes and shapes."""
    if isinstance(v, dict):
        return {k: structure(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [structure(x) for x in v]
    if isinstance(v, torch.Tensor):
        return ("tensor", v.dtype, tuple(v.shape), v.device.type)
    return type(v).__name__


@pytest.mark.slow
def test_fsdp_shards_the_model_and_the_ema_on_every_rank(runs):
    for run in ("fsdp", "resumed"):
        res = probe(runs["root"], run)
        for r in res:
            assert r["fsdp"]
            for name in ("model", "ema"):
                assert r[name]["dtensor"], (run, r["rank"], name)
                assert r[name]["local"] < r[name]["full"], (run, r["rank"], name)  # a shard, not a replica
        assert sum(r["model"]["local"] for r in res) == res[0]["model"]["full"]
    for r in probe(runs["root"], "ddp"):  # what the probe sees without FSDP: full replicas
        assert not r["fsdp"] and not r["model"]["dtensor"] and r["model"]["local"] == r["model"]["full"]


@pytest.mark.slow
def test_fsdp_trains_the_same_model_as_ddp(runs):
    root = runs["root"]
    for step in (EVERY, STEPS):
        a, b = ckpt(root / "ddp", step), ckpt(root / "fsdp", step)
        same(a, b, f"step {step}")
        assert a["optimizer"]["param_groups"][0]["params"] == b["optimizer"]["param_groups"][0]["params"]
        for i, st in a["optimizer"]["state"].items():
            for k, v in st.items():
                torch.testing.assert_close(b["optimizer"]["state"][i][k], v, rtol=RTOL, atol=ATOL)
    first, last = ckpt(root / "fsdp", EVERY), ckpt(root / "fsdp", STEPS)
    assert any(not torch.equal(first["model"][k], last["model"][k]) for k in last["model"])
    m1, m2 = metrics(root / "ddp"), metrics(root / "fsdp")
    assert [sorted(r) for r in m1] == [sorted(r) for r in m2]
    for x, y in zip(m1, m2):
        key = "loss" if "loss" in x else "val_loss"
        assert y[key] == pytest.approx(x[key], rel=1e-5, abs=1e-7)


@pytest.mark.slow
def test_fsdp_checkpoints_have_the_format_of_unsharded_ones(runs):
    root = runs["root"]
    a, b = ckpt(root / "ddp", STEPS), ckpt(root / "fsdp", STEPS)
    skip = {"rng", "config"}  # (the config differs in trainer.strategy)
    assert {k: structure(v) for k, v in a.items() if k not in skip} == \
        {k: structure(v) for k, v in b.items() if k not in skip}
    assert b["config"]["trainer"]["strategy"] == "fsdp"


@pytest.mark.slow
def test_an_fsdp_run_resumes_from_its_checkpoint(runs):
    root = runs["root"]
    out = runs["stdout"]
    assert out["resumed"].count("resumed from") == 1, out["resumed"]
    assert "resumed from" not in out["ddp"] + out["fsdp"]
    same(ckpt(root / "fsdp", STEPS), ckpt(root / "resumed", STEPS), "resumed at 6 vs uninterrupted")


def test_one_process_ignores_the_fsdp_strategy(tmp_path):
    from diffkit.config import Config, apply_overrides
    from diffkit.train import Trainer

    cfg = apply_overrides(Config(), ["model.options={hidden=8,depth=1}", "data.options={n=64}", "data.batch_size=8",
                                     "trainer.strategy=fsdp", f'run_dir="{tmp_path / "run"}"'])
    trainer = Trainer(cfg, device="cpu", progress=False)
    assert trainer.fsdp is False and trainer.ddp is None
    assert not any(type(p).__name__ == "DTensor" for p in trainer.net.parameters())
