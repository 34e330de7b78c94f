"""Training-step overhead of diffkit's engine against a hand-written PyTorch loop.

Both loops train the *same* backbone (same weights, data, optimiser and random draws) with
the simple eps-loss.  The hand-written loop is what a user would write from Ho et al. 2020:
draw n ~ U{1..T}, x_t = sqrt(ab) x0 + sqrt(1 - ab) eps, MSE(net(x_t), eps).  The diffkit loop
calls :func:`diffkit.diffusion_loss` through a :class:`diffkit.Denoiser` (layout and
conditioning checks, float64 schedule arithmetic, finite-input check included).

Runs interleave (A B A B ...) so machine noise hits both alike; the median ratio is printed.
Target (issue 2): ratio <= 1.03.

Second section: the full :class:`diffkit.train.Trainer` (DataLoader, noise of the global
batch, EMA, gradient clipping, LR schedule, ``metrics.jsonl`` logging, progress bar; validation
off, checkpoints off -- the one-off cost of the final checkpoint is printed apart) against a
bare PyTorch loop over the same number of steps: the same network (the backbone the Trainer
builds from the config, from the same initial weights), the same data (the Trainer's dataset
tensors, shuffled each epoch by ``randperm``), AdamW with the same hyper-parameters, and the
same loss (:func:`diffkit.diffusion_loss` with the config's weighting, whose own overhead
the first section measures); the bare loop has no EMA, clipping, schedule, logging or bar.
Whole runs interleave (A B A B), median ratio; target <= 1.05.  A second estimate interleaves
single steps: a bare step is run before each step of one ``Trainer.fit()`` (and its time taken
out), so drift of a shared or throttled machine hits both sides alike -- on a busy 2-core box the
whole-run ratio wanders by +-5 %, this one by +-1 %.  Then each extra of the Trainer is timed
alone, and the throughput of the Trainer's DataLoader alone (batches iterated, nothing trained)
is set against the samples/s training consumes: with ``data.workers = 0`` loading runs on the
training thread, so that ratio must be large.

    python benchmarks/train_overhead.py                # both sections, 1 thread, CPU
    python benchmarks/train_overhead.py --backbone mlp --shape 2
    python benchmarks/train_overhead.py --only trainer --trainer-model unet
    python benchmarks/train_overhead.py --threads 2
"""
from __future__ import annotations

import argparse
import copy
import gc
import itertools
import shutil
import statistics
import tempfile
import time
from pathlib import Path

import torch

import diffkit as dk
from diffkit import registry
from diffkit.adapters import Adapter, _DictDataset  # the mixture's {'x': tensor} items


def build(args, device):
    shape = tuple(int(s) for s in args.shape.split("x"))
    C, spatial = shape[0], shape[1:]
    names = ("x", "y", "z")[: len(spatial)]
    layout = dk.Layout(channels=[f"c{i}" for i in range(C)], spatial=names, shape=spatial)
    opts = {"unet": dict(channels=args.width, channel_mult=(1, 2), num_res_blocks=1, attn_levels=()),
            "dit": dict(hidden=args.width, depth=2, num_heads=4, patch_size=4),
            "mlp": dict(hidden=args.width, depth=3)}[args.backbone]
    torch.manual_seed(0)
    net = registry.get("backbone", args.backbone)(layout, **opts).to(device)
    return layout, net


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--only", choices=["loss", "trainer"], default=None, help="run one section only")
    ap.add_argument("--threads", type=int, default=1, help="torch intra-op threads (default 1)")
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    g1 = ap.add_argument_group("section 1: diffusion_loss against a hand-written loss")
    g1.add_argument("--backbone", default="unet", choices=["unet", "dit", "mlp"])
    g1.add_argument("--shape", default="3x32x32", help="sample shape CxHxW..., e.g. 2 for vector data")
    g1.add_argument("--width", type=int, default=32)
    g1.add_argument("--batch", type=int, default=32)
    g1.add_argument("--steps", type=int, default=10, help="steps per timed run")
    g1.add_argument("--repeats", type=int, default=5)
    g2 = ap.add_argument_group("section 2: the Trainer against a bare loop")
    g2.add_argument("--trainer-model", default="mlp", choices=["mlp", "unet"],
                    help="mlp on the built-in mixture data, or a UNet on a synthetic 1x16x16 image set")
    g2.add_argument("--trainer-dim", type=int, default=2, help="mixture data dimension (mlp)")
    g2.add_argument("--trainer-hidden", type=int, default=256, help="MLP width / UNet channels")
    g2.add_argument("--trainer-depth", type=int, default=4, help="MLP depth")
    g2.add_argument("--trainer-n", type=int, default=20000, help="data set size")
    g2.add_argument("--trainer-batch", type=int, default=256, help="global batch size")
    g2.add_argument("--trainer-steps", type=int, default=100, help="optimizer steps per timed run")
    g2.add_argument("--trainer-repeats", type=int, default=5)
    g2.add_argument("--log-every", type=int, default=50, help="trainer.log_every (the config default)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    if args.only != "trainer":
        loss_section(args, device)
    if args.only != "loss":
        if args.only is None:
            print()
        trainer_section(args, device)


def loss_section(args, device):
    layout, net = build(args, device)
    schedule = dk.linear(1000)
    den = dk.Denoiser(net, schedule, "eps", layout)
    init_state = {k: v.clone() for k, v in net.state_dict().items()}
    g = torch.Generator().manual_seed(1)
    data = torch.randn(args.batch * 4, *layout.sample_shape, generator=g).to(device)
    ab_table = schedule.alpha_bar(schedule.discrete_times()).to(device=device, dtype=torch.float32)
    logsnr_table = (ab_table.log() - torch.log1p(-ab_table))

    def fresh_opt():
        net.load_state_dict(init_state)
        return torch.optim.AdamW(net.parameters(), lr=1e-4)

    def run_bare(steps):
        opt = fresh_opt()
        gen = torch.Generator(device=device).manual_seed(2)
        for i in range(steps):
            x0 = data[(i % 4) * args.batch:(i % 4 + 1) * args.batch]
            n = torch.randint(0, 1000, (x0.shape[0],), generator=gen, device=device)
            eps = torch.randn(x0.shape, generator=gen, device=device)
            ab = ab_table[n].view(-1, *([1] * (x0.ndim - 1)))
            xt = ab.sqrt() * x0 + (1 - ab).sqrt() * eps
            loss = ((net(xt, logsnr_table[n]) - eps) ** 2).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    def run_diffkit(steps):
        opt = fresh_opt()
        gen = torch.Generator(device=device).manual_seed(2)
        for i in range(steps):
            x0 = data[(i % 4) * args.batch:(i % 4 + 1) * args.batch]
            loss = dk.diffusion_loss(den, x0, generator=gen).mean()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
        return loss

    def timed(fn):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn(args.steps)
        if device.type == "cuda":
            torch.cuda.synchronize()
        return (time.perf_counter() - t0) / args.steps

    run_bare(2), run_diffkit(2)  # warm-up
    bare, dkit, ratios = _alternated(lambda: timed(run_bare), lambda: timed(run_diffkit), args.repeats)
    nparam = sum(p.numel() for p in net.parameters())
    print(f"backbone={args.backbone} params={nparam/1e6:.2f}M shape={layout.sample_shape} batch={args.batch} "
          f"device={device} threads={torch.get_num_threads()}")
    print(f"bare PyTorch loop : {statistics.median(bare)*1e3:8.2f} ms/step (median of {args.repeats})")
    print(f"diffkit engine    : {statistics.median(dkit)*1e3:8.2f} ms/step")
    r = statistics.median(ratios)
    print(f"ratio diffkit/bare: {r:.3f}  (per-run: {', '.join(f'{x:.3f}' for x in ratios)})  "
          f"target <= 1.03: {'PASS' if r <= 1.03 else 'FAIL'}")


def _alternated(bare, engine, repeats):
    """``repeats`` rounds of ``bare()`` then ``engine()`` (each returns its time), alternated so that load
    from elsewhere hits both alike: the bare times, the engine times and their per-round ratios."""
    b, e = [], []
    for _ in range(repeats):
        b.append(bare())
        e.append(engine())
    return b, e, [x / y for x, y in zip(e, b)]


# -- section 2: the full Trainer against a bare loop ---------------------------------------------
class SyntheticImages(Adapter):
    """Smooth random 1x16x16 fields (standardised), for the UNet variant."""

    name = "bench_images"

    def __init__(self, n, size=16):
        g = torch.Generator().manual_seed(0)
        z = torch.randn(n, 1, size // 4, size // 4, generator=g)
        x = torch.nn.functional.interpolate(z, size=(size, size), mode="bilinear", align_corners=False)
        self._x = (x - x.mean()) / x.std()
        self._layout = dk.Layout(channels=["u"], spatial=("y", "x"), shape=(size, size))

    @property
    def layout(self):
        return self._layout

    def dataset(self, split):
        return _DictDataset(self._x if split == "train" else self._x[:64])


def trainer_config(args, run_dir, steps):
    from diffkit.config import config_from_dict

    if args.trainer_model == "mlp":
        data = {"options": {"n": args.trainer_n, "dim": args.trainer_dim}}
        model = {"backbone": "mlp", "options": {"hidden": args.trainer_hidden, "depth": args.trainer_depth}}
    else:
        data = {}
        model = {"backbone": "unet", "options": {"channels": args.trainer_hidden, "channel_mult": [1, 2],
                                                 "num_res_blocks": 1, "attn_levels": []}}
    return config_from_dict({
        "run_dir": str(run_dir),
        "data": {**data, "batch_size": args.trainer_batch},
        "model": model,
        "trainer": {"steps": steps, "val_every": 0, "ckpt_every": 0, "log_every": args.log_every},
    }, source="benchmarks/train_overhead.py")


def trainer_section(args, device):
    tmp = Path(tempfile.mkdtemp(prefix="diffkit-bench-"))  # run directories (config, metrics.jsonl)
    try:
        _trainer_section(args, device, tmp)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def _trainer_section(args, device, tmp):
    from diffkit.train import Trainer, _collate_to

    adapter = SyntheticImages(args.trainer_n) if args.trainer_model == "unet" else None
    runs = itertools.count()

    def make_trainer(steps):
        cfg = trainer_config(args, tmp / f"run{next(runs)}", steps)
        t = Trainer(cfg, device=device, progress=True, adapter=adapter)
        t.save_checkpoint = lambda: None  # checkpoints off (the final one is timed apart below)
        return t

    template = make_trainer(args.trainer_steps)
    cfg, tc, lc = template.cfg, template.cfg.trainer, template.cfg.loss
    ds = template.train_set
    data = torch.stack([ds[i]["x"] for i in range(len(ds))]).to(device)
    B, N = cfg.data.batch_size, data.shape[0]
    den = copy.deepcopy(template.model)  # the Trainer's Denoiser (backbone built from the config)
    init_state = copy.deepcopy(den.net.state_dict())

    class BareLoop:
        """What a user would write: shuffle the tensor each epoch, loss, backward, AdamW."""

        def __init__(self):
            den.net.load_state_dict(init_state)
            den.net.train()
            self.opt = torch.optim.AdamW(den.net.parameters(), lr=tc.lr, betas=tuple(tc.betas),
                                         weight_decay=tc.weight_decay)
            self.gen = torch.Generator(device=device).manual_seed(tc.seed + 1)
            self.perm_gen = torch.Generator().manual_seed(tc.seed)
            self.perm, self.j = torch.randperm(N, generator=self.perm_gen), 0

        def step(self):
            if self.j + B > N:
                self.perm, self.j = torch.randperm(N, generator=self.perm_gen), 0
            x0 = data[self.perm[self.j:self.j + B].to(device)]
            self.j += B
            loss = dk.diffusion_loss(den, x0, weighting=lc.weighting, gamma=lc.gamma, generator=self.gen).mean()
            self.opt.zero_grad(set_to_none=True)
            loss.backward()
            self.opt.step()
            return loss

    def sync():
        if device.type == "cuda":
            torch.cuda.synchronize()

    def timed_bare(steps):
        loop = BareLoop()
        gc.collect()  # (both sides start without garbage from the set-up)
        sync()
        t0 = time.perf_counter()
        for _ in range(steps):
            loop.step()
        sync()
        return time.perf_counter() - t0

    def timed_trainer(steps):
        t = make_trainer(steps)
        gc.collect()
        sync()
        t0 = time.perf_counter()
        t.fit()
        sync()
        return time.perf_counter() - t0

    def timed_coupled(steps):
        """One Trainer.fit() with one bare step run before each of its steps: A B A B per step, so
        a busy or throttled machine slows both alike.  Returns (trainer time, bare time)."""
        t, loop, spent = make_trainer(steps), BareLoop(), [0.0]
        train_step = t._train_step

        def step(batches):
            sync()
            t0 = time.perf_counter()
            loop.step()
            sync()
            spent[0] += time.perf_counter() - t0
            return train_step(batches)

        t._train_step = step
        gc.collect()
        sync()
        t0 = time.perf_counter()
        t.fit()
        sync()
        return time.perf_counter() - t0 - spent[0], spent[0]

    S = args.trainer_steps
    timed_bare(3), timed_trainer(3)  # warm-up
    bare, trainer, ratios = _alternated(lambda: timed_bare(S), lambda: timed_trainer(S), args.trainer_repeats)
    coupled = [timed_coupled(S) for _ in range(args.trainer_repeats)]
    c_ratios = [t / b for t, b in coupled]
    nparam = sum(p.numel() for p in den.net.parameters())
    print(f"Trainer vs bare loop: backbone={cfg.model.backbone} params={nparam/1e6:.2f}M "
          f"sample={tuple(data.shape[1:])} batch={B} steps/run={S} device={device} threads={torch.get_num_threads()}")
    print(f"bare PyTorch loop : {statistics.median(bare)/S*1e3:8.2f} ms/step (median of {args.trainer_repeats})")
    print(f"diffkit Trainer   : {statistics.median(trainer)/S*1e3:8.2f} ms/step "
          f"(EMA, clip, LR schedule, metrics.jsonl every {tc.log_every}, progress bar)")
    r = statistics.median(ratios)
    print(f"ratio Trainer/bare: {r:.3f}  (runs interleaved A B A B; per-run: {', '.join(f'{x:.3f}' for x in ratios)})  "
          f"target <= 1.05: {'PASS' if r <= 1.05 else 'FAIL'}")
    rc = statistics.median(c_ratios)
    print(f"  step-interleaved: {rc:.3f}  (a bare step before every Trainer step inside fit(); per-run: "
          f"{', '.join(f'{x:.3f}' for x in c_ratios)})  target <= 1.05: {'PASS' if rc <= 1.05 else 'FAIL'}")

    # where the Trainer's extra time goes, per step (each part timed alone)
    t = make_trainer(S)
    K = 50

    def per_step(fn, k=K):
        sync()
        t0 = time.perf_counter()
        for _ in range(k):
            fn()
        sync()
        return (time.perf_counter() - t0) / k * 1e3

    batches = t._batches()
    for p in t.net.parameters():
        p.grad = torch.zeros_like(p)
    parts = {
        "data (DataLoader + to device)": per_step(lambda: _collate_to(next(batches), device)),
        "noise of the global batch": per_step(lambda: t._noise(data[:B])),
        "EMA update": per_step(t._update_ema),
        "gradient clipping": per_step(lambda: t._clip_grad_norm(tc.grad_clip)) if tc.grad_clip is not None else 0.0,
    }
    print("  per-step costs in the Trainer that the bare loop does not have (timed alone):")
    for k, v in parts.items():
        print(f"    {k:<30s} {v:6.3f} ms")
    t.step = S
    del t.save_checkpoint  # the real method again
    t0 = time.perf_counter()
    t.save_checkpoint()
    print(f"  one-off final checkpoint (not in the timed runs): {(time.perf_counter() - t0)*1e3:.1f} ms")

    # the DataLoader alone against what training consumes
    t = make_trainer(S)
    n_batches = max(200, 2 * len(ds) // B)  # at least two epochs (the loader is rebuilt every epoch)
    batches = t._batches()
    next(batches)
    t0 = time.perf_counter()
    n = 0
    for b in itertools.islice(batches, n_batches):
        n += b["x"].shape[0]
    load_rate = n / (time.perf_counter() - t0)
    train_rate = B * S / statistics.median(trainer)
    print(f"DataLoader alone  : {load_rate:12,.0f} samples/s ({n_batches} batches of {t.micro}, "
          f"workers={cfg.data.workers})")
    print(f"training consumes : {train_rate:12,.0f} samples/s")
    print(f"ratio loader/train: {load_rate / train_rate:.1f}x  (must be >> 1: "
          f"{'PASS' if load_rate / train_rate >= 10 else 'FAIL'} at >= 10x)")


if __name__ == "__main__":
    main()
