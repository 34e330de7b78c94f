"""diffkit: denoising diffusion probabilistic models for scientific data of any shape.

The engine follows Turner et al. (2024), "Denoising Diffusion Probabilistic Models in Six
Simple Steps" (arXiv:2402.04384).  ``import diffkit`` stays light: it never imports xarray
or netCDF4; domain plugins load them when used.
"""
from . import registry
from ._shape import append_dims, bcast, check_finite
from .analytic import GaussianDenoiser, GaussianMixtureDenoiser
from .denoiser import BoundDenoiser, Cond, Denoiser, Regressor
from .errors import (ConfigError, DiffkitError, NonFiniteError, PluginError, ShapeError,
                     UnknownComponentError)
from .hookspecs import hookimpl, hookspec
from .layout import AutoregressiveSpec, Layout
from .losses import diffusion_loss
from .metrics import sliced_wasserstein
from .process import posterior, posterior_sample, q_sample
from .registry import PluginWarning, get_schedule
from .samplers import sampler_info, timesteps
from .sampling import sample
from .schedules import Schedule, cosine, from_alpha_bar, linear, sigmoid

__version__ = "0.1.0"

__all__ = [
    "AutoregressiveSpec", "BoundDenoiser", "Cond", "ConfigError", "Denoiser", "DiffkitError", "GaussianDenoiser",
    "GaussianMixtureDenoiser", "Layout", "NonFiniteError", "PluginError", "PluginWarning", "Regressor", "Schedule",
    "ShapeError", "UnknownComponentError", "append_dims", "bcast", "check_finite", "cosine",
    "diffusion_loss", "from_alpha_bar", "get_schedule", "hookimpl", "hookspec", "linear", "posterior",
    "posterior_sample", "q_sample", "registry", "sample", "sampler_info", "sigmoid", "sliced_wasserstein",
    "timesteps", "__version__",
]
