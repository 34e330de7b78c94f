"""Residual MLP for vector data (``layout.ndim == 0``, ``x`` of shape ``(B, C)``).

Pre-norm residual blocks ``x + W2 drop(SiLU(W1 SiLU(FiLM(LN(x)))))`` whose LayerNorm output is
scaled and shifted by the conditioning vector (FiLM, Perez et al. 2018).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from diffkit.errors import ConfigError, ShapeError
from diffkit.layout import Layout

from .embedding import ConditionEmbedding, check_x
from .layers import LayerNorm32, zero_init


class MLPBlock(nn.Module):
    """LayerNorm, FiLM, SiLU-Linear-SiLU-dropout-Linear, residual."""

    def __init__(self, dim: int, emb_dim: int, dropout: float):
        super().__init__()
        self.norm = LayerNorm32(dim, elementwise_affine=False)
        self.film = nn.Linear(emb_dim, 2 * dim)
        self.fc1 = nn.Linear(dim, dim)
        self.fc2 = nn.Linear(dim, dim)
        self.drop = nn.Dropout(dropout)

    def forward(self, x, emb):
        scale, shift = self.film(emb).chunk(2, dim=1)
        h = self.norm(x) * (1 + scale) + shift
        h = self.fc1(F.silu(h))
        return x + self.fc2(self.drop(F.silu(h)))


class ResMLP(nn.Module):
    """Residual MLP for vector data; see :func:`build_mlp` for the options."""

    def __init__(self, layout: Layout, *, hidden: int = 256, depth: int = 4, dropout: float = 0.0,
                 out_channels: int | None = None, validate: bool = True):
        super().__init__()
        if layout.ndim:
            raise ShapeError(f"mlp is for vector data (no spatial axes) but the layout has spatial axes "
                             f"{layout.spatial}; use the 'unet' or 'dit' backbone")
        if hidden < 1 or depth < 0:
            raise ConfigError(f"mlp: hidden must be >= 1 and depth >= 0, got hidden={hidden}, depth={depth}")
        self.layout = layout
        self.out_channels = int(out_channels or layout.num_channels)
        self.embed = ConditionEmbedding(layout, hidden, validate=validate, backbone="mlp")
        self.inp = nn.Linear(layout.in_channels, hidden)
        self.blocks = nn.ModuleList([MLPBlock(hidden, hidden, dropout) for _ in range(depth)])
        self.norm_out = LayerNorm32(hidden)
        self.out = zero_init(nn.Linear(hidden, self.out_channels))

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, scalars: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        check_x(self.layout, x, "mlp")
        emb = F.silu(self.embed(x.shape[0], c_noise, scalars, labels))
        h = self.inp(x)
        for blk in self.blocks:
            h = blk(h, emb)
        return self.out(F.silu(self.norm_out(h)))


def build_mlp(layout: Layout, *, hidden: int = 256, depth: int = 4, dropout: float = 0.0,
              out_channels: int | None = None, validate: bool = True) -> ResMLP:
    """Residual MLP with FiLM conditioning for vector data (layouts without spatial axes).

    Perez et al. 2018 (FiLM).  ``x`` has shape ``(B, layout.in_channels)``.

    Options:

    - ``hidden`` (256): width of the residual stream and of the conditioning vector.
    - ``depth`` (4): number of residual blocks.
    - ``dropout`` (0.0): dropout inside the blocks.
    - ``out_channels`` (None = ``layout.num_channels``): output width.
    - ``validate`` (True): check label ranges (one host sync per call on an accelerator).
    """
    return ResMLP(layout, hidden=hidden, depth=depth, dropout=dropout, out_channels=out_channels,
                  validate=validate)
