"""The images section of ``diffkit quickstart``: class-conditional digits with guidance in under a minute.

Trains a small UNet on scikit-learn's bundled 8x8 digits (the ``images`` adapter's default
source), class-conditionally with label dropout, samples a balanced grid with classifier-free
guidance (Ho & Salimans 2022) and at w = 0 (the unconditional model), and scores both with a
logistic-regression classifier fitted on the real training digits: the fraction of samples that
it puts in the class they were drawn for.  Its accuracy on held-out real digits is the reference.
"""
from __future__ import annotations

from pathlib import Path

SIZES = dict(steps=300, channels=16, batch=64, per_class=10, nfe=20, guidance=2.0)


def quickstart(out: Path, *, seed: int = 0, progress: bool = True):
    """scikit-learn digits: train a class-conditional DDPM, sample a grid with guidance, classify the samples"""
    import torch

    from diffkit.config import config_from_dict
    from diffkit.denoiser import Cond
    from diffkit.quickstart import Section
    from diffkit.sampling import sample
    from diffkit.model import load_for_sampling
    from diffkit.train import Trainer

    from .scoring import class_agreement, pixel_classifier

    s = SIZES
    out = Path(out)
    cfg = config_from_dict({
        "run_dir": str(out / "run"),
        "data": {"adapter": "images", "options": {"source": "digits"}, "batch_size": s["batch"], "val_fraction": 0.1},
        "model": {"backbone": "unet", "options": {"channels": s["channels"], "channel_mult": [1, 2],
                                                  "num_res_blocks": 1, "attn_levels": [], "mid_attn": False}},
        "loss": {"p_uncond": 0.1},
        "trainer": {"steps": s["steps"], "lr": 2e-3, "warmup": s["steps"] // 10, "val_every": 0, "ckpt_every": 0,
                    "ema_decay": 0.99, "seed": seed, "log_every": s["steps"] // 5},
        "sample": {"sampler": "dpmpp_2m", "nfe": s["nfe"], "guidance": s["guidance"]},
    })
    trainer = Trainer(cfg, progress=progress)
    trainer.fit()
    ad = trainer.adapter
    clf, real_acc = pixel_classifier(ad)

    den, _, adapter_cls = load_for_sampling(cfg.run_dir)
    layout = den.layout
    K = layout.num_classes
    labels = torch.arange(K * s["per_class"]) % K
    agree, figs, files = {}, [], []
    for w in (0.0, s["guidance"]):
        g = torch.Generator().manual_seed(seed)
        x = sample(den.bind(Cond(labels=labels), w), (len(labels), *layout.sample_shape), sampler="dpmpp_2m",
                   nfe=s["nfe"], generator=g, progress=progress)
        png = adapter_cls.decode(x, layout, out / f"samples_w{w:g}.png", labels=labels,
                                 attrs={"guidance": w, "nfe": s["nfe"], "seed": seed})
        agree[w] = class_agreement(clf, png.with_suffix(".npz"), (0.0, 16.0))
        figs.append(png)
        files.append(png.with_suffix(".npz"))
    w = s["guidance"]
    return Section(
        title="Images: class-conditional digits with classifier-free guidance",
        summary=(f"A {sum(p.numel() for p in den.net.parameters()) / 1e3:.0f} k-parameter UNet learnt scikit-learn's "
                 f"bundled 8x8 digits ({len(ad.train_idx)} training images, 10 classes) in {s['steps']} steps, "
                 "dropping the label 10 % of the time so that the same network is also the unconditional model.  "
                 f"`samples_w{w:g}.png` shows {s['per_class']} samples per class (one row per class) drawn with guidance "
                 f"scale w = {w:g}; `samples_w0.png` the unconditional model.  Agreement is the fraction of samples "
                 "that a logistic-regression classifier, fitted on the real training digits, puts in the class they "
                 "were drawn for.  The full-size comparison with diffusers is `benchmarks/images_digits.py` "
                 "(docs/images.md)."),
        rows=[(f"agreement, guidance w = {w:g}", f"{agree[w]:.2f}", "1 = every sample looks like its class"),
              ("agreement, unconditional (w = 0)", f"{agree[0.0]:.2f}", "about 0.1 (chance) when the label is ignored"),
              ("classifier accuracy on held-out real digits", f"{real_acc:.3f}", "the reference")],
        figures=figs, files=[*files, Path(cfg.run_dir)],
        metrics={"agreement_guided": agree[w], "agreement_unconditional": agree[0.0], "real_accuracy": real_acc},
    )
