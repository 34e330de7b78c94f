"""Observations of images: held-out images and synthetic observations of them (``diffkit data images``)
and the images side of ``diffkit assimilate`` (inpainting, denoising, super-resolution with an
unconditional model).

- ``diffkit data images [SOURCE] --out truth.nc`` writes held-out images -- the validation split of
  the images adapter on ``SOURCE`` (default ``digits``: scikit-learn's bundled 8x8 digits, offline),
  or of the adapter a run was trained with when ``SOURCE`` is a run directory / checkpoint, so the
  images are exactly ones the model never saw -- as CF netCDF: one variable per channel (``L`` for
  grayscale; ``R``, ``G``, ``B``) with dims ``(image, y, x)`` in the data's units (digits: 0..16);
- ``diffkit data images --observe-from truth.nc --obs-fraction 0.25 --out obs.nc`` observes them
  (:func:`diffkit.observations.synthetic_observations`, the same options as the other domains): the
  gridded form has the truth's dims with NaN where a pixel is not observed; the points form has
  ``image(obs)``, ``y(obs)``, ``x(obs)`` (pixel coordinates, interpolated bilinearly);
- ``diffkit assimilate RUN --obs obs.nc --members 8 --out analysis.nc``: each image of the file is
  one posterior sampling run of the unconditional model guided by its observations
  (:func:`diffkit.sampling.sample_posterior`); ``image`` plays the part of the other domains'
  ``time``.  The analysis is CF netCDF ``(image, member, y, x)`` plus ``{var}_ensemble_mean`` /
  ``{var}_ensemble_spread``, and a PNG beside it: per image the observations (unobserved pixels
  mid-grey), the ensemble mean, the spread and the members.
"""
from __future__ import annotations

import math

import numpy as np

from diffkit.assimilate import Assimilation, analysis_attrs, ensemble_statistics, label_analysis
from diffkit.errors import DiffkitError, ObservationError
from diffkit.observations import (Axis, ObservationGrid, observation_window, open_observations, read_observations,
                                  synthetic_observations)

__all__ = ["ImagesAssimilation", "observation_grid", "held_out_images", "truth_dataset", "make_observations",
           "IMAGE"]

#: the dim of an images truth / observation file that the other domains' files call ``time``
IMAGE = "image"
#: most members drawn in the analysis PNG (the netCDF holds them all)
PNG_MEMBERS = 8


def _axes(layout) -> tuple[Axis, ...]:
    out = []
    for ax, n in zip(layout.spatial, layout.shape):
        c = np.asarray(layout.coords.get(ax, tuple(range(n))), dtype=np.float64)
        out.append(Axis(ax, tuple(c)))
    return tuple(out)


def observation_grid(layout) -> ObservationGrid:
    """The :class:`~diffkit.observations.ObservationGrid` of an images model: one variable per channel
    (``L``; ``R``, ``G``, ``B``; ...), the axes ``y``, ``x`` (pixel indices), and ``image`` in place of
    ``time`` (each image of a file is assimilated on its own)."""
    return ObservationGrid(channels=tuple((c, {}) for c in layout.channels), axes=_axes(layout),
                           time_key=lambda t: np.asarray(t, dtype=np.float64), time_name=IMAGE,
                           format_time=lambda k: f"image {k:g}")


# ----------------------------------------------------------------------------- held-out images
def _adapter_for(source: str):
    """``(adapter, what)``: the images adapter on a source name / path, or the one a run was trained with."""
    from pathlib import Path

    from .adapter import ImageAdapter

    p = Path(source)
    if p.suffix == ".pt" or (p.is_dir() and ((p / "checkpoints").is_dir() or any(p.glob("*.pt")))):
        from diffkit.model import load_model

        loaded = load_model(p)
        cfg = loaded.config
        if cfg.data.adapter != "images":
            raise DiffkitError(f"{source} was trained on the {cfg.data.adapter!r} adapter; diffkit data images takes "
                               f"held-out images of a model of the 'images' adapter")
        options = dict(cfg.data.options)
        options.setdefault("val_fraction", cfg.data.val_fraction)
        return ImageAdapter(**options), f"the validation split of {source}'s training data"
    return ImageAdapter(source=source), f"the validation split of source {source!r}"


def _range(text: str | None, n: int, what: str) -> np.ndarray:
    if not text:
        return np.arange(n)
    try:
        parts = [int(p) if p.strip() else None for p in text.split(":")]
    except ValueError:
        raise ObservationError(f"{what} {text!r} is not an index range; give START:STOP (e.g. 0:8) or one index") \
            from None
    sel = np.arange(n)[slice(parts[0], parts[0] + 1) if len(parts) == 1 else slice(*parts[:3])]
    if not sel.size:
        raise ObservationError(f"{what} {text} selects none of the {n} images")
    return sel


def held_out_images(source: str = "digits", *, split: str = "val", images: str | None = "0:8"):
    """``(values (N, C, H, W) float64 in the data's units, adapter, dataset indices, what)`` of the images
    ``images`` (``START:STOP`` into the split) of ``split`` of the adapter :func:`_adapter_for` gives."""
    from diffkit.adapters import split_of

    ad, what = _adapter_for(source)
    idx = np.asarray(split_of(split, ad.train_idx, ad.val_idx))
    if not idx.size:
        raise ObservationError(f"the {split} split of {source!r} is empty; use --split train or a val_fraction > 0")
    sel = idx[_range(images, idx.size, "--images")]
    return ad.data[sel].numpy().astype(np.float64), ad, sel, what


def truth_dataset(values, channels, *, index, labels=None, class_names=None, attrs=None):
    """Images ``(N, C, H, W)`` as a CF dataset: a variable per channel, dims ``(image, y, x)``;
    ``index`` the images' indices in their source (coordinate ``source_index``), ``labels`` their classes."""
    import xarray as xr

    values = np.asarray(values)
    N, C, H, W = values.shape
    coords = {IMAGE: (IMAGE, np.arange(N, dtype=np.int32), {"long_name": "image number in this file"}),
              "y": ("y", np.arange(H, dtype=np.float64), {"long_name": "pixel row (top to bottom)", "units": "1"}),
              "x": ("x", np.arange(W, dtype=np.float64), {"long_name": "pixel column (left to right)", "units": "1"}),
              "source_index": (IMAGE, np.asarray(index, dtype=np.int64), {"long_name": "index in the image source"})}
    if labels is not None:
        coords["label"] = (IMAGE, np.asarray(labels, dtype=np.int64), {"long_name": "class label"})
    dv = {c: ((IMAGE, "y", "x"), values[:, i].astype(np.float32), {"long_name": f"pixel value, channel {c}"})
          for i, c in enumerate(channels)}
    a = {"channels": " ".join(channels), **(attrs or {})}
    if class_names is not None:
        a["class_names"] = " ".join(str(c) for c in class_names)
    return xr.Dataset(dv, coords=coords, attrs=a)


def make_observations(truth, *, images: str | None = None, variables=None, fraction: float | None = None,
                      stride: int | None = None, noise: float = 0.05, absolute: bool = False, form: str = "grid",
                      seed: int = 0, command: str = ""):
    """A synthetic observation dataset of the images of the file ``truth`` (:func:`truth_dataset`'s format;
    ``images`` a ``START:STOP`` range of them, default all); see
    :func:`diffkit.observations.synthetic_observations`.  The climatological std of a channel is its std
    over every image and pixel of the file."""
    ds = open_observations(truth)
    chans = str(ds.attrs.get("channels", "")).split() or [v for v in ds.data_vars if ds[v].dims == (IMAGE, "y", "x")]
    if IMAGE not in ds.dims or not chans or any(c not in ds for c in chans):
        raise ObservationError(f"{truth} is not an images truth file (variables with dims ({IMAGE}, y, x) named by "
                               f"the attribute 'channels'); write one with `diffkit data images --out truth.nc`")
    names = chans
    if variables:
        bad = [v for v in variables if v not in chans]
        if bad:
            raise ObservationError(f"--obs-variables {bad[0]!r} is not a channel of {truth} ({', '.join(chans)})")
        names = list(variables)
    sel = _range(images, ds.sizes[IMAGE], "--obs-images")
    vals = np.stack([np.asarray(ds[v].values, dtype=np.float64) for v in names], 1)
    clim = [float(np.std(vals[:, i])) for i in range(len(names))]
    axes = [Axis(a, tuple(np.asarray(ds[a].values, dtype=np.float64))) for a in ("y", "x")]
    out = synthetic_observations(vals[sel], variables=[(v, {}) for v in names], axes=axes,
                                 time=np.asarray(ds[IMAGE].values)[sel],
                                 time_attrs={"long_name": "image number in the truth file"},
                                 var_attrs={v: {"long_name": ds[v].attrs.get("long_name", v)} for v in names},
                                 axis_attrs={a: dict(ds[a].attrs) for a in ("y", "x")}, fraction=fraction,
                                 stride=stride, noise=noise, absolute=absolute, form=form, seed=seed, clim_std=clim,
                                 attrs={"source_file": str(truth), "command": command})
    out = out.rename({"time": IMAGE})
    for v in out.data_vars:
        if "coordinates" in out[v].attrs:
            out[v].attrs["coordinates"] = " ".join(IMAGE if w == "time" else w
                                                   for w in out[v].attrs["coordinates"].split())
    return out


# ----------------------------------------------------------------------------- diffkit assimilate
class ImagesAssimilation(Assimilation):
    """``diffkit assimilate`` for images: posterior samples of an unconditional single-state model
    (or of a class-conditional one trained with label dropout, through its null label), one guided
    sampler run per image of the observation file; no ``--init``."""

    name = "images"
    needs_init = False

    @classmethod
    def grid(cls, layout) -> ObservationGrid:
        return observation_grid(layout)

    @classmethod
    def check(cls, layout) -> None:
        if getattr(layout, "window", None) is not None or layout.autoregressive is not None:
            raise DiffkitError("this images checkpoint models sequences (a window or an autoregressive model); "
                               "diffkit assimilate guides single images: use a model trained on the images adapter")
        if layout.cond_channels or layout.scalars:
            given = ", ".join(tuple(layout.cond_channels) + tuple(layout.scalars))
            raise DiffkitError(f"this model is conditioned on fields / scalars ({given}); the images domain "
                               f"assimilates with unconditional models")

    @classmethod
    def run(cls, loaded, args, guide):
        import torch

        from diffkit.adapters import atomic_to_netcdf, cf_output
        from diffkit.assimilate import model_space
        from diffkit.calibrate import apply_spread_scale
        from diffkit.denoiser import Regressor
        from diffkit.sampling import sample_posterior

        # --init and --steps are the command's; the other domains' options are refused by the core, or absent
        wrong = [f"--{d.replace('_', '-')}" for d in ("init", "init_time", "index", "start", "steps")
                 if getattr(args, d, None) is not None]
        if wrong:
            raise DiffkitError(f"{wrong[0]} does not apply to images models (no rollout): each image of the "
                               f"observation file is sampled from the model given its observations; leave it out")
        model, layout, sc = loaded.model, loaded.layout, loaded.config.sample
        if isinstance(model, Regressor):
            raise DiffkitError("this checkpoint is a deterministic regression model: it has no prior to guide")
        if layout.num_classes and not loaded.config.loss.p_uncond > 0:
            raise DiffkitError("this class-conditional model was trained without label dropout (loss.p_uncond = 0), "
                               "so it has no unconditional prior to guide; train with p_uncond > 0 or an "
                               "unconditional model (data.options.conditional = false)")
        grid = observation_grid(layout)
        if IMAGE not in open_observations(args.obs).variables:
            raise ObservationError(f"{args.obs}: no {IMAGE!r} coordinate; an images observation file numbers its "
                                   f"images along {IMAGE!r} (gridded: dims ({IMAGE}, y, x); points: {IMAGE}(obs)), "
                                   f"as `diffkit data images --observe-from` writes")
        keys = observation_window(args.obs, grid)
        obs = read_observations(args.obs, grid.with_window(keys, 1e-6))
        device = next(model.parameters()).device
        g = torch.Generator(device=device).manual_seed(args.seed)
        bound = model.bind(None)
        sampler, nfe = args.sampler or sc.sampler, args.nfe or sc.nfe
        zs = []
        for k in range(len(keys)):
            st = obs.steps.get(k)
            if st is None:  # an image with no observed value: its prior samples
                z = sample_posterior(bound, _no_observation(layout), members=args.members, method=None,
                                     layout=layout, sampler=sampler, nfe=nfe, generator=g, device=device,
                                     progress=not args.no_progress)
            else:
                z = sample_posterior(bound, model_space(st, layout), members=args.members,
                                     method=None if args.no_guidance else guide, layout=layout, sampler=sampler,
                                     nfe=nfe, generator=g, device=device, progress=not args.no_progress)
            zs.append(z[0].float().cpu())
        x = apply_spread_scale(torch.stack([layout.denormalize(z) for z in zs]), args, member_dim=1).numpy()
        #   (N, M, C, H, W) physical
        a = analysis_attrs(args, obs, sc, guide.method, details={f"guidance_{k}": v for k, v in guide.options.items()})
        ds = _analysis_dataset(x, layout, keys, a, prior=args.no_guidance)
        out = atomic_to_netcdf(cf_output(ds, title=ds.attrs["title"], command=a["command"]), args.out)
        png = _write_png(ds, obs, layout, keys, out)
        lo, hi = obs.sigma_range()
        what = "prior ensemble (no guidance)" if args.no_guidance else f"analysis ({guide.method})"
        return out, (f"wrote the {what}: {args.members} member(s) of {len(keys)} image(s) to {out} and {png.name}; "
                     f"{obs.count} observation(s) ({obs.form} form, sigma_y {lo:g}..{hi:g})")


def _no_observation(layout):
    """An empty observation (no pixel observed): the prior."""
    import torch

    from diffkit.guidance import MaskOperator, Observation

    return Observation(MaskOperator(torch.zeros(layout.sample_shape, dtype=torch.bool)), torch.zeros((1, 0)), 1.0)


def _analysis_dataset(x, layout, keys, attrs, *, prior: bool):
    import xarray as xr

    N, M = x.shape[:2]
    H, W = layout.shape
    coords = {IMAGE: (IMAGE, np.asarray(keys).astype(np.int32), {"long_name": "image number in the observation file"}),
              "member": ("member", np.arange(M, dtype=np.int32), {"standard_name": "realization",
                                                                   "long_name": "ensemble member"}),
              "y": ("y", np.asarray(layout.coords.get("y", range(H)), dtype=np.float64),
                    {"long_name": "pixel row (top to bottom)", "units": "1"}),
              "x": ("x", np.asarray(layout.coords.get("x", range(W)), dtype=np.float64),
                    {"long_name": "pixel column (left to right)", "units": "1"})}
    ds = xr.Dataset(coords=coords, attrs=dict(attrs))
    for i, c in enumerate(layout.channels):
        va = {"long_name": f"pixel value, channel {c}"}
        ds[c] = xr.DataArray(x[:, :, i].astype(np.float32), dims=(IMAGE, "member", "y", "x"), attrs=va)
        ds[f"{c}_ensemble_mean"], ds[f"{c}_ensemble_spread"] = ensemble_statistics(ds[c], c, {"units": "1", **va})
    label_analysis(ds, prior=prior)
    return ds


def _write_png(ds, obs, layout, keys, out):
    """The analysis as a PNG beside ``out``: a row per image -- observed (gridded form; unobserved pixels
    mid-grey), ensemble mean, spread, the first :data:`PNG_MEMBERS` members."""
    from diffkit._io import atomic_write

    from .grid import display_range, make_grid, to_pixels

    chans = list(layout.channels)
    lo, hi = display_range(layout, np.stack([ds[c].values for c in chans], 2).reshape(-1, len(chans),
                                                                                      *layout.shape))
    mid = ((lo + hi) / 2)[:, None, None]
    cells, rows = [], []
    M = min(PNG_MEMBERS, ds.sizes["member"])
    for k in range(len(keys)):
        row = []
        st = obs.steps.get(k)
        if obs.form == "grid":
            seen = np.broadcast_to(mid, layout.sample_shape).copy()
            if st is not None:
                m = st.mask.numpy()
                seen[m] = st.y.numpy()
            row.append(seen)
        row.append(np.stack([ds[f"{c}_ensemble_mean"].values[k] for c in chans]))
        row.append(np.nan_to_num(np.stack([ds[f"{c}_ensemble_spread"].values[k] for c in chans])) + lo[:, None, None])
        row += [np.stack([ds[c].values[k, j] for c in chans]) for j in range(M)]
        cells += row
        rows += [k] * len(row)
    pix = to_pixels(np.asarray(cells), layout)
    img, _, _ = make_grid(pix, np.asarray(rows), lambda r: f"{int(keys[r])}")
    png = out.with_suffix(".png")
    atomic_write(png, lambda f: img.save(f, format="PNG"), binary=True)
    return png


# ----------------------------------------------------------------------------- diffkit data images
def register_data(parser) -> None:
    """held-out images as netCDF, and synthetic observations of them (--observe-from), for diffkit assimilate"""
    from diffkit.observations import add_observe_arguments

    parser.add_argument("source", nargs="?", default="digits",
                        help="digits (default: scikit-learn's bundled 8x8 digits), skimage, a folder or .npy/.npz of "
                             "images, or a run directory / checkpoint of an images model (its training data's "
                             "validation split: images the model never saw)")
    parser.add_argument("--split", choices=("val", "train"), default="val",
                        help="split to take images from (default val)")
    parser.add_argument("--images", default="0:8", metavar="START:STOP",
                        help="which images of the split (default 0:8)")
    parser.add_argument("--seed", type=int, default=0,
                        help="random seed of the observed points and the noise (default 0)")
    parser.add_argument("--out", required=True, help="output netCDF file")
    add_observe_arguments(parser)
    parser.add_argument("--obs-images", default=None, metavar="START:STOP",
                        help="with --observe-from: the images of the truth file to observe (default all)")
    parser.set_defaults(func=run_data)


def run_data(args) -> int:
    """``diffkit data images``: see :func:`register_data`."""
    import shlex

    from diffkit.adapters import atomic_to_netcdf, cf_output
    from diffkit.observations import observe_requested, write_observations

    command = shlex.join(["diffkit", *getattr(args, "argv", ["data", "images"])])
    if observe_requested(args):
        variables = [v.strip() for v in args.obs_variables.split(",") if v.strip()] if args.obs_variables else None
        ds = make_observations(args.observe_from, images=args.obs_images, variables=variables,
                               fraction=args.obs_fraction, stride=args.obs_stride, noise=args.obs_noise,
                               absolute=args.obs_noise_absolute, form=args.obs_form, seed=args.seed, command=command)
        out = write_observations(ds, args.out, command)
        names = [v for v in ds.data_vars if not v.endswith("_sigma_y")]
        n = sum(int(np.isfinite(ds[v].values).sum()) for v in names)
        imgs = len(np.unique(ds[IMAGE].values))
        print(f"diffkit data images: wrote {n} observation(s) of {', '.join(names)} ({imgs} image(s), {args.obs_form} "
              f"form) of {args.observe_from} to {out}")
        return 0
    if args.obs_images is not None:
        raise ObservationError("--obs-images chooses images of a truth file to observe: give --observe-from TRUTH.nc")
    vals, ad, idx, what = held_out_images(args.source, split=args.split, images=args.images)
    labels = None if ad.labels is None else ad.labels[idx].numpy()
    ds = truth_dataset(vals, ad.layout.channels, index=idx, labels=labels, class_names=ad.class_names,
                       attrs={"source": "diffkit", "image_source": str(args.source), "split": args.split,
                              "value_range": " ".join(f"{v:g}" for v in ad.layout.attrs.get("range", ()))})
    out = atomic_to_netcdf(cf_output(ds, title="diffkit held-out images", command=command), args.out)
    print(f"diffkit data images: wrote {len(idx)} image(s) of {math.prod(vals.shape[1:])} value(s) each "
          f"({what}) to {out}")
    return 0


#: what ``diffkit assimilate`` uses for checkpoints of the ``images`` adapter (:func:`diffkit.assimilate.assimilation_for`)
ASSIMILATION = ImagesAssimilation
