"""The ``tsconv`` backbone: a small residual 1-D convolutional network with FiLM conditioning.

What every diffkit backbone does (the contract of ``diffkit_backbones`` in diffkit/hookspecs.py):

- ``build_tsconv(layout, **options)`` returns a :class:`torch.nn.Module`; every option is a
  keyword with a default, so that a config can set it (``model.options = {hidden = 64}``);
- ``forward(x, c_noise, scalars=None, labels=None)`` takes ``x`` of shape
  ``(B, layout.in_channels, L)`` (the noisy sample with any conditioning fields concatenated as
  channels) and ``c_noise`` of shape ``(B,)``, the log signal-to-noise ratio of the noise level,
  and returns ``(B, out_channels, L)``;
- scalar conditions and class labels, where the layout declares them, enter through the same
  conditioning vector as the noise level;
- a wrong channel count or rank raises :class:`diffkit.ShapeError`;
- periodic axes (``layout.periodic``) are padded circularly, all others with zeros;
- samples are processed independently (no batch statistics: GroupNorm, not BatchNorm).

The conditioning follows Turner et al.'s step 4 ("one network for every t, conditioned on t by
FiLM"): sinusoidal features of the log-SNR go through a small MLP to a vector ``emb``, and every
block scales and shifts its normalised activations by ``Linear(emb)`` (Perez et al. 2018).
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from diffkit import Layout, ShapeError


class NoiseEmbedding(nn.Module):
    """``c_noise (B,) -> (B, dim)``: sinusoidal features of the log-SNR, then an MLP."""

    def __init__(self, dim: int, n_features: int = 32):
        super().__init__()
        # frequencies from 1/16 to 16 per unit of log-SNR: slow ones see the range (about -20..20),
        # fast ones resolve nearby noise levels
        self.register_buffer("freqs", torch.exp(torch.linspace(math.log(1 / 16), math.log(16.0), n_features // 2)),
                             persistent=False)
        self.mlp = nn.Sequential(nn.Linear(n_features, dim), nn.SiLU(), nn.Linear(dim, dim))

    def forward(self, c_noise: torch.Tensor) -> torch.Tensor:
        arg = c_noise.float()[:, None] * self.freqs
        return self.mlp(torch.cat([arg.cos(), arg.sin()], dim=1))


class Block(nn.Module):
    """GroupNorm, FiLM from the conditioning vector, SiLU, dilated convolution; residual."""

    def __init__(self, width: int, emb_dim: int, kernel_size: int, dilation: int, padding_mode: str):
        super().__init__()
        self.norm = nn.GroupNorm(1, width, affine=False)
        self.film = nn.Linear(emb_dim, 2 * width)
        self.conv = nn.Conv1d(width, width, kernel_size, dilation=dilation, padding=dilation * (kernel_size // 2),
                              padding_mode=padding_mode)

    def forward(self, h: torch.Tensor, emb: torch.Tensor) -> torch.Tensor:
        scale, shift = self.film(emb)[..., None].chunk(2, dim=1)
        return h + self.conv(F.silu(self.norm(h) * (1 + scale) + shift))


class TimeSeriesConvNet(nn.Module):
    """A stack of dilated residual 1-D convolutions; see :func:`build_tsconv`."""

    def __init__(self, layout: Layout, *, hidden: int = 64, depth: int = 4, kernel_size: int = 3,
                 out_channels: int | None = None):
        super().__init__()
        if layout.ndim != 1:
            raise ShapeError(f"tsconv needs exactly one spatial axis (time), but the layout has {layout.ndim}: "
                             f"{layout.spatial}; use the 'unet' backbone for fields")
        if hidden < 1 or depth < 1 or kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"tsconv: hidden and depth must be >= 1 and kernel_size odd, got hidden={hidden}, "
                             f"depth={depth}, kernel_size={kernel_size}")
        self.layout = layout
        mode = "circular" if layout.periodic else "zeros"
        self.inp = nn.Conv1d(layout.in_channels, hidden, kernel_size, padding=kernel_size // 2, padding_mode=mode)
        self.noise = NoiseEmbedding(hidden)
        self.scalars = nn.Linear(len(layout.scalars), hidden) if layout.scalars else None
        self.labels = nn.Embedding(layout.num_classes + 1, hidden) if layout.num_classes else None  # + null label
        self.blocks = nn.ModuleList(Block(hidden, hidden, kernel_size, 2 ** (i % 4), mode) for i in range(depth))
        self.norm = nn.GroupNorm(1, hidden)
        self.out = nn.Conv1d(hidden, out_channels or layout.num_channels, 1)
        nn.init.zeros_(self.out.weight)  # start as "predict zero": a common choice for diffusion backbones
        nn.init.zeros_(self.out.bias)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, scalars: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        if x.ndim != 3 or x.shape[1] != self.layout.in_channels:
            raise ShapeError(f"tsconv: x has shape {tuple(x.shape)}; expected (batch, {self.layout.in_channels}, "
                             f"time): channels {self.layout.channels + self.layout.cond_channels}")
        emb = self.noise(c_noise.expand(x.shape[0]))
        if self.scalars is not None:
            if scalars is None:
                raise ShapeError(f"tsconv: the layout declares scalars {self.layout.scalars} but none were given")
            emb = emb + self.scalars(scalars.float())
        if self.labels is not None and labels is not None:
            emb = emb + self.labels(labels)
        emb = F.silu(emb)
        h = self.inp(x)
        for block in self.blocks:
            h = block(h, emb)
        return self.out(F.silu(self.norm(h)))


def build_tsconv(layout: Layout, *, hidden: int = 64, depth: int = 4, kernel_size: int = 3,
                 out_channels: int | None = None) -> TimeSeriesConvNet:
    """Residual 1-D conv net with FiLM on the noise level, for time-series windows (one spatial axis).

    Options: ``hidden`` (64): channels inside the network and size of the conditioning vector;
    ``depth`` (4): residual blocks, with dilations 1, 2, 4, 8, 1, 2, ... (four blocks of kernel 3
    see 31 steps); ``kernel_size`` (3, odd); ``out_channels`` (default ``layout.num_channels``).
    """
    return TimeSeriesConvNet(layout, hidden=hidden, depth=depth, kernel_size=kernel_size, out_channels=out_channels)
