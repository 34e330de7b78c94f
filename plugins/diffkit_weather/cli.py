"""The weather plugin's commands: ``diffkit data weather qg``.

Registered through the ``diffkit_commands`` hook; heavy imports happen inside ``run``.
"""
from __future__ import annotations

import argparse

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
    parser.add_argument("--nx", type=int, default=64, help="grid points per side (default 64)")
    parser.add_argument("--out-every", type=float, default=6.0, help="output interval in hours (default 6)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--out", required=True, help="output netCDF file")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run_data)


def run_data(args) -> int:
    import math

    import torch

    from .qg import perturb_members, simulate_qg, to_dataset, write_netcdf

    if args.years <= 0 or args.members < 1 or args.members_of_init < 0 or args.spin_up_years < 0:
        raise ValueError("--years must be > 0, --members >= 1, --members-of-init and --spin-up-years >= 0")
    out_every = args.out_every * 3600.0
    n_steps = int(math.floor(args.years * SECONDS_PER_YEAR / out_every)) + 1
    device = torch.device(args.device) if args.device else None
    kw = dict(nx=args.nx, out_every=out_every, device=device, progress=not args.no_progress)
    res = simulate_qg(args.members, n_steps, spin_up_years=args.spin_up_years, seed=args.seed, **kw)
    if args.members_of_init:
        # each run's state at the end of the spin-up (frame 0), perturbed M times
        starts = res["q"][:, 0]
        q0 = torch.cat([perturb_members(s, args.members_of_init, amplitude=args.perturbation,
                                        seed=args.seed * 1000 + i) for i, s in enumerate(starts)])
        ens = simulate_qg(q0.shape[0], n_steps, q0=q0, spin_up_years=0.0, seed=args.seed, **kw)
        for k in ("q", "psi", "u", "v"):
            if k in res and k in ens:
                res[k] = torch.cat([res[k], ens[k].to(res[k])])
        res["params"] = dict(res["params"], n_members=int(res["q"].shape[0]),
                             members_of_init=args.members_of_init, perturbation=args.perturbation)
    ds = to_dataset(res)
    ds.attrs["command"] = (f"diffkit data weather qg --years {args.years} --members {args.members} "
                           f"--members-of-init {args.members_of_init} --perturbation {args.perturbation} "
                           f"--spin-up-years {args.spin_up_years} --nx {args.nx} --out-every {args.out_every} "
                           f"--seed {args.seed}")
    if args.members_of_init:
        ds.attrs["member_layout"] = (f"members 0..{args.members - 1} are the independent runs; then "
                                     f"{args.members_of_init} perturbed copies of each run in order")
    out = write_netcdf(ds, args.out)
    dims = ", ".join(f"{d}={n}" for d, n in ds.sizes.items())
    print(f"diffkit data weather qg: wrote ({dims}) to {out}")
    return 0
