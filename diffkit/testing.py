"""Contract checks for plugin authors, usable with or without pytest.

A plugin's own test suite calls these on its components; each check raises
:class:`AssertionError` with a message naming the broken rule, and returns nothing useful
otherwise (``check_backbone`` returns the model it built)::

    from diffkit.testing import check_adapter, check_backbone, check_plugin_registers
    import my_plugin

    def test_contract():
        check_plugin_registers(my_plugin, entry_point="my_plugin")   # entry_point: once installed
        check_backbone(my_plugin.build_net, Layout(channels=("t",), spatial=("x",), shape=(16,)))
        check_adapter(my_plugin.MyAdapter, path="tiny.nc")

With diffkit installed, pytest also gets two fixtures from this module (through the
``pytest11`` entry point, like tox's and datasette's plugin fixtures):

- ``diffkit_registry``: :mod:`diffkit.registry`, refreshed before and after the test, with
  plugins registered by hand during the test removed again;
- ``diffkit_check``: an object with the ``check_*`` functions as attributes
  (``check_plugin_registers``, ``check_adapter``, ``check_backbone``, ``check_sampler``,
  ``check_schedule``).

The checks use :mod:`torch` and diffkit lazily, so that loading this module as a pytest
plugin costs nothing in test sessions that do not use it.
"""
from __future__ import annotations

import inspect
import math
import warnings
from typing import Any, Callable

from .adapter_checks import _fail, _name, check_adapter  # the adapter check lives in its own module

__all__ = ["check_adapter", "check_backbone", "check_sampler", "check_schedule", "check_plugin_registers",
           "DiffkitCheck"]


# -- plugins -------------------------------------------------------------------------------
def check_plugin_registers(plugin: Any, *, require_descriptions: bool = True,
                           entry_point: str | None = None) -> dict[str, dict[str, Any]]:
    """Check that ``plugin`` (a module or object with hookimpls) follows the hook contract.

    Every ``diffkit_*`` hook it implements must be marked with :data:`diffkit.hookimpl`,
    match a hook specification, and return a ``dict`` of non-empty ``str`` names to callables
    (with a docstring, the description ``diffkit plugins`` shows, unless
    ``require_descriptions=False``).  Names must not shadow diffkit's core built-ins.

    With ``entry_point="name"`` it also checks the installed package: an entry point of that
    name in the ``diffkit`` group loads ``plugin``, and diffkit's registry discovers every
    component it registers under that plugin name, without warnings (what ``diffkit plugins``
    shows).  The registry is refreshed before and after.  Returns ``{kind: {name: object}}``.
    """
    import importlib

    import pluggy

    from . import hookspecs
    from ._builtins import BUILTIN_PLUGINS
    from .registry import _HOOKS

    pname = getattr(plugin, "__name__", None) or type(plugin).__name__
    known = set(_HOOKS.values())
    marker = "diffkit_impl"  # the attribute pluggy's HookimplMarker("diffkit") sets
    hooks = [n for n in dir(plugin) if n.startswith("diffkit_") and callable(getattr(plugin, n, None))]
    for n in hooks:
        if not hasattr(getattr(plugin, n), marker):
            _fail(f"plugin {pname!r}: {n}() is not marked with @diffkit.hookimpl, so diffkit never calls it")
        if n not in known:
            _fail(f"plugin {pname!r}: {n}() matches no diffkit hook (a typo?); the hooks are {', '.join(sorted(known))}")
    if not hooks:
        _fail(f"plugin {pname!r} implements none of the diffkit hooks {', '.join(sorted(known))}")
    pm = pluggy.PluginManager("diffkit")
    pm.add_hookspecs(hookspecs)
    try:
        pm.register(plugin, name=pname)
    except Exception as e:
        _fail(f"plugin {pname!r} does not register with pluggy: {type(e).__name__}: {e}")
    core: dict[str, set] = {}
    builtin_modules = [importlib.import_module(m) for m in BUILTIN_PLUGINS]
    for mod in builtin_modules:
        for kind, hook in _HOOKS.items():
            if hasattr(mod, hook):
                core.setdefault(kind, set()).update(getattr(mod, hook)())
    found: dict[str, dict[str, Any]] = {}
    for kind, hook in _HOOKS.items():
        if hook not in hooks:
            continue
        try:
            got = getattr(plugin, hook)()
        except Exception as e:
            _fail(f"plugin {pname!r}: {hook}() raised {type(e).__name__}: {e}")
        if not isinstance(got, dict):
            _fail(f"plugin {pname!r}: {hook}() must return a dict of name -> callable, got {type(got).__name__}")
        for name, obj in got.items():
            if not isinstance(name, str) or not name:
                _fail(f"plugin {pname!r}: {hook}() returned the invalid name {name!r}; names are non-empty str")
            if not callable(obj):
                _fail(f"plugin {pname!r}: {kind} {name!r} is a {type(obj).__name__}, not a callable")
            if not any(plugin is m for m in builtin_modules) and name in core.get(kind, ()):
                _fail(f"plugin {pname!r}: {kind} {name!r} shadows a diffkit built-in; choose another name")
            if require_descriptions and not (getattr(obj, "__doc__", None) or "").strip():
                _fail(f"plugin {pname!r}: {kind} {name!r} has no docstring; its first line is the "
                      f"description `diffkit plugins` shows")
        found[kind] = dict(got)
    if entry_point is not None:
        _check_entry_point(plugin, pname, entry_point, found)
    return found


def _check_entry_point(plugin: Any, pname: str, entry_point: str, found: dict[str, dict[str, Any]]) -> None:
    """The installed entry point ``entry_point`` loads ``plugin`` and the registry lists its components."""
    import warnings

    from . import registry

    eps = [ep for ep in registry._entry_points() if ep.name == entry_point]  # as discovery sees them
    if not eps:
        _fail(f"plugin {pname!r}: no installed entry point {entry_point!r} in the {registry.ENTRY_POINT_GROUP!r} "
              f"group; declare it in pyproject.toml ([project.entry-points.diffkit] {entry_point} = "
              f"\"your_package\") and install the package (pip install -e .)")
    try:
        loaded = eps[0].load()
    except Exception as e:
        _fail(f"plugin {pname!r}: entry point {entry_point!r} = {eps[0].value!r} fails to load: {type(e).__name__}: {e}")
    if loaded is not plugin:
        _fail(f"plugin {pname!r}: entry point {entry_point!r} = {eps[0].value!r} loads {loaded!r}, not this plugin")
    registry.refresh()
    try:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always", registry.PluginWarning)
            try:
                listed = {(c.kind, c.name): c.plugin for c in registry.components()}
            except Exception as e:  # a name clash with another installed plugin
                _fail(f"plugin {pname!r}: diffkit's registry fails with it installed: {type(e).__name__}: {e}")
        ours = [str(w.message) for w in caught if repr(entry_point) in str(w.message)]
        if ours:
            _fail(f"plugin {pname!r}: discovering it warns: {ours[0]}")
        for kind, comps in found.items():
            for name in comps:
                got = listed.get((kind, name))
                if got != entry_point:
                    why = (f"it is listed under plugin {got!r}" if got else
                           "it is not listed (DIFFKIT_DISABLE_PLUGIN_AUTOLOAD or DIFFKIT_PLUGINS set?)")
                    _fail(f"plugin {pname!r}: the registry does not list {kind} {name!r} under {entry_point!r}; {why}")
    finally:
        registry.refresh()


# -- schedules -----------------------------------------------------------------------------
def check_schedule(factory: Callable[..., Any], **options) -> None:
    """Check a schedule factory: ``factory(**options)`` must return a
    :class:`diffkit.Schedule` with ``alpha_bar(0) == 1``, finite values on ``(0, 1]``, a
    non-increasing log-SNR that falls overall and is low at ``t = 1``, AR(1) transitions with
    ``lam^2 + sig^2 = 1``, and per-element evaluation on tensors of any shape."""
    import torch

    from .schedules import Schedule

    f = _name(factory)
    sched = factory(**options)
    if not isinstance(sched, Schedule):
        _fail(f"schedule factory {f} returned {type(sched).__name__}, not a diffkit.Schedule subclass")
    dt = torch.float64
    ab0 = float(sched.alpha_bar(torch.tensor(0.0, dtype=dt)))
    if not abs(ab0 - 1.0) <= 1e-9:
        _fail(f"schedule {sched!r}: alpha_bar(0) = {ab0}, must be 1 (t = 0 is the clean data)")
    t = torch.linspace(0.0, 1.0, 257, dtype=dt)[1:]
    la = sched.log_alpha_bar(t)
    if la.shape != t.shape:
        _fail(f"schedule {sched!r}: log_alpha_bar of shape {tuple(t.shape)} returned shape {tuple(la.shape)}")
    a, s = sched.coeffs(t)
    lsnr = sched.logsnr(t)
    for what, v in (("log_alpha_bar", la), ("alpha", a), ("sigma", s), ("logsnr", lsnr)):
        if not bool(torch.isfinite(v).all()):
            bad = t[~torch.isfinite(v)][:3].tolist()
            _fail(f"schedule {sched!r}: {what}(t) is not finite at t = {bad}")
    if not torch.allclose(a**2 + s**2, torch.ones_like(a), atol=1e-9):
        _fail(f"schedule {sched!r}: alpha^2 + sigma^2 != 1 (variance preserving)")
    d = lsnr[1:] - lsnr[:-1]
    if bool((d > 1e-9).any()):
        bad = t[1:][d > 1e-9][:3].tolist()
        _fail(f"schedule {sched!r}: log-SNR increases with t near t = {bad}; it must decrease")
    if not float(lsnr[0] - lsnr[-1]) > 1.0:
        _fail(f"schedule {sched!r}: log-SNR barely changes over (0, 1] ({float(lsnr[0])} to {float(lsnr[-1])})")
    ab1 = float(sched.alpha_bar(1.0))
    if not ab1 < 0.01:
        _fail(f"schedule {sched!r}: alpha_bar(1) = {ab1:.3g}; samplers start from N(0, I) at t = 1, "
              f"so alpha_bar(1) must be small (< 0.01)")
    lo, hi = t[:-1], t[1:]
    lam, sig = sched.transition(lo, hi)
    if not (bool(torch.isfinite(lam).all()) and bool(torch.isfinite(sig).all())):
        _fail(f"schedule {sched!r}: transition(s, t) is not finite")
    if not torch.allclose(lam**2 + sig**2, torch.ones_like(lam), atol=1e-9):
        _fail(f"schedule {sched!r}: transition(s, t) gives lam^2 + sig^2 != 1")
    if bool(((lam <= 0) | (lam > 1)).any()):
        _fail(f"schedule {sched!r}: transition(s, t) gives lam outside (0, 1]")
    lam_full = lam.prod()
    if not math.isclose(float(lam_full**2), float(sched.alpha_bar(1.0) / sched.alpha_bar(t[0])), rel_tol=1e-6):
        _fail(f"schedule {sched!r}: the product of transitions does not give alpha_bar (not a Markov chain)")
    grid = torch.tensor([[0.1, 0.5, 0.9], [0.2, 0.3, 1.0]], dtype=dt)
    g = sched.log_alpha_bar(grid)
    if g.shape != grid.shape or not torch.allclose(g.flatten(), sched.log_alpha_bar(grid.flatten())):
        _fail(f"schedule {sched!r}: log_alpha_bar is not elementwise on a (2, 3) tensor of times")
    mid = torch.linspace(0.05, 0.9, 9, dtype=dt)
    back = sched.t_from_logsnr(sched.logsnr(mid))
    if not torch.allclose(back, mid, atol=1e-6):
        _fail(f"schedule {sched!r}: t_from_logsnr(logsnr(t)) != t (got {back.tolist()} for {mid.tolist()})")
    if sched.T:
        b = sched.betas()
        if b.shape != (sched.T,) or bool(((b <= 0) | (b > 1) | ~torch.isfinite(b)).any()):
            _fail(f"schedule {sched!r}: betas() must be T = {sched.T} values in (0, 1]")


# -- samplers ------------------------------------------------------------------------------
class _KwargsProbe:
    """Wraps a denoiser and records the keyword arguments it is called with."""

    def __init__(self, inner):
        self.inner, self.schedule, self.kwargs = inner, inner.schedule, []

    def __call__(self, x, t, **kw):
        self.kwargs.append(kw)
        return self.inner(x, t)


def check_sampler(fn: Callable, *, nfe: int = 50, tol: float = 0.2, **options) -> None:
    """Check a sampler function against diffkit's sampler contract.

    It must carry ``.info`` (from :func:`diffkit.sampler_info`) with an ``order``,
    ``stochastic`` flag, ``default_spacing`` and an honest ``plan``; take
    ``(denoiser, x, ts, *, extra_args, generator, callback, **options)``; spend exactly the
    planned denoiser calls; call ``callback`` once per step; pass ``extra_args`` to the
    denoiser; leave its input unchanged; be reproducible with a seeded generator (and use
    it, if stochastic); and, on the exact denoiser of Gaussian data
    (:class:`diffkit.GaussianDenoiser`), reach the data's mean and standard deviation within
    ``tol`` (relative to the data std) at ``nfe`` evaluations.  ``options`` go to the sampler.
    """
    import torch

    from .analytic import GaussianDenoiser
    from .samplers import SPACINGS, sample, timesteps
    from .schedules import linear

    f = _name(fn)
    if not callable(fn):
        _fail(f"sampler {f} is not callable")
    info = getattr(fn, "info", None)
    if info is None:
        _fail(f"sampler {f} has no .info; decorate it with diffkit.sampler_info(order=..., stochastic=...)")
    for attr in ("order", "stochastic", "default_spacing", "plan"):
        if not hasattr(info, attr):
            _fail(f"sampler {f}: .info lacks {attr!r}; build it with diffkit.sampler_info")
    if not (isinstance(info.order, int) and info.order >= 1):
        _fail(f"sampler {f}: info.order must be an int >= 1, got {info.order!r}")
    if not isinstance(info.stochastic, bool):
        _fail(f"sampler {f}: info.stochastic must be a bool, got {info.stochastic!r}")
    if info.default_spacing not in SPACINGS:
        _fail(f"sampler {f}: info.default_spacing {info.default_spacing!r} is not one of {SPACINGS}")
    for k in (1, 2, 7, nfe):
        plan = info.plan(k)
        if not (isinstance(plan, tuple) and len(plan) == 2 and isinstance(plan[0], int) and plan[0] >= 1
                and isinstance(plan[1], dict)):
            _fail(f"sampler {f}: info.plan({k}) must return (n_steps >= 1, options dict), got {plan!r}")
    params = inspect.signature(fn).parameters
    has_var_kw = any(p.kind is p.VAR_KEYWORD for p in params.values())
    for kw in ("extra_args", "generator", "callback"):
        if kw not in params and not has_var_kw:
            _fail(f"sampler {f} does not accept the keyword {kw!r}; the signature is "
                  f"sampler(denoiser, x, ts, *, extra_args=None, generator=None, callback=None, **options)")

    sched = linear()
    mean, std = 1.0, 0.5
    shape = (2000, 2, 3)  # rank-2 samples: samplers must not assume a rank

    def run(seed, x_init):
        den = GaussianDenoiser(sched, torch.full(shape[1:], mean), std)
        g = torch.Generator().manual_seed(seed)
        out = sample(den, x_init.shape, sampler=fn, nfe=nfe, generator=g, x_init=x_init, **options)
        return out, den.nfe

    x_init = torch.randn(shape, generator=torch.Generator().manual_seed(1234))
    x_keep = x_init.clone()
    out, used = run(0, x_init)
    if not torch.equal(x_init, x_keep):
        _fail(f"sampler {f} modified its input x in place")
    if not isinstance(out, torch.Tensor) or out.shape != x_init.shape:
        _fail(f"sampler {f} returned {getattr(out, 'shape', type(out).__name__)}, expected shape {tuple(x_init.shape)}")
    if not bool(torch.isfinite(out).all()):
        _fail(f"sampler {f} returned non-finite values")
    if used != nfe:
        _fail(f"sampler {f} called the denoiser {used} times for nfe={nfe}; info.plan({nfe}) = "
              f"{info.plan(nfe)} must spend exactly nfe calls")
    m_err = abs(float(out.mean()) - mean) / std
    s_err = abs(float(out.std()) / std - 1.0)
    if m_err > tol or s_err > tol:
        _fail(f"sampler {f} does not converge on Gaussian data N({mean}, {std}^2) at nfe={nfe}: sample mean "
              f"{float(out.mean()):.4f}, std {float(out.std()):.4f} (relative errors {m_err:.3f}, {s_err:.3f} > {tol})")
    again, _ = run(0, x_init)
    if not torch.equal(out, again):
        _fail(f"sampler {f} is not reproducible with a seeded generator; draw all noise with "
              f"torch.randn(..., generator=generator)")
    other, _ = run(1, x_init)
    if info.stochastic and torch.equal(out, other):
        _fail(f"sampler {f} declares stochastic=True but its output does not depend on the generator")
    if not info.stochastic and not options and not torch.equal(out, other):
        _fail(f"sampler {f} declares stochastic=False but its output depends on the generator")

    n_steps = 6
    den = _KwargsProbe(GaussianDenoiser(sched, torch.full(shape[1:], mean), std))
    ts = timesteps(sched, n_steps, info.default_spacing)
    calls = []
    with torch.no_grad(), warnings.catch_warnings():
        # a protocol probe on a short grid, not a sample: accuracy warnings (Heun's low NFE) do not apply
        warnings.simplefilter("ignore", UserWarning)
        fn(den, x_init[:8].clone(), ts, extra_args={"probe": 1}, generator=torch.Generator().manual_seed(0),
           callback=calls.append, **options)
    if len(calls) != n_steps:
        _fail(f"sampler {f} called callback {len(calls)} times for a grid of {n_steps} steps; call it once per step")
    keys = {"i", "n", "t", "t_next", "x", "x0"}
    for k, c in enumerate(calls):
        if not isinstance(c, dict) or not keys <= set(c):
            _fail(f"sampler {f}: callback must get a dict with keys {sorted(keys)}, got {c!r:.200}")
        if c["i"] != k or c["n"] != n_steps:
            _fail(f"sampler {f}: callback step {k} reported i={c['i']}, n={c['n']}")
    if not den.kwargs or any(kw.get("probe") != 1 for kw in den.kwargs):
        _fail(f"sampler {f} does not pass extra_args to the denoiser as keyword arguments")


# -- backbones -----------------------------------------------------------------------------
def _randomize_zero_init(model) -> None:
    """Give all-zero weight matrices random values (zero-initialised output layers would
    otherwise hide whether the network depends on its inputs)."""
    import torch

    with torch.no_grad():
        for p in model.parameters():
            if p.ndim >= 2 and not bool(p.any()):
                p.normal_(0.0, 1.0 / math.sqrt(p[0].numel()))


def check_backbone(factory: Callable[..., Any], layout, *, batch: int = 3, seed: int = 0, **options):
    """Check a backbone factory: ``factory(layout, **options)`` must build a
    :class:`torch.nn.Module` whose ``forward(x, c_noise, scalars, labels)`` maps
    ``x`` of shape ``(B, layout.in_channels, *layout.shape)`` to finite values of shape
    ``(B, out_channels, *layout.shape)``, depends on ``c_noise`` (and on the scalars and labels
    the layout declares), treats batch elements independently, lets gradients reach ``x``
    and every parameter, and raises :class:`diffkit.ShapeError` on a wrong channel count or
    rank.  Returns the model (with zero-initialised layers randomised).  Torch's global
    random state is left as it was.
    """
    import torch

    from .errors import ShapeError

    f = _name(factory)
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = factory(layout, **options)
        if not isinstance(model, torch.nn.Module):
            _fail(f"backbone factory {f} returned {type(model).__name__}, not a torch.nn.Module")
        out_ch = options.get("out_channels") or layout.num_channels
        want = (batch, out_ch, *layout.shape)
        x = torch.randn(batch, layout.in_channels, *layout.shape)
        c = torch.linspace(-8.0, 8.0, batch)
        sc = torch.randn(batch, len(layout.scalars)) if layout.scalars else None
        lab = torch.arange(batch) % (layout.num_classes + 1) if layout.num_classes else None

        model.train()
        out = model(x, c, sc, lab)
        if not isinstance(out, torch.Tensor) or tuple(out.shape) != want:
            _fail(f"backbone {f}: output has shape {tuple(getattr(out, 'shape', ()))}, expected "
                  f"(B, out_channels, *spatial) = {want}")
        if not bool(torch.isfinite(out).all()):
            _fail(f"backbone {f}: output is not finite")

        bad = torch.randn(batch, layout.in_channels + 1, *layout.shape)
        for what, xb in (("channel count", bad), ("rank", x[..., None])):
            try:
                model(xb, c, sc, lab)
            except ShapeError:
                pass
            except Exception as e:
                _fail(f"backbone {f}: an input of the wrong {what} (shape {tuple(xb.shape)}) raised "
                      f"{type(e).__name__}: {e}; raise diffkit.ShapeError with a clear message")
            else:
                _fail(f"backbone {f}: an input of the wrong {what} (shape {tuple(xb.shape)}) was accepted; "
                      f"raise diffkit.ShapeError")

        _randomize_zero_init(model)
        model.zero_grad(set_to_none=True)
        xg = x.clone().requires_grad_(True)
        out = model(xg, c, sc, lab)
        (out * torch.randn_like(out)).sum().backward()
        if xg.grad is None or not bool(torch.isfinite(xg.grad).all()) or not bool(xg.grad.any()):
            _fail(f"backbone {f}: no finite, non-zero gradient reaches the input x")
        missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
        if missing:
            _fail(f"backbone {f}: parameters get no gradient (unused): {', '.join(missing[:5])}")
        nonfinite = [n for n, p in model.named_parameters() if p.grad is not None and not bool(torch.isfinite(p.grad).all())]
        if nonfinite:
            _fail(f"backbone {f}: non-finite gradients in {', '.join(nonfinite[:5])}")

        model.eval()
        with torch.no_grad():
            ref = model(x, c, sc, lab)
            one = model(x[:1], c[:1], None if sc is None else sc[:1], None if lab is None else lab[:1])
            if not torch.allclose(one, ref[:1], atol=1e-4, rtol=1e-4):
                _fail(f"backbone {f}: sample 0's output changes with the rest of the batch (batch statistics?); "
                      f"denoisers must treat samples independently")
            if torch.allclose(model(x, c + 3.0, sc, lab), ref, atol=1e-6):
                _fail(f"backbone {f}: the output does not depend on c_noise (the noise level)")
            if sc is not None and torch.allclose(model(x, c, sc + 1.0, lab), ref, atol=1e-6):
                _fail(f"backbone {f}: the output does not depend on the scalars {layout.scalars}")
            if lab is not None and torch.allclose(model(x, c, sc, (lab + 1) % (layout.num_classes + 1)), ref, atol=1e-6):
                _fail(f"backbone {f}: the output does not depend on the class labels")
    return model


# -- pytest fixtures -----------------------------------------------------------------------
class DiffkitCheck:
    """The checks of :mod:`diffkit.testing`, as the ``diffkit_check`` fixture exposes them."""

    check_adapter = staticmethod(check_adapter)
    check_backbone = staticmethod(check_backbone)
    check_sampler = staticmethod(check_sampler)
    check_schedule = staticmethod(check_schedule)
    check_plugin_registers = staticmethod(check_plugin_registers)


try:
    import pytest
except ImportError:  # pragma: no cover - the checks work without pytest
    pytest = None

if pytest is not None:

    @pytest.fixture
    def diffkit_registry():
        """:mod:`diffkit.registry`, refreshed before and after the test; plugins registered by
        hand during the test are removed.  Autoload follows the environment switches."""
        from . import registry

        saved = list(registry._extra)
        registry.refresh()
        try:
            yield registry
        finally:
            registry._extra[:] = saved
            registry.refresh()

    @pytest.fixture
    def diffkit_check():
        """An object with diffkit's contract checks: ``check_plugin_registers`` (with
        ``entry_point=``: the installed plugin is discovered), ``check_adapter``,
        ``check_backbone``, ``check_sampler`` and ``check_schedule``."""
        return DiffkitCheck()
