"""The :class:`Layout`: the contract between data adapters, backbones and the engine.

An adapter declares how its tensors are laid out: channel names, spatial axes and sizes,
which axes are periodic, coordinates, per-element loss weights (area weights, masks),
conditioning inputs and normalisation.  Backbones read the rank and periodicity from it,
the loss reads the weights, and checkpoints store it, so the core needs no domain code.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, Mapping, Sequence

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


def _attr_value(v, where: str):
    """A netCDF attribute value as plain, checkpoint-safe data: str, int, float, or a list of numbers."""
    if hasattr(v, "item") and getattr(v, "ndim", None) == 0:  # numpy / torch scalars
        v = v.item()
    if isinstance(v, bool):
        return int(v)
    if isinstance(v, (str, int, float)):
        return v
    if isinstance(v, (list, tuple)) and v and all(isinstance(x, (int, float)) and not isinstance(x, bool) for x in v):
        return list(v)
    raise TypeError(f"Layout.{where} must be a str, a number or a list of numbers (a netCDF attribute), "
                    f"got {type(v).__name__} {v!r:.60}")


def _attr_table(table, what: str, names: Sequence[str], kind: str) -> dict:
    """``{name: {attribute: value}}`` checked against the layout's ``names`` (its channels or spatial axes)."""
    if not isinstance(table, Mapping):
        raise TypeError(f"Layout.{what} must be a dict {{name: {{attribute: value}}}}, got {type(table).__name__}")
    unknown = [k for k in table if k not in names]
    if unknown:
        raise ValueError(f"Layout.{what} names {unknown}, which are not {kind} {tuple(names)}")
    out = {}
    for k, attrs in table.items():
        if not isinstance(attrs, Mapping):
            raise TypeError(f"Layout.{what}[{k!r}] must be a dict of attributes (e.g. {{\"units\": \"K\"}}), "
                            f"got {type(attrs).__name__} {attrs!r:.60}")
        out[str(k)] = {str(a): _attr_value(v, f"{what}[{k!r}][{a!r}]") for a, v in attrs.items()}
    return out


#: what an autoregressive model predicts: the next state(s), or their change from the latest input state
TARGETS = ("state", "residual")

#: the keys of ``Layout.attrs`` that held the autoregressive spec before it was typed (old checkpoints)
LEGACY_ATTRS = ("variables", "history", "horizon", "frame_step", "target", "state_mean", "state_std")


def _spec_to_dict(spec) -> dict:
    """A spec dataclass as a plain dict (tuples as lists), for the layout's JSON."""
    return {f.name: (list(v) if isinstance(v, tuple) else v)
            for f in dataclasses.fields(spec) for v in [getattr(spec, f.name)]}


def _spec_from_dict(cls, d: Mapping, what: str):
    """The spec dataclass ``cls`` from :func:`_spec_to_dict`'s dict; unknown keys are a ValueError naming ``what``."""
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = set(d) - names
    if unknown:
        raise ValueError(f"unknown {what} fields {sorted(unknown)}; known fields: {sorted(names)}")
    return cls(**dict(d))


def history_channels(variables: Sequence[str], history: int) -> tuple[str, ...]:
    """Names of ``history`` states of the channels ``variables`` as conditioning channels, oldest
    first: ``("u@t-1", "v@t-1", "u@t", "v@t")`` for ``(u, v)`` and ``history = 2``."""
    return tuple(f"{v}@t-{j}" if j else f"{v}@t" for j in range(int(history) - 1, -1, -1) for v in variables)


@dataclass(frozen=True)
class AutoregressiveSpec:
    """How a model that predicts the next state(s) from the latest ones is rolled out
    (``Layout.autoregressive``; :func:`diffkit.rollout.rollout`).

    The model is conditioned on the ``history`` latest states, standardised with ``state_mean``
    / ``state_std`` and passed as the first ``history * len(variables)`` conditioning channels
    (named by :func:`history_channels`), and predicts ``horizon`` states at once: the states
    themselves (``target = "state"``) or their change from the latest input state
    (``"residual"``).  The target's own normalisation is the layout's ``mean`` / ``std``, so the
    layout's channels are the ``horizon * len(variables)`` target channels (step-major).
    """

    variables: tuple[str, ...]
    """Names of the ``C`` state channels, in order."""
    history: int = 1
    """Number of input states, ``step`` apart (oldest first)."""
    horizon: int = 1
    """Number of states predicted per model call."""
    step: float | None = None
    """Time between consecutive states (a lead time, a frame interval), in ``step_units``; None if unknown."""
    step_units: str = "1"
    """Units of ``step``: ``"hours"``, ``"1"`` (nondimensional), ..."""
    frame_step: int = 1
    """Data frames per model step (where the data have a finer frame grid than the model, e.g. PDE outputs)."""
    target: str = "state"
    """``"state"`` or ``"residual"`` (see :data:`TARGETS`)."""
    state_mean: tuple[float, ...] = ()
    """Per state channel: the offset of the standardised inputs (physical units)."""
    state_std: tuple[float, ...] = ()
    """Per state channel: the scale of the standardised inputs (physical units, > 0)."""

    def __post_init__(self):
        object.__setattr__(self, "variables", _tuple_str(self.variables, "autoregressive.variables"))
        for name in ("history", "horizon", "frame_step"):
            v = getattr(self, name)
            if isinstance(v, bool) or int(v) != v or int(v) < 1:
                raise ValueError(f"Layout.autoregressive.{name} must be an integer >= 1, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.target not in TARGETS:
            raise ValueError(f"Layout.autoregressive.target must be one of {', '.join(TARGETS)}, got {self.target!r}")
        if self.step is not None:
            step = float(self.step)
            if not (math.isfinite(step) and step > 0):
                raise ValueError(f"Layout.autoregressive.step must be a positive number (or None if unknown), got {self.step!r}")
            object.__setattr__(self, "step", step)
        object.__setattr__(self, "step_units", str(self.step_units))
        C = len(self.variables)
        if not C:
            raise ValueError("Layout.autoregressive.variables is empty: name at least one state channel")
        for name in ("state_mean", "state_std"):
            v = tuple(float(x) for x in torch.as_tensor(getattr(self, name), dtype=torch.float64).reshape(-1).tolist())
            if len(v) != C:
                raise ValueError(f"Layout.autoregressive.{name} has {len(v)} value(s), one per state channel "
                                 f"({C}: {', '.join(self.variables)}) is needed")
            if not all(math.isfinite(x) for x in v):
                raise ValueError(f"Layout.autoregressive.{name} holds NaN or inf: {v}")
            object.__setattr__(self, name, v)
        if any(s <= 0 for s in self.state_std):
            raise ValueError("Layout.autoregressive.state_std has entries <= 0; a normalisation scale must be positive")

    @property
    def num_variables(self) -> int:
        return len(self.variables)

    @property
    def history_channels(self) -> tuple[str, ...]:
        """The conditioning channels of the history (:func:`history_channels`)."""
        return history_channels(self.variables, self.history)

    # -- state <-> standardised, target <-> state (the one definition of each) -----------
    def _stat(self, v, ndim: int, like) -> torch.Tensor:
        t = torch.as_tensor(v, dtype=like.dtype if torch.is_tensor(like) and like.is_floating_point() else torch.float32)
        if torch.is_tensor(like):
            t = t.to(like.device)
        return t.reshape(-1, *([1] * ndim))

    def standardize(self, x, ndim: int):
        """Physical states ``(..., C, *spatial)`` (``ndim`` spatial axes) -> standardised."""
        if not torch.is_tensor(x):
            import numpy as np

            m = np.asarray(self.state_mean).reshape(-1, *([1] * ndim))
            s = np.asarray(self.state_std).reshape(-1, *([1] * ndim))
            return (x - m) / s
        return (x - self._stat(self.state_mean, ndim, x)) / self._stat(self.state_std, ndim, x)

    def destandardize(self, z, ndim: int):
        """Inverse of :meth:`standardize`."""
        if not torch.is_tensor(z):
            import numpy as np

            m = np.asarray(self.state_mean).reshape(-1, *([1] * ndim))
            s = np.asarray(self.state_std).reshape(-1, *([1] * ndim))
            return z * s + m
        return z * self._stat(self.state_std, ndim, z) + self._stat(self.state_mean, ndim, z)

    def target_from(self, last, future):
        """The physical training target of the physical ``future`` state(s) after the physical latest
        input state ``last`` (broadcast against each other): ``future - last`` for ``"residual"``,
        ``future`` for ``"state"``."""
        return future - last if self.target == "residual" else future

    def state_from(self, last, target):
        """The physical next state(s) from a physical (denormalised) ``target``: ``last + target``
        for ``"residual"``, ``target`` for ``"state"``.  The inverse of :meth:`target_from`."""
        return last + target if self.target == "residual" else target

    # -- serialisation ---------------------------------------------------------------
    def to_dict(self) -> dict:
        return _spec_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "AutoregressiveSpec":
        return _spec_from_dict(cls, d, "Layout.autoregressive")

    @classmethod
    def from_legacy_attrs(cls, attrs: Mapping, *, variables: Sequence[str], step: float | None = None,
                          step_units: str = "1") -> "AutoregressiveSpec":
        """The spec of an old layout that kept it in ``attrs`` (``history``, ``horizon``, ``frame_step``,
        ``target``, ``state_mean``, ``state_std``); the domain supplies the state channel names and step."""
        missing = [k for k in ("history", "target", "state_mean", "state_std") if k not in attrs]
        if missing:
            raise ValueError(f"the layout has no autoregressive spec and its attrs lack {', '.join(missing)}; "
                             f"it was not made for autoregressive rollouts (retrain with a current adapter)")
        return cls(variables=tuple(variables), history=int(attrs["history"]), horizon=int(attrs.get("horizon", 1)),
                   step=step, step_units=step_units, frame_step=int(attrs.get("frame_step", 1)),
                   target=str(attrs["target"]), state_mean=attrs["state_mean"], state_std=attrs["state_std"])


#: how a window model is conditioned: not at all (a prior over windows, for guidance and composition)
#: or on observed values and their mask as channels (universal amortised, Shysheya et al. 2024)
WINDOW_CONDITIONING = ("none", "amortised")


def window_channels(variables: Sequence[str], length: int) -> tuple[str, ...]:
    """Names of ``length`` consecutive states of the channels ``variables`` as data channels, oldest
    first (step-major): ``("u@t+0", "v@t+0", "u@t+1", "v@t+1")`` for ``(u, v)`` and ``length = 2``."""
    return tuple(f"{v}@t+{j}" for j in range(int(length)) for v in variables)


@dataclass(frozen=True)
class WindowSpec:
    """A model of windows of ``length`` consecutive states (``Layout.window``; :mod:`diffkit.window`).

    The window's states are stacked along the channels, step-major (:func:`window_channels`), all
    standardised with the per-variable state statistics (the layout's ``mean`` / ``std``, repeated
    per step).  With ``conditioning = "amortised"`` the first conditioning channels are the observed
    values (``obs:`` + each data channel, 0 where unobserved) and then the observation mask
    (``mask:`` + each data channel, 1 where observed); with ``noise`` also the observation-noise
    std of each observed element (``sigma:`` + each data channel, standardised units, 0 where
    unobserved or exact).
    """

    variables: tuple[str, ...]
    """Names of the ``C`` state channels, in order."""
    length: int
    """Number of consecutive states in a window (>= 2)."""
    step: float | None = None
    """Time between consecutive states, in ``step_units``; None if unknown."""
    step_units: str = "1"
    """Units of ``step``."""
    frame_step: int = 1
    """Data frames per window step."""
    conditioning: str = "none"
    """``"none"`` or ``"amortised"`` (see :data:`WINDOW_CONDITIONING`)."""
    noise: bool = False
    """Amortised models only: trained on noisy observations, with their noise std as input channels
    (``data.mask_noise``), so the model infers the state from observations it does not take as exact."""

    def __post_init__(self):
        object.__setattr__(self, "variables", _tuple_str(self.variables, "window.variables"))
        if not self.variables:
            raise ValueError("Layout.window.variables is empty: name at least one state channel")
        for name, low in (("length", 2), ("frame_step", 1)):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, (int, float)) or int(v) != v or int(v) < low:
                raise ValueError(f"Layout.window.{name} must be an integer >= {low}, got {v!r}")
            object.__setattr__(self, name, int(v))
        if self.step is not None:
            step = float(self.step)
            if not (math.isfinite(step) and step > 0):
                raise ValueError(f"Layout.window.step must be a positive number (or None if unknown), got {self.step!r}")
            object.__setattr__(self, "step", step)
        object.__setattr__(self, "step_units", str(self.step_units))
        if self.conditioning not in WINDOW_CONDITIONING:
            raise ValueError(f"Layout.window.conditioning must be one of {', '.join(WINDOW_CONDITIONING)}, "
                             f"got {self.conditioning!r}")
        if not isinstance(self.noise, bool):
            raise ValueError(f"Layout.window.noise must be true or false, got {self.noise!r}")
        if self.noise and self.conditioning != "amortised":
            raise ValueError("Layout.window.noise = true needs conditioning = \"amortised\" (noisy observations are "
                             "an input of amortised models only)")

    @property
    def num_variables(self) -> int:
        return len(self.variables)

    @property
    def channels(self) -> tuple[str, ...]:
        """The data channels of a window (:func:`window_channels`)."""
        return window_channels(self.variables, self.length)

    @property
    def value_channels(self) -> tuple[str, ...]:
        """The conditioning channels of the observed values (``()`` unless amortised)."""
        return tuple(f"obs:{c}" for c in self.channels) if self.conditioning == "amortised" else ()

    @property
    def mask_channels(self) -> tuple[str, ...]:
        """The conditioning channels of the observation mask (``()`` unless amortised)."""
        return tuple(f"mask:{c}" for c in self.channels) if self.conditioning == "amortised" else ()

    @property
    def noise_channels(self) -> tuple[str, ...]:
        """The conditioning channels of the observation-noise std (``()`` unless ``noise``)."""
        return tuple(f"sigma:{c}" for c in self.channels) if self.noise else ()

    @property
    def observation_channels(self) -> tuple[str, ...]:
        """Every conditioning channel of the observations: values, mask and (with ``noise``) noise std."""
        return self.value_channels + self.mask_channels + self.noise_channels

    def to_dict(self) -> dict:
        return _spec_to_dict(self)

    @classmethod
    def from_dict(cls, d: Mapping) -> "WindowSpec":
        return _spec_from_dict(cls, d, "Layout.window")


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
    autoregressive: AutoregressiveSpec | None = None
    """For models that predict the next state(s) from the latest ones: how to roll them out (``None``: not such a model)."""
    coord_attrs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """CF attributes of the spatial coordinates, per spatial axis (``{"lat": {"units": "degrees_north",
    "standard_name": "latitude", "axis": "Y"}}``): netCDF outputs write them on the coordinate variables."""
    channel_attrs: Mapping[str, Mapping[str, Any]] = field(default_factory=dict)
    """CF attributes of the data channels, per channel (``{"T": {"units": "K", "long_name": "temperature",
    "standard_name": "air_temperature"}}``): netCDF outputs write them on each channel's variable."""
    window: WindowSpec | None = None
    """For models of windows of consecutive states (:mod:`diffkit.window`): their length and how they are
    conditioned (``None``: not such a model)."""

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
        object.__setattr__(self, "coord_attrs", _attr_table(self.coord_attrs, "coord_attrs", self.spatial, "spatial axes"))
        object.__setattr__(self, "channel_attrs", _attr_table(self.channel_attrs, "channel_attrs", self.channels,
                                                              "channels"))
        ar = self.autoregressive
        if ar is not None:
            if isinstance(ar, Mapping):
                ar = AutoregressiveSpec.from_dict(ar)
                object.__setattr__(self, "autoregressive", ar)
            if not isinstance(ar, AutoregressiveSpec):
                raise TypeError(f"Layout.autoregressive must be an AutoregressiveSpec or None, got {type(ar).__name__}")
            if len(self.channels) != ar.horizon * ar.num_variables:
                raise ValueError(f"Layout.channels has {len(self.channels)} channel(s), but the autoregressive spec "
                                 f"predicts {ar.horizon} state(s) of {ar.num_variables} variable(s) per call; give "
                                 f"horizon * len(variables) target channels")
            hc = ar.history_channels
            if self.cond_channels[:len(hc)] != hc:
                raise ValueError(f"Layout.cond_channels must begin with the history channels {list(hc)} of the "
                                 f"autoregressive spec, got {list(self.cond_channels[:len(hc)])}")

        win = self.window
        if win is not None:
            if isinstance(win, Mapping):
                win = WindowSpec.from_dict(win)
                object.__setattr__(self, "window", win)
            if not isinstance(win, WindowSpec):
                raise TypeError(f"Layout.window must be a WindowSpec or None, got {type(win).__name__}")
            if self.autoregressive is not None:
                raise ValueError("Layout.window and Layout.autoregressive are both set; a model is either a window "
                                 "model or a next-state model, not both")
            if self.channels != win.channels:
                raise ValueError(f"Layout.channels must be the window's channels {list(win.channels)} "
                                 f"(diffkit.layout.window_channels), got {list(self.channels)}")
            wc = win.observation_channels
            if self.cond_channels[:len(wc)] != wc:
                raise ValueError(f"Layout.cond_channels must begin with the amortised window's value, mask (and noise) "
                                 f"channels {list(wc)}, got {list(self.cond_channels[:len(wc)])}")

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
            if isinstance(v, (AutoregressiveSpec, WindowSpec)):
                v = v.to_dict()
            elif isinstance(v, tuple):
                v = list(v)
            elif isinstance(v, Mapping):
                v = {k: (list(c) if isinstance(c, tuple) else dict(c) if isinstance(c, Mapping) else c)
                     for k, c in v.items()}
            d[f.name] = v
        return d

    @classmethod
    def from_dict(cls, d: Mapping) -> "Layout":
        """Inverse of :meth:`to_dict`.  A layout saved before ``autoregressive`` existed loads with
        ``autoregressive = None`` and its ``attrs`` as they were; the domain plugin that wrote it
        converts those attrs (:meth:`AutoregressiveSpec.from_legacy_attrs`) when it loads the model.
        One saved before ``coord_attrs`` / ``channel_attrs`` / ``window`` existed loads with them empty
        (``window = None``)."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(d) - names
        if unknown:
            raise ValueError(f"unknown Layout fields {sorted(unknown)}; known fields: {sorted(names)}")
        return cls(**dict(d))
