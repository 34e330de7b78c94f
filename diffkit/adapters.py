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


def write_netcdf(x: torch.Tensor, layout: Layout, path, *, attrs: dict | None = None,
                 labels: torch.Tensor | None = None) -> Path:
    """Write physical-unit samples as CF netCDF, one variable per channel, atomically.

    ``labels`` (``(N,)`` class indices) become the coordinate ``label(sample)``, with CF
    ``flag_values`` / ``flag_meanings`` when the layout's attrs hold ``class_names``."""
    import xarray as xr  # lazy: `import diffkit` must not import xarray

    dims = ("sample", *layout.spatial)
    coords = {"sample": ("sample", list(range(x.shape[0])), {"long_name": "sample index"})}
    if labels is not None:
        lab = torch.as_tensor(labels).detach().cpu().reshape(-1).to(torch.int64)
        if lab.shape[0] != x.shape[0]:
            raise ValueError(f"{lab.shape[0]} labels for {x.shape[0]} samples; give one label per sample")
        la = {"long_name": "class label"}
        names = layout.attrs.get("class_names")
        if isinstance(names, (list, tuple)) and names:
            la["flag_values"] = list(range(len(names)))
            la["flag_meanings"] = " ".join(str(n).replace(" ", "_") for n in names)
        coords["label"] = ("sample", lab.numpy(), la)
    for ax, n in zip(layout.spatial, layout.shape):
        vals = layout.coords.get(ax, tuple(range(n)))
        coords[ax] = (ax, list(vals))
    data_vars = {}
    units = layout.attrs.get("units", {}) if isinstance(layout.attrs.get("units"), dict) else {}
    for i, ch in enumerate(layout.channels):
        a = {"long_name": ch}
        if ch in units:
            a["units"] = units[ch]
        data_vars[ch] = (dims, x[:, i].numpy(), a)
    ds = xr.Dataset(data_vars, coords=coords,
                    attrs={"Conventions": "CF-1.8", "source": "diffkit", **{k: str(v) for k, v in (attrs or {}).items()}})
    return atomic_to_netcdf(ds, path)


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
        data = {"train": self._train, "val": self._val}.get(split)
        if data is None:
            raise ValueError(f"unknown split {split!r}; use 'train' or 'val'")
        return _DictDataset(self._layout.normalize(data))
