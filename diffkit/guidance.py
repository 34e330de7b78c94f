"""Guided sampling from observations: observation operators and guidance methods.

An observation is ``y = A(x0) + noise`` with ``noise ~ N(0, diag(sigma_y^2))``, where ``x0`` is
one standardised sample ``(C, *spatial)`` of any rank and ``A`` an *observation operator*:

- :class:`MaskOperator` -- the values where a boolean mask of shape ``(C, *spatial)`` is true;
- :class:`IndexOperator` -- the values at flat indices into ``(C, *spatial)``;
- :class:`BlockAverage` -- the means over blocks of ``f_1 x f_2 x ...`` points (coarsening);
- :class:`LinearOperator` -- a dense matrix over the flattened sample, or a linear callable;
- :class:`NonlinearOperator` -- any differentiable callable (autograd).

:class:`Observation` holds the operator, the values ``y`` (batch first) and ``sigma_y`` (a float or
one value per observation) and checks them.

A **guidance method** wraps a denoiser ``D(x_t, t, **extra_args) -> E[x0 | x_t]`` (with its
``.schedule``) into another one, ``guided(x_t, t, **extra_args) -> E[x0 | x_t, y]`` (approximately),
with the same ``.schedule``.  Since every sampler only needs an x0 estimate, every registered
sampler -- deterministic or stochastic, built-in or plug-in -- samples the posterior with it
unchanged.  Under the VP process ``x_t = alpha_t x0 + sigma_t eps`` Tweedie's formula gives

    E[x0 | x_t, y] = D(x_t) + (sigma_t^2 / alpha_t) grad_{x_t} log p(y | x_t),
    Cov[x0 | x_t]  = (sigma_t^2 / alpha_t) dD/dx_t,

and the methods differ in how they approximate ``log p(y | x_t)``:

- :func:`dps` (Chung et al. 2022): ``-(zeta / ||r||) ||r||^2`` with ``r = y - A(D(x_t))``;
- :func:`reconstruction` (Shysheya et al. 2024; SDA, Rozet & Louppe 2023): the Gaussian
  ``N(y; A(D), Sigma_y + gamma sigma_t^2 / alpha_t^2 I)``;
- :func:`mmps` (Rozet et al. 2024): the Gaussian ``N(y; A D, Sigma_y + A Cov[x0 | x_t] A^T)``, with
  the Tweedie covariance applied through vector-Jacobian products and the system solved by
  conjugate gradients; exact for a Gaussian prior, a linear operator and the exact denoiser, and
  safeguarded (truncated CG) for learned denoisers whose covariance is not positive definite.

They are registered through the ``diffkit_guidance`` hook (:func:`diffkit.registry.get_guidance` resolves them), so plugins can
add more.  Guided denoisers differentiate through the denoiser, so they do not define the
samplers' ``x0_at`` fast path: samplers call them plainly (see :mod:`diffkit.samplers`).
docs/assimilation.md gives the costs and how to choose ``gamma`` and ``sigma_y``.
"""
from __future__ import annotations

import math
import warnings
from typing import Callable

import torch

from ._shape import append_dims, as_batch_time, bcast
from .errors import ObservationError
from .hookspecs import hookimpl

__all__ = [
    "BlockAverage", "GuidedDenoiser", "IndexOperator", "LinearOperator", "MaskOperator", "NonlinearOperator",
    "Observation", "ObservationOperator", "dps", "mmps", "reconstruction", "BUILTIN_GUIDANCE",
]


def _numel(shape) -> int:
    return int(math.prod(shape))


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Per-sample inner product over every dim but the first: ``(B,)``."""
    return (a * b).flatten(1).sum(1)


# -- observation operators -------------------------------------------------------------------
class ObservationOperator:
    """Base class of observation operators ``A``: ``A(x) -> y`` for ``x`` of shape ``(B, C, *spatial)``
    and ``y`` of shape ``(B, *obs_shape)``.

    ``linear`` says whether ``A`` is linear.  ``in_shape`` is the sample shape ``(C, *spatial)`` the
    operator expects, or ``None`` when it takes any shape it can handle.  Subclasses define
    ``__call__`` and, when they know it, :meth:`out_shape`; linear ones may define an explicit
    :meth:`transpose` (the default is autograd's vector-Jacobian product).
    """

    linear: bool = True
    in_shape: tuple | None = None

    def __call__(self, x: torch.Tensor) -> torch.Tensor:  # pragma: no cover - abstract
        raise NotImplementedError

    def out_shape(self, in_shape: tuple | None = None) -> tuple | None:
        """``obs_shape`` (without batch) for samples of shape ``in_shape`` (default ``self.in_shape``),
        or ``None`` if unknown."""
        in_shape = tuple(in_shape) if in_shape is not None else self.in_shape
        if in_shape is None:
            return None
        with torch.no_grad():
            return tuple(self(torch.zeros((1, *in_shape), dtype=torch.float64)).shape[1:])

    def vjp(self, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """``J_A(x)^T v``: the vector-Jacobian product at ``x`` (``A^T v`` for a linear ``A``)."""
        if self.linear:
            return self.transpose(v, tuple(x.shape[1:]))
        return _autograd_vjp(self, x, v)

    def jvp(self, x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """``J_A(x) w``: the Jacobian-vector product at ``x`` (``A w`` for a linear ``A``)."""
        if self.linear:
            return self(w)
        with torch.enable_grad():  # the double-backward trick: the JVP as the VJP of a VJP
            xr = x.detach().requires_grad_(True)
            out = self(xr)
            u = torch.zeros_like(out, requires_grad=True)
            (g,) = torch.autograd.grad(out, xr, u, create_graph=True)
            (jw,) = torch.autograd.grad(g, u, w)
        return jw

    def transpose(self, v: torch.Tensor, in_shape: tuple | None = None) -> torch.Tensor:
        """``A^T v`` for a linear operator, ``v`` of shape ``(B, *obs_shape)``, a result of shape
        ``(B, *in_shape)``; by autograd unless the subclass has a closed form."""
        if not self.linear:
            raise TypeError(f"{type(self).__name__} is nonlinear: it has no transpose; use vjp(x, v) at a point x")
        shape = self._need_in_shape(in_shape)
        x = torch.zeros((v.shape[0], *shape), dtype=v.dtype, device=v.device)
        return _autograd_vjp(self, x, v)

    def _need_in_shape(self, in_shape) -> tuple:
        shape = tuple(in_shape) if in_shape is not None else self.in_shape
        if shape is None:
            raise ObservationError(f"{type(self).__name__} does not know the sample shape; pass in_shape=(C, *spatial)")
        return tuple(shape)

    def _check_x(self, x: torch.Tensor) -> None:
        if self.in_shape is not None and tuple(x.shape[1:]) != tuple(self.in_shape):
            raise ObservationError(f"{type(self).__name__} expects samples of shape {tuple(self.in_shape)} "
                                   f"(C, *spatial), got {tuple(x.shape[1:])}; build the operator for the model's sample shape")


def _autograd_vjp(fn, x: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    with torch.enable_grad():
        xr = x.detach().requires_grad_(True)
        out = fn(xr)
        if tuple(out.shape) != tuple(v.shape):
            raise ObservationError(f"the operator gives shape {tuple(out.shape)} but the vector has shape {tuple(v.shape)}")
        (g,) = torch.autograd.grad(out, xr, v.to(out.dtype), allow_unused=True)
    return torch.zeros_like(xr) if g is None else g


class MaskOperator(ObservationOperator):
    """The values where ``mask`` is true: ``y = x[:, mask]``, shape ``(B, n_obs)`` with ``n_obs = mask.sum()``
    in row-major order of ``(C, *spatial)``.  ``mask`` is boolean of shape ``(C, *spatial)``."""

    linear = True

    def __init__(self, mask):
        mask = torch.as_tensor(mask)
        if mask.dtype != torch.bool:
            raise ObservationError(f"MaskOperator needs a boolean mask, got dtype {mask.dtype}; pass mask.bool() "
                                   f"(true where observed)")
        if mask.ndim < 2:
            raise ObservationError(f"MaskOperator needs a mask of shape (C, *spatial), got {tuple(mask.shape)}; "
                                   f"add the channel dim with mask[None]")
        if not bool(mask.any()):
            raise ObservationError("MaskOperator's mask observes nothing (no true value); mark the observed points true")
        self.mask = mask
        self.in_shape = tuple(mask.shape)
        self.n_obs = int(mask.sum())

    def __call__(self, x):
        self._check_x(x)
        return x[:, self.mask.to(x.device)]

    def out_shape(self, in_shape=None):
        return (self.n_obs,)

    def transpose(self, v, in_shape=None):
        out = v.new_zeros((v.shape[0], *self.in_shape))
        out[:, self.mask.to(v.device)] = v
        return out


class IndexOperator(ObservationOperator):
    """The values at flat (row-major) indices ``index`` into one sample ``(C, *spatial)``:
    ``y = x.flatten(1)[:, index]``, shape ``(B, len(index))``.  Give ``in_shape`` so that shapes
    are checked up front and the transpose knows its size (otherwise it is taken from ``x``)."""

    linear = True

    def __init__(self, index, in_shape: tuple | None = None):
        index = torch.as_tensor(index)
        if index.is_floating_point() or index.dtype == torch.bool or index.ndim != 1 or index.numel() == 0:
            raise ObservationError(f"IndexOperator needs a non-empty 1-D integer tensor of flat indices, got "
                                   f"dtype {index.dtype} and shape {tuple(index.shape)}; for a boolean mask use MaskOperator")
        self.index = index.long()
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        lo, hi = int(self.index.min()), int(self.index.max())
        n = None if self.in_shape is None else _numel(self.in_shape)
        if lo < 0 or (n is not None and hi >= n):
            raise ObservationError(f"IndexOperator indices must lie in [0, {n if n is not None else 'numel'}), got "
                                   f"{lo}..{hi}; indices are flat row-major positions in (C, *spatial)")

    def __call__(self, x):
        self._check_x(x)
        flat = x.flatten(1)
        if int(self.index.max()) >= flat.shape[1]:
            raise ObservationError(f"IndexOperator index {int(self.index.max())} is out of range for samples of "
                                   f"{flat.shape[1]} values (shape {tuple(x.shape[1:])})")
        return flat[:, self.index.to(x.device)]

    def out_shape(self, in_shape=None):
        return (int(self.index.numel()),)

    def transpose(self, v, in_shape=None):
        shape = self._need_in_shape(in_shape)
        out = v.new_zeros((v.shape[0], _numel(shape)))
        out.index_add_(1, self.index.to(v.device), v)
        return out.reshape(v.shape[0], *shape)


class BlockAverage(ObservationOperator):
    """Coarsening: the mean over blocks of ``factors[i]`` points along spatial axis ``i``, channel by
    channel.  ``(B, C, n_1, ..., n_d) -> (B, C, n_1/f_1, ..., n_d/f_d)``; ``factors`` is one integer per
    spatial axis, or one integer for all.  Every ``n_i`` must be divisible by ``f_i``."""

    linear = True

    def __init__(self, factors, in_shape: tuple | None = None):
        fs = (factors,) if isinstance(factors, int) else tuple(factors)
        if not fs or any(not isinstance(f, int) or isinstance(f, bool) or f < 1 for f in fs):
            raise ObservationError(f"BlockAverage factors must be positive integers (one per spatial axis, or one "
                                   f"for all), got {factors!r}")
        self.factors = fs
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)
        if self.in_shape is not None:
            self._factors_for(self.in_shape)

    def _factors_for(self, shape: tuple) -> tuple:
        spatial = tuple(shape[1:])
        fs = self.factors * len(spatial) if len(self.factors) == 1 else self.factors
        if len(fs) != len(spatial):
            raise ObservationError(f"BlockAverage has {len(fs)} factors {fs} but the samples have {len(spatial)} "
                                   f"spatial axes {spatial}; give one factor per spatial axis or a single integer")
        bad = [(n, f) for n, f in zip(spatial, fs) if n % f]
        if bad:
            raise ObservationError(f"BlockAverage factors {fs} do not divide the spatial sizes {spatial} "
                                   f"(size {bad[0][0]} by {bad[0][1]}); choose factors that divide them")
        return fs

    def __call__(self, x):
        self._check_x(x)
        fs = self._factors_for(tuple(x.shape[1:]))
        B, C, spatial = x.shape[0], x.shape[1], x.shape[2:]
        split = [B, C]
        for n, f in zip(spatial, fs):
            split += [n // f, f]
        block_dims = tuple(3 + 2 * i for i in range(len(fs)))
        return x.reshape(split).mean(dim=block_dims)

    def out_shape(self, in_shape=None):
        shape = tuple(in_shape) if in_shape is not None else self.in_shape
        if shape is None:
            return None
        fs = self._factors_for(shape)
        return (shape[0], *(n // f for n, f in zip(shape[1:], fs)))

    def transpose(self, v, in_shape=None):
        fs = self.factors * (v.ndim - 2) if len(self.factors) == 1 else self.factors
        out = v / _numel(fs)
        for i, f in enumerate(fs):
            out = out.repeat_interleave(f, dim=2 + i)
        if in_shape is not None or self.in_shape is not None:
            shape = self._need_in_shape(in_shape)
            if tuple(out.shape[1:]) != shape:
                raise ObservationError(f"BlockAverage.transpose: a coarse field of shape {tuple(v.shape[1:])} maps "
                                       f"to {tuple(out.shape[1:])}, not {shape}")
        return out


class LinearOperator(ObservationOperator):
    """A linear map given as a dense matrix ``(n_obs, prod(in_shape))`` over the flattened (row-major)
    sample, ``y = x.flatten(1) @ matrix.T`` of shape ``(B, n_obs)``, or as a linear callable
    ``fn(x) -> y`` (its transpose by autograd).  ``in_shape`` is the sample shape ``(C, *spatial)``."""

    linear = True

    def __init__(self, matrix_or_callable, in_shape: tuple):
        if in_shape is None:
            raise ObservationError("LinearOperator needs in_shape=(C, *spatial), the shape of one sample")
        self.in_shape = tuple(int(s) for s in in_shape)
        if callable(matrix_or_callable) and not isinstance(matrix_or_callable, torch.Tensor):
            self.fn, self.matrix = matrix_or_callable, None
        else:
            m = torch.as_tensor(matrix_or_callable)
            if not m.is_floating_point():
                m = m.to(torch.float64)
            if m.ndim != 2 or m.shape[1] != _numel(self.in_shape):
                raise ObservationError(f"LinearOperator matrix has shape {tuple(m.shape)}, expected (n_obs, "
                                       f"{_numel(self.in_shape)}) for samples of shape {self.in_shape}")
            if not bool(torch.isfinite(m).all()):
                raise ObservationError("LinearOperator matrix holds NaN or inf; give finite coefficients")
            self.fn, self.matrix = None, m

    def __call__(self, x):
        self._check_x(x)
        if self.matrix is None:
            return self.fn(x)
        return x.flatten(1) @ self.matrix.to(device=x.device, dtype=x.dtype).T

    def out_shape(self, in_shape=None):
        if self.matrix is not None:
            return (int(self.matrix.shape[0]),)
        return super().out_shape(in_shape)

    def transpose(self, v, in_shape=None):
        if self.matrix is None:
            return super().transpose(v, self.in_shape)
        return (v @ self.matrix.to(device=v.device, dtype=v.dtype)).reshape(v.shape[0], *self.in_shape)


class NonlinearOperator(ObservationOperator):
    """Any differentiable callable ``fn(x) -> y`` (batch first); its Jacobian products come from
    autograd.  ``in_shape`` (optional) lets shapes be checked before sampling."""

    linear = False

    def __init__(self, fn: Callable, in_shape: tuple | None = None):
        if not callable(fn):
            raise ObservationError(f"NonlinearOperator needs a callable fn(x) -> y, got {type(fn).__name__}")
        self.fn = fn
        self.in_shape = None if in_shape is None else tuple(int(s) for s in in_shape)

    def __call__(self, x):
        self._check_x(x)
        return self.fn(x)


# -- observations ------------------------------------------------------------------------------
def _match_batch(v: torch.Tensor, B: int, what: str) -> torch.Tensor:
    """``v`` of batch ``n`` for samples of batch ``B``: as is when ``n == B``; each entry repeated
    ``B / n`` times in a row when ``n`` divides ``B`` (one observation, ``B / n`` members, as
    :meth:`diffkit.Cond.repeat_interleave`)."""
    n = v.shape[0]
    if n == B:
        return v
    if n and B % n == 0:
        return v.repeat_interleave(B // n, dim=0)
    raise ObservationError(f"{what} has batch {n} but the samples have batch {B}; give one observation per sample, "
                           f"or one per group of B/n consecutive members (B a multiple of n)")


class Observation:
    """Observations ``y = A(x0) + N(0, diag(sigma_y^2))`` for guided sampling.

    - ``operator``: an :class:`ObservationOperator` (``__call__`` and ``linear``);
    - ``y``: values of shape ``(n, *obs_shape)``, batch first.  ``n`` equals the sampling batch, or
      divides it (each observation then serves ``B / n`` consecutive members);
    - ``sigma_y``: the noise std, a float or a tensor broadcastable to ``y`` (one value per
      observation); ``0`` means exact observations.

    NaN in ``y``, a negative or non-finite ``sigma_y``, or a ``y`` whose shape the operator cannot
    give raise :class:`~diffkit.errors.ObservationError`.
    """

    def __init__(self, operator: ObservationOperator, y, sigma_y):
        if not callable(operator) or not hasattr(operator, "linear"):
            raise ObservationError(f"the observation operator must be callable with a `linear` attribute "
                                   f"(MaskOperator, IndexOperator, BlockAverage, LinearOperator, NonlinearOperator), "
                                   f"got {type(operator).__name__}")
        y = torch.as_tensor(y)
        if not y.is_floating_point():
            y = y.to(torch.get_default_dtype())
        if y.ndim < 2:
            raise ObservationError(f"observations y have shape {tuple(y.shape)}; they need a batch dim first, "
                                   f"(n, n_obs) or (n, *obs_shape): add one with y[None]")
        bad = ~torch.isfinite(y)
        if bool(bad.any()):
            raise ObservationError(f"observations y hold {int(torch.isnan(y).sum())} NaN and {int(torch.isinf(y).sum())} "
                                   f"inf values; leave missing observations out of the operator (mark them false "
                                   f"in the MaskOperator's mask)")
        s = torch.as_tensor(sigma_y, dtype=torch.float64)
        if not bool(torch.isfinite(s).all()):
            raise ObservationError("sigma_y holds NaN or inf; give the finite observation-noise std (>= 0), "
                                   "a float or one value per observation")
        if bool((s < 0).any()):
            raise ObservationError(f"sigma_y must be >= 0 (the observation-noise std), got values down to "
                                   f"{float(s.min()):g}; give its absolute value")
        try:
            if torch.broadcast_shapes(s.shape, y.shape) != y.shape:
                raise RuntimeError
        except RuntimeError:
            raise ObservationError(f"sigma_y of shape {tuple(s.shape)} does not broadcast to y of shape "
                                   f"{tuple(y.shape)}; give a float or one value per observation") from None
        want = operator.out_shape() if hasattr(operator, "out_shape") else None
        if want is not None and tuple(y.shape[1:]) != tuple(want):
            raise ObservationError(f"observations y have shape {tuple(y.shape)} but the operator gives (n, "
                                   f"{', '.join(map(str, want))}); give y of shape (n, *{tuple(want)})")
        self.operator, self.y = operator, y
        self.sigma_y = torch.broadcast_to(s, y.shape).to(y.dtype)

    @property
    def n_obs(self) -> int:
        """Observations per sample."""
        return _numel(self.y.shape[1:])

    def values(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """``(y, sigma_y^2)`` matched to the batch, dtype and device of samples ``x``."""
        B = x.shape[0]
        y = _match_batch(self.y, B, "observations y").to(device=x.device, dtype=x.dtype)
        var = _match_batch(self.sigma_y, B, "sigma_y").to(device=x.device, dtype=x.dtype) ** 2
        return y, var

    def predict(self, x0: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
        """``A(x0)``, checked against the shape of ``y``."""
        y_hat = self.operator(x0)
        if tuple(y_hat.shape) != tuple(y.shape):
            raise ObservationError(f"the operator maps samples of shape {tuple(x0.shape)} to {tuple(y_hat.shape)}, "
                                   f"but the observations have shape {tuple(y.shape)}; build the operator for "
                                   f"the model's sample shape")
        return y_hat


# -- guidance methods ---------------------------------------------------------------------------
class GuidedDenoiser:
    """A denoiser wrapped with observations: ``guided(x_t, t, **extra_args) -> x0`` with ``.schedule``.

    ``nfe`` counts denoiser calls and ``vjps`` vector-Jacobian products through the denoiser, for
    cost accounting.  There is no ``x0_at`` fast path: samplers call the plain ``__call__``."""

    method = "guided"

    def __init__(self, denoiser, obs: Observation):
        if not callable(denoiser) or not hasattr(denoiser, "schedule"):
            raise TypeError("guidance wraps a denoiser: a callable denoiser(x, t, **extra_args) -> x0 with a "
                            ".schedule (diffkit.Denoiser.bind(cond) gives one)")
        if not isinstance(obs, Observation):
            raise TypeError(f"obs must be a diffkit.guidance.Observation, got {type(obs).__name__}")
        self.denoiser, self.obs = denoiser, obs
        self.schedule = denoiser.schedule
        self.nfe = 0
        self.vjps = 0

    def __call__(self, x: torch.Tensor, t, **extra_args) -> torch.Tensor:
        return self._evaluate(x, t, extra_args, False)[0]

    def twisted(self, x: torch.Tensor, t, **extra_args) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """``(guided x0, prior x0, log_twist)`` at ``x_t``: the guided estimate ``__call__`` returns, the
        wrapped denoiser's own ``D(x_t)``, and the ``(B,)`` log of the method's approximation of
        ``p(y | x_t)`` (its *twisting function*, up to a constant common to the batch).  This is what
        :func:`diffkit.smc.twisted_smc` weights particles with; it costs what a call costs, plus
        ``n_obs`` vector-Jacobian products for MMPS (the log-determinant of its covariance)."""
        out, x0, lt = self._evaluate(x, t, extra_args, True)
        if lt is None:
            raise TypeError(f"the {self.method} guidance gives no log p(y | x_t) approximation (its _guide sets "
                            f"no _log_twist), which twisted SMC needs; use mmps, reconstruction or dps")
        return out, x0, lt

    def log_likelihood(self, x0: torch.Tensor) -> torch.Tensor:
        """The exact ``(B,)`` ``log N(y; A(x0), Sigma_y)`` of samples ``x0``; needs ``sigma_y > 0``."""
        y, var = self.obs.values(x0)
        if bool((var == 0).any()):
            raise ObservationError("the exact likelihood of noise-free observations (sigma_y = 0) is not a density; "
                                   "give sigma_y > 0 (e.g. the instrument's error) for twisted SMC")
        r = y - self.obs.predict(x0, y)
        return (-0.5 * (r * r / var + torch.log(2 * math.pi * var))).flatten(1).sum(1)

    def _evaluate(self, x, t, extra_args, twist: bool):
        if torch.is_inference_mode_enabled():
            raise RuntimeError(f"{self.method} guidance differentiates through the denoiser, which "
                               "torch.inference_mode() forbids; sample under torch.no_grad() instead")
        B = x.shape[0]
        a, s = self.schedule.coeffs(as_batch_time(t, B, device=x.device))
        y, var = self.obs.values(x)
        self._twist, self._log_twist = twist, None
        with torch.enable_grad():
            xr = x.detach().requires_grad_(True)
            x0 = self.denoiser(xr, t, **extra_args)
            self.nfe += 1
            out = self._guide(xr, x0, bcast(a, x), bcast(s, x), a.to(x.dtype), s.to(x.dtype), y, var)
        lt, self._twist, self._log_twist = self._log_twist, False, None
        return out.detach(), x0.detach(), (None if lt is None else lt.detach())

    def _guide(self, xr, x0, a, s, a_b, s_b, y, var):  # pragma: no cover - abstract
        raise NotImplementedError

    def __repr__(self):
        return f"{type(self).__name__}({self.denoiser!r}, n_obs={self.obs.n_obs})"


def _per_obs(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Per-sample ``(B,)`` values broadcast against observations ``like``."""
    return bcast(v, like)


class DPS(GuidedDenoiser):
    """Diffusion posterior sampling (Chung et al. 2022) as a denoiser."""

    method = "dps"

    def __init__(self, denoiser, obs, *, zeta: float = 1.0):
        super().__init__(denoiser, obs)
        z = float(zeta)
        if not (z >= 0 and math.isfinite(z)):
            raise ValueError(f"zeta must be a finite number >= 0, got {zeta!r}")
        self.zeta = z

    def _guide(self, xr, x0, a, s, a_b, s_b, y, var):
        r = y - self.obs.predict(x0, y)
        sq = (r * r).flatten(1).sum(1)  # ||r||^2 per sample
        (g,) = torch.autograd.grad(sq.sum(), xr)
        self.vjps += 1
        step = self.zeta / sq.detach().sqrt().clamp_min(torch.finfo(sq.dtype).tiny)
        # the log-likelihood whose gradient this is: -(zeta/||r||) grad ||r||^2 = grad (-2 zeta ||r||)
        self._log_twist = -2 * self.zeta * sq.detach().sqrt()
        return x0.detach() - (s * s / a) * bcast(step, xr) * g


class Reconstruction(GuidedDenoiser):
    """Reconstruction guidance (Shysheya et al. 2024; SDA, Rozet & Louppe 2023) as a denoiser."""

    method = "reconstruction"

    def __init__(self, denoiser, obs, *, gamma: float = 1.0):
        super().__init__(denoiser, obs)
        g = float(gamma)
        if not (g >= 0 and math.isfinite(g)):
            raise ValueError(f"gamma must be a finite number >= 0, got {gamma!r}")
        if g == 0 and bool((obs.sigma_y == 0).any()):
            raise ObservationError("reconstruction guidance with gamma = 0 needs sigma_y > 0 everywhere (its "
                                   "likelihood variance is sigma_y^2 + gamma sigma_t^2/alpha_t^2); give gamma > 0")
        self.gamma = g

    def _guide(self, xr, x0, a, s, a_b, s_b, y, var):
        r = y - self.obs.predict(x0, y)
        v = var + self.gamma * _per_obs((s_b / a_b) ** 2, y)
        (g,) = torch.autograd.grad((-0.5 * r * r / v).sum(), xr)
        self.vjps += 1
        self._log_twist = (-0.5 * (r.detach() ** 2 / v + torch.log(v))).flatten(1).sum(1)
        return x0.detach() + (s * s / a) * g


class MMPS(GuidedDenoiser):
    """Moment-matching posterior sampling (Rozet et al. 2024) as a denoiser, with a safeguarded CG.

    Besides ``nfe`` and ``vjps`` it counts, over its calls and per sample, what the safeguard did
    (see :func:`mmps`): ``negative_curvature`` (CG met a direction along which the denoiser's
    covariance is negative), ``fallbacks`` (of those, the ones met at the first iteration, solved
    with reconstruction guidance's covariance instead), ``radius_stops`` (CG stopped at the
    bound ``||u|| <= 2 ||r|| / min sigma_y^2``) and ``overshoots`` (the update overshot the
    observations and reconstruction guidance's was taken).  It warns once per kind of event."""

    method = "mmps"

    def __init__(self, denoiser, obs, *, cg_iters: int = 10, cg_tol: float = 1e-6):
        super().__init__(denoiser, obs)
        if not isinstance(cg_iters, int) or isinstance(cg_iters, bool) or cg_iters < 1:
            raise ValueError(f"cg_iters must be an integer >= 1, got {cg_iters!r}")
        tol = float(cg_tol)
        if not (tol >= 0 and math.isfinite(tol)):
            raise ValueError(f"cg_tol must be a finite number >= 0, got {cg_tol!r}")
        self.cg_iters, self.cg_tol = cg_iters, tol
        self.last_cg_iters = 0
        self.negative_curvature = 0
        self.fallbacks = 0
        self.radius_stops = 0
        self.overshoots = 0
        self._warned = False
        self._warned_over = False

    def _guide(self, xr, x0, a, s, a_b, s_b, y, var):
        op = self.obs.operator
        x0d = x0.detach()
        y_hat = self.obs.predict(x0d, y)
        c = s * s / a  # sigma^2 / alpha, broadcast against x

        def cov(v):  # Cov[x0 | x_t] v = (sigma^2/alpha) J^T v (J symmetric for an exact denoiser)
            (g,) = torch.autograd.grad(x0, xr, v, retain_graph=True)
            self.vjps += 1
            return c * g

        def matvec(u):  # (Sigma_y + A Cov A^T) u, and its Sigma_y part
            noise = var * u
            return noise + op.jvp(x0d, cov(op.vjp(x0d, u))), noise

        r = y - y_hat
        # ||(Sigma_y + P)^{-1} r|| <= ||r|| / min sigma_y^2 for any PSD P: CG's iterates, whose norm grows
        # monotonically to the solution's on an SPD system, never exceed it (2x for rounding)
        vmin = var.flatten(1).min(1).values
        radius = torch.where(vmin > 0, 2 * _dot(r, r).sqrt() / vmin.clamp_min(torch.finfo(r.dtype).tiny),
                             torch.full_like(vmin, math.inf))
        u, self.last_cg_iters, neg, first, hit = _cg(matvec, r, self.cg_iters, self.cg_tol, radius)
        if bool(first.any()):  # no positive-curvature direction: reconstruction guidance's Cov = sigma^2/alpha^2 I
            rec = r / (var + _per_obs((s_b / a_b) ** 2, y))
            u = torch.where(append_dims(first, u.ndim), rec, u)
        n_neg, n_fb, n_hit = int(neg.sum()), int(first.sum()), int(hit.sum())
        self.negative_curvature += n_neg
        self.fallbacks += n_fb
        self.radius_stops += n_hit
        if (n_neg or n_hit) and not self._warned:
            self._warned = True
            warnings.warn(
                "mmps: the denoiser's covariance (sigma_t^2/alpha_t) dD/dx_t is not positive definite (a learned "
                "denoiser's Jacobian need not be): conjugate gradients stopped at negative curvature or at their "
                "bound and kept their last iterate (at the first iteration: reconstruction guidance's "
                "sigma_t^2/alpha_t^2 I covariance); the guided denoiser's .negative_curvature, .fallbacks and "
                ".radius_stops count the samples (docs/assimilation.md)", RuntimeWarning, stacklevel=3)
        if self._twist:
            self._log_twist = self._mmps_log_twist(matvec, r, u, first, var, _per_obs((s_b / a_b) ** 2, y))
        (g,) = torch.autograd.grad(x0, xr, op.vjp(x0d, u), retain_graph=True)
        self.vjps += 1
        # the overshoot test: for a PSD covariance P = A Cov A^T the update's fit of the observations obeys
        # ||A delta||_{Sigma_y^-1} <= ||r||_{Sigma_y^-1} (P (P + Sigma_y)^-1 is a contraction in that norm);
        # a learned Jacobian can break it by orders of magnitude at the noisiest steps -- those samples
        # take reconstruction guidance's update instead (one more VJP, only when one overshoots)
        w = torch.where(var > 0, var, torch.ones_like(var)).sqrt().expand_as(r)  # sigma_y = 0: unweighted
        fit = op.jvp(x0d, c * g) / w
        over = _dot(fit, fit).sqrt() > OVERSHOOT * _dot(r / w, r / w).sqrt()
        self.overshoots += int(over.sum())
        if bool(over.any()):
            rec = r / (var + _per_obs((s_b / a_b) ** 2, y))
            (g_rec,) = torch.autograd.grad(x0, xr, op.vjp(x0d, rec))
            self.vjps += 1
            g = torch.where(append_dims(over, g.ndim), g_rec, g)
            if not self._warned_over:
                self._warned_over = True
                warnings.warn(
                    "mmps: the update overshot the observations (||A delta|| > ||y - A D|| in the sigma_y-weighted "
                    "norm, impossible for a positive semi-definite covariance): the denoiser's Jacobian is not a "
                    "usable covariance at this noise level, and those samples took reconstruction guidance's update; "
                    "the guided denoiser's .overshoots counts them (docs/assimilation.md)", RuntimeWarning,
                    stacklevel=3)
        return x0d + c * g

    def _mmps_log_twist(self, matvec, r, u, first, var, rec_var):
        """``log N(y; A D, M)`` up to a constant, ``M = Sigma_y + A Cov A^T`` built column by column
        (``n_obs`` VJPs): ``-r^T u / 2 - log det M / 2`` with CG's ``u``.  Samples whose ``M`` is not
        positive definite (a learned Jacobian), or that took reconstruction guidance's step, take
        reconstruction guidance's twist ``N(y; A D, Sigma_y + sigma_t^2/alpha_t^2 I)``."""
        B, n = r.shape[0], _numel(r.shape[1:])
        cols = []
        for j in range(n):
            e = torch.zeros((B, n), dtype=r.dtype, device=r.device)
            e[:, j] = 1
            cols.append(matvec(e.reshape(r.shape))[0].flatten(1))
        M = torch.stack(cols, 2)
        M = 0.5 * (M + M.transpose(1, 2))
        L, info = torch.linalg.cholesky_ex(M)
        bad = first | (info != 0)
        logdet = 2 * torch.log(torch.diagonal(L, dim1=1, dim2=2).where(~bad[:, None], torch.ones_like(M[:, 0])).abs()).sum(1)
        v_rec = var + rec_var
        rec = (-0.5 * (r * r / v_rec + torch.log(v_rec))).flatten(1).sum(1)
        return torch.where(bad, rec, -0.5 * _dot(r, u) - 0.5 * logdet).detach()


#: :class:`MMPS`'s overshoot test: an update whose sigma_y-weighted fit ``||A delta||`` exceeds this
#: factor times ``||y - A D||`` (<= 1 for a PSD covariance, exactly) falls back to reconstruction guidance;
#: the margin leaves truncated CG's iterates, which need not obey the bound exactly, alone
OVERSHOOT = 1.5


def _cg(matvec, b: torch.Tensor, iters: int, tol: float, radius: torch.Tensor | None = None):
    """Solve ``M x = b`` for each sample of the batch by conjugate gradients, safeguarded for an ``M``
    that should be ``Sigma_y + P`` with ``P`` symmetric positive semi-definite but may not be.

    ``matvec(p)`` returns ``(M p, Sigma_y p)``.  At most ``iters`` products; CG ends when every sample
    has its residual below ``tol`` times its right-hand side (those below it iterate on meanwhile, as
    in plain CG).  A sample stops -- Steihaug's truncated CG -- and keeps its last iterate when the direction ``p`` has negative curvature under ``P``
    (``p^T P p < -sqrt(eps) ||p|| ||P p||``, far beyond rounding for a PSD ``P``) or when the next
    iterate would leave ``||x|| <= radius`` (``(B,)``, ``inf`` for none).  For SPD ``M`` within the
    radius none of this triggers and the iterates are plain CG's, bit for bit.

    Returns ``(x, products, negative, at_first, radius_hit)``: the ``(B,)`` booleans say which samples
    met negative curvature, which met it at the first iteration (``x`` is then 0) and which stopped
    at the radius."""
    B = b.shape[0]
    x = torch.zeros_like(b)
    r = b.clone()
    p = r.clone()
    rs = _dot(r, r)
    stop = (tol * tol) * rs
    rel = math.sqrt(torch.finfo(b.dtype).eps)  # far above the rounding of p^T P p for a PSD P
    tiny = torch.finfo(b.dtype).tiny
    active = torch.ones(B, dtype=torch.bool, device=b.device)
    negative = torch.zeros_like(active)
    at_first = torch.zeros_like(active)
    hit = torch.zeros_like(active)
    if radius is None:
        radius = torch.full((B,), math.inf, dtype=b.dtype, device=b.device)
    n = 0
    for n in range(1, iters + 1):
        if not bool((active & (rs > stop)).any()):  # converged samples iterate on while others do, as plain CG
            return x, n - 1, negative, at_first, hit
        Ap, noise = matvec(p)
        Pp = Ap - noise
        bad = active & (_dot(p, Pp) < -rel * _dot(p, p).sqrt() * _dot(Pp, Pp).sqrt())
        negative, active = negative | bad, active & ~bad
        if n == 1:
            at_first = bad
        pAp = _dot(p, Ap)
        ok = active & (pAp > tiny)  # else p ~ 0 (or sigma_y = 0 and P singular along p): no step
        alpha = torch.where(ok, rs / pAp.where(ok, torch.ones_like(pAp)), torch.zeros_like(pAp))
        x_new = x + bcast(alpha, x) * p
        out = ok & (_dot(x_new, x_new).sqrt() > radius)
        hit, active = hit | out, active & ~out
        step = bcast(torch.where(out, torch.zeros_like(alpha), alpha), x)
        x = x + step * p
        r = r - step * Ap
        rs_new = _dot(r, r)
        beta = torch.where(active & (rs > tiny), rs_new / rs.clamp_min(tiny), torch.zeros_like(rs))
        p = r + bcast(beta, r) * p
        rs = torch.where(active, rs_new, rs)
    return x, n, negative, at_first, hit


def dps(denoiser, obs: Observation, *, zeta: float = 1.0) -> DPS:
    """DPS (Chung et al. 2022): likelihood score ``-(zeta / ||r||) grad_{x_t} ||r||^2``, ``r = y - A(D(x_t))``.

    Returns the guided denoiser ``x_t, t -> D - (sigma_t^2/alpha_t) (zeta/||r||) grad_{x_t} ||r||^2``,
    an estimate of ``E[x0 | x_t, y]``.  Cost per call: 1 denoiser evaluation and 1 vector-Jacobian
    product through it.  Chung's adaptive step ``zeta / ||r||`` replaces ``1 / (2 sigma_y^2)``, so
    ``sigma_y`` is not used and ``zeta`` alone sets the strength; the approximation
    ``p(y | x_t) ~ p(y | D(x_t))`` ignores the denoiser's uncertainty and is biased (never exact).
    """
    return DPS(denoiser, obs, zeta=zeta)


def reconstruction(denoiser, obs: Observation, *, gamma: float = 1.0) -> Reconstruction:
    """Reconstruction guidance (Shysheya et al. 2024; SDA, Rozet & Louppe 2023).

    ``p(y | x_t) ~ N(y; A(D(x_t)), Sigma_y + gamma sigma_t^2/alpha_t^2 I)``, differentiated through the
    denoiser by autograd.  Returns the guided denoiser ``D + (sigma_t^2/alpha_t) grad_{x_t} log p(y | x_t)``,
    an estimate of ``E[x0 | x_t, y]``.  Cost per call: 1 denoiser evaluation and 1 vector-Jacobian
    product.  Exact only where ``A Cov[x0 | x_t] A^T = gamma sigma_t^2/alpha_t^2 I``: ``gamma = 1`` is the
    small-noise limit of the denoiser's variance (``sigma_t/alpha_t`` well below the data's scale) for
    operators with unit-norm rows (masks, index subsets); scale ``gamma`` by the squared row norm
    otherwise, or the guidance over-corrects at small noise (docs/assimilation.md).
    """
    return Reconstruction(denoiser, obs, gamma=gamma)


def mmps(denoiser, obs: Observation, *, cg_iters: int = 10, cg_tol: float = 1e-6) -> MMPS:
    """MMPS (Rozet et al. 2024): ``p(y | x_t) ~ N(y; A D, Sigma_y + A Cov[x0 | x_t] A^T)`` with the Tweedie
    covariance ``Cov[x0 | x_t] = (sigma_t^2/alpha_t) dD/dx_t``.

    Returns the guided denoiser ``D + Cov A^T u`` with ``(Sigma_y + A Cov A^T) u = y - A D`` solved by
    conjugate gradients, an estimate of ``E[x0 | x_t, y]`` -- exact for a Gaussian prior, a linear
    operator and the exact denoiser once CG has converged (at most ``n_obs`` iterations in exact
    arithmetic).  A nonlinear operator is linearised at ``D``.  Cost per call: 1 denoiser
    evaluation and ``k + 1`` vector-Jacobian products, ``k <= cg_iters`` the CG iterations run
    (CG stops early when the residual falls below ``cg_tol`` times the right-hand side).

    **Learned denoisers.**  CG assumes ``A Cov A^T`` symmetric positive semi-definite, which holds for
    the exact denoiser but not for a network's Jacobian: on a KS surrogate ``b^T (Sigma_y + A Cov A^T) b``
    was as low as ``-31.7 ||b||^2`` at the noisiest steps and plain CG's guidance reached 1e4-1e5
    (docs/bench/guidance.md).  The CG here is therefore Steihaug's truncated CG: it stops a sample
    and keeps its last iterate when a search direction has negative curvature under ``A Cov A^T``
    (beyond ``sqrt(eps)`` of rounding), or when the next iterate would leave the bound
    ``||u|| <= 2 ||r|| / min sigma_y^2`` that the solution obeys whenever ``A Cov A^T`` is PSD; a
    sample whose *first* direction has negative curvature (no usable iterate) gets reconstruction
    guidance's ``u = r / (sigma_y^2 + sigma_t^2/alpha_t^2)`` instead (``Cov ~ sigma_t^2/alpha_t^2 I``,
    the ``gamma = 1`` covariance).  This costs no extra Jacobian product, and on a symmetric PSD
    covariance (the exact Gaussian case) neither test can trigger: the result is plain CG's, bit for bit.
    Symmetrising the operator (``(J + J^T)/2``, one JVP more per product) was not chosen: the
    curvature ``p^T J p`` is the symmetric part's already, so it would cure no negative curvature.
    The guided denoiser counts the samples concerned (``.negative_curvature``, ``.fallbacks``,
    ``.radius_stops``) and warns once (a RuntimeWarning) at the first event.

    **The overshoot test.**  For a PSD covariance the update ``delta = Cov A^T u`` obeys
    ``||A delta|| <= ||y - A D||`` in the ``Sigma_y^-1``-weighted norm (``P (P + Sigma_y)^-1`` is a
    contraction there); a non-symmetric learned Jacobian can break it by orders of magnitude even when CG
    converged.  A sample whose update exceeds :data:`OVERSHOOT` times the bound takes reconstruction
    guidance's update (one more VJP, only then), counted in ``.overshoots`` and warned once; on a PSD
    covariance it cannot trigger (docs/assimilation.md has the measured before -> after).
    """
    return MMPS(denoiser, obs, cg_iters=cg_iters, cg_tol=cg_tol)


#: diffkit's own guidance methods, registered through the ``diffkit_guidance`` hook (:mod:`diffkit._builtins`)
BUILTIN_GUIDANCE = {"dps": dps, "reconstruction": reconstruction, "mmps": mmps}


@hookimpl
def diffkit_guidance():
    """diffkit's own guidance methods (:data:`BUILTIN_GUIDANCE`), registered as a built-in plugin."""
    return dict(BUILTIN_GUIDANCE)
