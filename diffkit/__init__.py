"""diffkit: denoising diffusion probabilistic models for scientific data of any shape.

The engine follows Turner et al. (2024), "Denoising Diffusion Probabilistic Models in Six
Simple Steps" (arXiv:2402.04384).  ``import diffkit`` stays light: it imports neither torch, xarray
nor netCDF4 (names load lazily on first use); domain plugins load what they need when used.
"""
import importlib
import importlib.util

#: public name -> the submodule that defines it (PEP 562 lazy attributes: ``import diffkit`` and
#: ``import diffkit.config`` load neither torch nor a plugin; the first use of a name imports its module)
_LAZY = {
    "append_dims": "_shape", "bcast": "_shape", "check_finite": "_shape",
    "GaussianDenoiser": "analytic", "GaussianMixtureDenoiser": "analytic",
    "BoundDenoiser": "denoiser", "Cond": "denoiser", "Denoiser": "denoiser", "Regressor": "denoiser",
    "ConfigError": "errors", "DiffkitError": "errors", "NonFiniteError": "errors", "PluginError": "errors",
    "ShapeError": "errors", "UnknownComponentError": "errors",
    "hookimpl": "hookspecs", "hookspec": "hookspecs",
    "AutoregressiveSpec": "layout", "Layout": "layout",
    "diffusion_loss": "losses", "sliced_wasserstein": "metrics",
    "posterior": "process", "posterior_sample": "process", "q_sample": "process",
    "PluginWarning": "registry", "get_schedule": "registry",
    "sampler_info": "samplers", "timesteps": "samplers", "sample": "sampling",
    "Schedule": "schedules", "cosine": "schedules", "from_alpha_bar": "schedules", "linear": "schedules",
    "sigmoid": "schedules",
}


def __getattr__(name: str):
    if name in _LAZY:
        value = getattr(importlib.import_module(f".{_LAZY[name]}", __name__), name)
    elif not name.startswith("__") and importlib.util.find_spec(f"{__name__}.{name}") is not None:
        value = importlib.import_module(f".{name}", __name__)  # a submodule: diffkit.samplers, diffkit.registry...
    else:
        raise AttributeError(f"module 'diffkit' has no attribute {name!r}")
    globals()[name] = value  # later lookups are plain attribute reads
    return value


def __dir__():
    return sorted(set(globals()) | set(__all__))


__version__ = "0.1.0"

__all__ = [
    "AutoregressiveSpec", "BoundDenoiser", "Cond", "ConfigError", "Denoiser", "DiffkitError", "GaussianDenoiser",
    "GaussianMixtureDenoiser", "Layout", "NonFiniteError", "PluginError", "PluginWarning", "Regressor", "Schedule",
    "ShapeError", "UnknownComponentError", "append_dims", "bcast", "check_finite", "cosine",
    "diffusion_loss", "from_alpha_bar", "get_schedule", "hookimpl", "hookspec", "linear", "posterior",
    "posterior_sample", "q_sample", "registry", "sample", "sampler_info", "sigmoid", "sliced_wasserstein",
    "timesteps", "__version__",
]
