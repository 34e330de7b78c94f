"""End-to-end ensemble weather forecasting on a two-layer quasi-geostrophic (QG) model.

    python examples/weather_qg.py                 # ~10 minutes on one CPU thread; outputs in runs/weather_qg/
    python examples/weather_qg.py --quick         # reduced setting used in CI (under a minute)

1. simulates the QG model in pyqg's reference set-up (what `diffkit data weather qg` does):
   a spin-up that is thrown away, then a record of 6-hourly frames on a labelled lat-lon grid,
   written as CF netCDF;
2. trains a conditional DDPM (GenCast-style: the streamfunction of both layers at t -> its change
   over the next 24 h) on the first part of the record and, with the same UNet and budget, the
   deterministic MSE baseline;
3. forecasts from several held-out initialisation times -- the DDPM as an ensemble of sampled
   trajectories, the baseline as a perturbed-initial-condition ensemble -- and writes each
   forecast as CF netCDF with dims (member, init_time, lead_time, level, latitude, longitude);
4. evaluates both against the simulated truth (latitude-weighted ensemble-mean RMSE, fair CRPS,
   spread, spread/skill, rank histograms; WeatherBench-2 conventions) and the persistence
   forecast ("nothing changes") as a reference, writing scores.csv / scores.nc and figures
   (lead-time curves, rank histograms, maps of ensemble mean, spread and error);
5. prints a short table per model and lead time and writes report.json.

The same steps from the shell are in docs/weather.md.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffkit.config import config_from_dict
from diffkit.train import Trainer

SIX_HOURS = 6 * 3600.0
NAMES = {"diffusion": "DDPM", "regression": "MSE baseline", "persistence": "persistence"}


def settings(quick: bool) -> dict:
    """Simulation, training and forecast settings of the CI (``quick``) and the full run."""
    if quick:
        # 32^2 over half the reference domain (L = 500 km) keeps the reference resolution (15.6 km for a
        # 15 km deformation radius; 32^2 over 1000 km would put the instability at the grid scale); a larger
        # initial PV (3e-6 instead of 1e-7 1/s) brings the flow near equilibrium in half a year
        return dict(nx=32, L=5e5, spin_up_years=1.0, ic_amplitude=3e-6, train_days=120, test_days=30,
                    channels=16, steps=120, batch_size=16, members=6, n_init=4, lead_steps=4)
    # pyqg's reference grid and the default 5-year spin-up; two years to train, three months held out
    return dict(nx=64, L=1e6, spin_up_years=5.0, ic_amplitude=1e-7, train_days=730, test_days=90,
                channels=16, steps=400, batch_size=16, members=8, n_init=8, lead_steps=10)


def _day(t0: np.datetime64, days: float) -> str:
    return str(np.datetime_as_string(t0 + np.timedelta64(int(round(days * 24)), "h"), unit="D"))


def forecast_and_score(run_dir, data, truth, init_times, steps: int, members: int, out: Path, *, seed: int = 0,
                       progress: bool = False, plots: bool = True):
    """Load a trained run, forecast ``members`` members from ``init_times`` for ``steps`` leads, write
    ``out/forecast.nc`` and score it into ``out/`` (tables and figures).  Returns the
    :class:`~diffkit_weather.evaluate.Evaluation`, the forecast dataset, the initial states and
    the :class:`~diffkit_weather.Forecaster`."""
    from diffkit.adapters import atomic_to_netcdf
    from diffkit_weather import evaluate, forecast, forecast_dataset, initial_states, load_forecaster

    fc = load_forecaster(run_dir)
    opts = fc.data_options
    ist = initial_states(data, fc.layout, init_times, steps=steps, options=opts)
    pred = forecast.forecast(fc, None, ist, steps=steps, members=members, seed=seed, progress=progress)
    ds = forecast_dataset(pred, fc.layout, ist.times, options=opts,
                          attrs={"checkpoint": str(run_dir), "objective": fc.objective, "seed": seed})
    out.mkdir(parents=True, exist_ok=True)
    atomic_to_netcdf(ds, out / "forecast.nc")
    ev = evaluate.evaluate(out / "forecast.nc", truth, out=out, plots=plots)
    return ev, ds, ist, fc


def persistence_scores(ist, fc, truth, steps: int, options):
    """Scores of the persistence forecast (the initial state at every lead) -- the trivial reference."""
    from diffkit_weather import evaluate, forecast_dataset
    from diffkit_weather.forecast import persistence

    return evaluate.evaluate(forecast_dataset(persistence(ist, steps), fc.layout, ist.times, options=options), truth,
                             plots=False)


def print_table(report: dict, models=("diffusion", "regression"), max_leads: int = 5) -> None:
    """Per channel and lead: ensemble-mean RMSE, CRPS and spread/skill of each model, and persistence RMSE."""
    w = 10
    for ch, r0 in report[models[0]].items():
        K = len(r0["lead_hours"])
        idx = sorted(set(np.linspace(0, K - 1, min(max_leads, K)).round().astype(int).tolist()))
        print(f"{ch:<18}" + "".join(f"{NAMES[m]:^{3 * w}}" for m in models) + f"{'persistence':>{w + 2}}")
        print(f"{'lead (h)':<18}" + f"{'RMSE':>{w}}{'CRPS':>{w}}{'spr/skill':>{w}}" * len(models) + f"{'RMSE':>{w + 2}}")
        for k in idx:
            line = f"{r0['lead_hours'][k]:<18g}"
            for m in models:
                for key in ("rmse", "crps", "spread_skill_ratio"):
                    v = report[m][ch][key][k]
                    line += f"{'-' if v is None else format(v, '.4g'):>{w}}"
            print(line + f"{report['persistence'][ch]['rmse'][k]:>{w + 2}.4g}")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/weather_qg", help="output folder")
    ap.add_argument("--quick", action="store_true", help="small grid, short record, small budget (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model")
    ap.add_argument("--members", type=int, default=None, help="ensemble members")
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulation, the training and the ensembles")
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from diffkit_weather import evaluate, plots, simulate_qg, to_dataset, write_netcdf
    from diffkit_weather.forecast import select_init_times

    t_start = time.time()
    s = settings(args.quick)
    steps = args.steps or s["steps"]
    members = args.members or s["members"]
    K = s["lead_steps"]
    out = Path(args.out)
    progress = not args.no_progress
    report: dict = {"setting": "quick" if args.quick else "full", "training_steps": steps, "members": members}

    # 1. data (what `diffkit data weather qg --fields psi --float32 --years ... --out qg.nc` does; the quick
    #    setting's stronger initial PV is a Python-only option, ic_amplitude)
    n_frames = int(round((s["train_days"] + s["test_days"]) * 4)) + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one small 2-D FFT per step: threads do not pay (and hurt on a shared machine)
    try:
        sim = simulate_qg(1, n_frames, nx=s["nx"], L=s["L"], spin_up_years=s["spin_up_years"], ic_amplitude=s["ic_amplitude"],
                          out_every=SIX_HOURS, seed=args.seed, fields=("psi",), progress=progress)
    finally:
        torch.set_num_threads(threads)
    ds = to_dataset(sim)
    ds["streamfunction"] = ds["streamfunction"].astype(np.float32)   # halves the file
    data = write_netcdf(ds, out / "qg.nc")
    t0 = ds["time"].values[0]
    train_slice = [_day(t0, 0), _day(t0, s["train_days"] - 1)]
    val_slice = [_day(t0, s["train_days"]), _day(t0, s["train_days"] + s["test_days"])]
    report["train_slice"], report["val_slice"] = train_slice, val_slice
    report["simulate_s"] = round(time.time() - t_start, 1)

    # 2. two models, one backbone, one budget
    runs = {}
    for objective in ("diffusion", "regression"):
        cfg = config_from_dict({
            "run_dir": str(out / objective),
            "data": {"adapter": "weather", "batch_size": s["batch_size"],
                     "options": {"path": str(data), "variables": ["streamfunction"], "lead": 24,
                                 "history": 1, "target": "residual", "forcings": [],
                                 "train_slice": train_slice, "val_slice": val_slice}},
            "model": {"backbone": "unet", "objective": objective,
                      "options": {"channels": s["channels"], "channel_mult": [1, 2, 2], "num_res_blocks": 1,
                                  "attn_levels": [], "mid_attn": False}},
            "trainer": {"steps": steps, "lr": 1e-3, "warmup": max(1, steps // 10), "val_every": 0, "ckpt_every": 0,
                        "ema_decay": 0.995, "log_every": max(1, steps // 5), "seed": args.seed},
            "sample": {"sampler": "dpmpp_2m", "nfe": 10},
        })
        Trainer(cfg, progress=progress).fit()
        runs[objective] = cfg.run_dir
    report["train_s"] = round(time.time() - t_start - report["simulate_s"], 1)

    # 3.-4. forecast from held-out init times (evenly spread over the validation period) and score
    from diffkit_weather import load_forecaster

    layout = load_forecaster(runs["diffusion"]).layout
    ok = select_init_times(ds["time"].values, layout, "all-val", steps=K, val_slice=val_slice)
    inits = ds["time"].values[ok[np.linspace(0, len(ok) - 1, min(s["n_init"], len(ok))).round().astype(int)]]
    report["init_times"] = [str(np.datetime_as_string(t, unit="m")) for t in inits]
    scores = {}
    for objective, run in runs.items():
        ev, _, ist, fc = forecast_and_score(run, data, data, inits, K, members, out / objective, seed=args.seed,
                                               progress=progress, plots=not args.no_plots)
        report[objective] = evaluate.summarise(ev.scores)
        scores[objective] = ev.scores
    pers = persistence_scores(ist, fc, data, K, fc.data_options)
    report["persistence"] = evaluate.summarise(pers.scores)

    # 5. one figure comparing the two models, the text table and the report
    if not args.no_plots:
        import xarray as xr

        both = xr.concat([sc.drop_vars("rank_histogram").assign_coords(
            channel=[f"{NAMES[o]} {c}" for c in sc["channel"].values]) for o, sc in scores.items()], "channel")
        plots.plot_lead_curves(both, out / "compare_lead_curves.png",
                               title=f"DDPM vs MSE baseline, {members} members, {len(inits)} held-out inits")
    report["total_s"] = round(time.time() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))
    print_table(report)
    print(f"outputs in {out}/: qg.nc, {{diffusion,regression}}/forecast.nc, {{diffusion,regression}}/scores.csv "
          f"and figures, compare_lead_curves.png, report.json ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
