"""Torch-free constants shared by the samplers and the configuration schema.

:mod:`diffkit.config` validates ``[sample]`` against these without importing torch or
:mod:`diffkit.samplers`; the samplers import them from here (a test checks that the names of
the built-in samplers match ``diffkit.samplers.BUILTIN_SAMPLERS``).
"""
from __future__ import annotations

__all__ = ["BUILTIN_SAMPLER_NAMES", "MAX_NFE", "SPACINGS"]

#: the time-grid spacings of :func:`diffkit.samplers.timesteps`
SPACINGS = ("uniform", "quadratic", "karras", "logsnr")

#: the largest NFE :func:`diffkit.samplers.sample` takes: its time grid (NFE + 1 float64 times, with the
#: schedule's coefficients) is built in memory, and every built-in spacing stays strictly decreasing up
#: to here (checked on the cosine, linear and sigmoid schedules); a million denoiser calls is far beyond
#: any sampler's convergence (dpmpp_2m is within 2 % at 20)
MAX_NFE = 1_000_000

#: the samplers diffkit.samplers defines (``sample.sampler`` takes these without a registry look-up)
BUILTIN_SAMPLER_NAMES = ("ddpm", "ddim", "dpmpp_2m", "dpmpp_2s", "dpmpp_3m", "euler", "heun", "unipc")
