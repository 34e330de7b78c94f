"""The catalogue of bad inputs (issue 13): one table, each input run the way a user runs it.

Every entry is ``Bad(id, argv, fragment)``: ``argv`` is a ``diffkit`` command line run in-process
through :func:`diffkit.cli.main` (in a scratch working directory), and its error must

- contain ``fragment``;
- be ONE line on stderr (besides argparse's ``usage:`` line for usage errors, and ``warning:`` lines);
- carry no traceback;
- exit non-zero (1 for errors the command reports, 2 for argparse usage errors).

Placeholders in ``argv`` (and in config texts) are filled by :func:`fill`: ``{run}`` is a tiny trained
run directory (shared by the module), ``{ckpt}`` its checkpoint file, ``{tmp}`` the test's scratch
directory, and ``{name}`` any file of :data:`FILES` (bad checkpoints, data files...), written there
on first use.  :func:`train` makes the argv of ``diffkit train`` on a config text (TOML, or YAML
with ``ext=".yaml"``).  ``env=`` names an entry of :data:`ENVS`, a patch of the environment
(a missing optional package, no CUDA, plugin switches).

Adding an entry is one line in :data:`CATALOGUE`.
"""
from __future__ import annotations

import builtins
import os
import re
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch

from diffkit import registry
from diffkit.cli import main


@dataclass(frozen=True)
class Bad:
    id: str
    argv: tuple
    fragment: str
    env: str | None = None


def train(text: str, ext: str = ".toml", *extra: str) -> tuple:
    """``diffkit train CONFIG`` on a config holding ``text`` (placeholders filled)."""
    return ("train", _Config(text, ext), "--no-progress", *extra)


@dataclass(frozen=True)
class _Config:
    text: str
    ext: str


def cli(*words: str) -> tuple:
    return tuple(words)


def sample(*words: str) -> tuple:
    """``diffkit sample {run} --out {tmp}/s.nc --no-progress`` plus ``words``."""
    return ("sample", "{run}", "--out", "{tmp}/s.nc", "--no-progress", *words)


def weather(options: str, extra: str = "") -> tuple:
    """``diffkit train`` on the weather adapter with ``data.options`` given as an inline TOML table body."""
    return train(f'[data]\nadapter = "weather"\noptions = {{{options}}}\n{extra}')


def pde(options: str) -> tuple:
    return train(f'[data]\nadapter = "pde"\noptions = {{{options}}}\n')


def images(options: str) -> tuple:
    return train(f'[data]\nadapter = "images"\noptions = {{{options}}}\n')


# ------------------------------------------------------------------------------------- files
def _nc(path: Path, kind: str) -> None:
    import xarray as xr

    t = np.arange(40)
    lat, lon = np.linspace(60.0, 30.0, 4), np.linspace(0.0, 30.0, 4)
    data = np.random.default_rng(0).standard_normal((40, 4, 4)).astype(np.float32)
    coords = {"time": ("time", t, {"units": "hours since 2000-01-01 00:00"}),
              "lat": ("lat", lat, {"units": "degrees_north"}), "lon": ("lon", lon, {"units": "degrees_east"})}
    if kind == "weather_nan":
        data[3, 1, 1] = np.nan
    if kind == "weather_const":
        data[:] = 1.0
    if kind == "weather_inf":
        data[2, 0, 0] = np.inf
    ds = xr.Dataset({"t2m": (("time", "lat", "lon"), data, {"units": "K"})}, coords=coords)
    if kind == "weather_nolatlon":
        ds = xr.Dataset({"t2m": (("time", "a", "b"), data)}, coords={"time": coords["time"]})
    if kind == "weather_notime":
        ds = ds.isel(time=0, drop=True)
    if kind == "weather_badtime":
        ds = ds.assign_coords(time=("time", t, {"units": "fortnights since yesterday"}))
    if kind.startswith("pde"):
        u = np.random.default_rng(0).standard_normal((3, 6, 16)).astype(np.float32)
        if kind == "pde_nan":
            u[1, 2, 3] = np.nan
        dims = ("trajectory", "time", "x") if kind != "pde_dims" else ("a", "b", "c")
        ds = xr.Dataset({"u": (dims, u)}, coords={dims[2]: np.linspace(0, 1, 16, endpoint=False)})
    ds.to_netcdf(path)


def _ckpt(path: Path, kind: str, run: Path) -> None:
    from diffkit.checkpoint import save_checkpoint

    good = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1].read_bytes()
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "truncated":
        path.write_bytes(good[: len(good) // 2])
    elif kind == "corrupt":
        b = bytearray(good)
        b[len(b) // 2: len(b) // 2 + 64] = bytes(64)
        path.write_bytes(bytes(b))
    elif kind == "text":
        path.write_text("not a checkpoint\n")
    elif kind == "pickle":
        torch.save({"format": "diffkit-checkpoint", "format_version": 1, "payload": _Payload()}, path)
    elif kind == "foreign":
        torch.save({"state_dict": {"w": torch.zeros(2)}}, path)
    elif kind == "newer":
        torch.save({"format": "diffkit-checkpoint", "format_version": 99, "diffkit_version": "99.0"}, path)
    elif kind == "weights_only":
        save_checkpoint(path, {"model": {"w": torch.zeros(2)}})
    elif kind == "tiny":
        path.write_bytes(b"PK")


def _nocoords(path: Path, dims: tuple) -> None:
    """A weather file whose spatial dims have no coordinate values (index numbers only)."""
    import xarray as xr

    data = np.random.default_rng(0).standard_normal((40, 4, 4)).astype(np.float32)
    ds = xr.Dataset({"t2m": (("time", *dims), data, {"units": "K"})},
                    coords={"time": ("time", np.arange(40), {"units": "hours since 2000-01-01 00:00"})})
    ds.to_netcdf(path)


def _members(path: Path, nan_member: int | None = None, inf_member: int | None = None) -> None:
    """An ERA5-style ensemble file: 3 members in a ``number`` dim, GRIB-style attributes."""
    import xarray as xr

    g = np.random.default_rng(1)
    data = (280.0 + g.standard_normal((3, 24, 4, 8))).astype(np.float32)
    if nan_member is not None:
        data[nan_member, :, 1, 1] = np.nan
    if inf_member is not None:
        data[inf_member, :, 1, 1] = np.inf
    ds = xr.Dataset({"t2m": (("number", "time", "latitude", "longitude"), data,
                             {"units": "K", "GRIB_paramId": 167, "GRIB_shortName": "2t"})},
                    coords={"number": ("number", np.arange(3)),
                            "time": ("time", 6 * np.arange(24), {"units": "hours since 2020-01-01 00:00"}),
                            "latitude": ("latitude", np.linspace(60.0, -60.0, 4), {"units": "degrees_north"}),
                            "longitude": ("longitude", np.arange(0.0, 360.0, 45.0), {"units": "degrees_east"})})
    ds.to_netcdf(path)


def weather_run(shared: Path) -> Path:
    """A tiny weather model trained (2 steps) on every member of the ensemble file, made once per module."""
    wrun = shared / "wrun"
    if not (wrun / "checkpoints").is_dir():
        data = shared / "members.nc"
        _members(data)
        cfg = shared / "weather.toml"
        cfg.write_text(f"""run_dir = "{wrun.as_posix()}"
[data]
adapter = "weather"
batch_size = 4
val_fraction = 0.25
options = {{path = "{data.as_posix()}", forcings = []}}
[model]
backbone = "unet"
options = {{channels = 8, channel_mult = [1], num_res_blocks = 1, attn_levels = [], mid_attn = false}}
[trainer]
steps = 2
warmup = 1
val_every = 0
ckpt_every = 0
[sample]
sampler = "ddim"
nfe = 2
n = 2
""")
        assert main(["train", str(cfg), "--no-progress", "--device", "cpu"]) == 0
    return wrun


def _forecast(path: Path, run: Path, kind: str = "ok") -> None:
    """A forecast of the tiny weather model (member 0), then spoilt as ``kind`` says."""
    import xarray as xr

    shared = run.parent
    wrun = weather_run(shared)
    good = shared / "fc.nc"
    if not good.exists():
        assert main(["forecast", str(wrun), "--data", str(shared / "members.nc"), "--init", "2020-01-04T00:00",
                     "--member", "0", "--members", "2", "--steps", "2", "--nfe", "2", "--out", str(good),
                     "--no-progress", "--device", "cpu"]) == 0
    with xr.open_dataset(good) as ds:
        ds = ds.load()
    if kind == "valid_time":
        vt = ds["valid_time"].values.copy()
        vt[..., -1] = vt[..., -1] + np.timedelta64(6, "h")
        ds = ds.assign_coords(valid_time=(ds["valid_time"].dims, vt))
    elif kind == "extra_dim":
        ds = xr.concat([ds, ds, ds], dim="foo").transpose("member", "init_time", "lead_time", "foo", ...)
    elif kind == "inf":
        ds["t2m"][0, 0, 0, 0, 0] = np.inf
    ds.to_netcdf(path)


def _zarr(path: Path) -> None:
    import xarray as xr

    _nc(path.with_suffix(".nc"), "weather")
    with xr.open_dataset(path.with_suffix(".nc")) as ds:
        ds.load().to_zarr(path)


class _Payload:
    """Stands for code in a malicious checkpoint: torch.save pickles it, diffkit must refuse to load it."""

    def __reduce__(self):
        return (os.system, ("echo pwned",))


#: file name -> how to write it (called with the path and the shared run directory)
FILES = {
    **{f"{k}.pt": (lambda p, run, k=k: _ckpt(p, k, run))
       for k in ("empty", "truncated", "corrupt", "text", "pickle", "foreign", "newer", "weights_only", "tiny")},
    **{f"{k}.nc": (lambda p, run, k=k: _nc(p, k))
       for k in ("weather", "weather_nan", "weather_const", "weather_inf", "weather_nolatlon", "weather_notime",
                 "weather_badtime", "pde", "pde_nan", "pde_dims")},
    "garbage.nc": lambda p, run: p.write_bytes(b"\x00garbage, not netCDF\n" * 10),
    "empty.toml": lambda p, run: p.write_text(""),
    "latin1.toml": lambda p, run: p.write_bytes("run_dir = \"caf\xe9\"\n".encode("latin-1")),
    "images.npy": lambda p, run: np.save(p, np.zeros((4, 3), np.float32)),
    "images_nan.npy": lambda p, run: np.save(p, np.full((6, 8, 8), np.nan, np.float32)),
    "strings.npy": lambda p, run: np.save(p, np.array([["a"] * 8] * 8)),
    "noimages": lambda p, run: p.mkdir(),
    "store.zarr": lambda p, run: _zarr(p),
    "empty.zarr": lambda p, run: p.mkdir(),
    "nocoords.nc": lambda p, run: _nocoords(p, ("y", "x")),
    "latlon_nocoords.nc": lambda p, run: _nocoords(p, ("lat", "lon")),
    "members_nan.nc": lambda p, run: _members(p, nan_member=2),
    "members_inf.nc": lambda p, run: _members(p, inf_member=1),
    "wrun": lambda p, run: weather_run(run.parent).as_posix(),
    "members.nc": lambda p, run: weather_run(run.parent),
    **{f"fc_{k}.nc": (lambda p, run, k=k: _forecast(p, run, k)) for k in ("ok", "valid_time", "extra_dim", "inf")},
    "adir": lambda p, run: p.mkdir(),
    "ckptfile": lambda p, run: (p.mkdir(), (p / "checkpoints").write_text("not a folder\n")),
    "emptyrun": lambda p, run: (p / "checkpoints").mkdir(parents=True),
}


# ------------------------------------------------------------------------------ environment
def _no_module(name):
    def patch(monkeypatch):
        real = builtins.__import__

        def fake(mod, *a, **k):
            if mod == name or mod.startswith(name + "."):
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return real(mod, *a, **k)

        monkeypatch.setattr(builtins, "__import__", fake)
    return patch


def _no_cuda(monkeypatch):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)


def _autoload_off(monkeypatch):
    monkeypatch.setenv("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "1")
    registry.refresh()


def _only_plugins(monkeypatch):
    monkeypatch.setenv("DIFFKIT_PLUGINS", "backbones")
    registry.refresh()


ENVS = {"no_zarr": _no_module("zarr"), "no_cuda": _no_cuda, "autoload_off": _autoload_off,
        "only_backbones": _only_plugins, "no_h5py": _no_module("h5py")}


# -------------------------------------------------------------------------------- the table
CATALOGUE = [
    # -- config: files ----------------------------------------------------------------------
    Bad("config-missing-file", cli("train", "{tmp}/nope.toml"), "configuration file"),
    Bad("config-unknown-extension", cli("train", "{tmp}/c.json"), "unknown extension '.json'; use .toml, .yaml or .yml"),
    Bad("config-toml-syntax", train("[trainer]\nlr = \n"), "line 2, column 6: invalid TOML"),
    Bad("config-yaml-syntax", train("trainer:\n  betas: [0.9\n  steps: 3\n", ".yaml"), "invalid YAML"),
    Bad("config-yaml-duplicate-key", train("trainer:\n  lr: 1.0e-4\n  lr: 2.0e-4\n", ".yaml"), "duplicate key 'lr'"),
    Bad("config-yaml-list", train("- 1\n- 2\n", ".yaml"), "must be a table of settings"),
    Bad("config-not-utf8", cli("train", "{latin1.toml}"), "is not UTF-8 text"),
    # -- config: keys -----------------------------------------------------------------------
    Bad("config-unknown-key", train("[trainer]\nlrr = 1e-4\n"), "unknown key 'trainer.lrr'"),
    Bad("config-typo-suggestion", train("[trainer]\nlrr = 1e-4\n"), "did you mean 'trainer.lr'?"),
    Bad("config-unknown-section", train("[trainr]\nlr = 1e-4\n"), "did you mean 'trainer'?"),
    Bad("config-key-in-wrong-section", train("[trainer]\nbatch_size = 8\n"), "did you mean 'data.batch_size'?"),
    Bad("config-top-level-key", train("lr = 1e-4\n"), "unknown key 'lr'"),
    Bad("config-several-typos", train("[trainer]\nlrr = 1\nstesp = 2\n[sample]\nnn = 3\n"), "3 problems in"),
    Bad("config-section-not-table", train("trainer = 3\n"), "'trainer' in"),
    # -- config: types ----------------------------------------------------------------------
    Bad("config-int-as-float", train("[trainer]\nsteps = 1.5\n"), "'trainer.steps'"),
    Bad("config-int-exponent", train("[trainer]\nsteps = 1e4\n"), "write 10000"),
    Bad("config-bool-as-int", train("[trainer]\nsteps = true\n"), "a bool is not a number"),
    Bad("config-quoted-number", train('[trainer]\nlr = "1e-4"\n'), "remove the quotes"),
    Bad("config-int-as-bool", train("[trainer]\ncompile = 1\n"), "write true or false"),
    Bad("config-str-for-adapter", train("[data]\nadapter = 3\n"), "'data.adapter'"),
    Bad("config-options-not-table", train("[data]\noptions = [1, 2]\n"), "'data.options'"),
    Bad("config-betas-length", train("[trainer]\nbetas = [0.9]\n"), "must be a list of 2 values"),
    Bad("config-betas-item", train('[trainer]\nbetas = [0.9, "x"]\n'), "'trainer.betas[1]'"),
    Bad("config-choice", train('[model]\nparameterization = "V"\n'), "did you mean 'v'?"),
    Bad("config-loss-choice", train('[loss]\nweighting = "minsnr"\n'), "did you mean 'min_snr'"),
    Bad("config-precision", train('[trainer]\nprecision = "fp16"\n'), "'trainer.precision'"),
    Bad("config-schedule-type", train("[model]\nschedule = 3\n"), "'model.schedule'"),
    Bad("config-schedule-no-name", train("[model]\nschedule = {T = 10}\n"), "table with a 'name' key"),
    # -- config: ranges ---------------------------------------------------------------------
    Bad("config-steps-zero", train("[trainer]\nsteps = 0\n"), "'trainer.steps'"),
    Bad("config-steps-beyond-int64", train("[trainer]\nsteps = 100000000000000000000\n"), "does not fit in a 64-bit integer"),
    Bad("config-seed-beyond-int64", train("[trainer]\nseed = 100000000000000000000\n"), "'trainer.seed'"),
    Bad("config-lr-negative", train("[trainer]\nlr = -1.0\n"), "'trainer.lr'"),
    Bad("config-lr-nan", train("[trainer]\nlr = nan\n"), "must be > 0 and finite"),
    Bad("config-ema-decay", train("[trainer]\nema_decay = 1.0\n"), "'trainer.ema_decay'"),
    Bad("config-batch-size", train("[data]\nbatch_size = -4\n"), "'data.batch_size'"),
    Bad("config-val-fraction", train("[data]\nval_fraction = 1.0\n"), "'data.val_fraction'"),
    Bad("config-grad-accum", train("[trainer]\ngrad_accum = 3\n"), "multiple of 'trainer.grad_accum'"),
    Bad("config-keep-last", train("[trainer]\nkeep_last = 0\n"), "'trainer.keep_last'"),
    Bad("config-time-budget", train("[trainer]\ntime_budget = -5.0\n"), "'trainer.time_budget'"),
    Bad("config-p-uncond", train("[loss]\np_uncond = 1.0\n"), "'loss.p_uncond'"),
    Bad("config-sigma-order", train("[loss]\nsigma_min = 100.0\n"), "must be below 'loss.sigma_max'"),
    Bad("config-schedule-T-zero", train('[model]\nschedule = {name = "linear", T = 0}\n'), "'model.schedule.T'"),
    Bad("config-schedule-T-huge", train('[model]\nschedule = {name = "linear", T = 100000000000000000000}\n'),
        "'model.schedule.T'"),
    Bad("config-schedule-T-float", train('[model]\nschedule = {name = "linear", T = 2.5}\n'), "'model.schedule.T'"),
    Bad("config-schedule-option", train('[model]\nschedule = {name = "linear", Tt = 5}\n'), "unknown option(s) Tt"),
    Bad("config-schedule-value", train('[model]\nschedule = {name = "refiner", sigma_min = 2.0}\n'), "model.schedule"),
    # -- config: names of components ----------------------------------------------------------
    Bad("config-unknown-sampler", train('[sample]\nsampler = "nope"\n'), "'sample.sampler'"),
    Bad("config-sampler-typo", train('[sample]\nsampler = "dpmpp2m"\n'), "did you mean 'dpmpp_2m'?"),
    Bad("config-unknown-spacing", train('[sample]\nspacing = "cubic"\n'), "'sample.spacing'"),
    Bad("config-nfe-zero", train("[sample]\nnfe = 0\n"), "'sample.nfe'"),
    Bad("config-nfe-huge", train("[sample]\nnfe = 10000000\n"), "'sample.nfe'"),
    Bad("config-negative-guidance", train("[sample]\nguidance = -1.0\n"), "negative guidance is not supported"),
    Bad("config-unknown-adapter", train('[data]\nadapter = "nope"\n'), "unknown adapter 'nope'"),
    Bad("config-unknown-backbone", train('[model]\nbackbone = "nope"\n'), "unknown backbone 'nope'"),
    Bad("config-unknown-schedule", train('[model]\nschedule = "nope"\n'), "unknown schedule 'nope'"),
    Bad("config-backbone-option", train("[model]\noptions = {nope = 1}\n"), "unknown option(s) nope"),
    Bad("config-adapter-option", train("[data]\noptions = {nope = 1}\n"), "unknown option(s) nope"),
    # -- config: --set overrides ----------------------------------------------------------------
    Bad("set-unknown-key", cli("train", "--set", "trainer.lrr=1"), "unknown key 'trainer.lrr' in --set trainer.lrr=1"),
    Bad("set-no-equals", cli("train", "--set", "trainer.lr"), "--set expects KEY=VALUE"),
    Bad("set-bad-toml", cli("train", "--set", "trainer.betas=[0.9,"), "not a valid TOML value"),
    Bad("set-section", cli("train", "--set", "trainer=3"), "'trainer' is a section"),
    Bad("set-not-a-table", cli("train", "--set", "trainer.lr.x=1"), "'trainer.lr' is float, not a table"),
    Bad("set-sampler", cli("train", "--set", "sample.sampler=nope"), "'sample.sampler' in --set sample.sampler=nope"),
    # -- CLI ----------------------------------------------------------------------------------
    Bad("cli-unknown-command", cli("nope"), "invalid choice: 'nope'"),
    Bad("cli-unknown-option-train", cli("train", "--nope"), "diffkit train: error: unrecognized arguments: --nope"),
    Bad("cli-unknown-option-sample", cli("sample", "{run}", "--out", "x.nc", "--nope"), "diffkit sample: error: unrecognized"),
    Bad("cli-unknown-option-plugin", cli("data", "pde", "ks", "--out", "x.nc", "--nope"), "diffkit data pde: error: unrecog"),
    Bad("cli-missing-argument", cli("sample", "{run}"), "the following arguments are required: --out"),
    Bad("cli-bad-int", cli("sample", "{run}", "--out", "x.nc", "--n", "many"), "argument --n/-n/--num-samples: invalid int"),
    Bad("cli-plugins-bad-kind", cli("plugins", "--kind", "nope"), "argument --kind: invalid choice: 'nope'"),
    Bad("sample-missing-run", cli("sample", "{tmp}/nope", "--out", "{tmp}/s.nc"), "does not exist; check the path"),
    Bad("sample-empty-dir", cli("sample", "{adir}", "--out", "{tmp}/s.nc"), "no checkpoint found in"),
    Bad("sample-run-without-checkpoints", cli("sample", "{emptyrun}", "--out", "{tmp}/s.nc"), "no checkpoint found in"),
    Bad("sample-n-zero", sample("--n", "0"), "--n must be >= 1, got 0"),
    Bad("sample-steps-zero", sample("--steps", "0"), "--steps must be in 1..1000000"),
    Bad("sample-steps-beyond-int64", sample("--steps", "100000000000000000000"), "--steps must be in 1..1000000"),
    Bad("sample-seed-negative", sample("--seed", "-1"), "--seed must be in 0.."),
    Bad("sample-unknown-sampler", sample("--sampler", "nope"), "unknown sampler 'nope'; installed samplers: ddim"),
    Bad("sample-unknown-spacing", sample("--spacing", "cubic"), "--spacing must be one of uniform"),
    Bad("sample-negative-guidance", sample("--guidance", "-2"), "negative guidance is not supported"),
    Bad("sample-inf-guidance", sample("--guidance", "inf"), "--guidance must be >= 0"),
    Bad("sample-guidance-unconditional", sample("--guidance", "3"), "this model is unconditional (num_classes = 0)"),
    Bad("sample-label-unconditional", sample("--label", "1"), "--label was given but this model is not class-conditional"),
    Bad("sample-out-directory", cli("sample", "{run}", "--out", "{adir}"), "is a directory; give a file name"),
    Bad("sample-out-extension", cli("sample", "{run}", "--out", "{tmp}/s.png"), "has an unknown extension '.png'"),
    Bad("sample-out-no-extension", cli("sample", "{run}", "--out", "{tmp}/s"), "has no extension"),
    Bad("sample-bad-device", sample("--device", "nope"), "--device 'nope' is not a torch device"),
    # -- checkpoints ----------------------------------------------------------------------------
    Bad("ckpt-empty", cli("sample", "{empty.pt}", "--out", "{tmp}/s.nc"), "is empty (0 bytes)"),
    Bad("ckpt-truncated", cli("sample", "{truncated.pt}", "--out", "{tmp}/s.nc"), "is truncated or corrupt"),
    Bad("ckpt-truncated-header", cli("sample", "{tiny.pt}", "--out", "{tmp}/s.nc"), "is truncated"),
    Bad("ckpt-corrupt", cli("sample", "{corrupt.pt}", "--out", "{tmp}/s.nc"), "corrupt"),
    Bad("ckpt-text-file", cli("sample", "{text.pt}", "--out", "{tmp}/s.nc"), "is not a diffkit checkpoint"),
    Bad("ckpt-pickle-payload", cli("sample", "{pickle.pt}", "--out", "{tmp}/s.nc"), "refuses to unpickle"),
    Bad("ckpt-foreign", cli("sample", "{foreign.pt}", "--out", "{tmp}/s.nc"), "is not a diffkit checkpoint"),
    Bad("ckpt-newer-format", cli("sample", "{newer.pt}", "--out", "{tmp}/s.nc"), "was written by a newer diffkit"),
    Bad("ckpt-lacks-entries", cli("sample", "{weights_only.pt}", "--out", "{tmp}/s.nc"), "lacks the required entries"),
    Bad("ckpt-resume-missing", cli("train", "--resume", "{tmp}/nope.pt", "--run-dir", "{tmp}/r"), "does not exist"),
    Bad("ckpt-resume-other-model", cli("train", "--resume", "{ckpt}", "--run-dir", "{tmp}/r", "--set",
        "model.options.hidden=48", "--set", "trainer.steps=4"), "cannot resume from"),
    Bad("run-dir-empty", cli("train", "--run-dir", ""), "run_dir is empty"),
    Bad("run-dir-is-a-file", cli("train", "--run-dir", "{text.pt}"), "is a file, not a directory; choose another run_dir"),
    Bad("run-dir-checkpoints-is-a-file", cli("train", "--run-dir", "{ckptfile}"), "checkpoints is a file, not a directory"),
    Bad("ckpt-resume-pickle", cli("train", "--resume", "{pickle.pt}", "--run-dir", "{tmp}/r"), "refuses to unpickle"),
    # -- data ------------------------------------------------------------------------------------
    Bad("data-weather-missing-file", weather('path = "{tmp}/nope.nc"'), "does not exist; check data.options.path"),
    Bad("data-weather-not-netcdf", weather('path = "{garbage.nc}"'), "garbage.nc as netCDF"),
    Bad("data-weather-missing-variable", weather('path = "{weather.nc}", variables = ["z500"]'), "variable(s) 'z500' not found"),
    Bad("data-weather-nan", weather('path = "{weather_nan.nc}", lead = 1'), "is missing (NaN) at 1 grid point(s)"),
    Bad("data-weather-constant", weather('path = "{weather_const.nc}", lead = 1'), "constant over the training times"),
    Bad("data-weather-no-latlon", weather('path = "{weather_nolatlon.nc}"'), "no latitude/longitude dims found"),
    Bad("data-weather-no-time", weather('path = "{weather_notime.nc}"'), "no variable with time, latitude and longitude"),
    Bad("data-weather-bad-time", weather('path = "{weather_badtime.nc}"'), "cannot decode the time coordinate 'time'"),
    Bad("data-weather-bad-lead", weather('path = "{weather.nc}", lead = 1.5'), "lead 1.5 h is not a positive multiple"),
    Bad("data-pde-missing-file", pde('path = "{tmp}/nope.nc"'), "does not exist; make one with `diffkit data pde"),
    Bad("data-pde-not-netcdf", pde('path = "{garbage.nc}"'), "cannot read"),
    Bad("data-pde-missing-variable", pde('path = "{pde.nc}", variables = ["v"]'), "variable(s) v not in"),
    Bad("data-pde-wrong-dims", pde('path = "{pde_dims.nc}"'), "has no variable with dims (trajectory, time, x[, y])"),
    Bad("data-pde-nan", pde('path = "{pde_nan.nc}"'), "holds NaN or inf (first at trajectory 1, frame 2"),
    Bad("data-pde-bad-target", pde('path = "{pde.nc}", target = "nope"'), "data.options.target must be one of"),
    Bad("data-images-empty-folder", images('source = "{noimages}"'), "holds no image files"),
    Bad("data-images-bad-shape", images('source = "{images.npy}"'), "have shape (4, 3)"),
    Bad("data-images-nan", images('source = "{images_nan.npy}"'), "hold NaN or inf"),
    Bad("data-images-strings", images('source = "{strings.npy}"'), "have dtype"),
    Bad("data-images-bad-range", images('range = [1, 0]'), "data.options.range"),
    Bad("data-weather-inf", weather('path = "{weather_inf.nc}", lead = 1'), "holds infinite values (+inf)"),
    Bad("data-weather-dims-without-coords", weather('path = "{nocoords.nc}", dims = {latitude = "y", longitude = "x"}'),
        "has no coordinate values for 'y'"),
    Bad("data-weather-latlon-without-coords", weather('path = "{latlon_nocoords.nc}"'),
        "looks like latitude but has no coordinate values"),
    Bad("data-weather-dir-not-store", weather('path = "{adir}"'), "is a directory, neither a netCDF file nor a zarr store"),
    Bad("data-weather-empty-zarr", weather('path = "{empty.zarr}"'), "empty.zarr is not a zarr store"),
    Bad("data-weather-missing-zarr", weather('path = "{tmp}/nope.zarr"'), "nope.zarr does not exist"),
    # -- forecast and evaluate on ensemble (member) files ------------------------------------------
    Bad("forecast-members-without-choice", cli("forecast", "{wrun}", "--data", "{members.nc}", "--init",
        "2020-01-04T00:00", "--steps", "1", "--out", "{tmp}/f.nc"), "no member was chosen; choose one with --member"),
    Bad("forecast-bad-device", cli("forecast", "{wrun}", "--data", "{members.nc}", "--init", "2020-01-04T00:00",
        "--steps", "1", "--member", "0", "--device", "nope", "--out", "{tmp}/f.nc"), "--device 'nope' is not a torch device"),
    Bad("rollout-no-cuda", cli("rollout", "{run}", "--init", "{pde.nc}", "--steps", "1", "--device", "cuda",
        "--out", "{tmp}/r.nc"), "--device cuda was requested but CUDA is not available", env="no_cuda"),
    Bad("forecast-member-absent", cli("forecast", "{wrun}", "--data", "{members.nc}", "--init", "2020-01-04T00:00",
        "--steps", "1", "--member", "12", "--out", "{tmp}/f.nc"), "member '12' is not in the member dim 'number'"),
    Bad("forecast-member-nan", cli("forecast", "{wrun}", "--data", "{members_nan.nc}", "--init", "2020-01-04T00:00",
        "--steps", "1", "--member", "2", "--out", "{tmp}/f.nc"), "the initial state of member 2 of 'number'"),
    Bad("forecast-member-inf", cli("forecast", "{wrun}", "--data", "{members_inf.nc}", "--init", "2020-01-04T00:00",
        "--steps", "1", "--member", "1", "--out", "{tmp}/f.nc"), "holds infinite values"),
    Bad("evaluate-truth-members-without-choice", cli("evaluate", "{fc_ok.nc}", "--truth", "{members.nc}", "--out",
        "{tmp}/ev", "--no-plots"), "has 3 members in its member dim 'number'"),
    Bad("evaluate-truth-member-inf", cli("evaluate", "{fc_ok.nc}", "--truth", "{members_inf.nc}", "--member", "1",
        "--out", "{tmp}/ev", "--no-plots"), "the truth holds infinite values"),
    Bad("evaluate-valid-time-mismatch", cli("evaluate", "{fc_valid_time.nc}", "--truth", "{members.nc}", "--member",
        "0", "--out", "{tmp}/ev", "--no-plots"), "valid_time disagrees with init_time + lead_time"),
    Bad("evaluate-extra-dim", cli("evaluate", "{fc_extra_dim.nc}", "--truth", "{members.nc}", "--member", "0",
        "--out", "{tmp}/ev", "--no-plots"), "has the dim 'foo' (size 3), which evaluate cannot score"),
    Bad("evaluate-forecast-inf", cli("evaluate", "{fc_inf.nc}", "--truth", "{members.nc}", "--member", "0",
        "--out", "{tmp}/ev", "--no-plots"), "the forecast holds infinite values"),
    # -- environment -----------------------------------------------------------------------------
    Bad("env-no-cuda-train", cli("train", "--device", "cuda"), "CUDA is not available", env="no_cuda"),
    Bad("env-no-cuda-sample", sample("--device", "cuda"), "CUDA is not available", env="no_cuda"),
    Bad("env-autoload-off", train('[data]\nadapter = "weather"\n'), "plugin autoload is off", env="autoload_off"),
    Bad("env-plugins-subset", train('[data]\nadapter = "pde"\n'), "only the plugins in DIFFKIT_PLUGINS=backbones",
        env="only_backbones"),
    Bad("env-no-zarr", weather('path = "{store.zarr}"'), 'pip install "diffkit[zarr]"', env="no_zarr"),
]


_PLACEHOLDER = re.compile(r"\{([\w.]+)\}")  # {run}, {weather_nan.nc}; not TOML's {name = "linear"}


def fill(text: str, paths: dict) -> str:
    return _PLACEHOLDER.sub(lambda m: paths[m.group(1)], text)


@pytest.fixture(scope="module")
def shared(tmp_path_factory):
    """One tiny trained run for the whole catalogue (2 steps, an MLP on the built-in mixture)."""
    d = tmp_path_factory.mktemp("bad_inputs")
    registry.refresh()
    assert main(["train", "--no-progress", "--run-dir", str(d / "run"), "--set", "trainer.steps=2",
                 "--set", "data.batch_size=8", "--set", "data.options.n=64", "--set", "trainer.val_every=0",
                 "--set", "sample.nfe=2", "--set", "sample.n=2"]) == 0
    return d


class _Files(dict):
    """``{name}`` placeholders: the files of FILES, written on first use."""

    def __init__(self, tmp: Path, run: Path, ckpt: Path):
        super().__init__(tmp=tmp.as_posix(), run=run.as_posix(), ckpt=ckpt.as_posix())
        self.tmp, self.run = tmp, run

    def __missing__(self, key):
        if key not in FILES:
            raise KeyError(f"unknown placeholder {{{key}}}: add it to FILES")
        p = self.tmp / key
        made = FILES[key](p, self.run)
        if key in ("wrun", "members.nc"):  # module-wide: the tiny weather run and its data
            p = self.run.parent / key
        self[key] = p.as_posix() if not isinstance(made, str) else made
        return self[key]


def run_bad(bad: Bad, tmp_path: Path, shared: Path, monkeypatch, capsys) -> tuple[int, str]:
    run = shared / "run"
    ckpt = sorted((run / "checkpoints").glob("ckpt-*.pt"))[-1]
    paths = _Files(tmp_path, run, ckpt)
    monkeypatch.chdir(tmp_path)
    for var in ("DIFFKIT_DISABLE_PLUGIN_AUTOLOAD", "DIFFKIT_PLUGINS"):
        monkeypatch.delenv(var, raising=False)
    registry.refresh()
    argv = []
    for w in bad.argv:
        if isinstance(w, _Config):
            cfg = tmp_path / f"config{w.ext}"
            cfg.write_text(fill(w.text, paths), encoding="utf-8")
            argv.append(str(cfg))
        else:
            argv.append(fill(w, paths))
    if bad.env:
        ENVS[bad.env](monkeypatch)
    try:
        code = main(argv)
    except SystemExit as e:  # argparse usage errors
        code = e.code
    finally:
        registry.refresh()
    return code, capsys.readouterr().err


@pytest.mark.parametrize("bad", CATALOGUE, ids=[b.id for b in CATALOGUE])
def test_bad_input_gives_one_clear_line(bad, tmp_path, shared, monkeypatch, capsys):
    code, err = run_bad(bad, tmp_path, shared, monkeypatch, capsys)
    assert "Traceback" not in err, err
    lines = [ln for ln in err.splitlines() if not ln.startswith(("usage:", "warning:", " "))]
    assert len(lines) == 1, f"expected one error line, got:\n{err}"
    assert re.match(r"diffkit( [\w-]+)*: error: ", lines[0]), lines[0]
    assert bad.fragment in lines[0], f"{bad.fragment!r} not in {lines[0]!r}"
    assert code in (1, 2), code


def test_catalogue_is_large_and_unique():
    assert len(CATALOGUE) >= 80
    assert len({b.id for b in CATALOGUE}) == len(CATALOGUE)
    kinds = {b.id.split("-")[0] for b in CATALOGUE}
    assert len(CATALOGUE) >= 80 and "run" in kinds
    assert {"config", "cli", "sample", "ckpt", "data", "env"} <= kinds
