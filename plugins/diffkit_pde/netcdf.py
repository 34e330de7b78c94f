"""CF-1.8 xarray datasets and atomic netCDF files of the PDE simulators' results.

Importing this module does not import xarray (:func:`to_dataset` does, when called).
"""
from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch


def to_dataset(result: dict, kind: str | None = None):
    """A CF-1.8 :class:`xarray.Dataset` of a simulator result.

    ``kind`` is ``"ks"``, ``"burgers"`` or ``"kolmogorov"`` (default: ``result["params"]["kind"]``).
    1-D: dims ``(trajectory, time, x)``, variable ``u``, per-trajectory variables ``L``, ``dx``,
    ``dt`` (output interval) and ``dt_sim``.  When all trajectories share the domain length the
    ``x`` coordinate is the position; otherwise ``x`` is the position divided by ``L`` and the
    auxiliary coordinate ``x_position(trajectory, x)`` holds the positions (likewise ``time`` vs
    ``t(trajectory, time)`` for jittered output intervals).  2-D: dims ``(trajectory, time, x, y)``,
    variables ``u``, ``v``, ``omega``.  All quantities are nondimensional (units ``"1"``).
    Simulation parameters become global attributes.
    """
    import xarray as xr  # lazy: importing the plugin must not import xarray

    from diffkit.adapters import netcdf_attrs

    p = dict(result["params"])
    kind = kind or p.get("kind")
    if kind not in ("ks", "burgers", "kolmogorov"):
        raise ValueError(f"kind must be 'ks', 'burgers' or 'kolmogorov', got {kind!r}")
    cpu = lambda a: torch.as_tensor(a).detach().cpu().numpy()
    attrs = {"Conventions": "CF-1.8", "source": "diffkit_pde simulators",
             "title": f"{p.get('name', kind)} simulation",
             **netcdf_attrs(p)}
    ntr = int(p["n_traj"])
    coords: dict[str, Any] = {
        "trajectory": ("trajectory", np.arange(ntr), {"long_name": "trajectory index"})}
    if kind == "kolmogorov":
        for ax, nm in (("x", "X"), ("y", "Y")):
            coords[ax] = (ax, cpu(result[ax]), {"long_name": f"{ax} coordinate", "units": "1", "axis": nm})
        coords["time"] = ("time", cpu(result["t"]), {"long_name": "time (nondimensional)", "units": "1", "axis": "T"})
        dims = ("trajectory", "time", "x", "y")
        dv = {
            "u": (dims, cpu(result["u"]), {"long_name": "x component of velocity", "units": "1"}),
            "v": (dims, cpu(result["v"]), {"long_name": "y component of velocity", "units": "1"}),
            "omega": (dims, cpu(result["omega"]), {"long_name": "vorticity (dv/dx - du/dy)", "units": "1"}),
        }
        xs = cpu(result["x"])
        per = lambda v: np.full(ntr, float(v))
        dv["dt"] = ("trajectory", per(result["dt"]), {"long_name": "output time interval", "units": "1"})
        dv["dx"] = ("trajectory", per(xs[1] - xs[0]), {"long_name": "grid spacing", "units": "1"})
        dv["dt_sim"] = ("trajectory", per(result["dt_sim"]), {"long_name": "internal ETDRK4 time step", "units": "1"})
        # the state a surrogate learns by default (Shysheya et al. 2024); omega is derived from it
        attrs["state_variables"] = "u,v"
        return xr.Dataset(dv, coords=coords, attrs=attrs)

    u = cpu(result["u"])
    L, t = cpu(result["L"]), cpu(result["t"])
    nx = u.shape[-1]
    dims = ("trajectory", "time", "x")
    uattrs = {"long_name": "u", "units": "1"}
    if np.allclose(L, L[0], rtol=0, atol=0):
        coords["x"] = ("x", cpu(result["x"])[0], {"long_name": "position", "units": "1", "axis": "X"})
    else:
        coords["x"] = ("x", np.arange(nx) / nx, {"long_name": "position divided by the domain length L",
                                                  "units": "1", "axis": "X"})
        coords["x_position"] = (("trajectory", "x"), cpu(result["x"]), {"long_name": "position", "units": "1"})
    if np.allclose(t, t[:1], rtol=0, atol=0):
        coords["time"] = ("time", t[0], {"long_name": "time (nondimensional)", "units": "1", "axis": "T"})
    else:
        coords["time"] = ("time", np.arange(t.shape[1]), {"long_name": "output step index", "units": "1", "axis": "T"})
        coords["t"] = (("trajectory", "time"), t, {"long_name": "time (nondimensional)", "units": "1"})
    dv = {
        "u": (dims, u, uattrs),
        "L": ("trajectory", L, {"long_name": "domain length", "units": "1"}),
        "dx": ("trajectory", cpu(result["dx"]), {"long_name": "grid spacing", "units": "1"}),
        "dt": ("trajectory", cpu(result["dt"]), {"long_name": "output time interval", "units": "1"}),
        "dt_sim": ("trajectory", cpu(result["dt_sim"]), {"long_name": "internal ETDRK4 time step", "units": "1"}),
    }
    return xr.Dataset(dv, coords=coords, attrs=attrs)


def write_netcdf(ds, path) -> Path:
    """Write ``ds`` to ``path`` atomically (temporary file in the same folder, then ``os.replace``)."""
    from diffkit.adapters import atomic_to_netcdf

    return atomic_to_netcdf(ds, path)
