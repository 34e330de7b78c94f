"""Autoregressive ensemble rollouts: the one loop behind ``diffkit rollout`` (PDE surrogates) and
``diffkit forecast`` (weather), as GraphCast/GenCast's one rollout serves two models.

:func:`rollout` takes a model whose layout carries an :class:`~diffkit.layout.AutoregressiveSpec`
(``layout.autoregressive``), physical initial states and a per-step conditioning hook, and knows
nothing of the domain:

- all ``N`` initial conditions times ``M`` members advance in **one batch** (rows ``n * M + m``),
  one model call (a :class:`~diffkit.denoiser.Regressor`) or one sampler run (a
  :class:`~diffkit.denoiser.Denoiser`, :func:`diffkit.sample`) per step;
- it works in standardised units: the history is standardised with the spec's state statistics,
  the target de-normalised with the layout's ``mean``/``std``;
- the next state is the target itself (``target = "state"``) or the latest input state plus the
  target (``"residual"``): :meth:`~diffkit.layout.AutoregressiveSpec.state_from`, the one
  definition;
- the conditioning of step ``k`` is the standardised history as the first ``history * C`` field
  channels (NaN filled with 0), plus whatever the domain's ``condition`` hook adds (forcings as
  scalars, static fields, a mask channel, PDE parameters);
- the noise (initial-condition perturbations first, then the sampler's) comes from **one
  generator** seeded by ``seed``: the same seed gives the same ensemble;
- a prediction holding NaN or inf (outside ``fixed_mask``) stops the rollout with an error naming
  the step.

**Perturbation policy (both domains).**  ``perturb`` is the standard deviation, in standardised
units (i.e. times each state channel's ``state_std`` in physical units), of Gaussian noise added
to the initial states: one noise field per member, added to every history state (the recent
tendency the model sees is kept), on every member (no unperturbed control, so the members are
exchangeable, as the fair CRPS and rank histograms assume), never on ``fixed_mask`` points.
``perturb=None`` means 0 for a diffusion model (its spread comes from the sampler) and
:data:`DEFAULT_PERTURB` for a regression model with ``members > 1`` (the perturbed-initial-condition
ensemble baseline); a regression model with one member is not perturbed.

**Spatially correlated perturbations.**  ``perturb_length`` (default 0: white grid-point noise, the
behaviour above, draw for draw) is a correlation length ``l`` in grid points, one for every spatial
axis or one per axis: the noise is white noise filtered along each axis with the Gaussian kernel
``exp(-x^2 / (2 l^2))`` (truncated at ``5 l``) and divided by the kernel's norm, so that every point
keeps the standard deviation ``perturb`` and the correlation at a lag of ``d`` points along an axis
is ``exp(-d^2 / (4 l^2))`` (the kernel's autocorrelation; :func:`correlated_noise`).  Periodic axes
(``layout.periodic``) are filtered circularly by FFT; on the others the white noise is drawn
``5 l`` points wider on both sides and filtered without wrapping, so the field is stationary up to
the edges.  Grid points are the unit, whatever their physical spacing.  :func:`diffkit.calibrate.
tune_perturbation` picks ``perturb`` and ``perturb_length`` on validation data.
"""
from __future__ import annotations

import math
from typing import Callable

import torch

from .denoiser import Cond, Regressor
from .errors import DiffkitError, NonFiniteError, ShapeError
from .layout import TARGETS, AutoregressiveSpec, Layout, history_channels

__all__ = ["DEFAULT_PERTURB", "TARGETS", "AutoregressiveSpec", "ConditionHook", "autoregressive_spec",
           "correlated_noise", "history_channels", "resolve_perturb", "resolve_perturb_length", "rollout"]

#: relative initial-condition noise of a regression ensemble with more than one member (see the module doc)
DEFAULT_PERTURB = 0.05
#: the Gaussian kernel of correlated perturbations is truncated at this many correlation lengths
#: (the weight left out is exp(-12.5) ~ 4e-6 of the centre's)
KERNEL_RADIUS = 5.0

#: ``condition(k, hist, fields) -> Cond``: the conditioning of model call ``k`` (0-based) from the
#: standardised history ``hist`` ``(N * M, history, C, *S)`` (NaN where missing) and the default
#: fields ``(N * M, history * C, *S)`` (``hist`` with NaN filled with 0); rows are ``n * M + m``.
ConditionHook = Callable[[int, torch.Tensor, torch.Tensor], Cond]


def autoregressive_spec(layout: Layout) -> AutoregressiveSpec:
    """``layout.autoregressive``, or an error saying the model cannot be rolled out."""
    spec = getattr(layout, "autoregressive", None)
    if spec is None:
        raise DiffkitError("this model's layout has no autoregressive spec (Layout.autoregressive is None): it does "
                           "not predict next states from previous ones; train it with an autoregressive adapter "
                           "(e.g. data.adapter = \"pde\" or \"weather\")")
    return spec


def resolve_perturb(perturb: float | None, model, members: int) -> float:
    """The perturbation policy: ``perturb`` if given (>= 0), else :data:`DEFAULT_PERTURB` for a
    regression model with ``members > 1`` and 0 otherwise."""
    if perturb is None:
        return DEFAULT_PERTURB if (isinstance(model, Regressor) and members > 1) else 0.0
    perturb = float(perturb)
    if not perturb >= 0 or not math.isfinite(perturb):
        raise ValueError(f"perturb must be >= 0 and finite, got {perturb}")
    return perturb


def resolve_perturb_length(length, ndim: int) -> tuple[float, ...]:
    """``perturb_length`` as one correlation length (grid points, >= 0, finite) per spatial axis:
    a number is used on every axis, a sequence must have ``ndim`` entries."""
    if isinstance(length, (int, float)) and not isinstance(length, bool):
        vals = (float(length),) * ndim
    else:
        try:
            vals = tuple(float(v) for v in length)
        except (TypeError, ValueError):
            raise ValueError(f"perturb_length must be a number or one number per spatial axis, got {length!r}") \
                from None
        if len(vals) != ndim:
            raise ValueError(f"perturb_length has {len(vals)} value(s) {list(vals)}, but the grid has {ndim} spatial "
                             f"axis/axes; give one number (every axis) or {ndim}")
    if not all(math.isfinite(v) and v >= 0 for v in vals):
        raise ValueError(f"perturb_length must be >= 0 and finite (grid points; 0 = white noise), got {length!r}")
    return vals


def _circular_kernel(length: float, n: int, radius: int, device) -> torch.Tensor:
    """The Gaussian ``exp(-m^2 / (2 l^2))`` for ``|m| <= radius`` placed on a circle of ``n`` points
    (offset ``m`` at index ``m mod n``; wraps add up)."""
    m = torch.arange(-radius, radius + 1, device=device)
    g = torch.exp(-0.5 * (m.to(torch.float64) / length) ** 2)
    return torch.zeros(n, dtype=torch.float64, device=device).index_add_(0, m.remainder(n), g)


def correlated_noise(shape, length, periodic=None, *, generator: torch.Generator | None = None,
                     device=None) -> torch.Tensor:
    """Gaussian noise of unit variance at every point, spatially correlated over the last
    ``len(length)`` dims of ``shape`` (float32).

    ``length``: one correlation length per spatial axis, in grid points (0: white along that
    axis).  ``periodic``: one bool per spatial axis (default: none).  The field is white noise
    filtered with the Gaussian kernel ``k(m) = exp(-m^2 / (2 l^2))``, ``|m| <= 5 l``, along each axis
    and divided by ``sqrt(sum k^2)`` per axis, so its variance is 1 and its correlation at a lag of
    ``d`` points along one axis is ``sum_m k(m) k(m + d) / sum_m k(m)^2 = exp(-d^2 / (4 l^2))``
    (exact for the untruncated kernel up to ``2 exp(-pi^2 l^2)``, i.e. < 1e-4 for ``l >= 1``).
    Periodic axes are filtered circularly (FFT); on the others the white noise is drawn ``5 l``
    points wider on each side and the filtered field cropped, so no point sees an edge.  With every
    length 0 this is ``torch.randn(shape, generator=generator)`` itself.
    """
    shape = tuple(int(n) for n in shape)
    length = tuple(float(v) for v in length)
    nd = len(length)
    if nd > len(shape):
        raise ShapeError(f"correlated_noise: {nd} correlation length(s) for a shape {shape} of {len(shape)} dims")
    periodic = (False,) * nd if periodic is None else tuple(bool(p) for p in periodic)
    if len(periodic) != nd:
        raise ShapeError(f"correlated_noise: {len(periodic)} periodic flag(s) for {nd} spatial axis/axes")
    lead, S = shape[:len(shape) - nd], shape[len(shape) - nd:]
    radius = [math.ceil(KERNEL_RADIUS * v) if v > 0 else 0 for v in length]
    ext = [n if (p or r == 0) else n + 2 * r for n, p, r in zip(S, periodic, radius)]
    w = torch.randn((*lead, *ext), generator=generator, device=device)
    if not any(v > 0 for v in length):
        return w
    w = w.to(torch.float64)
    for i, (v, p, r, n) in enumerate(zip(length, periodic, radius, ext)):
        if v <= 0:
            continue
        k = _circular_kernel(v, n, r, w.device)
        x = w.movedim(len(lead) + i, -1)                         # the axis last: the kernel broadcasts
        x = torch.fft.irfft(torch.fft.rfft(x, dim=-1) * torch.fft.rfft(k), n=n, dim=-1) / k.square().sum().sqrt()
        if not p:
            x = x[..., r:n - r]                                   # the points whose kernel never wrapped
        w = x.movedim(-1, len(lead) + i)
    return w.to(torch.float32).contiguous()


def _unwrap(model, config):
    """A bare Denoiser/Regressor and its config from a handle (``.model``, ``.config``) or a model."""
    inner = getattr(model, "model", None)
    if isinstance(inner, torch.nn.Module):
        return inner, (config if config is not None else getattr(model, "config", None))
    return model, config


def _device(model) -> torch.device:
    p = next(iter(model.parameters()), None)
    return p.device if p is not None else torch.device("cpu")


@torch.no_grad()
def rollout(model, history: torch.Tensor, steps: int, members: int = 1, *,
            condition: ConditionHook | None = None, perturb: float | None = None, perturb_length=0.0,
            sampler: str | None = None, nfe: int | None = None, spacing: str | None = None, config=None,
            generator: torch.Generator | None = None, seed: int = 0, layout: Layout | None = None,
            fixed_mask: torch.Tensor | None = None,
            allow_missing: bool = False, progress: bool = False, desc: str = "rollout") -> torch.Tensor:
    """Roll an autoregressive model out for ``steps`` states; returns physical values
    ``(N, members, steps, C, *S)`` (float32, CPU).

    ``model``: a Denoiser or Regressor whose layout has an autoregressive spec, or a handle with
    ``.model`` and ``.config`` (:class:`diffkit.model.LoadedModel`, a PDE ``Surrogate``, a weather
    ``Forecaster``).  ``history``: ``(N, history, C, *S)`` physical states, oldest first.
    ``condition``: the per-step hook (:data:`ConditionHook`); ``None`` gives the history fields alone.
    ``perturb``, ``perturb_length``: see the module doc.  ``sampler``/``nfe``/``spacing`` default to the run's ``[sample]``
    section (``config``, or the handle's; without one, :class:`diffkit.config.SampleConfig`'s
    defaults).  ``layout``: the layout to roll out with (default: the model's).  ``fixed_mask``:
    ``(C, *S)`` bool, points that are always missing: NaN in the output, never perturbed, exempt
    from the finite checks.  ``allow_missing``: accept NaN in the initial
    states elsewhere too (the hook must then tell the model, e.g. with a mask channel).
    A model with ``horizon > 1`` predicts ``horizon`` states per call; the last call's extra states
    are dropped.
    """
    model, config = _unwrap(model, config)
    layout = model.layout if layout is None else layout
    spec = autoregressive_spec(layout)
    h, hz, C, nd = spec.history, spec.horizon, spec.num_variables, layout.ndim
    history = torch.as_tensor(history)
    want = (h, C, *layout.shape)
    if history.ndim != 1 + len(want) or tuple(history.shape[1:]) != want:
        raise ShapeError(f"history has shape {tuple(history.shape)}, expected (N, {', '.join(map(str, want))}): "
                         f"{h} state(s) of the {C} channel(s) {', '.join(spec.variables)} on the grid "
                         f"{layout.spatial} = {layout.shape} the model was trained on")
    if isinstance(steps, bool) or not isinstance(steps, int) or isinstance(members, bool) \
            or not isinstance(members, int) or steps < 1 or members < 1:
        raise ValueError(f"steps and members must be integers >= 1, got steps={steps!r}, members={members!r}")
    perturb = resolve_perturb(perturb, model, members)
    lengths = resolve_perturb_length(perturb_length, nd)
    dev = _device(model)
    fm = None
    if fixed_mask is not None:
        fm = torch.as_tensor(fixed_mask, dtype=torch.bool).to(dev)
        if tuple(fm.shape) != (C, *layout.shape):
            raise ShapeError(f"fixed_mask has shape {tuple(fm.shape)}, expected {(C, *layout.shape)}")
    history = history.to(dev, torch.float32)
    bad = ~torch.isfinite(history)
    if fm is not None:
        bad &= ~fm
    if not allow_missing and bool(bad.any()):
        raise NonFiniteError(f"the initial states hold NaN or inf at {int(bad.sum())} value(s)"
                             f"{' outside the fixed missing-value mask' if fm is not None else ''}, and the model "
                             f"was trained without missing values; give complete initial states")

    sample_cfg = getattr(config, "sample", None)
    if sample_cfg is None:
        from .config import SampleConfig

        sample_cfg = SampleConfig()
    sampler = sampler or sample_cfg.sampler
    nfe = nfe or sample_cfg.nfe
    spacing = spacing or sample_cfg.spacing
    if generator is None:
        generator = torch.Generator(device=dev).manual_seed(int(seed))

    N = history.shape[0]
    B = N * members
    hist = spec.standardize(history, nd).repeat_interleave(members, 0)     # (B, h, C, *S)
    if perturb > 0:
        noise = correlated_noise((B, 1, C, *layout.shape), lengths, layout.periodic_mask, generator=generator,
                                 device=dev) * perturb
        if fm is not None:
            noise = torch.where(fm, torch.zeros((), device=dev), noise)
        hist = hist + noise
    nan = torch.full((), float("nan"), device=dev)

    calls = math.ceil(steps / hz)
    it = range(calls)
    if progress:
        from tqdm.auto import tqdm

        it = tqdm(it, desc=desc, unit="step", dynamic_ncols=True)
    regression = isinstance(model, Regressor)
    if not regression:
        from .sampling import sample
    out = []
    for k in it:
        filled = torch.nan_to_num(hist, nan=0.0, posinf=0.0, neginf=0.0)
        fields = filled.reshape(B, h * C, *layout.shape)
        cond = condition(k, hist, fields) if condition is not None else Cond(fields=fields)
        if regression:
            y = model(cond, B)
        else:
            y = sample(model.bind(cond), (B, hz * C, *layout.shape), sampler=sampler, nfe=nfe, spacing=spacing,
                       generator=generator, device=dev)
        target = layout.denormalize(y.to(torch.float32)).reshape(B, hz, C, *layout.shape)
        last = spec.destandardize(filled[:, -1], nd)                          # missing inputs: the mean
        new = spec.state_from(last[:, None], target)                          # (B, hz, C, *S) physical
        if fm is not None:
            new = torch.where(fm, nan, new)
        ok = torch.isfinite(new) if fm is None else (torch.isfinite(new) | fm)
        if not bool(ok.all()):
            first = k * hz + int((~ok).reshape(B, hz, -1).any(-1).any(0).nonzero()[0]) + 1
            lead = f" (lead {first * spec.step:g} {spec.step_units})" if spec.step is not None else ""
            raise NonFiniteError(f"the rollout produced NaN or inf at step {first}{lead}; the model is unstable this "
                                 f"far out (train longer, or roll out fewer steps)")
        out.append(new)
        hist = torch.cat([hist, spec.standardize(new, nd)], 1)[:, -h:]
    pred = torch.cat(out, 1)[:, :steps]
    return pred.reshape(N, members, steps, C, *layout.shape).cpu()
