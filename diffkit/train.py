"""The training runtime: a :class:`Trainer` built from a :class:`~diffkit.config.Config`.

One step is the paper's regression (Turner et al. 2024, step 2) on a global batch: AdamW with
linear warm-up then cosine decay, gradient accumulation and clipping, EMA weights (used for
validation, snapshots and sampling), optional bf16 autocast and ``torch.compile``.

Exact resume.  Everything random is a function of saved state: the data order is a
permutation per epoch drawn from ``(seed, epoch)``, the diffusion noise comes from one
generator whose state is checkpointed, and every RNG state (python, numpy, torch, CUDA) is
saved.  A resumed run therefore ends with the same weights as an uninterrupted one (bitwise on
CPU with ``trainer.deterministic = true``).

Distributed.  Under ``torchrun`` the trainer uses DDP (NCCL on GPU, gloo on CPU).  Each rank
draws the noise of the *whole* global batch from the same generator and keeps its own rows,
and the sampler deals the global batch out as :class:`~torch.utils.data.DistributedSampler`
does, so N processes train the same model as 1 process with the same global batch.  Rank 0
alone logs, writes snapshots and checkpoints.
"""
from __future__ import annotations

import contextlib
import copy
import itertools
import json
import math
import signal
import time
from pathlib import Path

import torch
import torch.distributed as torchdist
from torch.utils.data import DataLoader, DistributedSampler

from . import registry
from ._io import atomic_write
from .checkpoint import CheckpointManager, _disk_full, capture_rng_state, restore_rng_state
from .config import Config, config_to_dict, dump_config, resolve_loss_defaults
from .denoiser import Cond, Denoiser, Regressor
from .errors import CheckpointError, ConfigError, DiffkitError
from .layout import Layout
from .losses import diffusion_loss, noise_distribution, regression_loss, sample_times
from .distributed import Dist, init_distributed  # noqa: F401  (Dist: diffkit.train.Dist for existing imports)
from .model import _accepts, _check_options, build_model, checkpoint_path, class_balanced_count
from .model import load_for_sampling  # noqa: F401  (diffkit.train.load_for_sampling, for existing user scripts)


class TrainingDiverged(DiffkitError):
    """The loss became NaN or inf."""


class ResumableSampler(DistributedSampler):
    """:class:`DistributedSampler` (seeded permutation per epoch, dealt out to ranks) that can
    start part-way through an epoch, so a resumed run sees exactly the remaining batches."""

    def __init__(self, dataset, num_replicas=1, rank=0, seed=0):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, seed=seed, drop_last=True)
        self.start = 0

    def set_start(self, n_samples: int) -> None:
        self.start = int(n_samples)

    def __iter__(self):
        it = list(super().__iter__())
        return iter(it[self.start:])

    def __len__(self):
        return self.num_samples - self.start


def _lr_lambda(warmup: int, steps: int):
    def f(k: int) -> float:
        w = min(1.0, (k + 1) / warmup) if warmup > 0 else 1.0
        return w * 0.5 * (1.0 + math.cos(math.pi * min(k, steps) / max(1, steps)))
    return f


def _collate_to(batch: dict, device) -> tuple[torch.Tensor, Cond, torch.Tensor | None]:
    x = batch["x"].to(device, non_blocking=True)
    cond = Cond(fields=batch.get("fields"), scalars=batch.get("scalars"), labels=batch.get("label")).to(device)
    w = batch.get("weight")
    return x, cond, None if w is None else w.to(device)


class Trainer:
    """Train a diffusion model as a config says.  ``fit()`` runs until ``trainer.steps`` or the
    time budget, writing ``metrics.jsonl``, checkpoints and snapshots under ``run_dir``."""

    def __init__(self, cfg: Config, *, device: str | torch.device | None = None, resume: bool | str = False,
                 progress: bool = True, adapter=None):
        self.cfg = cfg
        self.device = torch.device(device) if device else torch.device("cuda" if torch.cuda.is_available() else "cpu")
        self.dist = init_distributed(self.device, ddp=True)
        if self.device.type == "cuda" and self.dist.world > 1:
            self.device = torch.device("cuda", self.dist.local_rank)
            torch.cuda.set_device(self.device)
        tc = cfg.trainer
        if tc.deterministic:
            torch.use_deterministic_algorithms(True)
        gb = cfg.data.batch_size
        if gb % (self.dist.world * tc.grad_accum):
            raise DiffkitError(f"data.batch_size = {gb} is not divisible by world size {self.dist.world} x "
                               f"trainer.grad_accum {tc.grad_accum}; choose a multiple")
        self.micro = gb // (self.dist.world * tc.grad_accum)  # per-rank micro-batch
        self.run_dir = _check_run_dir(cfg.run_dir)
        self.progress = progress and self.dist.main

        torch.manual_seed(tc.seed)
        # the registered name stored in checkpoints, which `diffkit sample` uses to find the decoder
        self._adapter_name = cfg.data.adapter if adapter is None else getattr(adapter, "name", cfg.data.adapter)
        if adapter is None:
            adapter_cls = registry.get("adapter", cfg.data.adapter)
            options = dict(cfg.data.options)
            _check_options(adapter_cls, options, f"data.options (adapter {cfg.data.adapter!r})")
            if "val_fraction" not in options and _accepts(adapter_cls, "val_fraction"):
                options["val_fraction"] = cfg.data.val_fraction
            if cfg.data.window:
                from .window import window_options

                options = window_options(adapter_cls, options, cfg.data.window)
            adapter = adapter_cls(**options)
        if cfg.data.window:  # a window model (diffkit.window): the adapter's trajectories as windows
            from .window import WindowAdapter

            if not isinstance(adapter, WindowAdapter):
                adapter = WindowAdapter.from_config(adapter, cfg)
        self.adapter = adapter
        self.layout: Layout = self.adapter.layout
        # unset [loss] keys take their defaults for this model and layout (a surrogate's differ); the
        # resolved config is the one saved in config.toml and the checkpoints
        self._given_loss = cfg.loss  # before resolution: _resume keeps a run's stored choices for unset keys
        self.cfg = cfg = resolve_loss_defaults(cfg, self.layout)
        lw = self.layout.weights  # on the device once, not a host-to-device copy every step
        self._layout_weights = None if lw is None else lw.to(self.device)
        self.train_set = self.adapter.dataset("train")
        self.val_set = self.adapter.dataset("val") if tc.val_every else None
        if len(self.train_set) < gb:
            raise DiffkitError(f"the training split has {len(self.train_set)} samples, fewer than "
                               f"data.batch_size = {gb}; lower the batch size")
        self.model = build_model(cfg, self.layout).to(self.device)
        self.ema = copy.deepcopy(self.model).requires_grad_(False).eval()
        self.net = self.model.net
        self.ddp = None
        #: trainer.strategy = "fsdp" under torchrun: the network and its EMA are sharded (FSDP2)
        self.fsdp, self._sharded = self.dist.world > 1 and tc.strategy == "fsdp", False
        self._wrap_net()
        # the parameter lists, once: walking the module tree costs ~0.1 ms a step (clip, EMA)
        self._params, self._ema_params = list(self.net.parameters()), list(self.ema.net.parameters())
        self.opt = torch.optim.AdamW(self._params, lr=tc.lr, betas=tuple(tc.betas), weight_decay=tc.weight_decay,
                                     **self._fused())
        self.sched = torch.optim.lr_scheduler.LambdaLR(self.opt, _lr_lambda(tc.warmup, tc.steps))
        self.noise_gen = torch.Generator(device=self.device).manual_seed(tc.seed + 1)
        self.sampler = ResumableSampler(self.train_set, self.dist.world, self.dist.rank, seed=tc.seed)
        self.step, self.epoch, self.batch_in_epoch = 0, 0, 0
        self._reset_watch()
        prec = tc.precision
        self.amp_dtype = torch.bfloat16 if (prec == "bf16" or (prec == "auto" and self.device.type == "cuda")) else None
        self.ckpts = CheckpointManager(self.run_dir / "checkpoints", keep_last=tc.keep_last)
        self._stop = False
        self._resumed = False
        #: why the last fit() ended before trainer.steps: "time_budget", "interrupted" or None
        self.stopped: str | None = None
        if resume:
            self._resume(resume)

    def _wrap_net(self) -> None:
        """The network the Denoiser calls: DDP's wrapper of ``self.net`` under torchrun, compiled
        if ``trainer.compile``."""
        net = self.net
        if self.fsdp:
            if not self._sharded:  # in place, once: the EMA too, shard for shard (see _update_ema)
                from .distributed import shard

                shard(self.net, self.device)
                shard(self.ema.net, self.device)
                self._sharded = True
        elif self.dist.world > 1:
            from torch.nn.parallel import DistributedDataParallel as DDP

            self.ddp = net = DDP(net, device_ids=[self.device.index] if self.device.type == "cuda" else None)
        if self.cfg.trainer.compile:
            net = torch.compile(net)
        self.model.net = net

    def _unwrap_net(self) -> None:
        """Drop the DDP wrapper once fit() is done: it holds the process group, and a group that
        outlives ``destroy_process_group`` keeps its gloo threads running into interpreter shutdown,
        where a rank can abort with "terminate called without an active exception".  The next
        fit() wraps the network again."""
        if self.ddp is None:
            return
        import gc

        self.ddp = None
        self.model.net = self.net
        gc.collect()  # DDP sits in reference cycles (its hooks): free it, and its reference to the group, now

    # -- state -------------------------------------------------------------------------
    def state_dict(self) -> dict:
        """Everything a checkpoint holds.  Under FSDP the full weights and optimizer state, gathered to
        rank 0 (the same format as unsharded training): a collective, so every rank calls it."""
        if self.fsdp:
            from .distributed import full_state

            (model, optim), (ema, _) = full_state(self.net, self.opt), full_state(self.ema.net)
        else:
            model, ema, optim = self.net.state_dict(), self.ema.net.state_dict(), self.opt.state_dict()
        return {
            "model": model,
            "ema": ema,
            "optimizer": optim,
            "scheduler": self.sched.state_dict(),
            "step": self.step, "epoch": self.epoch, "batch_in_epoch": self.batch_in_epoch,
            "rng": capture_rng_state(),
            "noise_generator": self.noise_gen.get_state(),
            "layout": self.layout.to_dict(),
            "adapter": self._adapter_name,
            "config": config_to_dict(self.cfg),
        }

    def _resume(self, resume) -> None:
        from .checkpoint import resume as find

        where = self.ckpts.directory if resume is True else checkpoint_path(resume)
        got = None
        if where.exists() or resume is not True:
            got = find(where, require=("model", "ema", "optimizer", "step"))
        if got is None:
            if self.dist.main:
                print(f"diffkit: no checkpoint in {where}; starting from step 0")
            return
        path, ck = got
        self._check_same_model(ck, path)
        if self.fsdp:  # every rank read the full checkpoint and keeps its shard
            from .distributed import load_full_state

            load_full_state(self.net, ck["model"], self.opt, ck["optimizer"])
            load_full_state(self.ema.net, ck["ema"])
        else:
            self.net.load_state_dict(ck["model"])
            self.ema.net.load_state_dict(ck["ema"])
            self.opt.load_state_dict(ck["optimizer"])
        self._apply_fused_flag()
        self.sched.load_state_dict(ck["scheduler"])
        self.step, self.epoch, self.batch_in_epoch = int(ck["step"]), int(ck["epoch"]), int(ck["batch_in_epoch"])
        restore_rng_state(ck["rng"])
        self.noise_gen.set_state(ck["noise_generator"].to(self.noise_gen.get_state().device))
        self._keep_stored_loss(ck.get("config"), path)
        self._resumed = True
        if self.dist.main:
            print(f"diffkit: resumed from {path} at step {self.step}")

    def _fused(self) -> dict:
        """``{"fused": True}`` for AdamW where ``trainer.fused_adamw`` asks for it, else ``{}``; a one-line
        error on a device without the fused kernel."""
        if not self.cfg.trainer.fused_adamw:
            return {}
        from torch.utils._foreach_utils import _get_fused_kernels_supported_devices

        if self.device.type not in _get_fused_kernels_supported_devices():
            raise ConfigError(f"trainer.fused_adamw = true, but torch {torch.__version__} has no fused AdamW "
                              f"kernel for device {self.device.type!r}; set trainer.fused_adamw = false")
        return {"fused": True}

    def _apply_fused_flag(self) -> None:
        """A loaded optimizer state carries the ``fused`` flag it was saved with; this config's wins (the
        update is the same up to round-off), with the step counts where the fused kernel wants them."""
        fused = bool(self._fused())
        for group in self.opt.param_groups:
            group["fused"] = True if fused else None
            if fused:
                group["foreach"] = None
                for p in group["params"]:
                    st = self.opt.state.get(p, {})
                    if isinstance(st.get("step"), torch.Tensor):
                        st["step"] = st["step"].to(device=p.device, dtype=torch.float32)

    def _check_same_model(self, ck: dict, path) -> None:
        """Raise a one-line :class:`CheckpointError` when the checkpoint's weights do not fit this
        model, naming the config keys that differ (and the first weights whose shapes differ)
        instead of torch's list of every missing and unexpected state-dict key."""
        here, there = self.net.state_dict(), ck["model"]
        if not isinstance(there, dict):
            raise CheckpointError(f"checkpoint {path} holds no model weights (its 'model' entry is a "
                                  f"{type(there).__name__}); use a checkpoint written by diffkit train")
        missing = [k for k in here if k not in there]
        unexpected = [k for k in there if k not in here]
        shapes = [(k, tuple(there[k].shape), tuple(v.shape)) for k, v in here.items()
                  if k in there and isinstance(there[k], torch.Tensor) and tuple(there[k].shape) != tuple(v.shape)]
        if not (missing or unexpected or shapes):
            return
        stored = (ck.get("config") or {}) if isinstance(ck.get("config"), dict) else {}
        now = config_to_dict(self.cfg)
        diffs = []
        # the [model] keys first; only when they agree, the data (whose layout sets the channels)
        for section, prefixes in (("model", ("model.",)), ("data", ("data.adapter", "data.options."))):
            a, b = _flat(stored.get(section, {}), section), _flat(now.get(section, {}), section)
            diffs = [_differs(key, a.get(key, _UNSET), b.get(key, _UNSET)) for key in sorted(set(a) | set(b))
                     if key.startswith(prefixes) and a.get(key, _UNSET) != b.get(key, _UNSET)]
            if diffs:
                break
        weights = []
        if shapes:
            k, a, b = shapes[0]
            weights.append(f"{len(shapes)} weight(s) differ in shape, e.g. {k} is {list(a)} in the checkpoint "
                           f"and {list(b)} here")
        if missing:
            weights.append(f"{len(missing)} weight(s) of this model are not in the checkpoint, e.g. {missing[0]}")
        if unexpected:
            weights.append(f"{len(unexpected)} weight(s) of the checkpoint are not in this model, e.g. {unexpected[0]}")
        why = (f"the checkpoint was trained with {'; '.join(diffs)}" if diffs
               else "the checkpoint was trained with a different model")
        raise CheckpointError(
            f"cannot resume from {path}: {why} ({'; '.join(weights)}); resume with the checkpoint's config "
            f"(the config.toml beside its checkpoints/) or start a new run_dir without --resume")

    #: what a checkpoint written before a [loss] key existed trained with
    _LOSS_BEFORE_KEY = {"noise": "uniform_t"}

    def _keep_stored_loss(self, stored, path) -> None:
        """A resumed run keeps the loss it was trained with: a [loss] key left unset in this config
        takes the checkpoint's stored value (or, for a checkpoint older than the key, what training
        did then) instead of today's per-model default, so changed defaults never switch a run's
        objective half-way.  Keys set explicitly in this config win."""
        import dataclasses

        old = dict((stored or {}).get("loss") or {})
        changes = {}
        for key in ("weighting", "noise"):
            if getattr(self._given_loss, key) is not None:
                continue
            value = old.get(key) if key in old else self._LOSS_BEFORE_KEY.get(key)
            if value is not None and value != getattr(self.cfg.loss, key):
                changes[key] = value
        if changes:
            self.cfg = dataclasses.replace(self.cfg, loss=dataclasses.replace(self.cfg.loss, **changes))
            if self.dist.main:
                print(f"diffkit: keeping the stored loss settings of {path} for unset keys: "
                      + ", ".join(f"loss.{k} = {v!r}" for k, v in changes.items()))

    def save_checkpoint(self) -> Path | None:
        """Rank 0 writes the checkpoint (under FSDP every rank must call this: the weights are gathered)."""
        if self.fsdp:
            state = self.state_dict()
            return self.ckpts.save(self.step, state) if self.dist.main else None
        if not self.dist.main:
            return None
        return self.ckpts.save(self.step, self.state_dict())

    # -- data --------------------------------------------------------------------------
    def _batches(self):
        """Yield per-rank micro-batches forever, resuming at (epoch, batch_in_epoch)."""
        dl_kw = dict(batch_size=self.micro, num_workers=self.cfg.data.workers, drop_last=True,
                     pin_memory=self.device.type == "cuda", persistent_workers=False)
        while True:
            self.sampler.set_epoch(self.epoch)
            if hasattr(self.train_set, "set_epoch"):  # data drawn per epoch (window masks)
                self.train_set.set_epoch(self.epoch)
            self.sampler.set_start(self.batch_in_epoch * self.micro)
            # Its own generator: worker seeds must not consume the global RNG, whose state at a
            # resume point would otherwise differ from an uninterrupted run.
            g = torch.Generator().manual_seed(self.cfg.trainer.seed * 100003 + self.epoch)
            loader = DataLoader(self.train_set, sampler=self.sampler, generator=g, **dl_kw)
            for batch in loader:
                self.batch_in_epoch += 1
                yield batch
            self.epoch += 1
            self.batch_in_epoch = 0

    def _noise(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Noise level and noise for this rank's rows of the global micro-batch."""
        W, r, B = self.dist.world, self.dist.rank, x.shape[0]
        t = sample_times(self.model.schedule, W * B, continuous=self.cfg.loss.weighting == "vdm",
                         generator=self.noise_gen, device=self.device, noise=noise_distribution(self.cfg.loss))
        eps = torch.randn((W * B, *x.shape[1:]), generator=self.noise_gen, device=self.device, dtype=x.dtype)
        return t[r::W], eps[r::W]

    def _loss(self, x0, cond, weight, t=None, eps=None, model=None, check=True) -> torch.Tensor:
        """Per-sample loss; ``check=False`` skips the losses' NaN/inf check of ``x0`` (a host sync),
        which the training step replaces by its device-side watch."""
        lc = self.cfg.loss
        w = self._layout_weights
        if weight is not None:
            w = weight if w is None else w * weight
        p_uncond = lc.p_uncond if (self.layout.num_classes and cond.labels is not None) else 0.0
        ctx = torch.autocast(self.device.type, dtype=self.amp_dtype) if self.amp_dtype else contextlib.nullcontext()
        with ctx:
            if isinstance(model or self.model, Regressor):
                return regression_loss(model or self.model, x0, cond=cond if cond.given else None, weight=w,
                                       check=check)
            return diffusion_loss(model or self.model, x0, cond=cond if cond.given else None,
                                  weighting=lc.weighting, weight=w, gamma=lc.gamma, p_uncond=p_uncond,
                                  t=t, eps=eps, generator=self.noise_gen, noise=noise_distribution(lc),
                                  sigma_data=lc.sigma_data, check=check)

    # -- the loop ----------------------------------------------------------------------
    def fit(self) -> dict:
        tc = self.cfg.trainer
        log_path = self.run_dir / "metrics.jsonl"
        if self.dist.main:
            self.run_dir.mkdir(parents=True, exist_ok=True)
            dump_config(self.cfg, self.run_dir / "config.toml")
            if self._resumed:  # the steps after the checkpoint are logged again: no duplicate records
                _trim_metrics(log_path, self.step)
        self.stopped = None
        if self.dist.world > 1 and self.ddp is None:  # (a second fit())
            self._wrap_net()
        batches = self._batches()
        bar = None
        if self.progress:
            from tqdm.auto import tqdm

            bar = tqdm(total=tc.steps, initial=self.step, desc="training", unit="step", dynamic_ncols=True)
        old_handler = None
        if self.dist.main and threading_main():
            old_handler = signal.signal(signal.SIGINT, self._on_sigint)
        t_start, n_samples, last_log = time.time(), 0, time.time()
        last = {}
        every = self._check_interval()
        try:
            while self.step < tc.steps:
                # 0: go on, 1: the time budget is spent, 2: Ctrl-C (which wins: it is what the user did)
                stop = 2 if self._stop else \
                    int(tc.time_budget is not None and time.time() - t_start >= tc.time_budget)
                # all ranks stop at the same step, or the others hang in DDP's all-reduce; agreed at the
                # check steps only, whose host sync it shares
                if self.dist.world > 1 and self.step % every == 0:
                    stop = int(self._all_reduce(float(stop), torchdist.ReduceOp.MAX))
                elif self.dist.world > 1:
                    stop = 0
                if stop:
                    self.stopped = "interrupted" if stop == 2 else "time_budget"
                    break
                checked = self._check_due(self.step + 1, every)
                loss = self._train_step(batches, check=checked)  # (a device tensor: nothing waits for it)
                n_samples += self.cfg.data.batch_size
                log_now = self.step % tc.log_every == 0 or self.step == tc.steps
                if log_now and self.dist.world > 1:  # log the global batch's loss, not rank 0's share
                    loss = self._all_reduce(loss, torchdist.ReduceOp.SUM) / self.dist.world
                host = float(loss) if (log_now or checked) else None  # read once the device was waited for
                if self.dist.main and log_now:
                    now = time.time()
                    last = {"step": self.step, "loss": host, "lr": self.sched.get_last_lr()[0],
                            "samples_per_s": n_samples / max(now - last_log, 1e-9), "elapsed_s": now - t_start}
                    _append_jsonl(log_path, last)
                    n_samples, last_log = 0, now
                if bar is not None and host is not None:
                    bar.update(self.step - bar.n)
                    fd = bar.format_dict  # steps/s: tqdm's smoothed rate, else the mean so far
                    rate = fd.get("rate") or ((fd["n"] - fd.get("initial", 0)) / fd["elapsed"] if fd["elapsed"] else 0)
                    samples_s = f"{rate * self.cfg.data.batch_size:.0f}" if rate else "?"
                    # refresh=False: redrawn at tqdm's own pace, not every step
                    bar.set_postfix(loss=f"{host:.4f}", samples_s=samples_s, refresh=False)
                if tc.val_every and self.step % tc.val_every == 0:
                    v = self.validate()
                    if self.dist.main:
                        _append_jsonl(log_path, {"step": self.step, "val_loss": v})
                        last["val_loss"] = v
                if tc.snapshot_every and self.step % tc.snapshot_every == 0 and (self.dist.main or self.fsdp):
                    self.snapshot()  # (every rank samples a sharded EMA; rank 0 writes)
                if tc.ckpt_every and self.step % tc.ckpt_every == 0:
                    self.save_checkpoint()
                if self._stop and self.dist.world == 1:  # (several ranks: agreed at the top of the loop)
                    self.stopped = "interrupted"
                    break
            self._raise_if_diverged()  # the steps since the last check, before the final checkpoint
            if not (tc.ckpt_every and self.step % tc.ckpt_every == 0):
                self.save_checkpoint()
        finally:
            if bar is not None:
                bar.close()
            if old_handler is not None:
                signal.signal(signal.SIGINT, old_handler)
            self._unwrap_net()
        if self.dist.main and self.stopped == "interrupted":
            print(f"diffkit: interrupted at step {self.step}; checkpoint saved. Resume with --resume")
        elif self.dist.main and self.stopped == "time_budget":
            print(f"diffkit: time budget reached (trainer.time_budget = {tc.time_budget:g} s) at step "
                  f"{self.step} of {tc.steps}; checkpoint saved. Continue with --resume")
        out = {**last, "step": self.step}  # the step reached, not that of the last log record
        if self.stopped:
            out["stopped"] = self.stopped
        return out

    def _all_reduce(self, value, op) -> float:
        v = torch.as_tensor(value, dtype=torch.float64, device=self.device).reshape(1).clone()
        torchdist.all_reduce(v, op=op)
        return float(v)

    # -- the NaN/inf watch: a device-side record, read at the check steps only ----------------
    def _check_interval(self) -> int:
        """``trainer.check_every``; 0: every step on CPU (reading a value there costs no device sync),
        every ``trainer.log_every`` steps elsewhere (the log reads the loss anyway)."""
        tc = self.cfg.trainer
        return tc.check_every or (1 if self.device.type == "cpu" else tc.log_every)

    def _check_due(self, step: int, every: int) -> bool:
        """Whether ``step`` is checked before its optimizer update: every ``every`` steps, and every step
        that logs, validates, snapshots or checkpoints, so no output is ever written from a diverged model."""
        tc = self.cfg.trainer
        return any(n and step % n == 0 for n in (every, tc.log_every, tc.val_every, tc.snapshot_every,
                                                  tc.ckpt_every)) or step == tc.steps

    def _reset_watch(self) -> None:
        z = lambda v, dt: torch.full((), v, dtype=dt, device=self.device)  # noqa: E731
        self._bad_data = z(_NO_STEP, torch.int64)  # the first step whose batch held NaN or inf
        self._bad_step = z(_NO_STEP, torch.int64)  # the first step whose loss was not finite
        self._bad_loss = z(0.0, torch.float64)  # and that loss

    def _watch(self, step: int, total: torch.Tensor, data_ok: torch.Tensor) -> None:
        """Record, on the device (no host sync), the first step with non-finite data or loss."""
        first = ~torch.isfinite(total) & (self._bad_step == _NO_STEP)
        self._bad_loss = torch.where(first, total, self._bad_loss)
        self._bad_step = torch.where(first, step, self._bad_step)
        self._bad_data = torch.where(~data_ok & (self._bad_data == _NO_STEP), step, self._bad_data)

    def _raise_if_diverged(self) -> None:
        """Read the record (one host sync; under torchrun the earliest step of any rank) and raise
        :class:`TrainingDiverged` naming the first step whose batch or loss was not finite."""
        loss = self._bad_loss
        kind = torch.where(torch.isnan(loss), 1.0, torch.where(loss > 0, 2.0, 3.0)).double()  # nan, inf, -inf
        # -step (the max over ranks is the earliest step), and the loss's kind packed with its step
        rec = torch.stack([-self._bad_data.double(), kind - 4.0 * self._bad_step.double()])
        if self.dist.world > 1:
            torchdist.all_reduce(rec, op=torchdist.ReduceOp.MAX)
        neg_data, packed = (int(v) for v in rec.tolist())
        data, step = -neg_data, (3 - packed) // 4
        kind = packed + 4 * step
        if min(data, step) >= _NO_STEP:
            return
        if data <= step:
            raise TrainingDiverged(
                f"the training batch of step {data} holds NaN or inf values; the adapter must "
                f"fill missing values and mark them with a weight of 0. The last good checkpoint in "
                f"{self.ckpts.directory} is kept")
        raise TrainingDiverged(
            f"the loss became {('nan', 'inf', '-inf')[int(kind) - 1]} at step {step}; training stopped and the last "
            f"good checkpoint in {self.ckpts.directory} is kept. Lower trainer.lr, enable trainer.grad_clip, "
            f"or check the data for extreme values")

    def _on_sigint(self, signum, frame):
        if self._stop:  # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self._stop = True

    def _train_step(self, batches, check: bool = True) -> torch.Tensor:
        """One optimizer step; returns the loss as a 0-d float64 tensor on the device.  ``check``: read
        the NaN/inf record first (one host sync) and raise before the update if this or an earlier
        unchecked step diverged."""
        tc = self.cfg.trainer
        if not self.net.training:  # (.train() walks every module: ~0.1 ms a step)
            self.net.train()
        self.opt.zero_grad(set_to_none=True)
        total = torch.zeros((), dtype=torch.float64, device=self.device)
        data_ok = None
        for k in range(tc.grad_accum):
            x0, cond, weight = _collate_to(next(batches), self.device)
            ok = torch.isfinite(x0).all()
            data_ok = ok if data_ok is None else data_ok & ok
            t, eps = self._noise(x0)
            sync = contextlib.nullcontext()
            if self.ddp is not None and k < tc.grad_accum - 1:
                sync = self.ddp.no_sync()
            with sync:
                loss = self._loss(x0, cond, weight, t=t, eps=eps, check=False).mean() / tc.grad_accum
                loss.backward()
            total = total + loss.detach().double()  # float64, as the sum of Python floats it replaced
        self._watch(self.step + 1, total, data_ok)
        if check:
            self._raise_if_diverged()
        if tc.grad_clip is not None and self.fsdp:  # (the norm of sharded gradients: torch's, over all shards)
            torch.nn.utils.clip_grad_norm_(self._params, tc.grad_clip)
        elif tc.grad_clip is not None:
            self._clip_grad_norm(tc.grad_clip)
        self.opt.step()
        self.sched.step()
        self.step += 1
        self._update_ema()
        return total

    @torch.no_grad()
    def _clip_grad_norm(self, max_norm: float) -> None:
        """``clip_grad_norm_`` (same arithmetic, same result), but on CPU, where reading the
        coefficient costs no device sync, it skips the pass over the gradients when it is 1."""
        grads = [p.grad for p in self._params if p.grad is not None]
        if not grads:
            return
        norm = torch.linalg.vector_norm(torch.stack(torch._foreach_norm(grads)))
        coef = torch.clamp(max_norm / (norm + 1e-6), max=1.0)
        if self.device.type != "cpu" or not bool(coef >= 1.0):  # (a NaN norm still poisons the gradients)
            torch._foreach_mul_(grads, coef)

    @torch.no_grad()
    def _update_ema(self) -> None:
        tc = self.cfg.trainer
        d = tc.ema_decay
        if tc.ema_warmup:
            d = min(d, (1 + self.step) / (10 + self.step))
        ema, params = self._ema_params, self._params
        if self.fsdp:  # the EMA is sharded as the model is: each rank updates its own shards
            ema, params = [p.to_local() for p in ema], [p.to_local() for p in params]
        torch._foreach_lerp_(ema, params, 1.0 - d)
        for be, b in zip(self.ema.net.buffers(), self.net.buffers()):
            be.copy_(b)

    @torch.no_grad()
    def validate(self) -> float:
        """EMA loss on the validation split with fixed noise (comparable across steps), the noise
        levels drawn from the training distribution (so it estimates the training objective)."""
        if self.val_set is None or len(self.val_set) == 0:
            return float("nan")
        g = torch.Generator(device=self.device).manual_seed(12345)
        # every rank evaluates the same global micro-batches, so val_loss does not depend on the world size
        loader = DataLoader(self.val_set, batch_size=self.micro * self.dist.world, shuffle=False)
        tot, n = 0.0, 0
        for batch in itertools.islice(loader, self.cfg.trainer.val_batches):  # reads no batch beyond them
            x0, cond, weight = _collate_to(batch, self.device)
            t = sample_times(self.model.schedule, x0.shape[0], continuous=self.cfg.loss.weighting == "vdm",
                             generator=g, device=self.device, noise=noise_distribution(self.cfg.loss))
            eps = torch.randn(x0.shape, generator=g, device=self.device, dtype=x0.dtype)
            l = self._loss(x0, cond, weight, t=t, eps=eps, model=self.ema)
            tot += float(l.sum())
            n += l.shape[0]
        return tot / max(n, 1)

    @torch.no_grad()
    def snapshot(self) -> Path:
        """Sample with the EMA model and write through the adapter's decoder.

        A model conditioned on fields or scalars is given the conditions of the first
        ``sample.n`` validation items (training items without a validation split).
        """
        sc = self.cfg.sample
        g = torch.Generator(device=self.device).manual_seed(self.cfg.trainer.seed + 7)
        cond = None
        if self.layout.cond_channels or self.layout.scalars:
            items = self.val_set if self.val_set is not None and len(self.val_set) else self.train_set
            n = min(sc.n, len(items))
            batch = next(iter(DataLoader(items, batch_size=n, shuffle=False)))
            cond = _collate_to(batch, self.device)[1]
            cond = Cond(cond.fields, cond.scalars, None)
        n = sc.n if cond is None else (cond.fields if cond.fields is not None else cond.scalars).shape[0]
        labels = None
        if self.layout.num_classes:
            if cond is None:  # the same number per class, as `diffkit sample` draws by default
                n = class_balanced_count(n, self.layout.num_classes)
            labels = torch.arange(n, device=self.device) % self.layout.num_classes
            cond = Cond(None if cond is None else cond.fields, None if cond is None else cond.scalars, labels)
        if isinstance(self.ema, Regressor):
            x = self.ema(cond, n)
        else:
            from .sampling import sample

            x = sample(self.ema.bind(cond, sc.guidance if labels is not None else None), (n, *self.layout.sample_shape),
                       sampler=sc.sampler, nfe=sc.nfe, spacing=sc.spacing, generator=g, device=self.device)
        if not self.dist.main:
            return None
        out = self.run_dir / "snapshots" / f"step-{self.step:09d}.nc"
        from .adapters import decode_samples

        return decode_samples(type(self.adapter), x, self.layout, out, attrs={"step": self.step}, labels=labels)


_UNSET = object()
#: "no such step yet" in the trainer's device-side NaN/inf record
_NO_STEP = 2**40  # (times 4, still exact in float64)


def _flat(d, prefix: str) -> dict:
    """``{"model.options.hidden": 32, ...}`` from nested config dicts."""
    if not isinstance(d, dict):
        return {prefix: d}
    out = {}
    for k, v in d.items():
        out.update(_flat(v, f"{prefix}.{k}") if isinstance(v, dict) and v else {f"{prefix}.{k}": v})
    return out


def _differs(key: str, old, new) -> str:
    """``"model.channels=32, this config has 64"`` (a key set on one side only says so)."""
    def show(v):
        return json.dumps(v) if isinstance(v, str) else repr(v)

    if old is _UNSET:
        return f"{key} unset, this config has {key}={show(new)}"
    if new is _UNSET:
        return f"{key}={show(old)}, this config leaves it unset"
    return f"{key}={show(old)}, this config has {show(new)}"


def _check_run_dir(run_dir) -> Path:
    """The run directory as a Path, or a one-line error when it cannot be one: empty, a file,
    below a file, or holding a file named ``checkpoints``."""
    if run_dir is None or not str(run_dir).strip():
        raise ConfigError(f"run_dir is empty ({str(run_dir)!r}); set run_dir = \"runs/NAME\" in the config "
                          "or pass --run-dir NAME")
    path = Path(run_dir)
    if path.exists() and not path.is_dir():
        raise DiffkitError(f"run_dir {path} is a file, not a directory; choose another run_dir (--run-dir) "
                           "or move the file away")
    parent = next((p for p in path.parents if p.exists()), None)
    if not path.exists() and parent is not None and not parent.is_dir():
        raise DiffkitError(f"run_dir {path} cannot be created: {parent} is a file, not a directory; choose "
                           "another run_dir (--run-dir)")
    ck = path / "checkpoints"
    if ck.exists() and not ck.is_dir():
        raise DiffkitError(f"{ck} is a file, not a directory: the run's checkpoints go there; move the file "
                           "away or choose another run_dir (--run-dir)")
    return path


def _trim_metrics(path: Path, step: int) -> int:
    """Drop the records of ``metrics.jsonl`` after ``step`` (atomically); return how many.

    A run killed after its last checkpoint had logged the steps since; resumed from that
    checkpoint it logs them again, so without this they would appear twice.  A last line cut by
    the kill (no newline, not JSON) goes too.
    """
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        return 0
    lines = text.splitlines(keepends=True)
    keep = []
    for i, line in enumerate(lines):
        try:
            rec = json.loads(line)
        except ValueError:
            if i == len(lines) - 1 and not line.endswith("\n"):
                continue  # half a record: the process was killed while writing it
            keep.append(line)
            continue
        if isinstance(rec, dict) and isinstance(rec.get("step"), int) and rec["step"] > step:
            continue
        keep.append(line if line.endswith("\n") else line + "\n")
    if keep != lines:
        atomic_write(path, lambda f: f.write("".join(keep)))
    return len(lines) - len(keep)


def threading_main() -> bool:
    import threading

    return threading.current_thread() is threading.main_thread()


def _append_jsonl(path: Path, record: dict) -> None:
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        with open(path, "a") as f:
            f.write(json.dumps(record) + "\n")
    except OSError as e:
        full = _disk_full(e, path.parent)
        if full:
            raise DiffkitError(f"could not append to {path}: disk full ({full}); free some disk space and "
                               "resume with --resume") from e
        raise


def training_seconds(run_dir, fallback: float) -> float:
    """The wall time a run spent training: the last ``elapsed_s`` in its ``metrics.jsonl`` (a resumed
    run's includes the earlier sessions'), or ``fallback`` if the log is missing or has none."""
    try:
        text = (Path(run_dir) / "metrics.jsonl").read_text(encoding="utf-8")
        return max(float(r["elapsed_s"]) for r in map(json.loads, filter(str.strip, text.splitlines()))
                   if "elapsed_s" in r)
    except (OSError, ValueError):
        return fallback
