"""diffkit-timeseries: a diffkit plugin for multivariate time series, and the template to copy.

It adds one new domain through diffkit's public hooks only:

- the ``timeseries`` adapter (:class:`~diffkit_timeseries.adapter.TimeSeriesAdapter`): windows of
  ``window`` time steps over C named channels, from a CSV or netCDF file or from a built-in,
  seeded Lorenz-96 series; decodes samples to CSV or netCDF;
- the ``tsconv`` backbone (:func:`~diffkit_timeseries.backbone.build_tsconv`): a small residual
  1-D convolutional network, conditioned on the noise level by FiLM.

diffkit finds this module through the entry point in ``pyproject.toml``
(``[project.entry-points.diffkit] timeseries = "diffkit_timeseries"``) and calls the functions
marked ``@hookimpl`` below.  Each returns ``{name: object}``; the first paragraph of the
object's docstring is its description in ``diffkit plugins``.  The imports sit inside the hooks
so that discovering plugins (every ``diffkit`` command does) stays cheap.
"""
from __future__ import annotations

from diffkit import hookimpl

__version__ = "0.1.0"


@hookimpl
def diffkit_adapters():
    from .adapter import TimeSeriesAdapter

    return {"timeseries": TimeSeriesAdapter}


@hookimpl
def diffkit_backbones():
    from .backbone import build_tsconv

    return {"tsconv": build_tsconv}
