"""diffkit's own schedules, samplers and metrics, registered through the public hooks."""
from .hookspecs import hookimpl


@hookimpl
def diffkit_schedules():
    from . import schedules as S

    return {"linear": S.linear, "cosine": S.cosine, "sigmoid": S.sigmoid, "alpha_bar": S.from_alpha_bar,
            "refiner": S.refiner}


@hookimpl
def diffkit_samplers():
    from .samplers import BUILTIN_SAMPLERS

    return dict(BUILTIN_SAMPLERS)


@hookimpl
def diffkit_metrics():
    from .metrics import BUILTIN_METRICS

    return dict(BUILTIN_METRICS)


@hookimpl
def diffkit_adapters():
    from .adapters import MixtureAdapter

    return {"mixture": MixtureAdapter}


@hookimpl
def diffkit_commands():
    from .quickstart import register

    return {"quickstart": register}
