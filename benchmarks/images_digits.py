"""Class-conditional DDPM on scikit-learn's 8x8 digits: diffkit against diffusers, side by side.

The data is the ``images`` adapter's default source (``load_digits``: 1797 grey images of 8x8,
values 0..16, 10 classes).  One split, made once with a fixed seed, serves everything: the
adapter's ``train`` split trains both generative models *and* the classifier (the very same
tensors are handed to diffusers), and the adapter's ``val`` split is divided, stratified by
class, into a *validation* set (guidance is selected on it) and a *held-out test* set that no
generative model and no selection ever sees.

Scores, on the held-out set:

* a small CNN classifier, trained on the real training digits, reports its held-out accuracy;
* N samples per class are generated with classifier-free guidance and classified: accuracy =
  the fraction whose predicted class is the conditioning class (target >= 95 % with guidance),
  reported at every w of the guidance sweep, w = 1 (no guidance) included, with w* marked;
* Frechet distance (FD) between the classifier's penultimate features of the generated digits
  and of the held-out digits, and nearest-neighbour distances in pixel space.  The floor is the
  same distance between a class-balanced subset of the *training* digits of the same size and
  the held-out digits (mean over several subsets); ratios to the floor are reported.

Both sides train the same-shaped UNet (diffusers' ``UNet2DModel`` with ``num_class_embeds=11``,
scale-shift time conditioning and mid-block attention, against diffkit's ``unet`` with the same
levels, widths and blocks) on the same data with the same budget: optimiser steps, batch size,
AdamW learning rate with warm-up and cosine decay, gradient clipping, EMA decay, label dropout
``p_uncond`` (diffusers' null class is label 10, as diffkit's), cosine noise schedule,
v-prediction and min-SNR-5 weighting (diffusers: ``squaredcos_cap_v2``, ``v_prediction`` and
the min-SNR weights of its training examples).  Sampling uses the same sampler with the same
number of steps: DDIM (eta = 0, "trailing"/uniform time grid) by default, or ancestral DDPM.
Generated digits are decoded to the data's format (rounded to the integer grey levels 0..16,
as generated images are written as integers) before they are scored; the classifier never sees
anything else.

The guidance scale w* of each model is selected on the validation set (other noise seeds): the
smallest w of the sweep whose validation accuracy is within one percentage point of the sweep's
best.  The whole-run times are measured one model after the other; an interleaved section then
times training steps and guided sampling of both sides in alternation (A B A B), which the load
of a shared machine hits alike.

    OMP_NUM_THREADS=1 python benchmarks/images_digits.py --setting cpu --markdown docs/bench/images_digits.md
    OMP_NUM_THREADS=1 python benchmarks/images_digits.py --setting quick     # smoke test, < 1 min
    python benchmarks/images_digits.py --setting gpu --device cuda          # larger, unmeasured

``--workdir DIR`` keeps the trained models and samples there; a rerun reuses every finished
part (the classifier, both trained models, every generated sample set), keyed by the settings
that produced it.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

SETTINGS = {
    # data split, classifier, both generative models (same budget) and evaluation sizes
    "quick": dict(clf_epochs=12, channels=16, mult=(1, 2), res_blocks=1, steps=150, batch=32, lr=2e-3, warmup=15,
                  ema=0.99, nfe=8, per_class=10, val_per_class=5, guidance=(1.0, 3.0), floor_reps=2,
                  timing_rounds=2, timing_block=3),
    "cpu": dict(clf_epochs=40, channels=32, mult=(1, 2), res_blocks=1, steps=3000, batch=64, lr=1e-3, warmup=150,
                ema=0.999, nfe=25, per_class=100, val_per_class=30, guidance=(1.0, 1.5, 2.0, 3.0, 4.0), floor_reps=5,
                timing_rounds=7, timing_block=10),
    "gpu": dict(clf_epochs=40, channels=64, mult=(1, 2, 2), res_blocks=2, steps=20000, batch=128, lr=3e-4,
                warmup=500, ema=0.9995, nfe=50, per_class=100, val_per_class=50,
                guidance=(1.0, 1.25, 1.5, 2.0, 2.5, 3.0, 4.0), floor_reps=10, timing_rounds=7, timing_block=20),
}
#: fractions of all 1797 digits: held-out test and validation (the adapter's val split is their sum)
TEST_FRACTION, VAL_FRACTION = 0.25, 0.10
NUM_CLASSES, LEVELS = 10, 16  # digits 0..9; grey levels 0..16
P_UNCOND, SNR_GAMMA = 0.1, 5.0
TARGET = 0.95
SELECT_WITHIN = 0.01  # w*: the smallest w whose validation accuracy is within this of the best


# ------------------------------------------------------------------------------------------
# metrics
# ------------------------------------------------------------------------------------------
def feature_stats(f) -> tuple[np.ndarray, np.ndarray]:
    """Mean and covariance (ddof = 1) of features ``(n, d)``, in float64."""
    f = np.asarray(f, dtype=np.float64)
    if f.ndim != 2 or f.shape[0] < 2:
        raise ValueError(f"features must have shape (n >= 2, d), got {f.shape}")
    return f.mean(0), np.atleast_2d(np.cov(f, rowvar=False))


def frechet_from_stats(mu1, s1, mu2, s2) -> float:
    """Frechet distance between N(mu1, s1) and N(mu2, s2):
    ``|mu1 - mu2|^2 + tr(s1) + tr(s2) - 2 tr((s1 s2)^(1/2))``.

    ``tr((s1 s2)^(1/2))`` is computed as the sum of the square roots of the eigenvalues of the
    symmetric PSD matrix ``s1^(1/2) s2 s1^(1/2)`` (similar to ``s1 s2``): no non-symmetric
    matrix square root, no complex round-off.
    """
    mu1, mu2 = np.asarray(mu1, np.float64), np.asarray(mu2, np.float64)
    s1, s2 = np.atleast_2d(np.asarray(s1, np.float64)), np.atleast_2d(np.asarray(s2, np.float64))
    w, v = np.linalg.eigh((s1 + s1.T) / 2)
    r1 = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    m = r1 @ s2 @ r1
    ev = np.linalg.eigvalsh((m + m.T) / 2)
    tr_sqrt = float(np.sqrt(np.clip(ev, 0, None)).sum())
    d = float(((mu1 - mu2) ** 2).sum() + np.trace(s1) + np.trace(s2) - 2.0 * tr_sqrt)
    return max(d, 0.0)


def frechet_distance(a, b) -> float:
    """Frechet distance between the Gaussians fitted to two feature sets ``(n, d)``."""
    return frechet_from_stats(*feature_stats(a), *feature_stats(b))


def nn_distance(a: torch.Tensor, b: torch.Tensor) -> float:
    """Mean over the rows of ``a`` of the Euclidean distance to the nearest row of ``b``."""
    a, b = a.reshape(a.shape[0], -1).double(), b.reshape(b.shape[0], -1).double()
    return float(torch.cdist(a, b).min(1).values.mean())


# ------------------------------------------------------------------------------------------
# the classifier (held-out accuracy; its penultimate features for the Frechet distance)
# ------------------------------------------------------------------------------------------
class DigitCNN(nn.Module):
    """Three 3x3 convolutions, two max-pools, a 64-feature layer and the class head."""

    def __init__(self, width: int = 32, features: int = 64):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(1, width, 3, padding=1), nn.ReLU(),
            nn.Conv2d(width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),        # 4x4
            nn.Conv2d(2 * width, 2 * width, 3, padding=1), nn.ReLU(), nn.MaxPool2d(2),    # 2x2
            nn.Flatten(), nn.Linear(8 * width, features), nn.ReLU())
        self.drop = nn.Dropout(0.3)
        self.head = nn.Linear(features, NUM_CLASSES)

    def features(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(self.drop(self.body(x)))


def to_unit(px: torch.Tensor) -> torch.Tensor:
    """Grey levels 0..16 -> [-1, 1], the classifier's input."""
    return px.float() / (LEVELS / 2) - 1.0


def train_classifier(px: torch.Tensor, y: torch.Tensor, epochs: int, seed: int, device) -> DigitCNN:
    torch.manual_seed(seed)
    net = DigitCNN().to(device)
    opt = torch.optim.AdamW(net.parameters(), lr=2e-3, weight_decay=1e-3)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=2e-3, total_steps=epochs * (len(y) // 64) + 1)
    g = torch.Generator().manual_seed(seed)
    x = to_unit(px).to(device)
    y = y.to(device)
    net.train()
    for _ in range(epochs):
        perm = torch.randperm(len(y), generator=g).to(device)
        for i in range(0, len(y) - 63, 64):
            idx = perm[i:i + 64]
            loss = F.cross_entropy(net(x[idx]), y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            sched.step()
    return net.eval().requires_grad_(False)


@torch.no_grad()
def classify(net: DigitCNN, px: torch.Tensor, device) -> tuple[torch.Tensor, np.ndarray]:
    """Predicted classes and penultimate features of images given in grey levels."""
    preds, feats = [], []
    for chunk in px.split(1024):
        f = net.features(to_unit(chunk).to(device))
        preds.append(net.head(f).argmax(1).cpu())
        feats.append(f.double().cpu())
    return torch.cat(preds), torch.cat(feats).numpy()


# ------------------------------------------------------------------------------------------
# data: the images adapter's split, the held-out split of its val part
# ------------------------------------------------------------------------------------------
def _tensors(ds) -> tuple[torch.Tensor, torch.Tensor]:
    from torch.utils.data import DataLoader

    batch = next(iter(DataLoader(ds, batch_size=len(ds), shuffle=False)))
    return batch["x"].float(), batch["label"].long()


def stratified_split(y: torch.Tensor, fraction: float, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Indices ``(a, b)`` with ``b`` holding ``fraction`` of every class (seeded)."""
    g = torch.Generator().manual_seed(seed)
    a, b = [], []
    for c in range(NUM_CLASSES):
        idx = torch.nonzero(y == c).flatten()
        idx = idx[torch.randperm(len(idx), generator=g)]
        k = int(round(len(idx) * fraction))
        b.append(idx[:k])
        a.append(idx[k:])
    return torch.cat(a).sort().values, torch.cat(b).sort().values


def load_data(seed: int):
    """The adapter, the normalised training tensors, and the grey-level splits."""
    from diffkit import registry

    # the adapter's split is seeded and class-stratified; its val part is split again below
    adapter = registry.get("adapter", "images")(source="digits", val_fraction=TEST_FRACTION + VAL_FRACTION, seed=seed)
    layout = adapter.layout
    if layout.num_classes != NUM_CLASSES or tuple(layout.sample_shape) != (1, 8, 8):
        raise RuntimeError(f"the images adapter's digits layout is {layout}; expected 10 classes of 1x8x8")
    x_tr, y_tr = _tensors(adapter.dataset("train"))
    x_rest, y_rest = _tensors(adapter.dataset("val"))
    to_px = lambda x: layout.denormalize(x).round().clamp(0, LEVELS)
    i_val, i_test = stratified_split(y_rest, TEST_FRACTION / (TEST_FRACTION + VAL_FRACTION), seed)
    data = dict(adapter=adapter, layout=layout, x_train=x_tr, y_train=y_tr,
                px_train=to_px(x_tr), px_val=to_px(x_rest[i_val]), y_val=y_rest[i_val],
                px_test=to_px(x_rest[i_test]), y_test=y_rest[i_test])
    # the generative models see the normalised training tensors; the scores see grey levels
    err = float((layout.denormalize(x_tr) - data["px_train"]).abs().max())
    if err > 1e-3:
        raise RuntimeError(f"the adapter's denormalised digits are not integer grey levels (off by {err})")
    data["train_sha"] = hashlib.sha256(x_tr.numpy().tobytes() + y_tr.numpy().tobytes()).hexdigest()[:16]
    return data


def decode(x: torch.Tensor, layout) -> torch.Tensor:
    """Generated samples (normalised) -> the data's format, integer grey levels 0..16."""
    return layout.denormalize(x.detach().float().cpu()).round().clamp(0, LEVELS)


# ------------------------------------------------------------------------------------------
# the two models
# ------------------------------------------------------------------------------------------
def _key(d: dict) -> str:
    return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:10]


def train_settings(s: dict, seed: int) -> dict:
    return {k: s[k] for k in ("channels", "mult", "res_blocks", "steps", "batch", "lr", "warmup", "ema")} | \
        {"seed": seed, "p_uncond": P_UNCOND, "gamma": SNR_GAMMA}


def diffkit_config(s: dict, run_dir: Path, seed: int):
    from diffkit.config import config_from_dict

    return config_from_dict({
        "run_dir": str(run_dir),
        "data": {"adapter": "images", "batch_size": s["batch"], "val_fraction": TEST_FRACTION + VAL_FRACTION,
                 "options": {"source": "digits", "seed": seed}},
        "model": {"backbone": "unet", "parameterization": "v", "schedule": "cosine",
                  "options": {"channels": s["channels"], "channel_mult": list(s["mult"]),
                              "num_res_blocks": s["res_blocks"], "attn_levels": [], "mid_attn": True,
                              "groups": min(32, s["channels"])}},
        "loss": {"weighting": "min_snr", "gamma": SNR_GAMMA, "p_uncond": P_UNCOND},
        "trainer": {"steps": s["steps"], "lr": s["lr"], "warmup": s["warmup"], "seed": seed, "ema_decay": s["ema"],
                    "grad_clip": 1.0, "val_every": 0, "ckpt_every": 0, "log_every": 50},
    })


def _train_seconds(log: Path) -> float:
    rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
    return max(float(r["elapsed_s"]) for r in rows if "elapsed_s" in r)


def train_diffkit(data, s, work: Path, seed: int, device, progress: bool):
    from diffkit.train import Trainer

    cfg = diffkit_config(s, work / f"diffkit_{_key(train_settings(s, seed))}", seed)
    # the adapter instance of the benchmark: diffkit trains on exactly the tensors diffusers gets
    tr = Trainer(cfg, device=device, progress=progress, resume=True, adapter=data["adapter"])
    n_params = sum(p.numel() for p in tr.net.parameters())
    tr.fit()  # returns at once when the run in --workdir has finished
    den = tr.ema.eval().requires_grad_(False)
    return den, dict(params=n_params, train_s=_train_seconds(Path(cfg.run_dir) / "metrics.jsonl"), steps=tr.step)


def diffusers_unet(s: dict):
    from diffusers import UNet2DModel

    chans = tuple(s["channels"] * m for m in s["mult"])
    levels = len(chans)
    return UNet2DModel(
        sample_size=8, in_channels=1, out_channels=1, block_out_channels=chans, layers_per_block=s["res_blocks"],
        down_block_types=("DownBlock2D",) * levels, up_block_types=("UpBlock2D",) * levels,
        norm_num_groups=min(32, s["channels"]), attention_head_dim=chans[-1] // 4,  # 4 heads, as diffkit's
        resnet_time_scale_shift="scale_shift",  # FiLM scale and shift, as diffkit's residual blocks
        num_class_embeds=NUM_CLASSES + 1)       # label 10 = the null class of classifier-free guidance


def diffusers_scheduler():
    from diffusers import DDPMScheduler

    return DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2",
                         prediction_type="v_prediction", clip_sample=False)


class DiffusersLoop:
    """The usual diffusers training loop (as in its train_unconditional / text-to-image examples):
    AdamW, cosine schedule with warm-up, gradient clipping, ``EMAModel``, min-SNR-weighted v-loss,
    label dropout to the null class 10."""

    def __init__(self, data, s: dict, seed: int, device):
        from diffusers.optimization import get_cosine_schedule_with_warmup
        from diffusers.training_utils import EMAModel
        from torch.utils.data import TensorDataset

        torch.manual_seed(seed)
        self.device, self.B = device, s["batch"]
        self.net = diffusers_unet(s).to(device)
        self.sched = diffusers_scheduler()
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=s["lr"], betas=(0.9, 0.999), weight_decay=0.0)
        self.lr_sched = get_cosine_schedule_with_warmup(self.opt, s["warmup"], s["steps"])
        self.ema = EMAModel(self.net.parameters(), decay=s["ema"], foreach=True)
        self.g = torch.Generator().manual_seed(seed + 1)
        self.loader_g = torch.Generator().manual_seed(seed)
        self.ds = TensorDataset(data["x_train"], data["y_train"])

    def batches(self):
        from torch.utils.data import DataLoader

        while True:
            yield from DataLoader(self.ds, batch_size=self.B, shuffle=True, drop_last=True, generator=self.loader_g)

    def step(self, batch) -> torch.Tensor:
        from diffusers.training_utils import compute_snr

        net, sched, B, g, dev = self.net, self.sched, self.B, self.g, self.device
        net.train()
        x0, y = batch[0].to(dev), batch[1].to(dev)
        drop = (torch.rand(B, generator=g) < P_UNCOND).to(dev)
        y = torch.where(drop, torch.full_like(y, NUM_CLASSES), y)
        noise = torch.randn(x0.shape, generator=g).to(dev)
        t = torch.randint(0, sched.config.num_train_timesteps, (B,), generator=g).to(dev)
        pred = net(sched.add_noise(x0, noise, t), t, class_labels=y).sample
        target = sched.get_velocity(x0, noise, t)
        snr = compute_snr(sched, t)
        w = torch.clamp(snr, max=SNR_GAMMA) / (snr + 1)  # min-SNR-gamma for v-prediction
        loss = (F.mse_loss(pred.float(), target.float(), reduction="none").mean(dim=(1, 2, 3)) * w).mean()
        self.opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(net.parameters(), 1.0)
        self.opt.step()
        self.lr_sched.step()
        self.ema.step(net.parameters())
        return loss.detach()


def train_diffusers(data, s, work: Path, seed: int, device, progress: bool):
    path = work / f"diffusers_{_key(train_settings(s, seed))}" / "model.pt"
    loop = DiffusersLoop(data, s, seed, device)
    net, sched = loop.net, loop.sched
    n_params = sum(p.numel() for p in net.parameters())
    if path.exists():
        ck = torch.load(path, map_location=device, weights_only=True)
        net.load_state_dict(ck["ema"])
        return net.eval().requires_grad_(False), sched, dict(params=n_params, train_s=ck["train_s"], steps=ck["steps"])
    bar = None
    if progress:
        from tqdm.auto import tqdm

        bar = tqdm(total=s["steps"], desc="diffusers training", unit="step", dynamic_ncols=True)
    step, t0 = 0, time.time()
    for batch in loop.batches():
        loss = loop.step(batch)
        step += 1
        if bar is not None:
            bar.update(1)
            if step % 50 == 0:
                bar.set_postfix(loss=f"{float(loss):.4f}", refresh=False)
        if step >= s["steps"]:
            break
    train_s = time.time() - t0
    if bar is not None:
        bar.close()
    loop.ema.copy_to(net.parameters())
    path.parent.mkdir(parents=True, exist_ok=True)
    torch.save({"ema": net.state_dict(), "train_s": train_s, "steps": step}, path)
    return net.eval().requires_grad_(False), sched, dict(params=n_params, train_s=train_s, steps=step)


def interleaved_timing(data, s: dict, models: dict, work: Path, seed: int, sampler: str, device,
                       rounds: int, block: int, w: float) -> dict:
    """Per-step training time and guided sampling time of both sides, measured in alternation
    (A B A B ...), so that the load of a shared machine hits both alike; medians over rounds.

    Training: ``block`` steps of a fresh diffkit Trainer (its own step, as ``fit()`` runs it) against
    ``block`` steps of the diffusers loop.  Sampling: 10 digits per class with the trained models,
    without guidance and at guidance ``w``."""
    import tempfile as _tf

    from diffkit.train import Trainer

    with _tf.TemporaryDirectory(dir=work) as d:
        tr = Trainer(diffkit_config(s, Path(d) / "dk", seed), device=device, progress=False,
                     adapter=data["adapter"])
        dk_batches = tr._batches()
        loop = DiffusersLoop(data, s, seed, device)
        df_batches = loop.batches()

        sync = torch.cuda.synchronize if torch.device(device).type == "cuda" else (lambda: None)

        def dk_step():
            tr._train_step(dk_batches)
            sync()

        def df_step():
            loop.step(next(df_batches))
            sync()

        lab = balanced_labels(10)
        den, (net, sched) = models["diffkit"], models["diffusers"]
        sides = {"train": (dk_step, df_step)}
        for key, ww in (("sample_w1", 1.0), ("sample", w)):
            sides[key] = (lambda ww=ww: sample_diffkit(den, lab, ww, s["nfe"], sampler, seed, device),
                          lambda ww=ww: sample_diffusers(net, sched, lab, ww, s["nfe"], sampler, seed, device))
        out = {}
        for what, (fa, fb) in sides.items():
            fa(), fb()  # warm-up
            ta, tb = [], []
            n = block if what == "train" else 1
            for _ in range(rounds):
                for f, acc in ((fa, ta), (fb, tb)):
                    t0 = time.perf_counter()
                    for _ in range(n):
                        f()
                    acc.append((time.perf_counter() - t0) / n)
            ma, mb = float(np.median(ta)), float(np.median(tb))
            out[what] = dict(diffkit_s=ma, diffusers_s=mb, ratio=ma / mb,
                             ratio_of_min=float(min(ta) / min(tb)), rounds=rounds, per_round=n)
        out["sample"]["w"], out["sample_w1"]["w"] = w, 1.0
        out["sample"]["n"] = out["sample_w1"]["n"] = len(lab)
        return out


@torch.no_grad()
def sample_diffkit(den, labels: torch.Tensor, w: float, nfe: int, sampler: str, seed: int, device) -> torch.Tensor:
    import diffkit as dk

    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for lab in labels.split(500):
        lab = lab.to(device)
        bound = den.bind(dk.Cond(labels=lab), None if w == 1 else w)
        out.append(dk.sample(bound, (len(lab), 1, 8, 8), sampler=sampler, nfe=nfe, spacing="uniform",
                             generator=g, device=device).cpu())
    return torch.cat(out)


@torch.no_grad()
def sample_diffusers(net, train_sched, labels: torch.Tensor, w: float, nfe: int, sampler: str, seed: int,
                     device) -> torch.Tensor:
    from diffusers import DDIMScheduler, DDPMScheduler

    cls = DDIMScheduler if sampler == "ddim" else DDPMScheduler
    sch = cls.from_config(train_sched.config, timestep_spacing="trailing")  # = diffkit's uniform grid
    g = torch.Generator(device=device).manual_seed(seed)
    out = []
    for lab in labels.split(500):
        lab = lab.to(device)
        null = torch.full_like(lab, NUM_CLASSES)
        x = torch.randn((len(lab), 1, 8, 8), generator=g, device=device)
        sch.set_timesteps(nfe)
        for t in sch.timesteps:
            if w == 1:
                o = net(x, t, class_labels=lab).sample
            else:  # classifier-free guidance, both halves in one batch
                o_c, o_u = net(torch.cat([x, x]), t, class_labels=torch.cat([lab, null])).sample.chunk(2)
                o = o_u + w * (o_c - o_u)
            x = sch.step(o, t, x, generator=g).prev_sample
        out.append(x.cpu())
    return torch.cat(out)


# ------------------------------------------------------------------------------------------
# scoring
# ------------------------------------------------------------------------------------------
def balanced_labels(per_class: int) -> torch.Tensor:
    return torch.arange(NUM_CLASSES).repeat_interleave(per_class)


def score(clf, px: torch.Tensor, labels: torch.Tensor, ref_px: torch.Tensor, ref_feat: np.ndarray,
          train_px: torch.Tensor, device) -> dict:
    pred, feat = classify(clf, px, device)
    hit = (pred == labels).double()
    per_class = [float(hit[labels == c].mean()) for c in range(NUM_CLASSES)]
    return dict(accuracy=float(hit.mean()), accuracy_se=float(hit.std() / math.sqrt(len(hit))),
                min_class_accuracy=min(per_class), per_class_accuracy=per_class,
                fd=frechet_distance(feat, ref_feat),
                nn_gen_to_ref=nn_distance(px, ref_px), nn_ref_to_gen=nn_distance(ref_px, px),
                nn_gen_to_train=nn_distance(px, train_px))


def floor(clf, data, ref_px: torch.Tensor, ref_feat: np.ndarray, per_class: int, reps: int, seed: int, device) -> dict:
    """The same distances between class-balanced subsets of the training digits (the size of a
    generated set) and the reference set; mean and standard deviation over ``reps`` subsets."""
    g = torch.Generator().manual_seed(seed)
    y, px = data["y_train"], data["px_train"]
    rows = []
    for _ in range(reps):
        idx = torch.cat([torch.nonzero(y == c).flatten()[torch.randperm(int((y == c).sum()), generator=g)[:per_class]]
                         for c in range(NUM_CLASSES)])
        sub = px[idx]
        _, feat = classify(clf, sub, device)
        rows.append(dict(fd=frechet_distance(feat, ref_feat), nn_gen_to_ref=nn_distance(sub, ref_px),
                         nn_ref_to_gen=nn_distance(ref_px, sub)))
    out = {k: float(np.mean([r[k] for r in rows])) for k in rows[0]}
    out.update({f"{k}_sd": float(np.std([r[k] for r in rows], ddof=1)) if reps > 1 else float("nan")
                for k in rows[0]})
    # memorisation reference: a held-out real digit's distance to its nearest training digit
    out["nn_ref_to_train"] = nn_distance(ref_px, px)
    return out


def with_ratios(sc: dict, fl: dict) -> dict:
    sc = dict(sc)
    sc["fd_ratio"] = sc["fd"] / fl["fd"]
    sc["nn_gen_to_ref_ratio"] = sc["nn_gen_to_ref"] / fl["nn_gen_to_ref"]
    sc["nn_ref_to_gen_ratio"] = sc["nn_ref_to_gen"] / fl["nn_ref_to_gen"]
    sc["nn_gen_to_train_ratio"] = sc["nn_gen_to_train"] / fl["nn_ref_to_train"]
    return sc


def select_guidance(sweep: list[dict]) -> float:
    best = max(r["accuracy"] for r in sweep)
    return min(r["w"] for r in sweep if r["accuracy"] >= best - SELECT_WITHIN - 1e-12)


# ------------------------------------------------------------------------------------------
def _shown_argv(argv: list[str]) -> str:
    """The command line without the options that do not change the results (where files go, bars)."""
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a in ("--workdir", "--json"):
            skip = True
        elif not (a == "--no-progress" or a.startswith(("--workdir=", "--json="))):
            out.append(a)
    return " ".join(out)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="cpu")
    ap.add_argument("--steps", type=int, default=None, help="optimiser steps per model (default: the setting's)")
    ap.add_argument("--nfe", type=int, default=None, help="sampler steps (network calls; x2 batch with guidance)")
    ap.add_argument("--sampler", choices=["ddim", "ddpm"], default="ddim",
                    help="the same sampler on both sides: DDIM eta=0 (DDIMScheduler) or ancestral DDPM (DDPMScheduler)")
    ap.add_argument("--guidance", default=None, help="comma-separated guidance sweep (default: the setting's)")
    ap.add_argument("--per-class", type=int, default=None, help="generated held-out samples per class")
    ap.add_argument("--only", choices=["diffkit", "diffusers"], default=None, help="run one side only")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default="cpu")
    ap.add_argument("--workdir", default=None, help="keep models and samples here (default: a temporary folder)")
    ap.add_argument("--markdown", default=None, help="write the result table here")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    s = dict(SETTINGS[args.setting])
    if args.steps:
        s["steps"] = args.steps
    if args.nfe:
        s["nfe"] = args.nfe
    if args.guidance:
        s["guidance"] = tuple(float(v) for v in args.guidance.split(","))
    if args.per_class:
        s["per_class"] = args.per_class
    if 1.0 not in s["guidance"]:
        s["guidance"] = (1.0, *s["guidance"])  # w = 1 (no guidance) is always reported
    progress = not args.no_progress
    device = torch.device(args.device)

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    data = load_data(args.seed)
    min_count = min(int((data["y_train"] == c).sum()) for c in range(NUM_CLASSES))
    s["per_class"] = min(s["per_class"], min_count)  # the floor needs as many training digits per class
    s["val_per_class"] = min(s["val_per_class"], min_count)
    res: dict = {"argv": _shown_argv(sys.argv[1:] if argv is None else argv), "setting": args.setting, "sizes": s,
                 "sampler": args.sampler, "seed": args.seed, "threads": torch.get_num_threads(),
                 "torch": torch.__version__,
                 "data": dict(n_train=len(data["y_train"]), n_val=len(data["y_val"]), n_test=len(data["y_test"]),
                              train_sha=data["train_sha"])}
    import diffusers

    res["diffusers"] = diffusers.__version__
    print(f"data: {res['data']['n_train']} training digits (sha {data['train_sha']}, the same tensors for both "
          f"models), {res['data']['n_val']} validation, {res['data']['n_test']} held-out", flush=True)

    # -- the classifier -------------------------------------------------------------------
    t0 = time.time()
    cpath = work / f"classifier_{_key({'epochs': s['clf_epochs'], 'seed': args.seed, 'sha': data['train_sha']})}.pt"
    clf = DigitCNN().to(device)
    if cpath.exists():
        clf.load_state_dict(torch.load(cpath, map_location=device, weights_only=True))
        clf.eval().requires_grad_(False)
    else:
        clf = train_classifier(data["px_train"], data["y_train"], s["clf_epochs"], args.seed, device)
        torch.save(clf.state_dict(), cpath)
    acc = lambda px, y: float((classify(clf, px, device)[0] == y).double().mean())
    res["classifier"] = dict(test_accuracy=acc(data["px_test"], data["y_test"]),
                             val_accuracy=acc(data["px_val"], data["y_val"]),
                             train_accuracy=acc(data["px_train"], data["y_train"]), seconds=time.time() - t0)
    print(f"classifier: held-out accuracy {res['classifier']['test_accuracy']:.4f} (validation "
          f"{res['classifier']['val_accuracy']:.4f}, train {res['classifier']['train_accuracy']:.4f})", flush=True)
    _, feat_test = classify(clf, data["px_test"], device)
    _, feat_val = classify(clf, data["px_val"], device)
    res["floor"] = dict(
        test=floor(clf, data, data["px_test"], feat_test, s["per_class"], s["floor_reps"], args.seed + 11, device),
        val=floor(clf, data, data["px_val"], feat_val, s["val_per_class"], s["floor_reps"], args.seed + 12, device))
    ft = res["floor"]["test"]
    print(f"floor (training digits vs held-out, {s['per_class']} per class): FD {ft['fd']:.3f} +- {ft['fd_sd']:.3f}",
          flush=True)

    # -- the two models -------------------------------------------------------------------
    sides = [m for m in ("diffkit", "diffusers") if args.only in (None, m)]
    res["models"], trained = {}, {}
    for name in sides:
        t0 = time.time()
        if name == "diffkit":
            den, info = train_diffkit(data, s, work, args.seed, device, progress)
            trained[name] = den
            gen = lambda lab, w, seed: sample_diffkit(den, lab, w, s["nfe"], args.sampler, seed, device)
        else:
            net, sched, info = train_diffusers(data, s, work, args.seed, device, progress)
            trained[name] = (net, sched)
            gen = lambda lab, w, seed: sample_diffusers(net, sched, lab, w, s["nfe"], args.sampler, seed, device)
        mkey = _key(train_settings(s, args.seed))
        print(f"{name}: {info['params'] / 1e6:.3f} M parameters, {info['steps']} steps of batch {s['batch']} in "
              f"{info['train_s']:.0f} s", flush=True)

        def generate(split: str, per_class: int, w: float, seed: int):
            """Samples (grey levels) and their generation time; cached in --workdir."""
            f = work / "samples" / f"{name}_{mkey}_{split}_{args.sampler}{s['nfe']}_w{w:g}_n{per_class}_s{seed}.pt"
            if f.exists():
                ck = torch.load(f, weights_only=True)
                return ck["px"], ck["seconds"]
            lab = balanced_labels(per_class)
            t1 = time.time()
            x = gen(lab, w, seed)
            sec = time.time() - t1
            f.parent.mkdir(parents=True, exist_ok=True)
            px = decode(x, data["layout"])
            torch.save({"px": px, "seconds": sec}, f)
            return px, sec

        # guidance sweep on the validation set (other noise seeds than the held-out evaluation)
        sweep = []
        for w in s["guidance"]:
            lab = balanced_labels(s["val_per_class"])
            px, sec = generate("val", s["val_per_class"], w, args.seed + 1000)
            sc = with_ratios(score(clf, px, lab, data["px_val"], feat_val, data["px_train"], device),
                             res["floor"]["val"])
            sweep.append(dict(w=w, seconds=sec, **sc))
            print(f"  validation w={w:g}: accuracy {sc['accuracy']:.3f}, FD {sc['fd']:.3f} "
                  f"({sc['fd_ratio']:.2f}x floor)", flush=True)
        w_star = select_guidance(sweep)
        # held-out scores at every w of the sweep (w* was chosen above, on the validation set)
        by_w = []
        lab = balanced_labels(s["per_class"])
        for w in s["guidance"]:
            px, sec = generate("test", s["per_class"], w, args.seed + 2000)
            sc = with_ratios(score(clf, px, lab, data["px_test"], feat_test, data["px_train"], device),
                             res["floor"]["test"])
            by_w.append(dict(w=w, seconds=sec, samples_per_s=len(lab) / sec, **sc))
            print(f"  held-out w={w:g}{' (w*)' if w == w_star else ''}: accuracy {sc['accuracy']:.4f} +- "
                  f"{sc['accuracy_se']:.4f}, FD {sc['fd']:.3f} ({sc['fd_ratio']:.2f}x floor), {len(lab)} samples in "
                  f"{sec:.1f} s", flush=True)
        at = {r["w"]: r for r in by_w}
        test = {"w1": at[1.0], "wstar": at[w_star], "by_w": by_w}
        res["models"][name] = dict(**info, ms_per_step=1e3 * info["train_s"] / max(info["steps"], 1),
                                   sweep=sweep, w_star=w_star, test=test, wall_s=time.time() - t0)

    # -- side by side ---------------------------------------------------------------------
    if len(sides) == 2:
        w_t = next((w for w in s["guidance"] if w != 1), 1.0)
        res["interleaved"] = interleaved_timing(data, s, trained, work, args.seed, args.sampler, device,
                                                s["timing_rounds"], s["timing_block"], w_t)
        it = res["interleaved"]
        print(f"interleaved timing: training {1e3 * it['train']['diffkit_s']:.1f} vs "
              f"{1e3 * it['train']['diffusers_s']:.1f} ms/step (diffkit/diffusers {it['train']['ratio']:.2f}); sampling "
              f"{it['sample']['n']} digits at w=1: {it['sample_w1']['diffkit_s']:.2f} vs "
              f"{it['sample_w1']['diffusers_s']:.2f} s ({it['sample_w1']['ratio']:.2f}), at w={w_t:g}: "
              f"{it['sample']['diffkit_s']:.2f} vs {it['sample']['diffusers_s']:.2f} s ({it['sample']['ratio']:.2f})",
              flush=True)
        a, b = res["models"]["diffkit"], res["models"]["diffusers"]
        res["ratios"] = dict(
            params=a["params"] / b["params"], train_s=a["train_s"] / b["train_s"],
            ms_per_step=a["ms_per_step"] / b["ms_per_step"],
            sample_s_w1=a["test"]["w1"]["seconds"] / b["test"]["w1"]["seconds"],
            sample_s_guided=sum(r["seconds"] for r in a["test"]["by_w"] if r["w"] != 1)
            / max(sum(r["seconds"] for r in b["test"]["by_w"] if r["w"] != 1), 1e-9),
            **{f"fd_{t}": a["test"][t]["fd"] / b["test"][t]["fd"] for t in ("w1", "wstar")})
    res["target"] = {m: dict(accuracy=r["test"]["wstar"]["accuracy"], met=r["test"]["wstar"]["accuracy"] >= TARGET,
                             min_guided=min((x["accuracy"] for x in r["test"]["by_w"] if x["w"] > 1), default=None))
                     for m, r in res["models"].items()}
    res["wall_s"] = time.time() - t_all
    for m, t in res["target"].items():
        guided = "" if t["min_guided"] is None else f"; at every w > 1 of the sweep >= {t['min_guided']:.4f}"
        print(f"{m}: held-out accuracy at w*={res['models'][m]['w_star']:g}: {t['accuracy']:.4f} "
              f"(target >= {TARGET}: {'met' if t['met'] else 'not met'}){guided}")
    if "ratios" in res:
        r = res["ratios"]
        print(f"diffkit / diffusers: parameters {r['params']:.3f}, training time {r['train_s']:.2f}, sampling time "
              f"(w=1) {r['sample_s_w1']:.2f}, FD(w=1) {r['fd_w1']:.2f}, FD(w*) {r['fd_wstar']:.2f}")
    print(f"total {res['wall_s'] / 60:.1f} min", flush=True)
    if args.json:
        _write(Path(args.json), json.dumps(res, indent=1))
    if args.markdown:
        write_markdown(res, Path(args.markdown))
    if tmp is not None:
        tmp.cleanup()
    return res


def _write(path: Path, text: str) -> None:
    from diffkit._io import atomic_write

    atomic_write(path, lambda f: f.write(text))


def write_markdown(res: dict, path: Path) -> None:
    s, fl, d = res["sizes"], res["floor"]["test"], res["data"]
    models = res["models"]
    n_gen = NUM_CLASSES * s["per_class"]
    lines = [
        f"# Class-conditional digits: diffkit vs diffusers (`--setting {res['setting']}`)", "",
        f"Command: `OMP_NUM_THREADS=1 python benchmarks/images_digits.py {res['argv']}`  ",
        f"Total wall time: {res['wall_s'] / 60:.1f} min ({res['threads']} torch thread(s), torch {res['torch']}, "
        f"diffusers {res['diffusers']}).", "",
        f"Data: scikit-learn's `load_digits` through the `images` adapter (8x8, grey levels 0..16, 10 classes): "
        f"{d['n_train']} training digits (both models and the classifier; sha256 {d['train_sha']}), {d['n_val']} "
        f"validation digits (guidance selection), {d['n_test']} held-out digits (the scores below).", "",
        f"Both models: UNet with widths {[s['channels'] * m for m in s['mult']]}, {s['res_blocks']} residual "
        f"block(s) per level, attention in the middle block; {s['steps']} AdamW steps of batch {s['batch']}, lr "
        f"{s['lr']} ({s['warmup']} warm-up steps, cosine decay), gradient clipping 1, EMA {s['ema']}; cosine noise "
        f"schedule, v-prediction, min-SNR-{SNR_GAMMA:g} weighting, label dropout p_uncond = {P_UNCOND}.  Sampler: "
        f"{res['sampler'].upper()} with {s['nfe']} steps on both sides (classifier-free guidance doubles the batch). "
        f"{s['per_class']} samples per class ({n_gen}) on the held-out set; the guidance sweep uses "
        f"{s['val_per_class']} per class on the validation set, other noise.", "",
        f"Classifier (CNN, trained on the training digits): held-out accuracy "
        f"**{res['classifier']['test_accuracy']:.4f}** (validation {res['classifier']['val_accuracy']:.4f}).", "",
        f"Floor: class-balanced subsets of the training digits ({n_gen} digits, {s['floor_reps']} subsets) against "
        f"the held-out digits: FD {fl['fd']:.3f} ± {fl['fd_sd']:.3f} (sd over subsets); nearest-neighbour distance "
        f"(grey levels, L2 over 64 pixels) train→held-out {fl['nn_gen_to_ref']:.2f}, held-out→train "
        f"{fl['nn_ref_to_gen']:.2f}; a held-out digit's distance to its nearest training digit "
        f"{fl['nn_ref_to_train']:.2f}.", "",
        "## Held-out scores", "",
        "| model | params | train s | guidance w | accuracy | min class acc. | FD | FD / floor | NN gen→held-out / floor "
        "| NN held-out→gen / floor | NN gen→train / (held-out→train) | sampling s |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for m, r in models.items():
        for t in r["test"]["by_w"]:
            star = t["w"] == r["w_star"]
            label = ("1 (none)" if t["w"] == 1 else f"{t['w']:g}") + (" = **w\\***" if star else "")
            acc = f"{t['accuracy']:.4f} ± {t['accuracy_se']:.4f}"
            lines.append(f"| {m} | {r['params'] / 1e6:.3f} M | {r['train_s']:.0f} | {label} | "
                         f"{'**' + acc + '**' if star else acc} | {t['min_class_accuracy']:.3f} | "
                         f"{t['fd']:.3f} | {t['fd_ratio']:.2f} | {t['nn_gen_to_ref_ratio']:.2f} | "
                         f"{t['nn_ref_to_gen_ratio']:.2f} | {t['nn_gen_to_train_ratio']:.2f} | {t['seconds']:.1f} |")
    lines += ["", f"Accuracy ± its binomial standard error over {n_gen} samples.  w* is selected on the validation "
              f"set (below), not on these numbers.  Target: accuracy ≥ {TARGET:.0%} with guidance."]
    for m, t in res["target"].items():
        guided = "" if t["min_guided"] is None else f"; at every w > 1 of the sweep ≥ {t['min_guided']:.4f}"
        lines.append(f"- {m}: {t['accuracy']:.4f} at w* = {models[m]['w_star']:g}: **{'met' if t['met'] else 'not met'}**"
                     f"{guided}")
    if "ratios" in res:
        r = res["ratios"]
        a, b = models["diffkit"], models["diffusers"]
        it = res["interleaved"]
        lines += ["", "## Side by side (diffkit / diffusers)", "",
                  "Whole-run times were measured one model after the other and move with the load of the shared "
                  "machine; the interleaved rows time both sides in alternation (A B A B), which the load hits "
                  "alike.", "",
                  "| quantity | diffkit | diffusers | ratio |", "|---|---|---|---|",
                  f"| parameters | {a['params']:,} | {b['params']:,} | {r['params']:.3f} |",
                  f"| training wall time (s) | {a['train_s']:.1f} | {b['train_s']:.1f} | {r['train_s']:.2f} |",
                  f"| ms per training step | {a['ms_per_step']:.1f} | {b['ms_per_step']:.1f} | {r['ms_per_step']:.2f} |",
                  f"| sampling {n_gen} digits, w = 1 (s) | {a['test']['w1']['seconds']:.1f} | "
                  f"{b['test']['w1']['seconds']:.1f} | {r['sample_s_w1']:.2f} |",
                  f"| sampling {n_gen} digits at each w > 1 (s, total) | "
                  f"{sum(x['seconds'] for x in a['test']['by_w'] if x['w'] != 1):.1f} | "
                  f"{sum(x['seconds'] for x in b['test']['by_w'] if x['w'] != 1):.1f} | {r['sample_s_guided']:.2f} |",
                  f"| **interleaved**: ms per training step (median of {it['train']['rounds']} x "
                  f"{it['train']['per_round']}) | {1e3 * it['train']['diffkit_s']:.1f} | "
                  f"{1e3 * it['train']['diffusers_s']:.1f} | **{it['train']['ratio']:.2f}** "
                  f"(of minima {it['train']['ratio_of_min']:.2f}) |",
                  *[f"| **interleaved**: s to sample {q['n']} digits at w = {q['w']:g} (median of {q['rounds']}) | "
                    f"{q['diffkit_s']:.2f} | {q['diffusers_s']:.2f} | **{q['ratio']:.2f}** (of minima "
                    f"{q['ratio_of_min']:.2f}) |" for q in (it["sample_w1"], it["sample"])],
                  f"| FD, w = 1 | {a['test']['w1']['fd']:.3f} | {b['test']['w1']['fd']:.3f} | {r['fd_w1']:.2f} |",
                  f"| FD, w* | {a['test']['wstar']['fd']:.3f} | {b['test']['wstar']['fd']:.3f} | {r['fd_wstar']:.2f} |",
                  f"| accuracy, w* | {a['test']['wstar']['accuracy']:.4f} | {b['test']['wstar']['accuracy']:.4f} | |"]
    lines += ["", "## Guidance sweep on the validation set (selects w*)", "",
              f"w* = the smallest w whose validation accuracy is within {SELECT_WITHIN:.0%} of the sweep's best.  "
              f"Floor on the validation set: FD {res['floor']['val']['fd']:.3f} ± {res['floor']['val']['fd_sd']:.3f}.",
              "", "| model | w | accuracy | FD | FD / floor | sampling s |", "|---|---|---|---|---|---|"]
    for m, r in models.items():
        for row in r["sweep"]:
            mark = " (w*)" if row["w"] == r["w_star"] else ""
            lines.append(f"| {m} | {row['w']:g}{mark} | {row['accuracy']:.3f} | {row['fd']:.3f} | "
                         f"{row['fd_ratio']:.2f} | {row['seconds']:.1f} |")
    lines += ["", "FD: Fréchet distance between Gaussians fitted to the classifier's 64 penultimate features.  "
              "NN: mean Euclidean distance to the nearest neighbour in the other set (grey levels); "
              "gen→held-out measures fidelity, held-out→gen coverage, gen→train against held-out→train "
              "copying of training digits (≈ 1 or more: no copying).  Generated digits are rounded to the data's "
              "integer grey levels before scoring.", ""]
    _write(path, "\n".join(lines))


if __name__ == "__main__":
    main()
