"""Helpers of the backbone tests (issue 16: shared by test_backbones.py and
test_backbones_<module>.py, not copied): tiny sizes of each backbone, a layout of any rank, random
inputs for a layout, and random values for zero-initialised weights."""
from __future__ import annotations

import math

import torch

from diffkit.layout import Layout


TINY_UNET = dict(channels=8, channel_mult=(1, 2, 2), num_res_blocks=1, num_heads=2, groups=4)


TINY_DIT = dict(hidden=24, depth=2, num_heads=2)


TINY_MLP = dict(hidden=32, depth=2)


def _layout(shape, *, periodic=(), cond=(), scalars=(), num_classes=0, channels=("u", "v")):
    spatial = ("x", "y", "z")[: len(shape)]
    return Layout(channels=channels, spatial=spatial, shape=shape, periodic=periodic,
                  cond_channels=cond, scalars=scalars, num_classes=num_classes)


def _randomize_zero_init(model: torch.nn.Module) -> None:
    """Give zero-initialised weight matrices random values, so outputs and gradients are non-trivial."""
    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not p.any():
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))


def _inputs(layout, batch=2, shape=None):
    x = torch.randn(batch, layout.in_channels, *(layout.shape if shape is None else shape))
    c = torch.linspace(-15, 15, batch)
    s = torch.randn(batch, len(layout.scalars)) if layout.scalars else None
    y = torch.arange(batch) % (layout.num_classes + 1) if layout.num_classes else None
    return x, c, s, y
