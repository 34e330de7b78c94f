"""Rank-generic building blocks shared by the backbones.

Everything here works for 1, 2 or 3 spatial axes and honours the layout's periodic axes:
convolutions pad circularly along periodic axes and with zeros elsewhere, and the
pad-to-a-multiple helper used by the UNet and DiT wraps periodic axes as well.
"""
from __future__ import annotations

from typing import Sequence

import torch
import torch.nn.functional as F
from torch import nn

from diffkit._shape import append_dims
from diffkit.errors import ConfigError

CONV = {1: nn.Conv1d, 2: nn.Conv2d, 3: nn.Conv3d}


def conv_nd(ndim: int, *args, **kwargs) -> nn.Module:
    """``nn.Conv1d``/``Conv2d``/``Conv3d`` for ``ndim`` spatial axes."""
    try:
        return CONV[ndim](*args, **kwargs)
    except KeyError:
        raise ConfigError(f"convolutions support 1 to 3 spatial axes, not {ndim}") from None


def as_tuple(v, n: int, what: str) -> tuple[int, ...]:
    """An int or a length-``n`` sequence of ints as a length-``n`` tuple of positive ints."""
    t = (int(v),) * n if isinstance(v, int) else tuple(int(s) for s in v)
    if len(t) != n or any(s < 1 for s in t):
        raise ConfigError(f"{what} must be a positive int or {n} positive ints (one per spatial axis), got {v!r}")
    return t


def zero_init(m: nn.Module) -> nn.Module:
    """Zero the weight and bias of ``m`` (output layers of a denoiser start as the zero map)."""
    for p in m.parameters():
        nn.init.zeros_(p)
    return m


def norm_groups(channels: int, groups: int) -> int:
    """The largest divisor of ``channels`` that is at most ``groups``."""
    g = max(1, min(groups, channels))
    while channels % g:
        g -= 1
    return g


class GroupNorm32(nn.GroupNorm):
    """GroupNorm computed in float32 and cast back (safe under bf16/fp16)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.group_norm(x.float(), self.num_groups, w, b, self.eps).to(x.dtype)


def group_norm_act(x: torch.Tensor, num_groups: int, weight: torch.Tensor | None, bias: torch.Tensor | None,
                   eps: float, scale: torch.Tensor | None = None, shift: torch.Tensor | None = None,
                   silu: bool = True) -> torch.Tensor:
    """``silu(group_norm(x) * (1 + scale) + shift)`` in float32, cast back to ``x.dtype`` once.

    ``scale`` and ``shift`` (FiLM, optional) are ``(B, C)``.  One chain of float32 element-wise
    ops after the group statistics, which ``torch.compile`` emits as a single kernel (the
    statistics and the normalise-modulate-activate pass; checked for inductor's CPU code in
    tests/test_backbones_fastpaths.py); in float32 it is exactly the unfused
    ``F.silu(F.group_norm(x, ...) * (1 + scale) + shift)``, under bf16/fp16 it rounds once
    instead of after each op.
    """
    w = None if weight is None else weight.float()
    b = None if bias is None else bias.float()
    h = F.group_norm(x.float(), num_groups, w, b, eps)
    if scale is not None:
        h = h * (1 + append_dims(scale.float(), h.ndim))
    if shift is not None:
        h = h + append_dims(shift.float(), h.ndim)
    return (F.silu(h) if silu else h).to(x.dtype)


class GroupNormSiLU(nn.GroupNorm):
    """Fused ``SiLU(GroupNorm(x))`` (optionally FiLM-modulated in between), float32 inside.

    The same parameters (and state-dict keys) as :class:`GroupNorm32`, so a checkpoint loads
    into either; ``forward(x, scale=None, shift=None)`` is :func:`group_norm_act`.
    """

    def forward(self, x: torch.Tensor, scale: torch.Tensor | None = None,
                shift: torch.Tensor | None = None) -> torch.Tensor:
        return group_norm_act(x, self.num_groups, self.weight, self.bias, self.eps, scale, shift)


class LayerNorm32(nn.LayerNorm):
    """LayerNorm over the last dim computed in float32 and cast back."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        w = None if self.weight is None else self.weight.float()
        b = None if self.bias is None else self.bias.float()
        return F.layer_norm(x.float(), self.normalized_shape, w, b, self.eps).to(x.dtype)


def _fpad(pairs: Sequence[tuple[int, int]]) -> tuple[int, ...]:
    """Per-axis ``(before, after)`` pairs in axis order -> ``F.pad``'s last-axis-first tuple."""
    out: list[int] = []
    for lo, hi in reversed(pairs):
        out += [lo, hi]
    return tuple(out)


class AxisPad(nn.Module):
    """Fixed padding of the spatial axes: circular on periodic axes, zeros elsewhere.

    The zero padding is applied first, so the corners of a cylinder (periodic x bounded)
    are the wrapped zero rows, as they should be.
    """

    def __init__(self, pairs: Sequence[tuple[int, int]], periodic: Sequence[bool]):
        super().__init__()
        zero = [(0, 0) if p else lh for lh, p in zip(pairs, periodic)]
        circ = [lh if p else (0, 0) for lh, p in zip(pairs, periodic)]
        self.zero = _fpad(zero) if any(map(any, zero)) else None
        self.circ = _fpad(circ) if any(map(any, circ)) else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.zero is not None:
            x = F.pad(x, self.zero)
        if self.circ is not None:
            x = F.pad(x, self.circ, mode="circular")
        return x

    def extra_repr(self) -> str:
        return f"zero={self.zero}, circular={self.circ}"


class PadConv(nn.Module):
    """N-D convolution with 'same' padding: circular on periodic axes, zeros elsewhere.

    With an odd kernel the zero padding is the convolution's own (``padding=kernel // 2`` on
    bounded axes, which spares a padded copy of the input and its backward) and only the
    periodic axes are padded beforehand by :class:`AxisPad`; the values seen by the kernel are
    those of :class:`AxisPad` on all axes (its corners of a cylinder are zeros either way).  An
    even kernel pads asymmetrically, all by :class:`AxisPad` with ``padding=0`` in the conv.
    With ``stride=2`` and an even input size ``n`` the output has size ``n // 2``.
    """

    def __init__(self, ndim: int, cin: int, cout: int, kernel: int = 3, *, stride: int = 1,
                 periodic: Sequence[bool] = ()):
        super().__init__()
        periodic = tuple(periodic) or (False,) * ndim
        pairs = [(kernel // 2, (kernel - 1) // 2)] * ndim
        if kernel % 2:
            self.pad = AxisPad([lh if p else (0, 0) for lh, p in zip(pairs, periodic)], periodic)
            padding = tuple(0 if p else lo for (lo, _), p in zip(pairs, periodic))
        else:
            self.pad = AxisPad(pairs, periodic)
            padding = 0
        self.conv = conv_nd(ndim, cin, cout, kernel, stride=stride, padding=padding)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.conv(self.pad(x))


def pad_to_multiple(x: torch.Tensor, multiple: Sequence[int], periodic: Sequence[bool]):
    """Pad the spatial axes of ``x`` to multiples of ``multiple`` (split evenly before/after).

    Periodic axes are padded by wrapping (any amount), other axes with zeros.  Returns the
    padded tensor and the index that crops a same-sized output back, or ``None`` when no
    padding was needed.
    """
    sizes = x.shape[2:]
    pairs = []
    for n, m in zip(sizes, multiple):
        extra = -n % m
        pairs.append((extra // 2, extra - extra // 2))
    if not any(map(any, pairs)):
        return x, None
    for d, ((lo, hi), p) in enumerate(zip(pairs, periodic)):
        if p and (lo or hi):
            n = sizes[d]
            idx = torch.arange(-lo, n + hi, device=x.device) % n
            x = x.index_select(2 + d, idx)
    zero = [(0, 0) if p else lh for lh, p in zip(pairs, periodic)]
    if any(map(any, zero)):
        x = F.pad(x, _fpad(zero))
    crop = (slice(None), slice(None)) + tuple(slice(lo, lo + n) for (lo, _), n in zip(pairs, sizes))
    return x, crop
