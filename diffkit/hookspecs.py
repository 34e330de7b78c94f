"""Hook specifications: how a plugin adds components to diffkit.

A plugin is any module or object carrying functions marked with :data:`hookimpl` whose
names match the specs below.  Installed plugins are found through the ``diffkit``
entry-point group::

    # pyproject.toml of a plugin package
    [project.entry-points.diffkit]
    my_domain = "my_domain_package"

    # my_domain_package/__init__.py
    from diffkit import hookimpl

    @hookimpl
    def diffkit_backbones():
        return {"my_net": build_my_net}

Every registration hook returns a ``dict`` mapping a component name to the object that
provides it.  diffkit merges the dicts of all plugins; two plugins giving the same name
is an error naming both.  The first paragraph of each object's docstring is its description in
``diffkit plugins``.  diffkit's own schedules, samplers, metrics and backbones register
through these same hooks.
"""
from __future__ import annotations

import pluggy

hookspec = pluggy.HookspecMarker("diffkit")
hookimpl = pluggy.HookimplMarker("diffkit")


@hookspec
def diffkit_backbones() -> dict:
    """Register denoiser backbones: ``{name: factory}``.

    ``factory(layout: Layout, **options) -> torch.nn.Module``.  The module's forward is
    ``forward(x, c_noise, scalars=None, labels=None) -> Tensor`` where

    - ``x`` has shape ``(B, layout.in_channels, *spatial)`` (data plus conditioning fields);
    - ``c_noise`` has shape ``(B,)``: the log signal-to-noise ratio of the noise level;
    - ``scalars`` is ``None`` or ``(B, len(layout.scalars))``, embedded by FiLM;
    - ``labels`` is ``None`` or a ``(B,)`` long tensor in ``[0, layout.num_classes]``, where
      ``num_classes`` is the null label used by classifier-free guidance;

    and the output has shape ``(B, out_channels, *spatial)`` with ``out_channels`` given as
    an option (default ``layout.num_channels``).  Backbones must pad circularly along
    ``layout.periodic`` axes.  Options must be keyword arguments with defaults, so that
    configs can name them.
    """


@hookspec
def diffkit_adapters() -> dict:
    """Register data adapters: ``{name: adapter_class}``.

    An adapter turns a domain's files into torch Datasets of standardised tensors and
    declares their :class:`~diffkit.layout.Layout`; its decoder turns samples back into the
    domain's format (netCDF, PNG, ...).  Subclass :class:`diffkit.adapters.Adapter`:

    - ``adapter_class(**options)``: the trainer passes ``data.options`` as keywords;
    - ``.layout``: the :class:`~diffkit.layout.Layout` of the items, with ``mean`` and ``std``;
    - ``dataset(split)``: a torch Dataset for ``"train"`` or ``"val"`` whose items are dicts
      ``{"x": (C, *shape), "fields": ..., "scalars": ..., "label": ..., "weight": ...}`` (see
      :mod:`diffkit.adapters`);
    - classmethod ``decode(x, layout, path, *, attrs=None, labels=None)``: writes standardised
      samples ``(N, *layout.sample_shape)`` to ``path`` in the domain's format from the layout
      alone (a checkpoint is enough) and returns the path.

    :func:`diffkit.testing.check_adapter` checks all of it.  See ``docs/plugins.md``.
    """


@hookspec
def diffkit_schedules() -> dict:
    """Register noise schedules: ``{name: factory}``, ``factory(**options) -> Schedule``.

    A :class:`~diffkit.schedules.Schedule` defines ``log_alpha_bar(t)`` for continuous
    ``t`` in ``[0, 1]`` with ``alpha_bar(0) = 1``; everything else (SNR, AR(1)
    coefficients, posteriors) derives from it.
    """


@hookspec
def diffkit_samplers() -> dict:
    """Register samplers: ``{name: function}``.

    Every sampler has the signature
    ``sampler(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, **options) -> Tensor``,
    is decorated with :func:`diffkit.samplers.sampler_info` to declare its order, whether it
    is stochastic and how many denoiser calls a grid costs, and keeps any multistep history
    in local variables.
    """


@hookspec
def diffkit_guidance() -> dict:
    """Register guidance methods for sampling from observations: ``{name: method}``.

    ``method(denoiser, obs: Observation, **options) -> guided denoiser``, where ``obs`` is a
    :class:`diffkit.guidance.Observation` (operator, values ``y``, noise std ``sigma_y``) and the
    guided denoiser follows the denoiser contract -- ``guided(x_t, t, **extra_args) -> x0`` (an
    estimate of ``E[x0 | x_t, y]``) with the wrapped denoiser's ``schedule`` -- so every sampler
    uses it unchanged.  Options are keywords with defaults.  See :mod:`diffkit.guidance`.
    """


@hookspec
def diffkit_metrics() -> dict:
    """Register metrics: ``{name: function}``.

    ``fn(*tensors, **options) -> Tensor``: tensors in (for example a prediction and the truth),
    tensors out; options are keywords with defaults.  Names are global across plugins, so a
    plugin's metrics carry its prefix (``weather_rmse``, ``pde_nrmse``); diffkit's own ensemble
    metrics are ``ensemble_*``.

    Ensemble metrics that score a forecast with a member dim, one value per remaining index, are
    marked with :func:`diffkit.ensemble.ensemble_metric` (``fn.kind == "ensemble"``,
    ``fn.min_members``) and take
    ``fn(forecast, truth, *, member_dim=0, weights=None, mask=None, dims=None, sample_dims=(), **options) -> Tensor``:
    weights and mask broadcast to the forecast without its member dim (the layout), ``dims`` are
    the layout dims averaged with the weights, ``sample_dims`` those averaged after with equal
    weight (see :mod:`diffkit.ensemble`).  Consumers call every registered one
    (:func:`diffkit.ensemble.registered`) without knowing it: ``diffkit evaluate`` adds a column
    per metric, the ``diffkit rollout`` dataset a variable per step.
    """


@hookspec
def diffkit_commands() -> dict:
    """Register command-line commands: ``{"name" or "group name": register}``.

    ``register(parser: argparse.ArgumentParser) -> None`` adds the command's arguments and
    sets ``parser.set_defaults(func=run)`` with ``run(args) -> int``.  A name with a space
    mounts the command under a group shared by all plugins: ``"data pde"`` becomes
    ``diffkit data pde ...`` beside another plugin's ``diffkit data weather ...``.  The first
    paragraph of ``register``'s docstring is the command's help line.  Import heavy modules
    inside ``run``, not at registration: every ``diffkit`` invocation registers all commands.
    Failures inside ``run`` are reported by the CLI as one line naming the command.
    """


@hookspec
def diffkit_quickstarts() -> dict:
    """Register sections of ``diffkit quickstart``: ``{name: run}``.

    ``run(out: pathlib.Path, *, seed: int = 0, progress: bool = True) -> diffkit.quickstart.Section``
    runs the domain's main job on built-in data with no configuration -- simulate or load data,
    train a small model, sample or forecast with it, score it -- in about a minute on 2 CPU cores,
    writes its outputs (netCDF, PNG) under ``out`` (a folder of its own) and returns the
    :class:`~diffkit.quickstart.Section` of the report: a title, a paragraph, a table of metrics
    and the files it wrote.  Import heavy modules inside ``run``.
    """


@hookspec
def diffkit_evaluators() -> dict:
    """Register evaluators of ``diffkit evaluate``: ``{name: Evaluator subclass}``.

    A subclass of :class:`diffkit.evaluation.Evaluator` with the class methods
    ``can_evaluate(ds) -> bool`` (whether it scores the forecast file, opened lazily as an
    :class:`xarray.Dataset`: decide from dims and attributes), ``add_arguments(group)`` (its
    ``--options``, in a group "NAME evaluator options"; giving one while another evaluator runs is
    an error) and ``run(args) -> int`` (score ``args.forecast`` against ``args.truth``, write into
    ``args.out``, print a summary).  The command asks the plugins' evaluators first and diffkit's
    generic ``ensemble`` one last; two plugin evaluators that claim one file are an error asking
    for ``--evaluator NAME``.  Subclass :class:`diffkit.evaluation.EnsembleEvaluator` to reuse its
    scoring and override only ``truth`` (the slice of the truth to score against).  See
    :mod:`diffkit.evaluation`.
    """
