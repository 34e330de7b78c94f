"""DDPM surrogate vs the one-step MSE baseline on Kuramoto--Sivashinsky, with equal training effort.

Both models use the same backbone (the built-in 1-D UNet with circular padding), the same data
and the same batch size; they differ in ``model.objective`` (``diffusion`` vs ``regression``).
Each is rolled out autoregressively from held-out initial conditions (different simulator seeds
from training), and the high-correlation time -- the time until the Pearson correlation with the
reference simulation first drops below 0.8 (PDE-Refiner, Lippe et al. 2023) -- is reported per
trajectory as mean +- standard error, for the DDPM's member 0, its ensemble mean and the MSE
model, with paired ratios to the MSE model.

    python benchmarks/pde_ks.py --setting cpu --markdown docs/bench/pde_ks.md   # ~1.5 h, 1 core
    python benchmarks/pde_ks.py --setting quick                                   # smoke test, a few min
    python benchmarks/pde_ks.py --setting gpu --device cuda                        # larger, for a GPU

**Equal effort** (issue 14).  The default DDPM recipe is PDE-Refiner's (``--recipe refiner``):
the ``refiner`` schedule (T = K + 1 = 4 discrete levels: the k = 0 prediction step at pure noise
and K = 3 refinement levels), the native v-loss, levels drawn uniformly (``uniform_t``) and the
ancestral ``ddpm`` sampler with NFE = T.  Training draws each level with probability 1/T, so with
``--effort per-level`` (the default) the DDPM trains T times the MSE model's optimiser steps: every
level -- the k = 0 prediction step included -- gets as many training samples (network evaluations
in training) as the MSE model gets in total.  The expected count per level is printed and written
to the results.  ``--effort steps`` gives both models the same optimiser steps (the set-up before
issue 14, where k = 0 got 1/T of the MSE model's training).  ``--recipe cosine`` is the
continuous-time DDPM (cosine schedule, the surrogate loss defaults: EDM weighting, log-normal
noise levels, DPM-Solver++(2M)); its noise levels are continuous, so per-level equality is not
defined for it (``--effort steps`` only) and its counts are printed per decade of sigma~.

Reported beside the correlation times: the ensemble spread/skill over the first half of the
high-correlation time (:func:`diffkit_pde.metrics.spread_skill_ratio`, i.e. diffkit.ensemble's),
and the one-step error spectra of both models (energy of ``prediction - truth`` per wavenumber,
:func:`diffkit_pde.metrics.energy_spectrum`, averaged over held-out states), with the DDPM / MSE
error-amplitude ratio per wavenumber band: PDE-Refiner's claimed gain is at high wavenumbers.
The issue-14 targets are printed as ``verdict: ... PASS/FAIL`` lines.

Data: LPSDA / PDE-Refiner set-up (L = 64 +- 10 %, nx = 256, frames every 0.2 after a burn-in);
the models step ``frame_step`` frames at a time and see the previous ``history`` states and
the scalar conditions dt and dx.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

SETTINGS = {
    # name: simulation, model, training and evaluation sizes; steps are the MSE model's
    "quick": dict(train_traj=32, train_frames=120, test_traj=8, test_frames=160, channels=16, mult=(1, 2, 2),
                  res_blocks=1, steps=300, batch=32, members=2, nfe=8, lr=1e-3),
    "cpu": dict(train_traj=256, train_frames=140, test_traj=32, test_frames=400, channels=32, mult=(1, 2, 2, 2),
                res_blocks=1, steps=4000, batch=32, members=4, nfe=10, lr=1e-3),
    "gpu": dict(train_traj=1024, train_frames=140, test_traj=128, test_frames=640, channels=64, mult=(1, 2, 2, 4),
                res_blocks=2, steps=50000, batch=128, members=8, nfe=20, lr=3e-4),
}

#: DDPM recipes: model.schedule, loss.weighting, loss.noise, sample.sampler, sample.nfe (None: the
#: setting's; "T": the schedule's number of levels), sample.spacing.  None for weighting/noise: the
#: config's defaults, resolved per model when training starts (edm / lognormal for a surrogate).
RECIPES = {
    "refiner": dict(schedule="refiner", weighting="native", noise="uniform_t", sampler="ddpm", nfe="T", spacing=None),
    "cosine": dict(schedule="cosine", weighting=None, noise=None, sampler="dpmpp_2m", nfe=None, spacing=None),
}

#: wavenumber bands (integer mode numbers m of the 256-point grid, L ~ 64: k = 2 pi m / L)
BANDS = ((1, 4), (5, 8), (9, 16), (17, 32), (33, 64), (65, 128))

#: issue 14's KS targets: (key, what, lower bound, upper bound)
TARGETS = (("ensemble_mean_ratio", "ensemble-mean high-corr. time / MSE", 1.15, None),
           ("member0_ratio", "member 0 high-corr. time / MSE", 1.0, None),
           ("spread_skill_first_half", "spread/skill over the first half of the high-corr. time", 0.7, 1.3))
GPU_TARGET = ("member0_ratio", "member 0 high-corr. time / MSE (gpu setting, PDE-Refiner's gain)", 1.3, None)


class BenchError(SystemExit):
    """A one-line usage error of the benchmark (exit status 2)."""

    def __init__(self, msg: str):
        super().__init__(f"pde_ks.py: error: {msg}")


def simulate(path: Path, n: int, frames: int, seed: int, progress: bool) -> None:
    from diffkit_pde import simulate_ks, to_dataset, write_netcdf

    write_netcdf(to_dataset(simulate_ks(n, frames, seed=seed, progress=progress)), path)


def ddpm_options(args, s: dict) -> dict:
    """The DDPM's schedule, loss and sampler: the recipe's, each overridden by its command-line option."""
    r = dict(RECIPES[args.recipe])
    for k in ("schedule", "weighting", "noise", "sampler", "spacing"):
        if getattr(args, k) is not None:
            r[k] = getattr(args, k)
    if args.nfe:
        r["nfe"] = args.nfe
    elif r["nfe"] == "T":
        r["nfe"] = levels_of(r["schedule"])
    elif r["nfe"] is None:
        r["nfe"] = s["nfe"]
    return r


def levels_of(schedule) -> int | None:
    from diffkit import get_schedule

    return get_schedule(schedule).T


def discrete_levels(d: dict) -> int | None:
    """T when training draws the DDPM's noise levels uniformly from T discrete levels, else None."""
    from diffkit.config import LOSS_AUTO

    noise = d["noise"] or LOSS_AUTO["noise"][0]  # the DDPM here is a surrogate
    T = levels_of(d["schedule"])
    return T if (T and noise == "uniform_t" and d["weighting"] != "vdm") else None


def training_steps(args, s: dict, d: dict) -> tuple[int, int]:
    """(MSE steps, DDPM steps) under ``--effort``."""
    n = s["steps"]
    if args.effort == "steps":
        return n, n
    T = discrete_levels(d)
    if T is None:
        raise BenchError(f"--effort per-level needs a DDPM trained on discrete noise levels drawn uniformly (the refiner "
                         f"recipe); schedule {d['schedule']!r} with noise {d['noise'] or 'lognormal'} draws continuous "
                         f"levels: use --effort steps")
    if T > 16:
        raise BenchError(f"--effort per-level with the {T}-level schedule {d['schedule']!r} would train the DDPM {T}x "
                         f"the MSE model's steps; use a schedule with few levels (refiner) or --effort steps")
    return n, T * n


def config(args, s: dict, data: Path, run_dir: Path, objective: str, steps: int, d: dict):
    from diffkit.config import config_from_dict

    return config_from_dict({
        "run_dir": str(run_dir),
        "data": {"adapter": "pde", "batch_size": s["batch"], "val_fraction": 0.05,
                 "options": {"path": str(data), "history": args.history, "frame_step": args.frame_step,
                             "target": args.target, "scalars": ["dt", "dx"]}},
        "model": {"backbone": "unet", "objective": objective, "parameterization": args.parameterization,
                  "schedule": d["schedule"],
                  "options": {"channels": s["channels"], "channel_mult": list(s["mult"]),
                              "num_res_blocks": s["res_blocks"], "attn_levels": [], "mid_attn": False}},
        # unset keys take the config's defaults, resolved per model when training starts
        "loss": {k: d[k] for k in ("weighting", "noise") if d[k] is not None},
        "trainer": {"steps": steps, "lr": s["lr"], "warmup": min(200, s["steps"] // 10), "seed": args.seed,
                    "val_every": 0, "ckpt_every": 0, "log_every": 100, "ema_decay": 0.995},
        "sample": {"sampler": d["sampler"], "nfe": d["nfe"], "spacing": d["spacing"]},
    })


def level_counts(cfg, steps: int, batch: int) -> list[dict]:
    """Expected training samples (network evaluations in training) per noise level of a run.

    A regression model: one level, ``steps * batch``.  A DDPM drawing uniformly from T discrete
    levels: ``steps * batch / T`` per level (level T is the k = 0 prediction step at pure noise).
    Continuous noise levels: per decade of sigma~, from 200 000 draws of the run's distribution."""
    from diffkit.losses import noise_distribution
    from diffkit import get_schedule

    n = steps * batch
    if cfg.model.objective == "regression":
        return [dict(level="prediction (no noise)", sigma=None, fraction=1.0, samples=float(n))]
    sched, lc = get_schedule(cfg.model.schedule), cfg.loss
    nd = noise_distribution(lc)
    if sched.T and nd.kind == "uniform_t" and lc.weighting != "vdm":
        out = []
        for lvl in range(sched.T, 0, -1):
            sig = float((-sched.logsnr(lvl / sched.T) / 2).exp())
            k = sched.T - lvl
            name = f"k = {k} (prediction)" if k == 0 else f"k = {k} (refinement)"
            out.append(dict(level=name, sigma=sig, fraction=1.0 / sched.T, samples=n / sched.T))
        return out
    g = torch.Generator().manual_seed(0)
    t = nd.sample(sched, 200_000, continuous=lc.weighting == "vdm", generator=g)
    lg = (-sched.logsnr(t) / 2 / math.log(10)).numpy()  # log10 sigma~
    edges = np.arange(math.floor(lg.min()), math.ceil(lg.max()) + 1)
    hist, _ = np.histogram(lg, bins=edges)
    return [dict(level=f"sigma~ in [1e{int(a)}, 1e{int(a) + 1})", sigma=float(10 ** (a + 0.5)),
                 fraction=float(h / len(lg)), samples=float(n * h / len(lg))) for a, h in zip(edges[:-1], hist)]


def rollouts(sur, ics, members: int, seed: int, progress: bool, batch: int = 64):
    """``(pred, truth)``: ``(N, M, K, C, x)`` rollouts from every initial condition and the reference."""
    from diffkit_pde import rollout

    K = min(ic.truth.shape[0] for ic in ics)
    preds = []
    for b in range(0, len(ics), batch):
        part = ics[b: b + batch]
        hist = torch.stack([ic.history for ic in part])
        scal = torch.stack([ic.scalars for ic in part])
        preds.append(rollout(sur, hist, K, members=members, scalars=scal, seed=seed + b, progress=progress))
    return torch.cat(preds), torch.stack([ic.truth[:K] for ic in ics])


def one_step_spectra(sur, ics, members: int, history: int, seed: int, every: int = 10, batch: int = 256) -> dict:
    """Energy spectra of the one-step error ``prediction - truth`` (member 0 and, with several
    members, the ensemble mean) and of the true state, averaged over held-out states: from every
    trajectory, the states ``every`` model steps apart."""
    from diffkit_pde import rollout
    from diffkit_pde.metrics import energy_spectrum

    hs, ts, ss = [], [], []
    for ic in ics:
        seq = torch.cat([ic.history, ic.truth])  # every model step from frame 0 (history frames first)
        for j in range(history, seq.shape[0], every):
            hs.append(seq[j - history: j])
            ts.append(seq[j])
            ss.append(ic.scalars)
    err0, errm = [], []
    for b in range(0, len(hs), batch):
        pred = rollout(sur, torch.stack(hs[b: b + batch]), 1, members=members, scalars=torch.stack(ss[b: b + batch]),
                       seed=seed + b)[:, :, 0]                                   # (n, M, C, x)
        truth = torch.stack(ts[b: b + batch])
        err0.append(energy_spectrum(pred[:, 0] - truth, 1)[1])
        errm.append(energy_spectrum(pred.mean(1) - truth, 1)[1])
    k, e_truth = energy_spectrum(torch.stack(ts), 1)
    avg = lambda e: torch.cat(e).double().reshape(-1, k.shape[-1]).mean(0)  # over states and channels
    out = dict(k=k.double(), truth=e_truth.double().reshape(-1, k.shape[-1]).mean(0), member0=avg(err0),
               n_states=len(hs))
    if members > 1:
        out["ensemble_mean"] = avg(errm)
    return out


def band_table(spec: dict, bands=BANDS) -> list[dict]:
    """Per wavenumber band: the true energy, each model's one-step error energy and the DDPM / MSE
    error-amplitude ratio ``sqrt(E_err DDPM / E_err MSE)`` (< 1: the DDPM errs less there)."""
    k = spec["k"].numpy()
    rows = []
    for lo, hi in bands:
        sel = (k >= lo) & (k <= hi)
        if not sel.any():
            continue
        e = {name: float(v.numpy()[sel].sum()) for name, v in spec["curves"].items()}
        row = dict(band=f"{lo}-{hi}", truth=e["truth"], mse=e["MSE"], ddpm_member0=e["DDPM member 0"],
                   ratio_member0=math.sqrt(e["DDPM member 0"] / e["MSE"]))
        if "DDPM ensemble mean" in e:
            row["ddpm_ensemble_mean"] = e["DDPM ensemble mean"]
            row["ratio_ensemble_mean"] = math.sqrt(e["DDPM ensemble mean"] / e["MSE"])
        rows.append(row)
    return rows


def hct_stats(corr: torch.Tensor, dt: float, threshold: float) -> dict:
    from diffkit_pde.metrics import high_correlation_time

    per = high_correlation_time(corr, dt=dt, threshold=threshold).double().numpy()
    mean_curve = float(high_correlation_time(corr.mean(0), dt=dt, threshold=threshold))
    K = corr.shape[-1]
    return dict(mean=float(per.mean()), se=float(per.std(ddof=1) / math.sqrt(len(per))), per_traj=per.tolist(),
                of_mean_curve=mean_curve, censored=int((per >= K * dt - 1e-9).sum()))


def paired_ratio(a, b, seed: int = 0) -> dict:
    """Ratio of means a / b with its paired-bootstrap SE over test trajectories."""
    a, b = np.asarray(a), np.asarray(b)
    rng = np.random.default_rng(seed)
    idx = rng.integers(0, len(a), size=(2000, len(a)))
    boots = a[idx].mean(1) / np.maximum(b[idx].mean(1), 1e-12)
    return dict(mean=float(a.mean() / b.mean()), se=float(boots.std(ddof=1)))


def verdicts(res: dict, setting: str) -> list[dict]:
    out = []
    for key, what, lo, hi in TARGETS + ((GPU_TARGET,) if setting == "gpu" else ()):
        v = res[key]["mean"] if isinstance(res[key], dict) else res[key]
        ok = bool(np.isfinite(v) and (lo is None or v >= lo) and (hi is None or v <= hi))
        want = f">= {lo}" if hi is None else f"in [{lo}, {hi}]"
        out.append(dict(key=key, what=what, value=float(v), target=want, met=ok))
    return out


def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="cpu")
    ap.add_argument("--steps", type=int, default=None,
                    help="optimiser steps of the MSE model (default: the setting's); the DDPM's follow from --effort")
    ap.add_argument("--recipe", choices=list(RECIPES), default="refiner",
                    help="the DDPM's schedule, loss and sampler (default: PDE-Refiner's); the options below override parts")
    ap.add_argument("--effort", choices=["per-level", "steps"], default="per-level",
                    help="per-level: every DDPM noise level gets as many training samples as the MSE model (T x its "
                         "steps for T uniformly drawn levels); steps: the same optimiser steps for both")
    ap.add_argument("--history", type=int, default=1)
    ap.add_argument("--frame-step", type=int, default=4, help="frames of 0.2 per model step (4: dt = 0.8)")
    ap.add_argument("--target", choices=["state", "residual"], default="residual")
    ap.add_argument("--parameterization", default="v")
    ap.add_argument("--schedule", default=None, help="model.schedule (default: the recipe's)")
    ap.add_argument("--weighting", default=None, help="loss.weighting (default: the recipe's)")
    ap.add_argument("--noise", default=None, help="loss.noise, the training noise distribution (default: the recipe's)")
    ap.add_argument("--sampler", default=None, help="sampler (default: the recipe's)")
    ap.add_argument("--spacing", default=None, help="sampler time grid (default: the schedule's or sampler's)")
    ap.add_argument("--nfe", type=int, default=None,
                    help="denoiser calls per rollout step (default: the recipe's: T for refiner, the setting's for cosine)")
    ap.add_argument("--members", type=int, default=None, help="DDPM ensemble members (default: the setting's)")
    ap.add_argument("--eval-only", action="store_true",
                    help="reuse the trained runs in --workdir (e.g. to compare samplers on the same models)")
    ap.add_argument("--test-seed", type=int, default=10_000,
                    help="simulator seed of the held-out trajectories (select sampler settings on another seed)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None, help="keep data and runs here (default: a temporary folder)")
    ap.add_argument("--markdown", default=None, help="write the result table here")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    s = dict(SETTINGS[args.setting])
    if args.steps:
        s["steps"] = args.steps
    if args.members:
        s["members"] = args.members
    if s["members"] < 2:
        raise BenchError(f"--members {s['members']}: the ensemble spread needs at least 2 members")
    d = ddpm_options(args, s)
    steps = dict(zip(("regression", "diffusion"), training_steps(args, s, d)))
    progress = not args.no_progress
    from diffkit.train import Trainer, training_seconds
    from diffkit_pde import initial_condition, load_surrogate
    from diffkit_pde.metrics import pearson_per_step, spread_skill_ratio

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    train, test = work / "ks_train.nc", work / f"ks_test_seed{args.test_seed}.nc"
    if not train.exists():
        simulate(train, s["train_traj"], s["train_frames"], seed=args.seed, progress=progress)
    if not test.exists():
        simulate(test, s["test_traj"], s["test_frames"], seed=args.seed + args.test_seed, progress=progress)
    res: dict = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "setting": args.setting, "sizes": s,
                 "ddpm": d, "options": {k: v for k, v in vars(args).items() if k not in ("markdown", "json", "workdir")}}
    curves, spectra, ics = {}, {}, None
    print(f"effort ({args.effort}): MSE {steps['regression']} optimiser steps, DDPM {steps['diffusion']} "
          f"(recipe {args.recipe}), batch {s['batch']}", flush=True)
    for label, objective in (("MSE", "regression"), ("DDPM", "diffusion")):
        sub = f"run_{objective}" if objective == "regression" else f"run_{objective}_{args.recipe}_{args.effort}"
        cfg = config(args, s, train, work / sub, objective, steps[objective], d)
        t0 = time.time()
        if args.eval_only:
            sur = load_surrogate(cfg.run_dir, device=args.device)
            sur.config = cfg  # this invocation's [sample] settings
            n_params, t_train = sum(p.numel() for p in sur.model.parameters()), float("nan")
        else:
            # resume=True: a finished run in --workdir is reused (fit() returns at once), an
            # interrupted one continues; the training time is read from its log
            tr = Trainer(cfg, device=args.device, progress=progress, resume=True)
            n_params = sum(p.numel() for p in tr.net.parameters())
            tr.fit()
            t_train = training_seconds(cfg.run_dir, time.time() - t0)
            sur = load_surrogate(cfg.run_dir, device=tr.device)
        if ics is None:
            ics = [initial_condition(test, sur.layout, index=i) for i in range(s["test_traj"])]
        members = s["members"] if objective == "diffusion" else 1
        counts = level_counts(sur.config, steps[objective], s["batch"])
        print(f"{label}: training samples (network evaluations in training) per noise level, expected:", flush=True)
        for c in counts:
            sig = "" if c["sigma"] is None else f" sigma~ = {c['sigma']:.3g},"
            print(f"  {c['level']}:{sig} {c['fraction']:.3f} of {steps[objective]} x {s['batch']} = "
                  f"{c['samples']:.0f}", flush=True)
        t0 = time.time()
        pred, truth = rollouts(sur, ics, members, args.seed, progress)
        dt = ics[0].dt
        c0 = pearson_per_step(pred[:, 0], truth, 1)
        curves[label] = c0
        r = dict(params=n_params, train_s=t_train, dt=dt, steps=cfg.trainer.steps, level_counts=counts,
                 **{f"hct_{th}": hct_stats(c0, dt, th) for th in (0.8, 0.9, 0.95)}, corr_mean_curve=c0.mean(0).tolist())
        if objective == "diffusion":  # what the run actually used (unset keys resolved at training)
            from diffkit.registry import resolve
            from diffkit import get_schedule

            lc, sc = sur.config.loss, sur.config.sample
            res["resolved"] = dict(weighting=lc.weighting, noise=lc.noise, sampler=sc.sampler, nfe=sc.nfe,
                                   spacing=sc.spacing or get_schedule(sur.config.model.schedule).sample_spacing
                                   or resolve("sampler", sc.sampler).info.default_spacing)
            cm = pearson_per_step(pred.mean(1), truth, 1)
            curves[f"DDPM mean of {members}"] = cm
            r["ensemble_mean_hct_0.8"] = hct_stats(cm, dt, 0.8)
            # spread/skill (diffkit.ensemble's, through the plugin's layout mapping), pooled over trajectories
            r["spread_skill_per_step"] = spread_skill_ratio(pred, truth, 1, member_dim=1, pool_dims=0).tolist()
            half = 0.5 * r["ensemble_mean_hct_0.8"]["mean"]
            kh = max(1, min(truth.shape[1], int(math.floor(half / dt + 1e-9))))
            r["spread_skill_window"] = dict(steps=kh, time=kh * dt, half_hct=half)
            r["spread_skill_first_half"] = float(spread_skill_ratio(pred[:, :, :kh], truth[:, :kh], 1, member_dim=1,
                                                                    pool_dims=(0, 1)))
        r["eval_s"] = time.time() - t0
        sp = one_step_spectra(sur, ics, members, args.history, args.seed)
        spectra.setdefault("k", sp["k"])
        spectra.setdefault("n_states", sp["n_states"])
        spectra.setdefault("curves", {})["truth"] = sp["truth"]
        if objective == "diffusion":
            spectra["curves"]["DDPM member 0"] = sp["member0"]
            spectra["curves"]["DDPM ensemble mean"] = sp["ensemble_mean"]
        else:
            spectra["curves"]["MSE"] = sp["member0"]
        res[label] = r
        print(f"{label}: high-correlation time (0.8) member 0 {r['hct_0.8']['mean']:.2f} +- {r['hct_0.8']['se']:.2f}"
              + (f", mean of {members} {r['ensemble_mean_hct_0.8']['mean']:.2f} +- "
                 f"{r['ensemble_mean_hct_0.8']['se']:.2f}, spread/skill over the first {kh} steps (t <= {kh * dt:.1f}) "
                 f"{r['spread_skill_first_half']:.2f}" if objective == "diffusion" else "")
              + f" (train {t_train:.0f} s, eval {r['eval_s']:.0f} s)", flush=True)
        del pred, truth
    mse = res["MSE"]["hct_0.8"]["per_traj"]
    res["member0_ratio"] = paired_ratio(res["DDPM"]["hct_0.8"]["per_traj"], mse)
    res["ensemble_mean_ratio"] = paired_ratio(res["DDPM"]["ensemble_mean_hct_0.8"]["per_traj"], mse)
    res["spread_skill_first_half"] = res["DDPM"]["spread_skill_first_half"]
    res["ratio"] = dict(res["member0_ratio"], target=1.3, met=res["member0_ratio"]["mean"] >= 1.3)  # the old key
    res["spectra"] = dict(k=spectra["k"].tolist(), n_states=spectra["n_states"],
                          curves={n: v.tolist() for n, v in spectra["curves"].items()}, bands=band_table(spectra))
    res["targets"] = verdicts(res, args.setting)
    res["wall_s"] = time.time() - t_all
    print(f"one-step error spectra over {spectra['n_states']} held-out states: error amplitude ratio DDPM / MSE per "
          f"wavenumber band (< 1: the DDPM errs less)")
    print(f"  {'band m':>8} {'E truth':>10} {'E err MSE':>10} {'E err DDPM':>10} {'member 0':>9} {'ens. mean':>9}")
    for b in res["spectra"]["bands"]:
        print(f"  {b['band']:>8} {b['truth']:10.3g} {b['mse']:10.3g} {b['ddpm_member0']:10.3g} "
              f"{b['ratio_member0']:9.2f} {b.get('ratio_ensemble_mean', float('nan')):9.2f}")
    for m, r in (("member 0", res["member0_ratio"]), (f"mean of {s['members']}", res["ensemble_mean_ratio"])):
        print(f"ratio DDPM {m} / MSE = {r['mean']:.2f} +- {r['se']:.2f}")
    for v in res["targets"]:
        print(f"verdict: {v['what']} = {v['value']:.2f} (target {v['target']}): {'PASS' if v['met'] else 'FAIL'}")
    print(f"total {res['wall_s'] / 60:.1f} min", flush=True)
    if args.json:
        _atomic_text(Path(args.json), json.dumps(res, indent=1))
    if args.markdown:
        write_markdown(res, Path(args.markdown), curves, spectra, res["DDPM"]["dt"])
    if tmp is not None:
        tmp.cleanup()
    return res


def _atomic_text(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(text)
    tmp.replace(path)


def _resolved(res: dict) -> str:
    r, d = res.get("resolved") or {}, res["ddpm"]
    return (f"{d['schedule']} schedule, {r.get('weighting', d['weighting'])} weighting, "
            f"{r.get('noise', d['noise'])} training noise levels, sampler {r.get('sampler', d['sampler'])} "
            f"({r.get('spacing', d['spacing'])} spacing) with {r.get('nfe', d['nfe'])} NFE per step")


def write_markdown(res: dict, path: Path, curves: dict, spectra: dict, dt: float) -> None:
    from diffkit_pde.plots import plot_correlation, plot_spectra

    path.parent.mkdir(parents=True, exist_ok=True)
    png = path.with_suffix(".png")
    plot_correlation(curves, png, dt=dt, threshold=0.8)
    spng = path.with_name(f"{path.stem}_spectra.png")
    k = spectra["k"]
    plot_spectra({("true state" if n == "truth" else f"{n} error"): (k, e) for n, e in spectra["curves"].items()},
                 spng, xlabel="wavenumber m (modes per domain)", ylabel="energy E(m), one step")
    rpng = path.with_name(f"{path.stem}_spectra_ratio.png")
    c = spectra["curves"]
    plot_spectra({f"{n} / MSE": (k, (c[n] / c["MSE"]).sqrt()) for n in ("DDPM member 0", "DDPM ensemble mean")},
                 rpng, xlabel="wavenumber m (modes per domain)", ylabel="one-step error amplitude ratio to MSE")
    s, o = res["sizes"], res["options"]
    D, M = res["DDPM"], res["MSE"]
    lines = [
        f"# KS surrogate: DDPM vs one-step MSE baseline (`--setting {res['setting']}`)", "",
        f"Command: `python benchmarks/pde_ks.py {res['argv']}`  ",
        f"Total wall time: {res['wall_s'] / 60:.1f} min ({torch.get_num_threads()} torch threads).", "",
        f"Data: {s['train_traj']} training trajectories x {s['train_frames']} frames, {s['test_traj']} held-out "
        f"trajectories x {s['test_frames']} frames (other seeds), KS with L = 64 +- 10 %, nx = 256, frames every 0.2; "
        f"model step {o['frame_step']} frames (dt = {dt:.2f}), history {o['history']}, target "
        f"{o['target']}, scalar conditions dt and dx.", "",
        f"Both models: UNet channels {s['channels']}, mult {list(s['mult'])}, {s['res_blocks']} res block(s), "
        f"{D['params'] / 1e6:.2f} M parameters, batch {s['batch']}, lr {s['lr']}, EMA 0.995. "
        f"DDPM (recipe `{o['recipe']}`): {o['parameterization']}-prediction, {_resolved(res)}, {s['members']} members.",
        "", f"Effort (`--effort {o['effort']}`): MSE {M['steps']} AdamW steps, DDPM {D['steps']}. Expected training "
        f"samples (network evaluations in training) per noise level:", "",
        "| model | level | σ~ | share | samples |", "|---|---|---|---|---|",
    ]
    for name, r in (("MSE", M), ("DDPM", D)):
        for c in r["level_counts"]:
            sig = "" if c["sigma"] is None else f"{c['sigma']:.3g}"
            lines.append(f"| {name} | {c['level']} | {sig} | {c['fraction']:.3f} | {c['samples']:.0f} |")
    lines += ["", "| model | high-corr. time (0.8) | (0.9) | (0.95) | of the mean curve (0.8) | censored | train s | eval s |",
              "|---|---|---|---|---|---|---|---|"]
    for m in ("DDPM", "MSE"):
        r = res[m]
        lines.append(f"| {m}{' member 0' if m == 'DDPM' else ''} | {r['hct_0.8']['mean']:.2f} ± {r['hct_0.8']['se']:.2f} | "
                     f"{r['hct_0.9']['mean']:.2f} ± {r['hct_0.9']['se']:.2f} | {r['hct_0.95']['mean']:.2f} ± "
                     f"{r['hct_0.95']['se']:.2f} | {r['hct_0.8']['of_mean_curve']:.2f} | {r['hct_0.8']['censored']} | "
                     f"{r['train_s']:.0f} | {r['eval_s']:.0f} |")
    em = D["ensemble_mean_hct_0.8"]
    lines.append(f"| DDPM mean of {s['members']} | {em['mean']:.2f} ± {em['se']:.2f} | | | {em['of_mean_curve']:.2f} | "
                 f"{em['censored']} | | |")
    w = D["spread_skill_window"]
    lines += ["", f"Spread/skill (sqrt((M+1)/M) spread / RMSE of the ensemble mean, `diffkit.ensemble`) over the first "
              f"half of the ensemble mean's high-correlation time ({w['steps']} steps, t ≤ {w['time']:.1f}): "
              f"**{D['spread_skill_first_half']:.2f}**.", "",
              f"One-step error spectra over {spectra['n_states']} held-out states (energy of prediction − truth per "
              f"wavenumber m, summed over the band; ratio = error amplitude DDPM / MSE, < 1: the DDPM errs less):", "",
              "| band m | E truth | E err MSE | E err DDPM member 0 | ratio member 0 | ratio ensemble mean |",
              "|---|---|---|---|---|---|"]
    for b in res["spectra"]["bands"]:
        lines.append(f"| {b['band']} | {b['truth']:.3g} | {b['mse']:.3g} | {b['ddpm_member0']:.3g} | "
                     f"{b['ratio_member0']:.2f} | {b.get('ratio_ensemble_mean', float('nan')):.2f} |")
    lines += ["", "| target (issue 14) | value | target | verdict |", "|---|---|---|---|"]
    for v in res["targets"]:
        se = res[v["key"]]["se"] if isinstance(res[v["key"]], dict) else None
        lines.append(f"| {v['what']} | {v['value']:.2f}{'' if se is None else f' ± {se:.2f}'} | {v['target']} | "
                     f"**{'PASS' if v['met'] else 'FAIL'}** |")
    lines += ["", "Times are in KS time units; ratios of mean times with paired-bootstrap SE; 'censored' counts "
              "trajectories still above 0.8 at the end of the held-out trajectory.", "",
              f"![correlation vs time]({png.name})", "", f"![one-step error spectra]({spng.name})", "",
              f"![one-step error ratio]({rpng.name})", ""]
    _atomic_text(path, "\n".join(lines))


if __name__ == "__main__":
    torch.set_num_threads(max(1, torch.get_num_threads()))
    main()
    sys.exit(0)
