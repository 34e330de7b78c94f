"""The weather section of ``diffkit quickstart``: QG forecast ensembles in about a minute and a half.

Simulates the two-layer quasi-geostrophic model on a 32 x 32 grid with pyqg's reference physics and
resolution (15.6 km; half the reference domain, L = 500 km, and a stronger initial PV that
shortens the spin-up), trains a GenCast-style conditional DDPM (the
streamfunction of both layers at t -> its change over 24 h), forecasts ensembles from held-out
initial times, writes them as CF netCDF and scores them the WeatherBench-2 way (`diffkit
evaluate`) against the simulated truth and against persistence.
"""
from __future__ import annotations

from pathlib import Path

SIZES = dict(nx=32, L=5e5, spin_up_years=1.0, ic_amplitude=3e-6, train_days=120, test_days=30, steps=300, batch=16,
             channels=16, members=6, n_init=4, lead_steps=4, lead_hours=24)


def calibration_rows(scores) -> list[tuple[str, str, str]]:
    """Report rows of a score dataset's calibration, per channel: spread/skill at every lead, the rank
    histogram (all leads, each bin / uniform) and the verdict of :func:`diffkit.ensemble.dispersion_verdict`."""
    from diffkit.ensemble import rank_summary

    from .evaluate import calibration

    rows = []
    for c, (ch, d) in enumerate(calibration(scores).items()):
        ss = " ".join(f"{x:.2f}" for x in scores["spread_skill_ratio"].values[c])
        rel, _ = rank_summary(scores["rank_histogram"].values[c])
        rows += [(f"spread/skill per lead, {ch}", ss,
                  f"at {', '.join(f'{h:g}' for h in scores['lead_hours'].values)} h"),
                 (f"rank histogram / uniform, {ch}", " ".join(f"{x:.2f}" for x in rel),
                  "all leads; 1 in every bin for a calibrated ensemble, U shape: under-dispersive"),
                 (f"dispersion, {ch}", d.verdict, str(d).split(": ", 1)[1])]
    return rows


def quickstart(out: Path, *, seed: int = 0, progress: bool = True):
    """QG model: simulate, train a DDPM forecaster, forecast ensembles, score them (CRPS, RMSE, spread/skill)"""
    import numpy as np
    import torch

    from diffkit.adapters import atomic_to_netcdf
    from diffkit.config import config_from_dict
    from diffkit.quickstart import Section
    from diffkit.train import Trainer

    from . import evaluate as E
    from .forecast import forecast, forecast_dataset, initial_states, load_forecaster, persistence, select_init_times
    from .qg import simulate_qg
    from .qg_netcdf import to_dataset, write_netcdf

    s = SIZES
    out = Path(out)
    n = int(round((s["train_days"] + s["test_days"]) * 4)) + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one small 2-D FFT per step: threads do not pay
    try:
        sim = simulate_qg(1, n, nx=s["nx"], L=s["L"], spin_up_years=s["spin_up_years"], ic_amplitude=s["ic_amplitude"],
                          seed=seed, fields=("psi",), progress=progress)
    finally:
        torch.set_num_threads(threads)
    ds = to_dataset(sim)
    ds["streamfunction"] = ds["streamfunction"].astype(np.float32)
    data = write_netcdf(ds, out / "qg.nc")
    t0 = ds["time"].values[0]
    day = lambda d: str(np.datetime_as_string(t0 + np.timedelta64(int(round(d * 24)), "h"), unit="D"))
    train_slice = [day(0), day(s["train_days"] - 1)]
    val_slice = [day(s["train_days"]), day(s["train_days"] + s["test_days"])]
    cfg = config_from_dict({
        "run_dir": str(out / "run"),
        "data": {"adapter": "weather", "batch_size": s["batch"],
                 "options": {"path": str(data), "variables": ["streamfunction"], "lead": s["lead_hours"],
                             "history": 1, "target": "residual", "forcings": [],
                             "train_slice": train_slice, "val_slice": val_slice}},
        "model": {"backbone": "unet", "options": {"channels": s["channels"], "channel_mult": [1, 2, 2],
                                                  "num_res_blocks": 1, "attn_levels": [], "mid_attn": False}},
        "trainer": {"steps": s["steps"], "lr": 1e-3, "warmup": s["steps"] // 10, "val_every": 0, "ckpt_every": 0,
                    "ema_decay": 0.99, "log_every": s["steps"] // 5, "seed": seed},
        "sample": {"sampler": "dpmpp_2m", "nfe": 10},
    })
    Trainer(cfg, progress=progress).fit()
    fc = load_forecaster(cfg.run_dir)
    K = s["lead_steps"]
    ok = select_init_times(ds["time"].values, fc.layout, "all-val", steps=K, val_slice=val_slice)
    inits = ds["time"].values[ok[np.linspace(0, len(ok) - 1, min(s["n_init"], len(ok))).round().astype(int)]]
    ist = initial_states(data, fc.layout, inits, steps=K, options=fc.data_options)
    pred = forecast(fc, None, ist, steps=K, members=s["members"], seed=seed, progress=progress)
    fds = forecast_dataset(pred, fc.layout, ist.times, options=fc.data_options,
                           attrs={"checkpoint": str(cfg.run_dir), "seed": seed})
    atomic_to_netcdf(fds, out / "forecast.nc")
    ev = E.evaluate(out / "forecast.nc", data, out=out, plots=True)
    pev = E.evaluate(forecast_dataset(persistence(ist, K), fc.layout, ist.times, options=fc.data_options), data, plots=False)
    sc, ps = ev.scores.mean("channel"), pev.scores.mean("channel")
    units = ds["streamfunction"].attrs.get("units", "")
    leads = sc["lead_hours"].values
    rows = []
    for k in sorted({0, K - 1}):
        h = f"{leads[k]:.0f} h"
        rows += [(f"ensemble-mean RMSE at {h}", f"{float(sc['rmse'][k]):.4g}",
                  f"{units}, latitude-weighted (persistence: {float(ps['rmse'][k]):.4g})"),
                 (f"fair CRPS at {h}", f"{float(sc['crps'][k]):.4g}", f"{units} (lower is better)"),
                 (f"spread/skill at {h}", f"{float(sc['spread_skill_ratio'][k]):.2f}",
                  "1 is a calibrated ensemble; < 1 under-dispersive")]
    rows += calibration_rows(ev.scores)
    figs = [Path(f) for f in ev.files if str(f).endswith(".png")]
    return Section(
        title="Weather: ensemble forecasts of a quasi-geostrophic model",
        summary=(f"The two-layer QG model ({s['nx']}x{s['nx']} over {s['L'] / 1e3:.0f} km, pyqg's reference physics and "
                 f"resolution) was simulated for "
                 f"{s['train_days'] + s['test_days']} days after a {s['spin_up_years']}-year spin-up and written as CF "
                 f"netCDF (`qg.nc`).  A conditional DDPM learnt the 24-hour change of both layers' streamfunction from "
                 f"the first {s['train_days']} days ({s['steps']} steps) and forecast {s['members']}-member ensembles "
                 f"from {len(inits)} held-out initial times for {K} days (`forecast.nc`: dims member, init_time, "
                 "lead_time, level, latitude, longitude).  Scores follow WeatherBench 2 (`scores.csv`); "
                 "the maps show the ensemble mean, spread and error of the first forecast.  The full-size job is "
                 "`examples/weather_qg.py` and `benchmarks/weather_qg.py` (docs/weather.md)."),
        rows=rows, figures=figs,
        files=[data, out / "forecast.nc", out / "scores.csv", Path(cfg.run_dir)],
        metrics={"rmse_first_lead": float(sc["rmse"][0]), "rmse_last_lead": float(sc["rmse"][-1]),
                 "crps_first_lead": float(sc["crps"][0]), "spread_skill_first_lead": float(sc["spread_skill_ratio"][0]),
                 "persistence_rmse_first_lead": float(ps["rmse"][0])},
    )
