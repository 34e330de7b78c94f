"""Diffusion forecast ensembles vs tuned baselines on the QG model.

Both models use the same backbone (the built-in 2-D UNet), the same data (the two-layer QG
model of `diffkit data weather qg`, pyqg's reference set-up, simulated fine and observed
coarse-grained; :func:`setup_data` is the one place that makes it and the oracle ensemble), the
same batch size and number of optimiser steps; they differ only in ``model.objective``.  Inputs:
the two latest states (history 2, GenCast-style), no date forcings (QG has no daily or seasonal
cycle).  The time axis is split into training, a validation period
and a held-out test period.  Forecasts, all scored alike the WeatherBench-2 way (`diffkit
evaluate`) on the test period -- fair CRPS, latitude-weighted RMSE of the ensemble mean,
spread/skill with the (M+1)/M correction and rank histograms, per lead time:

- DDPM: ``members`` samples per step (GenCast-style);
- MSE + perturbed IC: the MSE model run from initial conditions perturbed with spatially
  correlated noise (``perturb`` x each channel's std, correlation length ``perturb_length`` grid
  points), both tuned on the validation period by minimum fair CRPS at the first lead
  (:func:`diffkit.calibrate.tune_perturbation`; ``--perturb`` fixes them instead);
- MSE: the unperturbed MSE forecast (one member, repeated: CRPS = MAE, spread 0);
- persistence (the initial state at every lead, repeated likewise);
- climatology: ``members`` states drawn at random from the training period for each init time.

- oracle: the simulator's own ensemble (the data are a fine model observed coarse-grained; from each
  held-out init time, ``members`` fine states that agree with the observed coarse history, re-run and
  coarse-grained: the true conditional spread).  Its sub-grid scales at the init are made by the fine
  model itself: members start one lead before the init (the forecasters' other history state) from
  the observed coarse state plus sub-grid scales drawn from training-period states, are run to the
  init, where the observed coarse state is inserted (their own sub-grid scales kept);
- oracle, clim. sub-grid: the same with the sub-grid scales drawn at the init itself from the
  climatology (ignoring the history: the oracle before; over-spread for a history-2 forecaster).

Targets (issue 14), each printed as a PASS/FAIL line: DDPM spread within +-20 % of the oracle's at
the first lead; DDPM spread/skill in [0.8, 1.2] at every lead up to 8 steps; DDPM CRPS <= 0.9x the
tuned baseline's at every lead up to 5 days and <= 1.0x at every lead; DDPM rank histogram bins in
[0.5, 1.5] x uniform; and the data's test / train state and tendency std within 5 %.

    python benchmarks/weather_qg.py --setting cpu --markdown docs/bench/weather_qg.md   # ~30 min, 2 cores
    python benchmarks/weather_qg.py --setting quick                                     # smoke test
    python benchmarks/weather_qg.py --setting gpu --device cuda
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

#: val_years: the validation period between training and test (the baseline's perturbation is tuned
#: there, from an initial state every val_every_days); amplitudes x lengths: the tuning grid
#: (perturb in units of each channel's std, perturb_length in grid points).  The data: the model runs
#: on nx_sim^2 and is observed coarse-grained on nx^2 (spectral truncation; the sub-grid scales are
#: unseen, so the next observed state is uncertain); spin_up years are run on spin_nx^2 and, where that
#: is coarser than nx_sim, refined and adjusted for adjust_years on nx_sim^2 before recording; the
#: oracle's sub-grid climatology is a pool of at most pool fine states from the training period
#: (observing 64^2 on 32^2 cuts at |k| < 16, beyond the deformation wavenumber ~10.6: the oracle is
#: calibrated, spread/skill 1.03-1.1; 32^2 on 16^2 cuts the deformation scale itself and its
#: climatological sub-grid draws make an ensemble mean worse than persistence, so no setting uses it)
SETTINGS = {
    "quick": dict(nx=32, nx_sim=64, spin_nx=32, spin_up=3.0, adjust_years=0.3, pool=60, train_years=0.5,
                  val_years=0.1, test_years=0.25, channels=16, mult=(1, 2),
                  steps=200, batch=16, members=4, nfe=6, lead=48, k=4, init_every_days=15, val_every_days=4,
                  lr=1e-3, amplitudes=(0.003, 0.01, 0.03, 0.1, 0.3), lengths=(0.0, 2.0)),
    "cpu": dict(nx=32, nx_sim=64, spin_nx=32, spin_up=4.0, adjust_years=0.3, pool=150, train_years=3.0,
                val_years=1.0, test_years=1.0, channels=16, mult=(1, 2, 2),
                steps=2000, batch=8, members=8, nfe=8, lead=48, k=8, init_every_days=20, val_every_days=4,
                lr=1e-3, amplitudes=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5), lengths=(0.0, 1.0, 2.0, 4.0)),
    "gpu": dict(nx=32, nx_sim=128, spin_nx=32, spin_up=5.0, adjust_years=0.3, pool=200, train_years=20.0,
                val_years=1.0, test_years=2.0, channels=64,
                mult=(1, 2, 2, 2), steps=40000, batch=64, members=16, nfe=20, lead=48, k=10, init_every_days=5,
                val_every_days=2, lr=3e-4, amplitudes=(0.002, 0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5),
                lengths=(0.0, 1.0, 2.0, 4.0)),
}
HISTORY = 2
#: the forecasts scored, in table order; "MSE+perturbed IC" is the tuned baseline, "oracle" the
#: simulator's own conditional ensemble (the target spread)
LABELS = ("DDPM", "MSE+perturbed IC", "MSE", "persistence", "climatology", "oracle", "oracle, clim. sub-grid")
#: the oracles: "oracle" is history-consistent (the sub-grid scales at the init are made by the fine
#: dynamics from the observed coarse state HISTORY - 1 leads earlier, with the observation inserted
#: at the init: what a forecaster that sees the same HISTORY coarse states can know); "oracle, clim.
#: sub-grid" draws the sub-grid scales at the init from the climatology, ignoring the history (the
#: oracle before; over-spread for a history-2 forecaster)
ORACLES = {"oracle": "psi", "oracle, clim. sub-grid": "psi_clim"}
START = "2000-01-01T00:00:00"   # frame 0 of the data file (to_dataset's default)
YEAR_H = 365 * 24.0
#: what the forecaster sees and predicts: the observed (coarse-grained) streamfunction of both layers,
#: or only the upper layer (the lower layer unobserved too)
STATES = {
    "both": dict(levels=None, text="the coarse-grained streamfunction of both layers (the sub-grid scales are "
                                    "unseen, so the next observed state is uncertain given the current one)"),
    "upper": dict(levels=[1], text="the coarse-grained upper-layer streamfunction only (the sub-grid scales and "
                                   "the lower layer are unseen)"),
}


def oracle_insertions(s: dict) -> tuple[int, int]:
    """(every, count): the history-consistent oracle inserts the observed coarse state every ``every``
    6-hourly frames at ``count`` times before the init (and at the init).  Default: one lead back, the
    forecasters' other input state (``oracle_window_h`` = ``oracle_every_h`` = lead); a longer window
    at a shorter interval uses more of the observed past than the forecasters see (a lower bound on
    their attainable spread, where the sub-grid scales synchronise with the resolved flow)."""
    every_h = float(s.get("oracle_every_h") or s["lead"])
    window_h = float(s.get("oracle_window_h") or s["lead"] * (HISTORY - 1))
    if every_h % 6 or window_h % every_h or window_h < every_h:
        raise SystemExit(f"--oracle-every-hours must be a multiple of 6 dividing --oracle-window-hours, "
                         f"got {every_h:g} and {window_h:g}")
    return int(every_h // 6), int(window_h // every_h)


def setup_data(work: Path, setting: str, s: dict, seed: int, progress: bool, device=None) -> tuple[Path, Path]:
    """THE DATA SET-UP: the one place that makes the benchmark's data (issue 14).  The two-layer QG
    model runs on ``nx_sim^2`` and is observed coarse-grained on ``nx^2``; from the fine state at each
    held-out init time, :func:`~diffkit_weather.qg_oracle.oracle_ensemble` re-runs the fine model from
    ``members`` fine states that agree with the observation (sub-grid scales from a pool of training-
    period states) for ``k`` leads.  Returns the 6-hourly netCDF file (variable ``streamfunction`` on
    the coarse grid, ``train_years + val_years + test_years`` after the spin-up) and an ``.npz`` with
    the oracle's coarse streamfunction ``psi`` (n_init, members, k + 1, 2, nx, nx) and its
    ``init_times``; both are reused when present."""
    data = work / f"qg_{setting}_obs{s['nx']}of{s['nx_sim']}.nc"
    every, count = oracle_insertions(s)
    oracle = work / (f"oracle_{setting}_obs{s['nx']}of{s['nx_sim']}_m{s['members']}_k{s['k']}"
                     f"_ins{count}x{every * 6}h.npz")
    if not (data.exists() and oracle.exists()):
        simulate(data, oracle, s, seed, progress, device)
    return data, oracle


#: the coarse spin-ups this process has run, by (spin_nx, spin_up, nx_sim, seed, device): the test suite's
#: two QG benchmark runs (this file's quick setting, assimilation_qg.py's ci setting) share the same one
_SPUN_UP: dict = {}


def spun_up(s: dict, seed: int, device=None, progress: bool = False) -> torch.Tensor:
    """The spin-up's final PV, ``spin_up`` years on ``spin_nx^2`` refined to ``nx_sim^2`` (deterministic
    for its key, so it is run once per process and a copy returned after that)."""
    from diffkit_weather.qg import simulate_qg
    from diffkit_weather.qg_coarse import refine

    key = (s["spin_nx"], float(s["spin_up"]), s["nx_sim"], int(seed), str(device))
    if key not in _SPUN_UP:
        _SPUN_UP[key] = refine(simulate_qg(1, 1, nx=s["spin_nx"], spin_up_years=s["spin_up"], seed=seed, fields=(),
                                           device=device, progress=progress)["q_final"], s["nx_sim"])
    return _SPUN_UP[key].clone()


def simulate(path: Path, oracle_path: Path, s: dict, seed: int, progress: bool, device=None) -> None:
    import os

    from diffkit_weather.qg import simulate_qg, to_dataset, write_netcdf
    from diffkit_weather.qg_oracle import oracle_ensemble

    n = int((s["train_years"] + s["val_years"] + s["test_years"]) * YEAR_H / 6) + 1
    t = np.datetime64(START, "ns") + np.arange(n) * np.timedelta64(6, "h")
    sp = _splits(t, s)
    frame = lambda x: int((np.datetime64(x, "ns") - t[0]) // np.timedelta64(6, "h"))
    inits = [frame(x) for x in sp["inits"]]
    train = [frame(x) for x in sp["train_times"]]
    pick = np.linspace(0, len(train) - 1, min(s["pool"], len(train))).round().astype(int)
    pool = [train[i] for i in np.unique(pick)]        # evenly spread over the training period
    every, count = oracle_insertions(s)
    hist = [[f - every * j for j in range(count, 0, -1)] for f in inits]   # oldest first, per init
    frames = inits + pool + sorted({f for h in hist for f in h})
    threads = torch.get_num_threads()
    if device is None or str(device) == "cpu":
        torch.set_num_threads(1)  # one small member: FFTs too small to gain from threads, and they slow down
    try:                          # a lot when another process shares the cores
        q0, spin = None, s["spin_up"]
        if s["spin_nx"] < s["nx_sim"]:   # equilibrate cheaply on the coarser grid, then let the small scales adjust
            q0 = spun_up(s, seed, device, progress)
            spin = s["adjust_years"]
        res = simulate_qg(1, n, nx=s["nx_sim"], observe=s["nx"], spin_up_years=spin, q0=q0, seed=seed,
                          fields=("psi",), fine_frames=frames, device=device, progress=progress)
        qf = res["q_fine"][0]
        at = {f: i for i, f in enumerate(frames)}
        kw = dict(observe=s["nx"], lead=s["lead"] * 3600.0, params=res["params"], fields=("psi",), seed=seed,
                  device=device, progress=progress)
        q_init, q_pool = qf[:len(inits)], qf[len(inits):len(inits) + len(pool)]
        o_clim = oracle_ensemble(q_init, q_pool, s["members"], s["k"],
                                 exclude=[j for j, f in enumerate(pool) if f in inits], **kw)
        q_hist = torch.stack([qf[[at[f] for f in h]] for h in hist])          # (n_init, HISTORY - 1, 2, n, n)
        o = oracle_ensemble(q_init, q_pool, s["members"], s["k"], history=q_hist,
                            history_step=every * 6 * 3600.0,
                            exclude=[j for j, f in enumerate(pool) if f in inits or f in set(sum(hist, []))],
                            **kw)
    finally:
        torch.set_num_threads(threads)
    ds = to_dataset(res, start=START)
    ds["streamfunction"] = ds["streamfunction"].astype("float32")
    write_netcdf(ds, path)
    tmp = oracle_path.with_name(f".{oracle_path.stem}.tmp.npz")
    np.savez(tmp, psi=o["psi"].detach().cpu().numpy().astype(np.float32),
             psi_clim=o_clim["psi"].detach().cpu().numpy().astype(np.float32), init_times=np.asarray(sp["inits"]),
             n_pool=len(pool))
    os.replace(tmp, oracle_path)


def oracle_forecast(oracle: Path, ist, inits: list, levels, key: str = "psi") -> torch.Tensor:
    """The oracle ensemble as a forecast ``(N, M, K, C, lat, lon)`` like :func:`forecast`'s (leads
    1..K), its channels the layers the runs see (``levels``: the ``levels`` option, None = both);
    checked against the observed initial states (lead 0 of every member is the observation)."""
    z = np.load(oracle)
    if list(z["init_times"]) != list(inits):
        raise RuntimeError(f"{oracle} was made for other init times; delete it (and the data file) to remake both")
    psi = torch.from_numpy(z[key])                                     # (N, M, K + 1, 2, lat, lon)
    psi = psi[:, :, :, [int(v) - 1 for v in (levels or (1, 2))]]      # level 1 = upper = layer index 0
    x0, obs = psi[:, :, 0].double(), ist.history[:, -1][:, None].double()
    err = float((x0 - obs).abs().max() / obs.std())
    if err > 1e-3:
        raise RuntimeError(f"the oracle's lead 0 differs from the observed initial states by {err:.2g} std: "
                           f"channel mapping or init times wrong")
    return psi[:, :, 1:]


def iso(x) -> str:
    return str(np.datetime_as_string(x, unit="m"))


def split_times(path: Path, s: dict) -> dict:
    """:func:`_splits` of the data file's time axis."""
    import xarray as xr

    with xr.open_dataset(path) as ds:
        return _splits(ds["time"].values, s)


def _splits(t: np.ndarray, s: dict) -> dict:
    """The splits of the time axis ``t``: ``train`` (ISO start/end of the training pairs),
    ``val_start``, ``test_start``, the held-out init times ``inits`` (every init_every_days), the
    validation init times ``val_inits`` (every val_every_days, their lead inside the validation
    period) and the training times ``train_times`` (for the climatology and the oracle's pool)."""
    h = lambda x: np.timedelta64(int(round(x)), "h")
    lead, back = h(s["lead"]), h(s["lead"] * (HISTORY - 1))
    v0 = t[0] + h(s["train_years"] * YEAR_H)
    t0 = v0 + h(s["val_years"] * YEAR_H)
    last = t[-1] - h(s["lead"] * s["k"])
    inits = np.arange(t0 + lead + back, last + h(1), h(s["init_every_days"] * 24))
    val_inits = np.arange(v0 + lead + back, t0 - lead + h(1), h(s["val_every_days"] * 24))
    train_end = v0 - lead - h(6)                      # no training target inside the validation period
    train_times = t[(t >= t[0] + back) & (t <= train_end)]
    return dict(train=f"{iso(t[0])}/{iso(train_end)}", val_start=iso(v0), test_start=iso(t0),
                inits=[iso(x) for x in inits], val_inits=[iso(x) for x in val_inits], train_times=train_times)


def stationarity(path: Path, sp: dict, s: dict) -> dict:
    """:func:`~diffkit_weather.qg_oracle.stationarity_report` of the training and test periods: per layer,
    the test / train ratio of the state std and of the ``lead``-tendency std (target: within 5 %)."""
    import xarray as xr

    from diffkit_weather.qg_oracle import stationarity_report

    with xr.open_dataset(path) as ds:
        t = ds["time"].values
        tr0, tr1 = sp["train"].split("/")
        return stationarity_report(ds[["streamfunction"]], (tr0, tr1), (sp["test_start"], iso(t[-1])),
                                   lag=int(round(s["lead"] / 6)))


def config(args, s: dict, data: Path, run_dir: Path, objective: str, sp: dict):
    from diffkit.config import config_from_dict

    return config_from_dict({
        "run_dir": str(run_dir),
        "data": {"adapter": "weather", "batch_size": s["batch"],
                 "options": {"path": str(data), "variables": ["streamfunction"], "lead": float(s["lead"]),
                             **({"levels": STATES[args.state]["levels"]} if STATES[args.state]["levels"] else {}),
                             "history": HISTORY, "forcings": [], "target": "residual",
                             "train_slice": sp["train"], "val_slice": f"{sp['val_start']}/"}},
        "model": {"backbone": "unet", "objective": objective,
                  "options": {"channels": s["channels"], "channel_mult": list(s["mult"]), "num_res_blocks": 1,
                              "attn_levels": [], "mid_attn": False}},
        "trainer": {"steps": s["steps"], "lr": s["lr"], "warmup": min(200, s["steps"] // 10), "seed": args.seed,
                    "val_every": 0, "ckpt_every": 0, "log_every": 100, "ema_decay": 0.995},
        "sample": {"sampler": "dpmpp_2m", "nfe": s["nfe"]},
    })


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="cpu")
    ap.add_argument("--steps", type=int, default=None)
    ap.add_argument("--ddpm-set", action="append", default=[], metavar="KEY=VALUE",
                    help="config override for the DDPM only (repeatable), e.g. loss.weighting=simple or "
                         "trainer.steps=4000; its run gets its own folder, so with --workdir the data and the "
                         "finished baseline are reused")
    ap.add_argument("--state", choices=list(STATES), default="both",
                    help="both: both layers (coarse-grained); upper: the upper layer only")
    ap.add_argument("--perturb", type=float, default=None,
                    help="baseline IC perturbation (relative std); default: tuned on the validation period")
    ap.add_argument("--perturb-length", type=float, default=0.0,
                    help="with --perturb: its correlation length in grid points (default 0: white)")
    ap.add_argument("--oracle-window-hours", type=float, default=None,
                    help="the history-consistent oracle inserts the observed coarse state over this many hours "
                         "before the init (default: one lead, the forecasters' other history state)")
    ap.add_argument("--oracle-every-hours", type=float, default=None,
                    help="... every this many hours (a multiple of 6; default: one lead)")
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
    s["oracle_window_h"], s["oracle_every_h"] = args.oracle_window_hours, args.oracle_every_hours
    oracle_insertions(s)
    progress = not args.no_progress
    from diffkit.train import Trainer, training_seconds
    from diffkit_weather import evaluate as E
    from diffkit_weather import forecast as F

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    data, oracle = setup_data(work, args.setting, s, args.seed, progress, device=args.device)
    sp = split_times(data, s)
    inits = sp["inits"]
    from diffkit_weather.qg_oracle import format_stationarity

    stat = stationarity(data, sp, s)
    print(f"stationarity, test / train ({s['test_years']:g} vs {s['train_years']:g} years, {s['lead']:g} h "
          f"tendency):\n{format_stationarity(stat)}\n{_pf(stat['stationary'])} stationarity: state and tendency std "
          f"of the test period within 5 % of the training period's (max |ratio - 1| {stat['max_deviation']:.3f})"
          + ("" if stat["stationary"] or args.setting != "quick" else
             "; the quick setting's 0.25-year test window cannot meet this (its own variability is 8-23 %)"),
          flush=True)
    res: dict = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "setting": args.setting, "sizes": s,
                 "state": args.state, "history": HISTORY, "forcings": [], "stationarity": stat,
                 "n_init": len(inits), "n_val_init": len(sp["val_inits"]), "test_start": sp["test_start"],
                 "val_start": sp["val_start"], "train": sp["train"]}
    K, Mm = s["k"], s["members"]
    fcs = {}
    for objective in ("diffusion", "regression"):
        tag = objective
        if objective == "diffusion" and args.ddpm_set:
            tag += "_" + "_".join(re.sub(r"[^A-Za-z0-9.=-]+", "-", o) for o in args.ddpm_set)
        cfg = config(args, s, data, work / f"run_{tag}", objective, sp)
        if objective == "diffusion":
            res["ddpm_tag"], res["ddpm_set"] = tag, list(args.ddpm_set)
        if objective == "diffusion" and args.ddpm_set:
            from diffkit.config import apply_overrides

            cfg = apply_overrides(cfg, args.ddpm_set)
        t0 = time.time()
        tr = Trainer(cfg, device=args.device, progress=progress, resume=True)
        n_params = sum(p.numel() for p in tr.net.parameters())
        tr.fit()
        t_train = training_seconds(cfg.run_dir, time.time() - t0)
        fc = F.load_forecaster(cfg.run_dir, device=tr.device)
        fcs[objective] = (fc, tag, n_params, t_train)
        if objective == "diffusion":  # what the run actually used (unset keys resolved at training)
            from diffkit.registry import resolve

            lc, sc = fc.config.loss, fc.config.sample
            res["resolved"] = dict(weighting=lc.weighting, noise=lc.noise, sampler=sc.sampler, nfe=sc.nfe,
                                   spacing=sc.spacing or resolve("sampler", sc.sampler).info.default_spacing)

    # the baseline's perturbation: tuned on the validation period (minimum fair CRPS at the first lead)
    reg = fcs["regression"][0]
    t0 = time.time()
    if args.perturb is None:
        from diffkit.calibrate import tune_perturbation

        ist_val = F.initial_states(data, reg.layout, sp["val_inits"], options=reg.data_options)
        lead = np.timedelta64(int(s["lead"]), "h")
        truth_times = [iso(np.datetime64(t) + lead) for t in sp["val_inits"]]
        truth_val = F.initial_states(data, reg.layout, truth_times, options=reg.data_options).history[:, -1]
        tun = tune_perturbation(reg.model, ist_val.history, truth_val, steps=1, members=Mm,
                                amplitudes=s["amplitudes"], lengths=s["lengths"], metric="crps", seed=args.seed,
                                forecast=lambda **kw: F.forecast(reg, None, ist_val, **kw))
        perturb, perturb_length = tun.amplitude, tun.length
        res["tuning"] = dict(metric="crps", lead_hours=s["lead"], n_init=len(sp["val_inits"]), table=tun.table,
                             markdown=tun.markdown(), seconds=time.time() - t0)
        print(f"tuned on {len(sp['val_inits'])} validation init times: perturb {perturb:g}, perturb_length "
              f"{perturb_length:g} grid points ({time.time() - t0:.0f} s)\n{tun.markdown()}", flush=True)
    else:
        perturb, perturb_length = args.perturb, args.perturb_length
    res["perturb"], res["perturb_length"] = perturb, perturb_length

    ist = F.initial_states(data, reg.layout, inits, steps=K, options=reg.data_options)
    rng = np.random.default_rng(args.seed)
    for label in LABELS:
        objective = "diffusion" if label == "DDPM" else "regression"
        fc, tag, n_params, t_train = fcs[objective]
        t0 = time.time()
        if label == "DDPM":
            pred = F.forecast(fc, None, ist, steps=K, members=Mm, seed=args.seed, perturb=None, progress=progress)
        elif label == "MSE+perturbed IC":
            pred = F.forecast(fc, None, ist, steps=K, members=Mm, seed=args.seed, perturb=perturb,
                              perturb_length=perturb_length, progress=progress)
        elif label == "MSE":
            pred = F.forecast(fc, None, ist, steps=K, members=1, seed=args.seed, perturb=0, progress=progress)
        elif label == "persistence":
            pred = F.persistence(ist, K)
        elif label in ORACLES:
            pred = oracle_forecast(oracle, ist, inits, STATES[args.state]["levels"], ORACLES[label])
        else:                 # climatology: members states drawn from the training period per init time
            pick = rng.choice(len(sp["train_times"]), size=len(inits) * Mm, replace=False)
            cl = F.initial_states(data, reg.layout, [iso(x) for x in sp["train_times"][pick]],
                                  options=reg.data_options).history[:, -1]
            pred = cl.reshape(len(inits), Mm, 1, *cl.shape[1:]).expand(-1, -1, K, *cl.shape[1:])
        if pred.shape[1] == 1:  # a deterministic forecast as M equal members: fair CRPS = MAE, spread 0
            pred = pred.expand(-1, Mm, *pred.shape[2:])
        fc_ds = F.forecast_dataset(pred.contiguous(), fc.layout, ist.times, options=fc.data_options,
                                   attrs={"objective": "simulator" if label in ORACLES else objective,
                                          "seed": args.seed, "forecast": label})
        key = tag if label == "DDPM" else re.sub(r"[^A-Za-z0-9]+", "_", label).strip("_").lower()
        ev = E.evaluate(fc_ds, data, out=work / f"eval_{key}", plots=label == "DDPM")
        t_eval = time.time() - t0
        sc = ev.scores
        rh = sc["rank_histogram"].sum("channel").values.astype(np.float64)       # (lead, M + 1)
        rh = rh / rh.sum(-1, keepdims=True) * rh.shape[-1]                        # 1 = uniform
        res[label] = dict(params=n_params if label not in ORACLES else 0,
                          train_s=t_train if label.startswith(("DDPM", "MSE")) else 0.0,
                          eval_s=t_eval, lead_hours=sc["lead_hours"].values.tolist(),
                          **{m: sc[m].mean("channel").values.tolist() for m in ("crps", "rmse", "spread",
                                                                                 "spread_skill_ratio")},
                          rank_histogram=rh.tolist(), rank_min=rh.min(-1).tolist(), rank_max=rh.max(-1).tolist(),
                          per_channel={m: sc[m].values.tolist() for m in ("crps", "rmse", "spread_skill_ratio")},
                          channels=[str(c) for c in sc["channel"].values])
        print(f"{label}: CRPS {np.round(res[label]['crps'], 3).tolist()}  spread/skill "
              f"{np.round(res[label]['spread_skill_ratio'], 2).tolist()} (eval {t_eval:.0f} s)", flush=True)
    d, b = res["DDPM"], res["MSE+perturbed IC"]
    ratio = (np.asarray(d["crps"]) / np.asarray(b["crps"])).tolist()
    ssr = np.asarray(d["spread_skill_ratio"])
    lead_h = np.asarray(d["lead_hours"])
    res["crps_ratio"] = ratio
    res["spread_oracle_ratio"] = d["spread"][0] / res["oracle"]["spread"][0]
    res["met"] = dict(
        oracle_spread=bool(abs(res["spread_oracle_ratio"] - 1) <= 0.2),
        spread_skill=bool(((ssr[:8] >= 0.8) & (ssr[:8] <= 1.2)).all()),
        crps_5d=bool((np.asarray(ratio)[lead_h <= 120] <= 0.9).all()),
        crps=bool(max(ratio) <= 1.0),
        rank=bool(min(d["rank_min"]) >= 0.5 and max(d["rank_max"]) <= 1.5),
        stationarity=bool(stat["stationary"]))
    res["wall_s"] = time.time() - t_all
    print(f"DDPM one-step spread / oracle spread at {lead_h[0]:g} h: {res['spread_oracle_ratio']:.3f} "
          f"(target 0.8-1.2); oracle spread/skill per lead "
          f"{np.round(res['oracle']['spread_skill_ratio'], 2).tolist()}")
    print(f"CRPS DDPM / tuned baseline per lead: {np.round(ratio, 3).tolist()}")
    for line in verdicts(res):
        print(line)
    print(f"total {res['wall_s'] / 60:.1f} min", flush=True)
    if args.json:
        Path(args.json).write_text(json.dumps(res, indent=1, default=float))
    if args.markdown:
        write_markdown(res, Path(args.markdown), work)
    if tmp is not None:
        tmp.cleanup()
    return res


def _pf(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def verdicts(res: dict) -> list[str]:
    """One PASS/FAIL line per issue-14 QG target (and the stationarity check), with the numbers."""
    d, m = res["DDPM"], res["met"]
    ssr = np.asarray(d["spread_skill_ratio"])[:8]
    lead_h, ratio = np.asarray(d["lead_hours"]), np.asarray(res["crps_ratio"])
    five = ratio[lead_h <= 120]
    return [
        f"{_pf(m['oracle_spread'])} DDPM spread within +-20 % of the oracle spread at the first lead "
        f"({lead_h[0]:g} h): ratio {res['spread_oracle_ratio']:.3f}",
        f"{_pf(m['spread_skill'])} DDPM spread/skill in [0.8, 1.2] at every lead up to 8 steps: "
        f"{ssr.min():.2f} - {ssr.max():.2f}",
        f"{_pf(m['crps_5d'])} DDPM fair CRPS <= 0.9 x the tuned perturbed-IC baseline at every lead up to 5 days: "
        f"max ratio {five.max():.3f}" if five.size else f"{_pf(m['crps_5d'])} (no lead up to 5 days)",
        f"{_pf(m['crps'])} DDPM fair CRPS <= 1.0 x the tuned perturbed-IC baseline at every lead: "
        f"max ratio {ratio.max():.3f}",
        f"{_pf(m['rank'])} DDPM rank histogram bins within [0.5, 1.5] x uniform: "
        f"{min(d['rank_min']):.2f} - {max(d['rank_max']):.2f}",
        f"{_pf(m['stationarity'])} stationarity: test / train std within 5 %: max |ratio - 1| "
        f"{res['stationarity']['max_deviation']:.3f}",
    ]


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
    from diffkit_weather.qg_oracle import format_stationarity

    st = res["stationarity"]
    tuned = "tuning" in res
    lines = [
        f"# QG forecast ensembles: DDPM vs tuned baselines (`--setting {res['setting']}`)", "",
        f"Command: `python benchmarks/weather_qg.py {res['argv']}`  ",
        f"Total wall time: {res['wall_s'] / 60:.1f} min ({torch.get_num_threads()} torch threads).", "",
        f"Data: two-layer QG (pyqg reference set-up) simulated on {s['nx_sim']}x{s['nx_sim']} and observed "
        f"coarse-grained on {s['nx']}x{s['nx']} (spectral truncation: the sub-grid scales are unseen), 6-hourly, "
        f"{s['spin_up']} spin-up years on {s['spin_nx']}x{s['spin_nx']}"
        + (f" and {s['adjust_years']} on {s['nx_sim']}x{s['nx_sim']}" if s['spin_nx'] < s['nx_sim'] else "")
        + f" discarded, then {s['train_years']} years for training, {s['val_years']} for validation (the baseline's "
        f"tuning) and {s['test_years']} held out; state: {STATES[res.get('state', 'both')]['text']}; lead "
        f"{s['lead']} h, residual target, history {res['history']} states, no forcings.  Oracle: the simulator's "
        f"own ensemble from each held-out init time ({s['members']} fine states that agree with the observed "
        f"coarse history, re-run on {s['nx_sim']}x{s['nx_sim']} and coarse-grained): the members start "
        f"{oracle_insertions(s)[0] * 6 * oracle_insertions(s)[1]} h before the init from the observed coarse state "
        f"there plus sub-grid scales drawn from {s['pool']} training-period states, run to the init with the "
        f"observed coarse state inserted every {oracle_insertions(s)[0] * 6} h and at the init (their own sub-grid "
        f"scales kept; `oracle_ensemble(history=...)`); 'oracle, clim. "
        f"sub-grid' draws the sub-grid scales at the init instead (ignoring the history, as before this change).  "
        f"Stationarity, test / train (max |ratio - 1| "
        f"{st['max_deviation']:.3f}: **{_pf(st['stationary'])}** at 5 %):", "", "```",
        format_stationarity(st), "```", "",
        f"{res['n_init']} held-out initial times "
        f"every {s['init_every_days']} days, {s['k']} steps ({s['k'] * s['lead'] // 24} days), {s['members']} "
        f"members each.", "",
        f"Both models: UNet channels {s['channels']}, mult {list(s['mult'])}, {d['params'] / 1e6:.2f} M parameters, "
        f"batch {s['batch']}, {s['steps']} AdamW steps, lr {s['lr']}.  DDPM: v-prediction, cosine schedule, "
        f"{_resolved(res, s)}.  MSE+perturbed IC: the same network trained by MSE (`model.objective = "
        f"\"regression\"`), members from initial conditions perturbed by {res['perturb']:g} x each channel's std "
        f"with a correlation length of {res['perturb_length']:g} grid points"
        + (f", tuned by minimum fair CRPS at the first lead on {res['tuning']['n_init']} validation init times "
           f"(table below)." if tuned else " (fixed by `--perturb`).")
        + "  MSE: that model unperturbed; persistence: the initial state; climatology: members drawn from the "
          "training period.  Deterministic forecasts are scored as equal members (CRPS = MAE, spread 0)."
        + (f"  DDPM config overrides: `{' '.join(res['ddpm_set'])}`." if res.get("ddpm_set") else ""), "",
        "Fair CRPS averaged over the channels (WeatherBench-2 conventions; `diffkit evaluate`):", "",
        "| lead (h) | " + " | ".join(LABELS) + " | DDPM / tuned baseline |",
        "|---" * (len(LABELS) + 2) + "|",
    ]
    for i, h in enumerate(d["lead_hours"]):
        lines.append(f"| {h:.0f} | " + " | ".join(f"{res[lab]['crps'][i]:.4g}" for lab in LABELS)
                     + f" | {res['crps_ratio'][i]:.3f} |")
    lines += ["", "RMSE of the ensemble mean / spread-skill:", "",
              "| lead (h) | " + " | ".join(LABELS) + " |", "|---" * (len(LABELS) + 1) + "|"]
    for i, h in enumerate(d["lead_hours"]):
        lines.append(f"| {h:.0f} | " + " | ".join(f"{res[lab]['rmse'][i]:.4g} / {res[lab]['spread_skill_ratio'][i]:.2f}"
                                                  for lab in LABELS) + " |")
    lines += ["", "Rank histograms, smallest and largest bin relative to uniform (1), over the channels, at the "
              "first and last lead:", "", "| forecast | first lead | last lead |", "|---|---|---|"]
    for lab in LABELS:
        r = res[lab]
        lines.append(f"| {lab} | {r['rank_min'][0]:.2f} - {r['rank_max'][0]:.2f} | "
                     f"{r['rank_min'][-1]:.2f} - {r['rank_max'][-1]:.2f} |")
    lines += ["", f"DDPM one-step spread / oracle spread at {d['lead_hours'][0]:.0f} h: "
              f"{res['spread_oracle_ratio']:.3f}.  Targets (issue 14):", ""]
    lines += [f"- {v}" for v in verdicts(res)] + [""]
    if tuned:
        lines += [f"Tuning of the baseline's perturbation (fair CRPS etc. at {s['lead']} h on the validation period, "
                  f"standardised units; chosen row in bold):", "", res["tuning"]["markdown"], ""]
    lines += [f"Training {d['train_s']:.0f} s (DDPM) and {b['train_s']:.0f} s (MSE); forecasting and scoring "
              f"{d['eval_s']:.0f} s and {b['eval_s']:.0f} s.", ""]
    if png.exists():
        lines += [f"![DDPM lead-time curves]({png.name})", ""]
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text("\n".join(lines))
    tmp.replace(path)


if __name__ == "__main__":
    main()
