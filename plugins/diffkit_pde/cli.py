"""The PDE plugin's commands: ``diffkit data pde`` and ``diffkit rollout``.

Registered through the ``diffkit_commands`` hook; heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse
import ast
import inspect

from diffkit.cli import resolve_device

#: the simulators ``diffkit data pde NAME`` runs, with the defaults of the command
PDES = {
    "ks": ("simulate_ks", dict(n_steps=140)),
    "burgers": ("simulate_burgers", dict(n_steps=100)),
    "kolmogorov": ("simulate_kolmogorov", dict(n_steps=100)),
}


def simulator(name: str):
    """The simulator function of a PDE name; an unknown name is an error listing the known ones."""
    from diffkit.errors import UnknownComponentError

    import diffkit_pde as simulators  # the package exports every simulator

    if name not in PDES:
        raise UnknownComponentError(f"unknown PDE {name!r}; the built-in simulators are {', '.join(PDES)}")
    return getattr(simulators, PDES[name][0])


def _literal(text: str):
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text


def register_data(parser: argparse.ArgumentParser) -> None:
    """simulate PDE trajectories (KS, Burgers, Kolmogorov flow) into a CF netCDF file"""
    parser.add_argument("pde", choices=list(PDES), help="which equation: ks (Kuramoto-Sivashinsky, LPSDA set-up), "
                        "burgers (1-D viscous Burgers) or kolmogorov (2-D Navier-Stokes, Kolmogorov flow)")
    parser.add_argument("--trajectories", "-n", type=int, default=16, help="number of trajectories (default 16)")
    parser.add_argument("--steps", type=int, default=None,
                        help="output frames per trajectory after the burn-in (default: ks 140, burgers 100, kolmogorov 100)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the initial conditions (default 0)")
    parser.add_argument("--set", action="append", default=[], metavar="KEY=VALUE",
                        help="any other simulator option, e.g. --set nx=128 --set dt_out=0.4 (repeatable; "
                             "`--set help=1` lists them)")
    parser.add_argument("--out", required=True, help="output netCDF file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .observe import add_observe_arguments

    add_observe_arguments(parser)  # --observe-from TRUTH.nc: synthetic observations instead of a simulation
    parser.set_defaults(func=run_data)


def run_data(args) -> int:
    from .observe import observe_requested, run_observe

    if observe_requested(args):
        return run_observe(args)
    from diffkit.errors import ConfigError

    from .netcdf import to_dataset, write_netcdf

    fn = simulator(args.pde)
    params = inspect.signature(fn).parameters
    # seed has its own option; initial-condition tensors, device and progress are not file-level choices
    valid = [k for k, p in params.items() if p.kind is p.KEYWORD_ONLY
             and k not in ("seed", "progress", "u0", "omega0", "device", "dtype")]
    opts = dict(PDES[args.pde][1])
    for item in args.set:
        key, sep, val = item.partition("=")
        if key == "help":
            print(f"options of `diffkit data pde {args.pde}` (--set KEY=VALUE):")
            for k in valid:
                print(f"  {k} = {params[k].default!r}")
            return 0
        if key in ("seed", "n_steps", "n_traj"):
            flag = {"seed": "--seed", "n_steps": "--steps", "n_traj": "--trajectories"}[key]
            raise ConfigError(f"--set {item!r}: give {key} with {flag}, not --set")
        if not sep or key not in valid:
            raise ConfigError(f"--set {item!r}: unknown simulator option {key!r} for {args.pde}; valid options: "
                              f"{', '.join(valid)}")
        opts[key] = _literal(val)
    if args.steps is not None:
        opts["n_steps"] = args.steps
    if args.trajectories < 1 or opts["n_steps"] < 1:
        raise ValueError("--trajectories and --steps must be >= 1")
    import torch

    device = resolve_device(args.device) if args.device else None
    n_steps = opts.pop("n_steps")
    res = fn(args.trajectories, n_steps, seed=args.seed, progress=not args.no_progress,
             device=device, **opts)
    ds = to_dataset(res)
    ds.attrs["command"] = "diffkit data pde " + " ".join([args.pde, f"--trajectories {args.trajectories}",
                                                           f"--steps {n_steps}", f"--seed {args.seed}",
                                                           *(f"--set {s}" for s in args.set)])
    out = write_netcdf(ds, args.out)
    dims = ", ".join(f"{d}={n}" for d, n in ds.sizes.items())
    print(f"diffkit data pde: wrote {args.pde} trajectories ({dims}) to {out}")
    return 0


def register_rollout(parser: argparse.ArgumentParser) -> None:
    """roll a PDE surrogate out from initial conditions in a file: an ensemble, as netCDF"""
    parser.add_argument("checkpoint", help="checkpoint file or run directory of a model trained on data.adapter = pde")
    parser.add_argument("--init", required=True, help="trajectory file (netCDF from `diffkit data pde`, or PDEBench HDF5)")
    parser.add_argument("--index", type=int, default=0, help="trajectory of the file to start from (default 0)")
    parser.add_argument("--start", type=int, default=0, help="first history frame in that trajectory (default 0)")
    parser.add_argument("--members", "-m", type=int, default=8, help="ensemble members (default 8)")
    parser.add_argument("--steps", "-k", type=int, default=None,
                        help="frames to predict (default: as many as the file has after the history)")
    parser.add_argument("--sampler", default=None, help="sampler (default: the run's sample.sampler)")
    parser.add_argument("--nfe", type=int, default=None, help="denoiser evaluations per step (default: the run's sample.nfe)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same ensemble")
    parser.add_argument("--perturb", type=float, default=None,
                        help="std of Gaussian noise added to each member's standardised initial history (relative to "
                             "each variable's std); default 0 for diffusion models, 0.05 for regression models with "
                             "more than one member (perturbed-initial-condition ensemble)")
    parser.add_argument("--perturb-length", type=float, default=0.0, metavar="GRID_POINTS",
                        help="correlation length of the --perturb noise in grid points (Gaussian filter; default 0: "
                             "white noise at every grid point)")
    from diffkit.calibrate import add_spread_scale_argument

    add_spread_scale_argument(parser)
    parser.add_argument("--out", required=True, help="output netCDF file (dims member, time, x[, y])")
    parser.add_argument("--plot", default=None, metavar="PNG",
                        help="also write a space-time (1-D) or snapshot (2-D) figure and a correlation curve "
                             "(PNG; the curve goes to PNG with suffix -correlation)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_rollout)


def run_rollout(args) -> int:
    import torch

    from diffkit.adapters import atomic_to_netcdf
    from diffkit.calibrate import apply_spread_scale, check_spread_scale, spread_scale_attrs
    from diffkit.rollout import resolve_perturb

    from .surrogate import initial_condition, load_surrogate, rollout, rollout_dataset, rollout_report

    if not args.perturb_length >= 0 or args.perturb_length == float("inf"):
        raise ValueError(f"--perturb-length must be >= 0 and finite (grid points), got {args.perturb_length}")
    check_spread_scale(args)
    device = resolve_device(args.device)
    sur = load_surrogate(args.checkpoint, device=device)
    ic = initial_condition(args.init, sur.layout, index=args.index, start=args.start)
    steps = args.steps if args.steps is not None else ic.truth.shape[0]
    if steps < 1:
        raise ValueError(f"{args.init} has no frames after the history to compare with; give --steps")
    pred = rollout(sur, ic.history, steps, members=args.members,
                   scalars=None if ic.scalars is None else ic.scalars[None], sampler=args.sampler, nfe=args.nfe,
                   seed=args.seed, perturb=args.perturb, perturb_length=args.perturb_length,
                   progress=not args.no_progress)
    pred = apply_spread_scale(pred, args, member_dim=-(sur.layout.ndim + 3))    # (members, steps, C, *S)
    perturb = resolve_perturb(args.perturb, sur.model, args.members)
    ds = rollout_dataset(pred, sur.layout, ic, attrs={
        "checkpoint": str(args.checkpoint), "init_file": str(args.init), "init_index": args.index,
        "init_start": args.start, "seed": args.seed, "objective": sur.config.model.objective,
        "sampler": args.sampler or sur.config.sample.sampler, "nfe": args.nfe or sur.config.sample.nfe,
        "perturb": perturb, "perturb_length": float(args.perturb_length if perturb else 0.0),
        **spread_scale_attrs(args), "command": " ".join(["diffkit", *getattr(args, "argv", ["rollout", str(args.checkpoint)])])})
    out = atomic_to_netcdf(ds, args.out)
    msg = f"diffkit rollout: wrote {args.members} member(s) x {steps} frame(s) to {out}"
    if "high_correlation_time_members" in ds.attrs:
        import numpy as np

        h = np.asarray(ds.attrs["high_correlation_time_members"], dtype=float)
        msg += (f"; high-correlation time (corr > 0.8) per member {h.mean():.2f} +- "
                f"{(h.std(ddof=1) / np.sqrt(len(h)) if len(h) > 1 else 0):.2f}, ensemble mean "
                f"{ds.attrs['high_correlation_time_ensemble_mean']:.2f}")
    print(msg)
    report = rollout_report(ds)
    if report:
        print("diffkit rollout: calibration (spread/skill per step; rank histogram; verdict)")
        print(report)
    if args.plot:
        for p in plot_rollout(ds, sur.layout, args.plot):
            print(f"diffkit rollout: wrote {p}")
    return 0


def plot_rollout(ds, layout, path) -> list:
    """Figures of a rollout dataset: space-time (1-D) or snapshots (2-D), and correlation curves;
    writes them (atomically) and returns their paths.  See :func:`rollout_figures`."""
    from diffkit.figures import save_figure

    return [save_figure(fig, p) for p, fig in rollout_figures(ds, layout, path)]


def rollout_figures(ds, layout, path) -> list:
    """``[(path, Figure), ...]`` of a rollout dataset, not yet written: the space-time diagram
    (1-D) or snapshots (2-D) at ``path``, and the correlation curves at ``path`` with the suffix
    ``-correlation``.  Both figures are labelled from the dataset itself: the x axis is the
    netCDF's spatial coordinate (its values, name, ``long_name`` and ``units``), the colour bar the
    variable's name and ``units``, and the time axes of both figures are the *lead time* since the
    initial condition (the time of the last history frame, given in the title), in the units of
    the ``time`` coordinate."""
    from pathlib import Path

    import numpy as np

    from . import plots
    from .adapter import spec_from_layout

    v = spec_from_layout(layout).variables[0]
    path = Path(path)
    figures = []
    truth = ds[f"{v}_truth"].values if f"{v}_truth" in ds else None
    rolls = {f"member {m}": ds[v].values[m] for m in range(min(2, ds.sizes["member"]))}
    if ds.sizes["member"] > 1:
        rolls["ensemble mean"] = ds[v].values.mean(0)
    t = ds["time"].values
    dt = float(t[1] - t[0]) if len(t) > 1 else 1.0
    t_init = float(t[0]) - dt                      # the last history frame: lead time 0
    lead = plots.axis_label("lead time", ds["time"].attrs.get("units"))
    field = plots.axis_label(v, ds[v].attrs.get("units"))
    if truth is not None:
        ok = np.isfinite(truth.reshape(truth.shape[0], -1)).all(1)
        truth_ = truth[ok]
        rolls_ = {k: r[ok] for k, r in rolls.items()}
        title = f"{v}: rollout vs truth from the initial condition at time {t_init:.4g}"
        if layout.ndim == 1:
            ax = layout.spatial[0]
            c = ds[ax]
            name = f"{ax}: {c.attrs['long_name']}" if c.attrs.get("long_name") not in (None, "", ax) else ax
            xlabel = plots.axis_label(name, c.attrs.get("units"))
            fig = plots.space_time_figure(truth_, rolls_, dt=dt, x=c.values, title=title, xlabel=xlabel,
                                          tlabel=lead, clabel=field)
        else:
            fig = plots.snapshots_figure(truth_, rolls_, dt=dt, title=title, tlabel=lead, clabel=field)
        figures.append((path, fig))
        curves = {"members": ds["correlation"].values[:, ok]}
        if ds.sizes["member"] > 1:
            curves["ensemble mean"] = ds["ensemble_mean_correlation"].values[ok]
        cp = path.with_name(path.stem + "-correlation" + path.suffix)
        figures.append((cp, plots.correlation_figure(curves, dt=dt, threshold=0.8, xlabel=lead)))
    return figures
