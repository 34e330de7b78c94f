"""The ``diffkit`` command line.  Failures print a one-line reason and exit non-zero;
``--debug`` shows the traceback."""
from __future__ import annotations

import argparse
import sys


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
                        description="List every registered backbone, adapter, schedule, sampler and metric.")
    sp.add_argument("--kind", choices=["backbone", "adapter", "schedule", "sampler", "metric"], default=None,
                    help="only this kind of component")
    sp.set_defaults(func=_cmd_plugins)
    return p


def main(argv=None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
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
        print(f"diffkit {args.command}: error: {msg} (--debug shows the traceback)", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
