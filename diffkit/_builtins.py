"""diffkit's own plugins, as pytest's ``default_plugins``: the modules whose hook implementations
register diffkit's schedules, samplers, guidance methods, metrics, adapter, commands and evaluator.

The registry (:mod:`diffkit.registry`) loads each of them as an entry point of the ``diffkit``
group named after its module, through the same path as an installed plugin; the components they
register are listed under the plugin ``diffkit``.  This module imports nothing, so the registry
that reads it imports none of the component modules until discovery runs.
"""

#: the modules of diffkit's built-in plugins (each defines ``@hookimpl`` functions)
BUILTIN_PLUGINS = (
    "diffkit.schedules",   # diffkit_schedules: linear, cosine, sigmoid, alpha_bar, refiner
    "diffkit.samplers",    # diffkit_samplers: ddpm, ddim, dpmpp_2m, dpmpp_2s, dpmpp_3m, euler, heun, unipc
    "diffkit.guidance",    # diffkit_guidance: dps, reconstruction, mmps
    "diffkit.metrics",     # diffkit_metrics: sliced_wasserstein and the ensemble_* scores
    "diffkit.adapters",    # diffkit_adapters: mixture
    "diffkit.quickstart",  # diffkit_commands: quickstart
    "diffkit.evaluation",  # diffkit_evaluators: ensemble (diffkit evaluate's generic evaluator)
)
