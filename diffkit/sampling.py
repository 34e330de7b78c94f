"""``diffkit.sample``: sampling with the sampler given by name.

The samplers (:mod:`diffkit.samplers`) take sampler *functions*; this front end is where a name
(``"dpmpp_2m"``, a plugin's sampler) or a spec ``{"name": "ddim", "eta": 0.5}`` becomes one,
through :func:`diffkit.registry.resolve`, before :func:`diffkit.samplers.sample` runs it.  Every
caller that holds a name -- ``diffkit sample``, the trainer's snapshots, the rollout, the domain
plugins -- samples through here.
"""
from __future__ import annotations

import functools

from . import registry
from . import samplers as _samplers
from .samplers import DEFAULT_SAMPLER

__all__ = ["sample"]


@functools.wraps(_samplers.sample, assigned=("__module__", "__name__", "__qualname__"))
def sample(denoiser, shape, *, sampler=DEFAULT_SAMPLER, **kwargs):
    """Draw samples of ``shape = (B, C, *spatial)`` with exactly ``nfe`` denoiser calls.

    ``sampler`` is a registered name (default ``"dpmpp_2m"``), a spec ``{"name": ..., **options}``
    or a sampler function, resolved by :func:`diffkit.registry.resolve` (an unknown name is an
    :class:`~diffkit.errors.UnknownComponentError` listing the installed samplers).  Every other
    argument is :func:`diffkit.samplers.sample`'s: ``nfe`` (default 20), ``spacing``, ``generator``,
    ``device``, ``dtype``, ``x_init``, ``extra_args``, ``progress``, ``callback``, ``t_max``,
    ``sigma_min``, ``sigma_max`` and the sampler's options (``eta``, ``churn``, ...).
    """
    return _samplers.sample(denoiser, shape, sampler=registry.resolve("sampler", sampler), **kwargs)
