"""Shape helpers: the only place where per-sample scalars meet tensors of any rank.

Following k-diffusion's ``append_dims``, the core never writes ``reshape(-1, 1, 1, 1)``:
every per-sample quantity of shape ``(B,)`` is broadcast against ``(B, C, *spatial)``
(or any other rank) with :func:`append_dims`.
"""
from __future__ import annotations

import torch

from .errors import NonFiniteError, ShapeError


def append_dims(v: torch.Tensor, ndim: int) -> torch.Tensor:
    """Append trailing singleton dims to ``v`` until it has ``ndim`` dims.

    ``v`` of shape ``(B,)`` becomes ``(B, 1, ..., 1)`` so that it broadcasts against a
    tensor of rank ``ndim``.  A 0-d tensor is returned unchanged (it broadcasts anyway).
    """
    if v.ndim == 0:
        return v
    extra = ndim - v.ndim
    if extra < 0:
        raise ShapeError(f"append_dims: tensor has {v.ndim} dims, more than the target {ndim}")
    return v[(...,) + (None,) * extra]


def bcast(v: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Broadcast a per-sample tensor ``v`` of shape ``(B,)`` or ``()`` against ``like``,
    casting to ``like``'s dtype and device."""
    return append_dims(v.to(device=like.device, dtype=like.dtype), like.ndim)


def as_batch_time(t, batch: int, *, device=None, dtype=torch.float64) -> torch.Tensor:
    """Turn a float, 0-d or ``(B,)`` tensor of times into a ``(B,)`` tensor."""
    t = torch.as_tensor(t, dtype=dtype, device=device)
    if t.ndim == 0:
        t = t.expand(batch)
    if t.ndim != 1 or t.shape[0] != batch:
        raise ShapeError(f"time must be a scalar or have shape ({batch},), got {tuple(t.shape)}")
    return t


def check_finite(x: torch.Tensor, what: str = "input") -> torch.Tensor:
    """Raise :class:`NonFiniteError` if ``x`` holds NaN or inf."""
    if x.is_floating_point() and not bool(torch.isfinite(x).all()):
        n_nan = int(torch.isnan(x).sum())
        n_inf = int(torch.isinf(x).sum())
        raise NonFiniteError(
            f"{what} holds {n_nan} NaN and {n_inf} inf values (shape {tuple(x.shape)}); "
            "fill or mask missing values before passing data to diffkit "
            "(adapters turn missing values into loss weights of 0)"
        )
    return x


def reduce_per_sample(err: torch.Tensor, weight: torch.Tensor | None = None) -> torch.Tensor:
    """Weighted mean of ``err`` over every dim but the first: ``sum(w*err)/sum(w)``.

    ``weight`` broadcasts against ``err`` (for example area weights of shape ``spatial`` or a
    mask of shape ``(B, C, *spatial)``).  Samples whose weights are all zero give 0.
    """
    w = None if weight is None else torch.broadcast_to(weight.to(err.dtype), err.shape)
    if err.ndim == 1:  # one value per sample: the reduction is the identity
        err = err[:, None]
        w = None if w is None else w[:, None]
    dims = tuple(range(1, err.ndim))
    if w is None:
        return err.mean(dim=dims)
    return (w * err).sum(dim=dims) / w.sum(dim=dims).clamp_min(torch.finfo(err.dtype).tiny)
