"""The PDE section of ``diffkit quickstart``: a Kuramoto--Sivashinsky surrogate in about a minute.

Simulates a small chaotic KS domain (L = 22, 64 points; the same solver as ``diffkit data pde
ks``), trains a conditional DDPM surrogate (state and dt, dx -> the change over the next step;
PDE-Refiner's set-up at toy scale), rolls out a 4-member ensemble from held-out initial
conditions and scores it against the truth and against persistence ("nothing changes").
"""
from __future__ import annotations

from pathlib import Path

#: simulation, training and rollout sizes (about a minute on 2 CPU cores)
SIZES = dict(nx=64, L=22.0, burn_in=50.0, n_train=32, frames=60, n_test=4, test_frames=60, steps=300,
             channels=16, members=4)


def calibration_rows(pred, truth, dt: float, n_show: int = 4) -> list[tuple[str, str, str]]:
    """Report rows of the calibration of rollouts ``pred (N, M, K, C, x)`` against ``truth (N, K, C, x)``:
    spread/skill at up to ``n_show`` steps (over the N initial conditions and the grid), the rank histogram
    (all steps, each bin / uniform) and the verdict of :func:`diffkit.ensemble.dispersion_verdict`."""
    import numpy as np

    from diffkit import ensemble as E

    ss = E.spread_skill_ratio(pred, truth, member_dim=1, dims=(-2, -1), sample_dims=(0,))      # (K,)
    ranks = E.rank_histogram(pred, truth, member_dim=1, dims=(0, 2, 3), generator=0)         # (K, M + 1)
    d = E.dispersion_verdict(ss, ranks)
    rel, _ = E.rank_summary(ranks)
    K = ss.shape[0]
    idx = sorted(set(np.linspace(0, K - 1, min(n_show, K)).round().astype(int).tolist()))
    return [("spread/skill per step", " ".join(f"{float(ss[k]):.2f}" for k in idx),
             f"at t = {', '.join(f'{(k + 1) * dt:.3g}' for k in idx)}; 1 is calibrated, < 1 under-dispersive"),
            ("rank histogram / uniform", " ".join(f"{x:.2f}" for x in rel),
             "all steps; 1 in every bin for a calibrated ensemble, U shape: under-dispersive"),
            ("dispersion", d.verdict, str(d).split(": ", 1)[1])]


def quickstart(out: Path, *, seed: int = 0, progress: bool = True):
    """Kuramoto-Sivashinsky: simulate, train a DDPM surrogate, roll out an ensemble, score it"""
    import torch

    from diffkit.adapters import atomic_to_netcdf
    from diffkit.config import config_from_dict
    from diffkit.quickstart import Section
    from diffkit.train import Trainer

    from . import metrics, plots
    from .cli import plot_rollout
    from .ks import simulate_ks
    from .netcdf import to_dataset, write_netcdf
    from .surrogate import initial_condition, load_surrogate, rollout, rollout_dataset

    s = SIZES
    out = Path(out)
    sim = dict(nx=s["nx"], L=s["L"], burn_in=s["burn_in"], progress=progress)
    train_file, test_file = out / "ks_train.nc", out / "ks_test.nc"
    write_netcdf(to_dataset(simulate_ks(s["n_train"], s["frames"], seed=seed, **sim)), train_file)
    write_netcdf(to_dataset(simulate_ks(s["n_test"], s["test_frames"], seed=seed + 1, **sim)), test_file)
    cfg = config_from_dict({
        "run_dir": str(out / "run"),
        "data": {"adapter": "pde", "batch_size": 32,
                 "options": {"path": str(train_file), "history": 1, "frame_step": 2, "target": "residual",
                             "scalars": ["dt", "dx"]}},
        "model": {"backbone": "unet", "options": {"channels": s["channels"], "channel_mult": [1, 2, 2],
                                                  "num_res_blocks": 1, "attn_levels": [], "mid_attn": False}},
        "trainer": {"steps": s["steps"], "lr": 1e-3, "warmup": s["steps"] // 10, "val_every": 0, "ckpt_every": 0,
                    "ema_decay": 0.99, "seed": seed, "log_every": s["steps"] // 5},
        "sample": {"sampler": "dpmpp_2m", "nfe": 10},
    })
    Trainer(cfg, progress=progress).fit()
    sur = load_surrogate(cfg.run_dir)
    ics = [initial_condition(test_file, sur.layout, index=i) for i in range(s["n_test"])]
    K = ics[0].truth.shape[0]
    hist = torch.stack([ic.history for ic in ics])
    truth = torch.stack([ic.truth for ic in ics])                                   # (N, K, 1, x)
    pred = rollout(sur, hist, K, members=s["members"], scalars=torch.stack([ic.scalars for ic in ics]), seed=seed,
                   progress=progress)                                               # (N, M, K, 1, x)
    dt = sur.dt
    corr_member = metrics.pearson_per_step(pred[:, 0], truth, 1)
    corr_mean = metrics.pearson_per_step(pred.mean(1), truth, 1)
    corr_pers = metrics.pearson_per_step(hist[:, -1:].expand_as(truth), truth, 1)
    hct = {k: metrics.high_correlation_time(c, dt=dt, threshold=0.8)
           for k, c in (("member", corr_member), ("mean", corr_mean), ("persistence", corr_pers))}
    nrmse1 = float(metrics.nrmse(pred[:, 0], truth, 1)[:, 0].mean())
    nrmse1_p = float(metrics.nrmse(hist[:, -1:], truth[:, :1], 1)[:, 0].mean())
    spread = metrics.ensemble_spread(pred, 1, member_dim=1)                         # (N, K)
    cal_rows = calibration_rows(pred, truth, dt)

    ds = rollout_dataset(pred[0], sur.layout, ics[0], attrs={"objective": "diffusion", "seed": seed})
    atomic_to_netcdf(ds, out / "rollout.nc")
    # plot_rollout also draws member correlations; the figure below adds the ensemble mean and persistence
    figs = [Path(f) for f in plot_rollout(ds, sur.layout, out / "rollout.png") if "correlation" not in str(f)]
    plots.plot_correlation({"DDPM member 0": corr_member, f"DDPM {s['members']}-member mean": corr_mean,
                            "persistence": corr_pers}, out / "correlation.png", dt=dt)
    m = {k: float(v.mean()) for k, v in hct.items()}
    horizon = K * dt
    return Section(
        title="PDE surrogate: Kuramoto-Sivashinsky",
        summary=(f"{s['n_train']} simulated KS trajectories (L = {s['L']:g}, {s['nx']} points, ETDRK4) trained a "
                 f"conditional DDPM surrogate for {s['steps']} steps (UNet, {sum(p.numel() for p in sur.model.parameters()) / 1e3:.0f} k "
                 f"parameters); it was then rolled out autoregressively for {K} steps ({horizon:.1f} time units) "
                 f"from {s['n_test']} held-out initial conditions, {s['members']} members each.  The high-correlation "
                 "time is how long the Pearson correlation with the truth stays above 0.8 (PDE-Refiner's metric); "
                 "`rollout.png` shows the first rollout in space-time next to the truth.  The full-size version "
                 "of this job is `examples/pde_ks.py` and `benchmarks/pde_ks.py` (docs/pde.md)."),
        rows=[("high-correlation time, DDPM member", f"{m['member']:.2f}", f"time units (persistence: {m['persistence']:.2f})"),
              ("high-correlation time, ensemble mean", f"{m['mean']:.2f}", f"{s['members']}-member mean"),
              ("nRMSE after one step", f"{nrmse1:.3f}", f"persistence: {nrmse1_p:.3f}"),
              ("ensemble spread, last step", f"{float(spread[:, -1].mean()):.3f}", "std over members, physical units"),
              *cal_rows],
        figures=[*figs, out / "correlation.png"],
        files=[train_file, test_file, out / "rollout.nc", Path(cfg.run_dir)],
        metrics={"hct_member": m["member"], "hct_mean": m["mean"], "hct_persistence": m["persistence"],
                 "nrmse_first_step": nrmse1, "nrmse_first_step_persistence": nrmse1_p},
    )
