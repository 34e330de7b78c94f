"""Window models: diffusion over windows of ``k`` consecutive states, for forecasting and assimilation.

A **window** is ``k`` consecutive states of a trajectory, each of shape ``(C, *S)``.  It is one
sample of shape ``(k * C, *S)``: the states are stacked along the **channels**, step-major, named
``u@t+0, v@t+0, u@t+1, ...`` (:func:`diffkit.layout.window_channels`).  Channels rather than a new
time axis because every backbone, loss and decoder already takes ``(B, channels, *spatial)`` for
any rank: a time axis would turn a 1-D field into a 2-D one (and a 2-D into 3-D), ask the backbones
to pad and down-sample a short non-periodic axis of ``k`` points, and break the layout's per-axis
meaning (periodic axes, coordinates, area weights); the history channels of the autoregressive
models (``u@t-1, u@t``) are stacked the same way, as in SDA's local score network (Rozet &
Louppe 2023) and the conditional PDE models of Shysheya et al. (2024).

**Training data** (:class:`WindowAdapter`) comes from any adapter that serves trajectories as
autoregressive pairs (its layout has an :class:`~diffkit.layout.AutoregressiveSpec`): an item's
``history`` states (the first ``history * C`` conditioning channels) and its ``horizon`` target
states are de-normalised, the targets turned into states
(:meth:`~diffkit.layout.AutoregressiveSpec.state_from`), and the ``history + horizon = k`` states
standardised with the spec's per-variable state statistics.  The window layout's ``mean`` / ``std``
are those statistics repeated per step; its :class:`~diffkit.layout.WindowSpec` (``layout.window``)
records ``k``, the step and the conditioning, and travels in every checkpoint.  The adapter's other
conditioning channels (static fields), scalars and labels pass through unchanged.  Adapters whose
items carry loss weights (missing values) are refused: a weight for the history states is not served.

**Universal-amortised conditioning** (Shysheya et al. 2024; ``conditioning = "amortised"``).  Every
training window gets a random observation mask ``m`` (1 = observed) of its shape, drawn by
:class:`MaskDistribution`: with probability ``past`` the first ``j`` states (``j`` uniform in
``1..k-1``); with ``points`` each element independently with probability ``f`` (``f`` log-uniform in
``fraction``); with ``both`` the first ``j`` states and sparse points in the others; otherwise
nothing (the unconditional window model).  At least one element is always left unobserved (a mask
that would observe everything loses its last state).  The model sees ``m * x`` and ``m`` as the
first ``2 k C`` conditioning channels (``obs:...``, ``mask:...``) and is trained on the unobserved
elements only (item ``weight = 1 - m``).  One model then forecasts (observe past states) and
assimilates (observe sparse points), and at sampling time the observed elements are imposed: the
denoiser's estimate there is the observed value (:class:`AmortisedDenoiser`), which is the exact
conditional expectation, so the noisy state stays consistent with training.  By default
observations are treated as exact; with ``noise`` (``data.mask_noise = [low, high]``,
:meth:`MaskDistribution.draw_noisy`) the sparse points of a training window are observed with
Gaussian noise of one std per window, that std is a third set of conditioning channels
(``sigma:...``), the loss covers the noisy points too, and at sampling time only exactly observed
elements are imposed (``sigma=`` of the sampling functions).  Masks (and the noise) are a function
of ``(seed, epoch, item)``, so a resumed run draws the same ones.

**Long trajectories** of ``L > k`` states (:func:`sample_trajectory`):

- ``method="sda"``: SDA's composition (Rozet & Louppe 2023, sec. 3.2): the score of the whole
  trajectory is assembled from overlapping windows, state ``i`` taking the window's estimate in
  which it is most central (the window starting at ``clamp(i - (k - 1) // 2, 0, L - k)``).  The
  x0-estimate is affine in the score, so the composed denoiser
  (:class:`ComposedDenoiser`) is assembled the same way and any sampler runs it unchanged.  For a
  Markov chain of order ``<= (k - 1) // 2`` this is exact for clean data; at noise levels above 0
  the noisy chain is no longer Markov and the composition is an approximation whose error falls as
  ``k`` grows (measured in ``tests/test_window.py``).  An amortised model gets each window's slice
  of the observations, so all of them inform every state (a smoother).  Cost: ``L - k + 1`` window
  evaluations per denoiser call.
- ``method="autoregressive"`` (amortised models): the first window is sampled from the observations
  in it; each next window starts ``k - overlap`` states later and is conditioned on the ``overlap``
  states already drawn (as observed past states) plus the observations in its new states.  Exact for
  a Markov chain of order ``<= overlap`` without observations (each window is the exact conditional);
  with observations it is a filter: later observations do not inform earlier states.

Everything here works in the layout's standardised units inside and takes and returns physical
values unless ``standardized=True``; nothing here knows a domain.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

import torch
from torch.utils.data import Dataset

from .adapters import Adapter
from .denoiser import Cond
from .errors import DiffkitError, NonFiniteError, ObservationError, ShapeError
from .layout import Layout, WindowSpec, window_channels

__all__ = ["AmortisedDenoiser", "ComposedDenoiser", "MASK_MODES", "MaskDistribution", "WindowAdapter",
           "WindowDataset", "WindowError", "composition_starts", "sample_amortised", "sample_trajectory",
           "state_layout", "window_layout", "window_options", "window_spec"]

#: the kinds of training masks :class:`MaskDistribution` draws
MASK_MODES = ("past", "points", "both", "none")
#: the methods of :func:`sample_trajectory`
TRAJECTORY_METHODS = ("sda", "autoregressive")


class WindowError(DiffkitError, ValueError):
    """A window model cannot be built or used as asked."""


# ----------------------------------------------------------------------------- masks
@dataclass(frozen=True)
class MaskDistribution:
    """The random observation masks of universal-amortised training (see the module doc).

    ``past``, ``points`` and ``both`` are the probabilities of each kind of mask (the rest: no
    observation); ``fraction = (low, high)`` bounds the log-uniform fraction of observed elements
    of a sparse mask."""

    past: float = 0.25
    points: float = 0.25
    both: float = 0.25
    fraction: tuple[float, float] = (0.01, 0.5)
    noise: tuple[float, float] = (0.0, 0.0)
    """``(0, 0)``: observations exact; ``(low, high)``: the sparse points of a mask get Gaussian noise
    of std log-uniform in ``[low, high]`` (standardised units), one std per window."""

    def __post_init__(self):
        probs = (self.past, self.points, self.both)
        if not all(0 <= p <= 1 for p in probs) or sum(probs) > 1 + 1e-9:
            raise WindowError(f"mask probabilities past={self.past}, points={self.points}, both={self.both} must "
                              f"each be in [0, 1] and sum to <= 1 (the rest is the probability of no observation)")
        lo, hi = (float(v) for v in self.fraction)
        if not 0 < lo <= hi <= 1:
            raise WindowError(f"mask fraction must be (low, high) with 0 < low <= high <= 1, got {self.fraction!r}")
        object.__setattr__(self, "fraction", (lo, hi))
        nlo, nhi = (float(v) for v in self.noise)
        if not ((nlo == nhi == 0) or (0 < nlo <= nhi and math.isfinite(nhi))):
            raise WindowError(f"mask noise must be (0, 0) (exact observations) or (low, high) with 0 < low <= high, "
                              f"got {self.noise!r}")
        object.__setattr__(self, "noise", (nlo, nhi))

    @classmethod
    def from_config(cls, data_cfg) -> "MaskDistribution":
        """From the ``[data]`` section (``mask_past``, ``mask_points``, ``mask_both``, ``mask_fraction``)."""
        return cls(past=data_cfg.mask_past, points=data_cfg.mask_points, both=data_cfg.mask_both,
                   fraction=tuple(data_cfg.mask_fraction), noise=tuple(getattr(data_cfg, "mask_noise", (0.0, 0.0))))

    @property
    def noisy(self) -> bool:
        """Whether sparse points get observation noise (``noise != (0, 0)``)."""
        return self.noise[1] > 0

    @property
    def probabilities(self) -> dict[str, float]:
        """``{mode: probability}`` for every mode of :data:`MASK_MODES`."""
        return {"past": self.past, "points": self.points, "both": self.both,
                "none": max(0.0, 1.0 - self.past - self.points - self.both)}

    def draw(self, length: int, state_shape, generator: torch.Generator | None = None
             ) -> tuple[torch.Tensor, str]:
        """One mask of shape ``(length, *state_shape)`` (float, 1 = observed) and its mode."""
        mask, mode, _ = self._draw(length, state_shape, generator)
        return mask, mode

    def draw_noisy(self, length: int, state_shape, generator: torch.Generator | None = None
                   ) -> tuple[torch.Tensor, torch.Tensor, str]:
        """One mask as :meth:`draw`, the observation-noise std of each element (0 where unobserved and
        at the observed past states, which are exact; the window's one std at its sparse points) and
        the mode.  Draws the mask exactly as :meth:`draw` does, then the std."""
        mask, mode, j = self._draw(length, state_shape, generator)
        sigma = torch.zeros_like(mask)
        if self.noisy and mode in ("points", "both"):
            lo, hi = self.noise
            s = math.exp(math.log(lo) + float(torch.rand((), generator=generator, dtype=torch.float64))
                         * (math.log(hi) - math.log(lo)))
            sigma[j:] = s * mask[j:]
        return mask, sigma, mode

    def _draw(self, length: int, state_shape, generator) -> tuple[torch.Tensor, str, int]:
        if length < 2:
            raise WindowError(f"a window needs at least 2 states to hold observed and unobserved ones, got {length}")
        shape = (int(length), *(int(s) for s in state_shape))
        u = float(torch.rand((), generator=generator, dtype=torch.float64))
        edges, mode = 0.0, "none"
        for name in ("past", "points", "both"):
            edges += getattr(self, name)
            if u < edges:
                mode = name
                break
        mask = torch.zeros(shape)
        j = 0
        if mode in ("past", "both"):
            j = int(torch.randint(1, length, (), generator=generator))
            mask[:j] = 1
        if mode in ("points", "both"):
            lo, hi = self.fraction
            f = math.exp(math.log(lo) + float(torch.rand((), generator=generator, dtype=torch.float64))
                         * (math.log(hi) - math.log(lo)))
            mask[j:] = (torch.rand((length - j, *shape[1:]), generator=generator) < f).to(mask.dtype)
        if bool(mask.all()):  # nothing left to predict: the last state is not observed
            mask[-1] = 0
        return mask, mode, j


def _mask_generator(seed: int, epoch: int, index: int) -> torch.Generator:
    """The generator of one item's mask: a function of ``(seed, epoch, index)`` only (exact resume)."""
    s = ((int(seed) * 1_000_003 + int(epoch)) * 1_000_000_007 + int(index)) % (2**63 - 1)
    return torch.Generator().manual_seed(s)


# ----------------------------------------------------------------------------- training data
def window_spec(layout: Layout) -> WindowSpec:
    """``layout.window``, or an error saying the model is not a window model."""
    spec = getattr(layout, "window", None)
    if spec is None:
        raise WindowError("this model's layout has no window spec (Layout.window is None): it is not a window "
                          "model; train one with data.window = k (and data.amortised = true for conditioning)")
    return spec


def window_options(adapter_cls, options: Mapping[str, Any], length: int) -> dict:
    """``options`` of an autoregressive adapter with ``history`` / ``horizon`` filled in for windows of
    ``length`` states when neither is given: ``history = 1, horizon = length - 1`` if the adapter takes
    both, ``history = length - 1`` if it takes only ``history``."""
    import inspect

    out = dict(options)
    if "history" in out or "horizon" in out:
        return out
    try:
        params = inspect.signature(adapter_cls).parameters
    except (TypeError, ValueError):
        return out
    if "history" in params and "horizon" in params:
        out.update(history=1, horizon=length - 1)
    elif "history" in params:
        out["history"] = length - 1
    return out


def window_layout(inner: Layout, length: int, *, amortised: bool = False, noise: bool = False) -> Layout:
    """The layout of windows of ``length`` states built from an autoregressive adapter's layout
    (``noise``: an amortised model of noisy observations, :attr:`~diffkit.layout.WindowSpec.noise`)."""
    ar = inner.autoregressive
    if ar is None:
        raise WindowError(f"window models are built from an adapter serving trajectories as autoregressive pairs "
                          f"(a layout with an AutoregressiveSpec); this adapter's layout (channels "
                          f"{list(inner.channels)[:4]}) has none; use e.g. data.adapter = \"pde\" or \"weather\"")
    if ar.history + ar.horizon != length:
        raise WindowError(f"data.window = {length} needs windows of {length} states, but the adapter serves history "
                          f"{ar.history} + horizon {ar.horizon} = {ar.history + ar.horizon}; set data.options.history "
                          f"+ data.options.horizon = {length} (or leave both unset)")
    C, nd = ar.num_variables, inner.ndim
    spec = WindowSpec(variables=ar.variables, length=length, step=ar.step, step_units=ar.step_units,
                      frame_step=ar.frame_step, conditioning="amortised" if amortised else "none",
                      noise=bool(amortised and noise))
    stat = lambda v: torch.tensor(list(v) * length, dtype=torch.float32).reshape(-1, *[1] * nd)  # noqa: E731
    w = inner.weights
    if w is not None and w.ndim == 1 + nd and w.shape[0] == inner.num_channels and w.shape[0] > 1:
        # per target channel (horizon * C, step-major): the last step's weights, for every state
        w = w[-C:].repeat(length, *[1] * nd)
    extra = tuple(inner.cond_channels[ar.history * C:])
    chan_attrs = {f"{v}@t+{j}": dict(inner.channel_attrs[v]) for j in range(length) for v in ar.variables
                  if v in inner.channel_attrs}
    return Layout(channels=window_channels(ar.variables, length), spatial=inner.spatial, shape=inner.shape,
                  periodic=inner.periodic, coords=inner.coords, weights=w,
                  cond_channels=spec.observation_channels + extra, scalars=inner.scalars,
                  num_classes=inner.num_classes, mean=stat(ar.state_mean), std=stat(ar.state_std),
                  attrs=dict(inner.attrs), coord_attrs=inner.coord_attrs, channel_attrs=chan_attrs, window=spec)


def state_layout(layout: Layout) -> Layout:
    """The one-step autoregressive layout of a window model's states (history 1, the window's
    variables, step and per-variable state statistics): what a domain's readers of initial conditions
    and writers of trajectories take, so a window model's output is written like a rollout's."""
    from .layout import AutoregressiveSpec, history_channels

    w = window_spec(layout)
    C = w.num_variables
    m = layout.mean.reshape(-1)[:C].tolist() if layout.mean is not None else [0.0] * C
    sd = layout.std.reshape(-1)[:C].tolist() if layout.std is not None else [1.0] * C
    spec = AutoregressiveSpec(variables=w.variables, history=1, step=w.step, step_units=w.step_units,
                              frame_step=w.frame_step, state_mean=m, state_std=sd)
    chan_attrs = {v: dict(layout.channel_attrs[f"{v}@t+0"]) for v in w.variables
                  if f"{v}@t+0" in layout.channel_attrs}
    return Layout(channels=tuple(w.variables), spatial=layout.spatial, shape=layout.shape, periodic=layout.periodic,
                  coords=layout.coords, cond_channels=history_channels(w.variables, 1), scalars=layout.scalars,
                  attrs=dict(layout.attrs), coord_attrs=layout.coord_attrs, channel_attrs=chan_attrs,
                  autoregressive=spec)


class WindowDataset(Dataset):
    """The windows of an autoregressive adapter's dataset (see the module doc); with ``masks``, each
    item also gets its amortised conditioning (``fields``: values, mask, the adapter's other fields) and
    ``weight = 1 - mask``.  ``set_epoch`` (called by the trainer) changes the masks drawn."""

    def __init__(self, items: Dataset, inner: Layout, layout: Layout, masks: MaskDistribution | None = None,
                 seed: int = 0):
        self.items, self.inner, self.layout, self.masks, self.seed = items, inner, layout, masks, int(seed)
        self.epoch = 0

    def set_epoch(self, epoch: int) -> None:
        self.epoch = int(epoch)

    def __len__(self):
        return len(self.items)

    def window(self, item: Mapping) -> torch.Tensor:
        """The standardised window ``(k * C, *S)`` of one item of the adapter."""
        ar, nd = self.inner.autoregressive, self.inner.ndim
        C, S = ar.num_variables, tuple(self.inner.shape)
        if "weight" in item:
            raise WindowError("the adapter's items carry loss weights (missing values); window models cannot weigh "
                              "the history states and do not support missing values yet: use data without them "
                              "(e.g. without allow_missing)")
        f = item["fields"].double()
        hist = ar.destandardize(f[:ar.history * C].reshape(ar.history, C, *S), nd)
        tgt = self.inner.denormalize(item["x"].double()).reshape(ar.horizon, C, *S)
        states = torch.cat([hist, ar.state_from(hist[-1:], tgt)], 0)
        return ar.standardize(states, nd).reshape(-1, *S).to(torch.float32)

    def __getitem__(self, i):
        item = self.items[i]
        x = self.window(item)
        out = {"x": x}
        ar = self.inner.autoregressive
        extra = item["fields"][ar.history * ar.num_variables:] if "fields" in item else None
        fields = []
        if self.masks is not None:
            k, C = self.layout.window.length, ar.num_variables
            g = _mask_generator(self.seed, self.epoch, i)
            if self.layout.window.noise:  # noisy sparse points, their std as input; the loss covers them too
                m, sig, _ = self.masks.draw_noisy(k, (C, *self.inner.shape), g)
                m, sig = m.reshape(x.shape), sig.reshape(x.shape)
                y = x + sig * torch.randn(x.shape, generator=g, dtype=x.dtype)
                fields += [y * m, m, sig]
                out["weight"] = 1 - m * (sig == 0).to(m.dtype)
            else:
                m, _ = self.masks.draw(k, (C, *self.inner.shape), g)
                m = m.reshape(x.shape)
                fields += [x * m, m]
                out["weight"] = 1 - m
        if extra is not None and extra.shape[0]:
            fields.append(extra.to(x.dtype))
        if fields:
            out["fields"] = torch.cat(fields, 0)
        for key in ("scalars", "label"):
            if key in item:
                out[key] = item[key]
        return out


class WindowAdapter(Adapter):
    """An autoregressive adapter's trajectories as windows of ``length`` states (``data.window``), with
    amortised conditioning masks when ``amortised`` (``data.amortised``).  Its ``name`` is the inner
    adapter's (the name checkpoints store); its own decoder is the default one (CF netCDF of the window
    channels), which the trainer's snapshots use."""

    def __init__(self, inner: Adapter, length: int, *, amortised: bool = False,
                 masks: MaskDistribution | None = None, seed: int = 0):
        self.inner, self.length, self.amortised = inner, int(length), bool(amortised)
        self.name = getattr(inner, "name", type(inner).__name__)
        self.masks = (masks or MaskDistribution()) if amortised else None
        self.seed = int(seed)
        self._layout = window_layout(inner.layout, self.length, amortised=self.amortised,
                                     noise=self.masks is not None and self.masks.noisy)

    @classmethod
    def from_config(cls, inner: Adapter, cfg) -> "WindowAdapter":
        """The wrapper ``cfg`` (a :class:`~diffkit.config.Config`) asks for."""
        return cls(inner, cfg.data.window, amortised=cfg.data.amortised,
                   masks=MaskDistribution.from_config(cfg.data), seed=cfg.trainer.seed)

    @property
    def layout(self) -> Layout:
        return self._layout

    def dataset(self, split: str) -> Dataset:
        return WindowDataset(self.inner.dataset(split), self.inner.layout, self._layout, self.masks, self.seed)


# ----------------------------------------------------------------------------- inference
def _model_device(model) -> torch.device:
    p = next(iter(model.parameters()), None) if hasattr(model, "parameters") else None
    return p.device if p is not None else torch.device("cpu")


def _noise_input(model, values: torch.Tensor, mask: torch.Tensor, sigma: torch.Tensor | None):
    """``(exact, fields)``: where observations are imposed (observed with zero noise) and the model's
    noise-std input channels (``[]`` unless its window spec has ``noise``); an error if noisy
    observations are given to a model that takes observations as exact."""
    noisy = bool(getattr(getattr(model.layout, "window", None), "noise", False))
    sig = torch.zeros_like(values) if sigma is None else torch.where(mask > 0, sigma.to(values), 0.0)
    if not noisy and bool((sig > 0).any()):
        raise WindowError("this model takes observations as exact (trained without data.mask_noise): give no "
                          "observation noise (sigma=None), or train with data.mask_noise = [low, high]")
    return (mask > 0) & (sig <= 0), ([sig] if noisy else [])


class AmortisedDenoiser:
    """``D(x, t)`` of an amortised window model conditioned on standardised observed ``values`` and
    their ``mask`` (both ``(B, k * C, *S)``; ``extra`` the layout's other fields / scalars / labels as a
    :class:`~diffkit.denoiser.Cond`; ``sigma`` the observations' noise std, standardised, for models
    trained with noisy observations): the network's estimate where unobserved or observed with noise,
    the observed value where observed exactly (the exact conditional expectation there)."""

    def __init__(self, model, values: torch.Tensor, mask: torch.Tensor, extra: Cond | None = None,
                 sigma: torch.Tensor | None = None):
        self.model, self.schedule = model, model.schedule
        self.mask = mask
        self.values = torch.where(mask > 0, values, torch.zeros_like(values))
        self.exact, noise = _noise_input(model, values, mask, sigma)
        ex = extra or Cond()
        f = [self.values, mask, *noise] + ([ex.fields.to(values)] if ex.fields is not None else [])
        self.cond = Cond(torch.cat(f, 1), ex.scalars, ex.labels)

    def _impose(self, x0):
        return torch.where(self.exact, self.values.to(x0.dtype), x0)

    def __call__(self, x, t):
        return self._impose(self.model(x, t, self.cond))

    def x0_at(self, x, t, alpha: float, sigma: float, logsnr: float):
        fast = getattr(self.model, "x0_at", None)
        if fast is None:
            return self(x, t)
        return self._impose(fast(x, t, alpha, sigma, logsnr, self.cond))


def composition_starts(length: int, k: int) -> torch.Tensor:
    """For each of ``length`` states, the start of the window of ``k`` states it takes its estimate
    from in SDA's composition: the one in which it is most central, ``clamp(i - (k - 1) // 2, 0, length - k)``."""
    i = torch.arange(length)
    return (i - (k - 1) // 2).clamp(0, length - k)


class ComposedDenoiser:
    """SDA's composition (see the module doc): the denoiser of trajectories ``(B, L * C, *S)`` from a
    window model of ``k`` states, evaluated on all ``L - k + 1`` windows in one batch.  For an amortised
    model, ``values`` / ``mask`` (``(B, L * C, *S)``, standardised) give each window its observations
    (``sigma``, same shape: their noise std, for models trained with noisy observations)."""

    def __init__(self, model, length: int, values: torch.Tensor | None = None, mask: torch.Tensor | None = None,
                 extra: Cond | None = None, sigma: torch.Tensor | None = None):
        spec = window_spec(model.layout)
        self.model, self.schedule, self.spec = model, model.schedule, spec
        self.k, self.C, self.L = spec.length, spec.num_variables, int(length)
        if self.L < self.k:
            raise WindowError(f"a trajectory of {self.L} states is shorter than the model's window of {self.k}")
        self.n_win = self.L - self.k + 1
        self.amortised = spec.conditioning == "amortised"
        self.extra = extra or Cond()
        if self.amortised:
            if values is None or mask is None:
                raise WindowError("an amortised window model needs values and mask (an all-zero mask: no observation)")
            self.mask = mask
            self.values = torch.where(mask > 0, values, torch.zeros_like(values))
            self.exact, self.noise = _noise_input(model, values, mask, sigma)
        starts = composition_starts(self.L, self.k)
        self._win = starts  # (L,) window of each state
        self._pos = torch.arange(self.L) - starts  # position of each state in its window

    def _windows(self, z: torch.Tensor) -> torch.Tensor:
        """``(B, L * C, *S)`` -> ``(B * n_win, k * C, *S)``, windows of each row consecutive."""
        B, S, C = z.shape[0], z.shape[2:], self.C
        zz = z.reshape(B, self.L, C, *S)
        w = torch.stack([zz[:, s:s + self.k] for s in range(self.n_win)], 1)  # (B, n_win, k, C, *S)
        return w.reshape(B * self.n_win, self.k * C, *S)

    def _cond(self, B: int) -> Cond | None:
        ex = self.extra
        rep = lambda v: None if v is None else v.repeat_interleave(self.n_win, 0)  # noqa: E731
        fields = []
        if self.amortised:
            fields += [self._windows(v) for v in (self.values, self.mask, *self.noise)]
        if ex.fields is not None:
            fields.append(rep(ex.fields))
        sc = ex.scalars
        if sc is not None and sc.ndim == 3:  # each window's own scalars (B, n_win, S), windows of a row consecutive
            if sc.shape[1] != self.n_win:
                raise ShapeError(f"per-window scalars have {sc.shape[1]} windows, the trajectory of {self.L} states "
                                 f"has {self.n_win} (one per start state 0..{self.n_win - 1})")
            sc = sc.reshape(-1, sc.shape[-1])
        else:
            sc = rep(sc)
        cond = Cond(torch.cat(fields, 1) if fields else None, sc, rep(ex.labels))
        return cond if cond.given else None

    def __call__(self, x, t):
        return self._compose(x, t, lambda xw, tw, cond: self.model(xw, tw, cond) if cond is not None
                             else self.model(xw, tw))

    def x0_at(self, x, t, alpha: float, sigma: float, logsnr: float):
        """The samplers' fast path: the model's own ``x0_at`` on the windows, where it has one."""
        fast = getattr(self.model, "x0_at", None)
        if fast is None:
            return self(x, t)
        return self._compose(x, t, lambda xw, tw, cond: fast(xw, tw, alpha, sigma, logsnr, cond))

    def _compose(self, x, t, call):
        B, S = x.shape[0], x.shape[2:]
        t = torch.as_tensor(t, dtype=torch.float64, device=x.device)
        tw = t.expand(B).repeat_interleave(self.n_win) if t.ndim else t
        y = call(self._windows(x), tw, self._cond(B))
        y = y.reshape(B, self.n_win, self.k, self.C, *S)
        out = y[:, self._win.to(x.device), self._pos.to(x.device)]  # (B, L, C, *S)
        out = out.reshape(x.shape)
        if self.amortised:
            out = torch.where(self.exact, self.values.to(out.dtype), out)
        return out


def _unwrap(model):
    """The denoiser of a :class:`~diffkit.model.LoadedModel` (or ``model`` itself); a regression model is refused."""
    from .denoiser import Regressor
    from .model import LoadedModel

    if isinstance(model, LoadedModel):
        model = model.model
    if isinstance(model, Regressor):
        raise WindowError("this is a regression model (model.objective = \"regression\"): window sampling needs a "
                          "diffusion model; train the window model with model.objective = \"diffusion\"")
    return model


def _check_amortised(model, what: str) -> WindowSpec:
    spec = window_spec(model.layout)
    if spec.conditioning != "amortised":
        raise WindowError(f"{what} needs a window model trained with amortised conditioning (data.amortised = true); "
                          f"this one is an unconditional window prior (layout.window.conditioning = "
                          f"{spec.conditioning!r}): condition it by guidance (diffkit.guidance) or retrain")
    return spec


def _observations(layout: Layout, spec: WindowSpec, values, mask, n_states: int | None, standardized: bool,
                  what: str, sigma=None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Checked ``(N, n, C, *S)`` values / mask / noise std -> standardised, flattened ``(N, n * C, *S)``
    values, mask and noise std (None when ``sigma`` is None)."""
    C, S = spec.num_variables, tuple(layout.shape)
    values, mask = torch.as_tensor(values), torch.as_tensor(mask)
    if values.ndim != 3 + len(S) or tuple(values.shape[2:]) != (C, *S) or (n_states and values.shape[1] != n_states):
        n = n_states or "n"
        raise ShapeError(f"{what} values have shape {tuple(values.shape)}, expected (N, {n}, {C}, "
                         f"{', '.join(map(str, S))}) = (conditions, states, variables {', '.join(spec.variables)}, "
                         f"*{layout.spatial})")
    if tuple(mask.shape) != tuple(values.shape):
        raise ShapeError(f"{what} mask has shape {tuple(mask.shape)}, but the values have {tuple(values.shape)}; "
                         f"give one mask entry per value (1 = observed, 0 = not)")
    if mask.dtype != torch.bool:
        if not bool(((mask == 0) | (mask == 1)).all()):
            raise ObservationError(f"{what} mask must hold only 0 (not observed) and 1 (observed), or be boolean")
        mask = mask > 0
    values = values.to(torch.float64)
    bad = mask & ~torch.isfinite(values)
    if bool(bad.any()):
        raise NonFiniteError(f"{what} values hold {int(bad.sum())} NaN or inf entries where the mask says observed; "
                             f"set the mask to 0 there")
    if not standardized:
        values = _standardize(layout, C, values)
    values = torch.where(mask, values, torch.zeros_like(values))
    N, n = values.shape[:2]
    sig = None if sigma is None else _sigma(layout, spec, sigma, mask, standardized, what).reshape(N, n * C, *S)
    return values.reshape(N, n * C, *S), mask.reshape(N, n * C, *S).to(torch.float64), sig


def _sigma(layout: Layout, spec: WindowSpec, sigma, mask: torch.Tensor, standardized: bool, what: str) -> torch.Tensor:
    """The observations' noise std (a number, or broadcastable to the values ``(N, n, C, *S)``) checked
    and standardised (divided by each variable's state std unless ``standardized``); 0 where unobserved."""
    sig = torch.as_tensor(sigma, dtype=torch.float64)
    try:
        sig = torch.broadcast_to(sig, mask.shape)
    except RuntimeError:
        raise ShapeError(f"{what} sigma has shape {tuple(sig.shape)}, not broadcastable to the values' "
                         f"{tuple(mask.shape)}; give a number or one std per value") from None
    bad = mask & ~(torch.isfinite(sig) & (sig >= 0))
    if bool(bad.any()):
        raise ObservationError(f"{what} sigma holds {int(bad.sum())} negative, NaN or inf entries where observed; "
                               f"give each observation's noise std (>= 0; 0 = exact)")
    if bool((mask & (sig > 0)).any()) and not spec.noise:
        raise WindowError(f"{what} this model takes observations as exact (trained without data.mask_noise): give "
                          f"sigma=None, or train with data.mask_noise = [low, high] to assimilate noisy observations")
    if not standardized:
        sig = sig / _state_stats(layout, spec.num_variables, sig)[1]
    return torch.where(mask, sig, torch.zeros_like(sig))


def _state_stats(layout: Layout, C: int, like: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The per-variable state statistics ``(C, *S)``: the window layout's first ``C`` channels."""
    full = lambda v, fill: (torch.full((C, *layout.shape), fill, dtype=like.dtype, device=like.device) if v is None
                            else torch.broadcast_to(v, layout.sample_shape)[:C].to(like))  # noqa: E731
    return full(layout.mean, 0.0), full(layout.std, 1.0)


def _standardize(layout: Layout, C: int, x: torch.Tensor) -> torch.Tensor:
    m, s = _state_stats(layout, C, x)
    return (x - m) / s


def _extra_cond(layout: Layout, spec: WindowSpec, N: int, fields, scalars, labels, device) -> Cond:
    n_extra = len(layout.cond_channels) - len(spec.observation_channels)
    if n_extra and fields is None:
        raise ShapeError(f"this model is also conditioned on the fields {list(layout.cond_channels[-n_extra:])}: "
                         f"pass them as fields= ({N}, {n_extra}, *{layout.shape}), standardised as the adapter serves them")
    if layout.scalars and scalars is None:
        raise ShapeError(f"this model is conditioned on the scalars {list(layout.scalars)}: pass scalars= ({N}, "
                         f"{len(layout.scalars)}), standardised as the adapter serves them")
    t = lambda v, dt=torch.float32: None if v is None else torch.as_tensor(v).to(device, dt)  # noqa: E731
    return Cond(t(fields), t(scalars), t(labels, torch.long))


def _draw(model, den, shape, *, sampler, nfe, spacing, generator, progress, dtype, device, options, noise=None):
    from .sampling import sample

    if noise is None:
        x_init = torch.randn(shape, generator=generator, dtype=dtype,
                             device=generator.device if generator is not None else "cpu").to(device)
    else:
        x_init = noise.reshape(shape).to(device, dtype)
    return sample(den, shape, sampler=sampler, nfe=nfe, spacing=spacing, generator=generator, x_init=x_init,
                  progress=progress, **options)


def _sample_windows(model, values, mask, extra: Cond, *, sampler, nfe, spacing, generator, progress, dtype,
                    device, options, noise=None, sigma=None) -> torch.Tensor:
    """Standardised windows ``(B, k C, *S)`` given standardised per-row values / mask (/ noise std) of that shape."""
    den = AmortisedDenoiser(model, values.to(device, dtype), mask.to(device, dtype), extra,
                            None if sigma is None else sigma.to(device, dtype))
    x = _draw(model, den, tuple(values.shape), sampler=sampler, nfe=nfe, spacing=spacing, generator=generator,
              progress=progress, dtype=dtype, device=device, options=options, noise=noise)
    return den._impose(x)


def sample_amortised(model, values, mask, members: int = 1, *, sampler: str = "dpmpp_2m", nfe: int = 20,
                     spacing: str | None = None, generator: torch.Generator | None = None, fields=None,
                     scalars=None, labels=None, standardized: bool = False, noise: torch.Tensor | None = None,
                     progress: bool = False, dtype=torch.float32, sigma=None, **options) -> torch.Tensor:
    """``members`` windows per condition from an amortised window model, given observations.

    ``model`` is a :class:`~diffkit.denoiser.Denoiser` (or a :func:`~diffkit.model.load_model` result)
    whose layout has an amortised :class:`~diffkit.layout.WindowSpec`.  ``values`` and ``mask`` have
    shape ``(N, k, C, *S)`` (``N`` conditions, the model's ``k`` states of
    ``C`` variables; ``layout.window``): ``mask`` is 1 (or True) where a value is observed and 0 where
    not (values there are ignored and may be NaN).  Observing the first states forecasts; observing
    sparse points assimilates; an all-zero mask draws from the window prior.  ``values`` are physical
    (standardised with the layout's state statistics) unless ``standardized=True``; ``fields`` /
    ``scalars`` / ``labels`` are the layout's other conditions, ``(N, ...)``, as the adapter serves them.
    The sampler (``sampler``, ``nfe``, ``spacing``, its ``options``) runs the
    :class:`AmortisedDenoiser`; the noise comes from ``generator`` (or the initial state is ``noise``,
    ``(N, members, k, C, *S)`` standard normal).  ``sigma``: the observations' noise std (a number or
    one per value, in the units of ``values``; 0 = exact), for models trained with ``data.mask_noise``
    (:attr:`~diffkit.layout.WindowSpec.noise`); ``None`` takes them as exact.  Returns
    ``(N, members, k, C, *S)`` in the units of ``values``; entries observed exactly equal the
    observations.
    """
    model = _unwrap(model)
    spec = _check_amortised(model, "sample_amortised")
    layout = model.layout
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise WindowError(f"members must be an integer >= 1, got {members!r}")
    v, m, sig = _observations(layout, spec, values, mask, spec.length, standardized, "sample_amortised:", sigma)
    N, S, C, k = v.shape[0], tuple(layout.shape), spec.num_variables, spec.length
    device = _model_device(model)
    extra = _extra_cond(layout, spec, N, fields, scalars, labels, device).repeat_interleave(members)
    _check_noise(noise, (N, members, k, C, *S))
    x = _sample_windows(model, v.repeat_interleave(members, 0), m.repeat_interleave(members, 0), extra,
                        sampler=sampler, nfe=nfe, spacing=spacing, generator=generator, progress=progress,
                        dtype=dtype, device=device, options=options, noise=noise,
                        sigma=None if sig is None else sig.repeat_interleave(members, 0))
    return _physical(layout, x.reshape(N, members, k, C, *S), standardized)


def _check_noise(noise, shape) -> None:
    if noise is not None and tuple(noise.shape) != tuple(shape):
        raise ShapeError(f"noise has shape {tuple(noise.shape)}, expected {tuple(shape)} (conditions, members, "
                         f"states, variables, *spatial)")


def _physical(layout: Layout, x: torch.Tensor, standardized: bool) -> torch.Tensor:
    """``(..., n, C, *S)`` standardised states -> physical with the per-variable state statistics."""
    if standardized:
        return x
    m, s = _state_stats(layout, layout.window.num_variables, x)
    return x * s + m


def sample_trajectory(model, values=None, mask=None, members: int = 1, *, length: int | None = None,
                      method: str = "sda", overlap: int | None = None, sampler: str = "dpmpp_2m", nfe: int = 20,
                      spacing: str | None = None, generator: torch.Generator | None = None, fields=None,
                      scalars=None, labels=None, standardized: bool = False, noise: torch.Tensor | None = None,
                      progress: bool = False, dtype=torch.float32, sigma=None, **options) -> torch.Tensor:
    """``members`` trajectories of ``L >= k`` states per condition from a window model of ``k`` states.

    ``values`` / ``mask``: ``(N, L, C, *S)`` observations as in :func:`sample_amortised` (amortised
    models); without them (``values = mask = None``) give ``length = L`` and one condition is drawn
    from the prior (``N = 1``, or the batch of ``fields`` / ``scalars``).  ``method`` is ``"sda"``
    (:class:`ComposedDenoiser`: every state's estimate from the window it is most central in, all
    observations informing all states) or ``"autoregressive"`` (amortised models: windows in
    sequence, each conditioned on the last ``overlap`` states drawn, default ``k // 2``, and on its
    own observations).  ``scalars`` are ``(N, n_scalars)``, the same for every window, or
    ``(N, L - k + 1, n_scalars)``: the scalars of the window starting at each state (time-dependent
    forcings; both methods start windows only at states ``0 .. L - k``).
    ``noise`` (``"sda"`` only): the initial state, ``(N, members, L, C, *S)``
    standard normal.  ``sigma``: the observations' noise std, as in :func:`sample_amortised` (states
    already drawn enter the next window as exact).  Returns ``(N, members, L, C, *S)``.
    """
    model = _unwrap(model)
    spec = window_spec(model.layout)
    layout, k, C, S = model.layout, spec.length, spec.num_variables, tuple(model.layout.shape)
    if method not in TRAJECTORY_METHODS:
        raise WindowError(f"method must be one of {', '.join(TRAJECTORY_METHODS)}, got {method!r}")
    if not isinstance(members, int) or isinstance(members, bool) or members < 1:
        raise WindowError(f"members must be an integer >= 1, got {members!r}")
    amortised = spec.conditioning == "amortised"
    if (values is None) != (mask is None):
        raise WindowError("give values and mask together (or neither, with length=, for the prior)")
    if values is None:
        if length is None:
            raise WindowError("give length= (the number of states) when no observations are given")
        L = int(length)
        N = next((int(torch.as_tensor(a).shape[0]) for a in (fields, scalars, labels) if a is not None), 1)
        v = torch.zeros((N, L * C, *S), dtype=torch.float64)
        m = torch.zeros_like(v)
        sig = None
    else:
        if not amortised:
            _check_amortised(model, "sample_trajectory with observations")
        v, m, sig = _observations(layout, spec, values, mask, None, standardized, "sample_trajectory:", sigma)
        N, L = v.shape[0], v.shape[1] // C
        if length is not None and int(length) != L:
            raise WindowError(f"length={length} but the observations cover {L} states")
    if L < k:
        raise WindowError(f"a trajectory of {L} states is shorter than the model's window of {k} states")
    device = _model_device(model)
    if scalars is not None and torch.as_tensor(scalars).ndim == 3:
        sh = tuple(torch.as_tensor(scalars).shape)
        if sh != (N, L - k + 1, len(layout.scalars)):
            raise ShapeError(f"per-window scalars have shape {sh}, expected ({N}, {L - k + 1}, {len(layout.scalars)}) "
                             f"= (conditions, windows starting at states 0..{L - k}, scalars {list(layout.scalars)})")
    extra = _extra_cond(layout, spec, N, fields, scalars, labels, device).repeat_interleave(members)
    v, m = v.repeat_interleave(members, 0).to(device, dtype), m.repeat_interleave(members, 0).to(device, dtype)
    sig = sig if sig is None else sig.repeat_interleave(members, 0).to(device, dtype)
    kw = dict(sampler=sampler, nfe=nfe, spacing=spacing, generator=generator, progress=progress, dtype=dtype,
              device=device, options=options)
    B = N * members
    if method == "sda":
        den = ComposedDenoiser(model, L, v if amortised else None, m if amortised else None, extra, sig)
        _check_noise(noise, (N, members, L, C, *S))
        x = _draw(model, den, (B, L * C, *S), noise=noise, **kw)
        if amortised:
            x = torch.where(den.exact, v, x)
        return _physical(layout, x.reshape(N, members, L, C, *S), standardized)
    _check_amortised(model, "sample_trajectory(method='autoregressive')")
    if noise is not None:
        raise WindowError("noise= is taken by method='sda' only (the autoregressive method draws one window at a "
                          "time from generator=)")
    o = max(1, k // 2) if overlap is None else overlap
    if isinstance(o, bool) or not isinstance(o, int) or not 1 <= o <= k - 1:
        raise WindowError(f"overlap must be an integer in 1..{k - 1} (states shared by consecutive windows), got {overlap!r}")
    traj = torch.zeros((B, L, C, *S), dtype=dtype, device=device)
    vv, mm = v.reshape(B, L, C, *S), m.reshape(B, L, C, *S)
    ss = None if sig is None else sig.reshape(B, L, C, *S)
    done, s = 0, 0
    while done < L:
        s = min(s, L - k)
        wv, wm = vv[:, s:s + k].clone(), mm[:, s:s + k].clone()
        wv[:, :done - s], wm[:, :done - s] = traj[:, s:done], 1  # the states already drawn, as observed exactly
        ws = None
        if ss is not None:
            ws = ss[:, s:s + k].clone()
            ws[:, :done - s] = 0
            ws = ws.reshape(B, k * C, *S)
        ex = extra
        if ex.scalars is not None and ex.scalars.ndim == 3:  # the window starting at state s: its own scalars
            ex = Cond(ex.fields, ex.scalars[:, s], ex.labels)
        x = _sample_windows(model, wv.reshape(B, k * C, *S), wm.reshape(B, k * C, *S), ex, sigma=ws, **kw)
        traj[:, done:s + k] = x.reshape(B, k, C, *S)[:, done - s:]
        done, s = s + k, s + k - o
    return _physical(layout, traj.reshape(N, members, L, C, *S), standardized)
