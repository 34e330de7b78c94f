"""The :class:`Layout`: the contract between data adapters, backbones and the engine.

An adapter declares how its tensors are laid out: channel names, spatial axes and sizes,
which axes are periodic, coordinates, per-element loss weights (area weights, masks),
conditioning inputs and normalisation.  Backbones read the rank and periodicity from it,
the loss reads the weights, and checkpoints store it, so the core needs no domain code.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from .errors import ShapeError


def _tuple_str(v, what: str) -> tuple[str, ...]:
    if isinstance(v, str):
        v = (v,)
    v = tuple(v)
    for s in v:
        if not isinstance(s, str):
            raise TypeError(f"Layout.{what} must be a sequence of str, got element {s!r}")
    return v


@dataclass(frozen=True)
class Layout:
    """How one sample ``x`` of shape ``(C, *shape)`` is laid out.

    Batches have shape ``(B, C, *shape)``; vector data has ``spatial == ()``.
    """

    channels: tuple[str, ...]
    """Names of the ``C`` data channels, in order."""
    spatial: tuple[str, ...] = ()
    """Names of the spatial axes, in order (``()`` for vector data)."""
    shape: tuple[int, ...] = ()
    """Sizes of the spatial axes; same length as ``spatial``."""
    periodic: tuple[str, ...] = ()
    """Names of the spatial axes with periodic boundaries (backbones pad circularly there)."""
    coords: Mapping[str, tuple[float, ...]] = field(default_factory=dict)
    """Optional coordinate values per spatial axis (for decoders and plots)."""
    weights: torch.Tensor | None = None
    """Optional per-element loss weights, broadcastable to ``(C, *shape)`` (e.g. cos-latitude area weights)."""
    cond_channels: tuple[str, ...] = ()
    """Names of conditioning fields of the same spatial shape, concatenated to ``x`` as channels."""
    scalars: tuple[str, ...] = ()
    """Names of scalar conditions (entries of a ``(B, S)`` tensor), embedded by FiLM."""
    num_classes: int = 0
    """Number of class labels (0: unconditional).  Label ``num_classes`` is the null label of CFG."""
    mean: torch.Tensor | None = None
    """Normalisation offset, broadcastable to ``(C, *shape)``; ``x_norm = (x - mean) / std``."""
    std: torch.Tensor | None = None
    """Normalisation scale, broadcastable to ``(C, *shape)``."""
    attrs: Mapping[str, Any] = field(default_factory=dict)
    """Free-form metadata for the adapter's decoder (units, long names, ...); str/number values."""

    def __post_init__(self):
        object.__setattr__(self, "channels", _tuple_str(self.channels, "channels"))
        object.__setattr__(self, "spatial", _tuple_str(self.spatial, "spatial"))
        object.__setattr__(self, "periodic", _tuple_str(self.periodic, "periodic"))
        object.__setattr__(self, "cond_channels", _tuple_str(self.cond_channels, "cond_channels"))
        object.__setattr__(self, "scalars", _tuple_str(self.scalars, "scalars"))
        object.__setattr__(self, "shape", tuple(int(s) for s in self.shape))
        if not self.channels:
            raise ValueError("Layout.channels is empty: name at least one data channel")
        if len(self.shape) != len(self.spatial):
            raise ValueError(
                f"Layout.shape {self.shape} and Layout.spatial {self.spatial} differ in length; "
                "give one size per spatial axis"
            )
        if any(s < 1 for s in self.shape):
            raise ValueError(f"Layout.shape {self.shape} has a size below 1")
        unknown = [a for a in self.periodic if a not in self.spatial]
        if unknown:
            raise ValueError(f"Layout.periodic names {unknown}, which are not spatial axes {self.spatial}")
        if self.num_classes < 0:
            raise ValueError("Layout.num_classes must be >= 0")
        full = (len(self.channels), *self.shape)
        for name in ("weights", "mean", "std"):
            v = getattr(self, name)
            if v is None:
                continue
            v = torch.as_tensor(v, dtype=torch.float32)
            try:
                torch.broadcast_shapes(v.shape, full)
            except RuntimeError:
                raise ShapeError(
                    f"Layout.{name} has shape {tuple(v.shape)}, which does not broadcast to (C, *shape) = {full}"
                ) from None
            if name == "std" and bool((v <= 0).any()):
                raise ValueError("Layout.std has entries <= 0; a normalisation scale must be positive")
            object.__setattr__(self, name, v)
        object.__setattr__(self, "coords", {k: tuple(float(c) for c in v) for k, v in dict(self.coords).items()})
        object.__setattr__(self, "attrs", dict(self.attrs))

    # -- derived -------------------------------------------------------------------------
    @property
    def ndim(self) -> int:
        """Number of spatial axes (0 for vector data)."""
        return len(self.spatial)

    @property
    def num_channels(self) -> int:
        return len(self.channels)

    @property
    def in_channels(self) -> int:
        """Channels a backbone sees: data channels plus conditioning fields."""
        return len(self.channels) + len(self.cond_channels)

    @property
    def periodic_mask(self) -> tuple[bool, ...]:
        """``True`` for each spatial axis that is periodic."""
        return tuple(a in self.periodic for a in self.spatial)

    @property
    def sample_shape(self) -> tuple[int, ...]:
        """Shape of one sample, ``(C, *shape)``."""
        return (len(self.channels), *self.shape)

    def replace(self, **changes) -> "Layout":
        return dataclasses.replace(self, **changes)

    # -- checks --------------------------------------------------------------------------
    def check(self, x: torch.Tensor, what: str = "x", *, spatial: bool = True) -> None:
        """Raise :class:`ShapeError` unless ``x`` has shape ``(B, C, *shape)``.

        With ``spatial=False`` only the rank and channel count are checked (backbones that
        accept other sizes, e.g. a UNet that pads and crops).
        """
        want = 2 + self.ndim
        if x.ndim != want:
            raise ShapeError(
                f"{what} has rank {x.ndim} (shape {tuple(x.shape)}) but the layout expects rank {want}: "
                f"(batch, channel{''.join(', ' + s for s in self.spatial)})"
            )
        if x.shape[1] != self.num_channels:
            raise ShapeError(
                f"{what} has {x.shape[1]} channels but the layout has {self.num_channels} "
                f"({', '.join(self.channels)})"
            )
        if spatial and tuple(x.shape[2:]) != self.shape:
            raise ShapeError(
                f"{what} has spatial shape {tuple(x.shape[2:])} but the layout expects {self.shape} "
                f"for axes {self.spatial}"
            )

    # -- normalisation -------------------------------------------------------------------
    def normalize(self, x: torch.Tensor) -> torch.Tensor:
        """Map physical values to the standardised space the model works in."""
        if self.mean is not None:
            x = x - self.mean.to(x)
        if self.std is not None:
            x = x / self.std.to(x)
        return x

    def denormalize(self, x: torch.Tensor) -> torch.Tensor:
        """Inverse of :meth:`normalize`."""
        if self.std is not None:
            x = x * self.std.to(x)
        if self.mean is not None:
            x = x + self.mean.to(x)
        return x

    # -- serialisation (checkpoint-safe: only primitives and tensors) -------------------
    def to_dict(self) -> dict:
        d = {}
        for f in dataclasses.fields(self):
            v = getattr(self, f.name)
            if isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = {k: (list(c) if isinstance(c, tuple) else c) for k, c in v.items()}
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Layout":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Layout fields {sorted(unknown)}; known fields: {sorted(names)}")
        return cls(**dict(d))
