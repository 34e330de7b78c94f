"""Ensemble forecasts of a real storm: NCL's January 1996 sample files through the weather pipeline.

    python examples/weather_storm.py              # ~7 minutes on one CPU thread; outputs in runs/weather_storm/
    python examples/weather_storm.py --quick      # reduced setting used in CI (under a minute)

NCL's storm files (Debian/Ubuntu package ``libncarg-data``: ``/usr/share/ncarg/data/cdf/``) hold
16 days of 6-hourly u, v, temperature and sea-level pressure over North America (33 x 36 points,
1.25 x 2.5 degrees), one variable per file.  They are real files written by others, with what
such files have: no CF time units (the time axis counts hours from the text variable
``reftime = "1996 01 05 00:00"``), a fixed land mask of missing values and whole frames missing
in v and t.  The example

1. opens the four files with the ``weather`` adapter (``time_units`` from ``reftime``,
   ``allow_missing`` for the missing frames: their targets get weight 0, their inputs are flagged
   in the mask channel);
2. trains a conditional DDPM (state at t -> its change over 6 h) on 5-16 January and, with the
   same UNet and budget, the MSE baseline (not with --quick, which trains the DDPM only);
3. forecasts an ensemble from held-out init times (17-20 January) and writes CF netCDF with the
   files' own names, units and grid (dims member, init_time, lead_time, lat, lon);
4. scores both against the files and the persistence forecast (RMSE, CRPS, spread/skill, rank
   histograms), with lead-time curves and maps of ensemble mean, spread and error;
5. prints a short table and writes report.json.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import numpy as np

from diffkit.config import config_from_dict
from diffkit.train import Trainer

NCL = Path("/usr/share/ncarg/data/cdf")
TIME_UNITS = "hours since 1996-01-05 00:00"     # the files' reftime: their time values count from there
NAMES = {"diffusion": "DDPM", "regression": "MSE baseline"}


def storm_files(ncl_dir, variables) -> list[Path]:
    """The storm files of ``variables`` (one file per variable: u -> Ustorm.cdf), or a clear error."""
    paths = [Path(ncl_dir) / f"{v.upper()}storm.cdf" for v in variables]
    missing = [str(p) for p in paths if not p.exists()]
    if missing:
        raise FileNotFoundError(f"NCL's storm sample files are not installed ({', '.join(missing)} missing); "
                                f"install them with `apt-get install libncarg-data` (Debian/Ubuntu), or point "
                                f"--ncl-dir at a folder holding {{U,V,T,P}}storm.cdf")
    return paths


def settings(quick: bool) -> dict:
    if quick:
        return dict(channels=16, steps=300, batch_size=16, members=8, n_init=4, lead_steps=4, baseline=False)
    return dict(channels=24, steps=600, batch_size=16, members=8, n_init=8, lead_steps=8, baseline=True)


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/weather_storm", help="output folder")
    ap.add_argument("--quick", action="store_true", help="small budget (CI)")
    ap.add_argument("--variables", nargs="+", default=["u", "v", "t", "p"], choices=["u", "v", "t", "p"],
                    help="variables to forecast (default all four; 'u p' needs no allow_missing)")
    ap.add_argument("--ncl-dir", default=str(NCL), help=f"folder of the storm files (default {NCL})")
    ap.add_argument("--steps", type=int, default=None, help="training steps per model")
    ap.add_argument("--members", type=int, default=None, help="ensemble members")
    ap.add_argument("--baseline", action=argparse.BooleanOptionalAction, default=None,
                    help="also train the MSE baseline (default: yes, but not with --quick)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--no-plots", action="store_true", help="tables only")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    from diffkit.adapters import atomic_to_netcdf
    from diffkit_weather import evaluate, forecast, forecast_dataset, initial_states, load_forecaster
    from diffkit_weather.evaluate import format_table

    t_start = time.time()
    files = [str(p) for p in storm_files(args.ncl_dir, args.variables)]
    s = settings(args.quick)
    steps = args.steps or s["steps"]
    members = args.members or s["members"]
    K = s["lead_steps"]
    out = Path(args.out)
    progress = not args.no_progress
    train_slice, val_slice = ["1996-01-05", "1996-01-16"], ["1996-01-17", "1996-01-20"]
    report: dict = {"setting": "quick" if args.quick else "full", "variables": list(args.variables),
                    "training_steps": steps, "members": members, "train_slice": train_slice, "val_slice": val_slice}

    # 1.-2. the adapter reads the four files as one data set; two models, one backbone, one budget
    options = {"path": files, "variables": list(args.variables), "time_units": TIME_UNITS, "history": 1,
               "target": "residual", "allow_missing": True, "train_slice": train_slice, "val_slice": val_slice}
    runs = {}
    baseline = s["baseline"] if args.baseline is None else args.baseline
    for objective in ("diffusion", "regression") if baseline else ("diffusion",):
        cfg = config_from_dict({
            "run_dir": str(out / objective),
            "data": {"adapter": "weather", "batch_size": s["batch_size"], "options": options},
            "model": {"backbone": "unet", "objective": objective,
                      "options": {"channels": s["channels"], "channel_mult": [1, 2], "num_res_blocks": 1,
                                  "attn_levels": [], "mid_attn": False}},
            "trainer": {"steps": steps, "lr": 1e-3, "warmup": max(1, steps // 10), "val_every": 0, "ckpt_every": 0,
                        "ema_decay": 0.99, "log_every": max(1, steps // 5), "seed": args.seed},
            "sample": {"sampler": "dpmpp_2m", "nfe": 10},
        })
        Trainer(cfg, progress=progress).fit()
        runs[objective] = cfg.run_dir
    report["train_s"] = round(time.time() - t_start, 1)

    # 3.-4. held-out init times: evenly spread over those with K steps of truth after the training period
    report_scores = {}
    ist = fc = None
    for objective, run in runs.items():
        fc = load_forecaster(run)
        if ist is None:
            every = initial_states(files, fc.layout, "all-val", steps=K, options=fc.data_options)
            pick = np.linspace(0, len(every.times) - 1, min(s["n_init"], len(every.times))).round().astype(int)
            inits = every.times[pick]
            ist = initial_states(files, fc.layout, inits, options=fc.data_options)
            report["init_times"] = [str(np.datetime_as_string(t, unit="m")) for t in inits]
        pred = forecast.forecast(fc, None, ist, steps=K, members=members, seed=args.seed, progress=progress)
        ds = forecast_dataset(pred, fc.layout, ist.times, options=fc.data_options,
                              attrs={"checkpoint": str(run), "objective": objective, "seed": args.seed})
        atomic_to_netcdf(ds, out / objective / "forecast.nc")
        ev = evaluate.evaluate(out / objective / "forecast.nc", files, out=out / objective, plots=not args.no_plots)
        report_scores[objective] = ev.scores
        report[objective] = evaluate.summarise(ev.scores)
    # the persistence forecast (the initial state at every lead), scored the same way
    ev = evaluate.evaluate(forecast_dataset(forecast.persistence(ist, K), fc.layout, ist.times, options=fc.data_options), files, plots=False)
    report["persistence"] = evaluate.summarise(ev.scores)
    report["total_s"] = round(time.time() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))

    # 5. the table: first lead of every channel, then the DDPM's scores per lead
    print(f"{'channel':<10}" + "".join(f"{NAMES[o] + ' RMSE':>20}{NAMES[o] + ' CRPS':>20}" for o in runs)
          + f"{'persistence RMSE':>18}   (lead {report['persistence'][next(iter(report['persistence']))]['lead_hours'][0]:g} h)")
    for ch in report["diffusion"]:
        line = f"{ch:<10}"
        for o in runs:
            line += f"{report[o][ch]['rmse'][0]:>20.4g}{report[o][ch]['crps'][0]:>20.4g}"
        print(line + f"{report['persistence'][ch]['rmse'][0]:>18.4g}")
    print("\nDDPM per lead:")
    print(format_table(report_scores["diffusion"]))
    print(f"outputs in {out}/: {{{','.join(runs)}}}/forecast.nc, scores.csv, scores.nc, lead_curves.png, "
          f"rank_histograms.png, maps_*.png; report.json ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    try:
        main()
    except FileNotFoundError as e:
        sys.exit(f"weather_storm: {e}")
