"""Diffusion forecast ensembles vs a perturbed-initial-condition MSE ensemble on the QG model.

Both models use the same backbone (the built-in 2-D UNet), the same data (the two-layer QG
model of `diffkit data weather qg`, pyqg's reference set-up), the same batch size and number of
optimiser steps; they differ only in ``model.objective``.  The DDPM ensemble draws ``members``
samples per step (GenCast-style); the baseline is the deterministic model run from perturbed
initial conditions (``perturb``, relative to each channel's climatological std).  Both are
scored the WeatherBench-2 way (`diffkit evaluate`) on a held-out year: fair CRPS, latitude-
weighted RMSE of the ensemble mean and spread/skill with the (M+1)/M correction, per lead time.

Targets: DDPM CRPS <= 0.9x the baseline's, and DDPM spread/skill in [0.8, 1.2] at every lead.

    python benchmarks/weather_qg.py --setting cpu --markdown docs/bench/weather_qg.md   # ~30 min, 2 cores
    python benchmarks/weather_qg.py --setting quick                                     # smoke test
    python benchmarks/weather_qg.py --setting gpu --device cuda
"""
from __future__ import annotations

import argparse
import json
import math
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = {
    "quick": dict(nx=32, spin_up=1.0, train_years=0.5, test_years=0.25, channels=16, mult=(1, 2), steps=200,
                  batch=16, members=4, nfe=6, lead=48, k=4, init_every_days=15, lr=1e-3),
    "cpu": dict(nx=64, spin_up=5.0, train_years=3.0, test_years=1.0, channels=16, mult=(1, 2, 2), steps=2000,
                batch=8, members=8, nfe=8, lead=48, k=8, init_every_days=20, lr=1e-3),
    "gpu": dict(nx=64, spin_up=5.0, train_years=20.0, test_years=2.0, channels=64, mult=(1, 2, 2, 2), steps=40000,
                batch=64, members=16, nfe=20, lead=48, k=10, init_every_days=5, lr=3e-4),
}
YEAR_H = 365 * 24.0
#: what the forecaster sees and predicts: the full model state, or only the upper layer (the lower
#: layer is unobserved, so the next upper-layer state is genuinely uncertain given the current one)
STATES = {
    "both": dict(levels=None, text="the streamfunction of both layers (the full model state: the dynamics are "
                                    "deterministic given it)"),
    "upper": dict(levels=[1], text="the upper-layer streamfunction only (the lower layer is unobserved, so the "
                                   "next state is uncertain given the current one, as in real forecasting)"),
}


def simulate(path: Path, s: dict, seed: int, progress: bool) -> None:
    from diffkit_weather import simulate_qg, to_dataset, write_netcdf

    n = int((s["train_years"] + s["test_years"]) * YEAR_H / 6) + 1
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # one 64^2 member: FFTs too small to gain from threads, and they slow down a lot
    try:                      # when another process shares the cores
        res = simulate_qg(1, n, nx=s["nx"], spin_up_years=s["spin_up"], seed=seed, fields=("psi",),
                          progress=progress)
    finally:
        torch.set_num_threads(threads)
    ds = to_dataset(res)
    ds["streamfunction"] = ds["streamfunction"].astype("float32")
    write_netcdf(ds, path)


def split_times(path: Path, s: dict) -> tuple[str, list[str], np.ndarray]:
    """The first test time (ISO) and the held-out init times, every init_every_days."""
    import xarray as xr

    with xr.open_dataset(path) as ds:
        t = ds["time"].values
    t0 = t[0] + np.timedelta64(int(s["train_years"] * YEAR_H), "h")
    last = t[-1] - np.timedelta64(int(s["lead"] * s["k"]), "h")
    inits = np.arange(t0 + np.timedelta64(int(s["lead"]), "h"), last + np.timedelta64(1, "h"),
                      np.timedelta64(int(s["init_every_days"] * 24), "h"))
    iso = lambda x: str(np.datetime_as_string(x, unit="m"))
    return iso(t0), [iso(x) for x in inits], t


def config(args, s: dict, data: Path, run_dir: Path, objective: str, test_start: str):
    from diffkit.config import config_from_dict

    return config_from_dict({
        "run_dir": str(run_dir),
        "data": {"adapter": "weather", "batch_size": s["batch"],
                 "options": {"path": str(data), "variables": ["streamfunction"], "lead": float(s["lead"]),
                             **({"levels": STATES[args.state]["levels"]} if STATES[args.state]["levels"] else {}),
                             "history": 1, "target": "residual", "val_slice": f"{test_start}/"}},
        "model": {"backbone": "unet", "objective": objective,
                  "options": {"channels": s["channels"], "channel_mult": list(s["mult"]), "num_res_blocks": 1,
                              "attn_levels": [], "mid_attn": False}},
        "trainer": {"steps": s["steps"], "lr": s["lr"], "warmup": min(200, s["steps"] // 10), "seed": args.seed,
                    "val_every": 0, "ckpt_every": 0, "log_every": 100, "ema_decay": 0.995},
        "sample": {"sampler": "dpmpp_2m", "nfe": s["nfe"]},
    })


def _train_seconds(log: Path, fallback: float) -> float:
    try:
        rows = [json.loads(line) for line in log.read_text().splitlines() if line.strip()]
        return max(float(r["elapsed_s"]) for r in rows if "elapsed_s" in r)
    except (OSError, ValueError):
        return fallback


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ddpm-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the DDPM only (repeatable), e.g. loss.weighting=simple or "
                         "trainer.steps=4000; its run gets its own folder, so with --workdir the data and the "
                         "finished baseline are reused")
    ap.add_argument("--state", choices=list(STATES), default="both",
                    help="both: the full QG state; upper: the upper layer only (partially observed)")
    ap.add_argument("--perturb", type=float, default=0.05, help="baseline IC perturbation (relative std)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None)
    ap.add_argument("--markdown", default=None)
    ap.add_argument("--json", default=None)
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    s = dict(SETTINGS[args.setting])
    if args.steps:
        s["steps"] = args.steps
    progress = not args.no_progress
    from diffkit.train import Trainer
    from diffkit_weather import evaluate as E
    from diffkit_weather import forecast as F

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    data = work / f"qg_{args.setting}.nc"
    if not data.exists():
        simulate(data, s, args.seed, progress)
    test_start, inits, _ = split_times(data, s)
    res: dict = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "setting": args.setting, "sizes": s,
                 "state": args.state,
                 "perturb": args.perturb, "n_init": len(inits), "test_start": test_start}
    for label, objective in (("DDPM", "diffusion"), ("MSE+perturbed IC", "regression")):
        tag = objective
        if objective == "diffusion" and args.ddpm_set:
            tag += "_" + "_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", o) for o in args.ddpm_set)
        cfg = config(args, s, data, work / f"run_{tag}", objective, test_start)
        if objective == "diffusion":
            res["ddpm_tag"], res["ddpm_set"] = tag, list(args.ddpm_set)
        if objective == "diffusion" and args.ddpm_set:
            from diffkit.config import apply_overrides

            cfg = apply_overrides(cfg, args.ddpm_set)
        t0 = time.time()
        tr = Trainer(cfg, device=args.device, progress=progress, resume=True)
        n_params = sum(p.numel() for p in tr.net.parameters())
        tr.fit()
        t_train = _train_seconds(Path(cfg.run_dir) / "metrics.jsonl", time.time() - t0)
        fc = F.load_forecaster(cfg.run_dir, device=tr.device)
        if objective == "diffusion":  # what the run actually used (unset keys resolved at training)
            from diffkit.samplers import get_sampler

            lc, sc = fc.config.loss, fc.config.sample
            res["resolved"] = dict(weighting=lc.weighting, noise=lc.noise, sampler=sc.sampler, nfe=sc.nfe,
                                   spacing=sc.spacing or get_sampler(sc.sampler).info.default_spacing)
        t0 = time.time()
        ist = F.initial_states(data, fc.layout, inits, steps=s["k"], options=fc.data_options)
        pred = F.forecast(fc, None, ist, steps=s["k"], members=s["members"], seed=args.seed,
                          perturb=None if objective == "diffusion" else args.perturb, progress=progress)
        fc_ds = F.forecast_dataset(pred, fc.layout, ist.times, attrs={"objective": objective, "seed": args.seed},
                                   options=fc.data_options)
        ev = E.evaluate(fc_ds, data, out=work / f"eval_{tag}", plots=True)
        t_eval = time.time() - t0
        sc = ev.scores
        res[label] = dict(params=n_params, train_s=t_train, eval_s=t_eval,
                          lead_hours=sc["lead_hours"].values.tolist(),
                          **{m: sc[m].mean("channel").values.tolist() for m in ("crps", "rmse", "spread",
                                                                                 "spread_skill_ratio")},
                          per_channel={m: sc[m].values.tolist() for m in ("crps", "rmse", "spread_skill_ratio")},
                          channels=[str(c) for c in sc["channel"].values])
        print(f"{label}: CRPS {np.round(res[label]['crps'], 2).tolist()}  spread/skill "
              f"{np.round(res[label]['spread_skill_ratio'], 2).tolist()} (train {t_train:.0f} s, eval {t_eval:.0f} s)",
              flush=True)
    d, b = res["DDPM"], res["MSE+perturbed IC"]
    ratio = (np.asarray(d["crps"]) / np.asarray(b["crps"])).tolist()
    ssr = np.asarray(d["spread_skill_ratio"])
    res["crps_ratio"] = ratio
    res["met"] = dict(crps=bool(max(ratio) <= 0.9), spread_skill=bool(((ssr >= 0.8) & (ssr <= 1.2)).all()))
    res["wall_s"] = time.time() - t_all
    print(f"CRPS DDPM / baseline per lead: {np.round(ratio, 3).tolist()} (target <= 0.9 at every lead: "
          f"{'met' if res['met']['crps'] else 'not met'}); DDPM spread/skill in [0.8, 1.2] at every lead: "
          f"{'met' if res['met']['spread_skill'] else 'not met'}; total {res['wall_s'] / 60:.1f} min")
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1))
    if args.markdown:
        write_markdown(res, Path(args.markdown), work)
    if tmp is not None:
        tmp.cleanup()
    return res


def _resolved(res: dict, s: dict) -> str:
    r = res.get("resolved")
    if r is None:
        return f"DPM-Solver++(2M) with {s['nfe']} NFE per step"
    return (f"{r['weighting']} weighting, {r['noise']} training noise levels, sampler {r['sampler']} "
            f"({r['spacing']} spacing) with {r['nfe']} NFE per step")


def write_markdown(res: dict, path: Path, work: Path) -> None:
    import shutil

    path.parent.mkdir(parents=True, exist_ok=True)
    s = res["sizes"]
    d, b = res["DDPM"], res["MSE+perturbed IC"]
    png = path.with_name(path.stem + "_lead_curves_ddpm.png")
    src = work / f"eval_{res.get('ddpm_tag', 'diffusion')}" / "lead_curves.png"
    if src.exists():
        shutil.copyfile(src, png)
    lines = [
        f"# QG forecast ensembles: DDPM vs perturbed-IC MSE baseline (`--setting {res['setting']}`)", "",
        f"Command: `python benchmarks/weather_qg.py {res['argv']}`  ",
        f"Total wall time: {res['wall_s'] / 60:.1f} min ({torch.get_num_threads()} torch threads).", "",
        f"Data: two-layer QG (pyqg reference set-up), {s['nx']}x{s['nx']}, 6-hourly, {s['spin_up']} spin-up years "
        f"discarded, {s['train_years']} years for training, the following {s['test_years']} year(s) held out; "
        f"state: {STATES[res.get('state', 'both')]['text']}; lead {s['lead']} h, residual target, forcings time of day and "
        f"day of year.  {res['n_init']} held-out initial times every {s['init_every_days']} days, {s['k']} steps "
        f"({s['k'] * s['lead'] // 24} days), {s['members']} members each.", "",
        f"Both models: UNet channels {s['channels']}, mult {list(s['mult'])}, {d['params'] / 1e6:.2f} M parameters, "
        f"batch {s['batch']}, {s['steps']} AdamW steps, lr {s['lr']}.  DDPM: v-prediction, cosine schedule, "
        f"{_resolved(res, s)}.  Baseline: the same network trained by "
        f"MSE (`model.objective = \"regression\"`), members from initial conditions perturbed by "
        f"{res['perturb']} x the climatological std."
        + (f"  DDPM config overrides: `{' '.join(res['ddpm_set'])}`." if res.get("ddpm_set") else ""), "",
        "Scores averaged over the channels (WeatherBench-2 conventions; `diffkit evaluate`):", "",
        "| lead (h) | CRPS DDPM | CRPS baseline | ratio | RMSE DDPM | RMSE baseline | spread/skill DDPM | spread/skill baseline |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for i, h in enumerate(d["lead_hours"]):
        lines.append(f"| {h:.0f} | {d['crps'][i]:.4g} | {b['crps'][i]:.4g} | {res['crps_ratio'][i]:.3f} | "
                     f"{d['rmse'][i]:.4g} | {b['rmse'][i]:.4g} | {d['spread_skill_ratio'][i]:.2f} | "
                     f"{b['spread_skill_ratio'][i]:.2f} |")
    m = res["met"]
    lines += ["", f"Targets: CRPS ratio <= 0.9 at every lead: **{'met' if m['crps'] else 'not met'}** "
              f"(max {max(res['crps_ratio']):.3f}, mean {np.mean(res['crps_ratio']):.3f}); DDPM spread/skill in "
              f"[0.8, 1.2] at every lead: **{'met' if m['spread_skill'] else 'not met'}**.", "",
              f"Training {d['train_s']:.0f} s (DDPM) and {b['train_s']:.0f} s (baseline); forecasting and scoring "
              f"{d['eval_s']:.0f} s and {b['eval_s']:.0f} s.", ""]
    if png.exists():
        lines += [f"![DDPM lead-time curves]({png.name})", ""]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


if __name__ == "__main__":
    main()
