"""The trainer's fast paths (issue 17): the NaN/inf watch without a host sync per step
(``trainer.check_every``), which still names the exact first bad step, and fused AdamW
(``trainer.fused_adamw``), which trains the same parameters as the default AdamW."""
import json
import re
from pathlib import Path

import pytest
import torch

import diffkit.train as train_mod
from diffkit.config import Config, apply_overrides
from diffkit.errors import ConfigError
from diffkit.train import Trainer, TrainingDiverged

TINY = ["model.options={hidden=16,depth=2}", "data.options={n=256}", "data.batch_size=16",
        "trainer.val_every=0", "trainer.warmup=0", "trainer.seed=3"]


def config(tmp_path: Path, *sets: str) -> Config:
    return apply_overrides(Config(), [*TINY, f'run_dir="{tmp_path / "run"}"', *sets])


def ckpt_steps(run_dir: Path) -> list[int]:
    return sorted(int(p.stem.split("-")[1]) for p in (run_dir / "checkpoints").glob("ckpt-*.pt"))


def poison_loss(trainer: Trainer, step: int, value: float = float("nan")) -> None:
    """The loss of optimizer step ``step`` (1-based) becomes ``value``."""
    inner = trainer._loss

    def loss(*args, **kwargs):
        out = inner(*args, **kwargs)
        return out * value if trainer.step + 1 == step and kwargs.get("model") is None else out
    trainer._loss = loss


@pytest.mark.parametrize("every", [1, 4, 100])
@pytest.mark.parametrize("value, word", [(float("nan"), "nan"), (float("inf"), "inf")])
def test_a_non_finite_loss_names_its_exact_step_whatever_the_check_interval(tmp_path, every, value, word):
    cfg = config(tmp_path, "trainer.steps=12", "trainer.log_every=100", "trainer.ckpt_every=5",
                 f"trainer.check_every={every}")
    trainer = Trainer(cfg, device="cpu", progress=False)
    poison_loss(trainer, 6, value)
    with pytest.raises(TrainingDiverged, match=rf"^the loss became {word} at step 6; .*last good checkpoint"):
        trainer.fit()
    # found at the first check at or after step 6: every step, step 8, or the checkpoint step 10
    assert trainer.step == {1: 5, 4: 7, 100: 9}[every]
    assert ckpt_steps(Path(cfg.run_dir)) == [5]  # a checkpoint step is always checked first: none after 6


@pytest.mark.parametrize("every", [1, 3])
def test_a_non_finite_batch_names_its_exact_step(tmp_path, monkeypatch, every):
    cfg = config(tmp_path, "trainer.steps=10", "trainer.log_every=100", "trainer.ckpt_every=0",
                 f"trainer.check_every={every}")
    trainer = Trainer(cfg, device="cpu", progress=False)
    inner = train_mod._collate_to

    def collate(batch, device):
        x, cond, w = inner(batch, device)
        if trainer.step + 1 == 4:
            x = x.clone()
            x[0, 0] = float("nan")
        return x, cond, w
    monkeypatch.setattr(train_mod, "_collate_to", collate)
    with pytest.raises(TrainingDiverged, match=r"^the training batch of step 4 holds NaN or inf values"):
        trainer.fit()
    assert trainer.step == (3 if every == 1 else 5)
    assert ckpt_steps(Path(cfg.run_dir)) == []


def test_a_run_interrupted_between_checks_checks_before_its_final_checkpoint(tmp_path):
    cfg = config(tmp_path, "trainer.steps=20", "trainer.log_every=100", "trainer.ckpt_every=0",
                 "trainer.check_every=100")
    trainer = Trainer(cfg, device="cpu", progress=False)
    poison_loss(trainer, 2)
    inner = trainer._loss

    def loss(*args, **kwargs):
        if trainer.step + 1 == 3:
            trainer._stop = True  # as Ctrl-C does: the loop ends after step 3 and saves a checkpoint
        return inner(*args, **kwargs)
    trainer._loss = loss
    with pytest.raises(TrainingDiverged, match=r"the loss became nan at step 2;"):
        trainer.fit()
    assert trainer.step == 3 and ckpt_steps(Path(cfg.run_dir)) == []


@pytest.mark.parametrize("accum", [1, 2])
def test_logged_losses_are_the_python_sums_of_the_micro_batch_losses_for_any_check_interval(tmp_path, accum):
    """The loss is summed on the device in float64, as the per-micro-batch Python floats were summed
    before; the log is the same whether every step or every 5th is checked."""
    logs = []
    for every in (1, 5):
        cfg = config(tmp_path / f"e{every}", "trainer.steps=8", "trainer.log_every=2", "trainer.ckpt_every=0",
                     f"trainer.check_every={every}", f"trainer.grad_accum={accum}")
        trainer = Trainer(cfg, device="cpu", progress=False)
        parts, inner = {}, trainer._loss

        def loss(*args, _inner=inner, _parts=parts, _t=trainer, **kwargs):
            out = _inner(*args, **kwargs)
            _parts.setdefault(_t.step + 1, []).append(float(out.detach().mean() / accum))
            return out
        trainer._loss = loss
        trainer.fit()
        rows = [json.loads(r) for r in (Path(cfg.run_dir) / "metrics.jsonl").read_text().splitlines()]
        got = {r["step"]: r["loss"] for r in rows if "loss" in r}
        want = {}
        for step, xs in parts.items():
            total = 0.0
            for v in xs:
                total += v
            want[step] = total
        assert got == {s: want[s] for s in (2, 4, 6, 8)}
        logs.append(got)
    assert logs[0] == logs[1]


def test_check_every_zero_is_every_step_on_cpu_and_the_log_interval_elsewhere(tmp_path):
    trainer = Trainer(config(tmp_path, "trainer.steps=2", "trainer.log_every=7"), device="cpu", progress=False)
    assert trainer._check_interval() == 1
    trainer.device = torch.device("meta")  # (only the device type is asked)
    assert trainer._check_interval() == 7
    trainer.cfg = apply_overrides(trainer.cfg, ["trainer.check_every=3"])
    assert trainer._check_interval() == 3


# -- fused AdamW ---------------------------------------------------------------------------------------------
def test_fused_adamw_trains_the_same_parameters_as_the_default(tmp_path):
    nets = {}
    for fused in (False, True):
        cfg = config(tmp_path / str(fused), "trainer.steps=10", "trainer.ckpt_every=0", "trainer.lr=1e-2",
                     "trainer.weight_decay=0.01", f"trainer.fused_adamw={str(fused).lower()}")
        trainer = Trainer(cfg, device="cpu", progress=False)
        assert trainer.opt.param_groups[0]["fused"] is (True if fused else None)
        trainer.fit()
        nets[fused] = trainer.net.state_dict()
    assert nets[False].keys() == nets[True].keys()
    for k, v in nets[False].items():
        torch.testing.assert_close(nets[True][k], v, rtol=1e-5, atol=1e-6, msg=k)


def test_resuming_takes_this_configs_fused_flag_not_the_checkpoints(tmp_path):
    cfg = config(tmp_path, "trainer.steps=3", "trainer.ckpt_every=0", "trainer.fused_adamw=true")
    Trainer(cfg, device="cpu", progress=False).fit()
    plain = apply_overrides(cfg, ["trainer.fused_adamw=false", "trainer.steps=5"])
    trainer = Trainer(plain, device="cpu", progress=False, resume=True)
    assert trainer.step == 3 and trainer.opt.param_groups[0]["fused"] is None
    fused = Trainer(apply_overrides(plain, ["trainer.fused_adamw=true"]), device="cpu", progress=False, resume=True)
    assert fused.opt.param_groups[0]["fused"] is True
    assert fused.fit()["step"] == 5


def test_fused_adamw_on_a_device_without_the_kernel_is_a_one_line_error(tmp_path, monkeypatch):
    import torch.utils._foreach_utils as fu

    monkeypatch.setattr(fu, "_get_fused_kernels_supported_devices", lambda: ["cuda"])
    cfg = config(tmp_path, "trainer.steps=1", "trainer.fused_adamw=true")
    with pytest.raises(ConfigError, match=re.escape("has no fused AdamW kernel for device 'cpu'; set "
                                                    "trainer.fused_adamw = false")):
        Trainer(cfg, device="cpu", progress=False)
