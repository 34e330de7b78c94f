"""Conditioning embedding shared by all backbones, and the input checks of the contract.

One vector per sample summarises everything that is not a field:

- the noise level ``c_noise`` (log-SNR, roughly -20..+20) through fixed sinusoidal
  features (Vaswani et al. 2017; as the timestep embedding of Ho et al. 2020) and an MLP;
- the scalar conditions through their own MLP, added to it;
- the class label through an embedding table with one extra row for the null label
  (classifier-free guidance, Ho & Salimans 2022), added as well.

Backbones inject the result with FiLM (Perez et al. 2018) or adaLN (Peebles & Xie 2023).
"""
from __future__ import annotations

import math

import torch
from torch import nn

from diffkit.errors import ShapeError
from diffkit.layout import Layout


def _is_compiling() -> bool:
    try:
        return torch.compiler.is_compiling()
    except AttributeError:  # pragma: no cover - old torch
        return False


def require_spatial_rank(layout: Layout, backbone: str) -> int:
    """The layout's number of spatial axes, which must be 1 to 3 for a convolutional or patch backbone."""
    nd = layout.ndim
    if nd == 0:
        raise ShapeError(f"{backbone} needs spatial axes but the layout describes vector data (ndim 0); "
                         "use the 'mlp' backbone")
    if nd > 3:
        raise ShapeError(f"{backbone} supports 1 to 3 spatial axes, the layout has {nd} {layout.spatial}; "
                         "merge axes into channels or a 3-D grid, or write a plugin backbone")
    return nd


def check_x(layout: Layout, x: torch.Tensor, backbone: str) -> None:
    """Raise :class:`ShapeError` unless ``x`` is ``(B, layout.in_channels, *spatial)`` (any sizes)."""
    want = 2 + layout.ndim
    if x.ndim != want:
        axes = "".join(", " + s for s in layout.spatial)
        raise ShapeError(
            f"{backbone}: x has rank {x.ndim} (shape {tuple(x.shape)}) but the layout expects rank {want}: "
            f"(batch, channel{axes})"
        )
    if x.shape[1] != layout.in_channels:
        detail = f"{layout.num_channels} data channels ({', '.join(layout.channels)})"
        if layout.cond_channels:
            detail += (f" + {len(layout.cond_channels)} conditioning fields ({', '.join(layout.cond_channels)}),"
                       " concatenated to x along dim 1")
        raise ShapeError(f"{backbone}: x has {x.shape[1]} channels but the layout expects {layout.in_channels}: {detail}")


class NoiseFeatures(nn.Module):
    """Sinusoidal features ``[cos(w c), sin(w c)]`` of the log-SNR ``c``.

    The angular frequencies ``w`` are geometric in ``[min_freq, max_freq]`` per unit of
    log-SNR: with the defaults the slowest feature is monotone over -20..+20 and the fastest
    resolves differences of about 0.05.
    """

    def __init__(self, dim: int = 256, *, min_freq: float = 1 / 32, max_freq: float = 32.0):
        super().__init__()
        if dim < 2 or dim % 2:
            raise ValueError(f"NoiseFeatures dim must be even and >= 2, got {dim}")
        freqs = torch.exp(torch.linspace(math.log(min_freq), math.log(max_freq), dim // 2))
        self.register_buffer("freqs", freqs, persistent=False)

    def forward(self, c: torch.Tensor) -> torch.Tensor:
        arg = c.float()[:, None] * self.freqs
        return torch.cat([arg.cos(), arg.sin()], dim=1)


class ConditionEmbedding(nn.Module):
    """``(c_noise, scalars, labels) -> (B, dim)``: the conditioning vector of a backbone.

    Also validates ``c_noise``, ``scalars`` and ``labels`` against the layout.  With
    ``validate=True`` the label range is checked too, which costs one host-device sync
    per call on an accelerator (skipped under ``torch.compile``).
    """

    def __init__(self, layout: Layout, dim: int, *, fourier_dim: int = 256, validate: bool = True,
                 backbone: str = "backbone"):
        super().__init__()
        self.layout = layout
        self.dim = dim
        self.validate = validate
        self.backbone = backbone
        self.fourier = NoiseFeatures(fourier_dim)
        self.noise_mlp = nn.Sequential(nn.Linear(fourier_dim, dim), nn.SiLU(), nn.Linear(dim, dim))
        self.num_scalars = len(layout.scalars)
        self.scalar_mlp = (
            nn.Sequential(nn.Linear(self.num_scalars, dim), nn.SiLU(), nn.Linear(dim, dim))
            if self.num_scalars else None
        )
        self.num_classes = layout.num_classes
        self.label_emb = nn.Embedding(self.num_classes + 1, dim) if self.num_classes else None

    # -- checks ------------------------------------------------------------------------
    def _check(self, batch, c_noise, scalars, labels):
        name, lay = self.backbone, self.layout
        if c_noise.ndim != 1 or c_noise.shape[0] != batch:
            raise ShapeError(f"{name}: c_noise must have shape ({batch},) (one log-SNR per sample), "
                             f"got {tuple(c_noise.shape)}")
        if not c_noise.is_floating_point():
            raise ShapeError(f"{name}: c_noise must be a float tensor (log-SNR), got {c_noise.dtype}")
        if self.num_scalars:
            if scalars is None:
                raise ShapeError(f"{name}: scalars missing: the layout declares {self.num_scalars} scalar "
                                 f"conditions {lay.scalars}; pass scalars of shape ({batch}, {self.num_scalars})")
            if scalars.ndim != 2 or tuple(scalars.shape) != (batch, self.num_scalars):
                raise ShapeError(f"{name}: scalars must have shape ({batch}, {self.num_scalars}) for "
                                 f"{lay.scalars}, got {tuple(scalars.shape)}")
        elif scalars is not None:
            raise ShapeError(f"{name}: scalars given (shape {tuple(scalars.shape)}) but the layout declares no "
                             "scalar conditions; pass scalars=None or add names to Layout.scalars")
        if labels is None:
            return
        if not self.num_classes:
            raise ShapeError(f"{name}: labels given but the layout is unconditional (num_classes=0); "
                             "pass labels=None or set Layout.num_classes")
        if labels.ndim != 1 or labels.shape[0] != batch:
            raise ShapeError(f"{name}: labels must have shape ({batch},), got {tuple(labels.shape)}")
        if labels.is_floating_point() or labels.is_complex() or labels.dtype == torch.bool:
            raise ShapeError(f"{name}: labels must be an integer tensor, got {labels.dtype}")
        if self.validate and not _is_compiling():
            if bool(((labels < 0) | (labels > self.num_classes)).any()):
                lo, hi = int(labels.min()), int(labels.max())
                raise ShapeError(f"{name}: labels range over [{lo}, {hi}] but must lie in [0, {self.num_classes}] "
                                 f"({self.num_classes} classes; label {self.num_classes} is the null label)")

    def forward(self, batch: int, c_noise: torch.Tensor, scalars: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if c_noise.ndim == 0:
            c_noise = c_noise.expand(batch)
        self._check(batch, c_noise, scalars, labels)
        wdtype = self.noise_mlp[0].weight.dtype
        emb = self.noise_mlp(self.fourier(c_noise).to(wdtype))
        if self.scalar_mlp is not None:
            emb = emb + self.scalar_mlp(scalars.to(wdtype))
        if self.label_emb is not None:
            if labels is None:
                labels = torch.full((batch,), self.num_classes, dtype=torch.long, device=emb.device)
            emb = emb + self.label_emb(labels)
        return emb
