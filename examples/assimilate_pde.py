"""Data assimilation on Kuramoto--Sivashinsky: a diffusion surrogate guided by sparse, noisy observations.

    python examples/assimilate_pde.py             # ~1 min of one CPU core; outputs in runs/assimilate_pde/
    python examples/assimilate_pde.py --quick     # reduced setting used in CI (~15 s of one core)

1. simulates training trajectories and a held-out truth with the built-in ETDRK4 solver
   (what `diffkit data pde ks` does);
2. trains a small conditional DDPM surrogate (the previous state -> the change over the next
   step), as examples/pde_ks.py does;
3. observes the held-out truth at every 4th grid point of a window of frames, with noise of
   0.05 x its climatological std (`diffkit data pde ks --observe-from ... --obs-stride 4`);
4. assimilates the observations into an ensemble rollout from the state before the window with
   reconstruction guidance and with MMPS, and writes the unguided prior of the same rollout
   (`diffkit assimilate ... --method mmps` / `--no-guidance`);
5. scores prior and analyses against the truth with diffkit.ensemble (ensemble-mean RMSE at the
   observed and the unobserved points, spread/skill), prints a table, writes report.json and a
   space-time figure (truth, observations, prior and analysis means, analysis spread and error).

Steps 3 and 4 go through the command line (`diffkit.cli.main`, the same as typing the commands);
docs/observations.md and docs/assimilation.md describe them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np

from diffkit.cli import main as diffkit
from diffkit.config import config_from_dict
from diffkit.train import Trainer

METHODS = ("reconstruction", "mmps")


def settings(quick: bool) -> dict:
    """Simulation, training and assimilation settings of the CI (``quick``) and the default run."""
    # a small, still chaotic KS domain (diffkit quickstart's), one length L for every trajectory: gridded
    # observations must lie on the grid the model was trained on
    sim = dict(nx=64, L=22.0, L_jitter=0.0, burn_in=50.0)
    if quick:
        return dict(sim=sim, n_train=16, frames=50, channels=8, mult=[1, 2], steps=200, batch_size=16,
                    window=12, members=6, nfe=6)
    return dict(sim=sim, n_train=24, frames=60, channels=16, mult=[1, 2, 2], steps=300, batch_size=32,
                window=40, members=8, nfe=10)


def run(argv: list[str]) -> None:
    """One diffkit command, as typed in a shell; a failure stops the example with its message."""
    rc = diffkit(argv)
    if rc != 0:
        raise SystemExit(f"`diffkit {' '.join(argv)}` failed (exit {rc})")


def scores(path: Path, seen: np.ndarray) -> dict:
    """Ensemble-mean RMSE (all, observed and unobserved points), spread and spread/skill of an assimilation
    output: over x at each step, then the mean over the steps (as `diffkit assimilate` prints it)."""
    import torch
    import xarray as xr

    from diffkit import ensemble

    with xr.open_dataset(path) as ds:
        members = torch.as_tensor(ds["u"].values)                       # (member, time, x)
        truth = torch.as_tensor(ds["u_truth"].values)                   # (time, x)
    mask = torch.as_tensor(seen)
    per_step = dict(dims=(-1,), sample_dims=(0,))                        # layout (time, x)
    return {"rmse": float(ensemble.ensemble_mean_rmse(members, truth, **per_step)),
            "rmse_observed": float(ensemble.ensemble_mean_rmse(members, truth, mask=mask, **per_step)),
            "rmse_unobserved": float(ensemble.ensemble_mean_rmse(members, truth, mask=~mask, **per_step)),
            "spread": float(ensemble.spread(members, truth, **per_step)),
            "spread_skill": float(ensemble.spread_skill_ratio(members, truth, **per_step))}


def plot(out: Path, obs: Path, outputs: dict, method: str) -> Path:
    """Space-time images (x across, time up): truth, observations, the analysis mean, the errors of the prior
    and the analysis means (one colour scale), the analysis spread."""
    import xarray as xr

    from diffkit.figures import new_figure, save_figure

    with xr.open_dataset(outputs["prior"]) as p, xr.open_dataset(outputs[method]) as a, xr.open_dataset(obs) as o:
        x, t = a["x"].values, a["time"].values
        truth, y = a["u_truth"].values, o["u"].values
        prior, mean, spread = p["u_ensemble_mean"].values, a["u_ensemble_mean"].values, a["u_ensemble_spread"].values
    v = float(np.nanmax(np.abs(truth))) or 1.0
    e = float(max(np.abs(prior - truth).max(), np.abs(mean - truth).max())) or 1.0
    panels = [("truth", truth, "RdBu_r", -v, v, False), ("observations", y, "RdBu_r", -v, v, False),
              (f"{method} mean", mean, "RdBu_r", -v, v, True),
              ("prior mean - truth", prior - truth, "RdBu_r", -e, e, False),
              (f"{method} mean - truth", mean - truth, "RdBu_r", -e, e, True),
              (f"{method} spread", spread, "magma", 0.0, float(spread.max()) or 1.0, True)]
    fig = new_figure(2.3 * len(panels) + 1.5, 4.2)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, a_, cmap, lo, hi, bar) in zip(axes, panels):
        m = ax.pcolormesh(x, t, np.ma.masked_invalid(a_), cmap=cmap, vmin=lo, vmax=hi, shading="nearest",
                          rasterized=True)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("x")
        if bar:
            fig.colorbar(m, ax=ax, shrink=0.85)
    axes[0].set_ylabel("time")
    fig.suptitle(f"KS: observations at every 4th point (sigma_y = 0.05 x climatological std); {method} analysis "
                 f"vs the unguided prior ({a.sizes['member']} members)", fontsize=10)
    return save_figure(fig, out / "assimilation.png")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/assimilate_pde", help="output folder")
    ap.add_argument("--quick", action="store_true", help="smaller data, model and window (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps")
    ap.add_argument("--seed", type=int, default=0, help="seed of the training data, the training and the ensembles")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from diffkit_pde import simulate_ks, to_dataset, write_netcdf

    t_start = time.time()
    s = settings(args.quick)
    steps = args.steps or s["steps"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    quiet = [] if progress else ["--no-progress"]
    report: dict = {"setting": "quick" if args.quick else "default", "training_steps": steps,
                    "members": s["members"], "window_steps": s["window"]}

    # 1. data (the same as `diffkit data pde ks --trajectories N --set nx=64 --set L=22 --set L_jitter=0
    #    --set burn_in=50 --out ...`); frame 0 of the truth starts the rollout, frames 1.. are observed
    train_file, truth_file = out / "ks_train.nc", out / "ks_truth.nc"
    write_netcdf(to_dataset(simulate_ks(s["n_train"], s["frames"], seed=args.seed, progress=progress, **s["sim"])),
                 train_file)
    write_netcdf(to_dataset(simulate_ks(1, s["window"] + 1, seed=args.seed + 1000, progress=progress, **s["sim"])),
                 truth_file)

    # 2. the surrogate: a conditional DDPM of the change over one step (the previous state -> the change)
    cfg = config_from_dict({
        "run_dir": str(out / "surrogate"),
        "data": {"adapter": "pde", "batch_size": s["batch_size"],
                 "options": {"path": str(train_file), "history": 1, "target": "residual"}},
        "model": {"backbone": "unet", "objective": "diffusion",
                  "options": {"channels": s["channels"], "channel_mult": s["mult"], "num_res_blocks": 1,
                              "attn_levels": [], "mid_attn": False}},
        "trainer": {"steps": steps, "lr": 2e-3, "warmup": max(1, steps // 20), "val_every": 0, "ckpt_every": 0,
                    "ema_decay": 0.99, "log_every": max(1, steps // 5), "seed": args.seed},
        "sample": {"sampler": "dpmpp_2m", "nfe": s["nfe"]},
    })
    Trainer(cfg, progress=progress).fit()
    report["train_s"] = round(time.time() - t_start, 1)

    # 3. observations of frames 1..window of the truth: every 4th point, sigma_y = 0.05 x climatological std
    obs = out / "obs.nc"
    run(["data", "pde", "ks", "--observe-from", str(truth_file), "--obs-trajectory", "0",
         "--obs-frames", f"1:{s['window'] + 1}", "--obs-stride", "4", "--obs-noise", "0.05",
         "--seed", str(args.seed + 1), "--out", str(obs)])

    # 4. the prior (no guidance) and two analyses of the same rollout: same members, seed and sampler
    common = ["assimilate", cfg.run_dir, "--obs", str(obs), "--init", str(truth_file), "--members",
              str(s["members"]), "--seed", str(args.seed), "--device", "cpu", *quiet]
    outputs = {"prior": out / "prior.nc", **{m: out / f"analysis_{m}.nc" for m in METHODS}}
    run([*common, "--no-guidance", "--out", str(outputs["prior"])])
    for m in METHODS:
        run([*common, "--method", m, "--out", str(outputs[m])])
    report["assimilate_s"] = round(time.time() - t_start - report["train_s"], 1)

    # 5. scores against the truth, table, figure
    import xarray as xr

    with xr.open_dataset(obs) as o:
        seen = np.isfinite(o["u"].values)                                # (time, x): the observed points
    for name, path in outputs.items():
        report[name] = scores(path, seen)
    plot(out, obs, outputs, "mmps")
    report["total_s"] = round(time.time() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print(f"\nKS, {s['members']} members, {s['window']} steps, observed every 4th point "
          f"({int(seen.sum())} observations); ensemble-mean RMSE vs the truth:")
    print(f"{'':<16}{'all':>9}{'observed':>10}{'unobserved':>12}{'spread':>9}{'spread/skill':>14}")
    for name in outputs:
        r = report[name]
        print(f"{name:<16}{r['rmse']:>9.4f}{r['rmse_observed']:>10.4f}{r['rmse_unobserved']:>12.4f}"
              f"{r['spread']:>9.4f}{r['spread_skill']:>14.2f}")
    print(f"outputs in {out}/: obs.nc, prior.nc, analysis_{{{','.join(METHODS)}}}.nc, assimilation.png, "
          f"report.json ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
