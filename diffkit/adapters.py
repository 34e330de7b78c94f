"""Data adapters: the protocol, and the built-in synthetic ``mixture`` data set.

An adapter turns a domain's data into torch Datasets of *standardised* tensors and declares
their :class:`~diffkit.layout.Layout` (including the normalisation statistics).  Each item of
a dataset is a dict with

- ``"x"``: the sample, shape ``layout.sample_shape``;
- optionally ``"fields"`` (``(len(cond_channels), *shape)``), ``"scalars"`` (``(S,)``),
  ``"label"`` (a long scalar) and ``"weight"`` (per-element loss weights, e.g. a missing-value
  mask; the layout's area weights are applied by the trainer).

:meth:`Adapter.decode` is a classmethod: it turns standardised samples back into the domain's
format from the layout alone, so a checkpoint is enough to sample -- no data set needed.
Adapters register through the ``diffkit_adapters`` hook, as every other component.
"""
from __future__ import annotations

import abc
import math
import os
from pathlib import Path

import torch
from torch.utils.data import Dataset

from .hookspecs import hookimpl
from .layout import Layout


class Adapter(abc.ABC):
    """Base class of data adapters; see the module docstring for the protocol."""

    #: registered name (set by subclasses)
    name = "adapter"

    @property
    @abc.abstractmethod
    def layout(self) -> Layout:
        """The layout of the standardised tensors, with the normalisation statistics."""

    @abc.abstractmethod
    def dataset(self, split: str) -> Dataset:
        """The ``"train"`` or ``"val"`` split as a torch Dataset of item dicts."""

    @classmethod
    def decode(cls, x: torch.Tensor, layout: Layout, path: str | os.PathLike, *, attrs: dict | None = None,
               labels: torch.Tensor | None = None) -> Path:
        """Write standardised samples ``x`` of shape ``(N, *layout.sample_shape)`` to ``path``.

        The default writes CF netCDF through xarray: the samples are de-normalised with the
        layout, dims are ``(sample, channel, *spatial)`` with the layout's coordinates, and the
        file is written atomically.  ``labels`` (``(N,)``, class-conditional samples) become a
        ``label`` coordinate along ``sample``.  Domain adapters override this (e.g. PNG for
        images); callers pass ``labels`` only to decoders that accept it (:func:`decode_samples`).
        """
        return write_netcdf(layout.denormalize(x.detach().float().cpu()), layout, path, attrs=attrs, labels=labels)


def decode_samples(adapter_cls, x: torch.Tensor, layout: Layout, path, *, attrs: dict | None = None,
                   labels: torch.Tensor | None = None) -> Path:
    """``adapter_cls.decode(x, layout, path, attrs=..., labels=...)``, leaving ``labels`` out for
    decoders written without that keyword (adapters of unconditional domains)."""
    if labels is not None and _accepts_keyword(adapter_cls.decode, "labels"):
        return adapter_cls.decode(x, layout, path, attrs=attrs, labels=labels.detach().cpu())
    return adapter_cls.decode(x, layout, path, attrs=attrs)


def _accepts_keyword(fn, name: str) -> bool:
    import inspect

    try:
        params = inspect.signature(fn).parameters
    except (TypeError, ValueError):
        return False
    return name in params or any(p.kind is p.VAR_KEYWORD for p in params.values())


# ----------------------------------------------------------------------------- CF metadata of outputs
#: the attributes of an input's data variables that outputs keep; everything else (``GRIB_*``,
#: ``valid_range``, ``cell_methods`` naming the input's dims, ...) describes the input file, not the output
CF_VARIABLE_ATTRS = ("units", "long_name", "standard_name")
#: the attributes of an input's coordinate variables that outputs keep
CF_COORDINATE_ATTRS = ("units", "long_name", "standard_name", "axis", "positive", "calendar")
#: the value of the ``Conventions`` attribute of every output
CONVENTIONS = "CF-1.8"


def cf_attrs(attrs, keep: tuple[str, ...] = CF_VARIABLE_ATTRS) -> dict:
    """The attributes of ``attrs`` named in ``keep`` (:data:`CF_VARIABLE_ATTRS` by default), empty strings
    dropped: what an output keeps of an input variable's attributes."""
    return {k: v for k, v in dict(attrs or {}).items() if k in keep and not (isinstance(v, str) and not v.strip())}


def history_line(command: str) -> str:
    """One line of a CF ``history`` attribute: UTC timestamp, the command, the diffkit version."""
    import datetime

    from . import __version__

    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"{now}: {' '.join(str(command).split())} (diffkit {__version__})"


def extend_history(previous, command: str) -> str:
    """The input's ``history`` attribute (``previous``; None or empty if it had none) with a new last
    line naming ``command`` (:func:`history_line`), as CF asks of programs that modify a file."""
    old = str(previous).rstrip("\n") if previous is not None else ""
    return f"{old}\n{history_line(command)}" if old.strip() else history_line(command)


def cf_encode(ds):
    """Set the netCDF encodings of ``ds`` (in place, returned) that CF-1.8 asks for: no ``_FillValue``
    on coordinates, 64-bit and unsigned integers stored as int32 (float64 where they do not fit; CF-1.8
    has no int64), dates and durations stored as float64 with CF ``units`` (xarray picks ``"<unit>
    since <date>"``)."""
    import numpy as np

    for name, var in ds.variables.items():
        dt = var.dtype
        if dt.kind in "Mm" or (dt == object and var.size and hasattr(np.asarray(var.values).flat[0], "calendar")):
            if np.dtype(var.encoding.get("dtype", "int64")).kind in "iu":
                var.encoding["dtype"] = "float64"
            var.encoding.pop("_FillValue", None)
            if name in ds.coords:
                var.encoding["_FillValue"] = None
            continue
        if dt.kind in "iu" and (dt.itemsize == 8 or dt.kind == "u") and "dtype" not in var.encoding:
            v = np.asarray(var.values)
            fits = not v.size or (int(v.min()) >= np.iinfo(np.int32).min and int(v.max()) <= np.iinfo(np.int32).max)
            var.encoding["dtype"] = "int32" if fits else "float64"
        if name in ds.coords and dt.kind in "fiu":
            var.encoding["_FillValue"] = None
    return ds


def cf_output(ds, *, title: str, command: str, history=None):
    """Make the :class:`xarray.Dataset` ``ds`` a CF-1.8 output (in place; returned): the global
    attributes ``Conventions``, ``title``, ``source`` (``ds.attrs["source"]``, else ``"diffkit"``) and
    ``history`` (``history``, the input's or None, extended by a line naming ``command``:
    :func:`extend_history`) first, then the rest of ``ds.attrs``; a ``long_name`` (the variable's
    name) on every variable with neither ``long_name`` nor ``standard_name``; the encodings of
    :func:`cf_encode`."""
    rest = {k: v for k, v in ds.attrs.items() if k not in ("Conventions", "title", "history")}
    ds.attrs = {"Conventions": CONVENTIONS, "title": title, "source": rest.pop("source", "diffkit"),
                "history": extend_history(history, command), **rest}
    for name, var in ds.variables.items():
        if not str(var.attrs.get("long_name", "")).strip() and not str(var.attrs.get("standard_name", "")).strip():
            var.attrs["long_name"] = str(name)
    return cf_encode(ds)


def command_of(attrs, default: str = "diffkit") -> str:
    """What the ``history`` line of an output names: ``attrs["command"]`` (the command line that wrote
    it), else a training snapshot's step (``attrs["step"]``), else ``default``."""
    a = dict(attrs or {})
    if a.get("command") not in (None, ""):
        return str(a["command"])
    if a.get("step") is not None:
        return f"diffkit train: snapshot at step {a['step']}"
    return default


def write_netcdf(x: torch.Tensor, layout: Layout, path, *, attrs: dict | None = None,
                 labels: torch.Tensor | None = None) -> Path:
    """Write physical-unit samples as CF netCDF, one variable per channel, atomically.

    Channel variables carry ``long_name`` (the channel name unless declared), the layout's
    ``channel_attrs`` (units, standard_name, ...) and, for layouts that keep units in
    ``attrs["units"]`` (one string for every channel, or ``{channel: units}``), those units;
    spatial coordinates carry the layout's ``coord_attrs``.  Global attributes: ``Conventions``,
    ``title``, ``source``, a ``history`` line naming ``attrs["command"]`` (the command line) and
    ``attrs``.  ``labels`` (``(N,)`` class indices) become the coordinate ``label(sample)``, with CF
    ``flag_values`` / ``flag_meanings`` when the layout's attrs hold ``class_names``."""
    import numpy as np
    import xarray as xr  # lazy: `import diffkit` must not import xarray

    dims = ("sample", *layout.spatial)
    coords = {"sample": ("sample", np.arange(x.shape[0], dtype=np.int32), {"long_name": "sample index"})}
    if labels is not None:
        lab = torch.as_tensor(labels).detach().cpu().reshape(-1).to(torch.int64)
        if lab.shape[0] != x.shape[0]:
            raise ValueError(f"{lab.shape[0]} labels for {x.shape[0]} samples; give one label per sample")
        la = {"long_name": "class label"}
        names = layout.attrs.get("class_names")
        if isinstance(names, (list, tuple)) and names:
            la["flag_values"] = np.arange(len(names), dtype=np.int32)  # the type of the stored labels (int32)
            la["flag_meanings"] = " ".join(str(n).replace(" ", "_") for n in names)
        coords["label"] = ("sample", lab.numpy(), la)
    for ax, n in zip(layout.spatial, layout.shape):
        vals = layout.coords.get(ax, tuple(range(n)))
        coords[ax] = (ax, list(vals), {"long_name": ax, **layout.coord_attrs.get(ax, {})})
    data_vars = {}
    units = layout.attrs.get("units")
    units = {ch: units for ch in layout.channels} if isinstance(units, str) else \
        units if isinstance(units, dict) else {}
    for i, ch in enumerate(layout.channels):
        a = {"long_name": ch}
        if isinstance(units.get(ch), str) and units[ch].strip():
            a["units"] = units[ch]
        a.update(layout.channel_attrs.get(ch, {}))
        data_vars[ch] = (dims, x[:, i].numpy(), a)
    ds = xr.Dataset(data_vars, coords=coords, attrs={k: str(v) for k, v in (attrs or {}).items()})
    return atomic_to_netcdf(cf_output(ds, title="diffkit samples", command=command_of(attrs, "diffkit: samples")), path)


def netcdf_attrs(params: dict) -> dict:
    """``params`` as netCDF global attributes: None values dropped, ``bool`` as ``int`` (netCDF has
    no boolean), ``int`` / ``float`` / ``str`` kept, anything else as its ``str``."""
    def value(v):
        if isinstance(v, bool):
            return int(v)
        return v if isinstance(v, (int, float, str)) else str(v)

    return {k: value(v) for k, v in params.items() if v is not None}


def atomic_to_netcdf(ds, path) -> Path:
    """Write an xarray Dataset to ``path`` atomically: a temporary file in the same folder,
    then ``os.replace``, so an existing file is never left half-written."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        ds.to_netcdf(tmp)
        os.replace(tmp, path)
    finally:
        if tmp.exists():
            tmp.unlink()
    return path


def split_of(split: str, train, val):
    """What an adapter's :meth:`Adapter.dataset` serves for ``split``: ``train`` for ``"train"``,
    ``val`` for ``"val"``; any other name is a ValueError naming the two."""
    chosen = {"train": train, "val": val}.get(split)
    if chosen is None:
        raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
    return chosen


class _DictDataset(Dataset):
    def __init__(self, x: torch.Tensor):
        self.x = x

    def __len__(self):
        return self.x.shape[0]

    def __getitem__(self, i):
        return {"x": self.x[i]}


class MixtureAdapter(Adapter):
    """Synthetic Gaussian mixture on a ring (vector data): the built-in default data set.

    Options: ``n`` (samples, 20000), ``k`` (components, 8), ``dim`` (2), ``radius`` (2.0),
    ``std`` (0.15), ``seed`` (0), ``val_fraction`` (0.05).  The data is generated
    deterministically from ``seed``; normalisation statistics come from the training split.
    """

    name = "mixture"

    def __init__(self, n: int = 20000, k: int = 8, dim: int = 2, radius: float = 2.0, std: float = 0.15,
                 seed: int = 0, val_fraction: float = 0.05):
        if n < 2 or k < 1 or dim < 1 or std <= 0:
            raise ValueError("mixture adapter needs n >= 2, k >= 1, dim >= 1 and std > 0")
        g = torch.Generator().manual_seed(seed)
        ang = torch.arange(k, dtype=torch.float64) * (2 * math.pi / k)
        means = torch.zeros(k, dim, dtype=torch.float64)
        means[:, 0] = radius * ang.cos()
        if dim > 1:
            means[:, 1] = radius * ang.sin()
        comp = torch.randint(0, k, (n,), generator=g)
        data = means[comp] + std * torch.randn(n, dim, generator=g, dtype=torch.float64)
        n_val = max(1, int(round(n * val_fraction)))
        self._train, self._val = data[n_val:].float(), data[:n_val].float()
        mean, sd = self._train.mean(0), self._train.std(0)
        self._layout = Layout(channels=tuple(f"x{i}" for i in range(dim)), mean=mean, std=sd,
                              attrs={"adapter": self.name, "k": k, "radius": radius, "std": std})
        self.means, self.std = means, std

    @property
    def layout(self) -> Layout:
        return self._layout

    def dataset(self, split: str) -> Dataset:
        return _DictDataset(self._layout.normalize(split_of(split, self._train, self._val)))


@hookimpl
def diffkit_adapters():
    """diffkit's own adapter, registered as a built-in plugin (:mod:`diffkit._builtins`)."""
    return {"mixture": MixtureAdapter}
