"""N-D Diffusion Transformer (DiT, Peebles & Xie 2023) with adaLN-zero conditioning.

The input is cut into non-overlapping patches by a strided convolution (1-3 spatial
axes), tokens get a fixed sinusoidal N-D positional embedding computed from the patch grid,
and transformer blocks are modulated by the conditioning vector (noise level + scalars +
label) through adaptive LayerNorm whose shift, scale and gate start at zero, so each block
starts as the identity.  A final adaLN layer and a linear map unpatchify to the output.
Sizes that are not multiples of the patch size are padded (wrapping periodic axes) and the
output is cropped back.
"""
from __future__ import annotations

import math
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diffkit.errors import ConfigError
from diffkit.layout import Layout

from .embedding import ConditionEmbedding, check_x, require_spatial_rank
from .layers import LayerNorm32, as_tuple, conv_nd, pad_to_multiple, zero_init


def sincos_pos_embed(dim: int, grid: Sequence[int], device=None) -> torch.Tensor:
    """Fixed N-D sine-cosine positional embedding ``(prod(grid), dim)`` in row-major token order.

    Each axis gets an equal, even share of ``dim`` (sines and cosines of the integer grid
    index at frequencies ``10000 ** (-k / half)``, as in ViT/MAE/DiT); leftover dims are 0.
    """
    nd = len(grid)
    per = 2 * (dim // (2 * nd))
    if per == 0:
        raise ConfigError(f"dit: hidden={dim} is too small for a positional embedding of {nd} axes")
    half = per // 2
    omega = 1.0 / 10000 ** (torch.arange(half, dtype=torch.float64, device=device) / half)
    coords = torch.meshgrid(*[torch.arange(g, dtype=torch.float64, device=device) for g in grid], indexing="ij")
    parts = []
    for c in coords:
        a = c.reshape(-1, 1) * omega
        parts += [a.sin(), a.cos()]
    emb = torch.cat(parts, dim=1)
    emb = F.pad(emb, (0, dim - emb.shape[1]))
    return emb.float()


class DiTBlock(nn.Module):
    """Pre-norm transformer block with adaLN-zero: ``x + gate * f(LN(x) * (1 + scale) + shift)``."""

    def __init__(self, dim: int, num_heads: int, mlp_ratio: float):
        super().__init__()
        self.num_heads = num_heads
        self.norm1 = LayerNorm32(dim, elementwise_affine=False, eps=1e-6)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)
        self.norm2 = LayerNorm32(dim, elementwise_affine=False, eps=1e-6)
        hid = int(dim * mlp_ratio)
        self.mlp = nn.Sequential(nn.Linear(dim, hid), nn.GELU(approximate="tanh"), nn.Linear(hid, dim))
        self.ada = nn.Linear(dim, 6 * dim)

    def attention(self, h):
        q, k, v = rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        o = F.scaled_dot_product_attention(q, k, v)
        return self.proj(rearrange(o, "b h n d -> b n (h d)"))

    def forward(self, x, c):
        sh1, sc1, g1, sh2, sc2, g2 = self.ada(c)[:, None].chunk(6, dim=-1)
        x = x + g1 * self.attention(self.norm1(x) * (1 + sc1) + sh1)
        return x + g2 * self.mlp(self.norm2(x) * (1 + sc2) + sh2)


class FinalLayer(nn.Module):
    """adaLN (shift, scale) then a linear map from a token to its patch's values."""

    def __init__(self, dim: int, out: int):
        super().__init__()
        self.norm = LayerNorm32(dim, elementwise_affine=False, eps=1e-6)
        self.ada = nn.Linear(dim, 2 * dim)
        self.linear = nn.Linear(dim, out)

    def forward(self, x, c):
        shift, scale = self.ada(c)[:, None].chunk(2, dim=-1)
        return self.linear(self.norm(x) * (1 + scale) + shift)


class DiT(nn.Module):
    """N-D Diffusion Transformer; see :func:`build_dit` for the options."""

    def __init__(self, layout: Layout, *, patch_size: int | Sequence[int] = 2, hidden: int = 384,
                 depth: int = 12, num_heads: int = 6, mlp_ratio: float = 4.0, out_channels: int | None = None,
                 validate: bool = True):
        super().__init__()
        nd = require_spatial_rank(layout, "dit")
        if hidden % num_heads:
            raise ConfigError(f"dit: hidden={hidden} is not divisible by num_heads={num_heads}")
        if depth < 1:
            raise ConfigError(f"dit: depth must be >= 1, got {depth}")
        self.layout = layout
        self.patch = as_tuple(patch_size, nd, "dit: patch_size")
        self.out_channels = int(out_channels or layout.num_channels)
        self.hidden = hidden
        self.embed = ConditionEmbedding(layout, hidden, validate=validate, backbone="dit")
        self.patch_embed = conv_nd(nd, layout.in_channels, hidden, self.patch, stride=self.patch)
        self.blocks = nn.ModuleList([DiTBlock(hidden, num_heads, mlp_ratio) for _ in range(depth)])
        self.final = FinalLayer(hidden, math.prod(self.patch) * self.out_channels)
        self.grid = tuple(-(-n // p) for n, p in zip(layout.shape, self.patch))
        self.register_buffer("pos", sincos_pos_embed(hidden, self.grid), persistent=False)
        g = [f"g{i}" for i in range(nd)]
        p = [f"p{i}" for i in range(nd)]
        self._unpatch = (f"b ({' '.join(g)}) ({' '.join(p)} c) -> b c "
                         + " ".join(f"({gi} {pi})" for gi, pi in zip(g, p)))
        self._init_weights()

    def _init_weights(self):
        for m in self.modules():
            if isinstance(m, nn.Linear):
                nn.init.xavier_uniform_(m.weight)
                nn.init.zeros_(m.bias)
        w = self.patch_embed.weight
        nn.init.xavier_uniform_(w.view(w.shape[0], -1))
        nn.init.zeros_(self.patch_embed.bias)
        for m in self.embed.modules():
            if isinstance(m, (nn.Linear, nn.Embedding)):
                nn.init.normal_(m.weight, std=0.02)
        for blk in self.blocks:
            zero_init(blk.ada)
        zero_init(self.final.ada)
        zero_init(self.final.linear)

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, scalars: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        check_x(self.layout, x, "dit")
        c = F.silu(self.embed(x.shape[0], c_noise, scalars, labels))
        x, crop = pad_to_multiple(x, self.patch, self.layout.periodic_mask)
        h = self.patch_embed(x)
        grid = tuple(h.shape[2:])
        pos = self.pos if grid == self.grid else sincos_pos_embed(self.hidden, grid, h.device)
        tok = rearrange(h, "b d ... -> b (...) d") + pos.to(h.dtype)
        for blk in self.blocks:
            tok = blk(tok, c)
        tok = self.final(tok, c)
        sizes = {f"g{i}": g for i, g in enumerate(grid)} | {f"p{i}": p for i, p in enumerate(self.patch)}
        out = rearrange(tok, self._unpatch, **sizes)
        return out if crop is None else out[crop]


def build_dit(layout: Layout, *, patch_size: int | Sequence[int] = 2, hidden: int = 384, depth: int = 12,
              num_heads: int = 6, mlp_ratio: float = 4.0, out_channels: int | None = None,
              validate: bool = True) -> DiT:
    """N-D Diffusion Transformer (1-3 spatial axes) with adaLN-zero conditioning.

    Peebles & Xie 2023.  The defaults are DiT-S (hidden 384, depth 12, 6 heads) with
    patch size 2.  Positional embeddings make the network position-aware, so unlike the
    UNet it is not shift-equivariant along periodic axes; periodic axes are still padded by
    wrapping when the size is not a multiple of the patch size.

    Options:

    - ``patch_size`` (2): patch edge, an int or one int per spatial axis; sizes that are not
      multiples are padded and the output cropped back.
    - ``hidden`` (384): token width; also the width of the conditioning vector.
    - ``depth`` (12): number of transformer blocks.
    - ``num_heads`` (6): attention heads (must divide ``hidden``).
    - ``mlp_ratio`` (4.0): width of the block MLPs relative to ``hidden``.
    - ``out_channels`` (None = ``layout.num_channels``): output channels.
    - ``validate`` (True): check label ranges (one host sync per call on an accelerator).
    """
    return DiT(layout, patch_size=patch_size, hidden=hidden, depth=depth, num_heads=num_heads,
               mlp_ratio=mlp_ratio, out_channels=out_channels, validate=validate)
