"""N-D UNet (Ronneberger et al. 2015) in the diffusion form of Ho et al. 2020 (DDPM).

Residual blocks with GroupNorm, SiLU and FiLM conditioning (Perez et al. 2018; the
"scale-shift norm" of Nichol & Dhariwal 2021), self-attention at chosen resolutions and in
the middle, stride-2 convolutions down and nearest-neighbour upsampling plus a
convolution up.  Every convolution pads circularly along the layout's periodic axes and with
zeros elsewhere, so the network is exactly equivariant to shifts of a periodic axis by
multiples of its total stride ``2 ** (len(channel_mult) - 1)`` (when the axis size is a
multiple of the stride).  Inputs whose sizes are not multiples of that stride are padded
(wrapping periodic axes) and the output cropped back.
"""
from __future__ import annotations

import warnings
from typing import Sequence

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from diffkit._shape import append_dims
from diffkit.errors import ConfigError
from diffkit.layout import Layout

from .embedding import ConditionEmbedding, check_x, require_spatial_rank
from .layers import GroupNorm32, GroupNormSiLU, PadConv, conv_nd, norm_groups, pad_to_multiple, zero_init


class ResBlock(nn.Module):
    """GroupNorm-SiLU-conv, FiLM from the embedding, GroupNorm-SiLU-dropout-conv, plus skip.

    With ``fused=True`` the norms are :class:`GroupNormSiLU` (norm, FiLM and SiLU in one float32
    pass); the parameters are the same either way.
    """

    def __init__(self, ndim, cin, cout, emb_dim, *, periodic, groups, dropout, fused=False):
        super().__init__()
        norm = GroupNormSiLU if fused else GroupNorm32
        self.fused = fused
        self.norm1 = norm(norm_groups(cin, groups), cin)
        self.conv1 = PadConv(ndim, cin, cout, 3, periodic=periodic)
        self.film = nn.Linear(emb_dim, 2 * cout)
        self.norm2 = norm(norm_groups(cout, groups), cout)
        self.drop = nn.Dropout(dropout)
        self.conv2 = PadConv(ndim, cout, cout, 3, periodic=periodic)
        self.skip = conv_nd(ndim, cin, cout, 1) if cin != cout else nn.Identity()

    def forward(self, x, emb):
        scale, shift = self.film(emb).chunk(2, dim=1)
        if self.fused:
            h = self.conv1(self.norm1(x))
            h = self.norm2(h, scale, shift)
        else:
            h = self.conv1(F.silu(self.norm1(x)))
            h = F.silu(self.norm2(h) * (1 + append_dims(scale, h.ndim)) + append_dims(shift, h.ndim))
        h = self.conv2(self.drop(h))
        return self.skip(x) + h


class SelfAttention(nn.Module):
    """Multi-head self-attention over all spatial positions (flattened), residual."""

    def __init__(self, channels, *, num_heads, groups):
        super().__init__()
        if channels % num_heads:
            raise ConfigError(f"unet: {channels} channels are not divisible by num_heads={num_heads}")
        self.num_heads = num_heads
        self.norm = GroupNorm32(norm_groups(channels, groups), channels)
        self.qkv = nn.Linear(channels, 3 * channels)
        self.proj = nn.Linear(channels, channels)

    def forward(self, x):
        h = rearrange(self.norm(x), "b c ... -> b (...) c")
        q, k, v = rearrange(self.qkv(h), "b n (three h d) -> three b h n d", three=3, h=self.num_heads)
        o = F.scaled_dot_product_attention(q, k, v)
        o = self.proj(rearrange(o, "b h n d -> b n (h d)"))
        return x + rearrange(o, "b n c -> b c n").reshape(x.shape)


class ResAttn(nn.Module):
    """A residual block optionally followed by self-attention."""

    def __init__(self, res: ResBlock, attn: SelfAttention | None, takes_skip: bool = False):
        super().__init__()
        self.res = res
        self.attn = attn
        self.takes_skip = takes_skip

    def forward(self, x, emb):
        x = self.res(x, emb)
        return x if self.attn is None else self.attn(x)


class Downsample(nn.Module):
    """Stride-2 padded 3-convolution."""

    takes_skip = False

    def __init__(self, ndim, channels, *, periodic):
        super().__init__()
        self.conv = PadConv(ndim, channels, channels, 3, stride=2, periodic=periodic)

    def forward(self, x, emb=None):
        return self.conv(x)


class Upsample(nn.Module):
    """Nearest-neighbour 2x upsampling followed by a padded 3-convolution."""

    takes_skip = False

    def __init__(self, ndim, channels, *, periodic):
        super().__init__()
        self.conv = PadConv(ndim, channels, channels, 3, periodic=periodic)

    def forward(self, x, emb=None):
        return self.conv(F.interpolate(x, scale_factor=2.0, mode="nearest"))


class UNet(nn.Module):
    """N-D diffusion UNet; see :func:`build_unet` for the options."""

    def __init__(self, layout: Layout, *, channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2, 2),
                 num_res_blocks: int = 2, attn_levels: Sequence[int] | None = None, mid_attn: bool = True,
                 num_heads: int = 4, dropout: float = 0.0, groups: int = 32, out_channels: int | None = None,
                 validate: bool = True, channels_last: bool = False, fused_norm_act: bool = False):
        super().__init__()
        nd = require_spatial_rank(layout, "unet")
        if channels_last and nd == 1:
            raise ConfigError("unet: channels_last needs 2 or 3 spatial axes (there is no channels-last memory "
                              "format for 1-D convolutions); set channels_last = false for this layout")
        channel_mult = tuple(int(m) for m in channel_mult)
        if not channel_mult or min(channel_mult) < 1:
            raise ConfigError(f"unet: channel_mult must be a non-empty sequence of positive ints, got {channel_mult}")
        if channels < 1 or num_res_blocks < 1:
            raise ConfigError("unet: channels and num_res_blocks must be >= 1")
        levels = len(channel_mult)
        attn_levels = tuple(range(2, levels)) if attn_levels is None else tuple(int(a) for a in attn_levels)
        bad = [a for a in attn_levels if not 0 <= a < levels]
        if bad:
            raise ConfigError(f"unet: attn_levels {bad} out of range: there are {levels} levels (0..{levels - 1})")
        self.layout = layout
        self.out_channels = int(out_channels or layout.num_channels)
        self.stride = (2 ** (levels - 1),) * nd
        per = layout.periodic_mask
        odd = [a for a, n, p in zip(layout.spatial, layout.shape, per) if p and n % self.stride[0]]
        if odd:
            warnings.warn(
                f"unet: periodic axes {odd} of sizes not divisible by the total stride {self.stride[0]} are "
                "padded by wrapping and cropped, so periodicity is only approximate there; use fewer levels "
                "(shorter channel_mult) or sizes divisible by the stride for exact periodic equivariance",
                stacklevel=3,
            )

        emb_dim = 4 * channels
        self.embed = ConditionEmbedding(layout, emb_dim, validate=validate, backbone="unet")
        kw = dict(periodic=per, groups=groups, dropout=dropout, fused=bool(fused_norm_act))

        def attn(c, on):
            return SelfAttention(c, num_heads=num_heads, groups=groups) if on else None

        self.conv_in = PadConv(nd, layout.in_channels, channels, 3, periodic=per)
        skips, cur = [channels], channels
        self.down = nn.ModuleList()
        for i, mult in enumerate(channel_mult):
            for _ in range(num_res_blocks):
                self.down.append(ResAttn(ResBlock(nd, cur, channels * mult, emb_dim, **kw),
                                         attn(channels * mult, i in attn_levels)))
                cur = channels * mult
                skips.append(cur)
            if i < levels - 1:
                self.down.append(Downsample(nd, cur, periodic=per))
                skips.append(cur)
        self.mid = nn.ModuleList([
            ResAttn(ResBlock(nd, cur, cur, emb_dim, **kw), attn(cur, mid_attn)),
            ResAttn(ResBlock(nd, cur, cur, emb_dim, **kw), None),
        ])
        self.up = nn.ModuleList()
        for i, mult in reversed(list(enumerate(channel_mult))):
            for _ in range(num_res_blocks + 1):
                self.up.append(ResAttn(ResBlock(nd, cur + skips.pop(), channels * mult, emb_dim, **kw),
                                       attn(channels * mult, i in attn_levels), takes_skip=True))
                cur = channels * mult
            if i > 0:
                self.up.append(Upsample(nd, cur, periodic=per))
        self.fused = bool(fused_norm_act)
        self.norm_out = (GroupNormSiLU if self.fused else GroupNorm32)(norm_groups(cur, groups), cur)
        self.conv_out = zero_init(PadConv(nd, cur, self.out_channels, 3, periodic=per))
        self.channels_last = bool(channels_last)
        self.memory_format = ({2: torch.channels_last, 3: torch.channels_last_3d}[nd] if channels_last
                              else torch.contiguous_format)
        if channels_last:
            self.to(memory_format=self.memory_format)  # the 4-D/5-D conv weights; 1-D/2-D tensors are unchanged

    def forward(self, x: torch.Tensor, c_noise: torch.Tensor, scalars: torch.Tensor | None = None,
                labels: torch.Tensor | None = None) -> torch.Tensor:
        check_x(self.layout, x, "unet")
        emb = F.silu(self.embed(x.shape[0], c_noise, scalars, labels))
        x, crop = pad_to_multiple(x, self.stride, self.layout.periodic_mask)
        cl = self.channels_last
        if cl:
            x = x.contiguous(memory_format=self.memory_format)
        h = self.conv_in(x)
        hs = [h]
        for m in self.down:
            h = m(h, emb)
            hs.append(h)
        for m in self.mid:
            h = m(h, emb)
        for m in self.up:
            if m.takes_skip:
                h = torch.cat([h, hs.pop()], dim=1)
            h = m(h, emb)
        out = self.conv_out(self.norm_out(h) if self.fused else F.silu(self.norm_out(h)))
        out = out if crop is None else out[crop]
        return out.contiguous() if cl else out  # callers get the usual layout back (a copy of C_out channels)


def build_unet(layout: Layout, *, channels: int = 64, channel_mult: Sequence[int] = (1, 2, 2, 2),
               num_res_blocks: int = 2, attn_levels: Sequence[int] | None = None, mid_attn: bool = True,
               num_heads: int = 4, dropout: float = 0.0, groups: int = 32, out_channels: int | None = None,
               validate: bool = True, channels_last: bool = False, fused_norm_act: bool = False) -> UNet:
    """N-D UNet (1-3 spatial axes) with FiLM conditioning and circular padding on periodic axes.

    Ronneberger et al. 2015, in the diffusion form of Ho et al. 2020; conditioning by FiLM
    (Perez et al. 2018).  Any spatial sizes work (odd, non-square): inputs are padded to a
    multiple of the total stride and the output is cropped back.

    Options:

    - ``channels`` (64): base width; level ``i`` has ``channels * channel_mult[i]`` channels
      and the conditioning vector has ``4 * channels``.
    - ``channel_mult`` ((1, 2, 2, 2)): width multipliers, one per resolution level; the
      total downsampling stride is ``2 ** (len(channel_mult) - 1)``.
    - ``num_res_blocks`` (2): residual blocks per level on the way down (one more up).
    - ``attn_levels`` (None = levels 2 and deeper): levels with self-attention after each
      residual block; ``()`` for none.  Attention cost grows with the square of the number
      of grid points at that level.
    - ``mid_attn`` (True): self-attention in the middle block.
    - ``num_heads`` (4): attention heads (must divide the width of attended levels).
    - ``dropout`` (0.0): dropout inside residual blocks (DDPM used 0.1 on CIFAR-10).
    - ``groups`` (32): GroupNorm groups (the largest divisor of the width up to this).
    - ``out_channels`` (None = ``layout.num_channels``): output channels.
    - ``validate`` (True): check label ranges (one host sync per call on an accelerator).
    - ``channels_last`` (False): run the convolutions in channels-last memory format (2-D:
      ``torch.channels_last``, 3-D: ``channels_last_3d``; not for 1-D): the weights are stored
      so and the input converted on entry, the output returned contiguous.  Usually faster on
      GPUs with tensor cores (cuDNN's NHWC kernels, bf16/fp16); the same outputs and
      gradients within float rounding.
    - ``fused_norm_act`` (False): every GroupNorm followed by SiLU (and the FiLM between them
      in residual blocks) is one float32 pass, :class:`~diffkit_backbones.layers.GroupNormSiLU`,
      fused into one kernel by ``torch.compile``; in float32 it computes exactly what the
      unfused path does, under bf16 autocast it rounds once instead of after each op.  Same
      parameters, so checkpoints load either way.

    ``build_unet(layout, channels=128, channel_mult=(1, 2, 2, 2), num_res_blocks=2,
    attn_levels=(1,), dropout=0.1)`` is the DDPM CIFAR-10 network (35.7M parameters in
    diffusers' ``UNet2DModel``); for a 3x32x32 layout it has 38.4M parameters here (+7.5%:
    FiLM projects the embedding to a scale and a shift where DDPM adds a bias only).
    """
    return UNet(layout, channels=channels, channel_mult=channel_mult, num_res_blocks=num_res_blocks,
                attn_levels=attn_levels, mid_attn=mid_attn, num_heads=num_heads, dropout=dropout,
                groups=groups, out_channels=out_channels, validate=validate, channels_last=channels_last,
                fused_norm_act=fused_norm_act)
