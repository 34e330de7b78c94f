"""``diffkit.sample``: sampling with the sampler given by name.

The samplers (:mod:`diffkit.samplers`) take sampler *functions*; this front end is where a name
(``"dpmpp_2m"``, a plugin's sampler) or a spec ``{"name": "ddim", "eta": 0.5}`` becomes one,
through :func:`diffkit.registry.resolve`, before :func:`diffkit.samplers.sample` runs it.  Every
caller that holds a name -- ``diffkit sample``, the trainer's snapshots, the rollout, the domain
plugins -- samples through here.

:func:`sample_posterior` is the same for the posterior of a single-state model given observations
(inpainting, super-resolution): one sampler run guided by :mod:`diffkit.guidance`.
"""
from __future__ import annotations

import functools

from . import registry
from . import samplers as _samplers
from .samplers import DEFAULT_SAMPLER

__all__ = ["sample", "sample_posterior", "posterior_sigma_min"]


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


def _layout_of(denoiser):
    """The layout of a denoiser, or of the denoiser a bound one wraps (None if neither has one)."""
    for d in (denoiser, getattr(denoiser, "denoiser", None)):
        lay = getattr(d, "layout", None)
        if lay is not None:
            return lay
    return None


def posterior_sigma_min(observation, floor: float = 1e-5) -> float:
    """The last noise level of a guided sampler run: the samplers' ``SIGMA_MIN`` (1e-3), or a tenth of
    the smallest positive sigma_y of ``observation`` (standardised units) where that is lower, not below
    ``floor``.  A run stopped at ``sigma_min`` keeps a fraction ``v / (v + sigma_min^2)`` of a posterior
    variance ``v`` (the samplers' docstring), and ``v`` can be as small as ``sigma_y^2 / 2``: 1e-3 shrank
    the spread of posterior std 0.0045 (prior std 0.01, sigma_y 0.005) by 4-6 %, this rule by < 1 %."""
    from .grids import SIGMA_MIN

    s = observation.sigma_y
    s = s[s > 0]
    if not s.numel():
        return SIGMA_MIN
    return float(min(SIGMA_MIN, max(floor, 0.1 * float(s.min()))))


def sample_posterior(denoiser, observation, shape=None, *, members: int = 1, method="mmps", layout=None,
                     sampler=DEFAULT_SAMPLER, nfe: int | None = None, seed: int | None = None, generator=None,
                     progress: bool = False, **kwargs):
    """Posterior samples of a single-state model given observations: ``members`` draws per observation.

    The prior is the model itself -- an unconditional denoiser, or one bound to its conditioning
    (``Denoiser.bind(cond)``: a class label, ...; its batch is then ``n * members``) -- and one sampler
    run, guided by the observations through a :mod:`diffkit.guidance` method, draws from
    ``p(x | y)`` (inpainting, super-resolution, any linear or differentiable observation operator).

    - ``observation``: a :class:`diffkit.guidance.Observation` of the *standardised* sample (``y`` of
      batch ``n``: ``n`` independent observations, each sampled ``members`` times).  Physical
      observations (a :class:`diffkit.observations.StepObservations` of an observation file) map into
      the model's space with :func:`diffkit.assimilate.model_space` (``(y - A(mean)) / std``, sigma_y
      likewise); this module does not import it (``diffkit.assimilate`` imports the window models,
      which sample through here).
    - ``shape``: one sample's shape ``(C, *spatial)`` (default: the ``sample_shape`` of ``layout`` or of
      the denoiser's layout).
    - ``method``: a guidance name (``"mmps"``, ``"reconstruction"``, ``"dps"`` or a plugin's), a spec
      ``{"name": "mmps", "cg_iters": 5}`` (resolved by :func:`diffkit.registry.resolve`), a callable
      ``guide(denoiser, observation) -> guided denoiser`` (e.g. :class:`diffkit.assimilate.Guide`), or
      None: samples of the prior (the observations are still checked), the reference an analysis is
      compared with.
    - ``sampler``, ``nfe`` (default 20), ``seed`` (or ``generator``), ``progress`` and other keyword
      arguments (``dtype``, ``device``, ``spacing``, ``sigma_max``, the sampler's options) are
      :func:`sample`'s.  ``sigma_min``, the noise level of the last denoiser call, defaults to
      :func:`posterior_sigma_min`: below the observations' noise, so a posterior narrower than the
      sampler's usual ``1e-3`` keeps its spread.

    Returns the standardised samples ``(n, members, *shape)`` (``layout.denormalize`` gives physical
    values).  With an exact denoiser of a Gaussian prior, a linear operator and ``method="mmps"`` they
    are samples of the exact Gaussian posterior (tests/test_sampling.py checks its mean and variance).
    """
    import torch

    from .guidance import Observation

    if isinstance(members, bool) or not isinstance(members, int) or members < 1:
        raise ValueError(f"members must be an integer >= 1, got {members!r}")
    if not isinstance(observation, Observation):
        hint = (": map physical StepObservations with diffkit.assimilate.model_space(step, layout) first"
                if type(observation).__name__ == "StepObservations" else "")
        raise TypeError(f"observation must be a diffkit.guidance.Observation of the standardised sample, got "
                        f"{type(observation).__name__}{hint}")
    if shape is None:
        layout = layout if layout is not None else _layout_of(denoiser)
        if layout is None:
            raise TypeError("give shape = (C, *spatial): the denoiser has no layout to take it from")
        shape = layout.sample_shape
    shape = tuple(int(s) for s in shape)
    n = int(observation.y.shape[0])
    if method is None:
        model = denoiser
    else:
        guide = registry.resolve("guidance", method) if isinstance(method, (str, dict)) else method
        if not callable(guide):
            raise TypeError(f"method must be a guidance name, a spec {{'name': ..., **options}}, a callable "
                            f"guide(denoiser, observation) or None, got {type(method).__name__}")
        model = guide(denoiser, observation)
    if method is not None and kwargs.get("sigma_min") is None:
        kwargs["sigma_min"] = posterior_sigma_min(observation)
    if generator is None and seed is not None:
        generator = torch.Generator(device=kwargs.get("device") or "cpu").manual_seed(int(seed))
    if nfe is not None:
        kwargs["nfe"] = nfe
    x = sample(model, (n * members, *shape), sampler=sampler, generator=generator, progress=progress, **kwargs)
    return x.reshape(n, members, *shape)
