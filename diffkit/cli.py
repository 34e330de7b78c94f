"""The ``diffkit`` command line.  Failures print a one-line reason and exit non-zero;
``--debug`` shows the traceback."""
from __future__ import annotations

import argparse
import contextlib
import os
import sys
import warnings
from pathlib import Path

from .devices import resolve_device  # noqa: F401  (diffkit.cli.resolve_device: the plugins' commands use it)


def _cmd_plugins(args) -> int:
    import warnings

    from . import registry

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", registry.PluginWarning)
        try:
            comps = registry.components(args.kind)
        finally:  # plugin warnings explain most failures, so show them first
            for w in caught:
                print(f"warning: {w.message}", file=sys.stderr)
    rows = [(c.kind, c.name, c.plugin, c.description) for c in comps]
    head = ("KIND", "NAME", "PLUGIN", "DESCRIPTION")
    widths = [max(len(r[i]) for r in rows + [head]) for i in range(3)]
    print("  ".join(h.ljust(w) for h, w in zip(head, widths)) + "  " + head[3])
    for r in rows:
        print("  ".join(v.ljust(w) for v, w in zip(r, widths)) + "  " + r[3])
    return 0


def _cmd_train(args) -> int:
    from .config import Config, apply_overrides, load_config

    cfg = load_config(args.config) if args.config else Config()
    sets = list(args.set or [])
    if args.run_dir is not None:  # --run-dir "" is the config's empty-run_dir error, not silently ignored
        import json

        sets.append(f"run_dir={json.dumps(args.run_dir)}")  # a TOML basic string: quotes and backslashes escaped
    cfg = apply_overrides(cfg, sets)
    if args.device:
        resolve_device(args.device)  # cuda without CUDA: one line, before the data is loaded
    from .train import Trainer

    resume = False if args.resume is None else (True if args.resume == "" else args.resume)
    trainer = Trainer(cfg, device=args.device, resume=resume, progress=not args.no_progress)
    out = trainer.fit()
    if trainer.dist.main:
        # the trainer has said why just before (the time budget, or Ctrl-C with how to resume)
        how = "finished" if out["step"] >= cfg.trainer.steps else "stopped early"
        print(f"diffkit train: {how} at step {out['step']}; run directory {cfg.run_dir}")
    _leave_process_group()
    return 0


def _cmd_sample(args) -> int:
    import torch

    from .distributed import init_distributed
    from .model import class_balanced_count, load_for_sampling
    from .samplers import MAX_NFE, SPACINGS
    from .sampling import sample

    _check_sample_args(args, MAX_NFE, SPACINGS)
    device = resolve_device(args.device)
    dist = init_distributed(device)
    den, cfg, adapter_cls = load_for_sampling(args.checkpoint, device=device)
    sc = cfg.sample
    n = args.n if args.n is not None else sc.n
    sampler = args.sampler or sc.sampler
    if args.sampler is not None:
        from . import registry

        registry.resolve("sampler", sampler)  # a typo fails before the model runs, listing the samplers
    nfe = args.steps if args.steps is not None else sc.nfe
    guidance = args.guidance if args.guidance is not None else sc.guidance
    layout = den.layout
    if args.n is None and args.label is None and layout.num_classes:
        n = class_balanced_count(n, layout.num_classes)   # the same number per class: full rows in a grid
    cond = None
    from .denoiser import Regressor

    if isinstance(den, Regressor):
        raise ValueError("this checkpoint is a deterministic regression model (model.objective = \"regression\"); "
                         "it has nothing to sample. Use the domain's command (e.g. diffkit rollout) to run it")
    if layout.cond_channels or layout.scalars:
        raise ValueError("this model is conditional on fields or scalars; use the domain's command "
                         "(e.g. diffkit forecast / rollout) to give the conditions")
    if not layout.num_classes and guidance is not None:
        if args.guidance is not None:
            raise ValueError(f"--guidance {args.guidance:g} was given but this model is unconditional (num_classes = 0): "
                             "classifier-free guidance needs a class-conditional model; leave --guidance out")
        warnings.warn(f"sample.guidance = {guidance:g} in the run's config is ignored: this model is unconditional "
                      "(num_classes = 0)", UserWarning, stacklevel=2)
        guidance = None
    _check_out(args.out, adapter_cls)
    g = torch.Generator(device=device).manual_seed(args.seed)
    # every rank draws the noise of all n members and keeps its share, so the result does not
    # depend on the number of processes (deterministic samplers)
    x_init = torch.randn((n, *layout.sample_shape), generator=g, device=device)
    idx = torch.arange(dist.rank, n, dist.world, device=device)
    labels = None
    if args.label is not None and not layout.num_classes:
        raise ValueError("--label was given but this model is not class-conditional (num_classes = 0)")
    if layout.num_classes:
        if args.label is not None and not 0 <= args.label < layout.num_classes:
            names = layout.attrs.get("class_names")
            named = [f"{i}: {c}" for i, c in enumerate(names or ()) if str(c) != str(i)]
            known = f" ({', '.join(named[:20])}{', ...' if len(named) > 20 else ''})" if named else ""
            raise ValueError(f"--label {args.label} is not a class of this model: use 0..{layout.num_classes - 1}"
                             f"{known}; for unconditional samples use --guidance 0")
        # a balanced set by default: labels cycle through the classes
        labels = (torch.arange(n, device=device) % layout.num_classes) if args.label is None else \
            torch.full((n,), args.label, device=device, dtype=torch.long)
    from .denoiser import Cond

    bound = den.bind(Cond(labels=labels[idx]) if labels is not None else cond, guidance)
    x = sample(bound, (len(idx), *layout.sample_shape), sampler=sampler, nfe=nfe, spacing=args.spacing or sc.spacing,
               generator=g, device=device, x_init=x_init[idx], progress=not args.no_progress and dist.main)
    if dist.world > 1:
        import torch.distributed as td

        # gloo's gather needs equal shapes: pad every shard to ceil(n / world) rows, trim after
        m = -(-n // dist.world)
        buf = torch.zeros((m, *layout.sample_shape), device=device, dtype=x.dtype)
        buf[: x.shape[0]] = x
        parts = [torch.empty_like(buf) for _ in range(dist.world)] if dist.main else None
        td.gather(buf, parts, dst=0)
        if dist.main:
            full = torch.empty((n, *layout.sample_shape), device=device, dtype=x.dtype)
            for r in range(dist.world):
                full[r::dist.world] = parts[r][: len(range(r, n, dist.world))]
            x = full
    if dist.main:
        from .adapters import decode_samples

        attrs = {"sampler": sampler, "nfe": nfe, "seed": args.seed, "checkpoint": str(args.checkpoint),
                 "command": " ".join(["diffkit", *getattr(args, "argv", ["sample", str(args.checkpoint)])])}
        if labels is not None:
            attrs["guidance"] = "none" if guidance is None else guidance
        try:
            out = decode_samples(adapter_cls, x, layout, args.out, attrs=attrs, labels=labels)
        except IsADirectoryError:  # a decoder that takes no directory, with a temp file's name in the error
            raise ValueError(f"--out {args.out} is a directory; give a file name, e.g. "
                             f"--out {Path(args.out) / 'samples.nc'}") from None
        per = ""
        if labels is not None and args.label is None:
            per = f" ({n // layout.num_classes} per class)" if n % layout.num_classes == 0 else \
                f" (not the same number per class: {n} is not a multiple of {layout.num_classes} classes)"
        if n != sc.n and args.n is None:
            per += f"; sample.n = {sc.n} rounded up to a multiple of the {layout.num_classes} classes (--n N draws N)"
        print(f"diffkit sample: wrote {n} samples to {out}{per}")
    _leave_process_group()
    return 0


#: what the default decoder (:meth:`diffkit.adapters.Adapter.decode`, netCDF) writes
NETCDF_SUFFIXES = (".nc", ".nc4", ".netcdf", ".cdf")


def _check_sample_args(args, max_nfe: int, spacings) -> None:
    """Bad numbers and names of ``diffkit sample``, each named with its option, before any work."""
    if args.n is not None and args.n < 1:
        raise ValueError(f"--n must be >= 1, got {args.n}")
    if args.steps is not None and not 1 <= args.steps <= max_nfe:
        raise ValueError(f"--steps must be in 1..{max_nfe} (the number of denoiser calls), got {args.steps}")
    if not 0 <= args.seed < 2**63:
        raise ValueError(f"--seed must be in 0..{2**63 - 1} (a 64-bit seed), got {args.seed}")
    if args.spacing is not None and args.spacing not in spacings:
        raise ValueError(f"--spacing must be one of {', '.join(spacings)}, got {args.spacing!r}")
    g = args.guidance
    if g is not None and not (0 <= g < float("inf")):
        what = "negative guidance is not supported" if g < 0 else "it must be a finite number"
        raise ValueError(f"--guidance must be >= 0 (0 is the unconditional model, 1 the conditional one, larger "
                         f"values guide more strongly), got {g:g}: {what}")


def _check_out(out, adapter_cls) -> None:
    """``--out`` before sampling: an existing directory, or a suffix the decoder does not write.

    An adapter class may declare ``output_suffixes`` (e.g. ``(".nc",)``; ``"/"`` in it means a
    directory is fine); one that keeps the default netCDF decoder writes :data:`NETCDF_SUFFIXES`."""
    from .adapters import Adapter

    suffixes = getattr(adapter_cls, "output_suffixes", None)
    if suffixes is None and getattr(adapter_cls.decode, "__func__", None) is Adapter.decode.__func__:
        suffixes = NETCDF_SUFFIXES
    if suffixes is None:
        return
    p = Path(out)
    files = [x for x in suffixes if x != "/"]
    if p.is_dir() or str(out).endswith(("/", os.sep)):
        if "/" not in suffixes:
            raise ValueError(f"--out {out} is a directory; give a file name, e.g. --out {p / ('samples' + files[0])}")
        return
    ext = p.suffix.lower()
    if ext not in files:
        name = getattr(adapter_cls, "name", adapter_cls.__name__)
        what = f"has an unknown extension {ext!r}" if ext else "has no extension"
        raise ValueError(f"--out {out} {what}: the {name!r} adapter writes {', '.join(files)} files; "
                         f"e.g. --out {p.with_suffix(files[0])}")


def _leave_process_group() -> None:
    """Under torchrun: wait for rank 0 (which writes the outputs), then leave the process group.
    A rank that exits with the group still live can abort ("terminate called without an active
    exception"), and torchrun then kills rank 0 before it has written its files."""
    import torch.distributed as td

    if td.is_available() and td.is_initialized():
        td.barrier()
        td.destroy_process_group()


def _cmd_config(args) -> int:
    from .config import format_config_help, format_config_markdown

    sys.stdout.write(format_config_markdown() if args.markdown else format_config_help() + "\n")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from . import __version__

    p = argparse.ArgumentParser(
        prog="diffkit",
        description="Denoising diffusion models for scientific data of any shape (Turner et al. 2024).",
    )
    p.add_argument("--version", action="version", version=f"diffkit {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--debug", action="store_true", help="show the full traceback on failure")
    common.add_argument("--device", default=None, help="torch device, e.g. cpu or cuda (default: cuda if available)")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sp = sub.add_parser("plugins", parents=[common], help="list registered components and their plugins",
                        description="List every registered backbone, adapter, schedule, sampler, metric and command.")
    from .registry import KINDS

    sp.add_argument("--kind", choices=list(KINDS), default=None,
                    help="only this kind of component")
    sp.set_defaults(func=_cmd_plugins)

    tp = sub.add_parser("train", parents=[common], help="train a model from a TOML/YAML config",
                        description="Train a diffusion model. Multi-process: torchrun --nproc_per_node=N -m diffkit train CONFIG")
    tp.add_argument("config", nargs="?", default=None,
                    help="TOML or YAML config file (default: the built-in defaults; `diffkit config` lists every key)")
    tp.add_argument("--set", action="append", metavar="KEY=VALUE",
                    help="override a config key, e.g. --set trainer.lr=1e-4 (repeatable)")
    tp.add_argument("--run-dir", default=None, help="run directory (overrides run_dir)")
    tp.add_argument("--resume", nargs="?", const="", default=None, metavar="CKPT",
                    help="resume from the latest valid checkpoint of the run directory, or from CKPT")
    tp.add_argument("--no-progress", action="store_true", help="no progress bar")
    tp.set_defaults(func=_cmd_train)

    sp = sub.add_parser("sample", parents=[common], help="sample from a checkpoint",
                        description="Draw samples from a checkpoint (file or run directory) alone and write them "
                                    "through the adapter's decoder (netCDF, PNG, ...).")
    sp.add_argument("checkpoint", help="checkpoint file, checkpoints directory or run directory")
    # -n / --num-samples: torchrun's own parser rejects "--n" as an ambiguous abbreviation of its
    # --nnodes/--nproc-per-node/... even after the script name, so `torchrun ... -m diffkit sample`
    # needs a spelling it does not mistake for one of its options
    sp.add_argument("--n", "-n", "--num-samples", dest="n", type=int, default=None,
                    help="number of samples (default: sample.n of the run, for a class-conditional model rounded up to "
                         "a multiple of the number of classes); under torchrun write -n or --num-samples")
    sp.add_argument("--sampler", default=None, help="sampler name (default: the run's; `diffkit plugins --kind sampler`)")
    sp.add_argument("--steps", type=int, default=None, help="number of denoiser evaluations (NFE)")
    sp.add_argument("--spacing", default=None, help="time spacing: uniform, quadratic, karras, logsnr")
    sp.add_argument("--seed", type=int, default=0, help="random seed (same seed, same samples)")
    sp.add_argument("--guidance", type=float, default=None, help="classifier-free guidance scale (class-conditional models)")
    sp.add_argument("--label", type=int, default=None, help="class label for every sample (default: cycle through classes)")
    sp.add_argument("--out", required=True, help="output file (e.g. samples.nc; images: samples.png, written with "
                                                 "samples.npz)")
    sp.add_argument("--no-progress", action="store_true", help="no progress bar")
    sp.set_defaults(func=_cmd_sample)

    cp = sub.add_parser("config", parents=[common], help="list every config key with its type, default and meaning")
    cp.add_argument("--markdown", action="store_true",
                    help="print the reference as Markdown (diffkit config --markdown > docs/config.md)")
    cp.set_defaults(func=_cmd_config)
    from .assimilate import register as register_assimilate  # the options and the command: diffkit/assimilate.py

    register_assimilate(sub.add_parser(
        "assimilate", parents=[common], help="ensemble analysis from sparse, noisy observations (guided rollouts)",
        description="Assimilate observations (CF netCDF: gridded with missing values, or points) into an ensemble: "
                    "the surrogate's rollout from --init over the observation window, each step guided by that "
                    "step's observations (mmps, reconstruction, dps). Writes members, ensemble mean and spread in "
                    "the domain's forecast / rollout format. docs/observations.md"))
    from .evaluation import register as register_evaluate  # the command and its evaluators: diffkit/evaluation.py

    register_evaluate(sub.add_parser(
        "evaluate", parents=[common], help="score an ensemble (forecast, rollout, analysis) against the truth: RMSE, "
                                           "CRPS, spread, spread/skill, rank histograms, the dispersion verdict",
        description="Score an ensemble file against the truth with the evaluator that claims it (the plugins' "
                    "first: weather forecasts and analyses, PDE rollouts and analyses; then diffkit's generic one "
                    "for any file with a member dim). Writes scores.csv, scores.nc (CF) and figures. "
                    "docs/evaluation.md"))
    _add_plugin_commands(sub, common)
    return p


_PLUGIN_ERROR: Exception | None = None


def _add_plugin_commands(sub, common) -> None:
    """Mount the commands plugins register through the ``diffkit_commands`` hook.

    ``"data pde"`` goes under the group ``data``, created on first use.  A command that clashes
    with a built-in one, or whose ``register`` fails, is skipped with a warning naming its plugin.
    """
    import warnings

    from . import registry

    global _PLUGIN_ERROR
    builtin = set(sub.choices)
    groups: dict[str, argparse._SubParsersAction] = {}
    try:
        comps = registry.components("command")
    except Exception as e:  # an inconsistent plugin set: the commands that need plugins report it
        _PLUGIN_ERROR = e
        return
    for comp in comps:
        words = comp.name.split()
        if words[0] in builtin:
            warnings.warn(f"diffkit plugin {comp.plugin!r} registers the command {comp.name!r}, which clashes with "
                          f"the built-in command {words[0]!r}; skipped", registry.PluginWarning, stacklevel=2)
            continue
        try:
            parent = sub
            for depth, group in enumerate(words[:-1]):
                key = " ".join(words[: depth + 1])
                if key not in groups:
                    gp = parent.add_parser(group, parents=[common], help=f"{group} commands from plugins",
                                           description=f"`diffkit {key} NAME --help` describes each.")
                    groups[key] = gp.add_subparsers(dest=f"{key.replace(' ', '_')}_command", metavar="NAME")
                    gp.set_defaults(func=_group_help(gp))
                parent = groups[key]
            cp = parent.add_parser(words[-1], parents=[common], help=comp.description,
                                   description=comp.description + f" (from plugin {comp.plugin})")
            comp.obj(cp)
            if cp.get_default("func") is None:
                raise TypeError("register() did not set a func default (parser.set_defaults(func=run))")
        except Exception as e:  # a broken plugin must not break the CLI
            warnings.warn(f"diffkit plugin {comp.plugin!r} failed to register the command {comp.name!r} and it is "
                          f"skipped: {type(e).__name__}: {e}", registry.PluginWarning, stacklevel=2)


def _group_help(parser):
    def run(args) -> int:
        parser.print_help()
        return 0
    return run


def _from_diffkit(filename) -> bool:
    """Whether a warning was issued by diffkit or one of its plugins (``diffkit_*`` packages)."""
    parts = Path(str(filename)).parts
    return any(p == "diffkit" or p.startswith("diffkit_") for p in parts[:-1])


def format_warning(message, category, filename, lineno) -> str:
    """A warning as the CLI prints it: one line, ``warning: <message>`` (diffkit's and its plugins'),
    or ``warning: <message> (<Category> at <file>:<line>)`` for other libraries' -- never the
    Python source line that :func:`warnings.formatwarning` adds."""
    msg = " ".join(str(message).split()) or category.__name__
    if _from_diffkit(filename):
        return f"warning: {msg}\n"
    return f"warning: {msg} ({category.__name__} at {Path(str(filename)).name}:{lineno})\n"


@contextlib.contextmanager
def _one_line_warnings(enabled: bool = True):
    """While the CLI runs, warnings print as one line each (:func:`format_warning`); ``--debug``
    keeps Python's format, source line included."""
    if not enabled:
        yield
        return
    previous = warnings.showwarning

    def show(message, category, filename, lineno, file=None, line=None):
        try:
            (file or sys.stderr).write(format_warning(message, category, filename, lineno))
        except (OSError, AttributeError):  # stderr closed or gone: nowhere to warn
            pass

    warnings.showwarning = show
    try:
        yield
    finally:
        warnings.showwarning = previous


def _subparser(parser, args):
    """The parser of the (sub)command ``args`` selected (``diffkit data pde``: that one), so that a
    usage error shows the usage of the command that was typed."""
    p = parser
    if not getattr(args, "command", None):
        return p
    for word in _command_name(args).split():
        action = next((a for a in p._actions if isinstance(a, argparse._SubParsersAction)), None)
        if action is None or word not in action.choices:
            break
        p = action.choices[word]
    return p


def main(argv=None) -> int:
    words = sys.argv[1:] if argv is None else list(argv)
    with _one_line_warnings("--debug" not in words):
        return _main(argv, words)


def _main(argv, words) -> int:
    from .registry import PluginWarning

    # plugin commands are mounted at start-up, so plugin problems surface here: one line each
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always", PluginWarning)
        parser = build_parser()
    for w in caught:
        if issubclass(w.category, PluginWarning):
            print(f"warning: {w.message}", file=sys.stderr)
        else:
            warnings.warn_explicit(w.message, w.category, w.filename, w.lineno)
    cmd = next((w for w in words if not w.startswith("-")), None)
    if _PLUGIN_ERROR is not None and cmd is not None and cmd not in _choices(parser):
        msg = " ".join(str(_PLUGIN_ERROR).split())
        print(f"diffkit: error: unknown command {cmd!r}; plugin commands could not be loaded: {msg}", file=sys.stderr)
        return 1
    args, extra = parser.parse_known_args(argv)
    if extra:  # the typed command's usage, not the top level's
        _subparser(parser, args).error(f"unrecognized arguments: {' '.join(extra)}")
    args.argv = words  # the command line: outputs name it in their history attribute
    if not getattr(args, "command", None):
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print("diffkit: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        if getattr(args, "debug", False):
            raise
        msg = " ".join(str(e).split()) or type(e).__name__
        print(f"diffkit {_command_name(args)}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 1


def _choices(parser) -> set:
    for a in parser._actions:
        if isinstance(a, argparse._SubParsersAction):
            return set(a.choices)
    return set()


def _command_name(args) -> str:
    """``"data pde"`` for plugin subcommands, else the command."""
    words = [args.command]
    while True:
        nxt = getattr(args, f"{'_'.join(words)}_command", None)
        if not nxt:
            return " ".join(words)
        words.append(nxt)


if __name__ == "__main__":
    raise SystemExit(main())
