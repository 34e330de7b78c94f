"""End-to-end PDE surrogate on Kuramoto--Sivashinsky: simulate, train, roll out, evaluate, plot.

    python examples/pde_ks.py                 # ~6 minutes on 2 CPU cores; outputs in runs/pde_ks/
    python examples/pde_ks.py --quick         # reduced setting used in CI (~1 minute)

1. simulates training and held-out trajectories with the built-in ETDRK4 solver
   (what `diffkit data pde ks` does);
2. trains a conditional DDPM surrogate (the previous state and dt, dx -> the change over the
   next step) and, with the same UNet and budget, the one-step MSE baseline;
3. rolls both out from held-out initial conditions -- the DDPM as an ensemble;
4. evaluates the Pearson correlation per step, the high-correlation time (PDE-Refiner),
   the normalised RMSE, the ensemble spread and the energy spectra;
5. writes the rollout as netCDF and figures: space-time images and correlation curves.

The same steps from the shell are in docs/pde.md.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch

from diffkit.config import config_from_dict
from diffkit.train import Trainer


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/pde_ks", help="output folder")
    ap.add_argument("--quick", action="store_true", help="small data, model and budget (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from diffkit_pde import (initial_condition, load_surrogate, metrics, plots, rollout, rollout_dataset,
                             simulate_ks, to_dataset, write_netcdf)
    from diffkit_pde.cli import plot_rollout

    out = Path(args.out)
    progress = not args.no_progress
    if args.quick:
        sim = dict(nx=64, L=22.0, burn_in=50.0)      # a small, still chaotic KS domain
        n_train, n_test, frames, test_frames, steps, ch = 24, 4, 60, 80, 300, 16
    else:
        sim = dict()                                 # the LPSDA set-up: nx = 256, L = 64 +- 10 %
        n_train, n_test, frames, test_frames, steps, ch = 128, 8, 140, 300, 1500, 24
    steps = args.steps or steps

    # 1. data (the same as `diffkit data pde ks --trajectories N --out FILE.nc`)
    train_file, test_file = out / "ks_train.nc", out / "ks_test.nc"
    write_netcdf(to_dataset(simulate_ks(n_train, frames, seed=0, progress=progress, **sim)), train_file)
    write_netcdf(to_dataset(simulate_ks(n_test, test_frames, seed=1, progress=progress, **sim)), test_file)

    # 2. two models, one backbone, one budget
    surrogates = {}
    for objective in ("diffusion", "regression"):
        cfg = config_from_dict({
            "run_dir": str(out / objective),
            "data": {"adapter": "pde", "batch_size": 32,
                     "options": {"path": str(train_file), "history": 1, "frame_step": 2, "target": "residual",
                                 "scalars": ["dt", "dx"]}},
            "model": {"backbone": "unet", "objective": objective,
                      "options": {"channels": ch, "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                                  "attn_levels": [], "mid_attn": False}},
            "trainer": {"steps": steps, "lr": 1e-3, "warmup": steps // 10, "val_every": 0, "ckpt_every": 0,
                        "ema_decay": 0.995},
            "sample": {"sampler": "dpmpp_2m", "nfe": 10},
        })
        Trainer(cfg, progress=progress).fit()
        surrogates[objective] = load_surrogate(cfg.run_dir)

    # 3.-4. roll out from every held-out initial condition and score
    report = {}
    for objective, sur in surrogates.items():
        ics = [initial_condition(test_file, sur.layout, index=i) for i in range(n_test)]
        K = ics[0].truth.shape[0]
        hist = torch.stack([ic.history for ic in ics])
        scal = torch.stack([ic.scalars for ic in ics])
        members = 4 if objective == "diffusion" else 1
        pred = rollout(sur, hist, K, members=members, scalars=scal, seed=0, progress=progress)  # (N, M, K, 1, x)
        truth = torch.stack([ic.truth for ic in ics])                                          # (N, K, 1, x)
        corr = metrics.pearson_per_step(pred[:, 0], truth, 1)                                  # member 0 vs truth
        hct = metrics.high_correlation_time(corr, dt=sur.dt, threshold=0.8)
        persistence = metrics.nrmse(hist[:, -1:], truth[:, :1], 1)[:, 0]  # "nothing changes" forecast
        report[objective] = {
            "high_correlation_time": [float(hct.mean()), float(hct.std() / len(hct) ** 0.5)],
            "nrmse_first_step_persistence": float(persistence.mean()),
            "nrmse_first_step": float(metrics.nrmse(pred[:, 0], truth, 1)[:, 0].mean()),
            "nrmse_last_step": float(metrics.nrmse(pred[:, 0], truth, 1)[:, -1].mean()),
        }
        if members > 1:
            report[objective]["spread_last_step"] = float(metrics.ensemble_spread(pred, 1, member_dim=1)[:, -1].mean())
        report[objective]["corr"] = corr
        # 5. outputs: the rollout of the first initial condition as netCDF, and its figures
        ds = rollout_dataset(pred[0], sur.layout, ics[0], attrs={"objective": objective})
        from diffkit.adapters import atomic_to_netcdf

        atomic_to_netcdf(ds, out / f"rollout_{objective}.nc")
        plot_rollout(ds, sur.layout, out / f"rollout_{objective}.png")
        k, E = metrics.energy_spectrum(pred[:, 0, -1, 0], 1)
        _, Et = metrics.energy_spectrum(truth[:, -1, 0], 1)
        report[objective]["spectrum"] = (k, E.mean(0))
        report["truth_spectrum"] = (k, Et.mean(0))
    dt = surrogates["diffusion"].dt
    plots.plot_correlation({"DDPM (member 0)": report["diffusion"].pop("corr"),
                            "MSE baseline": report["regression"].pop("corr")}, out / "correlation.png", dt=dt)
    plots.plot_spectra({"truth": report.pop("truth_spectrum"), "DDPM": report["diffusion"].pop("spectrum"),
                        "MSE": report["regression"].pop("spectrum")}, out / "spectra_last_step.png")
    (out / "report.json").write_text(json.dumps(report, indent=1))
    for objective, r in report.items():
        m, se = r["high_correlation_time"]
        print(f"{objective:>10}: high-correlation time {m:.2f} +- {se:.2f}, nRMSE first/last step "
              f"{r['nrmse_first_step']:.3f}/{r['nrmse_last_step']:.3f}")
    print(f"outputs in {out}/: rollout_*.nc, rollout_*.png, correlation.png, spectra_last_step.png, report.json")
    return report


if __name__ == "__main__":
    main()
