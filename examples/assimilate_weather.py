"""Data assimilation on a two-layer quasi-geostrophic (QG) model: a diffusion forecaster guided by stations.

    python examples/assimilate_weather.py             # ~1.5 min of one CPU core; outputs in runs/assimilate_weather/
    python examples/assimilate_weather.py --quick     # reduced setting used in CI (~30 s of one core)

1. simulates the QG model (what `diffkit data weather qg` does; the settings of
   examples/weather_qg.py): a spin-up that is thrown away, then a 6-hourly record on a labelled
   lat-lon grid; the first part trains the model, the rest is held out and written once a day as
   the truth (CF netCDF);
2. trains a small GenCast-style conditional DDPM (the streamfunction of both layers at t -> its
   change over the next 24 h);
3. observes the held-out truth at stations, 5 % of the grid points at random positions, every day
   of a window, with noise of 0.05 x its climatological std
   (`diffkit data weather qg --observe-from ... --obs-fraction 0.05 --obs-form points`);
4. assimilates them with MMPS into an ensemble forecast from the truth one day before the window,
   and writes the unguided prior of the same forecast (`diffkit assimilate ... --no-guidance`);
5. scores both with `diffkit evaluate` (latitude-weighted ensemble-mean RMSE, spread/skill, per
   layer and lead), prints a table, writes report.json and a map figure (truth, the prior's and the
   analysis' errors, the analysis spread, the stations).

Steps 3-5 go through the command line (`diffkit.cli.main`, the same as typing the commands);
docs/observations.md and docs/assimilation.md describe them.
"""
from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

import numpy as np
import torch

from diffkit.cli import main as diffkit
from diffkit.config import config_from_dict
from diffkit.train import Trainer

SIX_HOURS = 6 * 3600.0
RUNS = ("prior", "mmps")


def settings(quick: bool) -> dict:
    """Simulation, training and assimilation settings of the CI (``quick``) and the default run."""
    # 32^2 over half pyqg's reference domain keeps its resolution; the stronger initial PV brings the flow near
    # equilibrium in a year (examples/weather_qg.py's quick setting)
    sim = dict(nx=32, L=5e5, spin_up_years=1.0, ic_amplitude=3e-6)
    if quick:
        return dict(sim=sim, train_days=90, channels=8, mult=[1, 2], steps=150, batch_size=16, window=4,
                    members=6, nfe=6)
    return dict(sim=sim, train_days=120, channels=16, mult=[1, 2, 2], steps=300, batch_size=16, window=8,
                members=8, nfe=8)


def run(argv: list[str]) -> None:
    """One diffkit command, as typed in a shell; a failure stops the example with its message."""
    rc = diffkit(argv)
    if rc != 0:
        raise SystemExit(f"`diffkit {' '.join(argv)}` failed (exit {rc})")


def _iso(t) -> str:
    return str(np.datetime_as_string(np.datetime64(t, "m"), unit="m"))


def near_stations(stations: Path, lat: np.ndarray, lon: np.ndarray) -> np.ndarray:
    """A (level, lat, lon) mask of the grid points around the stations: the four corners of the grid cell
    each station lies in (the stations are at the same positions at every time; both axes periodic)."""
    import xarray as xr

    with xr.open_dataset(stations) as s:
        first = s["time"].values == s["time"].values[0]
        slat, slon, slev = (s[c].values[first] for c in ("latitude", "longitude", "level"))
    levels = np.unique(slev)
    mask = np.zeros((len(levels), len(lat), len(lon)), dtype=bool)
    i = np.floor((slat - lat[0]) / (lat[1] - lat[0])).astype(int)
    j = np.floor(((slon - lon[0]) % 360.0) / (lon[1] - lon[0])).astype(int)
    k = np.searchsorted(levels, slev)
    for di in (0, 1):
        for dj in (0, 1):
            mask[k, (i + di) % len(lat), (j + dj) % len(lon)] = True
    return mask


def scores_near_stations(path: Path, truth_file: Path, mask: np.ndarray) -> dict:
    """Ensemble-mean RMSE per layer (diffkit.ensemble: over the grid at each lead, then the mean over the
    leads) at the grid points around the stations and away from them."""
    import xarray as xr

    from diffkit import ensemble

    with xr.open_dataset(path) as a, xr.open_dataset(truth_file) as d:
        members = torch.as_tensor(a["streamfunction"].values[:, 0])            # (member, lead, level, lat, lon)
        truth = torch.as_tensor(d["streamfunction"].sel(time=a["valid_time"].values[0]).values)
    m = torch.as_tensor(mask)
    per_lead = dict(dims=(-2, -1), sample_dims=(0,))                           # layout (lead, level, lat, lon)
    return {"rmse_near_stations": ensemble.ensemble_mean_rmse(members, truth, mask=m, **per_lead).tolist(),
            "rmse_away": ensemble.ensemble_mean_rmse(members, truth, mask=~m, **per_lead).tolist()}


def plot(out: Path, truth_file: Path, stations: Path, outputs: dict, lead: int = -1) -> Path:
    """Maps of the upper layer at one lead: truth, the errors of the prior and the analysis means (one
    colour scale), the analysis spread; the stations are dots."""
    import xarray as xr

    from diffkit.figures import new_figure, save_figure

    var = "streamfunction"
    with xr.open_dataset(outputs["prior"]) as p, xr.open_dataset(outputs["mmps"]) as a, \
            xr.open_dataset(truth_file) as d, xr.open_dataset(stations) as s:
        valid = a["valid_time"].values[0, lead]
        lat, lon = a["latitude"].values, a["longitude"].values
        truth = d[var].sel(time=valid).isel(level=0).values
        prior = p[f"{var}_ensemble_mean"].values[0, lead, 0]
        mean = a[f"{var}_ensemble_mean"].values[0, lead, 0]
        spread = a[f"{var}_ensemble_spread"].values[0, lead, 0]
        at = (s["time"].values == valid) & (s["level"].values == s["level"].values[0])    # one layer's stations
        slat, slon = s["latitude"].values[at], s["longitude"].values[at]
        units = str(d[var].attrs.get("units", ""))
        members = a.sizes["member"]
    e = float(max(np.abs(prior - truth).max(), np.abs(mean - truth).max())) or 1.0
    panels = [("truth", truth, dict(cmap="viridis")),
              ("prior mean - truth", prior - truth, dict(cmap="RdBu_r", vmin=-e, vmax=e)),
              ("MMPS mean - truth", mean - truth, dict(cmap="RdBu_r", vmin=-e, vmax=e)),
              ("MMPS spread", spread, dict(cmap="magma", vmin=0.0))]
    fig = new_figure(3.1 * len(panels) + 1.0, 3.4)
    axes = fig.subplots(1, len(panels), sharey=True)
    for ax, (title, field, kw) in zip(axes, panels):
        m = ax.pcolormesh(lon, lat, field, shading="nearest", rasterized=True, **kw)
        ax.scatter(slon, slat, s=6, c="k", marker="o", linewidths=0)
        ax.set_title(title, fontsize=9)
        ax.set_xlabel("longitude")
        fig.colorbar(m, ax=ax, shrink=0.85, label=units if title == "truth" else None)
    axes[0].set_ylabel("latitude")
    fig.suptitle(f"QG upper-layer streamfunction at {_iso(valid)}: {len(slat)} stations (dots), "
                 f"{members} members", fontsize=10)
    return save_figure(fig, out / "assimilation.png")


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--out", default="runs/assimilate_weather", help="output folder")
    ap.add_argument("--quick", action="store_true", help="shorter record, smaller model and window (CI)")
    ap.add_argument("--steps", type=int, default=None, help="training steps")
    ap.add_argument("--seed", type=int, default=0, help="seed of the simulation, the training and the ensembles")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    import xarray as xr

    from diffkit_weather import simulate_qg, to_dataset, write_netcdf

    t_start = time.time()
    s = settings(args.quick)
    steps = args.steps or s["steps"]
    W = s["window"]
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    progress = not args.no_progress
    quiet = [] if progress else ["--no-progress"]
    report: dict = {"setting": "quick" if args.quick else "default", "training_steps": steps,
                    "members": s["members"], "window_days": W}

    # 1. data: train_days of 6-hourly frames to train on, then W + 1 days held out (the truth)
    n_frames = 4 * (s["train_days"] + W + 1) + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)   # one small 2-D FFT per step: threads do not pay
    try:
        sim = simulate_qg(1, n_frames, out_every=SIX_HOURS, seed=args.seed, fields=("psi",), progress=progress,
                          **s["sim"])
    finally:
        torch.set_num_threads(threads)
    ds = to_dataset(sim)
    ds["streamfunction"] = ds["streamfunction"].astype(np.float32)
    data = write_netcdf(ds, out / "qg.nc")
    t0 = ds["time"].values[0]
    day = np.timedelta64(24, "h")
    train_end = t0 + (s["train_days"] - 1) * day
    truth_file = write_netcdf(ds.sel(time=slice(train_end + day, None)).isel(time=slice(None, None, 4)),
                              out / "qg_truth.nc")         # daily: the model steps once a day
    with xr.open_dataset(truth_file) as tf:
        times = tf["time"].values
    window = f"{_iso(times[1])},{_iso(times[W])}"           # frame 0 of the truth starts the forecast
    report["window"] = window

    # 2. the forecaster: a conditional DDPM of the 24-h change of both layers' streamfunction
    cfg = config_from_dict({
        "run_dir": str(out / "model"),
        "data": {"adapter": "weather", "batch_size": s["batch_size"],
                 "options": {"path": str(data), "variables": ["streamfunction"], "lead": 24, "history": 1,
                             "target": "residual", "forcings": [],
                             "train_slice": [_iso(t0), _iso(train_end)],
                             "val_slice": [_iso(train_end + day), _iso(times[-1])]}},
        "model": {"backbone": "unet", "objective": "diffusion",
                  "options": {"channels": s["channels"], "channel_mult": s["mult"], "num_res_blocks": 1,
                              "attn_levels": [], "mid_attn": False}},
        "trainer": {"steps": steps, "lr": 1e-3, "warmup": max(1, steps // 10), "val_every": 0, "ckpt_every": 0,
                    "ema_decay": 0.995, "log_every": max(1, steps // 5), "seed": args.seed},
        "sample": {"sampler": "dpmpp_2m", "nfe": s["nfe"]},
    })
    Trainer(cfg, progress=progress).fit()
    report["train_s"] = round(time.time() - t_start, 1)

    # 3. stations: 5 % of the grid points, at random positions, observed every day of the window
    stations = out / "stations.nc"
    run(["data", "weather", "qg", "--observe-from", str(truth_file), "--obs-window", window,
         "--obs-fraction", "0.05", "--obs-form", "points", "--obs-noise", "0.05", "--seed", str(args.seed + 1),
         "--out", str(stations)])

    # 4. the prior (no guidance) and the MMPS analysis of the same forecast: same members, seed and sampler
    common = ["assimilate", cfg.run_dir, "--obs", str(stations), "--init", str(truth_file), "--members",
              str(s["members"]), "--seed", str(args.seed), "--device", "cpu", *quiet]
    outputs = {name: out / f"{name}.nc" for name in RUNS}
    run([*common, "--no-guidance", "--out", str(outputs["prior"])])
    run([*common, "--method", "mmps", "--out", str(outputs["mmps"])])
    report["assimilate_s"] = round(time.time() - t_start - report["train_s"], 1)

    # 5. scores (diffkit evaluate: latitude-weighted, per layer and lead), table, figure
    for name, path in outputs.items():
        run(["evaluate", str(path), "--truth", str(truth_file), "--out", str(out / f"scores_{name}"), "--no-plots"])
        with xr.open_dataset(out / f"scores_{name}" / "scores.nc") as sc:
            # channel i: streamfunction at level i + 1 (the upper and the lower layer)
            report["channels"] = [f"layer {i + 1}" for i in range(sc.sizes["channel"])]
            report[name] = {c: {k: [float(v) for v in sc[k].values[i]] for k in
                                ("rmse", "spread", "spread_skill_ratio")} for i, c in enumerate(report["channels"])}
            report[name]["mean"] = {k: float(sc[k].mean()) for k in ("rmse", "spread", "spread_skill_ratio")}
            report["lead_hours"] = [float(h) for h in sc["lead_hours"].values]
    with xr.open_dataset(outputs["mmps"]) as a:
        near = near_stations(stations, a["latitude"].values, a["longitude"].values)
    for name, path in outputs.items():
        report[name].update(scores_near_stations(path, truth_file, near))
    plot(out, truth_file, stations, outputs)
    report["total_s"] = round(time.time() - t_start, 1)
    (out / "report.json").write_text(json.dumps(report, indent=1))

    with xr.open_dataset(stations) as st:
        n_obs = st.sizes["obs"]
    print(f"\nQG, {s['members']} members, {W} daily steps ({window}), {n_obs} station observations (both layers); "
          f"latitude-weighted ensemble-mean RMSE and spread/skill per layer, by lead:")
    print(f"{'':<22}" + "".join(f"{'RMSE ' + n:>14}{'spr/skill':>11}" for n in RUNS))
    for ch in report["channels"]:
        for k, h in enumerate(report["lead_hours"]):
            print(f"{ch + f' +{h:g} h':<22}" + "".join(
                f"{report[n][ch]['rmse'][k]:>14.4g}{report[n][ch]['spread_skill_ratio'][k]:>11.2f}" for n in RUNS))
    print(f"{'mean':<22}" + "".join(
        f"{report[n]['mean']['rmse']:>14.4g}{report[n]['mean']['spread_skill_ratio']:>11.2f}" for n in RUNS))
    print(f"ensemble-mean RMSE per layer (mean over the leads) at the {int(near[0].sum())} grid points around the "
          f"stations and at the {int((~near[0]).sum())} others:")
    for lev in range(near.shape[0]):
        print(f"{f'layer {lev + 1}':<22}" + "".join(
            f"{report[n]['rmse_near_stations'][lev]:>14.4g}{report[n]['rmse_away'][lev]:>11.4g}" for n in RUNS)
            + "   (near, away)")
    print(f"outputs in {out}/: qg.nc, qg_truth.nc, stations.nc, prior.nc, mmps.nc, scores_{{prior,mmps}}/, "
          f"assimilation.png, report.json ({report['total_s']:.0f} s)")
    return report


if __name__ == "__main__":
    main()
