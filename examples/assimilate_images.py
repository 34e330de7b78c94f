"""Inpainting held-out digits from a quarter of their pixels with an unconditional DDPM.

    python examples/assimilate_images.py            # ~5 minutes on 2 CPU cores; outputs in runs/assimilate_images/
    python examples/assimilate_images.py --quick    # reduced setting used in CI (~1 minute)

1. trains a small unconditional UNet on scikit-learn's bundled 8x8 digits (the ``images``
   adapter's default source; nothing is downloaded);
2. writes held-out digits -- the validation split of that run's data, images the model never saw
   -- and observes 25 % of their pixels (the same pixels in every image) with noise of 5 % of the
   pixels' std (``diffkit data images``, the domains' ``--observe-from`` options);
3. assimilates them: for each digit, ``--members`` posterior samples of the unconditional model
   guided by its observations (``diffkit assimilate``, ``--method`` reconstruction guidance by
   default), and the prior ensemble of the same model (``--no-guidance``, same seed) as the reference;
4. scores both ensemble means against the true digits (RMSE over all pixels and over the unobserved
   ones) and the analysis members' spread against their error (spread/skill);
5. super-resolution from Python: the same digits from their 2x2 block means
   (``diffkit.sampling.sample_posterior`` with the core ``BlockAverage`` operator), against
   nearest-neighbour upsampling.

The same from the shell (docs/images.md):

    diffkit train digits.toml
    diffkit data images runs/digits --images 0:16 --out truth.nc
    diffkit data images --observe-from truth.nc --obs-fraction 0.25 --obs-noise 0.05 --seed 1 --out obs.nc
    diffkit assimilate runs/digits --obs obs.nc --members 8 --method reconstruction --out analysis.nc
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from diffkit.cli import main as diffkit
from diffkit.config import config_from_dict
from diffkit.train import Trainer


def scores(analysis, truth, obs) -> dict:
    """RMSE of the ensemble mean against the truth (all / unobserved pixels) and spread/skill."""
    import xarray as xr

    with xr.open_dataset(analysis) as a, xr.open_dataset(truth) as t, xr.open_dataset(obs) as o:
        err = a["L_ensemble_mean"].values - t["L"].values
        unseen = ~np.isfinite(o["L"].values)
        spread = a["L_ensemble_spread"].values
        m = a.sizes["member"]
    skill = float(np.sqrt((err ** 2).mean()))
    return {"rmse": skill, "rmse_unobserved": float(np.sqrt((err[unseen] ** 2).mean())),
            # spread/skill with the finite-ensemble factor sqrt((m + 1) / m): 1 for a calibrated ensemble
            "spread_skill": float(np.sqrt((m + 1) / m) * np.sqrt((spread ** 2).mean()) / skill)}


def super_resolution(run, truth, members: int, seed: int) -> dict:
    """Super-resolution from Python: the 2x2 block means of the held-out digits (4x4 images, noise 5 % of
    the pixels' std) guide one sampler run per digit (:func:`diffkit.sampling.sample_posterior` with the
    core coarsening operator); RMSE of the ensemble mean against the truth, beside nearest-neighbour
    upsampling of the block means and the prior ensemble (the same run unguided)."""
    import torch
    import xarray as xr

    from diffkit.guidance import BlockAverage, Observation
    from diffkit.model import load_model
    from diffkit.sampling import sample_posterior

    loaded = load_model(run)
    model, layout = loaded.model, loaded.layout
    with xr.open_dataset(truth) as t:
        x_true = torch.as_tensor(t["L"].values[:, None], dtype=torch.float64)        # (N, 1, 8, 8), 0..16
    op = BlockAverage((2, 2), tuple(layout.sample_shape))
    sigma = 0.05 * float(x_true.std())
    g = torch.Generator().manual_seed(seed + 2)
    y = op(x_true) + sigma * torch.randn(op(x_true).shape, generator=g, dtype=torch.float64)
    mean, std = layout.mean.to(torch.float64).flatten()[0], layout.std.to(torch.float64).flatten()[0]
    obs = Observation(op, ((y - mean) / std).float(), sigma / float(std))      # block means are linear: (y - m) / s
    rmse = {}
    # reconstruction guidance's gamma scaled by the squared norm of the operator's rows (1/4 for 2x2 means)
    for name, method in (("rmse", {"name": "reconstruction", "gamma": 0.25}), ("prior_rmse", None)):
        z = sample_posterior(model.bind(None), obs, members=members, method=method, seed=seed)
        x = layout.denormalize(z.flatten(0, 1)).reshape(z.shape).to(torch.float64)
        rmse[name] = float(((x.mean(1) - x_true) ** 2).mean().sqrt())
    nearest = y.repeat_interleave(2, -1).repeat_interleave(2, -2)
    rmse["nearest_rmse"] = float(((nearest - x_true) ** 2).mean().sqrt())
    return rmse


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/assimilate_images", help="output folder")
    ap.add_argument("--quick", action="store_true", help="smaller model and budget (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps")
    ap.add_argument("--images", type=int, default=None, help="held-out digits to inpaint")
    ap.add_argument("--members", type=int, default=None, help="posterior samples per digit")
    ap.add_argument("--fraction", type=float, default=0.25, help="fraction of the pixels observed")
    ap.add_argument("--method", default="reconstruction", help="guidance: reconstruction (default), dps or mmps")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    steps, ch, batch, images, members = (300, 8, 32, 12, 4) if args.quick else (1500, 16, 64, 16, 8)
    steps, images, members = args.steps or steps, args.images or images, args.members or members
    quiet = ["--no-progress"] if args.no_progress else []

    # 1. an unconditional model of the digits (what a TOML file would hold)
    cfg = config_from_dict({
        "run_dir": str(out / "run"),
        "data": {"adapter": "images", "options": {"source": "digits", "conditional": False}, "batch_size": batch},
        "model": {"backbone": "unet", "options": {"channels": ch, "channel_mult": [1, 2], "num_res_blocks": 1,
                                                  "attn_levels": [], "mid_attn": False}},
        "trainer": {"steps": steps, "lr": 2e-3, "warmup": steps // 20, "val_every": 0, "ckpt_every": 0,
                    "snapshot_every": 0, "ema_decay": 0.99, "seed": args.seed, "log_every": max(1, steps // 5)},
        "sample": {"sampler": "dpmpp_2m", "nfe": 20},
    })
    Trainer(cfg, progress=not args.no_progress).fit()
    run = str(cfg.run_dir)

    # 2. held-out digits and observations of a quarter of their pixels
    truth, obs = out / "truth.nc", out / "obs.nc"
    assert diffkit(["data", "images", run, "--images", f"0:{images}", "--out", str(truth)]) == 0
    assert diffkit(["data", "images", "--observe-from", str(truth), "--obs-fraction", str(args.fraction),
                    "--obs-noise", "0.05", "--seed", str(args.seed + 1), "--out", str(obs)]) == 0

    # 3. the analysis and the prior ensemble (same seed)
    common = ["assimilate", run, "--obs", str(obs), "--members", str(members), "--seed", str(args.seed), *quiet]
    assert diffkit([*common, "--method", args.method, "--out", str(out / "analysis.nc")]) == 0
    assert diffkit([*common, "--no-guidance", "--out", str(out / "prior.nc")]) == 0

    # 4. scores
    report = {"method": args.method, "members": members, "images": images, "fraction_observed": args.fraction,
              "analysis": scores(out / "analysis.nc", truth, obs), "prior": scores(out / "prior.nc", truth, obs),
              "super_resolution": super_resolution(run, truth, members, args.seed)}
    (out / "report.json").write_text(json.dumps(report, indent=2))
    a, p = report["analysis"], report["prior"]
    sr = report["super_resolution"]
    print(f"inpainting, ensemble-mean RMSE vs the true digits (0..16): analysis {a['rmse']:.2f} (unobserved pixels "
          f"{a['rmse_unobserved']:.2f}), prior {p['rmse']:.2f} ({p['rmse_unobserved']:.2f}); analysis spread/skill "
          f"{a['spread_skill']:.2f}; figures: {out / 'analysis.png'}, {out / 'prior.png'}")
    print(f"super-resolution from 2x2 block means: RMSE {sr['rmse']:.2f}, nearest-neighbour upsampling "
          f"{sr['nearest_rmse']:.2f}, prior {sr['prior_rmse']:.2f}")
    return report


if __name__ == "__main__":
    main()
