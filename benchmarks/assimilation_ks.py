"""Assimilating sparse, noisy observations of Kuramoto--Sivashinsky trajectories (issue 15).

Held-out KS trajectories (simulator seeds not used in training or validation) are observed at every
4th, 8th, 16th and 32nd grid point of every frame of a window of ``K`` frames, with Gaussian noise of
0.05 x the climatological std (seeded).  No method knows the state before the window: every
ensemble starts from the climatology (or, for the window models, from the window prior).  Rows:

1. ``AR + reconstruction`` / ``AR + dps``: the autoregressive DDPM surrogate rolled over the window
   with guidance at every step (:class:`diffkit.assimilate.GuidedRollout`, the engine of
   ``diffkit assimilate``), its members started from climatological states (training frames);
   ``AR prior`` is the same rollout without guidance (the reference the guidance must beat);
2. ``window + reconstruction``: SDA's composition of a window model of ``k`` states over the ``K``
   frames (:class:`diffkit.window.ComposedDenoiser`) guided by reconstruction guidance on all
   the window's observations at once (a smoother);
3. ``amortised``: the universal-amortised window model (:func:`diffkit.window.sample_trajectory`,
   SDA composition), observations imposed as exact values (a model trained on exact observations).
   Rows 2 and 3 use the same network: Shysheya et al.'s universal model, trained with
   random masks and, with probability ``1 - mask_past - mask_points - mask_both``, none -- the
   unconditional window prior that row 2 guides (an all-zero mask);
   ``amortised + noise``: the same training with ``data.mask_noise = [0.01, 0.2]`` (noisy sparse
   points, their std as input; a second network), given the observations with their sigma_y --
   row 3 side by side shows what modelling the noise changes;
   ``amortised, ddpm`` / ``amortised + noise, ddpm``: the same two networks sampled with the
   stochastic DDPM (ancestral) sampler at the setting's ``stochastic_nfe`` instead of the
   deterministic dpmpp_2m at ``nfe`` (noise injected at every step corrects the SDA composition's
   inconsistencies between windows, as SDA's Langevin corrector does);
   ``amortised, calibrated`` / ``amortised, ddpm, calibrated``: the same members as the row named,
   their anomalies about the ensemble mean scaled by the row's spread scale
   (:func:`diffkit.calibrate.spread_scale`: ``1 / (spread/skill)``) measured per sparsity on the
   setting's ``val_traj`` validation trajectories (the first of them is the EnKF's inflation data; other
   sampling seeds): the ensemble mean and RMSE
   are the raw row's, the spread is recalibrated -- the post-hoc counterpart of the EnKF's tuned
   inflation.  Among rows of equal RMSE the verdict takes the one with spread/skill closest to 1;
4. ``OI``: optimal interpolation per frame (:func:`diffkit.da_baselines.optimal_interpolation`) with
   the climatological mean and covariance of the training frames, made homogeneous (averaged over the
   periodic grid's shifts: a circulant ``B``), its ensemble drawn from ``N(x_a, B - K H B)``;
5. ``EnKF``: the stochastic EnKF (perturbed observations, 32 members, no localisation unless
   ``--localisation``) with the TRUE simulator (``diffkit_pde.simulate_ks`` restarted from each
   member, ``frame_step`` output intervals per cycle), cycling over the window's frames from 32
   climatological states; multiplicative inflation tuned per sparsity on one validation trajectory
   (another seed) over the setting's grid (:func:`diffkit.da_baselines.tune_inflation`).

Scores (``diffkit.ensemble``: one metric implementation): ensemble-mean RMSE, fair CRPS and
spread/skill, over every frame of the window (filters included: no spin-up is dropped) and every
grid point, root per (trajectory, frame) before the mean.  Targets (issue 15), printed as
``target: ... PASS/FAIL`` lines: at every sparsity the best diffkit method has RMSE <= 0.7 x OI and
<= 1.5 x EnKF, with spread/skill in [0.8, 1.2].  The quick setting is a smoke test of tiny models
and is not expected to meet them.

    python benchmarks/assimilation_ks.py --setting quick --markdown docs/bench/assimilation_ks.md  # a few min
    python benchmarks/assimilation_ks.py --setting cpu                                               # hours, 1 core
    python benchmarks/assimilation_ks.py --setting gpu --device cuda
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

_HERE = str(Path(__file__).resolve().parent)
if _HERE not in sys.path:  # the helpers shared with assimilation_qg.py, also when loaded from a file path (tests)
    sys.path.insert(0, _HERE)
from _assim import atomic_text as _atomic_text  # noqa: E402  (shared with assimilation_qg.py)
from _assim import (amortised, enkf_window, noise_rms, oi_window, scores, split_rmse, target_lines,  # noqa: E402
                    verdict_table, window_guided)
from _assim import verdicts as _verdicts  # noqa: E402

SETTINGS = {
    # nx / L: grid and (fixed) domain length; frame_step: 0.2 output intervals per model step / EnKF
    # cycle; window: K frames assimilated; k: states per window of the window model
    "quick": dict(nx=32, L=22.0, burn_in=50.0, train_traj=8, train_frames=60, test_traj=2, val_traj=2, frame_step=2,
                  window=8, k=4, channels=8, mult=(1, 2), res_blocks=1, steps=150, window_steps=200, batch=16, lr=2e-3,
                  members=8, nfe=6, stochastic_nfe=12, enkf_members=32, inflation=(1.0, 1.15, 1.3, 1.5)),
    "cpu": dict(nx=64, L=22.0, burn_in=100.0, train_traj=128, train_frames=200, test_traj=16, val_traj=8, frame_step=2,
                window=16, k=5, channels=32, mult=(1, 2, 2), res_blocks=1, steps=4000, window_steps=6000, batch=32,
                lr=1e-3, members=16, nfe=10, stochastic_nfe=100, enkf_members=32,
                inflation=(1.0, 1.02, 1.05, 1.1, 1.2, 1.4)),
    "gpu": dict(nx=64, L=22.0, burn_in=100.0, train_traj=1024, train_frames=200, test_traj=64, val_traj=16,
                frame_step=2, window=16, k=7, channels=64, mult=(1, 2, 2, 4), res_blocks=2, steps=40000, window_steps=60000,
                batch=128, lr=3e-4, members=32, nfe=20, stochastic_nfe=200, enkf_members=32,
                inflation=(1.0, 1.02, 1.05, 1.1, 1.2, 1.4)),
}
STRIDES = (4, 8, 16, 32)
NOISE = 0.05                      # observation noise std / climatological std
#: the rows recalibrated on the validation trajectories (``diffkit.calibrate.spread_scale``): ``"R, calibrated"``
CALIBRATED = ("amortised", "amortised, ddpm")
DIFFKIT_ROWS = ("AR + reconstruction", "AR + dps", "window + reconstruction", "amortised", "amortised + noise",
                "amortised, ddpm", "amortised + noise, ddpm") + tuple(f"{r}, calibrated" for r in CALIBRATED)
#: the noise-aware amortised model's training range of observation-noise std (state-std units; sigma_y is 0.05)
MASK_NOISE = (0.01, 0.2)
ROWS = ("AR prior",) + DIFFKIT_ROWS + ("OI", "EnKF")
TARGET_OI, TARGET_ENKF, TARGET_SS = 0.7, 1.5, (0.8, 1.2)


class BenchError(SystemExit):
    """A one-line usage error of the benchmark (exit status 2)."""

    def __init__(self, msg: str):
        super().__init__(f"assimilation_ks.py: error: {msg}")


# ----------------------------------------------------------------------------- data and models
def simulate(path: Path, s: dict, n: int, frames: int, seed: int) -> None:
    from diffkit_pde import simulate_ks, to_dataset, write_netcdf

    write_netcdf(to_dataset(simulate_ks(n, frames, nx=s["nx"], L=s["L"], L_jitter=0.0, burn_in=s["burn_in"],
                                        seed=seed)), path)


def load_u(path: Path) -> torch.Tensor:
    import xarray as xr

    with xr.open_dataset(path) as ds:
        return torch.from_numpy(np.asarray(ds["u"].values, dtype=np.float64))   # (traj, time, x)


def train(s: dict, data: Path, run: Path, *, window: bool, seed: int, device, progress: bool,
          mask_noise: tuple[float, float] = (0.0, 0.0)):
    """Train (or reuse, ``resume=True``) the AR surrogate or the amortised window model (``mask_noise``:
    trained on noisy observations); its EMA model."""
    from diffkit.config import config_from_dict
    from diffkit.model import load_for_sampling
    from diffkit.train import Trainer

    data_cfg = {"adapter": "pde", "batch_size": s["batch"], "val_fraction": 0.1,
                "options": {"path": str(data), "frame_step": s["frame_step"]}}
    if window:
        data_cfg.update(window=s["k"], amortised=True, mask_past=0.15, mask_points=0.45, mask_both=0.15,
                        mask_fraction=[0.02, 0.5], mask_noise=list(mask_noise))
    else:
        data_cfg["options"].update(history=1, target="residual")
    steps = s["window_steps"] if window else s["steps"]
    cfg = config_from_dict({
        "run_dir": str(run), "data": data_cfg,
        "model": {"backbone": "unet", "options": {"channels": s["channels"], "channel_mult": list(s["mult"]),
                                                  "num_res_blocks": s["res_blocks"], "attn_levels": [],
                                                  "mid_attn": False}},
        "trainer": {"steps": steps, "lr": s["lr"], "warmup": min(200, steps // 10), "seed": seed, "val_every": 0,
                    "ckpt_every": 0, "log_every": 100, "ema_decay": 0.995},
        "sample": {"sampler": "dpmpp_2m", "nfe": s["nfe"]},
    })
    t0 = time.time()
    Trainer(cfg, device=device, progress=progress, resume=True).fit()
    model, cfg, _ = load_for_sampling(run, device=device)
    return model, cfg, time.time() - t0


# ----------------------------------------------------------------------------- the methods
def ar_rollout(model, cfg, starts, y, sigma, mask, method: str | None, options: dict, seed: int) -> torch.Tensor:
    """``(M, K, nx)``: the AR surrogate from ``M`` climatological states over ``K`` frames, guided at
    every frame by its observations (``method`` None: the prior)."""
    from diffkit.assimilate import Guide, GuidedRollout
    from diffkit.observations import StepObservations
    from diffkit_pde import rollout

    K = y.shape[0]
    sig = torch.full((y.shape[1],), float(sigma), dtype=torch.float64)
    obs = {} if method is None else {k: StepObservations(y=y[k], sigma=sig, mask=mask[None]) for k in range(K)}
    guided = GuidedRollout(model, obs, Guide(method or "reconstruction", options))
    pred = rollout(guided, starts[:, None, None].float(), K, members=1, seed=seed, config=cfg)   # (M, 1, K, 1, x)
    return pred[:, 0, :, 0].double()


def oi(clim, y, sigma, mask, members: int, seed: int) -> torch.Tensor:
    """``(M, K, nx)``: per-frame OI with the climatological background, sampled from its posterior."""
    return oi_window(clim, y, float(sigma), mask, members, seed)


def ks_forecast(s: dict):
    """The true simulator as the EnKF's forecast step: ``frame_step`` output intervals from each member.

    The simulator's ETDRK4 stability limit (its CFL check) depends only on L, nx and dt: it is computed
    by the first call and passed as ``cfl_max`` to the next ones (the same check, not recomputed per member)."""
    from diffkit.da_baselines import DAError
    from diffkit_pde import simulate_ks

    run = lambda X, cfl: simulate_ks(X.shape[0], s["frame_step"] + 1, nx=s["nx"], L=[s["L"]] * X.shape[0],  # noqa
                                     L_jitter=0.0, burn_in=0.0, u0=X, seed=0, resolution_tol=None, cfl_max=cfl)
    key = (s["nx"], s["L"], s["frame_step"])
    if key not in _CFL:  # one member: the limit is the same for all
        _CFL[key] = float(run(torch.zeros(1, s["nx"], dtype=torch.float64), None)["cfl_limit"][0])

    def step(X):
        try:
            return run(X, _CFL[key])["u"][:, -1]
        except (ValueError, RuntimeError) as e:   # the stability check of an inflated ensemble
            raise DAError(f"the KS forecast failed: {str(e).splitlines()[0]}") from None
    return step


_CFL: dict = {}


def homogeneous(clim):
    """The climatology averaged over the periodic grid's translations (KS is translation-equivariant, so
    every shift of a training frame is a climatological state): a constant mean and a circulant ``B``."""
    from diffkit.da_baselines import Analysis

    m, B = clim
    nx = m.shape[0]
    Bh = sum(torch.roll(B, (sh, sh), (0, 1)) for sh in range(nx)) / nx
    return Analysis(torch.full_like(m, float(m.mean())), Bh)


def enkf_run(s: dict, starts, y, sigma, mask, inflation: float, seed: int, radius: float | None) -> torch.Tensor:
    """``(M, K, nx)``: the EnKF's analysis ensembles over the window."""
    from diffkit.da_baselines import gaspari_cohn

    nx = mask.shape[0]
    loc = None
    if radius:
        i = torch.arange(nx, dtype=torch.float64)
        dist = (i[:, None] - i[None, :]).abs()
        loc = gaspari_cohn(torch.minimum(dist, nx - dist), radius)           # periodic grid distance (points)
    return enkf_window(ks_forecast(s), starts, y, float(sigma), mask, inflation, seed, loc)


def observe(truth: torch.Tensor, stride: int, sigma: float, seed: int):
    """``(y (K, p), mask (nx,))``: every ``stride``-th point of every frame plus N(0, sigma^2) noise."""
    nx = truth.shape[-1]
    mask = torch.zeros(nx, dtype=torch.bool)
    mask[::stride] = True
    g = torch.Generator().manual_seed(seed)
    y = truth[:, mask] + sigma * torch.randn(truth[:, mask].shape, generator=g, dtype=torch.float64)
    return y, mask


def verdicts(table: dict) -> list[dict]:
    """Per stride: the best diffkit row by RMSE against OI and the EnKF, and its spread/skill."""
    return _verdicts(table, DIFFKIT_ROWS, (("OI", TARGET_OI), ("EnKF", TARGET_ENKF)), TARGET_SS, key="stride")


# ----------------------------------------------------------------------------- main
def main(argv=None) -> dict:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--setting", choices=list(SETTINGS), default="quick")
    ap.add_argument("--gamma", type=float, default=1.0, help="reconstruction guidance's prior-covariance factor")
    ap.add_argument("--zeta", type=float, default=0.1, help="DPS step size (0: leave the DPS row out)")
    ap.add_argument("--localisation", type=float, default=None, metavar="RADIUS",
                    help="EnKF: Gaspari-Cohn localisation with this half-width in grid points (default: none)")
    ap.add_argument("--test-seed", type=int, default=10_000, help="simulator seed offset of the held-out trajectories")
    ap.add_argument("--val-seed", type=int, default=5_000, help="simulator seed offset of the validation trajectory")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", default=None)
    ap.add_argument("--workdir", default=None, help="keep data and runs here (default: a temporary folder)")
    ap.add_argument("--markdown", default=None, help="write the result table here")
    ap.add_argument("--json", default=None, help="write the raw results here")
    ap.add_argument("--no-progress", action="store_true")
    args = ap.parse_args(argv)
    s = dict(SETTINGS[args.setting])
    if args.test_seed == args.val_seed or 0 in (args.test_seed, args.val_seed):
        raise BenchError("--test-seed and --val-seed must differ from each other and from 0 (the training seed "
                         "offset): held-out trajectories come from seeds not used in training")
    if not (args.gamma > 0 and math.isfinite(args.gamma)) or not (args.zeta >= 0 and math.isfinite(args.zeta)):
        raise BenchError(f"--gamma must be > 0 and --zeta >= 0, got {args.gamma:g} and {args.zeta:g}")
    if args.localisation is not None and not args.localisation > 0:
        raise BenchError(f"--localisation must be a radius > 0 in grid points, got {args.localisation:g}")
    progress = not args.no_progress
    from diffkit.da_baselines import gaussian_statistics, tune_inflation

    tmp = tempfile.TemporaryDirectory() if args.workdir is None else None
    work = Path(args.workdir or tmp.name)
    work.mkdir(parents=True, exist_ok=True)
    t_all = time.time()
    fs, K, M = s["frame_step"], s["window"], s["members"]
    frames = fs * K + 1
    files = {"train": (s["train_traj"], s["train_frames"], args.seed),
             "val": (s["val_traj"], frames, args.seed + args.val_seed),
             "test": (s["test_traj"], frames, args.seed + args.test_seed)}
    u = {}
    for name, (n, T, seed) in files.items():
        p = work / f"ks_{name}_seed{seed}.nc"
        if not p.exists() or load_u(p).shape[0] < n:   # trajectory i is the same whatever n (diffkit_pde's seeding)
            simulate(p, s, n, T, seed)
        u[name] = load_u(p)[:n]
    clim_states = u["train"].reshape(-1, s["nx"])
    clim = homogeneous(gaussian_statistics(clim_states))
    clim_std = float(u["train"].std())
    sigma = NOISE * clim_std
    res: dict = {"argv": " ".join(sys.argv[1:] if argv is None else argv), "setting": args.setting, "sizes": s,
                 "clim_std": clim_std, "sigma_y": sigma, "dt": 0.2 * fs, "options": {
                     k: v for k, v in vars(args).items() if k not in ("markdown", "json", "workdir")}}
    print(f"KS nx={s['nx']} L={s['L']}: climatological std {clim_std:.3f}, sigma_y = {sigma:.4f}; window of {K} "
          f"frames {0.2 * fs:.1f} apart; {s['test_traj']} held-out trajectories", flush=True)
    ar, ar_cfg, t_ar = train(s, work / f"ks_train_seed{args.seed}.nc", work / "run_ar", window=False,
                             seed=args.seed, device=args.device, progress=progress)
    win, win_cfg, t_win = train(s, work / f"ks_train_seed{args.seed}.nc", work / "run_window", window=True,
                                seed=args.seed, device=args.device, progress=progress)
    win_n, win_n_cfg, t_win_n = train(s, work / f"ks_train_seed{args.seed}.nc", work / "run_window_noise",
                                      window=True, seed=args.seed, device=args.device, progress=progress,
                                      mask_noise=MASK_NOISE)
    res["train_s"] = {"AR": t_ar, "window": t_win, "window_noise": t_win_n}
    print(f"trained: AR surrogate {t_ar:.0f} s, amortised window models (k = {s['k']}) {t_win:.0f} s (exact "
          f"observations) + {t_win_n:.0f} s (noisy)", flush=True)

    def clim_draw(n, seed):
        g = torch.Generator().manual_seed(seed)
        return clim_states[torch.randint(0, clim_states.shape[0], (n,), generator=g)]

    # EnKF inflation, per sparsity, on the validation trajectory
    val_truth = u["val"][0, fs::fs][:K]
    res["inflation"] = {}
    for stride in STRIDES:
        y, mask = observe(val_truth, stride, sigma, args.seed + 7 * stride)
        starts = clim_draw(s["enkf_members"], args.seed + 1)

        def rmse_of(lam):
            pred = enkf_run(s, starts, y, sigma, mask, lam, args.seed, args.localisation)
            return float(scores(pred[None], val_truth[None])["rmse"])

        best, sc = tune_inflation(rmse_of, s["inflation"])
        res["inflation"][stride] = dict(best=best, scores=sc)
        print(f"EnKF inflation (stride {stride}, validation RMSE per value): "
              + ", ".join(f"{k:g}: {v:.3f}" for k, v in sc.items()) + f" -> {best:g}", flush=True)

    rows = [r for r in ROWS if not (r == "AR + dps" and args.zeta == 0)]

    def methods(y, mask, sd: int, stride: int) -> dict:
        """Each sampled row's ensemble ``(M, K, nx)`` for observations ``y`` at ``mask`` (every ``stride``-th
        point), seeded by ``sd``."""
        return {
            "AR prior": lambda: ar_rollout(ar, ar_cfg, clim_draw(M, sd), y, sigma, mask, None, {}, sd),
            "AR + reconstruction": lambda: ar_rollout(ar, ar_cfg, clim_draw(M, sd), y, sigma, mask,
                                                      "reconstruction", {"gamma": args.gamma}, sd),
            "AR + dps": lambda: ar_rollout(ar, ar_cfg, clim_draw(M, sd), y, sigma, mask, "dps", {"zeta": args.zeta},
                                           sd),
            "window + reconstruction": lambda: window_guided(win, win_cfg, y, sigma, mask[None], args.gamma, M,
                                                             sd)[:, :, 0],
            "amortised": lambda: amortised(win, win_cfg, y, mask[None], M, sd)[:, :, 0],
            "amortised + noise": lambda: amortised(win_n, win_n_cfg, y, mask[None], M, sd, sigma)[:, :, 0],
            "amortised, ddpm": lambda: amortised(win, win_cfg, y, mask[None], M, sd, sampler="ddpm",
                                                 nfe=s["stochastic_nfe"])[:, :, 0],
            "amortised + noise, ddpm": lambda: amortised(win_n, win_n_cfg, y, mask[None], M, sd, sigma,
                                                         sampler="ddpm", nfe=s["stochastic_nfe"])[:, :, 0],
            "OI": lambda: oi(clim, y, sigma, mask, s["enkf_members"], sd),
            "EnKF": lambda: enkf_run(s, clim_draw(s["enkf_members"], sd + 1), y, sigma, mask,
                                     res["inflation"][stride]["best"], sd, args.localisation),
        }

    # the spread scale of each CALIBRATED row, per sparsity, on the validation trajectories (the first is
    # the EnKF's inflation data, with the same observations), with their own sampling seeds
    from diffkit.calibrate import scale_spread, spread_scale

    res["spread_scale"] = {}
    cal_secs = {}
    vals = [u["val"][j, fs::fs][:K] for j in range(s["val_traj"])]
    for stride in STRIDES:
        obs = [observe(v, stride, sigma, args.seed + 7 * stride + 100_000 * j) for j, v in enumerate(vals)]
        res["spread_scale"][stride] = {}
        for r in CALIBRATED:
            t0 = time.time()
            ens = torch.stack([methods(y, mask, args.seed + 50_000 + 100 * j + stride, stride)[r]()
                               for j, (y, mask) in enumerate(obs)])
            sc = float(spread_scale(ens, torch.stack(vals), member_dim=1, sample_dims=(0, 1)))
            cal_secs[(stride, r)] = time.time() - t0
            res["spread_scale"][stride][r] = sc
        print(f"spread scale (stride {stride}, validation): "
              + ", ".join(f"{r}: {v:.3f}" for r, v in res["spread_scale"][stride].items()), flush=True)

    sampled = [r for r in rows if not r.endswith(", calibrated")]
    preds = {st: {r: [] for r in rows} for st in STRIDES}
    secs = {st: {r: 0.0 for r in rows} for st in STRIDES}
    truths, ys, masks = [], {st: [] for st in STRIDES}, {}
    for i in range(s["test_traj"]):
        truth = u["test"][i, fs::fs][:K]                                       # frames fs, 2 fs, ..., K fs
        truths.append(truth)
        for stride in STRIDES:
            y, mask = observe(truth, stride, sigma, args.seed + 1000 * (i + 1) + stride)
            ys[stride].append(y)
            masks[stride] = mask
            todo = methods(y, mask, args.seed + 100 * i + stride, stride)
            for r in sampled:
                t0 = time.time()
                preds[stride][r].append(todo[r]())
                secs[stride][r] += time.time() - t0
            for r in CALIBRATED:   # the same members, their anomalies scaled: no sampling
                preds[stride][f"{r}, calibrated"].append(scale_spread(preds[stride][r][-1],
                                                                      res["spread_scale"][stride][r]))
                secs[stride][f"{r}, calibrated"] = secs[stride][r] + cal_secs[(stride, r)]
        print(f"trajectory {i + 1}/{s['test_traj']} done ({(time.time() - t_all) / 60:.1f} min)", flush=True)
    truth = torch.stack(truths)
    table = {}
    res["noise_rms"] = {str(st): noise_rms(torch.stack(ys[st]), truth, masks[st]) for st in STRIDES}
    for stride in STRIDES:
        table[stride] = {}
        for r in rows:
            sc = scores(torch.stack(preds[stride][r]), truth)
            sc.update(split_rmse(torch.stack(preds[stride][r]), truth, masks[stride]))
            sc["members"] = int(preds[stride][r][0].shape[0])
            sc["seconds"] = secs[stride][r]
            table[stride][r] = sc
    res["table"] = {str(k): v for k, v in table.items()}
    res["targets"] = verdicts(table)
    res["wall_s"] = time.time() - t_all
    print(f"\n{'stride':>6} {'obs/frame':>9} {'method':<24} {'members':>7} {'RMSE':>7} {'obs.':>7} {'unobs.':>7} "
          f"{'CRPS':>7} {'spr/skill':>9} {'s':>6}")
    for stride in STRIDES:
        for r in rows:
            v = table[stride][r]
            print(f"{stride:6d} {s['nx'] // stride:9d} {r:<24} {v['members']:7d} {v['rmse']:7.3f} "
                  f"{v['rmse_observed']:7.3f} {v['rmse_unobserved']:7.3f} {v['crps']:7.3f} "
                  f"{v['spread_skill']:9.2f} {v['seconds']:6.1f}")
    print("observation noise RMS (realised): " + ", ".join(f"stride {k}: {v:.4f}" for k, v in res["noise_rms"].items()))
    for line in target_lines(res["targets"], "stride"):
        print(line)
    print(f"total {res['wall_s'] / 60:.1f} min", flush=True)
    if args.json:
        _atomic_text(Path(args.json), json.dumps(res, indent=1))
    if args.markdown:
        write_markdown(res, Path(args.markdown), rows)
    if tmp is not None:
        tmp.cleanup()
    return res


def write_markdown(res: dict, path: Path, rows) -> None:
    s, o = res["sizes"], res["options"]
    lines = [
        f"# KS assimilation: diffkit vs optimal interpolation and the EnKF (`--setting {res['setting']}`)", "",
        f"Command: `python benchmarks/assimilation_ks.py {res['argv']}`  ",
        f"Total wall time: {res['wall_s'] / 60:.1f} min ({torch.get_num_threads()} torch threads), training "
        f"{res['train_s']['AR']:.0f} s (AR surrogate) + {res['train_s']['window']:.0f} s (window model) + "
        f"{res['train_s'].get('window_noise', 0):.0f} s (noise-aware window model).", "",
        f"Data: KS with L = {s['L']:g} (fixed), nx = {s['nx']}, {s['train_traj']} training trajectories x "
        f"{s['train_frames']} frames (seed {o['seed']}), {s['val_traj']} validation trajectories (seed offset "
        f"{o['val_seed']}; the first tunes the EnKF inflation, all of them the spread scales), "
        f"{s['test_traj']} held-out trajectories (seed offset {o['test_seed']}).  Window: {s['window']} frames "
        f"{res['dt']:.1f} apart, every frame observed at every 4th / 8th / 16th / 32nd grid point with Gaussian noise "
        f"σ_y = {NOISE} × the climatological std ({res['clim_std']:.3f}) = {res['sigma_y']:.4f}.  No method knows the "
        f"state before the window (climatological starts).", "",
        f"Models: UNet channels {s['channels']}, mult {list(s['mult'])}; AR surrogate (history 1, residual target) "
        f"{s['steps']} steps; amortised window model (k = {s['k']} states, masks: past 0.15, points 0.45, both 0.15, "
        f"none 0.25) {s['window_steps']} steps, used for the window + reconstruction and amortised rows; the same "
        f"with observation noise (data.mask_noise = {list(MASK_NOISE)}) for the amortised + noise rows; the ', ddpm' "
        f"rows sample them with the stochastic DDPM sampler at {s['stochastic_nfe']} NFE; otherwise dpmpp_2m with "
        f"{s['nfe']} NFE per sample; the ', calibrated' rows are the named row's members with their anomalies "
        f"scaled by the spread scale (diffkit.calibrate.spread_scale) measured on the validation trajectories ("
        + "; ".join(f"stride {k}: " + ", ".join(f"{r} {v:.3f}" for r, v in d.items())
                    for k, d in res.get("spread_scale", {}).items()) + "); "
        f"{s['members']} members; reconstruction γ = {o['gamma']:g}, DPS ζ = {o['zeta']:g}.  OI: the climatological "
        f"mean and covariance of the training frames averaged over the grid's shifts (circulant B), "
        f"{s['enkf_members']} posterior samples.  EnKF: stochastic, "
        f"{s['enkf_members']} members, the true simulator between frames, "
        + ("no localisation" if not o.get("localisation") else f"Gaspari-Cohn localisation (half-width "
                                                                  f"{o['localisation']:g} points)")
        + ", inflation per sparsity (validation RMSE): "
        + "; ".join(f"stride {k}: {v['best']:g}" for k, v in res["inflation"].items()) + ".", "",
        "Scores (`diffkit.ensemble`): ensemble-mean RMSE, fair CRPS, spread/skill, over every frame of the window "
        "and every grid point (root per trajectory and frame, then the mean); the RMSE also at the observed and "
        "at the unobserved points alone.  The observations' own error (the realised noise's RMS, what a method "
        "that imposes them exactly scores at the observed points): "
        + ", ".join(f"stride {k}: {v:.4f}" for k, v in res["noise_rms"].items()) + ".", "",
        "| stride | obs / frame | method | members | RMSE | RMSE observed / unobserved | CRPS | spread/skill | seconds |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for stride, tab in res["table"].items():
        for r in rows:
            v = tab[r]
            split = f"{v['rmse_observed']:.3f} / {v['rmse_unobserved']:.3f}"
            lines.append(f"| {stride} | {s['nx'] // int(stride)} | {r} | {v['members']} | {v['rmse']:.3f} | {split} | "
                         f"{v['crps']:.3f} | {v['spread_skill']:.2f} | {v['seconds']:.1f} |")
    lines += [""] + verdict_table(res["targets"], "stride")
    others = [k for k in SETTINGS if k != res["setting"]]
    lines += ["", f"Only `--setting {res['setting']}` produced this file; the {' and '.join(others)} settings were "
              f"not run for it (no numbers of theirs are shown).", ""]
    _atomic_text(path, "\n".join(lines))


if __name__ == "__main__":
    main()
    sys.exit(0)
