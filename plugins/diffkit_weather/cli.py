"""The weather plugin's commands: ``diffkit data weather qg``, ``diffkit forecast`` and ``diffkit evaluate``.

Registered through the ``diffkit_commands`` hook; heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse

from diffkit.cli import resolve_device
from diffkit.evaluation import Evaluator

SECONDS_PER_YEAR = 365 * 86400.0


def register_data(parser: argparse.ArgumentParser) -> None:
    """simulate a two-layer quasi-geostrophic model (pyqg's reference set-up) into CF netCDF"""
    parser.add_argument("model", choices=["qg"], help="qg: two-layer QG on a doubly periodic beta-plane")
    parser.add_argument("--years", type=float, default=1.0, help="length of the kept record in years (default 1)")
    parser.add_argument("--members", type=int, default=1,
                        help="independent runs, each from its own random start (default 1)")
    parser.add_argument("--members-of-init", type=int, default=0, metavar="M",
                        help="also run M perturbed copies of each run's state at the end of the spin-up "
                             "(a perturbed-initial-condition ensemble; default 0 = none)")
    parser.add_argument("--perturbation", type=float, default=0.01,
                        help="RMS of the --members-of-init perturbations relative to the PV (default 0.01)")
    parser.add_argument("--spin-up-years", type=float, default=5.0, help="discarded spin-up in years (default 5)")
    parser.add_argument("--nx", type=int, default=64, help="grid points per side of the simulation (default 64)")
    parser.add_argument("--observe", type=int, default=None, metavar="N",
                        help="store a coarse-grained state: the --nx model's fields cut to the Fourier modes "
                             "|k| < N/2 on an N x N grid (N even, < --nx; e.g. --nx 128 --observe 32), so the "
                             "next stored state is uncertain given the current one; default: the full state")
    parser.add_argument("--out-every", type=float, default=6.0, help="output interval in hours (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--fields", default="psi,q,u,v",
                        help="fields to store, from psi (streamfunction), q (potential vorticity), u, v "
                             "(default all; e.g. --fields psi keeps files small)")
    parser.add_argument("--float32", action="store_true", help="store single precision (half the size)")
    parser.add_argument("--out", required=True, help="output netCDF file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    from .observe import add_observe_arguments

    add_observe_arguments(parser)  # --observe-from TRUTH.nc: synthetic observations instead of a simulation
    parser.set_defaults(func=run_data)


def run_data(args) -> int:
    from .observe import observe_requested, run_observe

    if observe_requested(args):
        return run_observe(args)
    import math

    import torch

    from .qg import perturb_members, simulate_qg
    from .qg_netcdf import to_dataset, write_netcdf

    if args.years <= 0 or args.members < 1 or args.members_of_init < 0 or args.spin_up_years < 0:
        raise ValueError("--years must be > 0, --members >= 1, --members-of-init and --spin-up-years >= 0")
    if args.observe is not None and not (4 <= args.observe < args.nx and args.observe % 2 == 0):
        raise ValueError(f"--observe must be an even number of grid points from 4 to below --nx ({args.nx}), "
                         f"got {args.observe}; e.g. --nx 128 --observe 32")
    out_every = args.out_every * 3600.0
    n_steps = int(math.floor(args.years * SECONDS_PER_YEAR / out_every)) + 1
    device = resolve_device(args.device) if args.device else None
    fields = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    bad = [f for f in fields if f not in ("psi", "q", "u", "v")]
    if bad or not fields:
        raise ValueError(f"--fields {args.fields!r}: unknown field(s) {', '.join(bad) or '(none given)'}; "
                         f"choose from psi, q, u, v")
    if args.members_of_init and "q" not in fields:
        fields = fields + ("q",)  # the perturbed copies start from the PV; dropped again below
    kw = dict(nx=args.nx, out_every=out_every, device=device, progress=not args.no_progress, fields=fields,
              observe=args.observe)
    res = simulate_qg(args.members, n_steps, spin_up_years=args.spin_up_years, seed=args.seed,
                      fine_frames=[0] if args.observe and args.members_of_init else None, **kw)
    if args.members_of_init:
        # each run's (fine) state at the end of the spin-up (frame 0), perturbed M times
        starts = res["q_fine"][:, 0] if args.observe else res["q"][:, 0]
        q0 = torch.cat([perturb_members(s, args.members_of_init, amplitude=args.perturbation,
                                        seed=args.seed * 1000 + i) for i, s in enumerate(starts)])
        ens = simulate_qg(q0.shape[0], n_steps, q0=q0, spin_up_years=0.0, seed=args.seed, **kw)
        for k in ("q", "psi", "u", "v"):
            if k in res and k in ens:
                res[k] = torch.cat([res[k], ens[k].to(res[k])])
        res.pop("q_fine", None)
        res["params"] = dict(res["params"], n_members=int(res["q"].shape[0]),
                             members_of_init=args.members_of_init, perturbation=args.perturbation)
    keep = tuple(f.strip() for f in args.fields.split(",") if f.strip())
    for k in ("q", "psi", "u", "v"):
        if k not in keep:
            res.pop(k, None)
    ds = to_dataset(res)
    if args.float32:
        for name in ds.data_vars:
            if ds[name].dtype == "float64":
                ds[name] = ds[name].astype("float32")
    ds.attrs["command"] = (f"diffkit data weather qg --years {args.years} --members {args.members} "
                           f"--members-of-init {args.members_of_init} --perturbation {args.perturbation} "
                           f"--spin-up-years {args.spin_up_years} --nx {args.nx} --out-every {args.out_every} "
                           f"--seed {args.seed} --fields {args.fields}" + (" --float32" if args.float32 else "")
                           + (f" --observe {args.observe}" if args.observe else ""))
    if args.members_of_init:
        ds.attrs["member_layout"] = (f"members 0..{args.members - 1} are the independent runs; then "
                                     f"{args.members_of_init} perturbed copies of each run in order")
    out = write_netcdf(ds, args.out)
    dims = ", ".join(f"{d}={n}" for d, n in ds.sizes.items())
    print(f"diffkit data weather qg: wrote ({dims}) to {out}")
    return 0


def register_forecast(parser: argparse.ArgumentParser) -> None:
    """ensemble weather forecast from a checkpoint trained on data.adapter = weather, as CF netCDF"""
    parser.add_argument("checkpoint",
                        help="checkpoint file or run directory of a model trained on data.adapter = weather")
    parser.add_argument("--data", nargs="+", required=True, metavar="FILE",
                        help="netCDF file(s) or glob(s) holding the initial states (same grid, variables and levels "
                             "as the checkpoint; variables may be in different files)")
    parser.add_argument("--init", action="append", required=True, metavar="TIME[,TIME...]",
                        help="initialisation time(s), ISO (e.g. 1996-01-06T00:00), matched exactly to the data's "
                             "times; comma-separated or repeated; or 'all-val' for every validation init time with "
                             "enough history and truth in the data")
    parser.add_argument("--members", "-m", type=int, default=8, help="ensemble members (default 8)")
    parser.add_argument("--member", default=None, metavar="VALUE|all",
                        help="on data with a member dim (number, member, realization, ...): the input member to "
                             "start from, or 'all' for one forecast ensemble per input member (an initial_member "
                             "dim); default: the run's data.options.member; a file with several members and no "
                             "choice is an error")
    parser.add_argument("--steps", "-k", type=int, required=True, help="forecast steps of the model's lead time")
    parser.add_argument("--out", required=True, help="output netCDF file (dims member, init_time, lead_time, ...)")
    parser.add_argument("--seed", type=int, default=0, help="random seed: the same seed gives the same ensemble")
    parser.add_argument("--sampler", default=None, help="sampler (default: the run's sample.sampler)")
    parser.add_argument("--nfe", type=int, default=None,
                        help="denoiser evaluations per step (default: the run's sample.nfe)")
    parser.add_argument("--perturb", type=float, default=None,
                        help="std of Gaussian noise added to each member's normalised initial state (relative to the "
                             "climatological std of each channel); default 0 for diffusion models, 0.05 for "
                             "regression models with more than one member (perturbed-initial-condition ensemble)")
    parser.add_argument("--perturb-length", type=float, default=0.0, metavar="GRID_POINTS",
                        help="correlation length of the --perturb noise in grid points (Gaussian filter; default 0: "
                             "white noise at every grid point); diffkit.calibrate.tune_perturbation picks it")
    from diffkit.calibrate import add_spread_scale_argument

    add_spread_scale_argument(parser)
    parser.add_argument("--time-units", default=None,
                        help="time units for data files without CF time units (default: the run's "
                             "data.options.time_units)")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_forecast)


def run_forecast(args) -> int:
    import torch

    from diffkit.adapters import atomic_to_netcdf

    from .forecast import forecast, initial_states, load_forecaster, member_attrs, member_dataset

    if args.members < 1 or args.steps < 1:
        raise ValueError(f"--members and --steps must be >= 1, got {args.members} and {args.steps}")
    if args.perturb is not None and not args.perturb >= 0:
        raise ValueError(f"--perturb must be >= 0, got {args.perturb}")
    if not args.perturb_length >= 0 or args.perturb_length == float("inf"):
        raise ValueError(f"--perturb-length must be >= 0 and finite (grid points), got {args.perturb_length}")
    from diffkit.calibrate import apply_spread_scale, check_spread_scale, spread_scale_attrs

    check_spread_scale(args)
    device = resolve_device(args.device)
    fc = load_forecaster(args.checkpoint, device=device)
    opts = fc.data_options
    if args.time_units:
        opts["time_units"] = args.time_units
    inits = ",".join(args.init)
    data = args.data if len(args.data) > 1 else args.data[0]
    ist = initial_states(data, fc.layout, inits, steps=args.steps, options=opts, member=args.member)
    perturb = args.perturb
    pred = forecast(fc, None, ist, steps=args.steps, members=args.members, seed=args.seed, sampler=args.sampler,
                    nfe=args.nfe, perturb=perturb, perturb_length=args.perturb_length, progress=not args.no_progress)
    pred = apply_spread_scale(pred, args, member_dim=1)                    # (N, M, K, C, lat, lon)
    regression = fc.objective == "regression"
    from diffkit.rollout import resolve_perturb

    perturb = resolve_perturb(perturb, fc.model, args.members)
    sc = fc.config.sample
    attrs = {"checkpoint": str(args.checkpoint), "seed": args.seed, "objective": fc.objective,
             "sampler": "none (regression)" if regression else (args.sampler or sc.sampler),
             "nfe": 1 if regression else (args.nfe or sc.nfe), "perturb": float(perturb),
             "perturb_length": float(args.perturb_length if perturb else 0.0),
             "data": " ".join(map(str, args.data)), **spread_scale_attrs(args),
             "command": _forecast_command(args, inits),
             **member_attrs(ist, args.member, opts.get("member"))}
    ds = member_dataset(pred, fc.layout, ist, attrs=attrs, options=opts,
                        per_member=attrs["initial_member"] == "all")
    out = atomic_to_netcdf(ds, args.out)
    lead = fc.layout.autoregressive.step
    n_init = ds.sizes["init_time"]
    im = f" x {ds.sizes['initial_member']} initial member(s)" if "initial_member" in ds.dims else ""
    print(f"diffkit forecast: wrote {args.members} member(s){im} x {n_init} init time(s) x {args.steps} step(s) "
          f"of {lead:g} h ({fc.objective}{f', perturb {perturb:g}' if perturb else ''}; initial state: "
          f"{attrs['initial_member_choice']}) to {out}")
    return 0


def _forecast_command(args, inits: str) -> str:
    """The command line that reproduces a forecast file (recorded as its ``command`` attribute)."""
    import shlex

    words = ["diffkit", "forecast", str(args.checkpoint), "--data", *map(str, args.data), "--init", inits,
             "--members", str(args.members), "--steps", str(args.steps), "--seed", str(args.seed)]
    for flag, v in (("--member", args.member), ("--sampler", args.sampler), ("--nfe", args.nfe),
                    ("--perturb", args.perturb), ("--perturb-length", args.perturb_length or None),
                    ("--time-units", args.time_units),
                    ("--spread-scale", args.spread_scale if args.spread_scale != 1.0 else None)):
        if v is not None:
            words += [flag, str(v)]
    return shlex.join(words)


class WeatherEvaluator(Evaluator):
    """Weather forecasts and analyses (dims member, init_time, lead_time, [level,] latitude, longitude):
    latitude-weighted scores per lead time against truth files read at each valid time, with
    persistence and climatology references."""

    name = "weather"

    @classmethod
    def can_evaluate(cls, ds) -> bool:
        return "init_time" in ds.dims and "lead_time" in ds.dims

    @classmethod
    def add_arguments(cls, group) -> None:
        group.add_argument("--member", default=None, metavar="VALUE|all",
                           help="on truth with a member dim (number, member, realization, ...): the truth member to "
                                "score against, or 'all' to score against every member (each a separate case); a "
                                "truth with several members and no choice is an error")
        group.add_argument("--time-units", default=None,
                           help="time units for truth files without CF time units (default: those the forecast "
                                "recorded)")

    @classmethod
    def run(cls, args) -> int:
        return run_evaluate(args)


def run_evaluate(args) -> int:
    """``diffkit evaluate`` of a weather forecast or analysis (:class:`WeatherEvaluator`)."""
    from .evaluate import evaluate, format_calibration, format_table

    truth = args.truth if len(args.truth) > 1 else args.truth[0]
    ev = evaluate(args.forecast, truth, out=args.out, plots=not args.no_plots, seed=args.seed,
                  time_units=args.time_units, member=args.member)
    s = ev.scores
    print(f"diffkit evaluate: {s.attrs['members']} member(s), {s.attrs['n_init']} init time(s), "
          f"{s.sizes['lead_time']} lead time(s); {s.attrs['n_cases']} case(s): {s.attrs['cases']}")
    if str(s.attrs.get("persistence", "")).startswith("not computed"):
        print(f"diffkit evaluate: note: persistence reference {s.attrs['persistence']}")
    print(format_table(s))
    print(format_calibration(s))
    print(f"diffkit evaluate: wrote {len(ev.files)} file(s) to {args.out}: "
          f"{', '.join(sorted(p.name for p in ev.files))}")
    return 0
