"""The :class:`Denoiser`: one contract between any network and every sampler.

A backbone network predicts eps, x0 or v (Turner et al. 2024, step 5) from a noisy input,
conditioned on the noise level through FiLM (step 4).  The Denoiser wraps it with the
schedule and parameterisation so that samplers only ever see

    denoiser(x_t, t, **extra_args) -> estimate of x0   (and denoiser.schedule)

as in k-diffusion's "predict the clean sample" contract.  The network is conditioned on the
log-SNR of ``t`` rather than on ``t`` itself, so a trained model can be sampled on any
time grid.  Conditioning (fields, scalars, class labels) is carried by :class:`Cond`, and
classifier-free guidance (Ho & Salimans 2022) is applied here, in one batched forward pass.

The Denoiser takes a :class:`~diffkit.schedules.Schedule` object; a schedule name becomes one
through :func:`diffkit.registry.resolve` (or :func:`diffkit.get_schedule`), never here.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from . import param as P
from ._shape import as_batch_time, check_finite
from .errors import ShapeError
from .layout import Layout
from .schedules import Schedule, cosine


@dataclass(frozen=True)
class Cond:
    """Conditioning passed through to the network.

    - ``fields``: ``(B, len(layout.cond_channels), *spatial)``, concatenated to x as channels;
    - ``scalars``: ``(B, len(layout.scalars))``, embedded by FiLM beside the noise level;
    - ``labels``: ``(B,)`` integer class labels in ``[0, layout.num_classes)``.
    """

    fields: torch.Tensor | None = None
    scalars: torch.Tensor | None = None
    labels: torch.Tensor | None = None

    @property
    def given(self) -> bool:
        """Whether any conditioning is present."""
        return self.fields is not None or self.scalars is not None or self.labels is not None

    def to(self, device) -> "Cond":
        mv = lambda v: None if v is None else v.to(device)
        return Cond(mv(self.fields), mv(self.scalars), mv(self.labels))

    def index(self, idx) -> "Cond":
        """Select or repeat batch entries (``idx`` a tensor of indices or a slice)."""
        sel = lambda v: None if v is None else v[idx]
        return Cond(sel(self.fields), sel(self.scalars), sel(self.labels))

    def repeat_interleave(self, n: int) -> "Cond":
        """Repeat each batch entry ``n`` times (one condition, ``n`` ensemble members)."""
        rep = lambda v: None if v is None else v.repeat_interleave(n, dim=0)
        return Cond(rep(self.fields), rep(self.scalars), rep(self.labels))

    def check(self, layout: Layout, x: torch.Tensor) -> None:
        """Raise :class:`ShapeError` unless the conditioning matches the layout and ``x``."""
        B, spatial = x.shape[0], tuple(x.shape[2:])
        nf = len(layout.cond_channels)
        if nf:
            if self.fields is None:
                raise ShapeError(f"the layout declares {nf} conditioning fields {layout.cond_channels} "
                                 "but Cond.fields is None")
            want = (B, nf, *spatial)
            if tuple(self.fields.shape) != want:
                raise ShapeError(f"Cond.fields has shape {tuple(self.fields.shape)}, expected {want} "
                                 f"(batch, cond channel, *spatial of x)")
            check_finite(self.fields, "Cond.fields")
        elif self.fields is not None:
            raise ShapeError("Cond.fields was given but the layout declares no cond_channels")
        ns = len(layout.scalars)
        if ns:
            if self.scalars is None:
                raise ShapeError(f"the layout declares scalar conditions {layout.scalars} but Cond.scalars is None")
            if tuple(self.scalars.shape) != (B, ns):
                raise ShapeError(f"Cond.scalars has shape {tuple(self.scalars.shape)}, expected {(B, ns)}")
            check_finite(self.scalars, "Cond.scalars")
        elif self.scalars is not None:
            raise ShapeError("Cond.scalars was given but the layout declares no scalars")
        if self.labels is not None:
            if not layout.num_classes:
                raise ShapeError("Cond.labels was given but the layout has num_classes = 0")
            if tuple(self.labels.shape) != (B,):
                raise ShapeError(f"Cond.labels has shape {tuple(self.labels.shape)}, expected {(B,)}")
            if self.labels.is_floating_point():
                raise ShapeError("Cond.labels must be an integer tensor")
            if bool(((self.labels < 0) | (self.labels > layout.num_classes)).any()):
                raise ShapeError(f"Cond.labels must lie in [0, {layout.num_classes}] "
                                 f"({layout.num_classes} is the null label)")


_NO_COND = Cond()


def _schedule(schedule, owner: str) -> Schedule:
    """``schedule`` itself if it is a Schedule; a one-line error pointing to the registry otherwise."""
    if isinstance(schedule, Schedule):
        return schedule
    if isinstance(schedule, (str, dict)):
        raise TypeError(f"{owner} takes a Schedule object, got {schedule!r}; build it with "
                        f"diffkit.get_schedule({schedule!r}) (diffkit.registry.resolve('schedule', ...))")
    raise TypeError(f"{owner} takes a Schedule object (e.g. diffkit.cosine()), got {type(schedule).__name__}")


class Denoiser(nn.Module):
    """Wrap a backbone ``net`` as an x0-estimator over the VP process of ``schedule``.

    ``net(x_in, c_noise, scalars=None, labels=None)`` is called with ``x_in`` the noisy
    sample (with conditioning fields concatenated as channels) and ``c_noise`` its log-SNR.
    """

    def __init__(self, net: nn.Module, schedule: Schedule, parameterization: str = "eps",
                 layout: Layout | None = None, *, logsnr_clip: float = 30.0):
        super().__init__()
        self.net = net
        self.schedule = _schedule(schedule, "Denoiser")
        self.parameterization = P.check_parameterization(parameterization)
        self.layout = layout if layout is not None else getattr(net, "layout", None)
        self.logsnr_clip = float(logsnr_clip)
        self._c_noise_cache: dict = {}

    # -- raw network call --------------------------------------------------------------
    def net_output(self, x: torch.Tensor, t, cond: Cond | None = None) -> torch.Tensor:
        """The backbone's raw output (in its parameterisation) at noisy ``x`` and time ``t``."""
        B = x.shape[0]
        t = as_batch_time(t, B, device=x.device)
        c_noise = self.schedule.logsnr(t).clamp(-self.logsnr_clip, self.logsnr_clip).to(torch.float32)
        return self._net(x, c_noise, cond)

    def _net(self, x, c_noise, cond):
        cond = cond or _NO_COND
        if self.layout is not None:
            self.layout.check(x, "x", spatial=False)
            cond.check(self.layout, x)
        x_in = x if cond.fields is None else torch.cat([x, cond.fields.to(x.dtype)], dim=1)
        return self.net(x_in, c_noise, scalars=cond.scalars, labels=cond.labels)

    def predict(self, x: torch.Tensor, t, cond: Cond | None = None, guidance: float | None = None
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """``(x0_hat, eps_hat)`` at ``(x, t)``, with optional classifier-free guidance."""
        B = x.shape[0]
        t = as_batch_time(t, B, device=x.device)
        if bool(((t <= 0) | (t > 1)).any()):
            raise ValueError("the denoiser is evaluated at t in (0, 1]; t = 0 is the clean data")
        out = self._guided_output(x, t, cond, guidance)
        a, s = self.schedule.coeffs(t)
        p = self.parameterization
        return P.to_x0(p, out, x, a, s), P.to_eps(p, out, x, a, s)

    def _guided_output(self, x, t, cond, guidance, c_noise=None):
        """Network output with optional guidance; ``c_noise`` (the clipped float32 log-SNR per
        sample) is computed from ``t`` unless given."""
        if c_noise is None:
            c_noise = self.schedule.logsnr(t).clamp(-self.logsnr_clip, self.logsnr_clip).to(torch.float32)
        if guidance is None or guidance == 1.0:
            return self._net(x, c_noise, cond)
        if cond is None or cond.labels is None:
            raise ValueError("classifier-free guidance needs class labels in Cond.labels")
        if self.layout is None or not self.layout.num_classes:
            raise ValueError("classifier-free guidance needs a layout with num_classes > 0 "
                             "(the null label is num_classes); pass layout= to Denoiser")
        null = torch.full_like(cond.labels, self.layout.num_classes)
        both = Cond(
            fields=None if cond.fields is None else torch.cat([cond.fields, cond.fields]),
            scalars=None if cond.scalars is None else torch.cat([cond.scalars, cond.scalars]),
            labels=torch.cat([cond.labels, null]),
        )
        out_c, out_u = self._net(torch.cat([x, x]), torch.cat([c_noise, c_noise]), both).chunk(2)
        # The conversions to x0/eps are affine in the output, so guidance in output space
        # equals guidance in eps space (Ho & Salimans 2022) and in x0 space.
        return out_u + guidance * (out_c - out_u)

    def forward(self, x: torch.Tensor, t, cond: Cond | None = None, guidance: float | None = None) -> torch.Tensor:
        """Estimate of x0 -- the contract every sampler relies on."""
        return self.predict(x, t, cond, guidance)[0]

    def x0_at(self, x: torch.Tensor, t, alpha: float, sigma: float, logsnr: float, cond: Cond | None = None,
              guidance: float | None = None) -> torch.Tensor:
        """``forward(x, t, cond, guidance)`` for a batch at one time ``t`` whose ``alpha``,
        ``sigma`` and log-SNR the caller already has (Python floats): the samplers' fast path.

        It skips what a sampler has done once for its whole grid -- the range check of ``t``
        and the schedule evaluations (``coeffs``, ``logsnr``) -- and the eps estimate that
        :meth:`forward` discards.  The result equals ``forward``'s (bit for bit up to the last
        ulp of the float64 schedule arithmetic, which is computed once per grid instead of once
        per sample).  A subclass that overrides ``forward``, ``predict`` or ``net_output``, or a
        module with hooks, gets the plain ``forward`` call, so overrides are never bypassed."""
        if self._plain_only():
            return self(x, t, cond, guidance)
        lam = min(max(float(logsnr), -self.logsnr_clip), self.logsnr_clip)
        key = (lam, x.shape[0], x.device)
        c_noise = self._c_noise_cache.get(key)
        if c_noise is None:  # one small tensor per grid level, reused by every call at that level
            if len(self._c_noise_cache) > 512:
                self._c_noise_cache.clear()
            c_noise = torch.full((x.shape[0],), lam, dtype=torch.float32, device=x.device)
            self._c_noise_cache[key] = c_noise
        out = self._guided_output(x, None, cond, guidance, c_noise=c_noise)
        p = self.parameterization
        if p == "x0":
            return out
        a, s = float(alpha), float(sigma)
        if out.dtype != x.dtype:  # as param.to_x0: coefficients in x's dtype, then type promotion
            a, s = (float(torch.tensor(v, dtype=x.dtype)) for v in (a, s))
            dt = torch.promote_types(out.dtype, x.dtype)
            out, x = out.to(dt), x.to(dt)
        if p == "eps":
            return (x - s * out) / a
        return a * x - s * out

    def _plain_only(self) -> bool:
        cls = type(self)
        return (cls.forward is not Denoiser.forward or cls.predict is not Denoiser.predict
                or cls.net_output is not Denoiser.net_output or cls._guided_output is not Denoiser._guided_output
                or bool(self._forward_hooks or self._forward_pre_hooks))

    def bind(self, cond: Cond | None = None, guidance: float | None = None) -> "BoundDenoiser":
        """A denoiser with the conditioning fixed, for samplers."""
        return BoundDenoiser(self, cond, guidance)


class BoundDenoiser:
    """``denoiser(x, t)`` with conditioning and guidance fixed; exposes ``schedule``."""

    def __init__(self, denoiser: Denoiser, cond: Cond | None, guidance: float | None):
        self.denoiser, self.cond, self.guidance = denoiser, cond, guidance
        self.schedule = denoiser.schedule

    def __call__(self, x, t):
        return self.denoiser(x, t, self.cond, self.guidance)

    def x0_at(self, x, t, alpha: float, sigma: float, logsnr: float):
        """The samplers' fast path (:meth:`Denoiser.x0_at`) with the bound conditioning."""
        fast = getattr(self.denoiser, "x0_at", None)
        if fast is None:
            return self(x, t)
        return fast(x, t, alpha, sigma, logsnr, self.cond, self.guidance)


class Regressor(nn.Module):
    """The deterministic baseline: the same backbone, trained by MSE to map conditions to ``x``.

    The network is called exactly as a :class:`Denoiser` calls it, with zeros in place of the
    noisy sample and a fixed noise level ``c_noise`` (PDE-Refiner's one-step MSE model, Lippe et
    al. 2023, sec. 3), and its output is the prediction.  ``schedule`` is kept only so that a
    trainer can treat both model types alike; it does not enter the prediction (default: the
    cosine schedule).
    """

    parameterization = "x0"

    def __init__(self, net: nn.Module, layout: Layout, schedule: Schedule | None = None, *,
                 c_noise: float = 0.0):
        super().__init__()
        if layout is None:
            raise ValueError("Regressor needs the layout (it gives the shape of the prediction)")
        self.net, self.layout = net, layout
        self.schedule = cosine() if schedule is None else _schedule(schedule, "Regressor")
        self.c_noise = float(c_noise)

    def net_output(self, cond: Cond | None, batch: int, *, device=None, dtype=torch.float32) -> torch.Tensor:
        cond = cond or Cond()
        if device is None:
            device = next((v.device for v in (cond.fields, cond.scalars, cond.labels) if v is not None), None)
        x = torch.zeros((batch, *self.layout.sample_shape), device=device, dtype=dtype)
        cond.check(self.layout, x)
        x_in = x if cond.fields is None else torch.cat([x, cond.fields.to(x.dtype)], dim=1)
        c = torch.full((batch,), self.c_noise, device=x.device, dtype=torch.float32)
        return self.net(x_in, c, scalars=cond.scalars, labels=cond.labels)

    def forward(self, cond: Cond | None, batch: int | None = None) -> torch.Tensor:
        """The prediction of ``x`` (standardised) for a batch of conditions."""
        if batch is None:
            given = [v for v in (cond.fields, cond.scalars, cond.labels) if v is not None] if cond else []
            if not given:
                raise ValueError("Regressor needs conditions, or batch= for an unconditional call")
            batch = given[0].shape[0]
        return self.net_output(cond, batch)
