"""diffkit's built-in generic backbones, registered through the ``diffkit`` entry-point group.

- ``unet``: N-D UNet (1-3 spatial axes), FiLM conditioning, circular padding on periodic axes;
- ``dit``: N-D Diffusion Transformer with adaLN-zero;
- ``mlp``: residual MLP for vector data.

All share :class:`~diffkit_backbones.embedding.ConditionEmbedding` (noise level, scalars and
class label into one vector) and the forward signature
``forward(x, c_noise, scalars=None, labels=None)`` of :func:`diffkit.hookspecs.diffkit_backbones`.
"""
from __future__ import annotations

from diffkit.hookspecs import hookimpl

from .dit import DiT, build_dit
from .embedding import ConditionEmbedding
from .mlp import ResMLP, build_mlp
from .unet import UNet, build_unet

__all__ = ["build_unet", "build_dit", "build_mlp", "UNet", "DiT", "ResMLP", "ConditionEmbedding",
           "diffkit_backbones"]


@hookimpl
def diffkit_backbones():
    return {"unet": build_unet, "dit": build_dit, "mlp": build_mlp}
